"""sketch/qcow2.py against qemu: every image QEMU writes must read exactly as `qemu-img convert -O raw` of it.

Images are built with the real qemu-img and qemu-io (Debian qemu-utils); without them these tests
skip with that reason (and fail under CI). Broken and unsupported images are made by patching real ones with struct.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time

import numpy as np
import pytest

from sketch.blocks import RawImage, open_image
from sketch.digests import digest_image
from sketch.errors import ImageError
from sketch.qcow2 import MAX_CHAIN_DEPTH, OFFSET_MASK, Qcow2Image, TableCache

MIB = 1 << 20
# 4 MiB and a tail of three sectors: the last cluster is partial for every cluster size
SOURCE_SIZE = 4 * MIB + 1536


pytestmark = pytest.mark.tools("qemu-img", "qemu-io")


def run(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed: {result.stderr}"


def qemu_io(path: str, *commands: str, image_format: str = "qcow2") -> None:
    args = ["qemu-io", "-f", image_format]
    for command in commands:
        args += ["-c", command]
    run(*args, path)


def write_source(path: str, size: int = SOURCE_SIZE, seed: int = 7) -> None:
    """A sparse raw image: random runs, runs of repeated blocks, holes and written zeros."""
    rng = np.random.default_rng(seed)
    layout = [  # (offset, length, kind)
        (0, 300 * 1024, "random"),
        (300 * 1024, 100 * 1024, "zeros"),  # written zeros: qemu-img detects and drops them
        (512 * 1024, 64 * 1024, "repeat"),
        (1 * MIB + 4096, 8192, "random"),  # small island inside a cluster
        (2 * MIB - 512, 1024, "random"),  # straddles a 2 MiB boundary
        (3 * MIB, MIB, "random"),
        (4 * MIB, 1536, "random"),  # the partial tail
    ]
    with open(path, "wb") as handle:
        handle.truncate(size)
        for offset, length, kind in layout:
            if kind == "random":
                data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
            elif kind == "repeat":
                data = rng.integers(1, 256, 512, dtype=np.uint8).tobytes() * (length // 512)
            else:
                data = bytes(length)
            handle.seek(offset)
            handle.write(data)


@pytest.fixture(scope="session")
def source(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("qcow2-source") / "source.raw")
    write_source(path)
    return path


def to_raw(path: str) -> str:
    raw = path + ".ref.raw"
    run("qemu-img", "convert", "-O", "raw", path, raw)
    return raw


def read_all(image) -> bytes:
    buffer = bytearray(image.size_bytes)
    image.read_into(0, memoryview(buffer))
    return bytes(buffer)


def assert_reads_like_qemu(path: str, ranges: int = 25) -> None:
    """Bytes, partial reads, data extents and digests of ``path`` match qemu-img's raw conversion."""
    raw_path = to_raw(path)
    with open(raw_path, "rb") as handle:
        expected = handle.read()
    with Qcow2Image(path) as image:
        assert image.size_bytes == len(expected)
        assert read_all(image) == expected

        rng = np.random.default_rng(len(expected))
        for _ in range(ranges):  # unaligned reads, some running past the end
            offset = int(rng.integers(0, len(expected) + 1000))
            length = int(rng.integers(1, 300_000))
            buffer = bytearray(length)
            image.read_into(offset, memoryview(buffer))
            want = expected[offset : offset + length]
            assert bytes(buffer) == want + bytes(length - len(want)), (offset, length)

        extents = list(image.data_extents(0, image.size_bytes))
    previous_end = -1
    covered = np.zeros(len(expected), dtype=bool)
    for offset, length in extents:
        assert length > 0 and offset > previous_end, "extents must be sorted, merged and non-empty"
        previous_end = offset + length
        covered[offset : offset + length] = True
    assert previous_end <= len(expected)
    data = np.frombuffer(expected, dtype=np.uint8) != 0
    assert not np.any(data & ~covered), "a non-zero byte lies outside every data extent"

    for block_size in (512, 4096):
        ours = digest_image(path, block_size, image_format="qcow2", workers=1)
        theirs = digest_image(raw_path, block_size, image_format="raw", workers=1)
        assert np.array_equal(ours.digests, theirs.digests)
        assert np.array_equal(ours.zero, theirs.zero)


