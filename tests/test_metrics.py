"""Evaluation metrics: the synthetic-caption checker against the renderer (clean, degraded, blank,
noise), accuracy aggregation per split, and CLIP score / FID with small random-initialised networks."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch import nn

from model.encoders import create_open_clip
from pipelines.eval.metrics import MetricResult, clip_score, clip_scores, fid, load_clip
from pipelines.synthetic.checker import (
    ATTRIBUTE_NAMES,
    SQUARE_MIN_CORNER_FILL,
    TRIANGLE_MAX_TOP_FRACTION,
    read_attributes,
    score_image,
    synthetic_accuracy,
)
from pipelines.synthetic.shapes import (
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Attributes,
    all_attributes,
    all_captions,
    caption_for,
    held_out_attributes,
    render,
    training_attributes,
)

IMAGE_SIZES = (32, 64, 128)
VALUES = {"shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES), "position": POSITIONS}


def degrade(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """What a small diffusion model behind a small VAE draws: soft edges, faint noise, a colour cast."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float64)  # (H, W, 3)
    noisy = blurred + rng.normal(0.0, 8.0, blurred.shape) + np.array([8.0, -6.0, 5.0])
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------ the checker


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
def test_checker_reads_back_every_rendered_combination(image_size):
    for attrs in all_attributes():
        read = read_attributes(np.asarray(render(attrs, image_size)))
        assert read is not None and read.attributes == attrs, (attrs, read)
        # the cues sit clear of their thresholds, not just on the right side
        if attrs.shape == "triangle":
            assert read.top_fraction <= TRIANGLE_MAX_TOP_FRACTION - 0.1
        else:
            assert read.top_fraction == pytest.approx(0.5, abs=0.01)
            assert read.corner_fill == (1.0 if attrs.shape == "square" else 0.0)
        assert read.color_distance == 0.0


def _drawn(mask: np.ndarray, color=COLORS["blue"]) -> np.ndarray:
    """A (H, W) mask as a shape of `color` on white, with the soft edge a decoder gives."""
    image = Image.fromarray(np.where(mask[..., None], np.array(color, np.uint8), np.uint8(255)))
    return np.asarray(image.filter(ImageFilter.GaussianBlur(0.6)))


def _rounded_square(side: int, radius: float, canvas: int = 64) -> np.ndarray:
    """(canvas, canvas) mask of a side x side square whose corners are rounded with `radius` pixels."""
    ys, xs = np.mgrid[0:canvas, 0:canvas] + 0.5
    half, center = side / 2, canvas / 2
    dx = np.clip(np.abs(xs - center) - (half - radius), 0, None)  # distance past the straight part
    dy = np.clip(np.abs(ys - center) - (half - radius), 0, None)
    return (np.abs(xs - center) < half) & (np.abs(ys - center) < half) & (dx ** 2 + dy ** 2 <= radius ** 2)


def test_a_square_with_dented_sides_is_still_a_square():
    # What the demo's model draws for small squares (10 px on a 32 px canvas, 2.5 latent pixels): the
    # corners are there, the middle of a side is dented. The fill ratio of the box drops under the
    # circle/square midpoint; the corners, where the two shapes differ, still say square.
    dents = np.zeros((32, 32), dtype=bool)  # one pixel deep, four wide, in the middle of each side
    dents[14:18, [11, 20]] = dents[[11, 20], 14:18] = True
    read = read_attributes(_drawn(_rounded_square(10, 0.0, canvas=32) & ~dents))
    fill_ratio_midpoint = (np.pi / 4 + 1) / 2  # midway between a circle's and a square's fill of their box
    assert read.shape == "square" and read.fill_ratio < fill_ratio_midpoint < read.corner_fill


@pytest.mark.parametrize("radius_fraction, shape", [(0.0, "square"), (0.15, "square"), (0.3, "square"),
                                                    (0.42, "circle"), (0.5, "circle")])
def test_rounded_corners_turn_a_square_into_a_circle_past_the_midpoint(radius_fraction, shape):
    # A square with corners rounded by r sits nearer the square than the circle (pixels of the corners
    # kept vs lost) until r ~ 0.35 of the side, where half of each corner is gone.
    read = read_attributes(_drawn(_rounded_square(30, radius_fraction * 30)))
    assert read.shape == shape, (radius_fraction, read.corner_fill)
    assert abs(read.corner_fill - SQUARE_MIN_CORNER_FILL) >= 0.1


