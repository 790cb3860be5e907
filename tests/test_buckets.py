"""Aspect-ratio buckets (pipelines/data/buckets.py): the set, the assignment, the cover-and-crop."""

import math

import numpy as np
import pytest
from PIL import Image

from pipelines.data.buckets import cover_box, fit_to_bucket, make_buckets, nearest_bucket


@pytest.mark.parametrize("size, multiple", [(256, 64), (512, 64), (1024, 64), (64, 16)])
def test_buckets_have_about_the_square_area_and_divisible_sides(size, multiple):
    buckets = make_buckets(size, multiple, max_ratio=2.0)
    assert (size, size) in buckets
    assert len(buckets) >= 3
    for h, w in buckets:
        assert h % multiple == 0 and w % multiple == 0
        assert h * w <= size * size  # never more memory than the square
        assert h * w >= 0.75 * size * size  # about equal area
        assert max(h, w) / min(h, w) <= 2.0
        assert (w, h) in buckets  # symmetric: each tall bucket has its wide twin
    ratios = [w / h for h, w in buckets]
    assert ratios == sorted(ratios)  # tallest first


def test_the_issues_example_at_256_px():
    assert make_buckets(256, 64, 2.0) == ((320, 192), (256, 256), (192, 320))


def test_max_ratio_one_is_the_square_alone():
    assert make_buckets(256, 64, 1.0) == ((256, 256),)
    assert make_buckets(32, 16, 2.0) == ((32, 32),)  # no other bucket fits at this size: degenerate


@pytest.mark.parametrize("size, multiple, ratio", [(100, 64, 2.0), (256, 64, 0.5), (0, 64, 2.0)])
def test_impossible_settings_are_refused(size, multiple, ratio):
    with pytest.raises(ValueError):
        make_buckets(size, multiple, ratio)


def test_nearest_bucket_by_log_aspect():
    buckets = make_buckets(256, 64, 2.0)  # (320, 192) tall, square, (192, 320) wide
    assert nearest_bucket(buckets, width=640, height=480) == (192, 320)  # 4:3 landscape -> the wide one
    assert nearest_bucket(buckets, width=480, height=640) == (320, 192)
    assert nearest_bucket(buckets, width=1000, height=1000) == (256, 256)
    assert nearest_bucket(buckets, width=3000, height=100) == (192, 320)  # beyond the widest: the widest
    # 1.29 is nearer 1 than 5/3 on a log scale (log 1.29 = 0.255 < log(5/3) - log 1.29 = 0.256)
    assert nearest_bucket(buckets, width=129, height=100) == (256, 256)
    assert nearest_bucket(buckets, width=130, height=100) == (192, 320)


def test_an_exact_tie_goes_to_the_squarer_bucket():
    buckets = ((100, 100), (100, 400))  # aspect 1 and 4: an image of aspect 2 is equally far (log 2) from both
    assert math.isclose(math.log(2) - math.log(1), math.log(4) - math.log(2))
    assert nearest_bucket(buckets, width=200, height=100) == (100, 100)
    assert nearest_bucket(tuple(reversed(buckets)), width=200, height=100) == (100, 100)


def test_fit_to_bucket_covers_then_center_crops():
    # a 300x100 image with a red left third, green middle, blue right third
    pixels = np.zeros((100, 300, 3), np.uint8)
    pixels[:, :100, 0], pixels[:, 100:200, 1], pixels[:, 200:, 2] = 255, 255, 255
    out = fit_to_bucket(Image.fromarray(pixels), (64, 64))
    assert out.size == (64, 64)
    assert cover_box(300, 100, (64, 64)) == (192, 64, 64, 0)  # height fills, width centered
    arr = np.asarray(out)
    assert (arr[:, 8:56, 1] > 200).all() and (arr[:, 8:56, 0] < 50).all()  # only the green middle is kept
    wide = fit_to_bucket(Image.fromarray(pixels), (48, 80))
    assert wide.size == (80, 48)


def test_a_square_bucket_matches_the_square_center_crop():
    """With square images the bucketed path must be the old short-side resize + center crop, pixel for pixel."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    size = 32
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    old = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    old = old.crop((left, top, left + size, top + size))
    assert np.array_equal(np.asarray(fit_to_bucket(image, (size, size))), np.asarray(old))


def test_the_precompute_config_refuses_an_image_size_its_buckets_cannot_make(tmp_path):
    from pipelines.core.config import ConfigError
    from pipelines.data.precompute.config import BucketSettings, PrecomputeConfig

    cfg = PrecomputeConfig(input_dir=str(tmp_path), output_dir=str(tmp_path / "out"), image_size=32)  # multiple 64
    with pytest.raises(ConfigError, match="buckets.multiple"):
        cfg.validate()
    square = PrecomputeConfig(input_dir=str(tmp_path), output_dir=str(tmp_path / "out"), image_size=32,
                              buckets=BucketSettings(max_ratio=1.0))
    square.validate()
    assert square.bucket_list() == ((32, 32),)
