"""The training reader of feature shards: per-rank, deterministic, and exactly resumable.

    loader = FeatureLoader("/data/features", LoaderConfig(batch_size=32, seed=0), rank=r, world_size=W)
    check_manifest_matches(loader.manifest, unet_cfg)   # before the first training step
    sampler = LatentSampler.from_manifest(loader.manifest)
    for batch in loader:                                # the rest of the current epoch
        batch["latent_mean"], batch["latent_logvar"]   # (B, C, h, w) float16 as stored (raw VAE space)
        batch["noise_seed"]   # int: seeds the latent sample's noise
        batch["text_states"]  # (B, L, D) float16 as stored: the trainer converts on its device
        batch["text_mask"]    # (B, L) bool, True = real token
        latents = sampler(batch_on_device)   # (B, C, h, w) float32 model space: (z - shift) * scale

The loader stays on the host and hands over the stored moments; the sample z = mean + std * noise and the
float16 -> float32 conversion run where the batch is used (on the GPU in training), with noise from a
generator of that device seeded by `noise_seed`.

Order. Each epoch the shards are permuted and grouped into windows of `window_shards` shards, and
the rows of a window are permuted. Every rank computes the same epoch order, drops its last N % W
positions (so all ranks get N // W rows and the same number of batches: collective ops stay in
step) and takes every W-th position, starting at its rank. The order is a pure function of
(seed, epoch) and the latent noise seed of (seed, epoch, rank, step), so batch `step` of `epoch` is a
pure function of both: resume is exact by construction, and the state is just (epoch, step).

Memory. Only the windows a batch touches are decoded, plus the epoch's next one (on a background
thread), and of those only this rank's rows, kept as float16. Shards are read with pyarrow (the needed columns only) and
reshaped without copying. Each rank reads whole shards and keeps its 1/W share: on one node the
page cache serves the other ranks; across nodes that is W reads of each shard per epoch.

No Ray here: this runs inside Ray Train workers and on machines with only torch and pyarrow.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
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

# Domain tags keep the random streams for shard order, row order and latent noise independent.
_SHARD_ORDER, _ROW_ORDER, _NOISE = 1, 2, 3


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
    if h % factor or w % factor:
        problems.append(f"latent size: {h}x{w} is not divisible by the U-Net's downsample_factor "
                        f"{factor} (2 ** (levels - 1) for {cfg.num_levels} levels)")
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
    # releases the GIL), so training does not stall at window boundaries. Holds up to 3 windows.
    prefetch: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"LoaderConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.seed < 0:
            raise ValueError(f"LoaderConfig.seed must be >= 0, got {self.seed}")
        if self.window_shards < 0:
            raise ValueError(f"LoaderConfig.window_shards must be >= 0 (0 = all), got {self.window_shards}")


class EpochPlan:
    """Which (shard, row) rank r reads at each of its positions j in one epoch.

    Global position g runs over the epoch order (windows back to back); rank r owns g = r + j * W
    for g < kept = W * (N // W). `rank_start[w]` is the first j inside window w.
    """

    def __init__(self, shard_rows: np.ndarray, cfg: LoaderConfig, epoch: int, rank: int, world_size: int):
        self.shard_rows, self.cfg, self.epoch = shard_rows, cfg, epoch
        self.rank, self.world_size = rank, world_size
        self.kept = world_size * (int(shard_rows.sum()) // world_size)
        order = np.arange(len(shard_rows))
        if cfg.shuffle:
            order = _rng(cfg.seed, epoch, _SHARD_ORDER).permutation(len(shard_rows))
        per = cfg.window_shards or len(order)
        self.windows = [order[i:i + per] for i in range(0, len(order), per)]
        sizes = [int(shard_rows[w].sum()) for w in self.windows]
        self.window_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (n_windows + 1,)
        bounded = np.minimum(self.window_start, self.kept)
        self.rank_start = -((rank - bounded) // world_size)  # ceil((g - r) / W): first j with g >= bound

    def window_of(self, j: int) -> int:
        # side="right": an empty window shares its start with the next one; pick the non-empty one
        return int(np.searchsorted(self.rank_start, j, side="right")) - 1

    def window_rows(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, rows inside the shard) of this rank's positions in window w, in order."""
        shards = self.windows[w]
        shard_ids = np.repeat(shards, self.shard_rows[shards])
        rows = np.concatenate([np.arange(self.shard_rows[s]) for s in shards])
        if self.cfg.shuffle:
            perm = _rng(self.cfg.seed, self.epoch, w, _ROW_ORDER).permutation(len(rows))
            shard_ids, rows = shard_ids[perm], rows[perm]
        j = np.arange(self.rank_start[w], self.rank_start[w + 1])
        positions = self.rank + j * self.world_size - self.window_start[w]
        return shard_ids[positions], rows[positions]


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------


class FeatureLoader:
    """Iterate this rank's batches; `state_dict()` after any batch resumes right after it.

    The state is the same on every rank (epoch, step), so any rank's state resumes all of them.
    """

    def __init__(self, directory: str | Path, cfg: LoaderConfig, rank: int = 0, world_size: int = 1,
                 manifest: Manifest | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.directory, self.cfg, self.rank, self.world_size = str(directory), cfg, rank, world_size
        self.manifest = manifest or read_manifest(directory)
        self._fs, self._root = storage.resolve(directory)
        self._shard_rows = np.array([int(s["rows"]) for s in self.manifest.shards], dtype=np.int64)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.num_rows} rows over {world_size} ranks leave {self.rows_per_rank} per "
                             f"rank: not one full batch of {cfg.batch_size} (lower batch_size or drop_last=False)")
        self._columns = [schema.LATENT_MEAN, schema.LATENT_LOGVAR, schema.TEXT_STATES, schema.TEXT_LENGTH]
        if cfg.with_text:
            self._columns += [schema.KEY, schema.CAPTION]
        self.epoch, self.step = 0, 0
        self._plan: EpochPlan | None = None
        # (epoch, window) -> decoded rows, as futures: the next window decodes in the background
        self._windows: dict[tuple[int, int], Future] = {}
        self._pool: ThreadPoolExecutor | None = None

    # ---- sizes ------------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return int(self._shard_rows.sum())

    @property
    def rows_per_rank(self) -> int:
        return self.num_rows // self.world_size

    @property
    def remainder_rows(self) -> int:
        """Rows dropped each epoch so every rank gets the same count (a different set each epoch)."""
        return self.num_rows % self.world_size

    @property
    def partial_batch_rows(self) -> int:
        """Rows each rank drops each epoch as its last partial batch (drop_last only)."""
        return self.rows_per_rank % self.cfg.batch_size if self.cfg.drop_last else 0

    @property
    def dropped_rows_per_epoch(self) -> int:
        """All rows no rank sees in one epoch."""
        return self.remainder_rows + self.world_size * self.partial_batch_rows

    @property
    def batches_per_epoch(self) -> int:
        full, partial = divmod(self.rows_per_rank, self.cfg.batch_size)
        return full + int(partial > 0 and not self.cfg.drop_last)

    def __len__(self) -> int:
        return self.batches_per_epoch

    # ---- position and resume ----------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        """What fixes the order: a resume under any other value would not continue the same run."""
        c = self.cfg
        return {"seed": c.seed, "world_size": self.world_size, "batch_size": c.batch_size,
                "drop_last": c.drop_last, "shuffle": c.shuffle, "window_shards": c.window_shards,
                "num_rows": self.num_rows}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self._fingerprint()
        changed = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if changed:
            raise ValueError("loader state comes from a different data order and cannot resume exactly: "
                             + "; ".join(changed))
        epoch, step = int(state["epoch"]), int(state["step"])
        if not 0 <= step <= self.batches_per_epoch:
            raise ValueError(f"loader state step {step} is outside [0, {self.batches_per_epoch}]")
        if step == self.batches_per_epoch:  # saved right after an epoch's last batch
            epoch, step = epoch + 1, 0
        self.set_epoch(epoch, step)

    def set_epoch(self, epoch: int, step: int = 0) -> None:
        self.epoch, self.step = int(epoch), int(step)

    # ---- iteration --------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch; at its end the position moves to the next epoch.

        Resume with load_state_dict() and iterate: calling set_epoch() afterwards restarts the epoch."""
        if self.step >= self.batches_per_epoch:  # stopped right after the last batch: next epoch
            self.set_epoch(self.epoch + 1)
        epoch = self.epoch
        while self.epoch == epoch and self.step < self.batches_per_epoch:
            step = self.step
            batch = self.batch(epoch, step)
            self.step = step + 1  # before yielding: a checkpoint taken now resumes after this batch
            yield batch
        if self.epoch == epoch:
            self.set_epoch(epoch + 1)

    def batch(self, epoch: int, step: int) -> dict[str, Any]:
        """Batch `step` of `epoch` for this rank (a pure function of both; does not move the position)."""
        if not 0 <= step < self.batches_per_epoch:
            raise IndexError(f"step {step} is outside [0, {self.batches_per_epoch})")
        return self._to_tensors(self._rows(epoch, step), epoch, step)

    def _plan_for(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan.epoch != epoch:
            self._plan = EpochPlan(self._shard_rows, self.cfg, epoch, self.rank, self.world_size)
        return self._plan

    def _rows(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        """This rank's rows j0..j1 as numpy arrays (float16 features), possibly across two windows."""
        plan = self._plan_for(epoch)
        j0 = step * self.cfg.batch_size
        j1 = min(j0 + self.cfg.batch_size, self.rows_per_rank)
        first, last = plan.window_of(j0), plan.window_of(j1 - 1)
        # Windows are read in order: free the past (and anything a set_epoch jumped away from).
        for key in [k for k in self._windows if k[0] != epoch or k[1] < first]:
            del self._windows[key]
        parts = []
        for w in range(first, last + 1):
            start, end = plan.rank_start[w], plan.rank_start[w + 1]
            if min(j1, end) > max(j0, start):
                data = self._window(epoch, w)
                parts.append({k: v[max(j0, start) - start:min(j1, end) - start] for k, v in data.items()})
        # Not across epochs: one window decode per epoch stays inline, and a single-window data set
        # is never held twice (the next epoch's first window would be the whole set again).
        if self.cfg.prefetch and last + 1 < len(plan.windows):
            self._window_future(epoch, last + 1)
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _window(self, epoch: int, w: int) -> dict[str, np.ndarray]:
        return self._window_future(epoch, w).result()

    def _window_future(self, epoch: int, w: int) -> Future:
        """The decoded window, started now if needed: on the background thread when prefetching."""
        key = (epoch, w)
        if key not in self._windows:
            plan = self._plan_for(epoch)
            if self.cfg.prefetch:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feature-loader")
                self._windows[key] = self._pool.submit(self._decode_window, plan, w)
            else:
                self._windows[key] = Future()
                self._windows[key].set_result(self._decode_window(plan, w))
        return self._windows[key]

    def _decode_window(self, plan: EpochPlan, w: int) -> dict[str, np.ndarray]:
        """This rank's rows of window w, in rank order: {column: (rows, ...)}."""
        shard_ids, rows = plan.window_rows(w)
        out: dict[str, np.ndarray] = {}
        for shard in np.unique(shard_ids):
            pick = shard_ids == shard
            for name, values in self._read_shard(int(shard), rows[pick]).items():
                if name not in out:
                    out[name] = np.empty((len(rows), *values.shape[1:]), dtype=values.dtype)
                out[name][pick] = values
        return out

    def _read_shard(self, index: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The needed columns of one shard, only `rows` of them: {column: (len(rows), ...)}."""
        name = self.manifest.shards[index]["name"]
        path = f"{self._root}/{name}"
        try:
            table = pq.read_table(path, columns=self._columns, filesystem=self._fs)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: listed in {schema.MANIFEST_FILE} but missing; the feature "
                                    f"directory is incomplete (rerun jobs/precompute_latents.py)") from None
        expected_rows = int(self._shard_rows[index])
        if table.num_rows != expected_rows:
            raise ValueError(f"{path}: {table.num_rows} rows but {schema.MANIFEST_FILE} says {expected_rows}")
        expected = self.manifest.shapes.arrow_schema()
        for column in self._columns:
            if table.schema.field(column).type != expected.field(column).type:
                raise ValueError(f"{path}: column {column} is {table.schema.field(column).type}, the manifest's "
                                 f"shapes need {expected.field(column).type}")
        shapes = self.manifest.shapes
        arrays = {schema.LATENT_MEAN: shapes.latent, schema.LATENT_LOGVAR: shapes.latent,
                  schema.TEXT_STATES: shapes.text}
        out = {column: schema.column_array(table, column, shape)[rows] for column, shape in arrays.items()}
        for column in (c for c in self._columns if c not in arrays):  # length, key, caption
            out[column] = table.column(column).to_numpy(zero_copy_only=False)[rows]
        return out

    def _to_tensors(self, rows: dict[str, np.ndarray], epoch: int, step: int) -> dict[str, Any]:
        states = torch.from_numpy(rows[schema.TEXT_STATES])  # (B, L, D) float16: half the bytes to copy
        length = torch.from_numpy(rows[schema.TEXT_LENGTH].astype(np.int64))  # (B,)
        mask = torch.arange(states.shape[1])[None, :] < length[:, None]  # (B, L)
        batch: dict[str, Any] = {
            BATCH_LATENT_MEAN: torch.from_numpy(rows[schema.LATENT_MEAN]),  # (B, C, h, w) float16
            BATCH_LATENT_LOGVAR: torch.from_numpy(rows[schema.LATENT_LOGVAR]),  # (B, C, h, w) float16
            BATCH_NOISE_SEED: derived_seed(self.cfg.seed, epoch, self.rank, step, _NOISE),
            BATCH_TEXT_STATES: states, BATCH_TEXT_MASK: mask}
        if self.cfg.with_text:
            batch[BATCH_KEYS] = rows[schema.KEY].tolist()
            batch[BATCH_CAPTIONS] = rows[schema.CAPTION].tolist()
        return batch
