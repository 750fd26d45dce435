"""Bytes to move a real disk image to a host that holds a similar one: blocksketch vs its peers.

Usage: python benchmarks/bench_transfer.py [--corpus /work/corpus] [--block-sizes 512,4096] [--json]
       [--high-level 19] [--no-scale]

Needs the images of `bash /work/shared/corpus/build-images.sh DIR` (1 GiB sparse ext4 images of
Debian bookworm: minbase, and minbase + nginx-light, python3, openssh-server). For each direction
(web -> a host holding min, min -> a host holding web), measured side by side in one run:

- blocksketch: manifest + bundle bytes (what crosses the WAN), with the image rebuilt by apply on
  the "destination" (a private index and directory here) and compared byte for byte with `cmp`;
  at the default zstd level 3 per block size, and at ``--high-level`` for the largest block size;
- full copy (the image's size) and `zstd -3` of the whole image;
- rsync against the destination's image (`--no-whole-file`, so the delta algorithm runs even
  locally; `-S`; no `--inplace`, which hides basis data behind the write position): bytes sent and
  received as `--stats` reports them, with and without `-z`, the better of rsync's default block
  size and 4096 B;
- rdiff (librsync) delta against it, raw and after `zstd -3`, plus the signature that must travel
  the other way first;
- xdelta3 -9 with the whole destination image as its source window;
- casync: the index plus the compressed chunks (zstd) of the source that the destination's chunk
  store (made from its images, i.e. `casync extract --seed` material) lacks.

Then (unless --no-scale) the time to build the manifest of a 4 GiB image at 512 B: the four
corpus images laid end to end in one sparse file, against a host holding bookworm-min.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine  # noqa: E402

PAIRS = [("bookworm-web", "bookworm-min"), ("bookworm-min", "bookworm-web")]


def run(command: list[str], **options) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, capture_output=True, text=True, **options)


def timed(function, *args):
    start = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - start


def ours(source: str, basis: str, block_size: int, scratch: str, level: int = 3) -> dict:
    """Index the destination, build the manifest, pack, apply, cmp: bytes and seconds per step."""
    from sketch.apply import apply_manifest, resolve_local_images
    from sketch.bundle import pack_bundle
    from sketch.manifest import LocalImage
    from sketch.manifest_build import build_manifest
    from store import open_store, refresh_host

    work = os.path.join(scratch, f"ours-{block_size}-{level}")
    os.makedirs(work)
    os.environ["BLOCKSKETCH_HOME"] = os.path.join(work, "home")
    with open_store(None) as store:
        _, index_s = timed(refresh_host, store, "dest", [basis], block_size)
        targets = [(LocalImage.from_info(i), m) for i, m in store.host_block_maps("dest")]
        manifest, manifest_s = timed(build_manifest, source, "dest", targets, block_size)
        manifest_bytes = manifest.save(os.path.join(work, "manifest"))
        bundle = os.path.join(work, "bundle")
        info, pack_s = timed(lambda: pack_bundle(source, manifest, bundle, level=level))
        output = os.path.join(work, "rebuilt.raw")
        paths = resolve_local_images(manifest, "dest", store.image)
        _, apply_s = timed(apply_manifest, manifest, [bundle], output, paths)
    same = subprocess.run(["cmp", source, output], capture_output=True).returncode == 0
    allocated = os.stat(output).st_blocks * 512
    os.unlink(output)
    send_zstd3 = zstd_size_of_blocks(source, manifest, os.path.join(work, "send.raw"))
    counts = manifest.block_counts()
    return {"block_size": block_size, "level": level, "manifest_bytes": manifest_bytes,
            "bundle_bytes": info.bytes_written,
            "wan_bytes": manifest_bytes + info.bytes_written, "send_raw_bytes": info.raw_bytes,
            "blocks": counts, "runs": manifest.summary()["runs"], "cmp_identical": same,
            "send_zstd3_bytes": send_zstd3,
            "output_allocated_bytes": allocated,
            "seconds": {"index": round(index_s, 2), "manifest": round(manifest_s, 2), "pack": round(pack_s, 2),
                        "apply": round(apply_s, 2)}}


def zstd_size_of_blocks(source: str, manifest, scratch_file: str) -> int:
    """``zstd -3`` (the real binary) of a file holding just the manifest's SEND blocks."""
    from sketch.manifest import SEND

    block_size = manifest.block_size
    start, length = manifest.runs_of(SEND)
    with open(source, "rb") as image, open(scratch_file, "wb") as out:
        for first, count in zip(start.tolist(), length.tolist()):
            image.seek(first * block_size)
            data = image.read(count * block_size)
            out.write(data + bytes(count * block_size - len(data)))
    size = zstd_size(scratch_file)
    os.unlink(scratch_file)
    return size


