"""A checkpoint of W ranks resumed on another world size (pipelines/train/checkpoint.py): DeepSpeed's universal
checkpoint for the fp32 masters and Adam moments, ShardedEMA.load_resharded for the EMA. Real DeepSpeed ranks
(gloo, one process each, tests/zero_ranks.py) write the checkpoint; one rank (this process) loads it. The same
runs (ZeRO-1, 2 and 3 at world size 2, same seeds and data) also show that every stage trains every tensor to
the same weights."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.train import checkpoint
from tests.zero_ranks import LR

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
STAGES = (1, 2, 3)
WORLD = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[int, Path]:
    """Stage -> the checkpoint (and reference.pt) of tests/zero_ranks.py at world size 2: one spawn per stage,
    shared by every test here."""
    saved = {}
    for stage in STAGES:
        saved[stage] = tmp_path_factory.mktemp(f"zero{stage}") / "checkpoint"
        run = subprocess.run([sys.executable, str(REPO / "tests" / "zero_ranks.py"), str(saved[stage]), str(WORLD),
                              str(stage)], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    return saved


# Only the order of float32 operations can differ between stages. Measured after 3 AdamW steps at lr 1e-3:
# ZeRO-1 is bit-identical to ZeRO-2 (the same optimizer class, the same reductions); ZeRO-3 differs by at most
# 3.1e-5 (down.1.res.0.conv1.weight), as Adam's first steps (~lr x sign(gradient)) magnify last-bit differences in
# near-zero gradients. A tensor that a stage never updates, or updates with another gradient (clipping, a lost
# contribution), is off by ~lr per step in most elements: far above lr / 10.
ZERO3_ATOL = LR / 10


def test_zero_1_2_and_3_train_every_tensor_to_the_same_weights(trained):
    refs = {stage: torch.load(trained[stage] / "reference.pt", weights_only=True) for stage in STAGES}
    base = refs[2]
    for stage, ref in refs.items():
        assert ref["fp32"].keys() == base["fp32"].keys() == ref["initial"].keys()
        for name, weight in ref["fp32"].items():
            assert torch.equal(ref["initial"][name], base["initial"][name]), (stage, name)  # same start
            assert not torch.equal(weight, ref["initial"][name]), f"ZeRO-{stage} never updated {name}"
            atol = ZERO3_ATOL if stage == 3 else 0.0
            torch.testing.assert_close(weight, base["fp32"][name], rtol=0, atol=atol,
                                       msg=lambda m, stage=stage, name=name: f"ZeRO-{stage} {name}: {m}")


@pytest.mark.parametrize("stage", [2, 3])
def test_a_two_rank_checkpoint_resumes_exactly_on_one_rank(gloo_world_of_one, trained, stage):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from model.config import PRESETS
    from model.ema import EMAConfig
    from model.unet import UNet
    from pipelines.train.deepspeed_config import AdamWSettings, DeepSpeedSettings, build_deepspeed_config
    from pipelines.train.ema_zero import ShardedEMA

    saved = trained[stage]
    reference = torch.load(saved / "reference.pt", weights_only=True)

    meta = checkpoint.verify(str(saved), {})
    assert checkpoint.resharded(meta, 1)
    universal = checkpoint.prepare_universal(str(saved))
    assert checkpoint.prepare_universal(str(saved)) == universal  # made once

    torch.manual_seed(1)  # other initial weights: everything must come from the checkpoint
    unet = UNet(PRESETS["tiny"])
    config = build_deepspeed_config(DeepSpeedSettings(zero_stage=stage, precision="fp32", adamw=AdamWSettings(lr=LR)),
                                    micro_batch_per_gpu=8, grad_accum_steps=1, world_size=1)
    config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=unet, model_parameters=list(unet.parameters()), config=config)
    state = checkpoint.load(str(saved), engine, rank=0, world_size=1)
    assert state["step"] == 3 and state["loader"] == {"rank": 0} and len(state["ema_shards"]) == WORLD
    ema = ShardedEMA(engine, EMAConfig(start_step=1, max_decay=0.5))
    ema.load_resharded(state["ema_shards"])

    params = dict(engine.module.named_parameters())
    assert engine.global_steps == reference["global_steps"]
    for name, p in params.items():
        assert torch.equal(safe_get_full_fp32_param(p), reference["fp32"][name]), name
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(safe_get_full_optimizer_state(p, moment), reference[moment][name]), (moment, name)
    ema_now = ema.full_state_dict(include_buffers=False)
    assert all(torch.equal(ema_now[n], reference["ema"][n]) for n in params)
    assert any(not torch.equal(reference["ema"][n], reference["fp32"][n]) for n in params)  # a real EMA

    shards = state["ema_shards"]
    with pytest.raises(ValueError, match="cover"):  # one rank's EMA file missing
        ema.load_resharded(shards[:1])
