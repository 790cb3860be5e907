"""Encoding (stateful actors): decoded rows -> VAE latent moments and text states, plus the one-off
probe that reports the encoders' ids, shapes and the empty caption."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.core.config import from_dict, to_dict
from pipelines.data import schema
from pipelines.data.precompute.config import PrecomputeConfig
from pipelines.data.precompute.rows import DROP_REASON, IMAGE, NON_FINITE_LATENTS, NON_FINITE_TEXT, ragged

log = logging.getLogger("latentforge.precompute")

BUSY_SECONDS = "_busy_seconds"  # an encoder call's compute time, spread over its rows (throughput)


@dataclass(frozen=True)
class EncoderInfo:
    """What the driver needs from the encoders: constants for the manifest, and the empty caption."""

    vae: dict[str, Any]  # spec_dict(VAESpec)
    text_encoder: dict[str, Any]  # spec_dict(TextEncoderSpec)
    latent_shape: tuple[int, int, int]  # (C, h, w) of the square bucket
    text_shape: tuple[int, int]  # (L, D)
    empty_states: np.ndarray  # (L, D) float16
    empty_mask: np.ndarray  # (L,) bool

    def feature_shapes(self, cfg: PrecomputeConfig) -> schema.FeatureShapes:
        """The shapes of the rows these encoders make under cfg (its image size, buckets and flip)."""
        return schema.FeatureShapes(self.latent_shape, self.text_shape, cfg.image_size, cfg.bucket_list(), cfg.flip)


LOAD_ATTEMPTS = 3  # an encoder load is retried: a shared file system or a node's disk may fail once
LOAD_RETRY_SECONDS = 2.0  # the wait before the second attempt, doubled before each later one


class EncoderLoadError(RuntimeError):
    """The encoders failed to load on every attempt; the message is one line naming the sources and the error.

    Exit 1, not 2 (bad input): what fails here has passed the config check (the paths exist), and loading the
    weights to find out earlier would take the driver's machine, which may lack the memory or the GPU the actors
    load them on; the failure can also be the node's (memory, disk, driver) rather than the files'."""


def load_encoders(cfg: PrecomputeConfig):
    """-> (FrozenVAE, FrozenTextEncoder) on CUDA when the actor was given a GPU, else CPU. Tried LOAD_ATTEMPTS
    times; then raises EncoderLoadError with the last error."""
    import torch

    from model.encoders import build_text_encoder, build_vae

    device = "cuda" if cfg.compute.num_gpus_per_actor > 0 else "cpu"
    dtype = getattr(torch, cfg.compute.dtype)
    wait = LOAD_RETRY_SECONDS
    for attempt in range(1, LOAD_ATTEMPTS + 1):
        try:
            vae = build_vae(cfg.vae.source, seed=cfg.vae.seed, device=device, dtype=dtype)
            text = build_text_encoder(cfg.text.model, cfg.text.weights, layer=cfg.text.layer,
                                      seed=cfg.text.seed, device=device, dtype=dtype)
            return vae, text
        except Exception as err:  # noqa: BLE001 - any load error may be passing; the last one is reported
            error = err
            log.warning("loading the encoders failed (attempt %d of %d): %s", attempt, LOAD_ATTEMPTS, err)
            if attempt < LOAD_ATTEMPTS:
                time.sleep(wait)
                wait *= 2
    raise EncoderLoadError(
        f"the encoders (vae.source={cfg.vae.source!r}, text.model={cfg.text.model!r}, text.weights="
        f"{cfg.text.weights!r}) failed to load in {LOAD_ATTEMPTS} attempts: {type(error).__name__}: "
        f"{' '.join(str(error).split())}") from error


def encode_batch(vae, text, images: np.ndarray, captions: list[str], flip: bool = False) -> dict[str, np.ndarray]:
    """images (B, 3, H, W) in [-1, 1] (one bucket), captions -> feature arrays, already in the stored dtype;
    with flip also the moments of the images flipped left-right."""
    import torch

    pixels = torch.from_numpy(np.ascontiguousarray(images))
    stored = schema.FEATURE_DTYPE
    moments = {(schema.LATENT_MEAN, schema.LATENT_LOGVAR): pixels}
    if flip:
        moments[(schema.LATENT_MEAN_FLIPPED, schema.LATENT_LOGVAR_FLIPPED)] = pixels.flip(-1)
    out = {}
    for (mean_name, logvar_name), batch in moments.items():
        mean, logvar = vae.encode(batch)  # (B, C, h, w) each
        out[mean_name], out[logvar_name] = mean.cpu().numpy().astype(stored), logvar.cpu().numpy().astype(stored)
    states, mask = text(captions)  # (B, L, D), (B, L)
    out[schema.TEXT_STATES] = states.cpu().numpy().astype(stored)
    out[schema.TEXT_LENGTH] = mask.sum(dim=1).cpu().numpy().astype(np.int16)
    return out


def encode_rows(vae, text, images: list[np.ndarray], captions: list[str], flip: bool) -> dict[str, list[np.ndarray]]:
    """Rows of any buckets -> per-row feature arrays, encoded one bucket (one image shape) at a time."""
    out: dict[str, list] = {}
    shapes = [image.shape for image in images]
    for shape in sorted(set(shapes)):
        rows = [i for i, s in enumerate(shapes) if s == shape]
        encoded = encode_batch(vae, text, np.stack([images[i] for i in rows]), [captions[i] for i in rows], flip)
        for name, values in encoded.items():
            column = out.setdefault(name, [None] * len(images))
            for i, value in zip(rows, values):
                column[i] = value
    return out


def non_finite_reasons(features: dict[str, Any]) -> np.ndarray:
    """Per row: "" when every stored value is finite, else the drop reason. Each feature is a (B, ...) array or
    B per-row arrays. Checked after the cast to float16, so values that overflow it (|x| > 65504) count as
    non-finite too."""
    def finite(name: str) -> np.ndarray:
        return np.array([bool(np.isfinite(row).all()) for row in features[name]], dtype=bool)

    latents_ok = finite(schema.LATENT_MEAN) & finite(schema.LATENT_LOGVAR)
    for name in (schema.LATENT_MEAN_FLIPPED, schema.LATENT_LOGVAR_FLIPPED):
        if name in features:
            latents_ok &= finite(name)
    text_ok = finite(schema.TEXT_STATES)
    return np.where(latents_ok, np.where(text_ok, "", NON_FINITE_TEXT), NON_FINITE_LATENTS).astype(object)


class EncoderActor:
    """Ray Data callable class: one model load per actor, then image/caption batches -> features."""

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = from_dict(PrecomputeConfig, config)  # configs travel as plain dicts
        self.vae, self.text = load_encoders(cfg)
        self.flip = cfg.flip
        self.text_shape = (self.text.context_length, self.text.width)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows of any buckets in, per row its bucket's features out: a (B, ...) column where the batch has one
        bucket, else B arrays (see rows.ragged). A dropped row keeps zeros (it is never written)."""
        start = time.perf_counter()
        images = list(batch.pop(IMAGE))  # B arrays (3, H, W)
        reasons = np.asarray(batch[DROP_REASON], dtype=object).copy()  # object: fixed-width str truncates
        ok = np.flatnonzero(reasons == "")
        captions = [str(c) for c in batch[schema.CAPTION]]
        features = {name: [np.zeros(self._latent_shape(image), schema.FEATURE_DTYPE) for image in images]
                    for name in self._latent_columns()}
        features[schema.TEXT_STATES] = [np.zeros(self.text_shape, schema.FEATURE_DTYPE)] * len(images)
        features[schema.TEXT_LENGTH] = [np.int16(0)] * len(images)
        if len(ok):
            encoded = encode_rows(self.vae, self.text, [images[i] for i in ok], [captions[i] for i in ok], self.flip)
            for name, values in encoded.items():
                for i, value in zip(ok, values):
                    features[name][i] = value
            reasons[ok] = non_finite_reasons(encoded)
        busy = np.full(len(reasons), (time.perf_counter() - start) / max(len(reasons), 1))
        columns = {name: ragged(values) for name, values in features.items()}
        columns[schema.TEXT_LENGTH] = np.asarray(features[schema.TEXT_LENGTH], dtype=np.int16)
        return {**batch, **columns, DROP_REASON: reasons, BUSY_SECONDS: busy}

    def _latent_columns(self) -> tuple[str, ...]:
        flipped = (schema.LATENT_MEAN_FLIPPED, schema.LATENT_LOGVAR_FLIPPED) if self.flip else ()
        return (schema.LATENT_MEAN, schema.LATENT_LOGVAR, *flipped)

    def _latent_shape(self, image: np.ndarray) -> tuple[int, int, int]:
        return self.vae.latent_shape(image.shape[1], image.shape[2])


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


def encoder_info(probe) -> EncoderInfo:
    """The probe's result (waits for it). An encoder that failed to load raises EncoderLoadError with its own
    one line, not Ray's wrapping of it (the remote traceback)."""
    import ray

    try:
        return ray.get(probe)
    except EncoderLoadError as err:  # Ray raises a task's error as an instance of its class, the original as .cause
        raise EncoderLoadError(str(getattr(err, "cause", err))) from None


def start_probe(cfg: PrecomputeConfig):
    """Build the encoders once in a Ray task with the actors' resources (a GPU on a cluster, not the
    driver's machine): ids, shapes, empty caption. Returns an ObjectRef of an EncoderInfo: the probe
    loads its models while the pipeline's actors load theirs."""
    import ray

    task = ray.remote(probe_encoders).options(num_cpus=cfg.compute.num_cpus_per_actor,
                                      num_gpus=cfg.compute.num_gpus_per_actor, max_retries=0)
    return task.remote(to_dict(cfg))
