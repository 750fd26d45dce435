"""Reading the index: hosts, images, exact block maps and Bloom filters, always from one generation.

A reader starts at a host's catalogue and then fetches the entries it names. A refresh may publish
a new catalogue and delete the old entries in between; the reader then finds an entry missing,
sees that the catalogue changed, and starts over from the new one. An entry missing while its
catalogue is unchanged is damage, reported as FormatError.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

from sketch.blockmap import BlockMap
from sketch.errors import FormatError, NotFound

from . import catalogue as catalogue_mod
from . import config as config_mod
from . import keys
from .catalogue import Catalogue, HostInfo, ImageEntry, ImageInfo
from .chunks import decode_chunks
from .connect import store_errors
from .sketches import HOST_FILTER

T = TypeVar("T")
READ_ATTEMPTS = 8
LIST_LIMIT = 5


class _Swapped(Exception):
    """The catalogue changed while its entries were being read."""


MAP_CACHE_BYTES = 256 << 20


class _MapCache:
    """Recently read block maps, least recently used dropped first, bounded by their bytes."""

    def __init__(self, max_bytes: int = MAP_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._maps: OrderedDict[tuple, BlockMap] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _size(block_map: BlockMap) -> int:
        return block_map.keys.nbytes + block_map.counts.nbytes + block_map.first.nbytes

    def get(self, identity: tuple) -> BlockMap | None:
        with self._lock:
            found = self._maps.get(identity)
            if found is not None:
                self._maps.move_to_end(identity)
            return found

    def put(self, identity: tuple, block_map: BlockMap) -> None:
        size = self._size(block_map)
        if size > self.max_bytes // 4:  # one huge map would evict everything else
            return
        for array in (block_map.keys, block_map.counts, block_map.first):
            array.flags.writeable = False  # shared between callers from now on
        with self._lock:
            if identity in self._maps:
                return
            self._maps[identity] = block_map
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._maps.popitem(last=False)
                self._bytes -= self._size(dropped)


class Store:
    """An open sketch index. Use :func:`store.open_store` to get one."""

    def __init__(self, client, url: str, embedded=None):
        self.client = client
        self.url = url  # printable: never holds a password
        self.is_cluster = client.__class__.__name__ == "RedisCluster"
        self._embedded = embedded
        self._map_cache = _MapCache()
        if embedded is not None:
            atexit.register(self.close)

    # -- configuration -------------------------------------------------------------------------

    def config(self) -> config_mod.IndexConfig | None:
        """The index configuration, or None for an empty index."""
        with store_errors(self.url, "reading the index config"):
            data = self.client.get(keys.CONFIG)
        return None if data is None else config_mod.decode(data)

    def check_block_size(self, block_size: int | None) -> int:
        """The index's block size; BlockSizeMismatch if ``block_size`` differs; NotFound if the index is empty."""
        return config_mod.check_block_size(self.config(), block_size)

    def ensure_config(self, block_size: int, algorithm: str = "md5",
                      fp_rate: float | None = None) -> config_mod.IndexConfig:
        """The index configuration, created with these values if the index is new; checked otherwise."""
        existing = self.config()
        if existing is None:
            proposed = config_mod.new_config(block_size, algorithm, fp_rate or config_mod.DEFAULT_FP_RATE)
            with store_errors(self.url, "creating the index config"):
                self.client.set(keys.CONFIG, config_mod.encode(proposed), nx=True)
            existing = self.config()
        config_mod.check_block_size(existing, block_size)
        if existing.algorithm != algorithm:
            raise FormatError(f"the index uses digest {existing.algorithm}, not {algorithm}")
        return existing

    # -- catalogues ----------------------------------------------------------------------------

    def host_names(self) -> list[str]:
        """Hosts that have published a catalogue, sorted."""
        return sorted(self.catalogues())

    def catalogue(self, host: str) -> Catalogue | None:
        """The published catalogue of ``host``, or None if it has none."""
        keys.check_host(host)
        with store_errors(self.url, f"reading the catalogue of host {host}"):
            data = self.client.get(keys.catalogue(host))
        return None if data is None else catalogue_mod.decode(data, host)

    def catalogues(self, hosts: list[str] | None = None) -> dict[str, Catalogue]:
        """Published catalogues of ``hosts`` (default: every host), fetched in one pipeline."""
        with store_errors(self.url, "listing hosts"):
            if hosts is None:
                hosts = sorted(name.decode("utf-8", "surrogateescape") for name in self.client.smembers(keys.HOSTS))
            for host in hosts:
                keys.check_host(host)
            pipe = self.client.pipeline(transaction=False)
            for host in hosts:
                pipe.get(keys.catalogue(host))
            found = pipe.execute() if hosts else []
        return {host: catalogue_mod.decode(data, host) for host, data in zip(hosts, found) if data is not None}

    def _require(self, host: str) -> Catalogue:
        found = self.catalogue(host)
        if found is None:
            names = self.host_names()
            known = ", ".join(names[:LIST_LIMIT]) + (" ..." if len(names) > LIST_LIMIT else "")
            raise NotFound(f"host {host} is not in the index" + (f" (indexed: {known})" if names else
                                                                  " (the index is empty)"))
        return found

    @staticmethod
    def _entry(catalogue: Catalogue, path: str) -> ImageEntry:
        entry = catalogue.image(path)
        if entry is None:
            entry = catalogue.image(os.path.normpath(path))
        if entry is None:
            matches = [e for e in catalogue.images if os.path.basename(e.path) == path]
            if len(matches) == 1:
                entry = matches[0]
        if entry is None:
            names = [e.path for e in catalogue.images]
            known = ", ".join(names[:LIST_LIMIT]) + (" ..." if len(names) > LIST_LIMIT else "")
            raise NotFound(f"no image {path} on host {catalogue.host}" +
                           (f" (indexed: {known})" if names else " (it has no images)"))
        return entry

    def _consistent(self, host: str, read: Callable[[Catalogue], T]) -> T:
        """``read(catalogue)`` against one generation, retrying if a refresh swapped it meanwhile."""
        for _ in range(READ_ATTEMPTS):
            current = self._require(host)
            try:
                return read(current)
            except _Swapped:
                continue
        raise FormatError(f"host {host} changed {READ_ATTEMPTS} times while being read; try again")

    def _fetch(self, catalogue: Catalogue, names: list[str], doing: str) -> list[bytes]:
        """GET ``names`` (keys of ``catalogue``'s host); _Swapped or FormatError if one is missing."""
        with store_errors(self.url, doing):
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.get(name)
            values = pipe.execute() if names else []
        missing = [name for name, value in zip(names, values) if value is None]
        if missing:
            now = self.catalogue(catalogue.host)
            if now is None or now.generation != catalogue.generation:
                raise _Swapped()
            raise FormatError(f"index entry {missing[0]} of host {catalogue.host} is missing; "
                              f"run `blocksketch index` on {catalogue.host} again")
        return values

    # -- listings ------------------------------------------------------------------------------

    def hosts(self) -> list[HostInfo]:
        """Every indexed host, sorted by name."""
        return [HostInfo.from_catalogue(c) for c in self.catalogues().values()]

    def images(self, host: str | None = None) -> list[ImageInfo]:
        """Every indexed image of ``host`` (default: of every host), sorted by host and path."""
        catalogues = [self._require(host)] if host is not None else list(self.catalogues().values())
        return [ImageInfo.from_entry(c, e) for c in catalogues for e in sorted(c.images, key=lambda e: e.path)]

    def image(self, host: str, path: str) -> ImageInfo:
        """One indexed image; NotFound lists what the host holds."""
        current = self._require(host)
        return ImageInfo.from_entry(current, self._entry(current, path))

    # -- entries -------------------------------------------------------------------------------

    def _load_map(self, catalogue: Catalogue, entry: ImageEntry) -> BlockMap:
        # Entries are never rewritten in place (a refresh writes a new generation), so a map read
        # once stays true for its entry: a long-running reader (the service) keeps recent ones.
        identity = (catalogue.host, entry.path, entry.generation, entry.indexed_at, entry.distinct)
        cached = self._map_cache.get(identity)
        if cached is not None:
            return cached
        chunks = self._fetch(catalogue, entry.map_keys(catalogue.host), f"reading the block map of {entry.path}")
        block_map = decode_chunks(chunks, catalogue.block_size, entry.total_blocks, entry.zero_blocks,
                                  entry.distinct, f"index entry of {catalogue.host}:{entry.path}")
        self._map_cache.put(identity, block_map)
        return block_map

    def block_map(self, host: str, path: str) -> BlockMap:
        """The exact block map of one image, from Redis."""
        return self._consistent(host, lambda c: self._load_map(c, self._entry(c, path)))

    def host_block_maps(self, host: str) -> list[tuple[ImageInfo, BlockMap]]:
        """Block maps of all images of ``host``, all from one published generation."""
        def read(current: Catalogue) -> list[tuple[ImageInfo, BlockMap]]:
            return [(ImageInfo.from_entry(current, entry), self._load_map(current, entry))
                    for entry in sorted(current.images, key=lambda e: e.path)]
        return self._consistent(host, read)

    def _filter(self, data: bytes, m_bits: int, k: int, what: str):
        from sketch.bloom import BloomFilter

        if len(data) * 8 != m_bits:
            raise FormatError(f"{what} is corrupt ({len(data)} bytes, its entry says {m_bits // 8})")
        try:
            return BloomFilter.from_bytes(data, m_bits, k)
        except FormatError as exc:
            raise FormatError(f"{what}: {exc}") from None

    def image_filter(self, host: str, path: str):
        """The Bloom filter of one image's distinct non-zero digests."""
        def read(current: Catalogue):
            entry = self._entry(current, path)
            (data,) = self._fetch(current, [entry.filter_key(host)], f"reading the filter of {entry.path}")
            k = self._k(current)
            return self._filter(data, entry.filter_m_bits, k, f"filter of {host}:{entry.path}")
        return self._consistent(host, read)

    def _k(self, current: Catalogue) -> int:
        sketch = current.sketches.get(HOST_FILTER)
        if sketch is not None and isinstance(sketch.params.get("k"), int):
            return sketch.params["k"]
        found = self.config()
        if found is None:
            raise FormatError("the index config is missing while hosts are indexed")
        return found.k

    def host_sketch(self, host: str, name: str) -> tuple[bytes, dict]:
        """A per-host sketch's stored bytes and parameters (see :mod:`store.sketches`)."""
        def read(current: Catalogue) -> tuple[bytes, dict]:
            sketch = current.sketches.get(name)
            if sketch is None:
                raise NotFound(f"host {host} has no {name!r} sketch; run `blocksketch index` on it again")
            (data,) = self._fetch(current, [sketch.key(host)], f"reading the {name} sketch of {host}")
            if len(data) != sketch.size_bytes:
                raise FormatError(f"{name} sketch of host {host} is corrupt ({len(data)} bytes, "
                                  f"its entry says {sketch.size_bytes})")
            return data, dict(sketch.params)
        return self._consistent(host, read)

    def host_filter(self, host: str):
        """The Bloom filter of the union of ``host``'s images."""
        data, params = self.host_sketch(host, HOST_FILTER)
        return self._filter(data, _param(params, "m_bits", host), _param(params, "k", host), f"filter of host {host}")

    def host_filters(self, hosts: list[str] | None = None) -> dict[str, object]:
        """Bloom filters of several hosts (default: all), catalogues and bitmaps each fetched in one pipeline."""
        catalogues = self.catalogues(hosts)
        for host in hosts or ():
            if host not in catalogues:
                raise NotFound(f"host {host} is not in the index")
        wanted = []
        for host, current in catalogues.items():
            sketch = current.sketches.get(HOST_FILTER)
            if sketch is None:
                raise NotFound(f"host {host} has no filter; run `blocksketch index` on it again")
            wanted.append((host, sketch))
        with store_errors(self.url, "reading host filters"):
            pipe = self.client.pipeline(transaction=False)
            for host, sketch in wanted:
                pipe.get(sketch.key(host))
            values = pipe.execute() if wanted else []
        result = {}
        for (host, sketch), data in zip(wanted, values):
            if data is None:  # a refresh swapped this host meanwhile: read its new generation
                result[host] = self.host_filter(host)
            else:
                result[host] = self._filter(data, _param(sketch.params, "m_bits", host),
                                            _param(sketch.params, "k", host), f"filter of host {host}")
        return dict(sorted(result.items()))

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; the embedded server stops when its last user closes."""
        client, self.client = self.client, None
        if client is not None:
            client.close()
        embedded, self._embedded = self._embedded, None
        if embedded is not None:
            atexit.unregister(self.close)
            embedded.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _param(params: dict, name: str, host: str) -> int:
    value = params.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise FormatError(f"catalogue of host {host} is corrupt (filter field {name!r})")
    return value
