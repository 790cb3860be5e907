"""The ONE place for the feature-shard format: column names, dtypes, shapes and manifest fields.

A feature directory holds:
    part-00000.parquet ...     rows of (key, caption, bucket, latent moments, text states, text length)
    manifest.json              what produced them and how to read them (Manifest below)
    empty_caption.safetensors  the empty caption's text states + mask, for classifier-free guidance

Aspect-ratio buckets (pipelines/data/buckets.py). Each row records its bucket: the (height, width) in pixels
its image was cropped to before the VAE encoded it. Its latents have that bucket's shape,
(C, height / f, width / f) with f the VAE's downsampling (FeatureShapes.latent_of). The manifest lists the
bucket set (square data: the one bucket (image_size, image_size)) and, per shard, how many rows each bucket
has. Within a shard the rows are grouped by bucket, in the manifest's bucket order, so a bucket's rows in a
shard are one contiguous run: a reader finds them from the manifest alone. With `flip`, each row also holds
the moments of its horizontally flipped image.

Arrays are stored flat as lists of float16 (reading the rows of one bucket back is a zero-copy reshape): the
latents as variable-size lists (their size is the bucket's), the text states as fixed-size ones. The text
mask is stored as a length: the text encoder's mask is always a prefix (SOT..EOT).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from pipelines.core import storage

# 2: aspect-ratio buckets (bucket columns, latents as variable-size lists, rows per bucket per shard)
FORMAT_VERSION = 2

KEY = "key"  # the sample's id from the download stage (img2dataset's key)
CAPTION = "caption"
BUCKET_HEIGHT = "bucket_height"  # the row's bucket: its image's height in pixels as the VAE encoded it
BUCKET_WIDTH = "bucket_width"  # ... and its width
LATENT_MEAN = "latent_mean"  # VAE posterior mean, raw VAE space (unscaled), (C, h, w) of the row's bucket
LATENT_LOGVAR = "latent_logvar"  # VAE posterior log-variance, (C, h, w)
LATENT_MEAN_FLIPPED = "latent_mean_flipped"  # the same for the horizontally flipped image (only with flip)
LATENT_LOGVAR_FLIPPED = "latent_logvar_flipped"
TEXT_STATES = "text_states"  # per-token text encoder states, (L, D)
TEXT_LENGTH = "text_length"  # number of real tokens (SOT..EOT inclusive); the mask is arange(L) < length

FEATURE_DTYPE = np.float16
MANIFEST_FILE = "manifest.json"
# The precompute stage's report (its verdict). A feature directory whose report says the run failed is not
# read; one without a report (written in process, e.g. pipelines/synthetic/features.py) is read by its manifest.
REPORT_FILE = "precompute_report.json"
EMPTY_CAPTION_FILE = "empty_caption.safetensors"
SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".parquet"
# Parquet footer (schema metadata) key of a shard's provenance JSON: the encoder ids and shapes it
# was made with, its source tar, rows in / out / dropped. Shards describe themselves, so a rerun can
# check and skip them, and the manifest can be rebuilt from the finished shards alone.
SHARD_PROVENANCE_KEY = b"latentforge.precompute"

# Tensors inside EMPTY_CAPTION_FILE: one caption, unbatched, float16 states like the shards.
EMPTY_CAPTION_STATES = TEXT_STATES  # (L, D)
EMPTY_CAPTION_MASK = "text_mask"  # (L,) bool, True = real token (SOT..EOT)


# Dictionary encoding buys nothing for float arrays and makes reading them ~2.7x slower
# (measured with bench/loader.py), so feature shards are written without it. Row groups of 256 rows
# (~55 MB at 512 px with 1024-wide text states) are the unit a training rank reads of a shard it shares
# with a neighbour rank.
ROW_GROUP_ROWS = 256
PARQUET_WRITE_OPTIONS = {"use_dictionary": False, "row_group_size": ROW_GROUP_ROWS}


def shard_name(index: int) -> str:
    """Deterministic shard names: the same input shard always gives the same output name."""
    return f"{SHARD_PREFIX}{index:05d}{SHARD_SUFFIX}"


Bucket = tuple[int, int]  # (height, width) in pixels, as pipelines/data/buckets.py makes them


@dataclass(frozen=True)
class FeatureShapes:
    latent: tuple[int, int, int]  # (C, h, w) of the square bucket (image_size x image_size)
    text: tuple[int, int]  # (L, D)
    image_size: int  # the square bucket's side in pixels
    buckets: tuple[Bucket, ...] = ()  # every bucket, in the order a shard groups its rows; (): the square alone
    flip: bool = False  # rows also hold the flipped image's moments

    @property
    def bucket_list(self) -> tuple[Bucket, ...]:
        return tuple((int(h), int(w)) for h, w in self.buckets) or ((self.image_size, self.image_size),)

    def latent_of(self, bucket: Sequence[int]) -> tuple[int, int, int]:
        """(C, h, w) of a bucket's latents: its pixels over the VAE's downsampling."""
        channels, h, w = self.latent
        return (channels, int(bucket[0]) * h // self.image_size, int(bucket[1]) * w // self.image_size)

    def latent_columns(self) -> tuple[str, ...]:
        flipped = (LATENT_MEAN_FLIPPED, LATENT_LOGVAR_FLIPPED) if self.flip else ()
        return (LATENT_MEAN, LATENT_LOGVAR, *flipped)

    def arrow_schema(self) -> pa.Schema:
        text_n = int(np.prod(self.text))
        return pa.schema([
            (KEY, pa.string()),
            (CAPTION, pa.string()),
            (BUCKET_HEIGHT, pa.int16()),
            (BUCKET_WIDTH, pa.int16()),
            *[(name, pa.list_(pa.float16())) for name in self.latent_columns()],
            (TEXT_STATES, pa.list_(pa.float16(), text_n)),
            (TEXT_LENGTH, pa.int16()),
        ])


def _fixed_list(array: np.ndarray, per_row: int) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(array, dtype=FEATURE_DTYPE).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float16()), per_row)


def _variable_list(rows: Sequence[np.ndarray]) -> pa.ListArray:
    sizes = np.array([np.size(r) for r in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    flat = np.concatenate([np.asarray(r, dtype=FEATURE_DTYPE).reshape(-1) for r in rows]) if len(rows) \
        else np.zeros(0, FEATURE_DTYPE)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, type=pa.float16()))


def to_table(shapes: FeatureShapes, keys: list[str], captions: list[str], latent_mean: Sequence[np.ndarray],
             latent_logvar: Sequence[np.ndarray], text_states: np.ndarray, text_length: np.ndarray,
             buckets: np.ndarray | None = None,
             flipped: tuple[Sequence[np.ndarray], Sequence[np.ndarray]] | None = None) -> pa.Table:
    """Rows -> an Arrow table in the feature schema, grouped by bucket in shapes.bucket_list order (stable).

    latent_mean, latent_logvar (and flipped = (mean, logvar), given exactly when shapes.flip): a (B, C, h, w)
    array or B arrays of each row's (C, h, w). buckets: (B, 2) (height, width) per row; None: every row in the
    square bucket. Shapes are checked: each row's latents must have its bucket's shape."""
    batch = len(keys)
    square = (shapes.image_size, shapes.image_size)
    rows_bucket = np.asarray(buckets if buckets is not None else [square] * batch, dtype=np.int64).reshape(batch, 2)
    index = {b: i for i, b in enumerate(shapes.bucket_list)}
    row_index = [index.get((int(h), int(w)), -1) for h, w in rows_bucket]
    if -1 in row_index:
        unknown = sorted({tuple(map(int, b)) for b, i in zip(rows_bucket, row_index) if i < 0})
        raise ValueError(f"rows of bucket(s) {unknown}, which are not in the bucket set {shapes.bucket_list}")
    if (flipped is not None) != shapes.flip:
        raise ValueError(f"flipped moments {'given' if flipped is not None else 'missing'}, but shapes.flip is "
                         f"{shapes.flip}")
    latents = {LATENT_MEAN: latent_mean, LATENT_LOGVAR: latent_logvar}
    if flipped is not None:
        latents.update({LATENT_MEAN_FLIPPED: flipped[0], LATENT_LOGVAR_FLIPPED: flipped[1]})
    for name, values in latents.items():
        if len(values) != batch:
            raise ValueError(f"{name}: expected {batch} rows, got {len(values)}")
        for row, bucket in zip(values, rows_bucket):
            if tuple(np.shape(row)) != shapes.latent_of(bucket):
                raise ValueError(f"{name}: expected shape {shapes.latent_of(bucket)} for bucket "
                                 f"{tuple(map(int, bucket))}, got {tuple(np.shape(row))}")
    for name, values, shape in ((TEXT_STATES, text_states, (batch, *shapes.text)),
                                (TEXT_LENGTH, text_length, (batch,))):
        if tuple(np.shape(values)) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(np.shape(values))}")
    order = np.argsort(np.asarray(row_index, dtype=np.int64), kind="stable")  # (B,): grouped by bucket
    return pa.Table.from_arrays([
        pa.array([keys[i] for i in order], pa.string()),
        pa.array([captions[i] for i in order], pa.string()),
        pa.array(rows_bucket[order, 0].astype(np.int16), pa.int16()),
        pa.array(rows_bucket[order, 1].astype(np.int16), pa.int16()),
        *[_variable_list([values[i] for i in order]) for values in latents.values()],
        _fixed_list(np.asarray(text_states)[order], int(np.prod(shapes.text))),
        pa.array(np.asarray(text_length, dtype=np.int16)[order], pa.int16()),
    ], schema=shapes.arrow_schema())


def bucket_counts(table: pa.Table, shapes: FeatureShapes) -> list[int]:
    """Rows per bucket of a table in the feature schema, in shapes.bucket_list order."""
    heights = table.column(BUCKET_HEIGHT).to_numpy()
    widths = table.column(BUCKET_WIDTH).to_numpy()
    return [int(((heights == h) & (widths == w)).sum()) for h, w in shapes.bucket_list]


def column_array(table: pa.Table, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A list column whose rows all hold `shape` (any fixed-size column; a latent column: the rows of one
    bucket) -> numpy (rows, *shape) without copying when possible."""
    column = table.column(name).combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), *shape)


