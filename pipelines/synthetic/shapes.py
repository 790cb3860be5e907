"""Synthetic captioned images that a person and a program can both check.

One filled shape on a white square canvas, described by four attributes:

    shape     circle, square, triangle (upright)
    color     red (220,20,20), green (20,160,20), blue (20,40,220), yellow (230,200,0),
              purple (140,30,160), orange (240,120,0)
    size      small (side ~30% of the canvas), large (~60%)
    position  top left, top right, bottom left, bottom right, center

Canonical caption: "a {size} {color} {shape} in the {position}" (e.g. "a small red circle in the top
left"); `build_dataset` also uses a few paraphrases, but the canonical form stays the most common
(`SyntheticConfig.canonical_fraction`). `parse_caption` reads any of them back into attributes.

Held-out combinations: HELD_OUT_PAIRS lists (colour, shape) pairs that `build_dataset` never
generates, so evaluation can test composition (a "blue triangle" when the model only saw blue
circles/squares and triangles in other colours). Each shape and each colour is held out at most
once, so every word on its own is still seen in training.

`build_dataset` also plants bad items on request (see PlantedCounts), the way the web serves them:
missing pages, server errors, HTML instead of an image, truncated files, tiny or extremely wide
images, empty / whitespace / overlong captions, and one image under two URLs.
Everything is deterministic from the seed. Serving over HTTP lives in pipelines/synthetic/web.py.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import random
import re
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 160, 20),
    "blue": (20, 40, 220),
    "yellow": (230, 200, 0),
    "purple": (140, 30, 160),
    "orange": (240, 120, 0),
}
SIZES: dict[str, float] = {"small": 0.3, "large": 0.6}  # shape side as a fraction of the canvas side
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
BACKGROUND = (255, 255, 255)
DEFAULT_IMAGE_SIZE = 64

# Never generated for training; evaluation prompts for these test composition.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("blue", "triangle"),
    ("yellow", "circle"),
    ("purple", "square"),
})

CANONICAL_TEMPLATE = "a {size} {color} {shape} in the {position}"
PARAPHRASE_TEMPLATES = (
    "a {color} {shape}, {size}, in the {position}",
    "{position}: a {size} {color} {shape}",
    "a picture of a {size} {color} {shape} in the {position} of the image",
    "one {size} {shape} in {color}, placed in the {position}",
)
LONG_CAPTION_CHARS = 2000


@dataclass(frozen=True)
class Attributes:
    shape: str
    color: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for name, allowed in (("shape", SHAPES), ("color", tuple(COLORS)), ("size", tuple(SIZES)),
                              ("position", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {allowed}")

    @property
    def held_out(self) -> bool:
        return (self.color, self.shape) in HELD_OUT_PAIRS

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def all_attributes() -> list[Attributes]:
    """Every combination (held-out ones included), in a fixed order."""
    return [Attributes(shape, color, size, position)
            for shape, color, size, position in itertools.product(SHAPES, COLORS, SIZES, POSITIONS)]


def training_attributes() -> list[Attributes]:
    return [a for a in all_attributes() if not a.held_out]


def held_out_attributes() -> list[Attributes]:
    return [a for a in all_attributes() if a.held_out]


# ---------------------------------------------------------------------------------------------
# Rendering


def position_center(position: str, image_size: int = DEFAULT_IMAGE_SIZE) -> tuple[float, float]:
    """Centre of a shape at `position`: the quadrant's centre, moved inward just enough that a
    large shape stays whole. The same point is used for both sizes, so position alone decides it."""
    half_large = round(SIZES["large"] * image_size) / 2
    near = max(image_size / 4, half_large)
    far = image_size - near
    if position == "center":
        return image_size / 2, image_size / 2
    vertical, horizontal = position.split()
    return (near if horizontal == "left" else far), (near if vertical == "top" else far)


@dataclass(frozen=True)
class Jitter:
    """A per-item variation that keeps the attributes readable: the shape moves by (dx, dy) pixels (kept
    inside the canvas) and its colour shifts by `tint` per channel (clipped to 0..255)."""

    dx: int = 0
    dy: int = 0
    tint: tuple[int, int, int] = (0, 0, 0)

    @classmethod
    def draw(cls, rng: random.Random, max_shift: int, max_tint: int) -> "Jitter":
        return cls(rng.randint(-max_shift, max_shift), rng.randint(-max_shift, max_shift),
                   tuple(rng.randint(-max_tint, max_tint) for _ in range(3)))


def shape_box(attrs: Attributes, image_size: int = DEFAULT_IMAGE_SIZE,
              jitter: Jitter = Jitter()) -> tuple[int, int, int, int]:
    """Inclusive pixel box (left, top, right, bottom) the shape fills: integer maths so that every
    renderer and checker agrees on the exact pixels. A jitter shift never pushes the shape off the canvas."""
    side = round(SIZES[attrs.size] * image_size)
    cx, cy = position_center(attrs.position, image_size)
    left = min(max(round(cx - side / 2) + jitter.dx, 0), image_size - side)
    top = min(max(round(cy - side / 2) + jitter.dy, 0), image_size - side)
    return left, top, left + side - 1, top + side - 1


def render(attrs: Attributes, image_size: int = DEFAULT_IMAGE_SIZE, jitter: Jitter = Jitter()) -> Image.Image:
    """The RGB image for `attrs` (and an optional jitter): deterministic, pixel for pixel."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = shape_box(attrs, image_size, jitter)
    fill = tuple(min(max(c + t, 0), 255) for c, t in zip(COLORS[attrs.color], jitter.tint))
    if attrs.shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif attrs.shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    else:  # upright triangle: base along the bottom edge, apex centred on the top edge
        draw.polygon([(left, bottom), (right, bottom), ((left + right) / 2, top)], fill=fill)
    return image


