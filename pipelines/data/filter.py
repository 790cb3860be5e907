"""Filter raw image-caption WebDataset shards into clean ones (jobs/filter_data.py).

Input: a download-stage folder of `NNNNN.tar` (per sample `KEY.jpg`, `KEY.txt`, `KEY.json`) with
`NNNNN_stats.json` beside each finished shard; a tar without its stats file is unfinished, skipped
and counted. Output: `NNNNN.tar` under the SAME name as its input shard, holding the kept samples'
original bytes unchanged, plus `filter_report.json`.

Three passes, so that deduplication is global across shards and names are deterministic:

1. scan (Ray Data, one task per input shard): per-row checks (caption, decode, size, aspect) and
   dedup signatures (sha256 of the decoded pixels, a 64-bit dHash, an 8x8 colour thumbnail).
   Optional CLIP scoring runs in an actor pool on the rows still alive. Only small per-row records
   come back to the driver, never pixels.
2. decide (driver): one pass in a fixed order (key, shard, position) drops duplicate keys, exact
   and near duplicates, keeping the first of each group; the result does not depend on how Ray
   scheduled the scan. Records are ~300 bytes a row, so ~10M rows need ~3 GB on the driver;
   beyond that, exact dedup would move to a Ray Data groupby on sha256.
3. write (Ray Data, one task per input shard): kept samples go to `<output>/.staging-<id>/NAME.tar`
   (committed atomically: pipelines/core/storage.py). The driver then commits: it removes the old report,
   moves staged shards into place, deletes other `.tar` files there, and the caller writes the new
   report last. All writes go to the output folder through pyarrow filesystems, so on a cluster it
   must be shared storage (a path mounted on every node, or an s3://-style URI).

Rerun rule: the report is the commit marker (the output is valid only while it says ok). A rerun
whose input shards (name, size, mtime) and filter settings match the committed report is a no-op;
any other rerun, or `force=true`, is a clean overwrite: nothing of the old output survives next to
the new one. A failed run (e.g. no rows left) commits no shards, but its report replaces the old
one, so the folder reads as unfinished until a run succeeds. One filter run per output folder at a
time (a run removes staging folders of crashed runs).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from PIL import Image, ImageOps

from pipelines.core import storage
from pipelines.core.compute import ActorPool
from pipelines.core.config import ConfigError, from_dict, to_dict
from pipelines.core.job import Stage
from pipelines.core.runtime import StageReport
from pipelines.data.shards import (
    KEY_FIELD,
    MTIME_FIELD,
    DownloadShards,
    download_shards,
    image_bytes,
    iter_tar_samples,
    open_rgb,
)

log = logging.getLogger("latentforge.filter")

REPORT_FILE = "filter_report.json"
STAGING_PREFIX = ".staging-"  # <output>/.staging-<id>/: one run's shards until the commit
STAGE_NAME = "filter"

# Every drop reason, in the order the checks run; a row is counted under the first that fails.
REASONS = (
    "missing_image", "caption_missing", "caption_not_utf8", "caption_empty", "caption_too_short",
    "caption_too_long", "undecodable_image", "image_too_small", "aspect_ratio", "clip_similarity",
    "duplicate_key", "exact_duplicate", "near_duplicate",
)


# ---------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class ImageChecks:
    min_side: int = 64  # pixels; applied to the stored image AND the original size in the json
    max_aspect: float = 3.0  # long side / short side
    # img2dataset's center_crop stores square images: the json's original_width/height is then the
    # only place an extreme aspect or an upscaled thumbnail shows. Falls back to the stored size.
    use_original_size: bool = True

    def __post_init__(self) -> None:
        _require(self.min_side >= 1, "image.min_side must be >= 1")
        _require(self.max_aspect >= 1.0, "image.max_aspect must be >= 1.0")


@dataclass(frozen=True)
class CaptionChecks:
    min_chars: int = 3  # after stripping surrounding whitespace
    max_chars: int = 1000

    def __post_init__(self) -> None:
        _require(1 <= self.min_chars <= self.max_chars, "caption: need 1 <= min_chars <= max_chars")


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True  # sha256 of decoded pixels (and size): re-encoded identical images match
    near: bool = False  # perceptual: dHash Hamming distance AND colour thumbnail distance
    max_hamming: int = 4  # of 64 dHash bits
    # dHash is grayscale and sign-only: a red and a blue circle at the same place hash alike.
    # A near duplicate must also match an 8x8 RGB thumbnail within this many levels (0-255).
    max_color_diff: int = 20

    def __post_init__(self) -> None:
        _require(0 <= self.max_hamming <= 15, "dedup.max_hamming must be in [0, 15]")
        _require(0 <= self.max_color_diff <= 255, "dedup.max_color_diff must be in [0, 255]")


@dataclass(frozen=True)
class ClipFilter:
    enabled: bool = False
    model: str = ""  # open_clip model name (or "tiny", this project's test config)
    weights: str = ""  # local checkpoint file: never downloaded
    min_similarity: float = 0.2  # cosine similarity of normalised image and text features

    def __post_init__(self) -> None:
        if self.enabled and not (self.model and self.weights):
            raise ConfigError("clip.enabled needs clip.model (an open_clip model name) and "
                              "clip.weights (a local weights file); this stage never downloads them")
        _require(-1.0 <= self.min_similarity <= 1.0, "clip.min_similarity must be in [-1, 1]")


@dataclass(frozen=True)
class FilterCompute:
    """How the work is spread; not part of the output's identity (see fingerprint)."""

    num_cpus: float = 0.5  # per scan/write task: fractional, or 2-CPU machines hang (measured on 2 cores)
    clip: ActorPool = field(default_factory=lambda: ActorPool(batch_size=64))  # the CLIP scorer, when enabled

    def __post_init__(self) -> None:
        _require(self.num_cpus > 0, "compute.num_cpus must be > 0")


