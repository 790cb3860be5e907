"""Precompute stage on a real local Ray with the tiny encoders: features, drops, reruns, crashes.

Input: 8 small WebDataset shards of 6 samples (64 px JPEGs of three sizes, so resize and crop both
run) with three planted bad samples, plus one empty shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.core.config import from_dict
from pipelines.core.job import run_stage
from pipelines.core.runtime import finish
from pipelines.data import schema
from pipelines.data.filter.config import REPORT_FILE as FILTER_REPORT
from pipelines.data.precompute.config import PrecomputeConfig, report_path
from pipelines.data.precompute.driver import STAGE, run_precompute
from pipelines.data.precompute.encode import EncoderActor, non_finite_reasons
from pipelines.data.precompute.rows import (
    DECODE_ERROR,
    DROP_REASON,
    IMAGE,
    LAST,
    MISSING_IMAGE,
    NON_FINITE_LATENTS,
    ORDINAL,
    read_and_decode,
    vae_input,
)
from tests.snapshots import tree_snapshot

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "precompute_latents.py"
SHARDS, PER_SHARD = 8, 6
TRUNCATED, GARBAGE, NO_IMAGE = "00010002", "00030004", "00050001"  # planted bad samples (keys)
LONG_CAPTION = "00060002"  # a caption longer than the text encoder's 77 tokens: encoded cut, and counted
EXPECTED_DROPS = {DECODE_ERROR: 2, MISSING_IMAGE: 1}


def _jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _sample(rng: np.random.Generator, key: str, index: int) -> dict:
    width, height = ((64, 64), (96, 64), (64, 80))[index % 3]
    sample = {"__key__": key, "jpg": _jpeg(rng, width, height), "txt": f"a small red circle number {index}",
              "json": {"key": key}}
    if key == TRUNCATED:
        sample["jpg"] = sample["jpg"][:200]
    elif key == GARBAGE:
        sample["jpg"] = b"<html>not an image</html>"
    elif key == NO_IMAGE:
        del sample["jpg"]
    elif key == LONG_CAPTION:
        sample["txt"] = " ".join(f"word{i}" for i in range(120))
    return sample


def write_shards(root: Path, shards: int, per_shard: int, empty_last: bool = True) -> dict[str, dict]:
    """WebDataset shards NNNNN.tar like the filter stage writes; returns the samples by key."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    rng, samples = np.random.default_rng(0), {}
    for s in range(shards + int(empty_last)):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as sink:
            for i in range(per_shard if s < shards else 0):
                sample = _sample(rng, f"{s:04d}{i:04d}", i)
                sink.write(sample)
                samples[sample["__key__"]] = sample
    write_filter_report(root)
    return samples


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_filter_report(root: Path, ok: bool = True) -> None:
    """The filter stage's verdict on its folder, with each shard's rows and sha256, as the filter writes it."""
    shards = []
    for path in sorted(root.glob("*.tar")):
        with tarfile.open(path) as tar:
            keys = {m.name.split(".", 1)[0] for m in tar.getmembers()}
        shards.append({"name": path.name, "rows": len(keys), "sha256": sha256_of(path)})
    report = {"stage": "filter", "ok": ok, "error": None if ok else "no rows left after filtering",
              "output_shards": shards}
    (root / FILTER_REPORT).write_text(json.dumps(report))


def cut_inside(path: Path, key: str) -> None:
    """Truncate a tar in the middle of that sample's first member's data (a copy cut short)."""
    with tarfile.open(path) as tar:
        first = next(m for m in tar.getmembers() if m.name.startswith(key + "."))
    path.write_bytes(path.read_bytes()[:first.offset_data + 10])


def make_config(input_dir: Path, output_dir: Path, **sections) -> PrecomputeConfig:
    values = {"input_dir": str(input_dir), "output_dir": str(output_dir), "image_size": 64,
              "compute": {"batch_size": 4, "actors": 1}}
    for name, section in sections.items():
        values[name] = {**values.get(name, {}), **section} if isinstance(section, dict) else section
    return from_dict(PrecomputeConfig, values)


