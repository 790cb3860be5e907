"""Download stage: URL list -> WebDataset shards (.jpg .txt .json) with img2dataset, on Ray.

How the work is distributed, and why
------------------------------------
The driver reads the URL list, cuts it into shards of `number_sample_per_shard` rows (shard i holds
rows [i*n, (i+1)*n)), and runs one Ray task per group of `shards_per_task` shards, at most
`processes` tasks at a time. Each task runs img2dataset's own per-shard worker (its `Downloader`,
the object img2dataset's distributors call for every shard, with `threads` HTTP threads and its
`Resizer`) and writes NNNNN.tar, NNNNN.parquet and NNNNN_stats.json straight into `output_dir`.
We do not call `img2dataset.download(distributor="ray")` because, in img2dataset 1.47:
  - it never retries a failed shard under Ray and submits every shard at once (no bound on
    concurrency: it ignores processes_count), with no per-shard result to report or act on;
  - its resume ("incremental" mode) treats any *.json in the output folder as a finished shard
    (a report file there crashes it) and leaves half-written tars of crashed shards in place;
  - it spawns a logger process and needs the call under `if __name__ == "__main__"`.
Running the Downloader in our own tasks keeps img2dataset's download, resize and writer code, and
gives us retries, bounded concurrency, progress and a resume rule we control.

Restart rule: a shard is done when its NNNNN_stats.json parses and its .tar and .parquet exist
(img2dataset writes the stats file last). Any other shard is redone from scratch: its leftovers
(for example a half-written tar) are deleted first. A rerun therefore skips finished shards and
never duplicates samples. A finished shard whose row count differs from the plan means the output
folder belongs to another URL list or shard size: that is an error, never silently mixed.

Multi-node: `output_dir` must be the same path on every node (shared storage: NFS, EFS, Lustre...)
or a URI (s3://...): img2dataset writes through fsspec, and this module through pipelines/core/storage.
The URL list travels to the tasks through Ray's object store, so only the driver must read it.
After each shard the driver checks that the shard's stats file is visible to it, which catches an
`output_dir` that is not actually shared.

Untrusted URL lists: in each task img2dataset's urlopen goes through pipelines/data/url_guard.py's
opener (http/https only, public addresses only unless allow_private_addresses, bodies up to
max_body_bytes), and its resizer is fed pipelines/core/images.decode_rgb's image (pixel count checked
on the header first, EXIF orientation, 16-bit, CMYK, palette, alpha), the decode the other stages use.

Report (`<output_dir>/download_report.json`): rows in, rows out, dropped per reason (img2dataset's
error messages mapped to http_404, http_500, decode_error, too_small, timeout, refused_scheme,
refused_address, body_too_large, too_many_pixels, ...; the raw messages are kept under
`error_messages`), shards skipped / downloaded / failed, rows/s. The stage fails when any shard
failed for good or when the success rate is under `min_success_rate`.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import math
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipelines.core import storage
from pipelines.core.config import ConfigError, from_dict, to_dict
from pipelines.core.images import TooManyPixels, decode_rgb
from pipelines.core.job import Stage
from pipelines.core.progress import Progress
from pipelines.core.runtime import StageReport
from pipelines.core.tracking import MLflowSettings
from pipelines.data import url_guard

log = logging.getLogger("latentforge.download")

REPORT_FILE = "download_report.json"
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
ENCODE_FORMATS = ("jpg", "png", "webp")
# Columns img2dataset writes itself: an extra column with one of these names would be overwritten.
RESERVED_COLUMNS = frozenset({"key", "caption", "url", "width", "height", "original_width", "original_height",
                              "status", "error_message", "exif", "md5", "sha256", "sha512"})
# Honour sites that ask not to be used for AI training (img2dataset's default directives).
DISALLOWED_HEADER_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
TOO_MANY_PIXELS = "too many pixels"  # the resizer's message for an image over max_image_pixels


class DownloadError(ConfigError):
    """Bad input found before any download work starts (the job exits with status 2)."""


@dataclass(frozen=True)
class DownloadConfig:
    url_list: str = ""  # parquet (file or folder), csv, tsv or jsonl; a path or fsspec URI
    output_dir: str = ""  # shards go here; a path every node sees (shared storage) or a URI
    url_col: str = "url"
    caption_col: str = "caption"
    extra_columns: list[str] | None = None  # copied into each sample's .json; None: every other column
    image_size: int = 64
    # keep_ratio: the short side becomes image_size and the aspect is kept, so precompute can put each image
    # in its aspect-ratio bucket (pipelines/data/buckets.py). center_crop stores squares (the framing is lost),
    # keep_ratio_largest fits the long side, border pads to a square (never: the model would learn the bars).
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = False  # True: smaller images are stored as they are (precompute upscales them)
    min_image_size: int = 0  # images whose shorter side is smaller are dropped (too_small)
    max_aspect_ratio: float | None = None  # None: keep any aspect ratio (the filter stage decides)
    encode_format: str = "jpg"
    encode_quality: int = 95
    number_sample_per_shard: int = 1000
    shards_per_task: int = 1
    processes: int = 2  # Ray tasks in flight at once
    threads: int = 32  # HTTP threads per task
    cpus_per_task: float = 1.0  # Ray CPUs each task reserves (downloads wait on I/O: < 1 is fine)
    retries: int = 0  # extra attempts per URL
    timeout_s: int = 10  # per request
    shard_retries: int = 2  # extra attempts for a shard whose task failed
    min_success_rate: float = 0.5  # the stage fails under this share of rows downloaded
    # Untrusted URL lists (pipelines/data/url_guard.py): only http(s) from public addresses is fetched.
    allow_private_addresses: bool = False  # True: loopback/private/link-local too (a local test server only)
    max_body_bytes: int = 64 << 20  # longer responses are dropped (body_too_large); camera JPEGs stay under ~40 MB
    # Images with more pixels are dropped (too_many_pixels) on their header, before decoding: above the
    # largest camera sensors (151 MP), far under a 20000x20000 PNG bomb (400 M). An image at the limit
    # takes about 1.5 GB in its thread while it is resized (3 copies of 480 MB RGB): lower it for many threads.
    max_image_pixels: int = 160_000_000
    mlflow: MLflowSettings = field(default_factory=MLflowSettings)  # where the report is logged as a run


def validate_config(cfg: DownloadConfig) -> DownloadConfig:
    """Check the config before any work; returns it with output_dir made absolute (Ray tasks run in
    other working directories, and on other nodes)."""
    problems = []
    if not cfg.url_list:
        problems.append("url_list is required (--set url_list=PATH)")
    if not cfg.output_dir:
        problems.append("output_dir is required (--set output_dir=PATH)")
    elif storage.is_uri(cfg.output_dir):
        problems += _fsspec_problems(cfg.output_dir)
    if cfg.resize_mode not in RESIZE_MODES:
        problems.append(f"resize_mode {cfg.resize_mode!r} is not one of {RESIZE_MODES}")
    if cfg.encode_format not in ENCODE_FORMATS:
        problems.append(f"encode_format {cfg.encode_format!r} is not one of {ENCODE_FORMATS}")
    for name in ("image_size", "number_sample_per_shard", "shards_per_task", "processes", "threads", "timeout_s",
                 "max_body_bytes", "max_image_pixels"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("min_image_size", "retries", "shard_retries"):
        if getattr(cfg, name) < 0:
            problems.append(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.min_success_rate <= 1.0:
        problems.append(f"min_success_rate must be in [0, 1], got {cfg.min_success_rate}")
    if cfg.cpus_per_task <= 0:
        problems.append(f"cpus_per_task must be > 0, got {cfg.cpus_per_task}")
    if problems:
        raise DownloadError("; ".join(problems))
    return dataclasses.replace(cfg, output_dir=storage.absolute(cfg.output_dir))


def _fsspec_problems(uri: str) -> list[str]:
    """img2dataset opens output_dir with fsspec: its protocol must have an installed implementation."""
    protocol = uri.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as err:
        return [f"output_dir {uri!r}: img2dataset writes through fsspec, which cannot open {protocol}:// ({err})"]
    return []


# ---------------------------------------------------------------------------------------------
# The URL list and the shard plan


def _read_table(url_list: str) -> pa.Table:
    try:
        return _read_table_unchecked(url_list)
    except (pa.ArrowInvalid, UnicodeDecodeError) as err:  # not UTF-8, not the format its name says, damaged
        raise DownloadError(f"url_list {url_list} cannot be read: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _read_table_unchecked(url_list: str) -> pa.Table:
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    kind = storage.file_type(url_list)
    if kind == pafs.FileType.NotFound:
        raise DownloadError(f"url_list {url_list} not found")
    name = url_list.rstrip("/").lower()
    if kind == pafs.FileType.Directory or name.endswith(".parquet"):
        fs, path = storage.resolve(url_list)
        return pq.read_table(path, filesystem=fs)
    readers = {".csv": lambda f: pa_csv.read_csv(f),
               ".tsv": lambda f: pa_csv.read_csv(f, parse_options=pa_csv.ParseOptions(delimiter="\t")),
               ".jsonl": lambda f: pa_json.read_json(f)}
    for suffix, reader in readers.items():
        if name.endswith(suffix):
            with storage.open_input(url_list) as file:
                return reader(file)
    raise DownloadError(f"url_list {url_list}: unknown format (use .parquet, .csv, .tsv or .jsonl)")


def read_url_list(cfg: DownloadConfig) -> pa.Table:
    """The URL list as a table with columns (extras..., caption, url), in img2dataset's names."""
    table = _read_table(cfg.url_list)
    missing = [c for c in (cfg.url_col, cfg.caption_col) if c not in table.column_names]
    if missing:
        raise DownloadError(f"url_list {cfg.url_list} has no column(s) {missing}; "
                            f"its columns are {table.column_names} (set url_col / caption_col)")
    others = [c for c in table.column_names if c not in (cfg.url_col, cfg.caption_col)]
    if cfg.extra_columns is None:
        extras = [c for c in others if c not in RESERVED_COLUMNS]
        if len(extras) < len(others):
            log.warning("not copying column(s) %s: img2dataset reserves these names",
                        sorted(set(others) - set(extras)))
    else:
        extras = list(cfg.extra_columns)
        unknown = [c for c in extras if c not in others]
        reserved = [c for c in extras if c in RESERVED_COLUMNS]
        if unknown or reserved:
            raise DownloadError(f"extra_columns: {unknown} not in the url list's other columns {others}; "
                                f"{reserved} are names img2dataset reserves")
    # A missing URL becomes "" so img2dataset records it as a failure ("invalid_url") instead of crashing.
    try:
        url = pc.fill_null(table.column(cfg.url_col).cast(pa.string()), "")
        caption = table.column(cfg.caption_col).cast(pa.string())
        out = pa.table([*(table.column(c) for c in extras), caption, url], names=[*extras, "caption", "url"])
        out.validate(full=True)  # pyarrow's JSON reader lets invalid UTF-8 through; the tasks would fail on it
    except pa.ArrowInvalid as err:
        raise DownloadError(f"url_list {cfg.url_list}: {_first_line(err)} (text columns must be UTF-8)") from None
    return out


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first row in the URL list
    stop: int  # one past the last row
    name: str  # file stem: NNNNN (.tar, .parquet, _stats.json)

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_shards(num_rows: int, per_shard: int) -> list[Shard]:
    count = math.ceil(num_rows / per_shard)
    digits = max(5, len(str(max(count - 1, 0))))  # img2dataset's oom_shard_count
    return [Shard(i, i * per_shard, min(num_rows, (i + 1) * per_shard), f"{i:0{digits}d}") for i in range(count)]


