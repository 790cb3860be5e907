"""MLflow logging that never stops a training run.

    settings = MLflowSettings(experiment="t2i")
    tracker = Tracker.open(settings, run_name="sd2-base-256", tags={...})   # driver: find or create the run
    tracker.log_metrics({"loss": 0.1}, step=10)                           # any process, with tracker.run_id
    Tracker.attach(settings.resolved(), tracker.run_id, run_name="sd2-base-256").log_image(grid, "samples", step=100)

One MLflow run per training run: the run carries the tag `latentforge.run_name`, and a rerun with the
same name (a resume) finds it and continues it. A setting changed on a resume is logged as what it became
(params are immutable): param `<key>.at_step_<N>` with the new value, in the run's params table next to the
original, and tag `latentforge.changed.<key>` = "<old> -> <new> at step <N>", the latest change, searchable.

MLflow unreachable (a tracking server that is down, a full disk): the failed call logs ONE warning and calls are
held back for a cool-down (mlflow.retry_after_s, doubling up to 10 min); after it, the next call tries again.
Params, tags, small dicts and metrics are buffered meanwhile and sent, in order, when MLflow answers; images
and artifacts are skipped (counted in the last warning). A run that could not be created at the start is
created then: by the driver, or by the worker that logs (it gets the run's name, not an id). Training never
waits on MLflow for more than one short HTTP attempt (see MLflowSettings.http_*).

Whatever goes to MLflow (params, tags, dicts) has the credentials inside URIs redacted (storage.redact).

One experiment holds a pipeline's runs, linked: every run is tagged with its stage (JOB_TAG), and with
`latentforge.upstream.<stage>` = the run id of each stage whose output it read (upstream_links, from that
stage's report); an evaluation is nested under its training run. The experiment is tagged as one of model
training (EXPERIMENT_KIND_TAG): MLflow 3's UI otherwise opens it on its GenAI views. The data stages, which
have no run of their own, log their reports as runs (log_stage_report).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import time
import urllib.parse
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from pipelines.core import storage
from pipelines.core.config import ConfigError

if TYPE_CHECKING:
    from pipelines.core.runtime import StageReport

log = logging.getLogger("latentforge.tracking")

RUN_NAME_TAG = "latentforge.run_name"
JOB_TAG = "latentforge.job"  # the stage that made the run: download, filter, precompute, train_vae, train_unet, ...
UPSTREAM_TAG_PREFIX = "latentforge.upstream."  # + a stage's name: the run id of the run that made this one's input
REPORT_RUN_KEY = "mlflow_run_id"  # the key of a stage report that holds the stage's MLflow run id
# MLflow 3's UI opens an experiment on its GenAI views (traces, prompts) unless this tag says it holds training.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
CHANGED_TAG_PREFIX = "latentforge.changed."
_CHANGED_AT = ".at_step_"  # changed_param: <key>.at_step_<N> ('@' and ':' are not allowed in MLflow keys)
DEFAULT_TRACKING_FILE = "mlflow.db"
# MLflow metric and image keys may not contain '/'; logged names use '_' inside and '.' between groups.
_COOLDOWN_MAX_S = 600.0
# Calls kept while MLflow is unreachable (one per metrics batch): hours of training at a log line a second.
_BUFFER_MAX = 20_000
_PARAM_VALUE_MAX = 6000  # MLflow's limit
_BATCH_MAX = 100  # MLflow's log_batch limit per kind
# MLflow refusals that a retry cannot fix: the call is dropped, not buffered.
_PERMANENT_ERRORS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                               "BAD_REQUEST", "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED"})


@dataclass(frozen=True)
class MLflowSettings:
    """Where runs go. tracking_uri None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    (resolved once, in the driver, and passed to workers as a plain string)."""

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "latentforge"
    # Only used when the experiment is created. None: next to a local SQLite file (<dir>/mlartifacts),
    # or the server's default artifact store.
    artifact_location: str | None = None
    system_metrics: bool = True  # CPU/GPU/memory/network, sampled by MLflow's own monitor (rank 0)
    registered_model: str | None = None  # register the exported model under this name (None: don't)
    # One short attempt per call: a tracking server that is down must not stall training.
    http_retries: int = 1
    http_timeout_s: int = 10
    # After a failed call, MLflow calls wait this long (doubling, up to 10 min) before the next try; params,
    # tags and metrics are buffered meanwhile and sent when it answers.
    retry_after_s: float = 60.0

    def resolved(self) -> "MLflowSettings":
        """The same settings with tracking_uri and artifact_location made absolute (call in the driver)."""
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
            f"sqlite:///{Path.cwd() / DEFAULT_TRACKING_FILE}"
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
        artifacts = self.artifact_location
        if artifacts is None and uri.startswith("sqlite:///"):
            artifacts = str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts")
        elif artifacts is not None and not storage.is_uri(artifacts):
            artifacts = str(Path(artifacts).resolve())
        return replace(self, tracking_uri=uri, artifact_location=artifacts)


def apply_http_limits(settings: MLflowSettings) -> None:
    """settings.http_retries / http_timeout_s for this process's MLflow calls (MLflow's own default is 7
    retries with backoff, minutes before a call to a server that is down fails). MLflow reads these at request
    time; setdefault keeps a user's explicit choice. Call before the first MLflow request, Tracker or not."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.http_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(settings.http_timeout_s))


