"""How many bytes does each training rank read? FeatureLoader epochs over W ranks, bytes counted at the file.

Writes synthetic feature shards (bench/loader.py's writer: the real schema and manifest), then runs one
whole epoch of the loader for every rank r < W, reading through a filesystem that counts the bytes each
file read returns, and prints per W:

    bytes read per rank (min / max) / bytes of all shards      (ideal: 1/W; a rank that reads everything: 1.0)

It counts what pyarrow asks the storage for (footers, column chunks), as an object store would bill it.
Figures only, never a time. Needs torch and pyarrow (no Ray).

    python -m bench.loader_io
    python -m bench.loader_io --rows 4096 --shards 16 --world-sizes 2,4,8 --json io.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from bench.loader import LATENT_TO_PIXELS, write_synthetic_features
from model.config import PRESETS
from pipelines.data import schema
from pipelines.data.loader import FeatureLoader, LoaderConfig

PROTOCOL = "countingfile"


class _CountedFile:
    """A file whose reads add their byte counts to `counter`."""

    def __init__(self, f: Any, counter: "ByteCounter") -> None:
        self._f, self._counter = f, counter

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._counter.add(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        n = self._f.readinto(buffer)
        self._counter.add(n or 0)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> "_CountedFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


class ByteCounter:
    def __init__(self) -> None:
        self.bytes, self._lock = 0, threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes += n


class CountingFileSystem(LocalFileSystem):
    """The local disk under the `countingfile://` protocol, counting the bytes read from Parquet shards."""

    protocol = PROTOCOL
    root_marker = "/"
    counter = ByteCounter()  # replaced per measurement by `measure`

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        path = str(path)
        if path.startswith(f"{PROTOCOL}://"):
            path = path[len(PROTOCOL) + 3:]
        return super()._strip_protocol(path)

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        f = super()._open(path, mode, *args, **kwargs)
        if "r" in mode and str(path).endswith(".parquet"):
            return _CountedFile(f, type(self).counter)
        return f


def measure(directory: str, world_size: int, batch: int, window_shards: int) -> list[int]:
    """Bytes each rank reads in one epoch (epoch 0), ranks one after the other."""
    fsspec.register_implementation(PROTOCOL, CountingFileSystem, clobber=True)
    per_rank = []
    for rank in range(world_size):
        CountingFileSystem.counter = ByteCounter()
        loader = FeatureLoader(f"{PROTOCOL}://{directory}", LoaderConfig(batch_size=batch, window_shards=window_shards,
                                                                        prefetch=False),
                               rank=rank, world_size=world_size)
        for _ in loader:
            pass
        per_rank.append(CountingFileSystem.counter.bytes)
    return per_rank


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="U-Net preset: the feature shapes")
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--batch", type=int, default=8, help="rows per rank per step")
    p.add_argument("--window-shards", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16, help="text tokens per caption")
    p.add_argument("--world-sizes", default="2,4", help="comma-separated W to measure")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = PRESETS[args.preset]
    shapes = schema.FeatureShapes((cfg.in_channels, cfg.sample_size, cfg.sample_size), (args.tokens, cfg.context_dim),
                                  image_size=cfg.sample_size * LATENT_TO_PIXELS)
    result: dict[str, Any] = {"preset": args.preset, "rows": args.rows, "shards": args.shards, "batch": args.batch,
                              "window_shards": args.window_shards, "world_sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-loader-io-") as tmp:
        write_synthetic_features(Path(tmp), shapes, args.rows, args.shards)
        total = sum(p.stat().st_size for p in Path(tmp).glob("*.parquet"))
        result["shard_bytes"] = total
        print(f"{args.shards} shards, {args.rows} rows, {total / 2**20:.1f} MiB of Parquet")
        for world_size in (int(w) for w in args.world_sizes.split(",")):
            per_rank = measure(tmp, world_size, args.batch, args.window_shards)
            figures = {"bytes_per_rank": per_rank, "max_fraction": max(per_rank) / total,
                       "min_fraction": min(per_rank) / total, "ideal_fraction": 1 / world_size}
            result["world_sizes"][str(world_size)] = figures
            print(f"  W={world_size}: per rank {min(per_rank) / 2**20:.2f}-{max(per_rank) / 2**20:.2f} MiB = "
                  f"{figures['min_fraction']:.3f}-{figures['max_fraction']:.3f} of all shards (ideal {1 / world_size:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
