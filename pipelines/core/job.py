"""The one contract every job follows: jobs/<name>.py declares its Stage and calls run_job.

    STAGE = Stage("filter", FilterConfig, run=run_filter, report_path=report_path, check=check_inputs)  # the stage
    sys.exit(run_job(STAGE, __doc__))                                                                    # jobs/

run_job, in order:
1. parses --config / --set (and the stage's shorthand flags) into the stage's typed config;
2. check(cfg): everything that needs no cluster (values, paths, an existing output made from another
   config). A ConfigError, here or later, ends the job with exit status 2 and one line naming the key or file;
3. joins the Ray cluster in RAY_ADDRESS (as under `ray job submit`) or starts an embedded one, for stages
   that use Ray; on a cluster of more than one node, a config whose MLflow store is a local file (the
   default sqlite:///<cwd>/mlflow.db when MLFLOW_TRACKING_URI is unset) is a ConfigError
   (tracking.check_store_is_shared);
4. run(cfg) -> StageReport. Any other exception marks the report failed, with the traceback in the log;
   a stage with `upstream_reports` (the data stages, which have no MLflow run of their own) logs the report
   as an MLflow run (tracking.log_stage_report), linked to the runs of the reports it names;
5. writes the report to report_path(cfg) and logs a one-line summary. Exit status 0: done; 1: the stage
   failed (its report says why).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

from pipelines.core.config import ConfigError, parse_job_args
from pipelines.core.runtime import EXIT_BAD_INPUT, StageReport, alive_ray_nodes, finish, init_ray, setup_logging
from pipelines.core.tracking import MLflowSettings, check_store_is_shared, log_stage_report

log = logging.getLogger("latentforge")

C = TypeVar("C")

def _no_check(cfg: C) -> C:
    return cfg


def _mlflow_section(cfg: object) -> MLflowSettings | None:
    """The config's `mlflow` section, the one place every stage keeps its MLflow settings."""
    settings = getattr(cfg, "mlflow", None)
    return settings if isinstance(settings, MLflowSettings) else None


@dataclass(frozen=True)
class Stage(Generic[C]):
    name: str
    config: type[C]
    run: Callable[[C], StageReport]
    report_path: Callable[[C], str]
    # Checks before Ray starts; returns the config to run (e.g. with paths made absolute), raises ConfigError.
    check: Callable[[C], C] = _no_check
    # Whether run_job starts or joins Ray, and how many CPUs an embedded Ray gets (None: all).
    uses_ray: bool = True
    ray_cpus: Callable[[C], int | None] = lambda cfg: None
    # Where the config keeps its MLflow settings (None: it logs nothing), checked once Ray is up.
    tracking: Callable[[C], MLflowSettings | None] = _mlflow_section
    # Flags that stand for --set KEY=VALUE (flag name -> help), e.g. sample_eval's --model.
    shorthands: dict[str, str] = field(default_factory=dict)
    # Set: the report is logged as an MLflow run, linked to the runs of these upstream reports (an empty tuple:
    # none). None: the stage logs runs of its own (training, evaluation).
    upstream_reports: Callable[[C], tuple[str, ...]] | None = None


def run_job(stage: Stage[C], description: str, argv: list[str] | None = None) -> int:
    """A job's whole life: parse its command line (`description` is its --help), then run_stage."""
    setup_logging()
    return run_stage(stage, _parse(stage, description, sys.argv[1:] if argv is None else argv))


def run_stage(stage: Stage[C], cfg: C) -> int:
    """Check, start or join Ray, run, write the report; returns the exit status (0 done / 1 failed / 2 bad input)."""
    try:
        cfg = stage.check(cfg)
        if stage.uses_ray:
            init_ray(stage.ray_cpus(cfg))
            if (settings := stage.tracking(cfg)) is not None:
                check_store_is_shared(settings, alive_ray_nodes())
        report = stage.run(cfg)
    except ConfigError as err:
        log.error("%s: bad config or input: %s", stage.name, _one_line(err))
        return EXIT_BAD_INPUT
    except Exception as err:  # noqa: BLE001 - the report must say why; the traceback helps whoever debugs
        log.exception("%s failed", stage.name)
        report = StageReport(stage.name)
        report.fail(f"{type(err).__name__}: {_one_line(err)}")
    if stage.upstream_reports is not None and (settings := stage.tracking(cfg)) is not None and settings.enabled:
        log_stage_report(settings, report, stage.report_path(cfg), stage.upstream_reports(cfg))
    return finish(report, stage.report_path(cfg))


def _parse(stage: Stage[C], description: str, argv: list[str]) -> C:
    """--config/--set, with each shorthand flag turned into a --set given last (so the flag wins)."""
    def add_shorthands(parser: argparse.ArgumentParser) -> None:
        for name, help_text in stage.shorthands.items():
            parser.add_argument(f"--{name}", help=f"{help_text} (same as --set {name}=...)")

    shorthand = argparse.ArgumentParser(add_help=False)
    add_shorthands(shorthand)
    known, _ = shorthand.parse_known_args(argv)
    extra = [a for k, v in vars(known).items() if v is not None for a in ("--set", f"{k}={v}")]
    cfg, _ = parse_job_args(stage.config, description, argv + extra, extra=add_shorthands)
    return cfg


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if len(lines) == 1 else " ".join(line.strip() for line in lines)
