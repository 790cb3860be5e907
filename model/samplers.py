"""Deterministic samplers (DDIM eta=0, DPM-Solver++ 2M, Euler) with classifier-free guidance.

Each sampler reproduces the corresponding diffusers scheduler in its default configuration
(apart from the documented choices below), so a model trained here can be compared like for
like with diffusers pipelines. Pure torch: diffusers is only used by the tests.

Timesteps per sampler mirror diffusers' `set_timesteps` for the same `timestep_spacing`, which
differs between schedulers (see `timesteps_for`). Coefficients are computed in float64 from the
schedule's tables; the latent state is kept in at least float32 and the model is called in the
dtype of the initial noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from model.schedule import NoiseSchedule, eps_from_output, x0_from_output

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# alpha_bar used in place of an exact 0 (zero terminal SNR) by the sigma-space samplers, as in
# diffusers' Euler/DPM-Solver schedulers: the smallest positive fp16 subnormal, so sigma_max ~ 4096.
ZERO_SNR_ALPHA_BAR = 2.0**-24

ModelFn = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]
Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x (B, C, H, W), t 0-dim) -> guided output


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling settings.

    name: "ddim" | "dpmpp_2m" | "euler". timestep_spacing / steps_offset: as diffusers (the
    offset only shifts "leading" timesteps; SD 1.x configs use "leading" with steps_offset=1).
    guidance_scale: classifier-free guidance weight; 1 means a single unguided model call.
    guidance_rescale: phi of Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are
    Flawed", sec. 3.4), diffusers' `guidance_rescale`: the guided output is rescaled to the per-sample
    std of the conditional one and blended with itself, phi * rescaled + (1 - phi) * guided. Counters
    the over-exposure of high guidance (notably with zero terminal SNR; the paper uses 0.7). 0 = off,
    the plain guided output; it only acts where guidance runs (uncond context given, scale != 1).
    """

    name: str = "dpmpp_2m"
    steps: int = 25
    guidance_scale: float = 7.5
    timestep_spacing: str = "trailing"
    steps_offset: int = 0
    guidance_rescale: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in _SAMPLERS:
            raise ValueError(f"name must be one of {tuple(_SAMPLERS)}, got {self.name!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {g!r}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {self.timestep_spacing!r}")
        off = self.steps_offset
        if isinstance(off, bool) or not isinstance(off, int) or off < 0:
            raise ValueError(f"steps_offset must be an int >= 0, got {off!r}")
        r = self.guidance_rescale
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0 <= r <= 1:
            raise ValueError(f"guidance_rescale must be a finite number in [0, 1], got {r!r}")


# ----------------------------------------------------------------------------- timesteps


def _np_linspace(stop: float, num: int) -> Tensor:
    """numpy.linspace(0, stop, num) in float64 (i * step, last value exactly stop), so that
    rounding ties fall the same way as in diffusers."""
    if num == 1:
        return torch.zeros(1, dtype=torch.float64)
    values = torch.arange(num, dtype=torch.float64) * (stop / (num - 1))
    values[-1] = stop
    return values


