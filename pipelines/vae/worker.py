"""The per-worker training loop (runs inside Ray Train workers): steps, logging, checkpoints, export by rank 0."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.core import storage
from pipelines.core.config import from_dict, to_dict
from pipelines.core.progress import Progress
from pipelines.core.tracking import Tracker
from pipelines.data.shards import tar_shard_names
from pipelines.vae.config import TrainVAEConfig
from pipelines.vae.data import ImageStream, first_images
from pipelines.vae.model import export_vae, latent_statistics, load_trainable_vae, reconstruction_grid, vae_loss_module

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from diffusers import AutoencoderKL

    from pipelines.train.log_window import LogWindow

log = logging.getLogger("latentforge.train_vae")

CHECKPOINT_FILE = "state.pt"  # weights, optimizer, TrainState
CHECKPOINT_CONFIG_FILE = "config.json"  # the config the checkpoint was trained with (small: the driver reads it)
GRID_KEY = "reconstructions"  # MLflow image key (no '/')
EXPORT_ARTIFACT_PATH = "vae"


@dataclass
class TrainState:
    """What a checkpoint carries besides weights and optimizer, and what the report says."""

    step: int = 0
    images_seen: int = 0
    start_step: int = 0  # where this attempt began (> 0 after a resume)
    train_seconds: float = 0.0  # this attempt's time in the step loop
    metrics: dict[str, float] = field(default_factory=dict)  # the last logged ones
    guard: dict[str, int] = field(default_factory=lambda: {"total_skipped": 0, "consecutive": 0})


@dataclass(frozen=True)
class _Worker:
    """The fixed parts of one worker's loop."""

    cfg: TrainVAEConfig
    rank: int
    world_size: int
    device: Any  # torch.device
    tracker: Tracker  # inactive on ranks > 0


def _restore(vae: "AutoencoderKL", cfg: TrainVAEConfig) -> tuple[TrainState, dict | None]:
    """Load the latest checkpoint of this run into `vae` (the driver checked that it was trained with
    this vae and image_size: check_resume); -> (state, optimizer state or None)."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState(), None
    with checkpoint.as_directory() as directory:
        verify_checkpoint(directory, thorough=False)
        saved = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    vae.load_state_dict(saved["model"])
    state = TrainState(**saved["state"])
    log.info("resuming run %s at step %d (%d images seen)", cfg.run_name, state.step, state.images_seen)
    return dataclasses.replace(state, start_step=state.step, train_seconds=0.0), saved["optimizer"]


FALLBACK_SETTING = "--set train.checkpoint_fallback=previous"


def verify_checkpoint(location: str, thorough: bool) -> None:
    """A checkpoint's files against their listing: sizes, and sha256 when thorough (the driver, before launch).
    One written before listings were recorded is loaded as it is (its state.pt loads weights-only)."""
    from pipelines.train.checkpoint import COMPLETE_FILE, CheckpointDamaged, verify_listing

    if not storage.is_file(storage.join(location, COMPLETE_FILE)):
        log.warning("checkpoint %s has no %s (written by an older version): its files are not verified",
                    location, COMPLETE_FILE)
        return
    try:
        verify_listing(location, COMPLETE_FILE, thorough=thorough)
    except CheckpointDamaged as err:
        raise CheckpointDamaged(err.problem, FALLBACK_SETTING) from None


def intact_checkpoint(run_dir: str, fallback: str) -> str | None:
    """The run's latest checkpoint (None: none) when it verifies; else with train.checkpoint_fallback=previous
    the newest intact one, the damaged ones set aside (checkpoint.fall_back_to_intact); else CheckpointDamaged."""
    from pipelines.train.checkpoint import CheckpointDamaged, fall_back_to_intact, has_run_record, latest_checkpoint

    try:
        found = latest_checkpoint(run_dir)
        if found is not None:
            verify_checkpoint(found, thorough=True)
        return found
    except CheckpointDamaged as err:
        if fallback != "previous" or not has_run_record(run_dir):
            raise CheckpointDamaged(err.problem, FALLBACK_SETTING) from None
    found = fall_back_to_intact(run_dir, lambda candidate: verify_checkpoint(candidate, thorough=True))
    log.warning("the latest checkpoint of %s is damaged: set aside under damaged/; continuing from %s", run_dir, found)
    return found


def _save_checkpoint(w: _Worker, vae: "AutoencoderKL", optimizer: Any, state: TrainState) -> None:
    """Every rank reports (the call is a barrier); rank 0 attaches the checkpoint."""
    import ray.train
    import torch

    metrics = {"step": state.step, "images_seen": state.images_seen, **state.metrics}
    if w.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save({"model": vae.state_dict(), "optimizer": optimizer.state_dict(),
                    "state": dataclasses.asdict(state)}, Path(directory) / CHECKPOINT_FILE)
        storage.write_json(str(Path(directory) / CHECKPOINT_CONFIG_FILE),  # for check_resume; no credentials
                           storage.redact_values(to_dict(w.cfg)))
        # written last: every file with its size and sha256 (verify_listing)
        from pipelines.train.checkpoint import COMPLETE_FILE, file_listing

        storage.write_json(str(Path(directory) / COMPLETE_FILE),
                           {"step": state.step, "files": file_listing(Path(directory))})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


VAE_METRICS = ("loss", "recon", "kl", "color_anchor")  # averaged over each log window


def noise_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of one rank's step: its posterior noise depends on (seed, rank, step) only, so a resumed
    run draws what the uninterrupted one drew, and no two (rank, step) pairs share noise."""
    from pipelines.data.loader import derived_seed

    return derived_seed(seed, rank, step)


