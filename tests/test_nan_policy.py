"""The NaN/inf policy (pipelines/train/policy.py, pipelines/train/step.py) on the real training step with two
real DeepSpeed ranks (ZeRO-2, fp32, gloo, one process each, gradient accumulation 2): a poisoned micro-batch
on one rank, all-bad steps, and max_consecutive bad steps in a row. One spawn (tests/nan_ranks.py) runs every
phase in order; the tests read what each rank saved. The job-level exit status 1 of a diverged run is
tests/test_faults.py::test_a_diverged_run_stops_at_once_without_a_restart."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.nan_ranks import DIVERGES_AT, MAX_CONSECUTIVE, WORLD

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("nan_ranks")
    run = subprocess.run([sys.executable, "-m", "tests.nan_ranks", str(out)], cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _assert_equal_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_micro_batch_poisoned_on_one_rank_contributes_exactly_zero_gradient_on_every_rank(ranks):
    """Step 0: one NaN in rank 1's micro-batch 1. Every rank agrees that micro-batch 1 is bad, so it drops out on
    both ranks (rank 0's half too) with an exactly zero gradient, while the other micro-batches train as usual
    (DeepSpeed still divides by world x accumulation). Reference: a second engine from the same weights, the same
    step on clean batches, micro-batch 1's gradient replaced by zeros with parameter hooks. Bit-identical: the
    same arithmetic in the same order, only 0 instead of the bad micro-batch's gradient."""
    for rank in ranks:
        step = rank["steps"][0]
        _assert_equal_weights(step["weights"], rank["reference"])
        moved = [n for n in step["weights"] if not torch.equal(step["weights"][n], rank["initial"][n])]
        assert len(moved) == len(step["weights"])  # the step was applied to every tensor
        assert step["skipped_micro_batches"] == 1 and step["lr"] > 0 and torch.isfinite(torch.tensor(step["loss"]))
        assert step["guard"] == {"total_skipped": 0, "consecutive": 0}
    _assert_equal_weights(ranks[0]["steps"][0]["weights"], ranks[1]["steps"][0]["weights"])


@pytest.mark.parametrize("step", [1, 2], ids=["all-bad-on-one-rank", "all-bad-on-every-rank"])
def test_an_all_bad_step_runs_at_lr_0_and_leaves_every_weight_bit_identical_on_every_rank(ranks, step):
    """Every micro-batch bad (on one rank: the agreed verdicts make it all-bad everywhere). Step 0 left Adam
    momentum behind, so a step at the normal lr would move the weights even with zero gradients."""
    for rank in ranks:
        before, after = rank["steps"][step - 1], rank["steps"][step]
        _assert_equal_weights(after["weights"], before["weights"])
        assert (after["lr"], after["skipped_micro_batches"]) == (0.0, 2)
        assert after["guard"] == {"total_skipped": step, "consecutive": step}
    assert ranks[0]["steps"][step]["guard"] == ranks[1]["steps"][step]["guard"]


def test_max_consecutive_bad_steps_in_a_row_end_the_training_on_every_rank(ranks):
    assert DIVERGES_AT == MAX_CONSECUTIVE  # steps 1, 2, 3 bad in a row
    for rank in ranks:
        assert rank["diverged"] is not None, f"rank {rank['rank']} went on training"
        assert f"{MAX_CONSECUTIVE} steps in a row at step {DIVERGES_AT}" in rank["diverged"]
        assert rank["diverged_guard"] == {"total_skipped": MAX_CONSECUTIVE, "consecutive": MAX_CONSECUTIVE}
