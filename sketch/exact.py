"""The exact pass: the paper's share metrics of a query against a host's images, from block maps.

The numbers are those of ``blocksketch compare`` (:func:`sketch.metrics.share_metrics`) for the
query against the union of the host's images; membership is decided by ``np.searchsorted`` of
the query's sorted keys into each image's sorted keys (:func:`sketch.blockmap.contains`), largest
image first, each image probed only with the query keys no earlier image held.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .blockmap import BlockMap, contains
from .errors import BlockSizeMismatch
from .metrics import ShareMetrics, share_metrics


@dataclass
class ExactResult:
    """Exact metrics of a query against one host, and what computing them cost."""

    metrics: ShareMetrics
    digests: int  # query distinct keys + host block-map keys taken part
    probes: int  # query keys looked up, summed over the host's images
    seconds: float

    @property
    def digests_per_second(self) -> float:
        return self.digests / self.seconds if self.seconds > 0 else float("inf")


def _check_sizes(query: BlockMap, maps: Sequence[BlockMap]) -> None:
    for block_map in maps:
        if block_map.block_size != query.block_size:
            raise BlockSizeMismatch("the host's indexed images", block_map.block_size, query.block_size)


def host_mask(query: BlockMap, maps: Sequence[BlockMap]) -> tuple[np.ndarray, int]:
    """Which distinct non-zero query contents occur in any of ``maps``, and the lookups made."""
    mask = np.zeros(len(query.keys), dtype=bool)
    probes = 0
    # Largest image first: it usually holds the most, so later images get fewer lookups.
    for block_map in sorted(maps, key=lambda m: len(m.keys), reverse=True):
        pending = np.flatnonzero(~mask)
        if len(pending) == 0:
            break
        probes += len(pending)
        if len(pending) == len(mask):
            mask = contains(block_map.keys, query.keys)
        else:
            mask[pending] = contains(block_map.keys, query.keys[pending])
    return mask, probes


def exact_share(query: BlockMap, maps: Sequence[BlockMap]) -> ExactResult:
    """The query's exact share metrics against the union of ``maps`` (one host's images)."""
    _check_sizes(query, maps)
    started = time.perf_counter()
    mask, probes = host_mask(query, maps)
    metrics = share_metrics(query, list(maps), mask=mask)
    seconds = time.perf_counter() - started
    digests = len(query.keys) + sum(len(m.keys) for m in maps)
    return ExactResult(metrics, digests, probes, seconds)


def best_image(query: BlockMap, maps: Sequence[BlockMap]) -> tuple[int, ShareMetrics] | None:
    """The index in ``maps`` of the single image sharing most with the query (highest
    ``shared_ratio``, ties: more shared distinct blocks, then the earlier image), and its metrics."""
    _check_sizes(query, maps)
    best = None
    for index, block_map in enumerate(maps):
        metrics = share_metrics(query, [block_map], mask=contains(block_map.keys, query.keys))
        rank = (metrics.shared_blocks, metrics.shared_unique_blocks)
        if best is None or rank > best[0]:
            best = (rank, index, metrics)
    return None if best is None else (best[1], best[2])