def test_score_image_scores_the_generators_images_at_100_percent_whatever_the_caption_form():
    scores = [score_image(render(attrs), caption) for attrs in all_attributes()[::7] for caption in all_captions(attrs)]
    assert all(s["in_vocabulary"] and s["all_correct"] for s in scores)
    assert all(s[name] is True for s in scores for name in ATTRIBUTE_NAMES)


def test_each_attribute_can_be_scored_wrong_on_its_own():
    for attrs in all_attributes()[::5]:
        image = np.asarray(render(attrs))
        for name in ATTRIBUTE_NAMES:
            values = VALUES[name]
            other = values[(values.index(getattr(attrs, name)) + 1) % len(values)]
            score = score_image(image, caption_for(dataclasses.replace(attrs, **{name: other})))
            assert score[name] is False and score["all_correct"] is False
            assert all(score[n] is True for n in ATTRIBUTE_NAMES if n != name)


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
def test_checker_survives_blur_noise_and_a_colour_cast(image_size):
    rng = np.random.default_rng(image_size)
    hits = [read_attributes(degrade(render(a, image_size), rng)) for a in all_attributes()]
    correct = [read is not None and read.attributes == a for read, a in zip(hits, all_attributes())]
    assert np.mean(correct) >= 0.95


def test_blank_and_noise_images_score_wrong_on_every_attribute():
    blank = np.full((64, 64, 3), 255, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for image in (blank, noise):
        assert read_attributes(image) is None
        scores = [score_image(image, caption_for(a)) for a in all_attributes()]
        assert synthetic_accuracy(scores)["overall"] == {"count": 180, **dict.fromkeys(ATTRIBUTE_NAMES, 0.0),
                                                         "all_correct": 0.0}


def test_grey_clutter_has_no_colour_so_it_is_never_all_correct():
    # Faint grey noise leaves a ragged grey blob: it gets a shape and a place, but no named colour.
    faint = np.clip(255 - np.abs(np.random.default_rng(1).normal(0, 40, (64, 64, 3))), 0, 255).astype(np.uint8)
    read = read_attributes(faint)
    assert read is not None and read.color is None and read.attributes is None
    overall = synthetic_accuracy([score_image(faint, caption_for(a)) for a in all_attributes()])["overall"]
    assert overall["color"] == 0.0 and overall["all_correct"] == 0.0


def test_checker_is_deterministic_and_takes_pil_images():
    image = render(Attributes("triangle", "orange", "small", "bottom right"))
    assert read_attributes(image) == read_attributes(np.asarray(image)) == read_attributes(np.asarray(image))


@pytest.mark.parametrize("bad", [np.zeros((64, 48, 3), np.uint8), np.zeros((64, 64), np.uint8),
                                 np.zeros((64, 64, 3), np.float32), [[0, 0, 0]]])
def test_checker_rejects_images_it_cannot_read_naming_them(bad):
    with pytest.raises((TypeError, ValueError), match="image|square"):
        read_attributes(bad)


# ------------------------------------------------------------------------------------ aggregation


def _score(split, *, shape=True, color=True, size=True, position=True):
    hits = {"shape": shape, "color": color, "size": size, "position": position}
    return {"in_vocabulary": True, "split": split, **hits, "all_correct": all(hits.values()), "prompt": "x"}


def test_accuracy_splits_seen_and_held_out_and_counts_prompts_outside_the_vocabulary():
    out = {"in_vocabulary": False, "split": None, **dict.fromkeys(ATTRIBUTE_NAMES), "all_correct": None}
    scores = [_score("seen"), _score("seen", color=False), _score("seen", shape=False, size=False), _score("seen"),
              _score("held_out", position=False), _score("held_out"), out, out]
    report = synthetic_accuracy(scores)
    assert report["images"] == 8 and report["out_of_vocabulary"] == 2
    assert report["seen"] == {"count": 4, "shape": 0.75, "color": 0.75, "size": 0.75, "position": 1.0,
                              "all_correct": 0.5}
    assert report["held_out"] == {"count": 2, "shape": 1.0, "color": 1.0, "size": 1.0, "position": 0.5,
                                  "all_correct": 0.5}
    assert report["overall"]["count"] == 6 and report["overall"]["all_correct"] == pytest.approx(3 / 6)


def test_score_image_puts_held_out_pairs_in_their_split_and_skips_unknown_prompts():
    seen, held = training_attributes()[0], held_out_attributes()[0]
    scores = [score_image(render(seen), caption_for(seen)), score_image(render(held), caption_for(held)),
              score_image(render(held), "a photo of a dog")]
    assert [s["split"] for s in scores] == ["seen", "held_out", None]
    assert scores[2]["in_vocabulary"] is False and scores[2]["all_correct"] is None
    report = synthetic_accuracy(scores)
    assert (report["seen"]["count"], report["held_out"]["count"], report["out_of_vocabulary"]) == (1, 1, 1)
    assert report["held_out"]["all_correct"] == 1.0


def test_accuracy_of_an_empty_split_is_none_and_bad_records_are_named():
    report = synthetic_accuracy([_score("seen")])
    assert report["held_out"] == {"count": 0, **dict.fromkeys((*ATTRIBUTE_NAMES, "all_correct"))}
    with pytest.raises(KeyError, match="score 1 lacks"):
        synthetic_accuracy([_score("seen"), {"in_vocabulary": True}])
    with pytest.raises(ValueError, match="score 0: split"):
        synthetic_accuracy([_score("train")])


def test_metric_result_has_a_value_or_a_reason():
    with pytest.raises(ValueError):
        MetricResult("fid", computed=True)
    with pytest.raises(ValueError):
        MetricResult("fid", computed=False, reason="")
    assert MetricResult.not_computed("fid", "no weights").as_dict()["value"] is None


# ------------------------------------------------------------------------------------ FID


class TinyFeatures(nn.Module):
    """A random-initialised conv net in the place of Inception: uint8 (N, 3, H, W) -> (N, 64)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten())
        for p in self.net.parameters():  # seeded without touching the global RNG
            p.data = torch.randn(p.shape, generator=generator) * 0.3

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.net(images.float() / 127.5 - 1.0)  # (N, 64); return_features: the scripted Inception's API


@pytest.fixture(scope="module")
def image_sets():
    rng = np.random.default_rng(0)
    real = [np.asarray(render(a, 32)) for a in training_attributes()[:60]]
    mild = [degrade(Image.fromarray(a), rng) for a in real]
    noise = [rng.integers(0, 256, a.shape, dtype=np.uint8) for a in real]
    return real, mild, noise


def test_fid_is_zero_for_a_set_with_itself_and_grows_with_the_difference(image_sets):
    real, mild, noise = image_sets
    features = TinyFeatures()
    same = fid(real, real[::-1], feature=features)
    near, far = fid(real, mild, feature=features), fid(real, noise, feature=features)
    assert same.computed and near.computed and far.computed
    assert same.value == pytest.approx(0.0, abs=1e-6 * far.value)
    assert 0 < near.value < far.value
    assert fid(real, noise, feature=features).value == far.value  # deterministic
    assert fid(np.stack(real), np.stack(noise), feature=features).value == pytest.approx(far.value)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_fid_loads_a_torchscript_inception_from_a_file(image_sets, tmp_path):
    real, _, noise = image_sets
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(TinyFeatures(seed=3)).save(str(path))
    from_file = fid(real, noise, weights_path=path)
    assert from_file.computed and from_file.value == pytest.approx(fid(real, noise, feature=TinyFeatures(3)).value)
    assert fid(real, real, weights_path=path).value == pytest.approx(0.0, abs=1e-6 * from_file.value)


def test_fid_without_weights_or_references_is_not_computed_and_bad_inputs_are_errors(image_sets, tmp_path):
    real, _, noise = image_sets
    missing = fid(real, noise)
    assert not missing.computed and missing.value is None and "metrics.fid_weights" in missing.reason
    no_real = fid(None, noise, feature=TinyFeatures())
    assert not no_real.computed and "metrics.fid_reference" in no_real.reason
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        fid(real, noise, weights_path=tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a network")
    with pytest.raises(ValueError, match="not a TorchScript"):
        fid(real, noise, weights_path=tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="at least 2 fake_images"):
        fid(real, noise[:1], feature=TinyFeatures())
    with pytest.raises(ValueError, match="not both"):
        fid(real, noise, weights_path=tmp_path / "junk.pt", feature=TinyFeatures())


# ------------------------------------------------------------------------------------ CLIP score


@pytest.fixture(scope="module")
def tiny_clip_file(tmp_path_factory):
    """A random-initialised tiny open_clip model (text and vision towers) saved as a local weights file."""
    path = tmp_path_factory.mktemp("clip") / "tiny-open-clip.bin"
    torch.save(create_open_clip("tiny", seed=123).state_dict(), path)
    return path


def _clip_pairs() -> tuple[np.ndarray, list[str]]:
    """12 rendered images (12, 64, 64, 3) and their captions."""
    attrs = all_attributes()[::15]
    return np.stack([np.asarray(render(a)) for a in attrs]), [caption_for(a) for a in attrs]


def test_clip_score_of_a_tiny_random_model_is_in_range_deterministic_and_paired(tiny_clip_file):
    images, prompts = _clip_pairs()
    result = clip_score(images, prompts, "tiny", tiny_clip_file)
    assert result.computed and 0.0 <= result.value <= 100.0
    assert clip_score(images, prompts, "tiny", tiny_clip_file) == result

    clip = load_clip("tiny", tiny_clip_file)
    scores = clip_scores(clip, images, prompts, batch_size=5)
    # batches of 5 vs the default: float32 sums in another order differ in the 7th digit
    assert scores.shape == (12,) and scores.mean() == pytest.approx(result.value, rel=1e-5)
    assert np.all((scores >= 0) & (scores <= 100)) and scores.max() > 0
    order = np.arange(12)[::-1]  # each score belongs to its (image, prompt) pair
    assert np.allclose(clip_scores(clip, images[order], [prompts[i] for i in order]), scores[order], atol=1e-4)
    assert not np.allclose(clip_scores(clip, images, prompts[::-1]), scores, atol=1e-4)


# Per-pair agreement on the 0..100 scale: the embeddings are float32 (~6e-8 relative rounding per value),
# so cosines computed from them in either order agree to ~1e-6; times 100.
CLIP_SCORE_TOL = 1e-4


def test_clip_score_equals_open_clips_own_cosine_per_pair(tiny_clip_file):
    """The reference takes nothing from metrics.py: open_clip's own loader (strict, weights required), its
    eval preprocessing and tokenizer, raw embeddings normalised here in float64, and the CLIP score as
    torchmetrics' docs define it (Hessel et al. 2021 with w = 100): 100 * max(cos, 0) for each pair
    (torchmetrics' code clamps the batch mean instead: the same whenever no cosine is negative)."""
    import open_clip

    from model.encoders import _open_clip_name  # registers the "tiny" config with open_clip

    images, prompts = _clip_pairs()
    name = _open_clip_name("tiny")
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(tiny_clip_file),
                                                                 require_pretrained=True)
    with torch.no_grad():
        image_emb = model.eval().encode_image(torch.stack([preprocess(Image.fromarray(a)) for a in images]))
        text_emb = model.encode_text(open_clip.get_tokenizer(name)(prompts))
    unit = [e.double() / e.double().norm(dim=-1, keepdim=True) for e in (image_emb, text_emb)]  # (12, D) each
    cos = (unit[0] * unit[1]).sum(dim=-1)  # (12,)
    assert bool((cos > 0).any()) and bool((cos < 0).any())  # both sides of the clamp are exercised
    expected = (100.0 * cos.clamp(min=0)).numpy()  # (12,)

    scores = clip_scores(load_clip("tiny", tiny_clip_file), images, prompts)  # clip_score's mean: tested above
    assert scores.shape == expected.shape
    assert np.abs(scores - expected).max() <= CLIP_SCORE_TOL, np.abs(scores - expected).max()


def test_clip_loads_the_weights_file_rather_than_a_fresh_init(tiny_clip_file):
    loaded = load_clip("tiny", tiny_clip_file).model.state_dict()
    saved, fresh = create_open_clip("tiny", seed=123).state_dict(), create_open_clip("tiny", seed=0).state_dict()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert not all(torch.equal(loaded[k], fresh[k]) for k in fresh)


def test_clip_score_without_weights_is_not_computed_and_a_missing_file_is_an_error(tmp_path, tiny_clip_file):
    images = [np.asarray(render(all_attributes()[0]))]
    result = clip_score(images, ["a small red circle in the top left"], "ViT-H-14", None)
    assert not result.computed and result.value is None and "metrics.clip_weights" in result.reason
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        clip_score(images, ["x"], "ViT-H-14", tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(images, ["x", "y"], "tiny", tiny_clip_file)
