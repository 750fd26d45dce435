"""Fuzz the HTTP query service with schemathesis: every operation, no 5xx, answers as documented.

Usage: python benchmarks/fuzz_server.py [--max-examples 100] [--seed 2010] [--checks LIST] [--workers 1]
       [--phases examples,coverage,fuzzing] [--keep-report DIR] [-- SCHEMATHESIS_RUN_OPTIONS...]

Starts a private ``redis-server`` (the test suite's launcher), indexes the built-in sample fleet
(:func:`sketch.sample.write_sample_fleet`: ``ams-1``, ``fra-2``, ``lon-3`` with two images each and
``origin`` holding the source image, 4 KiB blocks) through :func:`store.refresh_host`, starts
``blocksketch serve`` with a token and a 1 MiB body limit, then runs
``schemathesis run URL/openapi.json`` with the bearer header: every operation of the served OpenAPI
document, ``--max-examples`` test cases per operation in each phase, positive and negative data.

Checks (``--checks``): by default ``not_a_server_error`` (no 5xx), ``status_code_conformance``,
``content_type_conformance``, ``response_schema_conformance``, ``response_headers_conformance``,
``negative_data_rejection``, ``missing_required_header``, ``ignored_auth`` and ``unsupported_method``.
``positive_data_acceptance`` is left out: a request that matches the schema may still name a host or image
that is not indexed, and the right answer to it is 404.

This module is also the run's hook module (schemathesis imports it through ``SCHEMATHESIS_HOOKS``):

- a serializer for ``application/msgpack``, so the msgpack rank query is fuzzed too (binary fields
  sent as msgpack bin), and about half of those queries made consistent (whole 16-byte digests, one
  count of 1-1000 each, ``total_blocks`` adding up, 4 KiB blocks) so they get past the size checks;
- about half of the generated ``image``, ``to`` and ``{host}`` values that are otherwise valid are
  replaced by indexed ones (from ``BLOCKSKETCH_FUZZ_NAMES``), so the fuzzer reaches the ranking,
  manifest and listing code behind the 404s, with fuzzed ``top``, ``exact_top``, ``exclude_hosts``
  and ``include_manifest``.

Prints schemathesis's own report, then the requests it sent per operation and status (from its HAR
report), and exits 1 if any check failed or the service stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NAMES_ENV = "BLOCKSKETCH_FUZZ_NAMES"
DEFAULT_CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
                  "response_headers_conformance,negative_data_rejection,missing_required_header,ignored_auth,"
                  "unsupported_method")


# -- hooks (run inside schemathesis) -----------------------------------------------------------


def _pick(value: object, choices: list[str]) -> str | None:
    """One of ``choices`` for about half of the values (chosen by the value's hash: hooks map, not draw)."""
    if not choices:
        return None
    digest = hashlib.sha256(repr(value).encode("utf-8", "surrogatepass")).digest()
    return choices[digest[1] % len(choices)] if digest[0] % 2 == 0 else None


def _bytes(value: object) -> bytes | None:
    data = getattr(value, "data", value)
    return bytes(data) if isinstance(data, bytes | bytearray) else None


def repair_query(body: dict) -> None:
    """Make about half of the msgpack rank queries consistent (whole digests, one count each, counts
    adding up), so fuzzing gets past the size checks into sorting, duplicate and ranking code."""
    digests, counts = _bytes(body.get("digests")), _bytes(body.get("counts"))
    numbers = [body.get(name) for name in ("block_size", "total_blocks", "zero_blocks")]
    # Only bodies valid in everything this rewrites: a negative case must stay negative.
    if digests is None or counts is None or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
        return
    if _pick(("query", digests, counts), ["repair"]) is None:
        return
    import numpy as np

    rows = len(digests) // 16
    raw = np.frombuffer((counts + bytes(4 * rows))[: 4 * rows], dtype="<u4")
    repaired = (raw % 1000 + 1).astype("<u4")
    zero = body["zero_blocks"] % (1 << 40)
    body.update({"digests": digests[: 16 * rows], "counts": repaired.tobytes(), "block_size": 4096,
                 "zero_blocks": zero, "total_blocks": int(repaired.sum(dtype=np.int64)) + zero})


def register_hooks() -> None:
    """The msgpack serializer and the name-substituting hooks (see the module docstring)."""
    import msgpack
    import schemathesis

    names = json.loads(os.environ.get(NAMES_ENV, '{"images": [], "hosts": []}'))

    def plain(value):
        # schemathesis hands binary fields over as wrapper objects; msgpack wants bytes.
        data = getattr(value, "data", None)
        if isinstance(data, bytes | bytearray):
            return bytes(data)
        if isinstance(value, int):  # beyond msgpack's 64 bits: the nearest thing it can carry
            return float(value)
        raise TypeError(f"cannot encode {type(value).__name__} as msgpack")

    @schemathesis.serializer("application/msgpack")
    def to_msgpack(ctx, value):
        return msgpack.packb(value, use_bin_type=True, default=plain)

    @schemathesis.hook
    def map_body(ctx, body):
        if not isinstance(body, dict):
            return body
        repair_query(body)
        for field, kind in (("image", "images"), ("to", "hosts")):
            if isinstance(body.get(field), str) and body[field]:
                replacement = _pick((field, body[field]), names[kind])
                if replacement is not None:
                    body[field] = replacement
        return body

    @schemathesis.hook
    def map_path_parameters(ctx, parameters):
        if isinstance(parameters, dict) and isinstance(parameters.get("host"), str) and parameters["host"]:
            replacement = _pick(("host", parameters["host"]), names["hosts"])
            if replacement is not None:
                parameters["host"] = replacement
        return parameters


if __name__ != "__main__" and os.environ.get(NAMES_ENV) is not None:
    register_hooks()


# -- the run -----------------------------------------------------------------------------------


def index_sample_fleet(url: str, directory: str) -> dict:
    """The sample fleet, indexed; the names the hooks substitute."""
    from sketch.sample import write_sample_fleet
    from store import open_store, refresh_host

    fleet = write_sample_fleet(directory, blocks_per_image=512)
    with open_store(url) as store:
        for host, paths in fleet["hosts"].items():
            refresh_host(store, host, [os.path.dirname(paths[0])], 4096)
        refresh_host(store, "origin", [fleet["source"]], 4096)
        images = [f"{i.host}:{i.path}" for i in store.images()]
        hosts = store.host_names()
    return {"images": images, "hosts": hosts}


def status_table(report_dir: str) -> list[str]:
    """Requests per operation, media type and status, from schemathesis's HAR report: did the fuzzer
    get past the 4xx into the code behind them?"""
    import glob
    from collections import Counter
    from urllib.parse import urlsplit

    found = sorted(glob.glob(os.path.join(report_dir, "har-*.json")), key=os.path.getmtime)
    if not found:
        return ["(no HAR report)"]
    with open(found[-1]) as handle:
        entries = json.load(handle)["log"]["entries"]
    table: dict[tuple[str, str, str], Counter] = {}
    for entry in entries:
        request = entry["request"]
        path = urlsplit(request["url"]).path
        if path.startswith("/v1/hosts/") and path != "/v1/hosts":
            path = "/v1/hosts/{host}/images"
        media = (request.get("postData") or {}).get("mimeType", "").split(";")[0]
        table.setdefault((path, request["method"], media), Counter())[entry["response"]["status"]] += 1
    lines = []
    for (path, method, media), statuses in sorted(table.items()):
        if set(statuses) == {405}:
            continue  # the undeclared-method probes, one each
        shown = ", ".join(f"{status} x{count}" for status, count in sorted(statuses.items()))
        lines.append(f"  {method} {path}{f' ({media})' if media else ''}: {shown}")
    methods = sum(c[405] for c in table.values())
    lines.append(f"  + {methods} requests with undeclared methods (405); {len(entries)} requests in all")
    return lines


def run(args) -> int:
    from benchmarks.bench_server import TOKEN, start_service, stop
    from benchmarks.common import machine
    from tests.redis_server import RedisProcess

    print(f"machine: {machine()}")
    workdir = tempfile.mkdtemp(prefix="fuzz-server-")
    server = RedisProcess(Path(workdir) / "redis").start()
    service = None
    try:
        names = index_sample_fleet(server.url, os.path.join(workdir, "fleet"))
        service, base = start_service(server.url, workdir, extra=["--max-body-mib", "1"])
        report_dir = args.keep_report or os.path.join(workdir, "report")
        env = {**os.environ, NAMES_ENV: json.dumps(names), "SCHEMATHESIS_HOOKS": "benchmarks.fuzz_server",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json",
                   "--header", f"Authorization: Bearer {TOKEN}", "--checks", args.checks,
                   "--max-examples", str(args.max_examples), "--seed", str(args.seed), "--workers", str(args.workers),
                   "--phases", args.phases, "--generation-database", "none", "--request-timeout", "60",
                   "--report", "junit,har", "--report-dir", report_dir, "--no-color", "--continue-on-failure",
                   *args.schemathesis]
        shown = [part if TOKEN not in part else "Authorization: Bearer ***" for part in command]
        print(f"indexed: {', '.join(names['hosts'])} ({len(names['images'])} images); service {base}")
        print("running: " + " ".join(shown[1:]), flush=True)
        started = time.perf_counter()
        # In the temporary directory: schemathesis keeps a crash cache (.schemathesis/) where it runs.
        done = subprocess.run(command, env=env, cwd=workdir, timeout=args.timeout)
        seconds = time.perf_counter() - started
        alive = service.poll() is None
        print("requests by operation and status (schemathesis's HAR report):")
        print("\n".join(status_table(report_dir)))
        print(f"schemathesis exit code {done.returncode} after {seconds:.0f} s; service alive at the end: {alive}; "
              f"reports in {report_dir if args.keep_report else '(temporary directory)'}")
        log = Path(workdir, "serve0.log").read_text(errors="replace").strip()
        if "Traceback" in log:
            print("service log has a traceback:\n" + log[-3000:])
        return 0 if done.returncode == 0 and alive else 1
    finally:
        if service is not None:
            stop(service)
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2010)
    parser.add_argument("--checks", default=DEFAULT_CHECKS)
    # One worker: with two, schemathesis 4.32 ran markedly fewer cases for some operations.
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--phases", default="examples,coverage,fuzzing")
    parser.add_argument("--timeout", type=float, default=3600.0, help="stop schemathesis after this many seconds")
    parser.add_argument("--keep-report", default=None, help="write schemathesis's reports here instead of a temp dir")
    parser.add_argument("schemathesis", nargs="*", help="further `schemathesis run` options, after --")
    args = parser.parse_args()
    if args.max_examples < 1 or args.workers < 1:
        parser.error("--max-examples and --workers must be at least 1")
    sys.exit(run(args))


if __name__ == "__main__":
    main()
