"""Host ranking: estimate latency and error over a synthetic fleet, exact pass speed, Memory Buddies baseline.

Usage: python benchmarks/bench_rank.py --hosts 1000 [--queries 100] [--exact-queries 10]
       [--baseline-hosts 40] [--pools 12] [--m-bits 262144] [--k 4] [--seed 2010] [--json]

The fleet is built through the library (:class:`sketch.ranksketch.RankSketch`,
:class:`sketch.estimate.FleetSketches`, :func:`sketch.rank.rank_fleet`) from synthetic digests:

- ``--pools`` pools of 400,000 random 128-bit keys stand for OS releases / application stacks. Each
  key has an intrinsic count (how often the block repeats inside an image): 93% once, 5% twice,
  1.5% 3-8 times, 0.4% 9-40, 0.1% 40-2000 (a heavier tail than real Debian roots, where 2-3% of
  distinct blocks repeat and none more than ~50 times at 4 KiB).
- An image takes a contiguous range of 15-95% of one pool (its host's usual pool 80% of the time),
  5-40% of fresh keys shared with nothing, and 20-80% zero blocks (4 KiB blocks: ~1-5 GiB each).
  A host has 1-4 images (a few GiB to ~15 GiB). Queries are further images drawn the same way,
  so hosts on the query's pool share 0-95% of its non-zero content and the others nothing.
- A host's ranking sketch only needs its sampled and heavy keys, so those are generated directly
  (the keys of a pool range at a sample level, and fresh keys level by level from a seed); the
  result is checked equal to the sketch built from the host's full key set for a few hosts.
- Exact figures for every (query, host) pair come from range arithmetic on the pools; for the
  first ``--exact-queries`` queries the estimate's top 3 hosts are materialised as real block maps
  and run through the exact pass, which must agree with the arithmetic.

Reported: estimate-stage latency (probe set + probing the warm fleet; p50 over queries, each the
median of 3 runs), |estimate - exact| in points for both ratios, how often the 95% interval
covers the exact figure, how often the exact best host is in the estimate's top 3, exact-pass
digests per second, and the Memory Buddies baseline (full host filters at 1% FP, AND + popcount,
``intersection_cardinality``) on ``--baseline-hosts`` hosts, side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from sketch.blockmap import BlockMap, lexsort_keys  # noqa: E402
from sketch.bloom import BloomFilter, intersection_cardinality  # noqa: E402
from sketch.estimate import FleetSketches, memory_buddies_shared  # noqa: E402
from sketch.exact import exact_share  # noqa: E402
from sketch.rank import RankQuery, rank_fleet  # noqa: E402
from sketch.ranksketch import RankParams, RankSketch, choose_shift  # noqa: E402

BLOCK_SIZE = 4096
POOL_SIZE = 400_000
MAX_LEVEL = 24  # sample levels tracked; hosts of this size never sample sparser than ~2^-8
_POWERS = np.array([1 << i for i in range(64)], dtype=np.uint64)


def levels(words: np.ndarray) -> np.ndarray:
    """Leading zero bits of each uint64: a key is in the sample at shift s iff its level >= s."""
    return 64 - np.searchsorted(_POWERS, words, side="right")


class Pool:
    """Keys in range order, their intrinsic counts, and sorted index lists per sample level."""

    def __init__(self, rng: np.random.Generator):
        self.keys = rng.integers(0, 2**64, size=(POOL_SIZE, 2), dtype=np.uint64)
        draw = rng.random(POOL_SIZE)
        counts = np.ones(POOL_SIZE, dtype=np.int64)
        counts[draw > 0.93] = 2
        counts[draw > 0.98] = rng.integers(3, 9, size=int((draw > 0.98).sum()))
        counts[draw > 0.995] = rng.integers(9, 41, size=int((draw > 0.995).sum()))
        tail = draw > 0.999
        counts[tail] = np.minimum(40 * (1 - rng.random(int(tail.sum()))) ** (-1 / 1.2), 2000).astype(np.int64)
        self.counts = counts
        self.prefix = np.concatenate(([0], np.cumsum(counts)))
        level = levels(self.keys[:, 0])
        self.at_level = [np.flatnonzero(level >= s) for s in range(MAX_LEVEL + 1)]
        self._heavy: dict[int, np.ndarray] = {}

    def heavy(self, threshold: int) -> np.ndarray:
        if threshold not in self._heavy:
            self._heavy[threshold] = np.flatnonzero(self.counts >= threshold)
        return self._heavy[threshold]


def within(index: np.ndarray, a: int, b: int) -> np.ndarray:
    return index[np.searchsorted(index, a) : np.searchsorted(index, b)]


class Image:
    """One synthetic image: pool pieces, fresh keys (generated level by level from a seed), zeros."""

    def __init__(self, rng: np.random.Generator, pools: list[Pool], pool: int, seed: int, fraction=(0.15, 0.95)):
        span = int(POOL_SIZE * rng.uniform(*fraction))
        start = int(rng.integers(0, POOL_SIZE))
        self.pool = pool
        # Holes of 0.2-2% of the range each (packages this image lacks), so no two images match exactly.
        holes = np.sort(rng.integers(0, span, size=int(rng.integers(3, 12))))
        widths = (span * rng.uniform(0.002, 0.02, size=len(holes))).astype(np.int64)
        pieces, at = [], 0
        for hole, width in zip(holes.tolist(), widths.tolist()):
            if hole > at:
                pieces.append((at, hole))
            at = max(at, hole + width)
        if at < span:
            pieces.append((at, span))
        self.pieces = []
        for a, b in pieces:  # shift to start, wrapping around the pool
            a, b = a + start, b + start
            if b <= POOL_SIZE:
                self.pieces.append((a, b))
            elif a >= POOL_SIZE:
                self.pieces.append((a - POOL_SIZE, b - POOL_SIZE))
            else:
                self.pieces += [(a, POOL_SIZE), (0, b - POOL_SIZE)]
        length = sum(b - a for a, b in self.pieces)
        fresh_share = rng.uniform(0.05, 0.4)
        self.fresh = int(length * fresh_share / (1 - fresh_share))
        # Fresh keys exactly at each level: nested binomial halvings.
        at_or_above = [self.fresh]
        while at_or_above[-1] and len(at_or_above) < 64:
            at_or_above.append(int(rng.binomial(at_or_above[-1], 0.5)))
        at_or_above += [0] * (65 - len(at_or_above))
        self.fresh_at_or_above = np.array(at_or_above, dtype=np.int64)
        self.seed = seed
        weight = sum(int(pools[pool].prefix[b] - pools[pool].prefix[a]) for a, b in self.pieces) + self.fresh
        zero_share = rng.uniform(0.2, 0.8)
        self.zero_blocks = int(weight * zero_share / (1 - zero_share))
        self.total_blocks = weight + self.zero_blocks
        self.distinct = length + self.fresh

    def fresh_keys(self, min_level: int) -> np.ndarray:
        parts = []
        for level in range(min_level, 64):
            n = int(self.fresh_at_or_above[level] - self.fresh_at_or_above[level + 1])
            if n == 0:
                continue
            rng = np.random.default_rng([self.seed, level])
            low = np.uint64(1 << (63 - level))
            words = rng.integers(0, 1 << (63 - level), size=n, dtype=np.uint64) + low if level < 63 else \
                np.full(n, 1, dtype=np.uint64)
            parts.append(np.stack([words, rng.integers(0, 2**64, size=n, dtype=np.uint64)], axis=1))
        return np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.uint64)

    def block_map(self, pools: list[Pool]) -> BlockMap:
        pool = pools[self.pool]
        index = np.concatenate([np.arange(a, b) for a, b in self.pieces])
        keys = np.concatenate([pool.keys[index], self.fresh_keys(0)])
        counts = np.concatenate([pool.counts[index], np.ones(self.fresh, dtype=np.int64)])
        order = lexsort_keys(keys)
        return BlockMap(BLOCK_SIZE, self.total_blocks, self.zero_blocks, np.ascontiguousarray(keys[order]),
                        counts[order].astype(np.uint32), np.zeros(len(keys), dtype=np.uint64))

    @property
    def size_bytes(self) -> int:
        return self.total_blocks * BLOCK_SIZE


class Host:
    """Images plus, per pool, the elementary segments of their ranges with coverage counts."""

    def __init__(self, images: list[Image]):
        self.images = images
        self.segments: list[tuple[int, int, int, int]] = []  # (pool, a, b, images covering)
        for pool in sorted({i.pool for i in images}):
            pieces = np.array([p for i in images if i.pool == pool for p in i.pieces], dtype=np.int64)
            starts, ends = np.sort(pieces[:, 0]), np.sort(pieces[:, 1])
            cuts = np.unique(pieces)
            # Pieces covering [a, b) between consecutive cuts: started at or before a, not ended by a.
            cover = np.searchsorted(starts, cuts[:-1], side="right") - np.searchsorted(ends, cuts[:-1], side="right")
            for a, b, c in zip(cuts[:-1].tolist(), cuts[1:].tolist(), cover.tolist()):
                if c:
                    self.segments.append((pool, a, b, c))

    def sizes_and_heavy(self, pools: list[Pool], threshold: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Distinct keys at each sample level, heavy keys outside each sample, heavy total."""
        sizes = np.zeros(65, dtype=np.int64)
        heavy_levels = []
        for pool_id, a, b, cover in self.segments:
            pool = pools[pool_id]
            for s in range(MAX_LEVEL + 1):
                sizes[s] += len(within(pool.at_level[s], a, b))
            heavy = within(pool.heavy(math.ceil(threshold / cover)), a, b)
            heavy_levels.append(levels(pool.keys[heavy, 0]))
        for image in self.images:
            sizes += image.fresh_at_or_above
        heavy_levels = np.concatenate(heavy_levels) if heavy_levels else np.zeros(0, dtype=np.int64)
        outside = np.array([np.count_nonzero(heavy_levels < s) for s in range(65)], dtype=np.int64)
        return sizes, outside, len(heavy_levels)

    def sampled_keys(self, pools: list[Pool], min_level: int, threshold: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys at ``min_level`` or above plus every key counted >= ``threshold`` times, sorted, with counts."""
        keys, counts = [], []
        for pool_id, a, b, cover in self.segments:
            pool = pools[pool_id]
            index = np.union1d(within(pool.at_level[min(min_level, MAX_LEVEL)], a, b),
                               within(pool.heavy(math.ceil(threshold / cover)), a, b))
            keys.append(pool.keys[index])
            counts.append(pool.counts[index] * cover)
        for image in self.images:
            fresh = image.fresh_keys(min_level)
            keys.append(fresh)
            counts.append(np.ones(len(fresh), dtype=np.int64))
        keys, counts = np.concatenate(keys), np.concatenate(counts)
        order = lexsort_keys(keys)
        return np.ascontiguousarray(keys[order]), counts[order]

    def full_keys(self, pools: list[Pool]) -> tuple[np.ndarray, np.ndarray]:
        return self.sampled_keys(pools, 0, 1)

    def sketch(self, pools: list[Pool], params: RankParams) -> RankSketch:
        sizes, outside, heavy = self.sizes_and_heavy(pools, params.heavy_threshold)
        if heavy > params.capacity * params.heavy_share:  # the sketch raises its threshold: build from all keys
            return RankSketch.build(*self.full_keys(pools), params)
        shift = choose_shift(sizes, outside, params.capacity)
        keys, counts = self.sampled_keys(pools, shift, params.heavy_threshold)
        return RankSketch.build(keys, counts, params, min_shift=shift, distinct=int(sizes[0]))

    def maps(self, pools: list[Pool]) -> list[tuple[str, BlockMap]]:
        return [(f"vm{i}.img", image.block_map(pools)) for i, image in enumerate(self.images)]

    @property
    def size_bytes(self) -> int:
        return sum(i.size_bytes for i in self.images)


def make_fleet(args, pools: list[Pool], rng: np.random.Generator) -> list[Host]:
    hosts = []
    for number in range(args.hosts):
        usual = int(rng.integers(0, len(pools)))
        images = []
        for _ in range(int(rng.integers(1, 5))):
            pool = usual if rng.random() < 0.8 else int(rng.integers(0, len(pools)))
            images.append(Image(rng, pools, pool, seed=args.seed * 1_000_003 + len(hosts) * 16 + len(images)))
        hosts.append(Host(images))
        del number
    return hosts


class Truth:
    """Exact shared blocks of a query image with every host, from range arithmetic."""

    def __init__(self, hosts: list[Host]):
        rows = [(h, pool, a, b) for h, host in enumerate(hosts) for pool, a, b, _ in host.segments]
        self.host, self.pool, self.a, self.b = (np.array(col, dtype=np.int64) for col in zip(*rows))
        self.count = len(hosts)

    def shared(self, query: Image, pools: list[Pool]) -> tuple[np.ndarray, np.ndarray]:
        """``(shared blocks, shared distinct contents)`` per host, zero blocks included (every host has some)."""
        blocks = np.zeros(self.count)
        distinct = np.zeros(self.count)
        prefix = pools[query.pool].prefix
        select = self.pool == query.pool
        host, a, b = self.host[select], self.a[select], self.b[select]
        for qa, qb in query.pieces:
            lo, hi = np.maximum(a, qa), np.minimum(b, qb)
            length = np.maximum(hi - lo, 0)
            weight = np.where(length > 0, prefix[np.maximum(hi, lo)] - prefix[lo], 0)
            blocks += np.bincount(host, weights=weight, minlength=self.count)
            distinct += np.bincount(host, weights=length, minlength=self.count)
        return blocks + query.zero_blocks, distinct + (1 if query.zero_blocks else 0)


def build_fleet(hosts: list[Host], pools: list[Pool], params: RankParams) -> tuple[FleetSketches, float]:
    fleet = FleetSketches(params.m_bits, params.k)
    started = time.perf_counter()
    batch = []
    for number, host in enumerate(hosts):
        batch.append((f"host-{number:05d}", host.sketch(pools, params), True, 0))
        if len(batch) == 512:
            fleet.put(batch)
            batch = []
    fleet.put(batch)
    return fleet, time.perf_counter() - started


def check_sampled_build(hosts: list[Host], pools: list[Pool], params: RankParams, count: int = 3) -> bool:
    """The directly sampled sketch equals the one built from the host's full key set."""
    for host in hosts[:count]:
        full = RankSketch.build(*host.full_keys(pools), params)
        if full.to_bytes() != host.sketch(pools, params).to_bytes():
            return False
    return True


def baseline(hosts: list[Host], pools: list[Pool], queries: list[tuple[Image, RankQuery]], truths, count: int) -> dict:
    """Memory Buddies: full host filters at 1% FP; AND + popcount against the query's filter."""
    filters = [BloomFilter.from_keys(host.full_keys(pools)[0], 0.01) for host in hosts[:count]]
    errors, seconds, formula_gap = [], [], 0.0
    for (_, query), (_, truth_distinct) in zip(queries, truths):
        query_filter = BloomFilter.from_keys(query.keys, 0.01)
        started = time.perf_counter()
        estimates = []
        for host_filter in filters:
            m = min(query_filter.m_bits, host_filter.m_bits)
            a, b = query_filter.fold(m).bits, host_filter.fold(m).bits
            xa = int(np.bitwise_count(a).sum(dtype=np.int64))
            xb = int(np.bitwise_count(b).sum(dtype=np.int64))
            xand = int(np.bitwise_count(a & b).sum(dtype=np.int64))
            shared = intersection_cardinality(m, query_filter.k, xa, xb, xand)
            buddies = float(memory_buddies_shared(m, query_filter.k, m - xa, m - xb, m - xand))
            formula_gap = max(formula_gap, abs(buddies - shared) / max(shared, 1.0))
            estimates.append(shared)
        seconds.append((time.perf_counter() - started) / len(filters))
        ratio = (np.array(estimates) + 1) / query.total_blocks
        errors.append(np.abs(ratio - truth_distinct[:count] / query.total_blocks) * 100)
    errors = np.concatenate(errors)
    return {"hosts": count, "filter_bytes_mean": float(np.mean([f.m_bits // 8 for f in filters])),
            "seconds_per_host": float(np.median(seconds)), "unique_abs_error_points": summary(errors),
            "formula_max_relative_gap": formula_gap}


def summary(errors: np.ndarray) -> dict:
    return {"within_1pt": float(np.mean(errors <= 1.0)), "p50": float(np.percentile(errors, 50)),
            "p95": float(np.percentile(errors, 95)), "max": float(errors.max())}


def run(args) -> dict:
    rng = np.random.default_rng(args.seed)
    params = RankParams(m_bits=args.m_bits, k=args.k)
    started = time.perf_counter()
    pools = [Pool(rng) for _ in range(args.pools)]
    hosts = make_fleet(args, pools, rng)
    truth = Truth(hosts)
    setup = time.perf_counter() - started
    fleet, build_seconds = build_fleet(hosts, pools, params)
    sampled_ok = check_sampled_build(hosts, pools, params)

    queries = []
    for number in range(args.queries):
        image = Image(rng, pools, int(rng.integers(0, len(pools))), seed=10**9 + number, fraction=(0.2, 0.9))
        queries.append((image, RankQuery.from_block_map(image.block_map(pools), f"query-{number}")))
    truths = [truth.shared(image, pools) for image, _ in queries]

    latencies, cpu_times, light_probes, heavy_probes, regrets, gaps, close_hits = [], [], [], [], [], [], []
    err_shared, err_unique, err_shared_overlap, covered, covered_unique = [], [], [], [], []
    in_top3, top1 = 0, 0
    exact_rates, probe_rates, exact_agree = [], [], True
    for number, ((_, query), (true_blocks, true_distinct)) in enumerate(zip(queries, truths)):
        runs, cpu = [], []
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.process_time()
            probes = query.probes(min_shift=fleet.min_shift)
            estimate = fleet.estimate(probes)
            runs.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        latencies.append(float(np.median(runs)))
        cpu_times.append(float(np.median(cpu)))
        light_probes.append(len(probes.light_keys))
        heavy_probes.append(len(probes.heavy_keys))
        ratio, unique_ratio = estimate.ratios()
        error, unique_error = estimate.errors95()
        exact_ratio = true_blocks / query.total_blocks
        exact_unique = true_distinct / query.total_blocks
        diff = np.abs(ratio - exact_ratio) * 100
        diff_unique = np.abs(unique_ratio - exact_unique) * 100
        err_shared.append(diff)
        err_unique.append(diff_unique)
        err_shared_overlap.append(diff[true_distinct > 1])
        covered.append(diff <= error * 100)
        covered_unique.append(diff_unique <= unique_error * 100)
        # Hosts holding exactly the same blocks as the best tie with it: any of them in the top 3 counts.
        order = np.lexsort((-unique_ratio, -ratio))
        best = int(np.lexsort((-true_distinct, -true_blocks))[0])
        best_key = (true_blocks[best], true_distinct[best])
        in_top3 += any((true_blocks[i], true_distinct[i]) == best_key for i in order[:3].tolist())
        top1 += (true_blocks[order[0]], true_distinct[order[0]]) == best_key
        regrets.append(float((true_blocks[best] - true_blocks[order[:3]].max()) / query.total_blocks * 100))
        # The closest host holding strictly less than the best (hosts tied with it are equally good).
        lower = true_blocks[true_blocks < true_blocks[best]]
        gaps.append(float((true_blocks[best] - lower.max()) / query.total_blocks * 100) if len(lower) else 100.0)
        close_hits.append(any((true_blocks[i], true_distinct[i]) == best_key for i in order[:3].tolist()))
        if number < args.exact_queries:
            result = rank_fleet(query, fleet, lambda name: hosts[int(name.split("-")[1])].maps(pools),
                                top=3, exact_top=3, probes=probes)
            for row in result["hosts"]:
                at = int(row["host"].split("-")[1])
                exact_agree &= (row["exact_shared_blocks"], row["exact_shared_unique_blocks"]) == (
                    int(true_blocks[at]), int(true_distinct[at]))
            for row in result["hosts"][:1]:
                maps = [m for _, m in hosts[int(row["host"].split("-")[1])].maps(pools)]
                timed = min((exact_share(query.block_map(), maps) for _ in range(3)), key=lambda r: r.seconds)
                exact_rates.append(timed.digests_per_second)
                probe_rates.append(timed.probes / timed.seconds)
    err_shared, err_unique = np.concatenate(err_shared), np.concatenate(err_unique)
    err_overlap = np.concatenate(err_shared_overlap)
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "hosts": args.hosts,
        "queries": args.queries,
        "pools": args.pools,
        "block_size": BLOCK_SIZE,
        "host_gib_mean": float(np.mean([h.size_bytes for h in hosts]) / 2**30),
        "host_distinct_mean": float(np.mean(fleet.distinct)),
        "query_blocks_mean": float(np.mean([q.total_blocks for _, q in queries])),
        "query_distinct_mean": float(np.mean([q.distinct_nonzero for _, q in queries])),
        "sketch": {"m_bits": params.m_bits, "k": params.k, "bytes_per_host": params.m_bits // 8,
                   "matrix_mib": fleet.nbytes / 2**20, "shift_min": int(fleet.shift.min()),
                   "shift_median": float(np.median(fleet.shift)), "shift_max": int(fleet.shift.max()),
                   "fp_rate_median": float(np.median(fleet.fp_rate)), "sampled_build_equals_full": sampled_ok},
        "setup_seconds": setup,
        "sketch_build_seconds": build_seconds,
        "load_average": os.getloadavg()[0],
        "estimate_ms": {"p50": float(np.percentile(latencies, 50) * 1e3),
                        "p90": float(np.percentile(latencies, 90) * 1e3), "max": float(np.max(latencies) * 1e3),
                        "cpu_p50": float(np.percentile(cpu_times, 50) * 1e3)},
        "light_probes_mean": float(np.mean(light_probes)),
        "heavy_probes_mean": float(np.mean(heavy_probes)),
        "shared_abs_error_points": summary(err_shared),
        "shared_abs_error_points_overlapping_pairs": summary(err_overlap),
        "unique_abs_error_points": summary(err_unique),
        "interval95_covers": {"shared": float(np.mean(np.concatenate(covered))),
                              "unique": float(np.mean(np.concatenate(covered_unique)))},
        "exact_best_in_estimate_top3": in_top3 / args.queries,
        "exact_best_is_estimate_top1": top1 / args.queries,
        "top3_regret_points": {"max": float(np.max(regrets)), "p99": float(np.percentile(regrets, 99))},
        "runner_up_gap_points": {"p50": float(np.median(gaps)), "within_1_5": float(np.mean(np.array(gaps) < 1.5)),
                                 "within_0_5": float(np.mean(np.array(gaps) < 0.5))},
        "top3_when_runner_up_within_1_5": float(np.mean([h for h, g in zip(close_hits, gaps) if g < 1.5]))
        if any(g < 1.5 for g in gaps) else None,
        "exact_pass": {"queries": min(args.exact_queries, args.queries), "agrees_with_truth": bool(exact_agree),
                       "digests_per_second": float(np.median(exact_rates)) if exact_rates else None,
                       "query_probes_per_second": float(np.median(probe_rates)) if probe_rates else None},
    }
    if args.baseline_hosts:
        count = min(args.baseline_hosts, args.hosts)
        base = baseline(hosts, pools, queries[: max(1, min(args.queries, 20))], truths, count)
        ours_per_host = result["estimate_ms"]["p50"] / 1e3 / args.hosts
        base["ms_per_1000_hosts"] = base["seconds_per_host"] * 1e6
        base["ours_ms_per_1000_hosts"] = ours_per_host * 1e6
        base["speedup_ours_vs_baseline"] = base["seconds_per_host"] / ours_per_host
        base["ours_unique_abs_error_points_same_pairs"] = summary(np.concatenate(
            [e[:count] for e in np.split(err_unique, args.queries)][: max(1, min(args.queries, 20))]))
        result["baseline_memory_buddies"] = base
    return result


def print_human(r: dict) -> None:
    s = r["sketch"]
    print(f"machine: {r['machine']}")
    print(f"fleet: {r['hosts']} hosts, {r['host_gib_mean']:.1f} GiB and {r['host_distinct_mean'] / 1e6:.2f} M distinct "
          f"blocks per host on average, {r['pools']} pools, {r['block_size']} B blocks")
    print(f"sketch: {s['bytes_per_host'] // 1024} KiB per host (m=2^{int(math.log2(s['m_bits']))}, k={s['k']}), "
          f"matrix {s['matrix_mib']:.0f} MiB, sample shift {s['shift_min']}-{s['shift_max']} "
          f"(median {s['shift_median']:.0f}), median FP {s['fp_rate_median']:.4f}; "
          f"built in {r['sketch_build_seconds']:.1f} s; sampled build == full build: {s['sampled_build_equals_full']}")
    print(f"queries: {r['queries']}, {r['query_blocks_mean'] / 1e3:.0f} K blocks and "
          f"{r['query_distinct_mean'] / 1e3:.0f} K distinct non-zero on average; "
          f"{r['light_probes_mean']:.0f} light + {r['heavy_probes_mean']:.0f} heavy probes")
    e = r["estimate_ms"]
    print(f"estimate stage (warm): p50 {e['p50']:.1f} ms, p90 {e['p90']:.1f} ms, max {e['max']:.1f} ms wall; "
          f"p50 {e['cpu_p50']:.1f} ms CPU ({e['p50'] / r['hosts'] * 1000:.2f} ms per 1,000 hosts; load average "
          f"{r['load_average']:.1f} on {os.cpu_count()} cores)")
    for label, key in (("shared_ratio", "shared_abs_error_points"),
                       ("  (pairs sharing content)", "shared_abs_error_points_overlapping_pairs"),
                       ("shared_unique_ratio", "unique_abs_error_points")):
        a = r[key]
        print(f"{label}: |estimate - exact| <= 1 point in {a['within_1pt'] * 100:.2f}% of pairs; "
              f"p50 {a['p50']:.3f}, p95 {a['p95']:.3f}, max {a['max']:.2f} points")
    c = r["interval95_covers"]
    print(f"95% interval covers the exact figure: {c['shared'] * 100:.1f}% (shared), {c['unique'] * 100:.1f}% (unique)")
    print(f"exact best host in the estimate's top 3: {r['exact_best_in_estimate_top3'] * 100:.1f}% of queries; "
          f"estimate's #1: {r['exact_best_is_estimate_top1'] * 100:.1f}%; when missed, the top 3's best is "
          f"at most {r['top3_regret_points']['max']:.2f} points below it")
    g = r["runner_up_gap_points"]
    print(f"closest host below the best within 1.5 points of it in {g['within_1_5'] * 100:.0f}% of queries "
          f"(within 0.5: {g['within_0_5'] * 100:.0f}%, median gap {g['p50']:.2f}); among those a best host is in "
          f"the estimate's top 3 in {(r['top3_when_runner_up_within_1_5'] or 0) * 100:.1f}%")
    x = r["exact_pass"]
    if x["digests_per_second"]:
        print(f"exact pass: {x['digests_per_second'] / 1e6:.1f} M digests/s (query + host maps), "
              f"{x['query_probes_per_second'] / 1e6:.1f} M query lookups/s; equals range arithmetic: "
              f"{x['agrees_with_truth']} ({x['queries']} queries x 3 hosts)")
    b = r.get("baseline_memory_buddies")
    if b:
        print(f"baseline Memory Buddies ({b['hosts']} hosts, full 1% filters, {b['filter_bytes_mean'] / 2**20:.2f} MiB "
              f"mean): {b['ms_per_1000_hosts']:.0f} ms per 1,000 hosts vs ours {b['ours_ms_per_1000_hosts']:.1f} ms "
              f"({b['speedup_ours_vs_baseline']:.1f}x); distinct ratio within 1 point: "
              f"{b['unique_abs_error_points']['within_1pt'] * 100:.1f}% "
              f"(p95 {b['unique_abs_error_points']['p95']:.3f}) "
              f"vs ours {b['ours_unique_abs_error_points_same_pairs']['within_1pt'] * 100:.1f}% "
              f"(p95 {b['ours_unique_abs_error_points_same_pairs']['p95']:.3f}) on the same pairs; "
              f"paper formula vs n(A)+n(B)-n(AuB): max relative gap {b['formula_max_relative_gap']:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--exact-queries", type=int, default=10)
    parser.add_argument("--baseline-hosts", type=int, default=40)
    parser.add_argument("--pools", type=int, default=12)
    parser.add_argument("--m-bits", type=int, default=RankParams().m_bits)
    parser.add_argument("--k", type=int, default=RankParams().k)
    parser.add_argument("--seed", type=int, default=2010)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_human(result)


if __name__ == "__main__":
    main()
