"""Reading qcow2 directly vs reading the raw image: digest and plain read throughput, measured in one run.

Usage: python benchmarks/bench_qcow2.py [--size-mib 1024] [--path IMAGE] [--block-size 512] [--runs 3] [--json]

Writes a sparse raw image of mixed content (1 MiB runs: ~30% holes, ~35% random, ~35% compressible
4-bit text; a tenth of the 4 KiB blocks inside data runs are zeros), or takes IMAGE (raw or qcow2),
converts it with qemu-img to qcow2 plain, zlib-compressed and zstd-compressed, checks that all
four give identical digests, then times (page cache warm, best of --runs) for each:
  * read: ``data_extents`` + ``read_into`` in 4 MiB chunks on one thread (the format's own cost),
  * digest: ``sketch.digests.digest_image`` with every core (what users wait for),
and prints MB/s of virtual image size with the ratio to raw. As a reference for the compressed
images, ``qemu-img convert -O raw`` of each is timed too (it writes a sparse file to the scratch dir).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine  # noqa: E402
from sketch.blocks import detect_format, open_image  # noqa: E402
from sketch.digests import default_workers, digest_image  # noqa: E402

CHUNK = 1 << 20
READ_BUFFER = 4 << 20


def write_mixed(path: str, size: int, seed: int = 11) -> None:
    """A sparse raw image of 1 MiB runs of holes, random bytes and compressible text."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as handle:
        handle.truncate(size)
        for offset in range(0, size, CHUNK):
            kind = rng.random()
            length = min(CHUNK, size - offset)
            if kind < 0.30:
                continue
            if kind < 0.65:
                data = rng.integers(0, 256, length, dtype=np.uint8)
            else:
                data = (rng.integers(0, 16, length, dtype=np.uint8) + 0x61).astype(np.uint8)
            blocks = data[: length - length % 4096].reshape(-1, 4096)
            blocks[rng.random(len(blocks)) < 0.10] = 0
            handle.seek(offset)
            handle.write(data.tobytes())


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def read_through(path: str) -> int:
    """Read every data extent of ``path`` once; returns the bytes read."""
    source = open_image(path)
    buffer = bytearray(READ_BUFFER)
    view = memoryview(buffer)
    done = 0
    try:
        for offset, length in source.data_extents(0, source.size_bytes):
            end = offset + length
            while offset < end:
                part = view[: min(READ_BUFFER, end - offset)]
                source.read_into(offset, part)
                offset += len(part)
                done += len(part)
    finally:
        source.close()
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--path", help="use this image (raw or qcow2) instead of generated data")
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    def say(message: str) -> None:
        if not args.json:
            print(message, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-qcow2-", dir=os.environ.get("BENCH_DIR")) as scratch:
        raw = os.path.join(scratch, "image.raw")
        if args.path and detect_format(args.path) == "qcow2":
            say(f"converting {args.path} to raw ...")
            subprocess.run(["qemu-img", "convert", "-O", "raw", args.path, raw], check=True)
        elif args.path:
            raw = args.path
        else:
            say(f"writing {args.size_mib} MiB of mixed data ...")
            write_mixed(raw, args.size_mib << 20)
        images = {"raw": raw}
        convert_seconds = {}
        for name, options in (("qcow2", []), ("qcow2 zlib", ["-c"]),
                              ("qcow2 zstd", ["-c", "-o", "compression_type=zstd"])):
            path = os.path.join(scratch, name.replace(" ", "-") + ".qcow2")
            say(f"qemu-img convert -O qcow2 {' '.join(options)} ...")
            convert_seconds[name] = timed(lambda p=path, o=options: subprocess.run(
                ["qemu-img", "convert", "-O", "qcow2", *o, raw, p], check=True))
            images[name] = path

        say("sync: the images are timed at rest, written back ...")
        os.sync()
        size = os.path.getsize(raw)
        reference = digest_image(raw, args.block_size)
        for name, path in images.items():
            digests = digest_image(path, args.block_size)  # also warms the page cache
            same = np.array_equal(digests.digests, reference.digests) and np.array_equal(digests.zero, reference.zero)
            if not same:
                sys.exit(f"digests of {name} differ from the raw image's: not benchmarking a wrong reader")

        # Rounds go over every image in turn, so a burst of load elsewhere hits them all alike.
        read_seconds = {name: float("inf") for name in images}
        digest_seconds = dict(read_seconds)
        for round_number in range(args.runs):
            say(f"timing round {round_number + 1} of {args.runs} ...")
            for name, path in images.items():
                read_seconds[name] = min(read_seconds[name], timed(lambda p=path: read_through(p)))
                digest_seconds[name] = min(digest_seconds[name],
                                           timed(lambda p=path: digest_image(p, args.block_size)))
        rows = {name: {"file_bytes": os.path.getsize(path) if name != "raw" else None,
                       "read_mb_s": size / read_seconds[name] / 1e6,
                       "digest_mb_s": size / digest_seconds[name] / 1e6} for name, path in images.items()}
        for name in ("qcow2 zlib", "qcow2 zstd"):
            out = os.path.join(scratch, "qemu-out.raw")
            seconds = timed(lambda p=images[name], o=out: subprocess.run(
                ["qemu-img", "convert", "-O", "raw", p, o], check=True))
            rows[name]["qemu_img_to_raw_mb_s"] = size / seconds / 1e6
            os.remove(out)
        data_bytes = read_through(raw)

    for row in rows.values():
        row["read_ratio_to_raw"] = row["read_mb_s"] / rows["raw"]["read_mb_s"]
        row["digest_ratio_to_raw"] = row["digest_mb_s"] / rows["raw"]["digest_mb_s"]
    result = {"machine": machine(), "size_bytes": size, "data_bytes": data_bytes, "block_size": args.block_size,
              "workers": default_workers(), "images": rows,
              "qemu_img_convert_seconds": convert_seconds}
    if args.json:
        print(json.dumps(result))
        return
    print(f"machine: {result['machine']}")
    print(f"image: {size / 2**20:.0f} MiB virtual, {data_bytes / 2**20:.0f} MiB in data extents of the raw file; "
          f"{args.block_size}-byte blocks, {result['workers']} workers, page cache warm, best of {args.runs}")
    print(f"{'image':<12} {'file MiB':>9} {'read MB/s':>10} {'vs raw':>7} {'digest MB/s':>12} {'vs raw':>7}"
          f" {'qemu-img->raw MB/s':>19}")
    for name, row in rows.items():
        file_mib = "-" if row["file_bytes"] is None else f"{row['file_bytes'] / 2**20:.0f}"
        qemu = row.get("qemu_img_to_raw_mb_s")
        print(f"{name:<12} {file_mib:>9} {row['read_mb_s']:>10.0f} {row['read_ratio_to_raw']:>6.2f}x"
              f" {row['digest_mb_s']:>12.0f} {row['digest_ratio_to_raw']:>6.2f}x"
              f" {'-' if qemu is None else f'{qemu:.0f}':>19}")


if __name__ == "__main__":
    main()
