"""Pass 3, the write (Ray Data) and the commit: kept samples are copied, original bytes unchanged,
into a staging folder, then moved over the output folder's shards."""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
import uuid
from typing import IO, Any

import numpy as np
import pyarrow.fs as pafs

from pipelines.core import storage
from pipelines.core.config import from_dict, to_dict
from pipelines.core.progress import Progress
from pipelines.data.filter.config import FilterConfig, report_path
from pipelines.data.filter.rows import iter_samples
from pipelines.data.shards import KEY_FIELD, MTIME_FIELD

log = logging.getLogger("latentforge.filter")

STAGING_PREFIX = ".staging-"  # <output>/.staging-<id>/: one run's shards until the commit


class HashingWriter:
    """A write-only stream that feeds every byte written through sha256: the shard's content identity,
    recorded in the report for the next stage, at no extra read."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.digest = stream, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.stream.write(data)


def write_shard(input_uri: str, output_uri: str, keep: set[int]) -> dict[str, Any]:
    """Copy the samples at positions `keep` (original bytes, members sorted by extension) to
    `output_uri`, committed atomically: readers never see a partial tar. -> {"rows", "sha256"}."""
    with storage.atomic_output(output_uri) as stream:
        writer = HashingWriter(stream)
        with tarfile.open(fileobj=writer, mode="w|") as tar:
            rows = _copy_samples(input_uri, tar, keep)
    return {"rows": rows, "sha256": writer.digest.hexdigest()}


def _copy_samples(input_uri: str, tar: tarfile.TarFile, keep: set[int]) -> int:
    rows = 0
    try:
        for idx, sample in enumerate(iter_samples(input_uri)):
            if idx not in keep:
                continue
            for ext in sorted(e for e in sample if not e.startswith("__")):
                info = tarfile.TarInfo(f"{sample[KEY_FIELD]}.{ext}")
                info.size, info.mtime, info.mode = len(sample[ext]), sample[MTIME_FIELD], 0o644
                tar.addfile(info, io.BytesIO(sample[ext]))
            rows += 1
    except (tarfile.TarError, OSError, EOFError):
        if rows < len(keep):  # the scan read these rows, so the shard changed since: fail loudly
            raise
    return rows


def write_shards(batch: dict[str, np.ndarray], cfg: dict, staging: str) -> dict[str, np.ndarray]:
    """Ray Data UDF: one write_shard per row of (name, keep positions)."""
    config = from_dict(FilterConfig, cfg)
    written = [write_shard(storage.join(config.input_dir, name), storage.join(staging, name), set(keep.tolist()))
               for name, keep in zip(batch["name"], batch["keep"])]
    return {"name": batch["name"], "rows": np.asarray([w["rows"] for w in written], np.int64),
            "sha256": np.asarray([w["sha256"] for w in written], dtype=object)}


def run_write(cfg: FilterConfig, plan: dict[str, list[int]], staging: str) -> dict[str, dict[str, Any]]:
    import ray

    items = [{"name": name, "keep": keep} for name, keep in sorted(plan.items())]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(write_shards, fn_kwargs={"cfg": to_dict(cfg), "staging": staging},
                        batch_size=1, batch_format="numpy", num_cpus=cfg.compute.num_cpus)
    progress, written = Progress(len(items), "shards"), {}
    for row in ds.iter_rows():  # as each shard is written
        written[row["name"]] = {"rows": int(row["rows"]), "sha256": str(row["sha256"])}
        log.info("%s | wrote %s: %d rows kept", progress.line(len(written)), row["name"], row["rows"])
    return written


def _remove_staging_dirs(output_dir: str) -> None:
    """Staging folders of crashed runs (one run per output folder, so none is live)."""
    for name, info in storage.list_dir(output_dir).items():
        if info.type == pafs.FileType.Directory and name.startswith(STAGING_PREFIX):
            storage.remove_dir(storage.join(output_dir, name))


def commit(cfg: FilterConfig, staging: str, written: dict[str, dict[str, Any]]) -> None:
    """Replace the output folder's shards with the staged ones. The old report goes first, so
    from here until the caller writes the new report the folder reads as unfinished."""
    fs, out = storage.resolve(cfg.output_dir)
    _, staged = storage.resolve(staging)
    storage.remove(report_path(cfg))
    for name in sorted(written):
        # a rename on local and shared POSIX storage; on object stores a copy of a complete object
        fs.move(f"{staged}/{name}", f"{out}/{name}")
    for name in storage.list_files(cfg.output_dir, suffix=".tar"):
        if name not in written:
            storage.remove(storage.join(cfg.output_dir, name))
    storage.remove_dir(staging)


def write_and_commit(cfg: FilterConfig, plan: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
    storage.makedirs(cfg.output_dir)
    _remove_staging_dirs(cfg.output_dir)
    staging = storage.join(cfg.output_dir, f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}")
    storage.makedirs(staging)
    try:
        written = run_write(cfg, plan, staging)
        commit(cfg, staging, written)
    finally:
        storage.remove_dir(staging)
    return written
