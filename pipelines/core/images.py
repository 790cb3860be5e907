"""Images as every stage hands them around: (H, W, 3) uint8 RGB numpy arrays or PIL RGB images, and the
one decode every stage uses (download, filter, precompute), so an image looks the same in all of them.

What decode_rgb makes of what the web serves:
  - EXIF orientation: applied (a phone photo stored sideways comes out upright).
  - 16-bit grayscale (PIL modes I;16*): scaled to 8 bits (v / 257), not clipped (clipping made it white).
    16-bit RGB(A) PNGs PIL already reads as 8-bit RGB(A) (the high byte).
  - 32-bit integer (I): scaled as 16-bit when any value exceeds 255, else taken as 8-bit; float (F):
    [0, 1] scaled to [0, 255] when no value exceeds 1, else clipped to [0, 255]. (These modes carry no
    range; these are the ranges real files use.)
  - transparency (RGBA, LA, PA, palette or grayscale with a transparent colour): composited on white,
    as img2dataset does, so a logo on a transparent background keeps a white background.
  - CMYK, palette, 1-bit, YCbCr: converted to RGB by PIL.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageOps

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_WHITE = (255, 255, 255, 255)


class TooManyPixels(ValueError):
    """The image's header declares more pixels than allowed; nothing was decoded."""


def as_rgb_array(image: Any) -> np.ndarray:
    """(H, W, 3) uint8 from an array of that form or a PIL image; anything else is an error naming it."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be an (H, W, 3) uint8 numpy array or a PIL image, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    return image


def _eight_bit_gray(img: Image.Image) -> Image.Image:
    values = np.asarray(img)
    if img.mode in _SIXTEEN_BIT_MODES or (img.mode == "I" and values.max(initial=0) > 255):
        values = values.astype(np.float32) / 257.0
    elif img.mode == "F" and values.max(initial=0.0) <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.rint(np.clip(values, 0, 255)).astype(np.uint8))


def _has_transparency(img: Image.Image) -> bool:
    return "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info


def to_rgb(img: Image.Image) -> Image.Image:
    """A loaded PIL image of any mode -> RGB, upright (see the module docstring for each mode)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        img = _eight_bit_gray(img)
    if _has_transparency(img):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return img.convert("RGB")


def decode_rgb(data: bytes, draft_size: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Encoded bytes -> a fully decoded, upright RGB image.

    `max_pixels`: refuse (TooManyPixels) an image whose header declares more pixels, before decoding any;
    PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS) is refused the same way. `draft_size` lets
    JPEG decode at a reduced scale (never below that size) when the caller only needs that much. Raises on
    undecodable or truncated bytes (PIL raises many types: OSError, SyntaxError, ValueError...)."""
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as err:
        raise TooManyPixels(str(err)) from None
    with img:
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise TooManyPixels(f"{width}x{height} = {width * height} pixels > max_image_pixels {max_pixels}")
        if draft_size is not None:
            img.draft("RGB", (draft_size, draft_size))
        img.load()  # a truncated file fails here, not on open
        return to_rgb(img)
