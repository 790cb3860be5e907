"""MLflow logging that never stops a training run.

    settings = MLflowSettings(experiment="t2i")
    tracker = Tracker.open(settings, run_name="sd2-base-256", tags={...})   # driver: find or create the run
    tracker.log_metrics({"loss": 0.1}, step=10)                           # any process, with tracker.run_id
    Tracker.attach(settings.resolved(), tracker.run_id).log_image(grid, "samples", step=100)

One MLflow run per training run: the run carries the tag `latentforge.run_name`, and a rerun with the
same name (a resume) finds it and continues it. Every call goes through `call`: an exception (a
tracking server that is down, a full disk) logs ONE warning and turns logging off for a cool-down that
doubles each time (1 min up to 10 min), after which the next call tries again. Training never waits on
MLflow for more than one short HTTP attempt (see MLflowSettings.http_*).
"""

from __future__ import annotations

import logging
import os
import time
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from pipelines.core import storage
from pipelines.core.config import ConfigError

log = logging.getLogger("latentforge.tracking")

RUN_NAME_TAG = "latentforge.run_name"
DEFAULT_TRACKING_FILE = "mlflow.db"
# MLflow metric and image keys may not contain '/'; logged names use '_' inside and '.' between groups.
_COOLDOWN_START_S, _COOLDOWN_MAX_S = 60.0, 600.0


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


class Tracker:
    """Logging to one MLflow run; every method is a no-op when disabled or when the run is unknown."""

    def __init__(self, settings: MLflowSettings, run_id: str | None) -> None:
        self.settings = settings
        self.run_id = run_id
        self.failures = 0
        self._retry_at = 0.0
        self._cooldown = _COOLDOWN_START_S
        self._client = None
        self._system_run = None
        if settings.enabled:
            # MLflow reads these at request time; setdefault keeps a user's explicit choice.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.http_retries))
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(settings.http_timeout_s))

    # ---- opening ------------------------------------------------------------------------------

    @classmethod
    def attach(cls, settings: MLflowSettings, run_id: str | None) -> "Tracker":
        """Log to an existing run (workers: run_id comes from the driver)."""
        return cls(settings, run_id)

    @classmethod
    def open(cls, settings: MLflowSettings, run_name: str, tags: dict[str, str] | None = None) -> "Tracker":
        """Find the run tagged with `run_name` in the experiment (a resume) or create it."""
        tracker = cls(settings.resolved(), None)
        if settings.enabled:
            tracker.run_id = tracker.call("open the run", tracker._find_or_create, run_name, tags or {})
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
        experiment = self.client.get_experiment_by_name(self.settings.experiment)
        if experiment is not None:
            return experiment.experiment_id
        return self.client.create_experiment(self.settings.experiment, artifact_location=self.settings.artifact_location)

    def _find_or_create(self, run_name: str, tags: dict[str, str]) -> str:
        client = self.client
        experiment_id = self._experiment_id()
        found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            run_id = found[0].info.run_id
            log.info("MLflow: continuing run %s (%s) in experiment %r", run_name, run_id, self.settings.experiment)
            client.update_run(run_id, status="RUNNING")
        else:
            run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
            run_id = run.info.run_id
            log.info("MLflow: new run %s (%s) in experiment %r", run_name, run_id, self.settings.experiment)
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        return run_id

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.settings.tracking_uri)
        return self._client

    @property
    def active(self) -> bool:
        return self.settings.enabled and self.run_id is not None

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run fn unless in a cool-down; on error warn (once per cool-down) and return None."""
        if not self.settings.enabled or time.monotonic() < self._retry_at:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any tracking failure must leave training running
            self.failures += 1
            self._retry_at = time.monotonic() + self._cooldown
            log.warning("MLflow at %s failed to %s (%s: %s); training goes on, MLflow calls are skipped "
                        "for %.0f s", self.settings.tracking_uri, what, type(err).__name__, err, self._cooldown)
            self._cooldown = min(self._cooldown * 2, _COOLDOWN_MAX_S)
            return None

    # ---- logging ------------------------------------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None:
        """Flat params (values cut to MLflow's 6,000 characters); params already logged are skipped,
        since MLflow refuses to change a param (a resume logs the same ones again)."""
        if not self.active:
            return
        from mlflow.entities import Param

        def log_new() -> None:
            existing = self.client.get_run(self.run_id).data.params
            new = [Param(k, str(v)[:6000]) for k, v in sorted(params.items()) if k not in existing]
            for start in range(0, len(new), 100):  # MLflow's batch limit
                self.client.log_batch(self.run_id, params=new[start:start + 100])

        self.call("log params", log_new)

    def log_dict(self, values: dict[str, Any], artifact_file: str) -> None:
        if self.active:
            self.call(f"log {artifact_file}", self.client.log_dict, self.run_id, values, artifact_file)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.call("log metrics", self.client.log_batch, self.run_id, metrics=batch)

    def log_image(self, image: Any, key: str, step: int) -> None:
        """A PIL image or HxWx3 uint8 array under `key` (no '/'), with a step for the UI's slider."""
        if self.active:
            self.call(f"log image {key}", self.client.log_image, self.run_id, image, key=key, step=step)

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.active:
            self.call(f"log artifacts {artifact_path}", self.client.log_artifacts, self.run_id, str(local_dir),
                       artifact_path)

    def log_artifact(self, local_file: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.active:
            self.call(f"log artifact {local_file}", self.client.log_artifact, self.run_id, str(local_file),
                      artifact_path)

    def start_system_metrics(self) -> None:
        """MLflow's system-metrics monitor for this run, in this process (stop with stop_system_metrics)."""
        if not (self.active and self.settings.system_metrics):
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
        """Mark the run FINISHED / FAILED / KILLED (a resume sets it back to RUNNING)."""
        self.stop_system_metrics()
        if self.active:
            self.call("end the run", self.client.set_terminated, self.run_id, status)
