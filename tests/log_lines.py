"""What a run printed, as a user reads it: captured around a call, then checked for library noise.

    with captured_output() as output:      # this process's stdout and stderr, Ray workers' forwarded lines included
        run_training(cfg)
    assert library_noise(output.getvalue()) == {}

The lines are those users met in the demo's logs (issue 19): each is made by a library and says nothing a
user can act on. The repeated-line check catches a new source of the same kind.
"""

from __future__ import annotations

import collections
import contextlib
import io
import re
import sys
from typing import Iterator

NOISE = (
    "Failed to query Ray Train Controller actor state",  # Ray Train's placement group cleaner
    "Parsing model identifier", "No pretrained weights loaded", "Instantiating model architecture",  # open_clip
    "Reporting training result", "Checkpoint successfully created",  # Ray Train, per checkpoint and rank
    "built successfully", "Loading extension module",  # DeepSpeed's shm op, torch's extension loader
    "No CUDA runtime is found",  # torch.utils.cpp_extension on CPU
    "all_gather_into_tensor` is deprecated",  # torch, about DeepSpeed's call
    "`accelerate` was not found",  # diffusers
    "Found multiple active Ray instances",  # Ray's State API guessing the cluster, in a Ray Train helper actor
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RAY_PREFIX = re.compile(r"^\((\w+) pid=\d+(?:, ip=[\d.]+)?\) ")
RAY_REPEATED = re.compile(r"\s*\[repeated (\d+)x across cluster\].*$")
# The progress fragment of pipelines/core/progress.py
PROGRESS = re.compile(r"\d+/\d+ \w+ \(\d+%\), [\d.e+-]+ \w+/s, ETA (\d+:\d\d:\d\d|\?)")


class _Tee(io.TextIOBase):
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def captured_output() -> Iterator[io.StringIO]:
    """This process's sys.stdout and sys.stderr inside the block, still passed on. Ray's driver prints its
    workers' lines to whatever sys.stdout / sys.stderr is at the time, so they are caught too (those that
    arrive before the block ends)."""
    output = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, output)), contextlib.redirect_stderr(_Tee(sys.stderr, output)):
        yield output


def plain_lines(text: str) -> list[tuple[str, int]]:
    """(line without colour codes and Ray's "(Actor pid=N)" prefix, how many times Ray saw it: 1 + the
    "[repeated Nx across cluster]" of its log deduplication)."""
    lines = []
    for raw in ANSI.sub("", text).splitlines():
        repeated = RAY_REPEATED.search(raw)
        line = RAY_PREFIX.sub("", RAY_REPEATED.sub("", raw)).rstrip()
        if line:
            lines.append((line, 1 + (int(repeated.group(1)) if repeated else 0)))
    return lines


def library_noise(text: str) -> dict[str, int]:
    """{NOISE phrase: lines with it}, for the phrases found."""
    found = collections.Counter(phrase for line, n in plain_lines(text) for phrase in NOISE if phrase in line
                                for _ in range(n))
    return dict(found)


def repeated_lines(text: str, most: int) -> dict[str, int]:
    """Lines that are not progress lines and occur more than `most` times once their numbers are masked
    (a polling warning, a per-rank notice), with their counts. Traceback bodies (indented) are left out:
    two identical tracebacks are one event each."""
    counts = collections.Counter()
    for line, n in plain_lines(text):
        if not line.startswith((" ", "\t")) and not PROGRESS.search(line):
            counts[re.sub(r"\d+", "#", line)] += n
    return {line: n for line, n in counts.items() if n > most}


def progress_lines(text: str) -> list[str]:
    return [line for line, _ in plain_lines(text) if PROGRESS.search(line)]
