"""Shared fixtures: real Redis servers (single node and cluster), a scratch BLOCKSKETCH_HOME."""

from __future__ import annotations

import pytest

from tests.redis_server import RedisCluster, RedisProcess


@pytest.fixture(scope="session")
def redis_node(tmp_path_factory):
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_url(redis_node):
    """URL of a real, freshly flushed single-node Redis."""
    import redis

    client = redis.Redis.from_url(redis_node.url)
    client.flushall()
    client.close()
    return redis_node.url


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Every test gets its own BLOCKSKETCH_HOME and no ambient Redis URL."""
    monkeypatch.setenv("BLOCKSKETCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BLOCKSKETCH_REDIS_URL", raising=False)
    return tmp_path / "home"
