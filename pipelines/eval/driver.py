"""Batch sampling evaluation: prompts -> images on a Ray Data actor pool -> scores, grids, metrics, MLflow.

    report = run_evaluation(EvalConfig(model="runs/tiny-cpu/export", prompts="prompts.txt", out="eval"))

OUT_DIR receives images/NNNNN.png, results.jsonl (one object per image: prompt, seed, guidance, sampler,
steps, image, and its scores), grids/guidance_<g>.png and metrics.json; the same metrics go to an MLflow
child run of the training run (or a new run when the model carries no run id), with the grids, a table of the
images with what the checker read from each (eval_table.json), and tags eval.<metric>_skipped naming why CLIP
score or FID were not computed. Registered versions of the training run get the metrics in their description.

Each image is a function of (model, prompt, seed, guidance, sampler, steps): sampling starts from
initial_noise(seed), so a rerun with the same batch size gives the same pixels; another batch size
changes only float rounding in batched kernels (a level or two of some pixels).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.samplers import SAMPLER_NAMES, TIMESTEP_SPACINGS, SamplerConfig
from pipelines.core import storage
from pipelines.core.compute import ActorPool
from pipelines.core.config import ConfigError, flatten, from_dict, to_dict
from pipelines.core.job import Stage
from pipelines.core.progress import Progress
from pipelines.core.runtime import StageReport
from pipelines.core.tracking import JOB_TAG, MLflowSettings, Tracker, apply_http_limits
from pipelines.eval.outputs import GRIDS_DIR, RESULTS_FILE, TABLE_FILE, results_table, write_outputs
from pipelines.eval.prompts import PromptRow, read_prompts
from pipelines.inference.export import load_index, recommended_sampler

log = logging.getLogger("latentforge.eval")

METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class SamplingSettings:
    """How the images are drawn. A setting left unset takes the model's recommended value (written at export from
    the training config's samples.sampler: pipelines/inference/export.recommended_sampler), so a model samples
    with its own defaults unless the user says otherwise; `resolved` fills them in once the model is known."""

    sampler: str | None = None  # dpmpp_2m | ddim | euler
    steps: int | None = None
    guidance_scales: tuple[float, ...] | None = None  # more than one value sweeps them (one image per value)
    guidance_rescale: float | None = None  # 0..1: rescales the guided output's std to the conditional one's
    timestep_spacing: str | None = None
    steps_offset: int | None = None
    images_per_prompt: int = 1  # seeds seed, seed+1, ... for each prompt

    def resolved(self, recommended: SamplerConfig) -> SamplingSettings:
        """Every unset setting from `recommended`; checked as a SamplerConfig per guidance scale."""
        pick = _unset_to
        out = dataclasses.replace(
            self, sampler=pick(self.sampler, recommended.name), steps=pick(self.steps, recommended.steps),
            guidance_scales=pick(self.guidance_scales, (recommended.guidance_scale,)),
            guidance_rescale=pick(self.guidance_rescale, recommended.guidance_rescale),
            timestep_spacing=pick(self.timestep_spacing, recommended.timestep_spacing),
            steps_offset=pick(self.steps_offset, recommended.steps_offset))
        for g in out.guidance_scales:
            out.sampler_config(g)  # raises ValueError naming a bad value
        return out

    def sampler_config(self, guidance: float) -> SamplerConfig:
        """The SamplerConfig of one guidance scale (of resolved settings)."""
        return SamplerConfig(name=self.sampler, steps=self.steps, guidance_scale=guidance,
                             guidance_rescale=self.guidance_rescale, timestep_spacing=self.timestep_spacing,
                             steps_offset=self.steps_offset)


def _unset_to(value: Any, default: Any) -> Any:
    return default if value is None else value


@dataclass(frozen=True)
class SamplerPool(ActorPool):
    num_cpus_per_actor: float = 1.0
    batch_size: int = 16  # images per sampler call


@dataclass(frozen=True)
class MetricSettings:
    clip_model: str = "ViT-H-14"  # open_clip model name of clip_weights
    clip_weights: str | None = None  # local open_clip checkpoint: enables the CLIP score
    fid_reference: str | None = None  # a folder of real images (png/jpg): enables FID ...
    fid_weights: str | None = None  # ... with these Inception weights (local file)


@dataclass(frozen=True)
class EvalConfig:
    model: str = ""  # exported model directory (a path or s3://...), or runs:/<id>/model, models:/<name>/<version>
    prompts: str = ""  # .txt (one prompt a line) or .parquet / .jsonl with `prompt` and optional `seed`
    out: str = ""
    seed: int = 0  # seed of prompts that carry none: seed + their row number
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    compute: SamplerPool = field(default_factory=SamplerPool)
    metrics: MetricSettings = field(default_factory=MetricSettings)
    grid_images: int = 36  # at most this many images per guidance grid
    mlflow: MLflowSettings = field(default_factory=MLflowSettings)
    run_name: str | None = None  # MLflow run name (default: eval-<model run name or dir name>)

    def validate(self) -> None:
        """Checks that need no cluster; raises ConfigError naming the key."""
        for key in ("model", "prompts", "out"):
            if not getattr(self, key):
                raise ConfigError(f"{key} must be set (--{key} ...)")
        s = self.sampling
        if s.sampler is not None and s.sampler not in SAMPLER_NAMES:
            raise ConfigError(f"sampling.sampler: unknown sampler {s.sampler!r}; choose one of {list(SAMPLER_NAMES)}")
        if s.timestep_spacing is not None and s.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ConfigError(f"sampling.timestep_spacing must be one of {TIMESTEP_SPACINGS}")
        if s.guidance_scales is not None and not s.guidance_scales:
            raise ConfigError("sampling.guidance_scales must list at least one value (or be left unset: the "
                              "model's recommended one)")
        s.resolved(SamplerConfig())  # steps and each guidance value, before any model is read
        if s.images_per_prompt < 1:
            raise ConfigError("sampling.images_per_prompt must be >= 1")
        for key in ("clip_weights", "fid_weights"):
            path = getattr(self.metrics, key)
            if path and not Path(path).is_file():
                raise ConfigError(f"metrics.{key}: file {path} not found")
        if self.metrics.fid_reference and not Path(self.metrics.fid_reference).is_dir():
            raise ConfigError(f"metrics.fid_reference: folder {self.metrics.fid_reference} not found")


MLFLOW_SCHEMES = ("runs:/", "models:/")
# MLflow's error codes for a run, model, version or artifact path that is not there: bad input, not a failure.
MLFLOW_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def check_inputs(cfg: EvalConfig) -> None:
    """Before any cluster work: the prompt file reads and is not empty; a local model directory is complete;
    an MLflow URI names something that exists and holds artifacts (its files are checked once downloaded)."""
    read_prompts(cfg.prompts, cfg.seed)
    if cfg.model.startswith(MLFLOW_SCHEMES):
        apply_http_limits(cfg.mlflow)  # a server that is down fails the job in seconds, not minutes of retries
        check_mlflow_model(cfg.model, cfg.mlflow.resolved().tracking_uri)
    else:
        load_index(cfg.model)


def _mlflow_model_error(model: str, err: Exception) -> ConfigError | None:
    """A ConfigError naming the model when `err` says it is not there; None for other failures (a server down)."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException) and err.error_code in MLFLOW_NOT_FOUND:
        return ConfigError(f"model {model}: {err.message}")
    return None


