"""The download stage: real img2dataset over the real loopback server, on a real local Ray.

The session's one download of the synthetic dataset (tests/synthetic_download.py, with every kind of planted
item; test_data_chain.py starts from it too) is checked here: its shards and report, a rerun (no-op), a broken
shard (redone), a failing one, another shard plan (refused) and the job script itself (exit codes). A test that
changes a download works on a copy of the folder, from the dataset served again."""

import collections
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.core.job import run_stage
from pipelines.data.download import (
    REPORT_FILE,
    STAGE,
    DownloadConfig,
    DownloadError,
    failure_reason,
    plan_shards,
    run_download,
    shard_files,
)
from pipelines.synthetic.shapes import Response
from pipelines.synthetic.web import SyntheticServer, write_url_list
from tests.snapshots import tree_snapshot
from tests.synthetic_download import DOWNLOAD_REASON, PLANTED, copy_download

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def first_run(synthetic_download):
    """The session's download: its report as written."""
    return synthetic_download.report


@pytest.fixture(scope="module")
def served(synthetic_download, tmp_path_factory):
    """The download's dataset served again (its first server stopped when the download finished) and the
    download's config with a URL list pointing there: for the tests that download again, into a copy."""
    dataset = synthetic_download.dataset
    with SyntheticServer(dataset.responses) as server:
        url_list = write_url_list(dataset, server.base_url, tmp_path_factory.mktemp("served") / "urls.parquet")
        yield dataset, replace(synthetic_download.cfg, url_list=str(url_list))


def _samples(output_dir: str, column: str = "item_id") -> dict[str, dict]:
    """The sample's `column` (from its .json) -> the sample's files, over every shard."""
    samples = {}
    for tar_path in sorted(Path(output_dir).glob("*.tar")):
        members = collections.defaultdict(dict)
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members[key][ext] = tar.extractfile(member).read()
        for files in members.values():
            samples[json.loads(files["json"])[column]] = files
    return samples


def _mtimes(output_dir: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in Path(output_dir).iterdir() if p.name != REPORT_FILE}


def test_every_planted_failure_is_counted_under_its_reason(synthetic_download, first_run):
    dataset, cfg = synthetic_download.dataset, synthetic_download.cfg
    expected = collections.Counter()
    for row in dataset.rows:
        if row["planted"] in DOWNLOAD_REASON:
            expected[DOWNLOAD_REASON[row["planted"]]] += 1
    assert first_run["ok"], first_run["error"]
    assert first_run["dropped"] == dict(expected)
    assert first_run["rows_in"] == len(dataset.rows)
    assert first_run["rows_out"] == len(dataset.rows) - sum(expected.values())
    shards = [s.name for s in plan_shards(len(dataset.rows), cfg.number_sample_per_shard)]
    assert len(shards) > 1 and first_run["shards"]["downloaded"] == shards
    assert first_run["error_messages"]["http_404"] == {"HTTP Error 404: Not Found": PLANTED.http_404}
    assert first_run["rows_per_second"] > 0


def test_every_good_item_arrives_in_the_shards(synthetic_download):
    dataset, cfg = synthetic_download.dataset, synthetic_download.cfg
    samples = _samples(cfg.output_dir)
    arriving = {r["item_id"]: r for r in dataset.rows if r["planted"] not in DOWNLOAD_REASON}
    assert set(samples) == set(arriving)
    for item_id, files in samples.items():
        row, meta = arriving[item_id], json.loads(files["json"])
        assert files["txt"].decode() == row["caption"]  # empty, whitespace and long captions untouched
        width, height = Image.open(io.BytesIO(files["jpg"])).size  # keep_ratio: the short side at image_size
        assert min(width, height) == cfg.image_size
        assert (width, height) == (cfg.image_size,) * 2 or row["planted"] == "extreme_aspect"
        assert meta["status"] == "success" and meta["planted"] == row["planted"]
    wide = [s for i, s in samples.items() if arriving[i]["planted"] == "extreme_aspect"]
    assert json.loads(wide[0]["json"])["original_width"] == 256  # the filter stage can still judge it
    assert Image.open(io.BytesIO(wide[0]["jpg"])).size == (512, 32)  # 256x16 keeps its aspect: 16:1
    duplicate = next(r for r in arriving.values() if r["planted"] == "duplicate_image")
    assert json.loads(samples[duplicate["item_id"]]["json"])["sha256"] == \
        json.loads(samples[duplicate["duplicate_of"]]["json"])["sha256"]


