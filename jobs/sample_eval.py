"""Evaluate a trained model by the images it draws: batch sampling on a Ray Data actor pool, then metrics.

Draws one image per prompt x seed x guidance scale with the model's own recommended sampling settings (sampler,
steps, guidance scale, guidance rescale: written at export from the training config's samples.sampler; any
sampling.* setting given here overrides its one value), writes OUT_DIR/images/NNNNN.png,
OUT_DIR/results.jsonl (prompt, seed, guidance, sampler, steps, image, scores), OUT_DIR/grids/ (one grid per
guidance scale) and OUT_DIR/metrics.json, and logs them to an MLflow run nested under the training run.
Metrics: synthetic-caption accuracy (a pixel checker reads colour, shape, size and position back; seen and
held-out combinations apart), CLIP score and FID when their weights are given on disk (else "not computed").

examples:
  python jobs/sample_eval.py --model runs/tiny-cpu/export --prompts prompts.txt --out eval/tiny
  python jobs/sample_eval.py --model models:/tiny-cpu/1 --prompts prompts.parquet --out eval/sweep \\
      --set sampling.guidance_scales=[1.0,3.0,7.5] --set sampling.steps=30 --set sampling.sampler=ddim
  ray job submit --working-dir . -- python jobs/sample_eval.py --model /shared/runs/sd2-base-512/export \\
      --prompts /shared/prompts.txt --out /shared/eval --set compute.actors=8 --set compute.num_gpus_per_actor=1 \\
      --set metrics.clip_weights=/models/open_clip_vit_h14.bin --set metrics.fid_reference=/shared/coco-5k \\
      --set metrics.fid_weights=/models/pt_inception-2015-12-05.pth
"""

from __future__ import annotations

import sys

from pipelines.core.job import run_job
from pipelines.eval.driver import STAGE


def main(argv: list[str] | None = None) -> int:
    return run_job(STAGE, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