def encode_image(image: Image.Image, image_format: str) -> bytes:
    """PNG or JPEG bytes (fixed settings, so the same image always gives the same bytes)."""
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, "PNG")
    elif image_format in ("jpg", "jpeg"):
        image.save(buffer, "JPEG", quality=95)
    else:
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Captions


def caption_for(attrs: Attributes, template: str = CANONICAL_TEMPLATE) -> str:
    return template.format(**attrs.as_dict())


def all_captions(attrs: Attributes) -> list[str]:
    """The canonical caption first, then every paraphrase."""
    return [caption_for(attrs, t) for t in (CANONICAL_TEMPLATE, *PARAPHRASE_TEMPLATES)]


def _word_pattern(words: list[str]) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b")


_POSITION_ALIASES = {"centre": "center", "middle": "center"}
_PATTERNS = {
    "shape": _word_pattern(list(SHAPES)),
    "color": _word_pattern(list(COLORS)),
    "size": _word_pattern(list(SIZES)),
    # Positions are whole phrases ("top left"), so a stray "left" elsewhere never counts.
    "position": _word_pattern([*POSITIONS, *_POSITION_ALIASES]),
}


def parse_caption(text: str) -> Attributes | None:
    """Attributes named in a caption (canonical or paraphrase), or None when any attribute is
    missing or named with two different values."""
    lowered = " ".join(str(text).lower().split())
    found = {}
    for name, pattern in _PATTERNS.items():
        values = {_POSITION_ALIASES.get(m, m) for m in pattern.findall(lowered)}
        if len(values) != 1:
            return None
        found[name] = values.pop()
    return Attributes(**found)


# ---------------------------------------------------------------------------------------------
# The dataset: good items plus planted bad ones


@dataclass(frozen=True)
class PlantedCounts:
    """How many bad items of each kind to plant (each on top of the good items)."""

    http_404: int = 0  # the URL answers 404 Not Found
    http_500: int = 0  # the URL answers 500 Internal Server Error
    html_page: int = 0  # 200 with an HTML page (text/html) instead of an image
    truncated_jpeg: int = 0  # the first half of a JPEG file, served as image/jpeg
    truncated_png: int = 0  # the first half of a PNG file, served as image/png
    tiny_image: int = 0  # a valid 8x8 image
    extreme_aspect: int = 0  # a valid image 16 times wider than tall
    empty_caption: int = 0  # good image, caption ""
    whitespace_caption: int = 0  # good image, caption of spaces, tabs and newlines
    long_caption: int = 0  # good image, caption of exactly LONG_CAPTION_CHARS characters
    duplicate_image: int = 0  # the same bytes as a good item, under a second URL

    def total(self) -> int:
        return sum(dataclasses.astuple(self))


