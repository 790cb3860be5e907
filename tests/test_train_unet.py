"""jobs/train_unet.py end to end on CPU: real Ray Train, real DeepSpeed on gloo, a real MLflow SQLite store,
real features of the synthetic shapes (tiny VAE + tiny text tower).

The fits are module-scoped fixtures, each run once and shared by the tests that look at it. The exact-resume
runs share EXACT: a cosine schedule whose warm-up (8 steps) outlasts every resume point and an EMA that starts
averaging at step 2, so each resume (from step 4 or 6) must restore the LR's position and the EMA's state:
- ref:     ZeRO-2, 12 steps without interruption (the reference trajectory); also draws sample grids and
           registers the model (the MLflow side of a run)
- from-uri: a new run from ref's step-6 checkpoint given as a file:// URI
- killed:  a Ray Train worker SIGKILLed after the step-4 checkpoint (automatic resume)
- split:   cosine with a 4-step warm-up stopped at max_steps=6, rerun with the same name to 12 (the stretch);
           a U-Net without the padding mask, exported in diffusers' format too
- init-uri: 1 step from ref's export, with MLflow unreachable
- four:    4 workers to a mid-epoch checkpoint, resumed on 2 (the universal checkpoint)
"""

import json
import math
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from pipelines.core.config import ConfigError, apply_override, from_dict
from pipelines.core.local_ray import LocalRayHead
from pipelines.inference.export import INDEX_FILE, load_exported
from pipelines.synthetic.features import write_synthetic_features
from pipelines.train import attempts, checkpoint
from pipelines.train.config import TrainConfig
from pipelines.train.driver import run_training
from tests.exports import compare_with_diffusers
from tests.log_lines import captured_output, library_noise, progress_lines, repeated_lines
from tests.snapshots import mlflow_run_ids, tree_snapshot

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
STEPS = 12
# The exact-resume shape. Checkpoints at steps 4 (killed) and 6 (ref, from-uri) lie inside the warm-up (steps
# 0..7 in the schedule's count) and after the EMA started averaging (decay 0.1 at step 2, 0.18 at 3, ...), so
# a resume that restored the LR schedule's position or the EMA's shadow wrongly could not match ref.
WARMUP, EMA_START, SPLIT_AT, KILL_AFTER = 8, 2, 6, 4
EXACT = ("lr.kind=cosine", f"lr.warmup_steps={WARMUP}", f"ema.start_step={EMA_START}", "objective.prediction_type=eps")
# A U-Net that attends to the padding, as diffusers' pipelines do, and the diffusers pipeline folder beside export/
DIFFUSERS = ("model.overrides.text_mask=false", "export_formats=[latentforge,diffusers]")
MODEL_NAME = "tiny-test"
UNREACHABLE = "http://127.0.0.1:9"
REF_OUTPUT = "ref-output.log"
OTHER_RAY_OBJECT_STORE = 80 * 1024 * 1024  # just above the least Ray accepts (75 MiB)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    # tiny-cpu.yaml trains on 8x8 latents: the tiny VAE (factor 4) at 32 px
    write_synthetic_features(str(root / "features"), rows=32, shards=2, image_size=32)
    return root


def make_cfg(work: Path, name: str, *overrides: str, features: str = "features") -> TrainConfig:
    values = yaml.safe_load(CONFIG.read_text())
    settings = [f"features_dir={work / features}", f"storage_path={work / 'runs'}", f"run_name={name}",
                f"max_steps={STEPS}", "log_every=1", "batch.global_batch=16", "batch.micro_batch=8",
                "lr.kind=constant", "lr.warmup_steps=0", "checkpoint.every_steps=6", "samples.every_steps=0",
                "samples.prompts=[a large red circle in the top left]", "samples.seeds=[0]",
                "samples.sampler.steps=4", f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
                "mlflow.experiment=tests", "mlflow.system_metrics=false", *overrides]
    for assignment in settings:
        apply_override(values, assignment)
    return from_dict(TrainConfig, values)


