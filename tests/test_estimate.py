"""Fleet estimates: the bit-sliced matrix answers like per-host filters, and the estimators land on the truth."""

from __future__ import annotations

import numpy as np
import pytest

from sketch.blockmap import contains as exact_contains
from sketch.blockmap import lexsort_keys
from sketch.bloom import BloomFilter, intersection_cardinality
from sketch.errors import UsageError
from sketch.estimate import (
    FleetSketches,
    ProbeSet,
    columns_to_hosts,
    hosts_to_columns,
    memory_buddies_shared,
)
from sketch.ranksketch import RankParams, RankSketch

PARAMS = RankParams(m_bits=1 << 14, k=4)


def random_keys(rng: np.random.Generator, n: int) -> np.ndarray:
    keys = rng.integers(0, 2**64, size=(n, 2), dtype=np.uint64)
    return np.ascontiguousarray(keys[lexsort_keys(keys)])


def sorted_union(*arrays: np.ndarray) -> np.ndarray:
    keys = np.concatenate(arrays)
    return np.ascontiguousarray(keys[lexsort_keys(keys)])


@pytest.mark.parametrize("hosts, nbytes", [(8, 1), (16, 8), (24, 64), (512, 3)])
def test_columns_transpose_matches_unpackbits(hosts, nbytes):
    host_bits = np.random.default_rng(hosts).integers(0, 256, size=(hosts, nbytes), dtype=np.uint8)
    columns = hosts_to_columns(host_bits)
    reference = np.packbits(np.unpackbits(host_bits, axis=1).T, axis=1)
    assert np.array_equal(columns, reference)
    assert np.array_equal(columns_to_hosts(columns), host_bits)


def make_fleet(rng, query_keys, shares, sizes, params=PARAMS, zero=None):
    """Hosts holding ``share`` of the query's keys plus ``size`` keys of their own."""
    fleet = FleetSketches(params.m_bits, params.k)
    held = []
    for number, (share, size) in enumerate(zip(shares, sizes)):
        mine = query_keys[rng.random(len(query_keys)) < share]
        keys = sorted_union(mine, random_keys(rng, size))
        counts = np.ones(len(keys), dtype=np.int64)
        fleet.put([(f"h{number}", RankSketch.build(keys, counts, params), True if zero is None else zero[number],
                    number)])
        held.append(keys)
    return fleet, held


def test_probe_hits_equal_per_host_filter_lookups():
    rng = np.random.default_rng(1)
    query = random_keys(rng, 6000)
    counts = rng.choice([1, 1, 2, 3, 40], size=len(query)).astype(np.int64)
    fleet, _ = make_fleet(rng, query, [0.9, 0.5, 0.1, 0.0, 0.7, 0.3, 0.2, 0.6, 0.4],
                          [100, 3000, 20_000, 500, 8000, 1000, 0, 40_000, 2500])
    probes = ProbeSet.build(query, counts, int(counts.sum()) + 7, 7, max_light=2000)
    light, heavy = fleet.probe_hits(probes)
    for column, host in enumerate(fleet.hosts):
        bits = fleet.host_bits(host)
        bloom = BloomFilter(fleet.m_bits, fleet.k, bits)
        hit = bloom.contains(probes.light_keys)
        level = 64 - np.searchsorted(np.array([1 << i for i in range(64)], dtype=np.uint64),
                                     probes.light_keys[:, 0], side="right")
        c = probes.light_counts.astype(np.float64)
        for lv in np.unique(level):
            at = hit & (level == lv)
            assert light[lv, :, column].tolist() == pytest.approx([at.sum(), c[at].sum(), (c[at] ** 2).sum()])
        hh = bloom.contains(probes.heavy_keys)
        hc = probes.heavy_counts.astype(np.float64)
        assert heavy[:, column].tolist() == pytest.approx([hh.sum(), hc[hh].sum(), (hc[hh] ** 2).sum()])


def test_put_replace_and_remove_keep_every_column():
    rng = np.random.default_rng(2)
    fleet = FleetSketches(PARAMS.m_bits, PARAMS.k)
    sketches = {f"h{i}": RankSketch.build(random_keys(rng, 3000), np.ones(3000), PARAMS) for i in range(21)}
    fleet.put((host, sketch, True, 1) for host, sketch in sketches.items())
    sketches["h3"] = RankSketch.build(random_keys(rng, 5000), np.ones(5000), PARAMS)
    fleet.put([("h3", sketches["h3"], False, 2)])
    fleet.remove("h5")
    fleet.remove("h20")
    del sketches["h5"], sketches["h20"]
    assert sorted(fleet.hosts) == sorted(sketches) and len(fleet) == 19
    for host, sketch in sketches.items():
        assert np.array_equal(fleet.host_bits(host), sketch.resized(PARAMS.m_bits).bits), host
    assert fleet.tag("h3") == 2 and fleet.tag("h4") == 1 and fleet.tag("h5") is None
    assert not fleet.has_zero[fleet.hosts.index("h3")]


