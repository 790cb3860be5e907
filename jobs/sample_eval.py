"""Evaluate a trained model by the images it draws: batch sampling on a Ray Data actor pool, then metrics.

Draws one image per prompt x seed x guidance scale (DPM-Solver++ by default), writes OUT_DIR/images/NNNNN.png,
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

import argparse
import logging
import sys

from pipelines.core.config import ConfigError, parse_job_args
from pipelines.core.runtime import init_ray, setup_logging
from pipelines.eval.driver import EvalConfig, check_inputs, run_evaluation

log = logging.getLogger("latentforge.eval")


def _paths(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="exported model directory, or runs:/<id>/model or models:/<name>/<version>")
    parser.add_argument("--prompts", help="prompt file: .txt (one a line), or .parquet/.jsonl with prompt[, seed]")
    parser.add_argument("--out", help="output directory")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    shortcuts = argparse.ArgumentParser(add_help=False)
    _paths(shortcuts)
    known, _ = shortcuts.parse_known_args(argv)
    # --model/--prompts/--out are shorthands for --set model=... (given last, so they win)
    extra = [f"{k}={v}" for k, v in vars(known).items() if v is not None]
    cfg, _ = parse_job_args(EvalConfig, __doc__, (argv if argv is not None else sys.argv[1:]) +
                            [a for kv in extra for a in ("--set", kv)], extra=_paths)
    try:
        cfg.validate()
        check_inputs(cfg)
    except (ValueError, FileNotFoundError) as err:
        log.error("bad input: %s", err)
        return 2
    init_ray()
    try:
        metrics = run_evaluation(cfg)
    except (FileNotFoundError, ValueError, ConfigError) as err:
        log.error("%s", err)
        return 1
    for key, value in metrics["synthetic_accuracy"].items():
        log.info("%s: %s", key, value.get("summary", value))
    log.info("wrote %d images, results.jsonl, grids and metrics.json to %s", metrics["images"], cfg.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
