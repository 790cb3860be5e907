"""Noise schedule for DDPM-style latent diffusion: betas, q_sample, targets, loss weights.

Everything here is pure torch so training, sampling and benchmarks can share it without
pulling in diffusers. Tables are computed in float64 (cumulative products of ~1000 factors
lose precision in float32) and stored as float32 CPU tensors; per-sample coefficients are
gathered on the device of the timestep tensor and cast to the dtype of the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("eps", "v")


@dataclass(frozen=True)
class ScheduleConfig:
    """Training noise schedule.

    beta_schedule: "linear" (DDPM), "scaled_linear" (Stable Diffusion: linspace of sqrt(beta),
    squared) or "cosine" (Nichol & Dhariwal, diffusers' "squaredcos_cap_v2"; ignores
    beta_start/beta_end). rescale_zero_terminal_snr applies Lin et al. 2023, algorithm 1, so that
    alpha_bar at the last timestep is exactly 0 (pair it with prediction_type="v").
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "eps"
    rescale_zero_terminal_snr: bool = False

    def __post_init__(self) -> None:
        t = self.num_train_timesteps
        if isinstance(t, bool) or not isinstance(t, int) or t < 2:
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {t!r}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if not (0.0 < self.beta_start < self.beta_end < 1.0):
            raise ValueError(
                f"beta_start and beta_end must satisfy 0 < beta_start < beta_end < 1, "
                f"got beta_start={self.beta_start!r}, beta_end={self.beta_end!r}"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if not isinstance(self.rescale_zero_terminal_snr, bool):
            raise ValueError(f"rescale_zero_terminal_snr must be a bool, got {self.rescale_zero_terminal_snr!r}")


# ----------------------------------------------------------------------------- beta tables


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> Tensor:
    """squaredcos_cap_v2: beta_i = 1 - f((i+1)/T) / f(i/T), f(t) = cos((t+s)/(1+s) * pi/2)^2, s=0.008.

    Clipped at max_beta because f(1) == 0 would give beta == 1 (a singular last step).
    """

    def f(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1.0 - f((i + 1) / num_steps) / f(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023, algorithm 1: shift/scale sqrt(alpha_bar) so the last one is exactly 0.

    The first sqrt(alpha_bar) is kept, so the low-noise end of the schedule barely changes.
    """
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()  # (T,)
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))  # last entry: exactly 0
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])  # undo the cumulative product
    return 1.0 - alphas


def make_betas(cfg: ScheduleConfig) -> Tensor:
    """Float64 betas (T,) for the config."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float64)
    elif cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float64) ** 2
    else:
        betas = _cosine_betas(n)
    if cfg.rescale_zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


# ----------------------------------------------------------------------------- helpers


def per_sample(coef: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample coefficient (B,) to (B, 1, 1, 1) (as many 1s as like has extra dims)
    on like's device and dtype, so it broadcasts against a batch like (B, C, H, W)."""
    return coef.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def x0_from_output(x_t: Tensor, alpha_bar: Tensor, model_output: Tensor, prediction_type: str) -> Tensor:
    """Data estimate from a model output, given alpha_bar broadcastable to x_t.

    eps: x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab)   (undefined where ab == 0)
    v:   x0 = sqrt(ab) x_t - sqrt(1-ab) v
    """
    a, s = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
    if prediction_type == "eps":
        return (x_t - s * model_output) / a
    return a * x_t - s * model_output


def eps_from_output(x_t: Tensor, alpha_bar: Tensor, model_output: Tensor, prediction_type: str) -> Tensor:
    """Noise estimate from a model output: eps as is; v: eps = sqrt(1-ab) x_t + sqrt(ab) v."""
    if prediction_type == "eps":
        return model_output
    return (1.0 - alpha_bar).sqrt() * x_t + alpha_bar.sqrt() * model_output


def offset_noise(like: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian noise shaped like `like` (B, C, H, W) plus strength * a per-(B, C) gaussian offset.

    The offset lets the model learn to change the mean brightness/colour of a whole image,
    which plain i.i.d. noise almost never perturbs. Both draws always happen (even for
    strength 0) so the generator advances identically whatever the strength.
    """
    dtype = like.dtype if like.is_floating_point() else torch.float32
    device = generator.device if generator is not None else like.device
    noise = torch.randn(like.shape, generator=generator, device=device, dtype=dtype)  # (B, C, H, W)
    offset_shape = (*like.shape[:2], *([1] * (like.dim() - 2)))
    offset = torch.randn(offset_shape, generator=generator, device=device, dtype=dtype)  # (B, C, 1, 1)
    if strength != 0:
        noise = noise + strength * offset
    return noise.to(like.device)


# ----------------------------------------------------------------------------- schedule


class NoiseSchedule:
    """Precomputed tables for one ScheduleConfig.

    Attributes (float32, CPU unless moved with .to()): betas, alphas_cumprod,
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, snr_table; all (T,).
    Methods take integer timesteps t (B,) on any device and return tensors on t's (or the
    data's) device.
    """

    def __init__(self, config: ScheduleConfig | None = None) -> None:
        self.config = config if config is not None else ScheduleConfig()
        betas = make_betas(self.config)  # float64 (T,)
        ab = torch.cumprod(1.0 - betas, dim=0)  # float64 (T,)
        self.betas = betas.float()
        self.alphas_cumprod = ab.float()
        self.sqrt_alphas_cumprod = ab.sqrt().float()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ab).sqrt().float()
        self.snr_table = (ab / (1.0 - ab)).float()  # ab < 1 always since beta_0 > 0

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """A copy with every table on `device` (avoids a host->device copy per gather)."""
        moved = NoiseSchedule.__new__(NoiseSchedule)
        moved.config = self.config
        for name in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "snr_table"):
            setattr(moved, name, getattr(self, name).to(device))
        return moved

    @staticmethod
    def _gather(table: Tensor, t: Tensor) -> Tensor:
        """table[t] on t's device: (B,)."""
        return table.to(t.device)[t.long()]

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Forward process x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise. x0, noise (B, C, H, W); t (B,)."""
        a = per_sample(self._gather(self.sqrt_alphas_cumprod, t), x0)  # (B, 1, 1, 1)
        s = per_sample(self._gather(self.sqrt_one_minus_alphas_cumprod, t), x0)
        return a * x0 + s * noise

    def v_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Velocity v = sqrt(ab) noise - sqrt(1 - ab) x0 (Salimans & Ho 2022)."""
        a = per_sample(self._gather(self.sqrt_alphas_cumprod, t), x0)  # (B, 1, 1, 1)
        s = per_sample(self._gather(self.sqrt_one_minus_alphas_cumprod, t), x0)
        return a * noise - s * x0

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model is trained to output: noise for "eps", velocity for "v"."""
        if self.prediction_type == "eps":
            return noise
        return self.v_target(x0, noise, t)

    def predict_x0(self, x_t: Tensor, t: Tensor, model_output: Tensor) -> Tensor:
        """x0 estimate from the model output (config's prediction type).

        With eps prediction and zero terminal SNR this is inf/NaN at the last timestep
        (x_t carries no signal there); use v prediction with that option.
        """
        ab = per_sample(self._gather(self.alphas_cumprod, t), x_t)  # (B, 1, 1, 1)
        return x0_from_output(x_t, ab, model_output, self.prediction_type)

    def predict_eps(self, x_t: Tensor, t: Tensor, model_output: Tensor) -> Tensor:
        """Noise estimate from the model output (config's prediction type)."""
        ab = per_sample(self._gather(self.alphas_cumprod, t), x_t)  # (B, 1, 1, 1)
        return eps_from_output(x_t, ab, model_output, self.prediction_type)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ab / (1 - ab) at t, float32 (B,). 0 at T-1 with zero terminal SNR."""
        return self._gather(self.snr_table, t)

    def loss_weights(self, t: Tensor, min_snr_gamma: float | None = None) -> Tensor:
        """Per-sample MSE weights (B,), float32: min-SNR-gamma (Hang et al. 2023) or ones.

        eps: min(snr, gamma) / snr, computed as gamma / max(snr, gamma), which is the same for
             snr > 0 and gives the limit 1 at snr == 0 (zero terminal SNR) instead of 0/0.
        v:   min(snr, gamma) / (snr + 1); finite everywhere, and exactly 0 at snr == 0: the
             formula gives the pure-noise step no weight (its x0-space weight min(0, gamma) is 0).
        All weights are in [0, 1].
        """
        snr = self.snr(t)
        if min_snr_gamma is None:
            return torch.ones_like(snr)
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0 or None, got {min_snr_gamma!r}")
        gamma = torch.full_like(snr, float(min_snr_gamma))
        if self.prediction_type == "eps":
            return gamma / torch.maximum(snr, gamma)
        return torch.minimum(snr, gamma) / (snr + 1.0)

    def sample_timesteps(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Uniform integer timesteps in [0, T), int64 (B,).

        Drawn on the generator's device (CPU when none) and then moved, so a seeded CPU
        generator gives the same timesteps whatever device training runs on.
        """
        draw_device = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=draw_device)
        return t.to(device) if device is not None else t
