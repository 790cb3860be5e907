"""What a refused run must leave as it was: a folder tree to the byte and the mtime, and an MLflow store's runs.

    before = tree_snapshot(out)
    assert run_stage(STAGE, cfg) == 2
    assert tree_snapshot(out) == before  # nothing written, rewritten, touched, added or removed

A refusal that rewrote a file with the same bytes still shows (its mtime); one that made and removed a temporary
file shows in its folder's mtime; an empty folder it made shows as an entry.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

DIR = "<dir>"  # the hash of a folder's entry: folders have no bytes, only their mtime and what they hold


def tree_snapshot(root: str | Path) -> dict[str, tuple[int, int, str]]:
    """{path relative to root ("." for root itself): (size, mtime_ns, sha256)} of every file and folder under
    root, links not followed; {} when root does not exist."""
    root = Path(root)
    if not root.exists():
        return {}
    snap = {}
    for path in [root, *sorted(root.rglob("*"))]:
        stat = path.lstat()
        digest = DIR if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        snap[str(path.relative_to(root))] = (stat.st_size if digest != DIR else 0, stat.st_mtime_ns, digest)
    return snap


def mlflow_run_ids(tracking_uri: str) -> set[str]:
    """Every run in the store, in any experiment and lifecycle stage; a sqlite store whose file does not exist
    holds none (and is not created by looking)."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        return set()
    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return {run.info.run_id for run in client.search_runs(experiments, run_view_type=ViewType.ALL)} if experiments \
        else set()
