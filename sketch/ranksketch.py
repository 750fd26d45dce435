"""A fixed-size per-host ranking sketch: a Bloom filter over a content-defined sample of digests.

A host's full Bloom filter grows with its images (~1 MiB for a few GiB at 4 KiB blocks), too much
to hold and AND for thousands of hosts per query. The ranking sketch has the same size on every
host (``m_bits``, default 2^18 bits = 32 KiB) and holds:

- the **sample**: every distinct non-zero key whose first word is below ``2^(64 - shift)``. The
  sample is chosen by content, so a query samples its own digests the same way and finds exactly
  the shared ones that a host sampled (Lillibridge et al., "Sparse indexing", FAST'09, sample
  "hooks" the same way). ``shift`` is the smallest that fits the filter's capacity: small hosts
  keep everything (shift 0), big ones a 1/2^shift share; nested samples (a key kept at shift
  ``s`` is kept at every smaller shift) let one query serve hosts of every shift;
- the **heavy** keys: every key occurring at least ``heavy_threshold`` times over the host's
  images, sampled or not. A query's high-count digests dominate the duplicates-counted ratio's
  variance, so the query probes them all instead of estimating them from the sample.

Bits are set by :func:`sketch.bloom.bit_positions` (``h mod m``, m a power of two), so a sketch
folds or tiles to another power-of-two size exactly like the index's filters.

Byte format (version 1, little-endian), 56-byte header then the bitmap:

====== ==== =================================================================================
offset size field
====== ==== =================================================================================
0      4    magic ``b"BSRK"``
4      2    version, ``1``
6      1    ``k``: hash functions
7      1    ``shift``: sample keys have first key word ``< 2^(64 - shift)``; 0 keeps every key
8      4    ``heavy_threshold``: keys occurring at least this often are all in the filter
12     4    reserved, zero
16     8    ``m_bits``: filter bits, a power of two >= 64
24     8    ``distinct``: distinct non-zero keys of the host (all, not only those kept)
32     8    ``sampled``: keys of the sample
40     8    ``heavy``: heavy keys outside the sample
48     8    ``popcount``: bits set in the bitmap
56     m/8  the bitmap, bit ``i`` in byte ``i // 8`` under mask ``0x80 >> (i % 8)`` (MSB first)
====== ==== =================================================================================
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from .blockmap import KEY_DTYPE, BlockMap, lexsort_keys
from .errors import FormatError, UsageError

MAGIC = b"BSRK"
VERSION = 1
_HEADER = struct.Struct("<4sHBBII QQQQQ")
HEADER_SIZE = _HEADER.size  # 56
MAX_SHIFT = 64


@dataclass(frozen=True)
class RankParams:
    """How ranking sketches are built: one geometry for a whole fleet."""

    m_bits: int = 1 << 18
    k: int = 4
    # False-positive rate at which the sample stops growing; the estimate corrects for the
    # actual rate (known from the fill), so this trades memory against a little variance.
    fp_rate: float = 0.02
    heavy_threshold: int = 16
    # Heavy keys may use at most this share of the capacity; beyond it only the most frequent stay.
    heavy_share: float = 0.5

    def __post_init__(self) -> None:
        if self.m_bits < 64 or self.m_bits & (self.m_bits - 1):
            raise UsageError(f"ranking sketch size {self.m_bits} bits is not a power of two >= 64")
        if not 1 <= self.k <= 32:
            raise UsageError(f"ranking sketch k={self.k} must be from 1 to 32")
        if not 0 < self.fp_rate < 1 or not 0 < self.heavy_share <= 1 or self.heavy_threshold < 2:
            raise UsageError("ranking sketch fp_rate and heavy_share must be in (0, 1], heavy_threshold >= 2")

    @property
    def capacity(self) -> int:
        return capacity_of(self.m_bits, self.k, self.fp_rate)


def capacity_of(m_bits: int, k: int, fp_rate: float) -> int:
    """Keys an ``m_bits``, ``k`` Bloom filter holds at ``fp_rate``: ``n = -(m/k) ln(1 - fp^(1/k))``."""
    return int(-(m_bits / k) * math.log1p(-(fp_rate ** (1 / k))))


def shift_threshold(shift: int) -> np.uint64 | None:
    """The first-word bound of the sample at ``shift``; None at shift 0 (every key)."""
    return None if shift <= 0 else np.uint64(1 << (64 - shift)) if shift < 64 else np.uint64(0)


def sample_prefix(sorted_words: np.ndarray, shift: int) -> int:
    """How many of ``sorted_words`` (first key words, ascending) fall in the sample at ``shift``."""
    bound = shift_threshold(shift)
    return len(sorted_words) if bound is None else int(np.searchsorted(sorted_words, bound, side="left"))


def sample_sizes(sorted_words: np.ndarray) -> np.ndarray:
    """Keys in the sample at every shift 0..64 (``(65,)`` int64, non-increasing)."""
    bounds = np.array([1 << (64 - s) for s in range(1, 64)], dtype=np.uint64)
    inner = np.searchsorted(sorted_words, bounds, side="left")
    return np.concatenate(([len(sorted_words)], inner, [0])).astype(np.int64)


def choose_shift(sizes: np.ndarray, heavy_outside: np.ndarray, capacity: int, min_shift: int = 0) -> int:
    """The smallest shift >= ``min_shift`` whose sample (``sizes[s]`` keys) plus the heavy keys
    outside it (``heavy_outside[s]``) fit ``capacity``."""
    fits = np.flatnonzero(sizes[min_shift:] + heavy_outside[min_shift:] <= capacity)
    return int(fits[0]) + min_shift if len(fits) else MAX_SHIFT


@dataclass
class RankSketch:
    """One host's ranking sketch (see the module docstring)."""

    m_bits: int
    k: int
    shift: int
    heavy_threshold: int
    distinct: int
    sampled: int
    heavy: int
    bits: np.ndarray  # (m_bits // 8,) uint8, MSB first

    @property
    def popcount(self) -> int:
        return int(np.bitwise_count(self.bits).sum(dtype=np.int64))

    @property
    def fp_rate(self) -> float:
        """The probability that an absent key looks present: ``(X/m)^k`` for X bits set."""
        return (self.popcount / self.m_bits) ** self.k

    @property
    def size_bytes(self) -> int:
        return HEADER_SIZE + self.m_bits // 8

    @classmethod
    def build(cls, keys: np.ndarray, counts: np.ndarray, params: RankParams = RankParams(), *,
              min_shift: int = 0, distinct: int | None = None) -> RankSketch:
        """The sketch of a host whose images hold the sorted unique ``keys`` ``counts`` times in all.

        A caller that already sampled may pass only the keys at shift ``min_shift`` or above plus
        every key of count >= ``heavy_threshold``, with the host's full ``distinct`` count: the
        sketch is the same as from all keys whenever the chosen shift is at least ``min_shift``.
        """
        from .bloom import BloomFilter

        keys = np.ascontiguousarray(keys, dtype=KEY_DTYPE).reshape(-1, 2)
        counts = np.asarray(counts).reshape(-1)
        if len(counts) != len(keys):
            raise UsageError(f"{len(keys)} keys but {len(counts)} counts")
        words = keys[:, 0]
        capacity = params.capacity
        heavy_mask = counts >= params.heavy_threshold
        threshold = params.heavy_threshold
        heavy_cap = int(capacity * params.heavy_share)
        heavy_counts = counts[heavy_mask]
        if len(heavy_counts) > heavy_cap:
            # Keep the most frequent: raise the threshold just above the (heavy_cap + 1)-th largest count.
            cut = len(heavy_counts) - heavy_cap - 1
            threshold = int(np.partition(heavy_counts, cut)[cut]) + 1
            heavy_mask = counts >= threshold
        heavy_index = np.flatnonzero(heavy_mask)
        sizes = sample_sizes(words)
        # Heavy keys outside the sample at each shift: heavy keys sit at sorted positions >= prefix.
        heavy_outside = len(heavy_index) - np.searchsorted(heavy_index, sizes, side="left")
        shift = choose_shift(sizes, heavy_outside, capacity, min_shift)
        sampled = int(sizes[shift])
        extra = heavy_index[heavy_index >= sampled]
        m_bits = params.m_bits
        # A host whose every key fits a smaller filter stores that one; tiled back to m_bits it
        # answers exactly the same (bit j of the tiling is bit j mod m), at the same FP rate. It
        # stays at 1/16 of the target FP rate: the fleet matrix holds m_bits per host anyway.
        while shift == 0 and m_bits > 64 and capacity_of(m_bits // 2, params.k, params.fp_rate / 16) >= sampled:
            m_bits //= 2
        bloom = BloomFilter.create(m_bits, params.k)
        bloom.add(keys[:sampled])
        bloom.add(keys[extra])
        return cls(m_bits, params.k, shift, min(threshold, 2**32 - 1), len(keys) if distinct is None else distinct,
                   sampled, len(extra),
                   np.asarray(bloom.bits, dtype=np.uint8))

    @classmethod
    def from_block_maps(cls, maps: list[BlockMap], params: RankParams = RankParams()) -> RankSketch:
        """The sketch of a host holding the images of ``maps``."""
        keys, counts = union_with_counts(maps)
        return cls.build(keys, counts, params)

    def resized(self, m_bits: int) -> RankSketch:
        """This sketch at another power-of-two size: folded (OR of halves) or tiled (repeated)."""
        if m_bits == self.m_bits:
            return self
        if m_bits < 64 or m_bits & (m_bits - 1):
            raise UsageError(f"ranking sketch size {m_bits} bits is not a power of two >= 64")
        bits = self.bits
        if m_bits < self.m_bits:
            bits = np.bitwise_or.reduce(bits.reshape(self.m_bits // m_bits, m_bits // 8), axis=0)
        else:
            bits = np.tile(bits, m_bits // self.m_bits)
        return RankSketch(m_bits, self.k, self.shift, self.heavy_threshold, self.distinct, self.sampled, self.heavy,
                          bits)

    def to_bytes(self) -> bytes:
        header = _HEADER.pack(MAGIC, VERSION, self.k, self.shift, self.heavy_threshold, 0, self.m_bits,
                              self.distinct, self.sampled, self.heavy, self.popcount)
        return header + self.bits.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "ranking sketch") -> RankSketch:
        if len(data) < HEADER_SIZE:
            raise FormatError(f"{what} is corrupt (only {len(data)} bytes)")
        magic, version, k, shift, heavy_threshold, _, m_bits, distinct, sampled, heavy, popcount = \
            _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise FormatError(f"{what} is not a ranking sketch (bad magic)")
        if version != VERSION:
            raise FormatError(f"{what} has unknown version {version} (this blocksketch reads {VERSION}); "
                              "upgrade blocksketch or re-index")
        if m_bits < 64 or m_bits & (m_bits - 1) or len(data) != HEADER_SIZE + m_bits // 8 or not k \
                or shift > MAX_SHIFT or sampled + heavy > distinct:
            raise FormatError(f"{what} is corrupt (impossible header or length)")
        bits = np.frombuffer(data, dtype=np.uint8, offset=HEADER_SIZE).copy()
        sketch = cls(m_bits, k, shift, heavy_threshold, distinct, sampled, heavy, bits)
        if sketch.popcount != popcount:
            raise FormatError(f"{what} is corrupt (bit count differs from its header)")
        return sketch


def union_with_counts(maps: list[BlockMap]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys of several block maps and each key's count summed over them."""
    maps = [m for m in maps if len(m.keys)]
    if not maps:
        return np.zeros((0, 2), dtype=KEY_DTYPE), np.zeros(0, dtype=np.uint64)
    if len(maps) == 1:
        return maps[0].keys, maps[0].counts.astype(np.uint64)
    keys = np.concatenate([m.keys for m in maps])
    counts = np.concatenate([m.counts.astype(np.uint64) for m in maps])
    order = lexsort_keys(keys)
    keys, counts = keys[order], counts[order]
    starts = np.concatenate(([0], np.flatnonzero(np.any(keys[1:] != keys[:-1], axis=1)) + 1))
    return np.ascontiguousarray(keys[starts]), np.add.reduceat(counts, starts)
