"""The local cluster (pipelines/core/local_cluster/) checked through the real parts: moto's S3 server, `mlflow
server`, a Ray head with two worker nodes, drivers and `ray job submit` in subprocesses. One cluster serves
the whole module (it takes a minute or two to start on 2 cores); the tests that change it (a lost node, stop)
come last."""

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from pipelines.core.config import ConfigError
from pipelines.core.local_cluster import (
    ENV_FILE,
    STATE_FILE,
    LocalCluster,
    _process_tree,
    _processes_using,
    env_script,
    main,
)
from pipelines.core.tracking import MLflowSettings, check_store_is_shared

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
DRIVER_TIMEOUT_S = 300

# Joins RAY_ADDRESS; prints every node as the head sees it.
NODES_DRIVER = """
import json, ray
ray.init()
print("NODES", json.dumps([{"name": n["NodeName"], "ip": n["NodeManagerAddress"], "alive": n["Alive"],
                            "resources": n["Resources"]} for n in ray.nodes()]))
"""

# One task pinned to each worker node: it writes and reads an s3:// object with pyarrow, with nothing but the
# environment its node was started with; on node_w1 a task also logs an MLflow run with a metric and an artifact.
TASKS_DRIVER = """
import json, os, tempfile, ray
ray.init()

@ray.remote
def s3_round_trip(resource, uri):
    import pyarrow.fs
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    with fs.open_output_stream(path) as f:
        f.write(resource.encode())
    with fs.open_input_stream(path) as f:
        back = f.read().decode()
    return {"node_id": ray.get_runtime_context().get_node_id(), "read_back": back}

@ray.remote
def log_run():
    from mlflow import MlflowClient
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment_id = client.create_experiment("local-cluster-test")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_metric(run_id, "loss", 0.25, step=3)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "probe.txt")
        with open(path, "w") as f:
            f.write("logged from a worker node")
        client.log_artifact(run_id, path, "probe")
    client.set_terminated(run_id)
    return {"node_id": ray.get_runtime_context().get_node_id(), "experiment_id": experiment_id, "run_id": run_id}

resources = {n["NodeID"]: sorted(n["Resources"]) for n in ray.nodes() if n["Alive"]}
probes = {r: s3_round_trip.options(resources={r: 1}).remote(r, f"s3://{BUCKET}/probe/{r}.txt")
          for r in ("node_w0", "node_w1")}
run = log_run.options(resources={"node_w1": 1}).remote()
print("TASKS", json.dumps({"resources": resources, "probes": {r: ray.get(p) for r, p in probes.items()},
                           "run": ray.get(run)}))
"""

# A job: one task on node_w0 writes an s3:// object.
SUBMITTED_JOB = """
import ray, pyarrow.fs
ray.init()

@ray.remote(resources={"node_w0": 1})
def put(uri):
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    with fs.open_output_stream(path) as f:
        f.write(b"written by a submitted job")
    return ray.get_runtime_context().get_node_id()

print("JOB RAN ON", ray.get(put.remote("s3://BUCKET/jobs/submitted.txt")))
"""

# A stage under the job contract whose config has an mlflow section; its run logs one metric.
STAGE_DRIVER = """
import sys
from dataclasses import dataclass, field
from pathlib import Path
from pipelines.core.job import Stage, run_job
from pipelines.core.runtime import StageReport
from pipelines.core.tracking import MLflowSettings, Tracker

@dataclass(frozen=True)
class ProbeConfig:
    report: str = "report.json"
    mlflow: MLflowSettings = field(default_factory=lambda: MLflowSettings(experiment="probe", system_metrics=False))

def run(cfg):
    Path("ran").write_text("the stage ran")
    tracker = Tracker.open(cfg.mlflow, "probe")
    tracker.log_metrics({"x": 1.0}, step=0)
    tracker.finish()
    return StageReport("probe", details={"run_id": tracker.run_id, "tracking_uri": tracker.settings.tracking_uri})

sys.exit(run_job(Stage("probe", ProbeConfig, run=run, report_path=lambda cfg: cfg.report, ray_cpus=lambda cfg: 1),
                 "probe stage"))
"""


# ---- fast checks (no cluster) -------------------------------------------------------------------------

