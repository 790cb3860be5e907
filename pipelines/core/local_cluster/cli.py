"""The command line, `python -m pipelines.core.local_cluster up|status|down`: start a local cluster and leave
it running (its state and env.sh in --dir), show whether each part is still up, stop it and remove the dir."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

from pipelines.core.config import ConfigError
from pipelines.core.local_cluster.cluster import ENV_FILE, STATE_FILE, LocalCluster, stop_recorded
from pipelines.core.local_cluster.processes import _process_tree, _processes_using


def main(argv: list[str] | None = None) -> int:
    """`up` / `status` / `down`; exit status 2 and one line on a bad request (no cluster, one already up)."""
    args = _parser().parse_args(argv)
    try:
        return {"up": _up, "status": _status, "down": _down}[args.command](args)
    except ConfigError as err:
        print(f"local_cluster {args.command}: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.core.local_cluster",
        description="A local cluster on 127.0.0.1 (S3 object store, MLflow tracking server, Ray head and worker "
                    "nodes) to try the cluster path on one machine; see docs/cluster.md.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{up,status,down}")
    for name, help_text in (("up", "start a cluster and leave it running; prints `source DIR/env.sh`"),
                            ("status", "show whether each part of the cluster in DIR is up (exit 1: a part is down)"),
                            ("down", "stop the cluster in DIR and remove DIR")):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--dir", default=".cluster",
                             help="the cluster's directory: state, logs, env.sh (default: .cluster)")
        if name == "up":
            command.add_argument("--workers", type=int, default=2, help="Ray worker nodes, 1 CPU each (default: 2)")
    return parser


def _up(args: argparse.Namespace) -> int:
    if os.path.exists(os.path.join(args.dir, STATE_FILE)):
        raise ConfigError(f"a cluster is already up in {args.dir}: see `status --dir {args.dir}`, "
                          f"or stop it with `down --dir {args.dir}`")
    cluster = LocalCluster(args.dir, workers=args.workers)
    try:
        cluster.start()
    except ConfigError:
        cluster.stop()
        raise
    except Exception as err:  # noqa: BLE001 - one line, and the logs kept for whoever looks into it
        cluster.stop(remove_dir=False)
        print(f"local_cluster up: could not start the cluster: {' '.join(str(err).split())}; logs in {args.dir} "
              "(remove it before trying again)", file=sys.stderr)
        return 1
    except BaseException:
        cluster.stop()
        raise
    state = cluster.state()
    ray, workers = state["ray"], [n for n in state["ray"]["nodes"] if n != "head"]
    for name, address, note in (
            ("object store", state["object_store"]["endpoint"], f"bucket s3://{cluster.bucket}"),
            ("tracking", state["tracking_server"]["uri"], f"artifacts in {state['tracking_server']['artifacts']}"),
            ("ray", ray["address"], f"head + {len(workers)} worker node{'s' * (len(workers) != 1)} (resources "
                                    f"{', '.join(ray['nodes'][w]['resource'] for w in workers)})"),
            ("job server", ray["dashboard_url"], "ray job submit, dashboard"),
            ("state", os.path.join(args.dir, STATE_FILE),
             f"stop: python -m pipelines.core.local_cluster down --dir {args.dir}")):
        print(f"{name:<13} {address:<26} {note}")
    print(f"source {os.path.join(args.dir, ENV_FILE)}")
    return 0


def _status(args: argparse.Namespace) -> int:
    state = _read_state(args.dir)
    rows = [("object store", state["object_store"]["endpoint"], _server_up(state["object_store"])),
            ("tracking", state["tracking_server"]["uri"], _server_up(state["tracking_server"]))]
    for name, node in state["ray"]["nodes"].items():
        where = state["ray"]["address"] if name == "head" else node["resource"]
        rows.append((f"ray {name}", where, any(p.name() == "raylet" for p in _processes_using(node["dir"]))))
    for name, where, up in rows:
        print(f"{name:<13} {where:<26} {'up' if up else 'DOWN'}")
    return 0 if all(up for *_, up in rows) else 1


def _down(args: argparse.Namespace) -> int:
    stop_recorded(_read_state(args.dir))
    shutil.rmtree(args.dir, ignore_errors=True)
    print(f"stopped the cluster in {args.dir} and removed it")
    return 0


def _read_state(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"no cluster in {directory} ({STATE_FILE} not found): start one with `up --dir {directory}`")
    return json.loads(Path(path).read_text())


def _server_up(record: Mapping[str, Any]) -> bool:
    return bool(record.get("pid")) and bool(_process_tree(record["pid"], record["started"]))
