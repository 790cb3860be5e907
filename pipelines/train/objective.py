"""The training objective of one U-Net step: timesteps, noise, q_sample, caption dropout, weighted MSE.

Pure torch (no Ray, no DeepSpeed) so the Ray Train worker loop, benchmarks and tests share one
definition. Every random draw comes from the torch.Generator passed in, in a fixed order:

    1. timesteps       schedule.sample_timesteps(B)          (B,)
    2. noise + offset  offset_noise(latents)                  (B, C, h, w), then (B, C, 1, 1)
    3. caption drops   torch.rand(B)                          (B,)

Each draw happens whatever the config (offset strength 0, dropout 0), so the generator advances
identically per step; checkpointing its state therefore gives an exact resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from model.schedule import BETA_SCHEDULES, PREDICTION_TYPES, NoiseSchedule, ScheduleConfig, offset_noise
from pipelines.data.loader import BATCH_LATENTS, BATCH_TEXT_MASK, BATCH_TEXT_STATES

# (x_t (B, C, h, w), t (B,), states (B, L, D), mask (B, L)) -> prediction (B, C, h, w)
Model = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the U-Net is trained to predict and how each sample's loss is weighted.

    prediction_type: "eps" (noise) or "v" (velocity; use it with zero_terminal_snr).
    min_snr_gamma: min-SNR-gamma weighting (Hang et al. 2023; 5 is the paper's value), None = off.
    offset_noise: strength of the per-(sample, channel) noise offset (0 = plain noise; ~0.05-0.1).
    caption_dropout: probability of replacing a caption by the empty caption (for CFG).
    """

    prediction_type: str = "eps"
    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    zero_terminal_snr: bool = False
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    caption_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if not isinstance(self.zero_terminal_snr, bool):
            raise ValueError(f"zero_terminal_snr must be a bool, got {self.zero_terminal_snr!r}")
        if self.min_snr_gamma is not None and not (_is_real(self.min_snr_gamma) and self.min_snr_gamma > 0):
            raise ValueError(f"min_snr_gamma must be a finite number > 0 or None, got {self.min_snr_gamma!r}")
        if not (_is_real(self.offset_noise) and self.offset_noise >= 0):
            raise ValueError(f"offset_noise must be a finite number >= 0, got {self.offset_noise!r}")
        if not (_is_real(self.caption_dropout) and 0.0 <= self.caption_dropout <= 1.0):
            raise ValueError(f"caption_dropout must be a number in [0, 1], got {self.caption_dropout!r}")
        self.schedule_config()  # validates num_train_timesteps (its error names the field)

    def schedule_config(self) -> ScheduleConfig:
        """The ScheduleConfig of this objective (SD's beta_start/beta_end)."""
        return ScheduleConfig(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            prediction_type=self.prediction_type,
            rescale_zero_terminal_snr=self.zero_terminal_snr,
        )

    def noise_schedule(self) -> NoiseSchedule:
        """The NoiseSchedule to train (and export for sampling) with."""
        return NoiseSchedule(self.schedule_config())


# ----------------------------------------------------------------------------- caption dropout


def sample_dropped_rows(batch_size: int, p: float, generator: torch.Generator | None,
                        device: torch.device | str) -> Tensor:
    """Bool (B,) on `device`: True = replace this row's caption by the empty caption.

    Drawn on the generator's device and then moved, so a CPU generator gives the same rows on any
    training device. rand is in [0, 1), so p=0 drops nothing and p=1 drops every row.
    """
    draw_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand((batch_size,), generator=generator, device=draw_device)  # (B,)
    return (u < p).to(device)


def replace_rows(states: Tensor, mask: Tensor, empty_states: Tensor, empty_mask: Tensor,
                 dropped: Tensor) -> tuple[Tensor, Tensor]:
    """states (B, L, D), mask (B, L) with the rows where dropped (B,) is True replaced by
    empty_states (L, D) / empty_mask (L,). Returns new tensors; the inputs are untouched."""
    if tuple(empty_states.shape) != tuple(states.shape[1:]) or tuple(empty_mask.shape) != tuple(mask.shape[1:]):
        raise ValueError(
            f"empty caption states {tuple(empty_states.shape)} / mask {tuple(empty_mask.shape)} do not match "
            f"the batch's per-row text shape {tuple(states.shape[1:])} / {tuple(mask.shape[1:])}"
        )
    dropped = dropped.to(states.device)
    empty_states = empty_states.to(device=states.device, dtype=states.dtype)
    empty_mask = empty_mask.to(device=mask.device, dtype=mask.dtype)
    new_states = torch.where(dropped[:, None, None], empty_states[None], states)  # (B, L, D)
    new_mask = torch.where(dropped.to(mask.device)[:, None], empty_mask[None], mask)  # (B, L)
    return new_states, new_mask


