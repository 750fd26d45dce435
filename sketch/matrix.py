"""Every image against every other: the paper's share metrics (its Tables 3 and 4) for all ordered pairs.

Each image is digested once into a :class:`~sketch.blockmap.BlockMap`; the pairs are then computed
from the maps alone, so n images cost n digest passes, not n^2. A caller may supply block maps it
already has (e.g. from the index) through ``lookup``; those images are not read at all.

Besides the paper's ratios (over all blocks of the source, zeros included) every pair carries the
same shares over *non-zero* blocks: real root file systems are mostly all-zero blocks, which every
host holds, so the paper's ratios mostly measure how empty the image is, not what it shares.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .blockmap import BlockMap
from .blocks import list_images
from .digests import ProgressCallback, data_bytes, digest_image
from .errors import BlockSizeMismatch, UsageError
from .metrics import ShareMetrics, share_metrics, shared_mask

# What a heat map or grid can show per cell, with the words a reader needs to read it.
CELL_VALUES = {
    "nonzero": "distinct non-zero blocks of the row image found in the column image",
    "distinct": "paper's distinct ratio: shared distinct blocks / all blocks of the row image",
    "counted": "paper's ratio counting duplicates: shared blocks / all blocks of the row image",
}
DEFAULT_CELL_VALUE = "nonzero"

BlockMapLookup = Callable[[str], "BlockMap | None"]


@dataclass(frozen=True)
class PairShare:
    """SOURCE against one TARGET image: the paper's metrics plus the same shares over non-zero blocks."""

    source: str
    target: str
    metrics: ShareMetrics
    distinct_nonzero: int  # distinct non-zero contents of SOURCE
    shared_nonzero_blocks: int  # non-zero SOURCE blocks, duplicates counted, whose content TARGET has
    shared_distinct_nonzero: int  # distinct non-zero SOURCE contents that TARGET has

    @property
    def nonzero_blocks(self) -> int:
        return self.metrics.total_blocks - self.metrics.zero_blocks

    @property
    def zero_ratio(self) -> float:
        total = self.metrics.total_blocks
        return self.metrics.zero_blocks / total if total else 0.0

    @property
    def nonzero_shared_ratio(self) -> float:
        """Non-zero SOURCE blocks (duplicates counted) found in TARGET, over all non-zero blocks."""
        return self.shared_nonzero_blocks / self.nonzero_blocks if self.nonzero_blocks else 0.0

    @property
    def nonzero_shared_unique_ratio(self) -> float:
        """Distinct non-zero SOURCE contents found in TARGET, over all of them: what need not cross the WAN."""
        return self.shared_distinct_nonzero / self.distinct_nonzero if self.distinct_nonzero else 0.0

    @property
    def send_bytes(self) -> int:
        """Bytes crossing the WAN: each missing distinct non-zero block once."""
        return self.metrics.send_blocks * self.metrics.block_size

    def value(self, cell_value: str) -> float:
        """The ratio a heat-map cell shows (a key of :data:`CELL_VALUES`)."""
        if cell_value == "nonzero":
            return self.nonzero_shared_unique_ratio
        if cell_value == "distinct":
            return self.metrics.shared_unique_ratio
        if cell_value == "counted":
            return self.metrics.shared_ratio
        raise UsageError(f"unknown cell value {cell_value!r}; use one of {', '.join(CELL_VALUES)}")

    def as_dict(self) -> dict:
        """The keys of ``blocksketch compare --json``, then send_bytes and the non-zero shares."""
        return {
            "source": self.source,
            "target": self.target,
            **self.metrics.as_dict(),
            "send_bytes": self.send_bytes,
            "zero_ratio": self.zero_ratio,
            "nonzero_blocks": self.nonzero_blocks,
            "distinct_nonzero": self.distinct_nonzero,
            "shared_nonzero_blocks": self.shared_nonzero_blocks,
            "shared_distinct_nonzero": self.shared_distinct_nonzero,
            "nonzero_shared_ratio": self.nonzero_shared_ratio,
            "nonzero_shared_unique_ratio": self.nonzero_shared_unique_ratio,
        }


def pair_share(source: BlockMap, target: BlockMap, source_name: str = "", target_name: str = "") -> PairShare:
    """Exact shares of ``source`` against ``target``, with one membership pass over the source's keys."""
    if source.block_size != target.block_size:
        raise BlockSizeMismatch(f"block map of {target_name or 'the target'}", source.block_size, target.block_size)
    mask = shared_mask(source, [target])
    return PairShare(
        source=source_name,
        target=target_name,
        metrics=share_metrics(source, [target], mask),
        distinct_nonzero=source.distinct_nonzero,
        shared_nonzero_blocks=int(source.counts[mask].sum(dtype=np.uint64)),
        shared_distinct_nonzero=int(np.count_nonzero(mask)),
    )


@dataclass(frozen=True)
class MatrixImage:
    """One image of a matrix: its path, a short unique name for display, its block map, where that came from."""

    path: str
    name: str
    block_map: BlockMap
    from_index: bool = False

    def as_dict(self) -> dict:
        block_map = self.block_map
        return {"path": self.path, "name": self.name, "total_blocks": block_map.total_blocks,
                "zero_blocks": block_map.zero_blocks, "distinct_nonzero": block_map.distinct_nonzero,
                "map_from": "index" if self.from_index else "digest"}


