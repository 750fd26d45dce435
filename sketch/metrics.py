"""The paper's share metrics (its Table 1), computed exactly from block maps.

For a SOURCE image against a TARGET (one image or the union of several):

- ``total_blocks``: blocks of SOURCE; ``zero_blocks``: those that are all zeros;
- ``unique_blocks``: distinct contents of SOURCE, the all-zero block counting as one;
- ``shared_blocks``: SOURCE blocks, duplicates counted, whose content occurs in TARGET;
- ``shared_unique_blocks``: distinct SOURCE contents that occur in TARGET;
- ``shared_ratio`` and ``shared_unique_ratio``: those two over ``total_blocks`` (the paper's
  70% and 40% in Table 1);
- ``send_blocks``: distinct non-zero SOURCE contents absent from TARGET, i.e. what must cross
  the WAN when repeated blocks are sent once and zero blocks become holes.

The all-zero content is shared when TARGET has any all-zero block, like any other content.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .blockmap import BlockMap, contains


@dataclass
class ShareMetrics:
    block_size: int
    total_blocks: int
    zero_blocks: int
    unique_blocks: int
    shared_blocks: int
    shared_unique_blocks: int
    send_blocks: int

    @property
    def shared_ratio(self) -> float:
        return self.shared_blocks / self.total_blocks if self.total_blocks else 0.0

    @property
    def shared_unique_ratio(self) -> float:
        return self.shared_unique_blocks / self.total_blocks if self.total_blocks else 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["shared_ratio"] = self.shared_ratio
        out["shared_unique_ratio"] = self.shared_unique_ratio
        return out


def shared_mask(source: BlockMap, targets: list[BlockMap]) -> np.ndarray:
    """Which distinct non-zero contents of ``source`` occur in any of ``targets``."""
    mask = np.zeros(len(source.keys), dtype=bool)
    for target in targets:
        pending = np.flatnonzero(~mask)
        if len(pending) == 0:
            break
        mask[pending] = contains(target.keys, source.keys[pending])
    return mask


def share_metrics(source: BlockMap, targets: list[BlockMap], mask: np.ndarray | None = None) -> ShareMetrics:
    """The paper's metrics for ``source`` against the union of ``targets``."""
    if mask is None:
        mask = shared_mask(source, targets)
    target_has_zero = any(t.zero_blocks for t in targets)
    zero_shared = bool(source.zero_blocks) and target_has_zero
    return ShareMetrics(
        block_size=source.block_size,
        total_blocks=source.total_blocks,
        zero_blocks=source.zero_blocks,
        unique_blocks=source.unique_blocks,
        shared_blocks=int(source.counts[mask].sum(dtype=np.uint64)) + (source.zero_blocks if zero_shared else 0),
        shared_unique_blocks=int(np.count_nonzero(mask)) + (1 if zero_shared else 0),
        send_blocks=int(np.count_nonzero(~mask)),
    )
