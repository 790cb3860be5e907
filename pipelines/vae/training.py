"""VAE training stage: filtered WebDataset shards -> a diffusers AutoencoderKL directory with its
latent scaling factor, for the precompute stage (`--set vae.source=OUTPUT_DIR`).

    cfg = TrainVAEConfig(input_dir="data/filtered", output_dir="data/vae")
    exit_code = run(cfg)          # validate, start/join Ray, train on Ray Train, export

The driver (`train_vae`) validates the config, opens the MLflow run and starts a Ray Train
TorchTrainer; every worker runs `train_loop_per_worker`: it reads its own part of the shards,
trains with reconstruction + KL loss and reports checkpoints; rank 0 logs to MLflow and, at the
end, measures the scaling factor and exports.

Why these choices:
- DDP, not DeepSpeed: a VAE has tens of millions of parameters (SD's: 84M, 1.3 GB of fp32 weights,
  gradients and Adam state), which fits on every GPU; ZeRO partitioning would buy no memory that is
  needed and would add an engine, a config and sharded checkpoints. DDP (Ray Train's prepare_model,
  gloo on CPU, NCCL on GPU) keeps the job small and its checkpoint a plain state dict.
- Loss: L1 (or L2) reconstruction + kl_weight * KL to N(0, I). SD's VAE adds a patch-GAN and LPIPS
  for sharp textures; neither is needed for the latents of the synthetic demo data, and LPIPS needs
  pretrained VGG weights that cannot be downloaded here. Both terms are divided by the number of pixel
  values (3*H*W) per image, so kl_weight means what it meant in SD (ratio of per-image KL sum to
  per-image reconstruction sum; SD used 1e-6).
- Colour anchor (train.color_anchor_weight, off by default, on in the tiny preset): an extra MSE that
  ties the posterior mean's first three channels to the image's RGB averaged over each latent pixel's
  patch. Why: a small VAE trained briefly from scratch puts flat colours wherever its init and data
  order take them; in some runs two colours lay closer in latent space than one colour's own spread,
  and the U-Net then swapped them (held-out accuracy 30-68% over four demo runs without it). With
  the anchor, latent distances between flat colours follow their RGB distances in every run; the other
  channels stay free for edges and shape. (SD's own VAE has a roughly linear latent -> RGB map, learned
  over far longer training.) Leave it off when fine-tuning a pretrained VAE: it would move its latent space.
- Data: each rank streams its own shards (in epoch e, shard i goes to rank (i + e) % W, so the parts
  are disjoint and rotate; rows instead of shards when there are fewer shards than ranks), in a
  seeded order and through a seeded shuffle buffer. Decoding happens in the training process: at VAE
  resolutions a JPEG decode is cheap next to a VAE step.
- Resume: rank 0 reports a checkpoint (weights, optimizer, step, config) every checkpoint_every steps
  and at the end; a rerun with the same run_name and storage_path continues from the latest one (and
  only exports again when it was already complete). It is not bit-exact: the data order after a
  resume is a fresh seeded shuffle, which a VAE does not care about.
- Scaling factor: 1 / std of posterior samples on the first `scaling_factor_images` decodable images
  of the sorted shards (as SD measured 0.18215), written into the exported config.json, where
  model/encoders.FrozenVAE reads it. The shift factor stays None (SD 1/2 style); the latent mean is
  recorded in the report.
- Export is done by rank 0, which holds the trained weights and an accelerator (the driver may be a
  small head node): save_pretrained into a hidden temporary folder next to output_dir, then renamed
  over it, so an existing complete output is replaced only once the new one is complete.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from pipelines.core import storage
from pipelines.core.config import ConfigError, config_differences, flatten, from_dict, to_dict
from pipelines.core.job import Stage
from pipelines.core.progress import Progress
from pipelines.core.ray_train import ScalingSettings, build_torch_trainer
from pipelines.core.runtime import StageReport
from pipelines.core.tracking import MLflowSettings, Tracker
from pipelines.data.precompute import DROP_REASON, IMAGE, VAEConfig, list_input_shards, sample_row
from pipelines.data.shards import KEY_FIELD, iter_tar_samples

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from diffusers import AutoencoderKL

log = logging.getLogger("latentforge.train_vae")

REPORT_FILE = "train_vae_report.json"
CHECKPOINT_FILE = "state.pt"  # weights, optimizer, TrainState
CHECKPOINT_CONFIG_FILE = "config.json"  # the config the checkpoint was trained with (small: the driver reads it)
LOSSES = ("l1", "l2")
GRID_KEY = "reconstructions"  # MLflow image key (no '/')
EXPORT_ARTIFACT_PATH = "vae"


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainSettings:
    steps: int = 240
    batch_size: int = 8  # per worker
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # "cosine" or "constant", after a linear warm-up (train_policy.LRSchedule)
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    loss: str = "l1"  # reconstruction loss: "l1" or "l2"
    kl_weight: float = 1e-6
    color_anchor_weight: float = 0.0  # latent channels 0-2 ~ patch-mean RGB (see the module docstring)
    seed: int = 0  # data order, posterior noise, scaling-factor sample
    shuffle_buffer: int = 256  # decoded images held per worker for shuffling
    log_every: int = 10
    image_every: int = 100  # reconstruction grid to MLflow (and always at the end)
    grid_images: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 5  # NaN/inf losses in a row before the run stops (each one is skipped)


@dataclass(frozen=True)
class FailureSettings:
    max_failures: int = 0  # worker-group restarts from the latest checkpoint before giving up


@dataclass(frozen=True)
class TrainVAEConfig:
    input_dir: str = ""  # filtered WebDataset shards (NNNNN.tar), a local path or a URI
    output_dir: str = ""  # exported diffusers AutoencoderKL directory (local or mounted path)
    run_name: str = "train-vae"  # Ray Train run (checkpoints) and MLflow run; same name = resume
    storage_path: str = "ray_results"  # Ray Train checkpoints; made absolute in the driver
    image_size: int = 64  # resize the short side, then center-crop (as precompute does)
    vae: VAEConfig = field(default_factory=VAEConfig)  # "tiny" = from scratch; a directory = fine-tune
    train: TrainSettings = field(default_factory=TrainSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    failure: FailureSettings = field(default_factory=FailureSettings)
    scaling_factor_images: int = 256
    mlflow: MLflowSettings = field(default_factory=MLflowSettings)
    ray_num_cpus: int | None = None  # CPUs of an embedded local Ray (ignored when joining a cluster)


def _check_settings(cfg: TrainVAEConfig) -> None:
    """Value checks that read nothing; raise ConfigError naming the key."""
    t = cfg.train
    if not cfg.input_dir or not cfg.output_dir:
        raise ConfigError("input_dir and output_dir must both be set (--set input_dir=... --set output_dir=...)")
    if not cfg.run_name or "/" in cfg.run_name:
        raise ConfigError(f"run_name must be a non-empty name without '/', got {cfg.run_name!r}")
    positive = {"image_size": cfg.image_size, "train.steps": t.steps, "train.batch_size": t.batch_size,
                "train.log_every": t.log_every, "train.image_every": t.image_every,
                "train.grid_images": t.grid_images, "train.checkpoint_every": t.checkpoint_every,
                "train.keep_checkpoints": t.keep_checkpoints, "train.shuffle_buffer": t.shuffle_buffer,
                "train.max_nonfinite_steps": t.max_nonfinite_steps,
                "scaling.num_workers": cfg.scaling.num_workers, "scaling_factor_images": cfg.scaling_factor_images}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if t.loss not in LOSSES:
        raise ConfigError(f"train.loss must be one of {LOSSES}, got {t.loss!r}")
    if t.kl_weight < 0 or t.color_anchor_weight < 0 or t.weight_decay < 0 or t.grad_clip < 0:
        raise ConfigError("train.kl_weight, train.color_anchor_weight, train.weight_decay and train.grad_clip "
                          "must be >= 0")
    from pipelines.train.policy import LRSchedule

    try:  # the schedule's own checks (lr > 0, warm-up within the steps, a known kind)
        LRSchedule(t.lr, t.warmup_steps, t.steps, t.lr_schedule)
    except ValueError as err:
        raise ConfigError(f"train.lr / train.warmup_steps / train.lr_schedule: {err}") from None
    if cfg.scaling.cpus_per_worker <= 0 or cfg.failure.max_failures < 0:
        raise ConfigError("scaling.cpus_per_worker must be > 0 and failure.max_failures >= 0")


def _check_output_dir(output_dir: str) -> None:
    if storage.is_uri(output_dir):
        raise ConfigError(f"output_dir {output_dir!r}: save_pretrained writes local files; give a local or "
                          f"mounted path (on a cluster: shared storage every node sees)")
    ancestor = Path(storage.absolute(output_dir)).parent
    while not ancestor.exists():  # the nearest folder that exists decides whether we may create it
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {output_dir!r}: {ancestor} is not a writable folder")


def check_inputs(cfg: TrainVAEConfig) -> None:
    """Everything that can be checked before Ray starts. Raises ConfigError naming the key (the job
    exits 2)."""
    _check_settings(cfg)
    shards = list_input_shards(cfg.input_dir)
    if not shards:
        raise ConfigError(f"input_dir {cfg.input_dir} holds no *.tar shards (run jobs/filter_data.py first)")
    _check_output_dir(cfg.output_dir)
    if cfg.vae.source != "tiny" and not Path(cfg.vae.source).expanduser().is_dir():
        raise ConfigError(f"vae.source: {cfg.vae.source!r} is neither 'tiny' nor a local diffusers directory")
    from model.encoders import build_vae

    try:  # loading it here catches a broken directory before any cluster work
        vae = build_vae(cfg.vae.source, seed=cfg.vae.seed)
    except (OSError, ValueError) as err:
        raise ConfigError(f"vae.source {cfg.vae.source!r} does not load as an AutoencoderKL: {err}") from None
    if cfg.image_size % vae.downsample_factor:
        raise ConfigError(f"image_size {cfg.image_size} must be divisible by the VAE's downsample factor "
                          f"{vae.downsample_factor}")
    if cfg.train.color_anchor_weight > 0 and vae.latent_channels < 3:
        raise ConfigError(f"train.color_anchor_weight needs a VAE with >= 3 latent channels (RGB), "
                          f"{cfg.vae.source!r} has {vae.latent_channels}; set train.color_anchor_weight=0")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

def iter_images(input_dir: str, shard_names: list[str], image_size: int,
                keep: Callable[[int], bool] | None = None, dropped: Counter | None = None) -> Iterator[np.ndarray]:
    """Decoded images (3, S, S) float32 in [-1, 1] of the given shards, in order. `keep(i)` selects
    by the running sample index; samples precompute would drop are skipped and counted in `dropped`."""
    index = 0
    for name in shard_names:
        with storage.open_input(storage.join(input_dir, name)) as stream:
            for sample in iter_tar_samples(stream):
                index += 1
                if keep is not None and not keep(index - 1):
                    continue
                row = sample_row(sample[KEY_FIELD], sample, image_size)
                if row[DROP_REASON]:
                    if dropped is not None:
                        dropped[row[DROP_REASON]] += 1
                    continue
                yield row[IMAGE]


def first_images(input_dir: str, shard_names: list[str], image_size: int, count: int) -> np.ndarray:
    """The first `count` decodable images of the shards in sorted order, (N, 3, S, S): a fixed sample
    (the reconstruction grid, the scaling factor) that anyone can reproduce."""
    images = []
    for image in iter_images(input_dir, sorted(shard_names), image_size):
        images.append(image)
        if len(images) == count:
            break
    if not images:
        raise RuntimeError(f"no decodable image in the shards of {input_dir}")
    return np.stack(images)


class ImageStream:
    """One rank's endless, shuffled stream of training images (see the module docstring)."""

    def __init__(self, input_dir: str, shard_names: list[str], image_size: int, rank: int, world_size: int,
                 seed: int, shuffle_buffer: int) -> None:
        self.input_dir, self.shards, self.image_size = input_dir, sorted(shard_names), image_size
        self.rank, self.world_size, self.seed, self.shuffle_buffer = rank, world_size, seed, shuffle_buffer
        self.dropped: Counter = Counter()

    def epoch(self, epoch: int) -> Iterator[np.ndarray]:
        """This rank's images of one epoch. Item i (a shard, or a row when there are fewer shards than
        ranks) goes to rank (i + epoch) % W: the ranks' parts are disjoint and cover the data, and
        over W epochs every rank sees every item once. Its shards are read in a seeded random order."""
        def mine(i: int) -> bool:
            return (i + epoch) % self.world_size == self.rank

        if len(self.shards) < self.world_size:
            return iter_images(self.input_dir, self.shards, self.image_size, keep=mine, dropped=self.dropped)
        names = [name for i, name in enumerate(self.shards) if mine(i)]
        order = np.random.default_rng([self.seed, epoch, self.rank]).permutation(len(names))
        return iter_images(self.input_dir, [names[i] for i in order], self.image_size, dropped=self.dropped)

    def images(self) -> Iterator[np.ndarray]:
        """Epoch after epoch through a shuffle buffer. A rank can draw only empty shards in one epoch;
        W empty epochs in a row mean it met every shard and none had a decodable image."""
        rng = np.random.default_rng([self.seed, self.rank])
        buffer: list[np.ndarray] = []
        epoch, empty_epochs = 0, 0
        while empty_epochs < self.world_size:
            seen = 0
            for image in self.epoch(epoch):
                seen += 1
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(image)
                    continue
                slot = int(rng.integers(len(buffer)))
                yield buffer[slot]
                buffer[slot] = image
            empty_epochs = 0 if seen else empty_epochs + 1
            epoch += 1
        raise RuntimeError(f"no decodable image in any of the {len(self.shards)} shards of {self.input_dir} "
                           f"(dropped: {dict(self.dropped)})")

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """(B, 3, S, S) float32 batches, endlessly."""
        images = self.images()
        while True:
            yield np.stack([next(images) for _ in range(batch_size)])


