"""VAE training job on a real local Ray (Ray Train, 2 gloo workers), a real MLflow SQLite store and
the tiny AutoencoderKL: training lowers the loss, the export loads through model/encoders with the
scaling factor recomputed here from its definition, MLflow holds the run, a run interrupted at a checkpoint
resumes bit-exactly, and a refused run changes nothing.

Two Ray Train launches, both module fixtures, so every test that uses them is marked slow (each launch is
~40 s of worker start-up and steps on 2 idle cores): `trained`, the uninterrupted reference, and `resumed`, a
copy of it rolled back to its step-12 checkpoint and resumed by run_name. `-m "not slow"` (make test-fast)
keeps only the tests that start no training.

Input: 3 WebDataset shards of synthetic shapes (pipelines/synthetic/shapes.py), written as the filter stage
writes them (NNNNN.tar with .jpg/.txt/.json), at 32 px to keep the CPU steps short.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.core.config import from_dict
from pipelines.core.job import run_stage
from pipelines.core.storage import read_json
from pipelines.core.tracking import RUN_NAME_TAG, Tracker
from pipelines.data.precompute.rows import vae_input
from pipelines.synthetic.shapes import caption_for, encode_image, render, training_attributes
from pipelines.vae.config import TrainVAEConfig
from pipelines.vae.data import ImageStream
from pipelines.vae.driver import STAGE
from pipelines.vae.model import REPORT_FILE
from pipelines.vae.worker import CHECKPOINT_FILE, VAE_METRICS

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "train_vae.py"
SHARDS, PER_SHARD, SIZE = 3, 8, 32
STEPS, BATCH, WORKERS = 24, 4, 2
EXPERIMENT = "train-vae-test"
SPLIT = 12  # train.checkpoint_every: the reference's first checkpoint, where the `resumed` copy was interrupted
# The reference runs (trained, resumed): a constant LR after a warm-up longer than SPLIT, so the resume lands
# inside the warm-up (an LR restarted or shifted on resume changes the steps after it) and its LR does not
# depend on train.steps (which `resumed` raises, as a user extending a finished run does). Every step logged.
REFERENCE_TRAIN = {"lr_schedule": "constant", "warmup_steps": 16, "log_every": 1}


def write_synthetic_shards(root: Path, shards: int, per_shard: int) -> None:
    """Filtered-stage-like shards of distinct synthetic shapes (same writer as tests/test_precompute.py)."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    attributes = training_attributes()
    for s in range(shards):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as sink:
            for i in range(per_shard):
                attrs = attributes[(s * per_shard + i) * 7 % len(attributes)]  # spread over shapes and colours
                sink.write({"__key__": f"{s:04d}{i:04d}", "jpg": encode_image(render(attrs, SIZE), "jpeg"),
                            "txt": caption_for(attrs), "json": {"attributes": attrs.as_dict()}})


def make_config(input_dir: Path, tmp: Path, overrides: dict | None = None) -> TrainVAEConfig:
    values = {
        "input_dir": str(input_dir), "output_dir": str(tmp / "vae"), "run_name": "vae-test",
        "storage_path": str(tmp / "ray_results"), "image_size": SIZE, "scaling_factor_images": 12,
        "train": {"steps": STEPS, "batch_size": BATCH, "lr": 2e-3, "warmup_steps": 0, "log_every": 4,
                  "image_every": 12, "checkpoint_every": 12, "grid_images": 4, "shuffle_buffer": 16,
                  "color_anchor_weight": 1.0},  # as configs/tiny/train_vae.yaml
        "scaling": {"num_workers": WORKERS},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": EXPERIMENT,
                   "system_metrics": False},
    }
    for key, value in (overrides or {}).items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(TrainVAEConfig, values)


