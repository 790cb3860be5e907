import io

import pytest
import torch
from torch import nn

from model.ema import EMA, EMAConfig


class TwoParam(nn.Module):
    def __init__(self, a: float, b: list[float]) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))
        self.register_buffer("count", torch.tensor(0, dtype=torch.long))


def set_params(m: TwoParam, a: float, b: list[float]) -> None:
    with torch.no_grad():
        m.a.fill_(a)
        m.b.copy_(torch.tensor(b))


def test_update_matches_hand_computation():
    m = TwoParam(1.0, [2.0, -4.0])
    ema = EMA(m, EMAConfig(max_decay=0.9, start_step=0))
    set_params(m, 3.0, [0.0, 4.0])
    d0 = ema.update(m, step=0)
    assert d0 == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    # s = d * s + (1 - d) * w
    assert ema.shadow["a"].item() == pytest.approx(0.1 * 1.0 + 0.9 * 3.0)
    assert torch.allclose(ema.shadow["b"], torch.tensor([0.1 * 2 + 0.9 * 0, 0.1 * -4 + 0.9 * 4]))

    a_prev = ema.shadow["a"].item()
    set_params(m, -1.0, [0.0, 4.0])
    d1 = ema.update(m, step=1)
    assert d1 == pytest.approx(2 / 11)
    assert ema.shadow["a"].item() == pytest.approx(d1 * a_prev + (1 - d1) * -1.0)


def test_constant_decay_without_warmup():
    m = TwoParam(0.0, [0.0, 0.0])
    ema = EMA(m, EMAConfig(max_decay=0.75, warmup=False))
    set_params(m, 4.0, [8.0, 0.0])
    assert ema.update(m, step=0) == 0.75
    assert ema.shadow["a"].item() == pytest.approx(1.0)
    assert torch.allclose(ema.shadow["b"], torch.tensor([2.0, 0.0]))


def test_warmup_increases_and_is_capped():
    cfg = EMAConfig(max_decay=0.99, start_step=5)
    decays = [cfg.decay_at(s) for s in range(5, 2000)]
    assert all(x < y or y == 0.99 for x, y in zip(decays, decays[1:]))
    assert decays[0] == pytest.approx(0.1)
    assert max(decays) == 0.99 and decays[-1] == 0.99
    assert cfg.decay_at(4) == 0.0


def test_before_start_step_shadow_copies_weights():
    m = TwoParam(1.0, [1.0, 1.0])
    ema = EMA(m, EMAConfig(max_decay=0.999, start_step=10))
    for step in range(10):
        set_params(m, float(step), [step * 2.0, -step])
        assert ema.update(m, step) == 0.0
        assert torch.equal(ema.shadow["a"], m.a.detach())
        assert torch.equal(ema.shadow["b"], m.b.detach())
    set_params(m, 100.0, [0.0, 0.0])
    ema.update(m, 10)  # first averaged step: decay 0.1
    assert ema.shadow["a"].item() == pytest.approx(0.1 * 9.0 + 0.9 * 100.0)


def test_shadow_is_float32_and_buffers_are_copied():
    m = TwoParam(1.0, [1.0, 2.0]).to(torch.bfloat16)
    ema = EMA(m)
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())
    m.count.fill_(7)
    ema.update(m, step=0)
    assert ema.buffers["count"].item() == 7


def test_state_dict_round_trip():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = EMA(m, EMAConfig(max_decay=0.95, start_step=2))
    for step in range(6):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        ema.update(m, step)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)

    fresh = EMA(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))  # other weights, default config
    fresh.load_state_dict(torch.load(buf))
    assert fresh.config == ema.config
    assert fresh.last_step == 5 and fresh.last_decay == ema.last_decay
    for name, t in ema.shadow.items():
        assert torch.equal(fresh.shadow[name], t)
    for name, t in ema.buffers.items():
        assert torch.equal(fresh.buffers[name], t)


def test_load_state_dict_rejects_other_model():
    ema = EMA(nn.Linear(2, 2))
    with pytest.raises(KeyError, match="unexpected"):
        ema.load_state_dict(EMA(nn.Linear(2, 2, bias=False)).state_dict() | {
            "shadow": {"weight": torch.zeros(2, 2), "other": torch.zeros(1)}})


def test_copy_to_writes_shadow():
    m = TwoParam(1.0, [1.0, 1.0])
    ema = EMA(m, EMAConfig(max_decay=0.5, warmup=False))
    set_params(m, 3.0, [5.0, -1.0])
    ema.update(m, 0)
    target = TwoParam(0.0, [0.0, 0.0])
    ema.copy_to(target)
    assert target.a.item() == pytest.approx(2.0)
    assert torch.allclose(target.b.detach(), torch.tensor([3.0, 0.0]))
    assert target.count.item() == 0


def test_named_parameter_iterable_and_cpu_shadow():
    m = TwoParam(2.0, [0.0, 0.0])
    ema = EMA(m.named_parameters(), EMAConfig(max_decay=0.5, warmup=False), device="cpu")
    assert set(ema.shadow) == {"a", "b"} and not ema.buffers
    set_params(m, 4.0, [2.0, 2.0])
    ema.update(((n, p) for n, p in m.named_parameters()), step=3)
    assert ema.shadow["a"].item() == pytest.approx(3.0)
    with pytest.raises(KeyError, match="no shadow"):
        ema.update([("c", torch.zeros(1))], step=4)


def test_update_with_nothing_to_average():
    # A ZeRO rank may own no fp32 master fragment at all: its EMA is empty but still follows the steps.
    ema = EMA([], EMAConfig(max_decay=0.9))
    assert ema.update([], step=3) == pytest.approx(min(0.9, 4 / 13))
    assert ema.shadow == {} and ema.last_step == 3
