"""LogWindow (pipelines/train/log_window.py): the training jobs' per-window means, and the process group's
backend map: every collective the workers run must have a backend for the device its tensor lives on."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.distributed_c10d import Backend, BackendConfig

from pipelines.core.ray_train import ScalingSettings, process_group_backend
from pipelines.train.log_window import LogWindow


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_means_leave_out_non_finite_values_and_the_window_resets():
    clock = Clock()
    window = LogWindow(("loss", "kl"), "cpu", clock=clock)
    window.add(loss=torch.tensor(1.0), kl=0.5)
    window.add(loss=torch.tensor(float("nan")), kl=1.5)  # a skipped step's loss
    window.add(loss=3.0, kl=float("inf"))
    clock.now += 4.0
    stats = window.flush()
    assert stats.means == {"loss": 2.0, "kl": 1.0}
    assert (stats.steps, stats.seconds) == (3, 4.0)
    window.add(loss=float("nan"), kl=2.0)
    clock.now += 1.0
    again = window.flush()
    assert math.isnan(again.means["loss"]) and again.means["kl"] == 2.0  # nothing of the first window
    assert (again.steps, again.seconds) == (1, 1.0)


def test_add_names_every_value_of_the_window():
    window = LogWindow(("loss", "kl"), "cpu")
    with pytest.raises(ValueError, match="kl"):
        window.add(loss=1.0)


def _two_ranks(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        window = LogWindow(("loss",), "cpu")
        for value in ([1.0, 2.0], [3.0, float("nan")])[rank]:
            window.add(loss=value)
        results[rank] = window.flush().means["loss"]
    finally:
        dist.destroy_process_group()


def test_flush_averages_over_every_rank(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_two_ranks, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    assert dict(results) == {0: 2.0, 1: 2.0}  # (1 + 2 + 3) / 3 finite values, the same on both ranks


@pytest.mark.parametrize("use_gpu", [False, True])
def test_process_group_has_a_backend_for_cpu_tensors(use_gpu):
    """NCCL alone reduces only CUDA tensors: a CPU collective (ours or a library's) on a GPU worker
    failed with "No backend type associated with device type cpu"."""
    backend = process_group_backend(ScalingSettings(use_gpu=use_gpu))
    devices = BackendConfig(Backend(backend)).get_device_backend_map()
    assert devices["cpu"] == "gloo"
    assert devices["cuda"] == ("nccl" if use_gpu else "gloo")
