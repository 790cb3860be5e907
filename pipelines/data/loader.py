"""The training reader of feature shards: per-rank, deterministic, and exactly resumable.

    loader = FeatureLoader("/data/features", LoaderConfig(batch_size=32, seed=0), rank=r, world_size=W)
    check_manifest_matches(loader.manifest, unet_cfg)   # before the first training step
    sampler = LatentSampler.from_manifest(loader.manifest)
    for batch in loader:                                # the rest of the current epoch
        batch["latent_mean"], batch["latent_logvar"]   # (B, C, h, w) float16 as stored (raw VAE space); h, w:
                                                       # the step's bucket's (one bucket per step, every rank)
        batch["noise_seed"]   # int: seeds the latent sample's noise
        batch["text_states"]  # (B, L, D) float16 as stored: the trainer converts on its device
        batch["text_mask"]    # (B, L) bool, True = real token
        latents = sampler(batch_on_device)   # (B, C, h, w) float32 model space: (z - shift) * scale

The loader stays on the host and hands over the stored moments; the sample z = mean + std * noise and the
float16 -> float32 conversion run where the batch is used (on the GPU in training), with noise from a
generator of that device seeded by `noise_seed`.

Order. Each epoch the shards are permuted. Each aspect-ratio bucket (schema.py) has its own sequence: its
rows, shard by shard in that order (a shard's rows of one bucket are one contiguous run). Each bucket's
sequence is cut into W contiguous shares of N_b // W rows (the last N_b % W rows are no rank's this epoch: a
different set each epoch), and each share into windows of `window_shards` shards whose rows are permuted.
Rank r reads its own shares only: their shards, and of the (at most two per bucket) shards it shares with a
neighbour only the Parquet row groups it needs. The steps of the epoch go through the buckets in a shuffled
sequence that holds bucket b once per batch each rank has of it: the same sequence on every rank, so at every
step all ranks take a batch of the same bucket (of the same latent shape), and all get the same number of
batches, so collective ops stay in step. The order is a pure function of (seed, epoch), the latent noise seed
and the flip choices of (seed, epoch, rank, step), so batch `step` of `epoch` is a pure function of both:
resume on the same world size is exact by construction, from (epoch, step). Features of one bucket (square
images) give exactly the order of a loader without buckets: one sequence, no bucket in any random stream.

Another world size. A state saved under W ranks resumes under W' (the spot-instance case): per bucket, the
rows of the epoch no rank had taken yet (the rest of each share, and the N_b % W rows) become that bucket's
sequence, shared anew among W'. No row of the epoch is repeated, and none is lost beyond the new layout's own
remainder (per bucket its rows % W', and with drop_last each rank's last partial batch); the order of the rest of that epoch is not
the one an uninterrupted run on either world size would have seen. The state records each layout
(world size, batch size, steps taken), and the rest is recomputed from them.

Flip. When the features hold each image's flipped moments too (precompute's `flip`) and LoaderConfig.flip is
on, each sample is its flipped image or not by a fair coin of (seed, epoch, rank, step): a random horizontal
flip that resumes exactly.

Memory. Only the windows a batch touches are decoded, plus its bucket share's next one (on a background
thread), kept as float16; with buckets, each bucket's current window (each holds that bucket's rows only).
Shards are read with pyarrow (the needed columns and row groups only) and reshaped without copying.

No Ray here: this runs inside Ray Train workers and on machines with only torch and pyarrow.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from model.encoders import FrozenVAE
from pipelines.core import storage
from pipelines.data import schema
from pipelines.data.schema import Manifest

if TYPE_CHECKING:  # pragma: no cover - typing only
    from model.config import UNetConfig

# Keys of the batches the loader yields (the trainer's side of the contract).
BATCH_LATENTS = "latents"  # model-space latents: what LatentSampler makes of the moments below
BATCH_LATENT_MEAN = schema.LATENT_MEAN
BATCH_LATENT_LOGVAR = schema.LATENT_LOGVAR
BATCH_NOISE_SEED = "noise_seed"
BATCH_TEXT_STATES = schema.TEXT_STATES
BATCH_TEXT_MASK = schema.EMPTY_CAPTION_MASK  # same name for a batch and for the empty caption
BATCH_KEYS = "keys"
BATCH_CAPTIONS = "captions"

# Bumped when the order of rows for a given (seed, epoch) changes: a saved position means nothing under another.
ORDER_VERSION = 2

# Domain tags keep the random streams for shard order, row order, latent noise, bucket order and flips independent.
_SHARD_ORDER, _ROW_ORDER, _NOISE, _BUCKET_ORDER, _FLIP = 1, 2, 3, 4, 5


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))


def derived_seed(*parts: int) -> int:
    """A seed derived from a tuple of ints (63 bits: within torch's accepted seed range)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


def seeded_generator(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator of `device` seeded from a tuple of ints."""
    return torch.Generator(device=device).manual_seed(derived_seed(*parts))


@dataclass(frozen=True)
class LatentSampler:
    """A batch's stored VAE moments -> one latent sample in model space, on the moments' device.

    The noise comes from a generator of that device seeded by the batch's noise seed: the same batch gives
    the same sample on the same kind of device (CPU and CUDA generators draw different numbers)."""

    shift_factor: float
    scaling_factor: float

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "LatentSampler":
        return cls(manifest.shift_factor, manifest.scaling_factor)

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        mean, logvar = batch[BATCH_LATENT_MEAN], batch[BATCH_LATENT_LOGVAR]  # (B, C, h, w)
        generator = torch.Generator(device=mean.device).manual_seed(int(batch[BATCH_NOISE_SEED]))
        z = FrozenVAE.sample_latents(mean.float(), logvar.float(), generator=generator)  # raw VAE space
        return (z - self.shift_factor) * self.scaling_factor  # (B, C, h, w) float32


# --------------------------------------------------------------------------------------------
# The feature directory: manifest, model check, empty caption
# --------------------------------------------------------------------------------------------


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of a finished feature directory (local path or URI) that lists some rows."""
    manifest = Manifest.load(directory)
    if manifest.total_rows <= 0:
        raise ValueError(f"{directory}/{schema.MANIFEST_FILE} lists no rows: nothing to train on")
    return manifest


def manifest_mismatches(manifest: Manifest, cfg: "UNetConfig") -> list[str]:
    """Each way the features cannot feed this U-Net, one line per problem (empty: they match)."""
    channels, h, w = manifest.latent_shape
    width = manifest.text_shape[1]
    problems = []
    for field in ("in_channels", "out_channels"):  # the U-Net reads and predicts latents
        if channels != getattr(cfg, field):
            problems.append(f"latent channels: manifest latent_shape[0]={channels} but "
                            f"UNetConfig.{field}={getattr(cfg, field)}")
    if (h, w) != (cfg.sample_size, cfg.sample_size):
        problems.append(f"latent size: manifest latent_shape[1:]={h}x{w} but "
                        f"UNetConfig.sample_size={cfg.sample_size}")
    factor = cfg.downsample_factor
    for bucket in manifest.bucket_list:
        _, bh, bw = manifest.shapes.latent_of(bucket)
        if bh % factor or bw % factor:
            problems.append(f"latent size: {bh}x{bw} (bucket {bucket[0]}x{bucket[1]} px) is not divisible by the "
                            f"U-Net's downsample_factor {factor} (2 ** (levels - 1) for {cfg.num_levels} levels): "
                            f"precompute with buckets.multiple = the VAE's downsample factor x {factor}")
    if width != cfg.context_dim:
        problems.append(f"text width: manifest text_shape[1]={width} but "
                        f"UNetConfig.context_dim={cfg.context_dim}")
    return problems


def check_manifest_matches(manifest: Manifest, cfg: "UNetConfig") -> None:
    """Raise a ValueError naming every mismatch; call it in the driver before training starts."""
    problems = manifest_mismatches(manifest, cfg)
    if problems:
        raise ValueError("feature manifest does not match the U-Net config (precompute the features "
                         "with matching encoders or pick a matching preset):\n  " + "\n  ".join(problems))


def load_empty_caption(directory: str | Path, manifest: Manifest | None = None) -> dict[str, torch.Tensor]:
    """The empty caption's features for classifier-free guidance: text_states (L, D) float32 and
    text_mask (L,) bool, checked against the manifest's text shape."""
    from safetensors.torch import load as load_safetensors

    manifest = manifest or read_manifest(directory)
    path = storage.join(directory, manifest.empty_caption_file)
    if not storage.is_file(path):
        raise FileNotFoundError(f"{path} not found: the feature directory has no empty-caption embedding "
                                f"(needed for classifier-free guidance)")
    tensors = load_safetensors(storage.read_bytes(path))
    missing = sorted({schema.EMPTY_CAPTION_STATES, schema.EMPTY_CAPTION_MASK} - set(tensors))
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {missing}; it holds {sorted(tensors)}")
    states = tensors[schema.EMPTY_CAPTION_STATES].float()  # (L, D)
    mask = tensors[schema.EMPTY_CAPTION_MASK].bool()  # (L,)
    if tuple(states.shape) != manifest.text_shape or tuple(mask.shape) != manifest.text_shape[:1]:
        raise ValueError(f"{path}: states {tuple(states.shape)} / mask {tuple(mask.shape)} do not match "
                         f"the manifest's text_shape {manifest.text_shape}")
    return {BATCH_TEXT_STATES: states, BATCH_TEXT_MASK: mask}


# --------------------------------------------------------------------------------------------
# Configuration and the epoch order
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int = 8  # rows per rank per step
    seed: int = 0
    shuffle: bool = True  # False: manifest order, no permutation (evaluation, debugging)
    drop_last: bool = True  # drop each rank's last partial batch, so every batch has batch_size rows
    # Shards decoded and shuffled together. Larger mixes better and holds more memory (this rank's
    # 1/W share of a window, float16). 0: all shards in one window, a full shuffle (small sets).
    window_shards: int = 8
    with_text: bool = False  # also yield keys and captions (reads two string columns more)
    # Decode the next window of the epoch on a background thread while this one is read (pyarrow
    # releases the GIL), so training does not stall at window boundaries. Holds up to 3 windows per bucket.
    prefetch: bool = True
    # A random horizontal flip, when the features hold the flipped images' moments (precompute's `flip`): each
    # sample is the flipped one or not, a pure function of (seed, epoch, rank, step). False: never flipped.
    flip: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"LoaderConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.seed < 0:
            raise ValueError(f"LoaderConfig.seed must be >= 0, got {self.seed}")
        if self.window_shards < 0:
            raise ValueError(f"LoaderConfig.window_shards must be >= 0 (0 = all), got {self.window_shards}")


@dataclass(frozen=True)
class Layout:
    """One way the ranks shared an epoch: W ranks of `batch_size` rows, and the steps they took before a
    resume on another world size (or batch size) took over the rest of the epoch."""

    world_size: int
    batch_size: int
    steps: int


def _batches(rows: int, batch_size: int, drop_last: bool) -> int:
    full, partial = divmod(rows, batch_size)
    return full + int(partial > 0 and not drop_last)


# An epoch's sequence of rows of one bucket is a list of "pieces": (shard, start, stop) runs of a shard's rows,
# (P, 3) int64. Each bucket has its own sequence: a shard's rows of bucket b are one run (the shard groups its
# rows by bucket), after its rows of the buckets before b.


def _initial_pieces(bucket_rows: np.ndarray, cfg: LoaderConfig, epoch: int) -> list[np.ndarray]:
    """Per bucket, every shard's run of that bucket's rows, in the epoch's shard order: B arrays (P, 3).
    bucket_rows: (shards, buckets) rows of each bucket in each shard."""
    order = np.arange(len(bucket_rows))
    if cfg.shuffle:
        order = _rng(cfg.seed, epoch, _SHARD_ORDER).permutation(len(bucket_rows))
    starts = np.cumsum(bucket_rows, axis=1) - bucket_rows  # (shards, buckets): where each bucket's run starts
    pieces = []
    for b in range(bucket_rows.shape[1]):
        shards = order[bucket_rows[order, b] > 0]
        pieces.append(np.stack([shards, starts[shards, b], starts[shards, b] + bucket_rows[shards, b]], axis=1)
                      .astype(np.int64).reshape(-1, 3))
    return pieces


def _slice_pieces(pieces: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Sequence positions [lo, hi) of `pieces`, as pieces."""
    ends = np.cumsum(pieces[:, 2] - pieces[:, 1])  # (P,) position after each piece
    starts = ends - (pieces[:, 2] - pieces[:, 1])
    keep = (ends > lo) & (starts < hi)
    out = pieces[keep].copy()
    out[:, 1] += np.maximum(lo - starts[keep], 0)
    out[:, 2] -= np.maximum(ends[keep] - hi, 0)
    return out


def _runs(shard_ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A set of (shard, row) -> the fewest pieces that hold exactly it, sorted by shard and row."""
    if len(rows) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    order = np.lexsort((rows, shard_ids))
    shard_ids, rows = shard_ids[order], rows[order]
    new_run = np.ones(len(rows), dtype=bool)
    new_run[1:] = (shard_ids[1:] != shard_ids[:-1]) | (rows[1:] != rows[:-1] + 1)
    first = np.flatnonzero(new_run)
    last = np.append(first[1:], len(rows)) - 1
    return np.stack([shard_ids[first], rows[first], rows[last] + 1], axis=1).astype(np.int64)


def _streams(*parts: int, bucket: int = 0) -> tuple[int, ...]:
    """Random stream parts; bucket 0 adds none, so one-bucket (square) features keep the order they had before
    buckets existed."""
    return (*parts, bucket) if bucket else parts


class RankShare:
    """Rank r's share of one bucket's sequence of pieces: the contiguous positions [r*K, (r+1)*K), K = rows // W,
    cut into windows of `window_shards` shards whose rows are permuted (seed, epoch, layout, rank, window,
    bucket).

    Contiguous shares make each rank read only its own shards (and at most two partial ones at its edges),
    not every shard of the epoch. The last rows % W positions are no rank's this epoch."""

    def __init__(self, pieces: np.ndarray, cfg: LoaderConfig, epoch: int, layout: int, rank: int, world_size: int,
                 bucket: int = 0):
        self.cfg, self.epoch, self.layout, self.rank, self.bucket = cfg, epoch, layout, rank, bucket
        self.total = int((pieces[:, 2] - pieces[:, 1]).sum())
        self.rows = self.total // world_size
        self.pieces = _slice_pieces(pieces, rank * self.rows, (rank + 1) * self.rows)
        # window w holds pieces [bounds[w], bounds[w + 1])
        bounds, shards = [0], set()
        for i, shard in enumerate(self.pieces[:, 0].tolist()):
            if cfg.window_shards and shard not in shards and len(shards) == cfg.window_shards:
                bounds.append(i)
                shards = set()
            shards.add(shard)
        self.bounds = bounds + [len(self.pieces)]
        lengths = np.concatenate([[0], np.cumsum(self.pieces[:, 2] - self.pieces[:, 1])])
        self.window_start = lengths[self.bounds].astype(np.int64)  # (n_windows + 1,): first j of each window

    @property
    def num_windows(self) -> int:
        return len(self.bounds) - 1

    def window_of(self, j: int) -> int:
        return int(np.searchsorted(self.window_start, j, side="right")) - 1

    def window_rows(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, rows inside the shard) of this rank's positions in window w, in order."""
        pieces = self.pieces[self.bounds[w]:self.bounds[w + 1]]
        shard_ids = np.repeat(pieces[:, 0], pieces[:, 2] - pieces[:, 1])
        rows = np.concatenate([np.arange(a, b) for _, a, b in pieces]) if len(pieces) else np.zeros(0, np.int64)
        if self.cfg.shuffle:
            parts = _streams(self.cfg.seed, self.epoch, self.layout, self.rank, w, _ROW_ORDER, bucket=self.bucket)
            perm = _rng(*parts).permutation(len(rows))
            shard_ids, rows = shard_ids[perm], rows[perm]
        return shard_ids, rows

    def untaken(self, taken: int) -> np.ndarray:
        """The pieces of this share not among its first `taken` positions."""
        if taken >= self.rows:
            return np.zeros((0, 3), dtype=np.int64)
        w = self.window_of(taken)
        shard_ids, rows = self.window_rows(w)
        k = taken - int(self.window_start[w])
        return np.concatenate([_runs(shard_ids[k:], rows[k:]), self.pieces[self.bounds[w + 1]:]])


class LayoutPlan:
    """How one layout (W ranks, batch size) goes through the buckets' sequences of one epoch: per bucket the
    ranks' shares and batches, and the bucket of each step. The step sequence holds bucket b as many times as
    each rank has batches of it, shuffled by (seed, epoch, layout): the same on every rank, so at each step every
    rank takes its next batch of the same bucket."""

    def __init__(self, pieces: list[np.ndarray], cfg: LoaderConfig, epoch: int, layout: int, rank: int,
                 world_size: int, batch_size: int):
        self.shares = [RankShare(p, cfg, epoch, layout, rank, world_size, b) for b, p in enumerate(pieces)]
        self.batches = [_batches(share.rows, batch_size, cfg.drop_last) for share in self.shares]
        sequence = np.repeat(np.arange(len(pieces)), self.batches)  # (steps,) bucket of each step
        if cfg.shuffle and len(pieces) > 1:
            sequence = sequence[_rng(cfg.seed, epoch, layout, _BUCKET_ORDER).permutation(len(sequence))]
        self.sequence = sequence
        # the step's batch among its bucket's: how many steps of that bucket came before it
        self.ordinal = np.zeros(len(sequence), dtype=np.int64)
        for b in range(len(pieces)):
            mine = sequence == b
            self.ordinal[mine] = np.arange(int(mine.sum()))

    @property
    def steps(self) -> int:
        return len(self.sequence)

    def taken(self, steps: int) -> list[int]:
        """Batches of each bucket among the first `steps` steps."""
        return np.bincount(self.sequence[:steps], minlength=len(self.shares)).tolist()


class EpochPlan:
    """Which (shard, row) rank r reads at each position j of each bucket in one epoch, and the bucket of each
    step, under the current layout.

    Without a resume on another world size, each bucket's sequence is its shards' runs in the epoch's shard order.
    After one, it is what the earlier layouts' ranks had not taken yet (each rank's untaken rows of that bucket,
    then the rows no rank had): a pure function of (seed, epoch, the layouts), so it is recomputed, never stored."""

    def __init__(self, bucket_rows: np.ndarray, cfg: LoaderConfig, epoch: int, rank: int, world_size: int,
                 history: tuple[Layout, ...] = (), batch_size: int | None = None):
        self.epoch, self.history = epoch, history
        pieces = _initial_pieces(bucket_rows, cfg, epoch)
        for index, layout in enumerate(history):
            ranks = [LayoutPlan(pieces, cfg, epoch, index, r, layout.world_size, layout.batch_size)
                     for r in range(layout.world_size)]
            taken = ranks[0].taken(layout.steps)
            pieces = [np.concatenate([plan.shares[b].untaken(taken[b] * layout.batch_size) for plan in ranks]
                                     + [_slice_pieces(p, layout.world_size * ranks[0].shares[b].rows,
                                                      ranks[0].shares[b].total)])
                      for b, p in enumerate(pieces)]
        self.layout = LayoutPlan(pieces, cfg, epoch, len(history), rank, world_size, batch_size or cfg.batch_size)
        self.shares, self.steps = self.layout.shares, self.layout.steps

    def step_rows(self, step: int, batch_size: int) -> tuple[int, int, int]:
        """(bucket, j0, j1): step `step` is this rank's positions [j0, j1) of that bucket's share."""
        bucket = int(self.layout.sequence[step])
        j0 = int(self.layout.ordinal[step]) * batch_size
        return bucket, j0, min(j0 + batch_size, self.shares[bucket].rows)


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------


class FeatureLoader:
    """Iterate this rank's batches; `state_dict()` after any batch resumes right after it.

    The state is the same on every rank (epoch, step, layouts), so any rank's state resumes all of them, on
    the same world size exactly, or on another one with the rest of the epoch re-shared (`load_state_dict`).
    """

    def __init__(self, directory: str | Path, cfg: LoaderConfig, rank: int = 0, world_size: int = 1,
                 manifest: Manifest | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.directory, self.cfg, self.rank, self.world_size = str(directory), cfg, rank, world_size
        self.manifest = manifest or read_manifest(directory)
        self._fs, self._root = storage.resolve(directory)
        self._bucket_rows = self.manifest.shard_bucket_rows()  # (shards, buckets)
        self._shard_rows = self._bucket_rows.sum(axis=1)  # (shards,)
        self.flip = cfg.flip and self.manifest.flip
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.num_rows} rows over {world_size} ranks leave {self.rows_per_rank} per "
                             f"rank: not one full batch of {cfg.batch_size} of one bucket (lower batch_size or "
                             f"drop_last=False)")
        shapes = self.manifest.shapes
        self._latent_columns = shapes.latent_columns() if self.flip else (schema.LATENT_MEAN, schema.LATENT_LOGVAR)
        self._columns = [*self._latent_columns, schema.TEXT_STATES, schema.TEXT_LENGTH]
        if cfg.with_text:
            self._columns += [schema.KEY, schema.CAPTION]
        self.epoch, self.step = 0, 0
        # The layouts of earlier world sizes in the current epoch (a resume on another world size); () usually.
        self.history: tuple[Layout, ...] = ()
        self._plan: EpochPlan | None = None
        # (epoch, layouts, bucket, window) -> decoded rows, as futures: the next window decodes in the background
        self._windows: dict[tuple[int, int, int, int], Future] = {}
        self._pool: ThreadPoolExecutor | None = None

    # ---- sizes (of an epoch that started on this world size) ------------------------------------

    @property
    def bucket_totals(self) -> np.ndarray:
        """(buckets,) rows of each bucket."""
        return self._bucket_rows.sum(axis=0)

    @property
    def num_rows(self) -> int:
        return int(self._shard_rows.sum())

    @property
    def rows_per_rank(self) -> int:
        return int((self.bucket_totals // self.world_size).sum())

    @property
    def remainder_rows(self) -> int:
        """Rows dropped each epoch so every rank gets the same count of each bucket (a different set each epoch)."""
        return int((self.bucket_totals % self.world_size).sum())

    @property
    def partial_batch_rows(self) -> int:
        """Rows each rank drops each epoch as its last partial batch of each bucket (drop_last only)."""
        return int(((self.bucket_totals // self.world_size) % self.cfg.batch_size).sum()) if self.cfg.drop_last else 0

    @property
    def dropped_rows_per_epoch(self) -> int:
        """All rows no rank sees in one epoch."""
        return self.remainder_rows + self.world_size * self.partial_batch_rows

    @property
    def batches_per_epoch(self) -> int:
        return sum(_batches(int(n) // self.world_size, self.cfg.batch_size, self.cfg.drop_last)
                   for n in self.bucket_totals)

    def __len__(self) -> int:
        return self.batches_per_epoch

    # ---- position and resume ----------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        """What fixes the order: a resume under any other value would not continue the same run."""
        c = self.cfg
        return {"order_version": ORDER_VERSION, "seed": c.seed, "drop_last": c.drop_last, "shuffle": c.shuffle,
                "window_shards": c.window_shards, "num_rows": self.num_rows,
                "bucket_rows": self.bucket_totals.tolist(), "flip": self.flip}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "world_size": self.world_size,
                "batch_size": self.cfg.batch_size, "layouts": [list(astuple(x)) for x in self.history],
                **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` stopped. On the same world size and batch size: exactly the batches the
        uninterrupted run would have had. On another one: the rows of the epoch that no rank had taken yet,
        shared anew among this world size (none lost, none repeated; their order and grouping into
        batches differ from any uninterrupted run's); the next epochs are this world size's own."""
        mine = self._fingerprint()
        changed = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if changed:
            raise ValueError("loader state comes from a different data order and cannot resume: " + "; ".join(changed))
        epoch, step = int(state["epoch"]), int(state["step"])
        history = tuple(Layout(*map(int, x)) for x in state["layouts"])
        saved_world, saved_batch = int(state["world_size"]), int(state["batch_size"])
        saved_batches = EpochPlan(self._bucket_rows, self.cfg, epoch, 0, saved_world, history, saved_batch).steps
        if not 0 <= step <= saved_batches:
            raise ValueError(f"loader state step {step} is outside [0, {saved_batches}]")
        if step == saved_batches:  # saved right after an epoch's last batch
            epoch, step, history = epoch + 1, 0, ()
        elif (saved_world, saved_batch) != (self.world_size, self.cfg.batch_size) and step > 0:
            history, step = history + (Layout(saved_world, saved_batch, step),), 0
        self.set_epoch(epoch, step)
        self.history = history

    def set_epoch(self, epoch: int, step: int = 0) -> None:
        """Go to batch `step` of `epoch` as this world size starts it."""
        self.epoch, self.step, self.history = int(epoch), int(step), ()

    # ---- iteration --------------------------------------------------------------------------

    def _epoch_batches(self, epoch: int) -> int:
        """Batches of `epoch` under the current layout (fewer than batches_per_epoch after a re-share)."""
        return self._plan_for(epoch).steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch; at its end the position moves to the next epoch.

        Resume with load_state_dict() and iterate: calling set_epoch() afterwards restarts the epoch."""
        if self.step >= self._epoch_batches(self.epoch):  # stopped right after the last batch: next epoch
            self.set_epoch(self.epoch + 1)
        epoch = self.epoch
        while self.epoch == epoch and self.step < self._epoch_batches(epoch):
            step = self.step
            batch = self.batch(epoch, step)
            self.step = step + 1  # before yielding: a checkpoint taken now resumes after this batch
            yield batch
        if self.epoch == epoch:
            self.set_epoch(epoch + 1)

    def batch(self, epoch: int, step: int) -> dict[str, Any]:
        """Batch `step` of `epoch` for this rank (a pure function of both and the current layouts; does not
        move the position)."""
        if not 0 <= step < self._epoch_batches(epoch):
            raise IndexError(f"step {step} is outside [0, {self._epoch_batches(epoch)})")
        return self._to_tensors(self._rows(epoch, step), epoch, step)

    def _history_for(self, epoch: int) -> tuple[Layout, ...]:
        return self.history if epoch == self.epoch else ()

    def _plan_for(self, epoch: int) -> EpochPlan:
        history = self._history_for(epoch)
        if self._plan is None or (self._plan.epoch, self._plan.history) != (epoch, history):
            self._plan = EpochPlan(self._bucket_rows, self.cfg, epoch, self.rank, self.world_size, history)
        return self._plan

    def _rows(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        """This rank's rows of step `step` (one bucket: positions j0..j1 of its share) as numpy arrays (float16
        features), possibly across two windows."""
        plan = self._plan_for(epoch)
        bucket, j0, j1 = plan.step_rows(step, self.cfg.batch_size)
        share, layout = plan.shares[bucket], len(plan.history)
        first, last = share.window_of(j0), share.window_of(j1 - 1)
        # Each bucket's windows are read in order: free its past (and anything a set_epoch jumped away from).
        for key in [k for k in self._windows if k[:2] != (epoch, layout) or (k[2] == bucket and k[3] < first)]:
            del self._windows[key]
        parts = []
        for w in range(first, last + 1):
            start, end = share.window_start[w], share.window_start[w + 1]
            if min(j1, end) > max(j0, start):
                data = self._window(plan, bucket, w)
                parts.append({k: v[max(j0, start) - start:min(j1, end) - start] for k, v in data.items()})
        # Not across epochs: one window decode per epoch stays inline, and a single-window data set
        # is never held twice (the next epoch's first window would be the whole set again).
        if self.cfg.prefetch and last + 1 < share.num_windows:
            self._window_future(plan, bucket, last + 1)
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _window(self, plan: EpochPlan, bucket: int, w: int) -> dict[str, np.ndarray]:
        return self._window_future(plan, bucket, w).result()

    def _window_future(self, plan: EpochPlan, bucket: int, w: int) -> Future:
        """The decoded window, started now if needed: on the background thread when prefetching."""
        key = (plan.epoch, len(plan.history), bucket, w)
        if key not in self._windows:
            if self.cfg.prefetch:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feature-loader")
                self._windows[key] = self._pool.submit(self._decode_window, plan, bucket, w)
            else:
                self._windows[key] = Future()
                self._windows[key].set_result(self._decode_window(plan, bucket, w))
        return self._windows[key]

    def _decode_window(self, plan: EpochPlan, bucket: int, w: int) -> dict[str, np.ndarray]:
        """This rank's rows of window w of a bucket, in rank order: {column: (rows, ...)}."""
        shard_ids, rows = plan.shares[bucket].window_rows(w)
        out: dict[str, np.ndarray] = {}
        for shard in np.unique(shard_ids):
            pick = shard_ids == shard
            for name, values in self._read_shard(int(shard), rows[pick], bucket).items():
                if name not in out:
                    out[name] = np.empty((len(rows), *values.shape[1:]), dtype=values.dtype)
                out[name][pick] = values
        return out

    def _read_shard(self, index: int, rows: np.ndarray, bucket: int) -> dict[str, np.ndarray]:
        """The needed columns of one shard, only `rows` of them (all of one bucket): {column: (len(rows), ...)}.
        Reads the footer, then only the row groups that hold those rows."""
        name = self.manifest.shards[index]["name"]
        path = f"{self._root}/{name}"
        try:
            source = self._fs.open_input_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: listed in {schema.MANIFEST_FILE} but missing; the feature "
                                    f"directory is incomplete (rerun jobs/precompute_latents.py)") from None
        with source:
            parquet = pq.ParquetFile(source)
            expected_rows = int(self._shard_rows[index])
            if parquet.metadata.num_rows != expected_rows:
                raise ValueError(f"{path}: {parquet.metadata.num_rows} rows but {schema.MANIFEST_FILE} says "
                                 f"{expected_rows}")
            expected, found = self.manifest.shapes.arrow_schema(), parquet.schema_arrow
            for column in self._columns:
                if found.get_field_index(column) < 0:
                    raise ValueError(f"{path}: no column {column}, which the manifest's shapes need")
                if found.field(column).type != expected.field(column).type:
                    raise ValueError(f"{path}: column {column} is {found.field(column).type}, the manifest's "
                                     f"shapes need {expected.field(column).type}")
            group_rows = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            group_start = np.concatenate([[0], np.cumsum(group_rows)]).astype(np.int64)
            group_of = np.searchsorted(group_start, rows, side="right") - 1  # (len(rows),)
            groups = np.unique(group_of)
            table = parquet.read_row_groups(groups.tolist(), columns=self._columns)
        # row -> its index in the table of the groups read (their rows back to back, in group order)
        read_start = np.concatenate([[0], np.cumsum(np.asarray(group_rows)[groups])])[:-1]
        local = rows - group_start[group_of] + read_start[np.searchsorted(groups, group_of)]
        shapes = self.manifest.shapes
        latent = shapes.latent_of(shapes.bucket_list[bucket])
        taken = table.take(pa.array(local))  # only this bucket's rows: every latent has its shape
        out = {column: schema.column_array(taken, column, latent) for column in self._latent_columns}
        out[schema.TEXT_STATES] = schema.column_array(taken, schema.TEXT_STATES, shapes.text)
        for column in (c for c in self._columns if c not in out):  # length, key, caption
            out[column] = taken.column(column).to_numpy(zero_copy_only=False)
        return out

    def _layout_parts(self, epoch: int) -> list[int]:
        layouts = len(self._history_for(epoch))
        return [layouts] if layouts else []

    def _noise_seed(self, epoch: int, step: int) -> int:
        return derived_seed(self.cfg.seed, epoch, self.rank, step, _NOISE, *self._layout_parts(epoch))

    def _flipped(self, epoch: int, step: int, rows: int) -> np.ndarray:
        """(rows,) bool: which samples of the batch are the flipped images (a fair coin each)."""
        return _rng(self.cfg.seed, epoch, self.rank, step, _FLIP, *self._layout_parts(epoch)).random(rows) < 0.5

    def _to_tensors(self, rows: dict[str, np.ndarray], epoch: int, step: int) -> dict[str, Any]:
        states = torch.from_numpy(rows[schema.TEXT_STATES])  # (B, L, D) float16: half the bytes to copy
        length = torch.from_numpy(rows[schema.TEXT_LENGTH].astype(np.int64))  # (B,)
        mask = torch.arange(states.shape[1])[None, :] < length[:, None]  # (B, L)
        mean, logvar = rows[schema.LATENT_MEAN], rows[schema.LATENT_LOGVAR]  # (B, C, h, w) each
        if self.flip:
            flipped = self._flipped(epoch, step, len(mean))[:, None, None, None]  # (B, 1, 1, 1)
            mean = np.where(flipped, rows[schema.LATENT_MEAN_FLIPPED], mean)
            logvar = np.where(flipped, rows[schema.LATENT_LOGVAR_FLIPPED], logvar)
        batch: dict[str, Any] = {
            BATCH_LATENT_MEAN: torch.from_numpy(mean),  # (B, C, h, w) float16
            BATCH_LATENT_LOGVAR: torch.from_numpy(logvar),  # (B, C, h, w) float16
            BATCH_NOISE_SEED: self._noise_seed(epoch, step),
            BATCH_TEXT_STATES: states, BATCH_TEXT_MASK: mask}
        if self.cfg.with_text:
            batch[BATCH_KEYS] = rows[schema.KEY].tolist()
            batch[BATCH_CAPTIONS] = rows[schema.CAPTION].tolist()
        return batch