def test_estimates_land_within_their_error_bars():
    rng = np.random.default_rng(3)
    query = random_keys(rng, 30_000)
    counts = rng.choice([1, 1, 1, 2, 3], size=len(query)).astype(np.int64)
    shares = np.linspace(0, 0.95, 24)
    fleet, held = make_fleet(rng, query, shares, [40_000] * 24, params=RankParams(m_bits=1 << 16, k=4))
    zero_blocks = 10_000
    total = int(counts.sum()) + zero_blocks
    estimate = fleet.estimate(ProbeSet.build(query, counts, total, zero_blocks))
    assert (estimate.shift > 0).all()  # the sample is exercised
    inside = 0
    for column, keys in enumerate(held):
        mask = exact_contains(keys, query)
        shared = zero_blocks + counts[mask].sum()
        unique = 1 + mask.sum()
        assert abs(estimate.shared_blocks[column] - shared) < 4 * estimate.shared_se[column] + 1
        assert abs(estimate.shared_unique_blocks[column] - unique) < 4 * estimate.shared_unique_se[column] + 1
        inside += abs(estimate.shared_blocks[column] - shared) <= 1.96 * estimate.shared_se[column]
        assert abs(estimate.shared_blocks[column] - shared) / total < 0.02
    assert inside >= 20  # ~95% of 24


def test_false_positives_are_corrected_on_a_host_sharing_nothing():
    rng = np.random.default_rng(4)
    query = random_keys(rng, 4000)
    counts = np.ones(len(query), dtype=np.int64)
    crowded = RankParams(m_bits=1 << 14, k=4, fp_rate=0.3)  # a filter full enough for many false hits
    fleet, _ = make_fleet(rng, query, [0.0], [200_000], params=crowded)
    probes = ProbeSet.build(query, counts, 4000, 0)
    light, _ = fleet.probe_hits(probes)
    assert light[:, 0, 0].sum() > 0.05 * probes.rows_at[int(fleet.shift[0])]  # many raw false hits
    estimate = fleet.estimate(probes)
    assert estimate.fp_rate[0] > 0.05
    assert estimate.shared_blocks[0] < 3 * estimate.shared_se[0] + 40


def test_zero_blocks_count_only_for_hosts_with_zero_blocks():
    rng = np.random.default_rng(5)
    query = random_keys(rng, 2000)
    counts = np.ones(len(query), dtype=np.int64)
    fleet, _ = make_fleet(rng, query, [0.0, 0.0], [100, 100], zero=[True, False])
    estimate = fleet.estimate(ProbeSet.build(query, counts, 3000, 1000))
    assert estimate.shared_blocks[0] == pytest.approx(1000, abs=5)
    assert estimate.shared_unique_blocks[0] == pytest.approx(1, abs=1)
    assert estimate.shared_blocks[1] == pytest.approx(0, abs=5)


def test_heavy_digests_are_probed_all_and_weighted_by_count():
    rng = np.random.default_rng(6)
    query = random_keys(rng, 50_000)
    counts = np.ones(len(query), dtype=np.int64)
    heavy = rng.choice(len(query), 30, replace=False)
    counts[heavy] = 5000  # 150,000 of 200,000 blocks in 30 digests
    host_keys = sorted_union(query[heavy], random_keys(rng, 30_000))
    host_counts = np.where(exact_contains(sorted_union(query[heavy]), host_keys), 100, 1)
    fleet = FleetSketches(PARAMS.m_bits, PARAMS.k)
    fleet.put([("h", RankSketch.build(host_keys, host_counts, PARAMS), False, 0)])
    probes = ProbeSet.build(query, counts, int(counts.sum()), 0)
    assert len(probes.heavy_keys) == 30
    estimate = fleet.estimate(probes)
    assert estimate.shared_blocks[0] == pytest.approx(150_000, rel=0.01)


def test_probe_budgets_raise_the_shift_and_the_heavy_threshold():
    rng = np.random.default_rng(7)
    query = random_keys(rng, 100_000)
    counts = rng.choice([1, 20, 30], size=len(query), p=[0.9, 0.05, 0.05]).astype(np.int64)
    probes = ProbeSet.build(query, counts, int(counts.sum()), 0, max_light=5000, max_heavy=6000)
    assert len(probes.light_keys) <= 5000 and probes.shift >= 4
    assert probes.heavy_threshold == 21 and (probes.heavy_counts == 30).all()
    assert probes.light_distinct == np.count_nonzero(counts <= 20)
    assert probes.rows_at[probes.shift] == len(probes.light_keys)
    assert ProbeSet.build(query, counts, int(counts.sum()), 0, min_shift=9).shift == 9


def test_an_empty_fleet_estimates_nothing():
    fleet = FleetSketches(PARAMS.m_bits, PARAMS.k)
    query = random_keys(np.random.default_rng(8), 10)
    estimate = fleet.estimate(ProbeSet.build(query, np.ones(10), 10, 0))
    assert estimate.hosts == [] and len(estimate.shared_blocks) == 0


def test_mismatched_k_is_refused():
    fleet = FleetSketches(PARAMS.m_bits, 5)
    with pytest.raises(UsageError, match="k=4"):
        fleet.put([("h", RankSketch.build(random_keys(np.random.default_rng(9), 10), np.ones(10), PARAMS), True, 0)])


def test_memory_buddies_formula_matches_the_union_form():
    rng = np.random.default_rng(10)
    a, b, shared = random_keys(rng, 20_000), random_keys(rng, 30_000), random_keys(rng, 10_000)
    fa = BloomFilter.from_keys(sorted_union(a, shared), m_bits=1 << 20, k=7)
    fb = BloomFilter.from_keys(sorted_union(b, shared), m_bits=1 << 20, k=7)
    m = fa.m_bits
    xa, xb, xand = fa.popcount(), fb.popcount(), int(np.bitwise_count(fa.bits & fb.bits).sum())
    paper = float(memory_buddies_shared(m, 7, m - xa, m - xb, m - xand))
    assert paper == pytest.approx(intersection_cardinality(m, 7, xa, xb, xand), rel=1e-4)
    assert paper == pytest.approx(10_000, rel=0.05)
