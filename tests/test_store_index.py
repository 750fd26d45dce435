"""The refresh job and the readers, against a real single node and a real 3-master cluster."""

from __future__ import annotations

import os

import numpy as np
import pytest
import redis

from sketch.blockmap import BlockMap, union_keys
from sketch.digests import digest_image
from sketch.errors import BlockSizeMismatch, NotFound
from sketch.sample import mixed_image, random_blocks, write_image
from store import keys, open_store, refresh_host

BLOCK = 512


@pytest.fixture(params=["node", "cluster"])
def store_url(request):
    """A real, empty store: a single node or a 3-master cluster."""
    if request.param == "node":
        return request.getfixturevalue("redis_url")
    cluster = request.getfixturevalue("redis_cluster")
    for node in cluster.nodes:
        client = redis.Redis(port=node.port)
        client.flushall()
        client.close()
    return cluster.url


@pytest.fixture
def store(store_url):
    opened = open_store(store_url)
    yield opened
    opened.close()


def write_fleet(directory, count: int = 3, blocks: int = 600, seed: int = 7, block_size: int = BLOCK) -> list[str]:
    """``count`` small images sharing part of their content, with zeros and repeats."""
    rng = np.random.default_rng(seed)
    pool = random_blocks(rng, blocks, block_size)
    os.makedirs(directory, exist_ok=True)
    paths = []
    for number in range(count):
        path = os.path.join(directory, f"vm{number}.img")
        write_image(path, mixed_image(rng, pool, 0.5, blocks))
        paths.append(path)
    return paths


def direct_map(path: str, block_size: int = BLOCK) -> BlockMap:
    return BlockMap.from_digests(digest_image(path, block_size))


def host_keys(store, host: str) -> set[bytes]:
    return set(store.client.scan_iter(match=keys.host_pattern(host), count=1000))


def referenced_keys(store, host: str) -> set[bytes]:
    catalogue = store.catalogue(host)
    names = [*catalogue.entry_keys(), keys.catalogue(host), keys.generation_counter(host)]
    return {name.encode() for name in names}


def test_index_lists_images_and_hosts_with_exact_counts(store, tmp_path):
    paths = write_fleet(tmp_path / "images")
    report = refresh_host(store, "node-a", [str(tmp_path / "images")], BLOCK)
    assert report.images == 3 and len(report.indexed) == 3 and report.reused == 0
    images = store.images("node-a")
    assert [i.path for i in images] == sorted(os.path.realpath(p) for p in paths)
    for info in images:
        expected = direct_map(info.path)
        assert (info.total_blocks, info.zero_blocks, info.unique_blocks) == (
            expected.total_blocks, expected.zero_blocks, expected.unique_blocks)
        assert info.size_bytes == os.path.getsize(info.path) and info.block_size == BLOCK
        assert info.algorithm == "md5" and info.host == "node-a"
    (host,) = store.hosts()
    union = union_keys([direct_map(p).keys for p in paths])
    assert (host.host, host.images, host.distinct_blocks) == ("node-a", 3, len(union))
    assert host.size_bytes == sum(os.path.getsize(p) for p in paths)
    sketches = store.catalogue("node-a").sketches  # the host filter and any derived sketch (e.g. "rank")
    assert sketches["filter"].size_bytes == len(store.host_filter("node-a").to_bytes())
    assert host.sketch_bytes == sum(s.size_bytes for s in sketches.values())
    assert store.config().block_size == BLOCK and store.config().fp_rate == 0.01


def test_block_maps_and_filters_read_back_exactly(store, tmp_path):
    paths = write_fleet(tmp_path / "images")
    refresh_host(store, "node-a", paths, BLOCK)
    for path in paths:
        expected = direct_map(path)
        stored = store.block_map("node-a", path)
        assert np.array_equal(stored.keys, expected.keys)
        assert np.array_equal(stored.counts, expected.counts)
        assert np.array_equal(stored.first, expected.first)
        assert store.image_filter("node-a", path).contains(expected.keys).all()
    pairs = store.host_block_maps("node-a")
    assert [info.path for info, _ in pairs] == sorted(paths)
    union = union_keys([m.keys for _, m in pairs])
    assert store.host_filter("node-a").contains(union).all()
    filters = store.host_filters()
    assert list(filters) == ["node-a"] and filters["node-a"].to_bytes() == store.host_filter("node-a").to_bytes()


