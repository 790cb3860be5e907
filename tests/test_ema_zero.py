"""ShardedEMA on real DeepSpeed engines over gloo on CPU: ZeRO-1, 2 and 3, fp32 and bf16, 1 and 2 ranks.

Two spawns run side by side: 2 ranks, and 1 rank fed the same global batch (both ranks' data) as the
reference for the sharded export. Each process trains every configuration (precision, ZeRO stage, offload) in turn
(DeepSpeed keeps its comm backend in a module global, so they share one process group), writes what it
saw to a file, and the checks run here. "Masters" below are DeepSpeed's fp32 master weights, read with
deepspeed.utils.safe_get_full_fp32_param; "module" weights are engine.module's (bf16 under bf16).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import pytest
import torch

STEPS = 4
DECAY = 0.5
START = 2  # step 1 copies the weights, steps 2..4 average with DECAY
WORLDS = (2, 1)
# Consecutive configurations of a process change stage where they can: a state saved under the previous
# one is then loaded to check the mismatch error.


@dataclass(frozen=True)
class Config:
    precision: str
    stage: int
    offload: bool = False  # optimizer (and, under ZeRO-3, parameters) on the CPU: masters live elsewhere

    @property
    def name(self) -> str:
        return f"{self.precision}-zero{self.stage}" + ("-offload" if self.offload else "")

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


CONFIGS = (Config("fp32", 3), Config("fp32", 2), Config("fp32", 1), Config("bf16", 1), Config("bf16", 2),
           Config("bf16", 3), Config("bf16", 2, offload=True), Config("bf16", 3, offload=True))
GLOBAL_BATCH = 4  # rows per step over all ranks: 2 per rank with 2 ranks, 4 on the single rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Odd sizes: 91 and 65 weight elements do not split evenly over 2 ranks (padding in the last slice).
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5))


def _ema_config():
    from model.ema import EMAConfig

    return EMAConfig(max_decay=DECAY, start_step=START, warmup=False)


def _module_weights(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    named = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named]):  # collective; no-op below ZeRO-3
        return {n: p.detach().float().clone() for n, p in named}


def _masters(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    # Collective under every stage (each rank owns a fragment of the fp32 masters).
    return {n: safe_get_full_fp32_param(p).detach().float().clone() for n, p in engine.module.named_parameters()}


def _batch(gens: list[torch.Generator], rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of the step's global batch: data rank d draws from gens[d]; one rank takes both."""
    rows = GLOBAL_BATCH // 2
    draws = [(torch.randn(rows, 7, generator=g), torch.randn(rows, 5, generator=g)) for g in gens]
    mine = draws if world == 1 else [draws[rank]]
    return torch.cat([x for x, _ in mine]), torch.cat([y for _, y in mine])


def _refuses(ema, state) -> bool:
    try:
        ema.load_state_dict(state)
    except ValueError:
        return True
    return False


def _state_file(out_dir: str, world: int, config: Config, rank: int) -> str:
    return os.path.join(out_dir, f"state_w{world}_{config.name}_r{rank}.pt")


