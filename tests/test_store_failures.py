"""Failures leave the previous index whole: kill -9 mid-refresh, Redis restarting mid-refresh, out of
memory, refused credentials, an unreachable server, corrupt entries. Each is one line and exit 1."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import redis

from sketch.errors import FormatError
from sketch.sample import random_blocks, write_image
from store import keys, open_store, refresh_host
from tests.redis_server import RedisProcess, free_port
from tests.test_store_index import BLOCK, host_keys, referenced_keys, write_fleet


def cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=120)


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("blocksketch: error: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def touch_all(paths: list[str]) -> None:
    """Change every image so the next refresh must rewrite all of them."""
    rng = np.random.default_rng(int(time.time_ns() % 1000))
    for path in paths:
        with open(path, "r+b") as handle:
            handle.write(random_blocks(rng, 1, BLOCK).tobytes())


def snapshot(client: redis.Redis, host: str) -> dict[bytes, bytes]:
    """The published catalogue and every entry it names, byte for byte."""
    with open_store(f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/0") as store:
        catalogue = store.catalogue(host)
        names = [keys.catalogue(host), *catalogue.entry_keys()]
    return {name.encode(): client.get(name) for name in names}


def pause_mid_refresh(client: redis.Redis, host: str, process: subprocess.Popen) -> None:
    """Wait until the refresh has written some new entries, then hold all writes (CLIENT PAUSE WRITE),
    so the refresh is stuck before publishing."""
    deadline = time.monotonic() + 60
    while client.scard(keys.pending(host)) == 0:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the refresh never started writing"
    client.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")


def test_kill_9_mid_refresh_leaves_the_previous_index_whole(redis_url, tmp_path):
    paths = write_fleet(tmp_path / "images", count=12, blocks=2000)
    assert run_cli("index", "--host", "node-a", "--redis", redis_url, str(tmp_path / "images")).returncode == 0
    client = redis.Redis.from_url(redis_url)
    before = snapshot(client, "node-a")
    touch_all(paths)
    process = cli("index", "--host", "node-a", "--redis", redis_url, str(tmp_path / "images"))
    try:
        pause_mid_refresh(client, "node-a", process)
        process.kill()
        process.wait(10)
    finally:
        client.execute_command("CLIENT", "UNPAUSE")
    assert client.scard(keys.pending("node-a")) > 0  # it had written new entries...
    assert snapshot(client, "node-a") == before  # ...but readers still see the old index, whole
    listed = run_cli("images", "--host", "node-a", "--redis", redis_url, "--json")
    assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 12
    rerun = run_cli("index", "--host", "node-a", "--redis", redis_url, str(tmp_path / "images"), "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert len(json.loads(rerun.stdout)["indexed"]) == 12
    with open_store(redis_url) as store:
        assert host_keys(store, "node-a") == referenced_keys(store, "node-a")  # leftovers removed
    client.close()


def test_redis_restart_mid_refresh_fails_clearly_and_a_rerun_completes(tmp_path):
    server = RedisProcess(tmp_path / "redis", extra=["--appendonly", "yes", "--appendfsync", "always"]).start()
    try:
        paths = write_fleet(tmp_path / "images", count=12, blocks=2000)
        assert run_cli("index", "--host", "node-a", "--redis", server.url, str(tmp_path / "images")).returncode == 0
        client = redis.Redis.from_url(server.url)
        before = snapshot(client, "node-a")
        touch_all(paths)
        process = cli("index", "--host", "node-a", "--redis", server.url, str(tmp_path / "images"))
        pause_mid_refresh(client, "node-a", process)
        client.close()
        server.stop()  # SIGTERM: a clean shutdown that keeps the append-only file
        server.start()
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 1
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("blocksketch: error: lost connection to Redis at"), stderr
        client = redis.Redis.from_url(server.url)
        assert snapshot(client, "node-a") == before  # persisted, and still the previous index
        rerun = run_cli("index", "--host", "node-a", "--redis", server.url, str(tmp_path / "images"), "--json")
        assert rerun.returncode == 0, rerun.stderr
        assert len(json.loads(rerun.stdout)["indexed"]) == 12
        with open_store(server.url) as store:
            assert host_keys(store, "node-a") == referenced_keys(store, "node-a")
        client.close()
    finally:
        server.stop()


def test_out_of_memory_fails_with_one_line_and_keeps_the_previous_index(tmp_path):
    server = RedisProcess(tmp_path / "redis", extra=["--maxmemory-policy", "noeviction"]).start()
    try:
        small = write_fleet(tmp_path / "small", count=1, blocks=200)
        assert run_cli("index", "--host", "node-a", "--redis", server.url, *small).returncode == 0
        client = redis.Redis.from_url(server.url)
        before = snapshot(client, "node-a")
        client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 200_000)
        big = str(tmp_path / "big.img")
        write_image(big, random_blocks(np.random.default_rng(5), 20_000, BLOCK))
        result = run_cli("index", "--host", "node-a", "--redis", server.url, *small, big)
        assert result.returncode == 1
        line = one_error_line(result)
        assert "out of memory" in line and server.url in line
        assert snapshot(client, "node-a") == before
        assert client.scard(keys.pending("node-a")) == 0  # it removed what it had written
        client.config_set("maxmemory", 0)
        client.close()
    finally:
        server.stop()


def test_refused_credentials_name_the_url_without_the_password(tmp_path):
    server = RedisProcess(tmp_path / "redis").start()
    try:
        setup = redis.Redis(port=server.port)
        setup.config_set("requirepass", "right-secret")  # after start: the fixture's readiness PING has no password
        setup.close()
        url = f"redis://:wrong-secret@127.0.0.1:{server.port}/0"
        result = run_cli("hosts", "--redis", url)
        assert result.returncode == 1
        line = one_error_line(result)
        assert f"redis://127.0.0.1:{server.port}/0" in line and "wrong-secret" not in line
        assert "refused the credentials" in line
        good = run_cli("hosts", "--json", "--redis", f"redis://:right-secret@127.0.0.1:{server.port}/0")
        assert good.returncode == 0 and json.loads(good.stdout) == []
    finally:
        server.stop()


@pytest.mark.parametrize("command", [["hosts"], ["images"], ["index", "."]])
def test_an_unreachable_store_is_one_line_and_exit_1(command):
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = run_cli(*command, "--redis", url)
    assert result.returncode == 1
    assert f"Redis at {url}" in one_error_line(result)


def test_a_bad_url_scheme_is_a_usage_error():
    result = run_cli("hosts", "--redis", "http://127.0.0.1:1/")
    assert result.returncode == 2 and "redis://" in one_error_line(result)


def _corrupt_catalogue(client, host):
    client.set(keys.catalogue(host), b"\xc1not msgpack")


def _future_catalogue(client, host):
    document = msgpack.unpackb(client.get(keys.catalogue(host)))
    document["version"] = 99
    client.set(keys.catalogue(host), msgpack.packb(document))


def _wrong_types(client, host):
    document = msgpack.unpackb(client.get(keys.catalogue(host)))
    document["images"][0]["total_blocks"] = "many"
    client.set(keys.catalogue(host), msgpack.packb(document))


def _future_config(client, host):
    document = msgpack.unpackb(client.get(keys.CONFIG))
    document["version"] = 7
    client.set(keys.CONFIG, msgpack.packb(document))


@pytest.mark.parametrize("damage, command, message", [
    (_corrupt_catalogue, ["images"], "catalogue of host node-a .* is corrupt"),
    (_corrupt_catalogue, ["hosts"], "catalogue of host node-a .* is corrupt"),
    (_future_catalogue, ["images", "--host", "node-a"], "unknown schema version 99"),
    (_wrong_types, ["hosts"], "field 'total_blocks'"),
    (_future_config, ["index", "--host", "node-a"], "index config .* unknown schema version 7"),
])
def test_corrupt_metadata_is_one_line_and_exit_1(redis_url, tmp_path, damage, command, message):
    paths = write_fleet(tmp_path / "images", count=1)
    assert run_cli("index", "--host", "node-a", "--redis", redis_url, *paths).returncode == 0
    client = redis.Redis.from_url(redis_url)
    damage(client, "node-a")
    client.close()
    extra = paths if command[0] == "index" else []
    result = run_cli(*command, "--redis", redis_url, *extra)
    assert result.returncode == 1
    assert re.search(message, one_error_line(result)), result.stderr


def test_corrupt_or_missing_entries_raise_format_error(redis_url, tmp_path):
    paths = write_fleet(tmp_path / "images", count=2)
    with open_store(redis_url) as store:
        refresh_host(store, "node-a", paths, BLOCK)
        entry = store.catalogue("node-a").image(paths[0])
        chunk = entry.map_keys("node-a")[0]
        store.client.setrange(chunk, 40, b"\xff\xfe")
        with pytest.raises(FormatError, match="chunk 0 is corrupt"):
            store.block_map("node-a", paths[0])
        store.client.append(entry.filter_key("node-a"), b"x")
        with pytest.raises(FormatError, match="corrupt"):
            store.image_filter("node-a", paths[0])
        store.client.delete(store.catalogue("node-a").image(paths[1]).map_keys("node-a")[0])
        with pytest.raises(FormatError, match="is missing; run `blocksketch index` on node-a again"):
            store.block_map("node-a", paths[1])
        # A refresh repairs what it can see: changed files are rewritten, a damaged catalogue rebuilt.
        store.client.set(keys.catalogue("node-a"), b"junk")
        report = refresh_host(store, "node-a", paths, BLOCK)
        assert len(report.indexed) == 2
        assert len(store.host_block_maps("node-a")) == 2
        assert host_keys(store, "node-a") == referenced_keys(store, "node-a")


def test_a_failed_image_keeps_its_old_entry_and_exits_1(redis_url, tmp_path):
    paths = write_fleet(tmp_path / "images", count=2)
    assert run_cli("index", "--host", "node-a", "--redis", redis_url, str(tmp_path / "images")).returncode == 0
    with open(paths[0], "r+b") as handle:
        handle.write(b"QFI\xfb")  # now it claims to be a qcow2 image of an unknown version: unreadable
    touch_all([paths[1]])
    result = run_cli("index", "--host", "node-a", "--redis", redis_url, str(tmp_path / "images"), "--json")
    assert result.returncode == 1
    line = one_error_line(result)
    assert "1 image(s) could not be indexed" in line and "qcow2" in line
    report = json.loads(result.stdout)
    assert report["indexed"] == [paths[1]] and [f["path"] for f in report["failed"]] == [paths[0]]
    with open_store(redis_url) as store:
        assert sorted(i.path for i in store.images("node-a")) == sorted(paths)  # the old entry stays
