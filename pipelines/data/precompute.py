"""Precompute stage: filtered WebDataset shards -> Parquet feature shards + manifest.json.

One streaming Ray Data pipeline runs over every input shard that has no finished output yet:

    from_items(pending shards, one block each)
      -> map_batches(read_and_decode)   tasks, fractional CPU: tar -> rows (key, caption, image (3,S,S) in [-1,1])
      -> map_batches(EncoderActor)      ActorPoolStrategy(size=n), num_gpus per actor: VAE moments + text states
      -> driver: _ShardAssembler        buffers rows per input shard, commits a shard once all its rows arrived

Why this shape:
- One output shard per input shard (part-NNNNN from the sorted tar list) gives deterministic names,
  and each output shard has exactly one writer (the driver), so "write a temporary name, then rename"
  commits it atomically. A rerun skips shards whose final name exists; nothing is ever appended.
- One pipeline for all shards (not one per shard) keeps the encoder actors alive: loading the models
  dominates small runs.
- Completeness without counting tars first: the reader numbers each tar's samples (ordinal) and flags the
  last one, so a shard is complete when ordinals 0..last have all arrived, in whatever order Ray delivers
  them. Rows that fail (undecodable image, non-finite latents) travel on with a drop reason rather than
  being filtered out, so they count towards completeness and into the report.
- The driver writes the Parquet files: features are small next to images (~220 KB a row at 512 px with
  SD's VAE and ViT-H), and a single writer keeps commits simple. Its memory holds the shards in flight,
  about (compute.read_concurrency + 1) x one shard's features.
- Shards describe themselves: each Parquet footer carries the encoder ids, shapes, source tar and row
  counts (schema.SHARD_PROVENANCE_KEY). A rerun checks them against the config (a mismatch is an error:
  features of two encoders never mix), and the manifest and report are rebuilt from the footers of all
  finished shards, so a run killed with SIGKILL and rerun ends with exactly an uninterrupted run's rows.
- The encoder ids, shapes and the empty-caption embedding come from a one-off Ray task with the actors'
  resources and dtype (a GPU on a cluster), not from the driver, which may be a small head node. It
  loads its models while the actors load theirs; the output is checked against it (and the empty
  caption stored, a killed run's temporary files removed) when the first encoded batch arrives,
  before anything is committed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import struct
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core import storage
from pipelines.core.compute import ActorPool
from pipelines.core.config import ConfigError, config_differences, from_dict, to_dict
from pipelines.core.job import Stage
from pipelines.core.progress import Progress
from pipelines.core.runtime import StageReport
from pipelines.data import schema
from pipelines.data.shards import KEY_FIELD, image_bytes, iter_tar_samples, list_tar_shards, open_rgb

log = logging.getLogger("latentforge.precompute")

REPORT_FILE = "precompute_report.json"
DTYPES = ("float32", "float16", "bfloat16")

# Columns of the in-flight rows (not the feature format: they never reach a Parquet file).
SHARD, ORDINAL, LAST, IMAGE, DROP_REASON = "_shard", "_ordinal", "_last", "_image", "_drop_reason"
BUSY_SECONDS = "_busy_seconds"  # an encoder call's compute time, spread over its rows (throughput)

# Drop reasons, the keys of the report's "dropped" counts.
MISSING_IMAGE, MISSING_CAPTION, BAD_CAPTION = "missing_image", "missing_caption", "caption_not_utf8"
DECODE_ERROR, NON_FINITE_LATENTS, NON_FINITE_TEXT = "decode_error", "non_finite_latents", "non_finite_text"


class FeatureMismatchError(ConfigError):
    """The output directory holds features made differently from what the config asks for."""


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VAEConfig:
    source: str = "tiny"  # "tiny" (seeded random init) or a local diffusers AutoencoderKL directory
    seed: int = 0  # only for "tiny"


@dataclass(frozen=True)
class TextEncoderConfig:
    model: str = "tiny"  # "tiny" or an open_clip model name such as "ViT-H-14"
    weights: str | None = None  # local open_clip checkpoint file; None = seeded random init
    # "penultimate" (SD 2), "last", "embeddings" (token + position embeddings, no block) or a block index
    layer: str | int = "penultimate"
    seed: int = 0  # only for random init


@dataclass(frozen=True)
class PrecomputeCompute(ActorPool):
    """The encoder actor pool, plus the read/decode tasks that feed it."""

    read_num_cpus: float = 0.5  # per read/decode task
    read_concurrency: int = 2  # input shards read at once (bounds the driver's buffered shards)
    batch_size: int = 32  # rows per encoder call (and per decoded chunk)
    dtype: str = "float32"  # encoder compute dtype: float32, float16 or bfloat16


@dataclass(frozen=True)
class PrecomputeConfig:
    input_dir: str = ""  # filtered WebDataset shards (*.tar), a local path or a pyarrow/fsspec URI
    output_dir: str = ""  # feature shards, manifest.json, empty caption, report
    image_size: int = 64  # training resolution: resize the short side, then center-crop
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    compute: PrecomputeCompute = field(default_factory=PrecomputeCompute)
    ray_num_cpus: int | None = None  # CPUs of an embedded local Ray (ignored when joining a cluster)

    def validate(self) -> None:
        """Checks that need no cluster; raises ConfigError naming the key."""
        if not self.input_dir or not self.output_dir:
            raise ConfigError("input_dir and output_dir must both be set (--set input_dir=... output_dir=...)")
        if self.image_size <= 0:
            raise ConfigError(f"image_size must be > 0, got {self.image_size}")
        c = self.compute
        if c.dtype not in DTYPES:
            raise ConfigError(f"compute.dtype must be one of {DTYPES}, got {c.dtype!r}")
        if c.read_concurrency < 1 or c.read_num_cpus <= 0:
            raise ConfigError("compute.read_concurrency must be >= 1 and compute.read_num_cpus > 0")
        if self.vae.source != "tiny" and not storage.is_uri(self.vae.source) and not Path(self.vae.source).is_dir():
            raise ConfigError(f"vae.source: {self.vae.source!r} is neither 'tiny' nor a local diffusers directory")
        if self.text.weights and not Path(self.text.weights).expanduser().is_file():
            raise ConfigError(f"text.weights: file {self.text.weights!r} not found")


# --------------------------------------------------------------------------------------------
# reading and decoding (CPU tasks)
# --------------------------------------------------------------------------------------------

def list_input_shards(input_dir: str) -> list[str]:
    """Names of the *.tar files directly in input_dir, sorted: their positions are the shard indices."""
    return [shard.name for shard in list_tar_shards(input_dir)]


def vae_input(data: bytes, size: int) -> np.ndarray:
    """Encoded image -> (3, size, size) float32 in [-1, 1]: short side resized to `size`, center crop.
    Raises on undecodable bytes."""
    from PIL import Image

    img = open_rgb(data, draft_size=size)
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    pixels = np.asarray(img, dtype=np.float32)  # (S, S, 3) in [0, 255]
    return pixels.transpose(2, 0, 1) / 127.5 - 1.0


def _with_last_flag(items: Iterator) -> Iterator[tuple[Any, bool]]:
    """Yield (item, is_last) with a one-item lookahead."""
    previous, has_previous = None, False
    for item in items:
        if has_previous:
            yield previous, False
        previous, has_previous = item, True
    if has_previous:
        yield previous, True


def sample_row(key: str, files: dict[str, bytes], size: int) -> dict[str, Any]:
    """One tar sample -> key, caption, image (3, S, S) and a drop reason ("" when the row is good)."""
    reason, caption, image = "", "", np.zeros((3, size, size), np.float32)
    encoded = image_bytes(files)
    if encoded is None:
        reason = MISSING_IMAGE
    elif "txt" not in files:
        reason = MISSING_CAPTION
    else:
        try:
            caption = files["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            reason = BAD_CAPTION
    if not reason:
        try:
            image = vae_input(encoded, size)
        except Exception:  # noqa: BLE001 - any decoder failure is a dropped row, not a crash
            reason = DECODE_ERROR
    return {schema.KEY: key, schema.CAPTION: caption, IMAGE: image, DROP_REASON: reason}


def _stack(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    batch = {name: np.array([r[name] for r in rows], dtype=object)
             for name in (schema.KEY, schema.CAPTION, DROP_REASON)}
    batch[IMAGE] = np.stack([r[IMAGE] for r in rows])  # (B, 3, S, S)
    for name, dtype in ((SHARD, np.int32), (ORDINAL, np.int64), (LAST, bool)):
        batch[name] = np.array([r[name] for r in rows], dtype=dtype)
    return batch


def read_and_decode(batch: dict[str, np.ndarray], input_dir: str, image_size: int,
                    chunk: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data generator UDF: rows (shard index, tar name) -> decoded sample batches of <= chunk rows."""
    for shard, name in zip(batch["shard"], batch["name"]):
        rows = []
        try:
            with storage.open_input(storage.join(input_dir, name)) as stream:
                for ordinal, ((key, files), last) in enumerate(_with_last_flag(
                        (sample[KEY_FIELD], sample) for sample in iter_tar_samples(stream))):
                    row = sample_row(key, files, image_size)
                    rows.append({**row, SHARD: shard, ORDINAL: ordinal, LAST: last})
                    if len(rows) == chunk:
                        yield _stack(rows)
                        rows = []
        except (tarfile.TarError, OSError) as err:
            raise RuntimeError(f"input shard {name} is unreadable: {err}") from err
        if rows:
            yield _stack(rows)


