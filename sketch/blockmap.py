"""Exact block maps: the distinct non-zero block contents of an image, sorted, with counts.

A block map holds, for every distinct non-zero digest of an image, how often it occurs and the
index of its first block. Digests are kept as ``(u, 2)`` uint64 *keys*: the digest's two 8-byte
halves read big-endian, so sorting keys lexicographically is sorting digests bytewise. All-zero
blocks are kept as a count only: every host has them and they never cross the WAN.

Set operations run on sorted key arrays with ``np.searchsorted``: membership of ``q`` sorted
queries in ``s`` sorted keys costs one binary search each, cache-friendly because both are
sorted, with no Python loop except over genuine 64-bit prefix collisions (never seen in
practice, but handled so the result stays exact).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import numpy as np

from .digests import DIGEST_SIZE, ImageDigests

KEY_DTYPE = np.dtype(np.uint64)
# Below this many keys numpy's sort is as fast as the C one's fixed cost (its 65,536 buckets).
SMALL_SORT = 4096

try:
    from . import _blockhash
except ImportError:  # no C compiler at install time: numpy sorts
    _blockhash = None


def digest_keys(digests: np.ndarray) -> np.ndarray:
    """``(n, 16)`` uint8 digests -> ``(n, 2)`` native uint64 keys ordered like the digest bytes."""
    digests = np.ascontiguousarray(digests, dtype=np.uint8).reshape(-1, DIGEST_SIZE)
    return digests.view(">u8").astype(KEY_DTYPE)


def key_digests(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`digest_keys`."""
    return np.ascontiguousarray(keys, dtype=KEY_DTYPE).astype(">u8").view(np.uint8).reshape(-1, DIGEST_SIZE)


def lexsort_keys(keys: np.ndarray) -> np.ndarray:
    """A stable order sorting ``(n, 2)`` keys lexicographically."""
    return _sort(keys, with_keys=False)[0]


def sort_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`lexsort_keys`'s order and the keys in that order."""
    return _sort(keys, with_keys=True)


def _sort(keys: np.ndarray, with_keys: bool) -> tuple[np.ndarray, np.ndarray | None]:
    if _blockhash is not None and len(keys) > SMALL_SORT:
        # The C extension buckets the uniform digests by their top 16 bits and sorts each small
        # bucket in cache (docs/design.md "Sorting digests").
        order = np.empty(len(keys), dtype=np.int64)
        sorted_keys = np.empty((len(keys), 2), dtype=KEY_DTYPE) if with_keys else None
        _blockhash.sort_keys(np.ascontiguousarray(keys, dtype=KEY_DTYPE), order,
                             *(() if sorted_keys is None else (sorted_keys,)))
        return order, sorted_keys
    # Sorting by the first half alone is 2x faster than ``np.lexsort``; a full lexsort is only
    # needed when two different digests share their first 8 bytes.
    order = np.argsort(keys[:, 0], kind="stable")
    high = keys[order, 0]
    ties = high[1:] == high[:-1]
    if ties.any():
        low = keys[order, 1]
        if (ties & (low[1:] != low[:-1])).any():
            order = np.lexsort((keys[:, 1], keys[:, 0]))
    return order, keys[order] if with_keys else None


def _run_starts(sorted_keys: np.ndarray) -> np.ndarray:
    if len(sorted_keys) == 0:
        return np.zeros(0, dtype=np.int64)
    differs = np.any(sorted_keys[1:] != sorted_keys[:-1], axis=1)
    return np.concatenate(([0], np.flatnonzero(differs) + 1))


@dataclass
class BlockMap:
    """Distinct non-zero contents of one image (or a union of images)."""

    block_size: int
    total_blocks: int
    zero_blocks: int
    keys: np.ndarray  # (u, 2) uint64, sorted, unique
    counts: np.ndarray  # (u,) uint32: occurrences in the image
    first: np.ndarray  # (u,) uint64: index of the first block with this content

    @property
    def distinct_nonzero(self) -> int:
        return len(self.keys)

    @property
    def unique_blocks(self) -> int:
        """Distinct contents, the all-zero block counting as one when present."""
        return len(self.keys) + (1 if self.zero_blocks else 0)

    @classmethod
    def from_digests(cls, image: ImageDigests) -> BlockMap:
        return index_digests(image).block_map


