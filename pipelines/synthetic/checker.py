"""The synthetic checker: reads a generated image of the synthetic vocabulary back and scores it.

    score = score_image(image, "a small red circle in the top left")   # one image, JSON-ready dict
    report = synthetic_accuracy(scores)                                # per split: seen / held_out / overall

It needs no weights: `read_attributes` is a deterministic pixel checker that
reads colour, shape, size and position back from an image of the synthetic vocabulary
(pipelines/synthetic/shapes.py) and `score_image` compares that with what the prompt asks for. It is built
for what a small diffusion model behind a small VAE draws: blurry, slightly off-colour, soft-edged
shapes on an almost-white background with faint noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from pipelines.core.images import as_rgb_array
from pipelines.synthetic.shapes import COLORS, POSITIONS, SIZES, Attributes, parse_caption, position_center

ATTRIBUTE_NAMES = ("shape", "color", "size", "position")
SPLITS = ("seen", "held_out")

# ---- checker thresholds (their margins are measured in tests/test_metrics.py) ------------------
# A pixel is a foreground candidate when its RGB distance from white exceeds this. Background noise of
# sigma 8 per channel sits around 13 (almost never above 40); the palette colours sit at 260-350.
FOREGROUND_MIN_DISTANCE = 60.0
# Shapes measured on a binary mask: an upright triangle keeps ~1/4 of its pixels above the middle of
# its box, circles and squares 1/2; the threshold is midway.
TRIANGLE_MAX_TOP_FRACTION = 0.375
# Circle or square: a square and the circle inscribed in its box differ only in the box's four corners
# (the pixels outside the inscribed circle), filled by the square and empty for the circle. Whichever of
# the two the blob is nearer to, pixel for pixel, is the one whose corners it matches: more than half
# of the corner pixels filled -> square. Pixels missing elsewhere (a dent in the middle of a side, which
# small squares drawn on an 8x8 latent grid often have) are missing from both and decide nothing, whereas
# the box's overall fill ratio would count them as roundness and read dented squares as circles.
SQUARE_MIN_CORNER_FILL = 0.5
# Box side as a fraction of the image side: small 0.3, large 0.6, the threshold midway. A box under
# half the small side has no size we draw; one over midway between large and the whole canvas is no
# shape at all but clutter spanning the image (noise, a dirty background).
SIZE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2
SIZE_MIN, SPAN_MAX = SIZES["small"] / 2, (SIZES["large"] + 1.0) / 2
# The closest two palette colours (orange, yellow) are 81 apart; a median further than this from every
# named colour (grey, black, brown, noise) is read as no colour at all rather than the nearest one.
COLOR_MAX_DISTANCE = 80.0
# A blob under a tenth of the smallest shape we draw (small triangle: 0.3^2 / 2 of the canvas) is a speck.
MIN_BLOB_FRACTION = 0.1 * SIZES["small"] ** 2 / 2

_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float64)  # (6, 3)


@dataclass(frozen=True)
class ReadBack:
    """What the checker read from one image, and the measurements it read it from.

    `color` is None when the blob's colour is near no named colour, `size` None when the blob is far
    smaller than any shape we draw: both then score wrong against every prompt."""

    shape: str
    color: str | None
    size: str | None
    position: str
    fill_ratio: float  # blob pixels / box pixels
    corner_fill: float  # share of the box's corner pixels (outside its inscribed circle) in the blob
    top_fraction: float  # share of blob pixels above the box's middle row
    side_fraction: float  # longer box side / image side
    center: tuple[float, float]  # box centre (x, y) in pixels, pixel centres at k + 0.5
    box: tuple[int, int, int, int]  # inclusive (left, top, right, bottom), as shape_box gives them
    blob_pixels: int
    median_rgb: tuple[int, int, int]  # of the blob's more saturated half
    color_distance: float  # from median_rgb to the nearest named colour

    @property
    def attributes(self) -> Attributes | None:
        """The four attributes when every one was read, else None."""
        if self.color is None or self.size is None:
            return None
        return Attributes(self.shape, self.color, self.size, self.position)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The largest 4-connected True region of a (H, W) mask, or None when there is none."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]  # label 0 is the background
    return labels == int(np.argmax(sizes)) + 1


def _core_rgb(image: np.ndarray, blob: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Median RGB of the blob's more saturated half: soft edges mixed with white stay out of it."""
    inside = distance[blob]
    return np.median(image[blob][inside >= np.median(inside)].astype(np.float64), axis=0)  # (3,)


