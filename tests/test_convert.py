"""Weights convert between diffusers' UNet2DConditionModel and ours, exactly."""

import dataclasses
import json

import diffusers
import pytest
import torch

from model.config import PRESETS
from model.convert import (
    ConversionError,
    config_from_diffusers,
    config_to_diffusers,
    convert_to_diffusers,
    from_diffusers_state,
    main,
    to_diffusers_state,
)
from model.unet import UNet

TOLERANCE = 1e-4  # max abs difference in fp32 (the acceptance bound)

SD1_STYLE = dict(  # conv projections, one head count for every level
    sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=48, norm_num_groups=8, attention_head_dim=4, use_linear_projection=False,
)
SD2_STYLE = dict(  # linear projections, head width 16 (heads per level), deeper transformers
    sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=40, norm_num_groups=16, attention_head_dim=(2, 4, 4), use_linear_projection=True,
    transformer_layers_per_block=2,
)
# The published SD U-Net configs (the fields that define the architecture).
SD15_CONFIG = dict(
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, in_channels=4, out_channels=4, sample_size=64,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
SD2_BASE_CONFIG = {**SD15_CONFIG, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                   "use_linear_projection": True}


def random_diffusers_unet(config: dict) -> torch.nn.Module:
    model = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():  # default init leaves outputs tiny; widen so the comparison means something
        for p in model.parameters():
            p.normal_(0.0, 0.1 if p.ndim > 1 else 0.05)
    return model


def model_inputs(context_dim: int):
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([3, 871])
    context = torch.randn(2, 9, context_dim)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    return x, t, context, mask


@pytest.mark.parametrize("config", [SD1_STYLE, SD2_STYLE], ids=["sd1-style", "sd2-style"])
def test_converted_model_matches_diffusers(config):
    theirs = random_diffusers_unet(config)
    cfg = config_from_diffusers(dict(theirs.config))
    ours = UNet(cfg).eval()
    ours.load_state_dict(from_diffusers_state(theirs.state_dict(), cfg))
    x, t, context, mask = model_inputs(cfg.context_dim)
    masking = UNet(dataclasses.replace(cfg, text_mask=True)).eval()
    masking.load_state_dict(ours.state_dict())
    with torch.no_grad():
        expected = theirs(x, t, context).sample
        assert expected.abs().mean() > 0.02  # a real signal, not near-zero outputs
        assert (ours(x, t, context) - expected).abs().max() < TOLERANCE
        assert torch.equal(ours(x, t, context, mask), ours(x, t, context))  # as SD: the padding is attended
        expected_masked = theirs(x, t, context, encoder_attention_mask=mask.float()).sample
        assert (masking(x, t, context, mask) - expected_masked).abs().max() < TOLERANCE


@pytest.mark.parametrize("config", [SD1_STYLE, SD2_STYLE], ids=["sd1-style", "sd2-style"])
def test_round_trip_gives_identical_tensors(config):
    theirs = random_diffusers_unet(config)
    cfg = config_from_diffusers(dict(theirs.config))
    original = theirs.state_dict()
    back = to_diffusers_state(from_diffusers_state(original, cfg), cfg)
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert back[key].shape == tensor.shape and torch.equal(back[key], tensor), key


@pytest.mark.parametrize("config,preset", [(SD15_CONFIG, "sd15"), (SD2_BASE_CONFIG, "sd2-base")])
def test_published_sd_configs_read_as_our_presets(config, preset):
    assert config_from_diffusers(config) == PRESETS[preset]


def test_config_writes_back_for_diffusers():
    cfg = PRESETS["sd2-base"]
    assert config_from_diffusers(config_to_diffusers(cfg)) == cfg


@pytest.mark.parametrize("config", [SD1_STYLE, SD2_STYLE, SD15_CONFIG], ids=["sd1-style", "sd2-style", "sd15"])
def test_converted_configs_attend_to_padding(config):
    assert config_from_diffusers(config).text_mask is False


def test_a_padding_mask_is_refused_for_diffusers(micro_cfg, tmp_path):
    UNet(dataclasses.replace(micro_cfg, text_mask=True)).save_pretrained(tmp_path / "ours")
    with pytest.raises(ConversionError, match="text_mask"):
        convert_to_diffusers(tmp_path / "ours", tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_missing_and_unknown_keys_are_listed():
    theirs = random_diffusers_unet(SD1_STYLE)
    cfg = config_from_diffusers(dict(theirs.config))
    state = dict(theirs.state_dict())
    state.pop("conv_in.weight")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"missing keys \(1\): \['conv_in.weight'\][\s\S]*unknown keys \(1\): \['extra.weight'\]"):
        from_diffusers_state(state, cfg)


def test_unsupported_diffusers_options_are_rejected():
    with pytest.raises(ConversionError, match="class_embed_type"):
        config_from_diffusers({**SD1_STYLE, "class_embed_type": "timestep"})
    with pytest.raises(ConversionError, match="down_block_types"):
        config_from_diffusers({**SD1_STYLE, "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 3})


def test_command_line_both_ways(tmp_path, capsys):
    theirs = random_diffusers_unet(SD2_STYLE)
    theirs.save_pretrained(tmp_path / "diffusers")  # config.json + diffusion_pytorch_model.safetensors
    assert main(["from-diffusers", str(tmp_path / "diffusers"), str(tmp_path / "ours")]) == 0
    ours = UNet.from_pretrained(tmp_path / "ours").eval()
    assert main(["to-diffusers", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "back").eval()
    x, t, context, _ = model_inputs(ours.cfg.context_dim)
    with torch.no_grad():
        expected = theirs(x, t, context).sample
        assert (ours(x, t, context) - expected).abs().max() < TOLERANCE
        assert torch.equal(back(x, t, context).sample, expected)
    assert "converted" in capsys.readouterr().out
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["text_mask"] is False


def test_command_line_refuses_a_model_saved_without_text_mask(tmp_path, capsys):
    """A config.json from before the option reads as text_mask=True (it was trained masked): refused."""
    theirs = random_diffusers_unet(SD1_STYLE)
    theirs.save_pretrained(tmp_path / "diffusers")
    assert main(["from-diffusers", str(tmp_path / "diffusers"), str(tmp_path / "ours")]) == 0
    config_file = tmp_path / "ours" / "config.json"
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items()
                                       if k != "text_mask"}))
    assert UNet.from_pretrained(tmp_path / "ours").cfg.text_mask
    assert main(["to-diffusers", str(tmp_path / "ours"), str(tmp_path / "back")]) == 2
    assert "text_mask" in capsys.readouterr().err
    assert not (tmp_path / "back").exists()  # nothing half-written


def test_command_line_reports_missing_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(SD1_STYLE))
    assert main(["from-diffusers", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "diffusion_pytorch_model.safetensors" in capsys.readouterr().err
