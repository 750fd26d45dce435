"""Ranking a fleet for one image: a sketch-only estimate for every host, confirmed exactly for the best few.

1. The query (:class:`RankQuery`: the image's distinct non-zero digests with counts, and its zero
   and total block counts) becomes a :class:`~sketch.estimate.ProbeSet`, probed against every
   host's ranking sketch at once (:class:`~sketch.estimate.FleetSketches`).
2. The ``exact_top`` hosts with the highest estimated ``shared_ratio`` get the exact pass
   (:mod:`sketch.exact`) over their block maps: the numbers ``blocksketch compare`` prints for the
   image against the union of the host's images.
3. The winner is the highest exact ``shared_ratio`` (ties: more shared distinct blocks); the
   result says whether the estimate ordered those hosts the same way, and names the single image
   on the winning host that shares most.

:func:`rank_fleet` returns the plain dict that ``blocksketch rank --json`` prints and the HTTP
service sends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .blockmap import KEY_DTYPE, BlockMap, lexsort_keys
from .digests import ImageDigests
from .errors import FormatError, ImageError, NotFound, UsageError
from .estimate import (
    DEFAULT_HEAVY_THRESHOLD,
    DEFAULT_MAX_HEAVY,
    DEFAULT_MAX_LIGHT,
    FleetEstimate,
    FleetSketches,
    ProbeSet,
)
from .exact import best_image, exact_share

DEFAULT_TOP = 10
DEFAULT_EXACT_TOP = 3
LIST_LIMIT = 5

HostMaps = Callable[[str], Sequence[tuple[str, BlockMap]]]
"""``host -> [(image path, block map), ...]``: how the exact pass reads a host's images."""


@dataclass(frozen=True)
class RankQuery:
    """What ranking needs to know about an image: its distinct non-zero digests and their counts.

    Built from a local image (:meth:`from_digests`), an indexed one (:meth:`from_block_map`), or
    what a client sends (:meth:`from_arrays`). ``keys`` are sorted unique ``(u, 2)`` uint64 keys
    (:func:`sketch.blockmap.digest_keys`), ``counts`` how often each occurs; ``sum(counts) +
    zero_blocks == total_blocks``.
    """

    block_size: int
    total_blocks: int
    zero_blocks: int
    keys: np.ndarray
    counts: np.ndarray
    name: str = ""

    def __post_init__(self) -> None:
        what = f"rank query {self.name!r}" if self.name else "rank query"
        keys, counts = self.keys, self.counts
        if keys.dtype != KEY_DTYPE or keys.ndim != 2 or keys.shape[1] != 2 or counts.ndim != 1 \
                or len(counts) != len(keys):
            raise FormatError(f"{what} is malformed: keys must be (n, 2) uint64 and counts (n,)")
        if len(counts) and counts.min() < 1:
            raise FormatError(f"{what} is malformed: every digest must occur at least once")
        if min(self.total_blocks, self.zero_blocks) < 0 or \
                int(counts.sum(dtype=np.int64)) + self.zero_blocks != self.total_blocks:
            raise FormatError(f"{what} is malformed: counts ({int(counts.sum(dtype=np.int64))}) plus zero "
                              f"blocks ({self.zero_blocks}) differ from total blocks ({self.total_blocks})")
        if len(keys) > 1:
            high, low = keys[:, 0], keys[:, 1]
            ascending = (high[1:] > high[:-1]) | ((high[1:] == high[:-1]) & (low[1:] > low[:-1]))
            if not ascending.all():
                raise FormatError(f"{what} is malformed: keys must be sorted and unique")

    @property
    def distinct_nonzero(self) -> int:
        return len(self.keys)

    def require_data(self) -> None:
        """ImageError unless the image has a non-zero block: an all-zero image needs no host."""
        if len(self.keys) == 0:
            raise ImageError(f"image {self.name or 'query'} has no non-zero blocks: it needs nothing from any "
                             "host, so there is nothing to rank")

    @classmethod
    def from_block_map(cls, block_map: BlockMap, name: str = "") -> RankQuery:
        return cls(block_map.block_size, block_map.total_blocks, block_map.zero_blocks, block_map.keys,
                   block_map.counts.astype(np.int64), name)

    @classmethod
    def from_digests(cls, digests: ImageDigests, name: str | None = None) -> RankQuery:
        return cls.from_block_map(BlockMap.from_digests(digests), digests.path if name is None else name)

    @classmethod
    def from_arrays(cls, block_size: int, total_blocks: int, zero_blocks: int, keys: np.ndarray,
                    counts: np.ndarray, name: str = "") -> RankQuery:
        """A query from a client's distinct digests (``(n, 16)`` uint8 or ``(n, 2)`` uint64 keys, any
        order) and counts; sorted here. FormatError if a digest repeats or the counts do not add up."""
        from .bloom import as_keys

        try:
            keys = np.ascontiguousarray(as_keys(np.asarray(keys)))
        except TypeError as exc:
            raise FormatError(f"rank query is malformed: {exc}") from None
        counts = np.asarray(counts).reshape(-1)
        if counts.dtype.kind not in "iu" or len(counts) != len(keys):
            raise FormatError("rank query is malformed: one integer count per digest is needed")
        order = lexsort_keys(keys)
        return cls(int(block_size), int(total_blocks), int(zero_blocks), np.ascontiguousarray(keys[order]),
                   counts[order].astype(np.int64), name)

    def block_map(self) -> BlockMap:
        """The query as a block map (first-block positions unknown: zeros), for the exact pass."""
        return BlockMap(self.block_size, self.total_blocks, self.zero_blocks, self.keys,
                        self.counts.astype(np.uint32), np.zeros(len(self.keys), dtype=np.uint64))

    def probes(self, heavy_threshold: int = DEFAULT_HEAVY_THRESHOLD, max_light: int = DEFAULT_MAX_LIGHT,
               max_heavy: int = DEFAULT_MAX_HEAVY, min_shift: int = 0) -> ProbeSet:
        """What the estimate probes (:meth:`sketch.estimate.ProbeSet.build`)."""
        return ProbeSet.build(self.keys, self.counts, self.total_blocks, self.zero_blocks, heavy_threshold,
                              max_light, max_heavy, min_shift)


