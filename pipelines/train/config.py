"""The typed config of jobs/train_unet.py and its driver-side validation.

    cfg, _ = parse_job_args(TrainConfig, "Train the U-Net", argv)
    plan = validate_for_launch(cfg)          # before any cluster work: every check names its key

Batch sizes are derived ONCE (pipelines/train/deepspeed_config.derive_batch_sizes) from
`batch.global_batch`, `batch.micro_batch` and `scaling.num_workers`; nothing else stores them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from model.config import PRESETS, UNetConfig
from model.convert import DIFFUSERS_WEIGHTS
from model.ema import EMAConfig
from model.samplers import SamplerConfig
from model.unet import CONFIG_FILE as UNET_CONFIG_FILE
from model.unet import WEIGHTS_FILE as UNET_WEIGHTS_FILE
from pipelines.core import storage
from pipelines.core.config import ConfigError, from_dict, to_dict
from pipelines.core.ray_train import ScalingSettings
from pipelines.core.tracking import MLflowSettings
from pipelines.data.loader import check_manifest_matches, read_manifest
from pipelines.data.schema import Manifest
from pipelines.train.deepspeed_config import DeepSpeedSettings, derive_batch_sizes
from pipelines.train.objective import ObjectiveConfig
from pipelines.train.policy import LR_KINDS, LRSchedule, NonFinitePolicy


@dataclass(frozen=True)
class ModelSettings:
    preset: str = "tiny"  # a name in model/config.PRESETS
    overrides: dict[str, Any] = field(default_factory=dict)  # UNetConfig fields replacing the preset's
    # A U-Net to start from, a local path or a URI (s3://...; each worker fetches a temporary local copy): a
    # UNet.save_pretrained directory (the previous phase's <storage_path>/<run>/export/unet), a diffusers
    # UNet2DConditionModel folder, or a folder with either under unet/ (an SD 1.x/2.x pipeline folder, an export);
    # diffusers weights are converted on load (model/convert.py). Its config replaces the preset, the overrides
    # still apply (e.g. sample_size).
    init_from: str | None = None
    gradient_checkpointing: bool = False
    # NHWC activations: tensor-core GPUs run bf16 convolutions natively in that layout.
    channels_last: bool = False
    # A torch.compile backend for the U-Net inside the DeepSpeed engine ("inductor": generated kernels),
    # or "" for eager. The first steps compile.
    compile: str = ""

    def unet_config(self) -> UNetConfig:
        """The preset (or init_from's saved config) with the overrides applied."""
        if self.init_from:
            base = init_from_unet(self.init_from).config
        elif self.preset in PRESETS:
            base = PRESETS[self.preset]
        else:
            raise ConfigError(f"model.preset: {self.preset!r} is not one of {sorted(PRESETS)}")
        # typed like any config section: a value of the wrong type or an unknown key is a ConfigError naming it
        return from_dict(UNetConfig, {**dataclasses.asdict(base), **self.overrides}, prefix="model.overrides.")


@dataclass(frozen=True)
class InitFromUNet:
    """Where model.init_from's U-Net is and in which format."""

    folder: str  # init_from itself or its unet/ subfolder
    diffusers: bool  # a UNet2DConditionModel folder (converted on load) rather than a UNet.save_pretrained one
    config: UNetConfig

    @property
    def weights_file(self) -> str:
        return DIFFUSERS_WEIGHTS if self.diffusers else UNET_WEIGHTS_FILE


def init_from_unet(init_from: str) -> InitFromUNet:
    """Find the U-Net of model.init_from: the folder itself, else its unet/ subfolder; ConfigError if neither."""
    from model.convert import ConversionError, config_from_diffusers

    folder = init_from
    if not _has_file(init_from, UNET_CONFIG_FILE) and _has_file(storage.join(init_from, "unet"), UNET_CONFIG_FILE):
        folder = storage.join(init_from, "unet")
    values = json.loads(_read_init_from(folder, UNET_CONFIG_FILE))
    diffusers = values.get("_class_name") == "UNet2DConditionModel"
    try:
        config = config_from_diffusers(values) if diffusers else UNetConfig.from_dict(values)
    except (ConversionError, ValueError, KeyError) as err:
        raise ConfigError(f"model.init_from: {storage.join(folder, UNET_CONFIG_FILE)}: {_one_line(err)}") from None
    return InitFromUNet(folder, diffusers, config)


def _has_file(folder: str, name: str) -> bool:
    return _read_init_from(folder, name, read=False, missing_ok=True) is not False


def _read_init_from(init_from: str, name: str, read: bool = True, missing_ok: bool = False) -> bytes | None | bool:
    """A file of model.init_from's folder (its bytes, or None with read=False), or a one-line ConfigError
    (missing_ok: False for a missing file)."""
    """A file of model.init_from's folder (its bytes, or None with read=False), or a one-line ConfigError."""
    location = storage.join(init_from, name)
    try:
        if storage.is_file(location):
            return storage.read_bytes(location) if read else None
    except (OSError, ValueError, ImportError) as err:  # unreachable, access denied, bad URI, no fsspec driver
        raise ConfigError(f"model.init_from: cannot read {location}: {_one_line(err)}") from None
    if missing_ok:
        return False
    raise ConfigError(f"model.init_from: {location} not found (expected a UNet.save_pretrained directory such as "
                      "a training run's export/unet, a diffusers UNet2DConditionModel folder, or a pipeline folder "
                      "with one of them under unet/)")


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())




