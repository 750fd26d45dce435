"""Bloom filters over block digests, kept as raw bitmaps that Redis can AND, OR and count.

Hashing. A key is a digest as a ``(2,)`` uint64 pair from :func:`sketch.blockmap.digest_keys`
(the digest's bytes 0-7 and 8-15, each read big-endian). MD5 digests are already uniform, so no
further hashing is done: the ``k`` bit positions of a key come from its two halves by double
hashing (Kirsch & Mitzenmacher 2006)::

    h1 = key[0];  h2 = key[1] | 1;  position_i = (h1 + i * h2) mod m,  i = 0 .. k-1

with 64-bit wrap-around arithmetic. ``m`` is a power of two, so ``mod m`` keeps the low bits:
a position in an ``m``-bit filter, taken ``mod m/2``, is the position in an ``m/2``-bit filter,
which is why a filter *folds* (OR of its two halves) to any smaller power of two, and *tiles*
(repeats) to any larger one for probing. ``h2`` is odd, hence invertible mod ``m``: the ``k``
positions of one key are distinct while ``k <= m``.

Geometry. ``k`` depends on the false-positive target alone, ``k = max(1, round(-log2(fp)))``;
``m`` is the smallest power of two ``>= n k / ln 2`` and at least :data:`MIN_BITS`. All filters of
one index share ``k`` and differ only in ``m``, so any two of them compare after folding the
larger. Rounding ``m`` up makes the real FP rate at capacity lower than the target (down to about
its square when ``m`` doubles).

Byte layout (version :data:`LAYOUT_VERSION`), the value stored in Redis and returned by
:meth:`BloomFilter.to_bytes`: exactly ``m / 8`` bytes, no header, so BITOP/BITCOUNT/GETBIT work on
it server side. Bit ``j`` lives in byte ``j >> 3`` at mask ``0x80 >> (j & 7)`` (most significant
bit first: Redis's SETBIT/GETBIT order). ``m`` and ``k`` are not in the bytes; whoever stores a
filter records them next to it, with :meth:`BloomFilter.meta` (``schema``, ``version``,
``m_bits``, ``k``), and a reader checks them with :meth:`BloomFilter.from_meta`.

Estimates, for ``X`` bits set: set size ``n = -(m/k) ln(1 - X/m)`` (Swamidass & Baldi, J. Chem.
Inf. Model. 2007); union = the estimate of the OR; intersection ``n(A) + n(B) - n(A or B)``, the
quantity Memory Buddies (Wood et al., VEE 2009) computes from zero-bit counts.
"""

from __future__ import annotations

import math

import numpy as np

from .blockmap import KEY_DTYPE, digest_keys
from .digests import DIGEST_SIZE
from .errors import FormatError, GeometryMismatch, UsageError

MIN_BITS = 4096
"""Smallest filter :func:`geometry_for` chooses (512 bytes)."""

MAX_BITS = 1 << 32
"""Largest filter: a Redis string holds at most 512 MiB, i.e. ``2**32`` bits."""

SMALLEST_BITS = 64
"""Smallest filter :meth:`BloomFilter.fold` or :meth:`BloomFilter.create` accept."""

SCHEMA = "blocksketch.bloom"
LAYOUT_VERSION = 1
"""Bumped whenever the hashing or the bit layout changes."""

_BIT_MASK = (0x80 >> np.arange(8)).astype(np.uint8)  # bit j & 7 of a byte, MSB first

# Batches of keys are processed in chunks that keep the position arrays in cache.
_FLAG_CHUNK = 1 << 16
_GATHER_CHUNK = 1 << 12
_PROBE_CHUNK = 1 << 14
# Above this size the scratch bool array (one byte per filter bit) is too big to be worth it.
_FLAG_MAX_BITS = 1 << 28


def _check_m_bits(m_bits: int, what: str = "filter size") -> int:
    m_bits = int(m_bits)
    if m_bits < SMALLEST_BITS or m_bits > MAX_BITS or m_bits & (m_bits - 1):
        raise UsageError(f"{what} {m_bits} bits must be a power of two from {SMALLEST_BITS} to 2**32")
    return m_bits


def _check_k(k: int) -> int:
    k = int(k)
    if not 1 <= k <= 64:
        raise UsageError(f"filter hash count k={k} must be from 1 to 64")
    return k