@dataclass
class ShareMatrix:
    """All ordered pairs of distinct images, source-major: ``pairs[i * (n - 1) + ...]``; use :meth:`pair`."""

    block_size: int
    images: list[MatrixImage]
    pairs: list[PairShare]
    digest_passes: int  # images digested to build this matrix (the others came from ``lookup``)

    @classmethod
    def from_images(cls, images: list[MatrixImage], digest_passes: int = 0) -> ShareMatrix:
        """Compute every ordered pair from the images' block maps (no image is read)."""
        if len(images) < 2:
            raise UsageError(f"a matrix needs at least two images, got {len(images)}")
        block_size = images[0].block_map.block_size
        for image in images[1:]:
            if image.block_map.block_size != block_size:
                raise BlockSizeMismatch(f"block map of {image.path}", block_size, image.block_map.block_size)
        pairs = [pair_share(s.block_map, t.block_map, s.path, t.path)
                 for s in images for t in images if s is not t]
        return cls(block_size, images, pairs, digest_passes)

    @property
    def names(self) -> list[str]:
        return [image.name for image in self.images]

    def pair(self, source: int, target: int) -> PairShare:
        """The pair of image ``source`` against image ``target`` (indexes into :attr:`images`, distinct)."""
        if source == target:
            raise UsageError("an image is not paired with itself")
        n = len(self.images)
        return self.pairs[source * (n - 1) + (target if target < source else target - 1)]

    def grid(self, cell_value: str = DEFAULT_CELL_VALUE) -> np.ndarray:
        """``(n, n)`` float array of the ratio ``cell_value`` (row = source, column = target); NaN on the diagonal."""
        if cell_value not in CELL_VALUES:
            raise UsageError(f"unknown cell value {cell_value!r}; use one of {', '.join(CELL_VALUES)}")
        n = len(self.images)
        out = np.full((n, n), np.nan)
        for i in range(n):
            for j in range(n):
                if i != j:
                    out[i, j] = self.pair(i, j).value(cell_value)
        return out

    def as_dict(self) -> dict:
        return {"block_size": self.block_size, "digest_passes": self.digest_passes,
                "images": [image.as_dict() for image in self.images],
                "pairs": [pair.as_dict() for pair in self.pairs]}


def short_names(paths: Sequence[str]) -> list[str]:
    """Shortest distinct path suffixes: base names, with parent directories added only where names collide."""
    parts = [os.path.normpath(p).split(os.sep) for p in paths]
    depth = [1] * len(paths)
    while True:
        names = [os.sep.join(p[-d:]) for p, d in zip(parts, depth)]
        seen: dict[str, list[int]] = {}
        for index, name in enumerate(names):
            seen.setdefault(name, []).append(index)
        clashes = [i for group in seen.values() if len(group) > 1 for i in group if depth[i] < len(parts[i])]
        if not clashes:
            return names
        for index in clashes:
            depth[index] += 1


def expand_paths(paths: Sequence[str]) -> list[str]:
    """Image files named by ``paths`` (files, or directories of images), each real file once, in order."""
    found: list[str] = []
    seen: set[str] = set()
    for path in paths:
        for image in list_images(path):
            real = os.path.realpath(image)
            if real not in seen:
                seen.add(real)
                found.append(image)
    return found


def load_images(paths: Sequence[str], block_size: int, progress: ProgressCallback | None = None,
                lookup: BlockMapLookup | None = None,
                image_format: str | None = None,
                backing_dirs: tuple[str, ...] = ()) -> tuple[list[MatrixImage], int]:
    """Block maps of ``paths`` (image files): from ``lookup`` where it has one, else one digest pass each.

    ``image_format`` ("raw" or "qcow2") reads every image as that format; None detects each by magic.
    Returns the images and the number of digest passes made.
    """
    names = short_names(paths)
    images: list[MatrixImage] = []
    passes = 0
    for path, name in zip(paths, names):
        block_map = lookup(path) if lookup is not None else None
        if block_map is not None:
            if block_map.block_size != block_size:
                raise BlockSizeMismatch(f"the indexed block map of {path}", block_map.block_size, block_size)
            images.append(MatrixImage(path, name, block_map, from_index=True))
            continue
        block_map = BlockMap.from_digests(digest_image(path, block_size, image_format=image_format,
                                                       progress=progress, backing_dirs=backing_dirs))
        passes += 1
        images.append(MatrixImage(path, name, block_map))
    return images, passes


def bytes_to_digest(paths: Sequence[str], block_size: int, image_format: str | None = None,
                    backing_dirs: tuple[str, ...] = ()) -> int:
    """Bytes :func:`load_images` will read without a lookup (the images' data extents), for a progress bar."""
    return sum(data_bytes(path, block_size, image_format, backing_dirs) for path in paths)


def build_matrix(paths: Sequence[str], block_size: int, progress: ProgressCallback | None = None,
                 lookup: BlockMapLookup | None = None, image_format: str | None = None) -> ShareMatrix:
    """The share matrix of the images under ``paths`` (files or directories): n digest passes at most."""
    found = expand_paths(paths)
    if len(found) < 2:  # before any digesting: a one-image matrix is a usage mistake
        raise UsageError(f"a matrix needs at least two images, got {len(found)} ({', '.join(found)})")
    images, passes = load_images(found, block_size, progress, lookup, image_format)
    return ShareMatrix.from_images(images, passes)
