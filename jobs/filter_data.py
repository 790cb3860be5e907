"""Filter raw image-caption shards (the download stage's output) into clean WebDataset shards.

Drops, and counts in OUTPUT/filter_report.json: missing or undecodable images, images under
image.min_side or over image.max_aspect, captions missing / not UTF-8 / empty / too short / too
long, optional CLIP image-text similarity under clip.min_similarity, duplicate keys, exact
duplicates (same decoded pixels) and, with dedup.near=true, near duplicates (dHash + colour).
Duplicates keep the sample with the smallest key. Input tars without NNNNN_stats.json are
unfinished: skipped and listed in the report.

A rerun with the same inputs and settings is a no-op; anything else (or force=true) overwrites
the output folder cleanly. Exit status: 0 ok, 1 stage failed (e.g. no rows left), 2 bad config.

examples:
  python jobs/filter_data.py --set input_dir=/data/raw --set output_dir=/data/filtered
  python jobs/filter_data.py --config configs/X.yaml --set dedup.near=true \\
      --set clip.enabled=true --set clip.model=ViT-B-32 --set clip.weights=/models/clip.bin
  ray job submit --working-dir . -- python jobs/filter_data.py --set input_dir=/shared/raw ...
"""

from __future__ import annotations

import sys

from pipelines.core.job import run_job
from pipelines.data.filter.driver import STAGE


def main(argv: list[str] | None = None) -> int:
    return run_job(STAGE, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
