"""Ranking against the index: every host's ranking sketch built at refresh, held warm per process.

Importing this module registers the ``rank`` host sketch (:class:`sketch.ranksketch.RankSketch`
bytes, stored at ``blocksketch:{host}:sketch:rank:<generation>``) so every refresh builds it
from the host's union with the others. :func:`load_fleet` keeps one
:class:`sketch.estimate.FleetSketches` per index in the process and, on each call, re-reads only
the sketches of hosts whose catalogue generation changed (one pipelined GET of the catalogues,
one of the changed sketches). A host indexed before this sketch existed gets one built from its
block maps, in memory, until its next refresh stores one.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sketch.errors import BlockSizeMismatch, FormatError, NotFound, UsageError
from sketch.estimate import FleetEstimate, FleetSketches, ProbeSet
from sketch.rank import DEFAULT_EXACT_TOP, DEFAULT_TOP, RankQuery, exact_candidates, rank_fleet
from sketch.ranksketch import RankParams, RankSketch

from . import keys
from .catalogue import Catalogue
from .connect import store_errors
from .reader import Store
from .sketches import HostUnion, register_host_sketch

MAX_MAP_READERS = 4

RANK_SKETCH = "rank"
PARAMS = RankParams()


def build_rank_sketch(union: HostUnion) -> tuple[bytes, dict]:
    """The ``rank`` host sketch of a host's union, and the parameters kept in its catalogue."""
    sketch = RankSketch.build(union.keys, union.counts, PARAMS)
    return sketch.to_bytes(), {"m_bits": sketch.m_bits, "k": sketch.k, "shift": sketch.shift,
                               "sampled": sketch.sampled, "heavy": sketch.heavy}


register_host_sketch(RANK_SKETCH, build_rank_sketch)


@dataclass
class _Warm:
    """One index's warm fleet. ``fleet``, ``catalogues`` and ``details`` are replaced together (never
    changed in place) so readers take a consistent snapshot without the lock; ``lock`` serialises
    the updates."""

    fleet: FleetSketches
    lock: threading.Lock
    catalogues: dict[str, Catalogue] = field(default_factory=dict)
    details: dict[str, dict] = field(default_factory=dict)
    checked_at: float = float("-inf")


_WARM: dict[tuple[str, float], _Warm] = {}
_WARM_LOCK = threading.Lock()


def _tag(catalogue: Catalogue) -> tuple[int, int | None]:
    entry = catalogue.sketches.get(RANK_SKETCH)
    return catalogue.generation, None if entry is None else entry.generation


def _has_zero(catalogue: Catalogue) -> bool:
    return any(image.zero_blocks for image in catalogue.images)


def _fetch_sketches(store: Store, stale: dict[str, Catalogue]) -> dict[str, RankSketch]:
    """Stored ranking sketches of ``stale`` hosts in one pipeline; built from block maps where missing."""
    stored = {host: c.sketches[RANK_SKETCH] for host, c in stale.items() if RANK_SKETCH in c.sketches}
    values: list = []
    if stored:
        with store_errors(store.url, "reading ranking sketches"):
            pipe = store.client.pipeline(transaction=False)
            for host, entry in stored.items():
                pipe.get(entry.key(host))
            values = pipe.execute()
    found = {}
    for (host, _), data in zip(stored.items(), values):
        if data is None:  # refreshed meanwhile: read the new generation through the consistent reader
            data, _ = store.host_sketch(host, RANK_SKETCH)
        found[host] = RankSketch.from_bytes(data, f"ranking sketch of host {host}")
    for host in stale:
        if host not in found:
            maps = [block_map for _, block_map in store.host_block_maps(host)]
            found[host] = RankSketch.from_block_maps(maps, PARAMS)
    return found


def _warm(store: Store) -> _Warm:
    config = store.config()
    if config is None:
        raise NotFound("the index is empty: run `blocksketch index` on the hosts first")
    with _WARM_LOCK:
        return _WARM.setdefault((store.url, config.created_at),
                                _Warm(FleetSketches(PARAMS.m_bits, PARAMS.k), threading.Lock()))


def _update(warm: _Warm, store: Store, max_age_s: float) -> dict[str, Catalogue]:
    """Bring ``warm`` up to date (the caller holds its lock); the catalogues it now reflects.

    Changes go to a copy of the fleet that replaces the old one when complete, so concurrent
    readers keep probing a whole snapshot meanwhile.
    """
    if time.monotonic() - warm.checked_at < max_age_s:
        return warm.catalogues
    catalogues = store.catalogues()
    fleet = warm.fleet
    gone = [h for h in fleet.hosts if h not in catalogues]
    stale = {h: c for h, c in catalogues.items() if fleet.tag(h) != _tag(c)}
    if gone or stale:
        fleet = fleet.copy()
        for host in gone:
            fleet.remove(host)
        if stale:
            sketches = _fetch_sketches(store, stale)
            fleet.put((host, sketches[host], _has_zero(c), _tag(c)) for host, c in stale.items())
    details = {host: {"images": len(c.images), "size_bytes": sum(i.size_bytes for i in c.images)}
               for host, c in catalogues.items()}
    warm.fleet, warm.catalogues, warm.details, warm.checked_at = fleet, catalogues, details, time.monotonic()
    return catalogues


def _snapshot(store: Store, max_age_s: float) -> tuple[FleetSketches, dict[str, Catalogue], dict[str, dict]]:
    """A consistent (fleet, catalogues, details). When an update is due one thread does it; the
    others go on with the current snapshot instead of queueing behind it (unless there is none yet)."""
    warm = _warm(store)
    if time.monotonic() - warm.checked_at >= max_age_s:
        if warm.lock.acquire(blocking=warm.checked_at == float("-inf") or max_age_s == 0):
            try:
                _update(warm, store, max_age_s)
            finally:
                warm.lock.release()
    return warm.fleet, warm.catalogues, warm.details


