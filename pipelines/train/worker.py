"""The Ray Train worker of jobs/train_unet.py: build, restore, train, checkpoint, preview, export.

    TorchTrainer(train_loop_per_worker, train_loop_config={"train": to_dict(cfg), "launch": launch}, ...)

Every rank runs the same code. Collective points (every rank must reach them in the same order):
DeepSpeed's forward/backward/step, the non-finite verdicts, the loss average at log steps, the
checkpoint save, and (under ZeRO-3, where weights are partitioned) sample previews and the export.
Only rank 0 talks to MLflow and writes the exported model.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from model.unet import UNet
from pipelines.core.config import from_dict
from pipelines.core.progress import Progress
from pipelines.core.tracking import MLflowSettings, Tracker
from pipelines.data.loader import BATCH_TEXT_MASK, BATCH_TEXT_STATES, FeatureLoader, LoaderConfig, load_empty_caption
from pipelines.inference.draw import EncoderSources, decode_images, draw_latents, encode_prompts, image_grid
from pipelines.inference.export import ExportInfo, write_export
from pipelines.train import checkpoint
from pipelines.train.config import TrainConfig, fingerprint
from pipelines.train.deepspeed_config import build_deepspeed_config
from pipelines.train.ema_zero import ShardedEMA, is_zero3_partitioned
from pipelines.train.policy import NonFiniteGuard
from pipelines.train.step import TrainStep, engine_dtype

log = logging.getLogger("latentforge.train")

EXPORT_DIR = "export"


@dataclass(frozen=True)
class Launch:
    """What the driver resolved for the workers (plain values: it travels as a dict)."""

    features_dir: str
    run_dir: str
    micro_batch: int
    grad_accum_steps: int
    mlflow: dict[str, Any]
    mlflow_run_id: str | None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker."""
    import ray.train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = from_dict(TrainConfig, config["train"])
    launch = Launch(**config["launch"])
    context = ray.train.get_context()
    worker = Worker(cfg, launch, context.get_world_rank(), context.get_world_size())
    worker.restore(ray.train.get_checkpoint())
    worker.train()
    worker.export()
    worker.close()


def _device() -> torch.device:
    if torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _batches(loader: FeatureLoader) -> Iterator[dict[str, Any]]:
    while True:  # epoch after epoch; the loader's state always points just past the last batch
        yield from loader


