"""The feature directory: shard provenance and the "same encoders?" check, the empty caption, the
assembler that commits one Parquet shard per input shard, and the manifest."""

from __future__ import annotations

import json
import logging
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core import storage
from pipelines.core.config import ConfigError, config_differences, to_dict
from pipelines.core.progress import Progress
from pipelines.core.runtime import upstream_report
from pipelines.data import schema
from pipelines.data.filter.config import REPORT_FILE as FILTER_REPORT
from pipelines.data.precompute.config import PrecomputeConfig
from pipelines.data.precompute.encode import EncoderInfo
from pipelines.data.precompute.rows import (
    CAPTION_TOKENS,
    DROP_REASON,
    LAST,
    ORDINAL,
    ROWS_LOST,
    SHARD,
    UNREADABLE_SHARD,
    row_arrays,
)

log = logging.getLogger("latentforge.precompute")


class FeatureMismatchError(ConfigError):
    """The output directory holds features made differently from what the config asks for."""


@dataclass(frozen=True)
class InputShard:
    """One input tar as the filter stage committed it: its content identity is the sha256 the filter computed
    while writing it (recorded in filter_report.json), so a rerun knows which inputs changed without reading
    every tar again."""

    name: str
    sha256: str
    rows: int  # samples in it: what a damaged copy lost is counted against this


def filter_inputs(input_dir: str) -> list[InputShard]:
    """The filter folder's shards, sorted by name (positions are shard indices), from its report, which must say
    ok and list each shard's sha256; each listed tar must be there. ConfigError (exit 2) otherwise."""
    report = upstream_report(input_dir, FILTER_REPORT, "filter", "jobs/filter_data.py")
    listed = report.get("output_shards") or []
    if not listed or not all(isinstance(s, dict) and s.get("sha256") for s in listed):
        raise ConfigError(f"{storage.join(input_dir, FILTER_REPORT)} lists no shards with their sha256 (written "
                          f"by an older version): rerun jobs/filter_data.py")
    present = storage.list_files(input_dir, suffix=".tar")
    missing = sorted(s["name"] for s in listed if s["name"] not in present)
    if missing:
        raise ConfigError(f"{input_dir} lacks {missing[:3]} that its {FILTER_REPORT} lists: the folder changed "
                          f"after the filter committed it; rerun jobs/filter_data.py")
    return [InputShard(s["name"], s["sha256"], int(s.get("rows", 0))) for s in sorted(listed, key=lambda s: s["name"])]


def is_current(provenance: dict[str, Any], source: InputShard) -> bool:
    """Was this feature shard made from exactly this input (name and content)?"""
    return provenance.get("source") == source.name and provenance.get("source_sha256") == source.sha256


def run_spec(cfg: PrecomputeConfig, info: EncoderInfo) -> dict[str, Any]:
    """What must be equal for two shards to belong in one feature directory."""
    return {"format_version": schema.FORMAT_VERSION, "image_size": cfg.image_size,
            "vae_id": info.vae["id"], "text_encoder_id": info.text_encoder["id"],
            "latent_shape": list(info.latent_shape), "text_shape": list(info.text_shape),
            "buckets": [list(b) for b in cfg.bucket_list()], "flip": cfg.flip}


def read_provenance(location: str) -> dict[str, Any]:
    fs, path = storage.resolve(location)
    metadata = pq.read_schema(path, filesystem=fs).metadata or {}
    if schema.SHARD_PROVENANCE_KEY not in metadata:
        raise FeatureMismatchError(f"{location} has no precompute provenance: it was not written by this stage")
    return json.loads(metadata[schema.SHARD_PROVENANCE_KEY])


def finished_shards(output_dir: str) -> dict[int, dict[str, Any]]:
    """{shard index: provenance} of every committed feature shard in the output directory."""
    found = {}
    for name in storage.list_files(output_dir, suffix=schema.SHARD_SUFFIX):
        if name.startswith(schema.SHARD_PREFIX):
            index = int(name[len(schema.SHARD_PREFIX):-len(schema.SHARD_SUFFIX)])
            found[index] = read_provenance(storage.join(output_dir, name))
    return found


def check_compatible(spec: dict[str, Any], finished: dict[int, dict[str, Any]], output_dir: str) -> None:
    """Raise FeatureMismatchError when existing outputs were made by other encoders or at another size (a
    changed input is no mismatch: its shard is redone)."""
    problems = []
    for index, provenance in sorted(finished.items()):
        recorded = {k: provenance.get(k) for k in spec}
        problems += [f"{schema.shard_name(index)} {d}" for d in config_differences(recorded, spec)]
    manifest_path = storage.join(output_dir, schema.MANIFEST_FILE)
    if storage.is_file(manifest_path):
        manifest = storage.read_json(manifest_path)
        found = {"format_version": manifest.get("format_version"), "image_size": manifest.get("image_size"),
                 "vae_id": manifest.get("vae", {}).get("id"),
                 "text_encoder_id": manifest.get("text_encoder", {}).get("id"),
                 "latent_shape": manifest.get("latent_shape"), "text_shape": manifest.get("text_shape"),
                 "buckets": manifest.get("buckets") or [[manifest.get("image_size")] * 2],
                 "flip": manifest.get("flip", False)}
        problems += [f"{schema.MANIFEST_FILE} {d}" for d in config_differences(found, spec)]
    if problems:
        shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise FeatureMismatchError(
            f"output_dir {output_dir} already holds features that do not match this config:\n  {shown}\n"
            f"Features from different encoders must not mix: use a new output_dir, or the "
            f"original encoder settings.")


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ of a safetensors blob (8-byte little-endian header length, then JSON)."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]).get("__metadata__", {})


