"""pipelines/train/checkpoint.py with a real DeepSpeed engine (one process, world size 1 over gloo, CPU):
a checkpoint saved locally and copied to a URI (fsspec's memory://, no network) is verified and loaded
from there, as checkpoint.resume_from=s3://... is on a cluster."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import pytest
import torch

from pipelines.core import storage
from pipelines.train import checkpoint
from pipelines.train.deepspeed_config import AdamWSettings, DeepSpeedSettings, build_deepspeed_config


@pytest.fixture
def memory_root():
    root = f"memory://test-train-checkpoint-{uuid.uuid4().hex}"
    yield root
    storage.remove_dir(root)


def _engine(seed: int):
    import deepspeed

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    config = build_deepspeed_config(DeepSpeedSettings(zero_stage=2, precision="fp32", adamw=AdamWSettings(lr=1e-2)),
                                    4, 1, world_size=1)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine



def _trained_engine(steps: int = 2):
    """A seed-0 engine after `steps` optimizer steps on one fixed batch."""
    engine = _engine(seed=0)
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    for _ in range(steps):
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
    return engine

def _weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def test_a_checkpoint_at_a_uri_is_verified_and_loaded_through_a_temporary_local_copy(
        gloo_world_of_one, memory_root, tmp_path, monkeypatch):
    trained = _trained_engine()
    local = tmp_path / "checkpoint_000000"
    fingerprint = {"model": "tiny"}
    checkpoint.save(local, trained, rank=0, step=2, trainer_state={"note": "rank 0"},
                    meta={"world_size": 1, "fingerprint": fingerprint})
    uri = f"{memory_root}/runs/phase-1/checkpoint_000000"
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(uri, path.relative_to(local).as_posix()), path.read_bytes())

    fresh = _engine(seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(_weights(fresh).values(), _weights(trained).values()))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the fetched copy goes
    assert checkpoint.verify(uri, fingerprint)["step"] == 2
    state = checkpoint.load(uri, fresh, rank=0, world_size=1)
    assert state["step"] == 2 and state["note"] == "rank 0"
    assert all(torch.equal(a, b) for a, b in zip(_weights(fresh).values(), _weights(trained).values()))
    assert fresh.global_steps == trained.global_steps == 2
    assert os.listdir(scratch) == []  # the local copy is gone
    assert Path(local).is_dir()
