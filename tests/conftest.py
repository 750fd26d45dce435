"""Shared fixtures: real Redis servers (single node and cluster), a scratch BLOCKSKETCH_HOME; and the
rules for programs a test runs.

A test that runs a program (qemu-img, openssl, systemd-analyze...) carries ``@pytest.mark.tools(...)``
and skips with the reason and the Debian package when one is missing. Under CI (``CI=true``, as CI
services set it) a skip is a failure: .ci/run installs every program, so a green CI run proves the
whole suite ran. A test that cannot apply to a machine is not generated there, rather than skipped.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.redis_server import RedisCluster, RedisProcess

# Debian package of each program a test may need (.ci/run installs the same ones).
DEBIAN_PACKAGES = {
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "openssl": "openssl",
    "redis-server": "redis-server",
    "systemd-analyze": "systemd",
    "zstd": "zstd",
}


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pytest_configure(config):
    config.addinivalue_line("markers", "tools(*programs): the test runs these programs; without one it skips, "
                                       "and under CI=true fails")


def missing_tools_reason(programs) -> str | None:
    """Why a test that runs ``programs`` cannot run here, or None if they are all on PATH."""
    missing = [program for program in programs if shutil.which(program) is None]
    if not missing:
        return None
    packages = sorted({DEBIAN_PACKAGES.get(program, program) for program in missing})
    return f"needs {', '.join(missing)} on PATH (apt-get install {' '.join(packages)})"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    for marker in item.iter_markers("tools"):
        reason = missing_tools_reason(marker.args)
        if reason:
            pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and under_ci() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {reason}"


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