def _run_config(rank: int, world: int, index: int, out_dir: str) -> None:
    import deepspeed
    import torch.distributed as dist

    from pipelines.train.deepspeed_config import AdamWSettings, DeepSpeedSettings, build_deepspeed_config
    from pipelines.train.ema_zero import ShardedEMA

    run = CONFIGS[index]
    model = _model()
    settings = DeepSpeedSettings(zero_stage=run.stage, precision=run.precision, adamw=AdamWSettings(lr=5e-2),
                                 offload_optimizer=run.offload, offload_params=run.offload and run.stage == 3)
    config = build_deepspeed_config(settings, GLOBAL_BATCH // world, 1, world_size=world)
    if run.stage == 3:
        # Biases (13, 5 elements) stay persistent (whole in param.data too), weights are partitioned only.
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 50
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    ema = ShardedEMA(engine, _ema_config())

    record: dict = {"initial": _module_weights(engine), "masters": [], "module": [], "decays": []}
    gens = [torch.Generator().manual_seed(100 + d) for d in range(2)]
    for step in range(1, STEPS + 1):
        x, y = _batch(gens, rank, world)
        loss = torch.nn.functional.mse_loss(engine(x.to(run.dtype)).float(), y)
        engine.backward(loss)
        engine.step()
        record["decays"].append(ema.update(step))
        record["masters"].append(_masters(engine))
        record["module"].append(_module_weights(engine))

    record["full"] = ema.full_state_dict()
    record["full_rank0_only"] = ema.full_state_dict(rank0_only=True)
    state = ema.state_dict()
    record["shadow_numel"] = sum(t.numel() for t in state["ema"]["shadow"].values())
    record["param_numel"] = sum(w.numel() for w in record["initial"].values())

    # Per-rank checkpoint round trip; states of another rank, stage or world size are refused.
    path = _state_file(out_dir, world, run, rank)
    torch.save(state, path)
    dist.barrier()
    fresh = ShardedEMA(engine, _ema_config())
    fresh.load_state_dict(torch.load(path, weights_only=False))
    record["reloaded_full"] = fresh.full_state_dict()
    refused = {"other world size": _refuses(fresh, {**state, "world_size": world + 1})}
    if world == 2:
        refused["other rank"] = _refuses(fresh, torch.load(_state_file(out_dir, world, run, 1 - rank),
                                                           weights_only=False))
    earlier = [c for c in CONFIGS[:index] if c.stage != run.stage]
    if earlier:
        refused["other stage"] = _refuses(fresh, torch.load(_state_file(out_dir, world, earlier[-1], rank),
                                                            weights_only=False))
    record["refused"] = refused

    # Eval with the EMA weights: a forward pass inside swapped_in, then the training weights are back.
    probe = torch.randn(3, 7, generator=torch.Generator().manual_seed(7))
    with ema.swapped_in():
        record["swapped_module"] = _module_weights(engine)
        with torch.no_grad():
            record["swapped_out"] = engine.module(probe.to(run.dtype)).float()
    record["after_module"] = _module_weights(engine)
    record["after_masters"] = _masters(engine)
    record["probe"] = probe
    torch.save(record, os.path.join(out_dir, f"record_w{world}_{run.name}_r{rank}.pt"))
    dist.barrier()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for index in range(len(CONFIGS)):
            _run_config(rank, world, index, out_dir)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ema_zero")
    runs = [mp.start_processes(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=False,
                               start_method="spawn") for world in WORLDS]
    for run in runs:
        while not run.join():
            pass
    return {(world, c.name, rank): torch.load(out / f"record_w{world}_{c.name}_r{rank}.pt", weights_only=False)
            for world in WORLDS for c in CONFIGS for rank in range(world)}


def _hand_ema(weights_per_step: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    ema = None
    for step, weights in enumerate(weights_per_step, start=1):
        if step < START:
            ema = {n: w.clone() for n, w in weights.items()}
        else:
            ema = {n: DECAY * ema[n] + (1 - DECAY) * w for n, w in weights.items()}
    return ema


def _assert_dicts_close(a, b, **kw):
    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(a[n], b[n], **kw, msg=lambda m, n=n: f"{n}: {m}")


def _max_diff(a, b) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


RUNS = [(world, c) for world in WORLDS for c in CONFIGS]
RUN_IDS = [f"world{world}-{c.name}" for world, c in RUNS]


@pytest.mark.parametrize("world, run", RUNS, ids=RUN_IDS)
def test_ema_follows_the_fp32_masters(records, world, run):
    r0 = records[(world, run.name, 0)]
    assert r0["decays"] == [0.0] + [DECAY] * (STEPS - 1)
    expected = _hand_ema(r0["masters"])
    _assert_dicts_close(r0["full"], expected, rtol=1e-6, atol=1e-7)
    # The shadow followed training: it left the initial weights, and it is not just the last weights.
    for n in expected:
        assert (r0["full"][n] - r0["initial"][n]).abs().max() > 1e-3, n
        assert (r0["full"][n] - r0["masters"][-1][n]).abs().max() > 1e-4, n
    if run.precision == "bf16":
        # The module holds the masters rounded to bf16 (up to 2^-9 relative): an EMA over those is off by
        # far more than the float32 rounding the check above allows.
        assert _max_diff(r0["masters"][-1], r0["module"][-1]) > 1e-4
        assert _max_diff(r0["full"], _hand_ema(r0["module"])) > 1e-4


@pytest.mark.parametrize("world, run", RUNS, ids=RUN_IDS)
def test_every_rank_exports_the_same_whole_weights(records, world, run):
    r0 = records[(world, run.name, 0)]
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in r0["full"].values())
    assert {n: v.shape for n, v in r0["full"].items()} == {n: v.shape for n, v in _model().state_dict().items()}
    assert set(r0["full_rank0_only"]) == set(r0["full"])
    for rank in range(1, world):
        r = records[(world, run.name, rank)]
        _assert_dicts_close(r["full"], r0["full"], rtol=0, atol=0)
        assert r["full_rank0_only"] == {}


@pytest.mark.parametrize("run", CONFIGS, ids=[c.name for c in CONFIGS])
def test_shadow_is_sharded_over_ranks(records, run):
    one = records[(1, run.name, 0)]
    two = [records[(2, run.name, rank)] for rank in (0, 1)]
    total = one["param_numel"]
    assert one["shadow_numel"] == total
    # Each rank keeps only its own fragment of the masters: the two fragments tile the model exactly once.
    assert sum(r["shadow_numel"] for r in two) == total
    assert all(0.4 * total <= r["shadow_numel"] <= 0.6 * total for r in two), [r["shadow_numel"] for r in two]


FP32_RUNS = [c for c in CONFIGS if c.precision == "fp32"]


@pytest.mark.parametrize("run", FP32_RUNS, ids=[c.name for c in FP32_RUNS])
def test_sharded_export_equals_the_single_rank_run(records, run):
    """fp32, where the two runs differ only by the order of float32 sums (the 2-rank gradient is the mean of
    two half-batch means): the EMA gathered from 2 ranks equals the one a single rank keeps whole."""
    _assert_dicts_close(records[(2, run.name, 0)]["full"], records[(1, run.name, 0)]["full"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world, run", RUNS, ids=RUN_IDS)
def test_per_rank_checkpoint_round_trip(records, world, run):
    for rank in range(world):
        r = records[(world, run.name, rank)]
        _assert_dicts_close(r["reloaded_full"], r["full"], rtol=0, atol=0)
        assert r["refused"] and all(r["refused"].values()), r["refused"]


@pytest.mark.parametrize("world, run", RUNS, ids=RUN_IDS)
def test_swapped_in_evaluates_ema_then_restores(records, world, run):
    for rank in range(world):
        r = records[(world, run.name, rank)]
        # Inside: the module holds the EMA (in its own dtype); after: the training weights, bit for bit, and
        # the fp32 masters untouched.
        _assert_dicts_close(r["swapped_module"], {n: v.to(run.dtype).float() for n, v in r["full"].items()},
                            rtol=0, atol=0)
        _assert_dicts_close(r["after_module"], r["module"][-1], rtol=0, atol=0)
        _assert_dicts_close(r["after_masters"], r["masters"][-1], rtol=0, atol=0)
        plain = _model().to(run.dtype)
        plain.load_state_dict(r["full"])
        with torch.no_grad():
            expected = plain(r["probe"].to(run.dtype)).float()
        tol = 1e-6 if run.precision == "fp32" else 1e-2
        torch.testing.assert_close(r["swapped_out"], expected, rtol=tol, atol=tol)


# --- a plain module (no DeepSpeed): the parameters are the masters, whole ---------------------------------------


def test_plain_module_keeps_a_whole_shadow():
    from pipelines.train.ema_zero import ShardedEMA

    model = _model()
    ema = ShardedEMA(model, _ema_config())
    weights = []
    for step in range(1, STEPS + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * step)
        ema.update(step)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    full = ema.full_state_dict()
    _assert_dicts_close(full, _hand_ema(weights), rtol=1e-6, atol=1e-7)
    with ema.swapped_in():
        _assert_dicts_close(dict(model.named_parameters()), full, rtol=0, atol=0)
    _assert_dicts_close({n: p.detach() for n, p in model.named_parameters()}, weights[-1], rtol=0, atol=0)

    fresh = ShardedEMA(model, _ema_config())
    fresh.load_state_dict(ema.state_dict())
    _assert_dicts_close(fresh.full_state_dict(), full, rtol=0, atol=0)


def test_states_without_fragments_and_frozen_parameters_are_refused():
    from pipelines.train.ema_zero import ShardedEMA

    model = _model()
    ema = ShardedEMA(model, _ema_config())
    whole_shadow = {"ema": ema.ema.state_dict(), "zero3": False}  # a whole EMA state, without fragment table
    with pytest.raises(ValueError, match="no 'fragments'"):
        ema.load_state_dict(whole_shadow)
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        ShardedEMA(model, _ema_config())