def shard_files(output_dir: str, shard: Shard) -> dict[str, str]:
    stem = storage.join(output_dir, shard.name)
    return {"tar": f"{stem}.tar", "parquet": f"{stem}.parquet", "stats": f"{stem}_stats.json"}


def read_stats(output_dir: str, shard: Shard) -> dict[str, Any] | None:
    """img2dataset's stats for a finished shard, or None when the shard is not done."""
    files = shard_files(output_dir, shard)
    if not all(storage.is_file(path) for path in files.values()):
        return None
    try:
        stats = storage.read_json(files["stats"])
    except (OSError, ValueError):  # cut short by a crash while it was written
        return None
    if not isinstance(stats, dict) or not isinstance(stats.get("status_dict"), dict):
        return None
    if stats.get("count") != shard.rows:
        raise DownloadError(
            f"{files['stats']} counts {stats.get('count')} rows but shard {shard.name} of this URL list has "
            f"{shard.rows}: {output_dir} holds shards of another URL list or number_sample_per_shard; "
            f"use a new output_dir")
    return stats


def remove_shard_files(output_dir: str, shard: Shard) -> None:
    for path in shard_files(output_dir, shard).values():
        storage.remove(path)


# ---------------------------------------------------------------------------------------------
# The Ray task: img2dataset's per-shard worker over a group of shards


