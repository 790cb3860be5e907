"""LocalObjectStore: moto's standalone server (`moto_server`, moto[server]): the S3 API over HTTP, kept in the
server's memory, gone when it stops. Clients reach it exactly as they reach a real bucket: pyarrow, s3fs
(img2dataset) and boto3 (MLflow's artifact store) all read AWS_ENDPOINT_URL and the usual AWS_* credentials
from the environment, so no code path is special to the tests."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from pipelines.core.local_cluster.processes import _spawn, free_port, wait_for_http
from pipelines.core.service import Service


class LocalObjectStore(Service):
    """An S3-compatible server on 127.0.0.1 with one bucket, and the credentials to reach it."""

    def __init__(self, bucket: str = "latentforge", port: int | None = None, log_path: str | None = None) -> None:
        self.bucket = bucket
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # moto accepts any credentials; random ones make sure nothing depends on a well-known pair
        self.access_key = "AK" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def client_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """`base` (default: this process's environment) plus what an S3 client needs to reach this store."""
        env = dict(os.environ if base is None else base)
        env.update({"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                    "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_REGION": "us-east-1"})
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):  # would override the above
            env.pop(name, None)
        return env

    def start(self) -> None:
        server = str(Path(sys.executable).parent / "moto_server")
        self.proc = _spawn([server, "-H", "127.0.0.1", "-p", str(self.port)], env=None, log_path=self.log_path)
        wait_for_http(self.endpoint, timeout_s=60, proc=self.proc)
        import boto3

        env = self.client_env({})
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                     region_name=env["AWS_DEFAULT_REGION"]).create_bucket(Bucket=self.bucket)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

