"""The U-Net training step on one GPU: layouts, compile, mask, checkpointing, and the job's own overhead.

    python -m bench.gpu_train --device cuda --out figures.json             # SD2-base, 256 px x 64 and 512 px x 16, bf16
    python -m bench.gpu_train --device cpu --preset tiny --res 64 --batch 4 --out f.json   # the same, small, on CPU

Every figure is one training step (forward, backward, optimizer step) of our U-Net on a stand-in for the
DeepSpeed engine (StandInEngine below: bf16 weights, fp32 master weights and fp32 gradients, gradient
clipping, torch AdamW, the way DeepSpeed's bf16 optimizer holds them), at each (resolution, micro batch):

    flops          FLOPs of one sample's forward + backward, counted by torch.utils.flop_counter on the meta
                   device (no compute): the model FLOPs every MFU below is computed from
    eager          the baseline: contiguous (NCHW) activations, no text mask, no checkpointing, no compile
    channels_last  the inputs in channels_last, so every conv runs NHWC (the weights stay as the module has
                   them, as under ZeRO, whose flat buffers are contiguous; --channels-last-weights converts them too)
    mask           text_mask=True with a (B, 77) padding mask: cross-attention gets an attn_mask
    checkpointing  UNet.set_gradient_checkpointing(True) (its MFU still counts model FLOPs, not the recompute)
    job            the job's own step code, pipelines/train/step.TrainStep (loader batches from synthetic Parquet
                   feature shards, the objective, the non-finite guard, the LR schedule) plus the EMA update
                   (pipelines/train/ema_zero.ShardedEMA), against the bare step, interleaved, on one engine
    compile        torch.compile of the U-Net (the first step, compile included, is reported as first_step_s)

Each figure set holds images/s (micro batch / median step time), MFU (against the accelerator's dense bf16 peak,
bench/unet_step.PEAK_BF16_TFLOPS, or --peak-tflops), the attention kernels that ran (torch.profiler, one
extra step), and peak memory (torch.cuda.max_memory_allocated; on CPU the process' peak RSS).

Time limits. Each phase runs in a forked child process under its own budget (--budget, seconds): the child
stops timing when the next step would pass the budget and keeps what it measured (truncated: true), and the
parent kills the child (and its compile workers) a few seconds after the budget: status "timeout", with the
figures of the steps done so far. --total-budget bounds the whole run (phases shrink, then are skipped). The
JSON is rewritten after every phase, so a killed run leaves what it had. The parent never touches the GPU
(the children must be able to initialise CUDA after the fork).

Needs torch, numpy, pyarrow and safetensors only: no Ray, DeepSpeed, MLflow, diffusers or open_clip.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import resource
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from bench.unet_step import PEAK_BF16_TFLOPS, SD_VAE_FACTOR
from model.config import PRESETS, UNetConfig
from model.unet import UNet

PHASES = ("flops", "eager", "channels_last", "mask", "checkpointing", "job", "compile")
# Seconds per phase (one resolution). The defaults fit the default GPU run (7 timed phases x 2 resolutions)
# under --total-budget as the phases usually run (~10-20 s each, compile ~1-2 min); a budget is a ceiling.
DEFAULT_BUDGETS = {"flops": 60, "eager": 45, "channels_last": 45, "mask": 45, "checkpointing": 45, "job": 75,
                   "compile": 150}
# The issue's model FLOPs of the SD2-base training step (torch's flop counter), TFLOP per sample, by pixels:
# the MFU basis when the flops phase is not run or fails.
ISSUE_TFLOP_PER_SAMPLE = {"sd2-base": {256: 0.539, 512: 2.409}}
TOKENS = 77
MIN_PHASE_S = 5.0  # a phase with less time than this left in --total-budget is skipped


def hard_grace(budget: float) -> float:
    """Seconds past a phase's budget before the parent kills it (the child's last step, writing, teardown)."""
    return 5.0 + 0.1 * budget


# --------------------------------------------------------------------------------------------
# The stand-in for the DeepSpeed engine
# --------------------------------------------------------------------------------------------


class StandInEngine:
    """What pipelines/train/step.TrainStep needs of a DeepSpeed engine, on one device, in plain torch.

    bf16: the module computes in bf16 weights (no autocast, as DeepSpeed's bf16 mode); the optimizer owns fp32
    master copies; step() casts the bf16 gradients into fp32 master gradients (DeepSpeed's grad_accum_dtype
    fp32), clips them to a global norm (gradient_clipping), runs AdamW on the masters and copies them back into
    the bf16 weights. fp32: the module's own parameters are the masters. The optimizer is torch's AdamW with
    its default (foreach) implementation, which is what DeepSpeed builds for the job's `torch_adam: true`
    (--adamw fused picks the fused one). Not modelled: DeepSpeed's flat buffers, hooks and ZeRO bookkeeping.
    """

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype, lr: float = 1e-4, weight_decay: float = 1e-2,
                 clip: float = 1.0, adamw: str = "foreach", compile_mode: str | None = None,
                 compile: bool = False) -> None:
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.bf16 = dtype == torch.bfloat16
        if self.bf16:
            self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
            for m in self.master:
                m.grad = torch.zeros_like(m)  # persistent fp32 gradients, as DeepSpeed's partitions
            module.to(dtype)
        else:
            self.master = self.params
        kwargs = {"fused": True} if adamw == "fused" else {"foreach": None}
        self.optimizer = torch.optim.AdamW(self.master, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=weight_decay, **kwargs)
        self.clip = clip
        self.forward_fn = torch.compile(module, mode=compile_mode) if compile else module
        self._grad_norm: torch.Tensor | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.forward_fn(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.bf16:
            _foreach_copy([m.grad for m in self.master], grads)
        norm = torch.nn.utils.clip_grad_norm_(self.master, self.clip) if self.clip > 0 else None
        self.optimizer.step()
        if self.bf16:
            with torch.no_grad():
                _foreach_copy([p.data for p in self.params], [m.data for m in self.master])
        for p in self.params:
            p.grad = None
        self._grad_norm = norm

    def get_global_grad_norm(self) -> torch.Tensor | None:
        return self._grad_norm

    def was_step_applied(self) -> bool:
        return True  # no overflow check here (DeepSpeed's engines skip a step whose gradient norm is NaN/inf)

    def bfloat16_enabled(self) -> bool:
        return self.bf16


def _foreach_copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    try:
        torch._foreach_copy_(dst, src)  # casts dtype
    except (RuntimeError, TypeError):
        for d, s in zip(dst, src):
            d.copy_(s)


# --------------------------------------------------------------------------------------------
# Shared helpers of the phases
# --------------------------------------------------------------------------------------------


def has_text_mask_field() -> bool:
    return "text_mask" in {f.name for f in dataclasses.fields(UNetConfig)}


def phase_config(preset: str, text_mask: bool) -> UNetConfig:
    """The preset with the requested text_mask (when UNetConfig has the field)."""
    cfg = PRESETS[preset]
    if has_text_mask_field():
        cfg = dataclasses.replace(cfg, text_mask=text_mask)
    return cfg


def latent_side(res: int) -> int:
    if res % SD_VAE_FACTOR:
        raise ValueError(f"--res {res} is not a multiple of the VAE's factor {SD_VAE_FACTOR}")
    return res // SD_VAE_FACTOR


def build_engine(spec: dict, cfg: UNetConfig, *, checkpointing: bool = False, compile: bool = False,
                 channels_last_weights: bool = False) -> StandInEngine:
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    with torch.device(device):  # weights initialised where they live
        model = UNet(cfg)
    model.train()
    model.set_gradient_checkpointing(checkpointing)
    if channels_last_weights:
        model.to(memory_format=torch.channels_last)
    return StandInEngine(model, _dtype(spec), adamw=spec["adamw"], compile=compile,
                         compile_mode=spec.get("compile_mode"))


def _dtype(spec: dict) -> torch.dtype:
    return torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32


def random_batch(spec: dict, cfg: UNetConfig, batch: int, side: int, channels_last: bool) -> dict[str, torch.Tensor]:
    """A batch in memory: x_t, t, text states and a padding mask (real lengths 2..77), the target."""
    g = torch.Generator().manual_seed(1)
    dtype, device = _dtype(spec), torch.device(spec["device"])
    x = torch.randn(batch, cfg.in_channels, side, side, generator=g)
    lengths = torch.randint(2, TOKENS + 1, (batch,), generator=g)
    out = {"x": x.to(dtype), "t": torch.randint(0, 1000, (batch,), generator=g),
           "context": torch.randn(batch, TOKENS, cfg.context_dim, generator=g).to(dtype),
           "mask": torch.arange(TOKENS)[None, :] < lengths[:, None],
           "target": torch.randn(batch, cfg.in_channels, side, side, generator=g)}
    out = {k: v.to(device) for k, v in out.items()}
    if channels_last:
        out["x"] = out["x"].contiguous(memory_format=torch.channels_last)
    return out


def bare_step(engine: StandInEngine, b: dict[str, torch.Tensor]) -> None:
    """The bare training step: forward on a batch in memory, MSE, backward, optimizer step."""
    pred = engine(b["x"], b["t"], b["context"], b["mask"])
    loss = F.mse_loss(pred.float(), b["target"])
    engine.backward(loss)
    engine.step()


def synchronizer(device: str) -> Callable[[], None]:
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def memory_figures(device: str) -> dict[str, float]:
    if torch.device(device).type == "cuda":
        return {"peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                "peak_memory_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}
    # CPU: no allocator statistics; the process' peak resident set (KiB on Linux), interpreter included
    return {"peak_memory_gib": None,
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def step_figures(times: list[float], batch: int, prefix: str = "") -> dict[str, Any]:
    median = statistics.median(times)
    return {f"{prefix}step_ms": [round(1000 * t, 3) for t in times],
            f"{prefix}step_ms_median": round(1000 * median, 3),
            f"{prefix}images_per_s": sig(batch / median)}


class Recorder:
    """The phase's figures so far, rewritten (atomically) on every update: a killed phase leaves them."""

    def __init__(self, path: str, **initial: Any) -> None:
        self.path, self.figures = path, dict(initial)
        self.write()

    def update(self, **figures: Any) -> None:
        self.figures.update(figures)
        self.write()

    def write(self) -> None:
        write_json_atomic(self.path, self.figures)


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


# ---- which attention kernel ran --------------------------------------------------------------

# SDPA's backend ops as the profiler names them (forward; their backward ops end in _backward).
SDPA_BACKENDS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_attention_math_for_mps": "math (mps)",
}
_KERNEL_PATTERN = re.compile(r"flash|fmha|attention|attn|sdpa|mha", re.IGNORECASE)


