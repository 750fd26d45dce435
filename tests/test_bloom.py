import math

import numpy as np
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from sketch.blockmap import digest_keys, key_digests
from sketch.bloom import (
    LAYOUT_VERSION,
    MIN_BITS,
    BloomFilter,
    _or_in_place,
    _packed_flags,
    bit_positions,
    cardinality,
    false_positive_rate,
    geometry_for,
    intersection_cardinality,
    k_for_fp_rate,
)
from sketch.errors import FormatError, GeometryMismatch, UsageError

U64 = 2**64


def random_keys(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, U64, size=(n, 2), dtype=np.uint64)


def reference_bitmap(keys, m_bits: int, k: int) -> bytes:
    """The filter by its definition, one key and one bit at a time with Python integers."""
    out = bytearray(m_bits // 8)
    for h1, h2 in keys.tolist():
        h2 |= 1
        for i in range(k):
            j = (h1 + i * h2) % U64 % m_bits
            out[j // 8] |= 0x80 >> (j % 8)
    return bytes(out)


key_lists = st.lists(st.tuples(st.integers(0, U64 - 1), st.integers(0, U64 - 1)), max_size=300)


def as_array(pairs) -> np.ndarray:
    return np.array(pairs, dtype=np.uint64).reshape(-1, 2)


@pytest.mark.parametrize("fp_rate, k", [(0.5, 1), (0.3, 2), (0.1, 3), (0.01, 7), (0.001, 10), (1e-6, 20)])
def test_k_depends_only_on_the_fp_rate(fp_rate, k):
    assert k_for_fp_rate(fp_rate) == k
    assert geometry_for(10, fp_rate)[1] == geometry_for(10**7, fp_rate)[1] == k


@pytest.mark.parametrize("capacity, fp_rate, m_bits", [
    (0, 0.01, MIN_BITS), (100, 0.01, MIN_BITS), (1000, 0.01, 16384),
    # 1,000,000 * 7 / ln 2 = 10,098,865 -> 2**24
    (1_000_000, 0.01, 1 << 24), (1_000_000, 0.001, 1 << 24), (2_000_000, 0.001, 1 << 25),
])
def test_m_is_the_smallest_power_of_two_holding_n_k_over_ln2(capacity, fp_rate, m_bits):
    got, k = geometry_for(capacity, fp_rate)
    assert got == m_bits
    assert got >= capacity * k / math.log(2) and (got == MIN_BITS or got / 2 < capacity * k / math.log(2))


@pytest.mark.parametrize("fp_rate", [0, 1, -0.1, 1.5])
def test_impossible_fp_rates_are_usage_errors(fp_rate):
    with pytest.raises(UsageError, match="FP rate"):
        k_for_fp_rate(fp_rate)


def test_a_filter_beyond_redis_string_limit_is_refused():
    with pytest.raises(UsageError, match="512 MiB"):
        geometry_for(10**9, 0.01)


@settings(max_examples=60, deadline=None)
@given(pairs=key_lists, log_m=st.integers(6, 14), k=st.integers(1, 12))
def test_bits_equal_the_plain_reference(pairs, log_m, k):
    keys = as_array(pairs)
    bloom = BloomFilter.create(1 << log_m, k)
    bloom.add(keys)
    assert bloom.to_bytes() == reference_bitmap(keys, 1 << log_m, k)
    positions = bit_positions(keys, 1 << log_m, k)
    assert positions.shape == (len(keys), k) and positions.dtype == np.uint64


def test_both_add_strategies_set_the_same_bits():
    # The bool-scratch path serves big batches, gather-OR-scatter small ones; pin both.
    keys = random_keys(1, 30_000)
    m_bits, k = 1 << 16, 7
    via_flags = _packed_flags(keys, m_bits, k)
    in_place = np.zeros(m_bits // 8, dtype=np.uint8)
    _or_in_place(in_place, keys, m_bits, k)
    reference = np.zeros(m_bits // 8, dtype=np.uint8)
    positions = bit_positions(keys, m_bits, k).ravel()
    np.bitwise_or.at(reference, (positions >> np.uint64(3)).astype(np.intp),
                     (0x80 >> (positions & np.uint64(7)).astype(np.intp)).astype(np.uint8))
    assert np.array_equal(via_flags, reference)
    assert np.array_equal(in_place, reference)


def test_adding_in_small_batches_equals_adding_at_once():
    keys = random_keys(2, 20_000)
    whole = BloomFilter.from_keys(keys)
    pieces = BloomFilter.create(whole.m_bits, whole.k)
    for start in range(0, len(keys), 777):
        pieces.add(keys[start : start + 777])
    assert pieces == whole


def test_digests_and_keys_give_the_same_filter():
    keys = random_keys(3, 1000)
    from_digests = BloomFilter.from_keys(key_digests(keys))
    assert from_digests == BloomFilter.from_keys(keys)
    assert from_digests.contains(key_digests(keys)).all()


@settings(max_examples=40, deadline=None)
@given(pairs=key_lists.filter(len), fp_rate=st.sampled_from([0.5, 0.1, 0.01, 0.0001]))
def test_no_false_negatives(pairs, fp_rate):
    keys = as_array(pairs)
    bloom = BloomFilter.from_keys(keys, fp_rate)
    assert bloom.contains(keys).all()


@pytest.mark.parametrize("fp_rate", [0.1, 0.01, 0.001])
def test_false_positive_rate_on_non_members_is_near_the_target(fp_rate):
    k = k_for_fp_rate(fp_rate)
    m_bits = 1 << 17
    # Fill to exactly the design load (n = m ln2 / k), where the FP rate is ~ 2**-k.
    n = int(m_bits * math.log(2) / k)
    bloom = BloomFilter.from_keys(random_keys(4, n), m_bits=m_bits, k=k)
    probes = 400_000
    measured = bloom.contains(random_keys(5, probes)).mean()
    predicted = bloom.false_positive_rate()
    assert predicted == pytest.approx(false_positive_rate(m_bits, k, bloom.popcount()))
    assert predicted == pytest.approx(2.0**-k, rel=0.1)
    # Binomial noise: 4 standard deviations of the measured rate.
    assert abs(measured - predicted) < 4 * math.sqrt(predicted / probes) + 1e-4
    assert measured < 1.4 * fp_rate


def test_sized_for_capacity_the_fp_rate_stays_below_target():
    keys = random_keys(6, 50_000)
    bloom = BloomFilter.from_keys(keys, 0.01)
    assert bloom.contains(random_keys(7, 200_000)).mean() < 0.01


def test_fold_equals_a_filter_built_at_the_smaller_size():
    keys = random_keys(8, 5000)
    big = BloomFilter.from_keys(keys, m_bits=1 << 18, k=7)
    for m_bits in (1 << 18, 1 << 16, 1 << 13, 64):
        assert big.fold(m_bits) == BloomFilter.from_keys(keys, m_bits=m_bits, k=7)
    assert big.fold(1 << 14).fold(1 << 12) == big.fold(1 << 12)


def test_tile_answers_membership_like_the_original():
    small = BloomFilter.from_keys(random_keys(9, 2000), m_bits=1 << 15, k=7)
    tiled = small.tile(1 << 18)
    j = np.arange(1 << 18)
    assert np.array_equal(np.unpackbits(tiled.bits), np.unpackbits(small.bits)[j % (1 << 15)])
    probes = np.concatenate([random_keys(9, 2000), random_keys(10, 50_000)])
    assert np.array_equal(tiled.contains(probes), small.contains(probes))
    assert tiled.fold(1 << 15).contains(probes).sum() >= small.contains(probes).sum()
    assert small.tile(1 << 15) == small


def test_tiled_small_filter_probes_a_larger_filters_keys():
    # A host's small filter presented at a big filter's size keeps every member.
    members = random_keys(11, 3000)
    tiled = BloomFilter.from_keys(members, m_bits=1 << 15, k=7).tile(1 << 20)
    assert tiled.contains(members).all()


def test_fold_and_tile_refuse_the_wrong_direction():
    bloom = BloomFilter.create(1 << 14, 7)
    with pytest.raises(UsageError, match="use tile"):
        bloom.fold(1 << 15)
    with pytest.raises(UsageError, match="use fold"):
        bloom.tile(1 << 13)
    with pytest.raises(UsageError, match="power of two"):
        bloom.fold(3000)


def test_union_is_the_filter_of_the_union_at_the_smaller_size():
    a, b = random_keys(12, 4000), random_keys(13, 9000)
    small = BloomFilter.from_keys(a, m_bits=1 << 16, k=7)
    large = BloomFilter.from_keys(b, m_bits=1 << 18, k=7)
    both = BloomFilter.from_keys(np.concatenate([a, b]), m_bits=1 << 16, k=7)
    assert small.union(large) == both
    assert large.union(small) == both
    assert small.intersection(large).bits.tolist() == (small.bits & large.fold(1 << 16).bits).tolist()


def test_filters_with_different_k_cannot_be_combined():
    with pytest.raises(GeometryMismatch, match="k=7 and k=10"):
        BloomFilter.create(1 << 12, 7).union(BloomFilter.create(1 << 12, 10))


@pytest.mark.parametrize("n", [100, 1000, 10_000, 100_000])
@pytest.mark.parametrize("oversize", [1, 4])
def test_cardinality_estimate_is_within_a_few_percent(n, oversize):
    keys = random_keys(n + oversize, n)
    bloom = BloomFilter.from_keys(keys, m_bits=geometry_for(n * oversize, 0.01)[0], k=7)
    assert bloom.estimated_cardinality() == pytest.approx(n, rel=0.03)
    assert cardinality(bloom.m_bits, bloom.k, bloom.popcount()) == bloom.estimated_cardinality()


def test_cardinality_is_vectorised_and_infinite_when_full():
    estimates = cardinality(4096, 7, np.array([0, 2048, 4096]))
    assert estimates[0] == 0 and estimates[1] == pytest.approx(4096 / 7 * math.log(2)) and np.isinf(estimates[2])


@pytest.mark.parametrize("n_a, n_b, shared", [(20_000, 20_000, 10_000), (30_000, 10_000, 8_000),
                                               (50_000, 50_000, 25_000), (10_000, 10_000, 0)])
def test_intersection_estimate_is_within_a_few_percent(n_a, n_b, shared):
    common = random_keys(20, shared)
    a = np.concatenate([common, random_keys(21, n_a - shared)])
    b = np.concatenate([common, random_keys(22, n_b - shared)])
    fa, fb = BloomFilter.from_keys(a), BloomFilter.from_keys(b)
    estimate = fa.estimated_intersection(fb)
    union_size = n_a + n_b - shared
    # The error scales with the union (see the docstring): 1% of it bounds it loosely.
    assert abs(estimate - shared) <= max(0.03 * shared, 0.01 * union_size)
    # Same figure from popcounts alone, as a store computes it after BITOP AND + BITCOUNT.
    m_bits = min(fa.m_bits, fb.m_bits)
    x_a, x_b = fa.fold(m_bits).popcount(), fb.fold(m_bits).popcount()
    x_and = fa.intersection(fb).popcount()
    assert intersection_cardinality(m_bits, 7, x_a, x_b, x_and) == pytest.approx(estimate)
    if shared:
        # Why the formula exists: estimating from the AND's popcount counts chance overlaps.
        assert cardinality(m_bits, 7, x_and) > 1.1 * shared


def test_intersection_estimate_is_vectorised_over_hosts():
    got = intersection_cardinality(4096, 7, np.array([1000, 1000]), np.array([1000, 1500]), np.array([300, 900]))
    assert got.shape == (2,) and (got >= 0).all()


def test_bytes_round_trip_and_meta_names_the_layout():
    bloom = BloomFilter.from_keys(random_keys(30, 500))
    data = bloom.to_bytes()
    assert len(data) == bloom.m_bits // 8
    assert BloomFilter.from_bytes(data, bloom.m_bits, bloom.k) == bloom
    meta = bloom.meta()
    assert meta == {"schema": "blocksketch.bloom", "version": LAYOUT_VERSION, "m_bits": bloom.m_bits, "k": 7}
    assert BloomFilter.from_meta(data, meta) == bloom


@pytest.mark.parametrize("length_delta", [-1, 1, -512])
def test_from_bytes_rejects_a_wrong_length(length_delta):
    data = bytes(4096 // 8 + length_delta)
    with pytest.raises(FormatError, match="truncated or corrupt"):
        BloomFilter.from_bytes(data, 4096, 7)


@pytest.mark.parametrize("m_bits, k", [(4000, 7), (4096, 0), (0, 7)])
def test_from_bytes_rejects_an_impossible_geometry(m_bits, k):
    with pytest.raises(FormatError, match="impossible geometry"):
        BloomFilter.from_bytes(bytes(512), m_bits, k)


def test_from_meta_rejects_an_unknown_version():
    meta = {"schema": "blocksketch.bloom", "version": LAYOUT_VERSION + 1, "m_bits": 4096, "k": 7}
    with pytest.raises(FormatError, match="version"):
        BloomFilter.from_meta(bytes(512), meta)


def test_bit_order_agrees_with_redis_getbit_bitcount_and_bitop(redis_url):
    client = redis.Redis.from_url(redis_url)
    keys_a, keys_b = random_keys(40, 3000), random_keys(41, 3000)
    a = BloomFilter.from_keys(np.concatenate([keys_a, keys_b[:1000]]), m_bits=1 << 16, k=7)
    b = BloomFilter.from_keys(keys_b, m_bits=1 << 16, k=7)
    client.set("a", a.to_bytes())
    client.set("b", b.to_bytes())
    assert client.bitcount("a") == a.popcount()
    pipe = client.pipeline()
    for position in bit_positions(keys_a[:50], a.m_bits, a.k).ravel().tolist():
        pipe.getbit("a", position)
    assert all(pipe.execute())
    unset = np.flatnonzero(np.unpackbits(a.bits) == 0)[:200].tolist()
    pipe = client.pipeline()
    for position in unset:
        pipe.getbit("a", position)
    assert not any(pipe.execute())
    client.bitop("AND", "a&b", "a", "b")
    client.bitop("OR", "a|b", "a", "b")
    assert client.get("a&b") == a.intersection(b).to_bytes()
    assert client.get("a|b") == a.union(b).to_bytes()
    assert client.bitcount("a&b") == a.intersection(b).popcount()
    client.close()


def test_a_filter_built_with_redis_setbit_equals_ours(redis_url):
    client = redis.Redis.from_url(redis_url)
    keys = random_keys(42, 200)
    client.setbit("f", 4096 - 1, 0)  # size the string to m bits
    pipe = client.pipeline()
    for position in bit_positions(keys, 4096, 7).ravel().tolist():
        pipe.setbit("f", position, 1)
    pipe.execute()
    assert client.get("f") == BloomFilter.from_keys(keys, m_bits=4096, k=7).to_bytes()
    client.close()


def test_wrong_key_shapes_are_rejected():
    with pytest.raises(TypeError, match=r"\(n, 2\) uint64"):
        BloomFilter.create(4096, 7).add(np.zeros((3, 2), dtype=np.int64))
    assert BloomFilter.create(4096, 7).contains(np.zeros((0, 2), dtype=np.uint64)).shape == (0,)
    assert np.array_equal(digest_keys(key_digests(random_keys(1, 3))), random_keys(1, 3))
