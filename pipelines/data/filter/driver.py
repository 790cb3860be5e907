"""The filter stage: fingerprint and no-op rerun, scan -> decide -> write -> commit, the report."""

from __future__ import annotations

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
from pipelines.core.runtime import StageReport
from pipelines.data.filter.config import REASONS, STAGE_NAME, FilterConfig, check_inputs, report_path
from pipelines.data.filter.dedup import decide
from pipelines.data.filter.scan import SHARD_ERROR_IDX, run_scan
from pipelines.data.filter.write import write_and_commit
from pipelines.data.shards import DownloadShards, download_shards

log = logging.getLogger("latentforge.filter")


def fingerprint(cfg: FilterConfig, inputs: DownloadShards) -> str:
    """Identity of an output: the input shards (name, size, mtime) and every filter setting;
    compute and force are left out because they do not change which rows are kept."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("output_dir", "force", "compute")}
    if cfg.clip.enabled:
        stat = os.stat(cfg.clip.weights)
        settings["clip_weights_file"] = [stat.st_size, stat.st_mtime_ns]
    shards = [(s.name, s.size, s.mtime_ns) for s in inputs.finished]
    blob = json.dumps({"settings": settings, "inputs": shards}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def committed_report(cfg: FilterConfig, fp: str) -> dict | None:
    """The committed report when it says ok, matches `fp`, and all its shards are present."""
    old = _read_report(report_path(cfg))
    if not old or not old.get("ok") or old.get("fingerprint") != fp:
        return None
    present = storage.list_files(cfg.output_dir)
    if any(s["name"] not in present for s in old.get("output_shards", [])):
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


def _split_shard_errors(records: pa.Table) -> tuple[pa.Table, list[dict]]:
    is_error = pc.equal(records.column("idx"), SHARD_ERROR_IDX)
    errors = records.filter(is_error)
    damaged = [{"name": s, "error": e} for s, e in zip(errors.column("shard").to_pylist(),
                                                        errors.column("key").to_pylist())]
    for item in damaged:
        log.warning("input shard %s is damaged; kept the samples before the damage: %s",
                    item["name"], item["error"])
    return records.filter(pc.invert(is_error)), damaged


def _no_rows_message(report: StageReport) -> str:
    top = sorted(((n, r) for r, n in report.dropped.items() if n), reverse=True)[:4]
    reasons = ", ".join(f"{r}={n}" for n, r in top) or "nothing"
    return (f"no rows left after filtering ({report.rows_in} rows read; most dropped by {reasons}): "
            f"check input_dir and the filter thresholds")


def run_filter(cfg: FilterConfig) -> StageReport:
    """Scan, decide, write and commit. The caller writes the returned report to report_path(cfg)
    (runtime.finish): that write is the commit marker. ConfigError for bad settings or paths."""
    cfg = check_inputs(cfg)
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
    records, damaged = _split_shard_errors(run_scan(cfg, [s.name for s in inputs.finished]))
    scanned = time.time()
    plan = _tally(report, records, decide(records, cfg.dedup))
    report.details["shards_damaged"] = damaged
    log.info("scanned %d rows in %.1f s (%.0f rows/s); keeping %d", report.rows_in,
             scanned - started, report.rows_in / max(scanned - started, 1e-9), report.rows_out)
    if report.rows_out == 0:
        report.fail(_no_rows_message(report))
        return report
    written = write_and_commit(cfg, plan)
    if sum(written.values()) != report.rows_out:
        report.fail(f"wrote {sum(written.values())} rows but decided to keep {report.rows_out}: "
                    f"an input shard changed during the run; rerun")
    seconds = time.time() - started
    report.details.update(output_shards=[{"name": n, "rows": r} for n, r in sorted(written.items())],
                          scan_seconds=round(scanned - started, 3),
                          rows_per_second=round(report.rows_in / max(seconds, 1e-9), 1))
    return report


STAGE = Stage(STAGE_NAME, FilterConfig, run=run_filter, report_path=report_path, check=check_inputs)
