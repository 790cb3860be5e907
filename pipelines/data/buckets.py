"""Aspect-ratio buckets: a set of image sizes of about equal area, and which one an image goes to.

    buckets = make_buckets(256, multiple=64, max_ratio=2.0)   # ((320, 192), (256, 256), (192, 320))
    bucket = nearest_bucket(buckets, width=640, height=480)  # (192, 320): the closest aspect ratio
    image = fit_to_bucket(pil_image, bucket)                 # resized to cover it, then center-cropped

A bucket is (height, width) in pixels, both multiples of `multiple`: the VAE's downsample factor times the
U-Net's (8 x 8 = 64 for Stable Diffusion), so every bucket's latent divides by the U-Net's downsampling.
The set holds the square (size, size) and, for each width w = k * multiple under size, the tallest height
that keeps the area at most size * size (so no bucket costs more memory than the square), within
`max_ratio` of square, and each of those turned on its side (the set is symmetric). max_ratio 1 is the
square alone: bucketing off, every image center-cropped as before.

An image goes to the bucket nearest its aspect ratio on a log scale (|log(w/h) - log(bw/bh)|), so 2:1
and 1:2 are equally far from square; a tie goes to the bucket listed first (the squarer one, see
make_buckets' order). Resize to cover then center-crop loses the least of the image a bucket can keep.

Pure: no I/O; PIL is imported only by fit_to_bucket.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover - typing only
    from PIL import Image

Bucket = tuple[int, int]  # (height, width) in pixels


def make_buckets(size: int, multiple: int, max_ratio: float) -> tuple[Bucket, ...]:
    """The buckets of about size * size pixels with sides multiples of `multiple` and aspect within
    [1 / max_ratio, max_ratio], sorted from tallest to widest. Raises ValueError on settings that make no
    such set (size not a multiple of `multiple` when max_ratio > 1, max_ratio < 1)."""
    if size < 1 or multiple < 1:
        raise ValueError(f"bucket size {size} and multiple {multiple} must be >= 1")
    if max_ratio < 1.0:
        raise ValueError(f"max_ratio {max_ratio} must be >= 1 (1 = square only)")
    if max_ratio == 1.0:
        return ((size, size),)  # the square alone: no other side to make a multiple of anything
    if size % multiple:
        raise ValueError(f"image size {size} is not a multiple of the bucket multiple {multiple}")
    area = size * size
    found = {(size, size)}
    for width in range(multiple, size, multiple):  # the tall ones; the wide ones are their mirror images
        height = (area // width) // multiple * multiple  # the tallest that keeps the area <= size * size
        if height / width <= max_ratio + 1e-9:
            found |= {(height, width), (width, height)}
    return tuple(sorted(found, key=lambda b: (b[1] / b[0], b)))


def _distance(width: int, height: int, bucket: Bucket) -> float:
    return abs(math.log(width / height) - math.log(bucket[1] / bucket[0]))


def nearest_bucket(buckets: Sequence[Bucket], width: int, height: int) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's (log scale); ties go to the squarer bucket."""
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} must be positive")
    return min(buckets, key=lambda b: (round(_distance(width, height, b), 12), abs(math.log(b[1] / b[0]))))


def cover_box(width: int, height: int, bucket: Bucket) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top): the image scaled to cover the bucket, keeping its aspect,
    and where the bucket's center crop starts in it."""
    bucket_h, bucket_w = bucket
    scale = max(bucket_w / width, bucket_h / height)
    new_w, new_h = max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))
    return new_w, new_h, (new_w - bucket_w) // 2, (new_h - bucket_h) // 2


def fit_to_bucket(image: "Image.Image", bucket: Bucket) -> "Image.Image":
    """A PIL image resized (bicubic) to cover the bucket, then center-cropped to it: (width, height) =
    (bucket[1], bucket[0])."""
    from PIL import Image

    new_w, new_h, left, top = cover_box(*image.size, bucket)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    return image.crop((left, top, left + bucket[1], top + bucket[0]))


def bucket_name(bucket: Bucket) -> str:
    """'HxW', how reports and manifests key a bucket."""
    return f"{bucket[0]}x{bucket[1]}"