def read_rows(directory: Path) -> dict[str, dict[str, np.ndarray]]:
    """key -> stored feature values (latents in their bucket's shape) and bucket, over every shard of a feature
    directory."""
    manifest = schema.Manifest.load(directory)
    shapes, rows = manifest.shapes, {}
    for shard in manifest.shards:
        table = pq.read_table(directory / shard["name"])
        buckets = list(zip(table.column(schema.BUCKET_HEIGHT).to_pylist(),
                           table.column(schema.BUCKET_WIDTH).to_pylist()))
        states = schema.column_array(table, schema.TEXT_STATES, manifest.text_shape)
        lengths = table.column(schema.TEXT_LENGTH).to_numpy()
        latents = {name: table.column(name).combine_chunks() for name in shapes.latent_columns()}
        for i, key in enumerate(table.column(schema.KEY).to_pylist()):
            assert key not in rows, f"duplicated row {key}"
            rows[key] = {name: column[i].values.to_numpy(zero_copy_only=False).reshape(shapes.latent_of(buckets[i]))
                         for name, column in latents.items()}
            rows[key].update({schema.TEXT_STATES: states[i], schema.TEXT_LENGTH: lengths[i],
                              "bucket": np.array(buckets[i])})
    return rows


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    root = tmp_path_factory.mktemp("filtered")
    return root, write_shards(root, SHARDS, PER_SHARD)


@pytest.fixture(scope="module")
def clean_run(ray_local, shards, tmp_path_factory):
    """One uninterrupted run: the reference for the other tests."""
    out = tmp_path_factory.mktemp("features")
    cfg = make_config(shards[0], out)
    report = run_precompute(cfg)
    assert finish(report, report_path(cfg)) == 0, report.to_dict()
    return out, report


def test_features_rows_and_report(clean_run, shards):
    out, report = clean_run
    samples = shards[1]
    manifest = schema.Manifest.load(out)
    assert manifest.latent_shape == (4, 16, 16) and manifest.text_shape == (77, 64)
    assert manifest.vae["id"] == "random:tiny:seed=0" and manifest.scaling_factor == 1.0
    assert manifest.text_encoder["layer"] == "penultimate"
    assert [s["name"] for s in manifest.shards] == [schema.shard_name(i) for i in range(SHARDS + 1)]
    for shard in manifest.shards:
        assert pq.read_metadata(out / shard["name"]).num_rows == shard["rows"]
    assert manifest.shards[-1]["rows"] == 0  # the empty tar gives an empty, committed shard
    good = set(samples) - {TRUNCATED, GARBAGE, NO_IMAGE}
    assert set(read_rows(out)) == good and manifest.total_rows == len(good)

    written = json.loads((out / "precompute_report.json").read_text())
    assert written["ok"] and written["rows_in"] == SHARDS * PER_SHARD
    assert written["rows_out"] == len(good) and written["dropped"] == EXPECTED_DROPS
    assert written["rows_per_second"] > 0 and written["rows_per_second_per_actor_busy"] > 0
    assert written["shards_written"] == SHARDS + 1
    assert written["captions_truncated"] == 1 and written["text_context_length"] == 77
    tars = sorted(shards[0].glob("*.tar"))
    assert written["input_shards"] == [{"name": p.name, "sha256": sha256_of(p)} for p in tars]


