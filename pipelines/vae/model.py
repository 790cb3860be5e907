"""The trainable VAE, its loss, its reconstruction grid, the scaling-factor measurement and the export."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.core import storage
from pipelines.core.runtime import VAE_REPORT_FILE as REPORT_FILE  # the name pipelines/vae uses
from pipelines.vae.config import TrainSettings

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from diffusers import AutoencoderKL


def load_trainable_vae(source: str, seed: int) -> "AutoencoderKL":
    """The AutoencoderKL to train: the seeded "tiny" preset or a local diffusers directory
    (build_vae resolves both; it hands out a frozen copy, which is unfrozen here)."""
    from model.encoders import build_vae

    vae = build_vae(source, seed=seed).module
    vae.train()
    vae.requires_grad_(True)
    return vae


def vae_loss_module(vae: "AutoencoderKL", train: TrainSettings) -> "torch.nn.Module":
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
        storage.write_json(str(staging / REPORT_FILE), storage.redact_values(report))  # credentials inside URIs
        previous = Path(storage.temp_name(str(final)))
        if final.exists():
            final.rename(previous)
        staging.rename(final)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # only left when something failed
