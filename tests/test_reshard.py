"""A checkpoint of W ranks resumed on another world size (pipelines/train/checkpoint.py): DeepSpeed's universal
checkpoint for the fp32 masters and Adam moments, ShardedEMA.load_resharded for the EMA. Real DeepSpeed ranks
(gloo, one process each, tests/zero_ranks.py) write the checkpoint; one rank (this process) loads it."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.train import checkpoint

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", [2, 3])
def test_a_two_rank_checkpoint_resumes_exactly_on_one_rank(gloo_world_of_one, tmp_path, stage):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from model.config import PRESETS
    from model.ema import EMAConfig
    from model.unet import UNet
    from pipelines.train.deepspeed_config import AdamWSettings, DeepSpeedSettings, build_deepspeed_config
    from pipelines.train.ema_zero import ShardedEMA

    saved = tmp_path / "checkpoint"
    run = subprocess.run([sys.executable, str(REPO / "tests" / "zero_ranks.py"), str(saved), "2", str(stage)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    reference = torch.load(saved / "reference.pt", weights_only=True)

    meta = checkpoint.verify(str(saved), {})
    assert checkpoint.resharded(meta, 1)
    universal = checkpoint.prepare_universal(str(saved))
    assert checkpoint.prepare_universal(str(saved)) == universal  # made once

    torch.manual_seed(1)  # other initial weights: everything must come from the checkpoint
    unet = UNet(PRESETS["tiny"])
    config = build_deepspeed_config(DeepSpeedSettings(zero_stage=stage, precision="fp32", adamw=AdamWSettings(lr=1e-3)),
                                    micro_batch_per_gpu=8, grad_accum_steps=1, world_size=1)
    config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=unet, model_parameters=list(unet.parameters()), config=config)
    state = checkpoint.load(str(saved), engine, rank=0, world_size=1)
    assert state["step"] == 3 and state["loader"] == {"rank": 0} and len(state["ema_shards"]) == 2
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
