"""sketch/bundle.py: what a bundle holds, how small it is, and how damage is caught."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sketch.bundle import FRAME_BYTES, BundleReader, open_bundle, pack_bundle
from sketch.errors import FormatError, UsageError, VerificationError
from sketch.manifest import SEND
from sketch.manifest_build import build_manifest
from sketch.ranges import read_ranges_file, write_ranges_file
from sketch.sample import random_blocks, write_image
from tests.test_manifest import fleet, targets_of


def send_bytes(source: bytes, manifest, block_size: int) -> bytes:
    """The SEND blocks of ``source`` concatenated (tail padded): what the bundle must carry."""
    padded = source + bytes(-len(source) % block_size)
    start, length = manifest.runs_of(SEND)
    return b"".join(padded[s * block_size : (s + n) * block_size] for s, n in zip(start.tolist(), length.tolist()))


def read_placed(path: str, manifest) -> dict[int, bytes]:
    handle, reader = open_bundle(path, manifest)
    with handle:
        return {first: bytes(data) for first, data in reader.placed()}


@pytest.fixture
def packed(tmp_path):
    block_size = 512
    images = fleet(tmp_path, block_size)
    manifest = build_manifest(images["source"], "dst", targets_of(images["host"], block_size), block_size)
    bundle = tmp_path / "b.bundle"
    info = pack_bundle(images["source"], manifest, str(bundle))
    return images, manifest, bundle, info


def test_a_bundle_holds_exactly_the_send_blocks_in_place(packed):
    images, manifest, bundle, info = packed
    source = Path(images["source"]).read_bytes()
    padded = source + bytes(-len(source) % 512)
    placed = read_placed(str(bundle), manifest)
    assert info.blocks == manifest.block_counts()["send"]
    assert sum(len(d) for d in placed.values()) == info.raw_bytes == info.blocks * 512
    for first, data in placed.items():
        assert padded[first * 512 : first * 512 + len(data)] == data
    assert b"".join(placed[k] for k in sorted(placed)) == send_bytes(source, manifest, 512)
    assert bundle.stat().st_size == info.bytes_written


def real_text(size: int) -> bytes:
    """``size`` bytes of real, compressible text: this Python's own standard library sources."""
    chunks, total = [], 0
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        chunks.append(path.read_bytes())
        total += len(chunks[-1])
        if total >= size:
            break
    return b"".join(chunks)[:size]


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd binary")
@pytest.mark.parametrize("block_size", [512, 4096])
def test_a_bundle_is_no_bigger_than_zstd_3_of_its_blocks(tmp_path, block_size):
    rng = np.random.default_rng(11)
    text = real_text(3 << 20)
    source = text[: 1 << 20] + bytes(1 << 20) + random_blocks(rng, 64, block_size).tobytes() + text[1 << 20 :]
    (tmp_path / "s.img").write_bytes(source)
    (tmp_path / "h.img").write_bytes(text[: 256 << 10])  # the destination holds a little of it
    manifest = build_manifest(str(tmp_path / "s.img"), "dst", targets_of([str(tmp_path / "h.img")], block_size),
                              block_size)
    assert manifest.block_counts()["local"] > 0
    bundle = tmp_path / "b.bundle"
    pack_bundle(str(tmp_path / "s.img"), manifest, str(bundle))
    raw = tmp_path / "send.raw"
    raw.write_bytes(send_bytes(source, manifest, block_size))
    subprocess.run(["zstd", "-3", "-q", "-f", str(raw), "-o", str(tmp_path / "send.zst")], check=True)
    zstd_size = (tmp_path / "send.zst").stat().st_size
    assert zstd_size < raw.stat().st_size / 2  # real text: zstd has work to do
    assert bundle.stat().st_size <= zstd_size


def test_a_multi_frame_bundle_streams_back_whole(tmp_path):
    block_size = 4096
    rng = np.random.default_rng(5)
    blocks = FRAME_BYTES // block_size * 2 + 17  # two full frames and a partial one
    write_image(str(tmp_path / "s.img"), random_blocks(rng, blocks, block_size))
    write_image(str(tmp_path / "h.img"), random_blocks(rng, 4, block_size))
    manifest = build_manifest(str(tmp_path / "s.img"), "dst", targets_of([str(tmp_path / "h.img")], block_size),
                              block_size)
    info = pack_bundle(str(tmp_path / "s.img"), manifest, str(tmp_path / "b"))
    handle, reader = open_bundle(str(tmp_path / "b"), manifest)
    with handle:
        frames = [len(f) for f in reader.frames()]
    assert frames == [FRAME_BYTES, FRAME_BYTES, 17 * block_size]
    assert info.raw_bytes == (tmp_path / "s.img").stat().st_size


def test_a_ranges_bundle_holds_just_those_blocks(packed, tmp_path):
    images, manifest, _, _ = packed
    ranges_file = tmp_path / "need.json"
    write_ranges_file(str(ranges_file), manifest.manifest_id, 512, np.array([40, 3, 10]), np.array([5, 2, 4]))
    start, count = read_ranges_file(str(ranges_file), manifest.manifest_id, manifest.total_blocks)
    assert start.tolist() == [3, 10, 40] and count.tolist() == [2, 4, 5]
    info = pack_bundle(images["source"], manifest, str(tmp_path / "extra"), (start, count))
    assert info.contents == "ranges" and info.blocks == 11
    source = Path(images["source"]).read_bytes()
    placed = read_placed(str(tmp_path / "extra"), manifest)
    assert {k: len(v) // 512 for k, v in placed.items()} == {3: 2, 10: 4, 40: 5}
    assert all(source[k * 512 : k * 512 + len(v)] == v for k, v in placed.items())


def test_a_ranges_file_for_another_manifest_is_refused(packed, tmp_path):
    _, manifest, _, _ = packed
    write_ranges_file(str(tmp_path / "r.json"), b"\1" * 32, 512, np.array([1]), np.array([1]))
    with pytest.raises(UsageError, match="another manifest"):
        read_ranges_file(str(tmp_path / "r.json"), manifest.manifest_id, manifest.total_blocks)
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(FormatError):
        read_ranges_file(str(tmp_path / "bad.json"), manifest.manifest_id, manifest.total_blocks)


def test_packing_a_changed_image_leaves_no_bundle(packed, tmp_path):
    images, manifest, _, _ = packed
    with open(images["source"], "r+b") as handle:
        handle.seek(3 * 512 + 7)
        handle.write(b"changed")
    with pytest.raises(VerificationError, match="no longer matches"):
        pack_bundle(images["source"], manifest, str(tmp_path / "late.bundle"))
    assert not (tmp_path / "late.bundle").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".late.bundle")]


