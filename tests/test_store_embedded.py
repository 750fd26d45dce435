"""The embedded default store: a private server under BLOCKSKETCH_HOME, shared while used, stopped after."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sketch.pids import pid_alive
from store import open_store, refresh_host
from store.embedded import EmbeddedServer
from tests.test_store_index import BLOCK, write_fleet


def only_home_env(home) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKSKETCH_")}
    env["BLOCKSKETCH_HOME"] = str(home)
    return env


def server_pid(home) -> int | None:
    try:
        pid = int((home / "store" / "server.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def test_index_then_images_with_no_redis_configured(isolated_home, tmp_path):
    paths = write_fleet(tmp_path / "images", count=2)
    env = only_home_env(isolated_home)
    index = subprocess.run([sys.executable, "-m", "cli", "index", str(tmp_path / "images"), "--host", "here"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert index.returncode == 0, index.stderr
    assert "embedded store" in index.stdout
    assert server_pid(isolated_home) is None  # stopped when the command ended
    listed = subprocess.run([sys.executable, "-m", "cli", "images", "--json"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert [row["path"] for row in json.loads(listed.stdout)] == paths  # persisted across the two commands
    assert server_pid(isolated_home) is None
    assert (isolated_home / "store" / "appendonlydir").is_dir()


def test_concurrent_users_share_one_server_and_the_last_stops_it(isolated_home, tmp_path):
    first = open_store()
    second = open_store()
    try:
        pid = server_pid(isolated_home)
        assert pid is not None
        refresh_host(first, "here", write_fleet(tmp_path / "images", count=1), BLOCK)
        assert [i.host for i in second.images()] == ["here"]
        first.close()
        assert server_pid(isolated_home) == pid  # still in use by the second
    finally:
        first.close()
        second.close()
    assert not pid_alive(pid)


def test_a_server_left_by_a_killed_user_is_reused_then_stopped(isolated_home, tmp_path):
    script = ("import os; from store import open_store; s = open_store(); "
              "print(open(os.path.join(os.environ['BLOCKSKETCH_HOME'], 'store', 'server.pid')).read(), flush=True); "
              "os.kill(os.getpid(), 9)")
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=only_home_env(isolated_home), timeout=60)
    assert killed.returncode == -9
    pid = int(killed.stdout)
    assert pid_alive(pid)  # nobody stopped it...
    with open_store() as store:
        assert server_pid(isolated_home) == pid  # ...the next user reuses it
        assert store.hosts() == []
    assert not pid_alive(pid)  # and stops it when done


def test_a_long_home_gets_a_short_socket_path(tmp_path):
    home = tmp_path / ("deep-" * 30)
    server = EmbeddedServer(home)
    assert len(str(server.socket_path)) < 100
    server.acquire()
    try:
        with open_store(server.url) as store:
            assert store.config() is None
    finally:
        server.release()
    assert server_pid(home) is None


@pytest.fixture(autouse=True)
def no_server_left_behind(isolated_home):
    yield
    pid = server_pid(isolated_home)
    if pid is not None:
        EmbeddedServer(isolated_home).stop()
        pytest.fail(f"test left the embedded server {pid} running")