@dataclass(frozen=True)
class FilterConfig:
    input_dir: str = ""  # raw shards: local path or pyarrow-filesystem URI (s3://...)
    output_dir: str = ""  # owned by this stage: other .tar files there are removed on commit
    force: bool = False  # recompute even when the committed output matches
    image: ImageChecks = field(default_factory=ImageChecks)
    caption: CaptionChecks = field(default_factory=CaptionChecks)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    clip: ClipFilter = field(default_factory=ClipFilter)
    compute: FilterCompute = field(default_factory=FilterCompute)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# ------------------------------------------------------------------------------- inputs

def check_inputs(cfg: FilterConfig) -> FilterConfig:
    """Driver-side checks before any Ray work; returns the config with absolute local paths."""
    _require(bool(cfg.input_dir), "input_dir is required (the download stage's output folder)")
    _require(bool(cfg.output_dir), "output_dir is required")
    # absolute in the driver: Ray workers run in other working directories
    cfg = replace(cfg, input_dir=storage.absolute(cfg.input_dir), output_dir=storage.absolute(cfg.output_dir))
    _require(cfg.input_dir.rstrip("/") != cfg.output_dir.rstrip("/"),
             "output_dir must differ from input_dir (the output folder is overwritten)")
    _require(storage.is_dir(cfg.input_dir), f"input_dir {cfg.input_dir} is not a directory")
    if cfg.clip.enabled:
        weights = storage.absolute(cfg.clip.weights)
        _require(os.path.isfile(weights), f"clip.weights {weights} is not a file")
        cfg = replace(cfg, clip=replace(cfg.clip, weights=weights))
    return cfg


# --------------------------------------------------------------------------------- tar reading

def iter_samples(uri: str) -> Iterator[dict[str, Any]]:
    """Samples of one tar in file order (pipelines/data/shards.py); a key that comes back later is
    a new sample (decide() drops the repeat)."""
    with storage.open_input(uri) as stream:
        yield from iter_tar_samples(stream)


