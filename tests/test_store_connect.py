"""Reaching the store: URL forms (TLS, unix socket, ACL user and password), cluster detection, printable URLs."""

from __future__ import annotations

import subprocess

import pytest
import redis

from sketch.errors import StoreError, UsageError
from store import open_store
from store.connect import printable_url
from tests.redis_server import RedisProcess, free_port


@pytest.mark.parametrize("url, shown", [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:secret@127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("rediss://alice:secret@cache.example:6380/2?ssl_cert_reqs=none", "rediss://alice@cache.example:6380/2?ssl_cert_reqs=none"),
    ("redis://alice:p%40ss@[::1]:6379", "redis://alice@[::1]:6379"),
    ("unix:///run/redis.sock?db=1", "unix:///run/redis.sock?db=1"),
])
def test_printable_url_drops_only_the_password(url, shown):
    assert printable_url(url) == shown


def test_a_node_and_a_cluster_are_told_apart(redis_url, redis_cluster):
    with open_store(redis_url) as node:
        assert not node.is_cluster
    with open_store(redis_cluster.url) as cluster:
        assert cluster.is_cluster and isinstance(cluster.hosts(), list)


def test_acl_user_and_password_in_the_url(redis_url):
    admin = redis.Redis.from_url(redis_url)
    admin.acl_setuser("indexer", enabled=True, passwords=["+pw-1"], keys=["blocksketch:*"], commands=["+@all"])
    admin.close()
    port = redis_url.split(":")[2].split("/")[0]
    with open_store(f"redis://indexer:pw-1@127.0.0.1:{port}/0") as store:
        assert store.url == f"redis://indexer@127.0.0.1:{port}/0" and store.config() is None
    with pytest.raises(StoreError, match=f"redis://indexer@127.0.0.1:{port}/0 refused the credentials"):
        open_store(f"redis://indexer:wrong@127.0.0.1:{port}/0")


def test_tls_url(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    tls_port = free_port()
    server = RedisProcess(tmp_path / "redis", extra=[
        "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]).start()
    try:
        with open_store(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}") as store:
            assert store.config() is None and store.hosts() == []
        with pytest.raises(StoreError, match=f"Redis at rediss://127.0.0.1:{tls_port}/0"):
            open_store(f"rediss://127.0.0.1:{tls_port}/0")  # the self-signed certificate is not trusted
    finally:
        server.stop()


def test_unix_socket_url(tmp_path):
    socket_path = tmp_path / "r.sock"
    server = RedisProcess(tmp_path / "redis", extra=["--unixsocket", str(socket_path)]).start()
    try:
        with open_store(f"unix://{socket_path}") as store:
            assert store.config() is None
    finally:
        server.stop()


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "127.0.0.1:6379"])
def test_unsupported_url_is_a_usage_error(url):
    with pytest.raises(UsageError, match="redis://, rediss:// or unix://"):
        open_store(url)


def test_a_cluster_has_only_database_0(redis_cluster):
    with pytest.raises(StoreError, match="SELECT is not allowed in cluster mode"):
        open_store(redis_cluster.url.replace("/0", "/3"))
