"""The filter stage: unit checks of the row tests and hashes, then the stage on a real local Ray
over raw shards with planted bad items, the job as a subprocess, and the CLIP filter."""

import hashlib
import io
import itertools
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from pipelines.core.config import ConfigError, from_dict, to_dict
from pipelines.core.job import run_stage
from pipelines.core.runtime import finish
from pipelines.data.download import REPORT_FILE as DOWNLOAD_REPORT
from pipelines.data.filter.config import (
    REPORT_FILE,
    CaptionChecks,
    FilterConfig,
    ImageChecks,
    check_inputs,
    report_path,
)
from pipelines.data.filter.dedup import NearDuplicateIndex, decide
from pipelines.data.filter.driver import STAGE, run_filter
from pipelines.data.filter.rows import caption_check, color_thumb, decode_or_none, dhash, size_check
from pipelines.data.filter.scan import ClipScorer, scan_shards
from tests.log_lines import progress_lines
from tests.snapshots import tree_snapshot

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------- synthetic raw shards

COLORS = [(220, 20, 20), (20, 160, 20), (20, 40, 220), (230, 200, 0), (140, 30, 160), (240, 120, 0)]
CENTERS = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75), (0.5, 0.5)]
COMBOS = list(itertools.product(range(3), range(6), (0.3, 0.6), range(5)))  # shape, colour, size, pos


def draw(combo, n=64) -> Image.Image:
    """A filled shape on white, as the synthetic data generator draws them."""
    shape, color, frac, pos = combo
    img = Image.new("RGB", (n, n), (255, 255, 255))
    s = frac * n
    cx, cy = (min(max(c * n, s / 2), n - s / 2) for c in CENTERS[pos])
    box = (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)
    d = ImageDraw.Draw(img)
    if shape == 0:
        d.ellipse(box, fill=COLORS[color])
    elif shape == 1:
        d.rectangle(box, fill=COLORS[color])
    else:
        d.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=COLORS[color])
    return img


