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

import logging
import sys

from pipelines.core.config import ConfigError, parse_job_args
from pipelines.core.runtime import setup_logging
from pipelines.train.checkpoint import CheckpointError
from pipelines.train.config import TrainConfig
from pipelines.train.driver import TrainingError, run_training

log = logging.getLogger("latentforge.train")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    cfg, _ = parse_job_args(TrainConfig, __doc__, argv)
    try:
        result = run_training(cfg)
    except ConfigError as err:
        log.error("config error: %s", err)
        return 2
    except (CheckpointError, TrainingError) as err:
        log.error("%s", err)
        return 1
    log.info("done: %d steps, final loss %s, model exported to %s; run report %s/train_report.json; "
             "MLflow run %s", result.steps, result.final_loss, result.export_dir, result.run_dir,
             result.mlflow_run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