def _find_blob(image: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(blob mask (H, W), core RGB (3,)) of the main shape, or None when there is no foreground.

    Two passes: a low threshold finds the shape, then the shape's own colour sets the edge at half
    its distance from white, which is where a blurred edge crosses the true outline whatever the colour."""
    distance = np.sqrt(((255.0 - image.astype(np.float64)) ** 2).sum(axis=-1))  # (H, W)
    found = _largest_component(distance > FOREGROUND_MIN_DISTANCE)
    if found is None or found.sum() < MIN_BLOB_FRACTION * image.shape[0] * image.shape[1]:
        return None
    core = _core_rgb(image, found, distance)
    edge = np.sqrt(((255.0 - core) ** 2).sum()) / 2
    near = ndimage.binary_dilation(found)  # the refined blob may only grow by the one soft-edge pixel
    blob = _largest_component((distance > edge) & near)
    blob = found if blob is None else ndimage.binary_fill_holes(blob)
    return blob, _core_rgb(image, blob, distance)


def _corner_fill(box_blob: np.ndarray) -> float:
    """Share of the box's corner pixels in the blob: those whose centre lies outside the ellipse inscribed
    in the box. box_blob is the (h, w) blob cropped to its box; a square scores 1, its inscribed circle 0."""
    height, width = box_blob.shape
    ys, xs = np.mgrid[0:height, 0:width]  # (h, w) each
    u = (xs + 0.5 - width / 2) / (width / 2)  # pixel centres in units of the half side: the box is [-1, 1]^2
    v = (ys + 0.5 - height / 2) / (height / 2)
    corners = u ** 2 + v ** 2 > 1.0
    return float(box_blob[corners].mean()) if corners.any() else 0.0


def _read_shape(corner_fill: float, top_fraction: float) -> str:
    if top_fraction < TRIANGLE_MAX_TOP_FRACTION:
        return "triangle"
    return "square" if corner_fill > SQUARE_MIN_CORNER_FILL else "circle"


def _read_size(side_fraction: float) -> str | None:
    if side_fraction < SIZE_MIN:
        return None
    return "small" if side_fraction < SIZE_THRESHOLD else "large"


def _read_position(center: tuple[float, float], image_size: int) -> str:
    def gap(position: str) -> float:
        px, py = position_center(position, image_size)
        return math.hypot(center[0] - px, center[1] - py)

    return min(POSITIONS, key=gap)


def read_attributes(image: Any) -> ReadBack | None:
    """Read shape, colour, size and position from a square (H, W, 3) uint8 image. None when it holds no
    shape: no foreground (a blank image), only specks, or one blob spanning the canvas (noise)."""
    image = as_rgb_array(image)
    height, width = image.shape[:2]
    if height != width:
        raise ValueError(f"the synthetic checker needs a square image, got {width}x{height}")
    found = _find_blob(image)
    if found is None:
        return None
    blob, core = found
    ys, xs = np.nonzero(blob)
    top, bottom, left, right = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    box_h, box_w = bottom - top + 1, right - left + 1
    middle = (top + bottom) / 2  # the triangle's apex is at the top: its pixels sit low in the box
    top_fraction = float(((ys < middle).sum() + 0.5 * (ys == middle).sum()) / len(ys))
    fill_ratio = float(len(ys) / (box_h * box_w))
    corner_fill = _corner_fill(blob[top:bottom + 1, left:right + 1])
    side_fraction = max(box_h, box_w) / width
    if side_fraction > SPAN_MAX:
        return None
    center = ((left + right) / 2 + 0.5, (top + bottom) / 2 + 0.5)  # position_center's coordinates
    gaps = np.sqrt(((_PALETTE - core) ** 2).sum(axis=1))  # (6,)
    nearest = int(np.argmin(gaps))
    return ReadBack(
        shape=_read_shape(corner_fill, top_fraction),
        color=_PALETTE_NAMES[nearest] if gaps[nearest] <= COLOR_MAX_DISTANCE else None,
        size=_read_size(side_fraction), position=_read_position(center, width),
        fill_ratio=fill_ratio, corner_fill=corner_fill, top_fraction=top_fraction, side_fraction=side_fraction,
        center=center, box=(left, top, right, bottom), blob_pixels=len(ys),
        median_rgb=tuple(int(round(v)) for v in core), color_distance=float(gaps[nearest]))


def score_image(image: Any, prompt: str) -> dict[str, Any]:
    """Score one image against its prompt: a JSON-ready dict with

    in_vocabulary  False when parse_caption cannot read the prompt (then every score below is None)
    split          "seen" or "held_out" (the prompt's (colour, shape) pair is in HELD_OUT_PAIRS)
    shape, color, size, position, all_correct   bools
    read           ReadBack.as_dict() of the image, or None (no foreground: every attribute wrong)
    """
    wanted = parse_caption(prompt)
    if wanted is None:
        return {"in_vocabulary": False, "split": None, **dict.fromkeys(ATTRIBUTE_NAMES),
                "all_correct": None, "read": None}
    read = read_attributes(image)
    hits = {name: read is not None and getattr(read, name) == getattr(wanted, name) for name in ATTRIBUTE_NAMES}
    return {"in_vocabulary": True, "split": "held_out" if wanted.held_out else "seen", **hits,
            "all_correct": all(hits.values()), "read": None if read is None else read.as_dict()}


def _split_summary(scores: list[Mapping[str, Any]]) -> dict[str, Any]:
    count = len(scores)
    summary: dict[str, Any] = {"count": count}
    for name in (*ATTRIBUTE_NAMES, "all_correct"):
        summary[name] = sum(bool(s[name]) for s in scores) / count if count else None
    return summary


def synthetic_accuracy(scores: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate score_image dicts (extra keys such as prompt or seed are ignored):

    {"images": N, "out_of_vocabulary": K,
     "seen": {"count", "shape", "color", "size", "position", "all_correct"}, "held_out": {...}, "overall": {...}}

    Accuracies are fractions in [0, 1], None for a split without images; out-of-vocabulary prompts are
    counted, not scored."""
    by_split: dict[str, list[Mapping[str, Any]]] = {split: [] for split in SPLITS}
    total = outside = 0
    for n, score in enumerate(scores):
        total += 1
        missing = [k for k in ("in_vocabulary", "split", *ATTRIBUTE_NAMES, "all_correct") if k not in score]
        if missing:
            raise KeyError(f"score {n} lacks {missing}: pass the dicts score_image returns")
        if not score["in_vocabulary"]:
            outside += 1
            continue
        if score["split"] not in by_split:
            raise ValueError(f"score {n}: split must be one of {SPLITS}, got {score['split']!r}")
        by_split[score["split"]].append(score)
    return {"images": total, "out_of_vocabulary": outside,
            **{split: _split_summary(by_split[split]) for split in SPLITS},
            "overall": _split_summary(by_split["seen"] + by_split["held_out"])}
