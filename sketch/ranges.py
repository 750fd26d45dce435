"""Block ranges: sorted, merged ``(start, count)`` lists, and the ranges file apply leaves behind.

When apply cannot verify some LOCAL runs (the destination's image changed since it was indexed, or
an MD5 collision), it writes the block ranges it still needs to a *ranges file*; ``blocksketch pack
IMAGE MANIFEST --ranges FILE`` on the source turns it into a bundle holding just those blocks.

Ranges file (JSON, UTF-8), version 1::

    {"format": "blocksketch-ranges", "version": 1,
     "manifest_id": "<hex SHA-256 of the manifest body>",
     "block_size": 512, "blocks": 2048,
     "ranges": [[start_block, block_count], ...]}

``ranges`` are sorted, non-overlapping and non-empty; ``blocks`` is their total.
"""

from __future__ import annotations

import json

import numpy as np

from .errors import FormatError, UsageError

FORMAT = "blocksketch-ranges"
VERSION = 1
# A ranges file lists at most a few million ranges (~20 bytes each as JSON).
MAX_FILE_BYTES = 64 << 20


def merge_ranges(start: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort ``(start, count)`` ranges and merge overlapping or touching ones; drop empty ones."""
    start = np.asarray(start, dtype=np.int64)
    count = np.asarray(count, dtype=np.int64)
    keep = count > 0
    start, count = start[keep], count[keep]
    if len(start) == 0:
        return start, count
    order = np.argsort(start, kind="stable")
    start, end = start[order], start[order] + count[order]
    reach = np.maximum.accumulate(end)
    new = np.ones(len(start), dtype=bool)
    new[1:] = start[1:] > reach[:-1]
    group = np.cumsum(new) - 1
    merged_start = start[new]
    merged_end = np.zeros(len(merged_start), dtype=np.int64)
    np.maximum.at(merged_end, group, end)
    return merged_start, merged_end - merged_start


def blocks_below(start: np.ndarray, count: np.ndarray, points) -> np.ndarray:
    """For each of ``points``, how many blocks of the merged ranges ``(start, count)`` lie below it.

    Work and memory follow the ranges and the points, never the size of the image they are in.
    """
    start = np.asarray(start, dtype=np.int64)
    end = start + np.asarray(count, dtype=np.int64)
    points = np.asarray(points, dtype=np.int64)
    before = np.concatenate(([0], np.cumsum(end - start)))  # blocks in the first k ranges
    k = np.searchsorted(start, points, side="left")  # ranges starting below each point
    over = np.where(k > 0, np.maximum(end[np.maximum(k - 1, 0)] - points, 0) if len(end) else 0, 0)
    return before[k] - over


def clip_ranges(start: np.ndarray, count: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """The parts of the merged ranges ``(start, count)`` inside blocks ``[lo, hi)``, as ``(start, count)``."""
    start = np.asarray(start, dtype=np.int64)
    end = start + np.asarray(count, dtype=np.int64)
    first = np.searchsorted(end, lo, side="right")
    last = np.searchsorted(start, hi, side="left")
    a = np.maximum(start[first:last], lo)
    return a, np.minimum(end[first:last], hi) - a


def first_uncovered(start: np.ndarray, count: np.ndarray, block: int) -> int:
    """The first block at or after ``block`` outside the merged ranges ``(start, count)``."""
    at = int(np.searchsorted(start, block, side="right")) - 1
    if at >= 0 and block < int(start[at] + count[at]):
        return int(start[at] + count[at])
    return block


def ranges_mask(total_blocks: int, start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """A boolean mask of ``total_blocks`` marking the blocks inside the ranges.

    Costs memory for every block of the image: only for an image already read, never for a size
    a manifest or a bundle merely claims (:func:`blocks_below` and :func:`clip_ranges` are for those).
    """
    delta = np.zeros(total_blocks + 1, dtype=np.int64)
    np.add.at(delta, np.asarray(start, dtype=np.int64), 1)
    np.add.at(delta, np.asarray(start, dtype=np.int64) + np.asarray(count, dtype=np.int64), -1)
    return np.cumsum(delta[:-1]) > 0


def write_ranges_file(path: str, manifest_id: bytes, block_size: int, start: np.ndarray, count: np.ndarray,
                      force: bool = False) -> None:
    """Write a ranges file (atomically, as :func:`sketch.output.write_atomic`)."""
    from .output import write_atomic

    start, count = merge_ranges(start, count)
    document = {"format": FORMAT, "version": VERSION, "manifest_id": manifest_id.hex(), "block_size": block_size,
                "blocks": int(count.sum()), "ranges": [[int(s), int(c)] for s, c in zip(start, count)]}
    write_atomic(path, (json.dumps(document) + "\n").encode(), force=force, what="ranges file")


def read_ranges_file(path: str, manifest_id: bytes, total_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """The ranges of a ranges file made for the manifest ``manifest_id``, checked against the image."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read ranges file {path}: {exc.strerror}") from None
    if len(text) > MAX_FILE_BYTES:
        raise FormatError(f"ranges file {path} is larger than any ranges file ({MAX_FILE_BYTES} bytes)")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):  # deep nesting overflows the parser's stack
        raise FormatError(f"ranges file {path} is corrupt (not JSON)") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise FormatError(f"{path} is not a blocksketch ranges file")
    if document.get("version") != VERSION:
        raise FormatError(f"ranges file {path} has unknown version {document.get('version')!r}")
    if document.get("manifest_id") != manifest_id.hex():
        raise UsageError(f"ranges file {path} was made for another manifest")
    pairs = document.get("ranges")
    if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in p)
            for p in pairs):
        raise FormatError(f"ranges file {path} is corrupt (bad ranges)")
    # Checked as Python integers: JSON numbers have no size limit, and int64 arithmetic would wrap.
    if not all(0 <= s and 0 < c and s + c <= total_blocks for s, c in pairs):
        raise FormatError(f"ranges file {path} names blocks outside the image")
    array = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return merge_ranges(array[:, 0], array[:, 1])