def attention_kernels(step: Callable[[], Any], device: str) -> dict[str, Any]:
    """Run one step under torch.profiler; which SDPA backend ops (and device kernels) ran, with counts."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step()
    ops: Counter[str] = Counter()
    # device (GPU) kernels whose names look like attention: the device's own events where the profiler lists
    # them, else the kernels recorded under each CPU op (not both: one launch would count twice)
    device_events: Counter[str] = Counter()
    launched: Counter[str] = Counter()
    for event in prof.events():
        if event.name.startswith("aten::_scaled_dot_product"):
            ops[event.name] += 1
        if getattr(event, "device_type", None) not in (None, torch.autograd.DeviceType.CPU):
            if _KERNEL_PATTERN.search(event.name):
                device_events[event.name[:160]] += 1
        for kernel in getattr(event, "kernels", None) or []:
            if _KERNEL_PATTERN.search(kernel.name):
                launched[kernel.name[:160]] += 1
    kernels = device_events or launched
    backends = Counter()
    for name, n in ops.items():
        if name in SDPA_BACKENDS:
            backends[SDPA_BACKENDS[name]] += n
    return {"backends": dict(backends), "sdpa_ops": dict(ops), "device_kernels": dict(kernels.most_common(12)),
            "sdpa_flags": sdpa_flags(device)}


def sdpa_flags(device: str) -> dict[str, bool] | None:
    if torch.device(device).type != "cuda":
        return None
    b = torch.backends.cuda
    flags = {"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
             "math": b.math_sdp_enabled()}
    if hasattr(b, "cudnn_sdp_enabled"):
        flags["cudnn"] = b.cudnn_sdp_enabled()
    return flags


def device_info(device: str) -> dict[str, Any]:
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        info["device_name"] = cpu_name()
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sig(x: float, digits: int = 6) -> float:
    """x rounded to `digits` significant digits (figures of tiny and huge models alike stay exact enough)."""
    return float(f"{x:.{digits}g}")


# --------------------------------------------------------------------------------------------
# The phases (each runs in its own forked process; `rec` keeps its figures)
# --------------------------------------------------------------------------------------------


def phase_flops(spec: dict, rec: Recorder) -> None:
    """Model FLOPs of one sample's forward + backward of the bare step, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = phase_config(spec["preset"], False)
    with torch.device("meta"):
        model = UNet(cfg).to(_dtype(spec))
    issue = ISSUE_TFLOP_PER_SAMPLE.get(spec["preset"], {})
    rec.update(counted="meta device, batch 1: forward + MSE + backward of the bare step (no mask, "
                       "no checkpointing; attention as the math path's matmuls)",
               tflop_per_sample={}, by_op={},
               issue_tflop_per_sample={str(r): issue[r] for r in spec["resolutions"] if r in issue})
    for res in spec["resolutions"]:
        if time.time() > spec["deadline"]:
            rec.update(truncated=True)
            break
        side = latent_side(res)
        x = torch.randn(1, cfg.in_channels, side, side, device="meta", dtype=_dtype(spec))
        context = torch.randn(1, TOKENS, cfg.context_dim, device="meta", dtype=_dtype(spec))
        t = torch.zeros(1, dtype=torch.long, device="meta")
        mask = torch.ones(1, TOKENS, dtype=torch.bool, device="meta")
        counter = FlopCounterMode(display=False)
        with counter:
            pred = model(x, t, context, mask)
            F.mse_loss(pred.float(), torch.zeros(pred.shape, device="meta")).backward()
        model.zero_grad(set_to_none=True)
        by_op = {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
        rec.update(tflop_per_sample={**rec.figures["tflop_per_sample"], str(res): counter.get_total_flops() / 1e12},
                   by_op={**rec.figures["by_op"], str(res): by_op})


VARIANTS = {
    "eager": {},
    "channels_last": {"channels_last": True},
    "mask": {"text_mask": True},
    "checkpointing": {"checkpointing": True},
    "compile": {"compile": True},
}


def phase_variant(spec: dict, rec: Recorder) -> None:
    """One variant of the bare step: warm-up, timed steps (to the budget), then one profiled step."""
    v = VARIANTS[spec["phase"]]
    if v.get("text_mask") and not has_text_mask_field():
        raise RuntimeError("UNetConfig has no text_mask field: the mask variant cannot be selected")
    cfg = phase_config(spec["preset"], bool(v.get("text_mask")))
    batch, res, device = spec["batch"], spec["res"], spec["device"]
    channels_last = bool(v.get("channels_last"))
    weights_cl = channels_last and spec.get("channels_last_weights", False)
    rec.update(variant={"memory_format": "channels_last" if channels_last else "contiguous",
                        "weights_memory_format": "channels_last" if weights_cl else "contiguous",
                        "text_mask": getattr(cfg, "text_mask", None),
                        "gradient_checkpointing": bool(v.get("checkpointing")),
                        "compile": bool(v.get("compile")), "compile_mode": spec.get("compile_mode")})
    start = time.perf_counter()
    engine = build_engine(spec, cfg, checkpointing=bool(v.get("checkpointing")), compile=bool(v.get("compile")),
                          channels_last_weights=weights_cl)
    b = random_batch(spec, cfg, batch, latent_side(res), channels_last)
    sync = synchronizer(device)
    sync()
    rec.update(build_s=round(time.perf_counter() - start, 3), params=sum(p.numel() for p in engine.params))
    step = lambda: bare_step(engine, b)  # noqa: E731
    times = run_timed(step, sync, spec, rec)
    rec.update(**memory_figures(device))
    if v.get("compile"):
        rec.update(compile_s=round(rec.figures["first_step_s"] - statistics.median(times), 3))
    estimate = statistics.median(times)
    if time.time() + 3 * estimate + 2 < spec["deadline"]:
        rec.update(attention=attention_kernels(lambda: (step(), sync()), device))
    else:
        rec.update(attention={"skipped": "no time left in the phase's budget for a profiled step"})


def run_timed(step: Callable[[], Any], sync: Callable[[], None], spec: dict, rec: Recorder) -> list[float]:
    """The first step (compile, allocator, autotuning), warm-up steps, then up to `steps` timed steps, each
    only when it should end before the phase's deadline (at least one is timed: the hard kill is the limit)."""
    deadline = spec["deadline"]
    first = timed(step, sync)
    rec.update(first_step_s=round(first, 3))
    warm = [first]
    for _ in range(spec["warmup"] - 1):
        if time.time() + warm[-1] > deadline:
            break
        warm.append(timed(step, sync))
    rec.update(warmup_steps=len(warm))
    times: list[float] = []
    for i in range(spec["steps"]):
        estimate = times[-1] if times else warm[-1]
        if i > 0 and time.time() + estimate > deadline:
            break
        times.append(timed(step, sync))
        rec.update(steps_timed=len(times), truncated=len(times) < spec["steps"], **step_figures(times, spec["batch"]))
    rec.update(truncated=len(times) < spec["steps"])
    return times


def write_job_features(directory: Path, cfg: UNetConfig, side: int, batch: int, batches: int) -> None:
    """Synthetic feature shards (bench/loader.py's writer) for `batches` batches, one batch per shard, and the
    empty caption's features."""
    import numpy as np
    from safetensors.torch import save_file

    from bench.loader import LATENT_TO_PIXELS, write_synthetic_features
    from pipelines.data import schema

    shapes = schema.FeatureShapes((cfg.in_channels, side, side), (TOKENS, cfg.context_dim),
                                  image_size=side * LATENT_TO_PIXELS)
    write_synthetic_features(directory, shapes, rows=batch * batches, shards=batches)
    rng = np.random.default_rng(7)
    states = torch.from_numpy(rng.standard_normal((TOKENS, cfg.context_dim), dtype=np.float32)).half()
    save_file({schema.EMPTY_CAPTION_STATES: states, schema.EMPTY_CAPTION_MASK: torch.arange(TOKENS) < 2},
              str(directory / schema.EMPTY_CAPTION_FILE))


class TimedStream:
    """The worker's endless batch stream (epoch after epoch), timing each next() (the loader's share)."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.times = loader, []
        self._it = self._batches()

    def _batches(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.loader

    def __iter__(self) -> "TimedStream":
        return self

    def __next__(self) -> dict[str, Any]:
        start = time.perf_counter()
        batch = next(self._it)
        self.times.append(time.perf_counter() - start)
        return batch


def phase_job(spec: dict, rec: Recorder) -> None:
    """The job's step code (Worker.train_step's body: loader batch -> TrainStep.run -> EMA update) against the
    bare step, interleaved on one StandInEngine (same weights, optimizer and batch size)."""
    import inspect

    from model.ema import EMAConfig
    from pipelines.data.loader import (
        BATCH_TEXT_MASK,
        BATCH_TEXT_STATES,
        FeatureLoader,
        LatentSampler,
        LoaderConfig,
        load_empty_caption,
    )
    from pipelines.train.ema_zero import ShardedEMA
    from pipelines.train.objective import ObjectiveConfig
    from pipelines.train.policy import LRSchedule, NonFiniteGuard
    from pipelines.train.step import TrainStep

    cfg = PRESETS[spec["preset"]]  # as the job trains it (its own text_mask)
    batch, res, device = spec["batch"], spec["res"], spec["device"]
    side = latent_side(res)
    # configs/sd2-base-*.yaml: v-prediction, zero terminal SNR, min-SNR 5, caption dropout 0.1, LR warm-up
    objective = ObjectiveConfig(prediction_type="v", zero_terminal_snr=True, min_snr_gamma=5.0, caption_dropout=0.1)
    lr_schedule = LRSchedule(base_lr=1e-4, warmup_steps=10_000, total_steps=550_000, kind="constant")
    n_batches = spec["warmup"] + spec["steps"] + 2
    window = spec["job_window_shards"]
    rec.update(objective=dataclasses.asdict(objective), ema=True, text_mask=getattr(cfg, "text_mask", None),
               loader={"rows": batch * n_batches, "shards": n_batches, "window_shards": window, "prefetch": True},
               note="job and bare share one StandInEngine; the job's batches come from FeatureLoader over "
                    "synthetic Parquet shards in a temp dir, the bare step's batch is in device memory")
    # under the parent's scratch directory: removed with it even when this process is killed
    with tempfile.TemporaryDirectory(prefix="features-", dir=spec.get("scratch")) as tmp:
        start = time.perf_counter()
        write_job_features(Path(tmp), cfg, side, batch, n_batches)
        rec.update(features_write_s=round(time.perf_counter() - start, 3))
        loader = FeatureLoader(tmp, LoaderConfig(batch_size=batch, seed=0, window_shards=window))
        empty = load_empty_caption(tmp, loader.manifest)
        engine = build_engine(spec, cfg)
        kwargs = {}
        if "memory_format" in inspect.signature(TrainStep.__init__).parameters:
            kwargs["memory_format"] = torch.contiguous_format
        if "sampler" in inspect.signature(TrainStep.__init__).parameters:  # the latent sample on the device
            kwargs["sampler"] = LatentSampler.from_manifest(loader.manifest)
        stepper = TrainStep(engine, objective.noise_schedule(), objective,
                            (empty[BATCH_TEXT_STATES], empty[BATCH_TEXT_MASK]), lr_schedule, NonFiniteGuard(),
                            seed=0, rank=0, device=torch.device(device), **kwargs)
        ema = ShardedEMA(engine, EMAConfig())
        stream = TimedStream(loader)
        b = random_batch(spec, cfg, batch, side, channels_last=False)
        sync = synchronizer(device)
        last: dict[str, Any] = {}

        def job(step: int) -> None:  # pipelines/train/worker.Worker.train_step, one micro batch per step
            last.update(stepper.run(step, [next(stream)]))
            ema.update(step)

        runners = {"job": job, "bare": lambda step: bare_step(engine, b)}
        times: dict[str, list[float]] = {"job": [], "bare": []}
        deadline, estimate, warm_left, i = spec["deadline"], None, spec["warmup"], 0
        while len(times["job"]) < spec["steps"]:
            timing = warm_left == 0
            if estimate is not None and time.time() + estimate > deadline:
                if not timing:  # out of time in warm-up: still one timed pair
                    warm_left = 0
                    continue
                if times["job"]:
                    break
            pair = 0.0
            for name in (("job", "bare") if i % 2 == 0 else ("bare", "job")):  # neither always first
                seconds = timed(lambda: runners[name](i), sync)
                pair += seconds
                if timing:
                    times[name].append(seconds)
            if i == 0:
                rec.update(first_pair_s=round(pair, 3))
            estimate, i = pair, i + 1
            if not timing:
                warm_left -= 1
                rec.update(warmup_steps=i)
                continue
            job_s, bare_s = statistics.median(times["job"]), statistics.median(times["bare"])
            rec.update(steps_timed=len(times["job"]), truncated=len(times["job"]) < spec["steps"],
                       **step_figures(times["job"], batch), **step_figures(times["bare"], batch, "bare_"),
                       job_overhead=round(job_s / bare_s - 1.0, 4),
                       loader_ms_median=round(1000 * statistics.median(stream.times[-len(times["job"]):]), 3))
        rec.update(truncated=len(times["job"]) < spec["steps"], **memory_figures(device),
                   last_loss=float(last["loss"]) if last else None,
                   last_grad_norm=float(last["grad_norm"]) if last else None,
                   skipped_micro_batches=int(last.get("skipped_micro_batches", 0)) if last else None)
        pool = getattr(loader, "_pool", None)  # the prefetch thread: done before the temp dir goes
        if pool is not None:
            pool.shutdown(wait=True)


PHASE_FUNCTIONS: dict[str, Callable[[dict, Recorder], None]] = {
    "flops": phase_flops, "eager": phase_variant, "channels_last": phase_variant, "mask": phase_variant,
    "checkpointing": phase_variant, "compile": phase_variant, "job": phase_job,
}


def child_main(spec: dict) -> int:
    """The body of a phase's process: its figures go to spec['out'] as they are measured."""
    rec = Recorder(spec["out"], phase=spec["phase"], res=spec.get("res"), batch=spec.get("batch"),
                   latent=latent_side(spec["res"]) if spec.get("res") else None, status="running")
    try:
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        torch.backends.cudnn.benchmark = bool(spec.get("cudnn_benchmark"))
        if spec["phase"] != "flops":
            rec.update(**device_info(spec["device"]))
            if torch.device(spec["device"]).type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        PHASE_FUNCTIONS[spec["phase"]](spec, rec)
        rec.update(status="ok")
        return 0
    except BaseException as err:  # noqa: BLE001 - recorded, the next phase runs
        rec.update(status="error", error=f"{type(err).__name__}: {err}"[:2000],
                   traceback=traceback.format_exc()[-4000:])
        return 1


