"""A model samples with its own recommended settings: the export carries them (the training config's
samples.sampler), and jobs/sample_eval.py uses each one the user does not set."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from model.samplers import SamplerConfig
from pipelines.eval.driver import METRICS_FILE, RESULTS_FILE, SamplingSettings
from pipelines.inference.export import load_exported, recommended_sampler
from tests.exports import write_untrained_export

# Unlike SamplerConfig's defaults in every field, so a default taken from the wrong place shows.
RECOMMENDED = {"name": "ddim", "steps": 3, "guidance_scale": 3.0, "guidance_rescale": 0.5,
               "timestep_spacing": "leading", "steps_offset": 1}


def test_the_manifest_carries_the_recommended_sampler(tmp_path):
    model = load_exported(write_untrained_export(tmp_path, sampling=RECOMMENDED))
    assert model.index["sampling"] == dataclasses.asdict(SamplerConfig(**RECOMMENDED))
    assert model.sampler == SamplerConfig(**RECOMMENDED)


def test_an_older_export_recommends_the_sampler_its_train_config_recorded():
    recorded = {"train_config": {"samples": {"sampler": {"name": "euler", "steps": 7, "guidance_scale": 2.5}}}}
    assert recommended_sampler(recorded) == SamplerConfig(name="euler", steps=7, guidance_scale=2.5)
    assert recommended_sampler({"train_config": {}}) == SamplerConfig()
    # the manifest's own entry wins over the train config's
    both = {**recorded, "sampling": {"name": "ddim", "steps": 2, "guidance_scale": 1.0}}
    assert recommended_sampler(both).name == "ddim"


@pytest.mark.parametrize("sampling, message", [
    ("dpmpp_2m", "sampling must be a mapping"),
    ({"name": "dpmpp_2m", "stepz": 3}, "stepz"),
    ({"steps": 0}, "steps"),
    ({"guidance_rescale": 1.5}, "guidance_rescale"),
])
def test_a_bad_recommended_sampler_is_a_clear_error(sampling, message):
    with pytest.raises(ValueError, match=message):
        recommended_sampler({"sampling": sampling})


def test_unset_sampling_settings_take_the_models_and_set_ones_override_only_themselves():
    model = SamplerConfig(**RECOMMENDED)
    unset = SamplingSettings().resolved(model)
    assert (unset.sampler, unset.steps, unset.guidance_scales, unset.guidance_rescale, unset.timestep_spacing) == \
        ("ddim", 3, (3.0,), 0.5, "leading")
    mixed = SamplingSettings(steps=5, guidance_scales=(1.0, 7.0)).resolved(model)
    assert (mixed.sampler, mixed.steps, mixed.guidance_scales, mixed.guidance_rescale) == ("ddim", 5, (1.0, 7.0), 0.5)
    assert mixed.sampler_config(7.0) == SamplerConfig(name="ddim", steps=5, guidance_scale=7.0, guidance_rescale=0.5,
                                                      timestep_spacing="leading", steps_offset=1)
    # an explicit 0 is a setting, not "unset"
    assert SamplingSettings(guidance_rescale=0.0).resolved(model).guidance_rescale == 0.0


@pytest.mark.parametrize("override, message", [
    ("sampling.guidance_scales=[]", "at least one value"),
    ("sampling.steps=0", "steps"),
    ("sampling.guidance_rescale=2", "guidance_rescale"),
])
def test_bad_sampling_overrides_exit_2_before_the_model_is_read(override, message, tmp_path, caplog):
    from jobs.sample_eval import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a large red circle in the top left\n")
    out = tmp_path / "out"
    code = main(["--model", str(tmp_path / "missing"), "--prompts", str(prompts), "--out", str(out),
                 "--set", override])
    assert code == 2 and message in caplog.text and not out.exists()


@pytest.mark.slow
def test_sample_eval_without_sampling_flags_draws_with_the_models_settings(tmp_path, ray_local):
    """One flag set (steps), the rest from the model: the metrics record the values used, and the image is the one
    drawn in-process with exactly those settings."""
    import torch

    from jobs.sample_eval import main
    from pipelines.inference.draw import decode_images, draw_latents, encode_prompts

    model_dir = write_untrained_export(tmp_path / "model", sampling=RECOMMENDED)
    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompt = "a small blue triangle in the center"
    prompts.write_text(prompt + "\n")
    assert main(["--model", str(model_dir), "--prompts", str(prompts), "--out", str(out), "--set", "sampling.steps=2",
                 "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert (metrics["sampler"], metrics["steps"], metrics["guidance_scales"], metrics["guidance_rescale"]) == \
        ("ddim", 2, [3.0], 0.5)
    record = json.loads((out / RESULTS_FILE).read_text().splitlines()[0])
    drawn = np.asarray(Image.open(out / record["image"])).astype(int)

    model = load_exported(model_dir)
    vae, text = model.encoders.build()
    expected = SamplerConfig(**{**RECOMMENDED, "steps": 2})
    states, masks = encode_prompts(text, [prompt])
    with torch.no_grad():
        latents = draw_latents(model.unet, model.schedule, states, masks, model.empty_caption, [record["seed"]],
                               model.latent_shape, expected)
        image = decode_images(vae, latents, model.scaling_factor, model.shift_factor)[0].astype(int)
    # the model's default guidance would have drawn another image: the check can tell settings apart
    with torch.no_grad():
        other = draw_latents(model.unet, model.schedule, states, masks, model.empty_caption, [record["seed"]],
                             model.latent_shape, dataclasses.replace(expected, guidance_rescale=0.0))
        other_image = decode_images(vae, other, model.scaling_factor, model.shift_factor)[0].astype(int)
    # the same draw up to float rounding (the actor runs torch on one thread), which an untrained model amplifies in
    # a few pixels; another guidance rescale moves the whole image
    near, far = np.abs(drawn - image).mean(), np.abs(drawn - other_image).mean()
    assert near < 0.05 and far > 20 * near, (near, far)