def test_features_equal_direct_encoding(clean_run, shards):
    """Stored rows are the encoders' outputs for that very sample (no rows mixed up), and the
    empty-caption file holds text_encoder([""])."""
    import torch
    from safetensors.torch import load_file

    from model.encoders import build_text_encoder, build_vae

    out, samples = clean_run[0], shards[1]
    vae, text = build_vae("tiny"), build_text_encoder("tiny")
    rows = read_rows(out)
    for key in ("00000001", "00040005", "00070003"):
        image = torch.from_numpy(vae_input(samples[key]["jpg"], 64))[None]
        mean, logvar = vae.encode(image)
        states, mask = text([samples[key]["txt"]])
        row = rows[key]
        for name, expected in ((schema.LATENT_MEAN, mean), (schema.LATENT_LOGVAR, logvar),
                               (schema.TEXT_STATES, states)):
            np.testing.assert_allclose(row[name].astype(np.float32), expected[0].numpy(), atol=2e-3, rtol=2e-3)
        assert row[schema.TEXT_LENGTH] == int(mask.sum())

    empty = load_file(out / schema.EMPTY_CAPTION_FILE)
    states, mask = text([""])
    assert empty[schema.EMPTY_CAPTION_STATES].dtype == torch.float16
    torch.testing.assert_close(empty[schema.EMPTY_CAPTION_STATES].float(), states[0], atol=2e-3, rtol=2e-3)
    assert torch.equal(empty[schema.EMPTY_CAPTION_MASK], mask[0])


BUCKETS = ((80, 48), (64, 64), (48, 80))  # image_size 64, multiple 16, max_ratio 2: tall, square, wide


def test_buckets_and_flip_through_the_stage(ray_local, shards, tmp_path):
    """Images of three aspects (64x64, 96x64 and 64x80, in every shard) through the real pipeline with
    buckets: each row is stored in the bucket nearest its aspect, with that bucket's latent shape, grouped by
    bucket in the manifest's order, counted per shard in the manifest and the report; with flip, the flipped
    image's moments are stored too. Both equal a direct encoding of the sample."""
    import torch

    from model.encoders import build_vae

    out, samples = tmp_path / "features", shards[1]
    cfg = make_config(shards[0], out, buckets={"multiple": 16}, flip=True)
    report = run_precompute(cfg)
    assert finish(report, report_path(cfg)) == 0, report.to_dict()
    manifest = schema.Manifest.load(out)
    assert manifest.buckets == BUCKETS and manifest.flip and manifest.latent_shape == (4, 16, 16)
    rows = read_rows(out)
    # 64x64 -> square; 96x64 (3:2) -> the wide 48x80 (5:3); 64x80 (4:5) -> square (nearer than 3:5 on a log scale)
    expected_bucket = {0: (64, 64), 1: (48, 80), 2: (64, 64)}
    for key, row in rows.items():
        bucket = expected_bucket[int(key[4:]) % 3]
        assert tuple(row["bucket"]) == bucket
        for name in manifest.shapes.latent_columns():
            assert row[name].shape == (4, bucket[0] // 4, bucket[1] // 4)
    counts = manifest.shard_bucket_rows()
    assert counts.sum() == manifest.total_rows == len(rows) and counts[:, 0].sum() == 0  # no tall image
    assert report.details["bucket_rows"] == {"80x48": 0, "64x64": int(counts[:, 1].sum()),
                                             "48x80": int(counts[:, 2].sum())}
    for shard, count in zip(manifest.shards, counts):  # grouped by bucket, in the manifest's order
        table = pq.read_table(out / shard["name"], columns=[schema.BUCKET_HEIGHT, schema.BUCKET_WIDTH])
        stored = list(zip(table.column(0).to_pylist(), table.column(1).to_pylist()))
        assert stored == [b for b, n in zip(BUCKETS, count) for _ in range(n)]
    vae = build_vae("tiny")
    for key in ("00000001", "00040005", "00070003"):
        image = torch.from_numpy(vae_input(samples[key]["jpg"], 64, BUCKETS))[None]  # (1, 3, H, W)
        for (mean_name, logvar_name), pixels in (((schema.LATENT_MEAN, schema.LATENT_LOGVAR), image),
                                                 ((schema.LATENT_MEAN_FLIPPED, schema.LATENT_LOGVAR_FLIPPED),
                                                  image.flip(-1))):
            mean, logvar = vae.encode(pixels)
            np.testing.assert_allclose(rows[key][mean_name].astype(np.float32), mean[0].numpy(), atol=2e-3, rtol=2e-3)
            np.testing.assert_allclose(rows[key][logvar_name].astype(np.float32), logvar[0].numpy(), atol=2e-3,
                                       rtol=2e-3)
        assert not np.allclose(rows[key][schema.LATENT_MEAN], rows[key][schema.LATENT_MEAN_FLIPPED])
    # another bucket set over the same output is another feature format: refused, nothing changed
    before = tree_snapshot(out)
    assert run_stage(STAGE, make_config(shards[0], out, buckets={"multiple": 16, "max_ratio": 1.0}, flip=True)) == 2
    assert tree_snapshot(out) == before


def _mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()
            if p.suffix in (".parquet", ".safetensors")}


