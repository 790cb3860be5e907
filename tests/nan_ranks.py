"""Two real DeepSpeed ranks (ZeRO-2, fp32, gloo, CPU, one process each) that run the U-Net job's TrainStep
(pipelines/train/step.py) through the NaN/inf policy, and save what each rank saw for tests/test_nan_policy.py:

    python -m tests.nan_ranks OUT_DIR        (from the repository root)

Micro-batches are tests/test_train_step._batch's; a "bad" one has a NaN in its latent mean. The phases, in order,
each rank writing OUT_DIR/rank{r}.pt:

  poisoned   step 0: rank 1's micro-batch 1 is bad, everything else good. A reference engine (same initial
             weights) runs the same step on clean batches with micro-batch 1's gradient zeroed by parameter
             hooks on every rank: what the policy says the step must do (the verdict is agreed over ranks, so
             the whole global micro-batch 1 drops out; DeepSpeed still divides by world x accumulation).
  all_bad    step 1: both of rank 1's micro-batches bad (rank 0's good); step 2: every micro-batch bad on
             every rank. Both must run at lr 0 and leave the fp32 masters bit-identical.
  diverged   step 3: bad again, the max_consecutive-th bad step in a row: TrainStep must raise the policy's
             NonFiniteLossError on every rank.
"""

import os
import socket
import sys

import torch
import torch.multiprocessing as mp

WORLD = 2
ACCUMULATION = 2
MAX_CONSECUTIVE = 3
POISONED_RANK, POISONED_MICRO = 1, 1
# step -> rank -> which micro-batches are bad
BAD = {
    0: {POISONED_RANK: {POISONED_MICRO}},
    1: {1: {0, 1}},
    2: {0: {0, 1}, 1: {0, 1}},
    3: {0: {0, 1}, 1: {0, 1}},
}
DIVERGES_AT = 3


def _batches(cfg, rank: int, step: int, clean: bool = False) -> list[dict]:
    from tests.test_train_step import _batch

    bad = BAD.get(step, {}).get(rank, set())
    return [_batch(cfg, 1000 * rank + 10 * step + micro, bad=not clean and micro in bad)
            for micro in range(ACCUMULATION)]


def _engine(cfg):
    import deepspeed

    from model.unet import UNet
    from pipelines.train.deepspeed_config import AdamWSettings, DeepSpeedSettings, build_deepspeed_config

    torch.manual_seed(0)  # the same initial weights for every engine on every rank
    unet = UNet(cfg)
    settings = DeepSpeedSettings(zero_stage=2, precision="fp32", adamw=AdamWSettings(lr=1e-2))
    config = build_deepspeed_config(settings, micro_batch_per_gpu=2, grad_accum_steps=ACCUMULATION,
                                    world_size=WORLD)
    engine, *_ = deepspeed.initialize(model=unet, model_parameters=list(unet.parameters()), config=config)
    return engine


def _masters(engine) -> dict[str, torch.Tensor]:
    """The full fp32 master weights (a collective: every rank calls it at the same point)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}


def _zero_micro_batch_gradient(engine, micro: int) -> list:
    """Hooks that replace each parameter's gradient from backward number `micro` (of each step) by zeros: the
    reference for "that micro-batch contributes exactly zero gradient", with DeepSpeed's own accumulation."""
    hooks = []
    for p in engine.module.parameters():
        calls = [0]

        def hook(grad, calls=calls):
            index, calls[0] = calls[0] % ACCUMULATION, calls[0] + 1
            return torch.zeros_like(grad) if index == micro else grad

        hooks.append(p.register_hook(hook))
    return hooks


def _stats(stats: dict) -> dict:
    return {"loss": float(stats["loss"]), "lr": float(stats["lr"]),
            "skipped_micro_batches": int(stats["skipped_micro_batches"])}


def rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import deepspeed

    from model.config import PRESETS
    from pipelines.train.policy import NonFiniteGuard, NonFiniteLossError, NonFinitePolicy
    from tests.test_train_step import _stepper

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = PRESETS["tiny"]
    result: dict = {"rank": rank}

    reference = _engine(cfg)
    hooks = _zero_micro_batch_gradient(reference, POISONED_MICRO)
    _stepper(reference, cfg, rank=rank).run(0, _batches(cfg, rank, 0, clean=True))
    for h in hooks:
        h.remove()
    result["reference"] = _masters(reference)

    engine = _engine(cfg)
    guard = NonFiniteGuard(NonFinitePolicy(max_consecutive=MAX_CONSECUTIVE))
    stepper = _stepper(engine, cfg, guard, rank=rank)
    result["initial"] = _masters(engine)
    result["steps"] = []
    for step in range(DIVERGES_AT):
        stats = stepper.run(step, _batches(cfg, rank, step))
        result["steps"].append({**_stats(stats), "guard": guard.state_dict(), "weights": _masters(engine)})
    try:
        stepper.run(DIVERGES_AT, _batches(cfg, rank, DIVERGES_AT))
        result["diverged"] = None
    except NonFiniteLossError as err:  # the policy's error; anything else fails the spawn
        result["diverged"] = str(err)
    result["diverged_guard"] = guard.state_dict()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    mp.spawn(rank_main, args=(free, sys.argv[1]), nprocs=WORLD)
