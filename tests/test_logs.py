"""pipelines/core/quiet.py in one process, no Ray: the library lines go, ours stay, and
LATENTFORGE_LIBRARY_LOGS=1 brings them back. (A whole training run's log: tests/test_train_unet.py, ref.)"""

import logging
import os
import warnings

import pytest

from model.encoders import build_text_encoder
from pipelines.core import quiet


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
    assert quiet.ray_runtime_env() == {"env_vars": {quiet.LIBRARY_LOGS_ENV: "1"}}  # handed on to the workers
    monkeypatch.setenv(quiet.SUBMITTED_JOB_ENV, '{"runtime_env": {"env_vars": {"LATENTFORGE_LIBRARY_LOGS": "1"}}}')
    assert quiet.ray_runtime_env() == {}  # the submitted job's runtime_env hands it on
    with quiet.library_prints():
        print("DeepSpeed op built successfully")
    assert "built successfully" in capsys.readouterr().out


def test_ray_workers_run_the_setup_hook_and_prints_are_swallowed(process_logging, capsys):
    assert quiet.ray_runtime_env() == {"worker_process_setup_hook": "pipelines.core.quiet.quiet_libraries"}
    with quiet.library_prints():
        print("DeepSpeed op built successfully")
    assert capsys.readouterr().out == ""