def test_rerun_is_a_noop(clean_run, shards):
    out, first = clean_run
    before = _mtimes(out)
    report = run_precompute(make_config(shards[0], out))
    assert _mtimes(out) == before  # no shard (nor the empty caption) rewritten
    assert report.details["shards_written"] == 0 and report.details["shards_skipped"] == SHARDS + 1
    assert (report.rows_in, report.rows_out, report.dropped) == (first.rows_in, first.rows_out, first.dropped)


@pytest.mark.parametrize("change, field", [({"vae": {"seed": 1}}, "vae_id"),
                                           ({"text": {"layer": "last"}}, "text_encoder_id")])
def test_encoder_mismatch_on_rerun_is_an_error(clean_run, shards, change, field, caplog):
    """Refused as the job runs it (exit 2, FeatureMismatchError's line naming the field), and nothing changed:
    not a feature shard, the manifest, the report nor the folder itself; the input neither."""
    out = clean_run[0]
    before, inputs_before = tree_snapshot(out), tree_snapshot(shards[0])
    assert run_stage(STAGE, make_config(shards[0], out, **change)) == 2
    assert f"bad config or input: output_dir {out} already holds features that do not match" in caplog.text
    assert field in caplog.text
    assert tree_snapshot(out) == before and tree_snapshot(shards[0]) == inputs_before


def _run_job(out: Path, input_dir: Path, log_file: Path, address: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": address}  # join the test's cluster: no second Ray on 2 CPUs
    args = [sys.executable, str(JOB), "--set", f"input_dir={input_dir}", "--set", f"output_dir={out}",
            "--set", "compute.batch_size=2", "--set", "compute.read_concurrency=1"]
    with log_file.open("wb") as log:  # a file, not a pipe: nobody drains Ray Data's progress logs
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_for_first_shard(process: subprocess.Popen, out: Path, log_file: Path, timeout: float = 150.0) -> None:
    deadline = time.monotonic() + timeout
    while not list(out.glob(f"{schema.SHARD_PREFIX}*{schema.SHARD_SUFFIX}")):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no shard appeared (exit {process.poll()}):\n{log_file.read_text()[-3000:]}")
        time.sleep(0.01)


def test_sigkill_then_rerun_gives_the_rows_of_a_clean_run(clean_run, shards, ray_local, tmp_path):
    reference, input_dir = clean_run[0], shards[0]
    out, log_file = tmp_path / "features", tmp_path / "job.log"
    address = ray_local.get_runtime_context().gcs_address
    process = _run_job(out, input_dir, log_file, address)
    _wait_for_first_shard(process, out, log_file)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / schema.MANIFEST_FILE).exists(), "the job finished before the kill: nothing was tested"
    stale = out / ".part-00007.parquet.tmp-killed"  # what a kill during a write leaves behind
    stale.write_bytes(b"PAR1 half a file")

    cfg = make_config(input_dir, out)  # the rerun in process: what the job runs, minus a second start-up
    rerun = run_precompute(cfg)
    assert finish(rerun, report_path(cfg)) == 0
    assert 1 <= rerun.details["shards_skipped"] <= SHARDS  # the killed run's shards were kept
    assert not stale.exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    expected, got = read_rows(reference), read_rows(out)
    assert sorted(got) == sorted(expected)
    for key, row in expected.items():
        for name, values in row.items():
            np.testing.assert_allclose(got[key][name].astype(np.float32), values.astype(np.float32), atol=2e-3)
    report = json.loads((out / "precompute_report.json").read_text())
    assert report["rows_in"] == SHARDS * PER_SHARD and report["dropped"] == EXPECTED_DROPS
    assert schema.Manifest.load(out).shards == schema.Manifest.load(reference).shards


