"""The download stage: real img2dataset over the real loopback server, on a real local Ray.

One download of the synthetic dataset (with every kind of planted item) is shared by the module;
the tests below check its shards and report, then rerun it (no-op), break one shard (redone) and
run the job script itself (exit codes)."""

import collections
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pipelines.data.download import (
    REPORT_FILE,
    DownloadConfig,
    DownloadError,
    failure_reason,
    plan_shards,
    report_path,
    run_download,
    shard_files,
)
from pipelines.synthetic.shapes import PLANTED_KINDS, PlantedCounts, SyntheticConfig, build_dataset
from pipelines.synthetic.web import SyntheticServer, write_url_list

REPO = Path(__file__).resolve().parents[1]
PLANTED = PlantedCounts(**{**{kind: 1 for kind in PLANTED_KINDS}, "http_404": 2, "truncated_jpeg": 2})
# How each planted kind must end up after the download stage (min_image_size=16, any aspect ratio).
EXPECTED_REASON = {"http_404": "http_404", "http_500": "http_500", "html_page": "decode_error",
                   "truncated_jpeg": "decode_error", "truncated_png": "decode_error", "tiny_image": "too_small"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    dataset = build_dataset(SyntheticConfig(num_good=60, seed=11, planted=PLANTED))
    root = tmp_path_factory.mktemp("download")
    with SyntheticServer(dataset.responses) as server:
        url_list = write_url_list(dataset, server.base_url, root / "urls.parquet")
        yield dataset, DownloadConfig(url_list=str(url_list), output_dir=str(root / "raw"), image_size=64,
                                      min_image_size=16, number_sample_per_shard=20, processes=2, threads=8,
                                      cpus_per_task=0.5, timeout_s=5)


@pytest.fixture(scope="module")
def first_run(served, ray_local):
    dataset, cfg = served
    report = run_download(cfg)
    report.write(report_path(cfg))
    return report


def _samples(output_dir: str) -> dict[str, dict]:
    """item_id -> the sample's files, over every shard."""
    samples = {}
    for tar_path in sorted(Path(output_dir).glob("*.tar")):
        members = collections.defaultdict(dict)
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members[key][ext] = tar.extractfile(member).read()
        for files in members.values():
            samples[json.loads(files["json"])["item_id"]] = files
    return samples


def _mtimes(output_dir: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in Path(output_dir).iterdir() if p.name != REPORT_FILE}


def test_every_planted_failure_is_counted_under_its_reason(served, first_run):
    dataset, _ = served
    expected = collections.Counter()
    for row in dataset.rows:
        if row["planted"] in EXPECTED_REASON:
            expected[EXPECTED_REASON[row["planted"]]] += 1
    assert first_run.ok, first_run.error
    assert first_run.dropped == dict(expected)
    assert first_run.rows_in == len(dataset.rows)
    assert first_run.rows_out == len(dataset.rows) - sum(expected.values())
    details = first_run.to_dict()
    assert details["shards"]["downloaded"] == ["00000", "00001", "00002", "00003"]
    assert details["error_messages"]["http_404"] == {"HTTP Error 404: Not Found": 2}
    assert details["rows_per_second"] > 0


def test_every_good_item_arrives_in_the_shards(served, first_run):
    dataset, cfg = served
    samples = _samples(cfg.output_dir)
    arriving = {r["item_id"]: r for r in dataset.rows if r["planted"] not in EXPECTED_REASON}
    assert set(samples) == set(arriving)
    for item_id, files in samples.items():
        row, meta = arriving[item_id], json.loads(files["json"])
        assert files["txt"].decode() == row["caption"]  # empty, whitespace and long captions untouched
        assert Image.open(io.BytesIO(files["jpg"])).size == (64, 64)  # center_crop to image_size
        assert meta["status"] == "success" and meta["planted"] == row["planted"]
    wide = [s for i, s in samples.items() if arriving[i]["planted"] == "extreme_aspect"]
    assert json.loads(wide[0]["json"])["original_width"] == 256  # the filter stage can still judge it
    duplicate = next(r for r in arriving.values() if r["planted"] == "duplicate_image")
    assert json.loads(samples[duplicate["item_id"]]["json"])["sha256"] == \
        json.loads(samples[duplicate["duplicate_of"]]["json"])["sha256"]


def test_rerun_is_a_no_op(served, first_run):
    _, cfg = served
    before, samples_before = _mtimes(cfg.output_dir), _samples(cfg.output_dir)
    report = run_download(cfg)
    assert report.ok and report.to_dict()["shards"]["downloaded"] == []
    assert report.to_dict()["shards"]["skipped_done"] == 4
    assert (report.rows_out, report.dropped) == (first_run.rows_out, first_run.dropped)
    assert _mtimes(cfg.output_dir) == before and _samples(cfg.output_dir).keys() == samples_before.keys()


def test_a_shard_without_stats_is_redone_and_only_that_one(served, first_run):
    _, cfg = served
    shard = plan_shards(first_run.rows_in, cfg.number_sample_per_shard)[1]
    files = shard_files(cfg.output_dir, shard)
    keys_before = set(_samples(cfg.output_dir))
    os.remove(files["stats"])  # as after a crash: a half-written tar and no stats
    with open(files["tar"], "r+b") as tar:
        tar.truncate(os.path.getsize(files["tar"]) // 3)
    others = {k: v for k, v in _mtimes(cfg.output_dir).items() if not k.startswith(shard.name)}
    report = run_download(cfg)
    assert report.ok and report.to_dict()["shards"]["downloaded"] == [shard.name]
    assert {k: v for k, v in _mtimes(cfg.output_dir).items() if not k.startswith(shard.name)} == others
    assert set(_samples(cfg.output_dir)) == keys_before and report.rows_out == first_run.rows_out


def test_a_folder_of_another_shard_plan_is_refused(served, first_run):
    _, cfg = served
    with pytest.raises(DownloadError, match="another URL list or number_sample_per_shard"):
        run_download(DownloadConfig(**{**cfg.__dict__, "number_sample_per_shard": 30}))


def test_a_shard_that_keeps_failing_fails_the_stage_and_the_rest_is_kept(served, first_run, tmp_path):
    _, cfg = served
    blocked = Path(tmp_path, "raw", "00001.tar")
    blocked.mkdir(parents=True)  # a directory where the shard's tar must go: every attempt fails
    report = run_download(DownloadConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "raw"),
                                            "shard_retries": 1}))
    assert not report.ok and "1 shard(s) failed after 2 attempts (shard 00001" in report.error
    assert report.to_dict()["shards"]["downloaded"] == ["00000", "00002", "00003"]
    assert report.dropped["shard_failed"] == 20


