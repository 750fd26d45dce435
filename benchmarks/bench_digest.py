"""Digest throughput of blocksketch vs `openssl speed -evp md5 -bytes 512`, measured in one run.

Usage: python benchmarks/bench_digest.py [--size-mib 1024] [--block-size 512] [--json]

Writes a file of random (non-zero) data, reads it once to warm the page cache, then times
`sketch.digests.digest_image` with every core, a single-process per-block hashlib loop, and
openssl's single-core figure, and prints the ratios. The goal: blocksketch >= 1.0x openssl.
Then, for every MD5 implementation of the C extension this machine runs (forced with
BLOCKSKETCH_MD5 in a child process), the in-memory kernel on one core (`md5_blocks` over a 4 MiB
chunk, like openssl's figure) and `digest_image` with one worker and with every core.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import machine, openssl_speed  # noqa: E402
from sketch.digests import default_workers, digest_image  # noqa: E402


def write_random(path: str, size: int) -> None:
    chunk = 16 << 20
    with open(path, "wb") as handle:
        for _ in range(0, size, chunk):
            handle.write(os.urandom(min(chunk, size)))


def hashlib_loop(path: str, block_size: int) -> float:
    md5 = hashlib.md5
    start = time.perf_counter()
    with open(path, "rb") as handle:
        while data := handle.read(4 << 20):
            view = memoryview(data)
            b"".join([md5(view[o : o + block_size]).digest() for o in range(0, len(data), block_size)])
    return time.perf_counter() - start


def best_of(runs: int, function) -> float:
    return min(function() for _ in range(runs))


# Runs in a child process, so that BLOCKSKETCH_MD5 is read at import; prints MB/s as JSON.
IMPLEMENTATION_PROBE = """
import json, os, sys, time
import numpy as np
from sketch import _blockhash
from sketch.digests import default_workers, digest_image
path, block_size, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
size = os.path.getsize(path)
chunk = np.frombuffer(os.urandom(4 << 20), dtype=np.uint8)
digests, zero = np.empty((len(chunk) // block_size, 16), np.uint8), np.empty(len(chunk) // block_size, np.uint8)
def timed(function, *args):
    function(*args)
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        function(*args)
        best = min(best, time.perf_counter() - start)
    return best
print(json.dumps({
    "implementation": _blockhash.IMPLEMENTATION,
    "kernel_one_core_mb_s": len(chunk) / timed(_blockhash.md5_blocks, chunk, block_size, digests, zero) / 1e6,
    "digest_image_one_worker_mb_s": size / timed(digest_image, path, block_size, "md5", None, 1) / 1e6,
    "digest_image_all_cores_mb_s": size / timed(digest_image, path, block_size, "md5", None, default_workers()) / 1e6,
}))
"""


def implementation_figures(path: str, block_size: int, runs: int) -> list[dict]:
    """MB/s of every MD5 implementation the C extension runs here, each forced by BLOCKSKETCH_MD5."""
    try:
        from sketch import _blockhash
    except ImportError:
        return []
    rows = []
    for name in _blockhash.AVAILABLE:
        env = dict(os.environ, BLOCKSKETCH_MD5=name)
        out = subprocess.run([sys.executable, "-c", IMPLEMENTATION_PROBE, path, str(block_size), str(runs)],
                             env=env, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out))
    return rows


def whole_process(path: str, block_size: int, runs: int, scratch: str) -> dict[str, float]:
    """Seconds of whole ``blocksketch compare`` and ``index`` processes (start-up, digest, sort,
    and for index the publish to a private embedded store), best of ``runs``: what a user waits."""
    target = os.path.join(scratch, "target.img")
    with open(target, "wb") as handle:
        handle.write(os.urandom(block_size))
    env = {**os.environ, "BLOCKSKETCH_HOME": os.path.join(scratch, "home")}
    env.pop("BLOCKSKETCH_REDIS_URL", None)
    commands = {
        "compare": [sys.executable, "-m", "cli", "compare", path, target, "--block-size", str(block_size), "--json"],
        "index": [sys.executable, "-m", "cli", "index", path, "--host", "bench", "--block-size", str(block_size),
                  "--json"],
    }
    def once(name: str) -> float:
        if name == "index":  # a changed mtime makes the refresh read the image again
            os.utime(path)
        start = time.perf_counter()
        subprocess.run(commands[name], env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start

    return {name: best_of(runs, lambda name=name: once(name)) for name in commands}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(prefix="bench-digest-", dir=os.environ.get("BENCH_DIR")) as scratch:
        path = os.path.join(scratch, "random.img")
        if not args.json:
            print(f"writing {args.size_mib} MiB of random data ...", file=sys.stderr)
        write_random(path, size)
        digest_image(path, args.block_size)  # warm the page cache and the worker pool

        def ours() -> float:
            start = time.perf_counter()
            digest_image(path, args.block_size)
            return time.perf_counter() - start

        ours_seconds = best_of(args.runs, ours)
        loop_seconds = best_of(1, lambda: hashlib_loop(path, args.block_size))
        implementations = implementation_figures(path, args.block_size, args.runs)
        processes = whole_process(path, args.block_size, args.runs, scratch)
    openssl = openssl_speed("md5", args.block_size)
    result = {
        "machine": machine(),
        "block_size": args.block_size,
        "size_bytes": size,
        "workers": default_workers(),
        "blocksketch_mb_s": size / ours_seconds / 1e6,
        "hashlib_loop_one_process_mb_s": size / loop_seconds / 1e6,
        "openssl_one_core_mb_s": openssl / 1e6,
    }
    result["ratio_blocksketch_to_openssl"] = result["blocksketch_mb_s"] / result["openssl_one_core_mb_s"]
    result["ratio_hashlib_loop_to_openssl"] = result["hashlib_loop_one_process_mb_s"] / result["openssl_one_core_mb_s"]
    result["implementations"] = implementations
    result["whole_process_seconds"] = processes
    result["whole_process_ratio_to_openssl"] = {name: size / seconds / openssl for name, seconds in processes.items()}
    if args.json:
        print(json.dumps(result))
        return
    print(f"machine: {result['machine']}")
    print(f"data: {args.size_mib} MiB random, {args.block_size}-byte blocks, page cache warm")
    print(f"openssl speed -evp md5 -bytes {args.block_size} (1 core): {result['openssl_one_core_mb_s']:8.1f} MB/s")
    print(f"hashlib per-block loop (1 process):         {result['hashlib_loop_one_process_mb_s']:8.1f} MB/s"
          f"  ({result['ratio_hashlib_loop_to_openssl']:.2f}x openssl)")
    print(f"blocksketch digest_image ({result['workers']} workers):         {result['blocksketch_mb_s']:8.1f} MB/s"
          f"  ({result['ratio_blocksketch_to_openssl']:.2f}x openssl)")
    if implementations:
        openssl_mb_s = result["openssl_one_core_mb_s"]
        print("MD5 implementations (BLOCKSKETCH_MD5), MB/s (ratio to openssl's one core):")
        print(f"  {'':8} {'kernel, 1 core':>16} {'digest_image, 1 worker':>24} {result['workers']:>10} workers")
        for row in implementations:
            cells = [f"{row[key]:.0f} ({row[key] / openssl_mb_s:.1f}x)" for key in (
                "kernel_one_core_mb_s", "digest_image_one_worker_mb_s", "digest_image_all_cores_mb_s")]
            print(f"  {row['implementation']:8} {cells[0]:>16} {cells[1]:>24} {cells[2]:>18}")
    for name, seconds in processes.items():
        print(f"whole `blocksketch {name}` process:  {seconds:6.2f} s = {size / seconds / 1e6:8.1f} MB/s"
              f"  ({result['whole_process_ratio_to_openssl'][name]:.2f}x openssl's one core)")

if __name__ == "__main__":
    main()
