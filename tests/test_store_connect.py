"""Reaching the store: URL forms (TLS, unix socket, ACL user and password), cluster detection, printable URLs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from sketch.errors import StoreError, UsageError
from store import open_store
from store.connect import COMMAND_TIMEOUT_S, DEFAULT_ANSWER_TIMEOUT_S, answer_timeout, printable_url
from tests.redis_server import RedisProcess, free_port
from tests.test_migrate_cli import one_line_error


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


def make_tls_files(directory: Path) -> dict[str, Path]:
    """A private CA and a server certificate it signed for 127.0.0.1, made with openssl; and another CA."""
    files = {name: directory / f"{name}.pem" for name in ("ca", "ca-key", "cert", "key", "other-ca", "other-ca-key")}

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(files[f"{ca}-key"]),
                "-out", str(files[ca]), "-days", "1", "-subj", f"/CN=blocksketch test {ca}")
    csr = directory / "server.csr"
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(files["key"]), "-out", str(csr),
            "-subj", "/CN=127.0.0.1")
    extensions = directory / "server.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(files["ca"]), "-CAkey", str(files["ca-key"]),
            "-CAcreateserial", "-out", str(files["cert"]), "-days", "1", "-extfile", str(extensions))
    return files


@pytest.fixture
def tls_redis(tmp_path):
    """Debian's redis-server (built with TLS; the embedded valkey has none) on a TLS port, its plain port
    on loopback for the launcher's readiness check; yields (tls_port, files)."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server on PATH, built with TLS (apt-get install redis-server): "
                    "the embedded valkey has no TLS")
    files = make_tls_files(tmp_path)
    tls_port = free_port()
    log = tmp_path / "redis.log"
    server = RedisProcess(tmp_path / "redis", extra=[
        "--tls-port", str(tls_port), "--tls-cert-file", str(files["cert"]), "--tls-key-file", str(files["key"]),
        "--tls-ca-cert-file", str(files["ca"]), "--tls-auth-clients", "no", "--logfile", str(log)])
    try:
        server.start()
    except RuntimeError:
        server.stop(kill=True)
        pytest.fail(f"redis-server did not start with TLS: {log.read_text().strip().splitlines()[-1:]}")
    admin = redis.Redis.from_url(server.url)
    admin.acl_setuser("indexer", enabled=True, passwords=["+pw-1"], keys=["blocksketch:*"], commands=["+@all"])
    admin.close()
    yield tls_port, files
    server.stop()


@pytest.mark.tools("openssl")
def test_a_rediss_url_with_a_user_and_the_ca_reaches_a_tls_redis(tls_redis):
    tls_port, files = tls_redis
    url = f"rediss://indexer:pw-1@127.0.0.1:{tls_port}/0?ssl_ca_certs={files['ca']}"
    with open_store(url) as store:
        assert store.url == f"rediss://indexer@127.0.0.1:{tls_port}/0?ssl_ca_certs={files['ca']}"
        assert store.config() is None and store.hosts() == []


@pytest.mark.tools("openssl")
@pytest.mark.parametrize("query", ["", "?ssl_ca_certs={other-ca}"], ids=["system CAs", "another CA"])
def test_a_tls_redis_whose_certificate_the_client_does_not_trust_is_refused(tls_redis, query):
    tls_port, files = tls_redis
    refused = f"Redis at rediss://indexer@127.0.0.1:{tls_port}/0.*certificate verify failed"
    with pytest.raises(StoreError, match=refused):
        open_store(f"rediss://indexer:pw-1@127.0.0.1:{tls_port}/0" + query.format_map(files))


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


# -- hostile or hung servers (issue 13) --------------------------------------------------------------------

@pytest.fixture
def silent_server():
    """A real TCP listener on 127.0.0.1 that accepts connections and never answers a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    listener.close()


@pytest.mark.parametrize("how", ["env", "url"])
def test_a_server_that_accepts_but_never_answers_fails_within_its_timeout(silent_server, how):
    env = {k: v for k, v in os.environ.items() if k != "BLOCKSKETCH_REDIS_URL"}
    url = silent_server
    if how == "env":
        env["BLOCKSKETCH_REDIS_TIMEOUT"] = "1.5"
    else:
        url += "?socket_timeout=1.5"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cli", "hosts", "--redis", url], env=env, capture_output=True,
                          text=True, timeout=60)
    took = time.monotonic() - started
    one_line_error(done, 1, "cannot reach Redis at redis://127.0.0.1:", "Timeout")
    assert took < 10  # 120 s before: the command timeout applied to the first PING


def test_the_default_answer_timeout_is_at_most_10_seconds(monkeypatch):
    monkeypatch.delenv("BLOCKSKETCH_REDIS_TIMEOUT", raising=False)
    assert answer_timeout() == DEFAULT_ANSWER_TIMEOUT_S <= 10 < COMMAND_TIMEOUT_S


def test_a_busy_server_that_has_answered_once_gets_the_longer_command_timeout(redis_url, monkeypatch):
    """A command waiting longer than the answer timeout, behind another client's slow script, still succeeds."""
    monkeypatch.setenv("BLOCKSKETCH_REDIS_TIMEOUT", "0.5")
    with open_store(redis_url) as store:
        busy = redis.Redis.from_url(redis_url)
        spin = "local t = redis.call('TIME'); local e = t[1] * 1e6 + t[2] + 1.5e6; " \
               "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] > e; return 1"
        blocker = threading.Thread(target=busy.eval, args=(spin, 0))
        blocker.start()
        time.sleep(0.2)
        started = time.monotonic()
        assert store.hosts() == []
        assert time.monotonic() - started > 0.5
        blocker.join()
        busy.close()


@pytest.mark.parametrize("url", ["redis://[::1", "redis://[::1]:port/0", "redis://user:pw@host:99999999/0"])
def test_an_unparsable_url_is_a_one_line_usage_error(url):
    done = subprocess.run([sys.executable, "-m", "cli", "hosts", "--redis", url], capture_output=True, text=True,
                          timeout=60)
    one_line_error(done, 2, "bad store URL")
    assert "pw" not in done.stderr


@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf", "nan"])
def test_a_bad_timeout_setting_is_a_usage_error(monkeypatch, value):
    monkeypatch.setenv("BLOCKSKETCH_REDIS_TIMEOUT", value)
    with pytest.raises(UsageError, match="BLOCKSKETCH_REDIS_TIMEOUT"):
        open_store("redis://127.0.0.1:1/0")
