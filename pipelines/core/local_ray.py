"""A private Ray head on this machine: authenticated with a token of its own, reachable on 127.0.0.1 only.

    with LocalRayHead(num_cpus=2) as head:
        subprocess.run([...], env=head.client_env(os.environ))  # a driver that joins it

What the demo and the tests run on. Everything the head owns lives in one private temp dir (mode 0700): the
head's token and Ray's temp dir (which Ray makes world-writable, so it sits one level down), and stopping the
head removes it all. A user's own Ray setup
(`~/.ray/auth_token`, `RAY_AUTH_TOKEN`, a running cluster) is neither needed, read nor changed.

How Ray 2.60 is made to do that, all through the environment of `ray start` and of every driver:
- RAY_AUTH_MODE=token with RAY_AUTH_TOKEN_PATH=<the head's token file>: the head rejects any client without
  that token. RAY_AUTH_TOKEN (a token in the environment) takes precedence over the path, so it is removed.
- RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray's single-machine mode (the default on macOS and Windows). The node
  then advertises 127.0.0.1 and every server of the head (GCS, raylet, agents, client server) binds 127.0.0.1
  instead of all interfaces; no other machine can join it, which is what a private head wants.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

from pipelines.core.service import Service

# Where the heads' temp dirs go: short, because Ray's socket paths under it are limited in length.
RAY_TEMP_PARENT = "/tmp"
RAY_TEMP_PREFIX = "lfray-"
TOKEN_FILE = "auth_token"
# Ray reads this one as "may other machines join?"; "0" keeps every server of the node on 127.0.0.1.
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Set by the caller's shell, these would point a driver at another cluster or another token.
FOREIGN_RAY_VARS = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")


def write_token(directory: str | os.PathLike) -> str:
    """A new random token in `directory`/auth_token, readable by this user only; returns its path."""
    path = os.path.join(directory, TOKEN_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never over an existing file
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def private_ray_env(base: Mapping[str, str], token_path: str, address: str | None = None) -> dict[str, str]:
    """`base` (an environment) changed so that a Ray process started with it uses only `token_path`, stays on
    127.0.0.1, and joins `address` (None: starts or finds its own)."""
    env = {k: v for k, v in base.items() if k not in FOREIGN_RAY_VARS}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path, **LOOPBACK_ONLY})
    if address is not None:
        env["RAY_ADDRESS"] = address
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayHead(Service):
    """`ray start --head` in a private temp dir, with a token of its own; stop() ends only this head's
    processes and removes the dir (token included)."""

    def __init__(self, num_cpus: int, object_store_bytes: int | None = None) -> None:
        """object_store_bytes: the shared-memory object store's size (None: Ray's default share of the memory)."""
        self.temp_dir = tempfile.mkdtemp(prefix=RAY_TEMP_PREFIX, dir=RAY_TEMP_PARENT)  # mode 0700
        self.token_path = os.path.join(self.temp_dir, TOKEN_FILE)
        self.ray_dir = os.path.join(self.temp_dir, "ray")  # Ray's --temp-dir; Ray opens it to every user
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.num_cpus = num_cpus
        self.object_store_bytes = object_store_bytes

    def client_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The environment for a driver (a job, `ray status`, ...) that joins this head."""
        return private_ray_env(base, self.token_path, self.address)

    def start(self, base_env: Mapping[str, str] | None = None) -> None:
        write_token(self.temp_dir)
        # The client server's port is chosen too: Ray's default (10001) would clash with any other Ray here.
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={self.port}",
               f"--ray-client-server-port={free_port()}", f"--num-cpus={self.num_cpus}",
               f"--temp-dir={self.ray_dir}", "--include-dashboard=false", "--disable-usage-stats"]
        if self.object_store_bytes is not None:
            cmd.append(f"--object-store-memory={self.object_store_bytes}")
        env = private_ray_env(os.environ if base_env is None else base_env, self.token_path)
        subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)

    def stop(self) -> None:
        import psutil

        ours = {p.pid: p for p in psutil.process_iter() if uses_path(p, self.temp_dir)}
        for proc in list(ours.values()):  # plus their children: workers rename themselves and may log nowhere
            try:
                ours.update({c.pid: c for c in proc.children(recursive=True)})
            except psutil.Error:
                pass
        ours.pop(os.getpid(), None)  # never the caller
        for proc in ours.values():
            _signal(proc, signal.SIGTERM)
        _, alive = psutil.wait_procs(list(ours.values()), timeout=15)
        for proc in alive:
            _signal(proc, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def uses_path(proc: Any, path: str) -> bool:
    """Whether a psutil.Process names `path` on its command line or holds a file under it open. Both are
    needed: Ray's dashboard and runtime-env agents rename themselves (ray::DashboardAgent) and show no
    temp dir on the command line, but keep their logs open in it."""
    try:
        return path in " ".join(proc.cmdline()) or any(f.path.startswith(path) for f in proc.open_files())
    except Exception:  # noqa: BLE001 - gone, a zombie, or not ours to inspect
        return False


def _signal(proc: Any, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except Exception:  # noqa: BLE001 - already gone
        pass