def check_mlflow_model(model: str, tracking_uri: str | None) -> None:
    """The run or registered model version behind a runs:/ or models:/ URI exists and lists artifacts."""
    import mlflow

    try:
        found = mlflow.artifacts.list_artifacts(artifact_uri=model, tracking_uri=tracking_uri)
    except Exception as err:  # noqa: BLE001 - only "not found" is bad input; anything else propagates
        raise _mlflow_model_error(model, err) or err from None
    if not found:
        raise ConfigError(f"model {model}: no artifacts there (is the path after the run id right?)")


# ------------------------------------------------------------------------------------------ the model


def resolve_model(model: str, into: Path, tracking_uri: str | None) -> str:
    """Where the exported model directory is: `model` itself when it is a path (made absolute: the actors run in
    other working directories) or a storage URI (s3://...: each actor fetches its own copy), else an MLflow
    runs:/ or models:/ URI's artifacts downloaded into `into`."""
    from pipelines.inference.export import INDEX_FILE

    if not model.startswith(MLFLOW_SCHEMES):
        return storage.absolute(model)
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=str(into),
                                                         tracking_uri=tracking_uri))
    except Exception as err:  # noqa: BLE001 - only "not found" is bad input; anything else propagates
        raise _mlflow_model_error(model, err) or err from None
    found = sorted(local.rglob(INDEX_FILE))
    if not found:
        raise FileNotFoundError(f"{model} holds no exported model ({INDEX_FILE} not found in its artifacts)")
    return str(found[0].parent)