def test_file_tracking_stores_are_refused_on_more_than_one_node():
    for uri in ("sqlite:////shared/mlflow.db", "file:///tmp/mlruns", "/tmp/mlruns", "mlruns"):
        with pytest.raises(ConfigError) as refused:
            check_store_is_shared(MLflowSettings(tracking_uri=uri), alive_nodes=2)
        message = str(refused.value)
        assert "\n" not in message and "MLFLOW_TRACKING_URI" in message and "mlflow.enabled=false" in message
    for uri in ("http://10.0.0.5:5000", "https://mlflow.example.com", "postgresql://u@db/mlflow", "databricks"):
        check_store_is_shared(MLflowSettings(tracking_uri=uri), alive_nodes=2)
    check_store_is_shared(MLflowSettings(tracking_uri="sqlite:////tmp/mlflow.db"), alive_nodes=1)  # one node
    check_store_is_shared(MLflowSettings(tracking_uri="sqlite:////tmp/mlflow.db", enabled=False), alive_nodes=3)


def test_cli_without_a_cluster_says_so_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as helped:
        main(["--help"])
    assert helped.value.code == 0 and "up" in capsys.readouterr().out
    for command in ("down", "status"):
        assert main([command, "--dir", str(tmp_path / "none")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"no cluster in {tmp_path / 'none'}" in err and "up --dir" in err
    assert main(["up", "--workers", "0", "--dir", str(tmp_path / "none")]) == 2
    assert "workers must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_env_script_sets_the_cluster_and_unsets_what_would_override_it():
    script = env_script({"AWS_SECRET_ACCESS_KEY": "a b'c", "RAY_ADDRESS": "127.0.0.1:1"})
    assert "export AWS_SECRET_ACCESS_KEY='a b'\"'\"'c'" in script
    unset = next(line for line in script.splitlines() if line.startswith("unset "))
    assert {"AWS_PROFILE", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN"} <= set(unset.split()[1:])
    assert "RAY_ADDRESS" not in unset


# ---- one cluster for the module -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(str(tmp_path_factory.mktemp("cluster")), workers=2) as started:
        yield started


def _run_python(code: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=DRIVER_TIMEOUT_S)


def _marked(out: str, marker: str):
    assert marker in out, out[-3000:]
    return json.loads(out.split(marker, 1)[1].strip().splitlines()[0])


def _ray_only_env(cluster: LocalCluster) -> dict[str, str]:
    """A driver's environment with Ray's settings but no S3 or MLflow ones: what the tasks then reach, they
    reach through their nodes' environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "MLFLOW_TRACKING_URI"}
    return cluster.ray.client_env(base)


def _s3(cluster: LocalCluster):
    import boto3

    return boto3.client("s3", endpoint_url=cluster.store.endpoint, aws_access_key_id=cluster.store.access_key,
                        aws_secret_access_key=cluster.store.secret_key, region_name="us-east-1")


def _cluster_processes(state: dict) -> list[psutil.Process]:
    servers = [_process_tree(state[k]["pid"], state[k]["started"]) for k in ("object_store", "tracking_server")]
    return _processes_using(state["ray"]["dir"]) + [p for tree in servers for p in tree]


def _still_running(procs: list[psutil.Process]) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=15)
    running = []
    for proc in alive:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                running.append(proc)
        except psutil.NoSuchProcess:
            pass
    return running


@pytest.mark.slow
def test_three_nodes_on_loopback_each_worker_with_its_resource_and_the_token_required(cluster, tmp_path):
    right = _ray_only_env(cluster)
    no_token = {k: v for k, v in right.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    procs = {name: subprocess.Popen([sys.executable, "-c", NODES_DRIVER], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
             for name, env in (("token", right), ("no token", no_token))}
    out = {name: proc.communicate(timeout=DRIVER_TIMEOUT_S)[0] for name, proc in procs.items()}
    assert procs["no token"].returncode != 0 and "NODES" not in out["no token"]
    assert "Authentication token is missing or incorrect" in out["no token"], out["no token"][-2000:]

    assert procs["token"].returncode == 0, out["token"][-3000:]
    nodes = {n["name"]: n for n in _marked(out["token"], "NODES")}
    assert sorted(nodes) == ["127.0.0.1", "w0", "w1"] and all(n["alive"] for n in nodes.values())
    assert {n["ip"] for n in nodes.values()} == {"127.0.0.1"}
    head = nodes["127.0.0.1"]["resources"]
    assert head.get("CPU", 0) == 0 and not any(k.startswith("node_w") for k in head), "the head runs no tasks"
    for i in (0, 1):
        resources = nodes[f"w{i}"]["resources"]
        assert resources["CPU"] == 1 and resources[f"node_w{i}"] == 1
        assert [k for k in resources if k.startswith("node_w")] == [f"node_w{i}"]

    state = cluster.state()
    pids = {p.pid for p in _cluster_processes(state)}
    listening = {c.laddr.ip for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids}
    assert listening and listening <= LOOPBACK, f"the cluster listens on {listening}"
    assert Path(cluster.directory).stat().st_mode & 0o777 == 0o700


@pytest.mark.slow
def test_tasks_on_each_worker_node_reach_s3_and_the_tracking_server_through_their_nodes_env(cluster):
    env = _ray_only_env(cluster)
    assert "AWS_ENDPOINT_URL" not in env and "MLFLOW_TRACKING_URI" not in env
    done = _run_python(f"BUCKET = {cluster.bucket!r}\n" + TASKS_DRIVER, env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    found = _marked(done.stdout, "TASKS")

    for resource, probe in found["probes"].items():
        assert probe["read_back"] == resource
        assert resource in found["resources"][probe["node_id"]], f"{resource}'s task ran elsewhere"
    assert found["probes"]["node_w0"]["node_id"] != found["probes"]["node_w1"]["node_id"]
    run = found["run"]
    assert "node_w1" in found["resources"][run["node_id"]]

    from mlflow import MlflowClient

    logged = MlflowClient(cluster.tracking.tracking_uri).get_run(run["run_id"])
    assert logged.data.metrics == {"loss": 0.25} and logged.info.status == "FINISHED"
    listing = _s3(cluster).list_objects_v2(Bucket=cluster.bucket, Prefix="mlflow/")
    keys = {o["Key"] for o in listing.get("Contents", [])}
    assert f"mlflow/{run['experiment_id']}/{run['run_id']}/artifacts/probe/probe.txt" in keys, keys


@pytest.mark.slow
def test_ray_job_submit_runs_a_job_that_writes_to_s3(cluster, tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "job.py").write_text(SUBMITTED_JOB.replace("BUCKET", cluster.bucket))
    ray_cli = str(Path(sys.executable).parent / "ray")
    done = subprocess.run([ray_cli, "job", "submit", "--working-dir", str(job_dir), "--", "python", "job.py"],
                          env=cluster.client_env(os.environ), capture_output=True, text=True,
                          timeout=DRIVER_TIMEOUT_S)
    assert done.returncode == 0 and "JOB RAN ON" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    body = _s3(cluster).get_object(Bucket=cluster.bucket, Key="jobs/submitted.txt")["Body"].read()
    assert body == b"written by a submitted job"


@pytest.mark.slow
def test_a_multi_node_job_with_a_file_tracking_store_is_refused_before_it_runs(cluster, tmp_path):
    """Three runs of one stage at once: on the cluster without MLFLOW_TRACKING_URI (refused: the default is a
    SQLite file), on the cluster with the tracking server (runs), and on an embedded one-node Ray without it
    (runs, into ./mlflow.db, as before)."""
    on_cluster = cluster.client_env(os.environ)
    without_server = {k: v for k, v in on_cluster.items() if k != "MLFLOW_TRACKING_URI"}
    one_node = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    runs = {"refused": without_server, "server": on_cluster, "one node": one_node}
    procs = {}
    for name, env in runs.items():
        cwd = tmp_path / name.replace(" ", "_")
        cwd.mkdir()
        procs[name] = (cwd, subprocess.Popen([sys.executable, "-c", STAGE_DRIVER], env=env, cwd=cwd, text=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = {name: (cwd, proc.communicate(timeout=DRIVER_TIMEOUT_S), proc.returncode)
               for name, (cwd, proc) in procs.items()}

    cwd, (_, err), code = results["refused"]
    assert code == 2, err[-3000:]
    refusal = [line for line in err.splitlines() if "bad config or input" in line]
    assert len(refusal) == 1 and "sqlite:///" in refusal[0] and "3 nodes" in refusal[0], err[-3000:]
    assert sorted(p.name for p in cwd.iterdir()) == [], "a refused job wrote something"

    cwd, (_, err), code = results["server"]
    assert code == 0, err[-3000:]
    report = json.loads((cwd / "report.json").read_text())
    assert report["ok"] and report["tracking_uri"] == cluster.tracking.tracking_uri and not (cwd / "mlflow.db").exists()

    cwd, (_, err), code = results["one node"]
    assert code == 0, err[-3000:]
    report = json.loads((cwd / "report.json").read_text())
    assert report["ok"] and report["tracking_uri"] == f"sqlite:///{cwd / 'mlflow.db'}" and report["run_id"]
    assert (cwd / "mlflow.db").is_file()


@pytest.mark.slow
def test_cli_up_status_down_leaves_other_clusters_and_keeps_secrets_out_of_state_and_logs(cluster, tmp_path):
    directory = tmp_path / "cli-cluster"
    cli = [sys.executable, "-m", "pipelines.core.local_cluster"]

    def run(*args: str) -> subprocess.CompletedProcess:
        # capture_output: a server left holding the pipe would make this wait for the timeout
        return subprocess.run([*cli, *args, "--dir", str(directory)], capture_output=True, text=True, timeout=600)

    others_before = [p for p in _processes_using(cluster.ray.root) if p.name() == "raylet"]
    up = run("up", "--workers", "1")
    assert up.returncode == 0, up.stdout + up.stderr[-3000:]
    assert up.stdout.strip().splitlines()[-1] == f"source {directory / ENV_FILE}"
    again = run("up")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already up" in again.stderr

    status = run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert [line.split()[-1] for line in status.stdout.splitlines()] == ["up"] * 4  # store, tracking, head, w0

    state = json.loads((directory / STATE_FILE).read_text())
    env_file = directory / ENV_FILE
    secret = next(line.split("=", 1)[1] for line in env_file.read_text().splitlines()
                  if line.startswith("export AWS_SECRET_ACCESS_KEY="))
    assert len(secret) > 20 and env_file.stat().st_mode & 0o777 == 0o600
    exported = {line.split()[1].split("=")[0] for line in env_file.read_text().splitlines()
                if line.startswith("export ")}
    assert exported == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                        "AWS_REGION", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE",
                        "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}, "env.sh must not touch PATH & co"
    assert directory.stat().st_mode & 0o777 == 0o700
    files = [p for root in (directory, Path(state["ray"]["dir"])) for p in root.rglob("*")
             if p.is_file() and p != env_file]
    assert (directory / STATE_FILE) in files and any(p.name == "mlflow.log" for p in files)
    leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert leaks == [], f"the S3 secret is in {leaks}"

    procs = _cluster_processes(state)
    assert len(procs) > 10
    down = run("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert _still_running(procs) == []
    assert not directory.exists() and not Path(state["ray"]["dir"]).exists()
    assert all(p.is_running() for p in others_before), "down touched another cluster"

    again = run("down")
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert again.stderr.startswith(f"local_cluster down: no cluster in {directory}")


@pytest.mark.slow
def test_a_killed_worker_node_is_seen_dead_and_a_new_one_joins(cluster):
    pids = cluster.ray.node_pids(0)
    assert any(psutil.Process(pid).name() == "raylet" for pid in pids)
    others = cluster.ray.node_pids(1)
    cluster.ray.kill_node(0)
    assert cluster.ray.node_pids(0) == [] and not any(psutil.pid_exists(pid) for pid in pids)
    assert cluster.ray.add_node() == 2
    watch = """
import json, time, ray
ray.init()
start = time.monotonic()
while time.monotonic() - start < 120:
    alive = {n["NodeName"]: n["Alive"] for n in ray.nodes()}
    if alive.get("w0") is False and alive.get("w2"):
        break
    time.sleep(1)
where = ray.get(ray.remote(lambda: ray.get_runtime_context().get_node_id()).options(resources={"node_w2": 1}).remote())
node_w2 = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node_w2" in n["Resources"]]
print("SEEN", json.dumps({"alive": alive, "seconds": time.monotonic() - start, "ran_on_w2": [where] == node_w2}))
"""
    done = _run_python(watch, _ray_only_env(cluster))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    seen = _marked(done.stdout, "SEEN")
    assert seen["alive"] == {"127.0.0.1": True, "w0": False, "w1": True, "w2": True}, seen
    assert seen["ran_on_w2"]
    assert cluster.ray.node_pids(1) and set(others) & set(cluster.ray.node_pids(1)), "w1 was touched"


@pytest.mark.slow
def test_stop_ends_every_process_of_the_cluster(cluster):
    state = cluster.state()
    procs = _cluster_processes(state)
    assert len(procs) > 10
    cluster.stop()
    assert _still_running(procs) == []
    assert not Path(cluster.directory).exists() and not Path(state["ray"]["dir"]).exists()
