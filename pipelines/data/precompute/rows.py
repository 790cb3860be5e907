"""Reading and decoding (CPU tasks): tar samples -> in-flight rows (key, caption, image in [-1, 1] cropped to
its aspect-ratio bucket, the bucket, shard index, ordinal, last flag, drop reason, caption tokens, rows lost).
The in-flight columns (underscored) never reach a Parquet file.

A batch whose rows are all of one bucket carries its images as one (B, 3, H, W) array; one that mixes
buckets carries B arrays of (3, H, W) (an object array; Ray Data stores it as a variable-shaped tensor).

A tar damaged part way (a copy cut short) keeps the samples before the damage and ends with one marker
row (reason unreadable_shard, its caption the error) that stands for the samples lost after it: the
filter's count of the shard's rows minus those read (ROWS_LOST)."""

from __future__ import annotations

import tarfile
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from pipelines.core import storage
from pipelines.core.images import decode_rgb
from pipelines.data import schema
from pipelines.data.buckets import Bucket, fit_to_bucket, nearest_bucket
from pipelines.data.shards import KEY_FIELD, image_bytes, iter_tar_samples

SHARD, ORDINAL, LAST, IMAGE, DROP_REASON = "_shard", "_ordinal", "_last", "_image", "_drop_reason"
CAPTION_TOKENS = "_caption_tokens"  # the caption's tokens before the tokenizer cuts it (-1: not counted)
ROWS_LOST = "_rows_lost"  # on an unreadable_shard marker row: how many rows it stands for; else 0

# Drop reasons, the keys of the report's "dropped" counts.
MISSING_IMAGE, MISSING_CAPTION, BAD_CAPTION = "missing_image", "missing_caption", "caption_not_utf8"
DECODE_ERROR, NON_FINITE_LATENTS, NON_FINITE_TEXT = "decode_error", "non_finite_latents", "non_finite_text"
UNREADABLE_SHARD = "unreadable_shard"  # rows of a damaged tar after the damage


def token_counter(text_model: str) -> Callable[[str], int]:
    """caption -> its tokens, SOT and EOT included, before the tokenizer cuts them to the text encoder's
    context length (more than that: the encoder saw a truncated caption). The text encoder's own tokenizer
    (FrozenTextEncoder.build takes the same); -1 for a tokenizer that cannot count without cutting."""
    import open_clip

    from model.encoders import _open_clip_name

    encode = getattr(open_clip.get_tokenizer(_open_clip_name(text_model)), "encode", None)
    if encode is None:
        return lambda caption: -1
    return lambda caption: len(encode(caption)) + 2


def vae_input(data: bytes, size: int, buckets: Sequence[Bucket] | None = None) -> np.ndarray:
    """Encoded image -> (3, H, W) float32 in [-1, 1]: resized to cover the bucket nearest its aspect ratio among
    `buckets` (None: the square (size, size) alone), then center-cropped to it. Raises on undecodable bytes."""
    buckets = buckets or ((size, size),)
    img = decode_rgb(data, draft_size=max(max(b) for b in buckets))  # JPEG: decode no larger than needed
    pixels = np.asarray(fit_to_bucket(img, nearest_bucket(buckets, *img.size)), dtype=np.float32)  # (H, W, 3)
    return pixels.transpose(2, 0, 1) / 127.5 - 1.0


def sample_row(key: str, files: dict[str, bytes], size: int,
               buckets: Sequence[Bucket] | None = None) -> dict[str, Any]:
    """One tar sample -> key, caption, image (3, H, W) of its bucket, the bucket and a drop reason ("" when the
    row is good; a dropped row's image is the square's zeros)."""
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
            image = vae_input(encoded, size, buckets)
        except Exception:  # noqa: BLE001 - any decoder failure is a dropped row, not a crash
            reason = DECODE_ERROR
    return {schema.KEY: key, schema.CAPTION: caption, IMAGE: image, DROP_REASON: reason,
            schema.BUCKET_HEIGHT: image.shape[1], schema.BUCKET_WIDTH: image.shape[2]}


def ragged(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Per-row arrays -> one (B, ...) array when they all have one shape, else a (B,) object array of them."""
    if len({a.shape for a in arrays}) <= 1 and len(arrays):
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):  # item by item: numpy would broadcast same-shaped arrays into one
        out[i] = a
    return out


def row_arrays(values: np.ndarray) -> np.ndarray:
    """A (B, ...) array, or what ragged made -> a (B,) object array of per-row arrays."""
    if values.dtype == object:
        return values
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def _stack(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    batch = {name: np.array([r[name] for r in rows], dtype=object)
             for name in (schema.KEY, schema.CAPTION, DROP_REASON)}
    batch[IMAGE] = ragged([r[IMAGE] for r in rows])  # (B, 3, H, W), or B arrays (3, H, W) of several buckets
    for name, dtype in ((SHARD, np.int32), (ORDINAL, np.int64), (LAST, bool), (CAPTION_TOKENS, np.int32),
                        (ROWS_LOST, np.int64), (schema.BUCKET_HEIGHT, np.int16), (schema.BUCKET_WIDTH, np.int16)):
        batch[name] = np.array([r[name] for r in rows], dtype=dtype)
    return batch


def _shard_rows(input_dir: str, name: str, expected: int, image_size: int, buckets: Sequence[Bucket],
                count_tokens: Callable[[str], int]) -> Iterator[dict[str, Any]]:
    """One tar's rows in order, without the in-flight shard/ordinal/last columns. Damage ends the tar with
    an unreadable_shard marker; every sample read before it is still yielded."""
    read, error = 0, None
    try:
        with storage.open_input(storage.join(input_dir, name)) as stream:
            for sample in iter_tar_samples(stream):
                row = sample_row(sample[KEY_FIELD], sample, image_size, buckets)
                yield {**row, CAPTION_TOKENS: count_tokens(row[schema.CAPTION]) if not row[DROP_REASON] else -1,
                       ROWS_LOST: 0}
                read += 1
    except (tarfile.TarError, OSError, EOFError) as err:
        error = f"{type(err).__name__}: {err}"
    if error is not None:
        yield {schema.KEY: "", schema.CAPTION: error, IMAGE: np.zeros((3, image_size, image_size), np.float32),
               schema.BUCKET_HEIGHT: image_size, schema.BUCKET_WIDTH: image_size,
               DROP_REASON: UNREADABLE_SHARD, CAPTION_TOKENS: -1, ROWS_LOST: max(expected - read, 0)}


def read_and_decode(batch: dict[str, np.ndarray], input_dir: str, image_size: int, chunk: int,
                    text_model: str, buckets: Sequence[Bucket] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data generator UDF: rows (shard index, tar name, its row count) -> decoded sample batches of
    <= chunk rows, each row numbered (ORDINAL) and the tar's last one flagged (LAST). buckets: (height, width)
    of each aspect-ratio bucket; None: the square (image_size, image_size) alone."""
    count_tokens = token_counter(text_model)
    buckets = [tuple(b) for b in buckets] if buckets is not None else [(image_size, image_size)]
    for shard, name, expected in zip(batch["shard"], batch["name"], batch["rows"]):
        rows, previous = [], None
        for ordinal, row in enumerate(_shard_rows(input_dir, name, int(expected), image_size, buckets, count_tokens)):
            if previous is not None:  # one row of lookahead: the last one gets LAST
                rows.append(previous)
                if len(rows) == chunk:
                    yield _stack(rows)
                    rows = []
            previous = {**row, SHARD: shard, ORDINAL: ordinal, LAST: False}
        if previous is not None:
            rows.append({**previous, LAST: True})
        if rows:
            yield _stack(rows)