@dataclass(frozen=True)
class BatchSettings:
    global_batch: int = 32  # images per optimizer step, over all workers and accumulation steps
    micro_batch: int = 16  # images per worker per forward/backward


@dataclass(frozen=True)
class LRSettings:
    warmup_steps: int = 0
    kind: str = "constant"  # one of train_policy.LR_KINDS
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of deepspeed.adamw.lr


@dataclass(frozen=True)
class EMASettings:
    enabled: bool = True
    max_decay: float = 0.9999
    start_step: int = 0
    warmup: bool = True


FALLBACKS = ("", "previous")


@dataclass(frozen=True)
class CheckpointSettings:
    every_steps: int = 500
    keep: int = 3  # the last K checkpoints stay on storage
    # Start from this checkpoint directory instead of the run's own latest (e.g. a copy of another run).
    resume_from: str | None = None
    # "previous": when the run's latest checkpoint is damaged, set it aside (<run dir>/damaged/) and resume
    # from the newest intact one; "" refuses a damaged checkpoint (pipelines/train/checkpoint.fall_back_to_intact)
    fallback: str = ""

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACKS:
            raise ConfigError(f"checkpoint.fallback must be one of {FALLBACKS}, got {self.fallback!r}")


@dataclass(frozen=True)
class SamplePreviewSettings:
    """A grid of samples from the EMA weights, logged to MLflow at step 0 (the untrained baseline), every
    `every_steps` and at the end (0: only at the end). A row per prompt, a column per seed, prompts written under
    the tiles. `sampler` is also the model's recommended sampling: the export carries it, and jobs/sample_eval.py,
    the MLflow model and the diffusers export's model card default to it."""

    every_steps: int = 500
    prompts: tuple[str, ...] = ("a large red circle in the top left", "a small blue square in the center")
    seeds: tuple[int, ...] = (0, 1)
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(steps=20, guidance_scale=4.0))


@dataclass(frozen=True)
class TrainConfig:
    features_dir: str = "data/features"
    run_name: str = "unet"
    storage_path: str = "runs"  # checkpoints and the exported model go to <storage_path>/<run_name>
    max_steps: int = 1000
    seed: int = 0
    log_every: int = 10
    model: ModelSettings = field(default_factory=ModelSettings)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    lr: LRSettings = field(default_factory=LRSettings)
    ema: EMASettings = field(default_factory=EMASettings)
    nonfinite: NonFinitePolicy = field(default_factory=NonFinitePolicy)
    window_shards: int = 8  # loader shuffle window (pipelines/data/loader.LoaderConfig)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    max_failures: int = 1  # worker failures recovered from the last checkpoint (Ray Train FailureConfig)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    samples: SamplePreviewSettings = field(default_factory=SamplePreviewSettings)
    mlflow: MLflowSettings = field(default_factory=MLflowSettings)
    # What the run exports when it finishes: "latentforge" (<run>/export, always: evaluation and the MLflow model
    # read it) and "diffusers" (<run>/export-diffusers too: a StableDiffusionPipeline folder,
    # pipelines/inference/diffusers_export.py), e.g. --set 'export_formats=[latentforge,diffusers]'
    export_formats: tuple[str, ...] = ("latentforge",)

    def lr_schedule(self) -> LRSchedule:
        return LRSchedule(base_lr=self.deepspeed.adamw.lr, warmup_steps=self.lr.warmup_steps,
                          total_steps=self.max_steps, kind=self.lr.kind, min_lr_ratio=self.lr.min_lr_ratio)

    def ema_config(self) -> EMAConfig:
        return EMAConfig(max_decay=self.ema.max_decay, start_step=self.ema.start_step, warmup=self.ema.warmup)


# What may change between a run and its resume. All but the last two leave the trajectory of the weights
# as it was; another number of workers or micro batch (same global batch) resumes through DeepSpeed's
# universal checkpoint with the data re-shared (pipelines/train/checkpoint.py). Everything else is part of
# the fingerprint a checkpoint is checked against.
RESUMABLE_CHANGES = ("run_name", "max_steps", "log_every", "storage_path", "max_failures", "checkpoint", "samples",
                     "mlflow", "export_formats", "scaling.cpus_per_worker", "scaling.placement_strategy",
                     "scaling.num_workers", "batch.micro_batch")


def fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """The config minus RESUMABLE_CHANGES, with the U-Net config resolved: what a checkpoint must match.

    max_steps is excluded so a finished run can be extended; the cosine schedule then stretches from
    the resumed step on (stated in the README), which is the usual way to continue training.
    """
    values = to_dict(cfg)
    for dotted in RESUMABLE_CHANGES:
        node, *rest = dotted.split(".")
        if rest:
            values[node].pop(rest[0], None)
        else:
            values.pop(node, None)
    values["model"] = {"unet": to_dict(cfg.model.unet_config()), "init_from": cfg.model.init_from,
                       "gradient_checkpointing": cfg.model.gradient_checkpointing}
    return values


@dataclass(frozen=True)
class LaunchPlan:
    """What the driver resolved and checked; travels to the workers with the config."""

    unet: UNetConfig
    manifest: Manifest
    micro_batch: int
    grad_accum_steps: int
    storage_path: str  # absolute (Ray Train refuses a relative one)
    features_dir: str  # absolute or a URI


EXPORT_FORMATS = ("latentforge", "diffusers")


def _check_export_formats(formats: tuple[str, ...], unet: UNetConfig) -> None:
    unknown = sorted(set(formats) - set(EXPORT_FORMATS))
    if unknown or "latentforge" not in formats:
        raise ConfigError(f"export_formats must list 'latentforge' and optionally 'diffusers', got {list(formats)}")
    if "diffusers" in formats and unet.text_mask:
        raise ConfigError("export_formats: a diffusers pipeline attends to every text token, and this U-Net masks "
                          "the padding (text_mask=true): set model.overrides.text_mask=false, or convert the export "
                          "later with `python -m pipelines.inference.diffusers_export --drop-text-mask`")


def validate_for_launch(cfg: TrainConfig) -> LaunchPlan:
    """Every check that can fail before training starts; raises ConfigError naming the key."""
    for key, value, minimum in (("max_steps", cfg.max_steps, 1), ("log_every", cfg.log_every, 1),
                                ("scaling.num_workers", cfg.scaling.num_workers, 1),
                                ("checkpoint.every_steps", cfg.checkpoint.every_steps, 1),
                                ("checkpoint.keep", cfg.checkpoint.keep, 1), ("max_failures", cfg.max_failures, -1),
                                ("samples.every_steps", cfg.samples.every_steps, 0)):
        if value < minimum:
            raise ConfigError(f"{key} must be >= {minimum}, got {value}")
    if not cfg.run_name or "/" in cfg.run_name:
        raise ConfigError(f"run_name must be a non-empty name without '/', got {cfg.run_name!r}")
    if cfg.lr.kind not in LR_KINDS:
        raise ConfigError(f"lr.kind must be one of {LR_KINDS}, got {cfg.lr.kind!r}")
    if cfg.model.compile:
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if cfg.model.compile not in backends:
            raise ConfigError(f"model.compile: {cfg.model.compile!r} is not a torch.compile backend: use one of "
                              f"{backends}, or \"\" for eager")
    if len(cfg.samples.seeds) == 0 or len(cfg.samples.prompts) == 0:
        raise ConfigError("samples.prompts and samples.seeds must each list at least one value")
    try:
        cfg.lr_schedule()
        cfg.ema_config()
        micro, accum = derive_batch_sizes(cfg.batch.global_batch, cfg.scaling.num_workers, cfg.batch.micro_batch)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    unet = cfg.model.unet_config()
    _check_export_formats(cfg.export_formats, unet)
    if cfg.model.init_from:  # unet_config read its config.json; the weights must be there too
        found = init_from_unet(cfg.model.init_from)
        _read_init_from(found.folder, found.weights_file, read=False)
    _check_resume_from(cfg.checkpoint.resume_from)
    features_dir = storage.absolute(cfg.features_dir)
    try:
        manifest = read_manifest(features_dir)
        check_manifest_matches(manifest, unet)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"features_dir: {err}") from None
    # a batch is of one aspect-ratio bucket: some bucket must give every worker a whole micro batch
    rows_per_rank = int((manifest.shard_bucket_rows().sum(axis=0) // cfg.scaling.num_workers).max())
    if rows_per_rank < micro:
        raise ConfigError(f"features_dir holds {manifest.total_rows} rows: {rows_per_rank} per worker of its "
                          f"largest bucket, fewer than one micro batch of {micro} (lower batch.micro_batch or "
                          f"scaling.num_workers)")
    return LaunchPlan(unet=unet, manifest=manifest, micro_batch=micro, grad_accum_steps=accum,
                      storage_path=storage.absolute(cfg.storage_path), features_dir=features_dir)


def _check_resume_from(resume_from: str | None) -> None:
    """checkpoint.resume_from, a local path or a URI, is a folder (its contents: checkpoint.verify)."""
    if not resume_from:
        return
    try:
        found = storage.is_dir(resume_from)
    except (OSError, ValueError, ImportError) as err:
        raise ConfigError(f"checkpoint.resume_from: cannot read {resume_from}: {_one_line(err)}") from None
    if not found:
        raise ConfigError(f"checkpoint.resume_from: {resume_from} does not exist")