def _job(*overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "jobs/download_data.py", *(a for o in overrides for a in ("--set", o))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_job_exits_non_zero_with_a_clear_message(served, first_run):
    _, cfg = served
    common = (f"url_list={cfg.url_list}", f"output_dir={cfg.output_dir}", "number_sample_per_shard=20")
    # Every shard is done, so this only judges the success rate.
    strict = _job(*common, "min_success_rate=0.99")
    assert strict.returncode == 1
    assert "under min_success_rate 99.0%" in strict.stderr and "http_404=2" in strict.stderr
    report = json.loads(Path(cfg.output_dir, REPORT_FILE).read_text())
    assert report["ok"] is False and "under min_success_rate" in report["error"]
    missing = _job(f"url_list={cfg.url_list}.missing", f"output_dir={cfg.output_dir}")
    assert missing.returncode == 2 and "not found" in missing.stderr
    assert _job("no_such_key=1").returncode == 2


@pytest.mark.parametrize("message, reason", [
    ("HTTP Error 404: Not Found", "http_404"), ("HTTP Error 503: Service Unavailable", "http_503"),
    ("Image decoding error", "decode_error"), ("image too small", "too_small"),
    ("aspect ratio too large", "aspect_ratio"), ("<urlopen error timed out>", "timeout"),
    ("<urlopen error [Errno 111] Connection refused>", "connection_error"), ("unknown url type: ''", "invalid_url"),
    ("something new", "other"),
])
def test_failure_reasons(message, reason):
    assert failure_reason(message) == reason
