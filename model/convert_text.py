"""Convert our open_clip text tower to transformers' CLIPTextModel and back: configs and state dicts.

Stable Diffusion 2 shipped OpenCLIP ViT-H/14 this way, and diffusers pipelines read it back: the fused
attention projection `in_proj` splits into q/k/v, the norms and MLP are renamed, and the tower is cut after
the block whose output we condition on, because a pipeline conditions on CLIPTextModel's last_hidden_state
(= final_layer_norm(output of its last layer)):

    our layer             blocks kept     CLIPTextModel gives
    "penultimate"         all but one     ln_final(block N-2)   (SD 2's 23 of 24 layers)
    "last"                all             ln_final(block N-1)
    an index i            i + 1           ln_final(block i)
    "embeddings"          none            ln_final(token + position embeddings)

Both towers are pre-norm transformers with a causal mask, so the states agree to float rounding.
Pure torch: transformers builds the model from these dicts (pipelines/inference/diffusers_export.py) and
open_clip builds our tower from them (model/encoders.py), each imported where it is used.
"""

from __future__ import annotations

import re

import torch
from torch import nn

HF_PREFIX = "text_model."
# Our block names -> CLIPTextModel's, inside one layer (without the "transformer.resblocks.i." prefix).
_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP_RENAMES = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
# The MLP activations both libraries implement alike (open_clip module class name -> transformers' hidden_act).
ACTIVATIONS = {"GELU": "gelu", "QuickGELU": "quick_gelu"}
LAYER_NORM_EPS = 1e-5  # open_clip's LayerNorm default, and CLIPTextConfig's


class TextConversionError(ValueError):
    pass


def kept_blocks(block_index: int) -> int:
    """How many transformer blocks the converted tower keeps to give the states of block `block_index`
    (-1: the embeddings, before any block)."""
    return block_index + 1


def clip_text_config(tower: nn.Module, block_index: int, bos_id: int, eos_id: int, pad_id: int) -> dict:
    """transformers CLIPTextConfig fields of our _TextTower (model/encoders.py) cut after block_index."""
    blocks = tower.transformer.resblocks
    if tower.attn_mask is None:
        raise TextConversionError("a bidirectional text tower (no causal mask) has no CLIPTextModel equivalent")
    first = blocks[0] if len(blocks) else None
    act = type(first.mlp.gelu).__name__ if first is not None else "GELU"
    if act not in ACTIVATIONS or (act == "GELU" and getattr(first.mlp.gelu, "approximate", "none") != "none"):
        raise TextConversionError(f"text tower MLP activation {act} has no CLIPTextModel equivalent "
                                  f"(supported: {sorted(ACTIVATIONS)})")
    for block in list(blocks)[: kept_blocks(block_index)]:
        if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            raise TextConversionError("text towers with layer scale (ls_init_value) have no CLIPTextModel equivalent")
    width = int(tower.transformer.width)
    return {
        "vocab_size": int(tower.token_embedding.num_embeddings),
        "hidden_size": width,
        "intermediate_size": int(first.mlp.c_fc.out_features) if first is not None else 4 * width,
        "num_attention_heads": int(first.attn.num_heads) if first is not None else 1,
        "num_hidden_layers": kept_blocks(block_index),
        "max_position_embeddings": int(tower.positional_embedding.shape[0]),
        "hidden_act": ACTIVATIONS[act],
        "layer_norm_eps": LAYER_NORM_EPS,
        "projection_dim": width,  # unused by CLIPTextModel (no projection head)
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }


def _block_name(ours: str) -> str | None:
    """`transformer.resblocks.i.<piece>` -> `encoder.layers.i.<piece'>` (None for the fused in_proj)."""
    m = re.match(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", ours)
    if m is None:
        return None
    layer, piece, kind = m.groups()
    if piece not in _BLOCK_RENAMES:
        return None
    return f"encoder.layers.{layer}.{_BLOCK_RENAMES[piece]}.{kind}"


def to_clip_text_state(tower_state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Our tower's state (open_clip names) -> CLIPTextModel's, keeping the first num_layers blocks."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in tower_state.items():
        m = re.match(r"^transformer\.resblocks\.(\d+)\.", name)
        if m and int(m.group(1)) >= num_layers:
            continue  # past the block the states are read from
        if name in _TOP_RENAMES:
            out[HF_PREFIX + _TOP_RENAMES[name]] = tensor
        elif m and name.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):
            kind = "weight" if name.endswith("weight") else "bias"
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):  # (3W, ...) -> 3x (W, ...)
                out[f"{HF_PREFIX}encoder.layers.{m.group(1)}.self_attn.{part}.{kind}"] = chunk
        elif (target := _block_name(name)) is not None:
            out[HF_PREFIX + target] = tensor
        else:
            unknown.append(name)
    if unknown:
        raise TextConversionError(f"text tower parameters without a CLIPTextModel equivalent: {sorted(unknown)}")
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def from_clip_text_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel's state -> our tower's (open_clip names); the inverse of to_clip_text_state."""
    inverse_top = {v: k for k, v in _TOP_RENAMES.items()}
    inverse_block = {v: k for k, v in _BLOCK_RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for full, tensor in state.items():
        name = full[len(HF_PREFIX):] if full.startswith(HF_PREFIX) else full
        if name == "embeddings.position_ids":
            continue  # a constant buffer (0..L-1), not a weight
        m = re.match(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
        if name in inverse_top:
            out[inverse_top[name]] = tensor
        elif m and m.group(2) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)[-6]] = tensor
        elif m and m.group(2) in inverse_block:
            out[f"transformer.resblocks.{m.group(1)}.{inverse_block[m.group(2)]}.{m.group(3)}"] = tensor
        else:
            unknown.append(full)
    if unknown:
        raise TextConversionError(f"CLIPTextModel parameters this text tower does not have: {sorted(unknown)}")
    for (layer, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise TextConversionError(f"layer {layer}: q/k/v {kind} projections incomplete ({sorted(parts)})")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def tower_settings(config: dict) -> dict:
    """open_clip TextTransformer arguments (besides the activation) of a CLIPTextConfig dict."""
    act = config.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS.values():
        raise TextConversionError(f"CLIPTextModel hidden_act {act!r} is not supported "
                                  f"(supported: {sorted(ACTIVATIONS.values())})")
    eps = float(config.get("layer_norm_eps", LAYER_NORM_EPS))
    if abs(eps - LAYER_NORM_EPS) > 1e-12:
        raise TextConversionError(f"CLIPTextModel layer_norm_eps {eps} is not supported (open_clip uses 1e-5)")
    width = int(config["hidden_size"])
    return {"context_length": int(config.get("max_position_embeddings", 77)),
            "vocab_size": int(config.get("vocab_size", 49408)), "width": width,
            "heads": int(config["num_attention_heads"]), "layers": int(config["num_hidden_layers"]),
            "mlp_ratio": int(config["intermediate_size"]) / width, "quick_gelu": act == "quick_gelu"}
