"""Faults on one machine, through the real jobs: a diverged training run, a training worker killed under
max_failures 0 (real Ray Train, real DeepSpeed on gloo, real MLflow SQLite store; the tiny configs of
tests/test_train_unet.py); an encoder that cannot be loaded in precompute (real Ray Data actors); precompute on
a Ray whose object store is smaller than the data it moves.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.core.job import run_stage
from pipelines.core.local_ray import LocalRayHead
from pipelines.data import schema
from pipelines.data.precompute.config import report_path as precompute_report_path
from pipelines.data.precompute.driver import STAGE as PRECOMPUTE_STAGE
from pipelines.synthetic.features import write_synthetic_features
from pipelines.train import attempts
from pipelines.train.driver import STAGE as TRAIN_STAGE
from pipelines.train.driver import report_path
from tests.test_precompute import JOB, REPO, make_config, read_rows, write_shards
from tests.test_train_unet import make_cfg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    write_synthetic_features(str(root / "features"), rows=32, shards=2, image_size=32)
    return root


def _mlflow_restarts(work: Path, run_id: str) -> list[float]:
    from mlflow import MlflowClient

    return [m.value for m in MlflowClient(f"sqlite:///{work / 'mlflow.db'}").get_metric_history(run_id, "restarts")]


def _mlflow_run_id(work: Path, name: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                filter_string=f"tags.mlflow.runName = '{name}'")
    return run.info.run_id


def _rank0_starts(run_dir: Path) -> int:
    return sum(1 for record in attempts.starts(str(run_dir)) if record["rank"] == 0)


# ------------------------------------------------------------------------------- a diverged run


def _poison(directory: Path) -> None:
    """Every stored latent mean NaN: each micro batch of every step is bad (what NaN latents from a broken
    encoder would do)."""
    for shard in sorted(directory.glob("*.parquet")):
        table = pq.read_table(shard)
        column = table.column(schema.LATENT_MEAN).combine_chunks()
        values = np.full(len(column.flatten()), np.nan, dtype=schema.FEATURE_DTYPE)
        poisoned = pa.ListArray.from_arrays(column.offsets, pa.array(values))  # each row's latent, its shape kept
        index = table.schema.get_field_index(schema.LATENT_MEAN)
        pq.write_table(table.set_column(index, table.schema.field(index), poisoned), shard)


def test_a_diverged_run_stops_at_once_without_a_restart(work, ray_local):
    """nonfinite.max_consecutive bad steps in a row end the run: exit 1 with the policy's one-line reason, and
    no restart although max_failures=1 allows one (a restart from the last checkpoint would only diverge again)."""
    shutil.copytree(work / "features", work / "poisoned")
    _poison(work / "poisoned")
    cfg = make_cfg(work, "diverged", "max_failures=1", "nonfinite.max_consecutive=2", features="poisoned")
    assert run_stage(TRAIN_STAGE, cfg) == 1
    report = json.loads(Path(report_path(cfg)).read_text())
    assert not report["ok"] and "\n" not in report["error"]
    assert "NonFiniteLossError" in report["error"] and "2 steps in a row at step 1" in report["error"]
    run_dir = Path(report_path(cfg)).parent
    assert _rank0_starts(run_dir) == 1  # started once: not restarted
    assert _mlflow_restarts(work, _mlflow_run_id(work, "diverged")) == [0.0]


# ------------------------------------------------------------------------------- a lost training worker


def _kill_rank_1_once_started(run_dir: Path, killed: list[int]) -> None:
    """SIGKILL the worker process of rank 1 once both ranks recorded their first start (attempts/ holds their
    pids): the group has started, and rank 0's start is counted."""
    import psutil

    deadline = time.time() + 600
    while time.time() < deadline:
        records = {r["rank"]: r for r in reversed(attempts.starts(str(run_dir)))}  # each rank's first start
        if len(records) == 2:
            record = records[1]
            # Only a process of this test session's Ray (started by this process): never another one's.
            ours = {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}
            if record["pid"] in ours:
                os.kill(record["pid"], signal.SIGKILL)
            killed.append(record["pid"] if record["pid"] in ours else -record["pid"])
            return
        time.sleep(0.05)


# max_failures=1 (one restart, exact resume) is tests/test_train_unet.py's `killed` run; add (1, 0, 1) here to run
# it through the job too (a few minutes more).
@pytest.mark.parametrize("max_failures, exit_status, restarts", [(0, 1, 0)])
def test_a_killed_worker_ends_the_run_or_is_replaced_by_max_failures(work, ray_local, max_failures, exit_status,
                                                                       restarts):
    """max_failures=0: a lost worker ends the run (exit 1), nothing restarted. max_failures=1: the worker group
    restarts once and the run finishes. The report (on success) and MLflow's `restarts` say how many."""
    name = f"killed-{max_failures}"
    cfg = make_cfg(work, name, f"max_failures={max_failures}", "max_steps=4", "checkpoint.every_steps=2")
    killed: list[int] = []
    watcher = threading.Thread(target=_kill_rank_1_once_started, args=(work / "runs" / name, killed))
    watcher.start()
    status = run_stage(TRAIN_STAGE, cfg)
    watcher.join()
    assert killed and killed[0] > 0, f"rank 1 never recorded its start, or not as a worker of this Ray: {killed}"
    assert status == exit_status
    report = json.loads(Path(report_path(cfg)).read_text())
    assert _rank0_starts(Path(report_path(cfg)).parent) == 1 + restarts
    assert _mlflow_restarts(work, _mlflow_run_id(work, name)) == [float(restarts)]
    if exit_status == 0:
        assert report["ok"] and report["restarts"] == restarts and report["steps"] == 4
    else:
        assert not report["ok"] and "\n" not in report["error"] and "training run killed-0 failed" in report["error"]


