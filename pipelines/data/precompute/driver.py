"""The precompute stage: one streaming Ray Data pipeline over the pending shards, then the manifest
and the report."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from pipelines.core import storage
from pipelines.core.config import to_dict
from pipelines.core.job import Stage
from pipelines.core.runtime import VAE_REPORT_FILE, StageReport
from pipelines.data.buckets import bucket_name
from pipelines.data.filter.config import REPORT_FILE as FILTER_REPORT
from pipelines.data.precompute.config import PrecomputeConfig, report_path
from pipelines.data.precompute.encode import BUSY_SECONDS, EncoderActor, encoder_info, start_probe
from pipelines.data.precompute.output import (
    InputShard,
    ShardAssembler,
    build_manifest,
    filter_inputs,
    finished_shards,
    is_current,
    prepare_output,
)
from pipelines.data.precompute.rows import SHARD, read_and_decode

log = logging.getLogger("latentforge.precompute")


def build_dataset(cfg: PrecomputeConfig, inputs: list[InputShard], pending: list[int]):
    """The Ray Data pipeline over the pending input shards (lazy: runs when iterated)."""
    import ray

    c = cfg.compute
    items = [{"shard": i, "name": inputs[i].name, "rows": inputs[i].rows} for i in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one read task per tar
    ds = ds.map_batches(read_and_decode, batch_size=1, batch_format="numpy",
                        fn_kwargs={"input_dir": cfg.input_dir, "image_size": cfg.image_size,
                                   "chunk": c.batch_size, "text_model": cfg.text.model,
                                   "buckets": [list(b) for b in cfg.bucket_list()]},
                        compute=ray.data.TaskPoolStrategy(size=c.read_concurrency), num_cpus=c.read_num_cpus)
    return ds.map_batches(EncoderActor, batch_size=c.batch_size, batch_format="numpy",
                          fn_constructor_kwargs={"config": to_dict(cfg)},
                          compute=ray.data.ActorPoolStrategy(size=c.actors),
                          num_cpus=c.num_cpus_per_actor, num_gpus=c.num_gpus_per_actor)


def run_pending(cfg: PrecomputeConfig, assembler: ShardAssembler, inputs: list[InputShard],
                pending: list[int]) -> dict[str, Any]:
    """Encode and commit the pending shards; returns timings for the report.

    Two throughputs: rows over the wall time (model loading included, it dominates small runs), and
    rows over the encoder actors' busy time (what one actor sustains once loaded)."""
    start, first, rows, busy = time.perf_counter(), None, 0, 0.0
    for batch in build_dataset(cfg, inputs, pending).iter_batches(batch_size=None, batch_format="numpy"):
        first = first or time.perf_counter()
        rows += len(batch[SHARD])
        busy += float(batch[BUSY_SECONDS].sum())
        assembler.add(batch)
    assembler.finish(pending)
    seconds = time.perf_counter() - start
    return {"encode_seconds": round(seconds, 3), "first_batch_seconds": round((first or start) - start, 3),
            "rows_per_second": round(rows / seconds, 2),
            "rows_per_second_per_actor_busy": round(rows / busy, 2) if busy > 0 else None}


def _fill_report(report: StageReport, finished: dict[int, dict[str, Any]], written: list[dict[str, Any]],
                 removed: int, timings: dict[str, Any], context_length: int, buckets: tuple) -> None:
    """Counts over every finished shard (also those of earlier runs); timings of this run only."""
    for provenance in finished.values():
        report.rows_in += provenance["rows_in"]
        report.rows_out += provenance["rows"]
        for reason, count in provenance["dropped"].items():
            report.drop(reason, count)
    report.details.update({
        "shards": len(finished), "shards_written": len(written), "shards_skipped": len(finished) - len(written),
        "shards_removed": removed, "rows_processed": sum(p["rows_in"] for p in written),
        # kept rows whose caption the text encoder cut to its context length (tokens past it never seen)
        "captions_truncated": sum(p.get("captions_truncated", 0) for p in finished.values()),
        "text_context_length": context_length,
        # rows per aspect-ratio bucket ("HxW" in pixels), over every finished shard
        "bucket_rows": {bucket_name(b): sum(p["bucket_rows"][i] for p in finished.values())
                        for i, b in enumerate(buckets)},
        "shards_damaged": [{"name": p["source"], **p["damaged"]} for _, p in sorted(finished.items())
                           if p.get("damaged")],
        # what was consumed, by content: the sha256 the filter computed while writing each shard
        "input_shards": [{"name": p["source"], "sha256": p.get("source_sha256")} for _, p in sorted(finished.items())],
        **timings})
    if report.rows_out == 0:
        report.fail("no rows left after precompute (every row was dropped)")


