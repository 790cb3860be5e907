"""U-Net configuration: one frozen dataclass and the named presets users pick from.

The structure mirrors diffusers' ``UNet2DConditionModel`` (SD 1.x / SD 2.x family) so that
weights convert one to one (see model/convert.py) and parameter counts match exactly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # latent channels of the VAE
    out_channels: int = 4
    # Channels at each resolution level; the latent is halved between consecutive levels.
    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # Which levels carry spatial transformers (self- + cross-attention) after their ResBlocks.
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    # Attention heads per level (the mid block uses the last level's count).
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    layers_per_block: int = 2
    transformer_depth: int = 1  # transformer blocks inside each spatial transformer
    context_dim: int = 768  # width of the text encoder's token states
    # Mask padding tokens out of cross-attention (UNet.forward's context_mask). False, as Stable Diffusion
    # trains and samples: every token of the context is attended to, padding included, and the mask given
    # to the model is ignored, because SDPA's flash kernel takes no mask and any mask sends every
    # cross-attention call to the slower memory-efficient kernel.
    text_mask: bool = False
    norm_groups: int = 32
    norm_eps: float = 1e-5
    # SD 2 projects in/out of the transformer with Linear layers, SD 1 with 1x1 convs.
    linear_projection: bool = False
    time_embed_mult: int = 4  # time-embedding width = block_channels[0] * this
    sample_size: int = 64  # latent side length the model is trained at (informational)

    def __post_init__(self) -> None:
        levels = len(self.block_channels)
        if levels < 1:
            raise ValueError("UNetConfig.block_channels needs at least one level")
        for name in ("attention_levels", "num_heads"):
            if len(getattr(self, name)) != levels:
                raise ValueError(
                    f"UNetConfig.{name} has {len(getattr(self, name))} entries but block_channels "
                    f"has {levels}: give one per level"
                )
        for level, (channels, heads) in enumerate(zip(self.block_channels, self.num_heads)):
            if channels % self.norm_groups:
                raise ValueError(
                    f"UNetConfig.block_channels[{level}]={channels} is not divisible by "
                    f"norm_groups={self.norm_groups}"
                )
            if channels % heads:
                raise ValueError(
                    f"UNetConfig.block_channels[{level}]={channels} is not divisible by "
                    f"num_heads[{level}]={heads}"
                )

    @property
    def num_levels(self) -> int:
        return len(self.block_channels)

    @property
    def time_embed_dim(self) -> int:
        return self.block_channels[0] * self.time_embed_mult

    @property
    def downsample_factor(self) -> int:
        """How much the U-Net shrinks the latent at its deepest level; inputs must divide by it."""
        return 2 ** (self.num_levels - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "UNetConfig":
        """Read a saved config (config.json). One without text_mask was saved by a U-Net that always masked
        the padding, so it reads as text_mask=True: the weights keep the attention they were trained with."""
        values = {"text_mask": True, **values}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig keys {unknown}; valid keys: {sorted(known)}")
        tuples = {k: tuple(v) for k, v in values.items() if isinstance(v, list)}
        return cls(**{**values, **tuples})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


PRESETS: dict[str, UNetConfig] = {
    # A few million parameters: CPU tests and the offline demo (16x16 latents, tiny CLIP width).
    "tiny": UNetConfig(
        block_channels=(64, 128, 128),
        attention_levels=(False, True, True),
        num_heads=(4, 4, 4),
        layers_per_block=1,
        context_dim=64,  # the tiny open_clip text tower's width (model/encoders.py)
        # Masked, unlike SD: the offline demo's accuracy figures (docs/benchmarks.md) were measured with the
        # mask, and its text states (layer "embeddings") are mostly caption-free padding (~10 tokens of 77 used).
        text_mask=True,
        sample_size=16,
    ),
    # Mid-size (SD 2 style, head dim 64): benchmarks and quick GPU experiments at 32x32 latents.
    "small": UNetConfig(
        block_channels=(128, 256, 512),
        attention_levels=(True, True, True),
        num_heads=(2, 4, 8),
        layers_per_block=2,
        context_dim=512,
        linear_projection=True,
        sample_size=32,
    ),
    # Stable Diffusion 1.5: 859,520,964 parameters, CLIP ViT-L/14 text states (768 wide).
    "sd15": UNetConfig(),
    # Stable Diffusion 2 base: linear projections, head dim 64, OpenCLIP ViT-H/14 (1024 wide).
    "sd2-base": UNetConfig(
        num_heads=(5, 10, 20, 20),
        context_dim=1024,
        linear_projection=True,
    ),
}
