"""A small built-in sample fleet: synthetic images with known overlaps, for the demo and tests.

Blocks are drawn from seeded pools so that images share chosen fractions of their content,
repeat some blocks internally and carry runs of zeros, like real root file systems.
"""

from __future__ import annotations

import os

import numpy as np


def random_blocks(rng: np.random.Generator, count: int, block_size: int) -> np.ndarray:
    """``count`` random non-zero blocks as a ``(count, block_size)`` uint8 array."""
    blocks = rng.integers(0, 256, size=(count, block_size), dtype=np.uint8)
    blocks[:, 0] |= 1  # never all zeros
    return blocks


def mixed_image(rng: np.random.Generator, shared_pool: np.ndarray, share: float, total_blocks: int,
                zero_fraction: float = 0.3, dup_fraction: float = 0.1) -> np.ndarray:
    """An image of ``total_blocks`` blocks: a ``share`` of its non-zero blocks drawn from
    ``shared_pool``, the rest fresh, some repeated, ``zero_fraction`` zeros."""
    block_size = shared_pool.shape[1]
    zero_count = int(total_blocks * zero_fraction)
    data_count = total_blocks - zero_count
    from_pool = int(data_count * share)
    fresh_count = data_count - from_pool
    dup_count = int(fresh_count * dup_fraction)
    parts = [shared_pool[rng.choice(len(shared_pool), from_pool, replace=from_pool > len(shared_pool))]]
    fresh = random_blocks(rng, fresh_count - dup_count, block_size)
    parts.append(fresh)
    if dup_count and len(fresh):
        parts.append(fresh[rng.integers(0, len(fresh), dup_count)])
    data = np.concatenate(parts) if parts else np.zeros((0, block_size), np.uint8)
    image = np.zeros((total_blocks, block_size), dtype=np.uint8)
    slots = np.sort(rng.choice(total_blocks, len(data), replace=False))
    image[slots] = data[rng.permutation(len(data))]
    return image


def write_image(path: str, blocks: np.ndarray, sparse: bool = True) -> None:
    """Write blocks to ``path``, leaving holes for all-zero blocks when ``sparse``."""
    with open(path, "wb") as handle:
        handle.truncate(blocks.size)
        if not sparse:
            handle.write(blocks.tobytes())
            return
        nonzero = np.flatnonzero(blocks.any(axis=1))
        block_size = blocks.shape[1]
        if len(nonzero) == 0:
            return
        breaks = np.flatnonzero(np.diff(nonzero) != 1) + 1
        for run in np.split(nonzero, breaks):
            handle.seek(int(run[0]) * block_size)
            handle.write(blocks[run[0] : run[-1] + 1].tobytes())


SAMPLE_HOST_SHARES = {"ams-1": 0.75, "fra-2": 0.45, "lon-3": 0.15}


def write_sample_fleet(directory: str, block_size: int = 4096, blocks_per_image: int = 2048,
                       seed: int = 2010) -> dict:
    """Write a source image and, per host, two images sharing a known part of its content.

    Returns ``{"source": path, "hosts": {host: [paths]}}``. ``ams-1`` shares most.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    base = random_blocks(rng, blocks_per_image, block_size)
    source_blocks = mixed_image(rng, base, 0.9, blocks_per_image)
    source = os.path.join(directory, "source.img")
    write_image(source, source_blocks)
    source_data = source_blocks[source_blocks.any(axis=1)]
    hosts = {}
    for host, share in SAMPLE_HOST_SHARES.items():
        host_dir = os.path.join(directory, host)
        os.makedirs(host_dir, exist_ok=True)
        paths = []
        for number, part in enumerate((share * 0.7, share * 0.5)):
            path = os.path.join(host_dir, f"vm{number}.img")
            write_image(path, mixed_image(rng, source_data, part, blocks_per_image))
            paths.append(path)
        hosts[host] = paths
    return {"source": source, "hosts": hosts}