def test_unchanged_rerun_reads_no_image(store, tmp_path):
    write_fleet(tmp_path / "images")
    refresh_host(store, "node-a", [str(tmp_path / "images")], BLOCK)
    before = store.catalogue("node-a")
    again = refresh_host(store, "node-a", [str(tmp_path / "images")], BLOCK)
    assert (again.reused, again.indexed, again.removed, again.bytes_read) == (3, [], [], 0)
    assert not again.sketches_rebuilt
    after = store.catalogue("node-a")
    assert after.generation > before.generation and after.images == before.images
    assert host_keys(store, "node-a") == referenced_keys(store, "node-a")


def test_changed_new_and_deleted_images_are_reflected(store, tmp_path):
    paths = write_fleet(tmp_path / "images")
    refresh_host(store, "node-a", [str(tmp_path / "images")], BLOCK)
    rng = np.random.default_rng(99)
    write_image(paths[0], random_blocks(rng, 300, BLOCK))  # changed: new content, new size
    os.unlink(paths[1])  # deleted
    added = str(tmp_path / "images" / "new.img")
    write_image(added, random_blocks(rng, 100, BLOCK))
    report = refresh_host(store, "node-a", [str(tmp_path / "images")], BLOCK)
    assert sorted(report.indexed) == sorted([paths[0], added])
    assert report.removed == [paths[1]] and report.reused == 1 and report.sketches_rebuilt
    assert sorted(i.path for i in store.images("node-a")) == sorted([paths[0], paths[2], added])
    assert np.array_equal(store.block_map("node-a", paths[0]).keys, direct_map(paths[0]).keys)
    union = union_keys([direct_map(p).keys for p in (paths[0], paths[2], added)])
    assert store.hosts()[0].distinct_blocks == len(union)
    assert store.host_filter("node-a").contains(union).all()
    # Old generations are gone: every key of the host is one the catalogue references.
    assert host_keys(store, "node-a") == referenced_keys(store, "node-a")
    with pytest.raises(NotFound, match="no image"):
        store.block_map("node-a", paths[1])


def test_images_outside_the_given_paths_stay(store, tmp_path):
    first = write_fleet(tmp_path / "a", count=2, seed=1)
    second = write_fleet(tmp_path / "b", count=1, seed=2)
    refresh_host(store, "node-a", [str(tmp_path / "a")], BLOCK)
    refresh_host(store, "node-a", [str(tmp_path / "b")], BLOCK)
    os.unlink(first[0])
    report = refresh_host(store, "node-a", [str(tmp_path / "b")], BLOCK)
    assert report.removed == [] and report.images == 3
    assert sorted(i.path for i in store.images("node-a")) == sorted(first + second)


def test_hosts_are_separate(store, tmp_path):
    refresh_host(store, "node-a", write_fleet(tmp_path / "a", count=1, seed=1), BLOCK)
    refresh_host(store, "node-b", write_fleet(tmp_path / "b", count=2, seed=2), BLOCK)
    assert [(h.host, h.images) for h in store.hosts()] == [("node-a", 1), ("node-b", 2)]
    assert [i.host for i in store.images()] == ["node-a", "node-b", "node-b"]
    assert sorted(store.host_filters(["node-b", "node-a"])) == ["node-a", "node-b"]


def test_block_size_mismatch_names_both_sizes(store, tmp_path):
    with pytest.raises(NotFound, match="index is empty"):
        store.check_block_size(None)
    assert store.config() is None
    paths = write_fleet(tmp_path / "images", count=1)
    refresh_host(store, "node-a", paths, BLOCK)
    with pytest.raises(BlockSizeMismatch, match="512.*4096"):
        refresh_host(store, "node-a", paths, 4096)
    with pytest.raises(BlockSizeMismatch, match="512.*4096"):
        store.check_block_size(4096)
    assert store.check_block_size(None) == 512 and store.check_block_size(512) == 512


