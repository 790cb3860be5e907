"""Pass 1, the scan (Ray Data): one task per input shard turns its samples into small per-row
records (reason, signatures, size); the optional CLIP scorer, an actor pool, scores the rows still
alive. Only records come back to the driver, never pixels."""

from __future__ import annotations

import hashlib
import logging
import tarfile
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps

from pipelines.core import storage
from pipelines.core.config import from_dict, to_dict
from pipelines.core.images import decode_rgb
from pipelines.core.progress import Progress
from pipelines.data.filter.config import FilterConfig
from pipelines.data.filter.rows import analyze, iter_samples

log = logging.getLogger("latentforge.filter")

_RECORD_FIELDS = [
    ("shard", pa.string()), ("idx", pa.int32()), ("key", pa.string()), ("reason", pa.string()),
    ("sha256", pa.binary()), ("dhash", pa.uint64()), ("thumb", pa.binary()),
    ("width", pa.int32()), ("height", pa.int32()), ("clip", pa.float32()),
]
_CLIP_FIELDS = [("caption", pa.string()), ("image", pa.binary())]  # only while CLIP needs them
SHARD_ERROR_IDX = -1  # a record with this idx reports a damaged tar (its key holds the error)
SHARD_SHA256_IDX = -2  # a record with this idx carries the sha256 of the tar's bytes (its key), one per shard


def _records_table(shard: str, records: list[dict], with_clip: bool) -> pa.Table:
    fields = _RECORD_FIELDS + (_CLIP_FIELDS if with_clip else [])
    columns = {name: [r.get(name) for r in records] for name, _ in fields if name != "shard"}
    columns["shard"] = [shard] * len(records)
    return pa.table(columns, schema=pa.schema(fields))


def scan_shards(batch: dict[str, np.ndarray], cfg: dict) -> Iterator[pa.Table]:
    """Ray Data UDF: input shard URIs -> per-row records, in chunks to bound memory."""
    config = from_dict(FilterConfig, cfg)
    for name in batch["name"]:
        records: list[dict] = []
        digest = hashlib.sha256()
        try:
            for idx, sample in enumerate(iter_samples(storage.join(config.input_dir, name), digest)):
                records.append({**analyze(sample, config), "idx": idx})
                if len(records) == 512:
                    yield _records_table(name, records, config.clip.enabled)
                    records = []
        except (tarfile.TarError, OSError, EOFError) as err:
            # keep what was read; tell the driver the rest of this shard is unreadable
            records.append({"idx": SHARD_ERROR_IDX, "key": f"{type(err).__name__}: {err}",
                            "reason": "shard_read_error"})
        records.append({"idx": SHARD_SHA256_IDX, "key": digest.hexdigest(), "reason": "shard_sha256"})
        yield _records_table(name, records, config.clip.enabled)


class ClipScorer:
    """Ray Data actor: cosine similarity of CLIP image and caption features for the rows still
    alive; below `clip.min_similarity` -> "clip_similarity". One model load per actor."""

    def __init__(self, cfg: dict) -> None:
        import open_clip
        import torch

        from model.encoders import _open_clip_name, create_open_clip

        config = from_dict(FilterConfig, cfg)
        self.min_similarity = config.clip.min_similarity
        use_gpu = config.compute.clip.num_gpus_per_actor > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = create_open_clip(config.clip.model, config.clip.weights).eval().to(self.device)
        self.tokenizer = open_clip.get_tokenizer(_open_clip_name(config.clip.model))
        pre = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        size = pre.get("size", self.model.visual.image_size)
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (h, w)
        self.mean = torch.tensor(pre.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1)

    def _pixels(self, images: list[bytes]):
        import torch

        h, w = self.size
        arrays = [np.asarray(ImageOps.fit(decode_rgb(b), (w, h), Image.Resampling.BICUBIC))
                  for b in images]  # every image here decoded once already in the scan
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, h, w)
        return ((x - self.mean) / self.std).to(self.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        alive = np.flatnonzero(np.asarray(batch.column("reason").to_pylist()) == "")
        scores = batch.column("clip").to_numpy(zero_copy_only=False).copy()
        reasons = batch.column("reason").to_pylist()
        if len(alive):
            images = [batch.column("image")[int(i)].as_py() for i in alive]
            captions = [batch.column("caption")[int(i)].as_py() for i in alive]
            with torch.no_grad():
                tokens = self.tokenizer(captions).to(self.device)
                img = self.model.encode_image(self._pixels(images), normalize=True)
                txt = self.model.encode_text(tokens, normalize=True)
                sims = (img * txt).sum(dim=-1).float().cpu().numpy()
            for i, sim in zip(alive, sims):
                scores[i] = sim
                if sim < self.min_similarity:
                    reasons[i] = "clip_similarity"
        batch = batch.drop_columns([name for name, _ in _CLIP_FIELDS])
        batch = batch.set_column(batch.schema.get_field_index("clip"), "clip",
                                 pa.array(scores, pa.float32()))
        return batch.set_column(batch.schema.get_field_index("reason"), "reason",
                                pa.array(reasons, pa.string()))


def _collect_with_progress(blocks: Iterable[pa.Table], shards: int) -> list[pa.Table]:
    """The scan's record blocks as they stream in, with a progress line per input shard scanned (its last
    record, the SHARD_SHA256_IDX one, has arrived)."""
    progress, tables, done, rows = Progress(shards, "shards"), [], 0, 0
    for table in blocks:
        if not table.num_rows:
            continue
        tables.append(table)
        idx = table.column("idx")
        rows += pc.sum(pc.greater_equal(idx, 0)).as_py() or 0
        for name in table.filter(pc.equal(idx, SHARD_SHA256_IDX)).column("shard").to_pylist():
            done += 1
            log.info("%s | scanned %s; %d rows so far", progress.line(done), name, rows)
    return tables


def run_scan(cfg: FilterConfig, names: list[str]) -> pa.Table:
    import ray

    pool = cfg.compute.clip
    ds = ray.data.from_items([{"name": n} for n in names], override_num_blocks=len(names))
    ds = ds.map_batches(scan_shards, fn_kwargs={"cfg": to_dict(cfg)}, batch_size=1,
                        batch_format="numpy", num_cpus=cfg.compute.num_cpus)
    if cfg.clip.enabled:
        ds = ds.map_batches(ClipScorer, fn_constructor_kwargs={"cfg": to_dict(cfg)},
                            batch_size=pool.batch_size, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=pool.actors),
                            num_cpus=pool.num_cpus_per_actor, num_gpus=pool.num_gpus_per_actor)
    tables = _collect_with_progress(ds.iter_batches(batch_size=None, batch_format="pyarrow"), len(names))
    columns = [name for name, _ in _RECORD_FIELDS]  # without the CLIP-only columns
    if not tables:
        return pa.schema(_RECORD_FIELDS).empty_table()
    return pa.concat_tables([t.select(columns).cast(pa.schema(_RECORD_FIELDS)) for t in tables])
