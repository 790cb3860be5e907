"""Training checkpoints: DeepSpeed state + per-rank trainer state, complete or refused.

Layout of one checkpoint directory (each rank writes its part into its own temporary directory and
reports it to Ray Train, which merges the ranks' files into one folder on the run's storage):

    meta.json                          rank 0: step, world size, config + fingerprint, MLflow run id
    deepspeed/<tag>/...                DeepSpeed's files (model states from rank 0, one ZeRO shard per rank)
    rank_00000/trainer_state.pt        EMA (this rank's shard of it), loader position,
                                       non-finite guard, RNG states, step
    rank_00000/complete.json           written LAST by each rank: every file that rank wrote, with its size

Another world size (the spot-instance case, 4 workers become 2): the driver converts the checkpoint's
DeepSpeed state once into DeepSpeed's universal format (`deepspeed/<tag>_universal`: each parameter's fp32
master and Adam moments whole, independent of the partitioning) with `prepare_universal`, and every new
rank loads its own partition of it; the EMA is put together from every old rank's fragments and cut again,
and the loader shares the rest of the epoch among the new ranks (pipelines/data/loader.py). Weights,
optimizer states, EMA and step are restored exactly; the order of the rest of that epoch differs from an
uninterrupted run's.

A checkpoint is usable only when meta.json and every rank's complete.json exist and every listed file
is there with its size. Anything else (a partial upload, a truncated file, a rank missing) is a
CheckpointError that says what is missing: never a silent fresh start. DeepSpeed's own load returns
(None, None) quietly when its files are missing, so that is checked too.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.core import storage
from pipelines.core.config import ConfigError, config_differences

META_FILE = "meta.json"
DEEPSPEED_DIR = "deepspeed"
TRAINER_STATE_FILE = "trainer_state.pt"
COMPLETE_FILE = "complete.json"


class CheckpointError(ConfigError):
    pass


def rank_dir(rank: int) -> str:
    return f"rank_{rank:05d}"


def deepspeed_tag(step: int) -> str:
    return f"step_{step:09d}"


# ---------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every global RNG a training step might touch (the step's own draws use a per-step generator)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------- saving


def save(local_dir: str | os.PathLike, engine: Any, rank: int, step: int, trainer_state: dict[str, Any],
         meta: dict[str, Any] | None) -> None:
    """Write this rank's part of the checkpoint of `step` into local_dir (collective: every rank calls it).

    meta: rank 0 passes the run's metadata (config, fingerprint, world size); other ranks pass None.
    """
    root = Path(local_dir)
    engine.save_checkpoint(str(root / DEEPSPEED_DIR), tag=deepspeed_tag(step), save_latest=False)
    own = root / rank_dir(rank)
    own.mkdir(parents=True, exist_ok=True)
    torch.save({**trainer_state, "step": step}, own / TRAINER_STATE_FILE)
    if meta is not None:
        (root / META_FILE).write_text(json.dumps({**meta, "step": step, "tag": deepspeed_tag(step)}, indent=1))
    files = {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    (own / COMPLETE_FILE).write_text(json.dumps({"step": step, "files": files}, indent=1))


# ---------------------------------------------------------------------------------------- checking


def read_meta(checkpoint_dir: str) -> dict[str, Any]:
    path = storage.join(checkpoint_dir, META_FILE)
    if not storage.is_file(path):
        raise CheckpointError(f"checkpoint {checkpoint_dir} is incomplete: {META_FILE} is missing (a partial "
                              "copy or an interrupted save); delete the folder to fall back to the previous "
                              "checkpoint, or point checkpoint.resume_from at a complete one")
    return storage.read_json(path)


def verify(checkpoint_dir: str, current_fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Check that a checkpoint is complete (every rank that wrote it) and belongs to this config; returns
    its meta."""
    meta = read_meta(checkpoint_dir)
    changed = config_differences(meta.get("fingerprint", {}), current_fingerprint)
    if changed:
        raise CheckpointError(f"checkpoint {checkpoint_dir} comes from another config; resuming would not continue "
                              "the same run. Differences:\n  " + "\n  ".join(changed) +
                              "\nUse the original config, or a new run_name to start a new run")
    for rank in range(int(meta["world_size"])):
        _verify_rank(checkpoint_dir, rank, meta["step"])
    return meta


def resharded(meta: dict[str, Any], world_size: int) -> bool:
    """Does a run on `world_size` workers load this checkpoint through the universal format?"""
    return int(meta["world_size"]) != world_size


def universal_tag(meta: dict[str, Any]) -> str:
    return f"{meta['tag']}_universal"


