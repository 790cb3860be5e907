"""jobs/train_unet.py end to end on CPU: real Ray Train, real DeepSpeed on gloo, a real MLflow SQLite store,
real features of the synthetic shapes (tiny VAE + tiny text tower).

The fits are module-scoped fixtures, each run once and shared by the tests that look at it:
- ref:     ZeRO-2, 12 steps without interruption (the reference trajectory)
- split:   the same config stopped at step 6, then rerun with the same name up to 12 (resume by name)
- killed:  the same config, a Ray Train worker SIGKILLed after the first checkpoint (automatic resume)
- zero1 / zero3: the same config under ZeRO-1 (with MLflow unreachable) and ZeRO-3
- overfit: a 16-image set, 30 steps, sample grids and a registered model
- four:    4 workers to a mid-epoch checkpoint, resumed on 2 (the universal checkpoint)
"""

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipelines.core.config import ConfigError, apply_override, from_dict
from pipelines.inference.export import load_exported
from pipelines.synthetic.features import write_synthetic_features
from pipelines.train import checkpoint
from pipelines.train.config import TrainConfig
from pipelines.train.driver import run_training

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
STEPS = 12


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    # tiny-cpu.yaml trains on 8x8 latents: the tiny VAE (factor 4) at 32 px
    write_synthetic_features(str(root / "features"), rows=32, shards=2, image_size=32)
    write_synthetic_features(str(root / "small"), rows=16, shards=1, seed=1, image_size=32)
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


def losses(work: Path, run_id: str) -> dict[int, float]:
    """Per-step loss of an MLflow run; a step logged twice (re-run after a failure) keeps its last value."""
    from mlflow import MlflowClient

    history = MlflowClient(f"sqlite:///{work / 'mlflow.db'}").get_metric_history(run_id, "loss")
    return {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}


def exported_weights(result) -> dict[str, torch.Tensor]:
    return load_file(Path(result.export_dir) / "unet" / "model.safetensors")


@pytest.fixture(scope="module")
def ref(work, ray_local):
    return run_training(make_cfg(work, "ref"))


def test_two_zero2_workers_train_checkpoint_export_and_log(work, ref):
    history = losses(work, ref.mlflow_run_id)
    assert sorted(history) == list(range(1, STEPS + 1))
    assert all(np.isfinite(list(history.values())))
    assert ref.steps == STEPS
    model = load_exported(ref.export_dir)
    assert model.index["step"] == STEPS and model.index["weights"] == "ema"
    assert model.latent_shape == (4, 8, 8)
    # keep=2 of the tiny config: checkpoints of steps 6 and 12 remain, both complete
    kept = sorted(p for p in Path(ref.run_dir).glob("checkpoint_*") if p.is_dir())
    assert [checkpoint.read_meta(str(p))["step"] for p in kept] == [6, 12]


@pytest.fixture(scope="module")
def split(work, ray_local):
    first = run_training(make_cfg(work, "split", "max_steps=6"))
    assert first.steps == 6 and first.resumed_from is None
    second = run_training(make_cfg(work, "split"))
    assert second.resumed_from is not None and second.mlflow_run_id == first.mlflow_run_id
    return second