def _window_metrics(w: _Worker, window: LogWindow, lr: float, skipped: int) -> dict[str, float]:
    stats = window.flush()  # collective: every rank logs at the same steps
    images = stats.steps * w.cfg.train.batch_size * w.world_size
    return {**stats.means, "lr": lr, "images_per_s": images / stats.seconds, "skipped_steps": skipped}


def _train_steps(w: _Worker, model: Any, vae: "AutoencoderKL", optimizer: Any, state: TrainState,
                 grid: "torch.Tensor | None") -> None:
    """Steps state.step .. train.steps: LR schedule, non-finite guard, logging, grids, checkpoints."""
    import torch

    from pipelines.train.log_window import LogWindow
    from pipelines.train.policy import LRSchedule, NonFiniteGuard, NonFinitePolicy

    t = w.cfg.train
    schedule = LRSchedule(t.lr, t.warmup_steps, t.steps, t.lr_schedule)
    guard = NonFiniteGuard(NonFinitePolicy(t.max_nonfinite_steps))
    guard.load_state_dict(state.guard)
    cfg = w.cfg
    stream = ImageStream(cfg.input_dir, tar_shard_names(cfg.input_dir), cfg.image_size, w.rank, w.world_size,
                         seed=t.seed, shuffle_buffer=t.shuffle_buffer)
    batches = stream.batches(t.batch_size, skip=state.step)  # a resume takes up the data where it stopped
    started = time.perf_counter()
    window = LogWindow(VAE_METRICS, w.device)
    progress = Progress(t.steps, "steps", done=state.step)
    for step in range(state.step, t.steps):
        lr = schedule.apply(optimizer, step)
        torch.manual_seed(noise_seed(t.seed, w.rank, step))  # the posterior noise of this step, resumed or not
        loss, rec, kl, anchor = model(torch.from_numpy(next(batches)).to(w.device))
        if guard.check(loss, step):  # same decision on every rank, so DDP's all-reduce lines up
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(vae.parameters(), t.grad_clip)
            optimizer.step()
            window.add(loss=loss.detach(), recon=rec, kl=kl, color_anchor=anchor)
        state.step, state.images_seen = step + 1, state.images_seen + t.batch_size * w.world_size
        state.guard = guard.state_dict()
        last = state.step == t.steps
        if state.step % t.log_every == 0 or last:
            state.metrics = _window_metrics(w, window, lr, guard.total_skipped)
            _log_progress(w, state, progress)
        if w.rank == 0 and state.step % t.image_every == 0 and not last:  # the end logs its own grid
            w.tracker.log_image(reconstruction_grid(vae, grid), GRID_KEY, state.step)
        if state.step % t.checkpoint_every == 0 or last:
            state.train_seconds = time.perf_counter() - started
            _save_checkpoint(w, vae, optimizer, state)
    state.train_seconds = time.perf_counter() - started