def prepare_universal(checkpoint_dir: str) -> str:
    """The checkpoint's DeepSpeed state in the universal format, next to it (made once; a later call finds
    it): deepspeed/<tag>_universal. Runs on the driver, before the workers start. Returns its location."""
    meta = read_meta(checkpoint_dir)
    target = storage.join(checkpoint_dir, DEEPSPEED_DIR, universal_tag(meta))
    done = storage.join(target, COMPLETE_FILE)
    if storage.is_file(done):
        return target
    import argparse
    import tempfile

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    source = storage.join(checkpoint_dir, DEEPSPEED_DIR, meta["tag"])
    with storage.local_dir(source) as local_source, tempfile.TemporaryDirectory(prefix="universal-") as tmp:
        out = Path(tmp) / universal_tag(meta)
        # inject_missing_state: the step's universal-format info, which a model without tensor or pipeline
        # parallelism (ours) does not record when it saves
        ds_to_universal(argparse.Namespace(input_folder=local_source, output_folder=str(out), num_extract_workers=1,
                                           num_merge_workers=1, keep_temp_folder=False, strict=True,
                                           inject_missing_state=True))
        files = sorted(p for p in out.rglob("*") if p.is_file())
        for path in files:
            storage.write_bytes(storage.join(target, path.relative_to(out).as_posix()), path.read_bytes())
        storage.write_json(done, {"tag": universal_tag(meta), "files": len(files), "from_world_size": meta["world_size"]})
    return target


def _verify_rank(checkpoint_dir: str, rank: int, step: int) -> None:
    listing_path = storage.join(checkpoint_dir, rank_dir(rank), COMPLETE_FILE)
    if not storage.is_file(listing_path):
        raise CheckpointError(f"checkpoint {checkpoint_dir} is incomplete: rank {rank} never finished writing "
                              f"({rank_dir(rank)}/{COMPLETE_FILE} is missing)")
    listing = storage.read_json(listing_path)
    if listing.get("step") != step:
        raise CheckpointError(f"checkpoint {checkpoint_dir}: rank {rank} wrote step {listing.get('step')}, "
                              f"{META_FILE} says {step}")
    present = {name: info.size for name, info in _walk(checkpoint_dir).items()}
    problems = [f"{name} missing" if name not in present else f"{name} has {present[name]} bytes, expected {size}"
                for name, size in listing["files"].items() if present.get(name) != size]
    if problems:
        raise CheckpointError(f"checkpoint {checkpoint_dir} is damaged (rank {rank}'s files): "
                              + "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else ""))


def _walk(root: str) -> dict[str, Any]:
    import pyarrow.fs as pafs

    fs, base = storage.resolve(root)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return {info.path[len(base):].lstrip("/"): info for info in infos if info.type == pafs.FileType.File}


# ---------------------------------------------------------------------------------------- loading


def load(checkpoint_dir: str, engine: Any, rank: int, world_size: int) -> dict[str, Any]:
    """Load DeepSpeed state into the engine and return the trainer state (call verify first).
    checkpoint_dir may be a local path or a URI (see pipelines/core/storage.py).

    Same world size: this rank's own trainer state. Another one (the engine was built with DeepSpeed's
    `checkpoint.load_universal`, and the driver ran prepare_universal): rank 0's trainer state, with
    "ema_shards" (every old rank's EMA state) instead of "ema", and the RNG state of old rank
    rank % old world size."""
    meta = read_meta(checkpoint_dir)
    tag = universal_tag(meta) if resharded(meta, world_size) else meta["tag"]
    tag_dir = storage.join(checkpoint_dir, DEEPSPEED_DIR, tag)
    if not storage.is_dir(tag_dir):
        raise CheckpointError(f"DeepSpeed found no state under {tag_dir}")
    # DeepSpeed opens local paths only: a checkpoint at a URI (checkpoint.resume_from=s3://...) has its
    # deepspeed/<tag> folder fetched to a temporary local copy first (every rank's shard: ZeRO-1/2 read them all).
    with storage.local_dir(tag_dir) as local_tag_dir:
        path, _ = engine.load_checkpoint(os.path.dirname(local_tag_dir), tag=tag,
                                         load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed found no state under {checkpoint_dir}/{DEEPSPEED_DIR}/{tag}")
    if not resharded(meta, world_size):
        return _torch_load(storage.join(checkpoint_dir, rank_dir(rank), TRAINER_STATE_FILE))
    saved = [_torch_load(storage.join(checkpoint_dir, rank_dir(r), TRAINER_STATE_FILE))
             for r in range(int(meta["world_size"]))]
    state = dict(saved[0])
    state["rng"] = saved[rank % len(saved)]["rng"]
    state["ema_shards"] = [s.pop("ema") for s in saved]
    state.pop("ema", None)
    return state


def pretrained_weights(location: str) -> dict[str, torch.Tensor]:
    """The weights of a UNet.save_pretrained folder at a local path or URI (model.init_from); a URI is
    fetched to a temporary local copy, removed once the weights are in memory."""
    from model.unet import UNet

    with storage.local_dir(location) as local:
        return UNet.from_pretrained(local).state_dict()


def _torch_load(location: str) -> dict[str, Any]:
    import io

    # weights_only=False: the state holds numpy/python RNG tuples; the file is our own checkpoint.
    return torch.load(io.BytesIO(storage.read_bytes(location)), map_location="cpu", weights_only=False)


def latest_checkpoint(run_dir: str) -> str | None:
    """The checkpoint Ray Train will hand back on resume (its latest registered one), or None."""
    from ray.train import Result

    if not storage.is_file(storage.join(run_dir, "checkpoint_manager_snapshot.json")):
        return None
    checkpoint = Result.from_path(run_dir).checkpoint
    return None if checkpoint is None else _uri_of(checkpoint)


def _uri_of(checkpoint: Any) -> str:
    fs = checkpoint.filesystem
    if fs is None or fs.type_name == "local":
        return checkpoint.path
    return f"{fs.type_name}://{checkpoint.path}"