class Worker:
    def __init__(self, cfg: TrainConfig, launch: Launch, rank: int, world_size: int) -> None:
        import deepspeed

        self.cfg, self.launch, self.rank, self.world_size = cfg, launch, rank, world_size
        self.device = _device()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        unet_cfg = cfg.model.unet_config()
        unet = UNet(unet_cfg)
        if cfg.model.init_from:  # its weights, under this run's config (e.g. a new sample_size)
            unet.load_state_dict(UNet.from_pretrained(cfg.model.init_from).state_dict())
        unet.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
        ds_config = build_deepspeed_config(cfg.deepspeed, launch.micro_batch, launch.grad_accum_steps, world_size)
        self.engine, *_ = deepspeed.initialize(model=unet, model_parameters=list(unet.parameters()), config=ds_config)
        self.zero3 = is_zero3_partitioned(self.engine.module)
        self.ema = ShardedEMA(self.engine, cfg.ema_config()) if cfg.ema.enabled else None

        self.loader = FeatureLoader(launch.features_dir, LoaderConfig(batch_size=launch.micro_batch, seed=cfg.seed,
                                                                      window_shards=cfg.window_shards),
                                    rank=rank, world_size=world_size)
        empty = load_empty_caption(launch.features_dir, self.loader.manifest)
        self.empty = (empty[BATCH_TEXT_STATES], empty[BATCH_TEXT_MASK])
        self.guard = NonFiniteGuard(cfg.nonfinite)
        self.stepper = TrainStep(self.engine, cfg.objective.noise_schedule(), cfg.objective, self.empty,
                                 cfg.lr_schedule(), self.guard, cfg.seed, rank, self.device)
        self.tracker = Tracker.attach(from_dict(MLflowSettings, launch.mlflow),
                                      launch.mlflow_run_id if rank == 0 else None)
        self.start_step = 0
        self.last_stats: dict[str, float] = {}

    # ---- restore ------------------------------------------------------------------------------

    def restore(self, ray_checkpoint: Any) -> None:
        """Continue from Ray's latest checkpoint of this run, else from checkpoint.resume_from, else fresh."""
        if ray_checkpoint is not None:
            with ray_checkpoint.as_directory() as local:
                self._load(local)
        elif self.cfg.checkpoint.resume_from:
            self._load(self.cfg.checkpoint.resume_from)

    def _load(self, directory: str) -> None:
        checkpoint.verify(directory, self.world_size, fingerprint(self.cfg))
        state = checkpoint.load(directory, self.engine, self.rank)
        self.loader.load_state_dict(state["loader"])
        self.guard.load_state_dict(state["guard"])
        checkpoint.set_rng_state(state["rng"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.start_step = int(state["step"])
        log.info("rank %d resumed from %s at step %d", self.rank, directory, self.start_step)

    # ---- the loop -----------------------------------------------------------------------------

    def batch_stream(self) -> Iterator[dict[str, Any]]:
        """This rank's batches from the loader's current position on, epoch after epoch."""
        return _batches(self.loader)

    def train_step(self, step: int, stream: Iterator[dict[str, Any]]) -> dict[str, float]:
        """One optimizer step (all its micro batches) and the EMA update: what bench/train_throughput.py times."""
        micro = [next(stream) for _ in range(self.launch.grad_accum_steps)]
        stats = self.stepper.run(step, micro)
        if self.ema is not None:
            self.ema.update(step)
        return stats

    def train(self) -> None:
        cfg = self.cfg
        stream = self.batch_stream()
        progress = _LogWindow(self.start_step, cfg.max_steps, cfg.batch.global_batch)
        if self.rank == 0:
            self.tracker.start_system_metrics()
            log.info("training steps %d..%d: %d workers x micro batch %d x %d accumulation = global batch %d",
                     self.start_step, cfg.max_steps, self.world_size, self.launch.micro_batch,
                     self.launch.grad_accum_steps, cfg.batch.global_batch)
        for step in range(self.start_step, cfg.max_steps):
            stats = self.train_step(step, stream)
            done = step + 1
            progress.tick(stats)
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                self._log(done, progress)
            if cfg.samples.every_steps and done % cfg.samples.every_steps == 0:
                self._preview(done)
            if done % cfg.checkpoint.every_steps == 0 or done == cfg.max_steps:
                self._checkpoint(done)

    def _log(self, done: int, progress: "_LogWindow") -> None:
        metrics = progress.window_metrics(self._mean_over_ranks)
        metrics["skipped_steps"] = float(self.guard.total_skipped)
        self.last_stats = metrics
        if self.rank == 0:
            log.info("%s | loss %.5f lr %.3g grad_norm %.3g %.1f images/s", progress.steps.line(done),
                     metrics["loss"], metrics["lr"], metrics["grad_norm"], metrics["images_per_s"])
            self.tracker.log_metrics(metrics, step=done)

    def _mean_over_ranks(self, values: list[float]) -> float:
        """Mean of the finite values over every rank's list (collective)."""
        finite = [v for v in values if v == v and abs(v) != float("inf")]
        total = torch.tensor([sum(finite), float(len(finite))], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(total)  # gloo sums CPU tensors; under NCCL Ray gives a CPU-capable group too
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")

    # ---- checkpoints --------------------------------------------------------------------------

    def _checkpoint(self, done: int) -> None:
        import ray.train
        from ray.train import Checkpoint

        keep_ema = self.ema is not None and (self.zero3 or self.rank == 0)
        state = {"loader": self.loader.state_dict(), "guard": self.guard.state_dict(),
                 "rng": checkpoint.rng_state(), "ema": self.ema.state_dict() if keep_ema else None}
        meta = None
        if self.rank == 0:
            meta = {"world_size": self.world_size, "fingerprint": fingerprint(self.cfg),
                    "config": self.launch_config(), "mlflow_run_id": self.launch.mlflow_run_id,
                    "saved_at": time.time()}
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            checkpoint.save(tmp, self.engine, self.rank, done, state, meta)
            metrics = {"step": done, **{k: v for k, v in self.last_stats.items() if v == v}}
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        if self.rank == 0:
            log.info("checkpoint of step %d saved", done)

    def launch_config(self) -> dict[str, Any]:
        from pipelines.core.config import to_dict

        return to_dict(self.cfg)

    # ---- previews and export ------------------------------------------------------------------

    def _weights_context(self):
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    def _preview(self, done: int) -> None:
        """A grid of the fixed prompts x seeds from the EMA weights, logged to MLflow (rank 0)."""
        if not (self.zero3 or self.rank == 0):
            return  # ZeRO-1/2: rank 0 holds whole weights and samples alone
        if not hasattr(self, "_preview_inputs"):
            self._preview_inputs = _PreviewInputs(self.cfg, self.loader.manifest, self.rank == 0)
        inputs = self._preview_inputs
        module = self.engine.module
        module.eval()
        try:
            with self._weights_context():
                latents = draw_latents(module, self.stepper.schedule, inputs.states, inputs.masks, self.empty,
                                       inputs.seeds, self.loader.manifest.latent_shape, self.cfg.samples.sampler,
                                       device=self.device, dtype=engine_dtype(self.engine))
        finally:
            module.train()
        if self.rank == 0:
            manifest = self.loader.manifest
            images = decode_images(inputs.vae, latents, manifest.scaling_factor, manifest.shift_factor)
            self.tracker.log_image(image_grid(images, columns=len(self.cfg.samples.seeds)), "samples", step=done)

    def _full_weights(self) -> dict[str, torch.Tensor]:
        """The weights to export, whole and float32 on CPU (collective under ZeRO-3)."""
        if self.ema is not None:
            return self.ema.full_state_dict(rank0_only=True)
        module = self.engine.module
        if not self.zero3:
            return {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} \
                if self.rank == 0 else {}

    def export(self) -> None:
        cfg = self.cfg
        if cfg.samples.every_steps == 0 or cfg.max_steps % cfg.samples.every_steps:
            self._preview(cfg.max_steps)  # the final grid, when the loop did not just draw it
        weights = self._full_weights()
        if self.rank != 0:
            return
        manifest = self.loader.manifest
        info = ExportInfo(weights="ema" if self.ema is not None else "live", step=cfg.max_steps,
                          schedule=cfg.objective.schedule_config(), encoders=EncoderSources.from_manifest(manifest),
                          latent_shape=tuple(manifest.latent_shape), image_size=manifest.image_size,
                          scaling_factor=manifest.scaling_factor, shift_factor=manifest.shift_factor,
                          train_config=self.launch_config(), run_name=cfg.run_name,
                          mlflow_run_id=self.launch.mlflow_run_id)
        write_export(f"{self.launch.run_dir}/{EXPORT_DIR}", cfg.model.unet_config(),
                     {k: v.float() for k, v in weights.items()}, info, self.launch.features_dir, manifest)
        log.info("exported the %s weights to %s/%s", info.weights, self.launch.run_dir, EXPORT_DIR)

    def close(self) -> None:
        self.tracker.stop_system_metrics()


class _PreviewInputs:
    """The preview prompts' text features (every sampling rank) and the VAE decoder (rank 0)."""

    def __init__(self, cfg: TrainConfig, manifest: Any, with_vae: bool) -> None:
        sources = EncoderSources.from_manifest(manifest)
        vae, text = sources.build(with_vae=with_vae)
        states, masks = encode_prompts(text, cfg.samples.prompts)  # (P, L, D), (P, L)
        seeds = list(cfg.samples.seeds)
        self.states = states.repeat_interleave(len(seeds), dim=0)  # (P*S, L, D): row = (prompt, seed)
        self.masks = masks.repeat_interleave(len(seeds), dim=0)
        self.seeds = seeds * len(cfg.samples.prompts)
        self.vae = vae


class _LogWindow:
    """Per-window averages for the log line and MLflow, and the run's progress (count, rate, ETA)."""

    def __init__(self, start_step: int, max_steps: int, global_batch: int) -> None:
        self.steps = Progress(max_steps, "steps", done=start_step)
        self.global_batch = global_batch
        self.window_start = time.perf_counter()
        self.window: list[dict[str, float]] = []

    def tick(self, stats: dict[str, float]) -> None:
        self.window.append(stats)

    def window_metrics(self, mean: Any) -> dict[str, float]:
        now = time.perf_counter()
        seconds = max(now - self.window_start, 1e-9)
        steps = len(self.window)
        metrics = {"loss": mean([s["loss"] for s in self.window]),
                   "lr": self.window[-1]["lr"], "grad_norm": self.window[-1]["grad_norm"],
                   "images_per_s": steps * self.global_batch / seconds,
                   "skipped_micro_batches": float(sum(s["skipped_micro_batches"] for s in self.window))}
        self.window, self.window_start = [], now
        return metrics