def decoded_in_sorted_order(input_dir: Path, count: int) -> torch.Tensor:
    """The first `count` images of the sorted shards, read with tarfile: (N, 3, S, S)."""
    images = []
    for path in sorted(input_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg") and len(images) < count:
                    images.append(vae_input(tar.extractfile(member).read(), SIZE))
    return torch.from_numpy(np.stack(images))


def files_and_times(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of everything under root, folders included (a file added or removed
    changes its folder's mtime): a run that was refused must leave this exactly as it was."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def error_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    """The reference: STEPS steps without interruption, checkpoints at SPLIT and STEPS."""
    tmp = tmp_path_factory.mktemp("train_vae")
    write_synthetic_shards(tmp / "filtered", SHARDS, PER_SHARD)
    cfg = make_config(tmp / "filtered", tmp, {"train": REFERENCE_TRAIN})
    assert run_stage(STAGE, cfg) == 0
    return cfg, tmp


def _mlflow_run(cfg: TrainVAEConfig):
    from mlflow import MlflowClient

    client = MlflowClient(cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "one MLflow run per run_name, resumes included"
    return client, runs[0]


def metric_history(cfg: TrainVAEConfig, key: str) -> dict[int, float]:
    """{step: value} of one metric of the run's MLflow run (exactly one value per step)."""
    client, run = _mlflow_run(cfg)
    history = client.get_metric_history(run.info.run_id, key)
    assert len({m.step for m in history}) == len(history), f"{key} logged twice at a step"
    return {m.step: m.value for m in history}


def _checkpoints(cfg: TrainVAEConfig) -> dict[int, Path]:
    """The run's checkpoint folders by step (from each one's complete.json)."""
    from pipelines.train.checkpoint import COMPLETE_FILE

    return {read_json(listing)["step"]: listing.parent
            for listing in (Path(cfg.storage_path) / cfg.run_name).glob(f"checkpoint_*/{COMPLETE_FILE}")}


def roll_back_as_if_interrupted(reference: TrainVAEConfig, copy: TrainVAEConfig, step: int) -> None:
    """What a run interrupted right after its `step` checkpoint leaves, rebuilt under `copy`'s paths from the
    finished reference: its Ray Train run folder with every later checkpoint gone from Ray's record (the stage's
    own fall-back code, which rewrites that record), and its MLflow run (same run_name, the reference's params,
    its metrics up to `step`, FAILED) in a store of its own (the copy must not write into the reference's)."""
    from pipelines.train.checkpoint import CheckpointDamaged, fall_back_to_intact

    run_dir = Path(copy.storage_path) / copy.run_name
    shutil.copytree(Path(reference.storage_path) / reference.run_name, run_dir)
    later = {path.name for s, path in _checkpoints(copy).items() if s > step}

    def keep_up_to_step(checkpoint: str) -> None:
        if Path(checkpoint).name in later:
            raise CheckpointDamaged(f"written after step {step}")

    assert later and fall_back_to_intact(str(run_dir), keep_up_to_step).endswith(_checkpoints(copy)[step].name)
    client, run = _mlflow_run(reference)
    tracker = Tracker.open(copy.mlflow, copy.run_name, tags={"latentforge.job": "train_vae"})
    tracker.log_params(run.data.params)
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            if m.step <= step:
                tracker.log_metrics({key: m.value}, m.step)
    tracker.finish("FAILED")


@pytest.fixture(scope="module")
def resumed(trained, tmp_path_factory):
    """The reference interrupted after its SPLIT checkpoint, rerun with its run_name and train.steps raised to
    STEPS + 4 (a finished run extended; the constant schedule makes the first STEPS steps the reference's)."""
    reference, _ = trained
    copy = tmp_path_factory.mktemp("resumed")
    cfg = make_config(Path(reference.input_dir), copy, {"train": {**REFERENCE_TRAIN, "steps": STEPS + 4}})
    roll_back_as_if_interrupted(reference, cfg, SPLIT)
    assert run_stage(STAGE, cfg) == 0
    return cfg, copy


@pytest.mark.slow
def test_training_lowers_the_loss_and_mlflow_holds_the_run(trained):
    cfg, _ = trained
    client, mlflow_run = _mlflow_run(cfg)
    assert mlflow_run.info.status == "FINISHED"
    params = mlflow_run.data.params
    assert params["train.steps"] == str(STEPS) and params["scaling.num_workers"] == str(WORKERS)
    losses = [m.value for m in sorted(client.get_metric_history(mlflow_run.info.run_id, "loss"),
                                      key=lambda m: m.step)]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert losses[-1] < 0.6 * losses[0], losses  # from a grey output towards the white canvas and shapes
    for key in ("recon", "kl", "color_anchor", "lr", "images_per_s", "scaling_factor"):
        assert key in mlflow_run.data.metrics
    top = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert {"images", "vae", "train_vae_config.json"} <= top
    images = client.list_artifacts(mlflow_run.info.run_id, "images")
    assert any("reconstructions" in a.path and a.path.endswith(".png") for a in images)
    exported = {Path(a.path).name for a in client.list_artifacts(mlflow_run.info.run_id, "vae")}
    assert {"config.json", "diffusion_pytorch_model.safetensors", REPORT_FILE} <= exported


@pytest.mark.slow
def test_export_loads_with_the_measured_scaling_factor(trained):
    """build_vae(output_dir) -> the factor in config.json is 1 / std of posterior samples of the first
    12 images, recomputed here with diffusers directly (same seed, same batches)."""
    from diffusers import AutoencoderKL

    from model.encoders import build_vae

    cfg, _ = trained
    report = read_json(Path(cfg.output_dir) / REPORT_FILE)
    assert report["steps"] == STEPS and report["images_seen"] == STEPS * BATCH * WORKERS
    assert report["start_step"] == 0 and report["scaling_images"] == 12 and report["images_per_second"] > 0

    vae = build_vae(cfg.output_dir)
    assert vae.id.startswith("diffusers:") and vae.shift_factor == 0.0
    assert vae.latent_shape(SIZE, SIZE) == (4, SIZE // 4, SIZE // 4)
    assert vae.scaling_factor == pytest.approx(report["scaling_factor"], rel=1e-6)

    raw = AutoencoderKL.from_pretrained(cfg.output_dir).eval()
    images, generator = decoded_in_sorted_order(Path(cfg.input_dir), 12), torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = torch.cat([raw.encode(images[i:i + BATCH]).latent_dist.sample(generator=generator)
                             for i in range(0, len(images), BATCH)])
    assert vae.scaling_factor == pytest.approx(1.0 / latents.double().std().item(), rel=1e-4)
    assert not [p for p in Path(cfg.output_dir).parent.iterdir() if p.name.startswith(".")]  # no temporaries


def _patch_rgb_error(vae, images: torch.Tensor) -> float:
    """MSE between the posterior mean's channels 0-2 and each latent pixel's mean RGB (the colour anchor)."""
    import torch.nn.functional as F

    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean  # (N, 4, S/4, S/4)
    return F.mse_loss(mean[:, :3], F.avg_pool2d(images, SIZE // mean.shape[-1])).item()


@pytest.mark.slow
def test_color_anchor_ties_the_first_latent_channels_to_patch_rgb(trained):
    """The exported VAE's channels 0-2 follow the patch colour far closer than the seeded init does
    (in-process, 24 steps of 8: 0.08 anchored vs 0.67 unanchored, from 0.56 at init)."""
    from diffusers import AutoencoderKL

    from model.encoders import build_vae

    cfg, _ = trained
    images = decoded_in_sorted_order(Path(cfg.input_dir), 12)
    exported = AutoencoderKL.from_pretrained(cfg.output_dir).eval()
    initial = build_vae("tiny", seed=cfg.vae.seed).module.eval()
    assert _patch_rgb_error(exported, images) < 0.3 * _patch_rgb_error(initial, images)


@pytest.mark.slow
def test_rerun_of_a_finished_run_is_a_no_op(trained, caplog):
    """Same config again: nothing trained, no file of the run folder or the export touched, the MLflow run not
    reopened."""
    cfg, tmp = trained
    before = files_and_times(tmp)
    _, run = _mlflow_run(cfg)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="latentforge.train_vae"):
        assert run_stage(STAGE, cfg) == 0
    assert f"already finished at step {STEPS}" in caplog.text
    report, after = read_json(Path(cfg.output_dir) / REPORT_FILE), files_and_times(tmp)
    changed = {path for path in after.keys() | before.keys() if after.get(path) != before.get(path)}
    assert changed == {"vae", f"vae/{REPORT_FILE}"}  # only the stage report, written over the export's own
    assert report["outcome"] == "already finished" and report["steps"] == STEPS
    _, again = _mlflow_run(cfg)
    assert again.info.run_id == run.info.run_id and again.info.end_time == run.info.end_time


@pytest.mark.slow
def test_precompute_with_this_vae_links_its_mlflow_run_to_the_vae_run(trained, tmp_path):
    """Precompute given the exported folder as vae.source: its run (in this session's store,
    MLFLOW_TRACKING_URI, set by tests/conftest.py) carries the VAE training run's id, read from the report the
    export carries inside."""
    import os

    from mlflow import MlflowClient

    from pipelines.core.tracking import JOB_TAG, REPORT_RUN_KEY, UPSTREAM_TAG_PREFIX
    from pipelines.data.precompute.config import report_path
    from pipelines.data.precompute.driver import STAGE as PRECOMPUTE
    from tests.test_precompute import make_config as precompute_config
    from tests.test_precompute import write_filter_report

    cfg, _ = trained
    filtered = Path(shutil.copytree(cfg.input_dir, tmp_path / "filtered"))  # trained's own folder stays as it was
    write_filter_report(filtered)
    features = precompute_config(filtered, tmp_path / "features", image_size=SIZE, vae={"source": cfg.output_dir},
                                 buckets={"multiple": 16, "max_ratio": 1.0}, mlflow={"experiment": "vae-precompute"})
    assert run_stage(PRECOMPUTE, features) == 0
    _, vae_run = _mlflow_run(cfg)
    run = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(read_json(report_path(features))[REPORT_RUN_KEY])
    assert run.data.tags[JOB_TAG] == "precompute"
    assert run.data.tags[UPSTREAM_TAG_PREFIX + "train_vae"] == vae_run.info.run_id
    assert UPSTREAM_TAG_PREFIX + "filter" not in run.data.tags  # a report written by hand: no run to link


def _checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Weights and Adam state (moments, step counts) of a VAE checkpoint, flat."""
    saved = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    flat = {f"model.{k}": v for k, v in saved["model"].items()}
    for index, state in saved["optimizer"]["state"].items():
        flat.update({f"optimizer.{index}.{k}": torch.as_tensor(v) for k, v in state.items()})
    return flat


@pytest.mark.slow
def test_a_run_interrupted_at_a_checkpoint_resumes_bit_exactly(trained, resumed):
    """Resumed at step 12 (inside the warm-up, Adam's moments built up): every step after it logs the
    reference's losses and LR bit for bit, and step 24's checkpoint holds the reference's weights and optimizer
    state exactly. Needs the weights, the optimizer state, the data position (each rank's stream and shuffle
    buffer), the posterior noise and the LR all taken up where the interrupted run left them."""
    reference, _ = trained
    cfg, _ = resumed
    for key in (*VAE_METRICS, "lr"):
        expected = metric_history(reference, key)
        got = metric_history(cfg, key)
        assert set(got) == set(range(1, STEPS + 5)), key  # the copied first half, then this run's steps
        assert {s: got[s] for s in expected} == expected, key
    ours, theirs = _checkpoint_tensors(_checkpoints(cfg)[STEPS]), _checkpoint_tensors(_checkpoints(reference)[STEPS])
    assert ours.keys() == theirs.keys() and len(ours) > 100
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


@pytest.mark.slow
def test_rerun_with_the_same_name_resumes_in_the_same_mlflow_run_and_records_the_raised_steps(resumed):
    """A rerun under the same run_name continues from the last checkpoint (step 12), in the same MLflow run,
    and the export is replaced; train.steps raised on the way is recorded from the step it changed at."""
    cfg, _ = resumed
    report = read_json(Path(cfg.output_dir) / REPORT_FILE)
    assert report["start_step"] == SPLIT and report["steps"] == STEPS + 4
    assert report["images_seen"] == (STEPS + 4) * BATCH * WORKERS
    _, mlflow_run = _mlflow_run(cfg)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags[RUN_NAME_TAG] == cfg.run_name
    assert mlflow_run.data.params["train.steps"] == str(STEPS)  # params are the first run's; MLflow keeps them
    assert mlflow_run.data.params[f"train.steps.at_step_{SPLIT}"] == str(STEPS + 4)  # and what it became
    assert mlflow_run.data.tags["latentforge.changed.train.steps"] == f"{STEPS} -> {STEPS + 4} at step {SPLIT}"


@pytest.mark.slow
def test_rerun_with_another_vae_under_the_same_name_is_refused_and_changes_nothing(trained, caplog):
    """Checked in the driver from the checkpoint's config.json, before Ray Train starts and before MLflow is
    opened: no file of the run folder, the export or the MLflow store changes, and no MLflow run is added."""
    cfg, tmp = trained
    other = make_config(Path(cfg.input_dir), tmp, {"vae": {"seed": 1}})
    before, (_, run) = files_and_times(tmp), _mlflow_run(cfg)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="latentforge.train_vae"):
        assert run_stage(STAGE, other) == 2
    assert files_and_times(tmp) == before
    [message] = error_messages(caplog)
    assert "already has checkpoints" in message and "vae.seed" in message and "another run_name" in message
    _, again = _mlflow_run(cfg)  # still one run, not reopened
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.info.end_time == run.info.end_time


def refused_and_nothing_written(tmp: Path, cfg: TrainVAEConfig, caplog) -> str:
    """Run the stage on a fresh run_name that must be refused (exit 2) without writing anything: no run folder,
    no export, no MLflow store, no file anywhere under tmp. Returns its one error message."""
    before = files_and_times(tmp)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="latentforge.train_vae"):
        assert run_stage(STAGE, cfg) == 2
    assert files_and_times(tmp) == before
    assert not Path(cfg.storage_path).exists() and not Path(cfg.output_dir).exists()
    assert not (tmp / "mlflow.db").exists()
    [message] = error_messages(caplog)
    return message


@pytest.mark.parametrize("change, message", [
    ({"input_dir": "/nonexistent/filtered"}, "input_dir"),
    ({"image_size": 30}, "downsample factor 4"),
    ({"train": {"loss": "l3"}}, "train.loss"),
    ({"train": {"color_anchor_weight": -1.0}}, "train.color_anchor_weight"),
])
def test_bad_input_is_a_clear_config_error_and_writes_nothing(tmp_path, caplog, change, message):
    write_synthetic_shards(tmp_path / "filtered", 1, 1)
    cfg = make_config(tmp_path / "filtered", tmp_path, change)
    assert message in refused_and_nothing_written(tmp_path, cfg, caplog)


def test_color_anchor_on_a_vae_with_fewer_than_three_latent_channels_is_a_config_error(tmp_path, caplog):
    from diffusers import AutoencoderKL

    from model.encoders import tiny_vae_config

    AutoencoderKL.from_config({**tiny_vae_config(), "latent_channels": 2}).save_pretrained(tmp_path / "vae2")
    write_synthetic_shards(tmp_path / "filtered", 1, 1)
    cfg = make_config(tmp_path / "filtered", tmp_path, {"vae": {"source": str(tmp_path / "vae2")}})
    assert "train.color_anchor_weight needs a VAE with >= 3 latent channels" in refused_and_nothing_written(
        tmp_path, cfg, caplog)


@pytest.mark.parametrize("shards, world_size", [(3, 2), (1, 2)])
def test_ranks_read_disjoint_parts_that_cover_the_data(tmp_path, shards, world_size):
    """Shards per rank when there are enough shards, rows of every shard otherwise; the parts rotate."""
    write_synthetic_shards(tmp_path, shards, 5)
    names = [p.name for p in tmp_path.glob("*.tar")]
    everything = sorted(image.tobytes() for image in decoded_in_sorted_order(tmp_path, shards * 5).numpy())
    for epoch in (0, 1):
        parts = [[image.tobytes() for image in ImageStream(str(tmp_path), names, SIZE, rank, world_size,
                                                            seed=3, shuffle_buffer=4).epoch(epoch)]
                 for rank in range(world_size)]
        assert all(parts) and sorted(sum(parts, [])) == everything
        if epoch == 0:
            first = parts
    assert first != parts


def test_a_rank_given_an_empty_shard_still_trains_and_no_images_at_all_is_an_error(tmp_path):
    write_synthetic_shards(tmp_path / "half", 1, 3)
    with tarfile.open(tmp_path / "half" / "00001.tar", "w"):
        pass  # an empty shard, as a filter that dropped every sample writes it
    for rank in (0, 1):
        stream = ImageStream(str(tmp_path / "half"), ["00000.tar", "00001.tar"], SIZE, rank, 2, seed=0,
                             shuffle_buffer=2)
        assert next(stream.batches(4)).shape == (4, 3, SIZE, SIZE)
    (tmp_path / "none").mkdir()
    with tarfile.open(tmp_path / "none" / "00000.tar", "w"):
        pass
    stream = ImageStream(str(tmp_path / "none"), ["00000.tar"], SIZE, 0, 2, seed=0, shuffle_buffer=2)
    with pytest.raises(RuntimeError, match="no decodable image in any of the 1 shards"):
        next(stream.batches(1))


def test_job_help_and_config_errors_write_nothing(tmp_path):
    """Run in an empty folder, where the tiny preset's relative paths (data/vae, ray_results, mlflow.db) land:
    neither --help nor a bad --set may create any of them."""
    result = subprocess.run([sys.executable, str(JOB), "--help"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "scaling factor" in result.stdout
    bad = subprocess.run([sys.executable, str(JOB), "--config", str(REPO / "configs/tiny/train_vae.yaml"),
                          "--set", "train.lr=fast"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "train.lr" in bad.stderr
    assert list(tmp_path.iterdir()) == []
