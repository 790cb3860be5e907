"""TrainStep (pipelines/train/step.py), the U-Net job's optimizer step: the NaN policy per micro-batch, and
one host sync per step. On a real DeepSpeed engine (gloo, one rank), and for the exact gradient arithmetic
on a stand-in with DeepSpeed's accumulation rule (each micro loss / accumulation steps, update at the end)."""

import inspect
from pathlib import Path

import pytest
import torch

from model.schedule import NoiseSchedule
from model.unet import UNet
from pipelines.data.loader import (
    BATCH_LATENT_LOGVAR,
    BATCH_LATENT_MEAN,
    BATCH_LATENTS,
    BATCH_NOISE_SEED,
    BATCH_TEXT_MASK,
    BATCH_TEXT_STATES,
    LatentSampler,
)
from pipelines.train.deepspeed_config import AdamWSettings, DeepSpeedSettings, build_deepspeed_config
from pipelines.train.objective import ObjectiveConfig
from pipelines.train.policy import LRSchedule, NonFiniteGuard, NonFiniteLossError, NonFinitePolicy
from pipelines.train.step import TrainStep

STEP_FILE = str(Path(inspect.getfile(TrainStep)).resolve())


SAMPLER = LatentSampler(shift_factor=0.1, scaling_factor=0.5)


def _batch(cfg, seed: int, bad: bool = False) -> dict:
    """A micro-batch as the loader gives it: stored float16 moments, a noise seed, float16 text states."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g).half()  # (B, C, h, w)
    if bad:
        mean[0, 0, 0, 0] = float("nan")  # one bad value poisons a whole micro-batch's loss
    states = torch.randn(2, 77, cfg.context_dim, generator=g).half()  # (B, L, D)
    return {BATCH_LATENT_MEAN: mean, BATCH_LATENT_LOGVAR: torch.full_like(mean, -2.0), BATCH_NOISE_SEED: seed,
            BATCH_TEXT_STATES: states, BATCH_TEXT_MASK: torch.ones(2, 77, dtype=torch.bool)}


def _stepper(engine, cfg, guard: NonFiniteGuard | None = None, rank: int = 0) -> TrainStep:
    empty = (torch.zeros(77, cfg.context_dim), torch.ones(77, dtype=torch.bool))
    return TrainStep(engine, NoiseSchedule(), ObjectiveConfig(), empty, LRSchedule(base_lr=1e-2, total_steps=10),
                     guard or NonFiniteGuard(NonFinitePolicy(max_consecutive=3)), seed=0, rank=rank,
                     device=torch.device("cpu"), sampler=SAMPLER)


class AccumulatingEngine:
    """DeepSpeed's accumulation rule on plain torch: backward adds grad(loss / accumulation), the last
    micro-batch's step() applies SGD with lr 1 (so a weight moves by exactly minus its summed gradient)."""

    def __init__(self, module: torch.nn.Module, accumulation: int) -> None:
        self.module, self.accumulation, self.micro = module, accumulation, 0
        self.optimizer = torch.optim.SGD(module.parameters(), lr=1.0)

    def __call__(self, *args):
        return self.module(*args)

    def backward(self, loss):
        (loss / self.accumulation).backward()

    def step(self):
        self.micro += 1
        if self.micro % self.accumulation == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self):
        return None

    def was_step_applied(self):
        return True

    def bfloat16_enabled(self):
        return False


def _moved(cfg, accumulation: int, batches: list[dict]) -> list[torch.Tensor]:
    torch.manual_seed(0)
    module = UNet(cfg)
    before = [p.detach().clone() for p in module.parameters()]
    engine = AccumulatingEngine(module, accumulation)
    stepper = _stepper(engine, cfg)
    stepper.lr_schedule = LRSchedule(base_lr=1.0, total_steps=10)
    stepper.run(0, batches)
    return [p.detach() - b for p, b in zip(module.parameters(), before)]


def test_a_bad_micro_batch_contributes_exactly_zero_gradient(micro_cfg):
    alone = _moved(micro_cfg, 1, [_batch(micro_cfg, 1)])
    with_bad = _moved(micro_cfg, 2, [_batch(micro_cfg, 1), _batch(micro_cfg, 2, bad=True)])
    assert all(torch.isfinite(d).all() for d in with_bad)
    for a, b in zip(alone, with_bad):  # the good micro-batch's gradient, over 2 accumulation steps
        torch.testing.assert_close(b, a / 2, rtol=1e-5, atol=1e-7)


@pytest.fixture
def engine(gloo_world_of_one, micro_cfg):
    import deepspeed

    torch.manual_seed(0)
    unet = UNet(micro_cfg)
    settings = DeepSpeedSettings(zero_stage=2, precision="fp32", adamw=AdamWSettings(lr=1e-2))
    config = build_deepspeed_config(settings, micro_batch_per_gpu=2, grad_accum_steps=2, world_size=1)
    engine, *_ = deepspeed.initialize(model=unet, model_parameters=list(unet.parameters()), config=config)
    return engine


