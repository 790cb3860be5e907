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
from pipelines.data.precompute.rows import DROP_REASON, IMAGE, NON_FINITE_LATENTS, NON_FINITE_TEXT

log = logging.getLogger("latentforge.precompute")

BUSY_SECONDS = "_busy_seconds"  # an encoder call's compute time, spread over its rows (throughput)


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