# --------------------------------------------------------------------------------------------
# encoding (stateful actors)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncoderInfo:
    """What the driver needs from the encoders: constants for the manifest, and the empty caption."""

    vae: dict[str, Any]  # spec_dict(VAESpec)
    text_encoder: dict[str, Any]  # spec_dict(TextEncoderSpec)
    latent_shape: tuple[int, int, int]  # (C, h, w)
    text_shape: tuple[int, int]  # (L, D)
    empty_states: np.ndarray  # (L, D) float16
    empty_mask: np.ndarray  # (L,) bool

    @property
    def shapes(self) -> schema.FeatureShapes:
        return schema.FeatureShapes(self.latent_shape, self.text_shape)


def load_encoders(cfg: PrecomputeConfig):
    """-> (FrozenVAE, FrozenTextEncoder) on CUDA when the actor was given a GPU, else CPU."""
    import torch

    from model.encoders import build_text_encoder, build_vae

    device = "cuda" if cfg.compute.num_gpus_per_actor > 0 else "cpu"
    dtype = getattr(torch, cfg.compute.dtype)
    vae = build_vae(cfg.vae.source, seed=cfg.vae.seed, device=device, dtype=dtype)
    text = build_text_encoder(cfg.text.model, cfg.text.weights, layer=cfg.text.layer,
                              seed=cfg.text.seed, device=device, dtype=dtype)
    return vae, text


