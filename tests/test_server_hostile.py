"""Hostile clients against a real ``blocksketch serve`` process on loopback, its fd limit lowered to 256.

No client can starve the service without a token (idle sockets, a request head sent a byte at a
time), no body can make it answer 5xx, and it starts and stops the way a service manager expects.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import msgpack
import pytest

from sketch.pids import pid_alive
from sketch.sample import write_sample_fleet
from tests.redis_server import free_port

TOKEN = "hostile-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FD_LIMIT = 256
HEAD_TIMEOUT_S = 4.0


def limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


class Service:
    """A ``blocksketch serve`` process; its stderr goes to a file the test reads."""

    def __init__(self, directory: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.stderr_path = directory / f"serve-{self.port}.err"
        token_file = directory / "token"
        token_file.write_text(TOKEN + "\n")
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cli", "serve", "--bind", f"127.0.0.1:{self.port}", "--token-file",
                 str(token_file), *args], stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=limit_fds,
                env=env)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while "blocksketch: serving" not in self.stderr():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"service did not start: {self.stderr()}")
            time.sleep(0.05)
        assert httpx.get(f"{self.base}/healthz", timeout=5).status_code == 200

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)


@pytest.fixture(scope="module")
def indexed(redis_node, tmp_path_factory):
    """A small sample fleet in a flushed Redis, for the whole module: (redis URL, an indexed image)."""
    import redis

    from store import open_store, refresh_host

    client = redis.Redis.from_url(redis_node.url)
    client.flushall()
    client.close()
    fleet = write_sample_fleet(str(tmp_path_factory.mktemp("fleet")), blocks_per_image=64)
    with open_store(redis_node.url) as store:
        for host, paths in fleet["hosts"].items():
            refresh_host(store, host, [os.path.dirname(paths[0])], 4096)
    host, paths = next(iter(fleet["hosts"].items()))
    return redis_node.url, f"{host}:{paths[0]}"


@pytest.fixture(scope="module")
def shared_service(indexed, tmp_path_factory):
    """One service for the table-driven tests (each leaves it as it found it)."""
    service = Service(tmp_path_factory.mktemp("serve"), "--redis", indexed[0], "--max-body-mib", "1")
    service.wait_listening()
    yield service
    service.stop()


@pytest.fixture
def service(indexed, tmp_path):
    """A fresh service with a short head timeout, for the tests that attack it."""
    service = Service(tmp_path, "--redis", indexed[0], "--head-timeout", str(HEAD_TIMEOUT_S))
    service.wait_listening()
    yield service
    service.stop()


def open_idle_sockets(port: int, count: int) -> list[socket.socket]:
    """``count`` connected sockets that never send a byte."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        sockets.append(sock)
    pending = list(sockets)
    deadline = time.monotonic() + 10
    while pending and time.monotonic() < deadline:
        _, writable, _ = select.select([], pending, [], 0.5)
        pending = [s for s in pending if s not in writable]
    assert not pending, f"{len(pending)} sockets never connected"
    return sockets


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class SlowHead(threading.Thread):
    """A client sending a request head one byte every ``interval`` s; records when the server cut it."""

    def __init__(self, port: int, interval: float = 0.5, after_a_response: bool = False):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if after_a_response:  # a kept-alive connection: one quick request first
            self.sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert self.sock.recv(1 << 16).startswith(b"HTTP/1.1 200")
        self.interval = interval
        self.started = time.monotonic()
        self.cut_after: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        head = b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + b"X-Slow: 1\r\n" * 1000
        self.sock.settimeout(self.interval)
        for byte in head:
            if self.stop.is_set():
                return
            try:
                self.sock.send(bytes([byte]))
                if self.sock.recv(1 << 16) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        self.cut_after = time.monotonic() - self.started


def timed(call) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = call()
    return time.perf_counter() - started, response


