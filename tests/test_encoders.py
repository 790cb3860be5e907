import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.encoders import (
    EMBEDDINGS_ONLY,
    FrozenTextEncoder,
    FrozenVAE,
    build_text_encoder,
    build_vae,
    create_open_clip,
    tiny_vae_config,
)

REPO = Path(__file__).resolve().parents[1]


def images(b=2, h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


@pytest.fixture(scope="module")
def vae():
    return build_vae("tiny", seed=0)


@pytest.fixture(scope="module")
def text():
    return build_text_encoder("tiny", seed=0)


def test_import_is_cheap():
    code = ("import sys, model.encoders, model.ema; "
            "bad = [m for m in ('diffusers', 'open_clip') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ---------------------------------------------------------------------------------- VAE

def test_tiny_vae_shapes_and_constants(vae):
    mean, logvar = vae.encode(images())
    assert mean.shape == logvar.shape == (2, 4, 16, 16)
    assert mean.dtype == logvar.dtype == torch.float32
    out = vae.decode(mean)
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert vae.id == "random:tiny:seed=0"
    assert (vae.scaling_factor, vae.shift_factor) == (1.0, 0.0)
    assert (vae.latent_channels, vae.downsample_factor) == (4, 4)
    assert vae.latent_shape(64, 32) == (4, 16, 8)
    assert not any(p.requires_grad for p in vae.module.parameters())
    assert not vae.module.training


def test_seeded_init_and_rng_untouched(vae):
    state = torch.get_rng_state()
    same, other = build_vae("tiny", seed=0), build_vae("tiny", seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    x = images(1)
    assert torch.equal(same.encode(x)[0], vae.encode(x)[0])
    assert not torch.equal(other.encode(x)[0], vae.encode(x)[0])
    assert other.id == "random:tiny:seed=1"


def test_constants_from_config_and_model_space_round_trip():
    cfg = {**tiny_vae_config(), "scaling_factor": 0.5, "shift_factor": 0.25}
    v = FrozenVAE.from_config(cfg)
    assert (v.scaling_factor, v.shift_factor) == (0.5, 0.25)
    assert v.id.startswith("random:") and v.id.endswith(":seed=0")
    z = torch.randn(2, 4, 16, 16)
    assert torch.allclose(v.to_model_space(z), (z - 0.25) * 0.5)
    assert torch.allclose(v.from_model_space(v.to_model_space(z)), z, atol=1e-6)


def test_sample_latents():
    mean, logvar = torch.randn(2, 4, 8, 8), torch.full((2, 4, 8, 8), -2.0)
    a = FrozenVAE.sample_latents(mean, logvar, torch.Generator().manual_seed(1))
    b = FrozenVAE.sample_latents(mean, logvar, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert (a - mean).std().item() == pytest.approx(torch.exp(torch.tensor(-1.0)).item(), rel=0.15)
    sharp = FrozenVAE.sample_latents(mean, torch.full_like(mean, -60.0))
    assert torch.allclose(sharp, mean, atol=1e-5)


def test_from_pretrained_matches_saved_model(vae, tmp_path):
    vae.module.save_pretrained(tmp_path / "pipe" / "vae")
    for path in (tmp_path / "pipe" / "vae", tmp_path / "pipe"):  # a pipeline dir works too
        loaded = FrozenVAE.from_pretrained(path)
        assert loaded.spec.scaling_factor == vae.scaling_factor
        assert (loaded.latent_channels, loaded.downsample_factor) == (4, 4)
        assert loaded.id.startswith(f"diffusers:{(tmp_path / 'pipe' / 'vae').resolve()}:")
        x = images(2, seed=3)
        m0, lv0 = vae.encode(x)
        m1, lv1 = loaded.encode(x)
        assert torch.equal(m0, m1) and torch.equal(lv0, lv1)
        assert torch.equal(vae.decode(m0), loaded.decode(m1))
    assert build_vae(tmp_path / "pipe").id == loaded.id
    with pytest.raises(FileNotFoundError, match="config.json"):
        FrozenVAE.from_pretrained(tmp_path / "missing")


def test_vae_rejects_bad_input(vae):
    with pytest.raises(ValueError, match=r"\(1, 1, 64, 64\)"):
        vae.encode(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\(1, 3, 62, 64\).*divisible.*4"):
        vae.encode(torch.zeros(1, 3, 62, 64))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        vae.encode(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match=r"B, 4, h, w.*\(1, 3, 16, 16\)"):
        vae.decode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="unknown VAE preset"):
        FrozenVAE.from_config("huge")


# ---------------------------------------------------------------------------------- text

def test_text_shapes_and_determinism(text):
    states, mask = text(["a red cube", "a red cube", "a blue sphere"])
    assert states.shape == (3, 77, 64) and states.dtype == torch.float32
    assert mask.shape == (3, 77) and mask.dtype == torch.bool
    # Bitwise: duplicates within a batch and the same batch run twice. Across different batch
    # sizes CPU matmul kernels may round differently, so only closeness is promised there.
    assert torch.equal(states[0], states[1])
    assert torch.equal(text(["a red cube", "a red cube", "a blue sphere"])[0], states)
    torch.testing.assert_close(text(["a red cube"])[0][0], states[0])
    assert not torch.allclose(states[0], states[2])
    assert (text.width, text.context_length, text.layer) == (64, 77, "penultimate")
    assert text.id == "open_clip:tiny:random:seed=0:layer=penultimate"


def test_text_mask_marks_real_tokens(text):
    captions = ["a red cube on the left", "", "hello!! world", "word " * 200]
    _, mask = text(captions)
    for caption, row in zip(captions[:3], mask):
        n_tokens = len(text.tokenizer.encode(caption)) + 2  # + SOT and EOT
        assert row.sum().item() == n_tokens
        assert row[:n_tokens].all() and not row[n_tokens:].any()
    assert mask[3].all()  # truncated to the context: every position is a real token


def test_layers_match_open_clip(text):
    # frozen like ours: nn.MultiheadAttention picks a different (fast-path) kernel otherwise
    clip = create_open_clip("tiny", seed=0).eval().requires_grad_(False)
    tokens, mask = text.tokenize(["a red cube", "two green circles"])
    last = build_text_encoder("tiny", layer="last")
    pen_states, _ = text(["a red cube", "two green circles"])
    last_states, _ = last(["a red cube", "two green circles"])
    assert not torch.allclose(pen_states, last_states)
    with torch.no_grad():
        # "last" + EOT pooling + projection must be exactly open_clip's encode_text
        eot = mask.sum(1) - 1
        pooled = last_states[torch.arange(2), eot] @ clip.text_projection
        torch.testing.assert_close(pooled, clip.encode_text(tokens))
        inter = clip.forward_intermediates(text=tokens, text_indices=[-2], intermediates_only=True,
                                           normalize_intermediates=True)["text_intermediates"]
    assert torch.equal(pen_states, inter[0])
    minus_two = build_text_encoder("tiny", layer=-2)
    assert torch.equal(minus_two(["a red cube", "two green circles"])[0], pen_states)


def test_embeddings_layer_keeps_each_word_to_itself(text):
    # "embeddings": no transformer block, so a word's state does not depend on the words before it;
    # after one (random) block it does. Position 4 holds "triangle" in both captions (SOT a small X triangle).
    emb = build_text_encoder("tiny", layer="embeddings")
    captions = ["a small blue triangle", "a small red triangle"]
    emb_states, _ = emb(captions)
    pen_states, _ = text(captions)
    assert emb.spec.block_index == EMBEDDINGS_ONLY and emb.id.endswith("layer=embeddings")
    assert torch.equal(emb_states[0, 4], emb_states[1, 4])
    assert not torch.allclose(pen_states[0, 4], pen_states[1, 4])
    assert not torch.allclose(emb_states[0, 3], emb_states[1, 3])  # the colour words themselves differ
    with torch.no_grad():
        tokens, _ = emb.tokenize(captions)
        tower = emb.tower
        expected = tower.ln_final(tower.token_embedding(tokens) + tower.positional_embedding)
    assert torch.equal(emb_states, expected)


def test_text_bad_arguments(text):
    with pytest.raises(TypeError, match="list of str"):
        text("a red cube")
    with pytest.raises(ValueError, match="out of range"):
        build_text_encoder("tiny", layer=3)
    with pytest.raises(ValueError, match="penultimate"):
        build_text_encoder("tiny", layer="middle")
    with pytest.raises(FileNotFoundError):
        build_text_encoder("tiny", weights="/nonexistent/open_clip_model.safetensors")


def test_text_weights_from_local_file(tmp_path):
    from safetensors.torch import save_file

    clip = create_open_clip("tiny", seed=7)
    torch.save(clip.state_dict(), tmp_path / "tiny.pt")
    save_file(clip.state_dict(), str(tmp_path / "tiny.safetensors"))
    reference = build_text_encoder("tiny", seed=7)
    random_other = build_text_encoder("tiny", seed=8)
    captions = ["a red cube", "a photo of a cat"]
    ref_states, ref_mask = reference(captions)
    assert not torch.equal(random_other(captions)[0], ref_states)
    for name in ("tiny.pt", "tiny.safetensors"):
        enc = build_text_encoder("tiny", weights=tmp_path / name, seed=123)  # seed unused
        states, mask = enc(captions)
        assert torch.equal(states, ref_states) and torch.equal(mask, ref_mask)
        assert enc.id.startswith(f"open_clip:tiny:file:{(tmp_path / name).resolve()}:")
    assert isinstance(enc, FrozenTextEncoder)
    assert not any(p.requires_grad for p in enc.tower.parameters())
