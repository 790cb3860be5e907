"""Samplers vs diffusers' schedulers driven by hand, plus CFG / seeding / config behaviour.

CPU, offline. The "model" is a fixed analytic function of (x, t, context, mask) with a seeded
channel-mixing nonlinearity, so the comparison exercises the guidance combine, the timestep
values the model sees and every scheduler coefficient, without any weights.

The reference is diffusers run in float64 on our alpha_bar table: what is left between the two is
float64 rounding, so the tolerance follows from float64's precision, not from a run. A float32
comparison against stock diffusers checks the documented 1e-5 on Stable Diffusion's schedule.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.samplers import SamplerConfig, initial_noise, rescale_guidance, sample, timesteps_for
from model.schedule import NoiseSchedule, ScheduleConfig

# float64, both sides on the same alpha_bar table: max abs difference of the final latents (|x| ~ 1).
# float64's unit roundoff is 2**-53 ~ 1.1e-16 and the largest number either loop holds is Euler's
# state sigma_max * |noise| < 2.1e4 * 5 ~ 1e5 (cosine schedule; ~70 for SD's), so one rounding
# there is < 1e-11: 1e-10 allows ten of them, and is still 1000x below float32's resolution and
# the smallest change of method worth seeing (one coefficient off by 1e-7 relative).
F64_TOL = 1e-10
# float32 vs stock diffusers (its own float32 tables), SD's schedule (sigma_max ~14.6): the bound
# docs/model.md states. Not used at large sigma_max (zero terminal SNR ~4096, cosine ~2e4), where
# Euler's float32 state x = x0 + sigma * eps carries rounding proportional to sigma_max, in
# diffusers as here; the float64 comparison covers those schedules.
SAMPLER_TOL = 1e-5

SHAPE = (2, 4, 8, 8)  # (B, C, H, W)
CTX_SHAPE = (2, 6, 16)  # (B, L, D)
GUIDANCE = 5.0
PRED_TO_DIFFUSERS = {"eps": "epsilon", "v": "v_prediction"}

# diffusers 0.42 + numpy 2 warn inside set_timesteps (np.array on a tensor); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


class FakeModel:
    """out = 0.9 x + 0.1 tanh(W x) + 0.1 sin(t / 100) + 0.2 * masked mean(context), in x's dtype,
    times exp(context_gain * masked mean(context)) when context_gain != 0.

    Records the batch size and timestep dtype of each call. The 0.9 x term keeps eps-mode x0
    estimates O(1) at high noise (x_t ~ eps there), so float32 rounding stays comparable. Without
    the gain, the context only shifts each sample's output, so cond and guided outputs have the
    same std and guidance rescale would change nothing; the gain makes their stds differ."""

    def __init__(self, channels: int = SHAPE[1], seed: int = 0, context_gain: float = 0.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.context_gain = context_gain
        self.weight = torch.randn(channels, channels, generator=g) * 0.5  # (C, C)
        self.calls: list[tuple[int, torch.dtype]] = []

    def __call__(self, x, t, context, mask):
        self.calls.append((x.shape[0], t.dtype))
        tt = t.to(x.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        tokens = context.mean(dim=-1)  # (B, L)
        if mask is None:
            c = tokens.mean(dim=1)
        else:
            m = mask.to(tokens.dtype)
            c = (tokens * m).sum(dim=1) / m.sum(dim=1)
        mix = torch.einsum("oc,bchw->bohw", self.weight.to(x.dtype), x)
        out = 0.9 * x + 0.1 * torch.tanh(mix) + 0.1 * torch.sin(tt / 100) + 0.2 * c.view(-1, 1, 1, 1)
        return out * torch.exp(self.context_gain * c).view(-1, 1, 1, 1) if self.context_gain else out


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed + 100)
    context = torch.randn(CTX_SHAPE, generator=g)
    uncond = torch.randn(1, *CTX_SHAPE[1:], generator=g)
    return initial_noise(SHAPE, seed, dtype=dtype), context.to(dtype), uncond.to(dtype)


class _Float64Names:
    """Stands for `torch` or `numpy` in a diffusers scheduler module, with `float32` meaning float64.

    The schedulers hard-code float32: tables, sigmas (`.astype(np.float32)`) and, for Euler and
    DPM-Solver, `sample.to(torch.float32)` inside step(), so float64 inputs alone would still be
    rounded to float32 on every step. With these names their own code runs in float64 throughout."""

    def __init__(self, module, float64) -> None:
        self._module, self._float64 = module, float64

    def __getattr__(self, name):
        return self._float64 if name == "float32" else getattr(self._module, name)


@pytest.fixture
def float64_diffusers(monkeypatch):
    """diffusers' DDIM / DPM-Solver / Euler scheduler modules computing in float64 (for this test only)."""
    from diffusers.schedulers import scheduling_ddim, scheduling_dpmsolver_multistep, scheduling_euler_discrete

    for module in (scheduling_ddim, scheduling_dpmsolver_multistep, scheduling_euler_discrete):
        monkeypatch.setattr(module, "torch", _Float64Names(torch, torch.float64))
        monkeypatch.setattr(module, "np", _Float64Names(np, np.float64))