def zstd_size(path: str) -> int:
    with subprocess.Popen(["zstd", "-3", "-c", "-q", path], stdout=subprocess.PIPE) as proc:
        total = 0
        while chunk := proc.stdout.read(1 << 20):
            total += len(chunk)
    return total


# rsync's default block size is about sqrt(file size) (32 KiB for 1 GiB); 4096 B matches ext4's blocks.
RSYNC_BLOCK_SIZES = (None, 4096)


def rsync_bytes(source: str, basis: str, scratch: str, compress: bool) -> dict:
    """rsync at its best: the fewer bytes of its default block size and 4096 B, each one run.

    No ``--inplace``: with it rsync cannot reuse basis data behind its write position, so it sent
    ~3.3x the literal data (297 MB vs 89 MB at 4096 B, web -> min).
    """
    runs = [rsync_once(source, basis, scratch, compress, block_size) for block_size in RSYNC_BLOCK_SIZES]
    best = min(runs, key=lambda r: r["total"])
    return {**best, "tried": {r["block_size"] or "default": r["total"] for r in runs}}


def rsync_once(source: str, basis: str, scratch: str, compress: bool, block_size: int | None) -> dict:
    """Bytes sent+received (``--stats``) to rsync source onto a copy of basis, and whether the result matches."""
    target_dir = os.path.join(scratch, "rsync-z" if compress else "rsync")
    os.makedirs(target_dir)
    target = os.path.join(target_dir, os.path.basename(source))
    run(["cp", "--sparse=always", basis, target])
    # --no-whole-file: the delta algorithm runs even between local paths; -I: never skip on size+mtime.
    command = ["rsync", "--no-whole-file", "-I", "-S", "--stats", source, target]
    if compress:
        command.insert(1, "-z")
    if block_size:
        command[1:1] = ["--block-size", str(block_size)]
    out = run(command).stdout
    stats = {}
    for line in out.splitlines():
        for key, label in (("sent", "Total bytes sent:"), ("received", "Total bytes received:"),
                           ("literal", "Literal data:"), ("matched", "Matched data:")):
            if line.startswith(label):
                stats[key] = int(line.split(":")[1].split()[0].replace(",", ""))
    same = subprocess.run(["cmp", source, target], capture_output=True).returncode == 0
    shutil.rmtree(target_dir)
    return {**stats, "block_size": block_size, "total": stats["sent"] + stats["received"], "cmp_identical": same}


def rdiff_bytes(source: str, basis: str, scratch: str) -> dict:
    signature, delta = os.path.join(scratch, "rdiff.sig"), os.path.join(scratch, "rdiff.delta")
    run(["rdiff", "signature", basis, signature])
    run(["rdiff", "delta", signature, source, delta])
    result = {"signature": os.path.getsize(signature), "delta": os.path.getsize(delta),
              "delta_zstd3": zstd_size(delta)}
    os.unlink(signature)
    os.unlink(delta)
    return result


def xdelta3_bytes(source: str, basis: str, scratch: str) -> int:
    delta = os.path.join(scratch, "x.vcdiff")
    window = str(1 << 30)  # the whole basis as source window (the default 64 MiB misses far matches)
    run(["xdelta3", "-e", "-9", "-f", "-B", window, "-s", basis, source, delta])
    size = os.path.getsize(delta)
    os.unlink(delta)
    return size