def test_idle_sockets_and_a_slow_head_cannot_starve_healthz_or_an_authenticated_rank(service, indexed):
    baseline_fds = open_fds(service.process.pid)
    idle = open_idle_sockets(service.port, 300)
    slow = SlowHead(service.port)
    slow.start()
    try:
        answers = []
        for _ in range(5):
            answers.append(timed(lambda: httpx.get(f"{service.base}/healthz", timeout=5)))
            answers.append(timed(lambda: httpx.post(f"{service.base}/v1/rank", json={"image": indexed[1]},
                                                    headers=AUTH, timeout=5)))
            time.sleep(0.1)
        assert slow.is_alive(), "the attack ended before the service was measured"
        for seconds, response in answers:
            assert response.status_code == 200, response.text
            assert seconds < 1.0
        # Neither kind of attacker keeps its socket past the head deadline.
        slow.join(timeout=HEAD_TIMEOUT_S + 5)
        assert slow.cut_after is not None and HEAD_TIMEOUT_S - 0.5 < slow.cut_after < HEAD_TIMEOUT_S + 3
        time.sleep(0.5)
        # (Sockets the kernel's full listen queue dropped are open only on this side.)
        assert open_fds(service.process.pid) <= baseline_fds + 2
        assert service.process.poll() is None
    finally:
        slow.stop.set()
        for sock in idle:
            sock.close()
        slow.sock.close()
    assert "Traceback" not in service.stderr()
    assert "out of system resource" not in service.stderr()  # accept never hit the fd limit


def test_a_slow_request_head_on_a_kept_alive_connection_is_cut_at_the_head_deadline(service):
    slow = SlowHead(service.port, after_a_response=True)
    slow.start()
    slow.join(timeout=HEAD_TIMEOUT_S + 5)
    slow.sock.close()
    assert slow.cut_after is not None and slow.cut_after < HEAD_TIMEOUT_S + 3


def test_when_every_connection_has_a_request_in_flight_a_new_one_gets_a_503(indexed, tmp_path):
    service = Service(tmp_path, "--redis", indexed[0], "--max-connections", "3")
    try:
        service.wait_listening()
        # Authenticated requests whose bodies never finish: in flight until the body deadline.
        busy = []
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", service.port), timeout=5)
            sock.sendall(b"POST /v1/rank HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 100\r\n\r\n{")
            busy.append(sock)
        time.sleep(0.3)
        response = httpx.get(f"{service.base}/healthz", timeout=5)
        assert response.status_code == 503
        assert response.json()["error"] == "too_many_connections"
        for sock in busy:
            sock.close()
        time.sleep(0.3)
        assert httpx.get(f"{service.base}/healthz", timeout=5).status_code == 200
    finally:
        service.stop()


def nested_msgpack(depth: int) -> bytes:
    return b"\x81\xa5image" + b"\x91" * depth + b"\xc0"


