"""The per-host ranking sketch: which keys it keeps, its byte format, resizing."""

from __future__ import annotations

import numpy as np
import pytest

from sketch.blockmap import BlockMap, lexsort_keys
from sketch.bloom import BloomFilter
from sketch.errors import FormatError, UsageError
from sketch.ranksketch import HEADER_SIZE, RankParams, RankSketch, sample_prefix, sample_sizes, union_with_counts


def random_keys(seed: int, n: int) -> np.ndarray:
    keys = np.random.default_rng(seed).integers(0, 2**64, size=(n, 2), dtype=np.uint64)
    return np.ascontiguousarray(keys[lexsort_keys(keys)])


def contains(sketch: RankSketch, keys: np.ndarray) -> np.ndarray:
    return BloomFilter(sketch.m_bits, sketch.k, sketch.bits).contains(keys)


SMALL = RankParams(m_bits=1 << 14, k=4)


def test_small_host_keeps_every_key_in_a_smaller_filter():
    keys = random_keys(1, 300)
    sketch = RankSketch.build(keys, np.ones(300), SMALL)
    assert sketch.shift == 0 and sketch.sampled == 300 and sketch.heavy == 0
    assert sketch.m_bits < SMALL.m_bits  # stored small, tiled back on load
    assert contains(sketch, keys).all()
    tiled = sketch.resized(SMALL.m_bits)
    assert tiled.m_bits == SMALL.m_bits and contains(tiled, keys).all()
    assert abs(tiled.fp_rate - sketch.fp_rate) < 1e-12


def test_big_host_samples_by_first_word_within_capacity():
    keys = random_keys(2, 40_000)
    sketch = RankSketch.build(keys, np.ones(len(keys)), SMALL)
    assert sketch.shift > 0 and sketch.m_bits == SMALL.m_bits
    assert sketch.sampled <= SMALL.capacity < sample_prefix(keys[:, 0], sketch.shift - 1)
    bound = np.uint64(1 << (64 - sketch.shift))
    sampled = keys[keys[:, 0] < bound]
    assert len(sampled) == sketch.sampled and contains(sketch, sampled).all()
    assert sketch.fp_rate <= SMALL.fp_rate
    assert sketch.distinct == len(keys)


def test_heavy_keys_are_kept_outside_the_sample():
    keys = random_keys(3, 40_000)
    counts = np.ones(len(keys), dtype=np.int64)
    heavy = np.arange(0, len(keys), 97)
    counts[heavy] = 50
    sketch = RankSketch.build(keys, counts, SMALL)
    assert sketch.heavy_threshold == SMALL.heavy_threshold
    assert contains(sketch, keys[heavy]).all()
    outside = keys[heavy][keys[heavy][:, 0] >= np.uint64(1 << (64 - sketch.shift))]
    assert sketch.heavy == len(outside) > 0


def test_too_many_heavy_keys_raise_the_threshold_to_keep_the_most_frequent():
    keys = random_keys(4, 20_000)
    counts = np.full(len(keys), 20, dtype=np.int64)
    counts[:100] = 1000
    sketch = RankSketch.build(keys, counts, SMALL)
    assert sketch.heavy_threshold > 20
    assert contains(sketch, keys[:100]).all()
    assert sketch.sampled + sketch.heavy <= SMALL.capacity


def test_presampled_build_equals_full_build():
    keys = random_keys(5, 60_000)
    counts = np.random.default_rng(5).choice([1, 1, 1, 2, 30], size=len(keys))
    full = RankSketch.build(keys, counts, SMALL)
    keep = (keys[:, 0] < np.uint64(1 << (64 - full.shift))) | (counts >= SMALL.heavy_threshold)
    part = RankSketch.build(keys[keep], counts[keep], SMALL, min_shift=full.shift, distinct=len(keys))
    assert part.to_bytes() == full.to_bytes()


def test_bytes_round_trip():
    sketch = RankSketch.build(random_keys(6, 30_000), np.ones(30_000), SMALL)
    data = sketch.to_bytes()
    assert data[:4] == b"BSRK" and len(data) == HEADER_SIZE + sketch.m_bits // 8 == sketch.size_bytes
    again = RankSketch.from_bytes(data)
    assert (again.m_bits, again.k, again.shift, again.distinct, again.sampled, again.heavy) == (
        sketch.m_bits, sketch.k, sketch.shift, sketch.distinct, sketch.sampled, sketch.heavy)
    assert np.array_equal(again.bits, sketch.bits)


@pytest.mark.parametrize("damage, message", [
    (lambda d: b"XXXX" + d[4:], "bad magic"),
    (lambda d: d[:4] + (2).to_bytes(2, "little") + d[6:], "unknown version"),
    (lambda d: d[:-1], "impossible header or length"),
    (lambda d: d[:-1] + bytes([d[-1] ^ 0x01]), "bit count differs"),
    (lambda d: d[:10], "only 10 bytes"),
])
def test_damaged_bytes_are_format_errors(damage, message):
    data = RankSketch.build(random_keys(7, 1000), np.ones(1000), SMALL).to_bytes()
    with pytest.raises(FormatError, match=message):
        RankSketch.from_bytes(damage(data))


def test_fold_keeps_members():
    keys = random_keys(8, 20_000)
    sketch = RankSketch.build(keys, np.ones(len(keys)), SMALL)
    folded = sketch.resized(SMALL.m_bits // 4)
    sampled = keys[: sketch.sampled]
    assert contains(folded, sampled).all() and folded.fp_rate > sketch.fp_rate


def test_sample_sizes_are_nested_prefixes():
    words = random_keys(9, 10_000)[:, 0]
    sizes = sample_sizes(words)
    assert sizes[0] == 10_000 and (np.diff(sizes) <= 0).all() and sizes[64] == 0
    for shift in (1, 3, 7):
        assert sizes[shift] == np.count_nonzero(words < np.uint64(1 << (64 - shift))) == sample_prefix(words, shift)


def test_union_with_counts_sums_over_images():
    keys = random_keys(10, 300)
    a = BlockMap(4096, 210, 10, keys[:200], np.full(200, 1, np.uint32), np.zeros(200, np.uint64))
    b = BlockMap(4096, 300, 0, keys[100:], np.full(200, 2, np.uint32), np.zeros(200, np.uint64))
    union, counts = union_with_counts([a, b])
    assert np.array_equal(union, keys)
    assert counts[:100].tolist() == [1] * 100 and counts[100:200].tolist() == [3] * 100
    assert counts[200:].tolist() == [2] * 100


@pytest.mark.parametrize("params", [dict(m_bits=1000), dict(k=0), dict(fp_rate=1.5), dict(heavy_threshold=1)])
def test_bad_parameters_are_usage_errors(params):
    with pytest.raises(UsageError):
        RankParams(**params)
