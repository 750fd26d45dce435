"""Hostile input (issue 13): files built to cost memory, time or a crash are refused cleanly.

Each test first shows the attack (the crafted input really claims or expands to what it should
cost), then runs the real CLI in a child process under a 512 MiB address-space limit and a timeout,
and checks for the one-line refusal. The inputs are made here, byte by byte where needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys

import msgpack
import numpy as np
import pytest
import zstandard

from sketch import bundle as bundle_format
from sketch import stream as stream_format
from sketch.errors import FormatError, UsageError
from sketch.manifest import DUP, LOCAL, MAGIC, SEND, VERSION, ZERO, LocalImage, Manifest
from sketch.ranges import read_ranges_file, write_ranges_file
from tests.test_migrate_cli import one_line_error

CLI = [sys.executable, "-m", "cli"]
LIMIT_BYTES = 512 << 20
HOST = "dst"
BLOCK = 512


# -- crafting -----------------------------------------------------------------------------------------

ZSTD_FRAME_HEAD = b"\x28\xb5\x2f\xfd" + bytes([0x00, 0x38])  # magic; no content size; 128 KiB window


def rle_blocks(zeros: int, last: bool = True) -> bytes:
    """zstd RLE blocks: 4 bytes for each 128 KiB of zeros."""
    block = 128 << 10
    header = (1 << 1) | (block << 3)  # block type 1 (RLE), size 128 KiB; bit 0 marks the last block
    middle = header.to_bytes(3, "little") + b"\0"
    end = (header | last).to_bytes(3, "little") + b"\0"
    return middle * (zeros // block - 1) + end


def rle_bomb(expands_to: int) -> bytes:
    """One zstd frame of RLE blocks, without a content size: a few bytes per 128 KiB it expands to."""
    return ZSTD_FRAME_HEAD + rle_blocks(expands_to)


def raw_then_rle(prefix: bytes, zeros: int) -> bytes:
    """One zstd frame: ``prefix`` stored as a raw block, then ``zeros`` zero bytes as RLE blocks."""
    return ZSTD_FRAME_HEAD + (len(prefix) << 3).to_bytes(3, "little") + prefix + rle_blocks(zeros)


def expanded_size(frame: bytes, stop_at: int) -> int:
    """How many bytes ``frame`` decompresses to, counted in pieces, up to ``stop_at``."""
    reader = zstandard.ZstdDecompressor().stream_reader(frame)
    total = 0
    while total < stop_at:
        piece = reader.read(64 << 20)
        if not piece:
            break
        total += len(piece)
    return total


def manifest_of(runs: list[tuple[int, int]], size_bytes: int | None = None, images=(), local=(), dups=()) -> Manifest:
    """A manifest built field by field: ``runs`` as (kind, blocks); ``local`` (image, block) per
    LOCAL run (one verification group), ``dups`` the origin block per DUP run."""
    kinds = np.array([k for k, _ in runs], np.uint8)
    lengths = np.array([n for _, n in runs], np.uint64)
    total = int(lengths.sum())
    n_local = int(np.count_nonzero(kinds == LOCAL))
    return Manifest(total * BLOCK if size_bytes is None else size_bytes, BLOCK, "md5", HOST, bytes(32),
                    list(images), kinds, lengths, np.array([i for i, _ in local], np.uint32),
                    np.array([b for _, b in local], np.uint64),
                    np.array([n_local] if n_local else [], np.uint32), np.zeros((1 if n_local else 0, 32), np.uint8),
                    np.array(dups, np.uint64))


def envelope(raw_body: bytes | None = None, compressed: bytes | None = None) -> bytes:
    """A manifest file around a msgpack body (compressed here) or around ready compressed bytes."""
    body = compressed if compressed is not None else zstandard.ZstdCompressor().compress(raw_body)
    from sketch.manifest import _ENVELOPE

    return _ENVELOPE.pack(MAGIC, VERSION, 0, len(body), hashlib.sha256(body).digest()) + body


def bundle_bytes(manifest: Manifest, frames: list[tuple[int, bytes]], end: bool = True) -> bytes:
    """A bundle of ``manifest``'s SEND blocks whose frames are the given (declared raw length,
    compressed bytes), with valid checksums, and (``end``) an end marker and trailer."""
    start, count = bundle_format.bundle_ranges(manifest, None)
    header = msgpack.packb(bundle_format.bundle_header(manifest, start, count, "send", 3), use_bin_type=True)
    prefix = bundle_format._PREFIX.pack(bundle_format.MAGIC, bundle_format.VERSION, 0, len(header)) + header
    header_sum = hashlib.sha256(prefix).digest()
    out = prefix + header_sum
    chain = hashlib.sha256(header_sum)
    for raw_length, packed in frames:
        check = hashlib.sha256(packed).digest()[:16]
        chain.update(check)
        out += bundle_format._FRAME.pack(raw_length, len(packed), check) + packed
    if end:
        out += bundle_format._FRAME.pack(0, 0, bytes(16)) + bundle_format._TRAILER.pack(
            len(frames), sum(r for r, _ in frames), chain.digest(), bundle_format.END_MAGIC)
    return out


def stream_bytes(manifest_file: bytes, bundle: bytes) -> bytes:
    return stream_format._PREFIX.pack(stream_format.MAGIC, stream_format.VERSION, 0, len(manifest_file)) \
        + manifest_file + bundle


# -- running the CLI bounded ----------------------------------------------------------------------------

def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))


def run_bounded(*args: str, redis_url: str | None = None, stdin: bytes | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess:
    """The CLI in a child limited to 512 MiB of address space, within ``timeout`` seconds."""
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "BLOCKSKETCH_HOST": HOST}  # apply and receive run on HOST
    if redis_url:
        env["BLOCKSKETCH_REDIS_URL"] = redis_url
    return subprocess.run([*CLI, *args], env=env, input=stdin, capture_output=True, timeout=timeout,
                          preexec_fn=_limit_memory, **({} if stdin is not None else {"stdin": subprocess.DEVNULL}))


def refused(done: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    one_line_error(subprocess.CompletedProcess(done.args, done.returncode, done.stdout, done.stderr.decode()),
                   code, *fragments)
    assert "out of memory" not in done.stderr.decode() and "internal error" not in done.stderr.decode()


@pytest.fixture
def indexed_host(tmp_path, redis_url):
    """A destination host in a real index at 512-byte blocks (apply and receive check the block size)."""
    image = tmp_path / "held.img"
    image.write_bytes(np.random.default_rng(1).integers(0, 256, 64 << 10, dtype=np.uint8).tobytes())
    done = subprocess.run([*CLI, "index", "--host", HOST, str(image)], capture_output=True,
                          env={**os.environ, "BLOCKSKETCH_REDIS_URL": redis_url})
    assert done.returncode == 0, done.stderr
    return redis_url


# -- 4. decompression bombs -----------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["apply", "receive"])
def test_a_bundle_frame_that_expands_without_limit_is_refused_under_512_mib(tmp_path, indexed_host, command):
    manifest = manifest_of([(SEND, 8192)])
    bomb = rle_bomb(2 << 30)
    assert len(bomb) < 70 << 10 and expanded_size(bomb, 1 << 30) == 1 << 30  # 65 KB: 2 GiB, over 1 GiB
    bundle = bundle_bytes(manifest, [(4 << 20, bomb)])
    manifest_file = manifest.to_bytes()
    if command == "apply":
        (tmp_path / "m").write_bytes(manifest_file)
        (tmp_path / "b").write_bytes(bundle)
        done = run_bounded("apply", str(tmp_path / "m"), str(tmp_path / "b"), "-o", str(tmp_path / "out"),
                           redis_url=indexed_host)
    else:
        done = run_bounded("receive", "-o", str(tmp_path / "out"), redis_url=indexed_host,
                           stdin=stream_bytes(manifest_file, bundle))
    refused(done, 1, "frame 0 does not decompress to the 4194304 bytes it declares")
    assert not (tmp_path / "out").exists()


def test_a_16_gib_frame_in_a_515_kb_stream_is_refused_by_receive(tmp_path, indexed_host):
    manifest = manifest_of([(SEND, 8192)])
    bomb = rle_bomb(16 << 30)
    assert len(bomb) < 530 << 10  # 16 GiB of zeros as RLE blocks
    stream = tmp_path / "s"
    stream.write_bytes(stream_bytes(manifest.to_bytes(), bundle_bytes(manifest, [(4 << 20, bomb)])))
    refused(run_bounded("receive", str(stream), "-o", str(tmp_path / "out"), redis_url=indexed_host), 1,
            "does not decompress to the 4194304 bytes it declares")


def test_a_frame_hiding_data_past_its_declared_length_is_refused(tmp_path):
    """The declared length caps the output; what the frame holds beyond it is refused, not carried over."""
    manifest = manifest_of([(SEND, 16)])
    compressor = zstandard.ZstdCompressor().compressobj()
    honest = compressor.compress(bytes(8 * BLOCK)) + compressor.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    hidden = honest + rle_blocks(1 << 30, last=False)
    path = tmp_path / "b"
    path.write_bytes(bundle_bytes(manifest, [(8 * BLOCK, hidden), (8 * BLOCK, b"")]))
    handle, reader = bundle_format.open_bundle(str(path), manifest)
    with handle, pytest.raises(FormatError, match="frame 0 does not decompress to the 4096 bytes it declares"):
        list(reader.frames())


def test_a_legit_bundle_still_reads_across_an_adaptive_level_switch(tmp_path):
    """Frames are decompressed into exactly their declared length, across the end of a zstd frame."""
    manifest = manifest_of([(SEND, 3 * 2048)])
    rng = np.random.default_rng(5)
    raws = [rng.integers(0, 4, 2048 * BLOCK, dtype=np.uint8).tobytes() for _ in range(3)]
    first = bundle_format._compressor(3)
    frames = [(len(raws[0]), first.compress(raws[0]) + first.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))]
    tail = first.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)
    second = bundle_format._compressor(9)
    frames.append((len(raws[1]), tail + second.compress(raws[1]) + second.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)))
    frames.append((len(raws[2]), second.compress(raws[2]) + second.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)))
    path = tmp_path / "b"
    path.write_bytes(bundle_bytes(manifest, frames))
    handle, reader = bundle_format.open_bundle(str(path), manifest)
    with handle:
        assert [bytes(raw) for raw in reader.frames()] == raws


def body_head(size_bytes: int, block_size: int = BLOCK) -> bytes:
    """The leading msgpack of a manifest body: a map of 12 fields opening as a writer opens it."""
    return (b"\x8c" + msgpack.packb("schema") + msgpack.packb("blocksketch.manifest") + msgpack.packb("version")
            + msgpack.packb(1) + msgpack.packb("size_bytes") + msgpack.packb(size_bytes)
            + msgpack.packb("block_size") + msgpack.packb(block_size))


@pytest.mark.parametrize("head", [
    body_head(1 << 20),  # a 1 MiB image: its runs need at most 16 MiB + 57 bytes a block
    body_head(1 << 40),  # a 1 TiB image could need 4 GiB of runs, but not from 131 KB of zstd
    b"\x8c" + msgpack.packb("images"),  # no image size before the bomb
], ids=["1-mib-claim", "1-tib-claim", "no-claim"])
def test_a_manifest_body_that_decompresses_to_4_gib_is_refused_early(tmp_path, head):
    # After the head, a bin field claiming 4 GiB - 1, filled by RLE blocks of zeros.
    body = raw_then_rle(head + b"\xc6" + (0xFFFFFFFF).to_bytes(4, "big"), 4 << 30)
    assert len(body) < 140 << 10
    manifest = tmp_path / "bomb.manifest"
    manifest.write_bytes(envelope(compressed=body))
    (tmp_path / "b").write_bytes(b"")
    done = run_bounded("apply", str(manifest), str(tmp_path / "b"), "-o", str(tmp_path / "out"), timeout=30)
    refused(done, 1, "its body decompresses to more than")


def test_a_manifest_body_within_its_bound_still_decodes(tmp_path):
    """The cap follows the claimed image: a real manifest of many runs is far inside it."""
    runs = [(ZERO if i % 2 else SEND, 1) for i in range(200_000)]
    manifest = manifest_of(runs)
    again = Manifest.from_bytes(manifest.to_bytes())
    assert again.block_counts() == manifest.block_counts() and len(again.run_kind) == 200_000


# -- 5. memory from claims, not data --------------------------------------------------------------------

def test_a_tiny_manifest_claiming_1_tib_applies_in_memory_that_follows_its_runs(tmp_path, indexed_host):
    tib_blocks = (1 << 40) // BLOCK
    manifest = manifest_of([(SEND, 8), (ZERO, tib_blocks - 8)])
    manifest_file = manifest.to_bytes()
    assert len(manifest_file) < 400 and manifest.total_blocks == 1 << 31  # 351 bytes claiming 2**31 blocks
    compressor = zstandard.ZstdCompressor()
    (tmp_path / "m").write_bytes(manifest_file)
    (tmp_path / "b").write_bytes(bundle_bytes(manifest, [(8 * BLOCK, compressor.compress(bytes(8 * BLOCK)))]))
    done = run_bounded("apply", str(tmp_path / "m"), str(tmp_path / "b"), "-o", str(tmp_path / "out"),
                       redis_url=indexed_host, timeout=30)
    # The checksum is the attacker's (zeros): the rebuilt sparse image does not match it.
    refused(done, 1, "does not match the manifest's checksum")
    assert not (tmp_path / "out").exists()


def test_bundles_lacking_send_blocks_of_a_huge_claim_are_named_without_a_mask():
    from sketch.apply import _check_coverage

    manifest = manifest_of([(ZERO, 1 << 40), (SEND, 10), (ZERO, 5), (SEND, 4)])  # 2**40 blocks: 512 TiB

    class Reader:  # what a bundle of ranges covers: the first 6 SEND blocks
        start = np.array([1 << 40], np.int64)
        count = np.array([6], np.int64)

    with pytest.raises(UsageError, match=r"lack 8 of the blocks .* \(first at block 1099511627782\)"):
        _check_coverage(manifest, [Reader()])


# -- 6. integers ----------------------------------------------------------------------------------------

def lying_body(**changes) -> bytes:
    """A valid manifest's msgpack body with some fields replaced."""
    manifest = manifest_of([(SEND, 2), (LOCAL, 2), (DUP, 1), (ZERO, 3)],
                           images=[LocalImage(HOST, "/held.img", "id", 64 << 10, 1)], local=[(0, 4)], dups=[0])
    body = manifest._body()
    for path, value in changes.items():
        where = body
        *parents, leaf = path.split(".")
        for name in parents:
            where = where[name]
        where[leaf] = value
    # The counts an attacker would write: what the reader computes from the lying runs.
    kinds = np.frombuffer(body["runs"]["kind"], np.uint8)
    lengths = np.frombuffer(body["runs"]["length"], "<u8")
    if len(kinds) == len(lengths):
        totals = np.bincount(kinds, weights=lengths, minlength=4)
        body["counts"] = {name: min(int(totals[k]), U64_MAX) for k, name in enumerate(("zero", "local", "send", "dup"))}
    return msgpack.packb(body, use_bin_type=True)


