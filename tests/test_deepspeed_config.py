"""The DeepSpeed config builder, and a real deepspeed.initialize + 3 steps for ZeRO stages 1, 2 and 3.

The real runs share one gloo process group of world size 1 (module fixture): DeepSpeed keeps its
communication backend in a module global, so tearing the group down between stages would leave it
pointing at a dead one.
"""

from __future__ import annotations

import json

import pytest
import torch

from pipelines.train.deepspeed_config import (
    DEFAULT_INFRA_DIR,
    AdamWSettings,
    DeepSpeedSettings,
    build_deepspeed_config,
    derive_batch_sizes,
)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_config_per_stage(stage):
    cfg = build_deepspeed_config(DeepSpeedSettings(zero_stage=stage), micro_batch_per_gpu=4,
                                 grad_accum_steps=3, world_size=2)
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 4 * 3 * 2
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"] == {"enabled": True}
    assert "fp16" not in cfg
    assert cfg["optimizer"]["type"] == "AdamW"
    assert cfg["optimizer"]["params"]["torch_adam"] is True  # no JIT-compiled FusedAdam on CPU
    assert "offload_optimizer" not in cfg["zero_optimization"]
    assert "offload_param" not in cfg["zero_optimization"]
    assert cfg["wall_clock_breakdown"] is False
    assert cfg["steps_per_print"] >= 1_000_000


def test_config_fills_settings():
    settings = DeepSpeedSettings(zero_stage=3, precision="fp32", offload_optimizer=True, offload_params=True,
                                 gradient_clipping=0.5,
                                 adamw=AdamWSettings(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-6))
    cfg = build_deepspeed_config(settings, micro_batch_per_gpu=2, grad_accum_steps=1, world_size=1)
    assert cfg["bf16"] == {"enabled": False}
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-6,
                                          "weight_decay": 0.1, "torch_adam": True}
    assert json.loads(json.dumps(cfg)) == cfg  # plain JSON: travels to Ray workers and into MLflow


def test_config_does_not_mutate_static_file_content():
    a = build_deepspeed_config(DeepSpeedSettings(zero_stage=2, offload_optimizer=True), 1, 1, 1)
    b = build_deepspeed_config(DeepSpeedSettings(zero_stage=2), 1, 1, 1)
    assert "offload_optimizer" in a["zero_optimization"]
    assert "offload_optimizer" not in b["zero_optimization"]


def test_static_files_hold_no_run_values():
    for stage in (1, 2, 3):
        static = json.loads((DEFAULT_INFRA_DIR / f"zero{stage}.json").read_text())
        assert set(static) == {"zero_optimization"}
        assert static["zero_optimization"]["stage"] == stage


def test_static_file_with_batch_size_is_an_error(tmp_path):
    (tmp_path / "zero2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 8}))
    with pytest.raises(ValueError, match="train_batch_size"):
        build_deepspeed_config(DeepSpeedSettings(), 1, 1, 1, infra_dir=tmp_path)


def test_offload_params_needs_stage_3():
    with pytest.raises(ValueError, match="offload_params needs zero_stage 3"):
        DeepSpeedSettings(zero_stage=2, offload_params=True)


@pytest.mark.parametrize("kwargs", [{"zero_stage": 4}, {"precision": "fp16"}, {"gradient_clipping": -1.0}])
def test_bad_settings(kwargs):
    with pytest.raises(ValueError):
        DeepSpeedSettings(**kwargs)


def test_derive_batch_sizes():
    assert derive_batch_sizes(global_batch=64, world_size=2, micro_batch=8) == (8, 4)
    assert derive_batch_sizes(global_batch=4, world_size=4, micro_batch=1) == (1, 1)


def test_derive_batch_sizes_not_divisible():
    with pytest.raises(ValueError) as err:
        derive_batch_sizes(global_batch=30, world_size=4, micro_batch=4)
    msg = str(err.value)
    assert "30" in msg and "16" in msg  # names the numbers: 4 x 4 = 16
    assert "[16, 32]" in msg  # suggests valid global batches


# --- real deepspeed.initialize, one process, world size 1 over gloo ---------------------------------------


def _snapshot(engine) -> list[torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    # Under ZeRO-3 a parameter's .data is an empty placeholder until gathered; a no-op for stages 1-2.
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


@pytest.mark.parametrize("stage, offload", [
    (1, {}), (2, {}), (3, {}),
    # Offload with torch AdamW: accepted because the optimizer comes from the config, and no CPU-Adam JIT.
    (2, {"offload_optimizer": True}), (3, {"offload_optimizer": True, "offload_params": True}),
], ids=["zero1", "zero2", "zero3", "zero2-offload", "zero3-offload"])
def test_deepspeed_trains_each_stage(gloo_world_of_one, stage, offload):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    settings = DeepSpeedSettings(zero_stage=stage, precision="fp32", adamw=AdamWSettings(lr=1e-2), **offload)
    micro, accum = derive_batch_sizes(global_batch=4, world_size=1, micro_batch=4)
    config = build_deepspeed_config(settings, micro, accum, world_size=1)

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    assert isinstance(engine.basic_optimizer, torch.optim.AdamW)  # torch_adam: torch's, not FusedAdam
    assert engine.zero_optimization_stage() == stage
    assert engine.gradient_clipping() == 1.0
    before = _snapshot(engine)
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    after = _snapshot(engine)

    assert engine.global_steps == 3
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses  # same batch, 3 AdamW steps: the fit improves
    assert all(not torch.equal(b, a) for b, a in zip(before, after))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_accumulates_gradients_in_fp32(gloo_world_of_one, stage):
    """16 micro-batch gradients summed in bf16 keep 8 mantissa bits: the sum of many small gradients
    loses most of them. The config asks for fp32 accumulation, and every ZeRO stage trains with it."""
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    micro, accum = derive_batch_sizes(global_batch=16, world_size=1, micro_batch=4)
    settings = DeepSpeedSettings(zero_stage=stage, precision="bf16", adamw=AdamWSettings(lr=1e-2))
    config = build_deepspeed_config(settings, micro, accum, world_size=1)
    assert config["data_types"] == {"grad_accum_dtype": "fp32"}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    assert engine.get_data_types() == (torch.bfloat16, torch.float32)
    before = _snapshot(engine)
    for _ in range(accum):
        x, y = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, 1, dtype=torch.bfloat16)
        engine.backward(torch.nn.functional.mse_loss(engine(x).float(), y.float()))
        engine.step()
    assert engine.global_steps == 1
    assert all(torch.isfinite(p).all() and not torch.equal(b, p) for b, p in zip(before, _snapshot(engine)))


def test_fp32_runs_have_no_accumulation_dtype_to_set():
    micro, accum = derive_batch_sizes(global_batch=16, world_size=1, micro_batch=4)
    config = build_deepspeed_config(DeepSpeedSettings(precision="fp32"), micro, accum, world_size=1)
    assert "data_types" not in config
