"""The filter stage: fingerprint and no-op rerun, scan -> decide -> write -> commit, the report."""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import time

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core import storage
from pipelines.core.config import to_dict
from pipelines.core.job import Stage
from pipelines.core.runtime import StageReport, upstream_report
from pipelines.data.download import REPORT_FILE as DOWNLOAD_REPORT
from pipelines.data.filter.config import REASONS, STAGE_NAME, FilterConfig, check_inputs, report_path
from pipelines.data.filter.dedup import decide
from pipelines.data.filter.scan import SHARD_ERROR_IDX, SHARD_SHA256_IDX, run_scan
from pipelines.data.filter.write import write_and_commit
from pipelines.data.shards import DownloadShards, download_shards

log = logging.getLogger("latentforge.filter")


def fingerprint(cfg: FilterConfig, inputs: DownloadShards) -> str:
    """Identity of an output: the input shards (name, size, mtime) and every filter setting;
    compute and force are left out because they do not change which rows are kept."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("output_dir", "force", "compute", "mlflow")}
    if cfg.clip.enabled:
        stat = os.stat(cfg.clip.weights)
        settings["clip_weights_file"] = [stat.st_size, stat.st_mtime_ns]
    shards = [(s.name, s.size, s.mtime_ns) for s in inputs.finished]
    blob = json.dumps({"settings": settings, "inputs": shards}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_stage_inputs(cfg: FilterConfig) -> FilterConfig:
    """check_inputs, and the download stage's verdict: its report must exist and say ok (ConfigError)."""
    cfg = check_inputs(cfg)
    upstream_report(cfg.input_dir, DOWNLOAD_REPORT, "download", "jobs/download_data.py")
    return cfg


def committed_report(cfg: FilterConfig, fp: str) -> dict | None:
    """The committed report when it says ok, matches `fp`, all its shards are present, and it records
    their content (sha256: what the next stage identifies them by)."""
    old = _read_report(report_path(cfg))
    if not old or not old.get("ok") or old.get("fingerprint") != fp or "input_shards" not in old:
        return None
    present = storage.list_files(cfg.output_dir)
    if any(s["name"] not in present or not s.get("sha256") for s in old.get("output_shards", [])):
        return None
    return old


def _read_report(location: str) -> dict | None:
    """The report there, or None when there is none or it is unreadable (cut short, not JSON)."""
    try:
        return storage.read_json(location)
    except (FileNotFoundError, OSError, ValueError):
        return None


def _noop_report(old: dict) -> StageReport:
    standard = {"stage", "ok", "error", "rows_in", "rows_out", "dropped", "dropped_total", "seconds"}
    details = {k: v for k, v in old.items() if k not in standard}
    details["noop"] = True
    log.info("output already matches the inputs and filter settings: nothing to do "
             "(force=true recomputes)")
    return StageReport(STAGE_NAME, rows_in=old["rows_in"], rows_out=old["rows_out"],
                       dropped=dict(old["dropped"]), details=details)


def _tally(report: StageReport, records: pa.Table, reasons: list[str]) -> dict[str, list[int]]:
    """Count drops per reason; -> kept sample positions per input shard."""
    plan: dict[str, list[int]] = {}
    for shard, idx, reason in zip(records.column("shard").to_pylist(),
                                  records.column("idx").to_pylist(), reasons):
        if reason:
            report.drop(reason)
        else:
            plan.setdefault(shard, []).append(idx)
    report.rows_in = records.num_rows
    report.rows_out = sum(len(v) for v in plan.values())
    return plan


def _shard_records(records: pa.Table, idx: int) -> dict[str, str]:
    """{shard: key} of the per-shard records with this idx (SHARD_ERROR_IDX, SHARD_SHA256_IDX)."""
    found = records.filter(pc.equal(records.column("idx"), idx))
    return dict(zip(found.column("shard").to_pylist(), found.column("key").to_pylist()))


def _split_shard_records(records: pa.Table) -> tuple[pa.Table, dict[str, str], dict[str, str]]:
    """-> (the sample records, {damaged shard: error}, {shard: sha256 of its bytes})."""
    errors, digests = _shard_records(records, SHARD_ERROR_IDX), _shard_records(records, SHARD_SHA256_IDX)
    return records.filter(pc.greater_equal(records.column("idx"), 0)), errors, digests


