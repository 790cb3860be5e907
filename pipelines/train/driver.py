"""The driver of jobs/train_unet.py: validate, open the MLflow run, launch Ray Train, publish the model.

    result = run_training(cfg)    # -> TrainResult; raises ConfigError / CheckpointError before training

Everything that can be checked without a GPU is checked here, before a worker starts: the config
(pipelines/train/config.validate_for_launch) and, when the run already has a checkpoint (a resume by
run name) or checkpoint.resume_from is set, that checkpoint (complete, same config, same world size).
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from dataclasses import asdict, dataclass

from pipelines.core import storage
from pipelines.core.config import flatten, to_dict
from pipelines.core.job import Stage
from pipelines.core.ray_train import build_torch_trainer, fit
from pipelines.core.runtime import REPO_ROOT, StageReport
from pipelines.core.tracking import JOB_TAG, Tracker, upstream_links
from pipelines.data import schema
from pipelines.train import attempts, checkpoint
from pipelines.train.config import LaunchPlan, TrainConfig, fingerprint, validate_for_launch
from pipelines.train.worker import EXPORT_DIR, Launch, train_loop_per_worker

log = logging.getLogger("latentforge.train")

REPORT_FILE = "train_report.json"
_VERSIONED = ("torch", "deepspeed", "ray", "mlflow", "diffusers", "open_clip_torch", "safetensors")


ALREADY_FINISHED = "already finished"


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainResult:
    run_dir: str
    export_dir: str
    steps: int
    final_loss: float | None
    mlflow_run_id: str | None
    resumed_from: str | None
    seconds: float
    restarts: int = 0  # worker group restarts after a lost worker or node, in this launch
    outcome: str = "trained"  # or ALREADY_FINISHED: nothing to train, nothing rewritten


def run_dir(cfg: TrainConfig) -> str:
    """<storage_path>/<run_name>, absolute: checkpoints, the export and the report (Ray Train refuses a relative
    storage path)."""
    return storage.join(storage.absolute(cfg.storage_path), cfg.run_name)


def check_existing_checkpoint(cfg: TrainConfig) -> str | None:
    """The checkpoint this launch will continue from (verified thoroughly: every file's sha256 and DeepSpeed's
    pickles), or None for a fresh start. A damaged latest checkpoint of the run is refused, or with
    checkpoint.fallback=previous set aside for the newest intact one (Ray Train's record follows)."""
    directory = run_dir(cfg)
    try:
        found = checkpoint.latest_checkpoint(directory) or cfg.checkpoint.resume_from
        if found:
            checkpoint.verify(found, fingerprint(cfg), thorough=True)
        return found
    except checkpoint.CheckpointDamaged:
        if cfg.checkpoint.fallback != "previous" or not checkpoint.has_run_record(directory):
            raise
    found = checkpoint.fall_back_to_intact(
        directory, lambda candidate: checkpoint.verify(candidate, fingerprint(cfg), thorough=True))
    log.warning("the latest checkpoint of run %s is damaged: set aside under %s; continuing from %s", cfg.run_name,
                storage.join(directory, checkpoint.DAMAGED_DIR), found)
    return found


def prepare_resume(found: str, num_workers: int) -> None:
    """A checkpoint of another world size gets its DeepSpeed state in the universal format (once)."""
    meta = checkpoint.read_meta(found)
    if checkpoint.resharded(meta, num_workers):
        log.info("checkpoint %s was written by %d workers, this run has %d: converting its DeepSpeed state to "
                 "the universal format, and sharing the rest of the epoch among %d", found, meta["world_size"],
                 num_workers, num_workers)
        log.info("universal checkpoint: %s", checkpoint.prepare_universal(found))


def manifest_sha256(plan: LaunchPlan) -> str:
    """The features' identity: sha256 of their manifest (sorted JSON). Run tag, dataset digest, model version tag."""
    return hashlib.sha256(json.dumps(plan.manifest.to_dict(), sort_keys=True).encode()).hexdigest()


def run_tags(cfg: TrainConfig, plan: LaunchPlan) -> dict[str, str]:
    """The run's tags: code and package versions, the features it reads and the precompute run that made them."""
    from importlib.metadata import PackageNotFoundError, version

    tags = {JOB_TAG: "train_unet", "git_commit": _git_commit(), "dataset_manifest_sha256": manifest_sha256(plan),
            "features_dir": plan.features_dir, "run_dir": run_dir(cfg),
            **upstream_links([storage.join(plan.features_dir, schema.REPORT_FILE)])}
    for package in _VERSIONED:
        try:
            tags[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            tags[f"version.{package}"] = "not installed"
    return tags


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown (not a git checkout)"


def build_trainer(cfg: TrainConfig, plan: LaunchPlan, launch: Launch):
    return build_torch_trainer(train_loop_per_worker, {"train": to_dict(cfg), "launch": asdict(launch)},
                               cfg.scaling, run_name=cfg.run_name, storage_path=plan.storage_path,
                               keep_checkpoints=cfg.checkpoint.keep, max_failures=cfg.max_failures)


def run_training(cfg: TrainConfig) -> TrainResult:
    import time

    started = time.time()
    plan = validate_for_launch(cfg)
    resumed_from = check_existing_checkpoint(cfg)
    directory = run_dir(cfg)
    meta = checkpoint.read_meta(resumed_from) if resumed_from else {}
    resumed_step = int(meta.get("step", 0))
    if resumed_from and finished(cfg, resumed_step):
        log.info("run %s already finished at step %d (max_steps %d): nothing to train, and the export at %s and "
                 "the MLflow run are left as they are; raise max_steps to train longer", cfg.run_name,
                 resumed_step, cfg.max_steps, storage.join(directory, EXPORT_DIR))
        return TrainResult(run_dir=directory, export_dir=storage.join(directory, EXPORT_DIR), steps=resumed_step,
                           final_loss=None, mlflow_run_id=meta.get("mlflow_run_id"), resumed_from=resumed_from,
                           seconds=round(time.time() - started, 1), outcome=ALREADY_FINISHED)
    if resumed_from:
        log.info("continuing run %s from checkpoint %s", cfg.run_name, resumed_from)
        prepare_resume(resumed_from, cfg.scaling.num_workers)
    tracker = Tracker.open(cfg.mlflow, cfg.run_name, tags=run_tags(cfg, plan))
    tracker.log_params(flatten(to_dict(cfg)), step=resumed_step)  # a setting changed on a resume: from that step
    tracker.log_dict(to_dict(cfg), "config.json")
    tracker.log_dataset(plan.features_dir.rstrip("/").rsplit("/", 1)[-1],
                        storage.join(plan.features_dir, schema.MANIFEST_FILE), manifest_sha256(plan))
    launch = Launch(features_dir=plan.features_dir, run_dir=directory, micro_batch=plan.micro_batch,
                    grad_accum_steps=plan.grad_accum_steps, mlflow=to_dict(tracker.settings),
                    mlflow_run_id=tracker.run_id, launch_id=attempts.new_launch_id())
    try:
        result = fit(build_trainer(cfg, plan, launch))  # a diverged run ends here, not restarted
    except Exception as err:
        tracker.log_metrics({"restarts": _restarts(directory, launch.launch_id)}, step=0)
        tracker.finish("FAILED")
        raise TrainingError(f"training run {cfg.run_name} failed: {err}") from err
    restarts = _restarts(directory, launch.launch_id)
    export_dir = storage.join(directory, EXPORT_DIR)
    publish_model(tracker, export_dir, cfg.mlflow.registered_model, manifest_sha256(plan))
    metrics = result.metrics or {}
    tracker.log_metrics({"restarts": restarts}, step=int(metrics.get("step", cfg.max_steps)))
    outcome = TrainResult(run_dir=directory, export_dir=export_dir, steps=int(metrics.get("step", cfg.max_steps)),
                          final_loss=metrics.get("loss"), mlflow_run_id=tracker.run_id, resumed_from=resumed_from,
                          seconds=round(time.time() - started, 1), restarts=restarts)
    tracker.finish("FINISHED")
    return outcome


def finished(cfg: TrainConfig, checkpoint_step: int) -> bool:
    """Whether the run's latest checkpoint is at max_steps or beyond and its export is complete and of that step:
    a rerun then has nothing to do (an export missing or of another step is written again by a launch)."""
    from pipelines.inference.export import load_index

    if checkpoint_step < cfg.max_steps:
        return False
    try:
        return load_index(storage.join(run_dir(cfg), EXPORT_DIR)).get("step") == checkpoint_step
    except (FileNotFoundError, ValueError):
        return False


def _restarts(directory: str, launch_id: str) -> int:
    """The worker group's restarts in this launch (after a lost worker or node): MLflow metric `restarts`
    and the report's `restarts`."""
    restarts = max(attempts.count_starts(directory, launch_id) - 1, 0)
    if restarts:
        log.warning("the worker group was restarted %d time(s) in this launch (a worker or node was lost)", restarts)
    return restarts


def publish_model(tracker: Tracker, export_dir: str, registered_model: str | None, manifest_sha256: str) -> None:
    """The exported model as run artifacts ('model/'), and as a registered MLflow pyfunc model if asked: its
    version described (what, by which run, on which features) and tagged with the training run and the
    features' manifest hash."""
    if not tracker.active:
        return
    with storage.local_dir(export_dir) as local:  # MLflow uploads local files
        tracker.log_artifacts(local, "model")
        if registered_model and tracker.run_id:  # None: MLflow still unreachable
            from pipelines.inference.export import load_index
            from pipelines.inference.mlflow_model import log_pyfunc_model, model_description

            description = model_description(load_index(local), tracker.run_id, manifest_sha256)
            tracker.call("register the model", log_pyfunc_model, tracker, local, registered_model, description,
                         {"dataset_manifest_sha256": manifest_sha256})


def report_path(cfg: TrainConfig) -> str:
    return storage.join(run_dir(cfg), REPORT_FILE)


def _checked(cfg: TrainConfig) -> TrainConfig:
    """The launch checks (config, features manifest, an existing checkpoint) before Ray starts. run_training
    repeats them, since it is also called on its own; they are a few small reads."""
    validate_for_launch(cfg)
    check_existing_checkpoint(cfg)
    return cfg


def run_train_unet(cfg: TrainConfig) -> StageReport:
    result = run_training(cfg)
    log.info("done: %d steps, final loss %s, model exported to %s; MLflow run %s", result.steps, result.final_loss,
             result.export_dir, result.mlflow_run_id)
    return StageReport("train_unet", details=asdict(result))


STAGE = Stage("train_unet", TrainConfig, run=run_train_unet, report_path=report_path, check=_checked)
