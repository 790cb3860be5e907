"""Train a VAE (diffusers AutoencoderKL) on filtered WebDataset shards, with Ray Train (DDP).

From scratch (vae.source=tiny: the seeded tiny preset, 32 px -> 4x8x8 latents) or fine-tuning a
local diffusers directory (vae.source=/models/sd-vae). Loss: L1 or L2 reconstruction + kl_weight * KL.
Rank 0 logs loss/recon/kl/lr/images-per-second and reconstruction grids (originals above
reconstructions) to MLflow, checkpoints every train.checkpoint_every steps (a rerun with the same
run_name resumes), and at the end measures the latent scaling factor (1 / std of posterior samples
of scaling_factor_images images) and exports OUTPUT_DIR: config.json (with that scaling_factor),
weights and train_vae_report.json. The precompute stage loads it with --set vae.source=OUTPUT_DIR.

Exit status: 0 done, 1 training failed (the message names the worker error), 2 bad config or input.

examples:
  python jobs/train_vae.py --config configs/tiny/train_vae.yaml --set input_dir=data/filtered \\
      --set output_dir=data/vae
  python jobs/train_vae.py --config configs/tiny/train_vae.yaml --set train.steps=2000 \\
      --set scaling.num_workers=4 --set scaling.use_gpu=true --set image_size=256
  ray job submit --working-dir . -- python jobs/train_vae.py --config configs/tiny/train_vae.yaml \\
      --set input_dir=/shared/filtered --set output_dir=/shared/vae --set storage_path=/shared/ray_results
"""

from __future__ import annotations

import sys

from pipelines.core.job import run_job
from pipelines.vae.driver import STAGE


def main(argv: list[str] | None = None) -> int:
    return run_job(STAGE, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
