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
from pipelines.core.runtime import StageReport
from pipelines.data.precompute.config import PrecomputeConfig, report_path
from pipelines.data.precompute.encode import BUSY_SECONDS, EncoderActor, start_probe
from pipelines.data.precompute.output import ShardAssembler, build_manifest, finished_shards, prepare_output
from pipelines.data.precompute.rows import SHARD, read_and_decode
from pipelines.data.shards import tar_shard_names

log = logging.getLogger("latentforge.precompute")


def build_dataset(cfg: PrecomputeConfig, inputs: list[str], pending: list[int]):
    """The Ray Data pipeline over the pending input shards (lazy: runs when iterated)."""
    import ray

    c = cfg.compute
    items = [{"shard": i, "name": inputs[i]} for i in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one read task per tar
    ds = ds.map_batches(read_and_decode, batch_size=1, batch_format="numpy",
                        fn_kwargs={"input_dir": cfg.input_dir, "image_size": cfg.image_size,
                                   "chunk": c.batch_size},
                        compute=ray.data.TaskPoolStrategy(size=c.read_concurrency), num_cpus=c.read_num_cpus)
    return ds.map_batches(EncoderActor, batch_size=c.batch_size, batch_format="numpy",
                          fn_constructor_kwargs={"config": to_dict(cfg)},
                          compute=ray.data.ActorPoolStrategy(size=c.actors),
                          num_cpus=c.num_cpus_per_actor, num_gpus=c.num_gpus_per_actor)


def run_pending(cfg: PrecomputeConfig, assembler: ShardAssembler, inputs: list[str],
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
                 timings: dict[str, Any]) -> None:
    """Counts over every finished shard (also those of earlier runs); timings of this run only."""
    for provenance in finished.values():
        report.rows_in += provenance["rows_in"]
        report.rows_out += provenance["rows"]
        for reason, count in provenance["dropped"].items():
            report.drop(reason, count)
    report.details.update({
        "shards": len(finished), "shards_written": len(written), "shards_skipped": len(finished) - len(written),
        "rows_processed": sum(p["rows_in"] for p in written), **timings})
    if report.rows_out == 0:
        report.fail("no rows left after precompute (every row was dropped)")


def run_precompute(cfg: PrecomputeConfig) -> StageReport:
    """The stage on a running Ray. Raises FeatureMismatchError before any write when the output
    directory holds features made differently; returns the report (also written to the output)."""
    import ray

    cfg.validate()
    if cfg.text.layer == "embeddings" and cfg.text.weights is not None:
        log.warning("text.layer=embeddings with trained text weights (%s): the U-Net gets each word without its "
                    "context; Stable Diffusion conditions on --set text.layer=penultimate (SD 2) or last (SD 1.x)",
                    cfg.text.weights)
    # absolute in the driver: the read tasks run in other working directories
    cfg = dataclasses.replace(cfg, input_dir=storage.absolute(cfg.input_dir),
                              output_dir=storage.absolute(cfg.output_dir))
    report = StageReport(stage="precompute")
    inputs = tar_shard_names(cfg.input_dir)
    if not inputs:
        report.fail(f"no *.tar shards in {cfg.input_dir}")
        return report
    storage.makedirs(cfg.output_dir)
    probe = start_probe(cfg)
    pending = [i for i in range(len(inputs)) if i not in finished_shards(cfg.output_dir)]
    log.info("%d input shards: %d to encode, %d already finished", len(inputs), len(pending),
             len(inputs) - len(pending))
    # The output is checked when the first encoded batch arrives rather than before the pipeline
    # starts: the probe then loads its models while the actors load theirs (minutes for big models).
    assembler = ShardAssembler(cfg.output_dir, inputs, len(pending),
                                lambda: prepare_output(cfg, ray.get(probe), inputs))
    timings = run_pending(cfg, assembler, inputs, pending) if pending else {}
    assembler.ready()  # also when nothing was pending: the check and the clean-up still run
    info = ray.get(probe)
    finished = finished_shards(cfg.output_dir)
    build_manifest(cfg, info, finished).save(cfg.output_dir)
    _fill_report(report, finished, assembler.committed, timings)
    report.details["output_dir"] = cfg.output_dir
    return report


def _validated(cfg: PrecomputeConfig) -> PrecomputeConfig:
    cfg.validate()
    return cfg


STAGE = Stage("precompute", PrecomputeConfig, run=run_precompute, report_path=report_path, check=_validated,
              ray_cpus=lambda cfg: cfg.ray_num_cpus)
