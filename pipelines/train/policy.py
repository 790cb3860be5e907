"""Per-step training policies: the learning-rate schedule and what to do with a NaN/inf loss or gradient.

Pure torch (no Ray, no DeepSpeed import; NonFiniteLossError's base class comes from pipelines.core.ray_train,
which imports Ray only inside its functions) so the worker loop, benchmarks and tests share one
definition. Both are functions of the step (or of a tiny state dict), so a resumed run at step k
behaves exactly like an uninterrupted one:

    schedule = LRSchedule(base_lr=1e-4, warmup_steps=500, total_steps=10_000, kind="cosine")
    guard = NonFiniteGuard(NonFinitePolicy(max_consecutive=5))
    for step in range(start, total):
        schedule.apply(engine.optimizer, step)
        loss = engine(batch)
        if not guard.check(loss, step):      # same answer on every rank
            continue                          # skipped and counted; see NonFiniteGuard
        engine.backward(loss); engine.step()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from pipelines.core.ray_train import FinalTrainingError

LR_KINDS = ("cosine", "constant")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up, then cosine decay or constant.

    Warm-up: step s < warmup_steps gets base_lr * (s + 1) / warmup_steps, so step 0 already trains
    (base_lr / warmup_steps rather than 0, which would waste a step) and step warmup_steps - 1 reaches
    base_lr. Cosine: from base_lr at warmup_steps down to min_lr_ratio * base_lr at total_steps, held
    there afterwards (a run extended past total_steps keeps the floor instead of rising again).
    """

    base_lr: float
    warmup_steps: int = 0
    total_steps: int = 1
    kind: str = "cosine"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not (_is_real(self.base_lr) and self.base_lr > 0):
            raise ValueError(f"base_lr must be a finite number > 0, got {self.base_lr!r}")
        if not (_is_int(self.warmup_steps) and self.warmup_steps >= 0):
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not (_is_int(self.total_steps) and self.total_steps >= 1):
            raise ValueError(f"total_steps must be an int >= 1, got {self.total_steps!r}")
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must not exceed total_steps ({self.total_steps})"
            )
        if self.kind not in LR_KINDS:
            raise ValueError(f"kind must be one of {LR_KINDS}, got {self.kind!r}")
        if not (_is_real(self.min_lr_ratio) and 0.0 <= self.min_lr_ratio <= 1.0):
            raise ValueError(f"min_lr_ratio must be a number in [0, 1], got {self.min_lr_ratio!r}")

    def lr_at(self, step: int) -> float:
        if not (_is_int(step) and step >= 0):
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return float(self.base_lr)
        return self._cosine(step)

    def _cosine(self, step: int) -> float:
        span = self.total_steps - self.warmup_steps
        # span 0 (all warm-up) means there is no decay phase: go straight to the floor.
        progress = 1.0 if span == 0 else min(1.0, (step - self.warmup_steps) / span)
        floor = self.min_lr_ratio * self.base_lr
        return floor + (self.base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: Any, step: int) -> float:
        """Set every param group's lr for `step`; returns it (for logging).

        Takes anything with `param_groups`: a torch optimizer, or a DeepSpeed engine's `.optimizer`
        (ZeRO wrappers expose the wrapped optimizer's groups). Do not also configure a DeepSpeed
        `scheduler`, or the two would fight over the same field.
        """
        groups = getattr(optimizer, "param_groups", None)
        if groups is None:
            raise TypeError(
                f"{type(optimizer).__name__} has no param_groups; pass the optimizer "
                "(for a DeepSpeed engine: engine.optimizer)"
            )
        lr = self.lr_at(step)
        for group in groups:
            group["lr"] = lr
        return lr


class NonFiniteLossError(FinalTrainingError):
    """The run diverged: a restart from the last checkpoint would only diverge again, so it ends the run."""


@dataclass(frozen=True)
class NonFinitePolicy:
    """Skip a step whose loss or gradient norm is NaN/inf and count it; stop after max_consecutive in a row.

    Isolated bad steps (one odd batch, a bf16 overflow) are survivable, so they are skipped rather
    than fatal; a run of them means the run has diverged and going on only burns compute.
    """

    max_consecutive: int = 5

    def __post_init__(self) -> None:
        if not (_is_int(self.max_consecutive) and self.max_consecutive >= 1):
            raise ValueError(f"max_consecutive must be an int >= 1, got {self.max_consecutive!r}")


def all_ranks_agree(flag: Tensor) -> Tensor:
    """The AND of a () bool flag over every rank, on the flag's device (NCCL for CUDA tensors, gloo for
    CPU ones), without waiting for it on the host. Local when there is no process group.

    Every rank must take the same decision: under DeepSpeed, backward/step run collectives, and a
    rank that skips while another steps would deadlock (or desynchronise ZeRO partitions).
    """
    value = flag.to(torch.int32)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value.bool()


def all_ranks_finite(loss: Tensor | float) -> bool:
    """True when the loss is finite on every rank (one host sync)."""
    return bool(all_ranks_agree(torch.isfinite(torch.as_tensor(loss).detach()).all()))


class NonFiniteGuard:
    """Applies a NonFinitePolicy step by step; its state is checkpointed for an exact resume.

    How a caller skips a step under DeepSpeed: when `check` returns False, do not call
    `engine.backward(loss)` nor `engine.step()` for this micro-batch (nothing was accumulated, so
    nothing needs undoing). If backward already ran (e.g. the check happens after it), call
    `engine.optimizer.zero_grad()` instead of `engine.step()`, so the bad gradients never reach
    the weights. Either way the step counter and the LR schedule advance as usual, so a skipped
    step costs its batch, not the schedule's alignment with the data.

    `check` decides through `all_ranks_finite`, so all ranks skip together and hold the same counts.
    """

    def __init__(self, policy: NonFinitePolicy | None = None) -> None:
        self.policy = policy if policy is not None else NonFinitePolicy()
        self.total_skipped = 0
        self.consecutive = 0

    def check(self, loss: Tensor | float, step: int | None = None) -> bool:
        """True: proceed with the step. False: skip it (counted). Raises after too many in a row."""
        return self.record(all_ranks_finite(loss), step)

    def record(self, finite: bool, step: int | None = None) -> bool:
        """Count a verdict every rank already agreed on (check() reaches it itself, with a collective)."""
        if finite:
            self.consecutive = 0
            return True
        self.total_skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.policy.max_consecutive:
            at = f"at step {step}" if step is not None else "now"
            raise NonFiniteLossError(
                f"the loss or the gradient norm was NaN/inf for {self.consecutive} steps in a row {at} "
                f"(max_consecutive={self.policy.max_consecutive}, {self.total_skipped} skipped in total); "
                "the run has diverged: lower the learning rate or lengthen the warm-up, and check the data "
                "(NaN latents/embeddings) and the precision (bf16/fp16 overflow)"
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"total_skipped": self.total_skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        keys = {"total_skipped", "consecutive"}
        if set(state) != keys:
            raise ValueError(f"NonFiniteGuard state must have keys {sorted(keys)}, got {sorted(state)}")
        for key in sorted(keys):
            if not (_is_int(state[key]) and state[key] >= 0):
                raise ValueError(f"NonFiniteGuard state {key} must be an int >= 0, got {state[key]!r}")
        self.total_skipped = state["total_skipped"]
        self.consecutive = state["consecutive"]