def test_rerun_is_a_no_op(synthetic_download, first_run):
    """Rerun on the download's own folder and URL list, whose server is down: nothing fetched, nothing written."""
    cfg = synthetic_download.cfg
    before, samples_before = _mtimes(cfg.output_dir), _samples(cfg.output_dir)
    report = run_download(cfg)
    assert report.ok and report.to_dict()["shards"]["downloaded"] == []
    assert report.to_dict()["shards"]["skipped_done"] == len(first_run["shards"]["downloaded"])
    assert (report.rows_out, report.dropped) == (first_run["rows_out"], first_run["dropped"])
    assert _mtimes(cfg.output_dir) == before and _samples(cfg.output_dir).keys() == samples_before.keys()


def test_a_shard_without_stats_is_redone_and_only_that_one(synthetic_download, served, first_run, tmp_path):
    cfg = copy_download(synthetic_download, tmp_path, url_list=served[1].url_list)
    shard = plan_shards(first_run["rows_in"], cfg.number_sample_per_shard)[1]
    files = shard_files(cfg.output_dir, shard)
    keys_before = set(_samples(cfg.output_dir))
    os.remove(files["stats"])  # as after a crash: a half-written tar and no stats
    with open(files["tar"], "r+b") as tar:
        tar.truncate(os.path.getsize(files["tar"]) // 3)
    others = {k: v for k, v in _mtimes(cfg.output_dir).items() if not k.startswith(shard.name)}
    report = run_download(cfg)
    assert report.ok and report.to_dict()["shards"]["downloaded"] == [shard.name]
    assert {k: v for k, v in _mtimes(cfg.output_dir).items() if not k.startswith(shard.name)} == others
    assert set(_samples(cfg.output_dir)) == keys_before and report.rows_out == first_run["rows_out"]


def test_a_folder_of_another_shard_plan_is_refused_and_left_as_it_was(synthetic_download, caplog):
    """Exit 2 naming the problem, and not a file of the folder (its report included) changed."""
    cfg = synthetic_download.cfg
    before = tree_snapshot(cfg.output_dir)
    assert run_stage(STAGE, replace(cfg, number_sample_per_shard=cfg.number_sample_per_shard + 10)) == 2
    assert "another URL list or number_sample_per_shard" in caplog.text
    assert tree_snapshot(cfg.output_dir) == before


def test_a_shard_that_keeps_failing_fails_the_stage_and_the_rest_is_kept(synthetic_download, served, first_run,
                                                                        tmp_path):
    """Shards 1 and 2 to do, and shard 1 cannot be written: shard 2 is still downloaded, the finished ones
    are kept as they were, and the stage fails naming shard 1."""
    cfg = copy_download(synthetic_download, tmp_path, url_list=served[1].url_list, shard_retries=1)
    shards = plan_shards(first_run["rows_in"], cfg.number_sample_per_shard)
    for shard in shards[1:3]:
        for path in shard_files(cfg.output_dir, shard).values():
            os.remove(path)
    Path(shard_files(cfg.output_dir, shards[1])["tar"]).mkdir()  # a directory where the tar must go
    finished = {k: v for k, v in _mtimes(cfg.output_dir).items() if not k.startswith((shards[1].name,
                                                                                      shards[2].name))}
    report = run_download(cfg)
    assert not report.ok and f"1 shard(s) failed after 2 attempts (shard {shards[1].name}" in report.error
    assert report.to_dict()["shards"]["downloaded"] == [shards[2].name]
    assert report.dropped["shard_failed"] == shards[1].rows
    assert {k: v for k, v in _mtimes(cfg.output_dir).items() if k in finished} == finished


def _job(*overrides: str, ray_address: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_address}  # joins the session's Ray, as under `ray job submit`
    return subprocess.run([sys.executable, "jobs/download_data.py", *(a for o in overrides for a in ("--set", o))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_job_exits_non_zero_with_a_clear_message(synthetic_download, ray_local, tmp_path):
    cfg = copy_download(synthetic_download, tmp_path)
    address = ray_local.get_runtime_context().gcs_address
    common = (f"url_list={cfg.url_list}", f"output_dir={cfg.output_dir}",
              f"number_sample_per_shard={cfg.number_sample_per_shard}", "allow_private_addresses=true")
    # Every shard is done, so this only judges the success rate.
    strict = _job(*common, "min_success_rate=0.99", ray_address=address)
    assert strict.returncode == 1
    assert "under min_success_rate 99.0%" in strict.stderr
    assert f"http_404={PLANTED.http_404}" in strict.stderr
    report = json.loads(Path(cfg.output_dir, REPORT_FILE).read_text())
    assert report["ok"] is False and "under min_success_rate" in report["error"]
    before = tree_snapshot(cfg.output_dir)
    missing = _job(f"url_list={cfg.url_list}.missing", f"output_dir={cfg.output_dir}", ray_address=address)
    assert missing.returncode == 2 and "not found" in missing.stderr
    assert _job("no_such_key=1", f"output_dir={tmp_path / 'new'}", ray_address=address).returncode == 2
    assert tree_snapshot(cfg.output_dir) == before and not (tmp_path / "new").exists()  # refused: nothing written


@pytest.mark.parametrize("message, reason", [
    ("HTTP Error 404: Not Found", "http_404"), ("HTTP Error 503: Service Unavailable", "http_503"),
    ("Image decoding error", "decode_error"), ("image too small", "too_small"),
    ("aspect ratio too large", "aspect_ratio"), ("<urlopen error timed out>", "timeout"),
    ("<urlopen error [Errno 111] Connection refused>", "connection_error"), ("unknown url type: ''", "invalid_url"),
    ("<urlopen error refused address 10.0.0.1 (private) for host x>", "refused_address"),
    ("<urlopen error refused scheme 'file': only http and https are fetched>", "refused_scheme"),
    ("body too large: more than 10 bytes", "body_too_large"),
    ("too many pixels: 20000x20000 = 400000000 pixels > max_image_pixels 160000000", "too_many_pixels"),
    ("something new", "other"),
])
def test_failure_reasons(message, reason):
    assert failure_reason(message) == reason


# ---------------------------------------------------------------------------------------------
# Untrusted URL lists and the images the web really serves


def _png(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **params)
    return buf.getvalue()


def _exif_rotated_jpeg() -> bytes:
    """Stored landscape 128x64, left half red, right half blue; EXIF says: turn 90 degrees clockwise."""
    stored = Image.new("RGB", (128, 64), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 64, 64))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _encoded(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _palette_png() -> bytes:
    """A palette PNG, left half index 0 (green), right half index 1 (magenta)."""
    img = Image.new("P", (96, 64), 0)
    img.putpalette([0, 160, 0, 200, 0, 200] + [0] * 762)
    img.paste(1, (48, 0, 96, 64))
    return _encoded(img, "PNG")


def _animated_gif() -> bytes:
    """Two frames: red, then blue. The first frame is the image."""
    frames = [Image.new("RGB", (64, 96), color) for color in ((255, 0, 0), (0, 0, 255))]
    return _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


GUARD_PAGES = {
    "/ok.png": Response(200, "image/png", _png(Image.new("RGB", (80, 80), (0, 128, 0)))),
    "/cmyk.jpg": Response(200, "image/jpeg", _encoded(Image.new("CMYK", (80, 80), (0, 255, 255, 0)), "JPEG",
                                                      quality=95)),  # red in CMYK
    "/palette.png": Response(200, "image/png", _palette_png()),
    "/animated.gif": Response(200, "image/gif", _animated_gif()),
    "/gray16.png": Response(200, "image/png", _png(Image.fromarray(np.full((80, 80), 32896, np.uint16)))),
    "/rotated.jpg": Response(200, "image/jpeg", _exif_rotated_jpeg()),
    "/transparent.png": Response(200, "image/png", _png(Image.new("RGBA", (80, 80), (255, 0, 0, 0)))),
    "/huge.png": Response(200, "image/png", _png(Image.new("RGB", (400, 400)))),  # 160000 px
    "/long.bin": Response(200, "image/png", b"\0" * 300_000),
}
# url path or full URL -> the reason its row must be dropped with ("" = stored); the server's base URL is
# put in front of paths, the download's folder in place of LOCAL (a valid image there: a file: URL that
# the downloader opened would be stored as a sample).
GUARD_ROWS = {
    "/ok.png": "", "/gray16.png": "", "/rotated.jpg": "", "/transparent.png": "", "/cmyk.jpg": "",
    "/palette.png": "", "/animated.gif": "", "/huge.png": "too_many_pixels", "/long.bin": "body_too_large",
    "/to-file": "refused_scheme", "file://LOCAL/local.png": "refused_scheme",
    "data:image/png;base64,iVBORw0KGgo=": "refused_scheme",
}


@pytest.fixture(scope="module")
def guard_server():
    with SyntheticServer(GUARD_PAGES, redirects={"/to-file": "file:///etc/hostname"}) as server:
        yield server


def _guard_download(server, root: Path, **settings):
    (root / "local.png").write_bytes(GUARD_PAGES["/ok.png"].body)
    urls = [server.url_for(u) if u.startswith("/") else u.replace("LOCAL", str(root)) for u in GUARD_ROWS]
    pq.write_table(pa.table({"url": urls, "caption": [f"row {i}" for i in range(len(urls))],
                             "row": list(GUARD_ROWS)}), root / "urls.parquet")
    cfg = DownloadConfig(url_list=str(root / "urls.parquet"), output_dir=str(root / "raw"), image_size=64,
                         min_image_size=16, number_sample_per_shard=20, processes=1, threads=4, cpus_per_task=0.5,
                         timeout_s=5, min_success_rate=0.0, max_body_bytes=200_000, max_image_pixels=100_000,
                         **settings)
    return run_download(cfg), _samples(cfg.output_dir, column="row")


@pytest.fixture(scope="module")
def guarded_run(guard_server, ray_local, tmp_path_factory):
    return _guard_download(guard_server, tmp_path_factory.mktemp("guarded"), allow_private_addresses=True)


def test_only_http_is_fetched_and_oversized_bodies_and_images_are_dropped(guarded_run):
    report, stored = guarded_run
    assert report.ok, report.error
    assert report.dropped == dict(collections.Counter(reason for reason in GUARD_ROWS.values() if reason))
    assert set(stored) == {row for row, reason in GUARD_ROWS.items() if not reason}


def test_images_are_stored_upright_8_bit_and_on_white(guarded_run):
    _, stored = guarded_run
    pixels = {row: np.asarray(Image.open(io.BytesIO(files["jpg"])).convert("RGB"), np.int32)
              for row, files in stored.items()}
    assert np.abs(pixels["/gray16.png"] - 128).max() <= 3  # 32896 / 257 = 128, not white
    assert np.abs(pixels["/transparent.png"] - 255).max() <= 3  # transparent on white
    rotated = pixels["/rotated.jpg"]  # shown portrait 64x128 and kept so (keep_ratio): top half red, bottom blue
    assert rotated.shape == (128, 64, 3)
    assert rotated[8, 32, 0] > 200 and rotated[8, 32, 2] < 60
    assert rotated[120, 32, 2] > 200 and rotated[120, 32, 0] < 60
    meta = json.loads(stored["/rotated.jpg"]["json"])
    assert (meta["original_width"], meta["original_height"]) == (64, 128)
    assert np.abs(pixels["/cmyk.jpg"] - (255, 0, 0)).max() <= 8  # CMYK converted, not inverted or dropped
    palette = pixels["/palette.png"]  # 96x64 -> 96x64 (short side 64), the two palette colours in place
    assert palette.shape == (64, 96, 3)
    assert np.abs(palette[32, 10] - (0, 160, 0)).max() <= 8 and np.abs(palette[32, 86] - (200, 0, 200)).max() <= 8
    animated = pixels["/animated.gif"]  # the first frame, portrait kept
    assert animated.shape == (96, 64, 3) and np.abs(animated - (255, 0, 0)).max() <= 8


def test_by_default_the_loopback_server_is_refused(guard_server, ray_local, tmp_path):
    assert DownloadConfig().allow_private_addresses is False
    report, stored = _guard_download(guard_server, tmp_path)
    assert report.rows_out == 0 and stored == {}
    loopback = sum(1 for url in GUARD_ROWS if url.startswith("/"))
    assert report.dropped == {"refused_address": loopback, "refused_scheme": len(GUARD_ROWS) - loopback}


@pytest.mark.parametrize("name, content", [
    ("urls.csv", b"url,caption\nhttp://example.com/a.jpg,caf\xe9\n"),
    ("urls.jsonl", b'{"url": "http://example.com/a.jpg", "caption": "caf\xe9"}\n'),
])
def test_a_url_list_that_is_not_utf8_is_bad_input_naming_the_file(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DownloadError, match=f"url_list {re.escape(str(tmp_path / name))}.*UTF"):
        run_download(DownloadConfig(url_list=str(tmp_path / name), output_dir=str(tmp_path / "raw")))
    assert not (tmp_path / "raw").exists()  # refused before the output folder is made
