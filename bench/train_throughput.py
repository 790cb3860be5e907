"""The training job's full step against the bare U-Net step, at the same batch: the job's overhead.

The job's step is `Worker.train_step` of pipelines/train/worker.py, the exact code every Ray Train worker
runs: the feature loader (Parquet shards -> sampled latents), the objective (timesteps, noise, caption
dropout, min-SNR weights), the DeepSpeed engine (ZeRO stage of the config, forward, backward, clipping,
AdamW), the agreed NaN check and the EMA update. The bare step is bench/unet_step.py's: our U-Net,
a random batch already in memory, MSE, backward, torch AdamW. Both run in this process on one rank
(world size 1), interleaved, and the medians and their ratio are printed (goal: overhead <= 10%).

    python -m bench.train_throughput                       # tiny preset, batch 32, CPU
    python -m bench.train_throughput --preset small --batch 8 --steps 6

Needs DeepSpeed (no Ray, no MLflow server).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=32, help="images per step (one rank, no accumulation)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per contender (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--zero-stage", type=int, default=2, choices=[1, 2, 3])
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def _single_rank_process_group() -> None:
    """DeepSpeed wants a process group and the launcher's variables; one local rank here."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    torch.distributed.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")


def build_job_worker(args, workdir: str):
    """The job's Worker on world size 1, over synthetic features matching the preset."""
    from pipelines.core.config import apply_override, from_dict
    from pipelines.synthetic.features import write_synthetic_features
    from pipelines.train.config import TrainConfig
    from pipelines.train.worker import Launch, Worker

    features = os.path.join(workdir, "features")
    write_synthetic_features(features, rows=args.batch * 4, shards=2)
    values: dict = {}
    for assignment in (f"features_dir={features}", f"model.preset={args.preset}",
                       "model.overrides={sample_size: 16, context_dim: 64}",
                       f"deepspeed.zero_stage={args.zero_stage}", "deepspeed.precision=fp32",
                       f"batch.global_batch={args.batch}", f"batch.micro_batch={args.batch}",
                       "scaling.num_workers=1", f"ema.enabled={str(args.ema).lower()}", "mlflow.enabled=false",
                       "max_steps=1000000", "window_shards=0"):
        apply_override(values, assignment)
    cfg = from_dict(TrainConfig, values)
    launch = Launch(features_dir=features, run_dir=os.path.join(workdir, "run"), micro_batch=args.batch,
                    grad_accum_steps=1, mlflow={"enabled": False}, mlflow_run_id=None)
    return Worker(cfg, launch, rank=0, world_size=1), cfg.model.unet_config()


def build_bare(args, unet_cfg):
    """bench/unet_step.py's contender for our U-Net (same config as the job's), with torch's AdamW."""
    from bench.unet_step import Contender
    from model.unet import UNet

    torch.manual_seed(0)
    model = UNet(unet_cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # what DeepSpeed's torch_adam builds
    return Contender("bare", model, lambda x, t, c: model(x, t, c), optimizer)


def main(argv=None) -> dict:
    from bench.unet_step import train_step as bare_step

    args = parse_args(argv)
    _single_rank_process_group()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as workdir:
        worker, unet_cfg = build_job_worker(args, workdir)
        bare = build_bare(args, unet_cfg)
        g = torch.Generator().manual_seed(1)
        batch = [torch.randn(args.batch, unet_cfg.in_channels, 16, 16, generator=g),
                 torch.randint(0, 1000, (args.batch,), generator=g),
                 torch.randn(args.batch, 77, unet_cfg.context_dim, generator=g),
                 torch.randn(args.batch, unet_cfg.in_channels, 16, 16, generator=g)]
        bare_args = argparse.Namespace(dtype="fp32", device="cpu")
        stream = worker.batch_stream()
        runners = {"job": lambda step: worker.train_step(step, stream), "bare": lambda step: bare_step(bare, batch, bare_args)}
        times: dict[str, list[float]] = {name: [] for name in runners}
        for i in range(args.warmup + args.steps):
            for name in (list(runners) if i % 2 == 0 else list(runners)[::-1]):  # neither always first
                start = time.perf_counter()
                runners[name](i)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(v) for name, v in times.items()}
    figures = {"preset": args.preset, "batch": args.batch, "zero_stage": args.zero_stage, "ema": args.ema,
               "job_step_ms": round(1000 * medians["job"], 1), "bare_step_ms": round(1000 * medians["bare"], 1),
               "job_images_per_s": round(args.batch / medians["job"], 1),
               "bare_images_per_s": round(args.batch / medians["bare"], 1),
               "job_overhead": round(medians["job"] / medians["bare"] - 1.0, 4)}
    print(json.dumps(figures, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    torch.distributed.destroy_process_group()
    return figures


if __name__ == "__main__":
    main()
