"""The library log lines a user cannot act on, and where they are turned off: in the process that makes them.

    quiet_libraries()                       # a job's driver (runtime.setup_logging) and a Ray Train worker's loop
    ray.init(runtime_env=ray_runtime_env()) # every Ray worker process of the job runs setup_ray_worker at start
    with warnings_ignored(MLFLOW_LOG_MODEL_WARNINGS): mlflow.pyfunc.log_model(...)

Every process of a job runs quiet_libraries once at setup: the driver through setup_logging, every Ray worker
(Ray Data tasks and actors, Ray Train's controller, workers and their helper actors) through the job's
`worker_process_setup_hook` (setup_ray_worker, which also tells Ray's State API which cluster the worker is
in: pin_ray_address), and a Ray Train worker once more at the top of its loop, for the loggers of modules it
had not imported when the hook ran (FILE_NAMED_LOGGERS). A job submitted with a worker_process_setup_hook of
its own keeps it: Ray runs one per job, so its workers' library lines are not quieted (the driver says so).

LATENTFORGE_LIBRARY_LOGS=1 in the driver's environment (`LATENTFORGE_LIBRARY_LOGS=1 python jobs/train_unet.py ...`)
leaves every library at its own levels, in the driver and, through the job's runtime_env, in every worker.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import warnings
from typing import Any, Iterator

log = logging.getLogger("latentforge.logs")

LIBRARY_LOGS_ENV = "LATENTFORGE_LIBRARY_LOGS"
# Set by Ray in the driver of a job submitted with `ray job submit`: the job's runtime_env, as JSON.
SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Where Ray's State API (ray.util.state) and `ray` CLI commands look for the cluster first. Ray's job supervisor
# sets it in a submitted job's driver, to the cluster's GCS address.
RAY_ADDRESS_ENV = "RAY_ADDRESS"
SETUP_HOOK = "worker_process_setup_hook"

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

# (category, message regex) of the warnings mlflow.pyfunc.log_model raises about our call that no argument avoids,
# ignored around that call only (pipelines/inference/mlflow_model.py). MLflow colours them: an ANSI code first.
MLFLOW_LOG_MODEL_WARNINGS = (
    # "An input example was not provided": on purpose. The signature says what goes in and out; with an
    # input_example MLflow 3's log_model loads the logged model and predicts on the example to validate it
    # (mlflow/models/model.py, _validate_serving_input), i.e. builds the U-Net and encoders and runs the sampler
    # on the driver at logging time, and pyfunc.log_model has no argument to skip that.
    (UserWarning, r"(\x1b\[[\d;]*m)?An input example was not provided"),
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


@contextlib.contextmanager
def warnings_ignored(filters: tuple[tuple[type[Warning], str], ...]) -> Iterator[None]:
    """The warnings `filters` match are ignored inside the block (unless LATENTFORGE_LIBRARY_LOGS=1); the
    process's warning filters are as they were after it."""
    with warnings.catch_warnings():
        if not library_logs_wanted():
            for category, message in filters:
                warnings.filterwarnings("ignore", message=message, category=category)
        yield


def pin_ray_address() -> None:
    """RAY_ADDRESS (unless set) = the GCS address of the cluster this Ray worker process belongs to.

    Ray's State API called without an address does not ask the cluster the process is connected to: it takes
    RAY_ADDRESS, else the cluster the last `ray start` of the default temp dir recorded, else the one Ray
    running on the machine, and raises "Found multiple active Ray instances" when there are more. Ray Train's
    placement group cleaner (a detached actor of every run) calls it every second: with a second Ray on the
    machine (tests, another cluster) its thread died on that traceback, or watched another cluster's actors."""
    import ray

    os.environ.setdefault(RAY_ADDRESS_ENV, ray.get_runtime_context().gcs_address)


def setup_ray_worker() -> None:
    """Every Ray worker process of a job runs this at its start (ray_runtime_env's worker_process_setup_hook)."""
    pin_ray_address()
    quiet_libraries()


def submitted_runtime_env() -> dict[str, Any]:
    """The runtime_env a job was submitted with (`ray job submit --runtime-env ...`); {} for a job run as a
    plain script."""
    return json.loads(os.environ.get(SUBMITTED_JOB_ENV) or "{}").get("runtime_env") or {}


def ray_runtime_env() -> dict[str, Any]:
    """What a job's ray.init adds to its runtime_env: setup_ray_worker as every worker process's setup hook, and
    LATENTFORGE_LIBRARY_LOGS=1 handed on to the workers when the driver has it. Ray merges it with a submitted
    job's runtime_env and refuses a field or variable both set: the submitted job's own setup hook (Ray runs
    one) is kept instead of ours, and the driver's RAY_ADDRESS handed on to the workers in its place."""
    submitted = submitted_runtime_env()
    theirs = submitted.get("env_vars") or {}
    env_vars = {LIBRARY_LOGS_ENV: "1"} if library_logs_wanted() and LIBRARY_LOGS_ENV not in theirs else {}
    runtime_env: dict[str, Any] = {}
    if SETUP_HOOK not in submitted:
        runtime_env[SETUP_HOOK] = f"{__name__}.{setup_ray_worker.__name__}"
    else:
        if not library_logs_wanted():
            log.warning("the job's runtime_env has a worker_process_setup_hook of its own (%s), and Ray runs one: "
                        "the Ray workers' library log lines are not quieted (pipelines/core/quiet.py)",
                        submitted[SETUP_HOOK])
        if os.environ.get(RAY_ADDRESS_ENV) and RAY_ADDRESS_ENV not in theirs:
            env_vars[RAY_ADDRESS_ENV] = os.environ[RAY_ADDRESS_ENV]  # the GCS address, set by Ray's job supervisor
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return runtime_env