# ------------------------------------------------------------------------------- an encoder that cannot load


@pytest.mark.timeout(600)  # the failure mode this guards against is a pipeline waiting forever for its actors
def test_an_encoder_that_never_loads_fails_the_stage_with_one_line(ray_local, tmp_path):
    """A VAE directory whose weights file is damaged (a truncated copy): config.json is there, so the config
    check passes, and the load fails inside the actors and the probe. Each load is retried (a shared file
    system may fail once), then the stage fails with exit 1 and one line that names the directory and the
    error; nothing is written."""
    from diffusers import AutoencoderKL

    from model.encoders import tiny_vae_config

    vae_dir = tmp_path / "vae"
    AutoencoderKL.from_config(tiny_vae_config()).save_pretrained(vae_dir)
    weights = next(vae_dir.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    write_shards(tmp_path / "in", shards=2, per_shard=3, empty_last=False)
    cfg = make_config(tmp_path / "in", tmp_path / "out", vae={"source": str(vae_dir)})
    assert run_stage(PRECOMPUTE_STAGE, cfg) == 1
    report = json.loads(Path(precompute_report_path(cfg)).read_text())
    assert not report["ok"] and "\n" not in report["error"]
    assert str(vae_dir) in report["error"] and "attempts" in report["error"]
    assert not list((tmp_path / "out").glob("*.parquet"))


# ------------------------------------------------------------------------------- a tiny object store


MIN_OBJECT_STORE = 75 * 1024 * 1024  # the least Ray accepts (ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES)


def _small_vae(directory: Path) -> None:
    """A diffusers VAE that costs little per pixel (two 8-channel levels, no attention), so a test can push more
    decoded pixels through the object store than it holds in seconds, not minutes."""
    from diffusers import AutoencoderKL

    AutoencoderKL.from_config({"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
                               "down_block_types": ["DownEncoderBlock2D"] * 2,
                               "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [8, 8],
                               "norm_num_groups": 4, "mid_block_add_attention": False}).save_pretrained(directory)


@pytest.mark.timeout(900)  # a stage that deadlocks on a full store must fail the test, not stall the suite
def test_precompute_through_an_object_store_smaller_than_its_data(ray_local, tmp_path):
    """The encoder actors' input (decoded float32 images, 768 KB a row at 256 px) of 132 rows is ~100 MB,
    more than the whole 80 MB store: the stage must apply backpressure or spill, finish, and write what a run
    on a normal store writes."""
    _small_vae(tmp_path / "vae")
    write_shards(tmp_path / "in", shards=4, per_shard=33, empty_last=False)
    sets = {"image_size": 256, "vae.source": str(tmp_path / "vae"), "compute.batch_size": 8}
    normal = make_config(tmp_path / "in", tmp_path / "normal", image_size=256, vae={"source": str(tmp_path / "vae")},
                         compute={"batch_size": 8, "actors": 1})
    assert run_stage(PRECOMPUTE_STAGE, normal) == 0
    with LocalRayHead(num_cpus=2, object_store_bytes=MIN_OBJECT_STORE + 5 * 1024 * 1024) as head:
        args = [f"input_dir={tmp_path / 'in'}", f"output_dir={tmp_path / 'small'}", "compute.actors=1",
                *(f"{k}={v}" for k, v in sets.items())]
        job = subprocess.run([sys.executable, str(JOB), *(a for kv in args for a in ("--set", kv))], cwd=REPO,
                             env=head.client_env(os.environ), capture_output=True, text=True, timeout=800)
    assert job.returncode == 0, job.stderr[-3000:]
    small_report = json.loads((tmp_path / "small" / "precompute_report.json").read_text())
    normal_report = json.loads((tmp_path / "normal" / "precompute_report.json").read_text())
    assert small_report["rows_out"] == normal_report["rows_out"] > 120
    assert small_report["dropped"] == normal_report["dropped"]
    ours, theirs = read_rows(tmp_path / "small"), read_rows(tmp_path / "normal")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        for name, values in theirs[key].items():
            np.testing.assert_allclose(ours[key][name].astype(np.float32), values.astype(np.float32),
                                       rtol=1e-3, atol=1e-3, err_msg=f"{key} {name}")
