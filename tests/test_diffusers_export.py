"""The diffusers-format export (pipelines/inference/diffusers_export.py) and diffusers folders as sources.

Real components throughout: our export written by the training job's write_export, loaded back by diffusers'
StableDiffusionPipeline.from_pretrained offline, compared with our own draw path (pipelines/inference/draw.py);
transformers' CLIPTextModel/CLIPTokenizer against our open_clip text tower and open_clip's tokenizer.
Tiny random models in float32 on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import PRESETS, UNetConfig
from model.samplers import SamplerConfig
from model.schedule import ScheduleConfig
from tests.exports import PIXEL_TOL, compare_with_diffusers

TEXT_TOL = 1e-5  # CLIPTextModel vs our tower: the same float32 operations in another order
PROMPTS = ["a large red circle in the top left", "a small blue square in the center"]
SEEDS = [0, 1]
ROWS = [(p, s) for p in PROMPTS for s in SEEDS]
SAMPLERS = [  # (sampler, schedule): each diffusers scheduler the export can write, eps and v, zero terminal SNR
    # (with guidance rescale, as Lin et al. 2023 pair them)
    (SamplerConfig(name="dpmpp_2m", steps=6, guidance_scale=2.0), ScheduleConfig(prediction_type="v")),
    (SamplerConfig(name="ddim", steps=5, guidance_scale=3.0, timestep_spacing="leading", steps_offset=1),
     ScheduleConfig(prediction_type="eps")),
    (SamplerConfig(name="euler", steps=5, guidance_scale=2.0, guidance_rescale=0.7),
     ScheduleConfig(prediction_type="v", rescale_zero_terminal_snr=True)),
]


def _unet_config(latent_side: int, text_mask: bool = False) -> UNetConfig:
    return dataclasses.replace(PRESETS["tiny"], block_channels=(32, 64, 64), norm_groups=16, sample_size=latent_side,
                               text_mask=text_mask)


def _random_weights(cfg: UNetConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """The U-Net's own init plus seeded noise on every tensor, so that no output is trivially zero."""
    from model.unet import UNet

    gen = torch.Generator().manual_seed(seed)
    state = UNet(cfg).state_dict()
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    """Synthetic features made by precompute's own code with the tiny encoders at 32 px (text layer penultimate):
    shared by every export below, which differ only in the U-Net, schedule and sampler."""
    from pipelines.data.precompute.config import PrecomputeConfig
    from pipelines.synthetic.features import write_synthetic_features

    out = tmp_path_factory.mktemp("features")
    write_synthetic_features(str(out), rows=2, cfg=PrecomputeConfig(input_dir="synthetic", output_dir=str(out),
                                                                     image_size=32))
    return out


def _write_export(out: Path, features: Path, schedule: ScheduleConfig, sampler: SamplerConfig,
                  text_mask: bool = False) -> Path:
    """A tiny export of random weights, as the training job writes it."""
    from pipelines.core.config import to_dict
    from pipelines.data.loader import read_manifest
    from pipelines.inference.draw import EncoderSources
    from pipelines.inference.export import ExportInfo, write_export

    manifest = read_manifest(str(features))
    unet_cfg = _unet_config(manifest.latent_shape[-1], text_mask)
    info = ExportInfo(weights="ema", step=1, schedule=schedule, encoders=EncoderSources.from_manifest(manifest),
                      latent_shape=tuple(manifest.latent_shape), image_size=manifest.image_size,
                      scaling_factor=manifest.scaling_factor, shift_factor=manifest.shift_factor,
                      train_config={"samples": {"sampler": to_dict(sampler)}}, sampling=sampler)
    write_export(str(out), unet_cfg, _random_weights(unet_cfg), info, str(features), manifest)
    return out


@pytest.fixture(scope="module")
def exports(features, tmp_path_factory):
    """sampler name -> (our export, its diffusers folder), written on first use."""
    from pipelines.inference.diffusers_export import write_diffusers

    made: dict[str, tuple[Path, Path]] = {}

    def get(sampler: SamplerConfig, schedule: ScheduleConfig) -> tuple[Path, Path]:
        if sampler.name not in made:
            root = tmp_path_factory.mktemp(sampler.name)
            model = _write_export(root / "model", features, schedule, sampler)
            write_diffusers(model, str(root / "diffusers"))
            made[sampler.name] = model, root / "diffusers"
        return made[sampler.name]

    return get


# ----------------------------------------------------------------------------- export -> diffusers


