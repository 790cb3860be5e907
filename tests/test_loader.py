"""The feature loader: per-rank partition, deterministic order, exact resume, latent scaling,
manifest checks; and the loader benchmark's figures (never its timing)."""

import collections
import dataclasses
import itertools
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from model.config import UNetConfig
from pipelines.data import schema
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
    read_manifest,
)

SHAPES = schema.FeatureShapes(latent=(4, 8, 8), text=(6, 8), image_size=32)
SCALE, SHIFT = 0.5, 0.25


def write_features(directory, shard_rows, logvar=0.0, seed=0, shapes=SHAPES):
    """Shards of random features (constant logvar) + manifest; returns {key: (mean, states, length)}."""
    rng = np.random.default_rng(seed)
    rows_by_key, entries = {}, []
    for index, n in enumerate(shard_rows):
        keys = [f"s{index}-r{i}" for i in range(n)]
        mean = rng.standard_normal((n, *shapes.latent)).astype(np.float16)
        states = rng.standard_normal((n, *shapes.text)).astype(np.float16)
        length = rng.integers(1, shapes.text[0] + 1, n)
        table = schema.to_table(shapes, keys, [f"caption of {k}" for k in keys], mean,
                                np.full((n, *shapes.latent), logvar), states, length)
        pq.write_table(table, directory / schema.shard_name(index), **schema.PARQUET_WRITE_OPTIONS)
        entries.append({"name": schema.shard_name(index), "rows": n})
        rows_by_key.update({k: (mean[i], states[i], length[i]) for i, k in enumerate(keys)})
    manifest = schema.Manifest(
        image_size=shapes.image_size, latent_shape=shapes.latent, text_shape=shapes.text,
        vae={"id": "test", "scaling_factor": SCALE, "shift_factor": SHIFT, "latent_channels": shapes.latent[0],
             "downsample_factor": 4},
        text_encoder={"id": "test", "width": shapes.text[1], "context_length": shapes.text[0], "layer": -1},
        shards=tuple(entries))
    (directory / schema.MANIFEST_FILE).write_text(json.dumps(manifest.to_dict()))
    return rows_by_key


def epoch_keys(loader):
    return [k for batch in loader for k in batch[BATCH_KEYS]]


