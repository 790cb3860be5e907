"""pipelines/core/quiet.py in one process: the library lines go, ours stay, and LATENTFORGE_LIBRARY_LOGS=1 brings
them back; then what a job's Ray workers get from it, on the session's local Ray. (A whole training run's log,
with a second Ray on the machine: tests/test_train_unet.py, ref.)"""

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from model.encoders import build_text_encoder
from pipelines.core import quiet

HOOK = "pipelines.core.quiet.setup_ray_worker"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def process_logging(monkeypatch):
    """The logging and warnings state quiet_libraries changes, as in a new process (an earlier test may have
    run a job's setup_logging in this one), restored after the test."""
    root = logging.getLogger()
    loggers = [root, *(logging.getLogger(name) for name in quiet.LOGGER_LEVELS)]
    filters = {logger: list(logger.filters) for logger in loggers}
    for logger in loggers:
        logger.filters[:] = [f for f in logger.filters
                             if not isinstance(f, (quiet._LibrarySourceFilter, quiet._MinimumLevel))]
    monkeypatch.delenv(quiet.LIBRARY_LOGS_ENV, raising=False)
    monkeypatch.delenv(quiet.SUBMITTED_JOB_ENV, raising=False)
    monkeypatch.delenv(quiet.RAY_ADDRESS_ENV, raising=False)
    for name in quiet.ENV_DEFAULTS:
        monkeypatch.setenv(name, "as the user set it")  # restored by monkeypatch, whatever quiet does
    with warnings.catch_warnings():
        yield
    for logger, kept in filters.items():
        logger.filters[:] = kept


def open_clip_lines(caplog) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        build_text_encoder("tiny", seed=0)  # open_clip logs its model and tokenizer set-up on the root logger
        logging.getLogger("latentforge.test").info("ours")
    return [r.getMessage() for r in caplog.records]


