"""A cluster on this machine, on 127.0.0.1, made of the parts a real one has: an S3-compatible object store, an
MLflow tracking server that keeps its artifacts there, and a Ray head with worker nodes. For the tests, and for
trying the cluster path by hand (docs/cluster.md, "Try the cluster path on one machine").

    with LocalCluster(workers=2) as cluster:
        env = cluster.client_env(os.environ)   # S3, MLflow and Ray settings: what a user of a real cluster sets
        subprocess.run(["ray", "job", "submit", "--working-dir", ".", "--", "python", "jobs/..."], env=env)

    python -m pipelines.core.local_cluster up --dir .cluster     # the same, left running: source .cluster/env.sh
    python -m pipelines.core.local_cluster status --dir .cluster
    python -m pipelines.core.local_cluster down --dir .cluster

The parts, each usable alone:
- LocalObjectStore: moto's standalone server (`moto_server`, moto[server]): the S3 API over HTTP, kept in the
  server's memory, gone when it stops. Clients reach it exactly as they reach a real bucket: pyarrow, s3fs
  (img2dataset) and boto3 (MLflow's artifact store) all read AWS_ENDPOINT_URL and the usual AWS_* credentials
  from the environment, so no code path is special to the tests.
- LocalTrackingServer: `mlflow server` with a SQLite backend; artifacts are proxied (--serve-artifacts) to
  s3://<bucket>/mlflow, so clients upload over HTTP and only the server holds the S3 credentials.
- LocalRayCluster: a Ray head (no CPUs: it runs job drivers and the job server, as the VM cluster's head does)
  and worker nodes with one CPU and a resource of their own (node_w0, node_w1, ...), token-authenticated,
  every server on 127.0.0.1. Nodes can be killed and added, for tests that lose a node.

What the next person needs to know (Ray 2.60, MLflow 3.17):
- Ray keeps a node on 127.0.0.1 only under RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (local_ray.py), and that same
  setting makes `ray start --address=...` refuse to start a second node. Without it Ray swaps 127.0.0.1 for the
  machine's address and binds every interface. So the head is a plain `ray start --head`, and worker nodes are
  started as `ray start` starts them after that refusal, through ray._private.node.Node (as Ray's own
  ray.cluster_utils does), with node IP 127.0.0.1.
- Each node has its own Ray temp dir (`--temp-dir` may differ per node): a node's processes are then exactly
  those using its dir, which is how kill_node finds them. The dirs sit under a short /tmp path, because Ray's
  Unix socket paths inside them are limited to ~107 characters.
- `mlflow server` starts a job runner with seven huey consumers (~190 MB each) unless
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false, and forwards SIGTERM to its uvicorn child only: stop the whole tree.
  Its Host-header guard (--allowed-hosts) admits localhost and 127.0.0.1 by default.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Mapping

from pipelines.core.config import ConfigError
from pipelines.core.local_ray import (FOREIGN_RAY_VARS, RAY_TEMP_PARENT, RAY_TEMP_PREFIX, TOKEN_FILE,
                                      private_ray_env, uses_path, write_token)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll `url` until it answers (any HTTP status); raise if `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")
        time.sleep(0.2)


class LocalObjectStore:
    """An S3-compatible server on 127.0.0.1 with one bucket, and the credentials to reach it."""

    def __init__(self, bucket: str = "latentforge", port: int | None = None, log_path: str | None = None) -> None:
        self.bucket = bucket
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # moto accepts any credentials; random ones make sure nothing depends on a well-known pair
        self.access_key = "AK" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def client_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """`base` (default: this process's environment) plus what an S3 client needs to reach this store."""
        env = dict(os.environ if base is None else base)
        env.update({"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                    "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_REGION": "us-east-1"})
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):  # would override the above
            env.pop(name, None)
        return env

    def start(self) -> None:
        server = str(Path(sys.executable).parent / "moto_server")
        self.proc = _spawn([server, "-H", "127.0.0.1", "-p", str(self.port)], env=None, log_path=self.log_path)
        wait_for_http(self.endpoint, timeout_s=60, proc=self.proc)
        import boto3

        env = self.client_env({})
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                     region_name=env["AWS_DEFAULT_REGION"]).create_bucket(Bucket=self.bucket)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "LocalObjectStore":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- processes ------------------------------------------------------------------------------------------

def _spawn(cmd: list[str], env: Mapping[str, str] | None, log_path: str | None) -> subprocess.Popen:
    """A server in a session of its own, output to `log_path`: it outlives a CLI that returns (`up`) and a
    Ctrl-C meant for the shell, and holds no pipe of the caller open."""
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(cmd, env=None if env is None else dict(env), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log_path:
            log.close()  # the child has its own copy


def _process_tree(pid: int, started: float | None = None) -> list[Any]:
    """Process `pid` and its descendants as psutil.Process objects; [] when it is gone, or when `started` (its
    create_time, as recorded) says the pid now belongs to another process."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if started is not None and abs(proc.create_time() - started) > 0.01:
            return []
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def _processes_using(path: str) -> list[Any]:
    """Every process naming `path` on its command line or holding a file under it open, with their descendants
    (Ray's workers and agents rename themselves), this process excepted."""
    import psutil

    prefix = os.path.join(path, "")  # /tmp/lfray-ab/ must not match /tmp/lfray-abc
    found = {p.pid: p for p in psutil.process_iter() if uses_path(p, prefix)}
    for proc in list(found.values()):
        try:
            found.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            pass
    found.pop(os.getpid(), None)
    return list(found.values())


def _end(procs: list[Any], grace_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL whatever still runs after `grace_s`."""
    import psutil

    _signal_all(procs, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    _signal_all(alive, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)


def _signal_all(procs: list[Any], sig: int) -> None:
    import psutil

    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:  # already gone
            pass


def _pid_record(proc: subprocess.Popen | None) -> dict[str, Any]:
    """What identifies a server process later (`down`): its pid and start time (pids are reused)."""
    import psutil

    if proc is None or proc.poll() is not None:
        return {"pid": None, "started": None}
    return {"pid": proc.pid, "started": psutil.Process(proc.pid).create_time()}


# ---- tracking server ------------------------------------------------------------------------------------

class LocalTrackingServer:
    """`mlflow server` on 127.0.0.1: runs in SQLite under `directory`, artifacts proxied to
    `artifacts_destination` (an s3:// URI: the server's environment must hold the credentials)."""

    def __init__(self, directory: str, artifacts_destination: str, port: int | None = None) -> None:
        self.directory = directory
        self.artifacts_destination = artifacts_destination
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend_uri(self) -> str:
        return f"sqlite:///{os.path.join(os.path.abspath(self.directory), 'mlflow.db')}"

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "mlflow.log")

    def command(self) -> list[str]:
        # One uvicorn worker: plenty for one training run (only rank 0 logs), ~0.9 GB less than MLflow's 4.
        return [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", self.backend_uri,
                "--serve-artifacts", "--artifacts-destination", self.artifacts_destination,
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]

    def launch(self, env: Mapping[str, str]) -> None:
        """Start the server without waiting for it (see wait_ready): it takes 10-20 s to import."""
        # No job runner: it serves MLflow's GenAI jobs (none here) with seven ~190 MB huey processes.
        self.proc = _spawn(self.command(), {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, self.log_path)

    def wait_ready(self, timeout_s: float = 180) -> None:
        wait_for_http(f"{self.tracking_uri}/health", timeout_s=timeout_s, proc=self.proc)

    def start(self, env: Mapping[str, str]) -> None:
        self.launch(env)
        self.wait_ready()

    def stop(self) -> None:
        """The whole process tree: `mlflow server` forwards SIGTERM to its uvicorn child only."""
        if self.proc is not None:
            _end(_process_tree(self.proc.pid))
            self.proc.wait()
        self.proc = None


# ---- Ray ------------------------------------------------------------------------------------------------

# `ray start --address=...` without its refusal of RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (see the module doc):
# the node's processes are started and left running, as `ray start` leaves them.
_START_WORKER_NODE = """
import json, sys
from ray._private.node import Node
from ray._private.parameter import RayParams
Node(RayParams(**json.loads(sys.argv[1])), head=False, shutdown_at_exit=False, spawn_reaper=False)
"""
# Ray's raylets and GCS answer SIGTERM with a shutdown that waits on each other (over 10 s when all go at
# once); nothing of a local cluster outlives it, so they get 5 s before SIGKILL.
_RAY_STOP_GRACE_S = 5.0
# A client's setting that must not reach the nodes: a job's own `ray job ...` calls would follow it.
_CLIENT_ONLY_VARS = ("RAY_API_SERVER_ADDRESS",)


class LocalRayCluster:
    """A Ray head and worker nodes on 127.0.0.1 sharing one token; each node in its own temp dir under one
    private dir (mode 0700), removed by stop(). Worker node i has 1 CPU (cpus_per_worker) and resource node_w<i>."""

    def __init__(self, workers: int = 2, cpus_per_worker: int = 1, object_store_mb: int = 256) -> None:
        if workers < 1:
            raise ConfigError(f"workers must be at least 1, got {workers}")
        self.root = tempfile.mkdtemp(prefix=RAY_TEMP_PREFIX, dir=RAY_TEMP_PARENT)  # short: Ray's socket paths
        self.token_path = os.path.join(self.root, TOKEN_FILE)
        self.port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.workers = workers
        self.cpus_per_worker = cpus_per_worker
        self.object_store_bytes = object_store_mb * 1024 * 1024
        self.worker_count = 0  # worker nodes started so far, killed ones included: the next one's index
        self._node_env: dict[str, str] | None = None

    @property
    def head_dir(self) -> str:
        return os.path.join(self.root, "head")

    def node_dir(self, i: int) -> str:
        return os.path.join(self.root, f"w{i}")

    @staticmethod
    def node_resource(i: int) -> str:
        """The custom resource only worker node i has: a task asking for it runs there."""
        return f"node_w{i}"

    def client_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """`base` plus what a driver (RAY_ADDRESS) and `ray job submit` (RAY_API_SERVER_ADDRESS, which it reads
        before RAY_ADDRESS) need to reach this cluster with its token."""
        return {**private_ray_env(base, self.token_path, self.address), "RAY_API_SERVER_ADDRESS": self.dashboard_url}

    def start(self, node_env: Mapping[str, str] | None = None) -> None:
        """The head, then the worker nodes. `node_env` (default: this process's) is what every node, and so
        every task and job, runs with: S3 credentials and MLFLOW_TRACKING_URI on a real cluster."""
        base = {k: v for k, v in (os.environ if node_env is None else node_env).items() if k not in _CLIENT_ONLY_VARS}
        write_token(self.root)
        self._node_env = private_ray_env(base, self.token_path)
        # Every port chosen: Ray's defaults (10001, 8265, 52365) would clash with any other Ray on this machine.
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={self.port}",
               f"--ray-client-server-port={free_port()}", "--num-cpus=0", f"--temp-dir={self.head_dir}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--dashboard-agent-listen-port={free_port()}", f"--object-store-memory={self.object_store_bytes}",
               "--disable-usage-stats"]
        _run_starter(cmd, self._node_env, "the Ray head")
        for _ in range(self.workers):
            self.add_node()

    def add_node(self) -> int:
        """Start one more worker node (a replacement for a lost one); returns its index."""
        if self._node_env is None:
            raise RuntimeError("start the cluster before adding nodes")
        i = self.worker_count
        self.worker_count += 1
        params = {"gcs_address": self.address, "node_ip_address": "127.0.0.1", "node_name": f"w{i}",
                  "num_cpus": self.cpus_per_worker, "resources": {self.node_resource(i): 1},
                  "temp_dir": self.node_dir(i), "dashboard_agent_listen_port": free_port(),
                  "object_store_memory": self.object_store_bytes, "min_worker_port": 0, "max_worker_port": 0}
        _run_starter([sys.executable, "-c", _START_WORKER_NODE, json.dumps(params)], self._node_env,
                     f"Ray worker node w{i}")
        return i

    def node_pids(self, i: int) -> list[int]:
        """The processes of worker node i (raylet, agents, log monitor, task workers); [] once it is gone."""
        return sorted(p.pid for p in _processes_using(self.node_dir(i)))

    def kill_node(self, i: int) -> None:
        """SIGKILL every process of worker node i at once, as when a machine is lost: nothing deregisters, the
        head has to notice (ray.nodes() shows it dead within ~20 s here)."""
        import psutil

        procs = _processes_using(self.node_dir(i))
        _signal_all(procs, signal.SIGKILL)
        psutil.wait_procs(procs, timeout=10)

    def stop(self) -> None:
        """Every process of this cluster (all found through its dir, never `ray stop`: that ends every Ray of
        this user on the machine), then the dir with the token."""
        _end(_processes_using(self.root), grace_s=_RAY_STOP_GRACE_S)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalRayCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _run_starter(cmd: list[str], env: Mapping[str, str], what: str) -> None:
    """Run a command that starts daemons and returns (`ray start`), in a session of its own so that the daemons
    outlive a Ctrl-C in the caller's terminal; its output is shown only when it fails."""
    done = subprocess.run(cmd, env=dict(env), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300, start_new_session=True)
    if done.returncode != 0:
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"starting {what} failed (exit {done.returncode}): {tail}")


# ---- all together ---------------------------------------------------------------------------------------

STATE_FILE, ENV_FILE = "state.json", "env.sh"
# Left over in a user's shell, these would override what env.sh sets (a profile's credentials, another token).
_SHADOWING_VARS = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3", *FOREIGN_RAY_VARS)


class LocalCluster:
    """Object store, tracking server and Ray cluster, started in that order (each one's address goes into the
    next one's environment), with their logs, the SQLite file, state.json and env.sh in one private directory
    (`directory`, created with mode 0700; None: a new temp dir). stop() ends it all and removes the directory."""

    def __init__(self, directory: str | None = None, workers: int = 2, bucket: str = "latentforge") -> None:
        if workers < 1:
            raise ConfigError(f"workers must be at least 1, got {workers}")
        self.requested_dir = directory
        self.workers = workers
        self.bucket = bucket
        self.directory: str | None = None  # set once created: the only directory stop() removes
        self.store: LocalObjectStore | None = None
        self.tracking: LocalTrackingServer | None = None
        self.ray: LocalRayCluster | None = None

    @property
    def state_path(self) -> str:
        return os.path.join(self.directory or "", STATE_FILE)

    @property
    def env_path(self) -> str:
        return os.path.join(self.directory or "", ENV_FILE)

    def start(self, base_env: Mapping[str, str] | None = None) -> None:
        """`base_env` (default: this process's) is the environment the servers and nodes start from; variables
        such as TORCH_EXTENSIONS_DIR (DeepSpeed's prebuilt ops, set by the Makefile) reach every task through it."""
        base = dict(os.environ if base_env is None else base_env)
        self.directory = _make_private_dir(self.requested_dir)
        self.store = LocalObjectStore(self.bucket, log_path=os.path.join(self.directory, "object_store.log"))
        self.store.start()
        self.tracking = LocalTrackingServer(self.directory, self.store.uri("mlflow"))
        self.tracking.launch(self.store.client_env(base))
        self.ray = LocalRayCluster(self.workers)
        self.ray.start(self.node_env(base))  # while the tracking server imports
        self.tracking.wait_ready()
        _write_private(self.state_path, json.dumps(self.state(), indent=2) + "\n")
        _write_private(self.env_path, env_script(self.client_env({})))

    def node_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """What every node runs with: the clients' settings (S3 credentials, the tracking server), as on a real
        cluster, and a PATH on which `python` (a job's entrypoint) is this interpreter, with Ray and this project."""
        env = self._service_env(base)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), *filter(None, [env.get("PATH")])])
        return env

    def client_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """`base` (default: this process's environment) plus S3, MLflow and Ray settings: what a driver, `ray job
        submit` or a user's shell (env.sh) needs."""
        return self.ray.client_env(self._service_env(os.environ if base is None else base))

    def _service_env(self, base: Mapping[str, str]) -> dict[str, str]:
        return {**self.store.client_env(base), "MLFLOW_TRACKING_URI": self.tracking.tracking_uri}

    def state(self) -> dict[str, Any]:
        """Addresses, pids and dirs, for `status` and `down`. No credentials: those are in env.sh only."""
        ray = self.ray
        nodes = {"head": {"dir": ray.head_dir, "pids": sorted(p.pid for p in _processes_using(ray.head_dir))}}
        for i in range(ray.worker_count):
            nodes[f"w{i}"] = {"dir": ray.node_dir(i), "resource": ray.node_resource(i), "pids": ray.node_pids(i)}
        return {
            "directory": self.directory, "env_file": self.env_path, "bucket": self.bucket,
            "object_store": {"endpoint": self.store.endpoint, **_pid_record(self.store.proc)},
            "tracking_server": {"uri": self.tracking.tracking_uri, "backend": self.tracking.backend_uri,
                                "artifacts": self.tracking.artifacts_destination, **_pid_record(self.tracking.proc)},
            "ray": {"address": ray.address, "dashboard_url": ray.dashboard_url, "dir": ray.root,
                    "token_path": ray.token_path, "nodes": nodes},
        }

    def stop(self, remove_dir: bool = True) -> None:
        """Ray, then the tracking server, then the object store; remove_dir=False keeps the logs."""
        for part in (self.ray, self.tracking, self.store):
            if part is not None:
                part.stop()
        if remove_dir and self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def env_script(env: Mapping[str, str]) -> str:
    """A shell script that sets `env` (and unsets what would override it) in the shell that sources it."""
    lines = ["# The local cluster's settings (python -m pipelines.core.local_cluster): source this file.",
             "unset " + " ".join(sorted(set(_SHADOWING_VARS) - set(env)))]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())]
    return "\n".join(lines) + "\n"


