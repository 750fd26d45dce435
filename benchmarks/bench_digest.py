"""Digest throughput of blocksketch vs `openssl speed -evp md5 -bytes 512`, measured in one run.

Usage: python benchmarks/bench_digest.py [--size-mib 1024] [--block-size 512] [--json]

Writes a file of random (non-zero) data, reads it once to warm the page cache, then times
`sketch.digests.digest_image` with every core, a single-process per-block hashlib loop, and
openssl's single-core figure, and prints the ratios. The goal: blocksketch >= 1.0x openssl.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


if __name__ == "__main__":
    main()
