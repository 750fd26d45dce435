"""Query service under load: ``POST /v1/rank`` for an indexed image over a 1,000-host fleet, many clients.

Usage: python benchmarks/bench_server.py [--hosts 1000] [--clients 32] [--seconds 60] [--single-seconds 15]
       [--query-mib 192] [--big-hosts 8] [--top 10] [--exact-top 3] [--servers 1] [--rates 10,20 --rate-seconds 30]
       [--profile-seconds 0] [--seed 2010] [--json]

Everything is real and local (127.0.0.1 only): a private ``redis-server`` (the test suite's launcher),
a fleet indexed through the library (:func:`store.refresh_host` on image files written with
:mod:`sketch.sample`), ``blocksketch serve`` as its own process with a bearer token, and the load
driven from a third process (this script re-run with a hidden ``--drive``: asyncio, one task and one
keep-alive HTTP/1.1 connection per client, each sending its next request as soon as the last one is
answered; a minimal client, because ``httpx.AsyncClient`` cost more CPU per request than the service).

The fleet (4 KiB blocks; every image has 30% zero blocks and 10% of its own blocks repeated):

- host ``origin`` holds the query image: ``--query-mib`` MiB (192 MiB: ~34 K distinct non-zero blocks,
  of which the estimate probes ~17 K; a multi-GiB image gets 24-32 K probes, so the estimate stage
  costs a little less here than for a big image; the exact pass reads maps of this size, ~8x smaller
  than a 1 GiB image's);
- ``--big-hosts`` hosts hold one image of the query's size drawing 40-80% of its non-zero blocks
  from the query's content: the candidates whose block maps the exact pass reads;
- every other host holds one image of 1 MiB (a quarter of them a second one), drawing 0-80% of
  its non-zero blocks from the query's content, the rest its own.

Each request is ``{"image": "origin:<path>", "top", "exact_top"}``: the service reads the query's
block map from Redis, probes the warm fleet of ranking sketches, then reads and compares the block
maps of the ``exact_top`` best candidates. Before the load, the service's answer is checked equal to
:func:`store.ranking.rank_image` called in this process. Reported: requests per second, latency
percentiles, errors (non-200 answers, transport errors, wrong winners), the server-side estimate and
exact-pass seconds the answers carry, CPU used by the server, Redis and the driver, Redis bytes sent
per request, and the same for one client alone. With ``--profile-seconds N`` a further loaded phase
runs under ``py-spy record`` (pip install py-spy) attached to the server, and its on-CPU samples
are split by request stage.

With N clients that never pause, latency = N / throughput on average (Little's law): a p99 of
100 ms at 32 clients needs at least 320 answers per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from sketch.sample import mixed_image, random_blocks, write_image  # noqa: E402

BLOCK_SIZE = 4096
SMALL_BLOCKS = 256  # 1 MiB images
ZERO_FRACTION = 0.3
TOKEN = "bench-server-token"
TIMING_FIELDS = {"seconds", "digests_per_second"}


# -- the fleet ---------------------------------------------------------------------------------


def write_fleet(directory: str, hosts: int, big_hosts: int, query_mib: int, seed: int) -> dict:
    """Image files of the fleet (see the module docstring): ``{"query": path, "hosts": {name: dir}, "big": [...]}``."""
    rng = np.random.default_rng(seed)
    query_blocks = (query_mib << 20) // BLOCK_SIZE
    os.makedirs(os.path.join(directory, "origin"))
    query_path = os.path.join(directory, "origin", "query.img")
    base = random_blocks(rng, query_blocks, BLOCK_SIZE)
    query = mixed_image(rng, base, 0.9, query_blocks, ZERO_FRACTION)
    del base
    write_image(query_path, query)
    query_data = query[query.any(axis=1)]
    del query
    big = set(rng.choice(hosts, size=min(big_hosts, hosts), replace=False).tolist())
    names = {}
    for number in range(hosts):
        name = f"host-{number:04d}"
        host_dir = os.path.join(directory, name)
        os.makedirs(host_dir)
        if number in big:
            images = [mixed_image(rng, query_data, rng.uniform(0.4, 0.8), query_blocks, ZERO_FRACTION)]
        else:
            images = [mixed_image(rng, query_data, rng.uniform(0.0, 0.8), SMALL_BLOCKS, ZERO_FRACTION)
                      for _ in range(1 + int(rng.random() < 0.25))]
        for index, blocks in enumerate(images):
            write_image(os.path.join(host_dir, f"vm{index}.img"), blocks)
        names[name] = host_dir
    return {"query": os.path.realpath(query_path), "query_dir": os.path.dirname(query_path), "hosts": names,
            "big": sorted(f"host-{n:04d}" for n in big)}


def index_fleet(url: str, fleet: dict) -> dict:
    """Index every host through the library, as each host's refresh job would; sizes and timing."""
    from store import open_store, refresh_host

    started = time.perf_counter()
    with open_store(url) as store:
        refresh_host(store, "origin", [fleet["query_dir"]], BLOCK_SIZE)
        for host, directory in fleet["hosts"].items():
            refresh_host(store, host, [directory], BLOCK_SIZE)
        seconds = time.perf_counter() - started
        infos = {h.host: h for h in store.hosts()}
        query_info = store.image("origin", fleet["query"])
    big = [infos[h] for h in fleet["big"]]
    return {"seconds": seconds, "hosts": len(infos), "images": sum(h.images for h in infos.values()),
            "query_blocks": query_info.total_blocks, "query_distinct": query_info.unique_blocks,
            "big_distinct_mean": float(np.mean([h.distinct_blocks for h in big])) if big else 0.0,
            "small_distinct_mean": float(np.mean([h.distinct_blocks for name, h in infos.items()
                                                  if name not in fleet["big"] and name != "origin"]))}