def apply_caption_dropout(states: Tensor, mask: Tensor, empty_states: Tensor, empty_mask: Tensor,
                          p: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Replace whole captions by the empty caption with probability p each, so the model also
    learns the unconditional prediction that classifier-free guidance needs at sampling time."""
    dropped = sample_dropped_rows(states.shape[0], p, generator, states.device)
    return replace_rows(states, mask, empty_states, empty_mask, dropped)


# ----------------------------------------------------------------------------- the loss


def _check_batch(batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    missing = [k for k in (BATCH_LATENTS, BATCH_TEXT_STATES, BATCH_TEXT_MASK) if k not in batch]
    if missing:
        raise KeyError(f"training batch lacks {missing}; it holds {sorted(batch)}")
    latents = batch[BATCH_LATENTS]  # (B, C, h, w)
    if latents.ndim != 4 or not latents.is_floating_point():
        raise ValueError(f"batch[{BATCH_LATENTS!r}] must be float (B, C, h, w), got "
                         f"{latents.dtype} {tuple(latents.shape)}")
    return latents, batch[BATCH_TEXT_STATES], batch[BATCH_TEXT_MASK]


def weighted_mse(prediction: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """mean_b(w_b * mean_{C,h,w}((pred - target)^2)) in float32.

    The cast matters under bf16 autocast: squared errors summed over C*h*w elements in bf16 (8-bit
    mantissa) would lose most of the signal of a small loss.
    """
    err = (prediction.float() - target.float()).pow(2)  # (B, C, h, w)
    per_sample = err.mean(dim=tuple(range(1, err.dim())))  # (B,)
    return (weights.float().to(per_sample.device) * per_sample).mean()


def diffusion_loss(model: Model, schedule: NoiseSchedule, batch: dict, empty_caption: tuple[Tensor, Tensor],
                   cfg: ObjectiveConfig, generator: torch.Generator | None) -> tuple[Tensor, dict[str, Tensor]]:
    """The scalar training loss of one batch, and detached stats.

    batch: the loader's dict (latents (B, C, h, w), text states (B, L, D), text mask (B, L)).
    empty_caption: (states (L, D), mask (L,)) of the empty caption (load_empty_caption).
    Stats are 0-dim float32 tensors (no .item(): that would sync the GPU every step): loss,
    loss_weight_mean, caption_dropped_frac, timestep_mean.
    """
    if schedule.prediction_type != cfg.prediction_type:
        raise ValueError(f"schedule predicts {schedule.prediction_type!r} but the objective's prediction_type "
                         f"is {cfg.prediction_type!r}: build the schedule with cfg.noise_schedule()")
    latents, states, mask = _check_batch(batch)
    device = latents.device
    t = schedule.sample_timesteps(latents.shape[0], generator, device=device)  # (B,)
    noise = offset_noise(latents, cfg.offset_noise, generator)  # (B, C, h, w)
    dropped = sample_dropped_rows(latents.shape[0], cfg.caption_dropout, generator, device)  # (B,)
    states, mask = replace_rows(states, mask, empty_caption[0], empty_caption[1], dropped)

    x_t = schedule.q_sample(latents, t, noise)  # (B, C, h, w)
    prediction = model(x_t, t, states, mask)  # (B, C, h, w)
    target = schedule.target(latents, noise, t)  # (B, C, h, w)
    weights = schedule.loss_weights(t, cfg.min_snr_gamma)  # (B,) float32
    loss = weighted_mse(prediction, target, weights)
    stats = {
        "loss": loss.detach(),
        "loss_weight_mean": weights.detach().mean(),
        "caption_dropped_frac": dropped.float().mean(),
        "timestep_mean": t.float().mean(),
    }
    return loss, stats