def _spaced(num_train: int, steps: int, cfg: SamplerConfig, extra_point: bool, round_linspace: bool) -> Tensor:
    """Descending float64 timesteps.

    extra_point: DPM-Solver spaces steps + 1 points for "linspace"/"leading" and drops the
    smallest (t = 0 before the offset). round_linspace: False only for Euler, whose "linspace"
    timesteps stay fractional (the model sees t = 957.375 and sigma is interpolated).
    """
    if cfg.timestep_spacing == "trailing":  # T - 1, T - 1 - T/n, ... (rounded)
        return torch.round(num_train - torch.arange(steps, dtype=torch.float64) * (num_train / steps)) - 1
    points = steps + 1 if extra_point else steps
    if cfg.timestep_spacing == "linspace":  # 0 .. T - 1 inclusive
        ts = _np_linspace(num_train - 1, points)
        ts = torch.round(ts) if round_linspace else ts
        return ts.flip(0)[:steps]
    ts = torch.arange(points, dtype=torch.float64) * (num_train // points)  # leading: 0, T//n, ...
    return ts.flip(0)[:steps] + cfg.steps_offset


def _ddim_timesteps(num_train: int, cfg: SamplerConfig) -> Tensor:
    return _spaced(num_train, cfg.steps, cfg, extra_point=False, round_linspace=True).long()


def _dpm_timesteps(num_train: int, cfg: SamplerConfig) -> Tensor:
    return _spaced(num_train, cfg.steps, cfg, extra_point=True, round_linspace=True).long()


def _euler_timesteps(num_train: int, cfg: SamplerConfig) -> Tensor:
    return _spaced(num_train, cfg.steps, cfg, extra_point=False, round_linspace=False).float()


def timesteps_for(schedule: NoiseSchedule, cfg: SamplerConfig) -> Tensor:
    """The descending timesteps the sampler visits, identical to diffusers' `scheduler.timesteps`
    for the matching scheduler, spacing and steps_offset:

    - ddim / euler: "linspace" = linspace(0, T-1, n); "leading" = arange(n) * (T // n) + offset;
      "trailing" = round(arange(T, 0, -T/n)) - 1.
    - dpmpp_2m: "linspace" and "leading" space n + 1 points and drop the last (so for n=10,
      linspace gives 999, 899, ..., 100 and leading gives 900, 810, ..., 90); "trailing" as above.

    int64 (LongTensor) for ddim and dpmpp_2m. float32 for euler, like diffusers' Euler, because
    its "linspace" timesteps are fractional (integral-valued for the other spacings).
    """
    num_train = schedule.num_train_timesteps
    ts = _SAMPLERS[_check_name(cfg.name)].timesteps(num_train, cfg)
    if ts[0] > num_train - 1 or ts[-1] < 0 or (ts.numel() > 1 and bool((ts[1:] >= ts[:-1]).any())):
        raise ValueError(
            f"steps={cfg.steps}, timestep_spacing={cfg.timestep_spacing!r}, steps_offset={cfg.steps_offset} "
            f"do not give distinct timesteps in [0, {num_train - 1}]: {ts.tolist()}"
        )
    return ts


# ----------------------------------------------------------------------------- model + CFG


def _cfg_inputs(
    context: Tensor, uncond_context: Tensor, context_mask: Tensor | None, uncond_mask: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Stack [uncond; cond] contexts (2B, L, D) and masks (2B, L) for one batched model call."""
    batch, length = context.shape[:2]
    if uncond_context.shape[1:] != context.shape[1:] or uncond_context.shape[0] not in (1, batch):
        raise ValueError(
            f"uncond_context shape {tuple(uncond_context.shape)} must be (1 or {batch}, "
            f"{', '.join(map(str, context.shape[1:]))}) to batch with context {tuple(context.shape)}"
        )
    uncond = uncond_context.expand(batch, *context.shape[1:])  # (B, L, D)
    if context_mask is None and uncond_mask is None:
        return torch.cat([uncond, context]), None
    # Only one mask given: the other side attends to every token.
    full = torch.ones(batch, length, dtype=torch.bool, device=context.device)
    cond_m = context_mask if context_mask is not None else full  # (B, L)
    uncond_m = uncond_mask.expand(batch, length) if uncond_mask is not None else full
    return torch.cat([uncond, context]), torch.cat([uncond_m.to(torch.bool), cond_m.to(torch.bool)])


def rescale_guidance(guided: Tensor, cond: Tensor, factor: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, sec. 3.4; diffusers' rescale_noise_cfg): guided (B, ...)
    scaled to the std of cond (B, ...), each sample's std over all its elements, then blended:
    factor * guided * std(cond) / std(guided) + (1 - factor) * guided. Applied to the raw model
    output whatever the prediction type, as diffusers does with the U-Net's output."""
    dims = list(range(1, guided.ndim))  # every dim but the batch: one std per sample
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))  # (B, ...)
    return factor * rescaled + (1.0 - factor) * guided


def _denoiser(
    model_fn: ModelFn,
    context: Tensor,
    uncond_context: Tensor | None,
    cfg: SamplerConfig,
    context_mask: Tensor | None,
    uncond_mask: Tensor | None,
    model_dtype: torch.dtype,
) -> Denoiser:
    """Wrap model_fn into (x, t) -> guided output: uncond + g * (cond - uncond), both halves from
    one batched call, then rescaled if cfg.guidance_rescale > 0 (at 0 the combine is untouched, so
    results are bit-identical to no rescale). Casts x to the model dtype and the output back to
    the state dtype, so the combine and the rescale's stds are computed in at least float32."""
    g, phi = float(cfg.guidance_scale), float(cfg.guidance_rescale)
    if uncond_context is None or g == 1.0:

        def call(x: Tensor, t: Tensor) -> Tensor:
            tb = t.to(x.device).expand(x.shape[0])  # (B,)
            return model_fn(x.to(model_dtype), tb, context, context_mask).to(x.dtype)

        return call
    ctx2, mask2 = _cfg_inputs(context, uncond_context, context_mask, uncond_mask)  # (2B, L, D), (2B, L)

    def call_guided(x: Tensor, t: Tensor) -> Tensor:
        x2 = torch.cat([x, x]).to(model_dtype)  # (2B, C, H, W)
        out = model_fn(x2, t.to(x.device).expand(x2.shape[0]), ctx2, mask2).to(x.dtype)
        uncond, cond = out.chunk(2)  # (B, C, H, W) each
        guided = uncond + g * (cond - uncond)
        return rescale_guidance(guided, cond, phi) if phi > 0 else guided

    return call_guided


