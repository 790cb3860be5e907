"""Frozen encoders behind small interfaces: the VAE (diffusers AutoencoderKL) and the text
encoder (an open_clip text tower).

Each encoder carries an `id` string and its constants (a frozen `*Spec` dataclass) so the
precompute stage can write them into the feature manifest and the trainer/sampler can check
that latents and embeddings came from the encoders they expect. Nothing here reads the
environment or downloads anything unless the caller passes an open_clip pretrained *tag*.

diffusers and open_clip are imported inside functions: they take several seconds to import and
`model/` must stay importable with torch alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import AutoencoderKL

DeviceLike = Union[torch.device, str, None]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def _file_fingerprint(path: Path, chunk: int = 1 << 20) -> str:
    """Cheap content fingerprint: size plus the first and last MiB (weights can be GBs)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))
    return h.hexdigest()[:12]


def diffusers_component(path: str | os.PathLike, name: str) -> Path:
    """The folder of one component: `path` itself when it holds a config.json, else its `name`/ subfolder when
    that does (a diffusers pipeline folder: vae/, unet/, text_encoder/)."""
    root = Path(path).expanduser().resolve()
    if not (root / "config.json").is_file() and (root / name / "config.json").is_file():
        return root / name
    return root


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def _seeded_build(seed: int, build):
    """Run `build()` under torch.manual_seed(seed) without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------

def vae_downsample_factor(config: dict[str, Any]) -> int:
    """Pixels per latent side of an AutoencoderKL config: every block but the last halves the size."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def tiny_vae_config() -> dict[str, Any]:
    """AutoencoderKL config for tests/demo: S px -> (S/4)x(S/4)x4 latents, ~1M params, fast on CPU."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        # 4 channels a group at full resolution. With one channel a group every GroupNorm is an instance norm,
        # which erases how far a channel sits from the background, and colours came back wrong (checker colour
        # accuracy of reconstructions after 250 steps at 64 px: 46% with 32 groups, 58% with 8).
        "norm_num_groups": 8,  # must divide every entry of block_out_channels
        "sample_size": 64,
        # A random/freshly trained VAE has no measured scale yet; 1.0 is the neutral value.
        "scaling_factor": 1.0,
        "shift_factor": None,
    }


@dataclass(frozen=True)
class VAESpec:
    id: str
    scaling_factor: float
    shift_factor: float
    latent_channels: int
    downsample_factor: int
    in_channels: int = 3


class FrozenVAE:
    """Frozen AutoencoderKL. Images are (B, 3, H, W) in [-1, 1]; latents are RAW VAE latents
    (before scaling); `to_model_space` gives what the U-Net sees."""

    def __init__(self, vae: "AutoencoderKL", id: str, device: DeviceLike = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device or "cpu")
        self.dtype = dtype
        self.module = _freeze(vae).to(self.device)
        if vae.dtype != dtype:  # separate call: diffusers warns about any to() carrying a dtype
            self.module.to(dtype)
        cfg = vae.config
        shift = cfg.get("shift_factor")
        self.spec = VAESpec(
            id=id,
            scaling_factor=float(cfg["scaling_factor"]),
            shift_factor=0.0 if shift is None else float(shift),
            latent_channels=int(cfg["latent_channels"]),
            downsample_factor=vae_downsample_factor(cfg),
            in_channels=int(cfg["in_channels"]),
        )

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: DeviceLike = "cpu",
                        dtype: torch.dtype = torch.float32) -> "FrozenVAE":
        """Load a local diffusers directory (config.json + weights); a full pipeline
        directory with a `vae/` subfolder is accepted too."""
        from diffusers import AutoencoderKL
        from diffusers.utils import is_accelerate_available

        root = diffusers_component(path, "vae")
        if not (root / "config.json").is_file():
            raise FileNotFoundError(
                f"no diffusers AutoencoderKL at {path}: expected a directory with config.json "
                f"and weights (as written by AutoencoderKL.save_pretrained)")
        # diffusers' default low_cpu_mem_usage=True needs `accelerate`; without it diffusers falls back and warns
        vae = AutoencoderKL.from_pretrained(root, local_files_only=True, low_cpu_mem_usage=is_accelerate_available())
        return cls(vae, f"diffusers:{root}:{cls._dir_fingerprint(root)}", device, dtype)

    @staticmethod
    def _dir_fingerprint(root: Path) -> str:
        # config.json plus the weight files, so re-exporting different weights changes the id
        parts = [_file_fingerprint(root / "config.json")]
        for p in sorted(root.iterdir()):
            if p.suffix in (".safetensors", ".bin") and p.is_file():
                parts.append(_file_fingerprint(p))
        return _short_hash("/".join(parts).encode())

    @classmethod
    def from_config(cls, config: dict[str, Any] | str = "tiny", seed: int = 0,
                    device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32) -> "FrozenVAE":
        """Random init (seeded) from an AutoencoderKL config dict or the preset "tiny"."""
        from diffusers import AutoencoderKL

        if isinstance(config, str):
            if config != "tiny":
                raise ValueError(f"unknown VAE preset {config!r}; known presets: ['tiny']")
            name, cfg = "tiny", tiny_vae_config()
        else:
            cfg = dict(config)
            name = _short_hash(json.dumps(cfg, sort_keys=True, default=str).encode())
        vae = _seeded_build(seed, lambda: AutoencoderKL.from_config(cfg))
        return cls(vae, f"random:{name}:seed={seed}", device, dtype)

    # ---- constants ----------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def scaling_factor(self) -> float:
        return self.spec.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.spec.shift_factor

    @property
    def latent_channels(self) -> int:
        return self.spec.latent_channels

    @property
    def downsample_factor(self) -> int:
        return self.spec.downsample_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        self._check_hw(height, width, (height, width))
        f = self.downsample_factor
        return (self.latent_channels, height // f, width // f)

    # ---- validation ---------------------------------------------------------------------
    def _check_hw(self, h: int, w: int, shape: Any) -> None:
        f = self.downsample_factor
        if h % f or w % f:
            raise ValueError(f"image shape {tuple(shape)}: height and width must be divisible by "
                             f"the VAE downsample factor {f}")

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.spec.in_channels:
            raise ValueError(f"images must be (B, {self.spec.in_channels}, H, W) in [-1, 1], "
                             f"got shape {tuple(images.shape)}")
        self._check_hw(images.shape[2], images.shape[3], images.shape)

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (B, {self.latent_channels}, h, w), "
                             f"got shape {tuple(z.shape)}")

    # ---- inference ----------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> posterior (mean, logvar), each (B, C, H/f, W/f) float32."""
        self._check_images(images)
        x = images.to(self.device, self.dtype)
        dist = self.module.encode(x).latent_dist  # logvar is clamped to [-30, 20] by diffusers
        return dist.mean.float(), dist.logvar.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """RAW latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1], float32."""
        self._check_latents(latents)
        out = self.module.decode(latents.to(self.device, self.dtype)).sample
        return out.float().clamp_(-1.0, 1.0)

    @staticmethod
    def sample_latents(mean: torch.Tensor, logvar: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw z ~ N(mean, exp(logvar)); stored moments are re-sampled each time they are read."""
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # same clamp as diffusers
        return mean + std * noise

    def to_model_space(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the roughly unit-variance space the U-Net is trained in."""
        return (z - self.shift_factor) * self.scaling_factor

    def from_model_space(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scaling_factor + self.shift_factor


def build_vae(path_or_preset: str | os.PathLike | dict[str, Any], seed: int = 0,
              device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32) -> FrozenVAE:
    """"tiny" or a config dict -> seeded random init; anything else is a local diffusers dir."""
    if isinstance(path_or_preset, dict) or path_or_preset == "tiny":
        return FrozenVAE.from_config(path_or_preset, seed=seed, device=device, dtype=dtype)
    return FrozenVAE.from_pretrained(path_or_preset, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Text encoder
# --------------------------------------------------------------------------------------------

# Our preset names -> (open_clip model name, open_clip config to register, or None if built in).
_TINY_TEXT_NAME = "latentforge-tiny-text"


def tiny_text_config() -> dict[str, Any]:
    """open_clip model config with a 2-block, width-64 text tower (~3.3M params, mostly the
    token table) and a token-sized vision tower (open_clip's registry requires one; we drop it).

    Two blocks, so the default penultimate states have passed one random attention block: with three,
    the tokens after a colour word carried that colour too (blended by random weights, with "blue"
    landing near "purple"), and the demo's U-Net learned colour partly from the shape word; held-out
    pairs such as "blue triangle" then came out purple. Measured (U-Net 1300 steps of 64, guidance 2,
    on the features of earlier demo runs): where the VAE left blue and purple close, held-out
    all-correct 47% with three blocks, 60% with two; where it kept them apart, 92% -> 87%. The tiny presets
    (configs/tiny/precompute.yaml) now take layer "embeddings", past no random block at all."""
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 32,
                       "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4,
                     "layers": 2},
    }


def _open_clip_name(name: str) -> str:
    """Map our preset names to open_clip names, registering our configs with open_clip once."""
    import open_clip

    if name != "tiny":
        return name
    if _TINY_TEXT_NAME not in open_clip.list_models():
        # add_model_config only takes a path; the registry keeps the parsed config after the
        # temporary file is gone (its rescans skip paths that no longer exist).
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"{_TINY_TEXT_NAME}.json"
            path.write_text(json.dumps(tiny_text_config()))
            open_clip.add_model_config(path)
    return _TINY_TEXT_NAME


def _weights_id(weights: str | os.PathLike | None, seed: int) -> tuple[str | None, str]:
    """(what to pass to open_clip as `pretrained`, the id fragment for it)."""
    if weights is None:
        return None, f"random:seed={seed}"
    path = Path(weights).expanduser()
    if path.is_file():
        return str(path.resolve()), f"file:{path.resolve()}:{_file_fingerprint(path)}"
    if os.sep in str(weights) or path.suffix in (".bin", ".pt", ".pth", ".safetensors", ".ckpt"):
        raise FileNotFoundError(f"text encoder weights file not found: {weights}")
    return str(weights), f"tag:{weights}"  # an open_clip pretrained tag (downloads; needs internet)


def create_open_clip(name: str, weights: str | os.PathLike | None = None, seed: int = 0) -> nn.Module:
    """The full open_clip model (CPU, fp32): random init seeded by `seed` when weights is None,
    else loaded from a local checkpoint file or an open_clip pretrained tag."""
    import open_clip

    oc_name = _open_clip_name(name)
    pretrained, _ = _weights_id(weights, seed)
    return _seeded_build(seed, lambda: open_clip.create_model(oc_name, pretrained=pretrained))


EMBEDDINGS_ONLY = -1  # block index of the "embeddings" layer: token + position embeddings, before any block


@dataclass(frozen=True)
class TextEncoderSpec:
    id: str
    width: int
    context_length: int
    layer: str | int  # "penultimate", "last", "embeddings" or a block index (negative counts from the end)
    block_index: int  # the absolute 0-based transformer block whose output is used; EMBEDDINGS_ONLY: none
    num_layers: int


class _TextTower(nn.Module):
    """The text half of an open_clip CLIP model, sharing its modules (the vision tower is not
    kept, which for ViT-H-14 frees ~2.5 GB)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        src = clip
        if not hasattr(clip, "token_embedding"):  # CustomTextCLIP keeps the tower under .text
            src = getattr(clip, "text", None)
            if src is None or not hasattr(src, "token_embedding"):
                raise ValueError(
                    f"{type(clip).__name__}: only open_clip's own text transformer is supported "
                    f"(not HF text towers)")
            if getattr(src, "cls_emb", None) is not None or getattr(src, "use_pad_mask", False):
                raise ValueError("text towers with a CLS token or padding mask "
                                          "(CoCa-style) are not supported")
        self.token_embedding = src.token_embedding
        self.positional_embedding = src.positional_embedding
        self.transformer = src.transformer
        self.ln_final = src.ln_final
        mask = getattr(src, "attn_mask", None)  # None = bidirectional tower, as open_clip does
        self.register_buffer("attn_mask", None if mask is None else mask.clone(), persistent=False)

    def forward(self, tokens: torch.Tensor, block_index: int) -> torch.Tensor:
        """(B, L) token ids -> ln_final(output of block `block_index`) (B, L, width); EMBEDDINGS_ONLY:
        ln_final(token + position embeddings), each word's state independent of the other words."""
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(tokens).to(cast_dtype)  # (B, L, width)
        x = x + self.positional_embedding.to(cast_dtype)
        if block_index == EMBEDDINGS_ONLY:
            return self.ln_final(x)
        mask = None if self.attn_mask is None else self.attn_mask.to(cast_dtype)
        # open_clip's own block loop with its causal mask; stop_early skips the unused blocks
        _, states = self.transformer.forward_intermediates(
            x, attn_mask=mask, indices=[block_index], stop_early=True)
        return self.ln_final(states[0])


def _resolve_layer(layer: str | int, num_layers: int) -> int:
    if layer == "embeddings":
        return EMBEDDINGS_ONLY
    if layer == "penultimate":
        index = num_layers - 2
    elif layer == "last":
        index = num_layers - 1
    elif isinstance(layer, int) and not isinstance(layer, bool):
        index = layer + num_layers if layer < 0 else layer
    else:
        raise ValueError(f"layer must be 'penultimate', 'last', 'embeddings' or an int, got {layer!r}")
    if not 0 <= index < num_layers:
        raise ValueError(f"layer {layer!r} is out of range for a {num_layers}-block text tower")
    return index


class FrozenTextEncoder:
    """Frozen open_clip text tower: captions -> per-token states (B, L, width) and a mask of
    real tokens (SOT..EOT inclusive). Default layer is the penultimate block followed by
    ln_final, which is what Stable Diffusion 2 conditions on."""

    def __init__(self, clip: nn.Module, tokenizer: Any, id: str, layer: str | int = "penultimate",
                 device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device or "cpu")
        self.dtype = dtype
        self.tower = _freeze(_TextTower(clip)).to(self.device, dtype)
        self.tokenizer = tokenizer
        num_layers = len(self.tower.transformer.resblocks)
        self.spec = TextEncoderSpec(
            id=f"{id}:layer={layer}",
            width=int(self.tower.transformer.width),
            context_length=int(self.tower.positional_embedding.shape[0]),
            layer=layer,
            block_index=_resolve_layer(layer, num_layers),
            num_layers=num_layers,
        )

    @classmethod
    def build(cls, name: str, weights: str | os.PathLike | None = None,
              layer: str | int = "penultimate", seed: int = 0, device: DeviceLike = "cpu",
              dtype: torch.dtype = torch.float32) -> "FrozenTextEncoder":
        """`name`: an open_clip model name ("ViT-H-14") or "tiny". `weights`: None (seeded
        random init), a local checkpoint file, or an open_clip pretrained tag (needs internet)."""
        import open_clip

        _, weights_part = _weights_id(weights, seed)
        clip = create_open_clip(name, weights, seed)
        tokenizer = open_clip.get_tokenizer(_open_clip_name(name))
        return cls(clip, tokenizer, f"open_clip:{name}:{weights_part}", layer, device, dtype)

    @classmethod
    def from_diffusers(cls, path: str | os.PathLike, layer: str | int = "last", device: DeviceLike = "cpu",
                       dtype: torch.dtype = torch.float32) -> "FrozenTextEncoder":
        """The CLIPTextModel of a diffusers pipeline folder (text_encoder/ and tokenizer/), as our tower, with
        its own CLIPTokenizer (its padding token included). A pipeline conditions on the last layer of its
        text_encoder (SD 2 ships 23 of ViT-H's 24 blocks for that), so layer "last" gives the states it uses."""
        root = Path(path).expanduser().resolve()
        text_dir = diffusers_component(root, "text_encoder")
        tokenizer_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else text_dir.parent / "tokenizer"
        if not (text_dir / "config.json").is_file() or not tokenizer_dir.is_dir():
            raise FileNotFoundError(f"no diffusers text encoder at {path}: expected a pipeline folder with "
                                    "text_encoder/ (CLIPTextModel) and tokenizer/ (CLIPTokenizer)")
        clip = _clip_text_tower(text_dir)
        tokenizer = _ClipTokenizer(tokenizer_dir)
        fingerprint = _short_hash("/".join(_file_fingerprint(p) for p in sorted(text_dir.iterdir())
                                           if p.is_file()).encode())
        return cls(clip, tokenizer, f"clip_text:{root}:{fingerprint}", layer, device, dtype)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def width(self) -> int:
        return self.spec.width

    @property
    def context_length(self) -> int:
        return self.spec.context_length

    @property
    def layer(self) -> str | int:
        return self.spec.layer

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> token ids (B, L) long and real-token mask (B, L) bool (SOT..EOT inclusive)."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("captions must be a list of str (wrap a single caption in a list)")
        tokens = self.tokenizer(list(captions), context_length=self.context_length)  # (B, L)
        eot = getattr(self.tokenizer, "eot_token_id", None)
        # The pad id 0 is also a real BPE token ("!"), so locate EOT instead of counting pads.
        # Without an explicit EOT id use argmax: EOT is the largest id in CLIP's vocabulary,
        # the same rule open_clip's argmax pooling relies on.
        hits = tokens == eot if eot is not None else None
        eot_pos = hits.int().argmax(dim=1) if hits is not None else tokens.argmax(dim=1)  # (B,)
        positions = torch.arange(tokens.shape[1])
        mask = positions[None, :] <= eot_pos[:, None]  # (B, L)
        return tokens, mask

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (states (B, L, width) float32, mask (B, L) bool), both on self.device."""
        tokens, mask = self.tokenize(captions)
        states = self.tower(tokens.to(self.device), self.spec.block_index)
        return states.float(), mask.to(self.device)


def _clip_text_tower(text_dir: Path) -> nn.Module:
    """open_clip's TextTransformer holding a saved CLIPTextModel's weights (model/convert_text.py)."""
    from open_clip.transformer import QuickGELU, TextTransformer

    from model.convert_text import TextConversionError, from_clip_text_state, tower_settings

    settings = tower_settings(json.loads((text_dir / "config.json").read_text()))
    act = QuickGELU if settings.pop("quick_gelu") else nn.GELU
    if (text_dir / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(text_dir / "model.safetensors")
    elif (text_dir / "pytorch_model.bin").is_file():
        state = torch.load(text_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{text_dir}: no model.safetensors or pytorch_model.bin (CLIPTextModel weights)")
    tower = TextTransformer(**settings, output_dim=settings["width"], act_layer=act)
    ours = from_clip_text_state(state)
    wanted = {k for k in tower.state_dict() if k != "text_projection"}  # CLIPTextModel has no projection head
    if set(ours) != wanted:
        raise TextConversionError(f"{text_dir}: CLIPTextModel weights do not match its config.json "
                                  f"(missing {sorted(wanted - set(ours))[:5]}, extra {sorted(set(ours) - wanted)[:5]})")
    tower.load_state_dict(ours, strict=False)
    return tower


class _ClipTokenizer:
    """A transformers CLIPTokenizer called like open_clip's: (captions, context_length) -> ids (B, L) long,
    padded and truncated as a diffusers pipeline does (its own padding token, EOT kept at the end)."""

    def __init__(self, directory: Path) -> None:
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
        self.eot_token_id = self.tokenizer.eos_token_id

    def __call__(self, texts: list[str], context_length: int) -> torch.Tensor:
        return self.tokenizer(texts, padding="max_length", max_length=context_length, truncation=True,
                              return_tensors="pt").input_ids


def build_text_encoder(name: str = "tiny", weights: str | os.PathLike | None = None,
                       layer: str | int = "penultimate", seed: int = 0,
                       device: DeviceLike = "cpu",
                       dtype: torch.dtype = torch.float32) -> FrozenTextEncoder:
    """name: "tiny", an open_clip model name, or a diffusers pipeline folder (its text_encoder/ + tokenizer/;
    weights must then be None)."""
    if is_diffusers_text_source(name):
        if weights is not None:
            raise ValueError(f"text weights {weights!r} given with the diffusers folder {name}, which has its own")
        return FrozenTextEncoder.from_diffusers(name, layer=layer, device=device, dtype=dtype)
    return FrozenTextEncoder.build(name, weights, layer=layer, seed=seed, device=device, dtype=dtype)


def is_diffusers_text_source(name: str | os.PathLike) -> bool:
    """A text encoder name that is a local diffusers folder: a pipeline (text_encoder/config.json) or its
    text_encoder/ folder itself (config.json)."""
    root = Path(name).expanduser()
    return (root / "text_encoder" / "config.json").is_file() or (root / "config.json").is_file()


def spec_dict(spec: VAESpec | TextEncoderSpec) -> dict[str, Any]:
    """Plain dict of an encoder spec, for manifests and MLflow params."""
    return dataclasses.asdict(spec)