def inprocess_costs(url: str, image: str, top: int, exact_top: int, calls: int = 30) -> dict:
    """One thread, no HTTP: :func:`rank_image` per call (warm fleet), its stages by cProfile share, and
    the fleet check (every catalogue re-read) the service makes at most once a second."""
    import cProfile
    import pstats

    from store import open_store
    from store.ranking import load_fleet, rank_image

    def rank() -> None:
        rank_image(store, image, top=top, exact_top=exact_top, fleet_max_age_s=3600.0)

    with open_store(url) as store:
        rank()
        started = time.perf_counter()
        for _ in range(calls):
            rank()
        per_call = (time.perf_counter() - started) / calls
        started = time.perf_counter()
        for _ in range(10):
            load_fleet(store, 0.0)
        fleet_check = (time.perf_counter() - started) / 10
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            rank()
        profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, function) -> (calls, ncalls, own, cumulative, callers)

    def cumulative(suffix: str, function: str) -> float:
        return sum(v[3] for (path, _, name), v in stats.items() if path.endswith(suffix) and name == function)

    total = cumulative("store/ranking.py", "rank_image")
    maps = cumulative("store/reader.py", "host_block_maps")
    exact = cumulative("sketch/exact.py", "exact_share") + cumulative("sketch/exact.py", "best_image")
    parts = {
        "read the index config (check_block_size)": cumulative("store/reader.py", "check_block_size"),
        "read the query's block map (indexed_query)": cumulative("store/ranking.py", "indexed_query"),
        "estimate stage under the fleet lock (estimate_image)": cumulative("store/ranking.py", "estimate_image"),
        "host details dict over every host (rank_image)": cumulative("store/ranking.py", "<dictcomp>"),
        "read the candidates' block maps (host_block_maps)": maps,
        "exact pass (exact_share, best_image)": exact,
        "rank_fleet: sorting, rows": cumulative("sketch/rank.py", "rank_fleet") - maps - exact,
    }
    parts["other"] = total - sum(parts.values())
    return {"rank_image_ms": per_call * 1e3, "fleet_check_ms": fleet_check * 1e3,
            "stages_ms": {name: value / total * per_call * 1e3 for name, value in parts.items()}}


# -- processes ---------------------------------------------------------------------------------