def test_library_lines_are_dropped_where_they_are_made_and_ours_kept(process_logging, caplog):
    assert any("No pretrained weights loaded" in m for m in open_clip_lines(caplog))  # what users saw
    quiet.quiet_libraries()
    quiet.quiet_libraries()  # once more, as a Ray Train worker does: one filter still
    assert open_clip_lines(caplog) == ["ours"]
    assert sum(isinstance(f, quiet._LibrarySourceFilter) for f in logging.getLogger().filters) == 1
    cpp_extension = logging.getLogger("torch.utils.cpp_extension")
    cpp_extension.setLevel(logging.NOTSET)  # what Ray Train's dictConfig does to the ray.train.* loggers
    caplog.clear()
    with caplog.at_level(logging.INFO):
        cpp_extension.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
        cpp_extension.error("a build failed")
    assert [r.getMessage() for r in caplog.records] == ["a build failed"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("another FutureWarning", FutureWarning)
    assert [str(w.message) for w in caught] == ["another FutureWarning"]
    assert all(os.environ[name] == "as the user set it" for name in quiet.ENV_DEFAULTS)


def test_library_logs_env_keeps_every_library_line(process_logging, caplog, monkeypatch, capsys):
    monkeypatch.setenv(quiet.LIBRARY_LOGS_ENV, "1")
    quiet.quiet_libraries()
    assert any("No pretrained weights loaded" in m for m in open_clip_lines(caplog))
    assert quiet.ray_runtime_env() == {"worker_process_setup_hook": HOOK,  # whose quiet_libraries then does nothing
                                       "env_vars": {quiet.LIBRARY_LOGS_ENV: "1"}}  # handed on to the workers
    monkeypatch.setenv(quiet.SUBMITTED_JOB_ENV, '{"runtime_env": {"env_vars": {"LATENTFORGE_LIBRARY_LOGS": "1"}}}')
    assert quiet.ray_runtime_env() == {"worker_process_setup_hook": HOOK}  # the submitted job's hands it on
    with quiet.library_prints():
        print("DeepSpeed op built successfully")
    assert "built successfully" in capsys.readouterr().out


def test_ray_workers_run_the_setup_hook_and_prints_are_swallowed(process_logging, capsys):
    assert quiet.ray_runtime_env() == {"worker_process_setup_hook": HOOK}
    with quiet.library_prints():
        print("DeepSpeed op built successfully")
    assert capsys.readouterr().out == ""


def test_a_submitted_jobs_own_setup_hook_is_kept_and_ours_left_out(process_logging, monkeypatch, caplog):
    """Ray runs one worker_process_setup_hook and refuses a driver's runtime_env that sets a field the submitted
    job's sets too: the job's own is kept, with a line saying its workers' library lines stay."""
    monkeypatch.setenv(quiet.RAY_ADDRESS_ENV, "127.0.0.1:6379")  # what Ray's job supervisor sets in the driver
    monkeypatch.setenv(quiet.SUBMITTED_JOB_ENV, json.dumps({"runtime_env": {quiet.SETUP_HOOK: "mine.setup"}}))
    with caplog.at_level(logging.WARNING, logger="latentforge.logs"):
        assert quiet.ray_runtime_env() == {"env_vars": {quiet.RAY_ADDRESS_ENV: "127.0.0.1:6379"}}
    assert "worker_process_setup_hook of its own (mine.setup)" in caplog.text and "not quieted" in caplog.text
    their_env = {"worker_process_setup_hook": "mine.setup", "env_vars": {quiet.RAY_ADDRESS_ENV: "127.0.0.1:6379"}}
    monkeypatch.setenv(quiet.SUBMITTED_JOB_ENV, json.dumps({"runtime_env": their_env}))
    assert quiet.ray_runtime_env() == {}  # their RAY_ADDRESS stands


# ------------------------------------------------------------------------------ a job's Ray workers

def test_every_ray_worker_knows_its_own_cluster(ray_local):
    """RAY_ADDRESS in a worker of the job = the cluster it is in (pin_ray_address): what Ray's State API
    reads, in Ray Train's placement group cleaner too, rather than guessing among the Rays on the machine."""
    address = ray_local.get(ray_local.remote(lambda: os.environ.get(quiet.RAY_ADDRESS_ENV)).remote())
    assert address == ray_local.get_runtime_context().gcs_address


# A submitted job's driver (the variables Ray's job supervisor sets: its runtime_env, RAY_ADDRESS) joins the
# session's Ray through the job's runtime.init_ray; a task reports what its worker process got.
SUBMITTED_DRIVER = """
import json, ray
from pipelines.core.runtime import init_ray, setup_logging

@ray.remote(num_cpus=0)
def worker_state():
    import gc, logging, os
    from pipelines.core import quiet
    return {"gc_enabled": gc.isenabled(), "address": os.environ.get("RAY_ADDRESS"),
            "quieted": any(isinstance(f, quiet._LibrarySourceFilter) for f in logging.getLogger().filters)}

setup_logging()
init_ray()
print("WORKER " + json.dumps(ray.get(worker_state.remote())))
"""


def test_a_job_submitted_with_its_own_setup_hook_runs_it_on_its_workers(ray_local):
    """Ray accepts the driver's runtime_env (it refused ours beside the job's hook), the job's hook runs on its
    workers and ours does not, and the workers still get the cluster's address."""
    address = ray_local.get_runtime_context().gcs_address
    runtime_env = {"worker_process_setup_hook": "gc.disable"}  # a hook whose effect a task can see
    env = {**os.environ, quiet.RAY_ADDRESS_ENV: address, quiet.SUBMITTED_JOB_ENV: json.dumps(
        {"runtime_env": runtime_env})}
    env.pop(quiet.LIBRARY_LOGS_ENV, None)
    proc = subprocess.run([sys.executable, "-c", SUBMITTED_DRIVER], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worker = json.loads(proc.stdout.split("WORKER ", 1)[1])
    assert worker == {"gc_enabled": False, "address": address, "quieted": False}
    assert "worker_process_setup_hook of its own (gc.disable)" in proc.stderr