def _betas_giving(schedule: NoiseSchedule) -> np.ndarray:
    """float64 betas whose cumulative product is our alpha_bar table, for diffusers' trained_betas.

    Our table is computed in float64 and stored in float32, diffusers' in float32: they differ by
    float32 rounding (test_schedule.py compares them). Sharing ours leaves the sampler arithmetic
    as the only difference."""
    ab = schedule.alphas_cumprod.double()  # (T,)
    return (1.0 - torch.cat([ab[:1], ab[1:] / ab[:-1]])).numpy()


def _diffusers_scheduler(name, sched_cfg: ScheduleConfig, spacing, steps_offset, trained_betas=None):
    import diffusers

    common = dict(
        num_train_timesteps=sched_cfg.num_train_timesteps,
        beta_start=sched_cfg.beta_start,
        beta_end=sched_cfg.beta_end,
        beta_schedule={"cosine": "squaredcos_cap_v2"}.get(sched_cfg.beta_schedule, sched_cfg.beta_schedule),
        trained_betas=trained_betas,  # when given, diffusers ignores the three above
        prediction_type=PRED_TO_DIFFUSERS[sched_cfg.prediction_type],
        timestep_spacing=spacing,
        steps_offset=steps_offset,
        rescale_betas_zero_snr=sched_cfg.rescale_zero_terminal_snr,  # idempotent on an already-rescaled table
    )
    if name == "ddim":  # no x0 clipping (wrong for latents); final step to alpha_bar = 1
        return diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **common)
    if name == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common)
    return diffusers.EulerDiscreteScheduler(**common)


