"""The progress fragment every long stage puts in its log lines: count out of total, rate, ETA.

    progress = Progress(total=1300, unit="steps", done=400)  # a resumed run: rate and ETA count new work only
    log.info("%s | loss %.4f", progress.line(420), loss)     # "420/1300 steps (32%), 2.0 steps/s, ETA 0:07:20"
"""

from __future__ import annotations

import time
from typing import Callable


def format_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int, unit: str, done: int = 0, clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.unit, self.first, self.clock = total, unit, done, clock
        self.started = clock()

    def rate(self, done: int) -> float:
        """Units per second since this Progress was made."""
        return (done - self.first) / max(self.clock() - self.started, 1e-9)

    def line(self, done: int) -> str:
        rate = self.rate(done)
        eta = format_duration((self.total - done) / rate) if rate > 0 else "?"
        percent = 100.0 * done / self.total if self.total else 100.0
        return f"{done}/{self.total} {self.unit} ({percent:.0f}%), {rate:.3g} {self.unit}/s, ETA {eta}"