CONVERSIONS = [
    ("v3", []),
    ("v2", ["-o", "compat=0.10"]),
    ("zlib", ["-c"]),
    ("zstd", ["-c", "-o", "compression_type=zstd"]),
    ("v2-zlib", ["-c", "-o", "compat=0.10"]),
    ("cluster-512", ["-o", "cluster_size=512"]),
    ("cluster-4k", ["-o", "cluster_size=4096"]),
    ("cluster-4k-zlib", ["-c", "-o", "cluster_size=4096"]),
    ("cluster-2m", ["-o", "cluster_size=2M"]),
    ("cluster-2m-zstd", ["-c", "-o", "cluster_size=2M,compression_type=zstd"]),
    ("extended-l2", ["-o", "extended_l2=on"]),
    ("extended-l2-zstd", ["-c", "-o", "extended_l2=on,compression_type=zstd"]),
    ("extended-l2-16k", ["-o", "extended_l2=on,cluster_size=16k"]),
    ("extended-l2-2m", ["-o", "extended_l2=on,cluster_size=2M"]),
    ("preallocation-metadata", ["-o", "preallocation=metadata"]),
    ("lazy-refcounts", ["-o", "lazy_refcounts=on"]),
]


@pytest.mark.parametrize("options", [c[1] for c in CONVERSIONS], ids=[c[0] for c in CONVERSIONS])
def test_converted_image_reads_like_qemu(source, tmp_path, options):
    path = str(tmp_path / "image.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", *options, source, path)
    assert_reads_like_qemu(path)


def test_header_fields_are_exposed(source, tmp_path):
    path = str(tmp_path / "image.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", "-c", "-o", "compression_type=zstd,extended_l2=on,cluster_size=128k",
        source, path)
    with Qcow2Image(path) as image:
        assert (image.version, image.cluster_size, image.compression, image.extended_l2) == (3, 128 << 10, "zstd", True)
        assert image.backing is None and image.format == "qcow2"


def test_open_image_detects_qcow2_by_magic(source, tmp_path):
    path = str(tmp_path / "image.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", source, path)
    image = open_image(path)
    try:
        assert isinstance(image, Qcow2Image)
    finally:
        image.close()


def test_zero_and_unallocated_clusters_are_not_data_extents(tmp_path):
    path = str(tmp_path / "sparse.qcow2")
    run("qemu-img", "create", "-f", "qcow2", path, "16M")
    qemu_io(path, "write -P 0x11 1M 128k", "write -z 4M 4M", "write -P 0x22 10M 64k", "write -z 10M 4k")
    with Qcow2Image(path) as image:
        assert list(image.data_extents(0, image.size_bytes)) == [(1 * MIB, 128 << 10), (10 * MIB, 64 << 10)]
        assert list(image.data_extents(1 * MIB + 4096, 10 * MIB + 8192)) == [
            (1 * MIB + 4096, (128 << 10) - 4096), (10 * MIB, 8192)]
    assert_reads_like_qemu(path)


@pytest.mark.parametrize("options", ["preallocation=metadata", "preallocation=metadata,extended_l2=on"])
def test_preallocated_clusters_over_file_holes_are_not_data_extents(tmp_path, options):
    path = str(tmp_path / "preallocated.qcow2")
    run("qemu-img", "create", "-f", "qcow2", "-o", options, path, "16M")
    qemu_io(path, "write -P 0x42 5M 64k")
    with Qcow2Image(path) as image:
        extents = list(image.data_extents(0, image.size_bytes))
    assert sum(length for _, length in extents) <= 1 * MIB, "holes of the qcow2 file must be skipped"
    assert any(offset <= 5 * MIB and 5 * MIB + (64 << 10) <= offset + length for offset, length in extents)
    assert_reads_like_qemu(path)


