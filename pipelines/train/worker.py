"""The Ray Train worker of jobs/train_unet.py: build, restore, train, checkpoint, preview, export.

    TorchTrainer(train_loop_per_worker, train_loop_config={"train": to_dict(cfg), "launch": launch}, ...)

Every rank runs the same code. Collective points (every rank must reach them in the same order):
DeepSpeed's forward/backward/step, the non-finite verdicts, the loss average at log steps, the
checkpoint save, the sample previews (every rank draws a share) and the export (the EMA is sharded over
the ranks). Only rank 0 talks to MLflow and writes the exported model.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from model.unet import UNet
from pipelines.core import quiet
from pipelines.core.config import from_dict
from pipelines.core.progress import Progress
from pipelines.core.runtime import setup_logging
from pipelines.core.tracking import MLflowSettings, Tracker
from pipelines.data.loader import (
    BATCH_TEXT_MASK,
    BATCH_TEXT_STATES,
    FeatureLoader,
    LatentSampler,
    LoaderConfig,
    load_empty_caption,
)
from pipelines.inference.draw import EncoderSources
from pipelines.inference.export import ExportInfo, write_export
from pipelines.train import attempts, checkpoint
from pipelines.train.config import TrainConfig, fingerprint
from pipelines.train.deepspeed_config import build_deepspeed_config
from pipelines.train.ema_zero import ShardedEMA, is_zero3_partitioned
from pipelines.train.log_window import LogWindow, WindowStats
from pipelines.train.policy import NonFiniteGuard
from pipelines.train.prefetch import Prefetcher
from pipelines.train.preview import PreviewGrid
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
    launch_id: str = ""  # one per run_training call: counts the worker group's (re)starts


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker."""
    import ray.train

    setup_logging()  # after Ray Train's own logging setup of this worker, which resets the levels quiet sets
    cfg = from_dict(TrainConfig, config["train"])
    launch = Launch(**config["launch"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    ray_checkpoint = ray.train.get_checkpoint()  # Ray's latest checkpoint of this run, after a restart or resume
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as local:
            worker = Worker(cfg, launch, rank, world_size, resume_from=local)
    else:  # checkpoint.resume_from, or a fresh start
        worker = Worker(cfg, launch, rank, world_size, resume_from=cfg.checkpoint.resume_from)
    if launch.launch_id:
        attempts.record_start(launch.run_dir, launch.launch_id, rank, ray.get_runtime_context().get_node_id(),
                              worker.start_step, world_size)
    try:
        worker.train()  # a diverged run raises NonFiniteLossError on every rank at the same step
        worker.export()
    finally:
        worker.close()


def _device() -> torch.device:
    if torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def build_engine(cfg: TrainConfig, micro_batch: int, grad_accum_steps: int, world_size: int,
                 load_universal: bool = False) -> Any:
    """The U-Net (the preset or init_from's weights, checkpointing as configured) in a DeepSpeed engine,
    compiled with cfg.model.compile's torch.compile backend when one is given. load_universal: the engine
    will load a universal checkpoint (one of another world size)."""
    import deepspeed

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    unet = UNet(cfg.model.unet_config())
    if cfg.model.init_from:  # its weights, under this run's config (e.g. a new sample_size)
        unet.load_state_dict(checkpoint.pretrained_weights(cfg.model.init_from))  # a local path or a URI
    unet.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
    ds_config = build_deepspeed_config(cfg.deepspeed, micro_batch, grad_accum_steps, world_size)
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}
    with quiet.library_prints():
        engine, *_ = deepspeed.initialize(model=unet, model_parameters=list(unet.parameters()), config=ds_config)
    if cfg.model.compile:
        engine.compile(backend=cfg.model.compile)  # compiles engine.module in place: same state-dict keys
    return engine


class Worker:
    def __init__(self, cfg: TrainConfig, launch: Launch, rank: int, world_size: int,
                 resume_from: str | None = None) -> None:
        """resume_from: a checkpoint (local path or URI) to continue from; None starts fresh."""
        self.cfg, self.launch, self.rank, self.world_size = cfg, launch, rank, world_size
        self.device = _device()
        meta = checkpoint.verify(resume_from, fingerprint(cfg)) if resume_from else None
        resharded = meta is not None and checkpoint.resharded(meta, world_size)
        self.engine = build_engine(cfg, launch.micro_batch, launch.grad_accum_steps, world_size,
                                   load_universal=resharded)
        self.zero3 = is_zero3_partitioned(self.engine.module)
        self.ema = ShardedEMA(self.engine, cfg.ema_config()) if cfg.ema.enabled else None

        self.loader = FeatureLoader(launch.features_dir, LoaderConfig(batch_size=launch.micro_batch, seed=cfg.seed,
                                                                      window_shards=cfg.window_shards),
                                    rank=rank, world_size=world_size)
        empty = load_empty_caption(launch.features_dir, self.loader.manifest)
        self.empty = (empty[BATCH_TEXT_STATES], empty[BATCH_TEXT_MASK])
        self.guard = NonFiniteGuard(cfg.nonfinite)
        self.stepper = TrainStep(self.engine, cfg.objective.noise_schedule(), cfg.objective, self.empty,
                                 cfg.lr_schedule(), self.guard, cfg.seed, rank, self.device,
                                 LatentSampler.from_manifest(self.loader.manifest),
                                 torch.channels_last if cfg.model.channels_last else torch.contiguous_format)
        # before the first step: an encoder missing on this node fails the run now, not at the first preview
        self.previews = PreviewGrid(cfg.samples, self.loader.manifest, rank, world_size, self.device)
        self.tracker = Tracker.attach(from_dict(MLflowSettings, launch.mlflow),
                                      launch.mlflow_run_id if rank == 0 else None,
                                      run_name=cfg.run_name if rank == 0 else None)  # MLflow was down at the start
        self.stream: Prefetcher | None = None
        self.start_step = 0
        self.last_stats: dict[str, float] = {}
        if resume_from:
            self._load(resume_from)

    # ---- restore ------------------------------------------------------------------------------

    def _load(self, directory: str) -> None:
        state = checkpoint.load(directory, self.engine, self.rank, self.world_size)
        self.loader.load_state_dict(state["loader"])  # on another world size: the rest of the epoch re-shared
        self.guard.load_state_dict(state["guard"])
        checkpoint.set_rng_state(state["rng"])
        if self.ema is not None:
            if "ema_shards" in state:
                self.ema.load_resharded(state["ema_shards"])
            else:
                self.ema.load_state_dict(state["ema"])
        self.start_step = int(state["step"])
        log.info("rank %d resumed from %s at step %d", self.rank, directory, self.start_step)

    # ---- the loop -----------------------------------------------------------------------------

    def batch_stream(self) -> Prefetcher:
        """This rank's batches from the loader's current position on, epoch after epoch, made ahead on a
        thread (two optimizer steps' worth). Checkpoints record its position: the batches taken."""
        self.close_stream()
        self.stream = Prefetcher(self.loader, depth=2 * self.launch.grad_accum_steps, pin=self.device.type == "cuda")
        return self.stream

    def close_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()  # the loader is back at the batches taken
            self.stream = None

    def train_step(self, step: int, stream: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer step (all its micro batches) and the EMA update: what bench/train_throughput.py times."""
        micro = [next(stream) for _ in range(self.launch.grad_accum_steps)]
        stats = self.stepper.run(step, micro)
        if self.ema is not None:
            self.ema.update(step)
        return stats

    def train(self) -> None:
        cfg = self.cfg
        stream = self.batch_stream()
        progress = Progress(cfg.max_steps, "steps", done=self.start_step)
        window = LogWindow(("loss", "skipped_micro_batches"), self.device)
        if self.rank == 0:
            self.tracker.start_system_metrics()
            log.info("training steps %d..%d: %d workers x micro batch %d x %d accumulation = global batch %d",
                     self.start_step, cfg.max_steps, self.world_size, self.launch.micro_batch,
                     self.launch.grad_accum_steps, cfg.batch.global_batch)
        if self.start_step == 0 and cfg.samples.every_steps:
            self._preview(0)  # the untrained baseline, what every later grid is seen against
        for step in range(self.start_step, cfg.max_steps):
            stats = self.train_step(step, stream)
            done = step + 1
            window.add(loss=stats["loss"], skipped_micro_batches=stats["skipped_micro_batches"])
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                self._log(done, progress, window.flush(), stats)
            if cfg.samples.every_steps and done % cfg.samples.every_steps == 0:
                self._preview(done)
            if done % cfg.checkpoint.every_steps == 0 or done == cfg.max_steps:
                self._checkpoint(done)

    def _log(self, done: int, progress: Progress, window: WindowStats, last: dict[str, Any]) -> None:
        """The log line and MLflow metrics: the window's mean loss over every rank, the last step's lr and
        grad norm, the micro-batches skipped in the window (the ranks agree on each verdict, so the mean
        over ranks times the steps is the count) and the steps skipped in the run."""
        metrics = {"loss": window.means["loss"], "lr": last["lr"], "grad_norm": float(last["grad_norm"]),
                   "images_per_s": window.steps * self.cfg.batch.global_batch / window.seconds,
                   "skipped_micro_batches": round(window.means["skipped_micro_batches"] * window.steps),
                   "skipped_steps": float(self.guard.total_skipped)}
        self.last_stats = metrics
        if self.rank == 0:
            log.info("%s | loss %.5f lr %.3g grad_norm %.3g %.1f images/s", progress.line(done),
                     metrics["loss"], metrics["lr"], metrics["grad_norm"], metrics["images_per_s"])
            self.tracker.log_metrics(metrics, step=done)

    # ---- checkpoints --------------------------------------------------------------------------

    def _checkpoint(self, done: int) -> None:
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            self.save_checkpoint(tmp, done)
            metrics = {"step": done, **{k: v for k, v in self.last_stats.items() if v == v}}
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint.checkpoint_dir_name(done))
        if self.rank == 0:
            log.info("checkpoint of step %d saved", done)

    def save_checkpoint(self, directory: str, done: int) -> None:
        """This rank's part of the checkpoint after step `done`, into a local directory (collective: DeepSpeed
        saves every rank's shard). _checkpoint hands it to Ray Train."""
        loader_state = self.stream.state_dict() if self.stream is not None else self.loader.state_dict()
        # Every rank saves its own shard of the EMA (the fp32 masters it owns).
        state = {"loader": loader_state, "guard": self.guard.state_dict(),
                 "rng": checkpoint.rng_state(), "ema": self.ema.state_dict() if self.ema is not None else None}
        meta = None
        if self.rank == 0:
            meta = {"world_size": self.world_size, "fingerprint": fingerprint(self.cfg),
                    "config": self.launch_config(), "mlflow_run_id": self.launch.mlflow_run_id,
                    "saved_at": time.time()}
        checkpoint.save(directory, self.engine, self.rank, done, state, meta)

    def launch_config(self) -> dict[str, Any]:
        from pipelines.core.config import to_dict

        return to_dict(self.cfg)

    # ---- previews and export ------------------------------------------------------------------

    def _weights_context(self):
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    def _preview(self, done: int) -> None:
        """The grid of the fixed prompts x seeds from the EMA weights, logged to MLflow (collective)."""
        module = self.engine.module
        module.eval()
        try:
            with self._weights_context():
                grid = self.previews.draw(module, self.stepper.schedule, self.empty, engine_dtype(self.engine))
        finally:
            module.train()
        if grid is not None:
            self.tracker.log_image(grid, "samples", step=done)

    def _full_weights(self) -> dict[str, torch.Tensor]:
        """The weights to export, whole and float32 on CPU (collective: the EMA is sharded over the ranks
        under every ZeRO stage, the live weights under ZeRO-3)."""
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
                          train_config=self.launch_config(), sampling=cfg.samples.sampler, run_name=cfg.run_name,
                          mlflow_run_id=self.launch.mlflow_run_id)
        write_export(f"{self.launch.run_dir}/{EXPORT_DIR}", cfg.model.unet_config(),
                     {k: v.float() for k, v in weights.items()}, info, self.launch.features_dir, manifest)
        log.info("exported the %s weights to %s/%s", info.weights, self.launch.run_dir, EXPORT_DIR)
        if "diffusers" in cfg.export_formats:
            from pipelines.core import storage
            from pipelines.inference.diffusers_export import DIFFUSERS_EXPORT_DIR, write_diffusers

            with storage.local_dir(f"{self.launch.run_dir}/{EXPORT_DIR}") as local:
                write_diffusers(local, f"{self.launch.run_dir}/{DIFFUSERS_EXPORT_DIR}")
            log.info("wrote the diffusers pipeline folder %s/%s", self.launch.run_dir, DIFFUSERS_EXPORT_DIR)

    def close(self) -> None:
        self.close_stream()
        self.tracker.stop_system_metrics()