def test_a_bundle_for_another_manifest_is_refused(packed, tmp_path):
    images, manifest, bundle, _ = packed
    other = build_manifest(images["source"], "elsewhere", [], 512)
    with pytest.raises(UsageError, match="another manifest"):
        open_bundle(str(bundle), other)


def _positions(size: int) -> list[int]:
    return [0, 9, 14, 20, 60, 100, size // 2, size - 60, size - 40, size - 9, size - 1]


@pytest.mark.parametrize("index", range(11))
def test_a_flipped_bit_anywhere_is_a_format_error(packed, index):
    _, manifest, bundle, _ = packed
    data = bytearray(bundle.read_bytes())
    data[_positions(len(data))[index]] ^= 0x04
    bundle.write_bytes(bytes(data))
    with pytest.raises(FormatError):
        read_placed(str(bundle), manifest)


@pytest.mark.parametrize("keep", [0, 10, 17, 100, 0.5, -80, -40, -8, -1])
def test_a_truncated_bundle_is_a_format_error(packed, keep):
    _, manifest, bundle, _ = packed
    data = bundle.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    bundle.write_bytes(data[:cut])
    with pytest.raises(FormatError, match="truncated|corrupt|not a blocksketch"):
        read_placed(str(bundle), manifest)


def test_a_reader_reads_from_a_pipe(packed):
    _, manifest, bundle, info = packed
    with subprocess.Popen(["cat", str(bundle)], stdout=subprocess.PIPE) as cat:
        reader = BundleReader(cat.stdout, manifest, "bundle from a pipe")
        assert sum(len(d) for _, d in reader.placed()) == info.raw_bytes


@pytest.mark.parametrize(("start", "compress_s", "period_s", "level"), [
    (3, 1.0, 1.0, 3),  # compression sets the pace: stay fast
    (3, 1.0, 2.5, 3),  # frames take 2.5x, a third kept in reserve: not enough for level 6's 2x
    (3, 1.0, 3.0, 6),
    (3, 1.0, 5.5, 9),
    (6, 1.0, 1.1, 3),  # compression sets the pace: the cheapest
    (9, 1.0, 1.0, 3),
    (6, 1.0, 1.5, 6),  # link-bound, but not enough for level 9: stay
    (6, 1.0, 3.0, 9),
    (3, 0.0, 5.0, 3),  # nothing measured yet
])
def test_the_adapted_level_fits_the_time_a_frame_takes(start, compress_s, period_s, level):
    from sketch.bundle import adapted_level

    assert adapted_level(start, compress_s, period_s) == level


def test_an_adaptive_bundle_to_a_slow_reader_switches_level_and_reads_back(tmp_path):
    """A pipe drained at ~25 MB/s: writing waits far longer than level 3 compresses, so the writer
    switches to a stronger level; the two zstd frames read back as one bundle."""
    import threading
    import time

    from sketch.blocks import open_image
    from sketch.bundle import write_bundle

    block_size = 4096
    data = np.random.default_rng(5).integers(97, 103, 12 * FRAME_BYTES, dtype=np.uint8).tobytes()
    source_path = tmp_path / "source.img"
    source_path.write_bytes(data)
    manifest = build_manifest(str(source_path), "dst", [], block_size)
    read_end, write_end = os.pipe()
    received = bytearray()

    def slow_reader() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 18):
                received.extend(chunk)
                time.sleep(0.01)

    reader = threading.Thread(target=slow_reader)
    reader.start()
    with os.fdopen(write_end, "wb") as pipe, open_image(str(source_path)) as source:
        info = write_bundle(pipe, source, manifest, level=3, adaptive=True)
    reader.join()
    assert info.levels[0] == 3 and len(info.levels) == 2 and info.levels[1] in (6, 9)
    assert info.levels[1] == 9 or info.levels == [3, 6]
    bundle = tmp_path / "b.bundle"
    bundle.write_bytes(bytes(received))
    placed = read_placed(str(bundle), manifest)
    assert b"".join(placed[k] for k in sorted(placed)) == data


def test_an_adaptive_bundle_to_a_fast_reader_goes_cheaper(tmp_path):
    from sketch.blocks import open_image
    from sketch.bundle import write_bundle

    data = np.random.default_rng(6).integers(97, 103, 10 * FRAME_BYTES, dtype=np.uint8).tobytes()
    source_path = tmp_path / "source.img"
    source_path.write_bytes(data)
    manifest = build_manifest(str(source_path), "dst", [], 4096)
    with open(tmp_path / "b.bundle", "wb") as out, open_image(str(source_path)) as source:
        info = write_bundle(out, source, manifest, level=6, adaptive=True)
    assert info.levels == [6, 3]
    assert b"".join(read_placed(str(tmp_path / "b.bundle"), manifest).values()) == data
