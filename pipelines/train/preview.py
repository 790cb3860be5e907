"""The sample grid the U-Net job logs to MLflow: fixed prompts x seeds, drawn from the EMA weights.

    grid = PreviewGrid(cfg.samples, manifest, rank, world_size, device)   # before the first step
    image = grid.draw(module, schedule, empty_caption, dtype)             # every rank; rank 0 gets the grid

The grid has a row per prompt and a column per seed, upscaled to tiles of >= 128 px with each prompt written
under its tile (captioned_grid). The worker draws one at step 0 (the untrained baseline), then every
samples.every_steps and at the end.

Made once, before training: every rank encodes the prompts on its device and frees the text encoder,
and rank 0 loads the VAE decoder on its device. An encoder path recorded at precompute that is missing
on a node therefore fails the run before its first step, not at the first preview hours later.

Drawing is spread over the ranks: rank r draws its share of the (prompt, seed) rows, every rank draws
the same number (the last share is padded with repeats, because a ZeRO-3 forward pass is collective),
the latents are gathered on the device and rank 0 decodes them. No rank waits for a whole grid drawn
by another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from pipelines.inference.draw import EncoderSources, captioned_grid, decode_images, draw_latents, encode_prompts

if TYPE_CHECKING:
    from model.schedule import NoiseSchedule
    from pipelines.data.schema import Manifest
    from pipelines.train.config import SamplePreviewSettings


def rank_rows(rows: int, rank: int, world_size: int) -> list[int]:
    """This rank's row indices of a grid of `rows`, padded to ceil(rows / world_size) with row 0."""
    share = -(-rows // world_size)
    mine = list(range(rank * share, min((rank + 1) * share, rows)))
    return mine + [0] * (share - len(mine))


class PreviewGrid:
    def __init__(self, samples: SamplePreviewSettings, manifest: Manifest, rank: int, world_size: int,
                 device: torch.device) -> None:
        self.samples, self.manifest, self.rank, self.world_size = samples, manifest, rank, world_size
        self.device = device
        vae, text = EncoderSources.from_manifest(manifest).build(device=device, with_vae=rank == 0)
        states, masks = encode_prompts(text, samples.prompts)  # (P, L, D), (P, L) on the CPU
        del text  # only the prompts' states are needed from here on
        seeds = list(samples.seeds)
        self.rows = len(samples.prompts) * len(seeds)  # row i = (prompt i // S, seed i % S)
        mine = torch.tensor(rank_rows(self.rows, rank, world_size))  # (R,)
        self.states = states[mine // len(seeds)].to(device)  # (R, L, D)
        self.masks = masks[mine // len(seeds)].to(device)  # (R, L)
        self.seeds = [seeds[i % len(seeds)] for i in mine.tolist()]
        self.vae = vae  # rank 0 only

    @torch.no_grad()
    def draw(self, module: torch.nn.Module, schedule: NoiseSchedule, empty: tuple[torch.Tensor, torch.Tensor],
             dtype: torch.dtype) -> np.ndarray | None:
        """Collective: every rank draws its rows with `module` as it is (swap the EMA in first). -> the
        (H', W', 3) uint8 grid on rank 0, None elsewhere."""
        latents = draw_latents(module, schedule, self.states, self.masks, empty, self.seeds,
                               self.manifest.latent_shape, self.samples.sampler, device=self.device,
                               dtype=dtype)  # (R, C, h, w) float32 on the device
        if self.world_size > 1:
            shares = [torch.empty_like(latents) for _ in range(self.world_size)]
            dist.all_gather(shares, latents.contiguous())
            latents = torch.cat(shares)  # (world_size * R, C, h, w) in row order, padding last
        if self.rank != 0:
            return None
        images = decode_images(self.vae, latents[:self.rows], self.manifest.scaling_factor,
                               self.manifest.shift_factor)  # (P*S, H, W, 3)
        captions = [self.samples.prompts[i // len(self.samples.seeds)] for i in range(self.rows)]
        return captioned_grid(images, captions, columns=len(self.samples.seeds))