def run_precompute(cfg: PrecomputeConfig) -> StageReport:
    """The stage on a running Ray. Raises FeatureMismatchError before any write when the output
    directory holds features made differently; returns the report (also written to the output). Encoders
    that cannot be loaded raise EncoderLoadError (one line)."""
    cfg.validate()
    if cfg.text.layer == "embeddings" and cfg.text.weights is not None:
        log.warning("text.layer=embeddings with trained text weights (%s): the U-Net gets each word without its "
                    "context; Stable Diffusion conditions on --set text.layer=penultimate (SD 2) or last (SD 1.x)",
                    cfg.text.weights)
    # absolute in the driver: the read tasks run in other working directories
    cfg = dataclasses.replace(cfg, input_dir=storage.absolute(cfg.input_dir),
                              output_dir=storage.absolute(cfg.output_dir))
    report = StageReport(stage="precompute")
    inputs = filter_inputs(cfg.input_dir)
    storage.makedirs(cfg.output_dir)
    probe = start_probe(cfg)
    existing = finished_shards(cfg.output_dir)
    # by content, not name: a shard made from other bytes than its input holds now is redone
    pending = [i for i in range(len(inputs)) if i not in existing or not is_current(existing[i], inputs[i])]
    vanished = sorted(i for i in existing if i >= len(inputs))
    log.info("%d input shards: %d to encode (%d changed since encoded), %d already finished; %d feature shard(s) "
             "of inputs that are gone to remove", len(inputs), len(pending), sum(i in existing for i in pending),
             len(inputs) - len(pending), len(vanished))
    # The output is checked when the first encoded batch arrives rather than before the pipeline
    # starts: the probe then loads its models while the actors load theirs (minutes for big models).
    changes = bool(pending or vanished)
    assembler = ShardAssembler(cfg.output_dir, inputs, len(pending),
                                lambda: prepare_output(cfg, encoder_info(probe), changes, vanished))
    try:
        timings = run_pending(cfg, assembler, inputs, pending) if pending else {}
    except Exception:
        encoder_info(probe)  # encoders that cannot load: the probe's one line, not the actors' death
        raise
    assembler.ready()  # also when nothing was pending: the check and the clean-up still run
    info = encoder_info(probe)
    finished = finished_shards(cfg.output_dir)
    build_manifest(cfg, info, finished).save(cfg.output_dir)
    _fill_report(report, finished, assembler.committed, len(vanished), timings, info.text_shape[0],
                 cfg.bucket_list())
    report.details["output_dir"] = cfg.output_dir
    return report


def _validated(cfg: PrecomputeConfig) -> PrecomputeConfig:
    """Before Ray starts: the settings, and the filter's verdict on input_dir (filter_inputs)."""
    cfg.validate()
    filter_inputs(storage.absolute(cfg.input_dir))
    return cfg


def upstream_reports(cfg: PrecomputeConfig) -> tuple[str, ...]:
    """The reports of the runs that made this stage's inputs: the filter's, and the VAE training's when vae.source
    is a folder (a VAE trained by jobs/train_vae.py carries its report inside; any other folder has none and so
    links nothing)."""
    reports = (storage.join(cfg.input_dir, FILTER_REPORT),)
    if cfg.vae.source == "tiny":
        return reports
    return (*reports, storage.join(cfg.vae.source, VAE_REPORT_FILE))


STAGE = Stage("precompute", PrecomputeConfig, run=run_precompute, report_path=report_path, check=_validated,
              ray_cpus=lambda cfg: cfg.ray_num_cpus, upstream_reports=upstream_reports)
