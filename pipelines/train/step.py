"""One optimizer step of the U-Net on a DeepSpeed engine: micro-batches, the NaN policy, the stats.

    stepper = TrainStep(engine, schedule, objective_cfg, empty_caption, lr_schedule, guard, seed, rank,
                        device, LatentSampler.from_manifest(manifest))
    stats = stepper.run(step, micro_batches)       # loader batches; len == gradient accumulation steps

Each micro-batch arrives as the loader made it (stored float16 moments, on the host); the latent sample
and every conversion run on the device.

Randomness: micro-batch m of step s on rank r draws its timesteps, noise and caption drops from a
generator seeded by (seed, r, s, m): a pure function of the position, so a resumed run draws exactly
what the uninterrupted one drew, with no generator state to carry.

Non-finite losses (the stated policy, see pipelines/train/policy.NonFiniteGuard). Every rank agrees on
each micro-batch's verdict. A bad micro-batch contributes a zero gradient: its non-finite inputs are
zeroed before the forward pass, so the pass stays finite and the backward of a zero loss gives exactly
zero gradients while DeepSpeed's accumulation counter, its gradient reductions and ZeRO partitions stay
in step on every rank. A step whose micro-batches were ALL bad is skipped for the weights: it runs with
learning rate 0, so no parameter changes (Adam's moment estimates still decay by one step). Each bad step
is counted; `nonfinite.max_consecutive` bad steps in a row stop the run. A finite loss can still give a
non-finite gradient (an overflow inside backward, diverged weights): DeepSpeed's ZeRO optimizers find the
global gradient norm NaN/inf and skip the update (`engine.was_step_applied()` is False); that step is bad
too, under the same count. That verdict is the same on every rank: the norm is all-reduced, and so is
DeepSpeed's overflow flag.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from model.schedule import NoiseSchedule
from pipelines.data.loader import (
    BATCH_LATENT_LOGVAR,
    BATCH_LATENT_MEAN,
    BATCH_LATENTS,
    BATCH_NOISE_SEED,
    BATCH_TEXT_MASK,
    BATCH_TEXT_STATES,
    LatentSampler,
    seeded_generator,
)
from pipelines.train.objective import ObjectiveConfig, diffusion_loss
from pipelines.train.policy import LRSchedule, NonFiniteGuard, all_ranks_agree

# Domain tag of the per-micro-batch generator (loader streams use 1-3).
_STEP_STREAM = 11


def engine_dtype(engine: Any) -> torch.dtype:
    """The dtype the engine computes in (bf16 when DeepSpeed's bf16 is on)."""
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


class TrainStep:
    def __init__(self, engine: Any, schedule: NoiseSchedule, objective: ObjectiveConfig,
                 empty_caption: tuple[Tensor, Tensor], lr_schedule: LRSchedule, guard: NonFiniteGuard,
                 seed: int, rank: int, device: torch.device, sampler: LatentSampler,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.engine, self.objective, self.lr_schedule, self.guard = engine, objective, lr_schedule, guard
        self.schedule = schedule.to(device)
        self.empty = (empty_caption[0].to(device), empty_caption[1].to(device))
        self.seed, self.rank, self.device, self.sampler = seed, rank, device, sampler
        self.dtype = engine_dtype(engine)
        # The layout of the activations. ZeRO keeps the weights as views of its flat buffers (contiguous),
        # so channels_last applies to the inputs; every conv then runs NHWC and passes that layout on.
        self.memory_format = memory_format

    def model_fn(self, x_t: Tensor, t: Tensor, states: Tensor, mask: Tensor) -> Tensor:
        return self.engine(x_t.to(self.dtype, memory_format=self.memory_format), t, states.to(self.dtype), mask)

    def _to_device(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], Tensor]:
        """A loader batch -> the micro-batch on the device, its latents sampled there, non-finite inputs
        zeroed (so its forward stays finite and a zero loss gives exactly zero gradients); and a () bool
        flag: were all its inputs finite."""
        moved = {k: batch[k].to(self.device, non_blocking=True)
                 for k in (BATCH_LATENT_MEAN, BATCH_LATENT_LOGVAR, BATCH_TEXT_STATES, BATCH_TEXT_MASK)}
        moved[BATCH_LATENTS] = self.sampler({**moved, BATCH_NOISE_SEED: batch[BATCH_NOISE_SEED]})
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        for key in (BATCH_LATENTS, BATCH_TEXT_STATES):
            finite = finite & torch.isfinite(moved[key]).all()
            moved[key] = torch.nan_to_num(moved[key], nan=0.0, posinf=0.0, neginf=0.0)
        return moved, finite

    def run(self, step: int, micro_batches: Sequence[dict[str, Any]]) -> dict[str, Tensor | float]:
        """Forward/backward every micro-batch and take the optimizer step; -> loss (a tensor on the
        device), lr (0.0 when the step did not move the weights), skipped micro-batches, grad norm (a tensor
        or a float, as DeepSpeed gives it).

        The ranks' verdicts stay on the device (an all-reduce per micro-batch, no wait for it); the host
        reads them once, before the optimizer step, to zero the LR of a step with no good micro-batch."""
        lr = self.lr_schedule.apply(self.engine.optimizer, step)
        losses, verdicts = [], []
        for micro, raw in enumerate(micro_batches):
            batch, inputs_finite = self._to_device(raw)
            generator = seeded_generator(self.seed, self.rank, step, micro, _STEP_STREAM)
            loss, _ = diffusion_loss(self.model_fn, self.schedule, batch, self.empty, self.objective, generator)
            ok = all_ranks_agree(inputs_finite & torch.isfinite(loss))  # () bool on the device
            verdicts.append(ok)
            losses.append(torch.where(ok, loss.detach().float(), float("nan")))
            self.engine.backward(torch.where(ok, loss, torch.zeros_like(loss)))  # a bad one: zero gradients
            if micro == len(micro_batches) - 1:
                good = int(torch.stack(verdicts).sum())  # the step's one host sync
                if good == 0:
                    self._set_lr(0.0)  # every micro-batch was bad: the step must not move the weights
            self.engine.step()
        # a host flag DeepSpeed already read (no sync): False when the gradient norm was NaN/inf
        applied = good > 0 and self.engine.was_step_applied()
        self.guard.record(applied, step)  # raises after nonfinite.max_consecutive bad steps in a row
        grad_norm = self.engine.get_global_grad_norm()
        # loss and grad norm stay tensors where they are: the caller reads them once per log line
        return {"loss": torch.stack(losses).nanmean(), "lr": lr if applied else 0.0,
                "skipped_micro_batches": len(micro_batches) - good,
                "grad_norm": grad_norm if grad_norm is not None else float("nan")}

    def _set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