# ------------------------------------------------------------------------------- row checks

def caption_check(raw: bytes | None, checks: CaptionChecks) -> tuple[str, str]:
    """-> (drop reason or "", decoded caption)."""
    if raw is None:
        return "caption_missing", ""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "caption_not_utf8", ""
    stripped = text.strip()
    if not stripped:
        return "caption_empty", ""
    if len(stripped) < checks.min_chars:
        return "caption_too_short", text
    if len(stripped) > checks.max_chars:
        return "caption_too_long", text
    return "", text


def _original_size(meta_bytes: bytes | None) -> tuple[int, int] | None:
    try:
        meta = json.loads(meta_bytes) if meta_bytes else None
        w, h = int(meta["original_width"]), int(meta["original_height"])
    except (ValueError, TypeError, KeyError):
        return None
    return (w, h) if w > 0 and h > 0 else None


def size_check(stored: tuple[int, int], original: tuple[int, int] | None, checks: ImageChecks) -> str:
    sizes = [stored] + ([original] if original and checks.use_original_size else [])
    if min(min(s) for s in sizes) < checks.min_side:
        return "image_too_small"
    w, h = sizes[-1]  # the original when known: cropping hides the aspect of what was downloaded
    return "aspect_ratio" if max(w, h) / min(w, h) > checks.max_aspect else ""


def decode_or_none(data: bytes) -> Image.Image | None:
    """An undecodable image is a dropped row here, not an error."""
    try:
        return open_rgb(data)
    except Exception:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
        return None


def pixel_sha256(img: Image.Image) -> bytes:
    return hashlib.sha256(f"{img.width}x{img.height}:".encode() + img.tobytes()).digest()


# Gray levels a cell must beat its left neighbour by to set a dHash bit. Without it, flat areas
# (white backgrounds) turn re-encoding noise of 1-2 levels into random bits: a JPEG q60 copy of a
# shape on white then differed by 11 bits; with it, by at most 3 (real gradients are larger).
DHASH_MARGIN = 4


def dhash(img: Image.Image) -> int:
    """64-bit difference hash: is each cell of a 9x8 gray thumbnail brighter than its left
    neighbour. BOX resampling averages whole areas, so a one-pixel edit barely moves a cell."""
    gray = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = ((gray[:, 1:] - gray[:, :-1]) > DHASH_MARGIN).reshape(-1)
    return int(np.packbits(bits).view(">u8")[0])


def color_thumb(img: Image.Image) -> bytes:
    return img.resize((8, 8), Image.Resampling.BOX).tobytes()  # 192 bytes, RGB


# ------------------------------------------------------------------------------- scan pass

_RECORD_FIELDS = [
    ("shard", pa.string()), ("idx", pa.int32()), ("key", pa.string()), ("reason", pa.string()),
    ("sha256", pa.binary()), ("dhash", pa.uint64()), ("thumb", pa.binary()),
    ("width", pa.int32()), ("height", pa.int32()), ("clip", pa.float32()),
]
_CLIP_FIELDS = [("caption", pa.string()), ("image", pa.binary())]  # only while CLIP needs them
SHARD_ERROR_IDX = -1  # a record with this idx reports a damaged tar (its key holds the error)