def _log_progress(w: _Worker, state: TrainState, progress: Progress) -> None:
    if w.rank != 0:
        return
    m = state.metrics
    w.tracker.log_metrics(m, state.step)
    anchor = f"  colour anchor {m['color_anchor']:.5f}" if w.cfg.train.color_anchor_weight > 0 else ""
    log.info("%s | loss %.5f  recon %.5f  kl %.3f%s  lr %.2e  %.1f images/s", progress.line(state.step),
             m["loss"], m["recon"], m["kl"], anchor, m["lr"], m["images_per_s"])


def _export(w: _Worker, vae: "AutoencoderKL", state: TrainState) -> dict[str, Any]:
    """Rank 0 after training: final grid, scaling factor, export, MLflow artifacts; -> the report."""
    import torch

    cfg, t = w.cfg, w.cfg.train
    sample = first_images(cfg.input_dir, tar_shard_names(cfg.input_dir), cfg.image_size,
                          max(cfg.scaling_factor_images, t.grid_images))
    grid = torch.from_numpy(sample[:t.grid_images]).to(w.device)
    w.tracker.log_image(reconstruction_grid(vae, grid), GRID_KEY, state.step)
    stats = latent_statistics(vae, sample[:cfg.scaling_factor_images], t.batch_size, t.seed)
    seconds = state.train_seconds
    report = {
        "stage": "train_vae", "ok": True, "run_name": cfg.run_name, "mlflow_run_id": w.tracker.run_id,
        "steps": state.step, "start_step": state.start_step, "images_seen": state.images_seen,
        "final": state.metrics, "skipped_steps": state.guard["total_skipped"],
        "images_per_second": (state.step - state.start_step) * t.batch_size * w.world_size / seconds
        if seconds > 0 else None,
        "train_seconds": round(seconds, 3), "scaling_images": min(len(sample), cfg.scaling_factor_images),
        **stats, "config": to_dict(cfg),
    }
    export_vae(vae, cfg.output_dir, stats["scaling_factor"], report)
    w.tracker.log_metrics(stats, state.step)
    w.tracker.log_artifacts(cfg.output_dir, EXPORT_ARTIFACT_PATH)
    return report


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point. config: {"cfg": to_dict(TrainVAEConfig) resolved by the driver,
    "run_id": the MLflow run id or None}."""
    import ray.train
    import torch
    from ray.train.torch import get_device, prepare_model

    from pipelines.core.runtime import setup_logging

    setup_logging()
    cfg = from_dict(TrainVAEConfig, config["cfg"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    w = _Worker(cfg, rank, world_size, get_device(),
                Tracker.attach(cfg.mlflow, config["run_id"] if rank == 0 else None,
                               run_name=cfg.run_name if rank == 0 else None))  # MLflow was down at the start
    vae = load_trainable_vae(cfg.vae.source, cfg.vae.seed)  # same seeded init on every rank
    state, optimizer_state = _restore(vae, cfg)
    model = prepare_model(vae_loss_module(vae, cfg.train))  # DDP when world > 1
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    grid = None
    if rank == 0:  # the same images in every grid of the run, so the grids show progress
        grid = torch.from_numpy(first_images(cfg.input_dir, tar_shard_names(cfg.input_dir), cfg.image_size,
                                             cfg.train.grid_images)).to(w.device)
        w.tracker.start_system_metrics()
    try:
        _train_steps(w, model, vae, optimizer, state, grid)
        if rank == 0:
            report = _export(w, vae, state)
            log.info("exported the VAE to %s (scaling factor %.5f)", cfg.output_dir, report["scaling_factor"])
    finally:
        w.tracker.stop_system_metrics()
