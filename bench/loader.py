"""Can the feature loader keep the U-Net fed? Loader batches/s vs the tiny U-Net's training step.

Writes synthetic feature shards (random moments and text states, in the real schema) to a temp
dir, then alternates forward + backward + AdamW steps of the U-Net (on a batch from the loader) with
slices of whole FeatureLoader epochs (shard reads and decoding included), and prints

    ratio = loader batches/s * U-Net step time   (how many times faster than the need; goal >= 20x)

With prefetch (the default) the next window decodes on a background thread, partly during the
U-Net steps, as it would in training; --no-prefetch charges all decoding to the loader's own time.
It prints figures only and never fails on time. Needs torch and pyarrow (no Ray).

    python -m bench.loader
    python -m bench.loader --batch 32 --rows 8192 --shards 8 --world-size 4
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from model.config import PRESETS
from model.schedule import NoiseSchedule
from model.unet import UNet
from pipelines.data import schema
from pipelines.data.loader import BATCH_TEXT_MASK, BATCH_TEXT_STATES, FeatureLoader, LatentSampler, LoaderConfig

LATENT_TO_PIXELS = 4  # the tiny VAE's downsampling; only recorded in the manifest (image_size)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="U-Net preset (and feature shapes)")
    p.add_argument("--rows", type=int, default=4096, help="synthetic rows in all")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="rows per rank per step")
    p.add_argument("--tokens", type=int, default=77, help="text length L")
    p.add_argument("--world-size", type=int, default=1, help="time rank 0 of this many")
    p.add_argument("--window-shards", type=int, default=2, help="shards per shuffle window (0: all)")
    p.add_argument("--no-prefetch", action="store_true",
                   help="decode windows inline (the loader's whole cost in its own time)")
    p.add_argument("--epochs", type=int, default=2, help="loader epochs timed")
    p.add_argument("--steps", type=int, default=5, help="timed U-Net steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def write_synthetic_features(directory: Path, shapes: schema.FeatureShapes, rows: int, shards: int,
                             seed: int = 0) -> schema.Manifest:
    """Random features in the real shard format plus a manifest (scaling 0.5, shift 0.1)."""
    rng = np.random.default_rng(seed)
    entries = []
    for index, count in enumerate(np.array_split(np.arange(rows), shards)):
        n = len(count)
        table = schema.to_table(
            shapes, [f"{index:05d}{i:05d}" for i in range(n)], [f"caption {i}" for i in range(n)],
            rng.standard_normal((n, *shapes.latent), dtype=np.float32),
            rng.uniform(-8.0, -2.0, (n, *shapes.latent)),
            rng.standard_normal((n, *shapes.text), dtype=np.float32),
            rng.integers(2, shapes.text[0] + 1, n))
        pq.write_table(table, directory / schema.shard_name(index), **schema.PARQUET_WRITE_OPTIONS)
        entries.append({"name": schema.shard_name(index), "rows": n})
    channels = shapes.latent[0]
    manifest = schema.Manifest(
        image_size=shapes.image_size, latent_shape=shapes.latent, text_shape=shapes.text,
        vae={"id": "synthetic", "scaling_factor": 0.5, "shift_factor": 0.1, "latent_channels": channels,
             "downsample_factor": LATENT_TO_PIXELS},
        text_encoder={"id": "synthetic", "width": shapes.text[1], "context_length": shapes.text[0],
                      "layer": "penultimate"},
        shards=tuple(entries))
    (directory / schema.MANIFEST_FILE).write_text(json.dumps(manifest.to_dict()))
    return manifest


def make_unet_step(preset: str, batch: dict, sampler: LatentSampler, device: str) -> Callable[[], float]:
    """A function that runs one training step (forward + backward + AdamW) on `batch`, returning seconds."""
    torch.manual_seed(0)
    model = UNet(PRESETS[preset]).to(device).train()
    # fused AdamW: the foreach one spends a large share of a CPU step in sqrt (see bench/unet_step.py)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    schedule = NoiseSchedule().to(device)
    states, mask = (batch[k].to(device) for k in (BATCH_TEXT_STATES, BATCH_TEXT_MASK))
    x0 = sampler({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    states = states.float()  # stored float16; the model computes in float32 here

    def step() -> float:
        start = time.perf_counter()
        noise = torch.randn_like(x0)
        t = schedule.sample_timesteps(x0.shape[0], device=device)
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(schedule.q_sample(x0, t, noise), t, states, mask), noise)
        loss.backward()
        opt.step()
        loss.item()  # synchronises the device, so the wall time covers the whole step
        return time.perf_counter() - start

    return step


def time_interleaved(loader: FeatureLoader, unet_step: Callable[[], float], epochs: int, steps: int,
                     warmup: int) -> tuple[int, float, list[float]]:
    """Alternate one U-Net step with a slice of the loader's epochs, so both see the same machine
    load (other processes come and go). Returns (loader batches, loader seconds, step seconds)."""
    for _ in range(warmup):
        unet_step()
    stream = (batch for _ in range(epochs) for batch in loader)  # cold start: decoding included
    per_round = -(-epochs * len(loader) // steps)
    batches, loader_s, step_times = 0, 0.0, []
    for _ in range(steps):
        step_times.append(unet_step())
        start = time.perf_counter()
        batches += sum(1 for _ in itertools.islice(stream, per_round))
        loader_s += time.perf_counter() - start
    return batches, loader_s, step_times


def report(result: dict) -> None:
    print(f"Feature loader vs U-Net training step: preset={result['preset']}, batch={result['batch']}, "
          f"latent={result['latent_shape']}, text={result['text_shape']}, rank 0 of {result['world_size']}, "
          f"prefetch={result['prefetch']}, {result['rows']} rows in {result['shards']} shards, {result['epochs']} epochs")
    print(f"  loader  {result['loader_batches_per_s']:10.1f} batches/s  ({result['loader_rows_per_s']:.0f} rows/s, "
          f"{result['loader_batches']} batches in {result['loader_s']:.3f} s, decoding included)")
    print(f"  U-Net   {result['unet_step_s'] * 1e3:10.1f} ms/step     ({1 / result['unet_step_s']:.1f} steps/s, "
          f"median of {result['steps']}, device={result['device']})")
    print(f"  ratio   {result['ratio']:10.1f}x  (loader batches/s / U-Net steps/s; goal >= 20x)")


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = PRESETS[args.preset]
    shapes = schema.FeatureShapes((cfg.in_channels, cfg.sample_size, cfg.sample_size), (args.tokens, cfg.context_dim),
                                  image_size=cfg.sample_size * LATENT_TO_PIXELS)
    loader_cfg = LoaderConfig(batch_size=args.batch, window_shards=args.window_shards, prefetch=not args.no_prefetch)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        write_synthetic_features(Path(tmp), shapes, args.rows, args.shards)
        loader = FeatureLoader(tmp, loader_cfg, rank=0, world_size=args.world_size)
        # the U-Net trains on a real batch; a second loader, so the timed one starts cold
        sample = FeatureLoader(tmp, loader_cfg, rank=0, world_size=args.world_size).batch(0, 0)
        unet_step = make_unet_step(args.preset, sample, LatentSampler.from_manifest(loader.manifest), args.device)
        batches, seconds, step_times = time_interleaved(loader, unet_step, args.epochs, args.steps, args.warmup)
    step_s = statistics.median(step_times)
    result = {
        "preset": args.preset, "batch": args.batch, "latent_shape": list(shapes.latent),
        "text_shape": list(shapes.text), "rows": args.rows, "shards": args.shards,
        "world_size": args.world_size, "prefetch": loader_cfg.prefetch, "epochs": args.epochs, "steps": args.steps, "device": args.device,
        "batches_per_epoch": len(loader), "loader_batches": batches, "loader_s": seconds,
        "loader_batches_per_s": batches / seconds, "loader_rows_per_s": batches * args.batch / seconds,
        "unet_step_s": step_s, "ratio": batches / seconds * step_s, "threads": torch.get_num_threads(),
    }
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
