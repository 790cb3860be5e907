"""The diffusers-format copy of an exported model: a Stable Diffusion pipeline folder that loads anywhere.

    python -m pipelines.inference.diffusers_export runs/tiny-cpu/export runs/tiny-cpu/export-diffusers

    pipe = StableDiffusionPipeline.from_pretrained("runs/tiny-cpu/export-diffusers", local_files_only=True)

    <out_dir>/
      model_index.json      diffusers' pipeline index (safety_checker / feature_extractor null)
      unet/                 UNet2DConditionModel (model/convert.py)
      vae/                  AutoencoderKL, its config's scaling_factor = the export's (the manifest decides)
      text_encoder/         CLIPTextModel: our open_clip tower cut after the block we condition on
                            (model/convert_text.py), weights under transformers' "text_model." names
      tokenizer/            CLIPTokenizer: open_clip's own BPE vocabulary, padded with its pad id (0, "!")
      scheduler/            the diffusers scheduler equal to the export's recommended sampler, on the
                            training schedule (eps/v, betas, zero terminal SNR)
      README.md             model card: how to sample, with the recommended steps, guidance_scale and
                            guidance_rescale, which no diffusers config can hold (pipe(...) arguments)

The pipeline then draws what pipelines/inference/draw.py draws for the same prompt, initial latents, steps
and guidance (tests/test_diffusers_export.py states the tolerance). Two things a diffusers config cannot
say are refused rather than approximated: a U-Net that masks padding tokens (text_mask; --drop-text-mask
exports it attending to them, knowingly) and a VAE shift_factor (SD pipelines decode latents / scaling_factor).
Written into a temporary folder and published with model_index.json last, like the export itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from model.convert import ConversionError, config_to_diffusers, to_diffusers_state
from model.convert_text import HF_PREFIX, TextConversionError, clip_text_config, kept_blocks, to_clip_text_state
from model.samplers import SamplerConfig
from model.schedule import ScheduleConfig

PIPELINE_INDEX = "model_index.json"  # diffusers' name; our own export's manifest is export.INDEX_FILE
MODEL_CARD = "README.md"  # the Hugging Face Hub's model card file
DIFFUSERS_EXPORT_DIR = "export-diffusers"  # next to a training run's export/
TEXT_WEIGHTS = "model.safetensors"
# Our sampler -> the diffusers scheduler that reproduces it (model/samplers.py, tests/test_samplers.py).
SCHEDULERS = {"ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}


class DiffusersExportError(ValueError):
    pass


def scheduler_settings(schedule: ScheduleConfig, sampler: SamplerConfig) -> tuple[str, dict[str, Any]]:
    """(diffusers scheduler class name, its config) for our training schedule and sampler."""
    common = {"num_train_timesteps": schedule.num_train_timesteps, "beta_start": schedule.beta_start,
              "beta_end": schedule.beta_end, "beta_schedule": BETA_SCHEDULES[schedule.beta_schedule],
              "prediction_type": PREDICTION_TYPES[schedule.prediction_type],
              "rescale_betas_zero_snr": schedule.rescale_zero_terminal_snr,
              "timestep_spacing": sampler.timestep_spacing,
              # only "leading" adds the offset; SD pipelines reset any other value to 1 on load, with a warning
              "steps_offset": sampler.steps_offset if sampler.timestep_spacing == "leading" else 1}
    if sampler.name == "ddim":
        return SCHEDULERS["ddim"], {**common, "clip_sample": False, "set_alpha_to_one": True}
    if sampler.name == "dpmpp_2m":
        return SCHEDULERS["dpmpp_2m"], {**common, "algorithm_type": "dpmsolver++", "solver_order": 2}
    return SCHEDULERS["euler"], common


def model_card(index: dict[str, Any], sampler: SamplerConfig) -> str:
    """README.md of the pipeline folder: the sampling settings that diffusers takes per call, not from a config."""
    scheduler = SCHEDULERS[sampler.name]
    source = f"training run {index['run_name']!r}, " if index.get("run_name") else ""
    call = (f'image = pipe("a prompt", num_inference_steps={sampler.steps!r}, '
            f"guidance_scale={sampler.guidance_scale!r}, guidance_rescale={sampler.guidance_rescale!r}).images[0]")
    lines = ["---", "library_name: diffusers", "pipeline_tag: text-to-image", "tags: [stable-diffusion, text-to-image]",
             "---", "", "# Text-to-image latent diffusion model", "",
             f"A StableDiffusionPipeline folder ({source}step {index.get('step')}, {index.get('weights')} weights), "
             "written by `python -m pipelines.inference.diffusers_export` from this project's export.", "",
             "## How to sample", "",
             f"The recommended settings: {sampler.name} ({scheduler}, already in `scheduler/`), "
             f"{sampler.steps} steps, guidance_scale {sampler.guidance_scale!r}, guidance_rescale "
             f"{sampler.guidance_rescale!r}. A diffusers config cannot hold the last three: pass them to every call.",
             "", "```python", "from diffusers import StableDiffusionPipeline", "",
             'pipe = StableDiffusionPipeline.from_pretrained("path/to/this/folder")', call, "```"]
    if sampler.guidance_scale < 1:
        lines += ["", f"diffusers skips classifier-free guidance for guidance_scale <= 1, so at "
                  f"{sampler.guidance_scale!r} its images differ from this project's sampler, which guides for any "
                  "scale other than 1."]
    return "\n".join(lines) + "\n"


def write_diffusers(model_dir: str | Path, out_dir: str, drop_text_mask: bool = False) -> None:
    """Write the diffusers pipeline folder of the export at model_dir (local) to out_dir (local path or URI)."""
    from pipelines.inference.export import load_exported, publish

    exported = load_exported(model_dir)
    unet_cfg = exported.unet.cfg
    if unet_cfg.text_mask and not drop_text_mask:
        raise DiffusersExportError(
            f"{model_dir}: its U-Net masks padding tokens out of cross-attention (text_mask=true), which a diffusers "
            "pipeline cannot do (it attends to all 77 tokens), so its images would differ from ours: train with "
            "model.overrides.text_mask=false, or pass --drop-text-mask to export it attending to the padding")
    if exported.shift_factor != 0.0:
        raise DiffusersExportError(f"{model_dir}: VAE shift_factor {exported.shift_factor} is not 0, and Stable "
                                   "Diffusion pipelines decode latents / scaling_factor without a shift")
    vae, text = exported.encoders.build()
    sampler = exported.sampler  # the manifest's recommended sampling settings (old exports: their fallback)
    with tempfile.TemporaryDirectory(prefix="diffusers-export-") as tmp:
        local = Path(tmp) / "pipeline"
        pipeline = _pipeline(exported, vae, text, unet_cfg, sampler)
        pipeline.save_pretrained(local, safe_serialization=True)
        _portable_text_weights(local / "text_encoder", pipeline.text_encoder)
        _portable_tokenizer_files(local / "tokenizer")
        (local / MODEL_CARD).write_text(model_card(exported.index, sampler), encoding="utf-8")
        publish(local, out_dir, last=PIPELINE_INDEX)


def _pipeline(exported: Any, vae: Any, text: Any, unet_cfg: Any, sampler: SamplerConfig):
    import dataclasses

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers import schedulers as diffusers_schedulers

    side = exported.latent_shape[-1]  # the pipeline's default size is sample_size * the VAE's factor
    unet = UNet2DConditionModel.from_config(config_to_diffusers(dataclasses.replace(unet_cfg, sample_size=side)))
    unet.load_state_dict(to_diffusers_state(exported.unet.state_dict(), unet_cfg))
    vae.module.register_to_config(scaling_factor=exported.scaling_factor)  # the manifest's, whatever the copy says
    name, settings = scheduler_settings(exported.schedule.config, sampler)
    scheduler = getattr(diffusers_schedulers, name).from_config(settings)
    text_encoder, tokenizer = _text_components(text)
    return StableDiffusionPipeline(vae=vae.module, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _text_components(text: Any):
    """(CLIPTextModel, CLIPTokenizer) equal to our FrozenTextEncoder: same states, same token ids."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _clip_tokenizer(text)
    config = clip_text_config(text.tower, text.spec.block_index, tokenizer.bos_token_id, tokenizer.eos_token_id,
                              tokenizer.pad_token_id)
    model = CLIPTextModel(CLIPTextConfig(**config)).eval()
    state = to_clip_text_state(text.tower.state_dict(), kept_blocks(text.spec.block_index))
    if not any(k.startswith(HF_PREFIX) for k in model.state_dict()):  # transformers 5 names them without it
        state = {k[len(HF_PREFIX):]: v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model, tokenizer


def _clip_tokenizer(text: Any):
    """A CLIPTokenizer with the vocabulary, merges and padding of the text encoder's own tokenizer."""
    from transformers import CLIPTokenizer

    source = text.tokenizer
    if hasattr(source, "tokenizer") and isinstance(source.tokenizer, CLIPTokenizer):
        return source.tokenizer  # the encoder came from a diffusers folder: its tokenizer as it was
    if not (hasattr(source, "encoder") and hasattr(source, "bpe_ranks")):
        raise TextConversionError(f"text tokenizer {type(source).__name__} is not open_clip's BPE tokenizer")
    vocab = dict(source.encoder)
    decoder = {i: token for token, i in vocab.items()}
    # open_clip's names for the two special tokens -> CLIP's (same ids)
    vocab["<|startoftext|>"] = vocab.pop(decoder[source.sot_token_id])
    vocab["<|endoftext|>"] = vocab.pop(decoder[source.eot_token_id])
    merges = [pair for pair, _ in sorted(source.bpe_ranks.items(), key=lambda item: item[1])]
    # open_clip pads with id 0 ("!"), as SD 2's tokenizer does: a prompt's own "!" then tokenizes as that
    # special token in the CLIPTokenizer (docs/model.md)
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=decoder[0], model_max_length=text.context_length)


