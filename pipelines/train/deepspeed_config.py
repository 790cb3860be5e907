"""The DeepSpeed config: built by ONE function from typed settings plus a static per-stage file.

    micro, accum = derive_batch_sizes(global_batch=64, world_size=2, micro_batch=8)   # -> (8, 4)
    ds_config = build_deepspeed_config(DeepSpeedSettings(zero_stage=2), micro, accum, world_size=2)
    engine, optimizer, _, _ = deepspeed.initialize(model=unet, model_parameters=unet.parameters(),
                                                   config=ds_config)

Who owns what (so nothing is written twice):
- infra/deepspeed/zero{1,2,3}.json hold only what is static per ZeRO stage: the stage number and its
  tuning knobs (bucket sizes, overlap_comm, contiguous_gradients, stage3_* settings). JSON has no
  comments, so their reasons live here: overlap_comm is off for stage 1 (it only helps when gradients
  are partitioned), stage 3 keeps small parameters (< 1e5 elements) unpartitioned to save gathers, and
  gathers 16-bit weights on save so an exported model is whole.
- This module fills everything that depends on the run: batch sizes (train_batch_size computed once,
  here), precision, gradient clipping (always explicit: DeepSpeed's default changed in 2026), offload
  and the optimizer. A static file that sets any of those keys is an error, not a silent override.

The optimizer is declared in the config (type AdamW with `torch_adam: true`), not passed as a client
optimizer: DeepSpeed then builds torch.optim.AdamW itself, which needs no JIT-compiled kernel on CPU
(FusedAdam and DeepSpeedCPUAdam each compile for about a minute) and is also accepted with ZeRO
offload, where a client torch optimizer is refused unless `zero_force_ds_cpu_optimizer` is turned off.
The LR here is the base LR; warm-up and decay are the training loop's scheduler's business.

Precision: bf16 is the default (GPU runs), with gradients accumulated in fp32. CPU tests use fp32 for exact comparisons; bf16 also trains
on CPU with gloo (ZeRO stages 1-3), only slower and less exact.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipelines.core.runtime import REPO_ROOT

# The package lives at <repo>/pipelines, so the static files are found without env vars or cwd.
DEFAULT_INFRA_DIR = REPO_ROOT / "infra" / "deepspeed"

# Keys this module owns; a static file setting one of them would mean a value written twice.
_RUN_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "bf16", "fp16", "data_types", "gradient_clipping", "optimizer", "scheduler",
)
_RUN_ZERO_KEYS = ("offload_optimizer", "offload_param")

# Large enough that DeepSpeed's own progress lines never appear: the job logs progress itself.
_STEPS_PER_PRINT = 1_000_000_000


@dataclass(frozen=True)
class AdamWSettings:
    """torch.optim.AdamW's arguments (built by DeepSpeed through `torch_adam: true`)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8


@dataclass(frozen=True)
class DeepSpeedSettings:
    """What a job config says about DeepSpeed; batch sizes come from the training config instead."""

    zero_stage: int = 2
    precision: Literal["bf16", "fp32"] = "bf16"
    offload_optimizer: bool = False  # optimizer states and step on the CPU (any stage)
    offload_params: bool = False  # parameters on the CPU between uses: ZeRO-3 only
    gradient_clipping: float = 1.0  # max global grad norm; 0.0 disables clipping
    optimizer: Literal["adamw_torch"] = "adamw_torch"
    adamw: AdamWSettings = field(default_factory=AdamWSettings)

    def __post_init__(self) -> None:
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"deepspeed.precision must be 'bf16' or 'fp32', got {self.precision!r}")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                f"deepspeed.offload_params needs zero_stage 3 (got {self.zero_stage}): only ZeRO-3 "
                "partitions parameters; use offload_optimizer for stages 1 and 2")
        if self.gradient_clipping < 0:
            raise ValueError(f"deepspeed.gradient_clipping must be >= 0, got {self.gradient_clipping}")
        if self.optimizer != "adamw_torch":
            raise ValueError(f"deepspeed.optimizer must be 'adamw_torch', got {self.optimizer!r}")