BAD_BODIES = [
    pytest.param(b'{"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json", id="deep-json"),
    pytest.param(b"[" * 100_000, "application/json", id="deep-unclosed-json"),
    pytest.param(nested_msgpack(100_000), "application/msgpack", id="deep-msgpack"),
    pytest.param(b'{"image": "ams-1:/x", "top": ' + b"9" * 5000 + b"}", "application/json", id="huge-int-json"),
    pytest.param(b'{"image": "ams-1:/x", "top": 1e999}', "application/json", id="infinite-float"),
    pytest.param(b'{"image": "ams-1:/x", "top": NaN}', "application/json", id="nan"),
    pytest.param(b'{"image": "\xff\xfe/x"}', "application/json", id="non-utf8-json"),
    pytest.param(msgpack.packb({"image": "x"})[:-1] + b"\xff", "application/msgpack", id="non-utf8-msgpack"),
    pytest.param(b'{"image": "ams-1:/x\\ud800"}', "application/json", id="lone-surrogate-path"),
    pytest.param(b'{"image": "ams-1:/x", "exclude_hosts": ["\\ud800"]}', "application/json",
                 id="lone-surrogate-host"),
    pytest.param(b'{"image": ["ams-1", "/x"]}', "application/json", id="image-not-a-string"),
    pytest.param(b'{"image": "ams-1:/x", "exclude_hosts": [["a"]]}', "application/json", id="nested-hosts"),
    pytest.param(b'{"image": "nl2\\n:/x"}', "application/json", id="newline-host-in-image"),
    pytest.param(b'{"image": "ams-1:/x", "exclude_hosts": ["nl2\\n"]}', "application/json",
                 id="newline-host-excluded"),
    pytest.param(msgpack.packb({1: 2}), "application/msgpack", id="msgpack-int-keys"),
    pytest.param(msgpack.packb({b"image": b"x"}), "application/msgpack", id="msgpack-bytes-keys"),
    pytest.param(msgpack.packb({"image": msgpack.ExtType(5, b"x")}), "application/msgpack", id="msgpack-ext"),
    pytest.param(msgpack.packb({"digests": "text", "counts": b""}), "application/msgpack", id="digests-not-bin"),
    pytest.param(msgpack.packb({"block_size": 2**64 - 1, "total_blocks": 2**64 - 1, "zero_blocks": 2**64 - 1,
                                "digests": b"\x01" * 16, "counts": b"\x01\0\0\0"}), "application/msgpack",
                 id="msgpack-uint64-sizes"),
    pytest.param(msgpack.packb({"block_size": 0, "total_blocks": 1, "zero_blocks": 0,
                                "digests": b"\x01" * 16, "counts": b"\x01\0\0\0"}), "application/msgpack",
                 id="msgpack-zero-block-size"),
    pytest.param(msgpack.packb({"block_size": 4096, "total_blocks": 0, "zero_blocks": 5,
                                "digests": b"\x01" * 16, "counts": b"\xff\xff\xff\xff"}), "application/msgpack",
                 id="msgpack-counts-over-total"),
    pytest.param(msgpack.packb({"block_size": 4096, "total_blocks": 1, "zero_blocks": 0, "top": -1,
                                "digests": b"\x01" * 16, "counts": b"\x01\0\0\0"}), "application/msgpack",
                 id="msgpack-negative-top"),
    pytest.param(b"\xc1", "application/msgpack", id="msgpack-reserved-byte"),
    pytest.param(b"\x92\x01", "application/msgpack", id="msgpack-truncated"),
]


@pytest.mark.parametrize("body, content_type", BAD_BODIES)
def test_a_malformed_rank_body_gets_a_one_line_json_4xx(shared_service, body, content_type):
    response = httpx.post(f"{shared_service.base}/v1/rank", content=body, timeout=10,
                          headers={**AUTH, "Content-Type": content_type})
    assert 400 <= response.status_code < 500, response.text
    assert b"\n" not in response.content.strip()
    assert set(response.json()) == {"error", "detail"}
    assert "Traceback" not in shared_service.stderr()


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/v1/hosts/nl2%0A/images", None),
    ("POST", "/v1/manifest", {"image": "nl2\n:/x", "to": "ams-1"}),
    ("POST", "/v1/manifest", {"image": "ams-1:/x", "to": "nl2\n"}),
])
def test_a_host_name_with_a_trailing_newline_is_a_400(shared_service, method, path, body):
    response = httpx.request(method, f"{shared_service.base}{path}", json=body, headers=AUTH, timeout=10)
    assert response.status_code == 400, response.text
    assert "invalid host name" in response.json()["detail"]


@pytest.mark.parametrize("raw", [
    pytest.param(b"POST /v1/rank HTTP/1.1\r\nHost: t\r\nContent-Length: \xc2\xb2\r\n\r\n", id="superscript-length"),
    pytest.param(b"POST /v1/rank HTTP/1.1\r\nHost: t\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
                 id="huge-length"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64, id="tls-hello"),
    pytest.param(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n", id="huge-head"),
])
def test_a_malformed_http_request_gets_a_json_400_and_a_close(shared_service, raw):
    reply = b""
    with socket.create_connection(("127.0.0.1", shared_service.port), timeout=5) as sock:
        try:
            sock.sendall(raw)
            while chunk := sock.recv(1 << 16):
                reply += chunk
        except (ConnectionResetError, BrokenPipeError):
            # The service closed with the rest of a huge head unread: the kernel resets, and may
            # discard the 400 it had sent. Refused either way.
            assert len(raw) > 1 << 16
    if reply:
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), reply[:200]
        assert set(json.loads(body)) == {"error", "detail"}
    assert httpx.get(f"{shared_service.base}/healthz", timeout=5).status_code == 200