def k_for_fp_rate(fp_rate: float) -> int:
    """Hash count for a false-positive target: ``max(1, round(-log2(fp_rate)))`` (7 for 1%)."""
    if not 0 < fp_rate < 1:
        raise UsageError(f"filter FP rate {fp_rate} must be between 0 and 1")
    return max(1, round(-math.log2(fp_rate)))


def geometry_for(capacity: int, fp_rate: float) -> tuple[int, int]:
    """``(m_bits, k)`` for ``capacity`` keys at ``fp_rate``: ``m`` the smallest power of two
    ``>= capacity * k / ln 2``, at least :data:`MIN_BITS`."""
    k = k_for_fp_rate(fp_rate)
    return _bits_for(capacity, k), k


def _bits_for(capacity: int, k: int) -> int:
    if capacity < 0:
        raise UsageError(f"filter capacity {capacity} must not be negative")
    wanted = max(MIN_BITS, math.ceil(capacity * k / math.log(2)))
    m_bits = 1 << (wanted - 1).bit_length()
    if m_bits > MAX_BITS:
        raise UsageError(f"a filter for {capacity} digests with k={k} needs more than 2**32 bits "
                         "(Redis's 512 MiB limit): raise the FP rate or index fewer digests per filter")
    return m_bits


def as_keys(keys: np.ndarray) -> np.ndarray:
    """``(n, 2)`` uint64 keys as given, or converted from ``(n, 16)`` uint8 digests."""
    keys = np.asarray(keys)
    if keys.dtype == np.uint8 and keys.ndim == 2 and keys.shape[1] == DIGEST_SIZE:
        return digest_keys(keys)
    if keys.ndim != 2 or keys.shape[1] != 2 or keys.dtype != KEY_DTYPE:
        raise TypeError(f"expected (n, 2) uint64 keys or (n, 16) uint8 digests, got {keys.dtype} {keys.shape}")
    return keys