# --------------------------------------------------------------------------------------------
# model, loss, measurements (pure torch + diffusers)
# --------------------------------------------------------------------------------------------

def load_trainable_vae(source: str, seed: int) -> "AutoencoderKL":
    """The AutoencoderKL to train: the seeded "tiny" preset or a local diffusers directory
    (build_vae resolves both; it hands out a frozen copy, which is unfrozen here)."""
    from model.encoders import build_vae

    vae = build_vae(source, seed=seed).module
    vae.train()
    vae.requires_grad_(True)
    return vae


def _vae_loss_module(vae: "AutoencoderKL", train: TrainSettings) -> "torch.nn.Module":
    """A module whose forward runs encode -> sample -> decode -> losses, so DDP wraps one forward
    (AutoencoderKL's own forward does not return the posterior, which the KL needs).
    Returns (total loss, reconstruction, KL, colour anchor), the last three detached for logging; the
    anchor needs >= 3 latent channels (check_inputs)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class VAELoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, images):  # (B, 3, H, W) in [-1, 1]
            posterior = self.vae.encode(images).latent_dist
            recon = self.vae.decode(posterior.sample()).sample  # (B, 3, H, W)
            rec = F.l1_loss(recon, images) if train.loss == "l1" else F.mse_loss(recon, images)
            kl = posterior.kl().mean() / images[0].numel()  # per pixel value, like rec
            total = rec + train.kl_weight * kl
            anchor = torch.zeros((), device=images.device)
            if train.color_anchor_weight > 0:
                factor = images.shape[-1] // posterior.mean.shape[-1]  # pixels per latent pixel, per side
                patch_rgb = F.avg_pool2d(images, factor)  # (B, 3, h, w)
                anchor = F.mse_loss(posterior.mean[:, :3], patch_rgb)
                total = total + train.color_anchor_weight * anchor
            return total, rec.detach(), kl.detach(), anchor.detach()

    return VAELoss()


def reconstruction_grid(vae: "AutoencoderKL", images: "torch.Tensor") -> np.ndarray:
    """Originals (top row) above their reconstructions from the posterior mode: (H', W', 3) uint8."""
    import torch
    from torchvision.utils import make_grid

    was_training = vae.training
    vae.eval()
    with torch.no_grad():
        recon = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)  # (N, 3, H, W)
    vae.train(was_training)
    grid = make_grid(torch.cat([images.cpu(), recon.cpu()]), nrow=len(images), padding=2, pad_value=1.0)
    return ((grid.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)


def latent_statistics(vae: "AutoencoderKL", images: np.ndarray, batch_size: int, seed: int) -> dict[str, float]:
    """Mean and std (unbiased) of posterior samples of `images` (N, 3, S, S), encoded in batches of
    `batch_size` with noise from one CPU torch.Generator seeded with `seed`; scaling_factor = 1 / std."""
    import torch

    device = next(vae.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    total, total_sq, count = 0.0, 0.0, 0
    was_training = vae.training
    vae.eval()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start:start + batch_size]).to(device)
            z = vae.encode(x).latent_dist.sample(generator=generator).double()  # (B, C, h, w)
            total, total_sq, count = total + z.sum().item(), total_sq + z.square().sum().item(), count + z.numel()
    vae.train(was_training)
    mean = total / count
    std = ((total_sq - count * mean * mean) / (count - 1)) ** 0.5
    return {"latent_mean": mean, "latent_std": std, "scaling_factor": 1.0 / std}


def export_vae(vae: "AutoencoderKL", output_dir: str, scaling_factor: float, report: dict[str, Any]) -> None:
    """save_pretrained (scaling_factor registered in config.json) plus REPORT_FILE into a hidden
    temporary folder next to output_dir, then swapped in: output_dir is always either the previous
    complete export or the new one (up to the instant between two renames)."""
    vae.register_to_config(scaling_factor=float(scaling_factor))
    final = Path(storage.absolute(output_dir))
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(storage.temp_name(str(final)))
    try:
        vae.save_pretrained(staging, safe_serialization=True)
        storage.write_json(str(staging / REPORT_FILE), report)
        previous = Path(storage.temp_name(str(final)))
        if final.exists():
            final.rename(previous)
        staging.rename(final)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # only left when something failed


# --------------------------------------------------------------------------------------------
# the per-worker loop (runs inside Ray Train workers)
# --------------------------------------------------------------------------------------------

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
        saved = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    vae.load_state_dict(saved["model"])
    state = TrainState(**saved["state"])
    log.info("resuming run %s at step %d (%d images seen)", cfg.run_name, state.step, state.images_seen)
    return dataclasses.replace(state, start_step=state.step, train_seconds=0.0), saved["optimizer"]


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
        storage.write_json(str(Path(directory) / CHECKPOINT_CONFIG_FILE), to_dict(w.cfg))  # for check_resume
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


class _Window:
    """Loss sums since the last log line, averaged over ranks when logged."""

    def __init__(self) -> None:
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.sums, self.steps, self.started = [0.0, 0.0, 0.0, 0.0], 0, now

    def add(self, loss: Any, rec: Any, kl: Any, anchor: Any) -> None:
        self.steps += 1
        for i, value in enumerate((loss, rec, kl, anchor)):
            self.sums[i] += float(value)

    def metrics(self, w: _Worker, lr: float, skipped: int) -> dict[str, float]:
        import torch

        now = time.perf_counter()
        totals = torch.tensor([*self.sums, self.steps], dtype=torch.float64)
        if w.world_size > 1:  # all ranks log at the same steps, so this collective lines up
            gloo_or_nccl = totals.to(w.device)
            torch.distributed.all_reduce(gloo_or_nccl)
            totals = gloo_or_nccl.cpu()
        loss, rec, kl, anchor, finite = totals.tolist()
        images = self.steps * w.cfg.train.batch_size * w.world_size
        out = {"loss": loss / max(finite, 1), "recon": rec / max(finite, 1), "kl": kl / max(finite, 1),
               "color_anchor": anchor / max(finite, 1),
               "lr": lr, "images_per_s": images / max(now - self.started, 1e-9), "skipped_steps": skipped}
        self.reset(now)
        return out


def _train_steps(w: _Worker, model: Any, vae: "AutoencoderKL", optimizer: Any, state: TrainState,
                 grid: "torch.Tensor | None") -> None:
    """Steps state.step .. train.steps: LR schedule, non-finite guard, logging, grids, checkpoints."""
    import torch

    from pipelines.train.policy import LRSchedule, NonFiniteGuard, NonFinitePolicy

    t = w.cfg.train
    schedule = LRSchedule(t.lr, t.warmup_steps, t.steps, t.lr_schedule)
    guard = NonFiniteGuard(NonFinitePolicy(t.max_nonfinite_steps))
    guard.load_state_dict(state.guard)
    cfg = w.cfg
    stream = ImageStream(cfg.input_dir, list_input_shards(cfg.input_dir), cfg.image_size, w.rank, w.world_size,
                         seed=t.seed + state.step, shuffle_buffer=t.shuffle_buffer)  # a resume reshuffles
    batches, window, started = stream.batches(t.batch_size), _Window(), time.perf_counter()
    progress = Progress(t.steps, "steps", done=state.step)
    for step in range(state.step, t.steps):
        lr = schedule.apply(optimizer, step)
        loss, rec, kl, anchor = model(torch.from_numpy(next(batches)).to(w.device))
        if guard.check(loss, step):  # same decision on every rank, so DDP's all-reduce lines up
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(vae.parameters(), t.grad_clip)
            optimizer.step()
            window.add(loss.detach(), rec, kl, anchor)
        state.step, state.images_seen = step + 1, state.images_seen + t.batch_size * w.world_size
        state.guard = guard.state_dict()
        last = state.step == t.steps
        if state.step % t.log_every == 0 or last:
            state.metrics = window.metrics(w, lr, guard.total_skipped)
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
    sample = first_images(cfg.input_dir, list_input_shards(cfg.input_dir), cfg.image_size,
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
                Tracker.attach(cfg.mlflow, config["run_id"] if rank == 0 else None))
    vae = load_trainable_vae(cfg.vae.source, cfg.vae.seed)  # same seeded init on every rank
    state, optimizer_state = _restore(vae, cfg)
    model = prepare_model(_vae_loss_module(vae, cfg.train))  # DDP when world > 1
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    torch.manual_seed(cfg.train.seed * 100_003 + rank * 1_009 + state.step)  # posterior noise per rank
    grid = None
    if rank == 0:  # the same images in every grid of the run, so the grids show progress
        grid = torch.from_numpy(first_images(cfg.input_dir, list_input_shards(cfg.input_dir), cfg.image_size,
                                             cfg.train.grid_images)).to(w.device)
        w.tracker.start_system_metrics()
    try:
        _train_steps(w, model, vae, optimizer, state, grid)
        if rank == 0:
            report = _export(w, vae, state)
            log.info("exported the VAE to %s (scaling factor %.5f)", cfg.output_dir, report["scaling_factor"])
    finally:
        w.tracker.stop_system_metrics()


# --------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------

def resolved(cfg: TrainVAEConfig, settings: MLflowSettings) -> TrainVAEConfig:
    """Paths made absolute (workers run elsewhere) and the MLflow settings the driver resolved."""
    return dataclasses.replace(cfg, input_dir=storage.absolute(cfg.input_dir),
                               output_dir=storage.absolute(cfg.output_dir),
                               storage_path=storage.absolute(cfg.storage_path), mlflow=settings)


def build_trainer(cfg: TrainVAEConfig, run_id: str | None):
    """The TorchTrainer for a resolved config (a rerun with the same run_name resumes)."""
    return build_torch_trainer(train_loop_per_worker, {"cfg": to_dict(cfg), "run_id": run_id}, cfg.scaling,
                               run_name=cfg.run_name, storage_path=cfg.storage_path,
                               keep_checkpoints=cfg.train.keep_checkpoints, max_failures=cfg.failure.max_failures)


def check_resume(cfg: TrainVAEConfig) -> str | None:
    """The checkpoint a rerun of run_name continues from, or None; ConfigError when it was trained
    with another VAE or image size (a resume would silently mix two models)."""
    from pipelines.train.checkpoint import latest_checkpoint

    run_dir = storage.join(storage.absolute(cfg.storage_path), cfg.run_name)
    found = latest_checkpoint(run_dir)
    if found is None:
        return None
    config_file = storage.join(found, CHECKPOINT_CONFIG_FILE)
    if not storage.is_file(config_file):
        raise ConfigError(f"run_name {cfg.run_name!r}: the latest checkpoint in {run_dir} has no "
                          f"{CHECKPOINT_CONFIG_FILE}, so it is not a VAE training checkpoint (another job's run?); "
                          f"choose another run_name or storage_path")
    saved, current = storage.read_json(config_file), to_dict(cfg)
    model_keys = ("vae", "image_size")  # what makes it another model; the rest may change on a resume
    changed = config_differences({k: saved.get(k) for k in model_keys}, {k: current[k] for k in model_keys})
    if changed:
        raise ConfigError(f"run_name {cfg.run_name!r} already has checkpoints in {run_dir} of another model "
                          f"({'; '.join(changed)}): choose another run_name (or storage_path) for a new model, "
                          f"or the same settings to resume")
    log.info("continuing run %s from %s", cfg.run_name, found)
    return found


def train_vae(cfg: TrainVAEConfig) -> dict[str, Any]:
    """Open the MLflow run, train on Ray Train, return the export's report. Ray must be running;
    call check_inputs and check_resume first. Raises ray.train.TrainingFailedError when training fails."""
    import ray.train

    tracker = Tracker.open(cfg.mlflow, cfg.run_name, tags={"latentforge.job": "train_vae"})
    cfg = resolved(cfg, tracker.settings)
    tracker.log_params(flatten(to_dict(cfg)))
    tracker.log_dict(to_dict(cfg), "train_vae_config.json")
    try:
        build_trainer(cfg, tracker.run_id).fit()
    except ray.train.TrainingFailedError:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    return storage.read_json(storage.join(cfg.output_dir, REPORT_FILE))


def _failure_message(err: Exception) -> str:
    """The workers' own errors (last line of each), not Ray's wrapping of them."""
    failures = getattr(err, "worker_failures", None) or {}
    if not failures:
        return str(err).strip().splitlines()[-1]
    lines = {str(e).strip().splitlines()[-1] for e in failures.values()}
    return "; ".join(sorted(lines))


def _checked(cfg: TrainVAEConfig) -> TrainVAEConfig:
    check_inputs(cfg)
    check_resume(cfg)
    return cfg


def report_path(cfg: TrainVAEConfig) -> str:
    return storage.join(cfg.output_dir, REPORT_FILE)


def run_train_vae(cfg: TrainVAEConfig) -> StageReport:
    """train_vae as a stage: the export's report as the stage report, a failed run as one readable line."""
    import ray.train

    try:
        exported = train_vae(cfg)
    except ray.train.TrainingFailedError as err:
        raise RuntimeError(f"VAE training failed: {_failure_message(err)} (checkpoints: "
                           f"{storage.join(storage.absolute(cfg.storage_path), cfg.run_name)}; rerun with the "
                           f"same run_name to resume)") from err
    out = exported["config"]
    log.info("VAE: %s (scaling factor %.5f; load it with --set vae.source=%s in precompute); checkpoints: %s; "
             "MLflow run %s at %s", out["output_dir"], exported["scaling_factor"], out["output_dir"],
             storage.join(out["storage_path"], cfg.run_name), exported["mlflow_run_id"],
             out["mlflow"]["tracking_uri"])
    return StageReport("train_vae", details={k: v for k, v in exported.items() if k not in ("stage", "ok")})


STAGE = Stage("train_vae", TrainVAEConfig, run=run_train_vae, report_path=report_path, check=_checked,
              ray_cpus=lambda cfg: cfg.ray_num_cpus)
