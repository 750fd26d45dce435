"""Export digests as a pybloom-live ``BloomFilter``, for tools that read that library's files.

Our own filters (:mod:`sketch.bloom`) are the hot path: ~100x faster to build and probe, and
laid out for Redis. pybloom-live is only the interchange format: a third party loads the file
with ``pybloom_live.BloomFilter.fromfile`` and probes it with ``key in bloom``.

Key form. Each digest is added as its **lowercase hex text** (32 characters, e.g.
``hashlib.md5(block).hexdigest()``; :func:`pybloom_key`), which pybloom-live encodes as UTF-8
and hashes. Not the 16 raw bytes: pybloom-live 4.0.0 hashes a ``bytes`` key through ``str(key)``,
i.e. Python's repr text ``b'\\xd4\\x1d...'``, which no other language reproduces easily and which
a fixed pybloom-live would hash differently, silently breaking every file already written.

File format (pybloom-live's ``tofile``, not ours, so it has no magic or version of its own): a
40-byte little-endian header ``<dQQQQ`` = error_rate (float64), num_slices (= k), bits_per_slice,
capacity, count; then ``num_slices * bits_per_slice`` bits, least significant bit first within a
byte (bitarray ``endian='little'``), slice ``i`` holding the bit set by hash ``i``.
"""

from __future__ import annotations

import os

import numpy as np
import pybloom_live

from .blockmap import key_digests, lexsort_keys
from .bloom import as_keys
from .errors import UsageError
from .output import atomic_output

KEY_HEX_CHARS = 32


def pybloom_key(digest: bytes) -> str:
    """The key under which a 16-byte digest is stored in an exported filter (lowercase hex)."""
    return bytes(digest).hex()


def pybloom_keys(keys: np.ndarray) -> list[str]:
    """:func:`pybloom_key` of every ``(n, 2)`` key or ``(n, 16)`` digest, in order."""
    text = key_digests(as_keys(keys)).tobytes().hex()
    return [text[start : start + KEY_HEX_CHARS] for start in range(0, len(text), KEY_HEX_CHARS)]


def _distinct(keys: np.ndarray) -> np.ndarray:
    if len(keys) < 2:
        return keys
    ordered = keys[lexsort_keys(keys)]
    keep = np.concatenate(([True], np.any(ordered[1:] != ordered[:-1], axis=1)))
    return ordered[keep]


def to_pybloom(keys: np.ndarray, fp_rate: float) -> pybloom_live.BloomFilter:
    """A pybloom-live filter holding every distinct digest of ``keys`` (``(n, 2)`` uint64 keys or
    ``(n, 16)`` uint8 digests), sized for their number at ``fp_rate``. ~1.5 us per digest."""
    if not 0 < fp_rate < 1:
        raise UsageError(f"filter FP rate {fp_rate} must be between 0 and 1")
    distinct = _distinct(as_keys(keys))
    # Capacity 0 is refused by pybloom-live; an empty export is still a valid, empty filter.
    bloom = pybloom_live.BloomFilter(capacity=max(1, len(distinct)), error_rate=fp_rate)
    add = bloom.add
    for key in pybloom_keys(distinct):
        # Keys are distinct, so skip pybloom's per-key "already present?" probe; count stays exact.
        add(key, skip_check=True)
    return bloom


def write_pybloom_file(keys: np.ndarray, path: str | os.PathLike, fp_rate: float, force: bool = False) -> int:
    """Write :func:`to_pybloom` of ``keys`` to ``path`` in pybloom-live's ``tofile`` format
    (whole or not at all, as :func:`sketch.output.atomic_output`; ``-`` is stdout).
    Returns the number of distinct digests written.
    """
    path = os.fspath(path)
    bloom = to_pybloom(keys, fp_rate)
    with atomic_output(path, force=force, what="filter file") as out:
        bloom.tofile(out)
    return len(bloom)
