"""LocalTrackingServer: `mlflow server` with a SQLite backend; artifacts are proxied (--serve-artifacts) to
s3://<bucket>/mlflow, so clients upload over HTTP and only the server holds the S3 credentials.

What the next person needs to know (MLflow 3.17):
- `mlflow server` starts a job runner with seven huey consumers (~190 MB each) unless
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false, and forwards SIGTERM to its uvicorn child only: stop the whole tree.
  Its Host-header guard (--allowed-hosts) admits localhost and 127.0.0.1 by default.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from pipelines.core.local_cluster.processes import _end, _process_tree, _spawn, free_port, wait_for_http


class LocalTrackingServer:
    """`mlflow server` on 127.0.0.1: runs in SQLite under `directory`, artifacts proxied to
    `artifacts_destination` (an s3:// URI: the server's environment must hold the credentials)."""

    def __init__(self, directory: str, artifacts_destination: str, port: int | None = None) -> None:
        self.directory = directory
        self.artifacts_destination = artifacts_destination
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend_uri(self) -> str:
        return f"sqlite:///{os.path.join(os.path.abspath(self.directory), 'mlflow.db')}"

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "mlflow.log")

    def command(self) -> list[str]:
        # One uvicorn worker: plenty for one training run (only rank 0 logs), ~0.9 GB less than MLflow's 4.
        return [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", self.backend_uri,
                "--serve-artifacts", "--artifacts-destination", self.artifacts_destination,
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]

    def launch(self, env: Mapping[str, str]) -> None:
        """Start the server without waiting for it (see wait_ready): it takes 10-20 s to import."""
        # No job runner: it serves MLflow's GenAI jobs (none here) with seven ~190 MB huey processes.
        self.proc = _spawn(self.command(), {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, self.log_path)

    def wait_ready(self, timeout_s: float = 180) -> None:
        wait_for_http(f"{self.tracking_uri}/health", timeout_s=timeout_s, proc=self.proc)

    def start(self, env: Mapping[str, str]) -> None:
        self.launch(env)
        self.wait_ready()

    def stop(self) -> None:
        """The whole process tree: `mlflow server` forwards SIGTERM to its uvicorn child only."""
        if self.proc is not None:
            _end(_process_tree(self.proc.pid))
            self.proc.wait()
        self.proc = None