def test_an_oversized_body_is_a_413_naming_the_limit(shared_service):
    response = httpx.post(f"{shared_service.base}/v1/rank", content=b"x" * (2 << 20), timeout=10,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 413
    assert "1 MiB" in response.json()["detail"]


def test_serve_on_a_port_in_use_is_one_line_and_exit_1_and_starts_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "cli", "serve", "--bind", f"127.0.0.1:{port}"],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == f"blocksketch: error: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert not (Path(os.environ["BLOCKSKETCH_HOME"]) / "store" / "server.pid").exists()


def embedded_server_pid(home: Path) -> int | None:
    try:
        return int((home / "store" / "server.pid").read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.parametrize("another_user", [False, True], ids=["alone", "store-shared"])
def test_sigterm_stops_serve_with_exit_0_and_releases_the_embedded_store(tmp_path, another_user):
    from store import EmbeddedServer, open_store

    home = Path(os.environ["BLOCKSKETCH_HOME"])
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    other = open_store() if another_user else None
    service = Service(tmp_path, env=env)
    try:
        service.wait_listening()
        store_pid = embedded_server_pid(home)
        assert store_pid is not None and pid_alive(store_pid)
        idle = open_idle_sockets(service.port, 5)  # open keep-alive clients must not hold the stop up
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=15) == 0
        for sock in idle:
            sock.close()
        assert "Traceback" not in service.stderr()
        assert pid_alive(store_pid) == another_user
        if another_user:
            assert other.client.ping()
    finally:
        service.stop()
        if other is not None:
            other.close()
    assert embedded_server_pid(home) is None
    assert not EmbeddedServer(home).socket_path.exists()
    assert list(scratch.iterdir()) == []


def test_max_connections_over_the_fd_limit_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "cli", "serve", "--max-connections", "100000"],
                            capture_output=True, text=True, timeout=60, preexec_fn=limit_fds)
    assert result.returncode == 2
    assert result.stderr.startswith("blocksketch: error: --max-connections: 100000 connections need")
    assert result.stderr.count("\n") == 1


def test_a_5xx_is_logged_with_its_traceback_and_answered_in_one_json_line(tmp_path):
    from tests.redis_server import RedisProcess

    redis = RedisProcess(tmp_path / "redis").start()
    service = Service(tmp_path, "--redis", redis.url)
    try:
        service.wait_listening()
        redis.stop(kill=True)
        response = httpx.get(f"{service.base}/v1/hosts", headers=AUTH, timeout=30)
        assert response.status_code == 503
        assert set(response.json()) == {"error", "detail"} and b"\n" not in response.content.strip()
        log = service.stderr()
        assert "GET /v1/hosts answered 503" in log
        assert "Traceback (most recent call last)" in log
    finally:
        service.stop()
        redis.stop()


def test_a_body_trickling_in_after_the_grace_time_gets_a_408_and_the_connection_closes(shared_service):
    from server.app import BODY_GRACE_S

    with socket.create_connection(("127.0.0.1", shared_service.port), timeout=1) as sock:
        sock.sendall(b"POST /v1/rank HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nAuthorization: Bearer "
                     + TOKEN.encode() + b"\r\nContent-Length: 1000\r\n\r\n{")
        started = time.monotonic()
        reply = b""
        while time.monotonic() - started < BODY_GRACE_S + 5:
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                # A byte a second: alive, but far too slow. None in the last second before the
                # deadline, so no byte is in flight when the service closes (that would be a reset).
                if time.monotonic() - started < BODY_GRACE_S - 1.5:
                    sock.send(b" ")
                continue
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"] == "body_timeout"
    assert BODY_GRACE_S - 0.5 < time.monotonic() - started < BODY_GRACE_S + 3