# --------------------------------------------------------------------------------------------
# The parent: phases in forked processes, each under its budget; the JSON after each
# --------------------------------------------------------------------------------------------


def run_forked(spec: dict, hard_timeout: float) -> tuple[int | None, bool]:
    """Run child_main(spec) in a forked process (its own session, so compile workers die with it).
    Returns (exit code or None, killed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            os.setsid()
            code = child_main(spec)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    end = time.monotonic() + hard_timeout
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status), False
            if time.monotonic() > end:
                _kill_group(pid)
                return None, True
            time.sleep(0.05)
    except BaseException:
        _kill_group(pid)
        raise


def _kill_group(pid: int) -> None:
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
            break
        except (ProcessLookupError, PermissionError):
            continue
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def parse_budgets(values: list[str]) -> dict[str, float]:
    budgets = dict(DEFAULT_BUDGETS)
    for value in values:
        name, _, seconds = value.rpartition("=")
        if name and name not in PHASES:
            raise SystemExit(f"--budget {value}: unknown phase {name!r} (phases: {', '.join(PHASES)})")
        for phase in ([name] if name else PHASES):
            budgets[phase] = float(seconds)
    return budgets


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--preset", default="sd2-base", choices=sorted(PRESETS))
    p.add_argument("--res", default="256,512", help="image resolutions in pixels, comma-separated (latent = res/8)")
    p.add_argument("--batch", default="64,16", help="micro batch per resolution (one value: for all)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="weights' dtype (bf16: with fp32 masters); auto: bf16 on CUDA, fp32 on CPU (CPUs without "
                        "native bf16 emulate it, ~5x slower)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads in each phase (CPU: 1 avoids OpenMP spinning on a loaded machine)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {', '.join(PHASES)}")
    p.add_argument("--budget", action="append", default=[], metavar="[PHASE=]SECONDS",
                   help="wall-clock limit of each phase (per resolution), or of one phase; repeatable. "
                        f"Defaults: {', '.join(f'{k}={v:g}' for k, v in DEFAULT_BUDGETS.items())}")
    p.add_argument("--total-budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per phase (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first compiles, if any)")
    p.add_argument("--adamw", default="foreach", choices=["foreach", "fused"],
                   help="torch AdamW implementation (foreach: what DeepSpeed's torch_adam builds)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True in every phase (the job leaves it off)")
    p.add_argument("--channels-last-weights", action="store_true",
                   help="channels_last phase: convert the weights too (ZeRO keeps them contiguous)")
    p.add_argument("--job-window-shards", type=int, default=2, help="job phase: the loader's shuffle window")
    p.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU (default: by GPU name)")
    p.add_argument("--out", default=None, help="write the figures to this JSON file (after every phase)")
    args = p.parse_args(argv)
    if args.dtype == "auto":
        args.dtype = "bf16" if torch.device(args.device).type == "cuda" else "fp32"
    args.resolutions = _int_list(args.res)
    batches = _int_list(args.batch)
    if len(batches) == 1:
        batches = batches * len(args.resolutions)
    if len(batches) != len(args.resolutions):
        p.error(f"--batch has {len(batches)} values for {len(args.resolutions)} resolutions")
    for res in args.resolutions:
        side = latent_side(res)
        if side % PRESETS[args.preset].downsample_factor:
            p.error(f"--res {res}: latent {side} does not divide by the U-Net's downsample factor "
                    f"{PRESETS[args.preset].downsample_factor}")
    args.batches = batches
    args.phase_list = [s.strip() for s in args.phases.split(",") if s.strip()]
    unknown = [s for s in args.phase_list if s not in PHASES]
    if unknown:
        p.error(f"unknown phases {unknown}; choose from {', '.join(PHASES)}")
    args.budgets = parse_budgets(args.budget)
    return args


def phase_units(args) -> list[tuple[str, str, int | None, int | None]]:
    """(key, phase, res, batch) in run order: flops once, then each phase at every resolution."""
    units = []
    for phase in PHASES:
        if phase not in args.phase_list:
            continue
        if phase == "flops":
            units.append(("flops", "flops", None, None))
        else:
            units += [(f"{phase}@{res}", phase, res, b) for res, b in zip(args.resolutions, args.batches)]
    return units


def peak_for(args, device_name: str | None) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device_name and torch.device(args.device).type == "cuda":
        return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)
    return None


def add_mfu(args, figures: dict, flops: dict[int, tuple[float, str]]) -> None:
    """MFU of every images/s figure of a phase: images/s x model TFLOP/sample / peak TFLOP/s."""
    res = figures.get("res")
    if res not in flops:
        return
    tflop, source = flops[res]
    peak = peak_for(args, figures.get("device_name"))
    figures.update(tflop_per_sample=sig(tflop), tflop_source=source, peak_tflops=peak)
    for key in [k for k in figures if k.endswith("images_per_s") and figures[k] is not None]:
        prefix = key[: -len("images_per_s")]
        achieved = figures[key] * tflop
        figures[f"{prefix}achieved_tflops"] = sig(achieved)
        figures[f"{prefix}mfu"] = sig(achieved / peak) if peak else None


def model_flops(args, results: dict) -> dict[int, tuple[float, str]]:
    """TFLOP/sample by resolution: the flops phase's count, else the issue's figures for the preset."""
    out = {}
    issue = ISSUE_TFLOP_PER_SAMPLE.get(args.preset, {})
    counted = results.get("flops", {}).get("tflop_per_sample", {})
    for res in args.resolutions:
        if str(res) in counted:
            out[res] = (counted[str(res)], "flops phase (torch flop counter)")
        elif res in issue:
            out[res] = (issue[res], "issue 16's figure (flops phase not run)")
    return out


def summary(args, results: dict) -> dict:
    table: dict[str, Any] = {}
    for res in args.resolutions:
        rows = {}
        for phase in PHASES[1:]:
            f = results.get(f"{phase}@{res}")
            if not f:
                continue
            row = {k: f.get(k) for k in ("status", "images_per_s", "mfu", "step_ms_median", "peak_memory_gib")}
            if f.get("peak_rss_gib") is not None:
                row["peak_rss_gib"] = f["peak_rss_gib"]
            if phase == "job":
                row.update({k: f.get(k) for k in ("bare_images_per_s", "bare_mfu", "job_overhead", "loader_ms_median")})
            elif isinstance(f.get("attention"), dict):
                row["attention"] = f["attention"].get("backends")
            if phase == "compile":
                row["compile_s"] = f.get("compile_s")
            rows[phase] = row
        table[str(res)] = rows
    return table


def print_line(key: str, f: dict, elapsed: float) -> None:
    parts = [f"[{elapsed:6.1f}s] {key:<22} {f.get('status', '?'):<8}"]
    if f.get("images_per_s") is not None:
        parts.append(f"{f['images_per_s']:9.1f} images/s")
    if f.get("mfu") is not None:
        parts.append(f"MFU {100 * f['mfu']:5.1f}%")
    if f.get("job_overhead") is not None:
        parts.append(f"bare {f.get('bare_images_per_s'):.1f} images/s, job overhead {100 * f['job_overhead']:+.1f}%")
    if f.get("peak_memory_gib") is not None:
        parts.append(f"peak {f['peak_memory_gib']:.1f} GiB")
    backends = (f.get("attention") or {}).get("backends") if isinstance(f.get("attention"), dict) else None
    if backends:
        parts.append("attention " + "+".join(sorted(backends)))
    if f.get("tflop_per_sample") and f.get("phase") == "flops":
        parts.append("TFLOP/sample " + ", ".join(f"{r} px {v:.4g}" for r, v in f["tflop_per_sample"].items()))
    if f.get("error"):
        parts.append(f"({f['error'].splitlines()[0][:160]})")
    print("  ".join(parts), file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.monotonic()
    report: dict[str, Any] = {
        "meta": {"command": " ".join([Path(sys.executable).name, "-m", "bench.gpu_train", *(argv or sys.argv[1:])]),
                 "preset": args.preset, "device": args.device, "dtype": args.dtype,
                 "resolutions": args.resolutions, "batches": args.batches, "steps": args.steps,
                 "warmup": args.warmup, "adamw": args.adamw, "cudnn_benchmark": args.cudnn_benchmark,
                 "channels_last_weights": args.channels_last_weights, "compile_mode": args.compile_mode,
                 "threads": args.threads, "budgets_s": args.budgets,
                 "total_budget_s": args.total_budget, "torch": torch.__version__,
                 "python": platform.python_version(), "peak_tflops": args.peak_tflops,
                 "issue_tflop_per_sample": {str(k): v for k, v in ISSUE_TFLOP_PER_SAMPLE.get(args.preset, {}).items()},
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "phases": {},
    }
    results = report["phases"]

    def save() -> None:
        report["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
        report["summary"] = summary(args, results)
        if args.out:
            write_json_atomic(args.out, report)

    save()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-train-phases-") as scratch:
        for key, phase, res, batch in phase_units(args):
            left = args.total_budget - (time.monotonic() - started)
            budget = min(args.budgets[phase], (left - 5.0) / 1.1)  # room for the hard-kill grace
            if budget < min(MIN_PHASE_S, args.budgets[phase]):  # --total-budget is spent
                results[key] = {"phase": phase, "res": res, "batch": batch, "status": "skipped",
                                "error": f"only {max(left, 0):.0f} s left of --total-budget {args.total_budget:g}"}
                print_line(key, results[key], time.monotonic() - started)
                save()
                continue
            out = os.path.join(scratch, f"{key.replace('@', '-')}.json")
            spec = {"phase": phase, "res": res, "batch": batch, "resolutions": args.resolutions,
                    "preset": args.preset, "device": args.device, "dtype": args.dtype, "steps": args.steps,
                    "warmup": max(1, args.warmup), "adamw": args.adamw, "compile_mode": args.compile_mode,
                    "channels_last_weights": args.channels_last_weights, "cudnn_benchmark": args.cudnn_benchmark,
                    "job_window_shards": args.job_window_shards, "threads": args.threads, "scratch": scratch,
                    "out": out, "deadline": time.time() + budget}
            t0 = time.monotonic()
            code, killed = run_forked(spec, budget + hard_grace(budget))
            try:
                figures = json.loads(Path(out).read_text())
            except (OSError, ValueError):
                figures = {"phase": phase, "res": res, "batch": batch}
            if killed:
                figures.update(status="timeout",
                               error=f"killed {hard_grace(budget):.0f} s past its {budget:.0f} s budget")
            elif figures.get("status") in (None, "running"):
                figures.update(status="error", error=f"the phase's process exited with code {code}")
            figures.update(seconds=round(time.monotonic() - t0, 2), budget_s=round(budget, 1))
            results[key] = figures
            if phase == "flops":
                for r, v in figures.get("tflop_per_sample", {}).items():
                    report["meta"].setdefault("measured_tflop_per_sample", {})[r] = sig(v)
            else:
                for name in ("device_name", "device_memory_gib", "cuda", "cudnn"):
                    if figures.get(name) is not None:
                        report["meta"].setdefault(name, figures[name])
            flops = model_flops(args, results)
            for f in results.values():
                add_mfu(args, f, flops)
            print_line(key, figures, time.monotonic() - started)
            save()
    save()
    if not args.out:
        print(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