U64_MAX = (1 << 64) - 1


@pytest.mark.parametrize("changes", [
    {"runs.length": np.array([U64_MAX, 3, 1, 5], "<u8").tobytes()},  # sums to 8 in uint64: wraps around
    {"runs.length": np.array([1 << 63, 1 << 63, 1, 7], "<u8").tobytes()},
    {"local.delta": np.array([(1 << 63) - 1], "<i8").tobytes()},  # start + delta overflows int64
    {"local.delta": np.array([-(1 << 63)], "<i8").tobytes()},
    {"dup.delta": np.array([U64_MAX], "<u8").tobytes()},
    {"size_bytes": U64_MAX},
    {"images": [{"host": HOST, "path": "/held.img", "image_id": "id", "size_bytes": U64_MAX, "mtime_ns": 1}]},
    {"images": [{"host": HOST, "path": "/held.img", "image_id": "id", "size_bytes": -1, "mtime_ns": 1}]},
])
def test_overflowing_manifest_integers_are_a_format_error(tmp_path, changes):
    path = tmp_path / "m"
    path.write_bytes(envelope(lying_body(**changes)))
    with pytest.raises(FormatError, match="is corrupt"):
        Manifest.load(str(path))
    (tmp_path / "b").write_bytes(b"")
    refused(run_bounded("apply", str(path), str(tmp_path / "b"), "-o", str(tmp_path / "out")), 1, "is corrupt")