@pytest.mark.parametrize("sampler,schedule", SAMPLERS, ids=[s.name for s, _ in SAMPLERS])
def test_pipeline_draws_our_images(exports, sampler, schedule):
    from pipelines.inference.export import load_index

    model, out = exports(sampler, schedule)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == load_index(model)["scaling_factor"]

    ours, theirs = compare_with_diffusers(model, out, sampler, ROWS)
    assert theirs.shape == ours.shape == (len(ROWS), 32, 32, 3)
    # the images are not all alike (a pipeline ignoring its prompt or latents would fail the comparison)
    assert np.abs(ours[0].astype(int) - ours[-1].astype(int)).max() > 10 * PIXEL_TOL


@pytest.mark.parametrize("sampler,schedule", SAMPLERS, ids=[s.name for s, _ in SAMPLERS])
def test_model_card_says_how_to_sample(exports, sampler, schedule):
    """README.md names the recommended steps, guidance_scale and guidance_rescale (no diffusers config holds them)
    in a pipe(...) call that runs as written on the folder."""
    from pipelines.inference.diffusers_export import MODEL_CARD, SCHEDULERS

    _, out = exports(sampler, schedule)
    card = (out / MODEL_CARD).read_text()
    call = (f"num_inference_steps={sampler.steps}, guidance_scale={sampler.guidance_scale}, "
            f"guidance_rescale={sampler.guidance_rescale})")
    assert call in card and SCHEDULERS[sampler.name] in card
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace("path/to/this/folder", str(out))
    scope: dict = {}
    exec(code, scope)  # the card's own snippet, run as a reader would
    assert scope["image"].size == (32, 32)  # a PIL image at the training size


def test_model_card_of_an_old_export(pipeline_folder, tmp_path):
    """Exports written before the manifest carried `sampling`: the train config's sampler, else the defaults."""
    import shutil

    from pipelines.inference.diffusers_export import MODEL_CARD, write_diffusers
    from pipelines.inference.export import INDEX_FILE

    model, _ = pipeline_folder
    recorded, default = SAMPLERS[0][0], SamplerConfig()
    for name, dropped, expected in [("no-sampling", ["sampling"], recorded),
                                    ("nothing", ["sampling", "train_config"], default)]:
        old = shutil.copytree(model, tmp_path / name)
        index = json.loads((old / INDEX_FILE).read_text())
        (old / INDEX_FILE).write_text(json.dumps({k: v for k, v in index.items() if k not in dropped}))
        write_diffusers(old, str(tmp_path / f"{name}-diffusers"))
        card = (tmp_path / f"{name}-diffusers" / MODEL_CARD).read_text()
        assert (f"num_inference_steps={expected.steps}, guidance_scale={expected.guidance_scale}, "
                f"guidance_rescale={expected.guidance_rescale})") in card
    assert (recorded.steps, recorded.guidance_scale) != (default.steps, default.guidance_scale)  # tells them apart


# ----------------------------------------------------------------------------- the text encoder and tokenizer


TEXT_PROMPTS = ["a large red circle in the top left", "", "A Small  BLUE square, in the centre.",
                "naïve café: 3.5 apples & «quotes»", "word " * 100]  # case, spacing, accents, truncation at 77


