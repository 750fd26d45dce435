"""Sorting digest keys: the C bucket sort gives exactly numpy's stable lexicographic order."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sketch import blockmap
from sketch.blockmap import SMALL_SORT, lexsort_keys, sort_keys


def reference(keys: np.ndarray) -> np.ndarray:
    return np.lexsort((keys[:, 1], keys[:, 0]))


def keys_of(kind: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 2**64 - 1, size=(n, 2), dtype=np.uint64, endpoint=True)
    if n < 2:
        return keys
    if kind == "repeats":  # many copies of one block, as in clone-heavy or patterned disks
        keys[::3] = keys[1]
    elif kind == "same-high":  # different digests sharing their first 8 bytes
        keys[::2, 0] = keys[0, 0]
    elif kind == "one-bucket":  # all in one top-16-bit bucket
        keys[:, 0] &= np.uint64((1 << 48) - 1)
    elif kind == "all-equal":
        keys[:] = keys[0]
    elif kind == "extremes":
        keys[::4] = 0
        keys[1::4] = np.uint64(2**64 - 1)
    return keys


@pytest.mark.parametrize("kind", ["uniform", "repeats", "same-high", "one-bucket", "all-equal", "extremes"])
@pytest.mark.parametrize("n", [0, 1, SMALL_SORT - 1, SMALL_SORT + 1, 200_000])
def test_the_c_sort_orders_keys_exactly_as_a_stable_lexsort(kind, n):
    keys = keys_of(kind, n)
    order, sorted_keys = sort_keys(keys)
    assert np.array_equal(order, reference(keys))
    assert np.array_equal(sorted_keys, keys[order])
    assert np.array_equal(lexsort_keys(keys), order)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2**64 - 1)), min_size=1, max_size=300))
def test_the_c_sort_agrees_with_lexsort_on_tie_heavy_keys(rows):
    # Few distinct high halves: most comparisons fall through to the low half; the rows repeated
    # past the C sort's threshold make equal keys, ordered by index.
    keys = np.array([[high << 62, low] for high, low in rows], dtype=np.uint64)
    keys = np.resize(keys, (SMALL_SORT + len(rows), 2))
    assert np.array_equal(lexsort_keys(keys), reference(keys))


def test_without_the_c_extension_numpy_sorts_the_same(monkeypatch):
    keys = keys_of("same-high", 50_000)
    fast = lexsort_keys(keys)
    monkeypatch.setattr(blockmap, "_blockhash", None)
    assert np.array_equal(lexsort_keys(keys), fast)
    assert np.array_equal(sort_keys(keys)[1], keys[fast])
