"""Training on aspect-ratio buckets of real photographs: the U-Net job's Worker on one rank (real DeepSpeed over
gloo, the tiny U-Net, features of scikit-image's photos in three buckets with flipped moments), micro-batches
of three latent shapes in one run, and an exact resume from a checkpoint in the middle of it."""

import pytest
import torch

from pipelines.core.config import apply_override, from_dict
from pipelines.data.loader import BATCH_LATENT_MEAN
from pipelines.data.schema import Manifest
from pipelines.train.config import TrainConfig
from pipelines.train.worker import Launch, Worker
from tests.photos import photo_files, precompute_config, write_photo_features

MICRO, ACCUMULATION, STEPS, SPLIT = 2, 2, 8, 3


@pytest.fixture(scope="module")
def photo_features(tmp_path_factory):
    """Every photo but the panorama (which the filter drops) twice: 32 rows in 80x48, 64x64 and 48x80."""
    directory = str(tmp_path_factory.mktemp("photo-features"))
    photos = {name: files for name, files in photo_files().items() if name != "hubble_panorama"}
    manifest = write_photo_features(directory, photos, shards=2, copies=2, cfg=precompute_config(directory, flip=True))
    assert manifest.flip and manifest.shard_bucket_rows().sum(axis=0).min() >= MICRO  # a batch of every bucket
    return directory


class Interrupted(Exception):
    """Stands for the worker's process dying right after a checkpoint."""


def _worker(features: str, run_dir: str, resume_from: str | None = None) -> Worker:
    values: dict = {}
    for assignment in (f"features_dir={features}", "model.preset=tiny", "deepspeed.precision=fp32",
                       f"batch.global_batch={MICRO * ACCUMULATION}", f"batch.micro_batch={MICRO}",
                       "scaling.num_workers=1", "ema.enabled=true", "ema.start_step=1", "mlflow.enabled=false",
                       f"max_steps={STEPS}", "log_every=1", "window_shards=1", "samples.every_steps=0",
                       f"checkpoint.every_steps={SPLIT}", "seed=3"):
        apply_override(values, assignment)
    launch = Launch(features_dir=features, run_dir=run_dir, micro_batch=MICRO, grad_accum_steps=ACCUMULATION,
                    mlflow={"enabled": False}, mlflow_run_id=None)
    return Worker(from_dict(TrainConfig, values), launch, rank=0, world_size=1, resume_from=resume_from)


def _weights(worker: Worker) -> dict[str, torch.Tensor]:
    live = {f"live.{k}": v.detach().clone() for k, v in worker.engine.module.state_dict().items()}
    return {**live, **{f"ema.{k}": v.clone() for k, v in worker.ema.full_state_dict(rank0_only=True).items()}}


def _train(worker: Worker, on_checkpoint=lambda done: None) -> list[tuple[int, ...]]:
    """worker.train(), recording each micro-batch's latent shape; checkpoints go to on_checkpoint (Ray Train,
    which _checkpoint reports to, is not running here)."""
    shapes: list[tuple[int, ...]] = []
    take = worker.train_step

    def recorded(step, stream):
        def batches():
            while True:
                batch = next(stream)
                shapes.append(tuple(batch[BATCH_LATENT_MEAN].shape))
                yield batch
        return take(step, batches())

    worker.train_step = recorded
    worker._checkpoint = on_checkpoint
    try:
        worker.train()
    finally:
        worker.close()
    return shapes


def test_buckets_train_and_resume_exactly(gloo_world_of_one, photo_features, tmp_path):
    reference = _worker(photo_features, str(tmp_path / "reference"))
    before = _weights(reference)
    shapes = _train(reference)
    expected = _weights(reference)
    assert len(shapes) == STEPS * ACCUMULATION
    assert {s[2:] for s in shapes} == {(20, 12), (16, 16), (12, 20)}  # the three buckets' latents, in one run
    assert all(torch.isfinite(v).all() for v in expected.values())
    assert any(not torch.equal(before[k], expected[k]) for k in expected if k.startswith("live."))  # it trained

    saved = tmp_path / "checkpoint"
    split = _worker(photo_features, str(tmp_path / "split"))

    def save_then_die(done: int) -> None:
        split.save_checkpoint(str(saved), done)
        raise Interrupted

    with pytest.raises(Interrupted):
        _train(split, save_then_die)
    resumed = _worker(photo_features, str(tmp_path / "resumed"), resume_from=str(saved))
    assert resumed.start_step == SPLIT
    rest = _train(resumed)
    assert rest == shapes[SPLIT * ACCUMULATION:]  # the same buckets in the same order after the resume
    got = _weights(resumed)
    assert got.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []  # bit-identical, EMA included


def test_the_launch_check_needs_a_whole_micro_batch_of_one_bucket_per_worker(photo_features):
    """34 rows (2 tall, 16 square, 16 wide) over 4 workers: 8 rows each, but a micro batch of 5 rows of one bucket
    exists on no worker (16 // 4 = 4), so the run is refused before launch, naming the settings."""
    from pipelines.core.config import ConfigError, load_config
    from pipelines.train.config import validate_for_launch
    from tests.test_train_config import CONFIGS

    assert Manifest.load(photo_features).shard_bucket_rows().sum(axis=0).tolist() == [2, 16, 16]
    base = [f"features_dir={photo_features}", "model.overrides={sample_size: 16}", "scaling.num_workers=4",
            "mlflow.enabled=false"]
    validate_for_launch(load_config(TrainConfig, CONFIGS / "tiny-cpu.yaml", base + ["batch.micro_batch=4",
                                                                                    "batch.global_batch=16"]))
    with pytest.raises(ConfigError, match="largest bucket, fewer than one micro batch of 5"):
        validate_for_launch(load_config(TrainConfig, CONFIGS / "tiny-cpu.yaml", base + ["batch.micro_batch=5",
                                                                                        "batch.global_batch=20"]))