def write_empty_caption(output_dir: str, info: EncoderInfo) -> None:
    """Store the empty caption's states + mask once; an existing file must come from the same encoder."""
    import torch
    from safetensors.torch import save

    path = storage.join(output_dir, schema.EMPTY_CAPTION_FILE)
    text_id = info.text_encoder["id"]
    if storage.is_file(path):
        found = safetensors_metadata(storage.read_bytes(path)).get("text_encoder_id")
        if found != text_id:
            raise FeatureMismatchError(f"{path} was made by text encoder {found!r}, config gives {text_id!r}")
        return
    blob = save({schema.EMPTY_CAPTION_STATES: torch.from_numpy(info.empty_states.copy()),  # (L, D) float16
                 schema.EMPTY_CAPTION_MASK: torch.from_numpy(info.empty_mask.copy())},  # (L,) bool
                metadata={"text_encoder_id": text_id})
    storage.write_bytes(path, blob)


# --------------------------------------------------------------------------------------------
# assembling and committing output shards (driver)
# --------------------------------------------------------------------------------------------


class ShardAssembler:
    """Collects encoded rows per input shard and commits each shard once all its rows have arrived."""

    def __init__(self, output_dir: str, inputs: list[InputShard], pending: int,
                 prepare: Callable[[], tuple[dict[str, Any], schema.FeatureShapes]]) -> None:
        self.output_dir, self.inputs, self.prepare = output_dir, inputs, prepare
        self.progress = Progress(pending, "shards")
        self.spec: dict[str, Any] | None = None
        self.shapes: schema.FeatureShapes | None = None
        self.parts: dict[int, list[dict[str, np.ndarray]]] = {}
        self.ordinals: dict[int, set[int]] = {}
        self.expected: dict[int, int] = {}
        self.committed: list[dict[str, Any]] = []
        self.done: set[int] = set()

    def ready(self) -> None:
        """Check and prepare the output once, before the first commit (see run_precompute)."""
        if self.spec is None:
            self.spec, self.shapes = self.prepare()

    def add(self, batch: dict[str, np.ndarray]) -> None:
        self.ready()
        shards = batch[SHARD]
        for shard in np.unique(shards).tolist():
            if shard in self.done:  # a row resent by a retried task after its shard was committed
                continue
            part = {name: values[shards == shard] for name, values in batch.items()}
            for name in self.shapes.latent_columns():  # B arrays: shards mix buckets, so their shapes
                part[name] = row_arrays(part[name])
            self.parts.setdefault(shard, []).append(part)
            self.ordinals.setdefault(shard, set()).update(part[ORDINAL].tolist())
            if part[LAST].any():
                self.expected[shard] = int(part[ORDINAL][part[LAST]].max()) + 1
            if len(self.ordinals[shard]) == self.expected.get(shard):
                self.commit(shard)

    def finish(self, pending: list[int]) -> None:
        """The stream ended: every pending shard is complete (an empty tar never produced a row)."""
        self.ready()
        for shard in pending:
            if shard in self.expected and len(self.ordinals[shard]) != self.expected[shard]:
                raise RuntimeError(f"{self.inputs[shard].name}: {len(self.ordinals[shard])} of "
                                   f"{self.expected[shard]} rows arrived")
            if shard not in self.done:
                self.commit(shard)

    def commit(self, shard: int) -> None:
        rows = _merge_parts(self.parts.pop(shard, []))
        reasons = rows.get(DROP_REASON, np.array([], dtype=object))
        kept = reasons == ""
        provenance = {**self.spec, "source": self.inputs[shard].name, "source_sha256": self.inputs[shard].sha256,
                      **_counts(rows, reasons, kept, context_length=self.shapes.text[0])}
        table = self._table(rows, kept)
        provenance["bucket_rows"] = schema.bucket_counts(table, self.shapes)
        table = table.replace_schema_metadata({schema.SHARD_PROVENANCE_KEY: json.dumps(provenance).encode()})
        # the commit: the final name appears only when the file is complete
        with storage.atomic_output(storage.join(self.output_dir, schema.shard_name(shard))) as stream:
            pq.write_table(table, stream, **schema.PARQUET_WRITE_OPTIONS)
        self.committed.append({"index": shard, **provenance})
        self.done.add(shard)
        log.info("%s | committed %s: %d rows (%d dropped) from %s", self.progress.line(len(self.committed)),
                 schema.shard_name(shard), provenance["rows"], provenance["rows_in"] - provenance["rows"],
                 self.inputs[shard].name)

    def _table(self, rows: dict[str, np.ndarray], kept: np.ndarray) -> pa.Table:
        if not rows:
            return self.shapes.arrow_schema().empty_table()
        flipped = (rows[schema.LATENT_MEAN_FLIPPED][kept], rows[schema.LATENT_LOGVAR_FLIPPED][kept]) \
            if self.shapes.flip else None
        return schema.to_table(
            self.shapes, [str(k) for k in rows[schema.KEY][kept]], [str(c) for c in rows[schema.CAPTION][kept]],
            rows[schema.LATENT_MEAN][kept], rows[schema.LATENT_LOGVAR][kept],
            rows[schema.TEXT_STATES][kept], rows[schema.TEXT_LENGTH][kept],
            buckets=np.stack([rows[schema.BUCKET_HEIGHT][kept], rows[schema.BUCKET_WIDTH][kept]], axis=1),
            flipped=flipped)


