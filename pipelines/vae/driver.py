"""VAE training stage: filtered WebDataset shards -> a diffusers AutoencoderKL directory with its
latent scaling factor, for the precompute stage (`--set vae.source=OUTPUT_DIR`).

    sys.exit(run_job(STAGE, __doc__))   # jobs/train_vae.py: check, start/join Ray, train on Ray Train, export

The driver (`train_vae`) validates the config, opens the MLflow run and starts a Ray Train
TorchTrainer; every worker runs `train_loop_per_worker` (pipelines/vae/worker.py): it reads its own part of the shards,
trains with reconstruction + KL loss and reports checkpoints; rank 0 logs to MLflow and, at the
end, measures the scaling factor and exports.

Why these choices:
- DDP, not DeepSpeed: a VAE has tens of millions of parameters (SD's: 84M, 1.3 GB of fp32 weights,
  gradients and Adam state), which fits on every GPU; ZeRO partitioning would buy no memory that is
  needed and would add an engine, a config and sharded checkpoints. DDP (Ray Train's prepare_model,
  gloo on CPU, NCCL on GPU) keeps the job small and its checkpoint a plain state dict.
- Loss: L1 (or L2) reconstruction + kl_weight * KL to N(0, I). SD's VAE adds a patch-GAN and LPIPS
  for sharp textures; neither is needed for the latents of the synthetic demo data, and LPIPS needs
  pretrained VGG weights that cannot be downloaded here. Both terms are divided by the number of pixel
  values (3*H*W) per image, so kl_weight means what it meant in SD (ratio of per-image KL sum to
  per-image reconstruction sum; SD used 1e-6).
- Colour anchor (train.color_anchor_weight, off by default, on in the tiny preset): an extra MSE that
  ties the posterior mean's first three channels to the image's RGB averaged over each latent pixel's
  patch. Why: a small VAE trained briefly from scratch puts flat colours wherever its init and data
  order take them; two colours can then lie closer in latent space than one colour's own spread, and
  the U-Net swaps them. With
  the anchor, latent distances between flat colours follow their RGB distances in every run; the other
  channels stay free for edges and shape. (SD's own VAE has a roughly linear latent -> RGB map, learned
  over far longer training.) Leave it off when fine-tuning a pretrained VAE: it would move its latent space.
- Data: each rank streams its own shards (in epoch e, shard i goes to rank (i + e) % W, so the parts
  are disjoint and rotate; rows instead of shards when there are fewer shards than ranks), in a
  seeded order and through a seeded shuffle buffer. Decoding happens in the training process: at VAE
  resolutions a JPEG decode is cheap next to a VAE step.
- Resume: rank 0 reports a checkpoint (weights, optimizer, step, config) every checkpoint_every steps
  and at the end; a rerun with the same run_name and storage_path continues from the latest one (and
  only exports again when it was already complete). It is bit-exact: the weights and Adam state come
  from the checkpoint, the LR from the global step, each step's posterior noise from (seed, rank, step), and
  each rank's image stream is replayed to where it stopped (the images already seen are decoded again and
  dropped, cheap next to the steps that used them).
- Scaling factor: 1 / std of posterior samples on the first `scaling_factor_images` decodable images
  of the sorted shards (as SD measured 0.18215), written into the exported config.json, where
  model/encoders.FrozenVAE reads it. The shift factor stays None (SD 1/2 style); the latent mean is
  recorded in the report.
- Export is done by rank 0, which holds the trained weights and an accelerator (the driver may be a
  small head node): save_pretrained into a hidden temporary folder next to output_dir, then renamed
  over it, so an existing complete output is replaced only once the new one is complete.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from pipelines.core import storage
from pipelines.core.config import ConfigError, config_differences, flatten, to_dict
from pipelines.core.job import Stage
from pipelines.core.ray_train import RunStoppedError, build_torch_trainer, fit
from pipelines.core.runtime import StageReport
from pipelines.core.tracking import JOB_TAG, MLflowSettings, Tracker, upstream_links
from pipelines.data.filter.config import REPORT_FILE as FILTER_REPORT
from pipelines.vae.config import TrainVAEConfig, check_inputs
from pipelines.vae.model import REPORT_FILE
from pipelines.vae.worker import CHECKPOINT_CONFIG_FILE, intact_checkpoint, train_loop_per_worker

log = logging.getLogger("latentforge.train_vae")

ALREADY_FINISHED = "already finished"  # the report's outcome of a rerun with nothing to train


def resolved(cfg: TrainVAEConfig, settings: MLflowSettings) -> TrainVAEConfig:
    """Paths made absolute (workers run elsewhere) and the MLflow settings the driver resolved."""
    return dataclasses.replace(cfg, input_dir=storage.absolute(cfg.input_dir),
                               output_dir=storage.absolute(cfg.output_dir),
                               storage_path=storage.absolute(cfg.storage_path), mlflow=settings)


def build_trainer(cfg: TrainVAEConfig, run_id: str | None):
    """The TorchTrainer for a resolved config (a rerun with the same run_name resumes)."""
    return build_torch_trainer(train_loop_per_worker, {"cfg": to_dict(cfg), "run_id": run_id}, cfg.scaling,
                               run_name=cfg.run_name, storage_path=cfg.storage_path,
                               keep_checkpoints=cfg.train.keep_checkpoints, max_failures=cfg.failure.max_failures)


def check_resume(cfg: TrainVAEConfig) -> str | None:
    """The checkpoint a rerun of run_name continues from, or None; ConfigError when it was trained
    with another VAE or image size (a resume would silently mix two models)."""
    run_dir = storage.join(storage.absolute(cfg.storage_path), cfg.run_name)
    found = intact_checkpoint(run_dir, cfg.train.checkpoint_fallback)  # verified, or CheckpointDamaged (exit 2)
    if found is None:
        return None
    config_file = storage.join(found, CHECKPOINT_CONFIG_FILE)
    if not storage.is_file(config_file):
        raise ConfigError(f"run_name {cfg.run_name!r}: the latest checkpoint in {run_dir} has no "
                          f"{CHECKPOINT_CONFIG_FILE}, so it is not a VAE training checkpoint (another job's run?); "
                          f"choose another run_name or storage_path")
    saved, current = storage.read_json(config_file), to_dict(cfg)
    model_keys = ("vae", "image_size")  # what makes it another model; the rest may change on a resume
    changed = config_differences({k: saved.get(k) for k in model_keys},
                                 {k: storage.redact_values(current[k]) for k in model_keys})  # saved redacted
    if changed:
        raise ConfigError(f"run_name {cfg.run_name!r} already has checkpoints in {run_dir} of another model "
                          f"({'; '.join(changed)}): choose another run_name (or storage_path) for a new model, "
                          f"or the same settings to resume")
    log.info("continuing run %s from %s", cfg.run_name, found)
    return found


def checkpoint_step(cfg: TrainVAEConfig) -> int:
    """The step of the run's latest checkpoint (0: none), from Ray Train's record of the run."""
    from ray.train import Result

    from pipelines.train.checkpoint import latest_checkpoint

    run_dir = storage.join(storage.absolute(cfg.storage_path), cfg.run_name)
    if latest_checkpoint(run_dir) is None:
        return 0
    return int((Result.from_path(run_dir).metrics or {}).get("step", 0))


def finished_report(cfg: TrainVAEConfig, step: int) -> dict[str, Any] | None:
    """The report of this run's export when the run is at train.steps and exported at that step (a rerun then
    has nothing to do), else None."""
    if step < cfg.train.steps or not storage.is_file(report_path(cfg)):
        return None
    report = storage.read_json(report_path(cfg))
    mine = report.get("ok") and report.get("run_name") == cfg.run_name and report.get("steps") == step
    return report if mine else None


def train_vae(cfg: TrainVAEConfig) -> dict[str, Any]:
    """Open the MLflow run, train on Ray Train, return the export's report. Ray must be running;
    call check_inputs and check_resume first. Raises ray.train.TrainingFailedError when training fails,
    RunStoppedError when it diverged."""
    import ray.train

    step = checkpoint_step(cfg)
    done = finished_report(cfg, step)
    if done is not None:
        log.info("run %s already finished at step %d (train.steps %d): nothing to train, and the export at %s and "
                 "the MLflow run are left as they are; raise train.steps to train longer", cfg.run_name, step,
                 cfg.train.steps, storage.absolute(cfg.output_dir))
        return {**done, "outcome": ALREADY_FINISHED}
    tracker = Tracker.open(cfg.mlflow, cfg.run_name, tags={
        JOB_TAG: "train_vae", **upstream_links([storage.join(cfg.input_dir, FILTER_REPORT)])})
    cfg = resolved(cfg, tracker.settings)
    tracker.log_params(flatten(to_dict(cfg)), step=step)  # a setting changed on a resume: from that step
    tracker.log_dict(to_dict(cfg), "train_vae_config.json")
    try:
        fit(build_trainer(cfg, tracker.run_id))
    except (ray.train.TrainingFailedError, RunStoppedError):
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    return storage.read_json(storage.join(cfg.output_dir, REPORT_FILE))


def _failure_message(err: Exception) -> str:
    """The workers' own errors (last line of each), not Ray's wrapping of them."""
    failures = getattr(err, "worker_failures", None) or {}
    if not failures:
        return str(err).strip().splitlines()[-1]
    lines = {str(e).strip().splitlines()[-1] for e in failures.values()}
    return "; ".join(sorted(lines))


def _checked(cfg: TrainVAEConfig) -> TrainVAEConfig:
    check_inputs(cfg)
    check_resume(cfg)
    return cfg


def report_path(cfg: TrainVAEConfig) -> str:
    return storage.join(cfg.output_dir, REPORT_FILE)


def run_train_vae(cfg: TrainVAEConfig) -> StageReport:
    """train_vae as a stage: the export's report as the stage report, a failed run as one readable line."""
    import ray.train

    try:
        exported = train_vae(cfg)
    except ray.train.TrainingFailedError as err:
        raise RuntimeError(f"VAE training failed: {_failure_message(err)} (checkpoints: "
                           f"{storage.join(storage.absolute(cfg.storage_path), cfg.run_name)}; rerun with the "
                           f"same run_name to resume)") from err
    out = exported["config"]
    log.info("VAE: %s (scaling factor %.5f; load it with --set vae.source=%s in precompute); checkpoints: %s; "
             "MLflow run %s at %s", out["output_dir"], exported["scaling_factor"], out["output_dir"],
             storage.join(out["storage_path"], cfg.run_name), exported["mlflow_run_id"],
             out["mlflow"]["tracking_uri"])
    kept = ("stage", "ok", "rows_in", "rows_out", "dropped", "dropped_total", "seconds", "error")  # a rerun's report
    return StageReport("train_vae", details={k: v for k, v in exported.items() if k not in kept})


STAGE = Stage("train_vae", TrainVAEConfig, run=run_train_vae, report_path=report_path, check=_checked,
              ray_cpus=lambda cfg: cfg.ray_num_cpus)
