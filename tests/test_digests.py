import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from sketch.blocks import RawImage, check_block_size
from sketch.digests import digest_image, zero_block_digest
from sketch.errors import ImageError, UsageError
from tests.reference import reference_digests

try:
    from sketch import _blockhash
except ImportError:  # built without a C compiler
    _blockhash = None


def random_data(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("block_size", [512, 4096, 65536])
@pytest.mark.parametrize("tail", [0, 1, 511])
def test_digests_match_per_block_md5_with_zero_padded_tail(tmp_path, block_size, tail):
    data = random_data(5 * block_size) + bytes(2 * block_size) + random_data(block_size + tail, 1)
    path = tmp_path / "img"
    path.write_bytes(data)
    result = digest_image(str(path), block_size)
    expected = reference_digests(data, block_size)
    assert result.digests.shape == (len(expected), 16)
    assert [bytes(row) for row in result.digests] == expected
    assert result.zero.tolist() == [d == zero_block_digest(block_size) for d in expected]


def test_parallel_digest_equals_single_process(tmp_path):
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (150_000, 512), dtype=np.uint8)
    blocks[rng.random(150_000) < 0.3] = 0
    path = tmp_path / "big.img"
    path.write_bytes(blocks.tobytes())
    parallel = digest_image(str(path), 512, workers=2)
    serial = digest_image(str(path), 512, workers=1)
    assert np.array_equal(parallel.digests, serial.digests)
    assert np.array_equal(parallel.zero, serial.zero)
    assert parallel.zero_blocks == int((~blocks.any(axis=1)).sum())


def test_holes_of_sparse_files_are_not_read(tmp_path):
    path = tmp_path / "sparse.img"
    with open(path, "wb") as handle:
        handle.truncate(8 << 30)
        handle.seek(3 << 30)
        handle.write(random_data(1 << 20))
    with RawImage(str(path)) as image:
        extents = list(image.data_extents(0, image.size_bytes))
    assert sum(length for _, length in extents) < 64 << 20  # the file system may round up
    result = digest_image(str(path), 4096)
    assert result.total_blocks == (8 << 30) // 4096
    assert result.total_blocks - result.zero_blocks == 256