def _counts(rows: dict[str, np.ndarray], reasons: np.ndarray, kept: np.ndarray,
            context_length: int) -> dict[str, Any]:
    """A shard's provenance counts: rows in / out, dropped per reason (an unreadable_shard marker counts the
    rows it stands for), captions the text encoder cut to its context length, and the damage if any."""
    marker = reasons == UNREADABLE_SHARD
    lost = int(rows[ROWS_LOST][marker].sum()) if marker.any() else 0
    dropped = Counter(reasons[~kept & ~marker].tolist())
    if lost:
        dropped[UNREADABLE_SHARD] = lost
    counts = {"rows_in": int((~marker).sum()) + lost, "rows": int(kept.sum()), "dropped": dict(dropped),
              "captions_truncated": int((rows[CAPTION_TOKENS][kept] > context_length).sum()) if rows else 0}
    if marker.any():
        counts["damaged"] = {"error": str(rows[schema.CAPTION][marker][0]), "rows_lost": lost}
    return counts


def _merge_parts(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate a shard's batches, in tar order, each ordinal once (a retried task may resend rows)."""
    if not parts:
        return {}
    merged = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    _, first = np.unique(merged[ORDINAL], return_index=True)  # sorted by ordinal
    return {name: values[first] for name, values in merged.items()}


def build_manifest(cfg: PrecomputeConfig, info: EncoderInfo, finished: dict[int, dict[str, Any]]) -> schema.Manifest:
    shards = tuple({"name": schema.shard_name(i), "rows": p["rows"], "bucket_rows": p["bucket_rows"],
                    "rows_in": p["rows_in"], "source": p["source"], "source_sha256": p.get("source_sha256")}
                   for i, p in sorted(finished.items()))
    return schema.Manifest(
        image_size=cfg.image_size, latent_shape=info.latent_shape, text_shape=info.text_shape,
        vae=info.vae, text_encoder=info.text_encoder, shards=shards, buckets=cfg.bucket_list(), flip=cfg.flip,
        extra={"input_dir": cfg.input_dir, "config": _recorded_config(cfg)})


def _recorded_config(cfg: PrecomputeConfig) -> dict[str, Any]:
    """The config as the manifest records it: a local VAE directory made absolute, so trainers and
    evaluators started from another working directory rebuild the same encoders from it."""
    config = to_dict(cfg)
    del config["mlflow"]  # where the report is logged is no part of what the features are
    source = cfg.vae.source
    if source != "tiny":  # a local directory (validate refuses URIs)
        config["vae"]["source"] = str(Path(source).resolve())
    return config


def prepare_output(cfg: PrecomputeConfig, info: EncoderInfo, changes: bool,
                   vanished: list[int]) -> tuple[dict[str, Any], schema.FeatureShapes]:
    """Before the first commit: existing outputs must come from the same encoders (else
    FeatureMismatchError, nothing written). When this run changes the folder (`changes`: shards to
    write or remove), the report and the manifest go first, so until the run ends the folder reads as
    unfinished (Manifest.load refuses it) instead of as the old, stale one; then the shards of inputs
    that are gone (`vanished`) and a killed run's temporary files go, and the empty caption is stored."""
    spec = run_spec(cfg, info)
    check_compatible(spec, finished_shards(cfg.output_dir), cfg.output_dir)
    if changes:
        storage.remove(storage.join(cfg.output_dir, schema.REPORT_FILE))
        storage.remove(storage.join(cfg.output_dir, schema.MANIFEST_FILE))
    for index in vanished:
        storage.remove(storage.join(cfg.output_dir, schema.shard_name(index)))
        log.info("removed %s: its input shard is gone from the filter's output", schema.shard_name(index))
    removed = storage.remove_temporaries(cfg.output_dir)
    write_empty_caption(cfg.output_dir, info)
    log.info("output %s checked against vae %s and text encoder %s; %d stale temporary files removed",
             cfg.output_dir, info.vae["id"], info.text_encoder["id"], removed)
    return spec, info.feature_shapes(cfg)
