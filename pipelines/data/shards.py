"""WebDataset shards as every stage reads them: which tars a folder holds, their samples, their images.

    for shard in list_tar_shards(input_dir):                          # sorted: positions are shard indices
        with storage.open_input(storage.join(input_dir, shard.name)) as stream:
            for sample in iter_tar_samples(stream):                 # {"__key__", "__mtime__", "jpg": ..., "txt": ...}
                image = decode_rgb(image_bytes(sample))             # pipelines/core/images: PIL RGB, upright

Two listings, because two producers mark a finished shard differently: the download stage (img2dataset)
writes NNNNN_stats.json once a tar is complete (download_shards), while the filter stage commits its whole
output folder at once, so every tar in it counts (list_tar_shards).
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from typing import IO, Any, Iterator

from pipelines.core import storage
from pipelines.core.config import ConfigError

KEY_FIELD = "__key__"
MTIME_FIELD = "__mtime__"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a sample's image: the first of these it has

# WebDataset rule: the key is the member path up to the first dot of its file name.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def iter_tar_samples(stream: IO[bytes]) -> Iterator[dict[str, Any]]:
    """Samples of one tar in file order: {"__key__", "__mtime__", ext: bytes}.

    Consecutive members with one key form a sample; a key that comes back later is a new sample
    (callers decide what a repeat means). Each sample is yielded before reading on, so damage
    further down the tar (tarfile.TarError / OSError) cannot lose it. Within a sample the first
    member of an extension wins; members without an extension are ignored.
    """
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        current: dict[str, Any] | None = None
        for member in tar:
            match = _MEMBER_NAME.match(member.name) if member.isreg() else None
            if not match:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if current is None or current[KEY_FIELD] != key:
                if current is not None:
                    yield current
                current = {KEY_FIELD: key, MTIME_FIELD: int(member.mtime)}
            current.setdefault(ext, tar.extractfile(member).read())
        if current is not None:
            yield current


def image_bytes(sample: dict[str, Any]) -> bytes | None:
    """The encoded image of a sample, or None when it has none."""
    return next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)


@dataclass(frozen=True)
class ShardFile:
    name: str  # NNNNN.tar, relative to its folder
    size: int
    mtime_ns: int


def _tars(input_dir: str) -> tuple[list[ShardFile], set[str]]:
    if not storage.is_dir(input_dir):
        raise ConfigError(f"input_dir {input_dir} is not a directory")
    files = storage.list_files(input_dir)  # hidden files (others' temporaries) are left out
    tars = [ShardFile(name, info.size, info.mtime_ns or 0) for name, info in sorted(files.items())
            if name.endswith(".tar")]
    return tars, set(files)


def list_tar_shards(input_dir: str) -> list[ShardFile]:
    """Every *.tar directly in input_dir, sorted by name (a committed folder, e.g. the filter stage's)."""
    return _tars(input_dir)[0]


@dataclass(frozen=True)
class DownloadShards:
    finished: tuple[ShardFile, ...]  # sorted by name
    unfinished: tuple[str, ...]  # tars without their _stats.json: still being written, or crashed


def download_shards(input_dir: str) -> DownloadShards:
    """The download stage's tars, split by whether img2dataset finished them (NNNNN_stats.json exists)."""
    tars, names = _tars(input_dir)
    done = [t for t in tars if f"{t.name[:-len('.tar')]}_stats.json" in names]
    return DownloadShards(tuple(done), tuple(t.name for t in tars if t not in done))


def tar_shard_names(input_dir: str) -> list[str]:
    """Names of list_tar_shards(input_dir): their positions are the shard indices downstream."""
    return [shard.name for shard in list_tar_shards(input_dir)]