@pytest.mark.parametrize("options", ["cluster_size=64k", "extended_l2=on"])
def test_clusters_allocated_in_reverse_order_are_read_from_their_own_host_offsets(tmp_path, options):
    path = str(tmp_path / "reverse.qcow2")
    run("qemu-img", "create", "-f", "qcow2", "-o", options, path, "1M")
    qemu_io(path, *(f"write -P {0x10 + i} {i * 64}k 64k" for i in reversed(range(8))))
    with Qcow2Image(path) as image:
        assert list(image.data_extents(0, image.size_bytes)) == [(0, 512 << 10)]
        assert read_all(image)[: 512 << 10] == b"".join(bytes([0x10 + i]) * (64 << 10) for i in range(8))
    assert_reads_like_qemu(path)


def test_huge_sparse_image_opens_and_maps_quickly(tmp_path):
    path = str(tmp_path / "huge.qcow2")
    run("qemu-img", "create", "-f", "qcow2", path, "4T")
    qemu_io(path, "write -P 0x33 3T 64k")
    started = time.perf_counter()
    cache = TableCache()
    with Qcow2Image(path, cache=cache) as image:
        assert list(image.data_extents(0, image.size_bytes)) == [(3 << 40, 64 << 10)]
        buffer = bytearray(128 << 10)
        image.read_into((3 << 40) - (32 << 10), memoryview(buffer))
    assert buffer == bytes(32 << 10) + b"\x33" * (64 << 10) + bytes(32 << 10)
    assert cache.bytes <= cache.budget
    assert time.perf_counter() - started < 2


def test_table_cache_stays_within_its_budget(source, tmp_path):
    path = str(tmp_path / "small-clusters.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", "-o", "cluster_size=512", source, path)
    cache = TableCache(budget=2048)  # four 512-byte L2 tables of the ~130 the image has
    with Qcow2Image(path, cache=cache) as image:
        data = read_all(image)
        assert cache.bytes <= 2048
    with open(to_raw(path), "rb") as handle:
        assert data == handle.read()


def test_parallel_digests_match_raw(tmp_path):
    """Enough data for digest_image to fan out to workers that each open the qcow2 themselves."""
    raw = str(tmp_path / "big.raw")
    rng = np.random.default_rng(3)
    with open(raw, "wb") as handle:
        handle.truncate(40 * MIB)
        handle.write(rng.integers(0, 256, 10 * MIB, dtype=np.uint8).tobytes())
        handle.seek(25 * MIB)
        handle.write(rng.integers(0, 256, 10 * MIB, dtype=np.uint8).tobytes())
    path = str(tmp_path / "big.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", raw, path)
    ours = digest_image(path, 4096, workers=2)
    theirs = digest_image(raw, 4096, workers=1)
    assert np.array_equal(ours.digests, theirs.digests) and np.array_equal(ours.zero, theirs.zero)


def test_size_that_is_not_a_multiple_of_the_sector_ends_at_the_last_whole_sector_as_in_qemu(source, tmp_path):
    path = str(tmp_path / "odd.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", source, path)
    odd_size = SOURCE_SIZE - 100
    patch(path, 24, ">Q", odd_size)
    whole_sectors = odd_size - odd_size % 512  # QEMU's disk: what `qemu-img convert -O raw` writes
    with open(source, "rb") as handle:
        expected = handle.read(whole_sectors)
    trimmed = str(tmp_path / "odd.raw")
    with open(trimmed, "wb") as handle:
        handle.write(expected)
    with Qcow2Image(path) as image:
        assert image.size_bytes == whole_sectors and read_all(image) == expected
    ours, theirs = digest_image(path, 512, workers=1), digest_image(trimmed, 512, workers=1)
    assert np.array_equal(ours.digests, theirs.digests) and ours.size_bytes == theirs.size_bytes


# --- backing files ---------------------------------------------------------------------------------

def make_top(tmp_path, base: str, base_format: str, size: str | None = None, options: str = "") -> str:
    top = str(tmp_path / "top.qcow2")
    args = ["qemu-img", "create", "-f", "qcow2", "-b", os.path.basename(base), "-F", base_format]
    if options:
        args += ["-o", options]
    run(*args, top, *([size] if size else []))
    return top


OVERLAY_WRITES = [
    "write -P 0xab 64k 64k",  # a whole cluster over backing data
    "write -P 0xcd 1M 4k",  # a partial cluster: qemu copies the rest from the backing file
    "write -z 3M 128k",  # zeros that must hide the backing data under them
    "discard 3200k 64k",
    "write -P 0xef 3800k 8k",
]