def derive_batch_sizes(global_batch: int, world_size: int, micro_batch: int) -> tuple[int, int]:
    """Split a global batch into (micro batch per rank, gradient accumulation steps).

    global_batch = micro_batch * grad_accum_steps * world_size must hold exactly: a rounded batch
    would silently change the effective learning rate.
    """
    for name, value in (("global_batch", global_batch), ("world_size", world_size),
                        ("micro_batch", micro_batch)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ValueError(
            f"global batch {global_batch} is not divisible by micro_batch {micro_batch} x world_size "
            f"{world_size} = {per_step}; valid global batches near it: {_nearby_multiples(global_batch, per_step)}"
            f"; {_micro_batch_hint(global_batch, world_size)}")
    return micro_batch, global_batch // per_step


def build_deepspeed_config(settings: DeepSpeedSettings, micro_batch_per_gpu: int, grad_accum_steps: int,
                           world_size: int, infra_dir: Path = DEFAULT_INFRA_DIR) -> dict[str, Any]:
    """The full DeepSpeed config dict: the stage's static file plus the run-dependent values."""
    static = _load_static(Path(infra_dir) / f"zero{settings.zero_stage}.json", settings.zero_stage)
    config = copy.deepcopy(static)
    config.update(
        train_micro_batch_size_per_gpu=micro_batch_per_gpu,
        gradient_accumulation_steps=grad_accum_steps,
        train_batch_size=micro_batch_per_gpu * grad_accum_steps * world_size,
        bf16={"enabled": settings.precision == "bf16"},
        gradient_clipping=settings.gradient_clipping,
        optimizer=_optimizer_section(settings),
        steps_per_print=_STEPS_PER_PRINT,
        wall_clock_breakdown=False,
    )
    if settings.precision == "bf16":
        # Gradients summed over accumulation steps in bf16 keep 8 mantissa bits; fp32 sums keep them all.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    config["zero_optimization"].update(_offload_sections(settings))
    return config


def _load_static(path: Path, stage: int) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no static DeepSpeed file for ZeRO stage {stage}: {path}")
    static = json.loads(path.read_text())
    zero = static.get("zero_optimization")
    if not isinstance(zero, dict) or zero.get("stage") != stage:
        raise ValueError(f"{path}: zero_optimization.stage must be {stage}")
    owned = [k for k in _RUN_KEYS if k in static] + [f"zero_optimization.{k}" for k in _RUN_ZERO_KEYS if k in zero]
    if owned:
        raise ValueError(f"{path} sets {owned}: these come from the job config (pipelines/train/deepspeed_config.py), "
                         "remove them from the static file")
    return static


def _optimizer_section(settings: DeepSpeedSettings) -> dict[str, Any]:
    adamw = settings.adamw
    return {"type": "AdamW", "params": {"lr": adamw.lr, "betas": list(adamw.betas), "eps": adamw.eps,
                                         "weight_decay": adamw.weight_decay, "torch_adam": True}}


def _offload_sections(settings: DeepSpeedSettings) -> dict[str, Any]:
    # pin_memory speeds host<->GPU copies; the CPU accelerator treats it as a no-op, so it is safe in tests.
    sections: dict[str, Any] = {}
    if settings.offload_optimizer:
        sections["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if settings.offload_params:
        sections["offload_param"] = {"device": "cpu", "pin_memory": True}
    return sections


def _nearby_multiples(value: int, step: int) -> list[int]:
    below = (value // step) * step
    return [m for m in (below, below + step) if m > 0]


def _micro_batch_hint(global_batch: int, world_size: int) -> str:
    if global_batch % world_size:
        return f"the global batch must also be a multiple of world_size {world_size}"
    return f"valid micro batches for global batch {global_batch} on {world_size} workers: " \
           f"{_divisors(global_batch // world_size)}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
