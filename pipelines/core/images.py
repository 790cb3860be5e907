"""Images as every stage hands them around: (H, W, 3) uint8 RGB numpy arrays."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_rgb_array(image: Any) -> np.ndarray:
    """(H, W, 3) uint8 from an array of that form or a PIL image; anything else is an error naming it."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be an (H, W, 3) uint8 numpy array or a PIL image, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    return image
