"""LocalRayCluster: a Ray head (no CPUs: it runs job drivers and the job server, as the VM cluster's head does)
and worker nodes with one CPU and a resource of their own (node_w0, node_w1, ...), token-authenticated,
every server on 127.0.0.1. Nodes can be killed and added, for tests that lose a node.

What the next person needs to know (Ray 2.60):
- Ray keeps a node on 127.0.0.1 only under RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (local_ray.py), and that same
  setting makes `ray start --address=...` refuse to start a second node. Without it Ray swaps 127.0.0.1 for the
  machine's address and binds every interface. So the head is a plain `ray start --head`, and worker nodes are
  started as `ray start` starts them after that refusal, through ray._private.node.Node (as Ray's own
  ray.cluster_utils does), with node IP 127.0.0.1.
- Each node has its own Ray temp dir (`--temp-dir` may differ per node): a node's processes are then exactly
  those using its dir, which is how kill_node finds them. The dirs sit under a short /tmp path, because Ray's
  Unix socket paths inside them are limited to ~107 characters.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping

from pipelines.core.config import ConfigError
from pipelines.core.local_cluster.processes import _end, _processes_using, _signal_all, free_port
from pipelines.core.local_ray import RAY_TEMP_PARENT, RAY_TEMP_PREFIX, TOKEN_FILE, private_ray_env, write_token
from pipelines.core.service import Service

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


class LocalRayCluster(Service):
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


def _run_starter(cmd: list[str], env: Mapping[str, str], what: str) -> None:
    """Run a command that starts daemons and returns (`ray start`), in a session of its own so that the daemons
    outlive a Ctrl-C in the caller's terminal; its output is shown only when it fails."""
    done = subprocess.run(cmd, env=dict(env), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300, start_new_session=True)
    if done.returncode != 0:
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"starting {what} failed (exit {done.returncode}): {tail}")