def test_unknown_host_and_image_name_what_exists(store, tmp_path):
    paths = write_fleet(tmp_path / "images", count=1)
    refresh_host(store, "node-a", paths, BLOCK)
    with pytest.raises(NotFound, match="host nowhere is not in the index.*node-a"):
        store.images("nowhere")
    with pytest.raises(NotFound, match="no image /x.img on host node-a.*vm0.img"):
        store.image("node-a", "/x.img")
    assert store.image("node-a", "vm0.img").path == paths[0]  # a unique base name is enough


def test_4k_index_and_an_all_zero_image(store, tmp_path):
    path = str(tmp_path / "zero.img")
    write_image(path, np.zeros((16, 4096), dtype=np.uint8))
    data = write_fleet(tmp_path / "images", count=1, block_size=4096)
    refresh_host(store, "node-a", [path, *data], 4096)
    zero = store.image("node-a", path)
    assert (zero.total_blocks, zero.zero_blocks, zero.unique_blocks) == (16, 16, 1)
    assert len(store.block_map("node-a", path).keys) == 0
    assert store.check_block_size(None) == 4096


def test_block_maps_spanning_many_chunks_read_back_exactly(store, tmp_path, monkeypatch):
    monkeypatch.setattr("store.chunks.ROWS_PER_CHUNK", 64)  # a few hundred rows -> several chunks
    paths = write_fleet(tmp_path / "images", count=2)
    refresh_host(store, "node-a", paths, BLOCK)
    entry = store.catalogue("node-a").image(paths[0])
    assert entry.chunks == -(-entry.distinct // 64) and entry.chunks > 3
    for path in paths:
        expected = direct_map(path)
        stored = store.block_map("node-a", path)
        assert np.array_equal(stored.keys, expected.keys) and np.array_equal(stored.first, expected.first)


def test_a_reader_holding_a_swapped_catalogue_starts_over(store, tmp_path):
    from store.reader import _Swapped

    paths = write_fleet(tmp_path / "images", count=1)
    refresh_host(store, "node-a", paths, BLOCK)
    old = store.catalogue("node-a")
    write_image(paths[0], random_blocks(np.random.default_rng(3), 50, BLOCK))
    refresh_host(store, "node-a", paths, BLOCK)  # publishes, then deletes the old entries
    with pytest.raises(_Swapped):
        store._load_map(old, old.images[0])
    assert np.array_equal(store.block_map("node-a", paths[0]).keys, direct_map(paths[0]).keys)


def test_readers_during_refreshes_always_see_one_whole_generation(store_url, tmp_path):
    import shutil
    import threading

    versions = []
    for version in range(4):
        made = write_fleet(tmp_path / f"v{version}", count=2, blocks=300, seed=100 + version)
        versions.append((made, tuple(direct_map(p).keys.tobytes() for p in made)))
    live = tmp_path / "live"
    live.mkdir()
    targets = [str(live / "vm0.img"), str(live / "vm1.img")]
    for source, target in zip(versions[0][0], targets):
        shutil.copy(source, target)
    with open_store(store_url) as writer_store:
        refresh_host(writer_store, "node-a", [str(live)], BLOCK)
    expected = {v[1] for v in versions}
    stop = threading.Event()

    reading = threading.Event()

    def writer():
        with open_store(store_url) as own:
            reading.wait(30)
            for made, _ in versions[1:] * 2:
                for source, target in zip(made, targets):
                    shutil.copy(source, target + ".new")
                    os.replace(target + ".new", target)  # a new inode: changed
                refresh_host(own, "node-a", [str(live)], BLOCK)
        stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = set()
    with open_store(store_url) as reader:
        while not stop.is_set():
            got = tuple(m.keys.tobytes() for _, m in reader.host_block_maps("node-a"))
            assert got in expected  # never a mix of two generations, never a half-written map
            seen.add(got)
            reading.set()
    thread.join()
    assert len(seen) >= 2