def test_non_finite_latents_are_dropped_not_fatal(tmp_path):
    """The real reader and encoder actor (in process) with a diffusers VAE directory whose posterior
    mean overflows float16: those rows get a drop reason instead of crashing the batch. (How drop
    reasons are counted and kept out of the shards is covered by the stage run above.)"""
    import torch
    from diffusers import AutoencoderKL

    from model.encoders import tiny_vae_config
    from pipelines.core.config import to_dict

    vae = AutoencoderKL.from_config(tiny_vae_config())
    with torch.no_grad():
        vae.quant_conv.weight.mul_(1e8)  # |mean| ~ 1e8 > float16 max; diffusers clamps logvar
    vae.save_pretrained(tmp_path / "vae")
    input_dir = tmp_path / "in"
    write_shards(input_dir, shards=1, per_shard=3, empty_last=False)
    cfg = make_config(input_dir, tmp_path / "out", vae={"source": str(tmp_path / "vae")})

    shard = {"shard": np.array([0]), "name": np.array(["00000.tar"], dtype=object), "rows": np.array([3])}
    (batch,) = read_and_decode(shard, str(input_dir), image_size=64, chunk=8, text_model="tiny")
    assert batch[ORDINAL].tolist() == [0, 1, 2] and batch[LAST].tolist() == [False, False, True]
    batch[DROP_REASON][0] = DECODE_ERROR  # a row the reader already dropped is passed through
    actor = EncoderActor(to_dict(cfg))
    assert actor.vae.id.startswith("diffusers:")
    out = actor(batch)
    assert out[DROP_REASON].tolist() == [DECODE_ERROR, NON_FINITE_LATENTS, NON_FINITE_LATENTS]
    assert IMAGE not in out and out[schema.LATENT_MEAN].shape == (3, 4, 16, 16)


def test_non_finite_check_counts_float16_overflow():
    latent = np.zeros((4, 2, 3, 3), np.float32)
    latent[1, 0, 0, 0] = np.nan
    latent[2, 1, 2, 2] = 1e5  # finite in float32, inf once stored as float16
    text = np.zeros((4, 5, 8), np.float32)
    text[3, 4, 7] = np.inf
    features = {schema.LATENT_MEAN: latent.astype(np.float16), schema.LATENT_LOGVAR: np.zeros_like(latent),
                schema.TEXT_STATES: text.astype(np.float16)}
    assert non_finite_reasons(features).tolist() == ["", NON_FINITE_LATENTS, NON_FINITE_LATENTS,
                                                     "non_finite_text"]


def test_vae_input_resizes_and_center_crops():
    rng = np.random.default_rng(1)
    image = vae_input(_jpeg(rng, 96, 48), 32)
    assert image.shape == (3, 32, 32) and image.dtype == np.float32
    assert vae_input(_jpeg(rng, 96, 48), 64, BUCKETS).shape == (3, 48, 80)  # 2:1 -> the widest bucket, 5:3
    assert vae_input(_jpeg(rng, 40, 90), 64, BUCKETS).shape == (3, 80, 48)
    assert -1.0 <= image.min() and image.max() <= 1.0
    with pytest.raises(Exception):
        vae_input(b"not an image", 32)


