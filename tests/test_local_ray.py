"""The private Ray head the demo runs on (pipelines/core/local_ray.py), checked through Ray itself: real `ray start`,
real drivers in subprocesses, a HOME that holds a token of the user's own."""

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from pipelines.core.local_ray import LocalRayHead, uses_path

pytestmark = pytest.mark.slow

# A driver: joins RAY_ADDRESS, runs one task, prints what the cluster advertises.
DRIVER = """
import json, ray
ray.init()
print("CONNECTED", json.dumps({"task": ray.get(ray.remote(lambda: 41 + 1).remote()),
                               "node_ips": sorted(n["NodeManagerAddress"] for n in ray.nodes())}))
"""
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def test_head_admits_its_own_token_only_listens_on_loopback_and_leaves_home_alone(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    users_token = home / ".ray" / "auth_token"
    users_token.write_text("a-token-of-the-users-own-cluster")
    users_token_before = users_token.stat().st_mtime_ns
    wrong_token = tmp_path / "wrong_token"
    wrong_token.write_text("0" * 64)
    base = {**os.environ, "HOME": str(home)}

    head = LocalRayHead(num_cpus=1)
    head.start(base)
    try:
        assert Path(head.token_path).stat().st_mode & 0o777 == 0o600
        assert Path(head.temp_dir).stat().st_mode & 0o777 == 0o700
        right = head.client_env(base)
        no_auth = {k: v for k, v in right.items() if not k.startswith("RAY_AUTH")}
        drivers = {
            "head's token": right,
            "wrong token": {**right, "RAY_AUTH_TOKEN_PATH": str(wrong_token)},
            "user's ~/.ray token": {k: v for k, v in right.items() if k != "RAY_AUTH_TOKEN_PATH"},
            "no token": {**no_auth, "HOME": str(tmp_path)},
        }
        outputs = _run_drivers(drivers)
        listening = _listening_addresses(head.temp_dir)
    finally:
        head.stop()

    code, out = outputs["head's token"]
    assert code == 0, out
    connected = json.loads(out.split("CONNECTED", 1)[1])
    assert connected == {"task": 42, "node_ips": ["127.0.0.1"]}, "the head advertises 127.0.0.1 only"
    for name in ("wrong token", "user's ~/.ray token", "no token"):
        code, out = outputs[name]
        assert code != 0 and "CONNECTED" not in out, f"a driver with {name} was let in:\n{out[-2000:]}"
        assert "Authentication token is missing or incorrect" in out, \
            f"{name}: another failure:\n{out[-2000:]}"
    assert listening and listening <= LOOPBACK, f"the head listens on {listening}"
    # the user's token was neither overwritten nor joined by another file; the head's token went with the head
    assert users_token.read_text() == "a-token-of-the-users-own-cluster"
    assert users_token.stat().st_mtime_ns == users_token_before
    assert sorted(p.name for p in home.rglob("*")) == [".ray", "auth_token"]
    assert not Path(head.token_path).exists() and not Path(head.temp_dir).exists()


def _run_drivers(envs: dict[str, dict[str, str]]) -> dict[str, tuple[int, str]]:
    """Run DRIVER once per environment, all at once (a refused driver retries for ~20 s before it gives up)."""
    procs = {name: subprocess.Popen([sys.executable, "-c", DRIVER], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for name, env in envs.items()}
    outputs = {}
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        outputs[name] = (proc.returncode, out)
    return outputs


def _listening_addresses(temp_dir: str) -> set[str]:
    """The local addresses that the head's processes listen on (TCP)."""
    pids = {p.pid for p in psutil.process_iter() if uses_path(p, temp_dir)}
    return {c.laddr.ip for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


def test_local_ray_head_stop_ends_every_process_of_that_head():
    head = LocalRayHead(num_cpus=1)
    head.start()
    try:
        started = [p for p in psutil.process_iter() if uses_path(p, head.temp_dir)]
        names = {p.name() for p in started}
        assert len(started) >= 3 and any("raylet" in n for n in names), names  # gcs, raylet, agents...
    finally:
        head.stop()
    # Every process seen using the head's temp dir must end, Ray's agents that rename themselves
    # (ray::DashboardAgent & co.) included. A bounded wait, not a check at one instant: a short-lived process
    # (a worker starting up) may still be exiting on its own.
    _, alive = psutil.wait_procs(started, timeout=10)
    assert [p for p in alive if _still_running(p)] == []
    left = [p for p in psutil.process_iter(["status"])
            if p.info["status"] != psutil.STATUS_ZOMBIE and uses_path(p, head.temp_dir)]
    assert left == []


def _still_running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ended between the wait and this look
        return False
