"""Sketch-only estimates of how much of a query image every host of a fleet holds.

The query's digests are split into **light** ones (count below a threshold), of which only a
content-defined sample is probed, and **heavy** ones (count at or above it), all probed. Every
probe is looked up in every host's ranking sketch (:mod:`sketch.ranksketch`) at once: the fleet's
sketches share one geometry and are held as a bit-sliced matrix, row = bit position, column =
host, so a probe costs ``k`` row reads and ANDs for all hosts together, and per-host hit counts
are column popcounts. docs/ranking.md gives the estimators with their references; in short, for
a host with sample rate ``p`` and false-positive rate ``f`` (known from its fill):

- light part: the shared fraction of the sampled light probes, corrected for false positives
  ``(o - f) / (1 - f)``, scaled to all light digests (a ratio estimator: distinct, and weighted by
  count for the duplicates-counted ratio);
- heavy part: hits minus the expected false hits, weighted by count;
- zero blocks: shared in full when the host has any zero block.

Each estimate comes with a standard error from the sampling and false-positive variance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .blockmap import KEY_DTYPE
from .errors import UsageError
from .ranksketch import MAX_SHIFT, RankSketch, sample_sizes

Z95 = 1.959963984540054
# A uint8 lane sums at most 255 rows of 0/1 bits without overflowing.
SWAR_ROWS = 255
# Probe rows are processed in chunks whose unpacked hit bits take about this many bytes.
CHUNK_BYTES = 1 << 21
# Count classes with fewer rows than this go through a weighted matrix product instead.
SWAR_MIN_ROWS = 32
DEFAULT_MAX_LIGHT = 1 << 15
DEFAULT_MAX_HEAVY = 1 << 13
DEFAULT_HEAVY_THRESHOLD = 16


@dataclass
class ProbeSet:
    """What a query probes: a content-defined sample of its light digests and all its heavy ones.

    ``rows_at[s]``, ``weight_at[s]`` and ``weight2_at[s]`` give, for a host sampled at shift
    ``s >= shift``, how many light probes it can answer (those whose first key word is below
    ``2^(64 - s)``: a prefix of ``light_keys``) and the sums of their counts and squared counts.
    """

    total_blocks: int
    zero_blocks: int
    shift: int
    heavy_threshold: int
    light_keys: np.ndarray  # (n, 2) uint64, ascending: rows of higher sample level first
    light_counts: np.ndarray  # (n,) int64
    light_distinct: int  # all light digests of the query, sampled or not
    light_weight: int  # their blocks (sum of counts)
    heavy_keys: np.ndarray  # (h, 2) uint64
    heavy_counts: np.ndarray  # (h,) int64
    rows_at: np.ndarray  # (65,) int64
    weight_at: np.ndarray  # (65,) float64
    weight2_at: np.ndarray  # (65,) float64

    @property
    def probes(self) -> int:
        return len(self.light_keys) + len(self.heavy_keys)

    @classmethod
    def build(cls, keys: np.ndarray, counts: np.ndarray, total_blocks: int, zero_blocks: int,
              heavy_threshold: int = DEFAULT_HEAVY_THRESHOLD, max_light: int = DEFAULT_MAX_LIGHT,
              max_heavy: int = DEFAULT_MAX_HEAVY, min_shift: int = 0) -> ProbeSet:
        """Probes for a query with sorted unique non-zero ``keys`` occurring ``counts`` times.

        At most ``max_light`` light probes (the sample shift grows until they fit) and
        ``max_heavy`` heavy ones (the heavy threshold grows until they fit; a digest left light is
        still estimated without bias, only with more variance). ``min_shift``: no host samples
        more densely than this (e.g. :attr:`FleetSketches.min_shift`), so sparser probes suffice.
        """
        keys = np.ascontiguousarray(keys, dtype=KEY_DTYPE).reshape(-1, 2)
        counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        if len(keys) != len(counts):
            raise UsageError(f"{len(keys)} query digests but {len(counts)} counts")
        heavy_mask = counts >= heavy_threshold
        if np.count_nonzero(heavy_mask) > max_heavy:
            heavy_counts = counts[heavy_mask]
            cut = len(heavy_counts) - max_heavy - 1
            heavy_threshold = int(np.partition(heavy_counts, cut)[cut]) + 1
            heavy_mask = counts >= heavy_threshold
        light_index = np.flatnonzero(~heavy_mask)
        light_words = keys[light_index, 0]
        sizes = sample_sizes(light_words)
        shift = max(int(np.flatnonzero(sizes <= max_light)[0]), min(int(min_shift), MAX_SHIFT))
        chosen = light_index[: sizes[shift]]
        light_counts = counts[chosen]
        cum1 = np.concatenate(([0.0], np.cumsum(light_counts, dtype=np.float64)))
        cum2 = np.concatenate(([0.0], np.cumsum(light_counts.astype(np.float64) ** 2)))
        rows_at = np.minimum(sizes, sizes[shift])
        return cls(int(total_blocks), int(zero_blocks), shift, int(heavy_threshold),
                   np.ascontiguousarray(keys[chosen]), light_counts, len(light_index),
                   int(counts[light_index].sum(dtype=np.int64)), np.ascontiguousarray(keys[heavy_mask]),
                   counts[heavy_mask], rows_at, cum1[rows_at], cum2[rows_at])


@dataclass
class FleetEstimate:
    """Per-host estimates, in the fleet's host order; counts are blocks of the query image."""

    hosts: list[str]
    shared_blocks: np.ndarray  # float64: duplicates counted, zero blocks included
    shared_unique_blocks: np.ndarray  # float64: distinct contents, the zero block counting as one
    shared_se: np.ndarray  # standard errors of the two
    shared_unique_se: np.ndarray
    fp_rate: np.ndarray  # false-positive rate of each host's sketch
    shift: np.ndarray  # sample shift used for each host: 1/2^shift of its light digests probed
    probes: np.ndarray  # light probes each host answered
    total_blocks: int

    def ratios(self) -> tuple[np.ndarray, np.ndarray]:
        total = max(self.total_blocks, 1)
        return self.shared_blocks / total, self.shared_unique_blocks / total

    def errors95(self) -> tuple[np.ndarray, np.ndarray]:
        """Half-widths of the 95% intervals of the two ratios."""
        total = max(self.total_blocks, 1)
        return Z95 * self.shared_se / total, Z95 * self.shared_unique_se / total


