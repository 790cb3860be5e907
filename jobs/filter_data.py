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

import logging
import sys

from pipelines.core.config import ConfigError, parse_job_args
from pipelines.core.runtime import StageReport, finish, init_ray, setup_logging
from pipelines.data.filter import FilterConfig, check_inputs, report_path, run_filter

log = logging.getLogger("latentforge")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    cfg, _ = parse_job_args(FilterConfig, __doc__, argv)
    try:
        check_inputs(cfg)  # before Ray starts: a typo in a path should not cost a cluster start
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    init_ray()
    try:
        report = run_filter(cfg)
    except Exception as err:  # the report must say why, then the traceback helps whoever debugs
        log.exception("filter stage crashed")
        report = StageReport("filter")
        report.fail(f"{type(err).__name__}: {err}")
    return finish(report, report_path(cfg))


if __name__ == "__main__":
    sys.exit(main())