def current_fleet(store: Store, max_age_s: float) -> FleetSketches:
    """The warm fleet ranking would use now: a new object whenever any host's index changed."""
    return _snapshot(store, max_age_s)[0]


def load_fleet(store: Store, max_age_s: float = 0.0) -> tuple[FleetSketches, dict[str, Catalogue]]:
    """The warm fleet of ``store``'s index, brought up to date, and the catalogues it reflects.

    Bringing it up to date reads every host's catalogue (one pipeline); a long-running caller (the
    HTTP service) may pass ``max_age_s`` to reuse a check younger than that instead. Another
    thread may replace the fleet later (updates never change a fleet in place, they swap in an
updated copy), so a caller may keep probing the one it got.
    """
    warm = _warm(store)
    with warm.lock:
        catalogues = _update(warm, store, max_age_s)
        return warm.fleet, catalogues


def estimate_image(store: Store, query: RankQuery, max_age_s: float = 0.0
                   ) -> tuple[FleetEstimate, ProbeSet, dict[str, Catalogue], float, dict[str, dict]]:
    """The estimate stage for ``query`` over a consistent snapshot of the warm fleet (no lock held
    while probing): ``(estimate, probes, catalogues, seconds spent probing, host details)``."""
    fleet, catalogues, details = _snapshot(store, max_age_s)
    started = time.perf_counter()
    probes = query.probes(min_shift=fleet.min_shift)
    estimate = fleet.estimate(probes)
    return estimate, probes, catalogues, time.perf_counter() - started, details


def forget_fleets() -> None:
    """Drop every warm fleet of this process (e.g. after tests reuse a server)."""
    with _WARM_LOCK:
        _WARM.clear()


def parse_indexed(image: str) -> tuple[str, str] | None:
    """``(host, path)`` if ``image`` reads as ``HOST:PATH`` with a valid host name, else None."""
    host, sep, path = image.partition(":")
    if not sep or not path:
        return None
    try:
        keys.check_host(host)
    except UsageError:
        return None
    return host, path


def indexed_query(store: Store, host: str, path: str) -> RankQuery:
    """The query for an indexed image ``host:path`` (its stored block map)."""
    info = store.image(host, path)
    block_map = store.block_map(host, info.path)
    return RankQuery.from_block_map(block_map, f"{host}:{info.path}")


def rank_image(store: Store, image: str | RankQuery, *, top: int = DEFAULT_TOP, exact_top: int = DEFAULT_EXACT_TOP,
               exclude_hosts: tuple[str, ...] | list[str] = (), block_size: int | None = None,
               fleet_max_age_s: float = 0.0, source_host: str | None = None) -> dict:
    """Rank every indexed host for ``image``: a :class:`RankQuery` (a local or client image) or
    ``"HOST:PATH"`` naming an indexed image (its own host is left out). Returns the dict that
    ``blocksketch rank --json`` prints (:func:`sketch.rank.rank_fleet`). ``fleet_max_age_s``: see
    :func:`load_fleet`.

    ``source_host``: the host a query image lives on, left out when the index holds it: when every
    node runs the refresh job, the image is in the index under its own host, which would otherwise
    win with everything shared and nothing to send. Unlike ``exclude_hosts``, an unindexed one is
    no error (the source need not be indexed)."""
    index_block_size = store.check_block_size(block_size)
    excluded = list(exclude_hosts)
    if isinstance(image, str):
        parsed = parse_indexed(image)
        if parsed is None:
            raise UsageError(f"{image!r} does not name an indexed image: use HOST:PATH")
        host, path = parsed
        query = indexed_query(store, host, path)
        excluded.append(host)
    else:
        query = image
    if query.block_size != index_block_size:
        raise BlockSizeMismatch("the index", index_block_size, query.block_size)
    query.require_data()
    estimate, probes, catalogues, seconds, details = estimate_image(store, query, fleet_max_age_s)
    if not catalogues:
        raise NotFound("the index has no hosts to rank: run `blocksketch index` on the hosts first")

    def read_maps(host: str):
        try:
            return [(info.path, block_map) for info, block_map in store.host_block_maps(host)]
        except NotFound:
            raise FormatError(f"host {host} left the index during ranking; try again") from None

    if source_host is not None and source_host in catalogues:
        excluded.append(source_host)
    excluded = sorted(set(excluded))
    unknown = [h for h in excluded if h not in catalogues]
    if unknown:
        known = ", ".join(sorted(catalogues)[:5]) + (" ..." if len(catalogues) > 5 else "")
        raise NotFound(f"cannot exclude unknown host {unknown[0]} (indexed: {known})")
    # The exact pass reads its candidates' block maps on threads at once (Redis replies, CRC and
    # numpy decoding release the GIL): 3 hosts of real 1 GiB images, ~53 MB, 0.16-0.21 s one by
    # one, ~0.1 s together.
    candidates = exact_candidates(estimate, excluded, exact_top) if len(catalogues) > len(excluded) else []
    with ThreadPoolExecutor(max_workers=max(1, min(len(candidates), MAX_MAP_READERS))) as pool:
        pending = {host: pool.submit(read_maps, host) for host in candidates}

        def host_maps(host: str):
            return pending[host].result() if host in pending else read_maps(host)

        try:
            return rank_fleet(query, None, host_maps, top=top, exact_top=exact_top, exclude_hosts=excluded,
                              host_details=details, probes=probes, estimate=estimate, estimate_seconds=seconds)
        finally:
            for future in pending.values():
                future.cancel()