def test_resume_by_run_name_gives_bit_identical_losses_and_weights(work, ref, split):
    assert losses(work, split.mlflow_run_id) == losses(work, ref.mlflow_run_id)
    a, b = exported_weights(ref), exported_weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_a_uri_continues_exactly(work, ref):
    """checkpoint.resume_from as a URI (file:// here; s3:// goes through the same pyarrow filesystem code):
    every worker fetches DeepSpeed's files to a local temporary copy, and the new run continues ref's."""
    step_6 = Path(ref.run_dir) / checkpoint.checkpoint_dir_name(6)
    assert checkpoint.read_meta(str(step_6))["step"] == 6
    result = run_training(make_cfg(work, "from-uri", f"checkpoint.resume_from=file://{step_6}"))
    assert result.resumed_from == f"file://{step_6}"
    ours, theirs = losses(work, result.mlflow_run_id), losses(work, ref.mlflow_run_id)
    assert sorted(ours) == list(range(7, STEPS + 1)) and all(ours[s] == theirs[s] for s in ours)
    a, b = exported_weights(ref), exported_weights(result)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_a_uri_starts_from_that_export(work, ref):
    """model.init_from as a URI (phase 2 reading phase 1's <storage_path>/<run>/export/unet on s3://): checked
    on the driver, fetched by every worker. After one AdamW step (|update| <= lr per weight; the EMA only
    copies before ema.start_step) the export is within lr of ref's, far from a fresh initialisation."""
    from model.unet import UNet

    result = run_training(make_cfg(work, "init-uri", f"model.init_from=file://{ref.export_dir}/unet", "max_steps=1"))
    start, after = exported_weights(ref), exported_weights(result)
    lr = make_cfg(work, "x").deepspeed.adamw.lr
    assert after.keys() == start.keys()
    assert max((after[k] - start[k]).abs().max().item() for k in start) <= lr * 1.01
    fresh = UNet(make_cfg(work, "x").model.unet_config()).state_dict()
    assert max((fresh[k] - start[k]).abs().max().item() for k in start) > 10 * lr


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
    a, b = exported_weights(four), exported_weights(same)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (Path(step_5) / checkpoint.DEEPSPEED_DIR / "step_000000005_universal" / checkpoint.COMPLETE_FILE).is_file()
    two = run_training(make_cfg(work, "two", f"checkpoint.resume_from={step_5}", "max_steps=7", *common))
    history = losses(work, two.mlflow_run_id)
    assert sorted(history) == [6, 7] and all(np.isfinite(list(history.values())))
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(two.run_dir))["world_size"] == 2


def _kill_a_worker_after_first_checkpoint(run_dir: Path, killed: list) -> None:
    import psutil

    deadline = time.time() + 600
    while time.time() < deadline and not killed:
        if any((p / checkpoint.META_FILE).is_file() for p in run_dir.glob("checkpoint_*")):
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
    cfg = make_cfg(work, "killed", "checkpoint.every_steps=2", "max_failures=1")
    pids: list[int] = []
    watcher = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(work / "runs" / "killed", pids))
    watcher.start()
    result = run_training(cfg)
    watcher.join()
    return result, pids


def test_sigkilled_worker_is_replaced_and_the_run_finishes_exactly(work, ref, killed):
    from mlflow import MlflowClient

    result, pids = killed
    assert pids, "no Ray Train worker was found to kill"
    assert (result.restarts, ref.restarts) == (1, 0)  # in the report ...
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    assert [m.value for m in client.get_metric_history(result.mlflow_run_id, "restarts")] == [1.0]  # ... and MLflow
    assert losses(work, result.mlflow_run_id) == losses(work, ref.mlflow_run_id)
    a, b = exported_weights(ref), exported_weights(result)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage", [1, 3])
def test_zero1_and_zero3_train_to_the_same_weights(work, ray_local, ref, stage, caplog):
    overrides = [f"deepspeed.zero_stage={stage}"]
    if stage == 1:  # also: an unreachable tracking server only warns
        overrides.append("mlflow.tracking_uri=http://127.0.0.1:9")
    cfg = make_cfg(work, f"zero{stage}", *overrides)
    result = run_training(cfg)
    assert result.steps == STEPS
    a, b = exported_weights(ref), exported_weights(result)
    # Same data, same draws, same math: only the order of the gradient reductions differs. Adam turns a
    # last-bit difference in a near-zero gradient into a step of up to ~lr, so a handful of elements may
    # differ by a few lr (3e-4 measured at lr 1e-3); everything else must agree to float32 noise. Counted
    # over the whole model: one such element is already 1.6% of a 64-wide bias.
    lr = cfg.deepspeed.adamw.lr
    diffs = {key: (b[key] - a[key]).abs() for key in a}
    assert max(d.max().item() for d in diffs.values()) < 5 * lr
    differing = sum(int((d > 1e-5).sum()) for d in diffs.values())
    assert differing < 2e-3 * sum(d.numel() for d in diffs.values()), differing
    if stage == 1:
        assert result.mlflow_run_id is None
        assert any("MLflow at http://127.0.0.1:9 failed" in r.getMessage() for r in caplog.records)


