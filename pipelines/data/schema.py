"""The ONE place for the feature-shard format: column names, dtypes, shapes and manifest fields.

A feature directory holds:
    part-00000.parquet ...     rows of (key, caption, latent moments, text states, text length)
    manifest.json              what produced them and how to read them (Manifest below)
    empty_caption.safetensors  the empty caption's text states + mask, for classifier-free guidance

Arrays are stored flat as fixed-size lists of float16 (reading them back is a zero-copy reshape).
The text mask is stored as a length: the text encoder's mask is always a prefix (SOT..EOT).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.core import storage

FORMAT_VERSION = 1

KEY = "key"  # the sample's id from the download stage (img2dataset's key)
CAPTION = "caption"
LATENT_MEAN = "latent_mean"  # VAE posterior mean, raw VAE space (unscaled), (C, h, w)
LATENT_LOGVAR = "latent_logvar"  # VAE posterior log-variance, (C, h, w)
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


@dataclass(frozen=True)
class FeatureShapes:
    latent: tuple[int, int, int]  # (C, h, w)
    text: tuple[int, int]  # (L, D)

    def arrow_schema(self) -> pa.Schema:
        latent_n, text_n = int(np.prod(self.latent)), int(np.prod(self.text))
        return pa.schema([
            (KEY, pa.string()),
            (CAPTION, pa.string()),
            (LATENT_MEAN, pa.list_(pa.float16(), latent_n)),
            (LATENT_LOGVAR, pa.list_(pa.float16(), latent_n)),
            (TEXT_STATES, pa.list_(pa.float16(), text_n)),
            (TEXT_LENGTH, pa.int16()),
        ])


def _fixed_list(array: np.ndarray, per_row: int) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(array, dtype=FEATURE_DTYPE).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float16()), per_row)


def to_table(shapes: FeatureShapes, keys: list[str], captions: list[str], latent_mean: np.ndarray,
             latent_logvar: np.ndarray, text_states: np.ndarray, text_length: np.ndarray) -> pa.Table:
    """Numpy batches (B, ...) -> an Arrow table in the feature schema (shapes are checked)."""
    batch = len(keys)
    expected = {LATENT_MEAN: (batch, *shapes.latent), LATENT_LOGVAR: (batch, *shapes.latent),
                TEXT_STATES: (batch, *shapes.text), TEXT_LENGTH: (batch,)}
    given = {LATENT_MEAN: latent_mean, LATENT_LOGVAR: latent_logvar, TEXT_STATES: text_states,
             TEXT_LENGTH: text_length}
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(given[name].shape)}")
    latent_n, text_n = int(np.prod(shapes.latent)), int(np.prod(shapes.text))
    return pa.Table.from_arrays([
        pa.array(keys, pa.string()),
        pa.array(captions, pa.string()),
        _fixed_list(latent_mean, latent_n),
        _fixed_list(latent_logvar, latent_n),
        _fixed_list(text_states, text_n),
        pa.array(np.asarray(text_length, dtype=np.int16), pa.int16()),
    ], schema=shapes.arrow_schema())


def column_array(table: pa.Table, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed-size-list column -> numpy (rows, *shape) without copying when possible."""
    column = table.column(name).combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), *shape)


@dataclass(frozen=True)
class Manifest:
    """What a feature directory holds and how it was made. Trainers check it against the model."""

    image_size: int
    latent_shape: tuple[int, int, int]
    text_shape: tuple[int, int]
    vae: dict[str, Any]  # id, scaling_factor, shift_factor, latent_channels, downsample_factor
    text_encoder: dict[str, Any]  # id, width, context_length, layer
    shards: tuple[dict[str, Any], ...] = ()  # ({"name": "part-00000.parquet", "rows": 123}, ...)
    empty_caption_file: str = EMPTY_CAPTION_FILE
    feature_dtype: str = "float16"
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # provenance: inputs, config, timings

    @property
    def shapes(self) -> FeatureShapes:
        return FeatureShapes(tuple(self.latent_shape), tuple(self.text_shape))

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
