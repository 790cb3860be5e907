"""How many times a launch's worker group started (1, plus one per restart after a lost worker or node), and
where its ranks ran (node and process id: what a fault test kills).

    launch_id = new_launch_id()                                    # the driver, once per `run_training`
    record_start(run_dir, launch_id, rank, node_id, step=12, world_size=2)   # every rank, at each start
    restarts = count_starts(run_dir, launch_id) - 1                # the driver, after fit()

Each rank's start is one small JSON file under <run_dir>/attempts/ (object storage included): Ray Train
restarts the whole group, so every restart leaves one file per rank; rank 0's files count the starts.
"""

from __future__ import annotations

import os
import time
import uuid

from pipelines.core import storage

ATTEMPTS_DIR = "attempts"


def new_launch_id() -> str:
    return uuid.uuid4().hex[:12]


def record_start(run_dir: str, launch_id: str, rank: int, node_id: str, step: int, world_size: int) -> None:
    """Called by the rank itself, so the pid recorded is its worker process's."""
    name = f"{launch_id}-r{rank:05d}-{uuid.uuid4().hex[:8]}.json"
    storage.write_json(storage.join(run_dir, ATTEMPTS_DIR, name),
                       {"launch_id": launch_id, "rank": rank, "node_id": node_id, "started_at": time.time(),
                        "from_step": step, "world_size": world_size, "pid": os.getpid()})


def starts(run_dir: str, launch_id: str | None = None) -> list[dict]:
    """Every rank's start record (of one launch, or all), oldest first."""
    directory = storage.join(run_dir, ATTEMPTS_DIR)
    if not storage.is_dir(directory):
        return []
    records = [storage.read_json(storage.join(directory, name)) for name in storage.list_files(directory, ".json")
               if launch_id is None or name.startswith(f"{launch_id}-")]
    return sorted(records, key=lambda r: r["started_at"])


def count_starts(run_dir: str, launch_id: str) -> int:
    return sum(1 for record in starts(run_dir, launch_id) if record["rank"] == 0)
