"""Prefetcher (pipelines/train/prefetch.py): the loader's batches made ahead on a thread, in the loader's
order, with checkpoints at the batches TAKEN, so a resume neither skips nor repeats a batch."""

import pytest
import torch

from pipelines.data.loader import BATCH_LATENT_MEAN, FeatureLoader, LoaderConfig
from pipelines.synthetic.features import write_synthetic_features
from pipelines.train.prefetch import Prefetcher

CONFIG = LoaderConfig(batch_size=4, seed=3, window_shards=0)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("features"))
    write_synthetic_features(directory, rows=20, shards=2)  # 5 batches an epoch
    return directory


def _plain(features: str, count: int) -> list[torch.Tensor]:
    loader, out = FeatureLoader(features, CONFIG), []
    while len(out) < count:
        out += [batch[BATCH_LATENT_MEAN] for batch in loader]
    return out[:count]


def test_batches_come_in_the_loaders_order_across_epochs(features):
    stream = Prefetcher(FeatureLoader(features, CONFIG), depth=3, pin=False)
    try:
        taken = [next(stream)[BATCH_LATENT_MEAN] for _ in range(12)]
    finally:
        stream.close()
    assert all(torch.equal(a, b) for a, b in zip(taken, _plain(features, 12)))


def test_state_and_close_point_at_the_batches_taken(features):
    loader = FeatureLoader(features, CONFIG)
    stream = Prefetcher(loader, depth=4, pin=False)
    for _ in range(7):  # into the second epoch, while the thread has made more
        next(stream)
    state = stream.state_dict()
    assert (state["epoch"], state["step"]) == (1, 2)
    stream.close()
    assert loader.state_dict() == state  # rewound to what was taken
    resumed = Prefetcher(loader, depth=2, pin=False)
    try:
        following = [next(resumed)[BATCH_LATENT_MEAN] for _ in range(3)]
    finally:
        resumed.close()
    assert all(torch.equal(a, b) for a, b in zip(following, _plain(features, 10)[7:]))


def test_an_error_in_the_thread_is_raised_by_next(features):
    loader = FeatureLoader(features, CONFIG)

    def broken(epoch, step):
        raise OSError(f"shard unreadable at batch {step}")

    loader.batch = broken
    stream = Prefetcher(loader, depth=2, pin=False)
    with pytest.raises(OSError, match="unreadable at batch 0"):
        next(stream)
    stream.close()
