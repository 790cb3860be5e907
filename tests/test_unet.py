import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from model.config import PRESETS, UNetConfig
from model.unet import Attention, UNet, timestep_embedding
from tests.test_convert import SD2_BASE_CONFIG, SD15_CONFIG


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def inputs(cfg: UNetConfig, batch: int = 2, side: int | None = None, tokens: int = 77):
    side = side or cfg.sample_size
    x = torch.randn(batch, cfg.in_channels, side, side)
    t = torch.randint(0, 1000, (batch,))
    context = torch.randn(batch, tokens, cfg.context_dim)
    return x, t, context


@pytest.mark.parametrize(
    "name,published_config,expected",
    [("sd15", SD15_CONFIG, 859_520_964), ("sd2-base", SD2_BASE_CONFIG, 865_910_724)],
    ids=["sd15", "sd2-base"],
)
def test_sd_presets_have_diffusers_parameter_counts(name, published_config, expected):
    """Our preset and diffusers' UNet2DConditionModel built from the model's published config.json have
    the same parameter count (both on the meta device: no memory, no init). The literal, the widely quoted
    count of the released U-Net, checks the reference config itself."""
    import diffusers

    with torch.device("meta"):
        ours = UNet(PRESETS[name])
        theirs = diffusers.UNet2DConditionModel(**published_config)
    assert count(theirs) == expected
    assert count(ours) == count(theirs)


def test_tiny_preset_is_a_few_million_parameters():
    assert 1_000_000 < count(UNet(PRESETS["tiny"])) < 10_000_000


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_shapes_and_dtypes(name):
    cfg = PRESETS[name]
    model = UNet(cfg).eval()
    x, t, context = inputs(cfg, batch=2, side=min(cfg.sample_size, 16), tokens=77)
    with torch.no_grad():
        out = model(x, t, context)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = model(x, t, context)
    assert out_bf16.shape == x.shape and out_bf16.dtype == torch.bfloat16
    assert (out_bf16.float() - out).abs().max() < 0.1 * out.abs().max() + 0.05


def test_bf16_weights_run(micro_cfg):
    model = UNet(micro_cfg).to(torch.bfloat16).eval()
    x, t, context = inputs(micro_cfg)
    with torch.no_grad():
        out = model(x.bfloat16(), t, context.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


def test_output_depends_on_time_and_text(micro_cfg):
    model = UNet(micro_cfg).eval()
    x, t, context = inputs(micro_cfg)
    with torch.no_grad():
        base = model(x, t, context)
        assert not torch.allclose(base, model(x, t + 100, context))
        assert not torch.allclose(base, model(x, t, torch.randn_like(context)))


def padding_inputs(cfg: UNetConfig):
    """Inputs with 4 real tokens of 10, and the same context with other padding states."""
    x, t, context = inputs(cfg, tokens=10)
    mask = torch.zeros(2, 10, dtype=torch.bool)  # (B, L)
    mask[:, :4] = True
    changed = context.clone()
    changed[:, 4:] = torch.randn(2, 6, cfg.context_dim)
    return x, t, context, changed, mask


def test_masked_tokens_are_ignored_with_text_mask(micro_cfg):
    model = UNet(dataclasses.replace(micro_cfg, text_mask=True)).eval()
    x, t, context, changed, mask = padding_inputs(micro_cfg)
    with torch.no_grad():
        a, b = model(x, t, context, mask), model(x, t, changed, mask)
        unmasked = model(x, t, changed)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, unmasked)


def test_padding_is_attended_without_text_mask(micro_cfg):
    assert not micro_cfg.text_mask  # the default, as Stable Diffusion
    model = UNet(micro_cfg).eval()
    x, t, context, changed, mask = padding_inputs(micro_cfg)
    with torch.no_grad():
        a, b = model(x, t, context, mask), model(x, t, changed, mask)
        assert torch.equal(a, model(x, t, context))  # the mask given is ignored
    assert not torch.allclose(a, b)  # the padding states reach the output


