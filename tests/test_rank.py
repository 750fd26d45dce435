"""Ranking a fleet: rank_fleet over in-memory sketches, rank_image over a real Redis index."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import redis

from sketch.blockmap import BlockMap, lexsort_keys
from sketch.digests import digest_image
from sketch.errors import BlockSizeMismatch, FormatError, ImageError, NotFound, UsageError
from sketch.estimate import FleetSketches
from sketch.metrics import share_metrics
from sketch.rank import RankQuery, rank_fleet
from sketch.ranksketch import RankParams, RankSketch
from sketch.sample import random_blocks, write_image
from store import open_store, refresh_host, sketches
from store.ranking import RANK_SKETCH, load_fleet, rank_image

PARAMS = RankParams(m_bits=1 << 15, k=4)


def keyed_map(keys: np.ndarray, counts: np.ndarray, zero_blocks: int) -> BlockMap:
    order = lexsort_keys(keys)
    return BlockMap(4096, int(counts.sum()) + zero_blocks, zero_blocks, np.ascontiguousarray(keys[order]),
                    counts[order].astype(np.uint32), np.zeros(len(keys), dtype=np.uint64))


def memory_fleet(seed: int = 1, shares=(0.8, 0.5, 0.2, 0.0)):
    """A query map and hosts of two images each holding ``share`` of its keys, as sketches and maps."""
    rng = np.random.default_rng(seed)
    query_keys = rng.integers(0, 2**64, size=(20_000, 2), dtype=np.uint64)
    query = keyed_map(query_keys, rng.choice([1, 1, 2], size=20_000), 5000)
    fleet = FleetSketches(PARAMS.m_bits, PARAMS.k)
    maps = {}
    for number, share in enumerate(shares):
        images = []
        for half in range(2):
            mine = query_keys[rng.random(20_000) < share * (0.8 if half else 0.6)]
            keys = np.concatenate([mine, rng.integers(0, 2**64, size=(15_000, 2), dtype=np.uint64)])
            images.append(keyed_map(keys, np.ones(len(keys), dtype=np.int64), 100))
        host = f"host-{number}"
        maps[host] = [(f"/img/{host}/vm{i}.img", m) for i, m in enumerate(images)]
        fleet.put([(host, RankSketch.from_block_maps(images, PARAMS), True, 0)])
    return RankQuery.from_block_map(query, "query.img"), fleet, maps


def test_rank_fleet_confirms_the_best_estimates_exactly():
    query, fleet, maps = memory_fleet()
    result = rank_fleet(query, fleet, lambda host: maps[host], top=10, exact_top=3,
                        host_details={h: {"images": 2, "size_bytes": 123} for h in maps})
    assert result["winner"] == "host-0" and result["winner_by"] == "exact"
    assert result["estimate_order_agrees"] is True and result["hosts_ranked"] == 4
    assert [h["host"] for h in result["hosts"]] == ["host-0", "host-1", "host-2", "host-3"]
    source = query.block_map()
    for row in result["hosts"]:
        exact = share_metrics(source, [m for _, m in maps[row["host"]]])
        if row["exact_rank"] is None:
            assert row["host"] == "host-3" and row["exact_shared_ratio"] is None
        else:
            assert (row["exact_shared_ratio"], row["exact_shared_unique_ratio"], row["send_blocks"]) == (
                exact.shared_ratio, exact.shared_unique_ratio, exact.send_blocks)
        assert abs(row["estimated_shared_ratio"] - exact.shared_ratio) < 0.02
        assert abs(row["estimated_shared_unique_ratio"] - exact.shared_unique_ratio) < 0.02
        assert 0 < row["estimate_error"] < 0.03 and (row["images"], row["size_bytes"]) == (2, 123)
    best = result["best_image"]
    per_image = [share_metrics(source, [m]).shared_ratio for _, m in maps["host-0"]]
    assert best["path"] == maps["host-0"][int(np.argmax(per_image))][0]
    assert best["shared_ratio"] == max(per_image)


def test_a_wrong_estimate_order_is_reported():
    query, fleet, maps = memory_fleet(shares=(0.8, 0.5, 0.2))
    # host-2's block maps now hold more than its (stale) sketch says.
    maps["host-2"], maps["host-0"] = maps["host-0"], maps["host-2"]
    result = rank_fleet(query, fleet, lambda host: maps[host], exact_top=3)
    assert result["winner"] == "host-2" and result["estimate_winner"] == "host-0"
    assert result["estimate_order_agrees"] is False
    assert [h["exact_rank"] for h in result["hosts"]] == [1, 2, 3]
    assert [h["estimate_rank"] for h in result["hosts"]] == [3, 2, 1]


def test_estimate_only_and_exclusions():
    query, fleet, maps = memory_fleet()
    result = rank_fleet(query, fleet, None, top=2, exclude_hosts=["host-0"])
    assert result["winner"] == "host-1" and result["winner_by"] == "estimate"
    assert result["best_image"] is None and result["estimate_order_agrees"] is None
    assert [h["host"] for h in result["hosts"]] == ["host-1", "host-2"]
    assert all(h["exact_shared_ratio"] is None for h in result["hosts"])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(exclude_hosts=["nowhere"]), NotFound, "cannot exclude unknown host nowhere"),
    (dict(exclude_hosts=["host-0", "host-1", "host-2", "host-3"]), NotFound, "no host left"),
    (dict(top=0), UsageError, "--top"),
])
def test_bad_rank_requests(kwargs, error, message):
    query, fleet, maps = memory_fleet()
    with pytest.raises(error, match=message):
        rank_fleet(query, fleet, lambda host: maps[host], **kwargs)


def test_empty_fleet_and_all_zero_image_are_clear_errors():
    query, fleet, _ = memory_fleet()
    with pytest.raises(NotFound, match="no hosts"):
        rank_fleet(query, FleetSketches(PARAMS.m_bits, PARAMS.k))
    zeros = RankQuery(4096, 10, 10, np.zeros((0, 2), dtype=np.uint64), np.zeros(0, dtype=np.int64), "zeros.img")
    with pytest.raises(ImageError, match="no non-zero blocks"):
        rank_fleet(zeros, fleet)


def test_query_from_client_arrays_is_sorted_and_checked():
    rng = np.random.default_rng(2)
    digests = rng.integers(0, 256, size=(50, 16), dtype=np.uint8)
    counts = rng.integers(1, 4, size=50)
    query = RankQuery.from_arrays(4096, int(counts.sum()) + 5, 5, digests, counts, "client.img")
    reference = RankQuery.from_block_map(keyed_map(query.keys, query.counts, 5))
    assert np.array_equal(query.keys, reference.keys) and np.array_equal(query.counts, reference.counts)
    with pytest.raises(FormatError, match="sorted and unique"):
        RankQuery.from_arrays(4096, int(counts.sum()) * 2, 0, np.concatenate([digests, digests]),
                              np.concatenate([counts, counts]))
    with pytest.raises(FormatError, match="differ from total blocks"):
        RankQuery.from_arrays(4096, 3, 0, digests, counts)
    with pytest.raises(FormatError, match="one integer count per digest"):
        RankQuery.from_arrays(4096, 3, 0, digests, counts[:10])


# -- against a real index --------------------------------------------------------------------


def write_host(directory, rng, source_blocks, share, fresh=600, block_size=4096) -> list[str]:
    """Two images holding ``share`` of the source's distinct data blocks between them, fresh data and zeros."""
    os.makedirs(directory, exist_ok=True)
    data = np.unique(source_blocks[source_blocks.any(axis=1)], axis=0)
    chosen = data[rng.random(len(data)) < share]
    halves = np.array_split(chosen, 2)
    paths = []
    for number, part in enumerate(halves):
        blocks = np.concatenate([part, random_blocks(rng, fresh, block_size), np.zeros((200, block_size), np.uint8)])
        path = os.path.join(directory, f"vm{number}.img")
        write_image(path, blocks[rng.permutation(len(blocks))])
        paths.append(path)
    return paths


