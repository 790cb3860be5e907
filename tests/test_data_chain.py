"""The data chain end to end: synthetic web -> download -> filter -> precompute -> loader.

Real components only: the loopback HTTP server, img2dataset, a local Ray (`ray_local`), the tiny
encoders, and the stage configs users run (configs/tiny/*.yaml, with the paths overridden the way
`--set` does). The download is the session's (tests/synthetic_download.py: run once, then rerun after the
server has stopped, so a rerun that fetched anything would fail; test_download.py checks it shard by shard).
One module fixture runs the other stages once, reruns each, and simulates a precompute run cut short;
the tests below only read what they recorded.

The good items are exactly the 150 training combinations, once each: render() is deterministic per
combination, so a repeated combination would be the same image and exact dedup would (rightly)
collapse it. Planted items come on top, every kind at least once.
"""

from __future__ import annotations

import collections
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from model.config import PRESETS
from pipelines.core.config import load_config
from pipelines.core.job import run_stage
from pipelines.data import schema
from pipelines.data.download import REPORT_FILE as DOWNLOAD_REPORT
from pipelines.data.download import failure_reason
from pipelines.data.filter.config import REPORT_FILE as FILTER_REPORT
from pipelines.data.filter.config import FilterConfig
from pipelines.data.filter.driver import STAGE as FILTER
from pipelines.data.loader import (
    BATCH_CAPTIONS,
    BATCH_KEYS,
    BATCH_LATENT_LOGVAR,
    BATCH_LATENT_MEAN,
    BATCH_NOISE_SEED,
    BATCH_TEXT_MASK,
    BATCH_TEXT_STATES,
    FeatureLoader,
    LatentSampler,
    LoaderConfig,
    check_manifest_matches,
    load_empty_caption,
)
from pipelines.data.precompute.config import REPORT_FILE as PRECOMPUTE_REPORT
from pipelines.data.precompute.config import PrecomputeConfig
from pipelines.data.precompute.driver import STAGE as PRECOMPUTE
from pipelines.synthetic.shapes import PLANTED_KINDS
from tests.synthetic_download import DOWNLOAD_REASON, N_GOOD, PLANTED, file_mtimes

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "tiny"

# Where each planted kind the download keeps must be dropped, and under which reason (configs/tiny: filter
# min_side=16, max_aspect=3, max_chars=1000, exact dedup); the download's are DOWNLOAD_REASON.
FILTER_REASON = {"extreme_aspect": "aspect_ratio", "empty_caption": "caption_empty",
                 "whitespace_caption": "caption_empty", "long_caption": "caption_too_long",
                 "duplicate_image": "exact_duplicate"}
WORLD = 2


