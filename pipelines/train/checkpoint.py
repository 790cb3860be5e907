"""Training checkpoints: DeepSpeed state + per-rank trainer state, complete or refused, never unpickled.

Layout of one checkpoint directory, `checkpoint_<step, 9 digits>` in the run's folder (each rank writes its part
into its own temporary directory and reports it to Ray Train, which merges the ranks' files into that folder):

    meta.json                          rank 0: format, step, world size, config + fingerprint, MLflow run id
    deepspeed/<tag>/...                DeepSpeed's files (model states from rank 0, one ZeRO shard per rank)
    rank_00000/trainer_state.json      EMA (this rank's shard of it), loader position, non-finite guard,
    rank_00000/trainer_state.safetensors   RNG states, step: the tensors in safetensors, the rest in JSON
    rank_00000/complete.json           written LAST by each rank: every file that rank wrote, with its size
                                       and sha256

Another world size (the spot-instance case, 4 workers become 2): the driver converts the checkpoint's
DeepSpeed state once into DeepSpeed's universal format (`deepspeed/<tag>_universal`: each parameter's fp32
master and Adam moments whole, independent of the partitioning) with `prepare_universal`, and every new
rank loads its own partition of it; the EMA is put together from every old rank's fragments and cut again,
and the loader shares the rest of the epoch among the new ranks (pipelines/data/loader.py). Weights,
optimizer states, EMA and step are restored exactly; the order of the rest of that epoch differs from an
uninterrupted run's.

A checkpoint is usable only when meta.json and every rank's complete.json exist and every listed file
is there with its size (a worker's check) and its sha256 (the driver's check before launch, `thorough`).
Anything else (a partial upload, a truncated or changed file, a rank missing) is a CheckpointDamaged that
says what is missing: never a silent fresh start. DeepSpeed's own load returns (None, None) quietly when
its files are missing, so that is checked too. A damaged latest checkpoint of a run can be set aside with
`checkpoint.fallback=previous` (fall_back_to_intact): the run continues from its newest intact one.

Nothing in a checkpoint is unpickled with code execution allowed: whoever can write the storage would run
code on every worker. Our own state is safetensors + JSON. DeepSpeed's files are pickles that DeepSpeed 0.19
opens with torch.load(weights_only=False) itself (its checkpoint engine for the model and ZeRO states, but
also direct calls on the universal-checkpoint path and in ds_to_universal, which no checkpoint engine
covers), so every DeepSpeed load runs inside `weights_only_loads()`: torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD
turns each of those calls into a weights_only=True load, which admits tensors, containers and the few
DeepSpeed data classes of DEEPSPEED_SAFE_GLOBALS. The same load is the check (nothing can swap a file
between a check and the load), every path is covered, and nothing is read twice. The driver's thorough
verify also lists every DeepSpeed pickle's globals statically, so a planted file is refused before launch.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pickle
import random
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from pipelines.core import storage
from pipelines.core.config import ConfigError, config_differences

FORMAT = 2  # meta.json "format": 2 = trainer state in safetensors + JSON (1, a pickle, is not loaded)
META_FILE = "meta.json"
DEEPSPEED_DIR = "deepspeed"
TRAINER_STATE_FILE = "trainer_state.json"
TRAINER_TENSORS_FILE = "trainer_state.safetensors"
COMPLETE_FILE = "complete.json"
DAMAGED_DIR = "damaged"  # <run dir>/damaged/<checkpoint>: where checkpoint.fallback=previous sets them aside
# Ray Train's record of a run's checkpoints (Ray 2.60, Train v2): which exist, which is the latest
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
FALLBACK_SETTING = "--set checkpoint.fallback=previous"
_TENSOR = "__tensor__"  # in trainer_state.json: {"__tensor__": key in trainer_state.safetensors}
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_CHUNK = 8 << 20


class CheckpointError(ConfigError):
    pass


class CheckpointDamaged(CheckpointError):
    """Missing, truncated, changed or unsafe files: another checkpoint of the run may be intact.
    setting: the stage's command-line setting that falls back to it."""

    def __init__(self, problem: str, setting: str = FALLBACK_SETTING) -> None:
        self.problem = problem
        super().__init__(f"{problem}. To set it aside and resume from the run's newest intact checkpoint, rerun "
                         f"with {setting}")


def rank_dir(rank: int) -> str:
    return f"rank_{rank:05d}"