def start_service(url: str, workdir: str, number: int = 0, extra: list[str] | None = None
                  ) -> tuple[subprocess.Popen, str]:
    """``blocksketch serve`` on a free loopback port with a token (log ``serve<number>.log``); waits for /healthz."""
    import httpx

    from tests.redis_server import free_port

    token_file = os.path.join(workdir, "token")
    with open(token_file, "w") as handle:
        handle.write(TOKEN + "\n")
    port = free_port()
    log_path = os.path.join(workdir, f"serve{number}.log")
    log = open(log_path, "wb")
    process = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--bind", f"127.0.0.1:{port}",
                                "--token-file", token_file, "--redis", url, *(extra or [])],
                               cwd=str(Path(__file__).resolve().parent.parent), stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"service did not start: {Path(log_path).read_text()}")
        time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (from /proc)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_driver(bases: list[str], body: dict | None, clients: int, seconds: float, expected_winner: str | None,
               rate: float | None = None, seed: int = 0) -> dict:
    """The load from a separate process (this script with ``--drive``); its JSON report. ``body``
    None sends ``GET /healthz`` instead (the HTTP stack's own cost, for reference)."""
    config = json.dumps({"bases": bases, "token": TOKEN, "body": body, "clients": clients, "seconds": seconds,
                         "expected_winner": expected_winner, "rate": rate, "seed": seed})
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--drive", config],
                          capture_output=True, text=True, timeout=seconds + 300)
    if done.returncode != 0:
        raise RuntimeError(f"load driver failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def loaded_phase(bases: list[str], body: dict | None, clients: int, seconds: float, winner: str | None, pids: dict,
                 redis_client, rate: float | None = None) -> dict:
    """One driver run, with the CPU of the servers and Redis and Redis's output bytes measured around it."""
    def cpu() -> dict:
        return {name: sum(cpu_seconds(pid) for pid in group) for name, group in pids.items()}

    before = cpu()
    sent_before = int(redis_client.info("stats")["total_net_output_bytes"])
    load_before = os.getloadavg()[0]
    report = run_driver(bases, body, clients, seconds, winner, rate, seed=len(bases) * 1000 + clients)
    after = cpu()
    report["cpu_cores"] = {name: (after[name] - before[name]) / report["elapsed_s"] for name in pids}
    report["cpu_cores"]["driver"] = report["driver_cpu_s"] / report["elapsed_s"]
    sent = int(redis_client.info("stats")["total_net_output_bytes"]) - sent_before
    report["redis_bytes_per_request"] = sent / max(1, report["requests"] + report["errors"])
    report["load_average"] = [load_before, os.getloadavg()[0]]
    return report


