"""One optimizer step of the U-Net on a DeepSpeed engine: micro-batches, the NaN policy, the stats.

    stepper = TrainStep(engine, schedule, objective_cfg, empty_caption, lr_schedule, guard, seed, rank)
    stats = stepper.run(step, micro_batches)       # len(micro_batches) == gradient accumulation steps

Randomness: micro-batch m of step s on rank r draws its timesteps, noise and caption drops from a
generator seeded by (seed, r, s, m): a pure function of the position, so a resumed run draws exactly
what the uninterrupted one drew, with no generator state to carry.

Non-finite losses (the stated policy, see pipelines/train/policy.NonFiniteGuard). Every rank agrees on
each micro-batch's verdict. A bad micro-batch contributes a zero gradient: its backward runs on a
zero loss from a clean forward pass, so DeepSpeed's accumulation counter, its gradient reductions and
ZeRO partitions stay exactly in step on every rank. A step whose micro-batches were ALL bad is skipped
for the weights: it runs with learning rate 0, so no parameter changes (Adam's moment estimates still
decay by one step). Each bad step is counted; `nonfinite.max_consecutive` bad steps in a row stop the run.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from model.schedule import NoiseSchedule
from pipelines.data.loader import BATCH_LATENTS, BATCH_TEXT_MASK, BATCH_TEXT_STATES, seeded_generator
from pipelines.train.objective import ObjectiveConfig, diffusion_loss
from pipelines.train.policy import LRSchedule, NonFiniteGuard, all_ranks_finite

# Domain tag of the per-micro-batch generator (loader streams use 1-3).
_STEP_STREAM = 11


def engine_dtype(engine: Any) -> torch.dtype:
    """The dtype the engine computes in (bf16 when DeepSpeed's bf16 is on)."""
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


class TrainStep:
    def __init__(self, engine: Any, schedule: NoiseSchedule, objective: ObjectiveConfig,
                 empty_caption: tuple[Tensor, Tensor], lr_schedule: LRSchedule, guard: NonFiniteGuard,
                 seed: int, rank: int, device: torch.device) -> None:
        self.engine, self.objective, self.lr_schedule, self.guard = engine, objective, lr_schedule, guard
        self.schedule = schedule.to(device)
        self.empty = (empty_caption[0].to(device), empty_caption[1].to(device))
        self.seed, self.rank, self.device = seed, rank, device
        self.dtype = engine_dtype(engine)

    def model_fn(self, x_t: Tensor, t: Tensor, states: Tensor, mask: Tensor) -> Tensor:
        return self.engine(x_t.to(self.dtype), t, states.to(self.dtype), mask)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return {k: batch[k].to(self.device, non_blocking=True)
                for k in (BATCH_LATENTS, BATCH_TEXT_STATES, BATCH_TEXT_MASK)}

    def _zero_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """A loss of exactly 0 whose backward reaches every parameter (finite weights -> zero grads)."""
        latents = torch.zeros_like(batch[BATCH_LATENTS])  # (B, C, h, w)
        t = torch.zeros(latents.shape[0], dtype=torch.long, device=self.device)  # (B,)
        states = torch.zeros_like(batch[BATCH_TEXT_STATES])  # (B, L, D)
        mask = torch.ones_like(batch[BATCH_TEXT_MASK])  # (B, L)
        return self.model_fn(latents, t, states, mask).float().mean() * 0.0

    def run(self, step: int, micro_batches: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Forward/backward every micro-batch and take the optimizer step; returns host-side stats."""
        lr = self.lr_schedule.apply(self.engine.optimizer, step)
        losses, good = [], 0
        for micro, raw in enumerate(micro_batches):
            batch = self._to_device(raw)
            generator = seeded_generator(self.seed, self.rank, step, micro, _STEP_STREAM)
            loss, _ = diffusion_loss(self.model_fn, self.schedule, batch, self.empty, self.objective, generator)
            if all_ranks_finite(loss):
                good += 1
                losses.append(loss.detach())
            else:
                loss = self._zero_loss(batch)
            if micro == len(micro_batches) - 1 and good == 0:
                self._set_lr(0.0)  # every micro-batch was bad: the step must not move the weights
            self.engine.backward(loss)
            self.engine.step()
        self.guard.record(good > 0, step)  # the ranks agreed per micro batch above; raises after N bad in a row
        grad_norm = self.engine.get_global_grad_norm()
        mean_loss = torch.stack(losses).float().mean().item() if losses else float("nan")
        return {"loss": mean_loss, "lr": lr if good else 0.0, "skipped_micro_batches": len(micro_batches) - good,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}

    def _set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