class SamplerActor:
    """Ray Data callable class: one model load per actor; rows (prompt, seed, guidance) -> PNG bytes.
    A model at a URI is fetched to a temporary local copy (the loaders open local files), removed once the
    U-Net and the encoders are in memory."""

    def __init__(self, model_dir: str, sampling: dict[str, Any], use_gpu: bool) -> None:
        import torch

        from pipelines.inference.export import load_exported

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        with storage.local_dir(model_dir) as local:
            self.model = load_exported(local, device=self.device)
            self.vae, self.text = self.model.encoders.build(device=self.device)
        self.sampling = from_dict(SamplingSettings, sampling)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.inference.draw import decode_images, draw_latents, encode_prompts, png_bytes

        m, pngs = self.model, np.empty(len(batch["prompt"]), dtype=object)
        for guidance in np.unique(batch["guidance"]):  # one sampler call per guidance value in the batch
            rows = np.flatnonzero(batch["guidance"] == guidance)
            states, masks = encode_prompts(self.text, [str(p) for p in batch["prompt"][rows]])
            latents = draw_latents(m.unet, m.schedule, states, masks, m.empty_caption,
                                   [int(s) for s in batch["seed"][rows]], m.latent_shape,
                                   self.sampling.sampler_config(float(guidance)), device=self.device)
            images = decode_images(self.vae, latents, m.scaling_factor, m.shift_factor)  # (n, H, W, 3)
            for row, image in zip(rows, images):
                pngs[row] = png_bytes(image)
        return {**batch, "png": pngs}


# ------------------------------------------------------------------------------------------ the run


def expand_rows(prompts: list[PromptRow], cfg: EvalConfig) -> list[dict[str, Any]]:
    """One row per image: every prompt x images_per_prompt seeds x guidance scale, numbered in that order."""
    rows = []
    for p in prompts:
        for k in range(cfg.sampling.images_per_prompt):
            for guidance in cfg.sampling.guidance_scales:
                rows.append({"index": len(rows), "prompt": p.prompt, "seed": p.seed + k, "guidance": float(guidance)})
    return rows


def sample_all(cfg: EvalConfig, model_dir: str, rows: list[dict[str, Any]]) -> dict[int, bytes]:
    """Draw every row on the actor pool; returns {index: PNG bytes}."""
    import ray

    c = cfg.compute
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // c.batch_size, 4 * c.actors)))
    ds = ds.map_batches(SamplerActor, batch_size=c.batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"model_dir": model_dir,
                                               "sampling": to_dict(cfg.sampling), "use_gpu": c.num_gpus_per_actor > 0},
                        compute=ray.data.ActorPoolStrategy(size=c.actors),
                        num_cpus=c.num_cpus_per_actor, num_gpus=c.num_gpus_per_actor)
    out: dict[int, bytes] = {}
    progress = Progress(len(rows), "images")
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for index, png in zip(batch["index"], batch["png"]):
            out[int(index)] = bytes(png)
        log.info("%s", progress.line(len(out)))
    return out


def run_evaluation(cfg: EvalConfig) -> dict[str, Any]:
    """The whole job after validation; returns the metrics dict (also written to OUT_DIR/metrics.json)."""
    started = time.time()
    settings = cfg.mlflow.resolved()
    prompts = read_prompts(cfg.prompts, cfg.seed)
    with tempfile.TemporaryDirectory(prefix="eval-model-") as tmp:
        try:  # a missing or half-written model is refused here, before any sampling
            model_dir = resolve_model(cfg.model, Path(tmp), settings.tracking_uri)
            index = load_index(model_dir)
            cfg = dataclasses.replace(cfg, sampling=cfg.sampling.resolved(recommended_sampler(index)))
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"model {cfg.model}: {err}") from None
        rows = expand_rows(prompts, cfg)
        s = cfg.sampling
        log.info("sampling %d images (%d prompts x %d seeds x guidance %s) with %s, %d steps, guidance rescale %g "
                 "(unset settings are the model's recommended ones)", len(rows), len(prompts), s.images_per_prompt,
                 ", ".join(f"{g:g}" for g in s.guidance_scales), s.sampler, s.steps, s.guidance_rescale)
        t0 = time.time()
        pngs = sample_all(cfg, model_dir, rows)
        sampling_seconds = time.time() - t0
    metrics = write_outputs(cfg, rows, pngs, index)
    metrics["timing"] = {"sampling_seconds": round(sampling_seconds, 2),
                         "images_per_second": round(len(rows) / max(sampling_seconds, 1e-9), 3),
                         "total_seconds": round(time.time() - started, 2)}
    storage.write_json(storage.join(cfg.out, METRICS_FILE), storage.redact_values(metrics))  # a presigned prompts URL
    log_to_mlflow(cfg, settings, index, metrics)
    return metrics


