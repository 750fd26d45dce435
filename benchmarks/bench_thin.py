"""Thin disks: time and peak memory of every command on a huge, mostly-hole image (issue 15, item 1).

Usage: python benchmarks/bench_thin.py [--workdir DIR] [--virtual-gib 2048] [--data-mib 1024]
       [--extent-mib 1] [--qcow2-virtual-gib 2048] [--limit-gib 8] [--block-size 512] [--only thin,dense,qcow2]

Builds three sources holding the same ``--data-mib`` of random data in ``--extent-mib`` extents:

- ``dense``: the data laid end to end in a file of its own size (the yardstick);
- ``thin``: a sparse raw file of ``--virtual-gib`` with the extents spread evenly over it, the
  last one ending at the very end of the disk;
- ``qcow2``: ``qemu-img convert -O qcow2`` of a thin raw file of ``--qcow2-virtual-gib``.

The destination host ``dst`` holds a basis image with the first half of the extents (so a
migration has LOCAL, SEND and ZERO runs); the source's own host ``src`` indexes the source.
Every command runs as `python -m cli` in a child with RLIMIT_AS of ``--limit-gib`` (a per-block
array of a 2 TiB disk fails at once rather than swapping the machine), against a real
redis-server started here; wall time and the child's peak RSS (``wait4``) are reported. For
``send | receive`` the time is the pipeline's and the RSS the larger of the two processes'.
The rebuilt images are checked against the raw source extent by extent (SEEK_DATA/SEEK_HOLE).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import machine  # noqa: E402
from tests.redis_server import RedisProcess  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30


def write_extents(path: str, virtual: int, data_mib: int, extent_mib: int = 1, seed: int = 7) -> list[int]:
    """A sparse file of ``virtual`` bytes with ``data_mib`` of random data in extents of
    ``extent_mib`` spread evenly, the last ending at the end; the offset of every MiB written."""
    import numpy as np

    rng = np.random.default_rng(seed)
    extents = data_mib // extent_mib
    stride = virtual // extents
    starts = [i * stride for i in range(extents)]
    starts[-1] = virtual - extent_mib * MIB
    offsets = [start + j * MIB for start in starts for j in range(extent_mib)]
    with open(path, "wb") as handle:
        handle.truncate(virtual)
        for offset in offsets:
            handle.seek(offset)
            handle.write(rng.integers(0, 256, MIB, dtype=np.uint8).tobytes())
    return offsets


def child_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def measure(commands: list[list[str]], env: dict, limit: int, stdin_first: str | None = None) -> dict:
    """Run ``commands`` as a pipeline; wall seconds, peak RSS (MiB) of the largest, exit codes."""
    started = time.perf_counter()
    processes = []
    previous = None
    for index, command in enumerate(commands):
        stdout = subprocess.PIPE if index < len(commands) - 1 else subprocess.DEVNULL
        process = subprocess.Popen(command, stdin=previous.stdout if previous else subprocess.DEVNULL,
                                   stdout=stdout, stderr=subprocess.PIPE, env=env, cwd=ROOT,
                                   preexec_fn=child_limit(limit))
        if previous is not None:
            previous.stdout.close()
        processes.append(process)
        previous = process
    peak, codes, errors = 0, [], []
    for process in processes:
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        peak = max(peak, usage.ru_maxrss)
        codes.append(process.returncode)
        err = process.stderr.read().decode(errors="replace").strip()
        process.stderr.close()
        if process.returncode:
            errors.append(err.splitlines()[-1] if err else f"exit {process.returncode}")
    seconds = time.perf_counter() - started
    result = {"seconds": round(seconds, 2), "rss_mib": round(peak / 1024), "ok": not any(codes)}
    if errors:
        text = " | ".join(errors)
        result["error"] = "out of memory" if "MemoryError" in text or "memory" in text.lower() else text[-200:]
    return result


def same_data(source: str, output: str, chunk: int = 4 * MIB) -> bool:
    """Byte-equal guest data, comparing only the source's data extents and the output's."""
    with open(source, "rb") as a, open(output, "rb") as b:
        size = os.fstat(a.fileno()).st_size
        if os.fstat(b.fileno()).st_size != size:
            return False
        for handle, other in ((a, b), (b, a)):
            offset = 0
            while offset < size:
                try:
                    start = os.lseek(handle.fileno(), offset, os.SEEK_DATA)
                except OSError:
                    break
                end = os.lseek(handle.fileno(), start, os.SEEK_HOLE)
                for at in range(start, end, chunk):
                    length = min(chunk, end - at)
                    mine = os.pread(handle.fileno(), length, at)
                    if mine != os.pread(other.fileno(), length, at).ljust(length, b"\0"):
                        return False
                offset = end
    return True


def run_case(name: str, source: str, reference: str, basis: str, work: str, args, limit: int, env: dict,
             others: list[str]) -> dict:
    cli = [sys.executable, "-m", "cli"]
    bs = ["--block-size", str(args.block_size)]
    out = os.path.join(work, f"{name}.out")
    manifest = os.path.join(work, f"{name}.manifest")
    bundle = os.path.join(work, f"{name}.bundle")
    received = os.path.join(work, f"{name}.received")
    steps = {
        "compare": [[*cli, "compare", source, basis, *bs, "--json"]],
        "index": [[*cli, "index", source, "--host", f"src-{name}", *bs, "--json"]],
        # the earlier cases' hosts hold the same data: leave them out, so every case ranks one host
        "rank": [[*cli, "rank", source, "--from", f"src-{name}", *bs, "--json",
                  *[f"--exclude-host=src-{other}" for other in others]]],
        "manifest": [[*cli, "manifest", source, "--to", "dst", "-o", manifest, "--force", "--json"]],
        "pack": [[*cli, "pack", source, manifest, "-o", bundle, "--force", "--json"]],
        "apply": [[*cli, "apply", manifest, bundle, "-o", out, "--host", "dst", "--force", "--json"]],
        "send|receive": [[*cli, "send", source, "--to", "dst", "--json"],
                         [*cli, "receive", "-o", received, "--host", "dst", "--force", "--json"]],
    }
    results = {}
    for step, commands in steps.items():
        results[step] = measure(commands, env, limit)
        print(f"  {name:6} {step:13} {json.dumps(results[step])}", file=sys.stderr, flush=True)
        if step == "apply" and results[step]["ok"]:
            results[step]["same"] = same_data(reference, out)
        if step == "send|receive" and results[step]["ok"]:
            results[step]["same"] = same_data(reference, received)
    for path in (out, received, bundle):
        if os.path.exists(path):
            os.unlink(path)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir")
    parser.add_argument("--virtual-gib", type=int, default=2048)
    parser.add_argument("--qcow2-virtual-gib", type=int, default=2048)
    parser.add_argument("--data-mib", type=int, default=1024)
    parser.add_argument("--extent-mib", type=int, default=1,
                        help="size of each data extent (1: every 4 MiB checksum segment holding data is 3/4 hole)")
    parser.add_argument("--limit-gib", type=float, default=8)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--only", default="dense,thin,qcow2")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="bench-thin-")
    os.makedirs(work, exist_ok=True)
    limit = int(args.limit_gib * GIB)

    import numpy as np

    sources = {}
    built = time.perf_counter()
    thin = os.path.join(work, "thin.raw")
    offsets = write_extents(thin, args.virtual_gib * GIB, args.data_mib, args.extent_mib)
    wanted = args.only.split(",")
    if "dense" in wanted:
        dense = os.path.join(work, "dense.raw")
        with open(thin, "rb") as src, open(dense, "wb") as dst:
            for offset in offsets:
                dst.write(os.pread(src.fileno(), MIB, offset))
        sources["dense"] = (dense, dense)
    if "thin" in wanted:
        sources["thin"] = (thin, thin)
    qcow2_seconds = None
    if "qcow2" in wanted:
        raw = thin
        if args.qcow2_virtual_gib != args.virtual_gib:
            raw = os.path.join(work, "thin-q.raw")
            write_extents(raw, args.qcow2_virtual_gib * GIB, args.data_mib, args.extent_mib)
        qcow2 = os.path.join(work, "thin.qcow2")
        started = time.perf_counter()
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, qcow2], check=True)
        qcow2_seconds = round(time.perf_counter() - started, 1)
        sources["qcow2"] = (qcow2, raw)
    basis = os.path.join(work, "basis.raw")
    rng = np.random.default_rng(7)
    with open(basis, "wb") as handle:  # the first half of the extents, the same random stream
        for _ in range(args.data_mib // 2):
            handle.write(rng.integers(0, 256, MIB, dtype=np.uint8).tobytes())
    print(f"built inputs in {time.perf_counter() - built:.1f} s (qemu-img convert {qcow2_seconds} s)",
          file=sys.stderr, flush=True)

    redis = RedisProcess(os.path.join(work, "redis")).start()
    try:
        env = dict(os.environ, BLOCKSKETCH_REDIS_URL=redis.url, BLOCKSKETCH_HOME=os.path.join(work, "home"),
                   BLOCKSKETCH_HOST="dst")
        setup = measure([[sys.executable, "-m", "cli", "index", basis, "--host", "dst", "--block-size",
                          str(args.block_size)]], env, limit)
        if not setup["ok"]:
            raise SystemExit(f"indexing the basis failed: {setup}")
        report = {"machine": machine(), "virtual_gib": args.virtual_gib, "qcow2_virtual_gib": args.qcow2_virtual_gib,
                  "data_mib": args.data_mib, "extent_mib": args.extent_mib, "block_size": args.block_size,
                  "limit_gib": args.limit_gib,
                  "cases": {}}
        for name, (source, reference) in sources.items():
            report["cases"][name] = run_case(name, source, reference, basis, work, args, limit, env,
                                             list(report["cases"]))
    finally:
        redis.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{report['machine']}\n{args.data_mib} MiB of data in {args.extent_mib} MiB extents at "
          f"{args.block_size} B blocks; thin raw "
          f"{args.virtual_gib} GiB, qcow2 {args.qcow2_virtual_gib} GiB virtual; RLIMIT_AS {args.limit_gib} GiB")
    dense_case = report["cases"].get("dense", {})
    print(f"{'command':14}" + "".join(f"{name:>30}" for name in report["cases"]))
    for step in next(iter(report["cases"].values())):
        cells = []
        for name, case in report["cases"].items():
            r = case[step]
            if not r["ok"]:
                cells.append(f"{r.get('error', 'failed')[:28]:>30}")
                continue
            ratio = ""
            base = dense_case.get(step)
            if name != "dense" and base and base["ok"]:
                ratio = f" ({r['seconds'] / base['seconds']:.2f}x)"
            wrong = " WRONG" if r.get("same") is False else ""
            cells.append(f"{r['seconds']:>7.2f} s{ratio:9} {r['rss_mib']:>6} MiB{wrong}")
        print(f"{step:14}" + "".join(cells))


if __name__ == "__main__":
    main()