def mlflow_client(work: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{work / 'mlflow.db'}")


def history(work: Path, run_id: str, key: str = "loss") -> dict[int, float]:
    """Per-step values of an MLflow metric; a step logged twice (re-run after a failure) keeps its last value."""
    logged = mlflow_client(work).get_metric_history(run_id, key)
    return {m.step: m.value for m in sorted(logged, key=lambda m: m.timestamp)}


def losses(work: Path, run_id: str) -> dict[int, float]:
    return history(work, run_id, "loss")


def exported_weights(result) -> dict[str, torch.Tensor]:
    return load_file(Path(result.export_dir) / "unet" / "model.safetensors")


def assert_same_weights(a, b) -> None:
    a, b = exported_weights(a), exported_weights(b)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def expected_lr(done: int, base: float, warmup: int, total: int, min_ratio: float) -> float:
    """The lr logged at step `done` (1-based: the lr of schedule step done - 1), written from the formula in
    LRSchedule's docstring rather than by calling it: linear warm-up base * (s + 1) / warmup, then a cosine
    from base at `warmup` to min_ratio * base at `total`."""
    s = done - 1
    if s < warmup:
        return base * (s + 1) / warmup
    progress = min(1.0, (s - warmup) / (total - warmup))
    return min_ratio * base + (1 - min_ratio) * base * (1 + math.cos(math.pi * progress)) / 2


def assert_lr_follows(logged: dict[int, float], steps, cfg: TrainConfig, total: int) -> None:
    for done in steps:
        want = expected_lr(done, cfg.deepspeed.adamw.lr, cfg.lr.warmup_steps, total, cfg.lr.min_lr_ratio)
        assert logged[done] == pytest.approx(want, rel=1e-12, abs=0), (done, logged[done], want)


@pytest.fixture(scope="module")
def ref(work, ray_local):
    # A second Ray on the machine during the run, as when tests or another cluster run beside a job: Ray Train's
    # helper actors that look their cluster up (its placement group cleaner) must still find this one.
    with LocalRayHead(num_cpus=1, object_store_bytes=OTHER_RAY_OBJECT_STORE), \
            captured_output() as output:  # what the run printed, its workers' lines included (REF_OUTPUT)
        result = run_training(make_cfg(work, "ref", *EXACT, "samples.every_steps=6",
                                       f"mlflow.registered_model={MODEL_NAME}"))
    (work / REF_OUTPUT).write_text(output.getvalue())
    return result


def test_the_training_log_shows_progress_and_no_library_noise(work, ref):
    text = (work / REF_OUTPUT).read_text()
    assert library_noise(text) == {}
    assert repeated_lines(text, most=3) == {}
    progress = progress_lines(text)  # log_every=1: a line a step, "N/12 steps (P%), R steps/s, ETA H:MM:SS"
    assert progress and all(f"/{STEPS} steps (" in line for line in progress), progress


def test_two_zero2_workers_train_checkpoint_export_and_log(work, ref):
    logged = losses(work, ref.mlflow_run_id)
    assert sorted(logged) == list(range(1, STEPS + 1))
    assert all(np.isfinite(list(logged.values())))
    # eps: its loss falls fast enough to see in 12 steps (measured: last 5 / first 5 = 0.62); the preset's v loss
    # (min-SNR weighted) falls slowly at first
    series = [logged[s] for s in sorted(logged)]
    assert np.mean(series[-5:]) < 0.7 * np.mean(series[:5]), series
    assert ref.steps == STEPS
    # the schedule the exact-resume tests compare against is the documented one, at every step
    assert_lr_follows(history(work, ref.mlflow_run_id, "lr"), range(1, STEPS + 1), make_cfg(work, "x", *EXACT), STEPS)
    model = load_exported(ref.export_dir)
    assert model.index["step"] == STEPS and model.index["weights"] == "ema"
    # the previews' sampler is the model's recommended sampling, carried by the export
    assert model.sampler == make_cfg(work, "x", *EXACT).samples.sampler and model.sampler.steps == 4
    assert model.latent_shape == (4, 8, 8)
    # keep=2 of the tiny config: checkpoints of steps 6 and 12 remain, both complete
    kept = sorted(p for p in Path(ref.run_dir).glob("checkpoint_*") if p.is_dir())
    assert [checkpoint.read_meta(str(p))["step"] for p in kept] == [6, 12]


def test_a_run_logs_params_metrics_images_and_registers_the_model(work, ref):
    import mlflow
    import pandas as pd

    client = mlflow_client(work)
    run = client.get_run(ref.mlflow_run_id)
    assert run.data.params["deepspeed.zero_stage"] == "2" and run.data.params["max_steps"] == str(STEPS)
    assert run.data.tags["git_commit"] and run.data.tags["dataset_manifest_sha256"]
    assert run.data.tags["version.deepspeed"] and run.info.status == "FINISHED"
    for metric in ("lr", "grad_norm", "images_per_s", "skipped_steps"):
        assert metric in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(ref.mlflow_run_id)}
    assert {"config.json", "model", "images"} <= artifacts
    assert f"model/{INDEX_FILE}" in {a.path for a in client.list_artifacts(ref.mlflow_run_id, "model")}
    # the experiment opens on the training view; the run names its stage and reads the features as a dataset
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.tags["latentforge.job"] == "train_unet"
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == run.data.tags["dataset_manifest_sha256"][:32]
    assert dataset.dataset.name == "features" and str(work / "features" / "manifest.json") in dataset.dataset.source

    # sample grids at step 0 (the untrained baseline), 6 and 12: 32 px samples as 128 px tiles, captioned below
    grids = {int(m.group(1)): a.path for a in client.list_artifacts(ref.mlflow_run_id, "images")
             if (m := re.match(r"images/samples\+step\+(\d+)\+.*\.png$", a.path))}
    assert sorted(grids) == [0, 6, 12]
    grid = np.asarray(Image.open(client.download_artifacts(ref.mlflow_run_id, grids[0], str(work))))
    assert grid.shape[1] == 128 + 4 and grid.shape[0] > 128 + 4 + 20  # one seed, one prompt; the caption band
    assert grid[2 + 128:-2, 2:-2].min() < 100  # text under the tile

    # the registered version: signature, a description naming the run and the features, tags
    version = client.get_model_version(MODEL_NAME, "1")
    assert version.tags == {"training_run_id": ref.mlflow_run_id,
                            "dataset_manifest_sha256": run.data.tags["dataset_manifest_sha256"]}
    assert ref.mlflow_run_id in version.description and "Not evaluated yet" in version.description
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    assert mlflow.models.get_model_info(f"models:/{MODEL_NAME}/1").signature.params is not None
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/1")
    out = pyfunc.predict(pd.DataFrame({"prompt": ["a large red circle in the top left"], "seed": [3]}),
                         params={"steps": 4, "guidance_scale": 2.0})
    assert len(out) == 1 and out["png"][0][:8] == b"\x89PNG\r\n\x1a\n"