@pytest.mark.parametrize("world_size,window_shards,drop_last", [(2, 2, True), (2, 0, False), (3, 1, True)])
def test_ranks_see_disjoint_rows_covering_all_but_the_counted_remainder(tmp_path, world_size, window_shards,
                                                                         drop_last):
    write_features(tmp_path, [7, 5, 9, 0])  # 21 rows; an empty shard must not break windows
    cfg = LoaderConfig(batch_size=3, window_shards=window_shards, drop_last=drop_last, with_text=True)
    loaders = [FeatureLoader(tmp_path, cfg, rank=r, world_size=world_size) for r in range(world_size)]
    for epoch in range(2):
        seen = [epoch_keys(loader) for loader in loaders]
        assert len({len(keys) for keys in seen}) == 1  # same batch count on every rank
        flat = [k for keys in seen for k in keys]
        assert len(flat) == len(set(flat))  # disjoint
        assert len(flat) == 21 - loaders[0].dropped_rows_per_epoch
        assert [loader.epoch for loader in loaders] == [epoch + 1] * world_size
    loader = loaders[0]
    assert loader.remainder_rows == 21 % world_size
    assert loader.partial_batch_rows == ((21 // world_size) % 3 if drop_last else 0)


def test_every_row_is_covered_when_rows_divide_evenly_and_uris_work(tmp_path):
    rows = write_features(tmp_path, [6, 6])
    cfg = LoaderConfig(batch_size=3, window_shards=1, with_text=True)
    uri = f"file://{tmp_path}"  # what s3:// etc. go through too: a pyarrow filesystem
    seen = [epoch_keys(FeatureLoader(uri, cfg, rank=r, world_size=2)) for r in range(2)]
    assert sorted(seen[0] + seen[1]) == sorted(rows) and not set(seen[0]) & set(seen[1])


def test_order_is_a_function_of_seed_and_epoch(tmp_path):
    write_features(tmp_path, [10, 10, 12])  # 32 rows: whole batches, nothing dropped
    cfg = LoaderConfig(batch_size=4, window_shards=2, with_text=True)
    a, b = FeatureLoader(tmp_path, cfg), FeatureLoader(tmp_path, cfg)
    a0, b0, a1 = epoch_keys(a), epoch_keys(b), epoch_keys(a)
    assert a0 == b0 and a0 != a1 and sorted(a0) == sorted(a1)
    other_seed = FeatureLoader(tmp_path, LoaderConfig(batch_size=4, window_shards=2, seed=1, with_text=True))
    assert epoch_keys(other_seed) != a0
    again, first = FeatureLoader(tmp_path, cfg).batch(3, 2), b.batch(3, 2)
    assert torch.equal(again[BATCH_LATENT_MEAN], first[BATCH_LATENT_MEAN])
    assert again[BATCH_NOISE_SEED] == first[BATCH_NOISE_SEED]
    unshuffled = FeatureLoader(tmp_path, LoaderConfig(batch_size=4, shuffle=False, with_text=True))
    assert epoch_keys(unshuffled)[:3] == ["s0-r0", "s0-r1", "s0-r2"]


def take(loader, n):
    """The next n batches, across epoch boundaries (each iter() is the rest of one epoch)."""
    out = []
    while len(out) < n:
        out += itertools.islice(loader, n - len(out))
    return out


@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_is_bit_identical_wherever_the_run_stops(tmp_path, drop_last):
    write_features(tmp_path, [9, 8, 7])  # logvar 0: the latent noise matters
    cfg = LoaderConfig(batch_size=5, window_shards=1, drop_last=drop_last, with_text=True)
    # the reference decodes inline, the others on the prefetch thread: same batches either way
    reference = FeatureLoader(tmp_path, dataclasses.replace(cfg, prefetch=False), rank=1, world_size=2)
    expected = take(reference, 2 * reference.batches_per_epoch)  # two epochs, uninterrupted
    for stop in range(1, len(expected)):  # mid-window, window straddles, epoch ends
        first = FeatureLoader(tmp_path, cfg, rank=1, world_size=2)
        got = take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
        resumed = FeatureLoader(tmp_path, cfg, rank=1, world_size=2)
        resumed.load_state_dict(state)
        got += take(resumed, len(expected) - stop)
        for want, have in zip(expected, got, strict=True):
            assert want[BATCH_KEYS] == have[BATCH_KEYS]
            assert want[BATCH_NOISE_SEED] == have[BATCH_NOISE_SEED], stop
            for name in (BATCH_LATENT_MEAN, BATCH_LATENT_LOGVAR, BATCH_TEXT_STATES, BATCH_TEXT_MASK):
                assert torch.equal(want[name], have[name]), (stop, name)


def test_state_saved_after_an_epoch_resumes_at_the_next_and_rejects_a_different_order(tmp_path):
    write_features(tmp_path, [8])
    cfg = LoaderConfig(batch_size=4, with_text=True)
    loader = FeatureLoader(tmp_path, cfg)
    batches = list(loader)
    state = {**loader.state_dict(), "epoch": 0, "step": len(batches)}  # saved right after the last batch
    resumed = FeatureLoader(tmp_path, cfg)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.step) == (1, 0)
    with pytest.raises(ValueError, match="seed"):
        FeatureLoader(tmp_path, dataclasses.replace(cfg, seed=1)).load_state_dict(state)
    with pytest.raises(ValueError, match="order_version"):  # saved by a loader that ordered rows otherwise
        FeatureLoader(tmp_path, cfg).load_state_dict({k: v for k, v in state.items() if k != "order_version"})


def _epoch_rest(loaders) -> list[list[str]]:
    """Each loader's keys for the rest of its current epoch."""
    return [epoch_keys(loader) for loader in loaders]


def _resumed(directory, cfg, world_size, state):
    loaders = [FeatureLoader(directory, cfg, rank=r, world_size=world_size) for r in range(world_size)]
    for loader in loaders:
        loader.load_state_dict(json.loads(json.dumps(state)))  # through a JSON checkpoint
    return loaders


@pytest.mark.parametrize("drop_last", [True, False])
def test_a_resume_on_another_world_size_neither_loses_nor_repeats_a_row_of_the_epoch(tmp_path, drop_last):
    rows = write_features(tmp_path, [9, 8, 7, 11, 5, 10])  # 50 rows
    cfg = LoaderConfig(batch_size=3, window_shards=2, drop_last=drop_last, with_text=True)
    four = [FeatureLoader(tmp_path, cfg, rank=r, world_size=4) for r in range(4)]
    for stop in range(1, four[0].batches_per_epoch):
        for loader in four:
            loader.set_epoch(0)
        before = [k for loader in four for batch in itertools.islice(loader, stop) for k in batch[BATCH_KEYS]]
        state = four[1].state_dict()
        assert state["world_size"] == 4 and state["step"] == stop
        two = _resumed(tmp_path, dataclasses.replace(cfg, batch_size=4), 2, state)  # same global batch: 2 x 4 ...
        after = _epoch_rest(two)
        assert len({len(keys) for keys in after}) == 1  # the ranks stay in step
        seen = before + [k for keys in after for k in keys]
        assert len(seen) == len(set(seen)), stop  # nothing repeated
        rest = len(rows) - len(before)  # what no rank had taken: shared anew among 2
        dropped = rest % 2 + (2 * ((rest // 2) % 4) if drop_last else 0)
        assert len(set(rows) - set(seen)) == dropped, stop  # nothing lost but the new layout's stated remainder
        assert [loader.epoch for loader in two] == [1, 1]
        # the next epoch is the new world size's own, as if it had started there
        fresh = [FeatureLoader(tmp_path, dataclasses.replace(cfg, batch_size=4), rank=r, world_size=2) for r in range(2)]
        for loader in fresh:
            loader.set_epoch(1)
        assert _epoch_rest(two) == _epoch_rest(fresh)


def test_layouts_chain_within_an_epoch_and_resume_exactly_on_the_last_one(tmp_path):
    rows = write_features(tmp_path, [12, 9, 14, 7, 10, 8])  # 60 rows
    cfg = LoaderConfig(batch_size=2, window_shards=2, with_text=True)
    four = [FeatureLoader(tmp_path, cfg, rank=r, world_size=4) for r in range(4)]
    taken = [k for loader in four for batch in itertools.islice(loader, 2) for k in batch[BATCH_KEYS]]  # 16
    two = _resumed(tmp_path, cfg, 2, four[0].state_dict())
    taken += [k for loader in two for batch in itertools.islice(loader, 3) for k in batch[BATCH_KEYS]]  # 12
    state = two[0].state_dict()
    assert [layout[:2] for layout in state["layouts"]] == [[4, 2]]
    three = _resumed(tmp_path, cfg, 3, state)
    rest = _epoch_rest(three)
    seen = taken + [k for keys in rest for k in keys]
    assert len(seen) == len(set(seen)) and len(set(rows) - set(seen)) == (60 - 28) % 3 + 3 * (((60 - 28) // 3) % 2)
    # a checkpoint on the new world size after the re-share resumes it exactly
    again = _resumed(tmp_path, cfg, 2, state)
    assert _epoch_rest(again) == _epoch_rest(_resumed(tmp_path, cfg, 2, state))
    continued = _resumed(tmp_path, cfg, 2, state)
    first = [list(itertools.islice(loader, 1)) for loader in continued]
    resumed = _resumed(tmp_path, cfg, 2, continued[0].state_dict())
    whole = _epoch_rest(_resumed(tmp_path, cfg, 2, state))
    assert [[k for b in f for k in b[BATCH_KEYS]] + keys for f, keys in zip(first, _epoch_rest(resumed))] == whole


def test_each_rank_reads_its_own_share_of_the_shards(tmp_path):
    """A rank reads about 1/W of the feature bytes (bench/loader_io.py counts them at the file)."""
    from bench.loader_io import main

    figures = main(["--rows", "512", "--shards", "8", "--batch", "4", "--world-sizes", "2,4"])
    for world_size, got in figures["world_sizes"].items():
        assert got["max_fraction"] < 1.25 / int(world_size), (world_size, got)


def test_batches_carry_the_stored_moments_and_the_sample_is_drawn_where_they_are(tmp_path):
    rows = write_features(tmp_path, [12, 12], logvar=-40.0)  # std ~ 0: samples equal the mean
    loader = FeatureLoader(tmp_path, LoaderConfig(batch_size=6, with_text=True))
    sampler = LatentSampler.from_manifest(loader.manifest)
    for batch in loader:
        mean = np.stack([rows[k][0] for k in batch[BATCH_KEYS]])
        # the host only slices what is stored: float16, no float32 copy, no sample drawn there
        assert batch[BATCH_LATENT_MEAN].dtype == batch[BATCH_LATENT_LOGVAR].dtype == torch.float16
        assert np.array_equal(batch[BATCH_LATENT_MEAN].numpy(), mean)
        latents = sampler(batch)
        assert latents.dtype == torch.float32 and latents.shape == (6, *SHAPES.latent)
        torch.testing.assert_close(latents, (torch.from_numpy(mean).float() - SHIFT) * SCALE, atol=1e-5, rtol=0)

    noisy = tmp_path / "noisy"
    noisy.mkdir()
    rows = write_features(noisy, [64], logvar=float(np.log(4.0)))  # std 2 around the mean
    loader = FeatureLoader(noisy, LoaderConfig(batch_size=64, with_text=True))
    residuals = []
    for epoch in range(2):
        batch = loader.batch(epoch, 0)
        order = np.argsort(batch[BATCH_KEYS])  # the same rows in the same order in both epochs
        mean = torch.from_numpy(np.stack([rows[k][0] for k in batch[BATCH_KEYS]])).float()
        latents = sampler(batch)
        assert torch.equal(latents, sampler(batch))  # the seed fixes the draw
        residuals.append((latents / SCALE + SHIFT - mean)[order])  # raw space, minus the mean
    for residual in residuals:
        assert abs(residual.std().item() - 2.0) < 0.1 and abs(residual.mean().item()) < 0.1
    assert not torch.allclose(residuals[0], residuals[1])  # sampled fresh each epoch


def test_text_states_and_mask_follow_the_stored_length(tmp_path):
    rows = write_features(tmp_path, [10])
    batch = FeatureLoader(tmp_path, LoaderConfig(batch_size=10, with_text=True)).batch(0, 0)
    assert batch[BATCH_TEXT_MASK].dtype == torch.bool and batch[BATCH_TEXT_MASK].shape == (10, SHAPES.text[0])
    assert batch[BATCH_TEXT_STATES].dtype == torch.float16  # as stored: converted on the training device
    for i, key in enumerate(batch[BATCH_KEYS]):
        _, states, length = rows[key]
        assert batch[BATCH_TEXT_MASK][i].tolist() == [j < length for j in range(SHAPES.text[0])]
        assert torch.equal(batch[BATCH_TEXT_STATES][i], torch.from_numpy(states))
    assert batch[BATCH_CAPTIONS][0] == f"caption of {batch[BATCH_KEYS][0]}"


def test_manifest_mismatch_names_each_field(tmp_path, micro_cfg):
    write_features(tmp_path, [2], shapes=schema.FeatureShapes(latent=(4, 8, 8), text=(6, 24), image_size=32))
    manifest = read_manifest(tmp_path)
    check_manifest_matches(manifest, micro_cfg)  # micro_cfg: 4 channels, 8x8, context 24
    wrong = UNetConfig(**{**micro_cfg.to_dict(), "in_channels": 3, "sample_size": 16, "context_dim": 32})
    with pytest.raises(ValueError) as err:
        check_manifest_matches(manifest, wrong)
    for words in ("latent channels", "in_channels=3", "latent size", "sample_size=16", "text width",
                  "context_dim=32"):
        assert words in str(err.value)
    odd = tmp_path / "odd"
    odd.mkdir()
    write_features(odd, [2], shapes=schema.FeatureShapes(latent=(4, 6, 6), text=(6, 24), image_size=24))
    with pytest.raises(ValueError, match="not divisible by the U-Net's downsample_factor 4"):
        check_manifest_matches(read_manifest(odd), UNetConfig(**{**micro_cfg.to_dict(), "sample_size": 6}))


def test_missing_manifest_shard_or_empty_caption_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json not found.*precompute_latents"):
        FeatureLoader(tmp_path / "nowhere", LoaderConfig())
    write_features(tmp_path, [4, 4])
    (tmp_path / schema.shard_name(1)).unlink()
    loader = FeatureLoader(tmp_path, LoaderConfig(batch_size=8, window_shards=0))
    with pytest.raises(FileNotFoundError, match="part-00001.parquet: listed in manifest.json but missing"):
        next(iter(loader))
    with pytest.raises(FileNotFoundError, match="empty-caption"):
        load_empty_caption(tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        FeatureLoader(tmp_path, LoaderConfig(batch_size=9))  # 8 rows: not one full batch


def test_empty_caption_round_trip(tmp_path):
    from safetensors.torch import save_file

    write_features(tmp_path, [2])
    states = torch.randn(SHAPES.text).half()
    mask = torch.arange(SHAPES.text[0]) < 2
    save_file({schema.EMPTY_CAPTION_STATES: states, schema.EMPTY_CAPTION_MASK: mask},
              str(tmp_path / schema.EMPTY_CAPTION_FILE))
    empty = load_empty_caption(tmp_path)
    assert torch.equal(empty[BATCH_TEXT_STATES], states.float()) and torch.equal(empty[BATCH_TEXT_MASK], mask)


def test_loader_bench_reports_consistent_figures(tmp_path, capsys):
    from bench.loader import main

    out = tmp_path / "bench.json"
    result = main(["--rows", "40", "--shards", "2", "--batch", "4", "--tokens", "8", "--epochs", "2",
                   "--steps", "1", "--warmup", "0", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["batches_per_epoch"] == 10 and result["loader_batches"] == 20
    assert result["loader_batches_per_s"] == pytest.approx(result["loader_batches"] / result["loader_s"])
    assert result["loader_rows_per_s"] == pytest.approx(4 * result["loader_batches_per_s"])
    assert result["ratio"] == pytest.approx(result["loader_batches_per_s"] * result["unet_step_s"])
    printed = capsys.readouterr().out
    assert "batches/s" in printed and "ms/step" in printed and "ratio" in printed


# ---- aspect-ratio buckets ---------------------------------------------------------------------

BUCKETS = ((80, 48), (64, 64), (48, 80))  # make_buckets(64, 16, 2.0): tall, square, wide
BUCKETED = schema.FeatureShapes(latent=(4, 16, 16), text=(6, 8), image_size=64, buckets=BUCKETS)


def write_bucketed(directory, shard_rows, seed=0, flip=False):
    """Shards whose rows fall in random buckets (written through to_table, which groups them) + manifest;
    returns {key: (bucket, mean, flipped mean or None)}."""
    shapes = dataclasses.replace(BUCKETED, flip=flip)
    rng = np.random.default_rng(seed)
    rows_by_key, entries = {}, []
    for index, n in enumerate(shard_rows):
        keys = [f"s{index}-r{i}" for i in range(n)]
        buckets = [BUCKETS[i] for i in rng.integers(0, len(BUCKETS), n)]
        mean = [rng.standard_normal(shapes.latent_of(b)).astype(np.float16) for b in buckets]
        mirrored = [m[..., ::-1].copy() for m in mean]  # stands for the flipped image's moments
        logvar = [np.zeros_like(m) for m in mean]
        table = schema.to_table(shapes, keys, [f"caption of {k}" for k in keys], mean, logvar,
                                rng.standard_normal((n, *shapes.text)).astype(np.float16), rng.integers(1, 7, n),
                                buckets=np.array(buckets).reshape(n, 2),
                                flipped=(mirrored, logvar) if flip else None)
        pq.write_table(table, directory / schema.shard_name(index), **schema.PARQUET_WRITE_OPTIONS)
        entries.append({"name": schema.shard_name(index), "rows": n,
                        "bucket_rows": schema.bucket_counts(table, shapes)})
        rows_by_key.update({k: (buckets[i], mean[i], mirrored[i] if flip else None) for i, k in enumerate(keys)})
    manifest = schema.Manifest(
        image_size=64, latent_shape=shapes.latent, text_shape=shapes.text, buckets=BUCKETS, flip=flip,
        vae={"id": "test", "scaling_factor": SCALE, "shift_factor": SHIFT, "latent_channels": 4,
             "downsample_factor": 4},
        text_encoder={"id": "test", "width": 8, "context_length": 6, "layer": -1}, shards=tuple(entries))
    (directory / schema.MANIFEST_FILE).write_text(json.dumps(manifest.to_dict()))
    return rows_by_key


def test_shards_group_rows_by_bucket_and_the_manifest_counts_them(tmp_path):
    write_bucketed(tmp_path, [9, 0, 14])
    manifest = read_manifest(tmp_path)
    counts = manifest.shard_bucket_rows()
    assert counts.shape == (3, 3) and counts.sum() == 23 and counts[1].sum() == 0
    for shard, count in zip(manifest.shards, counts):
        table = pq.read_table(tmp_path / shard["name"])
        heights = table.column(schema.BUCKET_HEIGHT).to_pylist()
        assert heights == [b[0] for b, n in zip(BUCKETS, count) for _ in range(n)]  # one run per bucket, in order
    with pytest.raises(ValueError, match="not in the bucket set"):
        schema.to_table(BUCKETED, ["k"], ["c"], [np.zeros((4, 8, 8))], [np.zeros((4, 8, 8))], np.zeros((1, 6, 8)),
                        np.ones(1), buckets=np.array([[32, 32]]))
    with pytest.raises(ValueError, match=r"expected shape \(4, 20, 12\)"):
        schema.to_table(BUCKETED, ["k"], ["c"], [np.zeros((4, 16, 16))], [np.zeros((4, 16, 16))],
                        np.zeros((1, 6, 8)), np.ones(1), buckets=np.array([[80, 48]]))


@pytest.mark.parametrize("world_size,drop_last", [(1, True), (2, True), (3, False)])
def test_every_step_takes_one_bucket_on_every_rank(tmp_path, world_size, drop_last):
    rows = write_bucketed(tmp_path, [17, 11, 20, 9])
    cfg = LoaderConfig(batch_size=3, window_shards=2, drop_last=drop_last, with_text=True)
    loaders = [FeatureLoader(tmp_path, cfg, rank=r, world_size=world_size) for r in range(world_size)]
    for epoch in range(2):
        per_rank = [list(loader) for loader in loaders]
        assert len({len(batches) for batches in per_rank}) == 1  # the ranks stay in step
        shapes_seen = set()
        for step in zip(*per_rank):
            shapes = {tuple(batch[BATCH_LATENT_MEAN].shape[2:]) for batch in step}
            assert len(shapes) == 1, (epoch, shapes)  # the same bucket on every rank
            shapes_seen |= shapes
            for batch in step:
                for i, key in enumerate(batch[BATCH_KEYS]):  # each row is its own, in its bucket's shape
                    assert torch.equal(batch[BATCH_LATENT_MEAN][i], torch.from_numpy(rows[key][1]))
        assert shapes_seen == {(20, 12), (16, 16), (12, 20)}  # the buckets are mixed over the epoch
        flat = [k for batches in per_rank for batch in batches for k in batch[BATCH_KEYS]]
        assert len(flat) == len(set(flat)) == len(rows) - loaders[0].dropped_rows_per_epoch
    totals = loaders[0].bucket_totals
    assert loaders[0].remainder_rows == int((totals % world_size).sum())
    steps = [tuple(b[BATCH_LATENT_MEAN].shape[2:]) for b in FeatureLoader(tmp_path, cfg, 0, world_size)]
    again = [tuple(b[BATCH_LATENT_MEAN].shape[2:]) for b in FeatureLoader(tmp_path, cfg, 0, world_size)]
    later = FeatureLoader(tmp_path, cfg, 0, world_size)
    later.set_epoch(1)
    assert steps == again and steps != [tuple(b[BATCH_LATENT_MEAN].shape[2:]) for b in later]  # per epoch


@pytest.mark.parametrize("flip", [False, True])
def test_bucketed_resume_is_bit_identical_wherever_the_run_stops(tmp_path, flip):
    """A run split at step k (through a JSON checkpoint) yields the uninterrupted run's batches, flips included."""
    write_bucketed(tmp_path, [13, 8, 15], flip=flip)
    cfg = LoaderConfig(batch_size=2, window_shards=1, with_text=True)
    reference = FeatureLoader(tmp_path, dataclasses.replace(cfg, prefetch=False), rank=1, world_size=2)
    expected = take(reference, 2 * reference.batches_per_epoch)
    for stop in range(1, len(expected)):
        first = FeatureLoader(tmp_path, cfg, rank=1, world_size=2)
        got = take(first, stop)
        resumed = FeatureLoader(tmp_path, cfg, rank=1, world_size=2)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        got += take(resumed, len(expected) - stop)
        for want, have in zip(expected, got, strict=True):
            assert want[BATCH_KEYS] == have[BATCH_KEYS] and want[BATCH_NOISE_SEED] == have[BATCH_NOISE_SEED]
            for name in (BATCH_LATENT_MEAN, BATCH_LATENT_LOGVAR, BATCH_TEXT_STATES, BATCH_TEXT_MASK):
                assert torch.equal(want[name], have[name]), (stop, name)


def test_flip_picks_the_stored_flipped_moments_by_a_seeded_coin(tmp_path):
    rows = write_bucketed(tmp_path, [30, 26], flip=True)
    cfg = LoaderConfig(batch_size=4, window_shards=0, with_text=True)
    flips = []
    for batch in FeatureLoader(tmp_path, cfg):
        for i, key in enumerate(batch[BATCH_KEYS]):
            _, mean, mirrored = rows[key]
            got = batch[BATCH_LATENT_MEAN][i].numpy()
            assert np.array_equal(got, mean) or np.array_equal(got, mirrored)
            flips.append(np.array_equal(got, mirrored))
    assert 0.25 < np.mean(flips) < 0.75  # a fair coin over ~52 samples
    again = [np.array_equal(b[BATCH_LATENT_MEAN][i].numpy(), rows[k][2])
             for b in FeatureLoader(tmp_path, cfg) for i, k in enumerate(b[BATCH_KEYS])]
    assert again == flips  # a pure function of the seed and the position
    other_seed = [np.array_equal(b[BATCH_LATENT_MEAN][i].numpy(), rows[k][2])
                  for b in FeatureLoader(tmp_path, dataclasses.replace(cfg, seed=1))
                  for i, k in enumerate(b[BATCH_KEYS])]
    assert other_seed != flips
    never = FeatureLoader(tmp_path, dataclasses.replace(cfg, flip=False))
    for batch in never:
        for i, key in enumerate(batch[BATCH_KEYS]):
            assert np.array_equal(batch[BATCH_LATENT_MEAN][i].numpy(), rows[key][1])
    state = FeatureLoader(tmp_path, cfg).state_dict()
    with pytest.raises(ValueError, match="flip"):  # a flipped run does not resume unflipped
        FeatureLoader(tmp_path, dataclasses.replace(cfg, flip=False)).load_state_dict(state)


@pytest.mark.parametrize("drop_last", [True, False])
def test_a_bucketed_resume_on_another_world_size_neither_loses_nor_repeats_a_row(tmp_path, drop_last):
    rows = write_bucketed(tmp_path, [19, 14, 22, 17])  # 72 rows over three buckets
    cfg = LoaderConfig(batch_size=2, window_shards=2, drop_last=drop_last, with_text=True)
    four = [FeatureLoader(tmp_path, cfg, rank=r, world_size=4) for r in range(4)]
    for stop in range(1, four[0].batches_per_epoch, 2):
        for loader in four:
            loader.set_epoch(0)
        before = [k for loader in four for batch in itertools.islice(loader, stop) for k in batch[BATCH_KEYS]]
        two = _resumed(tmp_path, cfg, 2, four[0].state_dict())
        per_rank = [list(loader) for loader in two]
        assert len({len(batches) for batches in per_rank}) == 1
        for step in zip(*per_rank):
            assert len({tuple(b[BATCH_LATENT_MEAN].shape) for b in step}) <= 2  # one bucket (a partial last batch)
            assert len({tuple(b[BATCH_LATENT_MEAN].shape[2:]) for b in step}) == 1
        seen = before + [k for batches in per_rank for batch in batches for k in batch[BATCH_KEYS]]
        assert len(seen) == len(set(seen)), stop  # nothing repeated
        rest = collections.Counter(rows[k][0] for k in set(rows) - set(before))  # per bucket, what no rank had
        dropped = sum(n % 2 + (2 * ((n // 2) % 2) if drop_last else 0) for n in rest.values())
        assert len(set(rows) - set(seen)) == dropped, stop  # nothing lost but the new layout's stated remainder