def encode_batch(vae, text, images: np.ndarray, captions: list[str]) -> dict[str, np.ndarray]:
    """images (B, 3, S, S) in [-1, 1], captions -> feature arrays, already in the stored dtype."""
    import torch

    mean, logvar = vae.encode(torch.from_numpy(images))  # (B, C, h, w) each
    states, mask = text(captions)  # (B, L, D), (B, L)
    stored = schema.FEATURE_DTYPE
    return {
        schema.LATENT_MEAN: mean.cpu().numpy().astype(stored),
        schema.LATENT_LOGVAR: logvar.cpu().numpy().astype(stored),
        schema.TEXT_STATES: states.cpu().numpy().astype(stored),
        schema.TEXT_LENGTH: mask.sum(dim=1).cpu().numpy().astype(np.int16),
    }


def non_finite_reasons(features: dict[str, np.ndarray]) -> np.ndarray:
    """Per row: "" when every stored value is finite, else the drop reason. Checked after the cast
    to float16, so values that overflow it (|x| > 65504) count as non-finite too."""
    def finite(name: str) -> np.ndarray:
        values = features[name]
        return np.isfinite(values.reshape(len(values), -1)).all(axis=1)

    latents_ok = finite(schema.LATENT_MEAN) & finite(schema.LATENT_LOGVAR)
    text_ok = finite(schema.TEXT_STATES)
    return np.where(latents_ok, np.where(text_ok, "", NON_FINITE_TEXT), NON_FINITE_LATENTS).astype(object)


class EncoderActor:
    """Ray Data callable class: one model load per actor, then image/caption batches -> features."""

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = from_dict(PrecomputeConfig, config)  # configs travel as plain dicts
        self.vae, self.text = load_encoders(cfg)
        self.latent_shape = self.vae.latent_shape(cfg.image_size, cfg.image_size)
        self.text_shape = (self.text.context_length, self.text.width)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        images = batch.pop(IMAGE)
        reasons = np.asarray(batch[DROP_REASON], dtype=object).copy()  # object: fixed-width str truncates
        ok = reasons == ""
        features = self._zeros(len(reasons))  # dropped rows keep zeros: they are never written
        if ok.any():
            encoded = encode_batch(self.vae, self.text, images[ok], [str(c) for c in batch[schema.CAPTION][ok]])
            for name, values in encoded.items():
                features[name][ok] = values
            reasons[ok] = non_finite_reasons(encoded)
        busy = np.full(len(reasons), (time.perf_counter() - start) / max(len(reasons), 1))
        return {**batch, **features, DROP_REASON: reasons, BUSY_SECONDS: busy}

    def _zeros(self, n: int) -> dict[str, np.ndarray]:
        stored = schema.FEATURE_DTYPE
        return {schema.LATENT_MEAN: np.zeros((n, *self.latent_shape), stored),
                schema.LATENT_LOGVAR: np.zeros((n, *self.latent_shape), stored),
                schema.TEXT_STATES: np.zeros((n, *self.text_shape), stored),
                schema.TEXT_LENGTH: np.zeros((n,), np.int16)}