def _run_diffusers(scheduler, model, noise, context, uncond, steps, guidance, guidance_rescale=0.0):
    """The StableDiffusionPipeline loop, by hand: scale input, one batched [uncond; cond] call,
    CFG combine, the pipeline's rescale_noise_cfg when guidance_rescale > 0, scheduler.step."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    ctx2 = torch.cat([uncond.expand_as(context), context])  # (2B, L, D)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = model(torch.cat([x_in, x_in]), t.expand(2 * x.shape[0]), ctx2, None)
        out_uncond, out_cond = out.chunk(2)
        guided = out_uncond + guidance * (out_cond - out_uncond)
        if guidance_rescale > 0:
            guided = rescale_noise_cfg(guided, out_cond, guidance_rescale=guidance_rescale)
        x = scheduler.step(guided, t, x).prev_sample
    return x


# (sampler, spacing, steps_offset). DDIM: diffusers steps to t - T // n, which is the next listed
# timestep only for "leading"/"trailing" with n dividing T; we always step to the next listed one.
SPACINGS = [
    ("ddim", "leading", 0),
    ("ddim", "leading", 1),
    ("ddim", "trailing", 0),
    ("dpmpp_2m", "linspace", 0),
    ("dpmpp_2m", "leading", 1),
    ("dpmpp_2m", "trailing", 0),
    ("euler", "linspace", 0),
    ("euler", "leading", 1),
    ("euler", "trailing", 0),
]


def _compare(name, spacing, offset, steps, sched_cfg, dtype=torch.float64, guidance_rescale=0.0,
             context_gain=0.0):
    """float64 (needs the float64_diffusers fixture): diffusers on our alpha_bar table, within F64_TOL.
    float32: stock diffusers on its own table, within SAMPLER_TOL. Returns our result."""
    schedule = NoiseSchedule(sched_cfg)
    noise, context, uncond = _inputs(dtype=dtype)
    cfg = SamplerConfig(name=name, steps=steps, guidance_scale=GUIDANCE, timestep_spacing=spacing, steps_offset=offset,
                        guidance_rescale=guidance_rescale)
    wide = dtype == torch.float64
    ref_sched = _diffusers_scheduler(name, sched_cfg, spacing, offset, _betas_giving(schedule) if wide else None)
    assert ref_sched.alphas_cumprod.dtype == dtype  # the reference really computes in `dtype`
    ours = sample(FakeModel(context_gain=context_gain), schedule, noise, context, uncond, cfg)
    ref = _run_diffusers(ref_sched, FakeModel(context_gain=context_gain), noise, context, uncond, steps, GUIDANCE,
                         guidance_rescale)
    ts = timesteps_for(schedule, cfg)
    assert torch.equal(ts.double(), ref_sched.timesteps.double()) if wide else torch.equal(ts, ref_sched.timesteps)
    assert ours.dtype == ref.dtype == dtype and bool(torch.isfinite(ours).all())
    assert ref.abs().max().item() > 0.1  # a non-trivial result
    tol = F64_TOL if wide else SAMPLER_TOL
    diff = (ours - ref).abs().max().item()
    assert diff <= tol, f"{name}/{spacing}/{steps}/{dtype}: max abs diff {diff:.3g} > {tol:.3g}"
    return ours


@pytest.mark.usefixtures("float64_diffusers")
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("prediction_type", ["eps", "v"])
@pytest.mark.parametrize("name,spacing,offset", SPACINGS)
def test_matches_diffusers_in_float64(name, spacing, offset, prediction_type, steps):
    _compare(name, spacing, offset, steps, ScheduleConfig(prediction_type=prediction_type))


@pytest.mark.usefixtures("float64_diffusers")
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler"])
def test_matches_diffusers_in_float64_zero_terminal_snr(name, steps):
    """v prediction, zero terminal SNR, trailing (starts at t = T - 1 where alpha_bar == 0).
    Euler and DPM-Solver++ clamp alpha_bar_T to 2**-24 exactly like diffusers (sigma_max ~4096)."""
    sched_cfg = ScheduleConfig(prediction_type="v", rescale_zero_terminal_snr=True)
    _compare(name, "trailing", 0, steps, sched_cfg)


@pytest.mark.usefixtures("float64_diffusers")
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler"])
def test_matches_diffusers_in_float64_cosine_schedule(name):
    _compare(name, "trailing", 0, 10, ScheduleConfig(beta_schedule="cosine", prediction_type="v"))


@pytest.mark.usefixtures("float64_diffusers")
@pytest.mark.parametrize("prediction_type", ["eps", "v"])
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler"])
def test_guidance_rescale_matches_diffusers_pipeline_in_float64(name, prediction_type):
    """guidance_rescale=0.7 (the paper's value) against the pipeline's own rescale_noise_cfg in its loop, float64.
    eps: SD's schedule, leading; v: zero terminal SNR, trailing (the setting the paper pairs it with)."""
    zero_snr = prediction_type == "v"
    sched_cfg = ScheduleConfig(prediction_type=prediction_type, rescale_zero_terminal_snr=zero_snr)
    spacing, offset = ("trailing", 0) if zero_snr else ("leading", 1)
    rescaled = _compare(name, spacing, offset, 10, sched_cfg, guidance_rescale=0.7, context_gain=2.0)
    plain = _compare(name, spacing, offset, 10, sched_cfg, context_gain=2.0)
    assert (rescaled - plain).abs().max().item() > 1e6 * F64_TOL  # the rescale changes the result measurably


@pytest.mark.parametrize(
    "name,spacing,offset,prediction_type",
    [("ddim", "leading", 1, "eps"), ("dpmpp_2m", "trailing", 0, "v"), ("euler", "linspace", 0, "eps")],
)
def test_float32_matches_stock_diffusers_to_documented_tolerance(name, spacing, offset, prediction_type):
    """What a user runs: float32 latents, diffusers as installed (its own float32 tables), SD's schedule
    (SD 1.5's DDIM spacing, SD 2's v prediction)."""
    _compare(name, spacing, offset, 25, ScheduleConfig(prediction_type=prediction_type), dtype=torch.float32)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 30, 50])
