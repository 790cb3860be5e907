"""Pass 2, the decision (driver): global deduplication over every record in a fixed order, so the
result does not depend on how Ray scheduled the scan."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipelines.data.filter.config import DedupConfig


class NearDuplicateIndex:
    """Finds a kept row within `max_hamming` dHash bits (and `max_color_diff` thumbnail levels)
    without comparing all pairs: the 64 bits are cut into max_hamming + 1 bands, and two hashes
    that close agree exactly on at least one band (pigeonhole), so only rows sharing a band value
    are compared, vectorised."""

    def __init__(self, max_hamming: int, max_color_diff: int, capacity: int = 1024) -> None:
        self.max_hamming, self.max_color_diff = max_hamming, max_color_diff
        bands = max_hamming + 1
        edges = [round(64 * i / bands) for i in range(bands + 1)]
        self.bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]
        self.buckets: list[dict[int, list[int]]] = [{} for _ in self.bands]
        self.hashes = np.zeros(capacity, np.uint64)
        self.thumbs = np.zeros((capacity, 192), np.int16)
        self.size = 0

    def _band_values(self, h: int) -> list[int]:
        return [(h >> shift) & mask for shift, mask in self.bands]

    def find(self, h: int, thumb: bytes) -> bool:
        """Is a near duplicate of (h, thumb) already kept?"""
        lists = [b[v] for b, v in zip(self.buckets, self._band_values(h)) if v in b]
        if not lists:
            return False
        cand = np.unique(np.concatenate(lists))
        close = cand[np.bitwise_count(self.hashes[cand] ^ np.uint64(h)) <= self.max_hamming]
        if not len(close):
            return False
        pixels = np.frombuffer(thumb, np.uint8).astype(np.int16)
        return bool((np.abs(self.thumbs[close] - pixels).max(axis=1) <= self.max_color_diff).any())

    def add(self, h: int, thumb: bytes) -> None:
        if self.size == len(self.hashes):  # grow by doubling
            self.hashes = np.concatenate([self.hashes, np.zeros_like(self.hashes)])
            self.thumbs = np.concatenate([self.thumbs, np.zeros_like(self.thumbs)])
        j, self.size = self.size, self.size + 1
        self.hashes[j] = h
        self.thumbs[j] = np.frombuffer(thumb, np.uint8)
        for bucket, value in zip(self.buckets, self._band_values(h)):
            bucket.setdefault(value, []).append(j)


def decide(records: pa.Table, dedup: DedupConfig) -> list[str]:
    """Final reason per record ("" = keep). Rows are visited by (key, shard, idx), so the first
    of every duplicate group in that order is the one kept, whatever the scan order was."""
    keys = records.column("key").to_pylist()
    shards = records.column("shard").to_pylist()
    idxs = records.column("idx").to_pylist()
    reasons = records.column("reason").to_pylist()
    shas = records.column("sha256").to_pylist()
    hashes = records.column("dhash").to_pylist()
    thumbs = records.column("thumb").to_pylist()
    near = NearDuplicateIndex(dedup.max_hamming, dedup.max_color_diff) if dedup.near else None
    seen_keys: set[str] = set()
    seen_sha: set[bytes] = set()
    for i in sorted(range(len(keys)), key=lambda i: (keys[i], shards[i], idxs[i])):
        if reasons[i]:
            continue
        if keys[i] in seen_keys:
            reasons[i] = "duplicate_key"
        elif dedup.exact and shas[i] in seen_sha:
            reasons[i] = "exact_duplicate"
        elif near is not None and near.find(hashes[i], thumbs[i]):
            reasons[i] = "near_duplicate"
        else:
            seen_keys.add(keys[i])
            seen_sha.add(shas[i])
            if near is not None:
                near.add(hashes[i], thumbs[i])
    return reasons