def _transpose8(x: np.ndarray) -> np.ndarray:
    """Transpose the 8x8 bit matrix in each uint64 (row 0 = most significant byte, column 0 = MSB).

    Hacker's Delight, 2nd ed., section 7-3 (``transpose8rS64``): three rounds of masked swaps.
    """
    x = x.copy()
    for shift, mask in ((7, 0x00AA00AA00AA00AA), (14, 0x0000CCCC0000CCCC), (28, 0x00000000F0F0F0F0)):
        s, m = np.uint64(shift), np.uint64(mask)
        t = (x ^ (x >> s)) & m
        x ^= t ^ (t << s)
    return x


def hosts_to_columns(host_bits: np.ndarray) -> np.ndarray:
    """``(8g, m/8)`` per-host bitmaps (MSB first) -> ``(m, g)`` bit-sliced rows (host ``j`` in
    byte ``j // 8`` under mask ``0x80 >> (j % 8)``)."""
    hosts, nbytes = host_bits.shape
    groups = hosts // 8
    blocks = np.ascontiguousarray(host_bits.reshape(groups, 8, nbytes).transpose(2, 0, 1))  # (q, g, 8)
    words = _transpose8(blocks.view(">u8").astype(np.uint64).reshape(nbytes, groups))
    out = words.astype(">u8").view(np.uint8).reshape(nbytes, groups, 8).transpose(0, 2, 1)
    return np.ascontiguousarray(out).reshape(nbytes * 8, groups)