def _listing(names: Iterable[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:LIST_LIMIT]) + (" ..." if len(names) > LIST_LIMIT else "")


def _metrics_fields(prefix: str, metrics) -> dict:
    return {f"{prefix}shared_ratio": metrics.shared_ratio, f"{prefix}shared_unique_ratio": metrics.shared_unique_ratio,
            f"{prefix}shared_blocks": metrics.shared_blocks,
            f"{prefix}shared_unique_blocks": metrics.shared_unique_blocks, "send_blocks": metrics.send_blocks}


def _by_estimate(estimate: FleetEstimate, excluded: set[str]) -> list[int]:
    """Host indices, best estimate first (ties: more shared distinct blocks, then the name)."""
    ratio, unique_ratio = estimate.ratios()
    candidates = [i for i, host in enumerate(estimate.hosts) if host not in excluded]
    return sorted(candidates, key=lambda i: (-ratio[i], -unique_ratio[i], estimate.hosts[i]))


def exact_candidates(estimate: FleetEstimate, exclude_hosts: Iterable[str], exact_top: int) -> list[str]:
    """The hosts :func:`rank_fleet` checks exactly, in order: a caller can fetch their block maps
    ahead (all at once, while the first is being checked)."""
    return [estimate.hosts[i] for i in _by_estimate(estimate, set(exclude_hosts))[:exact_top]]


