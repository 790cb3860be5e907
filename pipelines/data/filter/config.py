"""The filter stage's settings, drop reasons and the driver-side input checks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from pipelines.core import storage
from pipelines.core.compute import ActorPool
from pipelines.core.config import ConfigError
from pipelines.core.tracking import MLflowSettings

REPORT_FILE = "filter_report.json"


STAGE_NAME = "filter"

# Every drop reason, in the order the checks run; a row is counted under the first that fails.
# unreadable_shard: the samples a damaged tar held after the damage (its _stats.json count minus those read).
REASONS = (
    "unreadable_shard", "missing_image", "caption_missing", "caption_not_utf8", "caption_empty", "caption_too_short",
    "caption_too_long", "undecodable_image", "image_too_small", "aspect_ratio", "clip_similarity",
    "duplicate_key", "exact_duplicate", "near_duplicate",
)


@dataclass(frozen=True)
class ImageChecks:
    min_side: int = 64  # pixels; applied to the stored image AND the original size in the json
    # long side / short side: extreme panoramas and strips are dropped (aspect_ratio) before precompute puts
    # the rest into aspect-ratio buckets, whose widest is buckets.max_ratio (a wider image is cropped to it)
    max_aspect: float = 3.0
    # The json's original_width/height: an upscaled thumbnail shows only there (and with the download's
    # center_crop, an extreme aspect too). Falls back to the stored size.
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
    mlflow: MLflowSettings = field(default_factory=MLflowSettings)  # where the report is logged as a run


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


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


def report_path(cfg: FilterConfig) -> str:
    return storage.join(cfg.output_dir, REPORT_FILE)
