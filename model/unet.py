"""The cross-attention U-Net that predicts the noise (or v) in a noisy latent.

Read top to bottom: timestep embedding, the blocks (ResBlock, attention, transformer), the levels
that stack them, then the U-Net. The layout follows Stable Diffusion so weights convert one to one
with diffusers' UNet2DConditionModel (model/convert.py); the differences are speed-motivated:
fused q/k/v projections, one SiLU of the time embedding shared by every ResBlock, and token
projections as Linear layers (a 1x1 conv is the same map, and tokens are already channels-last).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.config import UNetConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


# --------------------------------------------------------------------------------------------
# Timestep embedding
# --------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps, cosines first as in SD."""
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) / half
    freqs = torch.exp(-math.log(max_period) * exponent)  # (half,)
    angles = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """t -> sinusoid -> MLP; the result conditions every ResBlock."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.freq_dim = cfg.block_channels[0]
        self.linear_1 = nn.Linear(self.freq_dim, cfg.time_embed_dim)
        self.linear_2 = nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        emb = timestep_embedding(t, self.freq_dim).to(dtype)  # (B, C0)
        return self.linear_2(F.silu(self.linear_1(emb)))  # (B, T)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added between the convs."""

    def __init__(self, cfg: UNetConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_groups, in_channels, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(cfg.time_embed_dim, out_channels)
        self.norm2 = nn.GroupNorm(cfg.norm_groups, out_channels, eps=cfg.norm_eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        # temb_act is SiLU(time embedding), computed once per forward by the U-Net.
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Co, H, W)
        h = h + self.time_proj(temb_act)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention. Self-attention fuses q/k/v into one matmul; cross-attention fuses
    k/v, since keys and values both come from the text tokens."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.is_cross:
            q = self.to_q(x)  # (B, N, C)
            k, v = self.to_kv(context).chunk(2, dim=-1)  # (B, L, C) each
        else:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)  # (B, N, C) each
        q, k, v = (s.unflatten(-1, (self.heads, -1)).transpose(1, 2) for s in (q, k, v))  # (B, h, *, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, d)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, N, C)