@pytest.fixture
def indexed(tmp_path, redis_url):
    rng = np.random.default_rng(3)
    source = np.concatenate([random_blocks(rng, 1500, 4096), np.zeros((500, 4096), np.uint8)])
    source = np.concatenate([source, source[:300]])  # some repeats
    write_image(str(tmp_path / "source.img"), source)
    hosts = {}
    with open_store(redis_url) as store:
        for host, share in (("ams-1", 0.7), ("fra-2", 0.4), ("lon-3", 0.1)):
            hosts[host] = write_host(tmp_path / host, rng, source, share)
            refresh_host(store, host, hosts[host], 4096)
    return redis_url, str(tmp_path / "source.img"), hosts


def test_rank_image_indexed_and_local(indexed):
    url, source, hosts = indexed
    with open_store(url) as store:
        local = rank_image(store, RankQuery.from_digests(digest_image(source, 4096)))
        assert local["winner"] == "ams-1" and local["hosts_ranked"] == 3
        assert [h["host"] for h in local["hosts"]] == ["ams-1", "fra-2", "lon-3"]
        target = [BlockMap.from_digests(digest_image(p, 4096)) for p in hosts["ams-1"]]
        expected = share_metrics(BlockMap.from_digests(digest_image(source, 4096)), target)
        assert local["hosts"][0]["exact_shared_ratio"] == expected.shared_ratio
        assert local["hosts"][0]["images"] == 2
        on_host = rank_image(store, f"fra-2:{hosts['fra-2'][0]}", exact_top=1)
        assert on_host["excluded_hosts"] == ["fra-2"] and on_host["hosts_ranked"] == 2
        assert on_host["image"] == f"fra-2:{os.path.realpath(hosts['fra-2'][0])}"


