"""Convert weights between diffusers' UNet2DConditionModel and our UNet, both ways.

    python -m model.convert from-diffusers SRC_DIR OUT_DIR   # diffusers -> UNet.from_pretrained dir
    python -m model.convert to-diffusers SRC_DIR OUT_DIR     # ours -> diffusers config.json + safetensors

Covers the SD 1.x family (1x1-conv projections, fixed head count) and the SD 2.x family (linear
projections, fixed head width), in any size: the structure is read from diffusers' config.json.
Our model fuses q/k/v (self-attention) and k/v (cross-attention) and always projects tokens with
Linear layers, so conversion concatenates / splits those weights and reshapes 1x1 convs.
SD attends to every text token, padding included: converted models read text_mask=False, and a model
with text_mask=True is refused, since a diffusers config cannot state the padding mask.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from model.config import UNetConfig
from model.unet import UNet

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"

# Our parameter-name pieces -> diffusers', applied in order to a full parameter name.
RENAMES: list[tuple[str, str]] = [
    (r"^time_embed\.", "time_embedding."),
    (r"^down\.(\d+)\.", r"down_blocks.\1."),
    (r"^up\.(\d+)\.", r"up_blocks.\1."),
    (r"^mid\.", "mid_block."),
    (r"\.res\.(\d+)\.", r".resnets.\1."),
    (r"\.attn\.(\d+)\.", r".attentions.\1."),
    (r"^(down_blocks\.\d+)\.resample\.", r"\1.downsamplers.0."),
    (r"^(up_blocks\.\d+)\.resample\.", r"\1.upsamplers.0."),
    (r"\.time_proj\.", ".time_emb_proj."),
    (r"\.skip\.", ".conv_shortcut."),
    (r"\.blocks\.(\d+)\.", r".transformer_blocks.\1."),
    (r"\.self_attn\.", ".attn1."),
    (r"\.cross_attn\.", ".attn2."),
    (r"\.to_out\.", ".to_out.0."),
    (r"\.ff\.proj\.", ".ff.net.0.proj."),
    (r"\.ff\.out\.", ".ff.net.2."),
    (r"^out_norm\.", "conv_norm_out."),
    (r"^out_conv\.", "conv_out."),
]
# Fused projections of ours and the diffusers projections they concatenate, in order.
FUSED = {"to_qkv.weight": ("to_q.weight", "to_k.weight", "to_v.weight"),
         "to_kv.weight": ("to_k.weight", "to_v.weight")}


class ConversionError(ValueError):
    pass


def diffusers_names(our_name: str) -> list[str]:
    """The diffusers parameter name(s) that one of our parameters corresponds to."""
    name = our_name
    for pattern, replacement in RENAMES:
        name = re.sub(pattern, replacement, name)
    for fused, parts in FUSED.items():
        if name.endswith(fused):
            stem = name[: -len(fused)]
            return [stem + part for part in parts]
    return [name]


def is_token_projection(our_name: str) -> bool:
    return bool(re.search(r"\.proj_(in|out)\.weight$", our_name))


def expected_state_shapes(cfg: UNetConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = UNet(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def _check_key_sets(missing: list[str], unknown: list[str], source: str) -> None:
    if missing or unknown:
        raise ConversionError(
            f"{source} does not match the expected U-Net layout:\n"
            f"  missing keys ({len(missing)}): {sorted(missing)}\n"
            f"  unknown keys ({len(unknown)}): {sorted(unknown)}"
        )


def from_diffusers_state(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """diffusers state dict -> ours (fused projections concatenated, 1x1 convs as Linear)."""
    expected = expected_state_shapes(cfg)
    wanted = {name: diffusers_names(name) for name in expected}
    needed = {src for srcs in wanted.values() for src in srcs}
    _check_key_sets(sorted(needed - set(state)), sorted(set(state) - needed), "diffusers state dict")
    ours = {}
    for name, sources in wanted.items():
        tensor = torch.cat([state[s] for s in sources], dim=0) if len(sources) > 1 else state[sources[0]]
        if tensor.shape != expected[name] and is_token_projection(name):
            tensor = tensor.reshape(expected[name])  # (C, C, 1, 1) conv -> (C, C) linear
        if tensor.shape != expected[name]:
            raise ConversionError(f"{name}: diffusers {sources} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(expected[name])}")
        ours[name] = tensor.clone()
    return ours


def to_diffusers_state(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> diffusers' (fused projections split, 1x1 convs restored for SD1 style)."""
    expected = expected_state_shapes(cfg)
    _check_key_sets(sorted(set(expected) - set(state)), sorted(set(state) - set(expected)), "UNet state dict")
    out = {}
    for name, tensor in state.items():
        targets = diffusers_names(name)
        parts = tensor.chunk(len(targets), dim=0) if len(targets) > 1 else [tensor]
        for target, part in zip(targets, parts):
            if is_token_projection(name) and not cfg.linear_projection:
                part = part.reshape(*part.shape, 1, 1)  # (C, C) -> (C, C, 1, 1)
            out[target] = part.clone().contiguous()
    return out


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