@pytest.mark.parametrize("ranges", [
    [[U64_MAX - 1, 2]],  # start + count wraps to 0 in uint64
    [[1 << 62, 3 << 62]],  # wraps in int64
    [[2, U64_MAX]],
    [[1 << 62, 1 << 62]],  # both fit int64, their sum wraps to a negative end
])
def test_overflowing_bundle_ranges_are_a_format_error(tmp_path, ranges):
    manifest = manifest_of([(SEND, 8)])
    header = bundle_format.bundle_header(manifest, np.zeros(0, np.int64), np.zeros(0, np.int64), "ranges", 3)
    header["ranges"] = np.array(ranges, "<u8").tobytes()
    header["blocks"] = sum(c for _, c in ranges) % (1 << 64)
    packed = msgpack.packb(header, use_bin_type=True)
    prefix = bundle_format._PREFIX.pack(bundle_format.MAGIC, bundle_format.VERSION, 0, len(packed)) + packed
    path = tmp_path / "b"
    path.write_bytes(prefix + hashlib.sha256(prefix).digest())
    with pytest.raises(FormatError, match=r"is corrupt \(ranges\)"):
        bundle_format.open_bundle(str(path), manifest)


@pytest.mark.parametrize("pair", [[1 << 64, 1], [2, 1 << 70], [(1 << 63) - 1, (1 << 63) - 1], [-1, 2]])
def test_overflowing_ranges_file_integers_are_a_format_error(tmp_path, pair):
    path = tmp_path / "r.json"
    write_ranges_file(str(path), bytes(32), BLOCK, np.array([1]), np.array([1]))
    document = json.loads(path.read_text())
    document["ranges"] = [pair]
    path.write_text(json.dumps(document))
    with pytest.raises(FormatError, match="names blocks outside the image"):
        read_ranges_file(str(path), bytes(32), 100)


@pytest.mark.parametrize("length", [0xFFFFFFFF, 1 << 30])
def test_a_stream_header_claiming_gigabytes_costs_only_the_bytes_that_arrive(tmp_path, indexed_host, length):
    stream = stream_format._PREFIX.pack(stream_format.MAGIC, stream_format.VERSION, 0, length) + b"x" * 1000
    refused(run_bounded("receive", "-o", str(tmp_path / "out"), redis_url=indexed_host, stdin=stream), 1,
            "truncated (in its manifest)")


def test_a_bundle_header_claiming_a_gigabyte_costs_only_the_bytes_that_arrive(tmp_path, indexed_host):
    manifest = manifest_of([(SEND, 8)])
    (tmp_path / "m").write_bytes(manifest.to_bytes())
    (tmp_path / "b").write_bytes(bundle_format._PREFIX.pack(bundle_format.MAGIC, 2, 0, (1 << 30)) + b"x" * 100)
    refused(run_bounded("apply", str(tmp_path / "m"), str(tmp_path / "b"), "-o", str(tmp_path / "out"),
                        redis_url=indexed_host), 1, "truncated (in its header)")
