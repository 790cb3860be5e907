"""The process helpers the local cluster's parts share: a free port, waiting for a server to answer, starting a
server in a session of its own, and finding (by pid and start time, or by the dir a process uses) and ending
process trees."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from typing import Any, Mapping

from pipelines.core.local_ray import free_port, uses_path

__all__ = ["free_port", "wait_for_http"]


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