def encode(img: Image.Image, fmt="JPEG", quality=95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def sample(key, image=None, caption=b"a small red circle in the top left", meta=None):
    """One raw sample as img2dataset writes it; None leaves a member out."""
    meta = {"key": key, "status": "success", **(meta or {})}
    members = {"jpg": image, "txt": caption.encode() if isinstance(caption, str) else caption,
               "json": json.dumps(meta).encode()}
    return key, {ext: data for ext, data in members.items() if data is not None}


def write_shard(root: Path, index: int, samples, stats=True, cut_at_sample=None) -> None:
    path = root / f"{index:05d}.tar"
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    if cut_at_sample is not None:  # damage: cut inside that sample's first member's data
        with tarfile.open(path) as tar:
            first = next(m for m in tar.getmembers() if m.name.startswith(cut_at_sample + "."))
        path.write_bytes(path.read_bytes()[:first.offset_data + 10])
    if stats:  # img2dataset's: count = URL rows of the shard, successes = samples in its tar
        (root / f"{index:05d}_stats.json").write_text(json.dumps({"count": len(samples), "successes": len(samples)}))
    pq.write_table(pa.table({"key": [k for k, _ in samples]}), root / f"{index:05d}.parquet")


def write_download_report(root: Path, ok: bool = True) -> None:
    """What the download stage leaves beside its shards (the parts the filter reads)."""
    report = {"stage": "download", "ok": ok, "error": None if ok else "download success rate 12.0% is under 90.0%"}
    (root / DOWNLOAD_REPORT).write_text(json.dumps(report))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def good(key, k) -> tuple:
    return sample(key, encode(draw(COMBOS[k])), f"shape {k} drawn for key {key}")


GOOD_IDS = list(range(0, 180, 3))  # 60 combos, colour variants of one another among them
SPARE_IDS = list(range(1, 180, 3))  # images for planted items: distinct from every good one


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """4 finished shards (one damaged at its end) + 1 unfinished; returns (dir, expectations)."""
    root = tmp_path_factory.mktemp("raw")
    goods = iter(GOOD_IDS)
    img = {k: encode(draw(COMBOS[k])) for k in range(180)}
    s0 = [good(f"0000000{i:02d}", next(goods)) for i in range(20)]
    s0 += [
        sample("000000020", b"this is not an image"),  # undecodable
        sample("000000021", img[SPARE_IDS[0]][:300]),  # truncated JPEG: undecodable
        sample("000000022", encode(draw(COMBOS[1], n=8))),  # too small
        sample("000000023", encode(draw(COMBOS[4]).resize((400, 40)))),  # aspect 10:1
        sample("000000024", img[SPARE_IDS[1]], meta={"original_width": 640, "original_height": 64}),
        sample("000000025", img[SPARE_IDS[2]], meta={"original_width": 16, "original_height": 16}),
        sample("000000026", img[SPARE_IDS[3]], ""),  # empty (its image is kept under 000010024)
        sample("000000027", img[SPARE_IDS[4]], "  \n\t "),  # whitespace only
        sample("000000028", img[SPARE_IDS[5]], "x" * 2000),  # too long
        sample("000000029", img[SPARE_IDS[6]], b"\xff\xfe a red \xc3\x28 circle"),  # not UTF-8
        sample("000000030", img[SPARE_IDS[7]], "ab"),  # too short
        sample("000000031", img[SPARE_IDS[8]], None),  # no .txt
        sample("000000032", None),  # no image
    ]
    changed = draw(COMBOS[s0_combo(9)]).copy()
    changed.putpixel((3, 60), (0, 0, 0))
    s1 = [good(f"0000100{i:02d}", next(goods)) for i in range(20)]
    s1 += [
        sample("000010020", img[s0_combo(3)]),  # same bytes as 000000003
        sample("000010021", encode(decode_or_none(img[s0_combo(5)]), "PNG")),  # same pixels as 5
        sample("000010022", encode(draw(COMBOS[s0_combo(7)]), quality=70)),  # re-encoded 7
        sample("000010023", encode(changed)),  # 9 with one pixel changed
        sample("000010024", img[SPARE_IDS[3]], "the first copy had an empty caption"),  # kept
        sample("000000001", img[SPARE_IDS[9]], "a key the first shard already has"),
    ]
    s2 = [good(f"0000200{i:02d}", next(goods)) for i in range(20)]
    s3 = [good(f"0000300{i:02d}", SPARE_IDS[20 + i]) for i in range(5)]  # no stats: unfinished
    s4 = [good(f"0000400{i:02d}", SPARE_IDS[30 + i]) for i in range(5)]  # damaged in sample 3
    write_shard(root, 0, s0)
    write_shard(root, 1, s1)
    write_shard(root, 2, s2)
    write_shard(root, 3, s3, stats=False)
    write_shard(root, 4, s4, cut_at_sample="000040003")
    write_download_report(root)
    kept = {k for k, _ in s0[:20] + s1[:20] + s2 + s4[:3]} | {"000010024"}
    return root, kept


def s0_combo(i: int) -> int:
    return GOOD_IDS[i]  # the combo drawn for good sample 00000000i of shard 0


EXPECTED_DROPS = {
    "missing_image": 1, "caption_missing": 1, "caption_not_utf8": 1, "caption_empty": 2,
    "caption_too_short": 1, "caption_too_long": 1, "undecodable_image": 2, "image_too_small": 2,
    "aspect_ratio": 2, "clip_similarity": 0, "duplicate_key": 1, "exact_duplicate": 2,
    "near_duplicate": 2, "unreadable_shard": 2,  # 00004.tar is cut inside its sample 3 of 5
}


def config(raw_dir, out_dir, **sections) -> FilterConfig:
    values = {"input_dir": str(raw_dir), "output_dir": str(out_dir),
              "image": {"min_side": 32, "max_aspect": 3.0}, "dedup": {"near": True}}
    for name, value in sections.items():
        values[name] = {**values.get(name, {}), **value} if isinstance(value, dict) else value
    return from_dict(FilterConfig, values)


def read_output(out_dir: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(out_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def run_and_report(cfg: FilterConfig) -> tuple[int, dict]:
    status = finish(run_filter(cfg), report_path(cfg))
    return status, json.loads(Path(report_path(cfg)).read_text())


# ------------------------------------------------------------------------------- unit checks

def test_caption_checks():
    c = CaptionChecks(min_chars=3, max_chars=10)
    assert caption_check(None, c)[0] == "caption_missing"
    assert caption_check(b"\xff\xfe", c)[0] == "caption_not_utf8"
    assert caption_check(b" \n\t", c)[0] == "caption_empty"
    assert caption_check(b" ab ", c)[0] == "caption_too_short"
    assert caption_check(b"x" * 11, c)[0] == "caption_too_long"
    assert caption_check(" caf\u00e9 ".encode(), c) == ("", " caf\u00e9 ")


def test_size_checks_use_original_size():
    c = ImageChecks(min_side=32, max_aspect=3.0)
    assert size_check((64, 64), None, c) == ""
    assert size_check((8, 8), None, c) == "image_too_small"
    assert size_check((400, 40), None, c) == "aspect_ratio"
    assert size_check((64, 64), (640, 64), c) == "aspect_ratio"  # center-cropped download
    assert size_check((64, 64), (16, 16), c) == "image_too_small"  # upscaled download
    assert size_check((64, 64), (640, 64), ImageChecks(32, 3.0, use_original_size=False)) == ""


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="clip.weights"):
        from_dict(FilterConfig, {"clip": {"enabled": True, "model": "tiny"}})
    with pytest.raises(ConfigError, match="dedup.max_hamming"):
        from_dict(FilterConfig, {"dedup": {"max_hamming": 40}})
    with pytest.raises(ConfigError, match="dedup.nearr"):
        from_dict(FilterConfig, {"dedup": {"nearr": True}})


def test_dhash_with_colour_guard_separates_all_synthetic_images():
    """Re-encodes and one-pixel edits are near duplicates; no two of the 180 distinct synthetic
    images are, although dHash alone cannot tell colours apart."""
    imgs = [decode_or_none(encode(draw(c))) for c in COMBOS]
    index = NearDuplicateIndex(max_hamming=4, max_color_diff=20)
    for img in imgs:
        assert not index.find(dhash(img), color_thumb(img))
        index.add(dhash(img), color_thumb(img))
    for combo in COMBOS[::7]:
        edited = draw(combo)
        edited.putpixel((3, 60), (0, 0, 0))
        for variant in (encode(draw(combo), quality=60), encode(edited)):
            v = decode_or_none(variant)
            assert index.find(dhash(v), color_thumb(v)), combo
    hashes = {dhash(i) for i in imgs[:6 * 10:10]}  # one shape/size/place in six colours
    assert len(hashes) == 1  # why the colour guard exists


def test_near_index_matches_brute_force():
    rng = np.random.default_rng(0)
    hashes = []
    for base in rng.integers(0, 2**63, 150):
        for flips in rng.integers(0, 8, 3):
            h = int(base)
            for bit in rng.choice(64, flips, replace=False):
                h ^= 1 << int(bit)
            hashes.append(h)
    for t in (0, 3, 6):
        index, kept = NearDuplicateIndex(t, 255), []
        for h in hashes:
            expected = any((h ^ k).bit_count() <= t for k in kept)
            assert index.find(h, bytes(192)) == expected
            if not expected:
                index.add(h, bytes(192))
                kept.append(h)


def test_decide_keeps_first_by_key_whatever_the_order():
    rows = {"shard": ["b.tar", "a.tar", "a.tar", "a.tar"], "idx": [0, 0, 1, 2],
            "key": ["k1", "k2", "k3", "k1"], "reason": ["", "", "", ""],
            "sha256": [b"x", b"x", b"y", b"x"], "dhash": [1, 2, 3, 4], "thumb": [bytes(192)] * 4}
    table = pa.table(rows)
    reasons = decide(table, from_dict(FilterConfig, {}).dedup)
    # k1 (a.tar) is visited before k1 (b.tar): the b.tar copy repeats a key; k2 shares k1's pixels
    assert reasons == ["duplicate_key", "exact_duplicate", "", ""]
    flipped = decide(table.take([3, 2, 1, 0]), from_dict(FilterConfig, {}).dedup)
    assert flipped == reasons[::-1]


# --------------------------------------------------------------------------- stage on real Ray

def test_filter_stage_counts_every_planted_item(raw, tmp_path, ray_local, caplog):
    raw_dir, kept = raw
    out = tmp_path / "filtered"
    with caplog.at_level(logging.INFO, logger="latentforge.filter"):
        status, report = run_and_report(config(raw_dir, out))
    assert status == 0, report
    # a progress line (pipelines/core/progress.py) per input shard scanned and per output shard written
    finished = ["00000.tar", "00001.tar", "00002.tar", "00004.tar"]
    for verb in ("scanned", "wrote"):
        lines = [line for line in progress_lines("\n".join(r.getMessage() for r in caplog.records))
                 if f"| {verb} " in line]
        assert [line.split(" shards (")[0] for line in lines] == [f"{n}/4" for n in range(1, 5)], lines
        assert sorted(line.split(f"| {verb} ")[1][:9] for line in lines) == finished, lines
    assert report["dropped"] == EXPECTED_DROPS
    assert report["rows_in"] == sum(EXPECTED_DROPS.values()) + len(kept)
    assert report["rows_out"] == len(kept)
    assert report["shards_unfinished"] == ["00003.tar"]
    assert [d["name"] for d in report["shards_damaged"]] == ["00004.tar"]
    assert {s["name"] for s in report["output_shards"]} == {"00000.tar", "00001.tar", "00002.tar",
                                                           "00004.tar"}
    # what was consumed and made, by content: sha256 of the bytes read and of the bytes written
    assert report["input_shards"] == [{"name": p.name, "sha256": sha256_of(p)}
                                      for p in sorted(raw_dir.glob("*.tar")) if p.name != "00003.tar"]
    assert all(s["sha256"] == sha256_of(out / s["name"]) for s in report["output_shards"])
    samples = read_output(out)
    assert set(samples) == kept  # every good item arrives, nothing else
    with tarfile.open(raw_dir / "00001.tar") as tar:  # original bytes, unchanged
        assert samples["000010024"]["jpg"] == tar.extractfile("000010024.jpg").read()
    assert set(samples["000000000"]) == {"jpg", "txt", "json"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging, no temporaries

    # rerun with the same inputs and settings: a no-op, nothing rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    status, again = run_and_report(config(raw_dir, out))
    assert status == 0 and again["noop"] and again["dropped"] == EXPECTED_DROPS
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes

    # changed settings: a clean overwrite (near duplicates now arrive; a stray shard is removed)
    (out / "00099.tar").write_bytes(b"left over from something else")
    status, third = run_and_report(config(raw_dir, out, dedup={"near": False}))
    assert status == 0 and not third["noop"]
    assert third["dropped"]["near_duplicate"] == 0 and third["rows_out"] == len(kept) + 2
    assert set(read_output(out)) == kept | {"000010022", "000010023"}
    assert not (out / "00099.tar").exists()


def test_job_exit_codes_and_report(raw, tmp_path, ray_local):
    """The job as users run it: --help, a config error (2), and zero rows left (1 + report).
    It joins the session's Ray through RAY_ADDRESS, as under `ray job submit`."""
    raw_dir, _ = raw
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    job = [sys.executable, str(REPO / "jobs" / "filter_data.py")]

    def run(*args):
        return subprocess.run(job + list(args), cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=240)

    assert run("--help").returncode == 0
    raw_before = tree_snapshot(raw_dir)
    bad = run("--set", "clip.enabled=true", "--set", f"input_dir={raw_dir}", "--set", f"output_dir={tmp_path / 'no'}")
    assert bad.returncode == 2 and "clip.weights" in bad.stderr
    assert list(tmp_path.iterdir()) == [] and tree_snapshot(raw_dir) == raw_before  # refused before any write
    out = tmp_path / "out"
    proc = run("--set", f"input_dir={raw_dir}", "--set", f"output_dir={out}",
               "--set", "caption.min_chars=900", "--set", "compute.num_cpus=0.25")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len([line for line in progress_lines(proc.stderr) if "| scanned " in line]) == 4, proc.stderr[-3000:]
    report = json.loads((out / REPORT_FILE).read_text())
    assert not report["ok"] and "no rows left" in report["error"]
    assert report["dropped"]["caption_too_short"] > 0 and report["rows_out"] == 0
    assert not list(out.glob("*.tar"))


# ------------------------------------------------------------------------------------ CLIP

@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    import torch

    from model.encoders import create_open_clip

    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    torch.save(create_open_clip("tiny", seed=3).state_dict(), path)
    return path


def test_clip_filter_is_wired(tmp_path, clip_weights, ray_local):
    """The stage's scorer in-process: a threshold of -1 keeps everything, 1 drops everything.
    Then the stage on Ray with a threshold between the scores keeps exactly the rows above it."""
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    write_shard(raw_dir, 0, [good(f"00000000{i}", i * 7) for i in range(6)])
    write_download_report(raw_dir)
    clip = {"enabled": True, "model": "tiny", "weights": str(clip_weights)}

    def scored(min_similarity):
        cfg = to_dict(check_inputs(config(raw_dir, tmp_path / "out",
                                          clip={**clip, "min_similarity": min_similarity})))
        records = pa.concat_tables(scan_shards({"name": np.array(["00000.tar"])}, cfg))
        samples = records.filter(pa.compute.greater_equal(records.column("idx"), 0))  # not the per-shard records
        return ClipScorer(cfg)(samples)

    keep_all, drop_all = scored(-1.0), scored(1.0)
    assert keep_all.column("reason").to_pylist() == [""] * 6
    assert drop_all.column("reason").to_pylist() == ["clip_similarity"] * 6
    scores = dict(zip(keep_all.column("key").to_pylist(), keep_all.column("clip").to_pylist()))
    ranked = sorted(scores, key=scores.get)
    assert scores[ranked[3]] - scores[ranked[2]] > 1e-3  # a margin batch numerics cannot cross
    threshold = (scores[ranked[2]] + scores[ranked[3]]) / 2

    cfg = config(raw_dir, tmp_path / "out", clip={**clip, "min_similarity": threshold})
    status, report = run_and_report(cfg)
    assert status == 0 and report["dropped"]["clip_similarity"] == 3
    assert set(read_output(tmp_path / "out")) == set(ranked[3:])


def test_filter_refuses_a_download_folder_that_did_not_finish(tmp_path, caplog):
    """The download's report is its verdict: a failed or missing one is refused with one line, before Ray,
    and the refusal changes nothing: no output folder made, the download folder and an older output as they were."""
    raw_dir, out = tmp_path / "raw", tmp_path / "out"
    raw_dir.mkdir()
    write_shard(raw_dir, 0, [good(f"00000000{i}", i) for i in range(2)])
    cfg = config(raw_dir, out)
    raw_before = tree_snapshot(raw_dir)
    assert run_stage(STAGE, cfg) == 2
    assert f"{raw_dir / DOWNLOAD_REPORT} not found" in caplog.text and "jobs/download_data.py" in caplog.text
    assert not out.exists() and tree_snapshot(raw_dir) == raw_before
    write_download_report(raw_dir, ok=False)
    # an earlier run's output (its shard and report) in the output folder: a refused rerun must not touch it
    out.mkdir()
    write_shard(out, 0, [good("000000000", 0)])
    (out / REPORT_FILE).write_text(json.dumps({"stage": "filter", "ok": True}))
    raw_before, out_before = tree_snapshot(raw_dir), tree_snapshot(out)
    job = subprocess.run([sys.executable, str(REPO / "jobs" / "filter_data.py"), "--set", f"input_dir={raw_dir}",
                          "--set", f"output_dir={out}"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=240)
    lines = job.stderr.strip().splitlines()
    assert job.returncode == 2 and len(lines) == 1, job.stderr[-3000:]
    assert "download_report.json says the download failed" in lines[0] and "success rate" in lines[0]
    assert tree_snapshot(raw_dir) == raw_before and tree_snapshot(out) == out_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # nothing in the job's working directory
