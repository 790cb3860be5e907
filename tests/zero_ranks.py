"""W real DeepSpeed ZeRO ranks (gloo, CPU, one process each) that train the tiny U-Net a few steps and write a
training checkpoint (pipelines/train/checkpoint.save, ShardedEMA included), plus the full fp32 masters, Adam
moments and EMA as the reference a resume on another world size must restore, and the initial weights (so a
parameter that never moved can be seen). Same seeds and data on every stage: the stages' masters must agree.
Run by tests/test_reshard.py:

    python tests/zero_ranks.py OUT_DIR WORLD_SIZE ZERO_STAGE
"""

import os
import shutil
import socket
import sys

import torch
import torch.multiprocessing as mp

STEPS = 3
LR = 1e-3


def rank_main(rank: int, world_size: int, port: int, out: str, stage: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from model.config import PRESETS
    from model.ema import EMAConfig
    from model.unet import UNet
    from pipelines.train import checkpoint
    from pipelines.train.deepspeed_config import AdamWSettings, DeepSpeedSettings, build_deepspeed_config
    from pipelines.train.ema_zero import ShardedEMA

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    unet = UNet(cfg)
    initial = {n: p.detach().clone() for n, p in unet.named_parameters()}
    micro = 8 // world_size  # global batch 8 on any world size
    config = build_deepspeed_config(DeepSpeedSettings(zero_stage=stage, precision="fp32", adamw=AdamWSettings(lr=LR)),
                                    micro_batch_per_gpu=micro, grad_accum_steps=1, world_size=world_size)
    engine, *_ = deepspeed.initialize(model=unet, model_parameters=list(unet.parameters()), config=config)
    ema = ShardedEMA(engine, EMAConfig(start_step=1, max_decay=0.5))  # started: the EMA is not the weights
    g = torch.Generator().manual_seed(rank)
    for step in range(STEPS):
        x = torch.randn(micro, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)  # (B, C, h, w)
        t = torch.randint(0, 1000, (micro,), generator=g)
        states = torch.randn(micro, 77, cfg.context_dim, generator=g)  # (B, L, D)
        mask = torch.ones(micro, 77, dtype=torch.bool)
        engine.backward(engine(x, t, states, mask).pow(2).mean())
        engine.step()
        ema.update(step + 1)
    state = {"loader": {"rank": rank}, "guard": {}, "rng": checkpoint.rng_state(), "ema": ema.state_dict()}
    meta = {"world_size": world_size, "fingerprint": {}} if rank == 0 else None
    # each rank into a folder of its own, merged afterwards: what Ray Train does with the ranks' reports
    checkpoint.save(os.path.join(out, "parts", str(rank)), engine, rank, STEPS, state, meta)
    names = [n for n, _ in engine.module.named_parameters()]
    params = dict(engine.module.named_parameters())
    reference = {"initial": initial, "fp32": {n: safe_get_full_fp32_param(params[n]).clone() for n in names},
                 "exp_avg": {n: safe_get_full_optimizer_state(params[n], "exp_avg").clone() for n in names},
                 "exp_avg_sq": {n: safe_get_full_optimizer_state(params[n], "exp_avg_sq").clone() for n in names},
                 "ema": ema.full_state_dict(include_buffers=False), "global_steps": engine.global_steps}
    torch.distributed.barrier()
    if rank == 0:
        for part in range(world_size):
            shutil.copytree(os.path.join(out, "parts", str(part)), out, dirs_exist_ok=True)
        shutil.rmtree(os.path.join(out, "parts"))
        torch.save(reference, os.path.join(out, "reference.pt"))


if __name__ == "__main__":
    out_dir, world, zero_stage = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    mp.spawn(rank_main, args=(world, free, out_dir, zero_stage), nprocs=world)