def test_rank_image_errors(indexed, tmp_path):
    url, source, hosts = indexed
    with open_store(url) as store:
        with pytest.raises(NotFound, match="host nowhere is not in the index"):
            rank_image(store, "nowhere:/x.img")
        with pytest.raises(NotFound, match="no image /x.img on host ams-1"):
            rank_image(store, "ams-1:/x.img")
        with pytest.raises(BlockSizeMismatch):
            rank_image(store, RankQuery.from_digests(digest_image(source, 512)))
        with pytest.raises(BlockSizeMismatch):
            rank_image(store, "ams-1:" + hosts["ams-1"][0], block_size=512)


def test_warm_fleet_follows_refreshes_and_builds_missing_sketches(indexed, tmp_path, monkeypatch):
    url, source, hosts = indexed
    with open_store(url) as store:
        fleet, _ = load_fleet(store)
        before = fleet.tag("lon-3")
        refresh_host(store, "lon-3", hosts["lon-3"][:1], 4096)
        assert load_fleet(store, max_age_s=3600)[0].tag("lon-3") == before  # a recent check is reused
        # A host indexed without a ranking sketch (by an older blocksketch) gets one from its maps.
        without = dict(sketches.HOST_SKETCHES)
        del without[RANK_SKETCH]
        monkeypatch.setattr(sketches, "HOST_SKETCHES", without)
        rng = np.random.default_rng(4)
        extra = write_host(tmp_path / "old-4", rng, np.zeros((1, 4096), np.uint8), 0.0)
        refresh_host(store, "old-4", extra, 4096)
        monkeypatch.undo()
        assert RANK_SKETCH not in store.catalogue("old-4").sketches
        again, catalogues = load_fleet(store)
        assert again.tag("lon-3") != before and "old-4" in again
        assert fleet.tag("lon-3") == before and "old-4" not in fleet  # updates swap in a copy
        fleet = again
        maps = [m for _, m in store.host_block_maps("old-4")]
        built = RankSketch.from_block_maps(maps).resized(fleet.m_bits)
        assert np.array_equal(fleet.host_bits("old-4"), built.bits)
        data, _ = store.host_sketch("lon-3", RANK_SKETCH)
        assert np.array_equal(fleet.host_bits("lon-3"), RankSketch.from_bytes(data).resized(fleet.m_bits).bits)


def test_rank_image_on_a_cluster(tmp_path, redis_cluster):
    for node in redis_cluster.nodes:
        client = redis.Redis(port=node.port)
        client.flushall()
        client.close()
    rng = np.random.default_rng(5)
    source = random_blocks(rng, 600, 4096)
    write_image(str(tmp_path / "source.img"), source)
    with open_store(redis_cluster.url) as store:
        for host, share in (("a", 0.2), ("b", 0.6)):
            refresh_host(store, host, write_host(tmp_path / host, rng, source, share, fresh=100), 4096)
        result = rank_image(store, RankQuery.from_digests(digest_image(str(tmp_path / "source.img"), 4096)))
    assert result["winner"] == "b" and result["estimate_order_agrees"] is True


def test_concurrent_ranks_share_the_warm_fleet_while_a_host_refreshes(indexed):
    url, source, hosts = indexed
    query = RankQuery.from_digests(digest_image(source, 4096))
    failures = []

    def ranker():
        with open_store(url) as store:
            for _ in range(4):
                try:
                    result = rank_image(store, query)
                    assert result["winner"] == "ams-1" and result["hosts_ranked"] == 3
                except Exception as exc:  # collected: an assert in a thread would be lost
                    failures.append(exc)

    threads = [threading.Thread(target=ranker) for _ in range(3)]
    for thread in threads:
        thread.start()
    with open_store(url) as store:
        for turn in range(4):
            refresh_host(store, "lon-3", hosts["lon-3"][: 1 + turn % 2], 4096)
    for thread in threads:
        thread.join()
    assert failures == []