def deepspeed_tag(step: int) -> str:
    return f"step_{step:09d}"


def checkpoint_dir_name(step: int) -> str:
    """The folder a step's checkpoint gets in the run's folder (ray.train.report's checkpoint_dir_name): one
    name per step, so an upload that failed is overwritten by the next attempt instead of lingering."""
    return f"checkpoint_{step:09d}"


# ---------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every global RNG a training step might touch (the step's own draws use a per-step generator), as
    tensors and JSON values (numpy's key as base64 of its uint32 bytes)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "key": base64.b64encode(key.astype("<u4").tobytes()).decode(), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.frombuffer(base64.b64decode(n["key"]), dtype="<u4").astype(np.uint32),
                         n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ---------------------------------------------------------------------------------------- trainer state


def _to_json(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """`value` with every tensor replaced by a reference to its copy in `tensors` (key: its path)."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous().clone()  # safetensors refuses shared storage
        return {_TENSOR: path}
    if isinstance(value, dict):
        if _TENSOR in value or not all(isinstance(k, str) for k in value):
            raise TypeError(f"trainer state {path}: keys must be strings other than {_TENSOR!r}")
        return {k: _to_json(v, tensors, f"{path}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"trainer state {path}: {type(value).__name__} is neither a tensor nor a JSON value")


def _from_json(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        return {k: _from_json(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v, tensors) for v in value]
    return value


def _write_trainer_state(directory: Path, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = _to_json(state, tensors, "")
    save_file(tensors, str(directory / TRAINER_TENSORS_FILE))
    (directory / TRAINER_STATE_FILE).write_text(json.dumps(structure))


def _read_trainer_state(checkpoint_dir: str, rank: int) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    files = [storage.join(checkpoint_dir, rank_dir(rank), name) for name in (TRAINER_TENSORS_FILE, TRAINER_STATE_FILE)]
    try:
        tensors = load(storage.read_bytes(files[0]))
    except SafetensorError as err:
        raise CheckpointDamaged(f"checkpoint {checkpoint_dir}: {files[0]} is not a safetensors file ({err}); "
                                "refused") from None
    try:
        structure = json.loads(storage.read_bytes(files[1]))
    except ValueError as err:
        raise CheckpointDamaged(f"checkpoint {checkpoint_dir}: {files[1]} is not JSON ({err})") from None
    return _from_json(structure, tensors)


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
    _write_trainer_state(own, {**trainer_state, "step": step})
    if meta is not None:
        (root / META_FILE).write_text(json.dumps(storage.redact_values(  # no credentials inside URIs
            {**meta, "format": FORMAT, "step": step, "tag": deepspeed_tag(step)}), indent=1))
    (own / COMPLETE_FILE).write_text(json.dumps({"step": step, "files": file_listing(root)}, indent=1))


def file_listing(root: Path) -> dict[str, dict[str, Any]]:
    """Every file under a local folder: {relative path: {"size", "sha256"}} (what complete.json records)."""
    return {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(str(p))}
            for p in sorted(root.rglob("*")) if p.is_file()}


def _sha256(location: str) -> str:
    digest = hashlib.sha256()
    with storage.open_input(location) as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------- checking


def _read_json(path: str, checkpoint_dir: str) -> Any:
    if not storage.is_file(path):
        raise CheckpointDamaged(f"checkpoint {checkpoint_dir} is incomplete: {path} is missing (a partial copy or "
                                "an interrupted save)")
    try:
        return json.loads(storage.read_bytes(path))
    except ValueError as err:
        raise CheckpointDamaged(f"checkpoint {checkpoint_dir} is damaged: {path} is not valid JSON (truncated? "
                                f"{err})") from None


def read_meta(checkpoint_dir: str) -> dict[str, Any]:
    return _read_json(storage.join(checkpoint_dir, META_FILE), checkpoint_dir)


def verify(checkpoint_dir: str, current_fingerprint: dict[str, Any], thorough: bool = False) -> dict[str, Any]:
    """Check that a checkpoint is complete (every rank that wrote it) and belongs to this config; returns
    its meta. thorough (the driver, before launch): also every file's sha256 and the globals of every
    DeepSpeed pickle (reads the whole checkpoint once)."""
    meta = read_meta(checkpoint_dir)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {checkpoint_dir} was written by an older version whose trainer state is "
                              "a pickle, which is not loaded (unpickling runs code); start a new run_name, or "
                              "resume it with the version that wrote it")
    changed = config_differences(meta.get("fingerprint", {}), storage.redact_values(current_fingerprint))  # as saved
    if changed:
        raise CheckpointError(f"checkpoint {checkpoint_dir} comes from another config; resuming would not continue "
                              "the same run. Differences:\n  " + "\n  ".join(changed) +
                              "\nUse the original config, or a new run_name to start a new run")
    present = {name: info.size for name, info in _walk(checkpoint_dir).items()}
    for rank in range(int(meta["world_size"])):
        listing = _verify_rank(checkpoint_dir, rank, meta["step"], present)
        if thorough:
            _verify_contents(checkpoint_dir, listing)
    return meta


def _verify_rank(checkpoint_dir: str, rank: int, step: int, present: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Rank `rank`'s listing ({file: {size, sha256}}), checked against the sizes of the files present."""
    listing = _read_json(storage.join(checkpoint_dir, rank_dir(rank), COMPLETE_FILE), checkpoint_dir)
    if listing.get("step") != step:
        raise CheckpointDamaged(f"checkpoint {checkpoint_dir}: rank {rank} wrote step {listing.get('step')}, "
                                f"{META_FILE} says {step}")
    _verify_sizes(checkpoint_dir, rank, listing["files"], present)
    return listing["files"]


def verify_listing(checkpoint_dir: str, listing_file: str, thorough: bool) -> None:
    """Another stage's checkpoint (the VAE's): the files `listing_file` ({"files": file_listing(...)}) names
    are there with their sizes, and with their sha256 when thorough. CheckpointDamaged otherwise."""
    files = _read_json(storage.join(checkpoint_dir, listing_file), checkpoint_dir)["files"]
    _verify_sizes(checkpoint_dir, None, files, {name: info.size for name, info in _walk(checkpoint_dir).items()})
    if thorough:
        _verify_contents(checkpoint_dir, files)


def _verify_sizes(checkpoint_dir: str, rank: int | None, files: dict[str, dict[str, Any]],
                  present: dict[str, int]) -> None:
    problems = [f"{name} missing" if name not in present else
                f"{name} has {present[name]} bytes, expected {entry['size']}"
                for name, entry in files.items() if present.get(name) != entry["size"]]
    _raise_damaged(checkpoint_dir, rank, problems)


def _verify_contents(checkpoint_dir: str, files: dict[str, dict[str, Any]]) -> None:
    problems = [f"{name} has sha256 {digest[:12]}..., expected {entry['sha256'][:12]}..."
                for name, entry in files.items()
                if (digest := _sha256(storage.join(checkpoint_dir, name))) != entry["sha256"]]
    _raise_damaged(checkpoint_dir, None, problems)
    for name in files:
        if name.startswith(f"{DEEPSPEED_DIR}/") and name.endswith(".pt"):
            _check_pickle(storage.join(checkpoint_dir, name))
        elif name.endswith(f"/{TRAINER_TENSORS_FILE}"):
            _check_safetensors_header(storage.join(checkpoint_dir, name))
        elif name.endswith(f"/{TRAINER_STATE_FILE}"):
            _read_json(storage.join(checkpoint_dir, name), checkpoint_dir)


def _check_safetensors_header(location: str) -> None:
    """A safetensors file starts with its header's length (8 bytes, little endian) and the JSON header."""
    fs, path = storage.resolve(location)
    with fs.open_input_file(path) as stream:
        size = stream.size()
        length = int.from_bytes(stream.read_at(8, 0), "little") if size >= 8 else -1
        try:
            valid = 0 <= length <= size - 8 and isinstance(json.loads(stream.read_at(length, 8)), dict)
        except ValueError:
            valid = False
    if not valid:
        raise CheckpointDamaged(f"{location} is not a safetensors file; refused")


def _raise_damaged(checkpoint_dir: str, rank: int | None, problems: list[str]) -> None:
    if problems:
        whose = f" (rank {rank}'s files)" if rank is not None else ""
        raise CheckpointDamaged(f"checkpoint {checkpoint_dir} is damaged{whose}: " + "; ".join(problems[:5])
                                + ("; ..." if len(problems) > 5 else ""))


def _walk(root: str) -> dict[str, Any]:
    import pyarrow.fs as pafs

    fs, base = storage.resolve(root)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {info.path[len(base):].lstrip("/"): info for info in infos if info.type == pafs.FileType.File}


# ---------------------------------------------------------------------------------------- DeepSpeed's pickles


def deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed 0.19 puts into its checkpoint pickles besides tensors and containers (ZeRO 1-3,
    fp32/bf16, universal format): plain data, admitted to weights_only loads."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside the block every torch.load of this process is weights_only=True, also DeepSpeed's own calls
    that pass weights_only=False (torch's documented override); the DeepSpeed classes of
    deepspeed_safe_globals are admitted. A refused pickle raises pickle.UnpicklingError."""
    saved = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        if saved is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = saved


def _unsafe_globals(location: str) -> list[str]:
    """The globals a torch.save file names that a weights_only load refuses (read statically, nothing runs)."""
    fs, path = storage.resolve(location)
    with fs.open_input_file(path) as stream, torch.serialization.safe_globals(deepspeed_safe_globals()):
        try:
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(stream))
        except (ValueError, RuntimeError, pickle.UnpicklingError) as err:
            return [f"(not a torch.save zip file: {err})"]


def _check_pickle(location: str) -> None:
    unsafe = _unsafe_globals(location)
    if unsafe:
        raise CheckpointDamaged(f"{location} is refused: its pickle names {', '.join(unsafe[:3])}, which a DeepSpeed "
                                f"checkpoint does not hold and loading it could run code (planted or damaged)")


@contextlib.contextmanager
def _refusing_unsafe_pickles(folder: str, checkpoint_dir: str) -> Iterator[None]:
    """weights_only_loads(), with a refused pickle turned into a CheckpointDamaged that names the file (found
    again by a static look at every file of `folder`, a local path)."""
    try:
        with weights_only_loads():
            yield
    except pickle.UnpicklingError as err:
        for path in sorted(Path(folder).rglob("*.pt")):
            if _unsafe_globals(str(path)):
                _check_pickle(str(path))
        first = str(err).strip().splitlines()[0]
        raise CheckpointDamaged(f"checkpoint {checkpoint_dir}: DeepSpeed's state under {folder} holds a pickle that "
                                f"a weights_only load refuses ({first})") from None


# ---------------------------------------------------------------------------------------- universal format


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
    with storage.local_dir(source) as local_source, tempfile.TemporaryDirectory(prefix="universal-") as tmp, \
            _refusing_unsafe_pickles(local_source, checkpoint_dir):
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
    with storage.local_dir(tag_dir) as local_tag_dir, _refusing_unsafe_pickles(local_tag_dir, checkpoint_dir):
        path, _ = engine.load_checkpoint(os.path.dirname(local_tag_dir), tag=tag,
                                         load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed found no state under {checkpoint_dir}/{DEEPSPEED_DIR}/{tag}")
    if not resharded(meta, world_size):
        return _read_trainer_state(checkpoint_dir, rank)
    saved = [_read_trainer_state(checkpoint_dir, r) for r in range(int(meta["world_size"]))]
    state = dict(saved[0])
    state["rng"] = saved[rank % len(saved)]["rng"]
    state["ema_shards"] = [s.pop("ema") for s in saved]
    state.pop("ema", None)
    return state


def pretrained_weights(location: str) -> dict[str, torch.Tensor]:
    """The weights of model.init_from's U-Net at a local path or URI (pipelines/train/config.init_from_unet: ours,
    or diffusers' converted); a URI is fetched to a temporary local copy, removed once the weights are in memory."""
    from safetensors.torch import load_file

    from model.convert import from_diffusers_state
    from model.unet import UNet
    from pipelines.train.config import init_from_unet

    found = init_from_unet(location)
    with storage.local_dir(found.folder) as local:
        if found.diffusers:
            state = {k: v.float() for k, v in load_file(Path(local) / found.weights_file).items()}
            return from_diffusers_state(state, found.config)
        return UNet.from_pretrained(local).state_dict()


# ---------------------------------------------------------------------------------------- the run's checkpoints


def has_run_record(run_dir: str) -> bool:
    """Has Ray Train recorded checkpoints of this run (a rerun by name resumes)?"""
    return storage.is_file(storage.join(run_dir, RAY_SNAPSHOT_FILE))


def latest_checkpoint(run_dir: str) -> str | None:
    """The checkpoint Ray Train will hand back on resume (its latest registered one), or None.
    CheckpointDamaged when Ray's record of the run is unreadable or names a folder that is gone."""
    from ray.train import Result
    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

    if not has_run_record(run_dir):
        return None
    try:
        checkpoint = Result.from_path(run_dir).checkpoint
    except CheckpointManagerInitializationError as err:
        reason = " ".join(str(err).split())[:300]
        raise CheckpointDamaged(f"Ray Train's record of run {run_dir} ({RAY_SNAPSHOT_FILE}) cannot be used: "
                                f"{reason}") from None
    return None if checkpoint is None else _uri_of(checkpoint)


def _uri_of(checkpoint: Any) -> str:
    fs = checkpoint.filesystem
    if fs is None or fs.type_name == "local":
        return checkpoint.path
    return f"{fs.type_name}://{checkpoint.path}"


def fall_back_to_intact(run_dir: str, check: Callable[[str], Any]) -> str:
    """checkpoint.fallback=previous: the run's newest checkpoint that `check` (e.g. a thorough verify) lets
    through. Every newer one (check raised CheckpointDamaged) is moved to <run_dir>/damaged/ and dropped from
    Ray Train's record of the run, whose latest becomes the intact one: Ray hands it to the workers, and later
    checkpoints are kept and deleted as before. CheckpointError, changing nothing, when none is intact
    (any other error of `check`, e.g. another config, passes through, also changing nothing)."""
    snapshot_path = storage.join(run_dir, RAY_SNAPSHOT_FILE)
    snapshot = _read_json(snapshot_path, run_dir)
    names = [entry["checkpoint_dir_name"] for entry in snapshot["checkpoint_results"]]
    damaged: dict[str, str] = {}
    for name in reversed(names):
        try:
            check(storage.join(run_dir, name))
        except CheckpointDamaged as err:
            damaged[name] = err.problem
            continue
        storage.write_text(snapshot_path, json.dumps(_without(snapshot, set(damaged), name)))
        for gone in damaged:
            _set_aside(run_dir, gone)
        return storage.join(run_dir, name)
    raise CheckpointError(f"run {run_dir} has no intact checkpoint left: start a new run_name, or point "
                          "checkpoint.resume_from at an intact copy (" + "; ".join(damaged.values()) + ")")


def _without(snapshot: dict[str, Any], damaged: set[str], latest: str) -> dict[str, Any]:
    """Ray Train's run snapshot without the damaged checkpoints (its lists run in parallel), `latest` the latest."""
    keep = [i for i, e in enumerate(snapshot["checkpoint_results"]) if e["checkpoint_dir_name"] not in damaged]
    pending = [i for i, e in enumerate(snapshot["pending_training_results"])
               if e["checkpoint_dir_name"] not in damaged]
    out = dict(snapshot)
    out["checkpoint_results"] = [snapshot["checkpoint_results"][i] for i in keep]
    out["checkpoint_report_indices"] = [snapshot["checkpoint_report_indices"][i] for i in keep]
    out["latest_checkpoint_result"] = next(e for e in out["checkpoint_results"] if e["checkpoint_dir_name"] == latest)
    out["pending_training_results"] = [snapshot["pending_training_results"][i] for i in pending]
    out["pending_validation_specs"] = [snapshot["pending_validation_specs"][i] for i in pending]
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        out[key] = [name for name in snapshot.get(key, []) if name not in damaged]
    return out


def _set_aside(run_dir: str, name: str) -> None:
    """Move checkpoint `name` to <run_dir>/damaged/<name>[.N] (for a look later; Ray no longer knows it)."""
    import pyarrow.fs as pafs

    fs, base = storage.resolve(run_dir)
    if fs.get_file_info(f"{base}/{name}").type != pafs.FileType.Directory:
        return
    target, n = f"{base}/{DAMAGED_DIR}/{name}", 0
    while fs.get_file_info(target).type != pafs.FileType.NotFound:
        n += 1
        target = f"{base}/{DAMAGED_DIR}/{name}.{n}"
    if storage.is_object_store(fs):  # no folder rename there: copy, then delete
        pafs.copy_files(f"{base}/{name}", target, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(f"{base}/{name}")
    else:
        fs.create_dir(f"{base}/{DAMAGED_DIR}", recursive=True)
        fs.move(f"{base}/{name}", target)
