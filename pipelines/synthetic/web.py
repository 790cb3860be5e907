"""The synthetic dataset served like the web: a loopback HTTP server and a URL list pointing at it.

    dataset = build_dataset(SyntheticConfig(num_good=200, planted=PlantedCounts(http_404=2)))
    with SyntheticServer(dataset.responses) as server:
        write_url_list(dataset, server.base_url, "urls.parquet")
        ...  # download from the URLs while the server runs (with allow_private_addresses=true: 127.0.0.1 is
             # a private address, which the download stage refuses by default)

The server binds 127.0.0.1 on a free port chosen by the OS, answers from memory in a thread per
request, and stops when the `with` block ends. `write_dataset` / `load_dataset` keep a dataset on
disk (files + routes), so another process can serve it (jobs/serve_synthetic.py).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.synthetic.shapes import ITEM_COLUMNS, Response, SyntheticDataset

NOT_FOUND = Response(404, "text/html", b"<html><body>Not Found</body></html>")
URL_LIST_COLUMNS = ("url", "caption", *(c for c in ITEM_COLUMNS if c not in ("path", "caption")))
ITEMS_FILE, ROUTES_FILE, FILES_DIR = "items.parquet", "routes.json", "files"


def _handler_class(responses: Mapping[str, Response],
                   redirects: Mapping[str, str]) -> type[BaseHTTPRequestHandler]:
    class SyntheticHandler(BaseHTTPRequestHandler):
        server_version = "SyntheticWeb/1.0"

        def do_GET(self) -> None:  # noqa: N802 (the name http.server dispatches to)
            path = urlsplit(self.path).path
            if path in redirects:
                self.send_response(302)
                self.send_header("Location", redirects[path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            response = responses.get(path, NOT_FOUND)
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            self.wfile.write(response.body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            pass  # a download makes thousands of requests; per-request lines would drown the job log

    return SyntheticHandler


class _QuietThreadingServer(ThreadingHTTPServer):
    daemon_threads = True  # a client that hangs up never blocks shutdown

    def handle_error(self, request, client_address) -> None:
        pass  # clients (timeouts, retries) may hang up mid-answer; that is normal on the web


class SyntheticServer:
    """Context manager: serves `responses` (path -> Response; anything else is 404) on 127.0.0.1, or on
    `host` (another loopback address, 127.0.0.2, lets a test tell two servers apart by address).
    `redirects` (path -> Location) answers 302 for those paths.

    Loopback is a private address: the download stage fetches from it only with allow_private_addresses."""

    def __init__(self, responses: Mapping[str, Response], redirects: Mapping[str, str] | None = None,
                 host: str = "127.0.0.1"):
        self._responses = dict(responses)
        self._redirects = dict(redirects or {})
        self._host = host
        self._server: _QuietThreadingServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "SyntheticServer":
        # Port 0: the OS picks a free port. The socket listens from here on, so requests made before
        # the serving thread runs simply wait in the backlog: no sleep is needed to synchronise.
        self._server = _QuietThreadingServer((self._host, 0), _handler_class(self._responses, self._redirects))
        self._thread = threading.Thread(target=self._server.serve_forever, name="synthetic-web",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()  # returns once serve_forever has left its loop
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the server is not running: use it inside a `with` block")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url_for(self, path: str) -> str:
        return self.base_url + path


def url_table(dataset: SyntheticDataset, base_url: str) -> pa.Table:
    """The URL list: url, caption and the extra columns (attributes, planted kind, duplicate_of)."""
    columns = {"url": [base_url.rstrip("/") + row["path"] for row in dataset.rows]}
    for name in URL_LIST_COLUMNS[1:]:
        columns[name] = [row[name] for row in dataset.rows]
    return pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})


def _write_parquet_atomic(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def write_url_list(dataset: SyntheticDataset, base_url: str, path: str | Path) -> Path:
    return _write_parquet_atomic(url_table(dataset, base_url), Path(path))


def write_dataset(dataset: SyntheticDataset, directory: str | Path) -> Path:
    """Images and answers to `directory` (files/<path>, routes.json) plus items.parquet (the rows,
    with paths instead of URLs: the URLs depend on where it is served)."""
    directory = Path(directory)
    routes = {}
    for path, response in dataset.responses.items():
        file = Path(FILES_DIR) / path.lstrip("/")
        (directory / file).parent.mkdir(parents=True, exist_ok=True)
        (directory / file).write_bytes(response.body)
        routes[path] = {"status": response.status, "content_type": response.content_type, "file": str(file)}
    (directory / ROUTES_FILE).write_text(json.dumps(routes, indent=1, sort_keys=True))
    rows = {name: pa.array([row[name] for row in dataset.rows], pa.string()) for name in ITEM_COLUMNS}
    _write_parquet_atomic(pa.table(rows), directory / ITEMS_FILE)
    return directory


def load_dataset(directory: str | Path) -> SyntheticDataset:
    directory = Path(directory)
    if not (directory / ROUTES_FILE).is_file() or not (directory / ITEMS_FILE).is_file():
        raise FileNotFoundError(f"{directory} holds no synthetic dataset ({ROUTES_FILE} and {ITEMS_FILE} "
                                f"are written by write_dataset)")
    routes = json.loads((directory / ROUTES_FILE).read_text())
    responses = {path: Response(r["status"], r["content_type"], (directory / r["file"]).read_bytes())
                 for path, r in routes.items()}
    rows = tuple(pq.read_table(directory / ITEMS_FILE).to_pylist())
    return SyntheticDataset(rows, responses)