@pytest.mark.parametrize("base_format", ["qcow2", "raw"])
@pytest.mark.parametrize("options", ["", "extended_l2=on", "compat=0.10", "cluster_size=4096"])
def test_overlay_over_backing_file_reads_like_qemu(source, tmp_path, base_format, options):
    base = str(tmp_path / f"base.{base_format}")
    run("qemu-img", "convert", "-O", base_format, source, base)
    top = make_top(tmp_path, base, base_format, options=options)
    qemu_io(top, *OVERLAY_WRITES)
    with Qcow2Image(top) as image:
        assert isinstance(image.backing, Qcow2Image if base_format == "qcow2" else RawImage)
    assert_reads_like_qemu(top)


def test_extended_l2_subclusters_fall_through_to_the_backing_file(source, tmp_path):
    base = str(tmp_path / "base.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", source, base)
    top = make_top(tmp_path, base, "qcow2", options="extended_l2=on,cluster_size=64k")
    qemu_io(top, "write -P 0x5a 2k 2k", "write -z 6k 2k", "write -P 0x5b 3M 2k")
    with Qcow2Image(top) as image:
        assert image.extended_l2
    assert_reads_like_qemu(top)


@pytest.mark.parametrize("top_size", ["2M", "8M"], ids=["backing-larger", "backing-smaller"])
def test_backing_file_of_another_size(source, tmp_path, top_size):
    base = str(tmp_path / "base.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", source, base)
    top = make_top(tmp_path, base, "qcow2", size=top_size)
    qemu_io(top, "write -P 0x77 1536k 8k")
    assert_reads_like_qemu(top)