@pytest.mark.parametrize("layer", ["embeddings", "penultimate", "last"])
def test_clip_text_model_and_tokenizer_match_ours(tmp_path, layer):
    from transformers import CLIPTextModel, CLIPTokenizer

    from model.encoders import build_text_encoder
    from pipelines.inference.diffusers_export import (
        _portable_text_weights,
        _portable_tokenizer_files,
        _text_components,
    )

    ours = build_text_encoder("tiny", layer=layer)
    model, tokenizer = _text_components(ours)
    model.save_pretrained(tmp_path / "text_encoder")
    _portable_text_weights(tmp_path / "text_encoder", model)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    _portable_tokenizer_files(tmp_path / "tokenizer")
    model = CLIPTextModel.from_pretrained(tmp_path / "text_encoder", local_files_only=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer", local_files_only=True)

    ids = tokenizer(TEXT_PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids  # as StableDiffusionPipeline tokenizes
    our_ids, _ = ours.tokenize(TEXT_PROMPTS)
    assert torch.equal(ids, our_ids)
    assert ids.shape == (len(TEXT_PROMPTS), 77) and ids[-1, -1] == tokenizer.eos_token_id  # truncated, EOT kept
    assert ids[0, -1] == 0  # padded with open_clip's pad id
    with torch.no_grad():
        theirs = model(ids).last_hidden_state  # what the pipeline conditions on
    states, _ = ours(TEXT_PROMPTS)
    assert (theirs - states).abs().max().item() <= TEXT_TOL
    # the files transformers 4's CLIPTokenizer reads, with open_clip's whole vocabulary
    assert len(json.loads((tmp_path / "tokenizer" / "vocab.json").read_text())) == 49408
    # documented divergence, as in SD 2's tokenizer: "!" is the padding token, so a prompt's "!!" splits
    bang = tokenizer(["wow!!"], return_tensors="pt").input_ids[0, :3]
    assert not torch.equal(bang, ours.tokenize(["wow!!"])[0][0, :3])


def test_text_source_reads_a_transformers_clip_text_model(tmp_path):
    """A CLIPTextModel saved by transformers itself (SD 1 style: quick_gelu, padded with EOT) as our tower."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from model.encoders import build_text_encoder
    from pipelines.inference.diffusers_export import _clip_tokenizer

    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4,
                                         num_hidden_layers=2, hidden_act="quick_gelu")).eval()
    model.save_pretrained(tmp_path / "text_encoder")
    ours_tokenizer = _clip_tokenizer(build_text_encoder("tiny"))  # open_clip's vocabulary, padded with "!"
    CLIPTokenizer(vocab=ours_tokenizer.get_vocab(), merges=[tuple(m.split()) for m in _merges(ours_tokenizer)],
                  model_max_length=77).save_pretrained(tmp_path / "tokenizer")  # SD 1's: padded with <|endoftext|>
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer", local_files_only=True)

    ours = build_text_encoder(str(tmp_path), layer="last")
    ids = tokenizer(TEXT_PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours.tokenize(TEXT_PROMPTS)[0], ids) and ids[0, -1] == tokenizer.eos_token_id
    with torch.no_grad():
        theirs = model(ids).last_hidden_state
    assert (ours(TEXT_PROMPTS)[0] - theirs).abs().max().item() <= TEXT_TOL


def _merges(tokenizer) -> list[str]:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in spec]


# ----------------------------------------------------------------------------- diffusers folders as sources


@pytest.fixture(scope="module")
def pipeline_folder(exports):
    """(our export, its diffusers folder): the U-Net without the padding mask, text layer penultimate."""
    return exports(*SAMPLERS[0])


def test_pipeline_folder_is_an_init_from(pipeline_folder):
    from pipelines.inference.export import load_exported
    from pipelines.train import checkpoint
    from pipelines.train.config import ModelSettings, init_from_unet

    model, folder = pipeline_folder
    exported = load_exported(model)
    found = init_from_unet(str(folder))
    assert found.diffusers and found.folder == str(folder / "unet")
    assert ModelSettings(init_from=str(folder)).unet_config() == exported.unet.cfg
    weights = checkpoint.pretrained_weights(str(folder))
    ours = exported.unet.state_dict()
    assert weights.keys() == ours.keys() and all(torch.equal(weights[k], ours[k]) for k in ours)
    # the U-Net folder itself, and our own export (its unet/ in our format), are accepted too
    assert init_from_unet(str(folder / "unet")).diffusers
    assert not init_from_unet(str(model)).diffusers


def test_pipeline_folder_is_a_vae_and_text_source_for_precompute(pipeline_folder, features, tmp_path):
    """Precompute's own code (pipelines/synthetic/features.py calls it) with the pipeline folder as both encoders:
    the same latents and text states as the encoders the export was made from."""
    from safetensors.torch import load_file

    from model.encoders import build_text_encoder, build_vae
    from pipelines.data.loader import read_manifest
    from pipelines.data.precompute.config import PrecomputeConfig, TextEncoderConfig, VAEConfig
    from pipelines.data.schema import EMPTY_CAPTION_STATES
    from pipelines.inference.export import load_exported
    from pipelines.synthetic.features import write_synthetic_features

    model, folder = pipeline_folder
    exported = load_exported(model)
    cfg = PrecomputeConfig(input_dir="synthetic", output_dir=str(tmp_path / "f"), image_size=32,
                           vae=VAEConfig(source=str(folder)), text=TextEncoderConfig(model=str(folder), layer="last"))
    manifest = write_synthetic_features(str(tmp_path / "f"), rows=2, cfg=cfg)
    original = read_manifest(str(features))
    assert manifest.scaling_factor == original.scaling_factor and manifest.latent_shape == original.latent_shape
    ref = load_file(features / original.empty_caption_file)[EMPTY_CAPTION_STATES].float()
    new = load_file(tmp_path / "f" / manifest.empty_caption_file)[EMPTY_CAPTION_STATES].float()
    assert (new - ref).abs().max().item() <= 1e-2  # float16 features of the same states
    vae, text = exported.encoders.build()
    their_vae, their_text = build_vae(str(folder)), build_text_encoder(str(folder), layer="last")
    assert their_vae.scaling_factor == exported.scaling_factor
    z = torch.randn(2, *exported.latent_shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(their_vae.decode(z), vae.decode(z))
    assert torch.equal(their_text.tokenize(PROMPTS)[0], text.tokenize(PROMPTS)[0])
    assert (their_text(PROMPTS)[0] - text(PROMPTS)[0]).abs().max().item() <= TEXT_TOL


# ----------------------------------------------------------------------------- the command line


def test_cli_refuses_bad_input_with_exit_2_and_one_line(features, tmp_path, capsys):
    from pipelines.inference.diffusers_export import main

    (tmp_path / "not-a-model").mkdir()
    assert main([str(tmp_path / "not-a-model"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not an exported model" in err and not (tmp_path / "out").exists()

    sampler, schedule = SAMPLERS[0]
    masked = _write_export(tmp_path / "masked", features, schedule, sampler, text_mask=True)  # as the demo's U-Net
    assert main([str(masked), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--drop-text-mask" in err and not (tmp_path / "out").exists()
    assert main([str(masked), str(tmp_path / "out"), "--drop-text-mask"]) == 0
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["unet"] == ["diffusers",
                                                                                      "UNet2DConditionModel"]


def test_the_manifest_has_its_own_name_and_old_exports_still_load(pipeline_folder, tmp_path, capsys):
    import shutil

    from pipelines.inference.diffusers_export import main
    from pipelines.inference.export import INDEX_FILE, LEGACY_INDEX_FILE, load_index

    model, folder = pipeline_folder
    assert INDEX_FILE != LEGACY_INDEX_FILE and not (model / LEGACY_INDEX_FILE).exists()
    old = shutil.copytree(model, tmp_path / "old")  # an export written when the manifest was model_index.json
    (old / INDEX_FILE).rename(old / LEGACY_INDEX_FILE)
    assert load_index(old) == load_index(model)
    # a diffusers folder given where an export is expected: said so in one line, exit 2
    assert main([str(folder), str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "diffusers StableDiffusionPipeline folder" in err


def test_pipeline_folder_at_a_uri_is_an_init_from(pipeline_folder):
    """As on object storage (fsspec's memory://, a location that is no local path): found, converted, checked."""
    import uuid

    from pipelines.core import storage
    from pipelines.train import checkpoint
    from pipelines.train.config import init_from_unet

    model, folder = pipeline_folder
    location = f"memory://test-diffusers-{uuid.uuid4().hex}/sd"
    try:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            storage.write_bytes(storage.join(location, path.relative_to(folder).as_posix()), path.read_bytes())
        found = init_from_unet(location)
        assert found.diffusers and found.folder == storage.join(location, "unet")
        weights = checkpoint.pretrained_weights(location)
        assert all(torch.equal(weights[k], v) for k, v in checkpoint.pretrained_weights(str(folder)).items())
    finally:
        storage.remove_dir(location.rsplit("/", 1)[0])


def test_export_formats_are_checked_before_launch(features):
    from pipelines.core.config import ConfigError, load_config
    from pipelines.core.runtime import REPO_ROOT
    from pipelines.train.config import TrainConfig, validate_for_launch

    def launch(*overrides):
        small = ["batch.global_batch=2", "batch.micro_batch=1", "scaling.num_workers=1", f"features_dir={features}",
                 "model.overrides.sample_size=8"]
        return validate_for_launch(load_config(TrainConfig, REPO_ROOT / "configs" / "tiny-cpu.yaml",
                                               [*small, *overrides]))

    with pytest.raises(ConfigError, match="text_mask=true"):  # the tiny preset masks the padding
        launch("export_formats=[latentforge,diffusers]")
    with pytest.raises(ConfigError, match="export_formats must list 'latentforge'"):
        launch("export_formats=[diffusers]")
    launch("export_formats=[latentforge,diffusers]", "model.overrides.text_mask=false")