def profile_phase(base: str, body: dict, clients: int, seconds: float, winner: str, server_pid: int,
                  workdir: str) -> dict:
    """A loaded phase with ``py-spy record --idle --nonblocking`` on one server: where its threads are."""
    spy = shutil.which("py-spy")
    if spy is None:
        return {"error": "py-spy is not installed (pip install py-spy)"}
    raw = os.path.join(workdir, "profile.txt")
    recorder = subprocess.Popen([spy, "record", "--idle", "--nonblocking", "--format", "raw", "--rate", "100",
                                 "--output", raw, "--pid", str(server_pid), "--duration", str(int(seconds) + 2)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # py-spy attaches before the load starts
    report = run_driver([base], body, clients, seconds, winner)
    try:
        recorder.wait(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        recorder.kill()
        recorder.wait()
    if not os.path.exists(raw):
        return {"error": f"py-spy wrote no profile: {recorder.stderr.read().decode().strip()[-500:]}"}
    return {"driver": report, **summarise_profile(raw)}


# Where a sampled thread is, by its innermost frame: waiting for the warm fleet's lock, in a Redis
# socket call (waiting for Redis, or for the GIL once the call returns), or idle.
LOCK_WAIT = "estimate_image (store/ranking.py"
REDIS_IO = ("redis/_parsers/socket.py", "send_packed_command (redis/connection.py")
IDLE = ("Condition.wait (threading.py", "select (selectors.py", "_worker (concurrent/futures")
# Stages of a busy thread's request, by a function on its stack (the first match in this list wins).
STAGES = [
    ("exact pass (sketch/exact.py)", "sketch/exact.py"),
    ("estimate: probe the warm fleet (FleetSketches.estimate)", "estimate (sketch/estimate.py"),
    ("estimate: build the probe set", "probes (sketch/rank.py"),
    ("fleet check: re-read every catalogue (max age 1 s)", "_update (store/ranking.py"),
    ("host details dict over every host (rank_image)", "rank_image.<locals>.<dictcomp>"),
    ("read + decode block maps from Redis", "_load_map (store/reader.py"),
    ("other store reads (config, catalogue, image entry)", "store/reader.py"),
    ("rank_fleet: sorting and rows", "rank_fleet (sketch/rank.py"),
    ("JSON encoding of the answer", "render (starlette/responses.py"),
    ("HTTP (uvicorn/h11/starlette), body parsing, other", ""),
]


def summarise_profile(raw_path: str) -> dict:
    """Of the samples of threads serving a request: waiting for the fleet lock, in Redis calls, or busy;
    the busy ones by request stage.

    A busy sample is a thread running Python or waiting for the GIL (py-spy cannot tell them apart).
    """
    stages: Counter = Counter()
    own: Counter = Counter()
    total = waiting = redis_io = idle = 0
    with open(raw_path) as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            samples = int(count)
            total += samples
            leaf = stack.split(";")[-1].strip()
            if LOCK_WAIT in leaf:
                waiting += samples
            elif any(marker in leaf for marker in REDIS_IO):
                redis_io += samples
            elif any(marker in leaf for marker in IDLE):
                idle += samples
            else:
                stages[next(name for name, marker in STAGES if marker in stack)] += samples
                own[leaf] += samples
    working = max(1, total - idle)  # samples of threads serving a request (idle pool threads left out)
    busy = max(1, working - waiting - redis_io)
    return {"samples": total, "working_samples": working, "lock_wait_share": waiting / working,
            "redis_io_share": redis_io / working, "busy_share": busy / working,
            "busy_stages": {name: stages[name] / busy for name, _ in STAGES if stages[name]},
            "busy_top_self": [(name, count / busy) for name, count in own.most_common(10)]}


# -- the driver process ------------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection over asyncio streams, reconnecting after a failure.

    The driver shares the 2 cores with the service, so it must be cheap: ``httpx.AsyncClient`` with
    32 connections took ~3.6 ms of CPU per request here, more than the service took to answer
    ``/healthz``; this takes a small fraction of that.
    """

    def __init__(self, base: str, token: str, timeout: float = 60.0):
        address = urlsplit(base)
        self.host, self.port = address.hostname, address.port
        self.head = f"Host: {self.host}:{self.port}\r\nAuthorization: Bearer {token}\r\n"
        self.timeout = timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        reused = self.writer is not None
        try:
            return await asyncio.wait_for(self._request(method, path, body), self.timeout)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self.close()
            # The service closes connections idle for 5 s (uvicorn's keep-alive timeout); a request
            # that met such a close before any answer byte is sent again once on a new connection.
            if not reused or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                raise
        except BaseException:
            self.close()
            raise
        try:
            return await asyncio.wait_for(self._request(method, path, body), self.timeout)
        except BaseException:
            self.close()
            raise

    async def _request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        extra = "" if body is None else f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(f"{method} {path} HTTP/1.1\r\n{self.head}{extra}\r\n".encode() + (body or b""))
        lines = (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = dict((name.strip().lower(), value.strip()) for name, _, value in
                       (line.partition(b":") for line in lines[1:] if line))
        if b"content-length" not in headers:
            raise ConnectionError(f"answer {status} without Content-Length")
        data = await self.reader.readexactly(int(headers[b"content-length"]))
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _drive(config: dict) -> dict:
    """Closed loop (``rate`` None: each client sends again as soon as answered) or open loop (Poisson
    arrivals at ``rate`` per second, at most ``clients`` in flight; latency counted from the scheduled
    arrival, so time queued behind busy clients counts too). Clients are spread over ``bases``."""
    clients, expected, rate = config["clients"], config["expected_winner"], config["rate"]
    body = None if config["body"] is None else json.dumps(config["body"]).encode()
    latencies: list[float] = []
    estimate_s: list[float] = []
    exact_s: list[float] = []
    errors: Counter = Counter()
    bases = config["bases"]
    connections = [Connection(bases[i % len(bases)], config["token"]) for i in range(clients)]

    async def one(connection: Connection, since: float) -> None:
        try:
            if body is None:  # the reference: the HTTP stack and one Redis PING
                status, data = await connection.request("GET", "/healthz")
            else:
                status, data = await connection.request("POST", "/v1/rank", body)
        except (TimeoutError, OSError, EOFError, ValueError, asyncio.LimitOverrunError) as exc:
            errors[f"{type(exc).__name__}: {exc}"[:200]] += 1
            return
        elapsed = time.perf_counter() - since
        if status != 200:
            errors[f"{status}: {data[:200].decode(errors='replace')}"] += 1
            return
        answer = json.loads(data)
        if body is not None:
            if answer.get("winner") != expected:
                errors[f"wrong winner {answer.get('winner')!r}"] += 1
                return
            estimate_s.append(answer["estimate"]["seconds"])
            exact_s.append(answer["exact"]["seconds"])
        latencies.append(elapsed)

    try:
        # Open every connection before the measured window.
        await asyncio.gather(*(c.request("GET", "/healthz") for c in connections))
        started = time.perf_counter()
        deadline = started + config["seconds"]
        offered = 0
        if rate is None:
            async def worker(connection: Connection) -> None:
                while time.perf_counter() < deadline:
                    await one(connection, time.perf_counter())

            await asyncio.gather(*(worker(c) for c in connections))
        else:
            idle: asyncio.Queue = asyncio.Queue()
            for connection in connections:
                idle.put_nowait(connection)
            rng = np.random.default_rng(config["seed"])

            async def arrival(scheduled: float) -> None:
                connection = await idle.get()
                try:
                    await one(connection, scheduled)
                finally:
                    idle.put_nowait(connection)

            tasks, at = [], started
            while True:
                at += float(rng.exponential(1.0 / rate))
                if at >= deadline:
                    break
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                tasks.append(asyncio.create_task(arrival(at)))
                offered += 1
            await asyncio.gather(*tasks)
        elapsed_s = time.perf_counter() - started
    finally:
        for connection in connections:
            connection.close()
    ms = np.array(latencies) * 1e3

    def pct(values, q):
        return float(np.percentile(values, q)) if len(values) else None

    return {"clients": clients, "servers": len(bases), "rate": rate, "offered": offered,
            "elapsed_s": elapsed_s, "requests": len(latencies),
            "errors": sum(errors.values()), "error_kinds": dict(errors.most_common(5)),
            "throughput_rps": len(latencies) / elapsed_s,
            "latency_ms": {"p50": pct(ms, 50), "p90": pct(ms, 90), "p99": pct(ms, 99),
                           "max": float(ms.max()) if len(ms) else None, "mean": float(ms.mean()) if len(ms) else None},
            "server_estimate_ms_p50": pct(np.array(estimate_s) * 1e3, 50),
            "server_exact_ms_p50": pct(np.array(exact_s) * 1e3, 50),
            "driver_cpu_s": time.process_time()}


def drive_main(config_json: str) -> None:
    print(json.dumps(asyncio.run(_drive(json.loads(config_json)))))


# -- main --------------------------------------------------------------------------------------


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_FIELDS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(args) -> dict:
    import httpx
    import redis

    from store import open_store
    from store.ranking import rank_image
    from tests.redis_server import RedisProcess

    result: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "hosts": args.hosts,
                    "clients": args.clients, "seconds": args.seconds, "servers": args.servers,
                    "block_size": BLOCK_SIZE, "query_mib": args.query_mib, "big_hosts": args.big_hosts,
                    "top": args.top, "exact_top": args.exact_top}
    workdir = tempfile.mkdtemp(prefix="bench-server-")
    server = RedisProcess(Path(workdir) / "redis").start()
    services: list[subprocess.Popen] = []
    try:
        started = time.perf_counter()
        fleet = write_fleet(os.path.join(workdir, "fleet"), args.hosts, args.big_hosts, args.query_mib, args.seed)
        result["write_seconds"] = time.perf_counter() - started
        result["fleet"] = index_fleet(server.url, fleet)
        image = f"origin:{fleet['query']}"
        body = {"image": image, "top": args.top, "exact_top": args.exact_top}

        bases = []
        for number in range(args.servers):
            process, base = start_service(server.url, workdir, number)
            services.append(process)
            bases.append(base)
        with open_store(server.url) as store:
            direct = rank_image(store, image, top=args.top, exact_top=args.exact_top)
        for base in bases:
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as http:
                started = time.perf_counter()
                first = http.post("/v1/rank", json=body)
                result["first_request_ms"] = (time.perf_counter() - started) * 1e3  # loads the fleet's sketches
                if first.status_code != 200:
                    raise RuntimeError(f"the service answered {first.status_code}: {first.text[:500]}")
                answer = first.json()
                result["answer_equals_library"] = without_timings(answer) == without_timings(direct)
                if not result["answer_equals_library"]:
                    raise RuntimeError("the service's answer differs from rank_image in-process")
                for _ in range(20):  # warm the server's code paths and caches
                    http.post("/v1/rank", json=body)
        result["winner"] = answer["winner"]
        result["winner_is_big_host"] = answer["winner"] in fleet["big"]
        result["exact_digests_per_request"] = answer["exact"]["digests"]
        result["light_probes"] = answer["estimate"]["light_probes"]
        result["in_process"] = inprocess_costs(server.url, image, args.top, args.exact_top)

        pids = {"server": [p.pid for p in services], "redis": [server.process.pid]}
        client = redis.Redis.from_url(server.url)
        winner = answer["winner"]
        result["single"] = loaded_phase(bases[:1], body, 1, args.single_seconds, winner,
                                        {"server": pids["server"][:1], "redis": pids["redis"]}, client)
        result["concurrent"] = loaded_phase(bases, body, args.clients, args.seconds, winner, pids, client)
        result["healthz"] = loaded_phase(bases, None, args.clients, min(10.0, args.seconds), None, pids, client)
        result["open_loop"] = [loaded_phase(bases, body, args.clients, args.rate_seconds, winner, pids, client, rate)
                               for rate in args.rates]
        if args.profile_seconds:
            result["profile"] = profile_phase(bases[0], body, args.clients, args.profile_seconds, winner,
                                              services[0].pid, workdir)
        client.close()
        result["service_alive"] = all(p.poll() is None for p in services)
        concurrent = result["concurrent"]
        result["goal_met"] = bool(concurrent["errors"] == 0 and concurrent["latency_ms"]["p99"] is not None
                                  and concurrent["latency_ms"]["p99"] <= 100)
    finally:
        for process in services:
            stop(process)
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def print_phase(label: str, r: dict) -> None:
    lat = r["latency_ms"]
    if lat["p50"] is None:
        print(f"{label}: no successful request; errors {r['errors']}: {r['error_kinds']}")
        return
    cpu = r["cpu_cores"]
    print(f"{label}: {r['requests']} answers in {r['elapsed_s']:.1f} s = {r['throughput_rps']:.1f} req/s; "
          f"latency p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f} ms, p99 {lat['p99']:.1f} ms, "
          f"max {lat['max']:.1f} ms (mean {lat['mean']:.1f}); errors {r['errors']}"
          + (f" {r['error_kinds']}" if r["errors"] else ""))
    server_side = "" if r["server_estimate_ms_p50"] is None else (
        f"server-side p50: estimate {r['server_estimate_ms_p50']:.1f} ms, exact pass "
        f"{r['server_exact_ms_p50']:.1f} ms; ")
    per_request = cpu["server"] / r["throughput_rps"] * 1e3 if r["throughput_rps"] else float("nan")
    print(f"  {server_side}CPU in cores: server {cpu['server']:.2f} ({per_request:.1f} ms per answer), "
          f"redis {cpu['redis']:.2f}, driver {cpu['driver']:.2f}; redis sent "
          f"{r['redis_bytes_per_request'] / 2**20:.2f} MiB per request; "
          f"load average {r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f}")


def print_human(r: dict) -> None:
    f = r["fleet"]
    print(f"machine: {r['machine']}")
    print(f"fleet: {f['hosts']} hosts ({r['hosts']} + origin), {f['images']} images, {r['block_size']} B blocks; "
          f"query {r['query_mib']} MiB = {f['query_blocks']} blocks, {f['query_distinct']} distinct non-zero; "
          f"{r['big_hosts']} big hosts of {f['big_distinct_mean']:.0f} distinct blocks, the others "
          f"{f['small_distinct_mean']:.0f}; written in {r['write_seconds']:.1f} s, indexed in {f['seconds']:.1f} s")
    print(f"request: top {r['top']}, exact_top {r['exact_top']}; {r['light_probes']} light probes, "
          f"{r['exact_digests_per_request']} digests in the exact pass; first request (loads the fleet) "
          f"{r['first_request_ms']:.0f} ms; answer == rank_image in-process: {r['answer_equals_library']}; "
          f"winner {r['winner']} (a big host: {r['winner_is_big_host']})")
    c = r["in_process"]
    print(f"in process, one thread, no HTTP: rank_image {c['rank_image_ms']:.1f} ms per call (warm fleet); by "
          "cProfile share: " + ", ".join(f"{name} {ms:.1f}" for name, ms in c["stages_ms"].items())
          + f"; the fleet check (at most once a second, under the fleet lock) {c['fleet_check_ms']:.1f} ms")
    servers = f" over {r['servers']} service processes" if r["servers"] > 1 else ""
    print_phase("1 client", r["single"])
    print_phase(f"{r['clients']} clients{servers}", r["concurrent"])
    concurrent = r["concurrent"]
    if concurrent["throughput_rps"]:
        print(f"  Little's law: {r['clients']} clients / {concurrent['throughput_rps']:.1f} req/s = "
              f"{r['clients'] / concurrent['throughput_rps'] * 1e3:.0f} ms mean latency; p99 <= 100 ms at "
              f"{r['clients']} clients needs >= {r['clients'] * 10} req/s "
              f"({concurrent['throughput_rps'] / (r['clients'] * 10):.2f}x of that measured)")
    print_phase(f"reference, GET /healthz (one Redis PING), {r['clients']} clients{servers}", r["healthz"])
    print(f"goal (p99 <= 100 ms, zero errors, {r['clients']} clients): {'met' if r['goal_met'] else 'NOT met'}; "
          f"service alive at the end: {r['service_alive']}")
    for phase in r["open_loop"]:
        print_phase(f"open loop, Poisson arrivals at {phase['rate']:g}/s (at most {phase['clients']} in flight"
                    f"{servers})", phase)
    p = r.get("profile")
    if p:
        if "error" in p:
            print(f"profile: {p['error']}")
            return
        d = p["driver"]
        print(f"profile (py-spy record --idle --nonblocking on the server, {d['clients']} clients, "
              f"{d['throughput_rps']:.1f} req/s): of {p['working_samples']} samples of threads serving a request, "
              f"{p['lock_wait_share'] * 100:.0f}% wait for the warm fleet's lock, {p['redis_io_share'] * 100:.0f}% "
              f"are in Redis socket calls (waiting for Redis or for the GIL after them), {p['busy_share'] * 100:.0f}% "
              f"busy (running Python or waiting for the GIL), in")
        for name, share in p["busy_stages"].items():
            print(f"  {share * 100:5.1f}%  {name}")
        print("  busy samples by innermost frame:")
        for name, share in p["busy_top_self"]:
            print(f"  {share * 100:5.1f}%  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--single-seconds", type=float, default=15.0)
    parser.add_argument("--query-mib", type=int, default=192)
    parser.add_argument("--big-hosts", type=int, default=8)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--exact-top", type=int, default=3)
    parser.add_argument("--servers", type=int, default=1,
                        help="service processes over one Redis, clients spread over them (what workers would give)")
    parser.add_argument("--rates", type=lambda text: [float(x) for x in text.split(",") if x], default=[],
                        help="open-loop phases at these arrival rates per second, e.g. 10,20,30")
    parser.add_argument("--rate-seconds", type=float, default=30.0)
    parser.add_argument("--profile-seconds", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=2010)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        drive_main(args.drive)
        return
    durations = (args.seconds, args.single_seconds, args.rate_seconds)
    if min(args.hosts, args.clients, args.servers) < 1 or min(durations) <= 0 or any(r <= 0 for r in args.rates):
        parser.error("--hosts, --clients and --servers must be at least 1; durations and rates positive")
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_human(result)


if __name__ == "__main__":
    main()