# Options of UNet2DConditionModel that this architecture does not implement, with the value
# (or values) we support. A config that sets anything else is rejected rather than mis-converted.
SUPPORTED_DEFAULTS: dict[str, tuple] = {
    "center_input_sample": (False,), "flip_sin_to_cos": (True,), "freq_shift": (0,),
    "act_fn": ("silu",), "downsample_padding": (1,), "mid_block_scale_factor": (1, 1.0),
    "only_cross_attention": (False,), "dual_cross_attention": (False,),
    "class_embed_type": (None,), "addition_embed_type": (None,), "num_class_embeds": (None,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,), "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,), "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1, 1.0), "conv_in_kernel": (3,),
    "conv_out_kernel": (3,), "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",), "cross_attention_norm": (None,), "addition_time_embed_dim": (None,),
    "reverse_transformer_layers_per_block": (None,), "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
}


def _per_level(value, levels: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ConversionError(f"diffusers config {name} has {len(value)} entries for {levels} levels")
        return tuple(value)
    return (value,) * levels


def config_from_diffusers(dc: dict) -> UNetConfig:
    """Read our UNetConfig from diffusers' UNet2DConditionModel config.json contents."""
    bad = {k: dc[k] for k, ok in SUPPORTED_DEFAULTS.items() if k in dc and dc[k] not in ok}
    if bad:
        raise ConversionError(f"unsupported UNet2DConditionModel options {bad}; supported values: "
                              f"{ {k: SUPPORTED_DEFAULTS[k] for k in bad} }")
    down = list(dc["down_block_types"])
    levels = len(down)
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if any(d not in kinds for d in down):
        raise ConversionError(f"unsupported down_block_types {down}; supported: {list(kinds)}")
    attention = tuple(kinds[d] for d in down)
    expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attention[::-1]]
    if list(dc["up_block_types"]) != expected_up:
        raise ConversionError(f"up_block_types {dc['up_block_types']} must mirror down_block_types: {expected_up}")
    for key in ("layers_per_block", "transformer_layers_per_block", "cross_attention_dim"):
        if isinstance(dc.get(key), (list, tuple)):
            raise ConversionError(f"per-level {key}={dc[key]} is not supported; use a single int")
    # diffusers' historical quirk: attention_head_dim holds the head COUNT when
    # num_attention_heads is unset (both SD 1 and SD 2 configs rely on this).
    heads = dc.get("num_attention_heads") or dc.get("attention_head_dim", 8)
    return UNetConfig(
        in_channels=dc.get("in_channels", 4),
        out_channels=dc.get("out_channels", 4),
        block_channels=tuple(dc["block_out_channels"]),
        attention_levels=attention,
        num_heads=_per_level(heads, levels, "attention_head_dim"),
        layers_per_block=dc.get("layers_per_block", 2),
        transformer_depth=dc.get("transformer_layers_per_block", 1),
        context_dim=dc.get("cross_attention_dim", 1280),
        norm_groups=dc.get("norm_num_groups", 32),
        norm_eps=dc.get("norm_eps", 1e-5),
        linear_projection=bool(dc.get("use_linear_projection", False)),
        sample_size=dc.get("sample_size") or 64,
        text_mask=False,  # SD trains and samples without a padding mask
    )


