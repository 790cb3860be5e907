"""Real photographs for the aspect-ratio bucket tests: the pictures scikit-image ships inside its package
(skimage.data; only those that need no download), encoded the ways the web serves images.

    photos = photo_files()          # name -> (encoded bytes, caption), every size, aspect ratio and mode below
    manifest = write_photo_features("/tmp/features", photos, image_size=64, multiple=16)

write_photo_features encodes in process with the precompute stage's own functions (its decode, bucket choice,
encoders, table and manifest), as pipelines/synthetic/features.py does for the shapes: training tests get
bucketed features of real photos in seconds, without Ray.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pipelines.core import storage
from pipelines.core.config import to_dict
from pipelines.data import schema
from pipelines.data.precompute.config import BucketSettings, PrecomputeConfig
from pipelines.data.precompute.encode import encode_rows, load_encoders, probe_encoders
from pipelines.data.precompute.output import build_manifest, write_empty_caption
from pipelines.data.precompute.rows import vae_input

# skimage.data loaders bundled with the package (no pooch download), with a caption each: (height, width)
# from 172x448 (2.6:1) to 1411x1411, colour and grayscale.
PHOTOS = {
    "astronaut": "a photo of an astronaut in a white suit",  # 512x512 RGB
    "coffee": "a cup of coffee on a saucer",  # 400x600 RGB, 3:2 landscape
    "chelsea": "a tabby cat looking up",  # 300x451 RGB
    "rocket": "a rocket on its launch pad",  # 427x640 RGB
    "hubble_deep_field": "galaxies in deep space",  # 872x1000 RGB
    "immunohistochemistry": "a stained tissue sample under a microscope",  # 512x512 RGB
    "camera": "a black and white photo of a cameraman",  # 512x512 gray
    "coins": "old coins on a dark background",  # 303x384 gray
    "cell": "a cell under a microscope",  # 660x550 gray, portrait
    "page": "a scanned page of text",  # 191x384 gray, 2:1
    "text": "a photo of a sign with text",  # 172x448 gray, 2.6:1
}
# Made from the photos: the modes and encodings of issue 19 (each stays a real photo).
VARIANTS = {
    "coffee_exif_rotated": "a cup of coffee on a saucer, held upright",  # stored 600x400, EXIF turns it portrait
    "chelsea_cmyk": "a tabby cat in print colours",  # CMYK JPEG
    "moon_16bit": "the surface of the moon",  # 16-bit grayscale PNG (512x512)
    "rocket_palette": "a rocket in 64 colours",  # palette PNG
    "astronaut_alpha": "an astronaut cut out on transparency",  # RGBA PNG, transparent corners
    "chelsea_animated": "a tabby cat in an animated picture",  # two-frame GIF
    "hubble_panorama": "a wide strip of deep space",  # 1000x200: 5:1, beyond any bucket (the filter drops it)
}


def _load(name: str) -> np.ndarray:
    from skimage import data

    return getattr(data, name)()


def _encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _variant(name: str) -> bytes:
    if name == "coffee_exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to display
        return _encode(Image.fromarray(_load("coffee")), "JPEG", quality=92, exif=exif.tobytes())
    if name == "chelsea_cmyk":
        return _encode(Image.fromarray(_load("chelsea")).convert("CMYK"), "JPEG", quality=92)
    if name == "moon_16bit":
        return _encode(Image.fromarray(_load("moon").astype(np.uint16) * 257), "PNG")
    if name == "rocket_palette":
        return _encode(Image.fromarray(_load("rocket")).quantize(64), "PNG")
    if name == "astronaut_alpha":
        rgba = np.dstack([_load("astronaut"), np.full((512, 512), 255, np.uint8)])
        rgba[:128, :128, 3] = 0  # a transparent corner
        return _encode(Image.fromarray(rgba, "RGBA"), "PNG")
    if name == "chelsea_animated":
        first = Image.fromarray(_load("chelsea"))
        return _encode(first, "GIF", save_all=True, append_images=[first.transpose(Image.FLIP_LEFT_RIGHT)],
                       duration=100, loop=0)
    if name == "hubble_panorama":
        return _encode(Image.fromarray(_load("hubble_deep_field")[300:500]), "JPEG", quality=92)
    raise KeyError(name)


def photo_files(variants: bool = True) -> dict[str, tuple[bytes, str]]:
    """name -> (encoded image, caption): the photos as JPEG (colour) or PNG (gray), then the variants."""
    files = {}
    for name, caption in PHOTOS.items():
        pixels = _load(name)
        fmt = "JPEG" if pixels.ndim == 3 else "PNG"
        files[name] = (_encode(Image.fromarray(pixels), fmt, **({"quality": 92} if fmt == "JPEG" else {})), caption)
    if variants:
        files.update({name: (_variant(name), caption) for name, caption in VARIANTS.items()})
    return files


def precompute_config(output_dir: str, image_size: int = 64, multiple: int = 16, flip: bool = False,
                      max_ratio: float = 2.0) -> PrecomputeConfig:
    return PrecomputeConfig(input_dir="photos", output_dir=str(output_dir), image_size=image_size,
                            buckets=BucketSettings(max_ratio=max_ratio, multiple=multiple), flip=flip)


def write_photo_features(output_dir: str, photos: dict[str, tuple[bytes, str]], shards: int = 2,
                         cfg: PrecomputeConfig | None = None, copies: int = 1) -> schema.Manifest:
    """Feature shards of the photos (each `copies` times, under its own key), split over `shards` shards, in
    the buckets of `cfg` (default: 64 px, multiple 16: 80x48, 64x64, 48x80)."""
    cfg = cfg or precompute_config(output_dir)
    cfg = dataclasses.replace(cfg, output_dir=str(output_dir))
    storage.makedirs(output_dir)
    info = probe_encoders(to_dict(cfg))
    vae, text = load_encoders(cfg)
    shapes = info.feature_shapes(cfg)
    names = [name for name in photos for _ in range(copies)]
    finished = {}
    for index, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        images = [vae_input(photos[names[i]][0], cfg.image_size, shapes.bucket_list) for i in part]  # (3, H, W)
        captions = [photos[names[i]][1] for i in part]
        features = encode_rows(vae, text, images, captions, cfg.flip)
        keys = [f"{names[i]}-{i:04d}" for i in part]
        flipped = (features[schema.LATENT_MEAN_FLIPPED], features[schema.LATENT_LOGVAR_FLIPPED]) if cfg.flip else None
        table = schema.to_table(shapes, keys, captions, features[schema.LATENT_MEAN], features[schema.LATENT_LOGVAR],
                                np.stack(features[schema.TEXT_STATES]), np.array(features[schema.TEXT_LENGTH]),
                                buckets=np.array([image.shape[1:] for image in images]).reshape(len(part), 2),
                                flipped=flipped)
        pq.write_table(table, storage.join(output_dir, schema.shard_name(index)), **schema.PARQUET_WRITE_OPTIONS)
        finished[index] = {"rows": len(part), "bucket_rows": schema.bucket_counts(table, shapes),
                           "rows_in": len(part), "source": "photos", "dropped": {}}
    write_empty_caption(str(output_dir), info)
    manifest = build_manifest(cfg, info, finished)
    manifest.save(output_dir)
    return manifest
