"""Per-step training scalars averaged over a log window and over every rank, with one collective.

    window = LogWindow(("loss", "recon"), device)
    window.add(loss=loss.detach(), recon=recon)   # tensors stay where they are: no host sync per step
    stats = window.flush()                        # one all-reduce on `device`, one host sync, then reset
    stats.means["loss"], stats.steps, stats.seconds

Why on `device`: an NCCL process group has no CPU backend, so a collective on a CPU tensor fails on
GPUs (gloo on CPU accepts either). Why tensors: `float(loss)` every step would stall the host until
the GPU finishes that step; here the host syncs once per log line.

A non-finite value (a skipped step's loss) is left out of its mean instead of poisoning it; a name
with no finite value on any rank averages to nan. Every rank must call flush() at the same steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WindowStats:
    means: dict[str, float]  # over the finite values of every rank and step of the window
    steps: int  # this rank's steps in the window
    seconds: float  # wall time of the window


class LogWindow:
    def __init__(self, names: Sequence[str], device: torch.device | str,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.names, self.device, self.clock = tuple(names), torch.device(device), clock
        self._reset(clock())

    def _reset(self, now: float) -> None:
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)  # (N,)
        self.counts = torch.zeros_like(self.sums)  # (N,) finite values added
        self.steps, self.started = 0, now

    def add(self, **values: torch.Tensor | float) -> None:
        if set(values) != set(self.names):
            raise ValueError(f"LogWindow.add needs exactly {sorted(self.names)}, got {sorted(values)}")
        stacked = torch.stack([torch.as_tensor(values[name], dtype=torch.float64).to(self.device).reshape(())
                               for name in self.names])  # (N,)
        finite = torch.isfinite(stacked)
        self.sums += torch.where(finite, stacked, torch.zeros_like(stacked))
        self.counts += finite
        self.steps += 1

    def flush(self) -> WindowStats:
        totals = torch.cat([self.sums, self.counts])  # (2N,)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        values = totals.tolist()  # the one host sync of the window
        n = len(self.names)
        means = {name: values[i] / values[n + i] if values[n + i] else float("nan")
                 for i, name in enumerate(self.names)}
        now = self.clock()
        stats = WindowStats(means, self.steps, max(now - self.started, 1e-9))
        self._reset(now)
        return stats