def probe_encoders(config: dict[str, Any]) -> EncoderInfo:
    cfg = from_dict(PrecomputeConfig, config)
    vae, text = load_encoders(cfg)
    from model.encoders import spec_dict

    states, mask = text([""])  # (1, L, D), (1, L)
    return EncoderInfo(
        vae=spec_dict(vae.spec), text_encoder=spec_dict(text.spec),
        latent_shape=vae.latent_shape(cfg.image_size, cfg.image_size),
        text_shape=(text.context_length, text.width),
        empty_states=states[0].cpu().numpy().astype(schema.FEATURE_DTYPE),
        empty_mask=mask[0].cpu().numpy().astype(bool))


def start_probe(cfg: PrecomputeConfig):
    """Build the encoders once in a Ray task with the actors' resources (a GPU on a cluster, not the
    driver's machine): ids, shapes, empty caption. Returns an ObjectRef of an EncoderInfo: the probe
    loads its models while the pipeline's actors load theirs."""
    import ray

    task = ray.remote(probe_encoders).options(num_cpus=cfg.compute.num_cpus_per_actor,
                                      num_gpus=cfg.compute.num_gpus_per_actor, max_retries=0)
    return task.remote(to_dict(cfg))


# --------------------------------------------------------------------------------------------
# provenance and compatibility
# --------------------------------------------------------------------------------------------

def run_spec(cfg: PrecomputeConfig, info: EncoderInfo) -> dict[str, Any]:
    """What must be equal for two shards to belong in one feature directory."""
    return {"format_version": schema.FORMAT_VERSION, "image_size": cfg.image_size,
            "vae_id": info.vae["id"], "text_encoder_id": info.text_encoder["id"],
            "latent_shape": list(info.latent_shape), "text_shape": list(info.text_shape)}


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


