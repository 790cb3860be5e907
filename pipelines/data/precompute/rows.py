"""Reading and decoding (CPU tasks): tar samples -> in-flight rows (key, caption, image in [-1, 1],
shard index, ordinal, last flag, drop reason). The in-flight columns never reach a Parquet file."""

from __future__ import annotations

import tarfile
from typing import Any, Iterator

import numpy as np

from pipelines.core import storage
from pipelines.data import schema
from pipelines.data.shards import KEY_FIELD, image_bytes, iter_tar_samples, open_rgb

SHARD, ORDINAL, LAST, IMAGE, DROP_REASON = "_shard", "_ordinal", "_last", "_image", "_drop_reason"

# Drop reasons, the keys of the report's "dropped" counts.
MISSING_IMAGE, MISSING_CAPTION, BAD_CAPTION = "missing_image", "missing_caption", "caption_not_utf8"
DECODE_ERROR, NON_FINITE_LATENTS, NON_FINITE_TEXT = "decode_error", "non_finite_latents", "non_finite_text"


def vae_input(data: bytes, size: int) -> np.ndarray:
    """Encoded image -> (3, size, size) float32 in [-1, 1]: short side resized to `size`, center crop.
    Raises on undecodable bytes."""
    from PIL import Image

    img = open_rgb(data, draft_size=size)
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    pixels = np.asarray(img, dtype=np.float32)  # (S, S, 3) in [0, 255]
    return pixels.transpose(2, 0, 1) / 127.5 - 1.0


def _with_last_flag(items: Iterator) -> Iterator[tuple[Any, bool]]:
    """Yield (item, is_last) with a one-item lookahead."""
    previous, has_previous = None, False
    for item in items:
        if has_previous:
            yield previous, False
        previous, has_previous = item, True
    if has_previous:
        yield previous, True


def sample_row(key: str, files: dict[str, bytes], size: int) -> dict[str, Any]:
    """One tar sample -> key, caption, image (3, S, S) and a drop reason ("" when the row is good)."""
    reason, caption, image = "", "", np.zeros((3, size, size), np.float32)
    encoded = image_bytes(files)
    if encoded is None:
        reason = MISSING_IMAGE
    elif "txt" not in files:
        reason = MISSING_CAPTION
    else:
        try:
            caption = files["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            reason = BAD_CAPTION
    if not reason:
        try:
            image = vae_input(encoded, size)
        except Exception:  # noqa: BLE001 - any decoder failure is a dropped row, not a crash
            reason = DECODE_ERROR
    return {schema.KEY: key, schema.CAPTION: caption, IMAGE: image, DROP_REASON: reason}


def _stack(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    batch = {name: np.array([r[name] for r in rows], dtype=object)
             for name in (schema.KEY, schema.CAPTION, DROP_REASON)}
    batch[IMAGE] = np.stack([r[IMAGE] for r in rows])  # (B, 3, S, S)
    for name, dtype in ((SHARD, np.int32), (ORDINAL, np.int64), (LAST, bool)):
        batch[name] = np.array([r[name] for r in rows], dtype=dtype)
    return batch


def read_and_decode(batch: dict[str, np.ndarray], input_dir: str, image_size: int,
                    chunk: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data generator UDF: rows (shard index, tar name) -> decoded sample batches of <= chunk rows."""
    for shard, name in zip(batch["shard"], batch["name"]):
        rows = []
        try:
            with storage.open_input(storage.join(input_dir, name)) as stream:
                for ordinal, ((key, files), last) in enumerate(_with_last_flag(
                        (sample[KEY_FIELD], sample) for sample in iter_tar_samples(stream))):
                    row = sample_row(key, files, image_size)
                    rows.append({**row, SHARD: shard, ORDINAL: ordinal, LAST: last})
                    if len(rows) == chunk:
                        yield _stack(rows)
                        rows = []
        except (tarfile.TarError, OSError) as err:
            raise RuntimeError(f"input shard {name} is unreadable: {err}") from err
        if rows:
            yield _stack(rows)
