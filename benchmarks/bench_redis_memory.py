"""Redis memory for sizing a deployment: bytes of Redis per GiB of image at 512 B and 4 KiB blocks.

For each fleet and block size, a fresh redis-server (the test suite's launcher, append-only file on)
gets every host's images indexed with :func:`store.refresh_host`, then the script reads

- ``INFO memory`` ``used_memory`` before and after, and ``used_memory_rss`` after;
- ``MEMORY USAGE`` of every key, summed by kind (block maps, image filters, host sketches, other);
- the size on disk of an RDB snapshot (``SAVE``) and of the append-only file after the run.

and prints each per GiB of image (the guest-visible size the index lists), per GiB of non-zero
data, and per distinct non-zero digest of an image (summed over images: the index keeps one block
map per image, so a clone costs what its template costs).

Fleets (generated in --workdir, sparse; each image --image-gib, --fill of it non-zero in
file-like extents of 64 KiB to 4 MiB at 4 KiB offsets, its data 40% from a base shared by every
image, 5% repeated within the image, the rest its own random bytes):

- ``distinct``: --distinct such images, one per host;
- ``clones``: one template like them and --clones qcow2 overlays on it (qemu-img), each with
  --rewrites random 4 KiB writes, spread over --clone-hosts hosts (the template on the first);
- ``files``: IMAGE arguments (real images), as one host.

Usage::

    python benchmarks/bench_redis_memory.py [IMAGE ...] [--workdir DIR] [--image-gib 1] [--fill 0.25]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine  # noqa: E402
from sketch.blocks import open_image  # noqa: E402
from store import open_store, refresh_host  # noqa: E402
from tests.redis_server import RedisProcess, server_binary  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
PAGE = 4096
SHARED_PART = 0.40
REPEATED_PART = 0.05


def extents(rng: np.random.Generator, size: int, fill: float) -> list[tuple[int, int]]:
    """Non-overlapping (offset, length) runs, 4 KiB aligned, covering ``fill`` of ``size``."""
    wanted = int(size * fill) // PAGE
    pages = size // PAGE
    taken = np.zeros(pages, dtype=bool)
    runs: list[tuple[int, int]] = []
    while wanted > 0:
        length = min(wanted, int(rng.integers(16, 1025)))  # 64 KiB .. 4 MiB
        start = int(rng.integers(0, pages - length + 1))
        if taken[start : start + length].any():
            continue
        taken[start : start + length] = True
        runs.append((start * PAGE, length * PAGE))
        wanted -= length
    return sorted(runs)


def write_fleet_image(path: str, rng: np.random.Generator, base: bytes, size: int, fill: float) -> int:
    """Write one sparse image; return its non-zero bytes."""
    written = 0
    with open(path, "wb") as handle:
        handle.truncate(size)
        for offset, length in extents(rng, size, fill):
            pages = length // PAGE
            shared = int(pages * SHARED_PART)
            repeated = int(pages * REPEATED_PART)
            own = rng.bytes((pages - shared - repeated) * PAGE)
            at = int(rng.integers(0, len(base) // PAGE - shared)) * PAGE
            chunk = base[at : at + shared * PAGE] + own
            if repeated:
                chunk += own[:PAGE] * repeated if own else base[:PAGE] * repeated
            handle.seek(offset)
            handle.write(chunk)
            written += len(chunk)
    return written


def nonzero_bytes(path: str, block_size: int) -> int:
    """Non-zero bytes of an image's guest-visible disk, in whole blocks."""
    image = open_image(path)
    try:
        total = 0
        buffer = np.empty(64 * MIB, dtype=np.uint8)
        for offset, length in image.data_extents(0, image.size_bytes):
            start, stop = offset // block_size * block_size, offset + length
            for at in range(start, stop, len(buffer)):
                view = buffer[: -(-min(len(buffer), stop - at) // block_size) * block_size]
                image.read_into(at, memoryview(view))
                total += int(view.reshape(-1, block_size).any(axis=1).sum()) * block_size
        return total
    finally:
        image.close()


def make_distinct(workdir: Path, count: int, size: int, fill: float, base: bytes, rng) -> dict[str, list[str]]:
    fleet = {}
    for number in range(count):
        path = workdir / f"distinct-{number}.img"
        write_fleet_image(str(path), rng, base, size, fill)
        fleet[f"node-{number}"] = [str(path)]
    return fleet


def make_clones(workdir: Path, clones: int, hosts: int, rewrites: int, size: int, fill: float, base: bytes,
                rng) -> dict[str, list[str]]:
    template = workdir / "template.img"
    write_fleet_image(str(template), rng, base, size, fill)
    fleet: dict[str, list[str]] = {"clone-host-0": [str(template)]}
    patch = workdir / "rewrite.bin"
    for number in range(clones):
        path = workdir / f"clone-{number}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(template), "-F", "raw", str(path)],
                       check=True)
        for offset in rng.integers(0, size // PAGE, rewrites) * PAGE:
            patch.write_bytes(rng.bytes(PAGE))
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -q -s {patch} {offset} {PAGE}", str(path)],
                           check=True)
        fleet.setdefault(f"clone-host-{number % hosts}", []).append(str(path))
    return fleet


def key_bytes(client: redis.Redis) -> dict[str, int]:
    """MEMORY USAGE of every key, summed by kind."""
    totals = {"map": 0, "filter": 0, "sketch": 0, "other": 0}
    for name in set(client.scan_iter(count=1000)):  # SCAN may return a key twice
        parts = name.decode().split(":")
        kind = parts[2] if len(parts) > 2 and parts[2] in totals else "other"
        totals[kind] += client.memory_usage(name, samples=0) or 0
    return totals


def disk_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def measure(fleet: dict[str, list[str]], block_size: int, data_dir: Path) -> dict:
    server = RedisProcess(data_dir, extra=["--appendonly", "yes"]).start()
    try:
        client = redis.Redis.from_url(server.url)
        assert client.dbsize() == 0, f"{data_dir} held a previous run's data"
        before = int(client.info("memory")["used_memory"])
        started = time.perf_counter()
        with open_store(server.url) as store:
            for host, paths in fleet.items():
                refresh_host(store, host, paths, block_size)
            images = [image for host in fleet for image in store.images(host)]
        seconds = time.perf_counter() - started
        memory = client.info("memory")
        by_kind = key_bytes(client)
        aof = disk_bytes(data_dir / "appendonlydir")
        client.save()
        rdb = (data_dir / "dump.rdb").stat().st_size
        client.close()
    finally:
        server.stop()
    return {"image_bytes": sum(image.total_blocks for image in images) * block_size,
            "distinct": sum(image.distinct_nonzero for image in images), "used": int(memory["used_memory"]) - before,
            "rss": int(memory["used_memory_rss"]), "by_kind": by_kind, "rdb": rdb, "aof": aof, "seconds": seconds}


def report(name: str, fleet: dict[str, list[str]], block_size: int, row: dict, nonzero: int) -> None:
    gib = row["image_bytes"] / GIB
    keys_total = sum(row["by_kind"].values())
    kinds = ", ".join(f"{kind} {value / gib / MIB:.2f}" for kind, value in row["by_kind"].items())
    print(f"{name}, block size {block_size}: {sum(map(len, fleet.values()))} images on {len(fleet)} hosts, "
          f"{gib:.2f} GiB of image, {nonzero / GIB:.2f} GiB non-zero, {row['distinct']} distinct non-zero digests "
          f"(summed over images); indexed in {row['seconds']:.1f} s")
    print(f"  used_memory growth:        {row['used'] / gib / MIB:6.2f} MiB per GiB of image, "
          f"{row['used'] / (nonzero / GIB) / MIB:6.2f} MiB per GiB non-zero, "
          f"{row['used'] / row['distinct']:.1f} B per digest")
    print(f"  MEMORY USAGE of the keys:  {keys_total / gib / MIB:6.2f} MiB per GiB of image ({kinds})")
    print(f"  on disk: RDB {row['rdb'] / gib / MIB:.2f} MiB per GiB of image, append-only file "
          f"{row['aof'] / gib / MIB:.2f}; used_memory_rss after {row['rss'] / MIB:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", help="real images to measure as one host")
    parser.add_argument("--workdir", default=None, help="where to write the generated fleets [default: a temp dir]")
    parser.add_argument("--image-gib", type=float, default=1.0)
    parser.add_argument("--fill", type=float, default=0.25, help="non-zero part of each generated image")
    parser.add_argument("--distinct", type=int, default=4)
    parser.add_argument("--clones", type=int, default=16)
    parser.add_argument("--clone-hosts", type=int, default=4)
    parser.add_argument("--rewrites", type=int, default=32)
    parser.add_argument("--block-size", type=int, action="append", help="repeatable [default: 512 and 4096]")
    args = parser.parse_args()
    block_sizes = args.block_size or [512, 4096]
    print(f"machine: {machine()}")
    print(f"redis: {subprocess.run([server_binary(), '--version'], capture_output=True, text=True).stdout.strip()}")
    with tempfile.TemporaryDirectory(prefix="bench-redis-memory-", dir=args.workdir) as scratch:
        workdir = Path(scratch)
        rng = np.random.default_rng(2026)
        size = int(args.image_gib * GIB) // PAGE * PAGE
        base = rng.bytes(int(size * args.fill * SHARED_PART) // PAGE * PAGE + PAGE)
        fleets = {}
        if args.images:
            fleets["files"] = {"real": [os.path.realpath(path) for path in args.images]}
        if args.distinct:
            fleets["distinct"] = make_distinct(workdir, args.distinct, size, args.fill, base, rng)
        if args.clones:
            fleets["clones"] = make_clones(workdir, args.clones, args.clone_hosts, args.rewrites, size, args.fill,
                                           base, rng)
        for name, fleet in fleets.items():
            for block_size in block_sizes:
                nonzero = sum(nonzero_bytes(path, block_size) for paths in fleet.values() for path in paths)
                row = measure(fleet, block_size, workdir / f"redis-{name}-{block_size}")
                report(name, fleet, block_size, row, nonzero)


if __name__ == "__main__":
    main()