class GEGLUFeedForward(nn.Module):
    """Linear to 2x the hidden width, GELU-gated, back to the model width."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, 4C) each
        return self.out(hidden * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, then feed-forward."""

    def __init__(self, cfg: UNetConfig, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads, context_dim=cfg.context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))  # (B, N, C)
        x = x + self.cross_attn(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image features as tokens through transformer blocks, with a residual around it all."""

    def __init__(self, cfg: UNetConfig, channels: int, heads: int):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(TransformerBlock(cfg, channels, heads) for _ in range(cfg.transformer_depth))
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, C, H, W = x.shape
        # permute to channels-last tokens: free when x is already channels_last in memory
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, N, C)
        h = self.proj_in(h)
        for block in self.blocks:
            h = block(h, context, mask)
        h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        # Back to x's memory layout: convs fed a layout unlike their weights' reorder the
        # weights on every call, forward and backward (measured ~15% of a CPU step).
        return x + h.contiguous(memory_format=memory_format_of(x))


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


def run_block(block: nn.Module, use_checkpoint: bool, *args: torch.Tensor | None) -> torch.Tensor:
    """Call a block, recomputing its activations in backward when checkpointing is on."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


# --------------------------------------------------------------------------------------------
# Levels: the ResBlocks (+ transformers) at one resolution, going down and coming up
# --------------------------------------------------------------------------------------------


class _Level(nn.Module):
    """ResBlocks at one resolution, each followed by a spatial transformer on attention levels, and an
    optional resampler (Downsample going down, Upsample going up)."""

    def __init__(self, cfg: UNetConfig, in_channels: list[int], out_channels: int, heads: int,
                 with_attention: bool, resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(cfg, c, out_channels) for c in in_channels)
        n_attn = len(in_channels) if with_attention else 0
        self.attn = nn.ModuleList(SpatialTransformer(cfg, out_channels, heads) for _ in range(n_attn))
        self.resample = resample
        self.gradient_checkpointing = False

    def _block(self, i: int, x: torch.Tensor, temb_act: torch.Tensor, context: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        x = run_block(self.res[i], self.gradient_checkpointing, x, temb_act)
        if self.attn:
            x = run_block(self.attn[i], self.gradient_checkpointing, x, context, mask)
        return x


class DownLevel(_Level):
    """Returns its output and every intermediate one, for the skip connections of its up twin. Skips
    travel as return values, never as a list the level mutates: wrappers that copy module inputs
    (DeepSpeed ZeRO-3's hooks do) would lose the mutation."""

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        outputs = []
        for i in range(len(self.res)):
            x = self._block(i, x, temb_act, context, mask)  # (B, C, H, W)
            outputs.append(x)
        if self.resample is not None:
            x = self.resample(x)  # (B, C, H/2, W/2)
            outputs.append(x)
        return x, tuple(outputs)


class UpLevel(_Level):
    """Concatenates one skip before each ResBlock (in the order given), then upsamples."""

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None, skips: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for i, skip in enumerate(skips):
            x = self._block(i, torch.cat([x, skip], dim=1), temb_act, context, mask)  # (B, C, H, W)
        if self.resample is not None:
            x = self.resample(x)  # (B, C, 2H, 2W)
        return x


class MidBlock(nn.Module):
    """The bottleneck at the lowest resolution: ResBlock, spatial transformer, ResBlock (as SD)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        channels = cfg.block_channels[-1]
        self.res = nn.ModuleList([ResBlock(cfg, channels, channels), ResBlock(cfg, channels, channels)])
        self.attn = nn.ModuleList([SpatialTransformer(cfg, channels, cfg.num_heads[-1])])
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        x = run_block(self.res[0], ckpt, x, temb_act)  # (B, C_last, h/f, w/f)
        x = run_block(self.attn[0], ckpt, x, context, mask)
        return run_block(self.res[1], ckpt, x, temb_act)


def build_down_levels(cfg: UNetConfig) -> nn.ModuleList:
    levels, in_ch = [], cfg.block_channels[0]
    for i, out_ch in enumerate(cfg.block_channels):
        is_last = i == cfg.num_levels - 1
        ins = [in_ch] + [out_ch] * (cfg.layers_per_block - 1)
        levels.append(DownLevel(cfg, ins, out_ch, cfg.num_heads[i], cfg.attention_levels[i],
                                None if is_last else Downsample(out_ch)))
        in_ch = out_ch
    return nn.ModuleList(levels)


def build_up_levels(cfg: UNetConfig) -> nn.ModuleList:
    """Mirror of the down path, deepest first. Each level has one more ResBlock than its down
    twin, to consume the skip that the down twin's resampler (or conv_in) produced."""
    rev_channels = cfg.block_channels[::-1]
    levels, prev_ch = [], rev_channels[0]
    for i, out_ch in enumerate(rev_channels):
        down_level = cfg.num_levels - 1 - i
        # The last skip this level pops comes from one level shallower (or conv_in).
        shallower_ch = rev_channels[min(i + 1, cfg.num_levels - 1)]
        n = cfg.layers_per_block + 1
        ins = [(prev_ch if j == 0 else out_ch) + (shallower_ch if j == n - 1 else out_ch) for j in range(n)]
        is_last = i == cfg.num_levels - 1
        levels.append(UpLevel(cfg, ins, out_ch, cfg.num_heads[down_level], cfg.attention_levels[down_level],
                              None if is_last else Upsample(out_ch)))
        prev_ch = out_ch
    return nn.ModuleList(levels)


# --------------------------------------------------------------------------------------------
# The U-Net
# --------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """eps- or v-prediction from noisy latents x_t, timesteps t and text states (cross-attention context).

    conv_in -> down levels (each keeps its outputs as skips) -> mid block -> up levels (each takes as many
    skips as it has ResBlocks, deepest first) -> GroupNorm, SiLU, conv_out. The time embedding conditions
    every ResBlock; the text enters every spatial transformer through cross-attention.

    Weights start from PyTorch's default initialisation (Kaiming-uniform for Conv2d and Linear, GroupNorm
    and LayerNorm at identity), as diffusers' UNet2DConditionModel does; nothing is zero-initialised.
    Fine-tuning starts from converted weights instead (model/convert.py, UNet.from_pretrained).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed = TimestepEmbedding(cfg)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.block_channels[0], 3, padding=1)
        self.down = build_down_levels(cfg)
        self.mid = MidBlock(cfg)
        self.up = build_up_levels(cfg)
        self.out_norm = nn.GroupNorm(cfg.norm_groups, cfg.block_channels[0], eps=cfg.norm_eps)
        self.out_conv = nn.Conv2d(cfg.block_channels[0], cfg.out_channels, 3, padding=1)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each ResBlock / transformer in backward: less memory, ~30% more compute."""
        for module in self.modules():
            if isinstance(module, (_Level, MidBlock)):
                module.gradient_checkpointing = enabled

    def check_inputs(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                     context_mask: torch.Tensor | None) -> None:
        cfg = self.cfg
        if x_t.ndim != 4 or x_t.shape[1] != cfg.in_channels:
            raise ValueError(f"x_t must be (B, {cfg.in_channels}, h, w) latents, got shape {tuple(x_t.shape)}")
        h, w = x_t.shape[-2:]
        if h % cfg.downsample_factor or w % cfg.downsample_factor:
            raise ValueError(
                f"latent size {h}x{w} is not divisible by {cfg.downsample_factor} (2 ** (levels - 1) "
                f"for {cfg.num_levels} levels): crop or resize images so the latent side divides by it"
            )
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, x_t.shape[0])):
            raise ValueError(f"t must be a scalar or shape ({x_t.shape[0]},), got {tuple(t.shape)}")
        if context.ndim != 3 or context.shape[0] != x_t.shape[0] or context.shape[2] != cfg.context_dim:
            raise ValueError(
                f"context must be (B={x_t.shape[0]}, L, {cfg.context_dim}) text states, got "
                f"{tuple(context.shape)}; the text encoder's width must equal UNetConfig.context_dim"
            )
        if context_mask is not None and tuple(context_mask.shape) != tuple(context.shape[:2]):
            raise ValueError(f"context_mask must be {tuple(context.shape[:2])}, got {tuple(context_mask.shape)}")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x_t (B, C, h, w), t (B,), context (B, L, D), context_mask (B, L) bool, True = real token
        (every row needs at least one; used only when cfg.text_mask). Returns the prediction, (B, C, h, w)."""
        self.check_inputs(x_t, t, context, context_mask)
        t = t.reshape(-1).expand(x_t.shape[0])
        temb_act = F.silu(self.time_embed(t, x_t.dtype))  # (B, T)
        # The config decides, not the caller, so training, sampling and previews attend alike. Without a
        # mask SDPA may pick its flash kernel, which takes none (UNetConfig.text_mask).
        use_mask = self.cfg.text_mask and context_mask is not None
        mask = context_mask.bool()[:, None, None, :] if use_mask else None  # (B, 1, 1, L)

        x = self.conv_in(x_t)  # (B, C0, h, w)
        skips = [x]  # a stack: the up path takes from the top, deepest first
        for level in self.down:
            x, outputs = level(x, temb_act, context, mask)
            skips.extend(outputs)
        x = self.mid(x, temb_act, context, mask)  # (B, C_last, h/f, w/f)
        for level in self.up:
            n = len(level.res)
            taken, skips = tuple(reversed(skips[-n:])), skips[:-n]
            x = level(x, temb_act, context, mask, taken)
        return self.out_conv(F.silu(self.out_norm(x)))  # (B, C_out, h, w)

    # ---- persistence ----------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors; each file appears only once complete."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, out / (WEIGHTS_FILE + ".tmp"))
        os.replace(out / (WEIGHTS_FILE + ".tmp"), out / WEIGHTS_FILE)
        (out / (CONFIG_FILE + ".tmp")).write_text(self.cfg.to_json())
        os.replace(out / (CONFIG_FILE + ".tmp"), out / CONFIG_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "UNet":
        from safetensors.torch import load_file

        src = Path(directory)
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (src / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{src} is not a saved UNet: missing {missing} (expected the output of UNet.save_pretrained "
                f"or `python -m model.convert from-diffusers`)"
            )
        cfg = UNetConfig.from_dict(json.loads((src / CONFIG_FILE).read_text()))
        model = cls(cfg)
        state = load_file(src / WEIGHTS_FILE)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{src / WEIGHTS_FILE} does not match its config.json: missing {result.missing_keys[:10]}, "
                f"unexpected {result.unexpected_keys[:10]}"
            )
        return model.to(device=device, dtype=dtype)