def _make_resizer(cfg: DownloadConfig):
    """img2dataset's Resizer, fed what pipelines/core/images.decode_rgb makes of the downloaded bytes: the
    pixel count is checked on the header before any decoding, and the image reaches img2dataset's OpenCV
    decode upright, 8-bit and RGB (OpenCV alone ignores EXIF orientation under IMREAD_UNCHANGED and
    saturates 16-bit gray to white when it encodes the JPEG)."""
    from img2dataset.resizer import Resizer

    class DecodingResizer(Resizer):
        def __call__(self, img_stream, blurring_bbox_list=None):
            try:
                rgb = decode_rgb(img_stream.getvalue(), max_pixels=cfg.max_image_pixels)
            except TooManyPixels as err:
                return None, None, None, None, None, f"{TOO_MANY_PIXELS}: {err}"
            except Exception as err:  # noqa: BLE001 - PIL raises many types; a bad image is a counted drop
                detail = re.sub(r" at 0x[0-9a-fA-F]+", "", str(err))[:120]  # one message per kind in the report
                return None, None, None, None, None, f"image decoding error: {type(err).__name__}: {detail}"
            # PPM: uncompressed, so OpenCV reads back exactly these pixels at the cost of a copy.
            normalised = io.BytesIO()
            rgb.save(normalised, "PPM")
            del rgb  # the biggest image may be large: keep one decoded copy less while OpenCV works
            return super().__call__(normalised, blurring_bbox_list)

    return DecodingResizer(image_size=cfg.image_size, resize_mode=cfg.resize_mode,
                           resize_only_if_bigger=cfg.resize_only_if_bigger,
                           encode_format=cfg.encode_format, encode_quality=cfg.encode_quality,
                           min_image_size=cfg.min_image_size,
                           max_aspect_ratio=cfg.max_aspect_ratio if cfg.max_aspect_ratio else float("inf"))