def is_file_store(tracking_uri: str) -> bool:
    """Whether a tracking URI is a file on the machine that opens it (sqlite:///..., file:..., a plain path),
    as opposed to a server or database every machine reaches at the same address ("databricks" has no scheme
    either, as in MLflow's own is_local_uri)."""
    return tracking_uri != "databricks" and urllib.parse.urlparse(tracking_uri).scheme in ("", "file", "sqlite")


def check_store_is_shared(settings: MLflowSettings, alive_nodes: int) -> None:
    """Refuse (ConfigError) a file tracking store for a job on a Ray cluster of more than one node.

    MLflow calls run where the workers are (training's rank 0 logs from a worker node), and a file there is
    a different file from the driver's: the run's metrics would land in a private SQLite file on one node, out
    of sight. A warning would scroll by in a long job's log, so the job stops before it starts. A file on
    storage that every node mounts is refused too: SQLite's locking over NFS is unreliable.
    """
    if not settings.enabled or alive_nodes <= 1:
        return
    uri = settings.resolved().tracking_uri
    if is_file_store(uri):
        raise ConfigError(f"mlflow: the tracking store {uri} is a file on one machine, but the Ray cluster has "
                          f"{alive_nodes} nodes: set MLFLOW_TRACKING_URI (or mlflow.tracking_uri) to the cluster's "
                          "tracking server, e.g. http://HEAD:5000, or set mlflow.enabled=false")


def changed_param(key: str, step: int) -> str:
    """The param that records `key`'s new value from `step` on (see the module docstring)."""
    return f"{key}{_CHANGED_AT}{step}"


def _current_value(params: dict[str, str], key: str) -> str:
    """A param's value now: its latest changed_param, else the value it was first logged with."""
    marker = re.compile(re.escape(key + _CHANGED_AT) + r"(\d+)$")
    changes = [(int(m.group(1)), v) for k, v in params.items() if (m := marker.match(k))]
    return max(changes)[1] if changes else params[key]


def _permanent(err: Exception) -> bool:
    return getattr(err, "error_code", None) in _PERMANENT_ERRORS


def _login_refused(err: Exception | None) -> bool:
    """MLflow's basic-auth server answered 401 (no or wrong login) or 403 (an account without permission)."""
    status = getattr(err, "get_http_status_code", None)
    return status is not None and status() in (401, 403)


# What happened to one call: sent, refused for good (dropped), or MLflow unreachable (kept, cool-down).
_SENT, _REFUSED, _UNREACHABLE = "sent", "refused", "unreachable"
# A call that can wait for MLflow: what it does (for the log) and the call itself, given the run id.
_Deferred = tuple[str, Callable[[str], Any]]