def test_chain_of_three_with_relative_names_opens_from_another_directory(source, tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    run("qemu-img", "convert", "-O", "qcow2", source, str(images / "base.qcow2"))
    run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(images / "mid.qcow2"))
    qemu_io(str(images / "mid.qcow2"), "write -P 0x01 0 256k", "write -z 3M 512k")
    run("qemu-img", "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(images / "top.qcow2"))
    qemu_io(str(images / "top.qcow2"), "write -P 0x02 128k 64k", "write -P 0x03 3200k 4k")
    monkeypatch.chdir(tmp_path)
    with Qcow2Image("images/top.qcow2") as image:
        assert isinstance(image.backing, Qcow2Image) and isinstance(image.backing.backing, Qcow2Image)
    assert_reads_like_qemu("images/top.qcow2")


def forget_backing_format(path: str) -> None:
    """Turn the backing format extension into an unknown one, as in images from before it existed."""
    with open(path, "r+b") as handle:
        position = handle.read(4096).index(struct.pack(">I", 0xE2792ACA))
        handle.seek(position)
        handle.write(struct.pack(">I", 0x12345678))


@pytest.mark.parametrize("base_format", ["qcow2", "raw"])
def test_backing_format_is_detected_when_the_header_does_not_name_it(source, tmp_path, base_format):
    base = str(tmp_path / f"base.{base_format}")
    run("qemu-img", "convert", "-O", base_format, source, base)
    top = make_top(tmp_path, base, base_format)
    qemu_io(top, "write -P 0x44 0 64k")
    forget_backing_format(top)
    with Qcow2Image(top) as image:
        assert image.backing_format is None
        assert isinstance(image.backing, Qcow2Image if base_format == "qcow2" else RawImage)
    assert_reads_like_qemu(top)


@pytest.mark.parametrize("base_format", ["vmdk", "vdi", "vpc", "vhdx", "qed"])
def test_backing_file_of_another_format_is_not_read_as_raw(tmp_path, base_format):
    base = str(tmp_path / f"base.{base_format}")
    run("qemu-img", "create", "-f", base_format, base, "1M")
    top = make_top(tmp_path, base, base_format)
    forget_backing_format(top)
    with pytest.raises(ImageError, match=f"unsupported format '{base_format}'"):
        Qcow2Image(top)


# --- refusals ---------------------------------------------------------------------------------------

def patch(path: str, offset: int, fmt: str, *values) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(struct.pack(fmt, *values))


def header_field(path: str, offset: int, fmt: str) -> int:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return struct.unpack(fmt, handle.read(struct.calcsize(fmt)))[0]


@pytest.fixture
def small_image(tmp_path) -> str:
    """A v3 qcow2 of 2 MiB (header_length 112) with its first four clusters allocated, in a row."""
    path = str(tmp_path / "small.qcow2")
    run("qemu-img", "create", "-f", "qcow2", path, "2M")
    qemu_io(path, "write -P 0x61 0 256k")
    return path


HEADER_DAMAGE = [  # (id, offset, struct format, values, message)
    ("bad-magic", 0, ">4s", (b"QFI\x00",), "bad magic"),
    ("qcow-v1", 4, ">I", (1,), "version 1"),
    ("version-4", 4, ">I", (4,), "unsupported qcow2 version 4"),
    ("cluster-bits-8", 20, ">I", (8,), "cluster_bits 8"),
    ("cluster-bits-22", 20, ">I", (22,), "cluster_bits 22"),
    ("aes", 32, ">I", (1,), r"encrypted \(AES\)"),
    ("luks", 32, ">I", (2,), r"encrypted \(LUKS\)"),
    ("absurd-size", 24, ">Q", (1 << 62,), "too large"),
    ("l1-too-small", 36, ">I", (0,), "L1 table of 0 entries is too small"),
    ("l1-over-32-mib", 36, ">I", (5 << 20,), "L1 table of 5242880 entries exceeds 32 MiB"),
    ("l1-past-end", 40, ">Q", (1 << 40,), "L1 table .* past the end"),
    ("l1-misaligned", 40, ">Q", (0x30200,), "L1 table .* misaligned"),
    ("corrupt-bit", 72, ">Q", (1 << 1,), "marked corrupt"),
    ("external-data-file", 72, ">Q", (1 << 2,), "external data file"),
    ("unknown-incompatible-bit", 72, ">Q", (1 << 5,), "unsupported incompatible features: bit 5"),
    ("compression-bit-without-type", 72, ">Q", (1 << 3,), "disagree"),
    ("compression-type-without-bit", 104, ">B", (1,), "disagree"),
    ("unknown-compression-type", 72, ">Q", (1 << 3,), "unknown compression type 7"),
    ("refcount-order", 96, ">I", (7,), "refcount_order 7"),
    ("header-length", 100, ">I", (100,), "header_length 100"),
    ("backing-name-too-long", 8, ">QI", (512, 2000), "too long"),
    ("backing-name-outside-cluster", 8, ">QI", (65530, 100), "outside the first cluster"),
]


@pytest.mark.parametrize(("offset", "fmt", "values", "message"), [d[1:] for d in HEADER_DAMAGE],
                         ids=[d[0] for d in HEADER_DAMAGE])
def test_damaged_or_unsupported_header_is_refused(small_image, offset, fmt, values, message):
    patch(small_image, offset, fmt, *values)
    if "compression type 7" in message:
        patch(small_image, 104, ">B", 7)
    with pytest.raises(ImageError, match=message) as raised:
        Qcow2Image(small_image)
    assert small_image in str(raised.value) and "\n" not in str(raised.value)


def test_unknown_feature_is_named_from_the_feature_table(small_image):
    with open(small_image, "rb") as handle:
        head = handle.read(4096)
    table = head.index(struct.pack(">I", 0x6803F857)) + 8
    patch(small_image, table, ">BB46s", 0, 9, b"frobnication")
    patch(small_image, 72, ">Q", 1 << 9)
    with pytest.raises(ImageError, match=r"bit 9 \(frobnication\)"):
        Qcow2Image(small_image)


def test_file_too_short_is_refused(small_image):
    os.truncate(small_image, 40)
    with pytest.raises(ImageError, match="too short"):
        Qcow2Image(small_image)


def first_l2(path: str) -> tuple[int, int]:
    """File offsets of L1 entry 0 and of the L2 table it points to."""
    l1 = header_field(path, 40, ">Q")
    return l1, header_field(path, l1, ">Q") & OFFSET_MASK


def read_everything(path: str) -> None:
    with Qcow2Image(path) as image:
        list(image.data_extents(0, image.size_bytes))
        read_all(image)


def digest_everything(path: str) -> None:
    digest_image(path, 512, workers=1)


def damage_l1_past_end(path):
    l1, _ = first_l2(path)
    patch(path, l1, ">Q", (1 << 63) | (1 << 40))


def damage_l1_misaligned(path):
    l1, l2 = first_l2(path)
    patch(path, l1, ">Q", (1 << 63) | (l2 + 512))


def damage_l2_past_end(path):
    _, l2 = first_l2(path)
    patch(path, l2, ">Q", (1 << 63) | (1 << 40))


def damage_l2_misaligned(path):
    _, l2 = first_l2(path)
    patch(path, l2, ">Q", (1 << 63) | (header_field(path, l2, ">Q") & OFFSET_MASK) + 512)


def damage_truncated(path):
    _, l2 = first_l2(path)
    data = header_field(path, l2, ">Q") & OFFSET_MASK
    os.truncate(path, data + 4096)


def damage_truncated_after_a_cluster(path):
    _, l2 = first_l2(path)
    data = header_field(path, l2, ">Q") & OFFSET_MASK
    os.truncate(path, data + 65536)


MAPPING_DAMAGE = [
    (damage_l1_past_end, "L2 table at offset .* past the end"),
    (damage_l1_misaligned, "L2 table offset .* not cluster aligned"),
    (damage_l2_past_end, "data cluster at host offset .* past the end"),
    (damage_l2_misaligned, "not cluster aligned"),
    (damage_truncated, "past the end of the file"),
    (damage_truncated_after_a_cluster, "past the end of the file"),
]


@pytest.mark.parametrize(("damage", "message"), MAPPING_DAMAGE, ids=[d[0].__name__ for d in MAPPING_DAMAGE])
@pytest.mark.parametrize("reader", [read_everything, digest_everything])
def test_mapping_that_points_outside_the_file_is_refused(small_image, damage, message, reader):
    damage(small_image)
    with pytest.raises(ImageError, match=message) as raised:
        reader(small_image)
    assert small_image in str(raised.value)


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_garbled_compressed_cluster_is_refused(tmp_path, compression):
    raw = str(tmp_path / "data.raw")
    with open(raw, "wb") as handle:
        handle.write(os.urandom(64 << 10) + b"blocksketch" * 6000)
    path = str(tmp_path / "c.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", "-c", "-o", f"compression_type={compression}", raw, path)
    _, l2 = first_l2(path)
    entry = header_field(path, l2 + 8, ">Q")  # the second cluster compresses well
    assert entry & (1 << 62)
    host = entry & ((1 << (62 - 8)) - 1)
    patch(path, host, ">16s", b"\xff" * 16)
    with pytest.raises(ImageError, match="compressed cluster at host offset .* (does not decompress|decompresses)"):
        read_everything(path)


def test_compressed_cluster_past_the_end_is_refused(tmp_path):
    raw = str(tmp_path / "data.raw")
    with open(raw, "wb") as handle:
        handle.write(b"blocksketch" * 6000)
    path = str(tmp_path / "c.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", "-c", raw, path)
    _, l2 = first_l2(path)
    patch(path, l2, ">Q", (1 << 62) | (1 << 40))
    with pytest.raises(ImageError, match="compressed cluster at host offset .* past the end"):
        read_everything(path)


def test_subcluster_both_allocated_and_zero_is_refused(tmp_path):
    path = str(tmp_path / "e.qcow2")
    run("qemu-img", "create", "-f", "qcow2", "-o", "extended_l2=on", path, "2M")
    qemu_io(path, "write -P 0x61 0 4k")
    _, l2 = first_l2(path)
    patch(path, l2 + 8, ">Q", (1 << 32) | 1)
    with pytest.raises(ImageError, match="corrupt extended L2 entry"):
        read_everything(path)


def test_missing_backing_file_is_refused(source, tmp_path):
    base = str(tmp_path / "base.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", source, base)
    top = make_top(tmp_path, base, "qcow2")
    os.remove(base)
    with pytest.raises(ImageError, match="backing file .*base.qcow2 is missing") as raised:
        Qcow2Image(top)
    assert top in str(raised.value)


def test_backing_chain_loop_is_refused(tmp_path):
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")
    run("qemu-img", "create", "-f", "qcow2", a, "1M")
    run("qemu-img", "create", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", b, "1M")
    run("qemu-img", "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
    with pytest.raises(ImageError, match="backing chain loops back to"):
        Qcow2Image(b)


def test_image_that_is_its_own_backing_file_is_refused(tmp_path):
    a = str(tmp_path / "a.qcow2")
    run("qemu-img", "create", "-f", "qcow2", a, "1M")
    run("qemu-img", "rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", a)
    with pytest.raises(ImageError, match="loops back"):
        Qcow2Image(a)


def test_backing_chain_deeper_than_the_limit_is_refused(tmp_path):
    run("qemu-img", "create", "-f", "qcow2", str(tmp_path / "c0.qcow2"), "1M")
    for level in range(1, MAX_CHAIN_DEPTH + 1):
        run("qemu-img", "create", "-f", "qcow2", "-u", "-b", f"c{level - 1}.qcow2", "-F", "qcow2",
            str(tmp_path / f"c{level}.qcow2"), "1M")
    with Qcow2Image(str(tmp_path / f"c{MAX_CHAIN_DEPTH - 1}.qcow2")) as image:  # exactly the limit
        assert image.size_bytes == MIB
    with pytest.raises(ImageError, match=f"deeper than {MAX_CHAIN_DEPTH}"):
        Qcow2Image(str(tmp_path / f"c{MAX_CHAIN_DEPTH}.qcow2"))


@pytest.mark.parametrize(("name", "fmt", "message"), [
    ('json:{"driver":"file","filename":"x"}', "raw", "not a local file"),
    ("nbd://localhost/export", "raw", "not a local file"),
    ("base.vmdk", "vmdk", "unsupported format 'vmdk'"),
])
def test_unsupported_backing_file_is_refused(tmp_path, name, fmt, message):
    top = str(tmp_path / "top.qcow2")
    run("qemu-img", "create", "-f", "qcow2", top, "1M")
    (tmp_path / "base.vmdk").write_bytes(b"KDMV" + bytes(1020))
    run("qemu-img", "rebase", "-u", "-b", name, "-F", fmt, top)
    with pytest.raises(ImageError, match=message):
        Qcow2Image(top)


# --- hostile tables (issue 13): work follows the clusters the file holds, not what its tables repeat ---------

def repeat_first_cluster(path: str, l1_entries: int | None = None) -> int:
    """Point every L2 entry of the first table at its first host cluster, and every L1 entry (of the
    first ``l1_entries``) at that table; return the host offset every guest cluster now reads."""
    l1, l2 = first_l2(path)
    entry = header_field(path, l2, ">Q")
    cluster_size = 1 << header_field(path, 20, ">I")
    patch(path, l2, f">{cluster_size // 8}Q", *[entry] * (cluster_size // 8))
    if l1_entries:
        patch(path, l1, f">{l1_entries}Q", *[header_field(path, l1, ">Q")] * l1_entries)
    return entry & OFFSET_MASK


def bounded_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """The CLI in a child limited to 512 MiB of address space."""
    import resource
    import sys

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))

    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit, env={**os.environ, "MALLOC_ARENA_MAX": "2"})


def test_a_small_qcow2_mapping_one_host_cluster_over_16_gib_is_refused_before_hashing(tmp_path):
    path = str(tmp_path / "repeat.qcow2")
    run("qemu-img", "create", "-f", "qcow2", path, "16G")
    qemu_io(path, "write -P 0x61 0 64k")
    host = repeat_first_cluster(path, l1_entries=32)
    # The attack: a 384 KiB file whose every guest cluster (16 GiB of them) reads one host cluster.
    assert os.path.getsize(path) < 400 << 10 and host < os.path.getsize(path)
    qemu_io(path, "read -P 0x61 0 64k", "read -P 0x61 8G 64k", f"read -P 0x61 {(16 << 30) - (64 << 10)} 64k")
    target = tmp_path / "t.img"
    target.write_bytes(bytes(4096))
    started = time.monotonic()
    done = bounded_cli("compare", path, str(target), "--block-size", "4096")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "corrupt tables" in done.stderr and path in done.stderr
    assert time.monotonic() - started < 20  # hashing 16 GiB took minutes


def test_data_clusters_mapped_more_often_than_the_file_holds_are_refused(tmp_path):
    path = str(tmp_path / "repeat.qcow2")
    run("qemu-img", "create", "-f", "qcow2", path, "512M")
    qemu_io(path, "write -P 0x62 0 64k")
    repeat_first_cluster(path)  # 8192 guest clusters on one host cluster, one L2 table
    qemu_io(path, "read -P 0x62 256M 64k")
    with pytest.raises(ImageError, match="map more data clusters than the .* file holds"):
        digest_image(path, 4096, workers=1)
    done = bounded_cli("compare", path, path, "--block-size", "4096")
    assert done.returncode == 1 and "map more data clusters" in done.stderr and done.stderr.count("\n") == 1


def test_two_l1_entries_sharing_one_l2_table_are_refused(tmp_path):
    path = str(tmp_path / "shared.qcow2")
    run("qemu-img", "create", "-f", "qcow2", path, "2G")
    qemu_io(path, "write -P 0x63 0 64k")
    l1, _ = first_l2(path)
    patch(path, l1 + 8, ">Q", header_field(path, l1, ">Q"))  # guest 512M..1G reads the first table again
    qemu_io(path, "read -P 0x63 512M 64k")
    with pytest.raises(ImageError, match="L1 entries 0 and 1 share the L2 table"):
        digest_image(path, 4096, workers=1)


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_one_compressed_cluster_mapped_many_times_is_refused(tmp_path, compression):
    raw = tmp_path / "data.raw"
    raw.write_bytes(b"blocksketch " * (64 << 10))  # 768 KiB: twelve compressible clusters
    path = str(tmp_path / "c.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", "-c", "-o", f"compression_type={compression}", str(raw), path)
    _, l2 = first_l2(path)
    entry = header_field(path, l2, ">Q")
    assert entry & (1 << 62)
    patch(path, l2, ">12Q", *[entry] * 12)
    with pytest.raises(ImageError, match="compressed cluster at host offset .* is mapped more than once"):
        digest_image(path, 512, workers=1)


@pytest.mark.parametrize("options", ["", "extended_l2=on,cluster_size=128k", "compression_type=zstd"])
def test_legit_images_pass_the_allocation_checks_and_read_like_qemu(source, tmp_path, options):
    path = str(tmp_path / "legit.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", "-c", *(["-o", options] if options else []), source, path)
    assert_reads_like_qemu(path)
    digest_everything(path)


HEADER_FIELDS = [  # (name, offset, bytes): every header field an attacker controls, read or not
    ("version", 4, 4), ("backing_file_offset", 8, 8), ("backing_file_size", 16, 4), ("cluster_bits", 20, 4),
    ("size", 24, 8), ("crypt_method", 32, 4), ("l1_size", 36, 4), ("l1_table_offset", 40, 8),
    ("refcount_table_offset", 48, 8), ("refcount_table_clusters", 56, 4), ("nb_snapshots", 60, 4),
    ("snapshots_offset", 64, 8), ("incompatible_features", 72, 8), ("compatible_features", 80, 8),
    ("autoclear_features", 88, 8), ("refcount_order", 96, 4), ("header_length", 100, 4),
]


@pytest.mark.parametrize(("offset", "width"), [f[1:] for f in HEADER_FIELDS], ids=[f[0] for f in HEADER_FIELDS])
def test_extreme_header_integers_are_read_or_refused_never_a_crash(small_image, tmp_path, offset, width):
    top = (1 << (8 * width)) - 1
    for value in (0, 1, top, top - 1, 1 << (8 * width - 1), (1 << (8 * width - 1)) - 1, 1 << 40 if width == 8 else 7):
        path = str(tmp_path / f"{offset}-{value}.qcow2")
        shutil.copy(small_image, path)
        patch(path, offset, ">Q" if width == 8 else ">I", value)
        try:
            with Qcow2Image(path) as image:
                list(image.data_extents(0, image.size_bytes))
            digest_image(path, 512, workers=1)
        except ImageError as refused:
            assert path in str(refused) and "\n" not in str(refused)