def assert_continues_ref_exactly(work: Path, ref, result, steps) -> None:
    """Losses and logged lr at `steps` equal ref's, and the exported EMA weights equal ref's, bit for bit."""
    for key in ("loss", "lr"):
        ours, theirs = history(work, result.mlflow_run_id, key), history(work, ref.mlflow_run_id, key)
        assert sorted(ours) == list(steps) and {s: ours[s] for s in steps} == {s: theirs[s] for s in steps}, key
    assert_same_weights(ref, result)


def test_resume_from_a_uri_inside_the_warm_up_continues_exactly(work, ref):
    """checkpoint.resume_from as a URI (file:// here; s3:// goes through the same pyarrow filesystem code):
    every worker fetches DeepSpeed's files to a local temporary copy, and the new run continues ref's from
    step 6: mid warm-up, with the EMA averaging."""
    step_6 = Path(ref.run_dir) / checkpoint.checkpoint_dir_name(SPLIT_AT)
    assert checkpoint.read_meta(str(step_6))["step"] == SPLIT_AT < WARMUP and SPLIT_AT > EMA_START
    result = run_training(make_cfg(work, "from-uri", *EXACT, f"checkpoint.resume_from=file://{step_6}"))
    assert result.resumed_from == f"file://{step_6}"
    assert_continues_ref_exactly(work, ref, result, range(SPLIT_AT + 1, STEPS + 1))