def stop_recorded(state: Mapping[str, Any]) -> None:
    """End the processes that a state file names (the CLI's `down`): Ray's through its dir, each server by pid
    when it is still the process that was recorded."""
    _end(_processes_using(state["ray"]["dir"]), grace_s=_RAY_STOP_GRACE_S)
    shutil.rmtree(state["ray"]["dir"], ignore_errors=True)
    for part in ("tracking_server", "object_store"):
        record = state[part]
        if record.get("pid"):
            _end(_process_tree(record["pid"], record["started"]))


def _make_private_dir(directory: str | None) -> str:
    """`directory` (new or empty), or a new temp dir, with mode 0700; returned absolute."""
    if directory is None:
        return tempfile.mkdtemp(prefix="lfcluster-")
    path = Path(directory).absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{directory} exists and is not empty (logs of a failed `up`?): remove it or choose "
                          "another --dir")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return str(path)


def _write_private(path: str, text: str) -> None:
    """Write a file only this user can read (mode 0600 from its creation: env.sh holds the S3 secret)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


# ---- command line -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """`up` / `status` / `down`; exit status 2 and one line on a bad request (no cluster, one already up)."""
    args = _parser().parse_args(argv)
    try:
        return {"up": _up, "status": _status, "down": _down}[args.command](args)
    except ConfigError as err:
        print(f"local_cluster {args.command}: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.core.local_cluster",
        description="A local cluster on 127.0.0.1 (S3 object store, MLflow tracking server, Ray head and worker "
                    "nodes) to try the cluster path on one machine; see docs/cluster.md.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{up,status,down}")
    for name, help_text in (("up", "start a cluster and leave it running; prints `source DIR/env.sh`"),
                            ("status", "show whether each part of the cluster in DIR is up (exit 1: a part is down)"),
                            ("down", "stop the cluster in DIR and remove DIR")):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--dir", default=".cluster",
                             help="the cluster's directory: state, logs, env.sh (default: .cluster)")
        if name == "up":
            command.add_argument("--workers", type=int, default=2, help="Ray worker nodes, 1 CPU each (default: 2)")
    return parser


def _up(args: argparse.Namespace) -> int:
    if os.path.exists(os.path.join(args.dir, STATE_FILE)):
        raise ConfigError(f"a cluster is already up in {args.dir}: see `status --dir {args.dir}`, "
                          f"or stop it with `down --dir {args.dir}`")
    cluster = LocalCluster(args.dir, workers=args.workers)
    try:
        cluster.start()
    except ConfigError:
        cluster.stop()
        raise
    except Exception as err:  # noqa: BLE001 - one line, and the logs kept for whoever looks into it
        cluster.stop(remove_dir=False)
        print(f"local_cluster up: could not start the cluster: {' '.join(str(err).split())}; logs in {args.dir} "
              "(remove it before trying again)", file=sys.stderr)
        return 1
    except BaseException:
        cluster.stop()
        raise
    state = cluster.state()
    ray, workers = state["ray"], [n for n in state["ray"]["nodes"] if n != "head"]
    for name, address, note in (
            ("object store", state["object_store"]["endpoint"], f"bucket s3://{cluster.bucket}"),
            ("tracking", state["tracking_server"]["uri"], f"artifacts in {state['tracking_server']['artifacts']}"),
            ("ray", ray["address"], f"head + {len(workers)} worker node{'s' * (len(workers) != 1)} (resources "
                                    f"{', '.join(ray['nodes'][w]['resource'] for w in workers)})"),
            ("job server", ray["dashboard_url"], "ray job submit, dashboard"),
            ("state", os.path.join(args.dir, STATE_FILE),
             f"stop: python -m pipelines.core.local_cluster down --dir {args.dir}")):
        print(f"{name:<13} {address:<26} {note}")
    print(f"source {os.path.join(args.dir, ENV_FILE)}")
    return 0


def _status(args: argparse.Namespace) -> int:
    state = _read_state(args.dir)
    rows = [("object store", state["object_store"]["endpoint"], _server_up(state["object_store"])),
            ("tracking", state["tracking_server"]["uri"], _server_up(state["tracking_server"]))]
    for name, node in state["ray"]["nodes"].items():
        where = state["ray"]["address"] if name == "head" else node["resource"]
        rows.append((f"ray {name}", where, any(p.name() == "raylet" for p in _processes_using(node["dir"]))))
    for name, where, up in rows:
        print(f"{name:<13} {where:<26} {'up' if up else 'DOWN'}")
    return 0 if all(up for *_, up in rows) else 1


def _down(args: argparse.Namespace) -> int:
    stop_recorded(_read_state(args.dir))
    shutil.rmtree(args.dir, ignore_errors=True)
    print(f"stopped the cluster in {args.dir} and removed it")
    return 0


def _read_state(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"no cluster in {directory} ({STATE_FILE} not found): start one with `up --dir {directory}`")
    return json.loads(Path(path).read_text())


def _server_up(record: Mapping[str, Any]) -> bool:
    return bool(record.get("pid")) and bool(_process_tree(record["pid"], record["started"]))


if __name__ == "__main__":
    sys.exit(main())
