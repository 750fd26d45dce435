import hashlib
import os
import struct

import numpy as np
import pybloom_live
import pytest

from sketch.blockmap import digest_keys
from sketch.bloom import BloomFilter
from sketch.errors import BlocksketchError, UsageError
from sketch.pybloom_export import pybloom_key, pybloom_keys, to_pybloom, write_pybloom_file


def block_digests(seed: int, n: int) -> list[bytes]:
    """MD5 digests of ``n`` random 512-byte blocks, as the index computes them."""
    data = np.random.default_rng(seed).integers(0, 256, size=(n, 512), dtype=np.uint8)
    return [hashlib.md5(row.tobytes()).digest() for row in data]


def keys_of(digests: list[bytes]) -> np.ndarray:
    return digest_keys(np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 16))


def load(path) -> pybloom_live.BloomFilter:
    with open(path, "rb") as handle:
        return pybloom_live.BloomFilter.fromfile(handle)


def test_the_key_is_the_lowercase_hex_of_the_digest():
    digests = block_digests(1, 3)
    assert pybloom_keys(keys_of(digests)) == [d.hex() for d in digests]
    assert pybloom_key(digests[0]) == digests[0].hex() and len(pybloom_key(digests[0])) == 32


def test_exported_file_loads_and_answers_like_ours(tmp_path):
    fp_rate = 0.01
    # 25,000 keys fill 2**18 bits to near design load, so our FP rate too is near the target.
    members = block_digests(2, 25_000)
    keys = keys_of(members)
    path = tmp_path / "host.bloom"
    assert write_pybloom_file(keys, path, fp_rate) == len(members)
    theirs, ours = load(path), BloomFilter.from_keys(keys, fp_rate)
    assert len(theirs) == len(members)
    # Every member is in both, probed the way a third party would: hexdigest of the block's MD5.
    assert all(d.hex() in theirs for d in members)
    assert ours.contains(keys).all()
    outsiders = block_digests(3, 50_000)
    their_rate = sum(d.hex() in theirs for d in outsiders) / len(outsiders)
    our_rate = ours.contains(keys_of(outsiders)).mean()
    assert 0.5 * fp_rate < their_rate < 1.3 * fp_rate
    assert 0.5 * fp_rate < our_rate < 1.3 * fp_rate
    assert our_rate == pytest.approx(ours.false_positive_rate(), rel=0.2)


def test_file_header_is_pybloom_lives_documented_layout(tmp_path):
    path = tmp_path / "f.bloom"
    write_pybloom_file(keys_of(block_digests(4, 1000)), path, 0.001)
    raw = path.read_bytes()
    error_rate, slices, bits_per_slice, capacity, count = struct.unpack("<dQQQQ", raw[:40])
    assert (error_rate, slices, capacity, count) == (0.001, 10, 1000, 1000)
    assert len(raw) == 40 + (slices * bits_per_slice + 7) // 8
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)


def test_duplicates_are_added_once():
    digests = block_digests(5, 500)
    keys = keys_of(digests + digests[:200])
    bloom = to_pybloom(keys, 0.01)
    assert len(bloom) == bloom.capacity == 500
    assert all(d.hex() in bloom for d in digests)


def test_digest_arrays_are_accepted_like_keys():
    digests = block_digests(6, 100)
    array = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 16)
    assert to_pybloom(array, 0.01).bitarray == to_pybloom(keys_of(digests), 0.01).bitarray


def test_an_empty_export_is_a_valid_empty_filter(tmp_path):
    path = tmp_path / "empty.bloom"
    assert write_pybloom_file(np.zeros((0, 2), dtype=np.uint64), path, 0.01) == 0
    assert pybloom_key(bytes(16)) not in load(path)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.bloom"
    path.write_bytes(b"previous export")
    with pytest.raises(UsageError, match="FP rate"):
        write_pybloom_file(keys_of(block_digests(7, 10)), path, 1.5)
    target_dir = tmp_path / "a-directory"
    target_dir.mkdir()
    with pytest.raises(BlocksketchError, match="cannot write"):
        write_pybloom_file(keys_of(block_digests(7, 10)), target_dir, 0.01)
    assert path.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-directory", "out.bloom"]


def test_a_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(BlocksketchError, match="cannot write .*no such directory"):
        write_pybloom_file(keys_of(block_digests(8, 10)), tmp_path / "nowhere" / "f.bloom", 0.01)
