"""Feature shards of the synthetic shapes data set, encoded in process: for tests and benchmarks.

    manifest = write_synthetic_features("/tmp/features", rows=64, shards=2)

The same encoders, table layout, empty caption and manifest as jobs/precompute_latents.py (its
functions are called, not copied), without Ray and without the download/filter stages: training
tests and bench/train_throughput.py get real features of real images in a second or two.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pyarrow.parquet as pq

from pipelines.core import storage
from pipelines.core.config import to_dict
from pipelines.data import schema
from pipelines.data.precompute.config import BucketSettings, PrecomputeConfig
from pipelines.data.precompute.encode import encode_batch, load_encoders, probe_encoders
from pipelines.data.precompute.output import build_manifest, write_empty_caption
from pipelines.synthetic.shapes import caption_for, render, training_attributes


def write_synthetic_features(output_dir: str, rows: int, shards: int = 1, seed: int = 0,
                             cfg: PrecomputeConfig | None = None, image_size: int | None = None) -> schema.Manifest:
    """`rows` training-combination images (canonical captions) split over `shards` feature shards,
    rendered at `image_size` (default: the config's)."""
    cfg = cfg or PrecomputeConfig(input_dir="synthetic", output_dir=str(output_dir))
    if image_size is not None:
        cfg = dataclasses.replace(cfg, image_size=image_size)
    # the shapes are drawn square and their captions say left and right: one square bucket, no flip
    cfg = dataclasses.replace(cfg, buckets=BucketSettings(max_ratio=1.0), flip=False)
    storage.makedirs(output_dir)
    info = probe_encoders(to_dict(cfg))
    vae, text = load_encoders(cfg)
    attributes = random.Random(seed).choices(training_attributes(), k=rows)
    finished = {}
    for index, part in enumerate(np.array_split(np.arange(rows), shards)):
        attrs = [attributes[i] for i in part]
        images = np.stack([np.asarray(render(a, cfg.image_size)) for a in attrs])  # (B, S, S, 3) uint8
        pixels = images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0  # (B, 3, S, S) in [-1, 1]
        captions = [caption_for(a) for a in attrs]
        features = encode_batch(vae, text, pixels, captions)
        keys = [f"{index:05d}{i:04d}" for i in range(len(attrs))]
        table = schema.to_table(info.feature_shapes(cfg), keys, captions, features[schema.LATENT_MEAN],
                                features[schema.LATENT_LOGVAR], features[schema.TEXT_STATES],
                                features[schema.TEXT_LENGTH])
        pq.write_table(table, storage.join(output_dir, schema.shard_name(index)), **schema.PARQUET_WRITE_OPTIONS)
        finished[index] = {"rows": len(attrs), "bucket_rows": [len(attrs)], "rows_in": len(attrs),
                           "source": "synthetic", "dropped": {}}
    write_empty_caption(str(output_dir), info)
    manifest = build_manifest(cfg, info, finished)
    manifest.save(output_dir)
    return manifest