def _make_downloader(cfg: DownloadConfig, column_list: list[str], shard_name_digits: int):
    # albumentations (imported by img2dataset) looks for updates online at import unless told not to.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.downloader import Downloader
    from img2dataset.writer import WebDatasetSampleWriter

    resizer = _make_resizer(cfg)
    return Downloader(
        sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=cfg.threads,
        save_caption=True, extract_exif=False, output_folder=cfg.output_dir, column_list=column_list,
        timeout=cfg.timeout_s, number_sample_per_shard=cfg.number_sample_per_shard,
        oom_shard_count=shard_name_digits, compute_hash="sha256", verify_hash_type=None,
        encode_format=cfg.encode_format, retries=cfg.retries, user_agent_token=None,
        disallowed_header_directives=list(DISALLOWED_HEADER_DIRECTIVES))


def _download_one(downloader, cfg: DownloadConfig, table: pa.Table, shard: Shard, tmp_dir: str) -> dict:
    remove_shard_files(cfg.output_dir, shard)  # leftovers of an interrupted attempt (a half-written tar)
    storage.makedirs(cfg.output_dir)
    # img2dataset's worker reads its rows from an Arrow file; a task-local one needs no shared storage.
    rows_file = os.path.join(tmp_dir, f"{shard.name}.arrow")
    with pa.OSFile(rows_file, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table.slice(shard.start, shard.rows))
    started = time.time()
    try:
        downloader.download_shard((shard.index, rows_file))
    except Exception as err:  # noqa: BLE001 - one broken shard must not sink its group; the driver retries it
        remove_shard_files(cfg.output_dir, shard)
        return {"ok": False, "error": f"{type(err).__name__}: {err}", "host": socket.gethostname()}
    return {"ok": True, "seconds": time.time() - started, "host": socket.gethostname()}


def download_shard_group(config: dict, table: pa.Table, shards: list[Shard]) -> list[dict]:
    """Ray task body: download each shard of the group in turn; one outcome dict per shard."""
    cfg = from_dict(DownloadConfig, config)
    downloader = _make_downloader(cfg, table.column_names, len(shards[0].name))
    # img2dataset fetches with urllib.request.urlopen: the guarded opener decides what that may reach.
    opener = url_guard.build_opener(url_guard.UrlPolicy(allow_private=cfg.allow_private_addresses,
                                                        max_body_bytes=cfg.max_body_bytes))
    with url_guard.installed(opener), tempfile.TemporaryDirectory(prefix="latentforge-download-") as tmp_dir:
        return [_download_one(downloader, cfg, table, shard, tmp_dir) for shard in shards]