def check_compatible(spec: dict[str, Any], inputs: list[str], finished: dict[int, dict[str, Any]],
                     output_dir: str) -> None:
    """Raise FeatureMismatchError when existing outputs were made differently (encoders, size, inputs)."""
    problems = []
    for index, provenance in sorted(finished.items()):
        problems += [f"{schema.shard_name(index)} {d}" for d in config_differences({k: provenance.get(k) for k in spec}, spec)]
        source = inputs[index] if index < len(inputs) else None
        if provenance.get("source") != source:
            problems.append(f"{schema.shard_name(index)} was made from {provenance.get('source')!r}, "
                            f"the input shard at that position is now {source!r}")
    manifest_path = storage.join(output_dir, schema.MANIFEST_FILE)
    if storage.is_file(manifest_path):
        manifest = storage.read_json(manifest_path)
        found = {"format_version": manifest.get("format_version"), "image_size": manifest.get("image_size"),
                 "vae_id": manifest.get("vae", {}).get("id"),
                 "text_encoder_id": manifest.get("text_encoder", {}).get("id"),
                 "latent_shape": manifest.get("latent_shape"), "text_shape": manifest.get("text_shape")}
        problems += [f"{schema.MANIFEST_FILE} {d}" for d in config_differences(found, spec)]
    if problems:
        shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise FeatureMismatchError(
            f"output_dir {output_dir} already holds features that do not match this config:\n  {shown}\n"
            f"Features from different encoders or inputs must not mix: use a new output_dir, or the "
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

class _ShardAssembler:
    """Collects encoded rows per input shard and commits each shard once all its rows have arrived."""

    def __init__(self, output_dir: str, inputs: list[str], pending: int,
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
                raise RuntimeError(f"{self.inputs[shard]}: {len(self.ordinals[shard])} of "
                                   f"{self.expected[shard]} rows arrived")
            if shard not in self.done:
                self.commit(shard)

    def commit(self, shard: int) -> None:
        rows = _merge_parts(self.parts.pop(shard, []))
        reasons = rows.get(DROP_REASON, np.array([], dtype=object))
        kept = reasons == ""
        provenance = {**self.spec, "source": self.inputs[shard], "rows_in": int(len(reasons)),
                      "rows": int(kept.sum()), "dropped": dict(Counter(reasons[~kept].tolist()))}
        table = self._table(rows, kept).replace_schema_metadata(
            {schema.SHARD_PROVENANCE_KEY: json.dumps(provenance).encode()})
        # the commit: the final name appears only when the file is complete
        with storage.atomic_output(storage.join(self.output_dir, schema.shard_name(shard))) as stream:
            pq.write_table(table, stream, **schema.PARQUET_WRITE_OPTIONS)
        self.committed.append({"index": shard, **provenance})
        self.done.add(shard)
        log.info("%s | committed %s: %d rows (%d dropped) from %s", self.progress.line(len(self.committed)),
                 schema.shard_name(shard), provenance["rows"], len(reasons) - provenance["rows"], self.inputs[shard])

    def _table(self, rows: dict[str, np.ndarray], kept: np.ndarray) -> pa.Table:
        if not rows:
            return self.shapes.arrow_schema().empty_table()
        return schema.to_table(
            self.shapes, [str(k) for k in rows[schema.KEY][kept]], [str(c) for c in rows[schema.CAPTION][kept]],
            rows[schema.LATENT_MEAN][kept], rows[schema.LATENT_LOGVAR][kept],
            rows[schema.TEXT_STATES][kept], rows[schema.TEXT_LENGTH][kept])


def _merge_parts(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate a shard's batches, in tar order, each ordinal once (a retried task may resend rows)."""
    if not parts:
        return {}
    merged = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    _, first = np.unique(merged[ORDINAL], return_index=True)  # sorted by ordinal
    return {name: values[first] for name, values in merged.items()}


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------

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


def run_pending(cfg: PrecomputeConfig, assembler: _ShardAssembler, inputs: list[str],
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


def build_manifest(cfg: PrecomputeConfig, info: EncoderInfo, finished: dict[int, dict[str, Any]]) -> schema.Manifest:
    shards = tuple({"name": schema.shard_name(i), "rows": p["rows"], "rows_in": p["rows_in"],
                    "source": p["source"]} for i, p in sorted(finished.items()))
    return schema.Manifest(
        image_size=cfg.image_size, latent_shape=info.latent_shape, text_shape=info.text_shape,
        vae=info.vae, text_encoder=info.text_encoder, shards=shards,
        extra={"input_dir": cfg.input_dir, "config": _recorded_config(cfg)})


def _recorded_config(cfg: PrecomputeConfig) -> dict[str, Any]:
    """The config as the manifest records it: a local VAE directory made absolute, so trainers and
    evaluators started from another working directory rebuild the same encoders from it."""
    config = to_dict(cfg)
    source = cfg.vae.source
    if source != "tiny" and not storage.is_uri(source):
        config["vae"]["source"] = str(Path(source).resolve())
    return config


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


def prepare_output(cfg: PrecomputeConfig, info: EncoderInfo,
                   inputs: list[str]) -> tuple[dict[str, Any], schema.FeatureShapes]:
    """Before the first commit: existing outputs must match (else FeatureMismatchError, nothing
    written), a killed run's temporary files go, the empty caption is stored."""
    spec = run_spec(cfg, info)
    check_compatible(spec, inputs, finished_shards(cfg.output_dir), cfg.output_dir)
    removed = storage.remove_temporaries(cfg.output_dir)
    write_empty_caption(cfg.output_dir, info)
    log.info("output %s checked against vae %s and text encoder %s; %d stale temporary files removed",
             cfg.output_dir, info.vae["id"], info.text_encoder["id"], removed)
    return spec, info.shapes


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
    inputs = list_input_shards(cfg.input_dir)
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
    assembler = _ShardAssembler(cfg.output_dir, inputs, len(pending),
                                lambda: prepare_output(cfg, ray.get(probe), inputs))
    timings = run_pending(cfg, assembler, inputs, pending) if pending else {}
    assembler.ready()  # also when nothing was pending: the check and the clean-up still run
    info = ray.get(probe)
    finished = finished_shards(cfg.output_dir)
    build_manifest(cfg, info, finished).save(cfg.output_dir)
    _fill_report(report, finished, assembler.committed, timings)
    report.details["output_dir"] = cfg.output_dir
    return report


def report_path(cfg: PrecomputeConfig) -> str:
    return storage.join(cfg.output_dir, REPORT_FILE)


def _validated(cfg: PrecomputeConfig) -> PrecomputeConfig:
    cfg.validate()
    return cfg


STAGE = Stage("precompute", PrecomputeConfig, run=run_precompute, report_path=report_path, check=_validated,
              ray_cpus=lambda cfg: cfg.ray_num_cpus)
