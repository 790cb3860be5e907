import math

import pytest
import torch

from pipelines.train.policy import (
    LRSchedule,
    NonFiniteGuard,
    NonFiniteLossError,
    NonFinitePolicy,
    all_ranks_finite,
)

NAN = torch.tensor(float("nan"))
INF = torch.tensor(float("inf"))
OK = torch.tensor(0.5)


def test_warmup_is_linear_and_step0_is_nonzero():
    s = LRSchedule(base_lr=1e-3, warmup_steps=4, total_steps=100, kind="constant")
    assert [s.lr_at(i) for i in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_cosine_endpoints_and_midpoint():
    s = LRSchedule(base_lr=1.0, warmup_steps=10, total_steps=110, kind="cosine", min_lr_ratio=0.1)
    assert s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(0.55)  # halfway between base and floor
    assert s.lr_at(110) == pytest.approx(0.1)
    assert s.lr_at(500) == pytest.approx(0.1)  # held at the floor past total_steps


def test_cosine_without_warmup_and_zero_floor():
    s = LRSchedule(base_lr=2.0, warmup_steps=0, total_steps=4)
    assert [s.lr_at(i) for i in range(5)] == pytest.approx(
        [2.0 * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(5)]
    )
    assert s.lr_at(4) == pytest.approx(0.0)


def test_constant_after_warmup():
    s = LRSchedule(base_lr=3e-4, warmup_steps=2, total_steps=10, kind="constant")
    assert all(s.lr_at(i) == 3e-4 for i in range(2, 50))


def test_monotonic_decay_after_warmup():
    s = LRSchedule(base_lr=1e-4, warmup_steps=20, total_steps=200, min_lr_ratio=0.05)
    warm = [s.lr_at(i) for i in range(21)]
    decay = [s.lr_at(i) for i in range(20, 250)]
    assert all(a < b for a, b in zip(warm[:20], warm[1:20]))
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert decay[0] > decay[-1]


def test_all_warmup_goes_to_floor():
    s = LRSchedule(base_lr=1.0, warmup_steps=5, total_steps=5, min_lr_ratio=0.2)
    assert s.lr_at(4) == pytest.approx(1.0)
    assert s.lr_at(5) == pytest.approx(0.2)


def test_apply_sets_every_param_group():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr": 9.0}], lr=5.0)
    s = LRSchedule(base_lr=1e-3, warmup_steps=10, total_steps=100)
    lr = s.apply(opt, 4)
    assert lr == pytest.approx(5e-4)
    assert [g["lr"] for g in opt.param_groups] == [lr, lr]


def test_apply_takes_anything_with_param_groups_and_rejects_the_rest():
    class Wrapper:  # like a DeepSpeed ZeRO optimizer: just param_groups
        param_groups = [{"lr": 0.0}, {"lr": 1.0}]

    s = LRSchedule(base_lr=2.0, total_steps=10, kind="constant")
    s.apply(Wrapper, 3)
    assert [g["lr"] for g in Wrapper.param_groups] == [2.0, 2.0]
    with pytest.raises(TypeError, match="engine.optimizer"):
        s.apply(object(), 0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(base_lr=0.0), "base_lr"),
        (dict(base_lr=float("nan")), "base_lr"),
        (dict(base_lr=1.0, warmup_steps=-1), "warmup_steps"),
        (dict(base_lr=1.0, warmup_steps=1.5), "warmup_steps"),
        (dict(base_lr=1.0, total_steps=0), "total_steps"),
        (dict(base_lr=1.0, warmup_steps=11, total_steps=10), "warmup_steps"),
        (dict(base_lr=1.0, kind="linear"), "kind"),
        (dict(base_lr=1.0, min_lr_ratio=1.5), "min_lr_ratio"),
    ],
)
def test_bad_schedule_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LRSchedule(**kwargs)


def test_negative_step_is_an_error():
    with pytest.raises(ValueError, match="step"):
        LRSchedule(base_lr=1.0).lr_at(-1)


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_bad_policy_config(bad):
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFinitePolicy(max_consecutive=bad)


def test_guard_counts_and_resets():
    g = NonFiniteGuard(NonFinitePolicy(max_consecutive=3))
    assert g.check(OK) is True
    assert g.check(NAN) is False
    assert g.check(INF) is False
    assert (g.total_skipped, g.consecutive) == (2, 2)
    assert g.check(OK) is True  # a finite loss resets the run
    assert (g.total_skipped, g.consecutive) == (2, 0)
    assert g.check(torch.tensor([1.0, float("nan")])) is False
    assert (g.total_skipped, g.consecutive) == (3, 1)


def test_guard_raises_after_n_in_a_row():
    g = NonFiniteGuard(NonFinitePolicy(max_consecutive=2))
    assert g.check(NAN, step=7) is False
    with pytest.raises(NonFiniteLossError, match=r"2 steps in a row at step 8.*learning rate.*precision"):
        g.check(NAN, step=8)


def test_guard_state_dict_round_trip_resumes_exactly():
    g = NonFiniteGuard(NonFinitePolicy(max_consecutive=3))
    g.check(OK), g.check(NAN), g.check(OK), g.check(NAN), g.check(NAN)
    state = g.state_dict()
    assert state == {"total_skipped": 3, "consecutive": 2}
    resumed = NonFiniteGuard(NonFinitePolicy(max_consecutive=3))
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    with pytest.raises(NonFiniteLossError):  # the third in a row, counted across the resume
        resumed.check(NAN)


def test_guard_rejects_bad_state():
    g = NonFiniteGuard()
    with pytest.raises(ValueError, match="keys"):
        g.load_state_dict({"total_skipped": 0})
    with pytest.raises(ValueError, match="consecutive"):
        g.load_state_dict({"total_skipped": 0, "consecutive": -1})


def test_all_ranks_finite_on_one_process():
    """Local verdicts, whether or not the session's one-rank gloo group (tests/conftest.py) exists yet."""
    assert all_ranks_finite(OK) is True
    assert all_ranks_finite(1.25) is True
    assert all_ranks_finite(NAN) is False
    assert all_ranks_finite(float("-inf")) is False