# ---------------------------------------------------------------------------------------------
# The driver: bounded concurrency, retries, progress


class _ShardRunner:
    """Keeps at most `processes` shard-group tasks in flight, retries failed shards up to
    `shard_retries` times, and logs a progress line per finished shard."""

    def __init__(self, cfg: DownloadConfig, table: pa.Table, pending: list[Shard]):
        self.cfg, self.table = cfg, table
        size = cfg.shards_per_task
        self.queue = collections.deque((pending[i:i + size], 0) for i in range(0, len(pending), size))
        self.total_shards, self.total_rows = len(pending), sum(s.rows for s in pending)
        self.downloaded: list[str] = []
        self.failed: dict[str, str] = {}
        self.rows_done = self.rows_ok = 0
        self.seconds = self.shard_seconds = 0.0
        self.progress = Progress(self.total_rows, "rows")

    def run(self) -> None:
        import ray

        task = ray.remote(download_shard_group).options(num_cpus=self.cfg.cpus_per_task)
        config, table_ref = to_dict(self.cfg), ray.put(self.table)
        in_flight: dict[Any, tuple[list[Shard], int]] = {}
        started = time.time()
        while self.queue or in_flight:
            while self.queue and len(in_flight) < self.cfg.processes:
                group, attempt = self.queue.popleft()
                in_flight[task.remote(config, table_ref, group)] = (group, attempt)
            [ready], _ = ray.wait(list(in_flight), num_returns=1)
            group, attempt = in_flight.pop(ready)
            self._handle(group, attempt, self._outcomes(ray, ready, group))
        self.seconds = time.time() - started

    @staticmethod
    def _outcomes(ray, ref, group: list[Shard]) -> list[dict]:
        try:
            return ray.get(ref)
        except Exception as err:  # noqa: BLE001 - a crashed or failed task: every shard in it is retried
            return [{"ok": False, "error": f"task failed: {type(err).__name__}: {err}", "host": "?"}] * len(group)

    def _handle(self, group: list[Shard], attempt: int, outcomes: list[dict]) -> None:
        retry = []
        for shard, outcome in zip(group, outcomes):
            stats = read_stats(self.cfg.output_dir, shard) if outcome["ok"] else None
            if outcome["ok"] and stats is None:
                outcome = {**outcome, "error": f"finished on {outcome['host']} but its files are not visible "
                                               f"to the driver: is output_dir on storage every node shares?"}
            if stats is not None:
                self._log_done(shard, stats, outcome)
            elif attempt < self.cfg.shard_retries:
                log.warning("shard %s failed (attempt %d), retrying: %s", shard.name, attempt + 1, outcome["error"])
                retry.append(shard)
            else:
                log.error("shard %s failed after %d attempts: %s", shard.name, attempt + 1, outcome["error"])
                self.failed[shard.name] = outcome["error"]
        if retry:
            self.queue.append((retry, attempt + 1))

    def _log_done(self, shard: Shard, stats: dict, outcome: dict) -> None:
        self.downloaded.append(shard.name)
        self.rows_done += shard.rows
        self.rows_ok += stats["successes"]
        self.shard_seconds += outcome["seconds"]
        log.info("%s | shard %s done on %s in %.1f s: %d/%d downloaded; %d/%d shards, %.1f%% ok so far",
                 self.progress.line(self.rows_done), shard.name, outcome["host"], outcome["seconds"],
                 stats["successes"], shard.rows, len(self.downloaded), self.total_shards,
                 100.0 * self.rows_ok / max(self.rows_done, 1))


# ---------------------------------------------------------------------------------------------
# Failure reasons and the report

_REASONS_BY_MESSAGE = (  # (lower-case fragment of img2dataset's error message, reason); first match wins
    (url_guard.REFUSED_SCHEME, "refused_scheme"),
    (url_guard.REFUSED_ADDRESS, "refused_address"),
    (url_guard.BODY_TOO_LARGE, "body_too_large"),
    (TOO_MANY_PIXELS, "too_many_pixels"),
    ("image too small", "too_small"),
    ("aspect ratio too large", "aspect_ratio"),
    ("image area too large", "too_large"),
    ("image decoding error", "decode_error"),
    ("cannot identify image", "decode_error"),
    ("truncated", "decode_error"),
    ("hash mismatch", "hash_mismatch"),
    ("x-robots-tag", "disallowed_by_site"),
    ("timed out", "timeout"),
    ("unknown url type", "invalid_url"),
    ("no host given", "invalid_url"),
    ("incompleteread", "connection_error"),
    ("urlopen error", "connection_error"),
    ("remote end closed", "connection_error"),
    ("connection reset", "connection_error"),
)


