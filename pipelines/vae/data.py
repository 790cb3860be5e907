"""Images for VAE training: streamed from the filtered shards, each rank its own part."""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterator

import numpy as np

from pipelines.core import storage
from pipelines.data.precompute.rows import DROP_REASON, IMAGE, sample_row
from pipelines.data.shards import KEY_FIELD, iter_tar_samples


def iter_images(input_dir: str, shard_names: list[str], image_size: int,
                keep: Callable[[int], bool] | None = None, dropped: Counter | None = None) -> Iterator[np.ndarray]:
    """Decoded images (3, S, S) float32 in [-1, 1] of the given shards, in order. `keep(i)` selects
    by the running sample index; samples precompute would drop are skipped and counted in `dropped`."""
    index = 0
    for name in shard_names:
        with storage.open_input(storage.join(input_dir, name)) as stream:
            for sample in iter_tar_samples(stream):
                index += 1
                if keep is not None and not keep(index - 1):
                    continue
                row = sample_row(sample[KEY_FIELD], sample, image_size)
                if row[DROP_REASON]:
                    if dropped is not None:
                        dropped[row[DROP_REASON]] += 1
                    continue
                yield row[IMAGE]


def first_images(input_dir: str, shard_names: list[str], image_size: int, count: int) -> np.ndarray:
    """The first `count` decodable images of the shards in sorted order, (N, 3, S, S): a fixed sample
    (the reconstruction grid, the scaling factor) that anyone can reproduce."""
    images = []
    for image in iter_images(input_dir, sorted(shard_names), image_size):
        images.append(image)
        if len(images) == count:
            break
    if not images:
        raise RuntimeError(f"no decodable image in the shards of {input_dir}")
    return np.stack(images)


class ImageStream:
    """One rank's endless, shuffled stream of training images (see the module docstring)."""

    def __init__(self, input_dir: str, shard_names: list[str], image_size: int, rank: int, world_size: int,
                 seed: int, shuffle_buffer: int) -> None:
        self.input_dir, self.shards, self.image_size = input_dir, sorted(shard_names), image_size
        self.rank, self.world_size, self.seed, self.shuffle_buffer = rank, world_size, seed, shuffle_buffer
        self.dropped: Counter = Counter()

    def epoch(self, epoch: int) -> Iterator[np.ndarray]:
        """This rank's images of one epoch. Item i (a shard, or a row when there are fewer shards than
        ranks) goes to rank (i + epoch) % W: the ranks' parts are disjoint and cover the data, and
        over W epochs every rank sees every item once. Its shards are read in a seeded random order."""
        def mine(i: int) -> bool:
            return (i + epoch) % self.world_size == self.rank

        if len(self.shards) < self.world_size:
            return iter_images(self.input_dir, self.shards, self.image_size, keep=mine, dropped=self.dropped)
        names = [name for i, name in enumerate(self.shards) if mine(i)]
        order = np.random.default_rng([self.seed, epoch, self.rank]).permutation(len(names))
        return iter_images(self.input_dir, [names[i] for i in order], self.image_size, dropped=self.dropped)

    def images(self) -> Iterator[np.ndarray]:
        """Epoch after epoch through a shuffle buffer. A rank can draw only empty shards in one epoch;
        W empty epochs in a row mean it met every shard and none had a decodable image."""
        rng = np.random.default_rng([self.seed, self.rank])
        buffer: list[np.ndarray] = []
        epoch, empty_epochs = 0, 0
        while empty_epochs < self.world_size:
            seen = 0
            for image in self.epoch(epoch):
                seen += 1
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(image)
                    continue
                slot = int(rng.integers(len(buffer)))
                yield buffer[slot]
                buffer[slot] = image
            empty_epochs = 0 if seen else empty_epochs + 1
            epoch += 1
        raise RuntimeError(f"no decodable image in any of the {len(self.shards)} shards of {self.input_dir} "
                           f"(dropped: {dict(self.dropped)})")

    def batches(self, batch_size: int, skip: int = 0) -> Iterator[np.ndarray]:
        """(B, 3, S, S) float32 batches, endlessly, from batch `skip` on: the batches before it are read and
        dropped, so a run resumed at step k trains on the batches an uninterrupted run would have (exact resume;
        it costs decoding the images already seen, cheap next to the VAE steps that used them)."""
        images = self.images()
        for _ in range(skip * batch_size):
            next(images)
        while True:
            yield np.stack([next(images) for _ in range(batch_size)])
