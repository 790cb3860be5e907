"""How many times a launch's worker group started: 1, plus one per restart after a lost worker or node.

    launch_id = new_launch_id()                       # the driver, once per `run_training`
    record_start(run_dir, launch_id, step=12)         # rank 0, each time the training loop starts
    restarts = count_starts(run_dir, launch_id) - 1   # the driver, after fit()

Each start is one small JSON file under <run_dir>/attempts/ (object storage included), written by rank 0
of the worker group that starts: Ray Train restarts the whole group, so every restart leaves a file.
"""

from __future__ import annotations

import time
import uuid

from pipelines.core import storage

ATTEMPTS_DIR = "attempts"


def new_launch_id() -> str:
    return uuid.uuid4().hex[:12]


def record_start(run_dir: str, launch_id: str, step: int, world_size: int) -> None:
    name = f"{launch_id}-{uuid.uuid4().hex[:8]}.json"
    storage.write_json(storage.join(run_dir, ATTEMPTS_DIR, name),
                       {"launch_id": launch_id, "started_at": time.time(), "from_step": step,
                        "world_size": world_size})


def count_starts(run_dir: str, launch_id: str) -> int:
    directory = storage.join(run_dir, ATTEMPTS_DIR)
    if not storage.is_dir(directory):
        return 0
    return sum(1 for name in storage.list_files(directory, suffix=".json") if name.startswith(f"{launch_id}-"))