def failure_reason(message: str) -> str:
    """img2dataset's error message -> a short reason: http_<status>, decode_error, too_small, ..."""
    http = re.match(r"HTTP Error (\d{3})", message)
    if http:
        return f"http_{http.group(1)}"
    lowered = message.lower()
    return next((reason for fragment, reason in _REASONS_BY_MESSAGE if fragment in lowered), "other")


def _count_shard(report: StageReport, stats: dict, messages: dict[str, collections.Counter]) -> None:
    report.rows_out += stats["successes"]
    failures = 0
    for message, count in stats["status_dict"].items():
        if message != "success":
            reason = failure_reason(message)
            report.drop(reason, count)
            messages[reason][message[:200]] += count
            failures += count
    unaccounted = stats["count"] - stats["successes"] - failures
    if unaccounted > 0:  # rows img2dataset neither saved nor counted as failed (an error inside its loop)
        report.drop("internal_error", unaccounted)


def summarize(report: StageReport, cfg: DownloadConfig, shards: list[Shard], skipped: list[str],
              runner: _ShardRunner) -> StageReport:
    """Fill the stage report from every shard's stats file and judge it against min_success_rate."""
    report.rows_in = sum(s.rows for s in shards)
    messages: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for shard in shards:
        stats = read_stats(cfg.output_dir, shard)
        if stats is None:
            report.drop("shard_failed", shard.rows)
        else:
            _count_shard(report, stats, messages)
    success_rate = report.rows_out / report.rows_in if report.rows_in else 0.0
    report.details.update({
        "success_rate": round(success_rate, 6),
        "shards": {"total": len(shards), "skipped_done": len(skipped), "downloaded": sorted(runner.downloaded),
                   "failed": dict(sorted(runner.failed.items()))},
        "rows_downloaded_this_run": runner.rows_done,
        # Wall clock of this run's downloads, Ray worker start-up included.
        "rows_per_second": round(runner.rows_done / runner.seconds, 2) if runner.seconds else None,
        "shard_seconds_total": round(runner.shard_seconds, 3),
        "error_messages": {r: dict(c.most_common(5)) for r, c in sorted(messages.items())},
        "output_dir": cfg.output_dir,
        "config": to_dict(cfg),
    })
    if runner.failed:
        name, error = next(iter(sorted(runner.failed.items())))
        report.fail(f"{len(runner.failed)} shard(s) failed after {cfg.shard_retries + 1} attempts (shard {name}: "
                    f"{error}); rerun the same command to resume")
    elif success_rate < cfg.min_success_rate:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(report.dropped.items(), key=lambda kv: -kv[1]))
        report.fail(f"download success rate {success_rate:.1%} is under min_success_rate "
                    f"{cfg.min_success_rate:.1%}: {report.rows_out} of {report.rows_in} rows downloaded; "
                    f"failures: {reasons}")
    return report


def report_path(cfg: DownloadConfig) -> str:
    return storage.join(cfg.output_dir, REPORT_FILE)


def run_download(cfg: DownloadConfig) -> StageReport:
    """Download every shard not done yet (on a running Ray); returns the report. Bad input raises
    DownloadError before any work starts."""
    report = StageReport("download")  # started now: its `seconds` covers the whole stage
    cfg = validate_config(cfg)
    table = read_url_list(cfg)
    if table.num_rows == 0:
        raise DownloadError(f"url_list {cfg.url_list} has no rows")
    shards = plan_shards(table.num_rows, cfg.number_sample_per_shard)
    storage.makedirs(cfg.output_dir)
    done = [s.name for s in shards if read_stats(cfg.output_dir, s) is not None]
    done_names = set(done)
    pending = [s for s in shards if s.name not in done_names]
    log.info("%d rows in %d shards of %d: %d shard(s) already done, %d to download into %s",
             table.num_rows, len(shards), cfg.number_sample_per_shard, len(done), len(pending), cfg.output_dir)
    runner = _ShardRunner(cfg, table, pending)
    if pending:
        runner.run()
    return summarize(report, cfg, shards, done, runner)


STAGE = Stage("download", DownloadConfig, run=run_download, report_path=report_path, check=validate_config,
              upstream_reports=lambda cfg: ())
