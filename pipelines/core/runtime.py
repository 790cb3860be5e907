"""What every stage shares at run time: starting Ray and writing reports (files: pipelines/core/storage.py)."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.core import quiet, storage
from pipelines.core.config import ConfigError

log = logging.getLogger("latentforge")

# The repository (or installed tree) root: model/, pipelines/, jobs/, infra/ below it.
REPO_ROOT = Path(__file__).resolve().parents[2]
# A job's exit status: done; the stage failed (its report says why); bad config or input (one line, nothing done).
EXIT_DONE, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
# The VAE training stage's report, inside the VAE folder it exports (and written over that copy as the stage
# report). Here because precompute, given that folder as its VAE, names the report as an upstream of its run, and
# pipelines/data does not import pipelines/vae.
VAE_REPORT_FILE = "train_vae_report.json"


class RedactingFilter(logging.Filter):
    """Credentials inside URIs (storage.redact) out of a record's message and traceback, once it is formatted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is the handler's to report, as without the filter
            return True
        redacted = storage.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = storage.redact(record.exc_text)
        return True


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines to stderr, with credentials inside URIs redacted in every record, ours and libraries', and the
    library lines a user cannot act on silenced (pipelines/core/quiet.py).

    The redaction runs where records are made (a record factory), not in a handler's filter: MLflow and Ray
    log through handlers of their own that do not propagate to the root logger, added when they are imported."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "redacting", False):
        redacting = RedactingFilter()

        def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = factory(*args, **kwargs)
            redacting.filter(record)
            return record

        make_record.redacting = True
        logging.setLogRecordFactory(make_record)
    quiet.quiet_libraries()


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`) or start an embedded local Ray.

    num_cpus only applies to the embedded one. Worker threads are pinned to one OpenMP thread per
    task in the embedded case: several torch processes on a small machine otherwise oversubscribe.
    Every worker process of the job silences the library lines of pipelines/core/quiet.py at its start.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, runtime_env=quiet.ray_runtime_env())  # merged with a submitted job's own
        log.info("joined Ray cluster at %s", os.environ["RAY_ADDRESS"])
        return
    runtime_env = quiet.ray_runtime_env()
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, runtime_env=runtime_env)
    log.info("started an embedded local Ray (RAY_ADDRESS is unset): %s", ray.cluster_resources())


def alive_ray_nodes() -> int:
    """How many nodes the Ray cluster this process joined has now (after init_ray)."""
    import ray

    return sum(1 for node in ray.nodes() if node["Alive"])


@dataclass
class StageReport:
    """Counts in / out / dropped per reason; written as JSON next to the stage's output."""

    stage: str
    rows_in: int = 0
    rows_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    ok: bool = True
    error: str | None = None
    started_at: float = field(default_factory=time.time)

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count

    def fail(self, message: str) -> None:
        self.ok, self.error = False, message

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "ok": self.ok, "error": self.error,
            "rows_in": self.rows_in, "rows_out": self.rows_out,
            "dropped": dict(sorted(self.dropped.items())), "dropped_total": sum(self.dropped.values()),
            "seconds": round(time.time() - self.started_at, 3), **self.details,
        }

    def write(self, location: str | os.PathLike) -> None:
        """Committed atomically, to a local path or a URI (see storage), with credentials inside URIs redacted."""
        storage.write_json(location, storage.redact_values(self.to_dict()))


def upstream_report(input_dir: str, report_file: str, producer: str, job: str) -> dict[str, Any]:
    """The report of the stage that made `input_dir`, which must say ok: its report is its verdict (a
    failed or unfinished stage's output is not input). Raises ConfigError (one line, exit 2) otherwise."""
    location = storage.join(input_dir, report_file)
    try:
        report = storage.read_json(location)
    except FileNotFoundError:
        raise ConfigError(f"{location} not found: {input_dir} is not a finished {producer} output (run or rerun "
                          f"{job} into it: a rerun resumes and writes the report)") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{location} is unreadable ({err}): rerun {job}") from None
    if not isinstance(report, dict) or report.get("ok") is not True:
        error = report.get("error") if isinstance(report, dict) else None
        raise ConfigError(f"{location} says the {producer} failed ({error or 'no reason given'}): "
                          f"fix that and rerun {job} before this stage")
    return report


def finish(report: StageReport, path: str | os.PathLike) -> int:
    """Write the report, log a one-line summary, and return the job's exit status."""
    report.write(path)
    summary = f"{report.stage}: {report.rows_in} in, {report.rows_out} out, dropped {report.dropped or 0}"
    if report.ok:
        log.info("%s; report: %s", summary, path)
        return EXIT_DONE
    log.error("%s; FAILED: %s; report: %s", summary, report.error, path)
    return EXIT_FAILED
