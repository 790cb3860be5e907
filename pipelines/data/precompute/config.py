"""The precompute stage's settings: which encoders, at what size, on what compute."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipelines.core import storage
from pipelines.core.compute import ActorPool
from pipelines.core.config import ConfigError
from pipelines.data.schema import REPORT_FILE

DTYPES = ("float32", "float16", "bfloat16")


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
        if self.vae.source != "tiny" and storage.is_uri(self.vae.source):
            # The VAE's id records its directory, which a fetched temporary copy would change on every run.
            raise ConfigError(f"vae.source: {self.vae.source!r} is a URI; give 'tiny' or a local diffusers directory "
                              "(on a cluster: shared storage every node sees)")
        if self.vae.source != "tiny" and not Path(self.vae.source).is_dir():
            raise ConfigError(f"vae.source: {self.vae.source!r} is neither 'tiny' nor a local diffusers directory")
        if self.text.weights and not Path(self.text.weights).expanduser().is_file():
            raise ConfigError(f"text.weights: file {self.text.weights!r} not found")


def report_path(cfg: PrecomputeConfig) -> str:
    return storage.join(cfg.output_dir, REPORT_FILE)