def log_to_mlflow(cfg: EvalConfig, settings: MLflowSettings, index: dict[str, Any], metrics: dict[str, Any]) -> None:
    parent = index.get("mlflow_run_id")
    name = cfg.run_name or f"eval-{index.get('run_name') or cfg.model.rstrip('/').rpartition('/')[2]}"
    tracker = Tracker.open_child(settings, name, parent_run_id=parent)
    tracker.set_tags({JOB_TAG: "sample_eval", **skipped_tags(metrics)})
    tracker.log_params({"model": cfg.model, "prompts": cfg.prompts, **{f"sampling.{k}": v
                        for k, v in to_dict(cfg.sampling).items()}})
    tracker.log_metrics(numeric_leaves(metrics), step=int(index.get("step", 0)))
    if tracker.active:
        log_outputs(tracker, cfg.out)
        tracker.log_table(results_table(cfg.out), TABLE_FILE)
    tracker.finish("FINISHED")
    if parent and tracker.run_id:
        from pipelines.inference.mlflow_model import describe_evaluation

        tracker.call("describe the registered model", describe_evaluation, tracker.client, parent, metrics,
                     tracker.run_id)


def skipped_tags(metrics: dict[str, Any]) -> dict[str, str]:
    """eval.<metric>_skipped = why, for each weights-based metric (clip_score, fid) that was not computed."""
    return {f"eval.{key}_skipped": metrics[key]["reason"] for key in ("clip_score", "fid")
            if not metrics[key]["computed"]}


def log_outputs(tracker: Tracker, out: str) -> None:
    """metrics.json, results.jsonl and the grids as run artifacts. MLflow uploads local files only, so an OUT_DIR
    at a URI has these (not the images) copied to a temporary local folder first."""
    with tempfile.TemporaryDirectory(prefix="eval-artifacts-") as tmp:
        for name in (METRICS_FILE, RESULTS_FILE):
            local = Path(tmp) / name
            local.write_bytes(storage.read_bytes(storage.join(out, name)))
            tracker.log_artifact(local)
        with storage.local_dir(storage.join(out, GRIDS_DIR)) as grids:
            tracker.log_artifacts(grids, GRIDS_DIR)


def numeric_leaves(values: dict[str, Any]) -> dict[str, float]:
    """Every int/float leaf of a nested dict as 'a.b.c' -> float (MLflow metrics); NaN and booleans left out."""
    return {key: float(value) for key, value in flatten(values).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value}


REPORT_FILE = "eval_report.json"


def report_path(cfg: EvalConfig) -> str:
    return storage.join(cfg.out, REPORT_FILE)


def _checked(cfg: EvalConfig) -> EvalConfig:
    try:
        cfg.validate()
        check_inputs(cfg)
    except (ValueError, FileNotFoundError) as err:  # a bad sampler value, prompt file or model directory
        raise ConfigError(str(err)) from None
    return cfg


def run_sample_eval(cfg: EvalConfig) -> StageReport:
    metrics = run_evaluation(cfg)
    for key, value in metrics["synthetic_accuracy"].items():
        log.info("%s: %s", key, value.get("summary", value))
    log.info("wrote %d images, %s, grids and %s to %s", metrics["images"], RESULTS_FILE, METRICS_FILE, cfg.out)
    return StageReport("sample_eval", rows_in=metrics["prompts"], rows_out=metrics["images"],
                       details={k: metrics[k] for k in ("model", "model_step", "grids", "timing")}
                       | {"metrics_file": storage.join(cfg.out, METRICS_FILE)})


STAGE = Stage("sample_eval", EvalConfig, run=run_sample_eval, report_path=report_path, check=_checked,
              shorthands={"model": "exported model directory, or runs:/<id>/model or models:/<name>/<version>",
                          "prompts": "prompt file: .txt (one a line), or .parquet/.jsonl with prompt[, seed]",
                          "out": "output directory"})