def _count_damaged(report: StageReport, cfg: FilterConfig, records: pa.Table, errors: dict[str, str]) -> list[dict]:
    """A damaged tar keeps the samples before the damage; the ones after it (img2dataset's count of the tar's
    samples, NNNNN_stats.json `successes`, minus those read) are counted as unreadable_shard."""
    read = collections.Counter(records.column("shard").to_pylist())
    damaged = []
    for name, error in sorted(errors.items()):
        lost = max(_samples_written(cfg.input_dir, name) - read[name], 0)
        report.drop("unreadable_shard", lost)
        report.rows_in += lost
        damaged.append({"name": name, "error": error, "rows_read": read[name], "rows_lost": lost})
        log.warning("input shard %s is damaged after %d samples (%d more lost, counted as unreadable_shard): %s",
                    name, read[name], lost, error)
    return damaged


def _samples_written(input_dir: str, name: str) -> int:
    """How many samples img2dataset wrote into tar `name` (0 when its stats file does not say)."""
    try:
        stats = storage.read_json(storage.join(input_dir, f"{name[:-len('.tar')]}_stats.json"))
        return int(stats.get("successes", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def _no_rows_message(report: StageReport) -> str:
    top = sorted(((n, r) for r, n in report.dropped.items() if n), reverse=True)[:4]
    reasons = ", ".join(f"{r}={n}" for n, r in top) or "nothing"
    return (f"no rows left after filtering ({report.rows_in} rows read; most dropped by {reasons}): "
            f"check input_dir and the filter thresholds")


def run_filter(cfg: FilterConfig) -> StageReport:
    """Scan, decide, write and commit. The caller writes the returned report to report_path(cfg)
    (runtime.finish): that write is the commit marker. ConfigError for bad settings or paths."""
    cfg = check_stage_inputs(cfg)
    inputs = download_shards(cfg.input_dir)
    fp = fingerprint(cfg, inputs)
    old = None if cfg.force else committed_report(cfg, fp)
    if old:
        return _noop_report(old)
    report = StageReport(STAGE_NAME, dropped={r: 0 for r in REASONS})
    report.details.update(noop=False, fingerprint=fp, input_dir=cfg.input_dir,
                          output_dir=cfg.output_dir, shards_in=len(inputs.finished),
                          shards_unfinished=list(inputs.unfinished), config=to_dict(cfg))
    if inputs.unfinished:
        log.warning("skipping %d unfinished input shard(s) without _stats.json: %s",
                    len(inputs.unfinished), ", ".join(inputs.unfinished[:5]))
    if not inputs.finished:
        report.fail(f"no finished shards (NNNNN.tar with NNNNN_stats.json) in {cfg.input_dir}")
        return report
    started = time.time()
    records, errors, digests = _split_shard_records(run_scan(cfg, [s.name for s in inputs.finished]))
    scanned = time.time()
    plan = _tally(report, records, decide(records, cfg.dedup))
    report.details["shards_damaged"] = _count_damaged(report, cfg, records, errors)
    # what was consumed, by content (sha256 of the bytes the scan read: no extra read)
    report.details["input_shards"] = [{"name": s.name, "sha256": digests[s.name]} for s in inputs.finished]
    log.info("scanned %d rows in %.1f s (%.0f rows/s); keeping %d", report.rows_in,
             scanned - started, report.rows_in / max(scanned - started, 1e-9), report.rows_out)
    if report.rows_out == 0:
        report.fail(_no_rows_message(report))
        return report
    written = write_and_commit(cfg, plan)
    if sum(w["rows"] for w in written.values()) != report.rows_out:
        report.fail(f"wrote {sum(w['rows'] for w in written.values())} rows but decided to keep "
                    f"{report.rows_out}: an input shard changed during the run; rerun")
    seconds = time.time() - started
    # sha256 of the bytes written (computed while writing): the identity precompute checks its inputs by
    report.details.update(output_shards=[{"name": n, **w} for n, w in sorted(written.items())],
                          scan_seconds=round(scanned - started, 3),
                          rows_per_second=round(report.rows_in / max(seconds, 1e-9), 1))
    return report


STAGE = Stage(STAGE_NAME, FilterConfig, run=run_filter, report_path=report_path, check=check_stage_inputs,
              upstream_reports=lambda cfg: (storage.join(cfg.input_dir, DOWNLOAD_REPORT),))
