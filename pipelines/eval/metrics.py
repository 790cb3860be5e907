"""Metrics for generated images that need weights: CLIP score and FID.

    clip = clip_score(images, prompts, "ViT-H-14", "/weights/open_clip.bin")   # MetricResult
    dist = fid(real_images, images, weights_path="/weights/inception-2015-12-05.pt")  # MetricResult

This module never downloads weights: given none, a metric comes back as MetricResult(computed=False,
reason=...), never as a made-up number; a weights path that does not exist is an error. Images everywhere
are (H, W, 3) uint8 RGB arrays (or a stacked (N, H, W, 3) array). The synthetic-caption accuracy, which needs
no weights, is pipelines/synthetic/checker.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipelines.core.images import as_rgb_array


@dataclass(frozen=True)
class MetricResult:
    """One metric over a set of images. `value` is None exactly when `computed` is False, and then
    `reason` says why (so a report shows a gap, never a made-up number)."""

    name: str
    computed: bool
    value: float | None = None
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.computed == (self.value is None) or (not self.computed and not self.reason):
            raise ValueError(f"{self.name}: a computed metric has a value, one not computed has a reason")

    @classmethod
    def not_computed(cls, name: str, reason: str) -> "MetricResult":
        return cls(name, computed=False, value=None, reason=reason)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _weights_file(weights_path: str | Path, what: str) -> Path:
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights file not found: {weights_path} (nothing is downloaded)")
    return path.resolve()


def _image_list(images: Sequence[Any] | np.ndarray, what: str) -> list[np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)  # (N, H, W, 3) -> N x (H, W, 3)
    try:
        return [as_rgb_array(image) for image in images]
    except (TypeError, ValueError) as err:
        raise type(err)(f"{what}: {err}") from None


# ---- CLIP score -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipModel:
    """An open_clip model with the preprocessing and tokenizer it expects (eval mode, frozen)."""

    model: Any  # open_clip CLIP
    preprocess: Any  # PIL image -> (3, h, w) tensor
    tokenizer: Any  # list[str] -> (B, L) token ids
    name: str


def load_clip(model_name: str, weights_path: str | Path, device: str = "cpu") -> ClipModel:
    """open_clip `model_name` ("ViT-H-14", or "tiny", this project's test config) with weights from a
    local file; open_clip's default (OpenAI) normalisation applies, as for any file-loaded model."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from model.encoders import _open_clip_name, create_open_clip  # "tiny" -> our registered config

    path = _weights_file(weights_path, "CLIP")
    model = create_open_clip(model_name, path).eval().requires_grad_(False).to(device)
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return ClipModel(model, preprocess, open_clip.get_tokenizer(_open_clip_name(model_name)), model_name)


def clip_scores(clip: ClipModel, images: Sequence[Any] | np.ndarray, prompts: Sequence[str],
                batch_size: int = 32) -> np.ndarray:
    """Per image: 100 * max(cos(image embedding, prompt embedding), 0), the standard CLIP score. (N,)"""
    arrays = _image_list(images, "clip_score images")
    if len(arrays) != len(prompts) or not arrays:
        raise ValueError(f"clip_score needs one prompt per image and at least one image, "
                         f"got {len(arrays)} images and {len(prompts)} prompts")
    device = next(clip.model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(arrays), batch_size):
            chunk = arrays[start:start + batch_size]
            pixels = torch.stack([clip.preprocess(Image.fromarray(a)) for a in chunk]).to(device)  # (B, 3, h, w)
            tokens = clip.tokenizer([str(p) for p in prompts[start:start + batch_size]]).to(device)  # (B, L)
            image_emb = clip.model.encode_image(pixels, normalize=True)  # (B, D)
            text_emb = clip.model.encode_text(tokens, normalize=True)  # (B, D)
            out.append((100.0 * (image_emb * text_emb).sum(dim=-1).clamp(min=0)).double().cpu())
    return torch.cat(out).numpy()


def clip_score(images: Sequence[Any] | np.ndarray, prompts: Sequence[str], model_name: str,
               weights_path: str | Path | None, device: str = "cpu", batch_size: int = 32) -> MetricResult:
    """Mean CLIP score in [0, 100]; not computed (with the reason) when no weights file is given."""
    if weights_path is None:
        return MetricResult.not_computed(
            "clip_score", "no CLIP weights given (set metrics.clip_weights=/path/to/open_clip.bin)")
    clip = load_clip(model_name, weights_path, device)
    scores = clip_scores(clip, images, prompts, batch_size)
    return MetricResult("clip_score", True, float(scores.mean()),
                        details={"images": len(scores), "model": model_name, "weights": str(weights_path)})


# ---- FID ------------------------------------------------------------------------------------------


class ScriptedInception(nn.Module):
    """The standard FID Inception-v3 from a TorchScript file, behind the feature interface fid() uses."""

    def __init__(self, scripted: nn.Module) -> None:
        super().__init__()
        self.scripted = scripted.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> (N, 2048); the network resizes to 299 px and scales to [-1, 1] itself."""
        return self.scripted(images, return_features=True)


def load_inception(weights_path: str | Path) -> ScriptedInception:
    """`inception-2015-12-05.pt` as used by StyleGAN2-ADA and clean-fid (the TF FID network ported to
    TorchScript), from a local file: loading it needs torch alone."""
    path = _weights_file(weights_path, "Inception")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format this file ships in
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as err:
        raise ValueError(f"{weights_path} is not a TorchScript Inception file (expected inception-2015-12-05.pt "
                         f"from StyleGAN2-ADA / clean-fid): {err}") from None
    return ScriptedInception(scripted)


class _CountedFeatures(nn.Module):
    """A feature module plus the `num_features` torchmetrics reads (else it probes with a 299 px image)."""

    def __init__(self, inner: nn.Module, num_features: int) -> None:
        super().__init__()
        self.inner, self.num_features = inner, num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner(images)


def _batches(images: list[np.ndarray], batch_size: int) -> Iterable[torch.Tensor]:
    """uint8 (B, 3, H, W) tensors, one image size per batch (a reference folder may mix sizes)."""
    by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
    for image in images:
        by_shape.setdefault(image.shape, []).append(image)
    for group in by_shape.values():
        for start in range(0, len(group), batch_size):
            yield torch.from_numpy(np.stack(group[start:start + batch_size])).permute(0, 3, 1, 2).contiguous()


def fid(real_images: Sequence[Any] | np.ndarray | None, fake_images: Sequence[Any] | np.ndarray,
        weights_path: str | Path | None = None, feature: nn.Module | None = None,
        batch_size: int = 64, device: str = "cpu") -> MetricResult:
    """Frechet distance between features of real and generated images (torchmetrics' FID).

    Features come from `feature` (any module mapping uint8 (N, 3, H, W) to (N, D); tests use small random
    ones) or the TorchScript Inception at `weights_path` (the standard FID). Not computed, with the
    reason, when neither is given or when there are no real images."""
    if feature is not None and weights_path is not None:
        raise ValueError("fid: give either weights_path or feature, not both")
    if feature is None and weights_path is None:
        return MetricResult.not_computed(
            "fid", "no Inception weights given (set metrics.fid_weights=/path/to/inception-2015-12-05.pt)")
    if real_images is None:
        return MetricResult.not_computed("fid", "no reference images given (set metrics.fid_reference=/folder)")
    real, fake = _image_list(real_images, "fid real_images"), _image_list(fake_images, "fid fake_images")
    for what, images in (("real_images", real), ("fake_images", fake)):
        if len(images) < 2:
            raise ValueError(f"fid needs at least 2 {what} (a covariance), got {len(images)}")
    extractor = feature if feature is not None else load_inception(weights_path)
    value = _frechet_distance(extractor, real, fake, batch_size, device)
    source = "feature module" if feature is not None else str(weights_path)
    return MetricResult("fid", True, value, details={"real": len(real), "fake": len(fake), "features": source})


def _frechet_distance(extractor: nn.Module, real: list[np.ndarray], fake: list[np.ndarray],
                      batch_size: int, device: str) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    extractor = extractor.eval().to(device)
    with torch.no_grad():
        probe = next(iter(_batches(real[:1], 1))).to(device)  # (1, 3, H, W)
        counted = _CountedFeatures(extractor, int(extractor(probe).shape[-1]))
        metric = FrechetInceptionDistance(feature=counted, normalize=False, reset_real_features=True)
        metric = metric.to(device).eval()
        for images, is_real in ((real, True), (fake, False)):
            for batch in _batches(images, batch_size):
                metric.update(batch.to(device), real=is_real)
        value = float(metric.compute())
    # FID is a squared distance; eigenvalue round-off can leave -1e-6 for identical sets.
    return max(value, 0.0)