def test_peak_memory_stays_bounded_on_a_large_sparse_image(tmp_path):
    # 4 GiB image, 256 MiB of data: resident memory must not grow with the image.
    path = tmp_path / "large.img"
    with open(path, "wb") as handle:
        handle.truncate(4 << 30)
        chunk = random_data(16 << 20)
        for index in range(16):
            handle.seek(index * (256 << 20))
            handle.write(chunk)
    code = (
        "import resource, sys; from sketch.digests import digest_image;"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024;"
        f"r = digest_image({str(path)!r}, 4096);"
        "digest_mb = (r.digests.nbytes + r.zero.nbytes) / 2**20;"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024;"
        "print(peak - base - digest_mb)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    beyond_digests = float(out.stdout)
    assert beyond_digests < 100, f"{beyond_digests:.0f} MiB beyond the digest array"  # read chunks, pool


@pytest.mark.parametrize("bad", [0, 100, 1000, 256, 131072, 3 * 512])
def test_block_size_must_be_a_power_of_two_in_range(bad):
    with pytest.raises(UsageError):
        check_block_size(bad)


def test_missing_empty_and_directory_images_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        digest_image(str(empty))
    with pytest.raises(ImageError, match="no such image"):
        digest_image(str(tmp_path / "missing.img"))
    with pytest.raises(UsageError, match="directory"):
        digest_image(str(tmp_path))


def test_unreadable_image_is_a_clear_error(tmp_path):
    path = tmp_path / "locked.img"
    path.write_bytes(b"x" * 512)
    os.chmod(path, 0)
    if os.access(path, os.R_OK):  # root reads anything: use a path it cannot open instead
        path = "/proc/1/mem"
    with pytest.raises(ImageError):
        digest_image(str(path))


def test_the_hashlib_fallback_gives_the_same_digests(tmp_path, monkeypatch):
    """Without the C extension (no compiler at install), digests come from hashlib in processes."""
    import sketch.digests as digests_module

    rng = np.random.default_rng(9)
    blocks = rng.integers(0, 256, (80_000, 512), dtype=np.uint8)  # two 32 MiB tasks: the process pool runs
    blocks[rng.random(80_000) < 0.3] = 0
    path = tmp_path / "img"
    path.write_bytes(blocks.tobytes() + b"\x05" * 100)
    accelerated = digest_image(str(path), 512, workers=2)
    monkeypatch.setattr(digests_module, "_blockhash", None)
    monkeypatch.setattr(digests_module, "_pool", None)
    for workers in (1, 2):
        fallback = digest_image(str(path), 512, workers=workers)
        assert np.array_equal(fallback.digests, accelerated.digests)
        assert np.array_equal(fallback.zero, accelerated.zero)
    assert digests_module._pool is not None  # the two-worker run went through the process pool


# Only the implementations this CPU runs get tests: the others cannot apply here, and a skip fails CI.
IMPLEMENTATIONS = [name for name in ("scalar2", "avx2", "avx512") if _blockhash is None or name in _blockhash.AVAILABLE]


def require_extension() -> None:
    if _blockhash is None:
        pytest.skip("the C extension is not built (pip install needs a C compiler and the Python headers)")


# Zeros here make the non-zero count of the 1..40-block prefixes take every residue mod 8, 16, 32.
ZERO_POSITIONS = (0, 3, 9, 10, 17, 26, 33)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("block_size", [512, 4096, 65536])
def test_every_md5_implementation_equals_hashlib_on_every_chunk_length(implementation, block_size):
    require_extension()
    blocks = np.random.default_rng(block_size).integers(0, 256, (40, block_size), dtype=np.uint8)
    blocks[list(ZERO_POSITIONS)] = 0
    blocks[20] = 0
    blocks[20, -1] = 1  # non-zero only in its last byte
    expected = [hashlib.md5(block.tobytes()).digest() for block in blocks]
    untouched = bytes([0xAB] * 16)
    for count in range(1, 41):
        digests = np.full((count, 16), 0xAB, dtype=np.uint8)
        zero = np.zeros(count, dtype=np.uint8)
        nonzero = _blockhash.md5_blocks(blocks[:count].tobytes(), block_size, digests, zero, implementation)
        flags = [i in ZERO_POSITIONS for i in range(count)]
        assert zero.tolist() == flags
        assert nonzero == count - sum(flags)
        assert [bytes(row) for row in digests] == [untouched if flag else expected[i] for i, flag in enumerate(flags)]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_blocksketch_md5_environment_variable_selects_the_implementation(implementation):
    require_extension()
    code = (
        "import hashlib, os; from sketch import _blockhash as b;"
        "data = os.urandom(100 * 512); digests = bytearray(1600); zero = bytearray(100);"
        "b.md5_blocks(data, 512, digests, zero);"
        "assert bytes(digests) == b''.join(hashlib.md5(data[o : o + 512]).digest() for o in range(0, len(data), 512));"
        "print(b.IMPLEMENTATION)"
    )
    env = dict(os.environ, BLOCKSKETCH_MD5=implementation)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == implementation


def test_an_unknown_blocksketch_md5_value_is_a_clear_error():
    require_extension()
    env = dict(os.environ, BLOCKSKETCH_MD5="sse9")
    out = subprocess.run([sys.executable, "-c", "import sketch._blockhash"], capture_output=True, text=True, env=env)
    assert out.returncode != 0
    assert "BLOCKSKETCH_MD5=sse9: use scalar2, avx2 or avx512" in out.stderr
    with pytest.raises(ValueError, match="not available"):
        _blockhash.md5_blocks(bytes(512), 512, bytearray(16), bytearray(1), "sse9")
