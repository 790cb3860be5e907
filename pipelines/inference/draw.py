"""Drawing images from a U-Net: the frozen encoders a model was trained with, seeded sampling, grids.

    sources = EncoderSources.from_manifest(manifest)          # how the features were made
    vae, text = sources.build()                                # the same frozen encoders again
    latents = draw_latents(model_fn, schedule, states, masks, empty, seeds, latent_shape, sampler_cfg)
    images = decode_images(vae, latents, manifest.scaling_factor, manifest.shift_factor)  # (N, H, W, 3) uint8
    grid = image_grid(images, columns=len(seeds))
    grid = captioned_grid(images, prompts_per_image, columns=len(seeds))   # upscaled, each prompt under its tile

Used by the training job's sample previews and by the evaluation job. Pure torch + the encoders:
no Ray, no DeepSpeed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from model.samplers import SamplerConfig, initial_noise, sample
from model.schedule import NoiseSchedule
from pipelines.core import storage
from pipelines.data.schema import Manifest

ModelFn = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]


def _content_id(encoder_id: str) -> str:
    """A diffusers VAE id is "diffusers:<path>:<content hash>": a copied directory is the same VAE."""
    if encoder_id.startswith("diffusers:"):
        return "diffusers:" + encoder_id.rsplit(":", 1)[-1]
    return encoder_id


@dataclass(frozen=True)
class EncoderSources:
    """How to rebuild the frozen VAE and text encoder, and the ids they must come back with."""

    vae_source: str  # "tiny" or a local diffusers AutoencoderKL directory
    vae_seed: int
    text_model: str
    text_weights: str | None
    text_layer: str | int
    text_seed: int
    vae_id: str
    text_id: str

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "EncoderSources":
        config = manifest.extra.get("config") or {}
        vae, text = config.get("vae"), config.get("text")
        if not (isinstance(vae, dict) and isinstance(text, dict)):
            raise ValueError("the feature manifest does not record how its encoders were built (extra.config.vae/"
                             "text): rerun jobs/precompute_latents.py with this version")
        return cls(vae_source=vae["source"], vae_seed=vae.get("seed", 0), text_model=text["model"],
                   text_weights=text.get("weights"), text_layer=text.get("layer", "penultimate"),
                   text_seed=text.get("seed", 0), vae_id=manifest.vae["id"], text_id=manifest.text_encoder["id"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EncoderSources":
        return cls(**values)

    def build(self, device: str | torch.device = "cpu", with_vae: bool = True, with_text: bool = True):
        """-> (FrozenVAE | None, FrozenTextEncoder | None), checked against the recorded ids."""
        from model.encoders import build_text_encoder, build_vae

        vae = text = None
        if with_vae:
            if self.vae_source != "tiny" and not Path(self.vae_source).is_dir():
                raise FileNotFoundError(f"VAE directory {self.vae_source} not found (it is where the features' "
                                        "VAE was loaded from; copy it there or re-export the model)")
            vae = build_vae(self.vae_source, seed=self.vae_seed, device=device)
            _check_id("VAE", vae.id, self.vae_id)
        if with_text:
            text = build_text_encoder(self.text_model, self.text_weights, layer=self.text_layer,
                                      seed=self.text_seed, device=device)
            _check_id("text encoder", text.id, self.text_id)
        return vae, text


def _check_id(what: str, built: str, recorded: str) -> None:
    if _content_id(built) != _content_id(recorded):
        raise ValueError(f"the {what} built now ({built}) is not the one the features were made with ({recorded}): "
                         "its weights or settings changed since precompute")


def encode_prompts(text_encoder: Any, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """-> states (P, L, D) float32 and masks (P, L) bool, on the CPU."""
    states, masks = text_encoder(list(prompts))
    return states.cpu(), masks.cpu()


@torch.no_grad()
def draw_latents(model_fn: ModelFn, schedule: NoiseSchedule, states: Tensor, masks: Tensor,
                 empty: tuple[Tensor, Tensor], seeds: Sequence[int], latent_shape: Sequence[int],
                 sampler: SamplerConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """One image per (prompt row, seed) pair: states (N, L, D), masks (N, L), seeds (N,) -> latents
    (N, C, h, w) float32 in model space. Row i starts from initial_noise(seed i), so an image depends on its
    prompt and seed only, never on what else is in the batch."""
    if not (len(states) == len(masks) == len(seeds)):
        raise ValueError(f"states {len(states)}, masks {len(masks)} and seeds {len(seeds)} must have one row each")
    noise = torch.cat([initial_noise((1, *latent_shape), int(s)) for s in seeds]).to(device, dtype)  # (N, C, h, w)
    n = len(seeds)
    uncond = empty[0][None].expand(n, -1, -1).to(device, dtype)  # (N, L, D)
    uncond_mask = empty[1][None].expand(n, -1).to(device)  # (N, L)

    def call(x: Tensor, t: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        return model_fn(x.to(dtype), t, context.to(dtype), mask)

    latents = sample(call, schedule.to(device), noise, states.to(device, dtype), uncond, sampler,
                     context_mask=masks.to(device), uncond_mask=uncond_mask)
    return latents.float()


@torch.no_grad()
def decode_images(vae: Any, latents: Tensor, scaling_factor: float, shift_factor: float = 0.0) -> np.ndarray:
    """Model-space latents (N, C, h, w) -> (N, H, W, 3) uint8 images."""
    raw = latents / scaling_factor + shift_factor  # the U-Net's space -> the VAE's own
    pixels = vae.decode(raw)  # (N, 3, H, W) in [-1, 1]
    return ((pixels + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*(H+pad)+pad, columns*(W+pad)+pad, 3) image, white gutters."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got {images.shape}")
    n, h, w, _ = images.shape
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top:top + h, left:left + w] = image
    return grid


def captioned_grid(images: np.ndarray, captions: Sequence[str], columns: int, min_tile: int = 128,
                   max_lines: int = 3) -> np.ndarray:
    """(N, H, W, 3) uint8 and a caption per image -> image_grid of the images upscaled by the smallest whole
    factor that makes each side >= min_tile (nearest neighbour: the pixels the model drew, only larger), each
    with its caption below it in black on white, wrapped to the tile's width and cut to max_lines ("..." marks
    a cut)."""
    from PIL import Image, ImageDraw, ImageFont

    if len(captions) != len(images):
        raise ValueError(f"one caption per image: {len(images)} images, {len(captions)} captions")
    n, h, w, _ = images.shape
    scale = max(1, -(-min_tile // min(h, w)))
    font = ImageFont.load_default(size=max(10, w * scale // 11))  # ~20 characters a line
    line = font.getbbox("Ag")[3] + 2
    band = max_lines * line + 4
    tiles = np.full((n, h * scale + band, w * scale, 3), 255, dtype=np.uint8)  # (N, H', W', 3)
    tiles[:, :h * scale] = images.repeat(scale, axis=1).repeat(scale, axis=2)
    for tile, caption in zip(tiles, captions):
        canvas = Image.fromarray(tile[h * scale:])
        draw = ImageDraw.Draw(canvas)
        for k, text in enumerate(_wrap(str(caption), lambda t: draw.textlength(t, font=font), w * scale - 4,
                                       max_lines)):
            draw.text((2, 2 + k * line), text, fill=(0, 0, 0), font=font)
        tile[h * scale:] = np.asarray(canvas)
    return image_grid(tiles, columns)


def _wrap(text: str, width_of: Callable[[str], float], width: float, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels (a word wider than a line is split), at most max_lines lines."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        while width_of(word) > width and len(word) > 1:  # split an over-long word where it stops fitting
            cut = next((i for i in range(len(word) - 1, 0, -1) if width_of(word[:i]) <= width), 1)
            if current:
                lines.append(current)
                current = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{current} {word}".strip()
        if current and width_of(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and width_of(last + "...") > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + "..."]
    return lines


def png_bytes(image: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 image as PNG bytes."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(image: np.ndarray, location: str) -> None:
    """An (H, W, 3) uint8 image as PNG at a local path or URI (atomic)."""
    storage.write_bytes(location, png_bytes(image))