PLANTED_KINDS = tuple(f.name for f in dataclasses.fields(PlantedCounts))


@dataclass(frozen=True)
class SyntheticConfig:
    num_good: int = 200  # good items (planted ones come on top)
    image_size: int = DEFAULT_IMAGE_SIZE
    seed: int = 0
    canonical_fraction: float = 0.75  # share of good captions in the canonical form
    image_format: str = "png"  # how good images are served: png or jpeg
    # Per-item variation of good images: shift up to this fraction of the side, tint up to this many RGB
    # levels. 0 and 0: every combination is one exact image (exact dedup then keeps one per combination).
    position_jitter: float = 0.0
    color_jitter: int = 0
    planted: PlantedCounts = field(default_factory=PlantedCounts)

    def __post_init__(self) -> None:
        if self.num_good < 0 or self.image_size < 16:
            raise ValueError("num_good must be >= 0 and image_size >= 16")
        if not 0.5 < self.canonical_fraction <= 1.0:
            raise ValueError("canonical_fraction must be in (0.5, 1]: the canonical form stays the most common")
        encode_image(Image.new("RGB", (1, 1)), self.image_format)  # validates the format name
        if not (0.0 <= self.position_jitter <= 0.06 and 0 <= self.color_jitter <= 20):
            raise ValueError("position_jitter must be in [0, 0.06] and color_jitter in [0, 20]: more would "
                             "change what the caption says (position, colour)")
        if any(count < 0 for count in dataclasses.astuple(self.planted)):
            raise ValueError("planted counts must be >= 0")


@dataclass(frozen=True)
class Response:
    """What the synthetic web answers for one path."""

    status: int
    content_type: str
    body: bytes


ITEM_COLUMNS = ("item_id", "path", "caption", "shape", "color", "size", "position", "planted",
                "duplicate_of")


@dataclass(frozen=True)
class SyntheticDataset:
    """Rows (one per URL, columns ITEM_COLUMNS; `planted` is "" for good items) and what the web
    answers per path. A row whose path has no response is answered 404."""

    rows: tuple[dict[str, str], ...]
    responses: dict[str, Response] = field(repr=False)


_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg"}
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "jpg": "jpg"}
WHITESPACE_CAPTION = " \t \n  "


def _balanced_attributes(count: int, rng: random.Random) -> list[Attributes]:
    """`count` training combinations, each used about equally often, in a seeded order."""
    pool = training_attributes()
    chosen: list[Attributes] = []
    while len(chosen) < count:
        cycle = pool[:]
        rng.shuffle(cycle)
        chosen.extend(cycle[: count - len(chosen)])
    return chosen