# ----------------------------------------------------------------------------- DDIM


def _ddim_step(x: Tensor, out: Tensor, ab_t: Tensor, ab_prev: Tensor, prediction_type: str) -> Tensor:
    """DDIM, eta = 0 (Song et al. 2021, eq. 12):
    x0 = model's data estimate, eps = its noise estimate (both from x_t and ab_t),
    x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps: the same noise, at the lower level."""
    x0 = x0_from_output(x, ab_t, out, prediction_type)
    eps = eps_from_output(x, ab_t, out, prediction_type)
    return ab_prev.sqrt() * x0 + (1.0 - ab_prev).sqrt() * eps


def _run_ddim(denoise: Denoiser, schedule: NoiseSchedule, x: Tensor, ts: Tensor, cfg: SamplerConfig) -> Tensor:
    """Steps to the next listed timestep and finally to alpha_bar = 1 (diffusers'
    set_alpha_to_one=True), so the result is a clean x0. Exact alpha_bar table (no clamping)."""
    ab = schedule.alphas_cumprod.double().cpu()[ts]  # (n,)
    ab_next = torch.cat([ab[1:], ab.new_ones(1)])  # (n,)
    if schedule.prediction_type == "eps" and bool((ab == 0).any()):
        raise ValueError(
            "DDIM with eps prediction cannot start at a timestep with alpha_bar == 0 (zero terminal SNR): "
            "x0 = (x - eps) / 0. Use prediction_type='v', or a 'leading'/'linspace' spacing."
        )
    for i, t in enumerate(ts):
        x = _ddim_step(x, denoise(x, t), ab[i], ab_next[i], schedule.prediction_type)
    return x


# ----------------------------------------------------------------------------- DPM-Solver++(2M)


def _dpmpp_2m_step(x: Tensor, x0: Tensor, prev_x0: Tensor | None, s_prev: float, s: float, s_next: float) -> Tensor:
    """One DPM-Solver++ update (Lu et al. 2022), data prediction, in terms of s = sigma_t/alpha_t.

    With alpha_t = sqrt(ab), sigma_t = sqrt(1 - ab) and lambda = log(alpha_t / sigma_t) = -log s:
      h = lambda_next - lambda, so exp(-h) = s_next / s (finite even when s_next = 0);
      first order:  x_next = (sigma_next / sigma) x + alpha_next (1 - exp(-h)) x0
      second order (multistep, midpoint): replace x0 by D = x0 + (x0 - prev_x0) / (2 r),
        r = h_prev / h with h_prev = lambda - lambda_prev (uses the previous step's x0).
    """
    alpha_next = 1.0 / math.sqrt(1.0 + s_next**2)
    sigma_next, sigma = s_next * alpha_next, s / math.sqrt(1.0 + s**2)
    d = x0
    if prev_x0 is not None:
        r = math.log(s_prev / s) / math.log(s / s_next)
        d = x0 + (0.5 / r) * (x0 - prev_x0)
    return (sigma_next / sigma) * x + (alpha_next * (1.0 - s_next / s)) * d


def _run_dpmpp_2m(denoise: Denoiser, schedule: NoiseSchedule, x: Tensor, ts: Tensor, cfg: SamplerConfig) -> Tensor:
    """First step first order (no history yet), then second order, and the final step (to s = 0)
    first order: diffusers' default final_sigmas_type="zero" forces that for any step count."""
    ab = _alpha_bars(schedule, clamp_zero=True)[ts]  # (n,)
    s = ((1.0 - ab) / ab).sqrt().tolist() + [0.0]  # (n + 1,)
    prev_x0 = None
    for i, t in enumerate(ts):
        x0 = x0_from_output(x, ab[i], denoise(x, t), schedule.prediction_type)
        use_history = prev_x0 is not None and i < len(ts) - 1
        x = _dpmpp_2m_step(x, x0, prev_x0 if use_history else None, s[i - 1], s[i], s[i + 1])
        prev_x0 = x0
    return x


# ----------------------------------------------------------------------------- Euler