def test_deepspeed_step_with_bad_micro_batches(engine, micro_cfg):
    guard = NonFiniteGuard(NonFinitePolicy(max_consecutive=3))
    stepper = _stepper(engine, micro_cfg, guard)
    weights = lambda: [p.detach().clone() for p in engine.module.parameters()]  # noqa: E731
    before = weights()
    stats = stepper.run(0, [_batch(micro_cfg, 1, bad=True), _batch(micro_cfg, 2, bad=True)])
    assert all(torch.equal(a, b) for a, b in zip(before, weights()))  # all bad: the weights stay
    assert (stats["skipped_micro_batches"], stats["lr"], guard.total_skipped) == (2, 0.0, 1)
    assert torch.isnan(stats["loss"])
    stats = stepper.run(1, [_batch(micro_cfg, 3), _batch(micro_cfg, 4, bad=True)])
    after = weights()
    assert all(torch.isfinite(p).all() for p in after) and not all(torch.equal(a, b) for a, b in zip(before, after))
    assert (stats["skipped_micro_batches"], guard.total_skipped, guard.consecutive) == (1, 1, 0)
    assert torch.isfinite(stats["loss"])


def test_a_finite_loss_with_a_non_finite_gradient_is_a_bad_step(engine, micro_cfg):
    """A finite loss can still backpropagate an inf/NaN gradient (an overflow inside backward). DeepSpeed then
    skips the update; the guard must count that step like a bad loss, or a run whose every gradient overflows
    would go on forever without learning."""
    guard = NonFiniteGuard(NonFinitePolicy(max_consecutive=2))
    stepper = _stepper(engine, micro_cfg, guard)
    weights = lambda: [p.detach().clone() for p in engine.module.parameters()]  # noqa: E731
    before = weights()
    param = next(engine.module.parameters())
    hook = param.register_hook(lambda grad: torch.full_like(grad, float("inf")))  # one weight's gradient overflows
    try:
        stats = stepper.run(0, [_batch(micro_cfg, 1), _batch(micro_cfg, 2)])
        assert torch.isfinite(stats["loss"]) and stats["skipped_micro_batches"] == 0
        assert not torch.isfinite(torch.as_tensor(stats["grad_norm"]))
        assert all(torch.equal(a, b) for a, b in zip(before, weights()))  # the update was skipped ...
        assert (stats["lr"], guard.total_skipped, guard.consecutive) == (0.0, 1, 1)  # ... and counted
        with pytest.raises(NonFiniteLossError, match="2 steps in a row at step 1"):
            stepper.run(1, [_batch(micro_cfg, 3), _batch(micro_cfg, 4)])
    finally:
        hook.remove()


def test_one_host_sync_per_step(engine, micro_cfg, monkeypatch):
    """Reading a device value on the host waits for the GPU: the step does it once, not per micro-batch."""
    syncs = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            caller = inspect.stack()[1].filename
            if Path(caller).resolve() == Path(STEP_FILE) or caller.endswith("pipelines/train/policy.py"):
                syncs.append(caller)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    _stepper(engine, micro_cfg).run(0, [_batch(micro_cfg, 1), _batch(micro_cfg, 2, bad=True)])
    assert len(syncs) == 1


def test_the_latents_are_sampled_on_the_device_from_the_stored_moments(micro_cfg):
    """The step, not the loader, turns float16 moments into a float32 model-space sample (on its device),
    with the batch's noise seed; a non-finite log-variance marks the micro-batch bad like any input."""
    stepper = _stepper(AccumulatingEngine(UNet(micro_cfg), 1), micro_cfg)
    raw = _batch(micro_cfg, 5)
    moved, finite = stepper._to_device(raw)
    assert bool(finite) and moved[BATCH_LATENTS].dtype == torch.float32
    assert torch.equal(moved[BATCH_LATENTS], SAMPLER(raw))
    noise = moved[BATCH_LATENTS] / SAMPLER.scaling_factor + SAMPLER.shift_factor - raw[BATCH_LATENT_MEAN].float()
    assert 0.2 < noise.std().item() < 0.5  # std exp(-1) = 0.37 around the mean: a sample, not the mean
    assert not torch.equal(stepper._to_device({**raw, BATCH_NOISE_SEED: 6})[0][BATCH_LATENTS], moved[BATCH_LATENTS])
    raw[BATCH_LATENT_LOGVAR][1, 0, 0, 0] = float("nan")
    moved, finite = stepper._to_device(raw)
    assert not bool(finite) and torch.isfinite(moved[BATCH_LATENTS]).all()
