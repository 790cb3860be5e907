"""The VAE training job's settings and the checks that need no cluster."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.core import storage
from pipelines.core.config import ConfigError
from pipelines.core.ray_train import ScalingSettings
from pipelines.core.tracking import MLflowSettings
from pipelines.data.precompute.config import VAEConfig
from pipelines.data.shards import tar_shard_names

LOSSES = ("l1", "l2")


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 240
    batch_size: int = 8  # per worker
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # "cosine" or "constant", after a linear warm-up (train_policy.LRSchedule)
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    loss: str = "l1"  # reconstruction loss: "l1" or "l2"
    kl_weight: float = 1e-6
    color_anchor_weight: float = 0.0  # latent channels 0-2 ~ patch-mean RGB (see the module docstring)
    seed: int = 0  # data order, posterior noise, scaling-factor sample
    shuffle_buffer: int = 256  # decoded images held per worker for shuffling
    log_every: int = 10
    image_every: int = 100  # reconstruction grid to MLflow (and always at the end)
    grid_images: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    # "previous": a damaged latest checkpoint is set aside (<run dir>/damaged/) and the run resumes from the
    # newest intact one; "" refuses it (pipelines/vae/worker.intact_checkpoint)
    checkpoint_fallback: str = ""
    max_nonfinite_steps: int = 5  # NaN/inf losses in a row before the run stops (each one is skipped)


@dataclass(frozen=True)
class FailureSettings:
    max_failures: int = 0  # worker-group restarts from the latest checkpoint before giving up


@dataclass(frozen=True)
class TrainVAEConfig:
    input_dir: str = ""  # filtered WebDataset shards (NNNNN.tar), a local path or a URI
    output_dir: str = ""  # exported diffusers AutoencoderKL directory (local or mounted path)
    run_name: str = "train-vae"  # Ray Train run (checkpoints) and MLflow run; same name = resume
    storage_path: str = "ray_results"  # Ray Train checkpoints; made absolute in the driver
    image_size: int = 64  # resize the short side, then center-crop (as precompute does)
    vae: VAEConfig = field(default_factory=VAEConfig)  # "tiny" = from scratch; a directory = fine-tune
    train: TrainSettings = field(default_factory=TrainSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    failure: FailureSettings = field(default_factory=FailureSettings)
    scaling_factor_images: int = 256
    mlflow: MLflowSettings = field(default_factory=MLflowSettings)
    ray_num_cpus: int | None = None  # CPUs of an embedded local Ray (ignored when joining a cluster)


def _check_settings(cfg: TrainVAEConfig) -> None:
    """Value checks that read nothing; raise ConfigError naming the key."""
    t = cfg.train
    if not cfg.input_dir or not cfg.output_dir:
        raise ConfigError("input_dir and output_dir must both be set (--set input_dir=... --set output_dir=...)")
    if not cfg.run_name or "/" in cfg.run_name:
        raise ConfigError(f"run_name must be a non-empty name without '/', got {cfg.run_name!r}")
    positive = {"image_size": cfg.image_size, "train.steps": t.steps, "train.batch_size": t.batch_size,
                "train.log_every": t.log_every, "train.image_every": t.image_every,
                "train.grid_images": t.grid_images, "train.checkpoint_every": t.checkpoint_every,
                "train.keep_checkpoints": t.keep_checkpoints, "train.shuffle_buffer": t.shuffle_buffer,
                "train.max_nonfinite_steps": t.max_nonfinite_steps,
                "scaling.num_workers": cfg.scaling.num_workers, "scaling_factor_images": cfg.scaling_factor_images}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if t.loss not in LOSSES:
        raise ConfigError(f"train.loss must be one of {LOSSES}, got {t.loss!r}")
    if t.kl_weight < 0 or t.color_anchor_weight < 0 or t.weight_decay < 0 or t.grad_clip < 0:
        raise ConfigError("train.kl_weight, train.color_anchor_weight, train.weight_decay and train.grad_clip "
                          "must be >= 0")
    from pipelines.train.policy import LRSchedule

    try:  # the schedule's own checks (lr > 0, warm-up within the steps, a known kind)
        LRSchedule(t.lr, t.warmup_steps, t.steps, t.lr_schedule)
    except ValueError as err:
        raise ConfigError(f"train.lr / train.warmup_steps / train.lr_schedule: {err}") from None
    if cfg.scaling.cpus_per_worker <= 0 or cfg.failure.max_failures < 0:
        raise ConfigError("scaling.cpus_per_worker must be > 0 and failure.max_failures >= 0")
    from pipelines.train.config import FALLBACKS

    if t.checkpoint_fallback not in FALLBACKS:
        raise ConfigError(f"train.checkpoint_fallback must be one of {FALLBACKS}, got {t.checkpoint_fallback!r}")


def _check_output_dir(output_dir: str) -> None:
    if storage.is_uri(output_dir):
        raise ConfigError(f"output_dir {output_dir!r}: save_pretrained writes local files; give a local or "
                          f"mounted path (on a cluster: shared storage every node sees)")
    ancestor = Path(storage.absolute(output_dir)).parent
    while not ancestor.exists():  # the nearest folder that exists decides whether we may create it
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {output_dir!r}: {ancestor} is not a writable folder")


def check_inputs(cfg: TrainVAEConfig) -> None:
    """Everything that can be checked before Ray starts. Raises ConfigError naming the key (the job
    exits 2)."""
    _check_settings(cfg)
    shards = tar_shard_names(cfg.input_dir)
    if not shards:
        raise ConfigError(f"input_dir {cfg.input_dir} holds no *.tar shards (run jobs/filter_data.py first)")
    _check_output_dir(cfg.output_dir)
    if cfg.vae.source != "tiny" and not Path(cfg.vae.source).expanduser().is_dir():
        raise ConfigError(f"vae.source: {cfg.vae.source!r} is neither 'tiny' nor a local diffusers directory")
    from model.encoders import build_vae

    try:  # loading it here catches a broken directory before any cluster work
        vae = build_vae(cfg.vae.source, seed=cfg.vae.seed)
    except (OSError, ValueError) as err:
        raise ConfigError(f"vae.source {cfg.vae.source!r} does not load as an AutoencoderKL: {err}") from None
    if cfg.image_size % vae.downsample_factor:
        raise ConfigError(f"image_size {cfg.image_size} must be divisible by the VAE's downsample factor "
                          f"{vae.downsample_factor}")
    if cfg.train.color_anchor_weight > 0 and vae.latent_channels < 3:
        raise ConfigError(f"train.color_anchor_weight needs a VAE with >= 3 latent channels (RGB), "
                          f"{cfg.vae.source!r} has {vae.latent_channels}; set train.color_anchor_weight=0")