def test_init_from_a_uri_starts_from_that_export_and_unreachable_mlflow_only_warns(work, ref, caplog):
    """model.init_from as a URI (phase 2 reading phase 1's <storage_path>/<run>/export/unet on s3://): checked
    on the driver, fetched by every worker. After one AdamW step (|update| <= lr per weight; the EMA only
    copies before ema.start_step) the export is within lr of ref's, far from a fresh initialisation.
    The run logs to a tracking server nobody answers: training goes on, with one warning and no run id."""
    from model.unet import UNet

    result = run_training(make_cfg(work, "init-uri", f"model.init_from=file://{ref.export_dir}/unet", "max_steps=1",
                                   f"mlflow.tracking_uri={UNREACHABLE}"))
    start, after = exported_weights(ref), exported_weights(result)
    lr = make_cfg(work, "x").deepspeed.adamw.lr
    assert after.keys() == start.keys()
    assert max((after[k] - start[k]).abs().max().item() for k in start) <= lr * 1.01
    fresh = UNet(make_cfg(work, "x").model.unet_config()).state_dict()
    assert max((fresh[k] - start[k]).abs().max().item() for k in start) > 3 * lr
    assert result.steps == 1 and result.mlflow_run_id is None
    assert any(f"MLflow at {UNREACHABLE} failed" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def split(work, ray_local):
    """The stretch: a cosine run stopped at its end (max_steps=6) and rerun with max_steps=12 under the same
    name. Its warm-up (4 steps) must fit the first 6. Its U-Net attends to the padding (text_mask=false), so it
    can also write the diffusers pipeline folder (export_formats): at step 6, replaced at step 12."""
    overrides = (*EXACT, "lr.warmup_steps=4", *DIFFUSERS)
    first = run_training(make_cfg(work, "split", *overrides, f"max_steps={SPLIT_AT}"))
    assert first.steps == SPLIT_AT and first.resumed_from is None
    before = {key: history(work, first.mlflow_run_id, key) for key in ("loss", "lr")}
    second = run_training(make_cfg(work, "split", *overrides))
    assert second.resumed_from is not None and second.mlflow_run_id == first.mlflow_run_id
    return second, before, make_cfg(work, "split", *overrides)


def test_a_raised_max_steps_stretches_the_cosine_from_the_resumed_step(work, split):
    result, first, cfg = split
    logged = {key: history(work, result.mlflow_run_id, key) for key in ("loss", "lr")}
    assert result.steps == STEPS and sorted(logged["loss"]) == list(range(1, STEPS + 1))
    for key in ("loss", "lr"):  # steps 1..6 are the 6-step run's, not trained again
        assert {s: logged[key][s] for s in range(1, SPLIT_AT + 1)} == first[key], key
    assert_lr_follows(logged["lr"], range(1, SPLIT_AT + 1), cfg, SPLIT_AT)  # that run's schedule ended at step 6
    assert_lr_follows(logged["lr"], range(SPLIT_AT + 1, STEPS + 1), cfg, STEPS)  # the new one ends at 12
    assert all(np.isfinite(list(logged["loss"].values())))
    params = mlflow_client(work).get_run(result.mlflow_run_id).data.params
    assert params["max_steps"] == str(SPLIT_AT) and params[f"max_steps.at_step_{SPLIT_AT}"] == str(STEPS)


def test_a_run_with_export_formats_diffusers_writes_a_pipeline_that_draws_our_images(work, split):
    """<run>/export-diffusers, written by the training job itself: diffusers' StableDiffusionPipeline loads it
    offline and draws the image our export draws (tests/exports.py), of the step-12 weights."""
    from diffusers import UNet2DConditionModel

    from model.convert import to_diffusers_state
    from pipelines.inference.diffusers_export import DIFFUSERS_EXPORT_DIR

    result, _, cfg = split
    folder = Path(result.run_dir) / DIFFUSERS_EXPORT_DIR
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert load_exported(result.export_dir).index["step"] == STEPS
    ours, theirs = compare_with_diffusers(Path(result.export_dir), folder, cfg.samples.sampler,
                                          [(cfg.samples.prompts[0], cfg.samples.seeds[0])])
    assert ours.shape == theirs.shape == (1, 32, 32, 3) and ours.std() > 0
    # the step-12 weights, not the step-6 ones the first run wrote: the pipeline's U-Net is the export's
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True).state_dict()
    ours_unet = to_diffusers_state(exported_weights(result), cfg.model.unet_config())
    assert unet.keys() == ours_unet.keys() and all(torch.equal(unet[k], ours_unet[k]) for k in unet)


def test_a_four_worker_checkpoint_resumes_on_two_workers(work, ray_local):
    """The spot-instance case through the job: 4 workers checkpoint mid-epoch (step 5 of 2-step epochs), 2
    workers continue from it (DeepSpeed's universal checkpoint, the EMA and the rest of the epoch re-shared).
    With nothing left to train, the 2-worker export is the 4-worker run's EMA, bit for bit."""
    common = ("batch.micro_batch=4", "ema.start_step=2", "checkpoint.every_steps=5")
    four = run_training(make_cfg(work, "four", "scaling.num_workers=4", "scaling.cpus_per_worker=0.5",
                                 "max_steps=5", *common))
    step_5 = checkpoint.latest_checkpoint(four.run_dir)
    assert checkpoint.read_meta(step_5)["world_size"] == 4
    same = run_training(make_cfg(work, "two-at-5", f"checkpoint.resume_from={step_5}", "max_steps=5", *common))
    assert_same_weights(four, same)
    assert (Path(step_5) / checkpoint.DEEPSPEED_DIR / "step_000000005_universal" / checkpoint.COMPLETE_FILE).is_file()
    two = run_training(make_cfg(work, "two", f"checkpoint.resume_from={step_5}", "max_steps=7", *common))
    logged = losses(work, two.mlflow_run_id)
    assert sorted(logged) == [6, 7] and all(np.isfinite(list(logged.values())))
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(two.run_dir))["world_size"] == 2