def rank_fleet(query: RankQuery, fleet: FleetSketches | None, host_maps: HostMaps | None = None, *,
               top: int = DEFAULT_TOP, exact_top: int = DEFAULT_EXACT_TOP, exclude_hosts: Iterable[str] = (),
               host_details: Mapping[str, Mapping] | None = None, probes: ProbeSet | None = None,
               estimate: FleetEstimate | None = None, estimate_seconds: float | None = None) -> dict:
    """Rank every host of ``fleet`` for ``query``; see the module docstring for the steps.

    ``host_maps`` reads a host's block maps for the exact pass (None skips it: the estimate alone
    decides). ``host_details`` adds fields (e.g. ``images``, ``size_bytes``) to each host's row.
    A caller that already ran the estimate (e.g. under a lock shared with fleet updates) passes
    ``estimate`` with the ``probes`` it used, and ``fleet`` may then be None.
    Raises NotFound for an empty fleet or an unknown excluded host, ImageError for an image with
    no non-zero block.
    """
    if top < 1 or exact_top < 0:
        raise UsageError("--top must be at least 1 and --exact-top at least 0")
    excluded = set(exclude_hosts)
    hosts = estimate.hosts if estimate is not None else fleet.hosts if fleet is not None else []
    if not hosts:
        raise NotFound("the index has no hosts to rank: run `blocksketch index` on the hosts first")
    unknown = sorted(excluded.difference(hosts))
    if unknown:
        raise NotFound(f"cannot exclude unknown host {unknown[0]} (indexed: {_listing(hosts)})")
    if len(excluded) >= len(hosts):
        raise NotFound(f"no host left to rank after excluding {_listing(excluded)}")
    query.require_data()
    name = query.name or "query"

    if estimate is None:
        started = time.perf_counter()
        if probes is None:
            probes = query.probes(min_shift=fleet.min_shift)
        estimate = fleet.estimate(probes)
        estimate_seconds = time.perf_counter() - started
    elif probes is None:
        raise UsageError("rank_fleet: pass the probes the estimate was made with")
    ratio, unique_ratio = estimate.ratios()
    error, unique_error = estimate.errors95()
    by_estimate = _by_estimate(estimate, excluded)
    estimate_rank = {i: r + 1 for r, i in enumerate(by_estimate)}

    exact: dict[int, dict] = {}
    maps_of: dict[int, Sequence[tuple[str, BlockMap]]] = {}
    exact_seconds = 0.0
    exact_digests = 0
    query_map = query.block_map()
    if host_maps is not None:
        for i in by_estimate[:exact_top]:
            maps = host_maps(estimate.hosts[i])
            result = exact_share(query_map, [m for _, m in maps])
            exact[i] = _metrics_fields("exact_", result.metrics)
            maps_of[i] = maps
            exact_seconds += result.seconds
            exact_digests += result.digests
    by_exact = sorted(exact, key=lambda i: (-exact[i]["exact_shared_blocks"], -exact[i]["exact_shared_unique_blocks"],
                                            estimate_rank[i]))
    exact_rank = {i: r + 1 for r, i in enumerate(by_exact)}
    checked_by_estimate = [i for i in by_estimate if i in exact]
    agrees = None if len(exact) < 2 else checked_by_estimate == by_exact
    winner_index = by_exact[0] if by_exact else by_estimate[0]

    best = None
    if winner_index in maps_of and maps_of[winner_index]:
        maps = maps_of[winner_index]
        found = best_image(query_map, [m for _, m in maps])
        if found is not None:
            index, metrics = found
            best = {"host": estimate.hosts[winner_index], "path": maps[index][0],
                    **{k.removeprefix("exact_"): v for k, v in _metrics_fields("exact_", metrics).items()}}

    def row(i: int) -> dict:
        host = estimate.hosts[i]
        fields = {
            "host": host,
            "estimated_shared_ratio": float(ratio[i]),
            "estimated_shared_unique_ratio": float(unique_ratio[i]),
            "estimate_error": float(error[i]),
            "estimate_unique_error": float(unique_error[i]),
            "exact_shared_ratio": None,
            "exact_shared_unique_ratio": None,
            "exact_shared_blocks": None,
            "exact_shared_unique_blocks": None,
            "send_blocks": None,
        }
        fields.update(exact.get(i, {}))
        details = dict(host_details.get(host, {})) if host_details else {}
        fields["images"] = details.pop("images", None)
        fields["size_bytes"] = details.pop("size_bytes", None)
        fields.update(details)
        fields.update({"estimate_rank": estimate_rank[i], "exact_rank": exact_rank.get(i),
                       "sample_shift": int(estimate.shift[i]), "sketch_fp_rate": float(estimate.fp_rate[i])})
        return fields

    rest = [i for i in by_estimate if i not in exact]
    rows = [row(i) for i in by_exact] + [row(i) for i in rest[: max(0, top - len(by_exact))]]
    return {
        "image": name,
        "block_size": query.block_size,
        "total_blocks": query.total_blocks,
        "zero_blocks": query.zero_blocks,
        "distinct_blocks": query.distinct_nonzero,
        "winner": estimate.hosts[winner_index],
        "winner_by": "exact" if by_exact else "estimate",
        "estimate_winner": estimate.hosts[by_estimate[0]],
        "estimate_order_agrees": agrees,
        "best_image": best,
        "hosts_ranked": len(by_estimate),
        "excluded_hosts": sorted(excluded),
        "estimate": {"seconds": estimate_seconds, "light_probes": len(probes.light_keys),
                     "heavy_probes": len(probes.heavy_keys), "query_sample_shift": probes.shift,
                     "heavy_threshold": probes.heavy_threshold, "confidence": 0.95},
        "exact": {"seconds": exact_seconds, "hosts": len(exact), "digests": exact_digests,
                  "digests_per_second": exact_digests / exact_seconds if exact_seconds > 0 else None},
        "hosts": rows,
    }