class Tracker:
    """Logging to one MLflow run; every method is a no-op when disabled or when the run is unknown.

    run_name: the run to find or create by name when MLflow answers, while run_id is None (MLflow was down
    when the driver opened it)."""

    def __init__(self, settings: MLflowSettings, run_id: str | None, run_name: str | None = None,
                 tags: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.run_id = run_id
        self.failures = 0
        self._pending = (run_name, dict(tags or {})) if run_id is None and run_name and settings.enabled else None
        self._buffer: collections.deque[_Deferred] = collections.deque()
        self._lost = 0  # calls dropped: images and artifacts while unreachable, a full buffer, refused calls
        self._unreachable = False  # a call failed since MLflow last answered
        self._last_error: Exception | None = None  # the latest failed call's error
        self._retry_at = 0.0
        self._cooldown = settings.retry_after_s
        self._client = None
        self._system_run = None
        if settings.enabled:
            apply_http_limits(settings)
            if settings.tracking_uri and storage.redact(settings.tracking_uri) != settings.tracking_uri:
                # MLflow prints each ended run's URL, tracking URI and its credentials included, to stdout.
                os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

    # ---- opening ------------------------------------------------------------------------------

    @classmethod
    def attach(cls, settings: MLflowSettings, run_id: str | None, run_name: str | None = None) -> "Tracker":
        """Log to an existing run (workers: run_id comes from the driver). With run_id None and a run_name,
        the run is found or created by that name once MLflow answers."""
        return cls(settings, run_id, run_name)

    @classmethod
    def open(cls, settings: MLflowSettings, run_name: str, tags: dict[str, str] | None = None) -> "Tracker":
        """Find the run tagged with `run_name` in the experiment (a resume) or create it; when MLflow does not
        answer, later calls do (see the module docstring)."""
        tracker = cls(settings.resolved(), None, run_name, tags)
        tracker._connect()
        if _login_refused(tracker._last_error):
            # Raised, not warned: a wrong Secret would otherwise leave a whole training run unlogged.
            raise ConfigError(f"MLflow at {storage.redact(str(tracker.settings.tracking_uri))} refused the login "
                              f"(HTTP {tracker._last_error.get_http_status_code()}): set MLFLOW_TRACKING_USERNAME and "
                              f"MLFLOW_TRACKING_PASSWORD to an account that may write to experiment "
                              f"{settings.experiment!r}")
        return tracker

    @classmethod
    def open_child(cls, settings: MLflowSettings, run_name: str, parent_run_id: str | None) -> "Tracker":
        """A new run (an evaluation), nested under parent_run_id when given, in the parent's experiment."""
        tracker = cls(settings.resolved(), None)
        if settings.enabled:
            tracker.run_id = tracker.call("open the run", tracker._create_child, run_name, parent_run_id)
        return tracker

    def _create_child(self, run_name: str, parent_run_id: str | None) -> str:
        tags = {RUN_NAME_TAG: run_name}
        parent = self._find_run(parent_run_id) if parent_run_id else None
        if parent_run_id and parent is None:
            # Typically a job under `ray job submit --working-dir .` without MLFLOW_TRACKING_URI: the default
            # sqlite file is then a fresh one in the job's copy of the repository.
            log.warning("MLflow: the training run %s is not in %s; logging to a new run instead. Point "
                        "MLFLOW_TRACKING_URI (or mlflow.tracking_uri) at the training's tracking store to nest "
                        "it there", parent_run_id, self.settings.tracking_uri)
        if parent is not None:
            experiment_id = parent.info.experiment_id
            tags["mlflow.parentRunId"] = parent_run_id
        else:
            experiment_id = self._experiment_id()
        run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        nested = f" under {parent_run_id}" if parent is not None else ""
        log.info("MLflow: run %s (%s)%s", run_name, run_id, nested)
        return run_id

    def _find_run(self, run_id: str) -> Any | None:
        """The run, or None when this store has no such run (other failures are Tracker.call's business)."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

        try:
            return self.client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
            return None

    def _experiment_id(self) -> str:
        """The experiment's id, created when missing; either way tagged as a training experiment (a kind a
        user chose in the UI is kept)."""
        experiment = self.client.get_experiment_by_name(self.settings.experiment)
        if experiment is None:
            return self.client.create_experiment(self.settings.experiment,
                                                 artifact_location=self.settings.artifact_location,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id

    def _run_named(self, experiment_id: str, run_name: str) -> Any | None:
        """The newest run tagged with run_name. MLflow's filter strings have no escape for quotes, so the filter
        is a LIKE pattern with each quote or backslash as the one-character wildcard, and the match is exact
        here (any name works: "it's", 'say "hi"')."""
        pattern = re.sub(r"['\"\\]", "_", run_name)
        runs = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` LIKE '{pattern}'",
                                       order_by=["attributes.start_time DESC"], max_results=1000)
        return next((r for r in runs if r.data.tags.get(RUN_NAME_TAG) == run_name), None)

    def _find_or_create(self, run_name: str, tags: dict[str, str]) -> str:
        client = self.client
        experiment_id = self._experiment_id()
        found = self._run_named(experiment_id, run_name)
        if found is not None:
            run_id = found.info.run_id
            log.info("MLflow: continuing run %s (%s) in experiment %r", run_name, run_id, self.settings.experiment)
            client.update_run(run_id, status="RUNNING")
        else:
            run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
            run_id = run.info.run_id
            log.info("MLflow: new run %s (%s) in experiment %r", run_name, run_id, self.settings.experiment)
        for key, value in tags.items():
            client.set_tag(run_id, key, storage.redact(str(value)))
        return run_id

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.settings.tracking_uri)
        return self._client

    @property
    def active(self) -> bool:
        """Whether calls log (now, or once MLflow answers)."""
        return self.settings.enabled and (self.run_id is not None or self._pending is not None)

    # ---- reaching MLflow ----------------------------------------------------------------------

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run fn unless in a cool-down; on error warn (once per cool-down) and return None."""
        if not self.settings.enabled or time.monotonic() < self._retry_at:
            return None
        return self._attempt(what, lambda: fn(*args, **kwargs))[1]

    def _attempt(self, what: str, fn: Callable[[], Any]) -> tuple[str, Any]:
        """(_SENT, fn()), or after one warning (_REFUSED, None) for an error a retry cannot fix, or
        (_UNREACHABLE, None) for any other, which starts a cool-down."""
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - any tracking failure must leave training running
            self.failures += 1
            self._last_error = err
            if _permanent(err):
                log.warning("MLflow at %s refused to %s (%s: %s); training goes on", self.settings.tracking_uri,
                            what, type(err).__name__, err)
                return _REFUSED, None
            self._unreachable = True
            self._retry_at = time.monotonic() + self._cooldown
            log.warning("MLflow at %s failed to %s (%s: %s); training goes on, MLflow calls wait %.0f s (params, "
                        "tags and metrics are kept until it answers)", self.settings.tracking_uri, what,
                        type(err).__name__, err, self._cooldown)
            self._cooldown = min(self._cooldown * 2, max(_COOLDOWN_MAX_S, self.settings.retry_after_s))
            return _UNREACHABLE, None
        self._cooldown = self.settings.retry_after_s
        return _SENT, result

    def _connect(self) -> bool:
        """Whether calls can go out now: outside a cool-down, with the run known (found or created now when
        it is pending) and every buffered call sent, in order."""
        if not self.active or time.monotonic() < self._retry_at:
            return False
        if self.run_id is None:
            name, tags = self._pending
            outcome, run_id = self._attempt("open the run", lambda: self._find_or_create(name, tags))
            if outcome == _REFUSED:  # e.g. a deleted experiment: asking again would only repeat the warning
                self._pending = None
            if outcome != _SENT:
                return False
            self.run_id, self._pending = run_id, None
        sent = 0
        while self._buffer:
            what, fn = self._buffer[0]
            outcome, _ = self._attempt(what, lambda: fn(self.run_id))
            if outcome == _UNREACHABLE:
                return False
            self._buffer.popleft()
            sent += outcome == _SENT
            self._lost += outcome == _REFUSED
        if self._unreachable:
            self._unreachable = False
            log.info("MLflow at %s answers again: logging to run %s; sent the %d calls kept while it was "
                     "unreachable", self.settings.tracking_uri, self.run_id, sent)
        return True

    def _log(self, what: str, fn: Callable[[str], Any], keep: bool = True) -> None:
        """fn(run_id) now when MLflow answers; otherwise kept for the next call that reaches it (keep) or
        dropped (images, artifacts: too large to hold)."""
        if not self.active:
            return
        if self._connect():
            outcome, _ = self._attempt(what, lambda: fn(self.run_id))
            if outcome != _UNREACHABLE:
                self._lost += outcome == _REFUSED
                return
        if keep and len(self._buffer) < _BUFFER_MAX:
            self._buffer.append((what, fn))
        else:
            self._lost += 1

    # ---- logging ------------------------------------------------------------------------------

    def log_params(self, params: dict[str, Any], step: int = 0) -> None:
        """Flat params (values redacted, cut to MLflow's 6,000 characters). A param already logged with the same
        value is skipped (a resume logs them again); one whose value changed (on a resume at `step`) is logged as
        changed_param(key, step) and tagged latentforge.changed.<key>, since MLflow refuses to change a param."""
        from mlflow.entities import Param, RunTag

        values = {k: storage.redact(str(v))[:_PARAM_VALUE_MAX] for k, v in sorted(params.items())}

        def log_new(run_id: str) -> None:
            existing = self.client.get_run(run_id).data.params
            new = [Param(k, v) for k, v in values.items() if k not in existing]
            tags = []
            for key, value in values.items():
                if key in existing and (was := _current_value(existing, key)) != value:
                    if changed_param(key, step) not in existing:
                        new.append(Param(changed_param(key, step), value))
                    tags.append(RunTag(CHANGED_TAG_PREFIX + key, f"{was} -> {value} at step {step}"[:5000]))
                    log.info("MLflow: %s changed from %s to %s at step %d (param %s)", key, was, value, step,
                             changed_param(key, step))
            for start in range(0, max(len(new), len(tags)), _BATCH_MAX):
                self.client.log_batch(run_id, params=new[start:start + _BATCH_MAX],
                                      tags=tags[start:start + _BATCH_MAX])

        self._log("log params", log_new)

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Run tags (values redacted); kept while MLflow is unreachable, like params."""
        from mlflow.entities import RunTag

        batch = [RunTag(k, storage.redact(str(v))[:_PARAM_VALUE_MAX]) for k, v in tags.items()]
        self._log("set tags", lambda run_id: self.client.log_batch(run_id, tags=batch))

    def log_dict(self, values: dict[str, Any], artifact_file: str) -> None:
        values = storage.redact_values(values)
        self._log(f"log {artifact_file}", lambda run_id: self.client.log_dict(run_id, values, artifact_file))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._log("log metrics", lambda run_id: self.client.log_batch(run_id, metrics=batch))

    def log_image(self, image: Any, key: str, step: int) -> None:
        """A PIL image or HxWx3 uint8 array under `key` (no '/'), with a step for the UI's slider."""
        self._log(f"log image {key}", lambda run_id: self.client.log_image(run_id, image, key=key, step=step),
                  keep=False)

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._log(f"log artifacts {artifact_path}",
                  lambda run_id: self.client.log_artifacts(run_id, str(local_dir), artifact_path), keep=False)

    def log_artifact(self, local_file: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._log(f"log artifact {local_file}",
                  lambda run_id: self.client.log_artifact(run_id, str(local_file), artifact_path), keep=False)

    def log_table(self, table: Any, artifact_file: str) -> None:
        """A pandas DataFrame as an MLflow table (shown in the run's artifacts, and in Evaluations); columns of
        PIL images are stored as images."""
        self._log(f"log table {artifact_file}",
                  lambda run_id: self.client.log_table(run_id, table, artifact_file), keep=False)

    def log_dataset(self, name: str, location: str, digest: str, context: str = "training") -> None:
        """A dataset input of the run: metadata only (name, where it is, its digest), no rows. MLflow keeps
        36 characters of a digest: a longer one (a sha256) is cut to its first 32."""
        def log(run_id: str) -> None:
            from mlflow.data.dataset_source_registry import resolve_dataset_source
            from mlflow.data.meta_dataset import MetaDataset
            from mlflow.entities import DatasetInput, InputTag
            from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

            with warnings.catch_warnings():  # a local path reads as either of two equal local sources
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(storage.redact(location))
            dataset = MetaDataset(source, name=name, digest=digest[:32])
            self.client.log_inputs(run_id, datasets=[DatasetInput(
                dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])

        self._log(f"log dataset {name}", log)

    def start_system_metrics(self) -> None:
        """MLflow's system-metrics monitor for this run, in this process (stop with stop_system_metrics)."""
        if not (self.settings.system_metrics and self._connect()):
            return

        def start() -> None:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system_run = SystemMetricsMonitor(self.run_id, resume_logging=True,
                                                   tracking_uri=self.settings.tracking_uri)
            self._system_run.start()

        self.call("start system metrics", start)

    def stop_system_metrics(self) -> None:
        if self._system_run is not None:
            monitor, self._system_run = self._system_run, None
            self.call("stop system metrics", monitor.finish)

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED / FAILED / KILLED (a resume sets it back to RUNNING), after one last try to send
        what was kept: nothing retries after this."""
        self.stop_system_metrics()
        if not self.active:
            return
        self._retry_at = 0.0
        self._log("end the run", lambda run_id: self.client.set_terminated(run_id, status), keep=False)
        if self._buffer or self._lost:
            log.warning("MLflow at %s: %d calls were never logged (%d kept while it was unreachable, %d images, "
                        "artifacts or refused calls)", self.settings.tracking_uri, len(self._buffer) + self._lost,
                        len(self._buffer), self._lost)


def upstream_links(report_locations: Iterable[str]) -> dict[str, str]:
    """Tags that link a run to the runs that made its inputs: `latentforge.upstream.<stage>` = run id, read from
    each upstream stage's report (its REPORT_RUN_KEY). A report that is missing, unreadable or without a run
    id (MLflow was off or down then) links nothing."""
    tags = {}
    for location in report_locations:
        try:
            report = storage.read_json(location)
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and report.get(REPORT_RUN_KEY) and report.get("stage"):
            tags[UPSTREAM_TAG_PREFIX + str(report["stage"])] = str(report[REPORT_RUN_KEY])
    return tags


def _metric_key(name: str) -> str:
    return re.sub(r"[^\w.\- ]", "_", name)


def log_stage_report(settings: MLflowSettings, report: StageReport, report_location: str,
                     upstream_reports: Iterable[str] = ()) -> None:
    """A data stage's report as an MLflow run of its own, in settings.experiment, named <stage>-<output folder>:
    params output and report (where the report file is), metrics rows_in, rows_out, dropped_total and
    dropped.<reason>, the report JSON as an artifact, tags JOB_TAG and upstream_links(upstream_reports), and
    the status FINISHED or FAILED as the report says. The run id goes into the report (REPORT_RUN_KEY), where the
    next stage finds it. Each execution of a stage is its own run (a rerun that had nothing to do included)."""
    output, _, report_file = str(report_location).rpartition("/")  # a path or a URI
    name = f"{report.stage}-{output.rpartition('/')[2] or '.'}"
    tracker = Tracker.open_child(settings, name, parent_run_id=None)
    report.details[REPORT_RUN_KEY] = tracker.run_id
    if not tracker.active:
        return
    tracker.set_tags({JOB_TAG: report.stage, **upstream_links(upstream_reports)})
    tracker.log_params({"output": output, "report": report_location})
    values = report.to_dict()
    metrics = {"rows_in": report.rows_in, "rows_out": report.rows_out, "dropped_total": values["dropped_total"]}
    metrics |= {f"dropped.{_metric_key(reason)}": count for reason, count in report.dropped.items()}
    tracker.log_metrics(metrics, step=0)
    tracker.log_dict(values, report_file)
    if not report.ok:
        tracker.set_tags({"latentforge.error": report.error or ""})
    tracker.finish("FINISHED" if report.ok else "FAILED")
