"""LocalCluster: the object store, the tracking server and the Ray cluster together, as `with LocalCluster(...)`
or the CLI's `up` starts them, with what a user's shell sources (env.sh) and what `status` and `down` read
(state.json) in the cluster's directory; stop_recorded ends a cluster from its state.json alone."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

from pipelines.core.config import ConfigError
from pipelines.core.local_cluster.object_store import LocalObjectStore
from pipelines.core.local_cluster.processes import _end, _pid_record, _process_tree, _processes_using
from pipelines.core.local_cluster.ray_nodes import _RAY_STOP_GRACE_S, LocalRayCluster
from pipelines.core.local_cluster.tracking_server import LocalTrackingServer
from pipelines.core.local_ray import FOREIGN_RAY_VARS
from pipelines.core.service import Service

STATE_FILE, ENV_FILE = "state.json", "env.sh"
# Left over in a user's shell, these would override what env.sh sets (a profile's credentials, another token).
_SHADOWING_VARS = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3", *FOREIGN_RAY_VARS)


class LocalCluster(Service):
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
