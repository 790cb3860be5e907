"""The whole pipeline on a cluster, on s3://, through `ray job submit`, with a worker node lost mid-training.

One LocalCluster (pipelines/core/local_cluster): an S3 server, an MLflow tracking server (SQLite, artifacts in the
bucket) and a Ray head with two one-CPU worker nodes, all on 127.0.0.1 with token authentication. Every stage is a
job submitted to it with every location an s3:// URI (the URL list included); the endpoint and keys reach the jobs
only through the nodes' environment. Training runs 2 workers with STRICT_SPREAD (one per worker node); after its
first checkpoint reaches the bucket, worker node 0 is SIGKILLed (raylet, workers and all) and a replacement node
joins: Ray Train restarts the worker group from that checkpoint. The same training on a local copy of the same
features, uninterrupted, must give the same loss at every step and the same exported weights, bit for bit.
(tests/test_object_storage.py compares every stage on s3:// with the same stage on local folders, in process.)
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load as load_safetensors

from pipelines.core import storage
from pipelines.core.local_cluster import LocalCluster
from pipelines.data.download import REPORT_FILE as DOWNLOAD_REPORT
from pipelines.data.filter.config import REPORT_FILE as FILTER_REPORT
from pipelines.data.precompute.config import REPORT_FILE as PRECOMPUTE_REPORT
from pipelines.eval.driver import REPORT_FILE as EVAL_REPORT
from pipelines.synthetic.shapes import PlantedCounts, SyntheticConfig, build_dataset
from pipelines.synthetic.web import SyntheticServer, write_url_list
from pipelines.train import checkpoint
from pipelines.train.driver import REPORT_FILE as TRAIN_REPORT

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
STEPS = 10
TRAIN_SETTINGS = (f"max_steps={STEPS}", "log_every=1", "batch.global_batch=16", "batch.micro_batch=8",
                  "lr.kind=constant", "lr.warmup_steps=0", "checkpoint.every_steps=4", "samples.every_steps=0",
                  "samples.prompts=[a large red circle in the top left]", "samples.seeds=[0]",
                  "samples.sampler.steps=4", "mlflow.experiment=cluster", "mlflow.system_metrics=false",
                  "scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.placement_strategy=STRICT_SPREAD",
                  "max_failures=2")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(str(tmp_path_factory.mktemp("cluster") / "c"), workers=2, bucket="lfc") as c:
        yield c


def submit(cluster: LocalCluster, *args: str, timeout: int = 900) -> str:
    """`ray job submit` of one job (this repository as the working dir); returns its output, fails on exit != 0."""
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", str(REPO), "--",
           "python", *args]
    done = subprocess.run(cmd, env=cluster.client_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args[0]} failed:\n{(done.stdout + done.stderr)[-4000:]}"
    return done.stdout


def _sets(*assignments: str) -> list[str]:
    return [part for a in assignments for part in ("--set", a)]


def _losses(tracking_uri: str, run_id: str) -> dict[int, float]:
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri).get_metric_history(run_id, "loss")
    return {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}


def _lose_a_node_after_the_first_checkpoint(cluster: LocalCluster, run_dir: str, events: dict) -> None:
    """Poll the bucket for the run's first complete checkpoint, then kill worker node 0 and start a new node."""
    deadline = time.time() + 900
    while time.time() < deadline:
        if storage.is_dir(run_dir):
            done = [name for name in storage.list_dir(run_dir) if name.startswith("checkpoint_")
                    and all(storage.is_file(storage.join(run_dir, name, checkpoint.rank_dir(r), checkpoint.COMPLETE_FILE))
                            for r in range(2))]
            if done:
                time.sleep(2)  # Ray Train registers a checkpoint once every rank's upload is in
                events["killed_at"] = time.time()
                events["node_pids"] = cluster.ray.node_pids(0)
                cluster.ray.kill_node(0)
                events["replacement"] = cluster.ray.add_node()
                return
        time.sleep(0.5)


