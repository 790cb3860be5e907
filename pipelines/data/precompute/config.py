"""The precompute stage's settings: which encoders, at what size, on what compute."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipelines.core import storage
from pipelines.core.compute import ActorPool
from pipelines.core.config import ConfigError
from pipelines.core.tracking import MLflowSettings
from pipelines.data.buckets import Bucket, make_buckets
from pipelines.data.schema import REPORT_FILE

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class VAEConfig:
    source: str = "tiny"  # "tiny" (seeded random init) or a local diffusers AutoencoderKL directory
    seed: int = 0  # only for "tiny"


@dataclass(frozen=True)
class TextEncoderConfig:
    # "tiny", an open_clip model name such as "ViT-H-14", or a local diffusers pipeline folder (its text_encoder/
    # and tokenizer/; take layer "last", what its pipeline conditions on)
    model: str = "tiny"
    weights: str | None = None  # local open_clip checkpoint file; None = seeded random init
    # "penultimate" (SD 2), "last", "embeddings" (token + position embeddings, no block) or a block index
    layer: str | int = "penultimate"
    seed: int = 0  # only for random init


@dataclass(frozen=True)
class BucketSettings:
    """Aspect-ratio buckets (pipelines/data/buckets.py): each image is cropped to the bucket nearest its aspect."""

    # The widest bucket's long side / short side. 1: the square alone (every image center-cropped to it).
    max_ratio: float = 2.0
    # Bucket sides are multiples of this (pixels): the VAE's downsample factor x the U-Net's, so every bucket's
    # latent divides by the U-Net's downsampling. 64 for Stable Diffusion (8 x 8); 16 for the tiny models (4 x 4).
    multiple: int = 64


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
    image_size: int = 64  # training resolution: the square bucket's side; the other buckets have about its area
    buckets: BucketSettings = field(default_factory=BucketSettings)
    # Also encode each image flipped left-right; the trainer then picks one of the two per sample (a random
    # horizontal flip). Off for captions that say left or right (the synthetic shapes' do).
    flip: bool = False
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    compute: PrecomputeCompute = field(default_factory=PrecomputeCompute)
    ray_num_cpus: int | None = None  # CPUs of an embedded local Ray (ignored when joining a cluster)
    mlflow: MLflowSettings = field(default_factory=MLflowSettings)  # where the report is logged as a run

    def validate(self) -> None:
        """Checks that need no cluster; raises ConfigError naming the key."""
        if not self.input_dir or not self.output_dir:
            raise ConfigError("input_dir and output_dir must both be set (--set input_dir=... output_dir=...)")
        if self.image_size <= 0:
            raise ConfigError(f"image_size must be > 0, got {self.image_size}")
        self.bucket_list()
        c = self.compute
        if c.dtype not in DTYPES:
            raise ConfigError(f"compute.dtype must be one of {DTYPES}, got {c.dtype!r}")
        if c.read_concurrency < 1 or c.read_num_cpus <= 0:
            raise ConfigError("compute.read_concurrency must be >= 1 and compute.read_num_cpus > 0")
        if self.vae.source != "tiny" and storage.is_uri(self.vae.source):
            # The VAE's id records its directory, which a fetched temporary copy would change on every run.
            raise ConfigError(f"vae.source: {self.vae.source!r} is a URI; give 'tiny' or a local diffusers directory "
                              "(on a cluster: shared storage every node sees)")
        if self.vae.source != "tiny" and not Path(self.vae.source).is_dir():
            raise ConfigError(f"vae.source: {self.vae.source!r} is neither 'tiny' nor a local diffusers directory")
        if self.text.weights and not Path(self.text.weights).expanduser().is_file():
            raise ConfigError(f"text.weights: file {self.text.weights!r} not found")

    def bucket_list(self) -> tuple[Bucket, ...]:
        """The buckets of this image size, tallest first; ConfigError naming the keys when there are none."""
        b = self.buckets
        try:
            return make_buckets(self.image_size, b.multiple, b.max_ratio)
        except ValueError as err:
            raise ConfigError(f"buckets: {err} (set buckets.multiple to the VAE's x the U-Net's downsample factor "
                              f"dividing image_size, or buckets.max_ratio=1 for square images only)") from None


def report_path(cfg: PrecomputeConfig) -> str:
    return storage.join(cfg.output_dir, REPORT_FILE)