def _halves(keys: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """``h1`` and ``h2`` of ``keys[start:stop]`` as int64: the same bits as uint64, and int64
    indexes need no conversion when numpy indexes with them (wrap-around is identical)."""
    h1 = keys[start:stop, 0].astype(np.int64)
    h2 = (keys[start:stop, 1] | np.uint64(1)).view(np.int64)
    return h1, h2


def bit_positions(keys: np.ndarray, m_bits: int, k: int) -> np.ndarray:
    """The ``(n, k)`` uint64 bit positions of ``keys`` in an ``m_bits``-bit filter.

    The reference definition; :meth:`BloomFilter.add` and :meth:`BloomFilter.contains` compute
    the same positions in cache-sized chunks without materialising this array.
    """
    keys = as_keys(keys)
    m_bits, k = _check_m_bits(m_bits), _check_k(k)
    h1 = keys[:, 0]
    h2 = keys[:, 1] | np.uint64(1)
    steps = np.arange(k, dtype=np.uint64)
    return (h1[:, None] + steps[None, :] * h2[:, None]) & np.uint64(m_bits - 1)


def cardinality(m_bits: int, k: int, bits_set: int | np.ndarray) -> float | np.ndarray:
    """Estimated number of distinct keys in a filter with ``bits_set`` bits set:
    ``-(m/k) ln(1 - X/m)`` (Swamidass & Baldi 2007). ``inf`` for a full filter.

    Its standard deviation is about ``sqrt(m (e^t - t - 1)) / k`` with ``t = k n / m`` (the
    variance of linear counting, Whang et al., ACM TODS 1990, for ``k n`` balls in ``m`` bins).
    At capacity with k=7 (1% FP) that is ``0.25 sqrt(n)``: 0.25% of ``n`` for 10,000 keys, 0.08%
    for 100,000 (measured, in filters rounded up to a power of two: 0.19% and 0.07-0.09%).
    """
    x = np.asarray(bits_set, dtype=np.float64)
    with np.errstate(divide="ignore"):
        estimate = -(m_bits / k) * np.log1p(-x / m_bits)
    return float(estimate) if estimate.ndim == 0 else estimate


def intersection_cardinality(m_bits: int, k: int, bits_a: int | np.ndarray, bits_b: int | np.ndarray,
                             bits_and: int | np.ndarray) -> float | np.ndarray:
    """Estimated ``|A and B|`` from the popcounts of A, B and ``A AND B`` (same ``m`` and ``k``):
    ``n(A) + n(B) - n(A or B)`` with ``X_or = X_a + X_b - X_and``, clipped at 0.

    So one server-side AND + BITCOUNT per pair is enough when the popcounts of A and B were
    stored with them. Applying :func:`cardinality` to the AND's popcount directly overestimates
    badly (its chance set bits count as shared). Error: the estimate inherits the noise of the
    *union*, not of the intersection: its absolute standard deviation is about that of
    :func:`cardinality` at ``|A or B|``. Measured over 20 trials at 1% FP (k=7): 10,000 keys
    each, 50% shared: sd 0.13% of the union = 0.4% of the intersection; 10% shared: 3.2% of the
    intersection; 100,000 keys each, 10% shared: 1.2%; 1% shared: 14%. So it is within a few %
    when the overlap is a sizeable share of the union, and only a coarse figure when it is a
    small fraction of it; bias was below one standard deviation.
    """
    a = np.asarray(bits_a, dtype=np.float64)
    b = np.asarray(bits_b, dtype=np.float64)
    both = np.asarray(bits_and, dtype=np.float64)
    estimate = (np.asarray(cardinality(m_bits, k, a)) + np.asarray(cardinality(m_bits, k, b))
                - np.asarray(cardinality(m_bits, k, a + b - both)))
    with np.errstate(invalid="ignore"):  # inf - inf when a filter is full: report inf
        estimate = np.where(np.isnan(estimate), np.inf, np.maximum(estimate, 0.0))
    return float(estimate) if estimate.ndim == 0 else estimate


def false_positive_rate(m_bits: int, k: int, bits_set: int) -> float:
    """Chance that a key not in the filter probes as present: ``(X/m)^k``."""
    return float((bits_set / m_bits) ** k)


class BloomFilter:
    """A Bloom filter of ``m_bits`` bits (a power of two) and ``k`` positions per key.

    ``bits`` is the uint8 bitmap of ``m_bits // 8`` bytes in the layout of the module docstring.
    """

    __slots__ = ("m_bits", "k", "bits")

    def __init__(self, m_bits: int, k: int, bits: np.ndarray):
        self.m_bits = _check_m_bits(m_bits)
        self.k = _check_k(k)
        if bits.dtype != np.uint8 or bits.shape != (self.m_bits // 8,):
            raise ValueError(f"bits must be {self.m_bits // 8} uint8, got {bits.dtype} {bits.shape}")
        self.bits = bits

    def __repr__(self) -> str:
        return f"BloomFilter(m_bits={self.m_bits}, k={self.k}, popcount={self.popcount()})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BloomFilter):
            return NotImplemented
        return self.m_bits == other.m_bits and self.k == other.k and np.array_equal(self.bits, other.bits)

    __hash__ = None  # mutable

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(cls, m_bits: int, k: int) -> BloomFilter:
        """An empty filter of the given geometry."""
        m_bits = _check_m_bits(m_bits)
        return cls(m_bits, k, np.zeros(m_bits // 8, dtype=np.uint8))

    @classmethod
    def for_capacity(cls, capacity: int, fp_rate: float = 0.01) -> BloomFilter:
        """An empty filter sized by :func:`geometry_for`."""
        return cls.create(*geometry_for(capacity, fp_rate))

    @classmethod
    def from_keys(cls, keys: np.ndarray, fp_rate: float = 0.01, m_bits: int | None = None,
                  k: int | None = None) -> BloomFilter:
        """A filter holding ``keys``. ``k`` defaults to :func:`k_for_fp_rate`; ``m_bits``
        defaults to the size for ``len(keys)`` keys (pass distinct keys, e.g. a block map's)."""
        keys = as_keys(keys)
        k = k_for_fp_rate(fp_rate) if k is None else _check_k(k)
        m_bits = _bits_for(len(keys), k) if m_bits is None else m_bits
        bloom = cls.create(m_bits, k)
        bloom.add(keys)
        return bloom

    @classmethod
    def from_bytes(cls, data: bytes, m_bits: int, k: int) -> BloomFilter:
        """A filter from :meth:`to_bytes` output (e.g. a Redis GET) and its recorded geometry.

        Raises FormatError when the length does not match ``m_bits`` or the geometry is impossible.
        """
        try:
            m_bits, k = _check_m_bits(m_bits), _check_k(k)
        except UsageError as exc:
            raise FormatError(f"stored filter has an impossible geometry: {exc}") from None
        if len(data) != m_bits // 8:
            raise FormatError(f"stored filter is {len(data)} bytes but its geometry says {m_bits} bits "
                              f"({m_bits // 8} bytes): it is truncated or corrupt, index the host again")
        return cls(m_bits, k, np.frombuffer(data, dtype=np.uint8).copy())

    def meta(self) -> dict:
        """What a store records next to :meth:`to_bytes` so a reader can rebuild the filter."""
        return {"schema": SCHEMA, "version": LAYOUT_VERSION, "m_bits": self.m_bits, "k": self.k}

    @classmethod
    def from_meta(cls, data: bytes, meta: dict) -> BloomFilter:
        """:meth:`from_bytes` after checking ``meta`` (from :meth:`meta`); FormatError if it is
        not a blocksketch filter or of a layout version this code does not know."""
        if meta.get("schema") != SCHEMA:
            raise FormatError(f"not a blocksketch Bloom filter (schema {meta.get('schema')!r})")
        if meta.get("version") != LAYOUT_VERSION:
            raise FormatError(f"Bloom filter layout version {meta.get('version')!r} is not supported "
                              f"(this blocksketch reads version {LAYOUT_VERSION}): upgrade blocksketch or re-index")
        return cls.from_bytes(data, meta.get("m_bits", 0), meta.get("k", 0))

    def to_bytes(self) -> bytes:
        """The raw bitmap (``m_bits // 8`` bytes, MSB-first), e.g. for a Redis SET."""
        return self.bits.tobytes()

    def copy(self) -> BloomFilter:
        return BloomFilter(self.m_bits, self.k, self.bits.copy())

    # -- adding and probing ---------------------------------------------------------------------

    def add(self, keys: np.ndarray) -> None:
        """Set the bits of ``keys`` (``(n, 2)`` uint64 keys or ``(n, 16)`` uint8 digests)."""
        keys = as_keys(keys)
        if len(keys) == 0:
            return
        # Measured (benchmarks/bench_bloom.py): marking a one-byte-per-bit bool array, then
        # np.packbits, is fastest once a batch touches a good share of the filter; a small batch
        # into a big filter would pay O(m) for that, so it ORs bytes in place instead.
        if len(keys) * self.k * 16 >= self.m_bits and self.m_bits <= _FLAG_MAX_BITS:
            np.bitwise_or(self.bits, _packed_flags(keys, self.m_bits, self.k), out=self.bits)
        else:
            _or_in_place(self.bits, keys, self.m_bits, self.k)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """``(n,)`` bool: True where a key may be present (false positives possible, no false
        negatives)."""
        keys = as_keys(keys)
        found = np.empty(len(keys), dtype=bool)
        bits, mask = self.bits, self.m_bits - 1
        for start in range(0, len(keys), _PROBE_CHUNK):
            position, step = _halves(keys, start, start + _PROBE_CHUNK)
            hit = np.ones(len(position), dtype=bool)
            for _ in range(self.k):
                at = position & mask
                hit &= (bits[at >> 3] & _BIT_MASK[at & 7]).astype(bool)
                position += step
            found[start : start + len(hit)] = hit
        return found

    # -- statistics ---------------------------------------------------------------------------

    def popcount(self) -> int:
        """Bits set (what Redis BITCOUNT returns for :meth:`to_bytes`)."""
        return int(np.bitwise_count(self.bits.view(np.uint64)).sum(dtype=np.int64))

    def estimated_cardinality(self) -> float:
        """Estimated distinct keys added (:func:`cardinality`)."""
        return cardinality(self.m_bits, self.k, self.popcount())

    def false_positive_rate(self) -> float:
        """Current chance that a non-member probes as present (:func:`false_positive_rate`)."""
        return false_positive_rate(self.m_bits, self.k, self.popcount())

    # -- resizing and set operations ----------------------------------------------------------

    def fold(self, m_bits: int) -> BloomFilter:
        """This filter in ``m_bits`` bits (a power of two ``<=`` this one's): the OR of its
        ``m_bits``-wide slices. Equal to a filter of ``m_bits`` built from the same keys."""
        m_bits = _check_m_bits(m_bits, "folded size")
        if m_bits > self.m_bits:
            raise UsageError(f"cannot fold a {self.m_bits}-bit filter up to {m_bits} bits (use tile)")
        if m_bits == self.m_bits:
            return self.copy()
        slices = self.bits.reshape(-1, m_bits // 8)
        return BloomFilter(m_bits, self.k, np.bitwise_or.reduce(slices, axis=0))

    def tile(self, m_bits: int) -> BloomFilter:
        """This filter repeated to ``m_bits`` bits (a power of two ``>=`` this one's), so it can be
        probed with positions of a larger filter: bit ``j`` of the result is bit ``j mod m``.

        Membership answers are unchanged; popcount and estimates of the tiled filter are not
        meaningful (they scale with the repetitions), so estimate on the original.
        """
        m_bits = _check_m_bits(m_bits, "tiled size")
        if m_bits < self.m_bits:
            raise UsageError(f"cannot tile a {self.m_bits}-bit filter down to {m_bits} bits (use fold)")
        return BloomFilter(m_bits, self.k, np.tile(self.bits, m_bits // self.m_bits))

    def _aligned(self, other: BloomFilter) -> tuple[np.ndarray, np.ndarray, int]:
        if self.k != other.k:
            raise GeometryMismatch(f"cannot combine Bloom filters with k={self.k} and k={other.k}: "
                                   "they come from indexes with different FP rates; re-index with one FP rate")
        m_bits = min(self.m_bits, other.m_bits)
        return self.fold(m_bits).bits, other.fold(m_bits).bits, m_bits

    def union(self, other: BloomFilter) -> BloomFilter:
        """The filter of the union of both key sets (OR), in the smaller of the two sizes."""
        mine, theirs, m_bits = self._aligned(other)
        return BloomFilter(m_bits, self.k, mine | theirs)

    def intersection(self, other: BloomFilter) -> BloomFilter:
        """The AND of both filters in the smaller size. A filter that answers membership for the
        intersection (with more false positives), but do not estimate from its popcount: use
        :meth:`estimated_intersection`."""
        mine, theirs, m_bits = self._aligned(other)
        return BloomFilter(m_bits, self.k, mine & theirs)

    def estimated_intersection(self, other: BloomFilter) -> float:
        """Estimated number of keys in both filters (:func:`intersection_cardinality`), computed
        in the smaller of the two sizes."""
        mine, theirs, m_bits = self._aligned(other)
        counts = [int(np.bitwise_count(a.view(np.uint64)).sum(dtype=np.int64)) for a in (mine, theirs, mine & theirs)]
        return intersection_cardinality(m_bits, self.k, *counts)


def _packed_flags(keys: np.ndarray, m_bits: int, k: int) -> np.ndarray:
    """The MSB-first bitmap of ``keys`` alone, via a bool scratch array of ``m_bits`` bytes."""
    flags = np.zeros(m_bits, dtype=bool)
    mask = m_bits - 1
    at = np.empty(min(len(keys), _FLAG_CHUNK), dtype=np.int64)
    for start in range(0, len(keys), _FLAG_CHUNK):
        position, step = _halves(keys, start, start + _FLAG_CHUNK)
        out = at[: len(position)]
        for _ in range(k):
            np.bitwise_and(position, mask, out=out)
            flags[out] = True
            position += step
    return np.packbits(flags)  # bitorder="big": bit j -> byte j >> 3, mask 0x80 >> (j & 7)


def _or_in_place(bits: np.ndarray, keys: np.ndarray, m_bits: int, k: int) -> None:
    """Set the bits of ``keys`` directly in ``bits`` with gather-OR-scatter.

    ``bits[i] |= v`` with repeated ``i`` keeps only one write per byte, dropping the other bits
    aimed at that byte in the same chunk; such collisions are rare in a small chunk, so they are
    found by reading back and redone (np.bitwise_or.at is correct but ~10x slower).
    """
    mask = m_bits - 1
    steps = np.arange(k, dtype=np.int64)
    for start in range(0, len(keys), _GATHER_CHUNK):
        h1, h2 = _halves(keys, start, start + _GATHER_CHUNK)
        position = (h1[:, None] + steps[None, :] * h2[:, None]).ravel()
        position &= mask
        index, bit = position >> 3, _BIT_MASK[position & 7]
        while len(index):
            bits[index] |= bit
            lost = (bits[index] & bit) != bit
            index, bit = index[lost], bit[lost]
