"""What hostile clients cost the query service: /healthz and /v1/rank latency under attack.

Usage: python benchmarks/bench_server_hostile.py [--fd-limit 256] [--idle 300] [--probes 40]
       [--body-mib 57] [--timeout 10] [--json]

Everything is real and local (127.0.0.1 only): a private ``redis-server`` (the test suite's
launcher), the built-in sample fleet indexed through :func:`store.refresh_host` (4 KiB blocks),
``blocksketch serve`` as its own process with a bearer token and its file-descriptor limit lowered
to ``--fd-limit``. Each phase sends ``--probes`` requests, one every 50 ms, each on a new
connection (the case a flood hurts: it must be accepted), and reports p50 and max latency:

- ``baseline``: nothing else going on (the reference the other phases are compared with);
- ``idle``: ``--idle`` sockets connected that never send a byte, and one client sending a request
  head one byte every 0.5 s (slowloris), opened just before the probes;
- ``big body``: while one authenticated client posts a ``--body-mib`` MiB msgpack rank query (a
  client image's digests and counts, block size of the index) and waits for its answer; the phase
  also reports that request's own time and status.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import msgpack  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import machine  # noqa: E402

TOKEN = "bench-hostile-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def start_service(directory: Path, redis_url: str, fd_limit: int) -> tuple[subprocess.Popen, str]:
    from tests.redis_server import free_port

    token = directory / "token"
    token.write_text(TOKEN)
    port = free_port()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    process = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--bind", f"127.0.0.1:{port}", "--token-file",
                                str(token), "--redis", redis_url], preexec_fn=limit, stdout=subprocess.DEVNULL,
                               stderr=open(directory / "serve.err", "wb"), cwd=Path(__file__).resolve().parent.parent)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError((directory / "serve.err").read_text())


def request(port: int, raw: bytes, timeout: float = 30.0) -> tuple[float, int]:
    """Seconds to connect, send ``raw`` and read the whole answer (the service closes), and its status.

    A raw socket: an HTTP client library's own set-up (httpx builds an SSL context per client)
    would cost more than the service's answer."""
    started = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(raw)
            reply = b""
            while chunk := sock.recv(1 << 16):
                reply += chunk
        status = int(reply.split(b" ", 2)[1])
    except (OSError, IndexError, ValueError):
        status = 0
    return time.perf_counter() - started, status


def healthz_request() -> bytes:
    return b"GET /healthz HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"


def rank_request(image: str) -> bytes:
    body = json.dumps({"image": image}).encode()
    return (b"POST /v1/rank HTTP/1.1\r\nHost: b\r\nConnection: close\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def probe(port: int, image: str, count: int, timeout: float) -> dict:
    """p50/max seconds of /healthz and of an authenticated /v1/rank, each on a new connection."""
    times: dict[str, list[float]] = {"healthz": [], "rank": []}
    failures = 0
    for _ in range(count):
        for name, raw in (("healthz", healthz_request()), ("rank", rank_request(image))):
            seconds, status = request(port, raw, timeout)
            failures += status != 200
            times[name].append(seconds)
        time.sleep(0.05)
    return {**{f"{name}_{stat}_ms": round(fn(values) * 1000, 1) for name, values in times.items()
               for stat, fn in (("p50", statistics.median), ("max", max))}, "failures": failures}


def idle_attack(port: int, count: int) -> tuple[list[socket.socket], threading.Event]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        sockets.append(sock)
    stop = threading.Event()
    slow = socket.create_connection(("127.0.0.1", port))
    sockets.append(slow)

    def trickle() -> None:
        for byte in b"GET /healthz HTTP/1.1\r\nHost: b\r\n" + b"X-Slow: 1\r\n" * 1000:
            if stop.wait(0.5):
                return
            try:
                slow.send(bytes([byte]))
            except OSError:
                return

    threading.Thread(target=trickle, daemon=True).start()
    return sockets, stop


def big_query(mib: int) -> bytes:
    n = (mib << 20) // 20
    rng = np.random.default_rng(2010)
    return msgpack.packb({"name": "bench", "block_size": 4096, "total_blocks": n, "zero_blocks": 0,
                          "digests": rng.integers(0, 256, n * 16, dtype=np.uint8).tobytes(),
                          "counts": np.ones(n, dtype="<u4").tobytes()}, use_bin_type=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd-limit", type=int, default=256)
    parser.add_argument("--idle", type=int, default=300)
    parser.add_argument("--probes", type=int, default=40)
    parser.add_argument("--body-mib", type=int, default=57)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a probe counts as failed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from sketch.sample import write_sample_fleet
    from store import open_store, refresh_host
    from tests.redis_server import RedisProcess

    directory = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    redis = RedisProcess(directory / "redis").start()
    process = None
    try:
        fleet = write_sample_fleet(str(directory / "fleet"), blocks_per_image=512)
        with open_store(redis.url) as store:
            for host, paths in fleet["hosts"].items():
                refresh_host(store, host, [os.path.dirname(paths[0])], 4096)
        host, paths = next(iter(fleet["hosts"].items()))
        image = f"{host}:{paths[0]}"
        process, base = start_service(directory, redis.url, args.fd_limit)
        port = int(base.rsplit(":", 1)[1])
        results = {"machine": machine(), "fd_limit": args.fd_limit,
                   "baseline": probe(port, image, args.probes, args.timeout)}

        sockets, stop = idle_attack(port, args.idle)
        results["idle"] = {"idle_sockets": args.idle, **probe(port, image, args.probes, args.timeout)}
        stop.set()
        for sock in sockets:
            sock.close()

        body = big_query(args.body_mib)
        outcome = {}

        def post() -> None:
            started = time.perf_counter()
            response = httpx.post(f"{base}/v1/rank", content=body, timeout=120,
                                  headers={**AUTH, "Content-Type": "application/msgpack"})
            outcome.update(status=response.status_code, seconds=round(time.perf_counter() - started, 2))

        poster = threading.Thread(target=post)
        poster.start()
        during = {"healthz": []}
        while poster.is_alive():
            during["healthz"].append(request(port, healthz_request())[0])
            time.sleep(0.02)
        poster.join()
        values = during["healthz"]
        results["big_body"] = {"body_mib": round(len(body) / (1 << 20), 1), "request": outcome,
                               "healthz_probes": len(values),
                               "healthz_p50_ms": round(statistics.median(values) * 1000, 1),
                               "healthz_max_ms": round(max(values) * 1000, 1)}
        base_max = results["baseline"]["healthz_max_ms"]
        results["ratio_healthz_max_vs_baseline"] = {
            "idle": round(results["idle"]["healthz_max_ms"] / base_max, 1),
            "big_body": round(results["big_body"]["healthz_max_ms"] / base_max, 1)}
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        redis.stop()
        shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"machine: {results['machine']}; serve with fd limit {args.fd_limit}")
    for phase in ("baseline", "idle"):
        r = results[phase]
        print(f"{phase:9s} healthz p50 {r['healthz_p50_ms']} ms max {r['healthz_max_ms']} ms; "
              f"rank p50 {r['rank_p50_ms']} ms max {r['rank_max_ms']} ms; failures {r['failures']}")
    r = results["big_body"]
    print(f"big body  {r['body_mib']} MiB msgpack rank: {r['request']}; healthz during it ({r['healthz_probes']} "
          f"probes) p50 {r['healthz_p50_ms']} ms max {r['healthz_max_ms']} ms")
    print(f"healthz max / baseline: {results['ratio_healthz_max_vs_baseline']}")


if __name__ == "__main__":
    main()
