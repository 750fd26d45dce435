"""Byte layout of block maps in Redis: a sorted map cut into chunks of at most ~56 MiB each.

A Redis string holds at most 512 MiB and a large value stalls the single-threaded server while it
moves, so a block map of ``u`` distinct digests is stored as ``ceil(u / ROWS_PER_CHUNK)`` strings
(at least one), rows in key order. Chunk ``c`` holds rows ``[c * ROWS_PER_CHUNK, ...)``.

Chunk version 1, all integers little-endian:

====== ======= ==============================================================
offset size    field
====== ======= ==============================================================
0      4       magic ``b"BSMC"`` (blocksketch map chunk)
4      2       version, ``1``
6      2       flags, ``0`` (reserved)
8      4       ``rows`` in this chunk
12     4       chunk index ``c``
16     4       CRC-32 (zlib) of the payload below
20     4       reserved, ``0``
24     16*rows digests: the 16-byte digests in bytewise order (the two halves of each
               :func:`sketch.blockmap.digest_keys` key, big-endian)
...    4*rows  ``counts``: uint32 occurrences of the digest in the image
...    8*rows  ``first``: uint64 index of the first block holding the digest
====== ======= ==============================================================

The image-level fields (block size, total and zero block counts, number of chunks and rows) live in
the image's catalogue entry (:mod:`store.catalogue`).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

import numpy as np

from sketch.blockmap import KEY_DTYPE, BlockMap, digest_keys, key_digests
from sketch.errors import FormatError

MAGIC = b"BSMC"
VERSION = 1
HEADER = struct.Struct("<4sHHIIII")
ROW_BYTES = 16 + 4 + 8
# 2 Mi rows = 56 MiB + 24 bytes: well under the 512 MiB string limit, and a GET of one chunk
# stalls the server for tens of milliseconds, not seconds.
ROWS_PER_CHUNK = 1 << 21


def chunk_count(rows: int, rows_per_chunk: int | None = None) -> int:
    """Chunks used for a map of ``rows`` distinct digests (an empty map still has one chunk)."""
    return max(1, -(-rows // (rows_per_chunk or ROWS_PER_CHUNK)))


def encode_chunks(block_map: BlockMap, rows_per_chunk: int | None = None) -> Iterator[bytes]:
    """Yield the chunks of ``block_map``, one at a time, so a caller can stream them out."""
    rows_per_chunk = rows_per_chunk or ROWS_PER_CHUNK
    rows = len(block_map.keys)
    for index in range(chunk_count(rows, rows_per_chunk)):
        part = slice(index * rows_per_chunk, min(rows, (index + 1) * rows_per_chunk))
        payload = b"".join((
            key_digests(block_map.keys[part]).tobytes(),
            np.ascontiguousarray(block_map.counts[part], dtype="<u4").tobytes(),
            np.ascontiguousarray(block_map.first[part], dtype="<u8").tobytes(),
        ))
        count = len(payload) // ROW_BYTES
        yield HEADER.pack(MAGIC, VERSION, 0, count, index, zlib.crc32(payload), 0) + payload


def decode_chunks(chunks: list[bytes | None], block_size: int, total_blocks: int, zero_blocks: int,
                  distinct: int, what: str) -> BlockMap:
    """Rebuild a block map from its chunks, checking every header, checksum and the key order."""
    keys, counts, first = [], [], []
    for index, chunk in enumerate(chunks):
        if chunk is None:
            raise FormatError(f"{what}: block map chunk {index} is missing")
        if len(chunk) < HEADER.size:
            raise FormatError(f"{what}: block map chunk {index} is truncated")
        magic, version, _flags, rows, stored_index, crc, _reserved = HEADER.unpack_from(chunk)
        if magic != MAGIC:
            raise FormatError(f"{what}: block map chunk {index} is corrupt (bad magic)")
        if version != VERSION:
            raise FormatError(f"{what}: block map chunk {index} has unknown version {version}; upgrade blocksketch")
        payload = memoryview(chunk)[HEADER.size:]
        if stored_index != index or len(payload) != rows * ROW_BYTES or zlib.crc32(payload) != crc:
            raise FormatError(f"{what}: block map chunk {index} is corrupt (size or checksum)")
        digests = np.frombuffer(payload, dtype=np.uint8, count=rows * 16).reshape(rows, 16)
        keys.append(digest_keys(digests))
        counts.append(np.frombuffer(payload, dtype="<u4", count=rows, offset=rows * 16).astype(np.uint32))
        first.append(np.frombuffer(payload, dtype="<u8", count=rows, offset=rows * 20).astype(np.uint64))
    all_keys = np.concatenate(keys) if keys else np.zeros((0, 2), dtype=KEY_DTYPE)
    if len(all_keys) != distinct:
        raise FormatError(f"{what}: block map holds {len(all_keys)} digests, its entry says {distinct}")
    if len(all_keys) > 1:
        high, low = all_keys[:-1], all_keys[1:]
        ascending = (high[:, 0] < low[:, 0]) | ((high[:, 0] == low[:, 0]) & (high[:, 1] < low[:, 1]))
        if not ascending.all():
            raise FormatError(f"{what}: block map digests are out of order")
    all_counts = np.concatenate(counts) if counts else np.zeros(0, dtype=np.uint32)
    all_first = np.concatenate(first) if first else np.zeros(0, dtype=np.uint64)
    return BlockMap(block_size, total_blocks, zero_blocks, np.ascontiguousarray(all_keys), all_counts, all_first)
