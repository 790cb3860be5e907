"""Checkpoints that were tampered with, damaged, or cut short by failing storage (pipelines/train/checkpoint.py).

- A pickle planted in place of a checkpoint file (ours or DeepSpeed's, with its listing rewritten to match, as
  whoever can write the storage could) is refused with an error naming the file, and never unpickled: the
  marker file its __reduce__ would create never appears.
- A damaged latest checkpoint (a truncated meta.json) is one line naming the file and the setting that falls
  back; with checkpoint.fallback=previous the run sets it aside and continues from the previous one, and Ray
  Train's run state follows.
- A checkpoint upload that fails mid-way (the storage refuses a file) fails the job (exit 1, the report says why)
  and leaves the previous checkpoint the run's latest: it verifies and the rerun resumes from it.
- A 2-rank checkpoint missing one rank's files (its ZeRO shard, every file its complete.json lists, or its whole
  folder) is refused before training with one line naming what is missing; the checkpoint is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from pipelines.train import checkpoint
from tests.test_train_checkpoint import _engine, _trained_engine

REPO = Path(__file__).resolve().parents[1]


class _Plant:
    """Unpickling it runs a shell command that creates `marker`: what an attacker would put in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    """Replace `path` with a malicious torch.save file and rewrite the listing that names it (size, sha256),
    so that only the refusal to unpickle stands between the file and the code in it."""
    torch.save({"module": _Plant(marker)}, path)
    root = next(p for p in path.parents if (p / checkpoint.META_FILE).exists())
    name = path.relative_to(root).as_posix()
    for listing_path in root.glob(f"rank_*/{checkpoint.COMPLETE_FILE}"):
        listing = json.loads(listing_path.read_text())
        if name in listing["files"]:
            entry = listing["files"][name]
            data = path.read_bytes()
            listing["files"][name] = ({**entry, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                                      if isinstance(entry, dict) else len(data))
            listing_path.write_text(json.dumps(listing))


@pytest.fixture
def saved(gloo_world_of_one, tmp_path) -> Path:
    """A real one-rank DeepSpeed checkpoint written by checkpoint.save after two steps."""
    engine = _trained_engine()
    local = tmp_path / "checkpoint"
    state = {"loader": {"epoch": 0}, "guard": {"total_skipped": 0, "consecutive": 0}, "rng": checkpoint.rng_state(),
             "ema": {"shadow": {"w": torch.arange(4.0)}, "fragments": {"w": (0, 4)}}}
    checkpoint.save(local, engine, rank=0, step=2, trainer_state=state, meta={"world_size": 1, "fingerprint": {}})
    return local


@pytest.mark.parametrize("target", ["model_states", "optim_states", "trainer_state"])
def test_a_planted_pickle_is_refused_and_never_unpickled(saved, tmp_path, target):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    if target == "trainer_state":  # every file of our own per-rank state
        victims = [p for p in (saved / checkpoint.rank_dir(0)).iterdir() if p.name != checkpoint.COMPLETE_FILE]
    else:
        victims = [next(saved.rglob(f"*{target}.pt"))]
    for victim in victims:
        plant(victim, marker)
    with pytest.raises(checkpoint.CheckpointError) as refused:
        checkpoint.verify(str(saved), {}, thorough=True)  # the driver's check before launch
    assert any(v.name in str(refused.value) for v in victims) and len(str(refused.value).splitlines()) == 1
    with pytest.raises(checkpoint.CheckpointError) as refused:
        checkpoint.load(str(saved), _engine(seed=1), rank=0, world_size=1)  # a worker that was not warned
    assert any(v.name in str(refused.value) for v in victims), str(refused.value)
    assert not marker.exists()


def test_the_trainer_state_round_trips_without_pickle(saved, gloo_world_of_one):
    import random

    import numpy as np

    assert not list(saved.rglob("*.pt")) or all("deepspeed" in p.parts for p in saved.rglob("*.pt"))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    state = checkpoint.load(str(saved), _engine(seed=1), rank=0, world_size=1)
    torch.rand(5), np.random.rand(5), random.random()
    checkpoint.set_rng_state(state["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    # the RNG state saved before `expected` was drawn: the same numbers again
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]
    assert torch.equal(state["ema"]["shadow"]["w"], torch.arange(4.0)) and state["step"] == 2
    assert state["loader"] == {"epoch": 0}


def test_a_changed_file_of_the_same_size_is_found_by_its_checksum(saved):
    shard = next(saved.rglob("*optim_states.pt"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    checkpoint.verify(str(saved), {})  # sizes only (a worker's check): passes
    with pytest.raises(checkpoint.CheckpointDamaged, match="sha256"):
        checkpoint.verify(str(saved), {}, thorough=True)


def test_a_truncated_meta_json_is_one_line_naming_the_file(saved):
    meta = saved / checkpoint.META_FILE
    meta.write_text(meta.read_text()[:20])
    with pytest.raises(checkpoint.CheckpointDamaged) as damaged:
        checkpoint.verify(str(saved), {})
    message = str(damaged.value)
    assert str(meta) in message and "fallback" in message and len(message.splitlines()) == 1


# ------------------------------------------------------------------------------- real runs (Ray Train, DeepSpeed)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from pipelines.synthetic.features import write_synthetic_features

    root = tmp_path_factory.mktemp("ckpt-safety")
    write_synthetic_features(str(root / "features"), rows=32, shards=2, image_size=32)
    return root


def make_cfg(work: Path, name: str, *overrides: str, storage: str = "runs"):
    """tiny-cpu.yaml cut to 4 steps with a checkpoint every 2 (as tests/test_train_unet.py)."""
    import yaml

    from pipelines.core.config import apply_override, from_dict
    from pipelines.train.config import TrainConfig

    values = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    for assignment in [f"features_dir={work / 'features'}", f"storage_path={work / storage}", f"run_name={name}",
                       "max_steps=4", "log_every=1", "batch.global_batch=16", "batch.micro_batch=8",
                       "lr.kind=constant", "lr.warmup_steps=0", "checkpoint.every_steps=2", "checkpoint.keep=3",
                       "max_failures=0", "samples.every_steps=0",
                       "samples.prompts=[a large red circle in the top left]", "samples.seeds=[0]",
                       "samples.sampler.steps=2", f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
                       "mlflow.experiment=tests", "mlflow.system_metrics=false", *overrides]:
        apply_override(values, assignment)
    return from_dict(TrainConfig, values)


def job_args(cfg) -> list[str]:
    """The same config as the job's command line: a YAML file next to the run."""
    import yaml

    from pipelines.core.config import to_dict

    path = Path(cfg.storage_path) / f"{cfg.run_name}.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return ["--config", str(path)]


@pytest.fixture(scope="module")
def failed_upload(work, ray_local):
    """A run of the job's stage (2 ranks) whose second checkpoint's upload fails mid-way: rank 0's meta.json
    cannot be written there (a folder holds its name, as a full or read-only disk refuses a file; root ignores
    chmod). Returns the config, the run's folder, the blocking folder and the exit status."""
    from pipelines.core.job import run_stage
    from pipelines.train.driver import STAGE, run_dir

    cfg = make_cfg(work, "upload")
    directory = Path(run_dir(cfg))
    blocked = directory / checkpoint.checkpoint_dir_name(4) / checkpoint.META_FILE
    blocked.mkdir(parents=True)
    return cfg, directory, blocked, run_stage(STAGE, cfg)


@pytest.mark.slow
def test_train_unet_exits_1_when_a_checkpoint_upload_fails(failed_upload):
    """A failure at run time, not bad input: exit 1 and the report says which run failed, in one line."""
    from pipelines.train.driver import REPORT_FILE

    cfg, directory, _, status = failed_upload
    assert status == 1
    report = json.loads((directory / REPORT_FILE).read_text())
    assert report["ok"] is False and "\n" not in report["error"]
    assert f"training run {cfg.run_name} failed" in report["error"], report["error"]


@pytest.mark.slow
def test_a_failed_upload_leaves_the_previous_checkpoint_the_latest_and_resumable(work, failed_upload):
    from pipelines.train.driver import run_training

    cfg, directory, blocked, _ = failed_upload
    latest = checkpoint.latest_checkpoint(str(directory))
    assert latest == str(directory / checkpoint.checkpoint_dir_name(2))
    assert checkpoint.verify(latest, checkpoint_fingerprint(cfg), thorough=True)["step"] == 2
    shutil.rmtree(blocked)  # the storage has room again
    result = run_training(cfg)
    assert result.resumed_from == latest and result.steps == 4
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(str(directory)))["step"] == 4


def checkpoint_fingerprint(cfg):
    from pipelines.train.config import fingerprint

    return fingerprint(cfg)


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_is_refused_then_set_aside_on_request(work, failed_upload, caplog):
    """A copy of the finished run of the test above, its latest meta.json truncated."""
    from jobs.train_unet import main
    from pipelines.train.driver import run_dir, run_training

    done, _, _, _ = failed_upload
    cfg = make_cfg(work, "upload", storage="runs-copy")
    shutil.copytree(run_dir(done), run_dir(cfg))
    damaged = Path(checkpoint.latest_checkpoint(run_dir(cfg)))
    (damaged / checkpoint.META_FILE).write_text('{"step": 4, "wor')
    with caplog.at_level(logging.ERROR):
        assert main(job_args(cfg)) == 2  # before Ray starts
    line = caplog.records[-1].getMessage()
    assert str(damaged / checkpoint.META_FILE) in line and "--set checkpoint.fallback=previous" in line

    marker = work / f"pwned-{uuid.uuid4().hex}"
    previous = Path(run_dir(cfg)) / checkpoint.checkpoint_dir_name(2)
    plant(next(previous.rglob("*optim_states.pt")), marker)
    with caplog.at_level(logging.ERROR):
        assert main(job_args(cfg) + ["--set", "checkpoint.fallback=previous"]) == 2  # no intact one left
    assert "optim_states.pt" in caplog.records[-1].getMessage() and not marker.exists()
    shutil.rmtree(previous)
    shutil.copytree(Path(run_dir(done)) / checkpoint.checkpoint_dir_name(2), previous)

    result = run_training(make_cfg(work, "upload", "checkpoint.fallback=previous", storage="runs-copy"))
    assert result.resumed_from == str(previous) and result.steps == 4
    assert (Path(run_dir(cfg)) / checkpoint.DAMAGED_DIR / damaged.name / checkpoint.META_FILE).is_file()
    latest = checkpoint.latest_checkpoint(run_dir(cfg))
    assert checkpoint.verify(latest, checkpoint_fingerprint(cfg), thorough=True)["step"] == 4
    ours, theirs = _weights(run_dir(cfg)), _weights(run_dir(done))  # both continued step 2's checkpoint
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _files_and_times(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under root: (size, mtime in ns), to see that a refusal changed nothing."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.slow
@pytest.mark.parametrize("missing", ["zero_shard", "every_listed_file", "whole_rank"])
def test_a_checkpoint_missing_one_ranks_files_is_refused_before_training_and_left_untouched(work, failed_upload,
                                                                                            caplog, missing):
    """A copy of the run's step-2 checkpoint (2 ranks, ZeRO-2) given as checkpoint.resume_from, where rank 1 lost
    its DeepSpeed ZeRO shard; or every file its complete.json lists (the listing names a rank that has no files);
    or its whole folder (meta.json's world size still says 2). Each is refused by the job before any training
    (exit 2) with one line naming what is missing, and the checkpoint is left as it was."""
    from jobs.train_unet import main

    _, directory, _, _ = failed_upload
    damaged = work / f"missing-{missing}" / checkpoint.checkpoint_dir_name(2)
    shutil.copytree(directory / checkpoint.checkpoint_dir_name(2), damaged)
    assert json.loads((damaged / checkpoint.META_FILE).read_text())["world_size"] == 2
    rank = damaged / checkpoint.rank_dir(1)
    listed = json.loads((rank / checkpoint.COMPLETE_FILE).read_text())["files"]
    shard = next(name for name in listed if name.startswith(checkpoint.DEEPSPEED_DIR) and "optim_states" in name)
    if missing == "zero_shard":
        (damaged / shard).unlink()
        named = [shard]
    elif missing == "every_listed_file":
        for name in listed:
            (damaged / name).unlink()
        named = sorted(listed)
    else:
        (damaged / shard).unlink()
        shutil.rmtree(rank)
        named = [str(rank / checkpoint.COMPLETE_FILE)]
    cfg = make_cfg(work, f"missing-{missing}", f"checkpoint.resume_from={damaged}")
    args = job_args(cfg)
    before = _files_and_times(damaged)
    with caplog.at_level(logging.ERROR):
        assert main(args) == 2
    line = caplog.records[-1].getMessage()
    assert len(line.splitlines()) == 1 and all(name in line for name in named), line
    assert _files_and_times(damaged) == before
    assert not (Path(cfg.storage_path) / cfg.run_name).exists(), "the refused run wrote a run folder"


def _weights(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(directory) / "export" / "unet" / "model.safetensors")


@pytest.mark.slow
def test_a_damaged_vae_checkpoint_is_refused_then_set_aside_on_request(ray_local, tmp_path, caplog):
    """The VAE stage's checkpoints (pipelines/vae/worker.py): sha256 listing, checked by the driver before
    launch; train.checkpoint_fallback=previous continues from the previous checkpoint."""
    from pipelines.core.job import run_stage
    from pipelines.core.storage import read_json
    from pipelines.train.checkpoint import latest_checkpoint
    from pipelines.vae.driver import STAGE
    from pipelines.vae.model import REPORT_FILE
    from pipelines.vae.worker import CHECKPOINT_FILE
    from tests.test_train_vae import make_config, write_synthetic_shards

    write_synthetic_shards(tmp_path / "filtered", 2, 8)
    cfg = make_config(tmp_path / "filtered", tmp_path, {"train": {"steps": 8, "checkpoint_every": 4,
                                                                  "keep_checkpoints": 3, "image_every": 8}})
    assert run_stage(STAGE, cfg) == 0
    run_dir = str(Path(cfg.storage_path) / cfg.run_name)
    latest = Path(latest_checkpoint(run_dir))
    state = latest / CHECKPOINT_FILE
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the checksum sees it
    state.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR):
        assert run_stage(STAGE, cfg) == 2
    line = caplog.records[-1].getMessage()
    assert CHECKPOINT_FILE in line and "sha256" in line and "--set train.checkpoint_fallback=previous" in line
    again = make_config(tmp_path / "filtered", tmp_path, {"train": {"steps": 8, "checkpoint_every": 4,
                                                                    "keep_checkpoints": 3, "image_every": 8,
                                                                    "checkpoint_fallback": "previous"}})
    assert run_stage(STAGE, again) == 0
    report = read_json(Path(cfg.output_dir) / REPORT_FILE)
    assert report["start_step"] == 4 and report["steps"] == 8
    assert (Path(run_dir) / checkpoint.DAMAGED_DIR / latest.name / CHECKPOINT_FILE).is_file()