@pytest.mark.parametrize("text_mask", [False, True])
def test_attention_gets_a_mask_only_with_text_mask(micro_cfg, monkeypatch, text_mask):
    """No attn_mask lets SDPA pick its flash kernel: the U-Net must not pass one unless configured to."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        seen.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model = UNet(dataclasses.replace(micro_cfg, text_mask=text_mask)).eval()
    x, t, context, _, mask = padding_inputs(micro_cfg)
    with torch.no_grad():
        model(x, t, context, mask)
    n_cross = sum(isinstance(m, Attention) and m.is_cross for m in model.modules())
    assert n_cross > 0 and len(seen) == 2 * n_cross  # one self- and one cross-attention per transformer block
    masked = [m for m in seen if m is not None]
    assert len(masked) == (n_cross if text_mask else 0)  # text_mask: every cross-attention, no self-attention


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0, 5.0]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.allclose(emb[1, 0], torch.cos(torch.tensor(5.0)))


def test_scalar_timestep_broadcasts(micro_cfg):
    model = UNet(micro_cfg).eval()
    x, _, context = inputs(micro_cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor(500), context), model(x, torch.tensor([500, 500]), context))


def test_gradient_checkpointing_gives_same_gradients(micro_cfg):
    x, t, context = inputs(micro_cfg)
    plain = UNet(micro_cfg)
    ckpt = UNet(micro_cfg)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_gradient_checkpointing(True)
    for model in (plain, ckpt):
        model(x, t, context).square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert a.grad is not None and a.grad.abs().sum() > 0, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_channels_last_matches_contiguous(micro_cfg):
    model = UNet(micro_cfg).eval()
    x, t, context = inputs(micro_cfg)
    with torch.no_grad():
        ref = model(x, t, context)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last), t, context)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_traces_as_one_graph_for_torch_compile(micro_cfg):
    """fullgraph=True turns any graph break into an error; aot_eager also traces the backward. With the
    padding mask: the path with the most to trace."""
    model = UNet(dataclasses.replace(micro_cfg, text_mask=True))
    x, t, context = inputs(micro_cfg)
    mask = torch.ones(2, 77, dtype=torch.bool)
    ref = model(x, t, context, mask)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, t, context, mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
def test_runs_under_torch_compile_inductor(micro_cfg):
    """The default backend generates and builds C++ kernels: ~1-2 min on 2 cores with a cold cache."""
    model = UNet(micro_cfg).eval()
    x, t, context = inputs(micro_cfg)
    with torch.no_grad():
        ref = model(x, t, context)
        out = torch.compile(model, fullgraph=True)(x, t, context)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_save_and_load_pretrained_round_trip(micro_cfg, tmp_path):
    model = UNet(micro_cfg).eval()
    model.save_pretrained(tmp_path / "unet")
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == ["config.json", "model.safetensors"]
    loaded = UNet.from_pretrained(tmp_path / "unet").eval()
    assert loaded.cfg == micro_cfg
    x, t, context = inputs(micro_cfg)
    with torch.no_grad():
        assert torch.equal(model(x, t, context), loaded(x, t, context))


def test_from_pretrained_on_incomplete_dir_is_a_clear_error(micro_cfg, tmp_path):
    UNet(micro_cfg).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        UNet.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "make_bad,message",
    [
        (lambda x, t, c: (x, t, c[..., :-1]), "context_dim"),  # wrong context width
        (lambda x, t, c: (x[:, :3], t, c), r"x_t must be \(B, 4"),  # wrong channel count
        (lambda x, t, c: (x[..., :6, :6], t, c), "not divisible by 4"),  # 6 is not a multiple of 2**2
        (lambda x, t, c: (x, t[:1].repeat(3), c), "t must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(micro_cfg, make_bad, message):
    model = UNet(micro_cfg)
    with pytest.raises(ValueError, match=message):
        model(*make_bad(*inputs(micro_cfg)))


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="num_heads"):
        UNetConfig(block_channels=(32, 64), attention_levels=(True, True), num_heads=(2,))
    with pytest.raises(ValueError, match="norm_groups"):
        UNetConfig(block_channels=(48,), attention_levels=(True,), num_heads=(2,), norm_groups=32)
    cfg = PRESETS["sd2-base"]
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    assert UNetConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="unknown UNetConfig keys"):
        UNetConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_text_mask_defaults():
    assert not UNetConfig().text_mask  # as Stable Diffusion: flash attention, no padding mask
    assert [name for name, cfg in PRESETS.items() if cfg.text_mask] == ["tiny"]  # the demo's measured setting
    # A config saved before the option existed comes from a U-Net that always masked: it keeps masking.
    saved = {k: v for k, v in PRESETS["sd15"].to_dict().items() if k != "text_mask"}
    assert UNetConfig.from_dict(saved) == dataclasses.replace(PRESETS["sd15"], text_mask=True)


@pytest.mark.parametrize("text_mask", [False, True])
def test_save_pretrained_keeps_text_mask(micro_cfg, tmp_path, text_mask):
    cfg = dataclasses.replace(micro_cfg, text_mask=text_mask)
    UNet(cfg).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["text_mask"] is text_mask
    assert UNet.from_pretrained(tmp_path).cfg == cfg


def test_tiny_preset_fits_the_tiny_encoders():
    from model.encoders import build_text_encoder, build_vae

    cfg, text, vae = PRESETS["tiny"], build_text_encoder("tiny"), build_vae("tiny")
    assert text.width == cfg.context_dim
    assert vae.latent_channels == cfg.in_channels
    assert 64 // vae.downsample_factor == cfg.sample_size  # 64 px images -> the tiny U-Net's latents
    states, mask = text(["a small red circle in the top left", ""])
    z = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    with torch.no_grad():
        assert UNet(cfg)(z, torch.tensor([1, 999]), states, mask).shape == z.shape