def _euler_step(x: Tensor, out: Tensor, sigma: float, sigma_next: float, prediction_type: str) -> Tensor:
    """Euler step of the probability-flow ODE in sigma space (Karras et al. 2022), where
    x = x_vp / sqrt(ab) = x0 + sigma eps and sigma = sqrt((1 - ab) / ab):
      eps: x0 = x - sigma eps;  v: x0 = x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1)
      dx/dsigma = (x - x0) / sigma;  x_next = x + (sigma_next - sigma) dx/dsigma."""
    if prediction_type == "eps":
        x0 = x - sigma * out
    else:
        x0 = x / (sigma**2 + 1.0) - (sigma / math.sqrt(sigma**2 + 1.0)) * out
    return x + ((x - x0) / sigma) * (sigma_next - sigma)


def _run_euler(denoise: Denoiser, schedule: NoiseSchedule, x: Tensor, ts: Tensor, cfg: SamplerConfig) -> Tensor:
    """Sigmas are linearly interpolated at (possibly fractional) timesteps, then 0 appended.
    The model sees the VP input x / sqrt(sigma^2 + 1). Initial noise scale is diffusers'
    init_noise_sigma: sigma_max for "linspace"/"trailing", sqrt(sigma_max^2 + 1) for "leading"."""
    ab = _alpha_bars(schedule, clamp_zero=True)  # (T,)
    sig = _interp(((1.0 - ab) / ab).sqrt(), ts.double()).tolist() + [0.0]  # (n + 1,)
    s_max = max(sig)
    x = x * (s_max if cfg.timestep_spacing in ("linspace", "trailing") else math.sqrt(s_max**2 + 1.0))
    for i, t in enumerate(ts):
        out = denoise(x / math.sqrt(sig[i] ** 2 + 1.0), t)
        x = _euler_step(x, out, sig[i], sig[i + 1], schedule.prediction_type)
    return x


def _interp(table: Tensor, t: Tensor) -> Tensor:
    """Linear interpolation of table (T,) at fractional indexes t (n,), like numpy.interp."""
    lo = t.floor().long().clamp(0, table.numel() - 1)
    hi = (lo + 1).clamp(max=table.numel() - 1)
    w = t - lo.to(t.dtype)
    return table[lo] * (1.0 - w) + table[hi] * w


def _alpha_bars(schedule: NoiseSchedule, clamp_zero: bool) -> Tensor:
    """Float64 CPU alpha_bar table; with clamp_zero an exact 0 (zero terminal SNR) becomes
    ZERO_SNR_ALPHA_BAR so sigma stays finite (what diffusers' Euler and DPM-Solver do)."""
    ab = schedule.alphas_cumprod.double().cpu().clone()
    if clamp_zero:
        ab[ab == 0] = ZERO_SNR_ALPHA_BAR
    return ab


# ----------------------------------------------------------------------------- registry + API


@dataclass(frozen=True)
class _Sampler:
    timesteps: Callable[[int, SamplerConfig], Tensor]
    run: Callable[[Denoiser, NoiseSchedule, Tensor, Tensor, SamplerConfig], Tensor]


_SAMPLERS: dict[str, _Sampler] = {
    "ddim": _Sampler(_ddim_timesteps, _run_ddim),
    "dpmpp_2m": _Sampler(_dpm_timesteps, _run_dpmpp_2m),
    "euler": _Sampler(_euler_timesteps, _run_euler),
}
SAMPLER_NAMES = tuple(_SAMPLERS)


def _check_name(name: str) -> str:
    if name not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {SAMPLER_NAMES}")
    return name


def initial_noise(
    shape: tuple[int, ...], seed: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Standard normal noise drawn by a seeded CPU generator in float32, then moved and cast:
    the same seed gives the same starting latents on every device."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    noise: Tensor,
    context: Tensor,
    uncond_context: Tensor | None,
    cfg: SamplerConfig,
    context_mask: Tensor | None = None,
    uncond_mask: Tensor | None = None,
) -> Tensor:
    """Denoise `noise` (B, C, H, W) ~ N(0, I) into latents (B, C, H, W) in noise's dtype.

    model_fn(x_t (B', C, H, W), t (B',), context (B', L, D), mask (B', L) bool | None) returns
    the schedule's prediction type; B' = 2B under guidance ([uncond; cond] in one call).
    t is int64 for ddim/dpmpp_2m and float32 for euler. Zero terminal SNR: euler and dpmpp_2m
    clamp alpha_bar_T to 2**-24 (as diffusers); ddim uses the exact table and raises a
    ValueError for eps prediction at alpha_bar == 0 (it would divide by zero).
    """
    sampler = _SAMPLERS[_check_name(cfg.name)]
    ts = timesteps_for(schedule, cfg)
    denoise = _denoiser(model_fn, context, uncond_context, cfg, context_mask, uncond_mask, noise.dtype)
    state = noise.to(torch.promote_types(noise.dtype, torch.float32))  # fp16/bf16 noise: fp32 state
    return sampler.run(denoise, schedule, state, ts, cfg).to(noise.dtype)
