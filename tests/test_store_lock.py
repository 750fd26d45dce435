"""The per-host refresh lock: serialised refreshes, dead owners taken over, a lost lock never publishes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from sketch.errors import StoreError
from store import keys, open_store, refresh_host
from store.lock import HostLock, holder_is_dead, owner_token
from tests.test_store_index import BLOCK, store_url, write_fleet  # noqa: F401 (store_url: node and cluster)


@pytest.fixture
def store(redis_url):
    opened = open_store(redis_url)
    yield opened
    opened.close()


def test_two_refreshes_of_one_host_run_one_after_the_other(store, redis_url, tmp_path):
    paths = write_fleet(tmp_path / "images", count=2)
    first_inside = threading.Event()
    let_first_finish = threading.Event()
    second_progress = []

    def hold(done: int) -> None:
        first_inside.set()
        let_first_finish.wait(30)

    reports = {}

    def run(name, progress):
        with open_store(redis_url) as own:
            reports[name] = refresh_host(own, "node-a", paths, BLOCK, progress)

    first = threading.Thread(target=run, args=("first", hold))
    first.start()
    assert first_inside.wait(30)
    second = threading.Thread(target=run, args=("second", second_progress.append))
    second.start()
    time.sleep(0.5)
    # The second refresh waits for the lock: it has read nothing, published nothing.
    assert second.is_alive() and second_progress == [] and store.catalogue("node-a") is None
    let_first_finish.set()
    first.join(30)
    second.join(30)
    assert len(reports["first"].indexed) == 2
    # It ran after the first published, so it found both images unchanged.
    assert reports["second"].reused == 2 and reports["second"].indexed == []
    assert reports["second"].lock_wait_s >= 0.4
    assert store.client.get(keys.lock("node-a")) is None


def test_a_lock_left_by_a_dead_process_is_taken_over_at_once(store, tmp_path):
    child = subprocess.run([sys.executable, "-c", "from store.lock import owner_token; print(owner_token())"],
                           capture_output=True, text=True, check=True)
    token = child.stdout.strip()
    assert holder_is_dead(token) and not holder_is_dead(owner_token())
    store.client.set(keys.lock("node-a"), token, px=60_000)
    report = refresh_host(store, "node-a", write_fleet(tmp_path / "images", count=1), BLOCK, lock_wait_s=5)
    assert report.images == 1 and report.lock_wait_s < 5


def test_a_lock_held_elsewhere_times_out_with_a_clear_error(store, tmp_path):
    store.client.set(keys.lock("node-a"), "other-machine/boot|4242|100|abc", px=60_000)
    with pytest.raises(StoreError, match="another refresh of host node-a holds its lock"):
        refresh_host(store, "node-a", write_fleet(tmp_path / "images", count=1), BLOCK, lock_wait_s=0.3)
    assert store.catalogue("node-a") is None


def test_a_refresh_that_lost_its_lock_publishes_nothing(store, tmp_path):
    paths = write_fleet(tmp_path / "images", count=2)
    refresh_host(store, "node-a", paths, BLOCK)
    before = store.catalogue("node-a")
    for path in paths:  # make both images look changed
        with open(path, "r+b") as handle:
            handle.write(b"\x01changed")

    def steal(done: int) -> None:
        store.client.set(keys.lock("node-a"), "thief/boot|1|1|x", px=60_000)

    with pytest.raises(StoreError, match="lost the refresh lock of host node-a"):
        refresh_host(store, "node-a", paths, BLOCK, steal)
    assert store.catalogue("node-a") == before
    assert all(store.client.exists(name) for name in before.entry_keys())


def test_the_lock_is_renewed_while_a_refresh_works(store_url):  # noqa: F811
    with open_store(store_url) as store:
        lock = HostLock(store.client, store.url, "node-a", ttl_ms=300)
        with lock:
            time.sleep(0.8)  # well past the first expiry
            assert store.client.get(keys.lock("node-a")).decode() == lock.token
            lock.check()
        assert store.client.get(keys.lock("node-a")) is None
