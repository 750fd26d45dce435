"""Block maps cut into chunks and rebuilt: exact round trips, and every kind of damage detected."""

from __future__ import annotations

import numpy as np
import pytest

from sketch.blockmap import BlockMap
from sketch.digests import ImageDigests
from sketch.errors import FormatError
from sketch.sample import random_blocks
from store.chunks import HEADER, chunk_count, decode_chunks, encode_chunks


def _block_map(blocks: int, seed: int = 1) -> BlockMap:
    rng = np.random.default_rng(seed)
    digests = random_blocks(rng, blocks, 16)  # stand-ins for MD5 digests: uniform bytes
    digests[1::5] = digests[2]  # repeats
    zero = np.zeros(blocks, dtype=bool)
    zero[::7] = True
    return BlockMap.from_digests(ImageDigests("x", blocks * 512, 512, "md5", digests, zero))


def _decode(chunks, block_map: BlockMap) -> BlockMap:
    return decode_chunks(chunks, 512, block_map.total_blocks, block_map.zero_blocks, len(block_map.keys), "test")


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 64, 1 << 21])
def test_chunks_round_trip_exactly(rows_per_chunk):
    block_map = _block_map(300)
    chunks = list(encode_chunks(block_map, rows_per_chunk))
    assert len(chunks) == chunk_count(len(block_map.keys), rows_per_chunk)
    back = _decode(chunks, block_map)
    assert np.array_equal(back.keys, block_map.keys)
    assert np.array_equal(back.counts, block_map.counts)
    assert np.array_equal(back.first, block_map.first)
    assert (back.total_blocks, back.zero_blocks) == (block_map.total_blocks, block_map.zero_blocks)


def test_empty_map_is_one_chunk_of_header_only():
    empty = BlockMap(512, 10, 10, np.zeros((0, 2), np.uint64), np.zeros(0, np.uint32), np.zeros(0, np.uint64))
    chunks = list(encode_chunks(empty))
    assert [len(c) for c in chunks] == [HEADER.size]
    assert len(_decode(chunks, empty).keys) == 0


def _flip(data: bytes, offset: int) -> bytes:
    changed = bytearray(data)
    changed[offset] ^= 0x40
    return bytes(changed)


@pytest.mark.parametrize("damage, message", [
    (lambda c: [_flip(c[0], 0)] + c[1:], "bad magic"),
    (lambda c: [_flip(c[0], 4)] + c[1:], "unknown version"),
    (lambda c: [_flip(c[0], HEADER.size + 3)] + c[1:], "checksum"),
    (lambda c: [c[0][:-1]] + c[1:], "checksum"),
    (lambda c: [c[0][:10]] + c[1:], "truncated"),
    (lambda c: [None] + c[1:], "missing"),
    (lambda c: c[:-1], "holds"),
    (lambda c: [c[1], c[0]] + c[2:], "size or checksum"),
])
def test_damaged_chunks_raise_format_error(damage, message):
    block_map = _block_map(200)
    chunks = list(encode_chunks(block_map, 50))
    with pytest.raises(FormatError, match=message):
        _decode(damage(chunks), block_map)