def test_overfit_run_logs_params_metrics_images_and_registers_the_model(work, ray_local):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    # eps: its loss falls fast enough to see in 30 steps. The preset's v loss (min-SNR weighted) starts lower and
    # falls slowly at first (measured: first 5 steps 0.35, last 5 0.34); the other tests here train with v.
    cfg = make_cfg(work, "overfit", "max_steps=30", "samples.every_steps=15", "mlflow.registered_model=tiny-test",
                   "lr.warmup_steps=5", "objective.prediction_type=eps", features="small")
    result = run_training(cfg)
    history = [v for _, v in sorted(losses(work, result.mlflow_run_id).items())]
    assert len(history) == 30 and np.isfinite(history).all()
    assert np.mean(history[-5:]) < 0.7 * np.mean(history[:5]), history

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["deepspeed.zero_stage"] == "2" and run.data.params["max_steps"] == "30"
    assert run.data.tags["git_commit"] and run.data.tags["dataset_manifest_sha256"]
    assert run.data.tags["version.deepspeed"] and run.info.status == "FINISHED"
    for metric in ("lr", "grad_norm", "images_per_s", "skipped_steps"):
        assert metric in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"config.json", "model", "images"} <= artifacts
    assert len(client.list_artifacts(result.mlflow_run_id, "images")) >= 2  # grids at steps 15 and 30
    assert "model/model_index.json" in {a.path for a in client.list_artifacts(result.mlflow_run_id, "model")}

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-test/1")
    out = pyfunc.predict(pd.DataFrame({"prompt": ["a large red circle in the top left"], "seed": [3]}),
                         params={"steps": 4, "guidance_scale": 2.0})
    assert len(out) == 1 and out["png"][0][:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------- bad input, before training


def test_bad_inputs_are_clear_errors_before_training(work):
    with pytest.raises(ConfigError, match="context_dim"):
        run_training(make_cfg(work, "bad", "model.overrides={context_dim: 32}"))
    with pytest.raises(ConfigError, match="not divisible"):
        run_training(make_cfg(work, "bad", "batch.global_batch=20"))
    with pytest.raises(ConfigError, match="does not exist"):
        run_training(make_cfg(work, "bad", f"checkpoint.resume_from={work / 'nowhere'}"))
    with pytest.raises(ConfigError, match="unknown config key"):
        make_cfg(work, "bad", "deepspeed.zero_stag=2")


def test_unknown_key_exits_2_from_the_job(work, capsys):
    from jobs.train_unet import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(CONFIG), "--set", "optimizer.lr=1"])
    assert exit_info.value.code == 2
    assert "optimizer" in capsys.readouterr().err


def test_truncated_or_foreign_checkpoint_is_refused(work, ref, tmp_path):
    import shutil

    latest = checkpoint.latest_checkpoint(ref.run_dir)
    copy = tmp_path / "ckpt"
    shutil.copytree(latest, copy)
    with pytest.raises(checkpoint.CheckpointError, match="another config"):
        run_training(make_cfg(work, "foreign", f"checkpoint.resume_from={copy}", "objective.min_snr_gamma=1.0"))
    shard = next(copy.rglob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        run_training(make_cfg(work, "truncated", f"checkpoint.resume_from={copy}"))
    (copy / checkpoint.META_FILE).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="incomplete"):
        run_training(make_cfg(work, "truncated", f"checkpoint.resume_from={copy}"))
