"""Reading WebDataset tars sample by sample: the one reader for every stage that consumes shards."""

from __future__ import annotations

import re
import tarfile
from typing import IO, Any, Iterator

KEY_FIELD = "__key__"
MTIME_FIELD = "__mtime__"

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
