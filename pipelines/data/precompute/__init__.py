"""Precompute stage: filtered WebDataset shards -> Parquet feature shards + manifest.json.

One streaming Ray Data pipeline runs over every input shard that has no finished output yet:

    from_items(pending shards, one block each)                               driver.py
      -> map_batches(read_and_decode)   rows.py: tasks, fractional CPU: tar -> rows
                                        (key, caption, image (3,S,S) in [-1,1])
      -> map_batches(EncoderActor)      encode.py: ActorPoolStrategy(size=n), num_gpus per actor:
                                        VAE moments + text states
      -> driver: ShardAssembler         output.py: buffers rows per input shard, commits a shard
                                        once all its rows arrived

config.py holds the settings.

Why this shape:
- One output shard per input shard (part-NNNNN from the sorted tar list) gives deterministic names,
  and each output shard has exactly one writer (the driver), so "write a temporary name, then rename"
  commits it atomically. A rerun skips shards made from the same input bytes (the sha256 the filter
  recorded for each tar, kept in the shard's footer), redoes those whose input changed, removes those
  whose input is gone; nothing is ever appended.
- One pipeline for all shards (not one per shard) keeps the encoder actors alive: loading the models
  dominates small runs.
- Completeness without counting tars first: the reader numbers each tar's samples (ordinal) and flags the
  last one, so a shard is complete when ordinals 0..last have all arrived, in whatever order Ray delivers
  them. Rows that fail (undecodable image, non-finite latents) travel on with a drop reason rather than
  being filtered out, so they count towards completeness and into the report.
- The driver writes the Parquet files: features are small next to images (~220 KB a row at 512 px with
  SD's VAE and ViT-H), and a single writer keeps commits simple. Its memory holds the shards in flight,
  about (compute.read_concurrency + 1) x one shard's features.
- Shards describe themselves: each Parquet footer carries the encoder ids, shapes, source tar and row
  counts (schema.SHARD_PROVENANCE_KEY). A rerun checks them against the config (a mismatch is an error:
  features of two encoders never mix), and the manifest and report are rebuilt from the footers of all
  finished shards, so a run killed with SIGKILL and rerun ends with exactly an uninterrupted run's rows.
- The encoder ids, shapes and the empty-caption embedding come from a one-off Ray task with the actors'
  resources and dtype (a GPU on a cluster), not from the driver, which may be a small head node. It
  loads its models while the actors load theirs; the output is checked against it (and the empty
  caption stored, a killed run's temporary files removed) when the first encoded batch arrives,
  before anything is committed.
"""