def casync_bytes(source: str, bases: list[str], scratch: str) -> dict | str:
    if shutil.which("casync") is None:
        return "casync not installed"
    src_store, dst_store = os.path.join(scratch, "src.castr"), os.path.join(scratch, "dst.castr")
    index = os.path.join(scratch, "src.caibx")
    run(["casync", "make", "--compression=zstd", f"--store={src_store}", index, source])
    for number, basis in enumerate(bases):
        run(["casync", "make", "--compression=zstd", f"--store={dst_store}", os.path.join(scratch, f"d{number}.caibx"),
             basis])

    def chunks(store: str) -> dict[str, int]:
        found = {}
        for root, _, files in os.walk(store):
            for name in files:
                if name.endswith(".cacnk"):
                    found[name] = os.path.getsize(os.path.join(root, name))
        return found

    have = chunks(dst_store)
    wanted = chunks(src_store)
    missing = {name: size for name, size in wanted.items() if name not in have}
    result = {"index": os.path.getsize(index), "chunks_missing": len(missing), "chunks_total": len(wanted),
              "chunk_bytes": sum(missing.values())}
    result["total"] = result["index"] + result["chunk_bytes"]
    shutil.rmtree(src_store)
    shutil.rmtree(dst_store)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="/work/corpus")
    parser.add_argument("--block-sizes", default="512,4096")
    parser.add_argument("--scratch", default=os.environ.get("BENCH_DIR"))
    parser.add_argument("--high-level", type=int, default=19)
    parser.add_argument("--no-scale", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    block_sizes = [int(b) for b in args.block_sizes.split(",")]
    results = []
    for source_name, basis_name in PAIRS:
        source = os.path.join(args.corpus, f"{source_name}.raw")
        basis = os.path.join(args.corpus, f"{basis_name}.raw")
        with tempfile.TemporaryDirectory(prefix="bench-transfer-", dir=args.scratch) as scratch:
            row = {"source": source_name, "destination_holds": basis_name, "size_bytes": os.path.getsize(source),
                   "data_bytes": os.stat(source).st_blocks * 512}
            row["ours"] = [ours(source, basis, b, scratch) for b in block_sizes]
            row["ours"].append(ours(source, basis, max(block_sizes), scratch, args.high_level))
            row["zstd3"], seconds = timed(zstd_size, source)
            row["rsync"] = rsync_bytes(source, basis, scratch, compress=False)
            row["rsync_z"] = rsync_bytes(source, basis, scratch, compress=True)
            row["rdiff"] = rdiff_bytes(source, basis, scratch)
            row["xdelta3"] = xdelta3_bytes(source, basis, scratch)
            row["casync"] = casync_bytes(source, [basis], scratch)
            results.append(row)
        if not args.json:
            print_row(row)
    scale = None if args.no_scale else scale_run(args.corpus, args.scratch)
    if args.json:
        print(json.dumps({"machine": machine(), "results": results, "scale": scale}, indent=1))
    elif scale:
        print(f"scale: manifest of a {scale['size_bytes'] >> 30} GiB image ({scale['data_bytes'] / (1 << 20):.0f} MiB "
              f"allocated) at 512 B against bookworm-min: {scale['seconds']:.2f} s "
              f"(digests alone {scale['digest_seconds']:.2f} s); {scale['runs']} runs, manifest "
              f"{scale['manifest_bytes']:,} bytes")


def scale_run(corpus: str, scratch: str | None) -> dict:
    """Time the manifest of a 4 GiB image: web, min, web, min laid end to end (sparse)."""
    from sketch.blockmap import BlockMap
    from sketch.digests import digest_image
    from sketch.manifest import LocalImage
    from sketch.manifest_build import build_manifest

    names = ["bookworm-web", "bookworm-min", "bookworm-web", "bookworm-min"]
    with tempfile.TemporaryDirectory(prefix="bench-transfer-", dir=scratch) as work:
        big = os.path.join(work, "big.raw")
        with open(big, "wb") as out:
            for number, name in enumerate(names):
                part = os.path.join(corpus, f"{name}.raw")
                out.truncate((number + 1) << 30)
                run(["dd", f"if={part}", f"of={big}", "bs=1M", f"seek={number * 1024}", "conv=sparse,notrunc",
                     "status=none"])
        basis = os.path.join(corpus, "bookworm-min.raw")
        info = os.stat(basis)
        identity = LocalImage("dest", basis, "min", info.st_size, info.st_mtime_ns)
        block_map = BlockMap.from_digests(digest_image(basis, 512))
        digest_image(big, 512)  # warm the page cache, as the other steps were
        _, digest_s = timed(digest_image, big, 512)
        manifest, seconds = timed(build_manifest, big, "dest", [(identity, block_map)], 512)
        return {"size_bytes": os.path.getsize(big), "data_bytes": os.stat(big).st_blocks * 512,
                "seconds": round(seconds, 2), "digest_seconds": round(digest_s, 2),
                "runs": int(len(manifest.run_kind)), "blocks": manifest.block_counts(),
                "manifest_bytes": len(manifest.to_bytes())}


def print_row(row: dict) -> None:
    mib = 1 << 20
    print(f"machine: {machine()}")
    print(f"{row['source']} -> a host holding {row['destination_holds']}: image {row['size_bytes'] / mib:.0f} MiB, "
          f"{row['data_bytes'] / mib:.1f} MiB allocated")
    reference = row["ours"][0]["wan_bytes"]  # the first block size at the default level
    peers = [("full copy", row["size_bytes"]), ("zstd -3 of the image", row["zstd3"]),
             (f"rsync -S -B {row['rsync']['block_size'] or 'default'} (sent+received)", row["rsync"]["total"]),
             (f"rsync -zS -B {row['rsync_z']['block_size'] or 'default'} (sent+received)", row["rsync_z"]["total"]),
             ("rdiff delta (raw)", row["rdiff"]["delta"]),
             ("rdiff delta | zstd -3", row["rdiff"]["delta_zstd3"]),
             ("rdiff delta | zstd -3 + signature", row["rdiff"]["delta_zstd3"] + row["rdiff"]["signature"]),
             ("xdelta3 -9 (1 GiB window)", row["xdelta3"])]
    if isinstance(row["casync"], dict):
        peers.append(("casync (zstd chunks missing + index)", row["casync"]["total"]))
    print(f"  {'method':44s} {'bytes':>14s} {'MiB':>9s} {'x ours':>8s}   (x ours: bytes / the first row's)")
    for o in row["ours"]:
        label = f"blocksketch {o['block_size']} B, zstd {o['level']} (manifest+bundle)"
        print(f"  {label:44s} {o['wan_bytes']:14,d} "
              f"{o['wan_bytes'] / mib:9.2f} {o['wan_bytes'] / reference:8.2f}   "
              f"manifest {o['manifest_bytes']:,}, cmp {'identical' if o['cmp_identical'] else 'DIFFERENT'}, "
              f"seconds {o['seconds']}")
    for o in row["ours"]:
        print(f"  bundle at {o['block_size']} B, zstd {o['level']}: {o['bundle_bytes']:,} bytes; `zstd -3` of the same "
              f"SEND blocks: {o['send_zstd3_bytes']:,} ({o['bundle_bytes'] / o['send_zstd3_bytes']:.3f}x)")
    for name, size in peers:
        print(f"  {name:44s} {size:14,d} {size / mib:9.2f} {size / reference:8.2f}")
    if not isinstance(row["casync"], dict):
        print(f"  casync: {row['casync']}")
    for o in row["ours"][:-1]:
        print(f"  blocks at {o['block_size']} B: {o['blocks']}, runs {o['runs']}")
    print(f"  rsync sent+received by block size: {row['rsync']['tried']}; with -z: {row['rsync_z']['tried']}; "
          f"literal {row['rsync']['literal']:,}, matched {row['rsync']['matched']:,} at the better one")
    print(f"  rsync cmp identical: {row['rsync']['cmp_identical'] and row['rsync_z']['cmp_identical']}")


if __name__ == "__main__":
    main()