def _registered(run_dir: Path, step: int) -> bool:
    """Whether Ray Train's record of the run names the checkpoint of `step` (what a restart resumes from: its
    files alone can be there before Ray has registered it)."""
    try:
        snapshot = json.loads((run_dir / checkpoint.RAY_SNAPSHOT_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or caught mid-write
        return False
    return checkpoint.checkpoint_dir_name(step) in {e["checkpoint_dir_name"] for e in snapshot["checkpoint_results"]}


def _kill_a_worker_after_checkpoint(run_dir: Path, step: int, killed: list) -> None:
    import psutil

    deadline = time.time() + 600
    while time.time() < deadline and not killed:
        if _registered(run_dir, step):
            # Only this test session's Ray (started by this process) is searched: never another one's workers.
            for proc in psutil.Process(os.getpid()).children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(proc.cmdline()):
                        os.kill(proc.pid, signal.SIGKILL)
                        killed.append(proc.pid)
                        return
                except psutil.NoSuchProcess:
                    continue
        time.sleep(0.05)


@pytest.fixture(scope="module")
def killed(work, ray_local):
    cfg = make_cfg(work, "killed", *EXACT, "checkpoint.every_steps=2", "max_failures=1")
    pids: list[int] = []
    watcher = threading.Thread(target=_kill_a_worker_after_checkpoint,
                               args=(work / "runs" / "killed", KILL_AFTER, pids))
    watcher.start()
    result = run_training(cfg)
    watcher.join()
    return result, pids


def test_sigkilled_worker_is_replaced_and_the_run_finishes_exactly(work, ref, killed):
    result, pids = killed
    assert pids, "no Ray Train worker was found to kill"
    assert (result.restarts, ref.restarts) == (1, 0)  # in the report ...
    metric = mlflow_client(work).get_metric_history(result.mlflow_run_id, "restarts")
    assert [m.value for m in metric] == [1.0]  # ... and MLflow
    # the restarted group resumed mid warm-up, with the EMA averaging (from step 4, or 6 if the kill was late)
    resumed_at = {r["from_step"] for r in attempts.starts(result.run_dir) if r["rank"] == 0} - {0}
    assert len(resumed_at) == 1 and EMA_START < resumed_at.pop() < WARMUP
    assert_continues_ref_exactly(work, ref, result, range(1, STEPS + 1))


# ------------------------------------------------------------------------------- bad input, before training


def assert_refused_leaving_nothing(work: Path, error, match: str, cfg: TrainConfig, *untouched: Path) -> None:
    """run_training(cfg) raises `error` before training, and leaves nothing behind: no run folder, no MLflow run,
    the folders in `untouched` (the checkpoint it was given) as they were, to the byte and the mtime."""
    uri = f"sqlite:///{work / 'mlflow.db'}"
    runs, trees = mlflow_run_ids(uri), [tree_snapshot(path) for path in untouched]
    with pytest.raises(error, match=match):
        run_training(cfg)
    assert not (work / "runs" / cfg.run_name).exists()
    assert mlflow_run_ids(uri) == runs
    assert [tree_snapshot(path) for path in untouched] == trees


def test_bad_inputs_are_clear_errors_before_training(work):
    assert_refused_leaving_nothing(work, ConfigError, "context_dim",
                                   make_cfg(work, "bad", "model.overrides={context_dim: 32}"))
    assert_refused_leaving_nothing(work, ConfigError, "not divisible", make_cfg(work, "bad", "batch.global_batch=20"))
    assert_refused_leaving_nothing(work, ConfigError, "does not exist",
                                   make_cfg(work, "bad", f"checkpoint.resume_from={work / 'nowhere'}"))
    assert not (work / "nowhere").exists()
    with pytest.raises(ConfigError, match="unknown config key"):
        make_cfg(work, "bad", "deepspeed.zero_stag=2")


def test_unknown_key_exits_2_from_the_job(work, capsys):
    from jobs.train_unet import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(CONFIG), "--set", "optimizer.lr=1"])
    assert exit_info.value.code == 2
    assert "optimizer" in capsys.readouterr().err


def test_truncated_or_foreign_checkpoint_is_refused_and_left_as_it_was(work, ref, tmp_path):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint.latest_checkpoint(ref.run_dir), copy)

    def refused(match: str, name: str, *overrides: str) -> None:
        cfg = make_cfg(work, name, *EXACT, f"checkpoint.resume_from={copy}", *overrides)
        assert_refused_leaving_nothing(work, checkpoint.CheckpointError, match, cfg, copy)

    refused("another config", "foreign", "objective.min_snr_gamma=1.0")
    shard = next(copy.rglob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    refused("damaged", "truncated")
    (copy / checkpoint.META_FILE).unlink()
    refused("incomplete", "truncated")
