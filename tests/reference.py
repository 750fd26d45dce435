"""Plain, obviously-correct reference implementations the fast code is checked against."""

from __future__ import annotations

import hashlib


def blocks_of(data: bytes, block_size: int) -> list[bytes]:
    """The image's blocks, the last one zero-padded."""
    out = []
    for offset in range(0, len(data), block_size):
        block = data[offset : offset + block_size]
        out.append(block + bytes(block_size - len(block)))
    return out


def reference_metrics(source: bytes, targets: list[bytes], block_size: int) -> dict:
    """The paper's metrics, by sets of block contents (no hashing shortcuts)."""
    zero = bytes(block_size)
    src = blocks_of(source, block_size)
    target_contents = set()
    for target in targets:
        target_contents.update(blocks_of(target, block_size))
    distinct = set(src)
    return {
        "total_blocks": len(src),
        "zero_blocks": sum(1 for b in src if b == zero),
        "unique_blocks": len(distinct),
        "shared_blocks": sum(1 for b in src if b in target_contents),
        "shared_unique_blocks": sum(1 for b in distinct if b in target_contents),
        "send_blocks": sum(1 for b in distinct if b != zero and b not in target_contents),
    }


def reference_digests(data: bytes, block_size: int) -> list[bytes]:
    return [hashlib.md5(b).digest() for b in blocks_of(data, block_size)]
