"""The U-Net job's Worker on one rank (real DeepSpeed over gloo, synthetic features): the layout and
compile options of the training step, the logged metrics, the preview encoders checked at start."""

import json
import shutil

import pytest
import torch

from pipelines.core.config import apply_override, from_dict
from pipelines.data.schema import MANIFEST_FILE
from pipelines.synthetic.features import write_synthetic_features
from pipelines.train.config import TrainConfig
from pipelines.train.preview import rank_rows
from pipelines.train.worker import Launch, Worker

BATCH = 4


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    directory = tmp_path_factory.mktemp("features")
    write_synthetic_features(str(directory), rows=BATCH * 4, shards=2)
    return str(directory)


def _worker(features: str, run_dir: str, *overrides: str) -> Worker:
    values: dict = {}
    for assignment in (f"features_dir={features}", "model.preset=tiny", "deepspeed.precision=fp32",
                       f"batch.global_batch={BATCH}", f"batch.micro_batch={BATCH}", "scaling.num_workers=1",
                       "ema.enabled=false", "mlflow.enabled=false", "max_steps=2", "log_every=1",
                       "window_shards=0", *overrides):
        apply_override(values, assignment)
    cfg = from_dict(TrainConfig, values)
    launch = Launch(features_dir=features, run_dir=run_dir, micro_batch=BATCH, grad_accum_steps=1,
                    mlflow={"enabled": False}, mlflow_run_id=None)
    return Worker(cfg, launch, rank=0, world_size=1)


def _losses(worker: Worker, layouts: list[bool]) -> list[float]:
    """Two steps; records whether each forward's input was channels_last."""
    hook = worker.engine.module.register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    stream = worker.batch_stream()
    try:
        return [float(worker.train_step(step, stream)["loss"]) for step in range(2)]
    finally:
        hook.remove()


def test_channels_last_and_compile_train_like_the_eager_step(gloo_world_of_one, features, tmp_path):
    eager_layouts: list[bool] = []
    eager = _losses(_worker(features, str(tmp_path / "eager")), eager_layouts)
    fast_layouts: list[bool] = []
    worker = _worker(features, str(tmp_path / "fast"), "model.channels_last=true", "model.compile=aot_eager")
    assert worker.engine.is_compiled
    fast = _losses(worker, fast_layouts)
    assert eager_layouts == [False, False] and fast_layouts == [True, True]
    assert fast == pytest.approx(eager, rel=1e-4)  # same weights, data and noise: the same losses


def test_train_logs_window_means(gloo_world_of_one, features, tmp_path):
    worker = _worker(features, str(tmp_path / "run"), "samples.every_steps=0")
    logged = []
    worker._log = lambda done, progress, window, last: logged.append((done, window, last))
    worker._checkpoint = lambda done: None  # reports to Ray Train, which is not running here
    worker.train()
    assert [done for done, _, _ in logged] == [1, 2]
    for _, window, last in logged:
        assert window.steps == 1 and window.means["loss"] == pytest.approx(float(last["loss"]))
        assert window.means["skipped_micro_batches"] == 0.0


def test_a_missing_encoder_fails_the_worker_before_training(gloo_world_of_one, features, tmp_path):
    """The preview encoders are the ones recorded at precompute; a node without them must fail at start,
    not at the first preview (hours in)."""
    moved = tmp_path / "features"
    shutil.copytree(features, moved)
    manifest = json.loads((moved / MANIFEST_FILE).read_text())
    manifest["extra"]["config"]["vae"]["source"] = str(tmp_path / "no-such-vae")
    (moved / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="no-such-vae"):
        _worker(str(moved), str(tmp_path / "run"))


@pytest.mark.parametrize("rows, world", [(4, 1), (4, 2), (4, 3), (5, 2), (2, 4)])
def test_preview_rows_cover_the_grid_once_in_order(rows, world):
    shares = [rank_rows(rows, rank, world) for rank in range(world)]
    assert len({len(share) for share in shares}) == 1  # every rank draws as many rows (ZeRO-3 forwards)
    gathered = [row for share in shares for row in share]
    assert gathered[:rows] == list(range(rows))  # the padding comes after every real row