def columns_to_hosts(columns: np.ndarray) -> np.ndarray:
    """Inverse of :func:`hosts_to_columns`."""
    rows, groups = columns.shape
    nbytes = rows // 8
    blocks = np.ascontiguousarray(columns.reshape(nbytes, 8, groups).transpose(0, 2, 1))  # (q, g, 8)
    words = _transpose8(blocks.view(">u8").astype(np.uint64).reshape(nbytes, groups))
    out = words.astype(">u8").view(np.uint8).reshape(nbytes, groups, 8).transpose(1, 2, 0)
    return np.ascontiguousarray(out).reshape(groups * 8, nbytes)


class FleetSketches:
    """The ranking sketches of a fleet, held warm as one bit-sliced matrix for fast probing.

    Hosts are added, replaced and removed in place; ``tag`` remembers what each host's sketch was
    built from (e.g. its catalogue generation) so a cache can tell which ones are stale.
    """

    def __init__(self, m_bits: int, k: int):
        if m_bits < 64 or m_bits & (m_bits - 1):
            raise UsageError(f"ranking sketch size {m_bits} bits is not a power of two >= 64")
        self.m_bits = m_bits
        self.k = k
        self.hosts: list[str] = []
        self._index: dict[str, int] = {}
        self._matrix = np.zeros((m_bits, 0), dtype=np.uint8)
        self.shift = np.zeros(0, dtype=np.int64)
        self.fp_rate = np.zeros(0, dtype=np.float64)
        self.has_zero = np.zeros(0, dtype=bool)
        self.distinct = np.zeros(0, dtype=np.int64)
        self.tags: list[object] = []

    def copy(self) -> FleetSketches:
        """An independent copy: updated while readers keep probing the original."""
        other = FleetSketches(self.m_bits, self.k)
        other.hosts, other._index, other.tags = list(self.hosts), dict(self._index), list(self.tags)
        other._matrix = self._matrix.copy()
        other.shift, other.fp_rate = self.shift.copy(), self.fp_rate.copy()
        other.has_zero, other.distinct = self.has_zero.copy(), self.distinct.copy()
        return other

    def __len__(self) -> int:
        return len(self.hosts)

    def __contains__(self, host: str) -> bool:
        return host in self._index

    @property
    def nbytes(self) -> int:
        """Memory held by the bit-sliced matrix."""
        return self._matrix.nbytes

    @property
    def min_shift(self) -> int:
        """The densest sample shift of any host: probes sampled more densely help no one."""
        return int(self.shift.min()) if len(self.hosts) else 0

    def tag(self, host: str) -> object | None:
        at = self._index.get(host)
        return None if at is None else self.tags[at]

    def put(self, entries: Iterable[tuple[str, RankSketch, bool, object]]) -> None:
        """Add or replace hosts: ``(host, sketch, has_zero_blocks, tag)`` each."""
        entries = list(entries)
        if not entries:
            return
        updates: dict[int, np.ndarray] = {}
        for host, sketch, has_zero, tag in entries:
            if sketch.k != self.k:
                raise UsageError(f"ranking sketch of {host} uses k={sketch.k}, the fleet k={self.k}; re-index it")
            sketch = sketch.resized(self.m_bits)
            at = self._index.get(host)
            if at is None:
                at = len(self.hosts)
                self._index[host] = at
                self.hosts.append(host)
                self.tags.append(tag)
                self._grow(len(self.hosts))
            self.tags[at] = tag
            self.shift[at] = sketch.shift
            self.fp_rate[at] = sketch.fp_rate
            self.has_zero[at] = bool(has_zero)
            self.distinct[at] = sketch.distinct
            updates[at] = sketch.bits
        self._write(updates)

    def remove(self, host: str) -> None:
        """Drop ``host``; the last host moves into its column."""
        at = self._index.pop(host)
        last = len(self.hosts) - 1
        if at != last:
            moved = self.hosts[last]
            bits = self._read_host(last)
            self.hosts[at] = moved
            self._index[moved] = at
            for array in (self.shift, self.fp_rate, self.has_zero, self.distinct):
                array[at] = array[last]
            self.tags[at] = self.tags[last]
            self._write({at: bits, last: np.zeros(self.m_bits // 8, dtype=np.uint8)})
        else:
            self._write({last: np.zeros(self.m_bits // 8, dtype=np.uint8)})
        self.hosts.pop()
        self.tags.pop()
        self.shift, self.fp_rate, self.has_zero, self.distinct = (
            a[:last].copy() for a in (self.shift, self.fp_rate, self.has_zero, self.distinct))

    def _grow(self, hosts: int) -> None:
        for name in ("shift", "fp_rate", "has_zero", "distinct"):
            array = getattr(self, name)
            if len(array) < hosts:
                setattr(self, name, np.concatenate([array, np.zeros(hosts - len(array), dtype=array.dtype)]))
        need = -(-hosts // 8)
        have = self._matrix.shape[1]
        if need > have:
            grown = np.zeros((self.m_bits, max(need, have + have // 4)), dtype=np.uint8)
            grown[:, :have] = self._matrix
            self._matrix = grown

    def _read_host(self, at: int) -> np.ndarray:
        group = at // 8
        return columns_to_hosts(self._matrix[:, group : group + 1])[at % 8]

    def _write(self, updates: dict[int, np.ndarray]) -> None:
        """Rewrite the byte columns holding the updated hosts, 64 columns (512 hosts) at a time."""
        groups = sorted({at // 8 for at in updates})
        span = 64
        start = 0
        while start < len(groups):
            first = groups[start]
            end = start
            while end < len(groups) and groups[end] < first + span:
                end += 1
            last = groups[end - 1] + 1
            block = self._matrix[:, first:last]
            host_bits = columns_to_hosts(block)
            for at in range(first * 8, last * 8):
                if at in updates:
                    host_bits[at - first * 8] = updates[at]
            self._matrix[:, first:last] = hosts_to_columns(host_bits)
            start = end

    def host_bits(self, host: str) -> np.ndarray:
        """The sketch bitmap stored for ``host`` (a copy)."""
        return self._read_host(self._index[host])

    # -- probing -----------------------------------------------------------------------------


    def _swar_sums(self, matrix: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Per-host count of probes (rows of ``positions``) whose k bits are all set."""
        width = matrix.shape[1] * 8
        total = np.zeros(width, dtype=np.int64)
        # Chunks of whole 255-row slabs whose unpacked bits stay around CHUNK_BYTES (cache-sized).
        step = SWAR_ROWS * max(1, CHUNK_BYTES // (SWAR_ROWS * width))
        for start in range(0, len(positions), step):
            rows = positions[start : start + step]
            acc = np.take(matrix, rows[:, 0], axis=0)
            for j in range(1, rows.shape[1]):
                np.bitwise_and(acc, np.take(matrix, rows[:, j], axis=0), out=acc)
            pad = -len(rows) % SWAR_ROWS
            if pad:
                acc = np.concatenate([acc, np.zeros((pad, acc.shape[1]), dtype=np.uint8)])
            bits = np.unpackbits(acc, axis=1).view(np.uint64).reshape(-1, SWAR_ROWS, width // 8)
            # Bytes as lanes of uint64 words: 255 rows of 0/1 never carry into a neighbour lane.
            slabs = bits.sum(axis=1, dtype=np.uint64).view(np.uint8)
            total += slabs.sum(axis=0, dtype=np.int64)
        return total

    def _weighted_sums(self, matrix: np.ndarray, positions: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """``weights (w, r) @ hits (r, hosts)``: per-host weighted sums of probe hits."""
        width = matrix.shape[1] * 8
        total = np.zeros((weights.shape[0], width), dtype=np.float64)
        # float32 halves the conversion cost; sums of counts stay exact below 2^24 per chunk.
        weights = weights.astype(np.float32)
        step = max(1, CHUNK_BYTES // max(width, 1))
        for start in range(0, len(positions), step):
            rows = positions[start : start + step]
            acc = np.take(matrix, rows[:, 0], axis=0)
            for j in range(1, rows.shape[1]):
                np.bitwise_and(acc, np.take(matrix, rows[:, j], axis=0), out=acc)
            # einsum's own loops, not BLAS: OpenBLAS threads made this small product 50-100x slower
            # (measured 0.3 ms vs 20-40 ms) on a loaded 2-core machine.
            total += np.einsum("ij,jk->ik", weights[:, start : start + step],
                               np.unpackbits(acc, axis=1).astype(np.float32))
        return total

    def probe_hits(self, probes: ProbeSet) -> tuple[np.ndarray, np.ndarray]:
        """Raw hits: ``light (65, 3, hosts)`` per sample level (count, sum c, sum c^2 of hit probes
        at exactly that level) and ``heavy (3, hosts)``."""
        from .bloom import bit_positions

        hosts = len(self.hosts)
        # The whole (C-contiguous) matrix: np.take on a column slice of it is ~50x slower.
        matrix = self._matrix
        width = matrix.shape[1] * 8
        light = np.zeros((MAX_SHIFT + 1, 3, width), dtype=np.float64)
        heavy = np.zeros((3, width), dtype=np.float64)
        if hosts == 0:
            return light[:, :, :0], heavy[:, :0]
        if len(probes.light_keys):
            positions = bit_positions(probes.light_keys, self.m_bits, self.k).astype(np.intp)
            counts = probes.light_counts
            rows_at = probes.rows_at
            for level in range(MAX_SHIFT, probes.shift - 1, -1):
                lo = int(rows_at[level + 1]) if level < MAX_SHIFT else 0
                hi = int(rows_at[level])
                if hi <= lo:
                    continue
                band = lo + np.argsort(counts[lo:hi], kind="stable")
                band_counts = counts[band]
                values, starts = np.unique(band_counts, return_index=True)
                ends = np.append(starts[1:], len(band))
                rest = []
                for value, a, b in zip(values.tolist(), starts.tolist(), ends.tolist()):
                    if b - a >= SWAR_MIN_ROWS:
                        hits = self._swar_sums(matrix, positions[band[a:b]]).astype(np.float64)
                        light[level] += np.array([1.0, value, float(value) ** 2])[:, None] * hits
                    else:
                        rest.append(band[a:b])
                if rest:
                    rows = np.concatenate(rest)
                    c = counts[rows].astype(np.float64)
                    light[level] += self._weighted_sums(matrix, positions[rows], np.stack([np.ones_like(c), c, c * c]))
        if len(probes.heavy_keys):
            positions = bit_positions(probes.heavy_keys, self.m_bits, self.k).astype(np.intp)
            c = probes.heavy_counts.astype(np.float64)
            heavy = self._weighted_sums(matrix, positions, np.stack([np.ones_like(c), c, c * c]))
        return light[:, :, :hosts], heavy[:, :hosts]

    def estimate(self, probes: ProbeSet) -> FleetEstimate:
        """Estimated shared blocks of the query behind ``probes`` for every host, with errors."""
        light, heavy = self.probe_hits(probes)
        return estimate_shares(probes, light, heavy, self.shift, self.fp_rate, self.has_zero, list(self.hosts))


def estimate_shares(probes: ProbeSet, light: np.ndarray, heavy: np.ndarray, host_shift: np.ndarray,
                    fp_rate: np.ndarray, has_zero: np.ndarray, hosts: list[str]) -> FleetEstimate:
    """Turn per-host probe hits into estimates and standard errors (docs/ranking.md, "Estimators")."""
    count = light.shape[2]
    shift = np.minimum(np.maximum(np.asarray(host_shift, dtype=np.int64), probes.shift), MAX_SHIFT)
    # Hits of the probes a host can answer: every level at or above its shift.
    cumulative = np.cumsum(light[::-1], axis=0)[::-1]
    columns = np.arange(count)
    a0, a1, a2 = (cumulative[shift, j, columns] for j in range(3))
    n = probes.rows_at[shift].astype(np.float64)
    c1 = probes.weight_at[shift]
    c2 = probes.weight2_at[shift]
    f = np.clip(np.asarray(fp_rate, dtype=np.float64), 0.0, 0.999)
    p = np.exp2(-shift.astype(np.float64))
    keep = 1.0 - f

    with np.errstate(divide="ignore", invalid="ignore"):
        seen = n > 0
        o_d = np.where(seen, a0 / np.where(seen, n, 1), 0.5)
        o_w = np.where(seen, a1 / np.where(c1 > 0, c1, 1), 0.5)
        frac_d = np.clip((o_d - f) / keep, 0.0, 1.0)
        frac_w = np.clip((o_w - f) / keep, 0.0, 1.0)
        # Sampling variance (ratio estimator with finite-population correction 1 - p), an
        # Agresti-Coull floor so an all-or-nothing sample still shows its uncertainty, and the
        # false-positive noise of the absent keys.
        smooth = (a0 + 2) / (n + 4)
        floor_d = smooth * (1 - smooth) / np.maximum(n, 1)
        var_od = (1 - p) * np.maximum(o_d * (1 - o_d) / np.maximum(n, 1), floor_d) \
            + p * (1 - frac_d) * f * (1 - f) / np.maximum(n, 1)
        resid = np.maximum(a2 * (1 - 2 * o_w) + o_w * o_w * c2, 0.0)
        design = np.where(c1 > 0, c2 * np.maximum(n, 1) / np.where(c1 > 0, c1 * c1, 1), 1.0)
        var_ow = (1 - p) * np.maximum(resid / np.where(c1 > 0, c1 * c1, 1), floor_d * design) \
            + p * (1 - frac_w) * f * (1 - f) * design / np.maximum(n, 1)
        unknown = ~seen
        var_od = np.where(unknown, 0.25, var_od)
        var_ow = np.where(unknown, 0.25, var_ow)

    light_d = probes.light_distinct * frac_d
    light_w = probes.light_weight * frac_w
    var_light_d = probes.light_distinct ** 2 * var_od / keep ** 2
    var_light_w = float(probes.light_weight) ** 2 * var_ow / keep ** 2

    heavy_n = float(len(probes.heavy_counts))
    heavy_c1 = float(probes.heavy_counts.sum(dtype=np.float64))
    heavy_c2 = float((probes.heavy_counts.astype(np.float64) ** 2).sum())
    h0, h1, h2 = heavy
    heavy_d = np.clip((h0 - f * heavy_n) / keep, 0.0, heavy_n)
    heavy_w = np.clip((h1 - f * heavy_c1) / keep, 0.0, heavy_c1)
    var_heavy_d = f * np.maximum(heavy_n - h0, 0.0) / keep
    var_heavy_w = f * np.maximum(heavy_c2 - h2, 0.0) / keep

    zero_shared = np.asarray(has_zero, dtype=bool) & (probes.zero_blocks > 0)
    shared = light_w + heavy_w + np.where(zero_shared, probes.zero_blocks, 0)
    shared_unique = light_d + heavy_d + zero_shared
    return FleetEstimate(hosts, shared, shared_unique.astype(np.float64), np.sqrt(var_light_w + var_heavy_w),
                         np.sqrt(var_light_d + var_heavy_d), f, shift, n.astype(np.int64), probes.total_blocks)


def memory_buddies_shared(m_bits: int, k: int, zeros_a, zeros_b, zeros_and):
    """Shared elements of two same-geometry Bloom filters from their zero-bit counts.

    Wood et al., "Memory Buddies", VEE 2009, section 4.2:
    ``[ln(z1 + z2 - z12) - ln(z1 z2) + ln m] / [k (ln m - ln(m - 1))]``, where ``z12`` counts the
    zero bits of the AND (``z1 + z2 - z12`` those of the OR). The baseline the ranking sketch is
    compared against in benchmarks/bench_rank.py.
    """
    z1 = np.asarray(zeros_a, dtype=np.float64)
    z2 = np.asarray(zeros_b, dtype=np.float64)
    z12 = np.asarray(zeros_and, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = (np.log(z1 + z2 - z12) - np.log(z1 * z2) + math.log(m_bits)) \
            / (k * (math.log(m_bits) - math.log(m_bits - 1)))
    return np.where(np.isfinite(value), np.maximum(value, 0.0), np.nan)
