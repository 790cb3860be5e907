"""The exported model as an MLflow pyfunc model, so the registry can serve and version it.

    model = mlflow.pyfunc.load_model("models:/<name>/<version>")
    images = model.predict(pd.DataFrame({"prompt": ["a red circle"], "seed": [0]}))   # column "png": PNG bytes

Sampling settings come from `params` (SamplerConfig's fields: name, steps, guidance_scale, guidance_rescale, ...),
each one not given taken from the model's recommended sampling (pipelines/inference/export.recommended_sampler).
The model's signature says so (model_signature): input columns prompt (string) and seed (long, optional), output
columns prompt, seed and png (PNG bytes), and the sampler settings as params with the model's values as defaults.

The registered version's description says what it is and, once jobs/sample_eval.py has evaluated it, what the
evaluation measured (describe_evaluation rewrites that part after each evaluation); its tags name the training
run and the features' manifest hash.

Logged from code (MLflow 3's "models from code"): the model is pyfunc_code.py, which MLflow runs at load
time, with this repository's packages as code_paths; a pickled PythonModel would run whatever the pickle
holds when loaded, and break on any change to the class.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import mlflow.pyfunc
import pandas as pd

from model.samplers import SamplerConfig
from pipelines.core import quiet
from pipelines.core.runtime import REPO_ROOT

PYFUNC_ARTIFACT = "model_dir"
_PACKAGES = ("model", "pipelines")
_MODEL_CODE = Path(__file__).with_name("pyfunc_code.py")
_PARAM_TYPES = {str: "string", int: "long", float: "double", bool: "boolean"}
EVAL_HEADING = "## Evaluation"  # the description's part that describe_evaluation rewrites
TRAINING_RUN_TAG = "training_run_id"


class TextToImageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from pipelines.inference.export import load_exported

        self.model = load_exported(context.artifacts[PYFUNC_ARTIFACT])
        self.vae, self.text = self.model.encoders.build()

    # model_input: pd.DataFrame, which MLflow infers no schema from (the logged signature is the schema); a hint it
    # tries to infer one from and cannot (Any) makes it warn at class definition and again at logging
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from pipelines.inference.draw import decode_images, draw_latents, encode_prompts, png_bytes

        prompts = [str(p) for p in model_input["prompt"]]
        seeds = [int(s) for s in model_input["seed"]] if "seed" in model_input else list(range(len(prompts)))
        given = {k: _plain(v) for k, v in (params or {}).items()}
        sampler = dataclasses.replace(self.model.sampler, **given)
        states, masks = encode_prompts(self.text, prompts)
        m = self.model
        latents = draw_latents(m.unet, m.schedule, states, masks, m.empty_caption, seeds, m.latent_shape, sampler)
        images = decode_images(self.vae, latents, m.scaling_factor, m.shift_factor)
        return pd.DataFrame({"prompt": prompts, "seed": seeds, "png": [png_bytes(image) for image in images]})


def _plain(value: Any) -> Any:
    """A param as the Python scalar SamplerConfig checks for (MLflow may hand numpy scalars)."""
    return value.item() if hasattr(value, "item") else value


def model_signature(defaults: SamplerConfig) -> Any:
    """Inputs prompt (string) and seed (long, optional: row numbers by default); outputs prompt, seed, png;
    params: SamplerConfig's fields, with `defaults` (the model's recommended sampling) as their defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    params = [ParamSpec(f.name, _PARAM_TYPES[type(getattr(defaults, f.name))], getattr(defaults, f.name))
              for f in dataclasses.fields(SamplerConfig)]
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False)]),
                          outputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed"),
                                          ColSpec("binary", "png")]),
                          params=ParamSchema(params))


def log_pyfunc_model(tracker: Any, model_dir: str, registered_name: str, description: str = "",
                     tags: Mapping[str, str] | None = None) -> str:
    """Log model_dir as a pyfunc model in the tracker's run and register it under registered_name, with
    `description` and `tags` on the new version; returns the version."""
    import mlflow

    from pipelines.inference.export import load_index, recommended_sampler

    signature = model_signature(recommended_sampler(load_index(model_dir)))
    mlflow.set_tracking_uri(tracker.settings.tracking_uri)
    with mlflow.start_run(run_id=tracker.run_id), quiet.warnings_ignored(quiet.MLFLOW_LOG_MODEL_WARNINGS):
        info = mlflow.pyfunc.log_model(
            name="pyfunc_model", python_model=str(_MODEL_CODE), artifacts={PYFUNC_ARTIFACT: model_dir},
            code_paths=[str(REPO_ROOT / p) for p in _PACKAGES], registered_model_name=registered_name,
            signature=signature,
            # Listed, not inferred: inference imports the model and may try the network.
            pip_requirements=["torch", "safetensors", "diffusers", "open_clip_torch", "pillow", "pandas"])
    version = str(info.registered_model_version)
    client = tracker.client
    if description:
        client.update_model_version(registered_name, version, description=description)
    for key, value in {TRAINING_RUN_TAG: tracker.run_id, **(tags or {})}.items():
        client.set_model_version_tag(registered_name, version, key, str(value))
    return version


def model_description(index: Mapping[str, Any], run_id: str | None, manifest_sha256: str) -> str:
    """A registered version's description before any evaluation: what was trained, on what, by which run."""
    return (f"Text-to-image latent diffusion U-Net ({index.get('weights')} weights of step {index.get('step')}), "
            f"trained by MLflow run {run_id} ({index.get('run_name')}) on the features with manifest sha256 "
            f"{manifest_sha256}.\n\n{EVAL_HEADING}\n\nNot evaluated yet: run jobs/sample_eval.py on this model "
            "(its metrics are written here).")


def evaluation_text(metrics: Mapping[str, Any], eval_run_id: str | None) -> str:
    """The description's evaluation part (markdown) from sample_eval's metrics."""
    lines = [EVAL_HEADING, "", f"MLflow run {eval_run_id}: {metrics.get('images')} images of "
             f"{metrics.get('prompts')} prompts, {metrics.get('sampler')} sampler, {metrics.get('steps')} steps.", ""]
    for key, acc in (metrics.get("synthetic_accuracy") or {}).items():
        overall = (acc.get("overall") or {}).get("all_correct")
        held_out = (acc.get("held_out") or {}).get("all_correct")
        lines.append(f"- synthetic accuracy, {key}: all correct {_share(overall)} (held-out pairs "
                     f"{_share(held_out)}; {acc.get('out_of_vocabulary', 0)} prompts outside the vocabulary)")
    for key, label in (("clip_score", "CLIP score"), ("fid", "FID")):
        result = metrics.get(key) or {}
        value = f"{result['value']:.4g}" if result.get("computed") else f"not computed ({result.get('reason')})"
        lines.append(f"- {label}: {value}")
    return "\n".join(lines)


def _share(value: Any) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def describe_evaluation(client: Any, training_run_id: str, metrics: Mapping[str, Any],
                        eval_run_id: str | None) -> list[tuple[str, str]]:
    """Every registered version logged by training_run_id gets the evaluation's metrics in its description
    (replacing an earlier evaluation's) and the tag eval_run_id; returns the (name, version)s updated."""
    updated = []
    for version in client.search_model_versions(f"run_id='{training_run_id}'"):
        base = (version.description or "").split(EVAL_HEADING)[0].rstrip()
        text = evaluation_text(metrics, eval_run_id)
        client.update_model_version(version.name, version.version, description=f"{base}\n\n{text}".lstrip())
        if eval_run_id:
            client.set_model_version_tag(version.name, version.version, "eval_run_id", eval_run_id)
        updated.append((version.name, str(version.version)))
    return updated
