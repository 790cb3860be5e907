"""Helpers for tests of what reads an export: a tiny export with untrained weights, written by the training job's
own code (pipelines/inference/export.py), for evaluation, the MLflow model, refusals of damaged weights; and the
comparison of an export's draw with its diffusers pipeline folder's."""

from __future__ import annotations

from pathlib import Path


def write_untrained_export(root: Path, rows: int = 4, step: int = 1, run_name: str | None = None,
                           sampling: dict | None = None) -> Path:
    """root/features (synthetic features, `rows` rows) and root/model (the tiny preset's export, recommending the
    sampler settings `sampling`, SamplerConfig's defaults for the rest); returns the latter."""
    from model.config import PRESETS
    from model.samplers import SamplerConfig
    from model.unet import UNet
    from pipelines.data.loader import read_manifest
    from pipelines.inference.draw import EncoderSources
    from pipelines.inference.export import ExportInfo, write_export
    from pipelines.synthetic.features import write_synthetic_features
    from pipelines.train.objective import ObjectiveConfig

    features = root / "features"
    manifest = write_synthetic_features(str(features), rows=rows)
    info = ExportInfo(weights="ema", step=step, schedule=ObjectiveConfig().schedule_config(),
                      encoders=EncoderSources.from_manifest(read_manifest(str(features))),
                      latent_shape=tuple(manifest.latent_shape), image_size=manifest.image_size,
                      scaling_factor=manifest.scaling_factor, shift_factor=manifest.shift_factor, train_config={},
                      sampling=SamplerConfig(**(sampling or {})), run_name=run_name)
    write_export(str(root / "model"), PRESETS["tiny"], UNet(PRESETS["tiny"]).state_dict(), info, str(features),
                 manifest)
    return root / "model"


# A diffusers pipeline folder vs our draw path, same prompt / initial latents / steps / guidance, fp32 on CPU. What
# separates them is float rounding (other kernel orders, diffusers' scheduler tables in float32 where ours are
# float64) and the empty caption: ours is the precomputed one, stored in float16, diffusers encodes "" again in
# float32. Measured (float32, CPU, the tiny models of tests/test_diffusers_export.py): final latents within 2.5e-5
# (dpmpp_2m), 1.8e-4 (ddim, latents of std 5.9) and 1.0e-4 (euler); images at most 1 level apart, on under 0.1% of
# the pixel values.
LATENT_TOL = 1e-3  # max abs difference of the final latents (model space)
PIXEL_TOL = 1  # max difference of the uint8 images, in levels of 255: a rounding boundary, never more


def draw_ours(model_dir: Path, sampler, rows: list[tuple[str, int]]):
    """(latents (N, C, h, w), images (N, H, W, 3) uint8) from our draw path: one per (prompt, seed) row."""
    from pipelines.inference.draw import decode_images, draw_latents, encode_prompts
    from pipelines.inference.export import load_exported

    exported = load_exported(model_dir)
    vae, text = exported.encoders.build()
    states, masks = encode_prompts(text, [p for p, _ in rows])
    latents = draw_latents(lambda x, t, c, m: exported.unet(x, t, c, m), exported.schedule, states, masks,
                           exported.empty_caption, [s for _, s in rows], exported.latent_shape, sampler)
    return latents, decode_images(vae, latents, exported.scaling_factor, exported.shift_factor)


def draw_with_diffusers(pipeline_dir: Path, sampler, latent_shape: tuple[int, ...], rows: list[tuple[str, int]]):
    """The same from diffusers' StableDiffusionPipeline loaded offline, all rows in one call (each row starts from
    its seed's latents, as ours do)."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    from model.samplers import initial_noise

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    final = {}

    def keep_latents(pipe, step, timestep, tensors):  # the last step's latents: what the VAE then decodes
        final["latents"] = tensors["latents"].clone()
        return tensors

    pixels = pipe([p for p, _ in rows], num_inference_steps=sampler.steps, guidance_scale=sampler.guidance_scale,
                  guidance_rescale=sampler.guidance_rescale,
                  latents=torch.cat([initial_noise((1, *latent_shape), s) for _, s in rows]), output_type="np",
                  callback_on_step_end=keep_latents).images  # (N, H, W, 3) float in [0, 1]
    return final["latents"], (pixels * 255.0).round().clip(0, 255).astype(np.uint8)


def compare_with_diffusers(model_dir: Path, pipeline_dir: Path, sampler, rows: list[tuple[str, int]]):
    """Draw `rows` with our export at model_dir and with its diffusers folder at pipeline_dir; assert the final
    latents within LATENT_TOL and the images within PIXEL_TOL. Returns (ours, theirs) images (N, H, W, 3) uint8."""
    import numpy as np

    from pipelines.inference.export import load_index

    latent_shape = tuple(load_index(model_dir)["latent_shape"])
    ours_latents, ours = draw_ours(model_dir, sampler, rows)
    theirs_latents, theirs = draw_with_diffusers(pipeline_dir, sampler, latent_shape, rows)
    latent_err = (theirs_latents - ours_latents).abs().max().item()
    pixel_err = int(np.abs(theirs.astype(int) - ours.astype(int)).max())
    assert latent_err <= LATENT_TOL, latent_err
    assert pixel_err <= PIXEL_TOL, pixel_err
    return ours, theirs
