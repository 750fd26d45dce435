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


def ranges_mask(total_blocks: int, start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """A boolean mask of ``total_blocks`` marking the blocks inside the ranges."""
    delta = np.zeros(total_blocks + 1, dtype=np.int64)
    np.add.at(delta, np.asarray(start, dtype=np.int64), 1)
    np.add.at(delta, np.asarray(start, dtype=np.int64) + np.asarray(count, dtype=np.int64), -1)
    return np.cumsum(delta[:-1]) > 0


def mask_ranges(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`ranges_mask`: the maximal runs of True."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    start = np.flatnonzero(edges == 1)
    return start, np.flatnonzero(edges == -1) - start


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
            document = json.loads(handle.read())
    except OSError as exc:
        raise UsageError(f"cannot read ranges file {path}: {exc.strerror}") from None
    except ValueError:
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
    array = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    start, count = array[:, 0], array[:, 1]
    if (start < 0).any() or (count <= 0).any() or (start + count > total_blocks).any():
        raise FormatError(f"ranges file {path} names blocks outside the image")
    return merge_ranges(start, count)
