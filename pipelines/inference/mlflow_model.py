"""The exported model as an MLflow pyfunc model, so the registry can serve and version it.

    model = mlflow.pyfunc.load_model("models:/<name>/<version>")
    images = model.predict(pd.DataFrame({"prompt": ["a red circle"], "seed": [0]}))   # column "png": PNG bytes

Sampling settings come from `params` (sampler, steps, guidance_scale), defaults from SamplerConfig.

Logged from code (MLflow 3's "models from code"): the model is pyfunc_code.py, which MLflow runs at load
time, with this repository's packages as code_paths; a pickled PythonModel would run whatever the pickle
holds when loaded, and break on any change to the class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc

from model.samplers import SamplerConfig
from pipelines.core.runtime import REPO_ROOT

PYFUNC_ARTIFACT = "model_dir"
_PACKAGES = ("model", "pipelines")
_MODEL_CODE = Path(__file__).with_name("pyfunc_code.py")


class TextToImageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from pipelines.inference.export import load_exported

        self.model = load_exported(context.artifacts[PYFUNC_ARTIFACT])
        self.vae, self.text = self.model.encoders.build()

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd

        from pipelines.inference.draw import decode_images, draw_latents, encode_prompts, png_bytes

        prompts = [str(p) for p in model_input["prompt"]]
        seeds = [int(s) for s in model_input["seed"]] if "seed" in model_input else list(range(len(prompts)))
        sampler = SamplerConfig(**(params or {}))
        states, masks = encode_prompts(self.text, prompts)
        m = self.model
        latents = draw_latents(m.unet, m.schedule, states, masks, m.empty_caption, seeds, m.latent_shape, sampler)
        images = decode_images(self.vae, latents, m.scaling_factor, m.shift_factor)
        return pd.DataFrame({"prompt": prompts, "seed": seeds, "png": [png_bytes(image) for image in images]})


def log_pyfunc_model(tracker: Any, model_dir: str, registered_name: str) -> None:
    """Log model_dir as a pyfunc model in the tracker's run and register it under registered_name."""
    import mlflow

    mlflow.set_tracking_uri(tracker.settings.tracking_uri)
    with mlflow.start_run(run_id=tracker.run_id):
        mlflow.pyfunc.log_model(
            name="pyfunc_model", python_model=str(_MODEL_CODE), artifacts={PYFUNC_ARTIFACT: model_dir},
            code_paths=[str(REPO_ROOT / p) for p in _PACKAGES], registered_model_name=registered_name,
            # Listed, not inferred: inference imports the model and may try the network.
            pip_requirements=["torch", "safetensors", "diffusers", "open_clip_torch", "pillow", "pandas"])