def _long_caption(attrs: Attributes) -> str:
    repeated = ". ".join([caption_for(attrs)] * (LONG_CAPTION_CHARS // 20))
    return repeated[:LONG_CAPTION_CHARS]


def _wide_image(attrs: Attributes, image_size: int) -> Image.Image:
    """16:1 strip with a bar in the shape's colour: a valid image with an extreme aspect ratio."""
    width, height = image_size * 4, max(image_size // 4, 2)
    image = Image.new("RGB", (width, height), BACKGROUND)
    ImageDraw.Draw(image).rectangle((width // 4, 0, 3 * width // 4, height - 1), fill=COLORS[attrs.color])
    return image


class _DatasetBuilder:
    """Accumulates rows and responses; one method per kind of item."""

    def __init__(self, cfg: SyntheticConfig, rng: random.Random):
        self.cfg, self.rng = cfg, rng
        self.rows: list[dict[str, str]] = []
        self.responses: dict[str, Response] = {}

    def _add(self, attrs: Attributes, caption: str, response: Response | None, extension: str,
             planted: str = "", duplicate_of: str = "") -> dict[str, str]:
        item_id = f"{len(self.rows):06d}"
        path = f"/images/{item_id}.{extension}"
        if response is not None:  # no response: the server answers 404
            self.responses[path] = response
        row = {"item_id": item_id, "path": path, "caption": caption, **attrs.as_dict(),
               "planted": planted, "duplicate_of": duplicate_of}
        self.rows.append(row)
        return row

    def _image_response(self, image: Image.Image, image_format: str | None = None) -> Response:
        image_format = image_format or self.cfg.image_format
        return Response(200, _CONTENT_TYPES[image_format], encode_image(image, image_format))

    def _good_caption(self, attrs: Attributes) -> str:
        if self.rng.random() < self.cfg.canonical_fraction:
            return caption_for(attrs)
        return caption_for(attrs, self.rng.choice(PARAPHRASE_TEMPLATES))

    def add_good(self, attrs: Attributes) -> dict[str, str]:
        cfg = self.cfg
        jitter = Jitter()
        if cfg.position_jitter or cfg.color_jitter:
            jitter = Jitter.draw(self.rng, round(cfg.position_jitter * cfg.image_size), cfg.color_jitter)
        response = self._image_response(render(attrs, cfg.image_size, jitter))
        return self._add(attrs, self._good_caption(attrs), response, _EXTENSIONS[self.cfg.image_format])

    def add_planted(self, kind: str, good_rows: list[dict[str, str]]) -> None:
        if kind == "duplicate_image":
            self._add_duplicate(good_rows)
            return
        attrs = self.rng.choice(training_attributes())
        caption, extension = caption_for(attrs), _EXTENSIONS[self.cfg.image_format]
        size = self.cfg.image_size
        if kind == "http_404":
            response = None
        elif kind == "http_500":
            response = Response(500, "text/html", b"<html><body>Internal Server Error</body></html>")
        elif kind == "html_page":
            response = Response(200, "text/html; charset=utf-8",
                                b"<!doctype html><html><head><title>Gallery</title></head>"
                                b"<body><p>This page moved.</p></body></html>")
        elif kind in ("truncated_jpeg", "truncated_png"):
            image_format = "jpeg" if kind == "truncated_jpeg" else "png"
            full = encode_image(render(attrs, size), image_format)
            response = Response(200, _CONTENT_TYPES[image_format], full[: len(full) // 2])
            extension = _EXTENSIONS[image_format]
        elif kind == "tiny_image":
            response = self._image_response(render(attrs, 8))
        elif kind == "extreme_aspect":
            response = self._image_response(_wide_image(attrs, size))
        else:
            response = self._image_response(render(attrs, size))
            caption = {"empty_caption": "", "whitespace_caption": WHITESPACE_CAPTION,
                       "long_caption": _long_caption(attrs)}[kind]
        self._add(attrs, caption, response, extension, planted=kind)

    def _add_duplicate(self, good_rows: list[dict[str, str]]) -> None:
        if not good_rows:
            raise ValueError("planting duplicate_image needs at least one good item (num_good > 0)")
        original = self.rng.choice(good_rows)
        attrs = Attributes(original["shape"], original["color"], original["size"], original["position"])
        extension = original["path"].rsplit(".", 1)[1]
        self._add(attrs, original["caption"], self.responses[original["path"]], extension,
                  planted="duplicate_image", duplicate_of=original["item_id"])


def build_dataset(cfg: SyntheticConfig) -> SyntheticDataset:
    """Good items (balanced over the training combinations) plus the planted ones, shuffled."""
    rng = random.Random(cfg.seed)
    builder = _DatasetBuilder(cfg, rng)
    good_rows = [builder.add_good(attrs) for attrs in _balanced_attributes(cfg.num_good, rng)]
    for kind in PLANTED_KINDS:
        for _ in range(getattr(cfg.planted, kind)):
            builder.add_planted(kind, good_rows)
    rows = builder.rows[:]
    rng.shuffle(rows)  # planted items spread over every download shard
    return SyntheticDataset(tuple(rows), builder.responses)
