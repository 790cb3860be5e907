"""The library log lines a user cannot act on, and where they are turned off: in the process that makes them.

    quiet_libraries()                       # a job's driver (runtime.setup_logging) and a Ray Train worker's loop
    ray.init(runtime_env=ray_runtime_env()) # every Ray worker process of the job runs quiet_libraries at start

Every process of a job runs quiet_libraries once at setup: the driver through setup_logging, every Ray worker
(Ray Data tasks and actors, Ray Train's controller, workers and their helper actors) through the job's
`worker_process_setup_hook`, and a Ray Train worker once more at the top of its loop, for the loggers of
modules it had not imported when the hook ran (FILE_NAMED_LOGGERS).

LATENTFORGE_LIBRARY_LOGS=1 in the driver's environment (`LATENTFORGE_LIBRARY_LOGS=1 python jobs/train_unet.py ...`)
leaves every library at its own levels, in the driver and, through the job's runtime_env, in every worker.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from typing import Any, Iterator

LIBRARY_LOGS_ENV = "LATENTFORGE_LIBRARY_LOGS"
# Set by Ray in the driver of a job submitted with `ray job submit`: the job's runtime_env, as JSON.
SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

# Module loggers (the exact name: a logger's filter does not see its children's records) -> the lowest level
# still shown, each with the lines it would print otherwise. Applied as a filter on the logger, not its level:
# Ray Train's logging set-up of its controller and workers (logging.config.dictConfig) resets the level of
# every `ray.train.*` logger, but keeps their filters.
LOGGER_LEVELS = {
    # "Failed to query Ray Train Controller actor state ..." every second or two for the whole run: the helper
    # actor that guards the run's placement group asks Ray's State API, which a head without a dashboard
    # (ours: embedded, `make demo`, `make cluster-up`) does not serve.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    # "Checkpoint successfully created at: ...", per rank and checkpoint: the training log says "checkpoint of
    # step N saved" itself.
    "ray.train.v2._internal.execution.storage": logging.WARNING,
    # "Failed to send resource request for train-... it's safe to ignore this error" with a traceback, when a
    # busy machine keeps Ray's autoscaling coordinator from answering within 5 s (a fixed-size run needs no
    # autoscaling).
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client": logging.ERROR,
    # "No CUDA runtime is found, using CUDA_HOME=..." on CPU workers, "Loading extension module ..." each
    # time DeepSpeed loads an op `make install` built.
    "torch.utils.cpp_extension": logging.ERROR,
    # "Skip logging GPU metrics", "Started / Stopping / Successfully terminated ... monitoring", each run.
    "mlflow.system_metrics.system_metrics_monitor": logging.WARNING,
}

# Modules whose logger is named after their file path (logging.getLogger(__file__)), silenced in a process that
# has imported them.
FILE_NAMED_LOGGERS = {
    # "Reporting training result N: TrainingReport(checkpoint=..., metrics={...})" per rank and checkpoint.
    "ray.train.v2._internal.execution.context": logging.WARNING,
}

# Packages that log on the root logger (`logging.info(...)`) or print (a Ray Train worker turns print() into a
# root-logger INFO record): such records below the level given are dropped where the root logger makes them.
ROOT_LOGGER_SOURCES = {
    # open_clip: "Parsing model identifier ...", "Instantiating model architecture", "No pretrained weights
    # loaded ... Model initialized randomly" (by design: the tower is built empty, its weights loaded after)
    # and six more, for every model and tokenizer made, in every actor and worker.
    "open_clip": logging.ERROR,
    # DeepSpeed's print "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" (library_prints).
    "deepspeed": logging.WARNING,
}

# Environment settings libraries read when they run, set unless the environment already has them.
ENV_DEFAULTS = {
    # MLflow's tqdm bar for artifact up/downloads (registering a model downloads it): carriage-return
    # redraws that make one long line in a log file.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}

# (category, message regex) of Python warnings raised inside libraries, about their own calls.
WARNINGS = (
    # DeepSpeed's ZeRO calls this torch.distributed function; torch warns at every call site it meets.
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
)


def library_logs_wanted() -> bool:
    return os.environ.get(LIBRARY_LOGS_ENV) == "1"


class _LibrarySourceFilter(logging.Filter):
    """Drops a record the root logger made from a file of a ROOT_LOGGER_SOURCES package, below its level."""

    def __init__(self) -> None:
        super().__init__()
        self.levels = [(f"{os.sep}{name}{os.sep}", level) for name, level in ROOT_LOGGER_SOURCES.items()]

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname or ""
        return not any(part in path and record.levelno < level for part, level in self.levels)


class _MinimumLevel(logging.Filter):
    """Drops the records of the logger it is on below `level`."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def _at_least(logger: logging.Logger, level: int) -> None:
    if not any(isinstance(f, _MinimumLevel) for f in logger.filters):
        logger.addFilter(_MinimumLevel(level))


def quiet_libraries() -> None:
    """Silences the sources above in this process (nothing when LATENTFORGE_LIBRARY_LOGS=1); safe to call again."""
    if library_logs_wanted():
        return
    for name, level in LOGGER_LEVELS.items():
        _at_least(logging.getLogger(name), level)
    for module, level in FILE_NAMED_LOGGERS.items():
        if module in sys.modules:
            _at_least(logging.getLogger(sys.modules[module].__file__), level)
    root = logging.getLogger()
    if not any(isinstance(f, _LibrarySourceFilter) for f in root.filters):
        root.addFilter(_LibrarySourceFilter())
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def library_prints() -> Iterator[None]:
    """What libraries print() to stdout inside the block goes nowhere (unless LATENTFORGE_LIBRARY_LOGS=1), for
    calls that print rather than log: DeepSpeed's engine set-up prints "DeepSpeed ... built successfully" once
    per process. Inside a Ray Train worker a print reaches the log twice, as it is and as a root-logger record
    (ROOT_LOGGER_SOURCES drops that one)."""
    if library_logs_wanted():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def ray_runtime_env() -> dict[str, Any]:
    """What a job's ray.init adds to its runtime_env: quiet_libraries as every worker process's setup hook, or
    LATENTFORGE_LIBRARY_LOGS=1 handed on to the workers when the driver has it."""
    if library_logs_wanted():
        # A job submitted with it in its runtime_env has it on every worker already, and Ray refuses a
        # driver's runtime_env that sets a variable the submitted job's sets too.
        return {} if SUBMITTED_JOB_ENV in os.environ else {"env_vars": {LIBRARY_LOGS_ENV: "1"}}
    return {"worker_process_setup_hook": f"{__name__}.{quiet_libraries.__name__}"}