def _counts(report: dict) -> tuple:
    return report["ok"], report["rows_in"], report["rows_out"], {k: v for k, v in report["dropped"].items() if v}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def chain(synthetic_download, tmp_path_factory):
    """The session's download, then every other stage once and each again; returns what the tests check (paths,
    reports, mtimes)."""
    dataset = synthetic_download.dataset
    good = [r for r in dataset.rows if not r["planted"]]
    # The premise of "every good item arrives": no two good items share an image.
    assert N_GOOD == 150 and len(good) == N_GOOD
    assert len({(r["shape"], r["color"], r["size"], r["position"]) for r in good}) == N_GOOD

    root = tmp_path_factory.mktemp("chain")
    raw, filtered, features = synthetic_download.raw, root / "filtered", root / "features"
    out: dict = {"dataset": dataset, "raw": raw, "filtered": filtered, "features": features,
                 "seconds": dict(synthetic_download.seconds)}
    seconds = out["seconds"]

    def timed(name, fn):
        start = time.perf_counter()
        result = fn()
        seconds[name] = round(time.perf_counter() - start, 1)
        return result

    out["download_report"] = synthetic_download.report

    filter_cfg = load_config(FilterConfig, CONFIGS / "filter.yaml", [f"input_dir={raw}", f"output_dir={filtered}"])
    assert timed("filter", lambda: run_stage(FILTER, filter_cfg)) == 0
    out["filter_report"] = _read_json(filtered / FILTER_REPORT)

    pre_cfg = load_config(PrecomputeConfig, CONFIGS / "precompute.yaml",
                          [f"input_dir={filtered}", f"output_dir={features}"])
    assert timed("precompute", lambda: run_stage(PRECOMPUTE, pre_cfg)) == 0
    out["precompute_report"] = _read_json(features / PRECOMPUTE_REPORT)
    out["manifest_bytes"] = (features / schema.MANIFEST_FILE).read_bytes()

    # Reruns: nothing to do (the download's was done with its server down; raw's files are compared from
    # before it to after every rerun here).
    out["mtimes"] = {name: file_mtimes(d) for name, d in (("filtered", filtered), ("features", features))}
    out["mtimes"]["raw"] = synthetic_download.mtimes
    out["download_rerun"] = synthetic_download.rerun
    assert timed("filter_rerun", lambda: run_stage(FILTER, filter_cfg)) == 0
    out["filter_rerun"] = _read_json(filtered / FILTER_REPORT)
    assert timed("precompute_rerun", lambda: run_stage(PRECOMPUTE, pre_cfg)) == 0
    out["precompute_rerun"] = _read_json(features / PRECOMPUTE_REPORT)
    out["mtimes_rerun"] = {name: file_mtimes(d) for name, d in (("raw", raw), ("filtered", filtered),
                                                                ("features", features))}
    out["manifest_rerun_bytes"] = (features / schema.MANIFEST_FILE).read_bytes()

    # A precompute run cut short: one shard never committed, a temporary file left behind. The rerun
    # must write exactly that shard, with the same rows, and clean up.
    victim = schema.shard_name(1)
    out["victim"] = victim
    out["victim_table"] = pq.read_table(features / victim)
    (features / victim).unlink()
    stale = features / f".{victim}.tmp-deadbeef0000"
    stale.write_bytes(b"half a parquet file")
    before = file_mtimes(features)
    assert timed("precompute_resume", lambda: run_stage(PRECOMPUTE, pre_cfg)) == 0
    out["precompute_resume"] = _read_json(features / PRECOMPUTE_REPORT)
    out["resume_mtimes"] = (before, file_mtimes(features))
    out["stale_left"] = stale.exists()
    print("\nchain stage seconds:", seconds)
    return out


# ------------------------------------------------------------------------------------ helpers

def raw_rows(raw: Path) -> list[dict]:
    """img2dataset's per-row record over every raw shard: key, status, error_message, item_id..."""
    return [row for p in sorted(raw.glob("*.parquet")) for row in pq.read_table(p).to_pylist()]


