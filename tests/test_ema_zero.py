"""ShardedEMA with 2 real ranks on CPU (gloo): ZeRO-3 (partitioned) and ZeRO-2 (whole weights).

One spawn of 2 processes runs both stages (DeepSpeed keeps its comm backend in a module global, so both
share one process group); each rank writes what it saw to tmp files, and the checks run here.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

STEPS = 4
DECAY = 0.5
START = 2  # step 1 copies the weights, steps 2..4 average with DECAY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Odd sizes: 91 and 65 weight elements do not split evenly over 2 ranks (padding in the last slice).
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5))


def _gathered(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    named = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named]):  # collective; no-op below ZeRO-3
        return {n: p.detach().clone().float() for n, p in named}


def _run_stage(rank: int, stage: int, out_dir: str) -> None:
    import deepspeed
    import torch.distributed as dist

    from model.ema import EMAConfig
    from pipelines.train.deepspeed_config import AdamWSettings, DeepSpeedSettings, build_deepspeed_config
    from pipelines.train.ema_zero import ShardedEMA

    model = _model()
    config = build_deepspeed_config(DeepSpeedSettings(zero_stage=stage, precision="fp32",
                                                      adamw=AdamWSettings(lr=5e-2)), 2, 1, world_size=2)
    if stage == 3:
        # Biases (13, 5 elements) stay persistent (whole in param.data too), weights are partitioned only.
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 50
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    ema = ShardedEMA(engine, EMAConfig(max_decay=DECAY, start_step=START, warmup=False))
    assert ema.zero3 == (stage == 3)

    record: dict = {"initial": _gathered(engine), "weights": [], "decays": []}
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for step in range(1, STEPS + 1):
        x, y = torch.randn(2, 7, generator=g), torch.randn(2, 5, generator=g)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        record["decays"].append(ema.update(step))
        record["weights"].append(_gathered(engine))

    record["full"] = ema.full_state_dict()
    record["full_rank0_only"] = ema.full_state_dict(rank0_only=True)
    record["shard"] = ema.state_dict()

    # Per-rank checkpoint round trip, and a shard from the other rank is refused under ZeRO-3.
    path = os.path.join(out_dir, f"stage{stage}_rank{rank}.pt")
    torch.save(ema.state_dict(), path)
    dist.barrier()
    fresh = ShardedEMA(engine, EMAConfig(max_decay=DECAY, start_step=START, warmup=False))
    fresh.load_state_dict(torch.load(path, weights_only=False))
    record["reloaded_full"] = fresh.full_state_dict()
    other = torch.load(os.path.join(out_dir, f"stage{stage}_rank{1 - rank}.pt"), weights_only=False)
    try:
        fresh.load_state_dict(other)
        record["other_shard_refused"] = False
    except ValueError:
        record["other_shard_refused"] = True

    # Eval with the EMA weights: a forward pass inside swapped_in, then the training weights are back.
    probe = torch.randn(3, 7, generator=torch.Generator().manual_seed(7))
    with ema.swapped_in():
        record["swapped_gathered"] = _gathered(engine)
        with torch.no_grad():
            record["swapped_out"] = engine.module(probe).detach().clone()
    record["after_swap_gathered"] = _gathered(engine)
    record["probe"] = probe
    torch.save(record, os.path.join(out_dir, f"record_stage{stage}_rank{rank}.pt"))
    dist.barrier()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for stage in (3, 2):
            _run_stage(rank, stage, out_dir)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ema_zero")
    mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return {(stage, rank): torch.load(out / f"record_stage{stage}_rank{rank}.pt", weights_only=False)
            for stage in (2, 3) for rank in (0, 1)}


def _hand_ema(record) -> dict[str, torch.Tensor]:
    ema = None
    for step, weights in enumerate(record["weights"], start=1):
        if step < START:
            ema = {n: w.clone() for n, w in weights.items()}
        else:
            ema = {n: DECAY * ema[n] + (1 - DECAY) * w for n, w in weights.items()}
    return ema


def _assert_dicts_close(a, b, **kw):
    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(a[n], b[n], **kw, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("stage", [3, 2])
def test_full_ema_matches_hand_computed(records, stage):
    r0, r1 = records[(stage, 0)], records[(stage, 1)]
    assert r0["decays"] == [0.0] + [DECAY] * (STEPS - 1)
    expected = _hand_ema(r0)
    _assert_dicts_close(r0["full"], expected, rtol=1e-6, atol=1e-7)
    _assert_dicts_close(r1["full"], r0["full"], rtol=0, atol=0)  # every rank gets the same export
    assert r1["full_rank0_only"] == {} and set(r0["full_rank0_only"]) == set(expected)
    # The shadow followed training: it left the initial weights, and it is not just the last weights.
    for n in expected:
        assert (r0["full"][n] - r0["initial"][n]).abs().max() > 1e-3, n
        assert (r0["full"][n] - r0["weights"][-1][n]).abs().max() > 1e-4, n


def test_zero3_shards_differ_and_reconstruct(records):
    s0, s1 = records[(3, 0)]["shard"], records[(3, 1)]["shard"]
    full = records[(3, 0)]["full"]
    assert s0["zero3"] and (s0["rank"], s1["rank"], s0["world_size"]) == (0, 1, 2)
    for name, value in full.items():
        a, b = s0["ema"]["shadow"][name], s1["ema"]["shadow"][name]
        assert a.dtype == torch.float32 and a.numel() == b.numel() == (value.numel() + 1) // 2
        assert not torch.equal(a, b), name
        torch.testing.assert_close(torch.cat([a, b])[: value.numel()].view(value.shape), value, rtol=0, atol=0)


def test_zero2_state_is_whole_on_each_rank(records):
    s0, s1 = records[(2, 0)]["shard"], records[(2, 1)]["shard"]
    assert not s0["zero3"]
    _assert_dicts_close(s0["ema"]["shadow"], records[(2, 0)]["full"], rtol=0, atol=0)
    _assert_dicts_close(s1["ema"]["shadow"], s0["ema"]["shadow"], rtol=0, atol=0)


@pytest.mark.parametrize("stage", [3, 2])
def test_per_rank_checkpoint_round_trip(records, stage):
    for rank in (0, 1):
        r = records[(stage, rank)]
        _assert_dicts_close(r["reloaded_full"], r["full"], rtol=0, atol=0)
        assert r["other_shard_refused"] is (stage == 3)  # ZeRO-2 state is identical on both ranks


@pytest.mark.parametrize("stage", [3, 2])
def test_swapped_in_evaluates_ema_then_restores(records, stage):
    r = records[(stage, 0)]
    _assert_dicts_close(r["swapped_gathered"], r["full"], rtol=0, atol=0)
    _assert_dicts_close(r["after_swap_gathered"], r["weights"][-1], rtol=0, atol=0)
    plain = _model()
    plain.load_state_dict(r["full"])
    with torch.no_grad():
        torch.testing.assert_close(r["swapped_out"], plain(r["probe"]), rtol=1e-6, atol=1e-6)