def _portable_text_weights(text_dir: Path, model: Any) -> None:
    """The text encoder's weights under "text_model." names, as SD 1/2 pipeline folders and every transformers
    version read them (transformers 5 would save them without the prefix, which 4.x loads as missing)."""
    from safetensors.torch import save_file

    state = {k if k.startswith(HF_PREFIX) else HF_PREFIX + k: v.contiguous() for k, v in model.state_dict().items()}
    for path in text_dir.glob("*.safetensors*"):
        path.unlink()  # a sharded save and its index, if transformers wrote one
    (text_dir / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(state, text_dir / TEXT_WEIGHTS, metadata={"format": "pt"})


def _portable_tokenizer_files(tokenizer_dir: Path) -> None:
    """vocab.json and merges.txt beside tokenizer.json: the files CLIPTokenizer reads in transformers 4."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    (tokenizer_dir / "vocab.json").write_text(json.dumps(spec["vocab"], ensure_ascii=False))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.inference.diffusers_export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", help="a model directory written by jobs/train_unet.py (<run>/export)")
    parser.add_argument("out_dir", help="the diffusers pipeline folder to write (replaced if it exists)")
    parser.add_argument("--drop-text-mask", action="store_true",
                        help="export a U-Net trained with text_mask=true; diffusers then attends to padding tokens "
                             "the model never attended to, and its images differ from ours")
    args = parser.parse_args(argv)
    try:
        write_diffusers(args.export_dir, args.out_dir, drop_text_mask=args.drop_text_mask)
    except (DiffusersExportError, ConversionError, TextConversionError, FileNotFoundError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"wrote a diffusers StableDiffusionPipeline folder -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