def test_job_help_and_config_errors():
    result = subprocess.run([sys.executable, str(JOB), "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "output_dir" in result.stdout
    bad = subprocess.run([sys.executable, str(JOB), "--set", "input_dir=/x", "--set", "output_dir=/y",
                          "--set", "compute.dtype=fp8"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "compute.dtype" in bad.stderr


def test_precompute_refuses_a_filter_folder_that_did_not_finish(clean_run, shards, tmp_path, caplog):
    """The filter's report is its verdict: a failed or missing one is refused with one line, before Ray, and the
    refusal changes nothing: no output folder made, the filter folder as it was, and an earlier run's features
    (as after a filter rerun that failed) untouched, report and manifest included."""
    input_dir, out = tmp_path / "filtered", tmp_path / "out"
    write_shards(input_dir, shards=1, per_shard=2, empty_last=False)
    (input_dir / FILTER_REPORT).unlink()
    inputs_before = tree_snapshot(input_dir)
    assert run_stage(STAGE, make_config(input_dir, out)) == 2
    assert f"{input_dir / FILTER_REPORT} not found" in caplog.text and "jobs/filter_data.py" in caplog.text
    assert not out.exists() and tree_snapshot(input_dir) == inputs_before
    write_filter_report(input_dir, ok=False)
    features = clean_run[0]
    inputs_before, features_before = tree_snapshot(input_dir), tree_snapshot(features)
    job = subprocess.run([sys.executable, str(JOB), "--set", f"input_dir={input_dir}", "--set",
                          f"output_dir={features}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = job.stderr.strip().splitlines()
    assert job.returncode == 2 and len(lines) == 1, job.stderr[-3000:]
    assert "filter_report.json says the filter failed (no rows left after filtering)" in lines[0]
    assert tree_snapshot(input_dir) == inputs_before and tree_snapshot(features) == features_before


def test_a_truncated_tar_is_skipped_and_its_lost_rows_counted(ray_local, tmp_path):
    input_dir, out = tmp_path / "filtered", tmp_path / "features"
    samples = write_shards(input_dir, shards=2, per_shard=4, empty_last=False)  # the report says 4 rows each
    cut_inside(input_dir / "00001.tar", "00010002")  # samples 0 and 1 are whole, 2 and 3 are lost
    cfg = make_config(input_dir, out)
    assert run_stage(STAGE, cfg) == 0
    report = json.loads((out / "precompute_report.json").read_text())
    assert report["dropped"] == {"unreadable_shard": 2} and (report["rows_in"], report["rows_out"]) == (8, 6)
    assert [d["name"] for d in report["shards_damaged"]] == ["00001.tar"]
    assert set(read_rows(out)) == set(samples) - {"00010002", "00010003"}


def test_rerun_after_the_filter_changed_its_output_redoes_it(ray_local, tmp_path):
    """The filter rerun with other settings rewrites 00000.tar under the same name and no longer writes
    00002.tar: precompute recognises its inputs by content, so it re-encodes part-00000, removes part-00002
    and keeps part-00001 as it is."""
    import webdataset as wds

    input_dir, out = tmp_path / "filtered", tmp_path / "features"
    write_shards(input_dir, shards=3, per_shard=3, empty_last=False)
    cfg = make_config(input_dir, out)
    assert run_stage(STAGE, cfg) == 0
    kept = (out / schema.shard_name(1)).stat().st_mtime_ns

    rng = np.random.default_rng(7)
    with wds.TarWriter(str(input_dir / "00000.tar")) as sink:  # fewer, other rows under the same name
        for i in range(2):
            sink.write(_sample(rng, f"0099{i:04d}", i))
    (input_dir / "00002.tar").unlink()
    write_filter_report(input_dir)
    assert run_stage(STAGE, cfg) == 0
    assert set(read_rows(out)) == {"00990000", "00990001", "00010000", "00010001"}  # 00010002 is TRUNCATED
    assert not (out / schema.shard_name(2)).exists()
    assert (out / schema.shard_name(1)).stat().st_mtime_ns == kept
    report = json.loads((out / "precompute_report.json").read_text())
    assert (report["shards_written"], report["shards_removed"], report["rows_out"]) == (1, 1, 4)
    assert report["input_shards"] == [{"name": p.name, "sha256": sha256_of(p)} for p in sorted(input_dir.glob("*.tar"))]
    assert [s["source_sha256"] for s in schema.Manifest.load(out).shards] == [sha256_of(input_dir / "00000.tar"),
                                                                            sha256_of(input_dir / "00001.tar")]
