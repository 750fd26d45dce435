"""Coverage-guided fuzzing of blocksketch's in-process decoders with atheris (libFuzzer for Python).

Run through ``python benchmarks/fuzz_formats.py --atheris SECONDS``: it builds the same world of
valid artefacts, then runs this module once per decoder as a child process
(``python benchmarks/fuzz_atheris.py DECODER --corpus DIR --seconds N``), its corpus seeded with the
valid artefact, ``sketch``, ``store`` instrumented for coverage. libFuzzer's own limits apply per
input: ``-timeout=5`` and ``-rss_limit_mb`` (the interpreter, numpy and atheris take ~130 MiB
before any input, so the limit is that plus 256 MiB).

Checksums would stop a coverage-guided fuzzer at the first check (it cannot forge a SHA-256),
so the harness fixes them on every input before decoding, as an attacker would: a manifest input
is its msgpack body, compressed and sealed here; bundle and stream inputs get their header, frame,
chain and envelope checksums recomputed where their (fuzzed) lengths say they are; a block map
chunk its CRC-32. The checksum checks themselves are covered by the CLI cases.

A decoder may raise only blocksketch's own errors (``sketch.errors.BlocksketchError``: the CLI
prints those as one line). Anything else is recorded by signature (exception type and the
innermost frame in this repository), with the first input that raised it, and fuzzing goes on, so
one run finds every distinct crash rather than stopping at the first.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DECODERS = ["manifest", "bundle", "stream", "ranges", "qcow2", "catalogue", "chunk", "config"]
BASELINE_MIB = 130
QCOW2_READ_BYTES = 4 << 20


def seeds(world, decoder: str, ctx: dict) -> list[bytes]:
    if decoder == "chunk":
        return [world.redis_values[ctx["chunk_seed"]]]
    if decoder == "manifest":  # the body, uncompressed: the harness seals it (see ``seal_manifest``)
        import zstandard

        return [zstandard.ZstdDecompressor().decompress(world.valid["manifest"][52:])]
    if decoder in ("bundle", "stream", "ranges"):
        return [world.valid[decoder]]
    if decoder == "qcow2":
        return [v for k, v in world.valid.items() if k.startswith("qcow2-")]
    return [world.redis_values[key] for key in world.redis_kinds[decoder]][:8]


def context(world) -> dict:
    """What the decoders need besides the input: the valid manifest, the numbers of one chunk."""
    import msgpack

    catalogue = msgpack.unpackb(world.redis_values["blocksketch:{ams-1}:catalogue"], raw=False)
    image = catalogue["images"][0]
    chunk_key = f"blocksketch:{{ams-1}}:map:{image['generation']}:{image['image_id']}:0"
    return {"manifest": world.artefacts["manifest"], "chunk": [image["total_blocks"], image["zero_blocks"],
                                                               image["distinct"]],
            "chunk_seed": chunk_key}


def run_atheris(world, seconds: float, decoders: list[str] | None = None) -> dict:
    """Each decoder for ``seconds`` in its own process; what each reached and found."""
    work = os.path.join(world.workdir, "atheris")
    os.makedirs(work, exist_ok=True)
    ctx = context(world)
    with open(os.path.join(work, "context.json"), "w") as handle:
        json.dump(ctx, handle)
    report = {"decoders": {}, "lines": []}
    for decoder in decoders or DECODERS:
        corpus = os.path.join(work, decoder, "corpus")
        os.makedirs(corpus, exist_ok=True)
        for number, data in enumerate(seeds(world, decoder, ctx)):
            Path(corpus, f"seed-{number}").write_bytes(data)
        max_len = max(len(d) for d in seeds(world, decoder, ctx)) + 4096
        crashes = os.path.join(work, decoder, "crashes.json")
        started = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, decoder, "--corpus", corpus, "--seconds", str(seconds),
                               "--context", os.path.join(work, "context.json"), "--max-len", str(max_len),
                               "--crashes", crashes], capture_output=True, text=True, cwd=work,
                              timeout=seconds * 3 + 120, env={**os.environ, "PYTHONPATH": str(ROOT)})
        took = time.perf_counter() - started
        stats = libfuzzer_stats(done.stderr)
        found = json.loads(Path(crashes).read_text()) if os.path.exists(crashes) else {}
        # libFuzzer's own finds (out-of-memory, timeout) are written as files named by their kind
        for name in sorted(os.listdir(work)):
            if name.split("-")[0] in ("oom", "timeout", "crash", "slow") and len(name) > 20:
                kept = os.path.join(work, decoder, name)
                os.replace(os.path.join(work, name), kept)
                found[f"libFuzzer {name.split('-')[0]}"] = {"message": next(
                    (line for line in done.stderr.splitlines() if "ERROR: libFuzzer" in line), name), "input": kept}
        row = {"seconds": round(took, 1), "exit": done.returncode, **stats, "crash_signatures": len(found),
               "crashes": found, "tail": done.stderr.strip().splitlines()[-3:]}
        report["decoders"][decoder] = row
        report["lines"].append(f"{decoder:<10} {stats.get('execs', 0):>9} execs in {took:5.0f} s  "
                               f"cov {stats.get('cov')}"
                               f"  ft {stats.get('ft')}  corpus {stats.get('corpus')}  exit {done.returncode}  "
                               f"distinct crashes {len(found)}")
        for signature, info in found.items():
            report["lines"].append(f"    {signature}: {info['message'][:160]} (input {info['input']})")
        if done.returncode not in (0,) and not stats:
            report["lines"].append("    " + " | ".join(row["tail"]))
    return report


def libfuzzer_stats(stderr: str) -> dict:
    """The last status line libFuzzer printed: executions, coverage, features, corpus."""
    found = {}
    for line in stderr.splitlines():
        match = re.match(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)", line)
        if match:
            found = {"execs": int(match[1]), "cov": int(match[2]), "ft": int(match[3]), "corpus": int(match[4])}
        oom = re.search(r"out-of-memory \(used: (\d+)Mb", line)
        if oom:
            found["oom_mib"] = int(oom[1])
    return found


# -- checksums fixed, so inputs reach the decoders behind them -------------------------------------


def seal_manifest(body: bytes) -> bytes:
    import hashlib
    import struct

    import zstandard

    packed = zstandard.ZstdCompressor(level=1).compress(body)
    return struct.pack("<8sHHQ32s", b"BSKMANIF", 1, 0, len(packed), hashlib.sha256(packed).digest()) + packed


def fix_bundle(data: bytes) -> bytes:
    """``data`` with the header checksum, frame checks, chain and trailer chain recomputed wherever
    its own length fields put them (the lengths themselves stay fuzzed)."""
    import hashlib
    import struct

    out = bytearray(data)
    if len(out) < 16:
        return bytes(out)
    (length,) = struct.unpack_from("<I", out, 12)
    at = 16 + length
    if at + 32 > len(out):
        return bytes(out)
    header_sum = hashlib.sha256(out[:at]).digest()
    out[at : at + 32] = header_sum
    chain = hashlib.sha256(header_sum)
    at += 32
    while at + 24 <= len(out):
        raw, packed = struct.unpack_from("<II", out, at)
        if raw == 0 and packed == 0:
            at += 24
            if at + 56 <= len(out):
                out[at + 16 : at + 48] = chain.digest()
            break
        check = hashlib.sha256(out[at + 24 : at + 24 + packed]).digest()[:16]
        out[at + 8 : at + 24] = check
        chain.update(check)
        at += 24 + packed
    return bytes(out)


def fix_stream(data: bytes) -> bytes:
    import hashlib
    import struct

    if len(data) < 16 + 52:
        return data
    (length,) = struct.unpack_from("<I", data, 12)
    manifest = bytearray(data[16 : 16 + length])
    if len(manifest) >= 52:
        manifest[20:52] = hashlib.sha256(manifest[52:]).digest()
    return data[:16] + bytes(manifest) + fix_bundle(data[16 + length :])


def fix_chunk(data: bytes) -> bytes:
    import zlib

    if len(data) < 24:
        return data
    return data[:16] + zlib.crc32(data[24:]).to_bytes(4, "little") + data[20:]


# -- the child: one decoder under atheris -------------------------------------------------------------


def child(args) -> None:
    import atheris

    with atheris.instrument_imports(include=["sketch", "store"]):
        from sketch.bundle import BundleReader
        from sketch.errors import BlocksketchError
        from sketch.manifest import Manifest
        from sketch.qcow2 import Qcow2Image
        from sketch.ranges import read_ranges_file
        from sketch.stream import open_stream_bundle, read_stream_manifest
        from store import catalogue as catalogue_mod
        from store import config as config_mod
        from store.chunks import decode_chunks

    ctx = json.loads(Path(args.context).read_text())
    valid_manifest = Manifest.load(ctx["manifest"])
    total, zero, distinct = ctx["chunk"]
    scratch = tempfile.NamedTemporaryFile(prefix="atheris-", dir=".", delete=False)  # noqa: SIM115
    scratch.close()
    crashes: dict = {}

    def as_file(data: bytes) -> str:
        with open(scratch.name, "wb") as handle:
            handle.write(data)
        return scratch.name

    def decode(data: bytes) -> None:
        if args.decoder == "manifest":
            Manifest.from_bytes(seal_manifest(data))
        elif args.decoder == "bundle":
            reader = BundleReader(io.BytesIO(fix_bundle(data)), valid_manifest, "bundle")
            for _ in reader.placed():
                pass
        elif args.decoder == "stream":
            handle = io.BytesIO(fix_stream(data))
            manifest = read_stream_manifest(handle)
            for _ in open_stream_bundle(handle, manifest).placed():
                pass
        elif args.decoder == "ranges":
            read_ranges_file(as_file(data), valid_manifest.manifest_id, valid_manifest.total_blocks)
        elif args.decoder == "qcow2":
            with Qcow2Image(as_file(data)) as image:
                size = min(image.size_bytes, QCOW2_READ_BYTES)
                list(image.data_extents(0, size))
                image.read_into(0, memoryview(bytearray(size)))
        elif args.decoder == "catalogue":
            catalogue_mod.decode(data, "ams-1")
        elif args.decoder == "chunk":
            decode_chunks([fix_chunk(data)], 4096, total, zero, distinct, "chunk")
        else:
            config_mod.decode(data)

    def test_one(data: bytes) -> None:
        try:
            decode(data)
        except BlocksketchError:
            pass
        except Exception as exc:  # noqa: BLE001 - recorded, not raised: one run collects every crash
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if str(ROOT) in f.filename]
            where = f"{os.path.relpath(frames[-1].filename, ROOT)}:{frames[-1].lineno}" if frames else "?"
            signature = f"{type(exc).__name__} at {where}"
            if signature not in crashes:
                path = os.path.abspath(f"crash-{len(crashes)}")
                Path(path).write_bytes(data)
                crashes[signature] = {"message": f"{type(exc).__name__}: {exc}"[:400], "input": path}
                Path(args.crashes).write_text(json.dumps(crashes, indent=1))

    atheris.Setup([sys.argv[0], args.corpus, f"-max_total_time={int(args.seconds)}", "-timeout=5",
                   f"-rss_limit_mb={BASELINE_MIB + 256}", f"-max_len={args.max_len}", "-print_final_stats=1"],
                  test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("decoder", choices=DECODERS)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--context", required=True)
    parser.add_argument("--max-len", type=int, required=True)
    parser.add_argument("--crashes", required=True)
    child(parser.parse_args())