def analyze(sample: dict[str, Any], cfg: FilterConfig) -> dict[str, Any]:
    """One sample -> its record (reason "" = passed the per-row checks)."""
    rec = {"key": sample[KEY_FIELD], "reason": "", "sha256": b"", "dhash": 0, "thumb": b"",
           "width": 0, "height": 0, "clip": float("nan"), "caption": "", "image": b""}
    encoded = image_bytes(sample)
    if encoded is None:
        return {**rec, "reason": "missing_image"}
    reason, caption = caption_check(sample.get("txt"), cfg.caption)
    if reason:
        return {**rec, "reason": reason}
    img = decode_or_none(encoded)
    if img is None:
        return {**rec, "reason": "undecodable_image"}
    rec.update(width=img.width, height=img.height)
    reason = size_check(img.size, _original_size(sample.get("json")), cfg.image)
    if reason:
        return {**rec, "reason": reason}
    rec.update(sha256=pixel_sha256(img), dhash=dhash(img), thumb=color_thumb(img), caption=caption)
    if cfg.clip.enabled:
        rec["image"] = encoded
    return rec


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
        try:
            for idx, sample in enumerate(iter_samples(storage.join(config.input_dir, name))):
                records.append({**analyze(sample, config), "idx": idx})
                if len(records) == 512:
                    yield _records_table(name, records, config.clip.enabled)
                    records = []
        except (tarfile.TarError, OSError, EOFError) as err:
            # keep what was read; tell the driver the rest of this shard is unreadable
            records.append({"idx": SHARD_ERROR_IDX, "key": f"{type(err).__name__}: {err}",
                            "reason": "shard_read_error"})
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
        arrays = [np.asarray(ImageOps.fit(open_rgb(b), (w, h), Image.Resampling.BICUBIC))
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
    tables = [t for t in ray.get(list(ds.to_arrow_refs())) if t.num_rows]
    columns = [name for name, _ in _RECORD_FIELDS]  # without the CLIP-only columns
    if not tables:
        return pa.schema(_RECORD_FIELDS).empty_table()
    return pa.concat_tables([t.select(columns).cast(pa.schema(_RECORD_FIELDS)) for t in tables])


# ------------------------------------------------------------------------------- decide pass

class NearDuplicateIndex:
    """Finds a kept row within `max_hamming` dHash bits (and `max_color_diff` thumbnail levels)
    without comparing all pairs: the 64 bits are cut into max_hamming + 1 bands, and two hashes
    that close agree exactly on at least one band (pigeonhole), so only rows sharing a band value
    are compared, vectorised."""

    def __init__(self, max_hamming: int, max_color_diff: int, capacity: int = 1024) -> None:
        self.max_hamming, self.max_color_diff = max_hamming, max_color_diff
        bands = max_hamming + 1
        edges = [round(64 * i / bands) for i in range(bands + 1)]
        self.bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]
        self.buckets: list[dict[int, list[int]]] = [{} for _ in self.bands]
        self.hashes = np.zeros(capacity, np.uint64)
        self.thumbs = np.zeros((capacity, 192), np.int16)
        self.size = 0

    def _band_values(self, h: int) -> list[int]:
        return [(h >> shift) & mask for shift, mask in self.bands]

    def find(self, h: int, thumb: bytes) -> bool:
        """Is a near duplicate of (h, thumb) already kept?"""
        lists = [b[v] for b, v in zip(self.buckets, self._band_values(h)) if v in b]
        if not lists:
            return False
        cand = np.unique(np.concatenate(lists))
        close = cand[np.bitwise_count(self.hashes[cand] ^ np.uint64(h)) <= self.max_hamming]
        if not len(close):
            return False
        pixels = np.frombuffer(thumb, np.uint8).astype(np.int16)
        return bool((np.abs(self.thumbs[close] - pixels).max(axis=1) <= self.max_color_diff).any())

    def add(self, h: int, thumb: bytes) -> None:
        if self.size == len(self.hashes):  # grow by doubling
            self.hashes = np.concatenate([self.hashes, np.zeros_like(self.hashes)])
            self.thumbs = np.concatenate([self.thumbs, np.zeros_like(self.thumbs)])
        j, self.size = self.size, self.size + 1
        self.hashes[j] = h
        self.thumbs[j] = np.frombuffer(thumb, np.uint8)
        for bucket, value in zip(self.buckets, self._band_values(h)):
            bucket.setdefault(value, []).append(j)