def tar_item_ids(directory: Path) -> set[str]:
    ids = set()
    for path in sorted(directory.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    ids.add(json.loads(tar.extractfile(member).read())["item_id"])
    return ids


def feature_rows(features: Path) -> list[tuple[str, str]]:
    manifest = schema.Manifest.load(features)
    rows = []
    for shard in manifest.shards:
        table = pq.read_table(features / shard["name"], columns=[schema.KEY, schema.CAPTION])
        rows += zip(table.column(schema.KEY).to_pylist(), table.column(schema.CAPTION).to_pylist())
    return rows


def key_to_item(chain) -> dict[str, str]:
    return {r["key"]: r["item_id"] for r in raw_rows(chain["raw"]) if r["status"] == "success"}


def epoch_batches(loader: FeatureLoader) -> list[dict]:
    return list(loader)


# -------------------------------------------------------------------------------------- tests

def test_planted_kinds_all_have_an_expected_stage_and_reason():
    assert set(DOWNLOAD_REASON) | set(FILTER_REASON) == set(PLANTED_KINDS)
    assert not set(DOWNLOAD_REASON) & set(FILTER_REASON)
    assert all(getattr(PLANTED, kind) >= 1 for kind in PLANTED_KINDS)


def test_download_counts_each_planted_failure_under_its_reason(chain):
    dataset, report = chain["dataset"], chain["download_report"]
    expected = collections.Counter(DOWNLOAD_REASON[r["planted"]] for r in dataset.rows
                                   if r["planted"] in DOWNLOAD_REASON)
    assert report["ok"], report["error"]
    assert report["dropped"] == dict(expected)
    assert report["rows_in"] == len(dataset.rows)
    assert report["rows_out"] == len(dataset.rows) - sum(expected.values())
    # Per item, not only per count: each planted failure is the item that failed, for its reason.
    kind = {r["item_id"]: r["planted"] for r in dataset.rows}
    for row in raw_rows(chain["raw"]):
        if kind[row["item_id"]] in DOWNLOAD_REASON:
            assert row["status"] != "success", row
            assert failure_reason(row["error_message"]) == DOWNLOAD_REASON[kind[row["item_id"]]], row
        else:
            assert row["status"] == "success", row


def test_filter_counts_each_planted_item_under_its_reason(chain):
    dataset, report = chain["dataset"], chain["filter_report"]
    expected = collections.Counter(FILTER_REASON[r["planted"]] for r in dataset.rows
                                   if r["planted"] in FILTER_REASON)
    assert report["ok"], report["error"]
    assert {k: v for k, v in report["dropped"].items() if v} == dict(expected)
    assert report["rows_in"] == chain["download_report"]["rows_out"]
    assert report["rows_out"] == report["rows_in"] - sum(expected.values()) == N_GOOD
    # Every filter-stage planted item reached the raw shards and is gone from the filtered ones
    # (a duplicate group keeps one member: the one with the smallest key, which may be the copy).
    raw_ids, kept_ids = tar_item_ids(chain["raw"]), tar_item_ids(chain["filtered"])
    for row in dataset.rows:
        if row["planted"] in FILTER_REASON and row["planted"] != "duplicate_image":
            assert row["item_id"] in raw_ids and row["item_id"] not in kept_ids, row["planted"]


def test_every_good_item_arrives_as_one_feature_row(chain):
    dataset, report = chain["dataset"], chain["precompute_report"]
    assert report["ok"], report["error"]
    assert (report["rows_in"], report["rows_out"], report["dropped"]) == (N_GOOD, N_GOOD, {})
    manifest = schema.Manifest.load(chain["features"])
    assert manifest.total_rows == N_GOOD
    rows = feature_rows(chain["features"])
    items = key_to_item(chain)
    by_id = {r["item_id"]: r for r in dataset.rows}
    arrived = [items[key] for key, _ in rows]
    assert len(arrived) == len(set(arrived)) == N_GOOD
    # Each duplicate group (a good item and its planted copies) arrives exactly once; every other
    # good item arrives; no other planted item does.
    groups = collections.defaultdict(set)
    for r in dataset.rows:
        if r["planted"] == "duplicate_image":
            groups[r["duplicate_of"]] |= {r["duplicate_of"], r["item_id"]}
    in_groups = set().union(*groups.values())
    for members in groups.values():
        assert len(members & set(arrived)) == 1, members
    good_ids = {r["item_id"] for r in dataset.rows if not r["planted"]}
    assert good_ids - in_groups <= set(arrived)
    assert set(arrived) - good_ids <= in_groups
    # Captions survive every stage unchanged.
    for key, caption in rows:
        assert caption == by_id[items[key]]["caption"]
    assert sorted(c for _, c in rows) == sorted(r["caption"] for r in dataset.rows if not r["planted"])


def test_reruns_are_noops(chain):
    before, after = chain["mtimes"], chain["mtimes_rerun"]
    # Data files are never rewritten; only the reports (they carry this run's timings) are.
    for folder, report in (("raw", DOWNLOAD_REPORT), ("filtered", FILTER_REPORT), ("features", PRECOMPUTE_REPORT)):
        assert set(before[folder]) == set(after[folder]), folder
        changed = {name for name in before[folder] if before[folder][name] != after[folder][name]}
        assert changed <= {report, schema.MANIFEST_FILE}, (folder, changed)
    assert chain["manifest_rerun_bytes"] == chain["manifest_bytes"]
    for stage in ("download", "filter", "precompute"):
        assert _counts(chain[f"{stage}_rerun"]) == _counts(chain[f"{stage}_report"]), stage
    shards = chain["download_rerun"]["shards"]
    assert shards["downloaded"] == [] and shards["skipped_done"] == shards["total"] > 1
    assert chain["download_rerun"]["rows_downloaded_this_run"] == 0
    assert chain["filter_rerun"]["noop"] is True
    rerun = chain["precompute_rerun"]
    assert rerun["shards_written"] == 0 and rerun["shards_skipped"] == rerun["shards"] > 1


def test_precompute_resume_writes_only_the_missing_shard(chain):
    features, victim = chain["features"], chain["victim"]
    before, after = chain["resume_mtimes"]
    assert not chain["stale_left"]
    report = chain["precompute_resume"]
    assert report["shards_written"] == 1 and _counts(report) == _counts(chain["precompute_report"])
    parts = {n for n in after if n.startswith(schema.SHARD_PREFIX)}
    assert victim in parts and all(after[n] == before[n] for n in parts - {victim})
    _assert_same_rows(pq.read_table(features / victim), chain["victim_table"])
    assert schema.Manifest.load(features).total_rows == N_GOOD


def test_loader_ranks_are_disjoint_and_cover_every_row(chain):
    features = chain["features"]
    all_keys = {key for key, _ in feature_rows(features)}
    cfg = LoaderConfig(batch_size=8, seed=1, window_shards=2, with_text=True, drop_last=False)
    loaders = [FeatureLoader(features, cfg, rank=r, world_size=WORLD) for r in range(WORLD)]
    seen = [[k for batch in loader for k in batch[BATCH_KEYS]] for loader in loaders]
    assert len({len(keys) for keys in seen}) == 1  # the same number of rows (and steps) per rank
    flat = [k for keys in seen for k in keys]
    assert len(flat) == len(set(flat))  # disjoint
    assert set(flat) <= all_keys
    assert len(all_keys) - len(flat) == loaders[0].remainder_rows == N_GOOD % WORLD
    # drop_last: each rank also drops its last partial batch, and the loader says how many rows.
    cfg = LoaderConfig(batch_size=8, seed=1, window_shards=2, with_text=True)
    loaders = [FeatureLoader(features, cfg, rank=r, world_size=WORLD) for r in range(WORLD)]
    flat = [k for loader in loaders for batch in loader for k in batch[BATCH_KEYS]]
    assert len(flat) == len(set(flat)) == N_GOOD - loaders[0].dropped_rows_per_epoch


def _assert_same_rows(new, old) -> None:
    """The same rows in the same order; features equal up to float16 rounding: Ray Data may batch the
    rerun's rows differently, and batched convolutions round differently in the last bits."""
    assert new.schema == old.schema and new.num_rows == old.num_rows
    for name in (schema.KEY, schema.CAPTION, schema.TEXT_LENGTH):
        assert new.column(name).equals(old.column(name)), name
    for name in (schema.LATENT_MEAN, schema.LATENT_LOGVAR, schema.TEXT_STATES):
        a = new.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        b = old.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        np.testing.assert_allclose(a, b, rtol=4e-3, atol=4e-3, err_msg=name)


def _same(a: dict, b: dict) -> bool:
    return (torch.equal(a[BATCH_LATENT_MEAN], b[BATCH_LATENT_MEAN])
            and torch.equal(a[BATCH_LATENT_LOGVAR], b[BATCH_LATENT_LOGVAR]) and a[BATCH_NOISE_SEED] == b[BATCH_NOISE_SEED]
            and torch.equal(a[BATCH_TEXT_STATES], b[BATCH_TEXT_STATES])
            and torch.equal(a[BATCH_TEXT_MASK], b[BATCH_TEXT_MASK]) and a[BATCH_KEYS] == b[BATCH_KEYS]
            and a[BATCH_CAPTIONS] == b[BATCH_CAPTIONS])


@pytest.mark.parametrize("stop_after", [3, 9])  # mid-epoch, and right at the end of epoch 0
def test_loader_resume_equals_the_uninterrupted_sequence(chain, stop_after):
    features = chain["features"]
    cfg = LoaderConfig(batch_size=8, seed=2, window_shards=2, with_text=True)
    reference = FeatureLoader(features, cfg, rank=1, world_size=WORLD)
    steps = reference.batches_per_epoch
    assert steps == (N_GOOD // WORLD) // 8 == 9
    expected = epoch_batches(reference) + epoch_batches(reference)  # epochs 0 and 1
    interrupted = FeatureLoader(features, cfg, rank=1, world_size=WORLD)
    for taken, _ in enumerate(interrupted, start=1):
        if taken == stop_after:
            break
    state = interrupted.state_dict()
    resumed = FeatureLoader(features, cfg, rank=1, world_size=WORLD)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state survives a JSON checkpoint
    got = epoch_batches(resumed)
    if stop_after < steps:  # the rest of epoch 0, then epoch 1
        got += epoch_batches(resumed)
    assert len(got) == 2 * steps - stop_after
    assert all(_same(a, b) for a, b in zip(got, expected[stop_after:]))
    sampler = LatentSampler.from_manifest(resumed.manifest)
    assert all(torch.isfinite(sampler(b)).all() for b in got)


def test_features_fit_the_tiny_unet_and_carry_the_empty_caption(chain):
    from pipelines.train.config import TrainConfig

    loader = FeatureLoader(chain["features"], LoaderConfig(batch_size=8))
    # the U-Net that configs/tiny-cpu.yaml trains on these features (the tiny preset at 8x8 latents)
    unet_cfg = load_config(TrainConfig, REPO / "configs" / "tiny-cpu.yaml").model.unet_config()
    check_manifest_matches(loader.manifest, unet_cfg)
    empty = load_empty_caption(chain["features"], loader.manifest)
    assert tuple(empty[BATCH_TEXT_STATES].shape) == loader.manifest.text_shape
    assert empty[BATCH_TEXT_MASK].any()
    other = PRESETS[next(name for name in PRESETS if name != "tiny")]
    with pytest.raises(ValueError, match="text width"):
        check_manifest_matches(loader.manifest, other)
    batch = next(iter(loader))
    assert tuple(batch[BATCH_LATENT_MEAN].shape) == (8, *loader.manifest.latent_shape)
    assert np.isfinite(batch[BATCH_TEXT_STATES].numpy()).all()


def test_each_data_stage_run_is_an_mlflow_run_linked_to_the_run_that_made_its_input(chain):
    """Every run_stage of a data stage is an MLflow run (in this session's store: MLFLOW_TRACKING_URI, set by
    tests/conftest.py), named in its report, with the report's counts, tagged with its stage and with the run of
    the stage whose output it read (the download's rerun wrote the report the filter read)."""
    import os

    from mlflow import MlflowClient

    from pipelines.core.tracking import JOB_TAG, REPORT_RUN_KEY, UPSTREAM_TAG_PREFIX

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    # the order of the runs: download, its rerun, filter, precompute, filter rerun, precompute rerun
    made_input = {"filter_report": ("download", "download_rerun"), "precompute_report": ("filter", "filter_report"),
                  "filter_rerun": ("download", "download_rerun"), "precompute_rerun": ("filter", "filter_rerun")}
    runs = {name: client.get_run(chain[name][REPORT_RUN_KEY]) for name in ("download_rerun", *made_input)}
    for name, (stage, upstream) in made_input.items():
        assert runs[name].data.tags[UPSTREAM_TAG_PREFIX + stage] == chain[upstream][REPORT_RUN_KEY], name
    for name, run in runs.items():
        report = chain[name]
        assert run.data.tags[JOB_TAG] == report["stage"] and run.info.status == "FINISHED"
        assert run.data.metrics["rows_in"] == report["rows_in"] and run.data.metrics["rows_out"] == report["rows_out"]
        assert {k: v for k, v in run.data.metrics.items() if k.startswith("dropped.")} == {
            f"dropped.{reason}": count for reason, count in report["dropped"].items()}
    assert len({run.info.experiment_id for run in runs.values()}) == 1
