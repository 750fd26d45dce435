"""The exact pass gives exactly what `compare` gives against the union of a host's images."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sketch.blockmap import BlockMap, lexsort_keys
from sketch.digests import digest_image
from sketch.errors import BlockSizeMismatch
from sketch.exact import best_image, exact_share, host_mask
from sketch.metrics import share_metrics
from sketch.sample import mixed_image, random_blocks, write_image


def block_map(keys: np.ndarray, counts: np.ndarray, zero_blocks: int, block_size: int = 4096) -> BlockMap:
    order = lexsort_keys(keys)
    return BlockMap(block_size, int(counts.sum()) + zero_blocks, zero_blocks, np.ascontiguousarray(keys[order]),
                    counts[order].astype(np.uint32), np.zeros(len(keys), dtype=np.uint64))


def test_exact_pass_equals_compare_on_real_images(tmp_path):
    rng = np.random.default_rng(1)
    pool = random_blocks(rng, 800, 4096)
    paths = []
    for number, share in enumerate((0.6, 0.3, 0.0, 0.9)):
        path = str(tmp_path / f"vm{number}.img")
        write_image(path, mixed_image(rng, pool, share, 800, zero_fraction=0.0 if number == 2 else 0.3))
        paths.append(path)
    source, *targets = (BlockMap.from_digests(digest_image(p, 4096)) for p in paths)
    result = exact_share(source, targets)
    assert result.metrics == share_metrics(source, targets)
    assert result.digests == len(source.keys) + sum(len(t.keys) for t in targets)
    assert result.probes >= len(source.keys) and result.seconds > 0
    index, metrics = best_image(source, targets)
    assert index == 2 and metrics == share_metrics(source, [targets[2]])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_host_mask_matches_python_sets(data):
    universe = np.random.default_rng(data.draw(st.integers(0, 1000))).integers(0, 2**64, size=(60, 2),
                                                                                dtype=np.uint64)
    # Some keys share their first word, so the collision path of the lookup is exercised too.
    universe[1::7, 0] = universe[0, 0]
    pick = st.lists(st.integers(0, 59), unique=True, max_size=40)
    query_rows = data.draw(pick)
    image_rows = data.draw(st.lists(pick, max_size=4))
    query = block_map(universe[query_rows], np.ones(len(query_rows), dtype=np.int64), 3)
    images = [block_map(universe[rows], np.ones(len(rows), dtype=np.int64), 0) for rows in image_rows]
    held = {tuple(universe[r]) for rows in image_rows for r in rows}
    mask, _ = host_mask(query, images)
    assert mask.tolist() == [tuple(key) in held for key in query.keys]
    assert exact_share(query, images).metrics == share_metrics(query, images)


def test_ties_pick_more_shared_distinct_then_the_earlier_image():
    keys = np.random.default_rng(2).integers(0, 2**64, size=(10, 2), dtype=np.uint64)
    query = block_map(keys[:4], np.array([3, 1, 1, 1]), 0)
    once = block_map(keys[:1], np.array([1]), 0)  # 3 shared blocks, 1 distinct
    three = block_map(keys[1:4], np.array([1, 1, 1]), 0)  # 3 shared blocks, 3 distinct
    assert best_image(query, [once, three])[0] == 1
    assert best_image(query, [three, three])[0] == 0
    assert best_image(query, []) is None


def test_block_size_mismatch_is_refused():
    keys = np.random.default_rng(3).integers(0, 2**64, size=(4, 2), dtype=np.uint64)
    with pytest.raises(BlockSizeMismatch):
        exact_share(block_map(keys, np.ones(4), 0, 4096), [block_map(keys, np.ones(4), 0, 512)])