def decide(records: pa.Table, dedup: DedupConfig) -> list[str]:
    """Final reason per record ("" = keep). Rows are visited by (key, shard, idx), so the first
    of every duplicate group in that order is the one kept, whatever the scan order was."""
    keys = records.column("key").to_pylist()
    shards = records.column("shard").to_pylist()
    idxs = records.column("idx").to_pylist()
    reasons = records.column("reason").to_pylist()
    shas = records.column("sha256").to_pylist()
    hashes = records.column("dhash").to_pylist()
    thumbs = records.column("thumb").to_pylist()
    near = NearDuplicateIndex(dedup.max_hamming, dedup.max_color_diff) if dedup.near else None
    seen_keys: set[str] = set()
    seen_sha: set[bytes] = set()
    for i in sorted(range(len(keys)), key=lambda i: (keys[i], shards[i], idxs[i])):
        if reasons[i]:
            continue
        if keys[i] in seen_keys:
            reasons[i] = "duplicate_key"
        elif dedup.exact and shas[i] in seen_sha:
            reasons[i] = "exact_duplicate"
        elif near is not None and near.find(hashes[i], thumbs[i]):
            reasons[i] = "near_duplicate"
        else:
            seen_keys.add(keys[i])
            seen_sha.add(shas[i])
            if near is not None:
                near.add(hashes[i], thumbs[i])
    return reasons


# ------------------------------------------------------------------------------- write pass

def write_shard(input_uri: str, output_uri: str, keep: set[int]) -> int:
    """Copy the samples at positions `keep` (original bytes, members sorted by extension) to
    `output_uri`, committed atomically: readers never see a partial tar."""
    with storage.atomic_output(output_uri) as stream, tarfile.open(fileobj=stream, mode="w|") as tar:
        return _copy_samples(input_uri, tar, keep)


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
    rows = [write_shard(storage.join(config.input_dir, name), storage.join(staging, name), set(keep.tolist()))
            for name, keep in zip(batch["name"], batch["keep"])]
    return {"name": batch["name"], "rows": np.asarray(rows, np.int64)}


def run_write(cfg: FilterConfig, plan: dict[str, list[int]], staging: str) -> dict[str, int]:
    import ray

    items = [{"name": name, "keep": keep} for name, keep in sorted(plan.items())]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(write_shards, fn_kwargs={"cfg": to_dict(cfg), "staging": staging},
                        batch_size=1, batch_format="numpy", num_cpus=cfg.compute.num_cpus)
    return {row["name"]: int(row["rows"]) for row in ds.take_all()}


# ------------------------------------------------------------------------------- orchestration

def report_path(cfg: FilterConfig) -> str:
    return storage.join(cfg.output_dir, REPORT_FILE)


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


def _remove_staging_dirs(output_dir: str) -> None:
    """Staging folders of crashed runs (one run per output folder, so none is live)."""
    for name, info in storage.list_dir(output_dir).items():
        if info.type == pafs.FileType.Directory and name.startswith(STAGING_PREFIX):
            storage.remove_dir(storage.join(output_dir, name))


def commit(cfg: FilterConfig, staging: str, written: dict[str, int]) -> None:
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
    written = _write_and_commit(cfg, plan)
    if sum(written.values()) != report.rows_out:
        report.fail(f"wrote {sum(written.values())} rows but decided to keep {report.rows_out}: "
                    f"an input shard changed during the run; rerun")
    seconds = time.time() - started
    report.details.update(output_shards=[{"name": n, "rows": r} for n, r in sorted(written.items())],
                          scan_seconds=round(scanned - started, 3),
                          rows_per_second=round(report.rows_in / max(seconds, 1e-9), 1))
    return report


def _write_and_commit(cfg: FilterConfig, plan: dict[str, list[int]]) -> dict[str, int]:
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


STAGE = Stage(STAGE_NAME, FilterConfig, run=run_filter, report_path=report_path, check=check_inputs)
