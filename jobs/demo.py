"""The whole pipeline on this machine, offline, in one command (what `make demo` runs).

Starts a local Ray head and the synthetic image server, then runs every stage through the same jobs users
run: download -> filter -> train_vae -> precompute -> train_unet (2 CPU workers, ZeRO-2) -> export_diffusers
(the model as a diffusers StableDiffusionPipeline folder) -> sample_eval on held-out and seen prompts. Prints
where everything went and writes <out_dir>/summary.json (stage reports, final loss, accuracy, the exported model
directory and its diffusers copy, the sample grid). Stops what it started.
Exit status: 0 done, 1 a stage failed (the log names it and its log file), 2 bad config.

examples:
  python jobs/demo.py
  python jobs/demo.py --set out_dir=/tmp/demo --set unet_steps=3000
"""

from __future__ import annotations

import logging
import sys

from pipelines.core.config import parse_job_args
from pipelines.core.runtime import setup_logging
from pipelines.demo import DemoConfig, StageFailed, run_demo

log = logging.getLogger("latentforge.demo")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    cfg, _ = parse_job_args(DemoConfig, __doc__, argv)
    try:
        run_demo(cfg)
    except StageFailed as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