def config_to_diffusers(cfg: UNetConfig) -> dict:
    """The UNet2DConditionModel config of the same architecture. text_mask is runtime behaviour, not
    architecture: exporting a model refuses it (convert_to_diffusers), an unmasked twin may ignore it."""
    if cfg.time_embed_mult != 4:
        raise ConversionError(f"diffusers fixes the time embedding at 4x; this config has {cfg.time_embed_mult}")
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": cfg.sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in cfg.attention_levels[::-1]],
        "block_out_channels": list(cfg.block_channels),
        "layers_per_block": cfg.layers_per_block,
        "transformer_layers_per_block": cfg.transformer_depth,
        "attention_head_dim": list(cfg.num_heads),
        "cross_attention_dim": cfg.context_dim,
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": cfg.norm_eps,
        "use_linear_projection": cfg.linear_projection,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
    }


# --------------------------------------------------------------------------------------------
# Directories and the command line
# --------------------------------------------------------------------------------------------


def _diffusers_dir(src: Path) -> Path:
    """Accept the U-Net folder itself or a pipeline folder with a unet/ subfolder."""
    if not (src / DIFFUSERS_CONFIG).is_file() and (src / "unet" / DIFFUSERS_CONFIG).is_file():
        return src / "unet"
    return src


def convert_from_diffusers(src_dir: str | Path, out_dir: str | Path) -> UNet:
    from safetensors.torch import load_file

    src = _diffusers_dir(Path(src_dir))
    for name in (DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src / name} not found: SRC_DIR must hold diffusers' {DIFFUSERS_CONFIG} "
                                    f"and {DIFFUSERS_WEIGHTS} (a UNet2DConditionModel saved with safetensors)")
    cfg = config_from_diffusers(json.loads((src / DIFFUSERS_CONFIG).read_text()))
    state = {k: v.float() for k, v in load_file(src / DIFFUSERS_WEIGHTS).items()}
    model = UNet(cfg)
    model.load_state_dict(from_diffusers_state(state, cfg))
    model.save_pretrained(out_dir)
    return model


def convert_to_diffusers(src_dir: str | Path, out_dir: str | Path) -> None:
    from safetensors.torch import save_file

    model = UNet.from_pretrained(src_dir)
    if model.cfg.text_mask:
        # UNet2DConditionModel masks only when each call passes encoder_attention_mask, which SD pipelines
        # never do: exported as is, the model would attend to padding it was trained without.
        raise ConversionError(
            "text_mask=True: this U-Net masks padding tokens out of cross-attention, which diffusers' "
            "UNet2DConditionModel config cannot express (SD pipelines attend to every token). Convert a model "
            "trained with text_mask=false, or set text_mask to false in its config.json knowing that it then "
            "attends to padding it was not trained on"
        )
    config = config_to_diffusers(model.cfg)  # before writing: a refused config leaves nothing behind
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_diffusers_state(model.state_dict(), model.cfg), out / DIFFUSERS_WEIGHTS)
    (out / DIFFUSERS_CONFIG).write_text(json.dumps(config, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)
    p = sub.add_parser("from-diffusers", help="diffusers UNet2DConditionModel dir -> our UNet dir")
    p.add_argument("src_dir", help="folder with config.json + diffusion_pytorch_model.safetensors (or a pipeline folder with unet/)")
    p.add_argument("out_dir", help="output folder, loadable with UNet.from_pretrained")
    p = sub.add_parser("to-diffusers", help="our UNet dir -> diffusers UNet2DConditionModel dir")
    p.add_argument("src_dir", help="folder written by UNet.save_pretrained")
    p.add_argument("out_dir", help="output folder, loadable with UNet2DConditionModel.from_pretrained")
    args = parser.parse_args(argv)
    try:
        if args.direction == "from-diffusers":
            model = convert_from_diffusers(args.src_dir, args.out_dir)
            n = sum(p.numel() for p in model.parameters())
            print(f"converted {n:,} parameters -> {args.out_dir}")
        else:
            convert_to_diffusers(args.src_dir, args.out_dir)
            print(f"wrote diffusers UNet2DConditionModel -> {args.out_dir}")
    except (ConversionError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