@dataclass
class IndexedDigests:
    """An image's block map with, for every non-zero block, the row of its content in the map."""

    block_map: BlockMap
    nonzero: np.ndarray  # (m,) int64: the non-zero blocks, ascending
    row: np.ndarray  # (m,) int64: row of block ``nonzero[i]`` in ``block_map.keys``


def index_digests(image: ImageDigests) -> IndexedDigests:
    """One sort of an image's digests, shared by its rank query and its manifest's plan."""
    nonzero_index = image.nonzero
    order, sorted_keys = sort_keys(digest_keys(image.nonzero_digests))
    starts = _run_starts(sorted_keys)
    counts = np.diff(np.append(starts, len(sorted_keys))).astype(np.uint32)
    # The sort is stable, so the first row of each run is the earliest block.
    first = nonzero_index[order[starts]].astype(np.uint64)
    is_start = np.zeros(len(order), dtype=np.int64)
    is_start[starts] = 1
    row = np.empty(len(order), dtype=np.int64)
    row[order] = np.cumsum(is_start) - 1
    block_map = BlockMap(image.block_size, image.total_blocks, image.zero_blocks,
                         np.ascontiguousarray(sorted_keys[starts]), counts, first)
    return IndexedDigests(block_map, nonzero_index, row)


_lookups: contextvars.ContextVar[list | None] = contextvars.ContextVar("blocksketch_lookups", default=None)


@contextlib.contextmanager
def shared_lookups():
    """Within this block, :func:`find_keys` remembers its answers for the very same two arrays.

    ``send`` looks the image's keys up in the winner's block maps three times (rank's exact pass,
    the best single image, the manifest's plan); the memo answers the later ones (~15 ms each on
    a real 1 GiB image at 512 B). Answers are read-only arrays; the memo and the arrays it holds
    live only as long as the block.
    """
    token = _lookups.set([])
    try:
        yield
    finally:
        _lookups.reset(token)


def find_keys(sorted_keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """For each ``(q, 2)`` query key, its row in the sorted unique ``sorted_keys``, or -1.

    Exact. Fastest when ``queries`` are sorted too. Inside :func:`shared_lookups` the answer may
    be a remembered, read-only array.
    """
    memo = _lookups.get()
    if memo is not None:
        for keys, asked, answer in memo:
            if keys is sorted_keys and asked is queries:
                return answer
    found = _find_keys(sorted_keys, queries)
    if memo is not None:
        found.flags.writeable = False
        memo.append((sorted_keys, queries, found))
    return found


def _find_keys(sorted_keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    found = np.full(len(queries), -1, dtype=np.int64)
    if len(sorted_keys) == 0 or len(queries) == 0:
        return found
    high = sorted_keys[:, 0]
    index = np.searchsorted(high, queries[:, 0], side="left")
    np.minimum(index, len(high) - 1, out=index)
    same_high = high[index] == queries[:, 0]
    hit = same_high & (sorted_keys[index, 1] == queries[:, 1])
    found[hit] = index[hit]
    # Rare: other digests with the same first 8 bytes follow the row found.
    for position in np.flatnonzero(same_high & ~hit).tolist():
        at = int(index[position])
        wanted_high, wanted_low = queries[position]
        while at < len(high) and high[at] == wanted_high:
            if sorted_keys[at, 1] == wanted_low:
                found[position] = at
                break
            at += 1
    return found


def contains(sorted_keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Boolean mask: which ``(q, 2)`` query keys occur in the sorted unique ``sorted_keys``."""
    return find_keys(sorted_keys, queries) >= 0


def union_keys(key_arrays: list[np.ndarray]) -> np.ndarray:
    """Sorted unique union of several sorted key arrays."""
    arrays = [k for k in key_arrays if len(k)]
    if not arrays:
        return np.zeros((0, 2), dtype=KEY_DTYPE)
    if len(arrays) == 1:
        return arrays[0]
    merged = np.concatenate(arrays)
    merged = merged[lexsort_keys(merged)]
    return np.ascontiguousarray(merged[_run_starts(merged)])