@dataclass(frozen=True)
class Manifest:
    """What a feature directory holds and how it was made. Trainers check it against the model."""

    image_size: int
    latent_shape: tuple[int, int, int]  # (C, h, w) of the square bucket
    text_shape: tuple[int, int]
    vae: dict[str, Any]  # id, scaling_factor, shift_factor, latent_channels, downsample_factor
    text_encoder: dict[str, Any]  # id, width, context_length, layer
    # ({"name": "part-00000.parquet", "rows": 123, "bucket_rows": [rows of each bucket, in bucket order]}, ...)
    shards: tuple[dict[str, Any], ...] = ()
    buckets: tuple[Bucket, ...] = ()  # (height, width) pixels, the order rows are grouped in; (): the square
    flip: bool = False  # rows hold the flipped image's moments too
    empty_caption_file: str = EMPTY_CAPTION_FILE
    feature_dtype: str = "float16"
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # provenance: inputs, config, timings

    @property
    def shapes(self) -> FeatureShapes:
        return FeatureShapes(tuple(self.latent_shape), tuple(self.text_shape), self.image_size,
                             tuple(tuple(b) for b in self.buckets), self.flip)

    @property
    def bucket_list(self) -> tuple[Bucket, ...]:
        return self.shapes.bucket_list

    def shard_bucket_rows(self) -> np.ndarray:
        """(shards, buckets) int64: each shard's rows per bucket. A shard without the entry holds only the
        square bucket (a one-bucket manifest); with several buckets it is an error."""
        counts = []
        for shard in self.shards:
            rows = shard.get("bucket_rows")
            if rows is None:
                if len(self.bucket_list) > 1:
                    raise ValueError(f"{MANIFEST_FILE}: shard {shard.get('name')} has no bucket_rows, and the "
                                     f"features have {len(self.bucket_list)} buckets")
                rows = [shard["rows"]]
            if len(rows) != len(self.bucket_list) or sum(rows) != int(shard["rows"]):
                raise ValueError(f"{MANIFEST_FILE}: shard {shard.get('name')} bucket_rows {rows} does not fit "
                                 f"{len(self.bucket_list)} buckets and {shard['rows']} rows")
            counts.append([int(r) for r in rows])
        return np.array(counts, dtype=np.int64).reshape(len(self.shards), len(self.bucket_list))

    @property
    def scaling_factor(self) -> float:
        return float(self.vae["scaling_factor"])

    @property
    def shift_factor(self) -> float:
        return float(self.vae.get("shift_factor") or 0.0)

    @property
    def total_rows(self) -> int:
        return sum(int(s["rows"]) for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_rows": self.total_rows}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Manifest":
        values = {k: v for k, v in values.items() if k != "total_rows"}
        if values.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"feature manifest format_version {values.get('format_version')} is not "
                             f"{FORMAT_VERSION}: rerun precompute_latents with this version")
        values["latent_shape"] = tuple(values["latent_shape"])
        values["text_shape"] = tuple(values["text_shape"])
        values["shards"] = tuple(values.get("shards", ()))
        values["buckets"] = tuple(tuple(b) for b in values.get("buckets", ()))
        return cls(**values)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Manifest":
        """The manifest of a finished feature directory (local path or URI); a clear error if it is absent or
        the precompute report says the run failed (ValueError)."""
        path = storage.join(directory, MANIFEST_FILE)
        if not storage.is_file(path):
            raise FileNotFoundError(f"{path} not found: {directory} is not a finished feature directory "
                                    f"(run jobs/precompute_latents.py first)")
        report_path = storage.join(directory, REPORT_FILE)
        if storage.is_file(report_path):
            report = storage.read_json(report_path)
            if not report.get("ok"):
                raise ValueError(f"{report_path} says the precompute failed ({report.get('error')}): fix that and "
                                 f"rerun jobs/precompute_latents.py")
        return cls.from_dict(storage.read_json(path))

    def save(self, directory: str | os.PathLike) -> None:
        """Committed atomically: readers see the old manifest or the complete new one. An identical
        manifest is left as it is, so a no-op rerun changes no file."""
        path = storage.join(directory, MANIFEST_FILE)
        if storage.is_file(path) and storage.read_json(path) == json.loads(json.dumps(self.to_dict())):
            return
        storage.write_json(path, self.to_dict())
