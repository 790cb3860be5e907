"""The synthetic dataset: exact rendering, captions that parse back, held-out pairs, and planted
bad items that behave as planted over real HTTP."""

import collections
import io
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.synthetic.shapes import (
    COLORS,
    HELD_OUT_PAIRS,
    LONG_CAPTION_CHARS,
    PLANTED_KINDS,
    SHAPES,
    Attributes,
    PlantedCounts,
    SyntheticConfig,
    all_attributes,
    all_captions,
    build_dataset,
    caption_for,
    held_out_attributes,
    parse_caption,
    render,
    shape_box,
    training_attributes,
)
from pipelines.synthetic.web import SyntheticServer, load_dataset, url_table, write_dataset

WHITE = (255, 255, 255)


def test_render_is_deterministic_and_draws_what_the_attributes_say():
    for attrs in all_attributes():
        image = render(attrs)
        assert image.size == (64, 64) and image.mode == "RGB"
        assert image.tobytes() == render(attrs).tobytes()
        left, top, right, bottom = shape_box(attrs)
        assert 0 <= left and 0 <= top and right <= 63 and bottom <= 63  # large shapes stay whole
        centre = ((left + right) // 2, top + 2 * (bottom - top) // 3)  # inside every shape, triangle included
        assert image.getpixel(centre) == COLORS[attrs.color]
        assert image.getpixel((63 - centre[0], 63 - centre[1])) == WHITE or attrs.position == "center"


def test_shapes_sizes_and_positions_are_as_documented():
    small, large = Attributes("square", "red", "small", "center"), Attributes("square", "red", "large", "top left")
    assert shape_box(small)[2] - shape_box(small)[0] + 1 == round(0.3 * 64)
    assert shape_box(large)[:2] == (0, 0)  # moved inward just enough: touches the corner, never cut
    assert render(large).getpixel((0, 0)) == COLORS["red"]
    triangle = render(Attributes("triangle", "green", "large", "center"))
    left, top, right, bottom = shape_box(Attributes("triangle", "green", "large", "center"))
    row_width = lambda y: sum(triangle.getpixel((x, y)) != WHITE for x in range(64))  # noqa: E731
    assert row_width(top + 1) < row_width(bottom) // 4  # upright: apex on top, base at the bottom
    assert triangle.getpixel((left, top)) == WHITE
    circle = render(Attributes("circle", "blue", "large", "bottom right"))
    b_left, b_top, _, _ = shape_box(Attributes("circle", "blue", "large", "bottom right"))
    assert circle.getpixel((b_left, b_top)) == WHITE and circle.getpixel((b_left + 19, b_top + 19)) == COLORS["blue"]


def test_captions_parse_back_to_their_attributes():
    assert caption_for(Attributes("circle", "red", "small", "top left")) == "a small red circle in the top left"
    for attrs in all_attributes():
        for caption in all_captions(attrs):
            assert parse_caption(caption) == attrs, caption
            assert parse_caption(caption.upper()) == attrs
    assert parse_caption("a red circle in the top left") is None  # no size
    assert parse_caption("a small red blue circle in the center") is None  # two colours
    assert parse_caption("") is None
    assert parse_caption("a large orange square in the centre") == Attributes("square", "orange", "large", "center")


def test_held_out_pairs_are_never_generated():
    assert len(HELD_OUT_PAIRS) == 3
    assert {shape for _, shape in HELD_OUT_PAIRS} == set(SHAPES)  # each shape held out once
    assert len({color for color, _ in HELD_OUT_PAIRS}) == 3
    assert len(all_attributes()) == 180 and len(held_out_attributes()) == 30
    assert len(training_attributes()) == 150
    cfg = SyntheticConfig(num_good=320, planted=PlantedCounts(**{kind: 2 for kind in PLANTED_KINDS}))
    rows = build_dataset(cfg).rows
    assert not [r for r in rows if (r["color"], r["shape"]) in HELD_OUT_PAIRS]
    seen = {Attributes(r["shape"], r["color"], r["size"], r["position"]) for r in rows if not r["planted"]}
    assert seen == set(training_attributes())  # balanced: every training combination appears


def test_dataset_is_deterministic_from_the_seed_and_mostly_canonical():
    cfg = SyntheticConfig(num_good=100, seed=7, planted=PlantedCounts(http_404=1, duplicate_image=2))
    first, again = build_dataset(cfg), build_dataset(cfg)
    assert first.rows == again.rows and first.responses == again.responses
    assert build_dataset(SyntheticConfig(num_good=100, seed=8)).rows != first.rows
    good = [r for r in first.rows if not r["planted"]]
    forms = collections.Counter(r["caption"] == caption_for(parse_caption(r["caption"])) for r in good)
    assert forms[True] > 0.6 * len(good) and forms[False] > 0  # paraphrases exist, canonical dominates


def _fetch(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], b""


def _decodes(body: bytes) -> Image.Image | None:
    try:
        image = Image.open(io.BytesIO(body))
        image.load()
        return image
    except Exception:  # noqa: BLE001 - any decoder error means "not an image"
        return None


def _check_planted(kind: str, row: dict, status: int, content_type: str, body: bytes, by_id: dict) -> None:
    expected_status = {"http_404": 404, "http_500": 500}.get(kind, 200)
    assert status == expected_status, kind
    image = _decodes(body) if status == 200 else None
    if kind == "html_page":
        assert content_type.startswith("text/html") and body.lower().startswith(b"<!doctype html") and image is None
    elif kind in ("truncated_jpeg", "truncated_png"):
        magic = b"\xff\xd8" if kind == "truncated_jpeg" else b"\x89PNG"
        assert body.startswith(magic) and image is None
    elif kind == "tiny_image":
        assert image.size == (8, 8)
    elif kind == "extreme_aspect":
        assert image.size[0] / image.size[1] >= 10
    elif kind == "duplicate_image":
        assert row["duplicate_of"] and body == by_id[row["duplicate_of"]]["body"]
    elif kind in ("empty_caption", "whitespace_caption", "long_caption"):
        assert image is not None and image.size == (64, 64)
        assert {"empty_caption": row["caption"] == "", "whitespace_caption": row["caption"].strip() == "",
                "long_caption": len(row["caption"]) == LONG_CAPTION_CHARS}[kind]


def test_planted_items_behave_as_planted_over_real_http():
    dataset = build_dataset(SyntheticConfig(num_good=20, seed=3,
                                            planted=PlantedCounts(**{kind: 2 for kind in PLANTED_KINDS})))
    table = url_table(dataset, "http://example.invalid")
    assert table.column_names[:2] == ["url", "caption"] and "planted" in table.column_names
    with SyntheticServer(dataset.responses) as server:
        fetched = {r["item_id"]: dict(zip(("status", "type", "body"), _fetch(server.url_for(r["path"]))))
                   for r in dataset.rows}
        base_url = server.base_url
    assert base_url.startswith("http://127.0.0.1:")
    with pytest.raises(urllib.error.URLError):  # stopped: nothing listens on the port any more
        urllib.request.urlopen(base_url + dataset.rows[0]["path"], timeout=2)
    for row in dataset.rows:
        got = fetched[row["item_id"]]
        if row["planted"]:
            _check_planted(row["planted"], row, got["status"], got["type"], got["body"], fetched)
        else:
            attrs = parse_caption(row["caption"])
            assert got["status"] == 200 and _decodes(got["body"]).convert("RGB").tobytes() == render(attrs).tobytes()
    assert collections.Counter(r["planted"] for r in dataset.rows if r["planted"]) == {k: 2 for k in PLANTED_KINDS}


def test_dataset_round_trips_through_a_directory(tmp_path):
    dataset = build_dataset(SyntheticConfig(num_good=10, planted=PlantedCounts(http_500=1, truncated_png=1)))
    loaded = load_dataset(write_dataset(dataset, tmp_path / "synthetic"))
    assert loaded.rows == dataset.rows and loaded.responses == dataset.responses
    with pytest.raises(FileNotFoundError, match="no synthetic dataset"):
        load_dataset(tmp_path / "missing")


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown color 'pink'"):
        Attributes("circle", "pink", "small", "center")
    with pytest.raises(ValueError, match="canonical form stays the most common"):
        SyntheticConfig(canonical_fraction=0.3)
    with pytest.raises(ValueError, match="needs at least one good item"):
        build_dataset(SyntheticConfig(num_good=0, planted=PlantedCounts(duplicate_image=1)))


def test_serve_synthetic_job_serves_until_stopped(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    process = subprocess.Popen([sys.executable, "jobs/serve_synthetic.py", "--out", str(tmp_path),
                                "--set", "num_good=5", "--set", "planted.http_500=1"],
                               cwd=repo, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:  # the job logs the URL list once the server listens
            if "url list:" in line:
                break
        urls = pq.read_table(tmp_path / "url_list.parquet").to_pylist()
        assert len(urls) == 6 and _fetch(urls[0]["url"])[0] == (500 if urls[0]["planted"] else 200)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
