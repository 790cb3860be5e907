"""Precompute features: filtered WebDataset shards -> Parquet feature shards + manifest.json.

Decodes every image and crops it to its aspect-ratio bucket (about image_size^2 pixels, the bucket nearest its
aspect; buckets.max_ratio=1: the square alone), encodes it with the frozen VAE (posterior mean and
log-variance; with flip=true also of the image flipped left-right) and its caption with the text encoder
(per-token states and length), on a Ray Data actor pool. Finished shards are skipped on a rerun; a rerun
with other encoders (or buckets) than the existing output is an error. Writes precompute_report.json next
to the features; exits 1 when no row survived.

examples:
  python jobs/precompute_latents.py --set input_dir=data/filtered --set output_dir=data/features
  python jobs/precompute_latents.py --set input_dir=... --set output_dir=... \\
      --set vae.source=/models/sd-vae --set text.model=ViT-H-14 --set text.weights=/models/clip.bin \\
      --set image_size=256 --set compute.num_gpus_per_actor=1 --set compute.actors=4
  ray job submit --working-dir . -- python jobs/precompute_latents.py --config configs/tiny/precompute.yaml
"""

from __future__ import annotations

import sys

from pipelines.core.job import run_job
from pipelines.data.precompute.driver import STAGE


def main(argv: list[str] | None = None) -> int:
    return run_job(STAGE, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