def test_timesteps_equal_diffusers(name, spacing, steps):
    """Same values and dtype as scheduler.timesteps, including step counts not dividing T."""
    schedule = NoiseSchedule()
    cfg = SamplerConfig(name=name, steps=steps, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ref = _diffusers_scheduler(name, schedule.config, spacing, cfg.steps_offset)
    ref.set_timesteps(steps)
    assert torch.equal(timesteps_for(schedule, cfg), ref.timesteps)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler"])
def test_guidance_one_is_a_single_unguided_call(name):
    schedule = NoiseSchedule(ScheduleConfig(prediction_type="v"))
    noise, context, uncond = _inputs()
    guided_model, plain_model = FakeModel(), FakeModel()
    cfg1 = SamplerConfig(name=name, steps=5, guidance_scale=1.0)
    a = sample(guided_model, schedule, noise, context, uncond, cfg1)
    b = sample(plain_model, schedule, noise, context, None, SamplerConfig(name=name, steps=5, guidance_scale=7.5))
    assert torch.equal(a, b)
    assert [c[0] for c in guided_model.calls] == [SHAPE[0]] * 5  # never doubled


# rescale_noise_cfg vs ours on the same float64 tensors: the same arithmetic (two stds, a ratio, a blend) on
# values of size ~10, so a few units in the last place of 10 * 2**-52 ~ 2e-15; a wrong reduction (another dim)
# or blend is off by O(0.1) with these per-sample scales.
RESCALE_TOL = 1e-13


@pytest.mark.parametrize("factor", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 4, 3, 8, 8)])  # images (B, C, H, W); video (B, C, F, H, W)
def test_rescale_guidance_matches_diffusers_rescale_noise_cfg(factor, shape):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(7)
    scales = torch.arange(1, shape[0] + 1, dtype=torch.float64).view(-1, *[1] * (len(shape) - 1))  # (B, 1, ...)
    cond = torch.randn(shape, generator=g, dtype=torch.float64) * scales + 0.5  # per-sample std 1, 2, ...
    guided = cond * 3.0 + torch.randn(shape, generator=g, dtype=torch.float64) / scales  # larger, other stds
    ours = rescale_guidance(guided, cond, factor)
    theirs = rescale_noise_cfg(guided, cond, guidance_rescale=factor)
    assert ours.dtype == torch.float64 and ours.shape == shape
    assert (ours - theirs).abs().max().item() <= RESCALE_TOL
    if factor == 1.0:  # fully rescaled: each sample has its conditional output's std
        dims = list(range(1, len(shape)))
        assert torch.allclose(ours.std(dim=dims), cond.std(dim=dims), rtol=1e-12, atol=0)
    if factor > 0:
        assert (ours - guided).abs().max().item() > 0.1


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler"])
def test_guidance_rescale_zero_is_the_plain_guided_combine(name):
    """guidance_rescale=0 gives bit for bit what the plain CFG combine gives: here done inside the model itself
    (uncond + g * (cond - uncond) from one doubled call) and sampled without guidance."""
    schedule = NoiseSchedule(ScheduleConfig(prediction_type="v"))
    noise, context, uncond = _inputs()
    ctx2 = torch.cat([uncond.expand_as(context), context])  # (2B, L, D)

    def combined(x, t, ctx, mask):
        out_uncond, out_cond = FakeModel(context_gain=2.0)(torch.cat([x, x]), torch.cat([t, t]), ctx2, None).chunk(2)
        return out_uncond + GUIDANCE * (out_cond - out_uncond)

    cfg = SamplerConfig(name=name, steps=6, guidance_scale=GUIDANCE, guidance_rescale=0.0)
    guided = sample(FakeModel(context_gain=2.0), schedule, noise, context, uncond, cfg)
    assert torch.equal(guided, sample(combined, schedule, noise, context, None, cfg))
    rescaled = sample(FakeModel(context_gain=2.0), schedule, noise, context, uncond, SamplerConfig(name=name, steps=6,
                      guidance_scale=GUIDANCE, guidance_rescale=0.7))
    assert not torch.allclose(guided, rescaled)