@pytest.fixture(scope="module")
def pipeline(cluster, tmp_path_factory, monkeypatch_module):
    work = tmp_path_factory.mktemp("cluster-pipeline")
    for name, value in cluster.client_env({}).items():
        if name.startswith("AWS_"):
            monkeypatch_module.setenv(name, value)
    root = cluster.store.uri("pipeline")
    dataset = build_dataset(SyntheticConfig(num_good=36, seed=5, planted=PlantedCounts(http_404=1, tiny_image=1)))
    storage.write_text(storage.join(root, "prompts.txt"), "a large red circle in the top left\n")
    seconds, events = {}, {}

    def timed(name: str, *args: str, timeout: int = 900) -> str:
        start = time.perf_counter()
        out = submit(cluster, *args, timeout=timeout)
        seconds[name] = round(time.perf_counter() - start, 1)
        return out

    with SyntheticServer(dataset.responses) as server:
        local_list = write_url_list(dataset, server.base_url, work / "urls.parquet")
        storage.write_bytes(storage.join(root, "urls.parquet"), local_list.read_bytes())
        timed("download", "jobs/download_data.py", "--config", "configs/tiny/download.yaml",
              *_sets(f"url_list={root}/urls.parquet", f"output_dir={root}/raw", "number_sample_per_shard=15",
                     "allow_private_addresses=true"))
    timed("filter", "jobs/filter_data.py", "--config", "configs/tiny/filter.yaml",
          *_sets(f"input_dir={root}/raw", f"output_dir={root}/filtered"))
    timed("precompute", "jobs/precompute_latents.py", "--config", "configs/tiny/precompute.yaml",
          *_sets(f"input_dir={root}/filtered", f"output_dir={root}/features"))

    run_dir = storage.join(root, "runs", "lost-node")
    watcher = threading.Thread(target=_lose_a_node_after_the_first_checkpoint, args=(cluster, run_dir, events))
    watcher.start()
    started = time.time()
    timed("train_unet", "jobs/train_unet.py", "--config", "configs/tiny-cpu.yaml",
          *_sets(f"features_dir={root}/features", f"storage_path={root}/runs", "run_name=lost-node", *TRAIN_SETTINGS))
    events["finished_at"] = time.time()
    watcher.join()
    events["started_at"] = started

    # The same training on a local copy of the same features, uninterrupted (same cluster, same placement).
    features = work / "features"
    features.mkdir()
    for name in storage.list_files(storage.join(root, "features")):
        (features / name).write_bytes(storage.read_bytes(storage.join(root, "features", name)))
    timed("train_unet_local", "jobs/train_unet.py", "--config", "configs/tiny-cpu.yaml",
          *_sets(f"features_dir={features}", f"storage_path={work / 'runs'}", "run_name=reference", *TRAIN_SETTINGS))

    timed("sample_eval", "jobs/sample_eval.py", "--model", f"{run_dir}/export", "--prompts", f"{root}/prompts.txt",
          "--out", f"{root}/eval", *_sets("sampling.steps=4", "sampling.guidance_scales=[2.0]", "compute.actors=1",
                                          "compute.batch_size=4"))
    print("\ncluster pipeline seconds:", seconds, "node lost at", events.get("killed_at"))
    return {"root": root, "run_dir": run_dir, "local_run_dir": str(work / "runs" / "reference"), "events": events,
            "seconds": seconds}


@pytest.fixture(scope="module")
def monkeypatch_module():
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


def test_every_stage_ran_on_s3_through_ray_job_submit(pipeline):
    root = pipeline["root"]
    for folder, report in (("raw", DOWNLOAD_REPORT), ("filtered", FILTER_REPORT), ("features", PRECOMPUTE_REPORT),
                           ("eval", EVAL_REPORT)):
        assert storage.read_json(storage.join(root, folder, report))["ok"], report
    assert storage.read_json(storage.join(pipeline["run_dir"], TRAIN_REPORT))["ok"]


def test_a_lost_node_costs_a_restart_and_changes_nothing_else(pipeline, cluster):
    events = pipeline["events"]
    assert "killed_at" in events, "the first checkpoint never reached the bucket"
    assert events["node_pids"] and not cluster.ray.node_pids(0)  # the node really went
    ours = storage.read_json(storage.join(pipeline["run_dir"], TRAIN_REPORT))
    theirs = storage.read_json(storage.join(pipeline["local_run_dir"], TRAIN_REPORT))
    assert (ours["restarts"], theirs["restarts"]) == (1, 0)
    tracking = cluster.tracking.tracking_uri
    a, b = _losses(tracking, ours["mlflow_run_id"]), _losses(tracking, theirs["mlflow_run_id"])
    assert sorted(a) == list(range(1, STEPS + 1)) and a == b  # bit-equal at every step
    weights = [load_safetensors(storage.read_bytes(storage.join(d, "export", "unet", "model.safetensors")))
               for d in (pipeline["run_dir"], pipeline["local_run_dir"])]
    assert weights[0].keys() == weights[1].keys() and all(weights[0][k].equal(weights[1][k]) for k in weights[0])
    print(f"\nlost node: training took {pipeline['seconds']['train_unet']} s against "
          f"{pipeline['seconds']['train_unet_local']} s uninterrupted; the run's own time "
          f"{ours['seconds']} s against {theirs['seconds']} s")


def test_training_workers_were_spread_over_both_worker_nodes_before_and_after_the_loss(pipeline):
    from pipelines.train import attempts

    records = attempts.starts(pipeline["run_dir"])
    assert len(records) == 4  # 2 ranks, started twice
    groups = [records[:2], records[2:]]
    for group in groups:
        assert sorted(r["rank"] for r in group) == [0, 1]
        assert len({r["node_id"] for r in group}) == 2  # no two workers on one node
    assert {r["node_id"] for r in groups[0]} != {r["node_id"] for r in groups[1]}  # the lost node was replaced
    steps = {r["from_step"] for r in groups[1]}
    assert len(steps) == 1 and steps.pop() in (4, 8)  # both ranks from the same checkpoint in the bucket
