"""Download image-caption pairs from a URL list into WebDataset shards (img2dataset on Ray).

Reads a URL list (parquet/csv/tsv/jsonl with a url and a caption column), downloads, resizes (short
side to image_size, aspect kept: resize_mode=keep_ratio) and writes <output_dir>/NNNNN.tar (.jpg .txt .json per sample),
NNNNN.parquet (every row with its status) and NNNNN_stats.json, then the report
<output_dir>/download_report.json (rows in/out, failures per reason, rows/s).
A rerun skips finished shards and redoes unfinished ones (resume after a crash or interruption).

examples:
  python jobs/download_data.py --set url_list=urls.parquet --set output_dir=data/raw
  python jobs/download_data.py --config my.yaml --set processes=8 --set threads=64
  ray job submit --working-dir . -- python jobs/download_data.py \\
      --set url_list=/shared/urls.parquet --set output_dir=/shared/raw

On a cluster output_dir must be on storage every node sees. Without RAY_ADDRESS the job starts an
embedded local Ray. Exit status: 0 done, 1 stage failed (e.g. success rate under
min_success_rate; see the report), 2 bad config or input.
"""

from __future__ import annotations

import sys

from pipelines.core.job import run_job
from pipelines.data.download import STAGE


def main(argv: list[str] | None = None) -> int:
    return run_job(STAGE, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
