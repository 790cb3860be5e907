"""Train the cross-attention U-Net on precomputed features with DeepSpeed ZeRO on Ray Train.

Reads the feature directory of jobs/precompute_latents.py, trains on `scaling.num_workers` workers
(gloo on CPU, NCCL on GPU), checkpoints every checkpoint.every_steps to <storage_path>/<run_name>,
logs to MLflow (params, metrics, sample grids from the EMA weights) and exports the model to
<storage_path>/<run_name>/export (the directory jobs/sample_eval.py takes).

Resume: rerun the same command (same run_name and storage_path): it continues from the run's latest
checkpoint and the same MLflow run. A worker that dies is restarted from the last checkpoint
(max_failures times). A checkpoint from another config, or an incomplete one, is an error.

examples:
  python jobs/train_unet.py --config configs/tiny-cpu.yaml
  python jobs/train_unet.py --config configs/tiny-cpu.yaml --set max_steps=2000 --set deepspeed.zero_stage=3
  ray job submit --working-dir . -- python jobs/train_unet.py --config configs/sd2-base-256.yaml \\
      --set features_dir=s3://bucket/features --set storage_path=s3://bucket/runs
  mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1    # then open http://127.0.0.1:5000
"""

from __future__ import annotations

import sys

from pipelines.core.job import run_job
from pipelines.train.driver import STAGE


def main(argv: list[str] | None = None) -> int:
    return run_job(STAGE, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
