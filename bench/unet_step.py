"""One U-Net training step (forward + backward + AdamW): ours vs diffusers' UNet2DConditionModel.

Both models get the same config and the same weights (converted with model/convert.py); the
script checks their outputs agree, then times the two steps interleaved (alternating which goes
first) and prints the medians and the ratio. It prints figures only and never fails on time.

    python -m bench.unet_step --preset tiny
    python -m bench.unet_step --preset small --batch 4
    python -m bench.unet_step --device cuda --preset sd2-base --res 512 --dtype bf16   # + images/s, MFU

Needs torch and diffusers only (no Ray, DeepSpeed or MLflow).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.config import PRESETS
from model.convert import config_to_diffusers, to_diffusers_state
from model.unet import UNet

SD_VAE_FACTOR = 8  # --res is in pixels; SD's VAE maps 512 px to 64 latents
# Dense bf16 peak of common accelerators, TFLOP/s, for MFU (override with --peak-tflops).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


@dataclass
class Contender:
    name: str
    model: torch.nn.Module
    call: callable  # (x, t, context) -> prediction
    optimizer: torch.optim.Optimizer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast, fp32 weights")
    p.add_argument("--res", type=int, default=None,
                   help=f"image resolution in pixels (latent = res/{SD_VAE_FACTOR}); default: the preset's sample_size")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=77)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def build_contenders(args) -> tuple[list[Contender], float]:
    from diffusers import UNet2DConditionModel

    cfg = PRESETS[args.preset]
    torch.manual_seed(0)
    ours = UNet(cfg)
    dc = config_to_diffusers(cfg)
    dc.pop("_class_name")
    theirs = UNet2DConditionModel(**dc)
    theirs.load_state_dict(to_diffusers_state(ours.state_dict(), cfg))
    if args.gradient_checkpointing:
        ours.set_gradient_checkpointing(True)
        theirs.enable_gradient_checkpointing()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    contenders = []
    for name, model, call in [
        ("ours", ours, lambda m, x, t, c: m(x, t, c)),
        ("diffusers", theirs, lambda m, x, t, c: m(x, t, c).sample),
    ]:
        model = model.to(args.device, memory_format=fmt).train()
        compiled = torch.compile(model) if args.compile else model
        # fused AdamW: the foreach one spends ~25% of a CPU step in sqrt alone, for both models
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        contenders.append(Contender(name, model, lambda x, t, c, m=compiled, f=call: f(m, x, t, c), opt))
    return contenders, sum(p.numel() for p in ours.parameters())


def make_batch(args):
    cfg = PRESETS[args.preset]
    side = args.res // SD_VAE_FACTOR if args.res else cfg.sample_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, cfg.in_channels, side, side, generator=g)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (args.batch,), generator=g)
    context = torch.randn(args.batch, args.tokens, cfg.context_dim, generator=g)
    target = torch.randn(x.shape, generator=g)
    return [v.to(args.device) for v in (x, t, context, target)]


def autocast(args):
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")


def train_step(c: Contender, batch, args) -> float:
    x, t, context, target = batch
    c.optimizer.zero_grad(set_to_none=True)
    with autocast(args):
        pred = c.call(x, t, context)
    loss = F.mse_loss(pred.float(), target)
    loss.backward()
    c.optimizer.step()
    return loss.item()  # .item() synchronises the device, so wall time covers the whole step


def output_difference(contenders, batch, args) -> float:
    x, t, context, _ = batch
    with torch.no_grad(), autocast(args):
        a, b = (c.call(x, t, context).float() for c in contenders)
    return (a - b).abs().max().item()


def step_flops(contender: Contender, batch, args) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        train_step(contender, batch, args)
    return counter.get_total_flops()


def peak_tflops(args) -> float | None:
    if args.peak_tflops or torch.device(args.device).type != "cuda":
        return args.peak_tflops
    gpu = torch.cuda.get_device_name(args.device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)


def time_interleaved(contenders, batch, args) -> dict[str, list[float]]:
    for _ in range(args.warmup):
        for c in contenders:
            train_step(c, batch, args)
    times = {c.name: [] for c in contenders}
    for i in range(args.steps):
        order = contenders if i % 2 == 0 else contenders[::-1]  # no model always runs first
        for c in order:
            start = time.perf_counter()
            train_step(c, batch, args)
            times[c.name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    contenders, n_params = build_contenders(args)
    batch = make_batch(args)
    diff = output_difference(contenders, batch, args)
    times = time_interleaved(contenders, batch, args)
    ours_s, theirs_s = (statistics.median(times[c.name]) for c in contenders)
    result = {
        "preset": args.preset, "params": n_params, "device": args.device, "dtype": args.dtype,
        "batch": args.batch, "latent": list(batch[0].shape[-2:]), "steps": args.steps,
        "channels_last": args.channels_last, "compile": args.compile,
        "max_abs_output_diff": diff, "ours_s": ours_s, "diffusers_s": theirs_s,
        "speedup_vs_diffusers": theirs_s / ours_s, "threads": torch.get_num_threads(),
    }
    flops = step_flops(contenders[0], batch, args)
    peak = peak_tflops(args)
    result["images_per_s"] = args.batch / ours_s
    result["step_tflop"] = flops / 1e12
    result["mfu"] = flops / ours_s / (peak * 1e12) if peak else None
    print(f"U-Net training step, preset={args.preset} ({n_params / 1e6:.1f}M params), device={args.device}, "
          f"dtype={args.dtype}, batch={args.batch}, latent={result['latent']}, median of {args.steps}")
    print(f"  outputs agree to max |diff| = {diff:.2e}")
    print(f"  ours      {ours_s * 1e3:9.1f} ms/step")
    print(f"  diffusers {theirs_s * 1e3:9.1f} ms/step")
    print(f"  ratio     {result['speedup_vs_diffusers']:9.2f}x (diffusers time / ours; > 1 means ours is faster)")
    mfu = f"{result['mfu'] * 100:.1f}%" if result["mfu"] else "n/a (pass --peak-tflops)"
    print(f"  ours: {result['images_per_s']:.1f} images/s, {result['step_tflop'] * 1e3:.1f} GFLOP/step, "
          f"{flops / ours_s / 1e9:.1f} GFLOP/s, MFU {mfu}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
