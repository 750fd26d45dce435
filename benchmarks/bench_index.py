"""Index cost: Redis bytes per GiB of image at 512 B and 4 KiB blocks, and an unchanged re-run vs the first run.

Starts a private redis-server (the test suite's launcher) per block size, indexes the images as one
host with :func:`store.refresh_host`, then measures

- Redis memory: ``MEMORY USAGE`` of every key of the host (block maps, filters, catalogue) and the
  ``INFO memory`` ``used_memory`` growth, per GiB of image and per distinct digest;
- the time of a second, unchanged refresh against the first one (same process, same run).

Usage::

    python benchmarks/bench_index.py [IMAGE ...] [--synthetic-mib 512]

With no IMAGE, writes synthetic images (sketch.sample: 30% zeros, shared and repeated blocks).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine  # noqa: E402
from sketch.sample import mixed_image, random_blocks, write_image  # noqa: E402
from store import keys, open_store, refresh_host  # noqa: E402
from tests.redis_server import RedisProcess, server_binary  # noqa: E402

GIB = 1 << 30


def synthetic_images(directory: str, total_mib: int, count: int = 2) -> list[str]:
    rng = np.random.default_rng(2010)
    blocks = (total_mib << 20) // count // 4096
    pool = random_blocks(rng, blocks, 4096)
    paths = []
    for number in range(count):
        path = os.path.join(directory, f"synthetic{number}.img")
        write_image(path, mixed_image(rng, pool, 0.5, blocks))
        paths.append(path)
    return paths


def key_bytes(client: redis.Redis, host: str) -> dict[str, int]:
    """MEMORY USAGE of the host's keys, summed by kind (map chunks, filters, sketches, other)."""
    totals = {"map": 0, "filter": 0, "sketch": 0, "other": 0}
    for name in client.scan_iter(match=keys.host_pattern(host), count=1000):
        kind = name.decode().split(":")[2]
        used = client.memory_usage(name, samples=0) or 0
        totals[kind if kind in totals else "other"] += used
    return totals


def measure(paths: list[str], block_size: int, workdir: str) -> dict:
    server = RedisProcess(Path(workdir) / f"redis-{block_size}").start()
    try:
        client = redis.Redis.from_url(server.url)
        baseline = int(client.info("memory")["used_memory"])
        with open_store(server.url) as store:
            started = time.perf_counter()
            first = refresh_host(store, "bench", paths, block_size)
            first_s = time.perf_counter() - started
            started = time.perf_counter()
            again = refresh_host(store, "bench", paths, block_size)
            again_s = time.perf_counter() - started
            assert again.reused == len(paths) and again.bytes_read == 0
            image_bytes = sum(i.size_bytes for i in store.images("bench"))
        used = int(client.info("memory")["used_memory"]) - baseline
        by_kind = key_bytes(client, "bench")
        client.close()
    finally:
        server.stop()
    return {"block_size": block_size, "image_bytes": image_bytes, "distinct": first.distinct_blocks,
            "first_s": first_s, "again_s": again_s, "used": used, "by_kind": by_kind}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*")
    parser.add_argument("--synthetic-mib", type=int, default=512)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"redis: {server_binary()}")
    with tempfile.TemporaryDirectory(prefix="bench-index-") as workdir:
        paths = [os.path.realpath(p) for p in args.images] or synthetic_images(workdir, args.synthetic_mib)
        print("images: " + ", ".join(f"{os.path.basename(p)} ({os.path.getsize(p) / GIB:.2f} GiB)" for p in paths))
        for block_size in (512, 4096):
            row = measure(paths, block_size, workdir)
            gib = row["image_bytes"] / GIB
            total_keys = sum(row["by_kind"].values())
            kinds = ", ".join(f"{kind} {value / gib / (1 << 20):.2f}" for kind, value in row["by_kind"].items())
            print(f"block size {block_size}: {row['distinct']} distinct non-zero digests")
            print(f"  redis MEMORY USAGE of the host's keys: {total_keys / gib / (1 << 20):.2f} MiB per GiB of image "
                  f"({kinds}); {total_keys / max(1, row['distinct']):.1f} B per distinct digest")
            print(f"  redis used_memory growth:              {row['used'] / gib / (1 << 20):.2f} MiB per GiB of image")
            print(f"  first refresh {row['first_s']:.3f} s, unchanged re-run {row['again_s'] * 1000:.1f} ms: "
                  f"ratio {row['again_s'] / row['first_s']:.4f} ({row['first_s'] / row['again_s']:.0f}x faster)")


if __name__ == "__main__":
    main()
