"""Per-row work of the scan: caption, decode, size and aspect checks, and the dedup signatures
(pixel sha256, dHash, colour thumbnail). Pure functions of one sample, no Ray."""

from __future__ import annotations

import hashlib
import json
from typing import IO, Any, Iterator

import numpy as np
from PIL import Image

from pipelines.core import storage
from pipelines.core.images import decode_rgb
from pipelines.data.filter.config import CaptionChecks, FilterConfig, ImageChecks
from pipelines.data.shards import KEY_FIELD, image_bytes, iter_tar_samples


class HashingReader:
    """A read-only stream that feeds every byte read through `digest`: the content identity of a shard
    comes for free with the one read the stage makes anyway."""

    def __init__(self, stream: IO[bytes], digest: "hashlib._Hash") -> None:
        self.stream, self.digest = stream, digest

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        """Read to the end (tar's trailing padding, or what follows damage), so the digest covers the file."""
        while self.read(1 << 20):
            pass


def iter_samples(uri: str, digest: "hashlib._Hash | None" = None) -> Iterator[dict[str, Any]]:
    """Samples of one tar in file order (pipelines/data/shards.py); a key that comes back later is
    a new sample (decide() drops the repeat). With `digest`, every byte of the file goes through it,
    also when the tar is damaged (the error still propagates)."""
    with storage.open_input(uri) as stream:
        if digest is None:
            yield from iter_tar_samples(stream)
            return
        reader = HashingReader(stream, digest)
        try:
            yield from iter_tar_samples(reader)
        finally:
            reader.drain()


def caption_check(raw: bytes | None, checks: CaptionChecks) -> tuple[str, str]:
    """-> (drop reason or "", decoded caption)."""
    if raw is None:
        return "caption_missing", ""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "caption_not_utf8", ""
    stripped = text.strip()
    if not stripped:
        return "caption_empty", ""
    if len(stripped) < checks.min_chars:
        return "caption_too_short", text
    if len(stripped) > checks.max_chars:
        return "caption_too_long", text
    return "", text


def _original_size(meta_bytes: bytes | None) -> tuple[int, int] | None:
    try:
        meta = json.loads(meta_bytes) if meta_bytes else None
        w, h = int(meta["original_width"]), int(meta["original_height"])
    except (ValueError, TypeError, KeyError):
        return None
    return (w, h) if w > 0 and h > 0 else None


def size_check(stored: tuple[int, int], original: tuple[int, int] | None, checks: ImageChecks) -> str:
    sizes = [stored] + ([original] if original and checks.use_original_size else [])
    if min(min(s) for s in sizes) < checks.min_side:
        return "image_too_small"
    w, h = sizes[-1]  # the original when known: cropping hides the aspect of what was downloaded
    return "aspect_ratio" if max(w, h) / min(w, h) > checks.max_aspect else ""


def decode_or_none(data: bytes) -> Image.Image | None:
    """An undecodable image is a dropped row here, not an error."""
    try:
        return decode_rgb(data)
    except Exception:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
        return None


def pixel_sha256(img: Image.Image) -> bytes:
    return hashlib.sha256(f"{img.width}x{img.height}:".encode() + img.tobytes()).digest()


# Gray levels a cell must beat its left neighbour by to set a dHash bit. Without it, flat areas
# (white backgrounds) turn re-encoding noise of 1-2 levels into random bits: a JPEG q60 copy of a
# shape on white then differed by 11 bits; with it, by at most 3 (real gradients are larger).
DHASH_MARGIN = 4


def dhash(img: Image.Image) -> int:
    """64-bit difference hash: is each cell of a 9x8 gray thumbnail brighter than its left
    neighbour. BOX resampling averages whole areas, so a one-pixel edit barely moves a cell."""
    gray = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = ((gray[:, 1:] - gray[:, :-1]) > DHASH_MARGIN).reshape(-1)
    return int(np.packbits(bits).view(">u8")[0])


def color_thumb(img: Image.Image) -> bytes:
    return img.resize((8, 8), Image.Resampling.BOX).tobytes()  # 192 bytes, RGB


def analyze(sample: dict[str, Any], cfg: FilterConfig) -> dict[str, Any]:
    """One sample -> its record (reason "" = passed the per-row checks)."""
    rec = {"key": sample[KEY_FIELD], "reason": "", "sha256": b"", "dhash": 0, "thumb": b"",
           "width": 0, "height": 0, "clip": float("nan"), "caption": "", "image": b""}
    encoded = image_bytes(sample)
    if encoded is None:
        return {**rec, "reason": "missing_image"}
    reason, caption = caption_check(sample.get("txt"), cfg.caption)
    if reason:
        return {**rec, "reason": reason}
    img = decode_or_none(encoded)
    if img is None:
        return {**rec, "reason": "undecodable_image"}
    rec.update(width=img.width, height=img.height)
    reason = size_check(img.size, _original_size(sample.get("json")), cfg.image)
    if reason:
        return {**rec, "reason": reason}
    rec.update(sha256=pixel_sha256(img), dhash=dhash(img), thumb=color_thumb(img), caption=caption)
    if cfg.clip.enabled:
        rec["image"] = encoded
    return rec