def test_guidance_batches_uncond_and_cond_in_one_call():
    schedule = NoiseSchedule()
    noise, context, uncond = _inputs()
    model = FakeModel()
    out_b1 = sample(model, schedule, noise, context, uncond, SamplerConfig(steps=6))
    assert [c[0] for c in model.calls] == [2 * SHAPE[0]] * 6
    # a batch-1 unconditional context is broadcast: same as passing it repeated B times
    out_bb = sample(FakeModel(), schedule, noise, context, uncond.expand(SHAPE[0], -1, -1), SamplerConfig(steps=6))
    assert torch.equal(out_b1, out_bb)
    unguided = sample(FakeModel(), schedule, noise, context, None, SamplerConfig(steps=6))
    assert not torch.allclose(out_b1, unguided)


def test_masks_reach_the_model():
    schedule = NoiseSchedule()
    noise, context, uncond = _inputs()
    mask = torch.ones(CTX_SHAPE[:2], dtype=torch.bool)
    mask[:, 3:] = False
    seen = []

    def model(x, t, ctx, m):
        seen.append(m)
        return FakeModel()(x, t, ctx, m)

    cfg = SamplerConfig(steps=3)
    masked = sample(model, schedule, noise, context, uncond, cfg, context_mask=mask)
    assert seen[0].shape == (2 * SHAPE[0], CTX_SHAPE[1]) and seen[0].dtype == torch.bool
    assert bool(seen[0][: SHAPE[0]].all()) and torch.equal(seen[0][SHAPE[0] :], mask)  # uncond: all tokens
    assert not torch.allclose(masked, sample(FakeModel(), schedule, noise, context, uncond, cfg))


def test_euler_passes_float_timesteps_others_long():
    schedule = NoiseSchedule()
    noise, context, _ = _inputs()
    for name, dtype in [("euler", torch.float32), ("ddim", torch.int64), ("dpmpp_2m", torch.int64)]:
        model = FakeModel()
        sample(model, schedule, noise, context, None, SamplerConfig(name=name, steps=2, timestep_spacing="linspace"))
        assert {c[1] for c in model.calls} == {dtype}


def test_same_seed_same_output_different_seed_different():
    schedule = NoiseSchedule()
    _, context, uncond = _inputs()
    cfg = SamplerConfig(steps=5)
    run = lambda seed: sample(FakeModel(), schedule, initial_noise(SHAPE, seed), context, uncond, cfg)  # noqa: E731
    assert torch.equal(initial_noise(SHAPE, 1), initial_noise(SHAPE, 1))
    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_low_precision_noise_keeps_dtype():
    schedule = NoiseSchedule()
    noise, context, uncond = _inputs()
    out = sample(FakeModel(), schedule, noise.to(torch.bfloat16), context, uncond, SamplerConfig(steps=4))
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


def test_unknown_sampler_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"ddim.*dpmpp_2m.*euler"):
        SamplerConfig(name="heun")


@pytest.mark.parametrize(
    "field,value",
    [("steps", 0), ("guidance_scale", float("nan")), ("timestep_spacing", "karras"), ("steps_offset", -1),
     ("guidance_rescale", float("nan")), ("guidance_rescale", -0.1), ("guidance_rescale", 1.5),
     ("guidance_rescale", True), ("guidance_rescale", "0.7")],
)
def test_bad_sampler_config_raises_naming_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplerConfig(**{field: value})


def test_too_many_steps_for_spacing_raises():
    with pytest.raises(ValueError, match="distinct timesteps"):
        timesteps_for(NoiseSchedule(), SamplerConfig(steps=1001, timestep_spacing="leading"))


def test_ddim_eps_at_zero_snr_raises():
    schedule = NoiseSchedule(ScheduleConfig(prediction_type="eps", rescale_zero_terminal_snr=True))
    noise, context, _ = _inputs()
    with pytest.raises(ValueError, match="alpha_bar == 0"):
        sample(FakeModel(), schedule, noise, context, None, SamplerConfig(name="ddim", steps=4))
