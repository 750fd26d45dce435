"""The refresh job: index one host's images into the store, incrementally and atomically.

One refresh of a host, under the host's lock (:mod:`store.lock`):

1. Delete what an interrupted refresh left: keys named in the host's ``pending`` set (written,
   never published) and ``garbage`` set (unpublished already, not yet deleted).
2. Compare the files under the given paths with the published catalogue: an image whose size,
   mtime_ns and inode are unchanged keeps its entry (``reused``); a new or changed one is digested
   and written under keys of a fresh generation (each key first named in ``pending``); an entry
   whose file is gone from under the paths is dropped. Entries outside the paths stay as they are.
3. If any entry changed, rebuild the host sketches (its Bloom filter, and any registered in
   :mod:`store.sketches`) from the union of all its images' block maps.
4. Publish with one script, atomic even on a cluster (every key of the host shares its slot):
   check the lock is still ours and every referenced entry exists, replace the catalogue, forget
   ``pending``, name the now unreferenced keys in ``garbage``.
5. Delete the garbage.

A refresh killed at any point leaves the previous catalogue and all its entries whole; the next
refresh of the host removes the leftovers and finishes the job.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sketch.blockmap import KEY_DTYPE, BlockMap, lexsort_keys
from sketch.blocks import detect_format, list_images
from sketch.digests import DEFAULT_ALGORITHM, data_bytes, digest_image
from sketch.errors import BlocksketchError, FormatError, ImageError, StoreError

from . import catalogue as catalogue_mod
from . import keys
from .catalogue import Catalogue, ImageEntry, SketchEntry
from .chunks import chunk_count, encode_chunks
from .connect import store_errors
from .lock import DEFAULT_WAIT_S, HostLock
from .reader import Store
from .sketches import HOST_SKETCHES, HostUnion, build_host_sketches

UNLINK_BATCH = 500

_PUBLISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('BSLOCKLOST') end
for i = 5, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return redis.error_reply('BSMISSING ' .. KEYS[i]) end
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[3])
for i = 3, #ARGV do redis.call('SADD', KEYS[4], ARGV[i]) end
return 1
"""
_FORGET = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local names = redis.call('SMEMBERS', KEYS[2])
for i = 1, #names, 500 do redis.call('UNLINK', unpack(names, i, math.min(i + 499, #names))) end
redis.call('DEL', KEYS[2])
return 1
"""


@dataclass
class RefreshReport:
    """What one refresh did."""

    host: str
    url: str
    block_size: int
    generation: int = 0
    images: int = 0  # images in the published catalogue
    indexed: list[str] = field(default_factory=list)  # images digested by this refresh
    reused: int = 0  # unchanged images whose entries were kept without reading them
    removed: list[str] = field(default_factory=list)  # entries dropped: their files are gone
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): kept their old entry if any
    bytes_read: int = 0
    distinct_blocks: int = 0
    sketches_rebuilt: bool = False
    lock_wait_s: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"host": self.host, "store": self.url, "block_size": self.block_size, "generation": self.generation,
                "images": self.images, "indexed": self.indexed, "reused": self.reused, "removed": self.removed,
                "failed": [{"path": p, "error": e} for p, e in self.failed], "bytes_read": self.bytes_read,
                "distinct_blocks": self.distinct_blocks, "sketches_rebuilt": self.sketches_rebuilt,
                "lock_wait_s": round(self.lock_wait_s, 3), "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class _File:
    path: str
    size_bytes: int
    mtime_ns: int
    inode: int


def scan_images(paths: list[str]) -> tuple[list[str], list[_File]]:
    """The absolute real ``paths`` and the non-empty image files under them, each stat'ed once."""
    targets = [os.path.realpath(p) for p in paths]
    files: dict[str, _File] = {}
    for target in targets:
        for candidate in list_images(target, require_images=False):
            real = os.path.realpath(candidate)
            try:
                info = os.stat(real)
            except OSError:
                continue  # vanished while listing: the next refresh sees the truth
            if (stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode)) and real not in files:
                if stat.S_ISREG(info.st_mode) and info.st_size == 0:
                    continue
                files[real] = _File(real, info.st_size, info.st_mtime_ns, info.st_ino)
    return targets, sorted(files.values(), key=lambda f: f.path)


def _under(path: str, targets: list[str]) -> bool:
    return any(path == t or path.startswith(t.rstrip("/") + "/") for t in targets)


def host_union(block_maps: list[BlockMap]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys of several block maps and, per key, its count summed over them."""
    maps = [m for m in block_maps if len(m.keys)]
    if not maps:
        return np.zeros((0, 2), dtype=KEY_DTYPE), np.zeros(0, dtype=np.uint64)
    all_keys = np.concatenate([m.keys for m in maps])
    all_counts = np.concatenate([m.counts.astype(np.uint64) for m in maps])
    order = lexsort_keys(all_keys)
    all_keys, all_counts = all_keys[order], all_counts[order]
    differs = np.any(all_keys[1:] != all_keys[:-1], axis=1)
    starts = np.concatenate(([0], np.flatnonzero(differs) + 1))
    return np.ascontiguousarray(all_keys[starts]), np.add.reduceat(all_counts, starts)


class _Refresh:
    """One refresh of one host; see the module docstring for the steps."""

    def __init__(self, store: Store, host: str, block_size: int, progress, on_plan, fp_rate, lock_wait_s,
                 image_format: str | None = None):
        self.store = store
        self.image_format = image_format
        self.client = store.client
        self.url = store.url
        self.host = keys.check_host(host)
        self.block_size = block_size
        self.progress = progress
        self.on_plan = on_plan
        self.fp_rate = fp_rate
        self.lock_wait_s = lock_wait_s
        self.report = RefreshReport(host, store.url, block_size)

    def run(self, paths: list[str]) -> RefreshReport:
        started = time.monotonic()
        config = self.store.ensure_config(self.block_size, DEFAULT_ALGORITHM, self.fp_rate)
        targets, files = scan_images(paths)
        with HostLock(self.client, self.url, self.host, wait_s=self.lock_wait_s) as lock:
            self.lock = lock
            self.report.lock_wait_s = lock.waited_s
            with store_errors(self.url, f"refreshing host {self.host}"):
                self.client.sadd(keys.HOSTS, self.host)
                self._delete_leftovers()
                old = self._old_catalogue()
                generation = int(self.client.incr(keys.generation_counter(self.host)))
            try:
                new = self._build(config, generation, old, targets, files)
                self._publish(old, new)
            except BaseException:
                self._forget_pending()
                raise
            self._collect_garbage()
        self.report.seconds = time.monotonic() - started
        return self.report

    # -- steps ---------------------------------------------------------------------------------

    def _old_catalogue(self) -> Catalogue | None:
        try:
            return self.store.catalogue(self.host)
        except FormatError:
            # A damaged catalogue cannot say which keys are the host's: drop them all and rebuild.
            self._wipe_host()
            return None

    def _build(self, config, generation: int, old: Catalogue | None, targets: list[str],
               files: list[_File]) -> Catalogue:
        old_images = {e.path: e for e in old.images} if old else {}
        on_disk = {f.path for f in files}
        entries: dict[str, ImageEntry] = {}
        for path, entry in old_images.items():
            if not _under(path, targets):
                entries[path] = entry  # another tree of this host: not ours to judge
            elif path not in on_disk:
                self.report.removed.append(path)
        to_read = []
        for found in files:
            entry = old_images.get(found.path)
            if entry is not None and entry.unchanged(found.size_bytes, found.mtime_ns, found.inode) \
                    and self._same_format(entry):
                entries[found.path] = entry
                self.report.reused += 1
            else:
                to_read.append(found)
        if self.on_plan:
            self.on_plan(sum(self._data_bytes(f.path) for f in to_read))
        fresh: dict[str, BlockMap] = {}
        for found in to_read:
            try:
                image_format = self.image_format or detect_format(found.path)
                digests = digest_image(found.path, self.block_size, config.algorithm, image_format=image_format,
                                       progress=self.progress)
            except ImageError as exc:
                self.report.failed.append((found.path, str(exc)))
                if found.path in old_images:
                    entries[found.path] = old_images[found.path]
                continue
            block_map = BlockMap.from_digests(digests)
            entries[found.path] = self._write_image(config, generation, found, block_map, image_format)
            fresh[found.path] = block_map
            self.report.indexed.append(found.path)
            self.report.bytes_read += found.size_bytes
            self.lock.check()
        images = tuple(entries[p] for p in sorted(entries))
        self.report.images = len(images)
        self.report.generation = generation
        changed = old is None or [e.path for e in images] != [e.path for e in old.images] or bool(fresh)
        # Unchanged images: keep every stored sketch, unless one registered here is missing.
        if not changed and set(HOST_SKETCHES) <= set(old.sketches):
            sketches, distinct = old.sketches, old.distinct_blocks
        else:
            sketches, distinct = self._write_host_sketches(config, generation, old, images, fresh)
            self.report.sketches_rebuilt = True
        self.report.distinct_blocks = distinct
        from sketch.bloom import LAYOUT_VERSION

        return Catalogue(self.host, generation, time.time(), config.block_size, config.algorithm, distinct,
                         images, sketches, LAYOUT_VERSION)

    def _same_format(self, entry: ImageEntry) -> bool:
        """Whether an unchanged file's entry was read as this refresh would read it (else re-read it)."""
        if self.image_format is None and entry.image_format is None:
            return True  # both detected by magic, on the same bytes
        try:
            wanted = self.image_format or detect_format(entry.path)
            recorded = entry.image_format or detect_format(entry.path)
        except ImageError:
            return False  # unreadable now: reading it again reports why
        return wanted == recorded

    def _data_bytes(self, path: str) -> int:
        try:
            return data_bytes(path, self.block_size, self.image_format)
        except BlocksketchError:
            return 0

    def _write_image(self, config, generation: int, found: _File, block_map: BlockMap,
                     image_format: str) -> ImageEntry:
        from sketch.bloom import BloomFilter

        image = keys.image_id(found.path)
        bloom = BloomFilter.from_keys(block_map.keys, config.fp_rate, k=config.k)
        chunks = chunk_count(len(block_map.keys))
        names = keys.map_chunks(self.host, generation, image, chunks)
        filter_key = keys.image_filter(self.host, generation, image)
        with store_errors(self.url, f"writing the index entry of {found.path}"):
            # One round trip per chunk keeps client memory at one chunk; the key is named in
            # `pending` before it is written, so a kill at any point leaves nothing unaccounted.
            for name, chunk in zip(names, encode_chunks(block_map)):
                pipe = self.client.pipeline(transaction=False)
                pipe.sadd(keys.pending(self.host), name)
                pipe.set(name, chunk)
                pipe.execute()
            pipe = self.client.pipeline(transaction=False)
            pipe.sadd(keys.pending(self.host), filter_key)
            pipe.set(filter_key, bloom.to_bytes())
            pipe.execute()
        return ImageEntry(found.path, image, generation, found.size_bytes, found.mtime_ns, found.inode,
                          block_map.total_blocks, block_map.zero_blocks, len(block_map.keys), chunks, time.time(),
                          int(bloom.m_bits), int(bloom.popcount()), image_format)

    def _write_host_sketches(self, config, generation: int, old: Catalogue | None, images: tuple[ImageEntry, ...],
                             fresh: dict[str, BlockMap]) -> tuple[dict[str, SketchEntry], int]:
        maps = []
        for entry in images:
            if entry.path in fresh:
                maps.append(fresh[entry.path])
            else:  # reused entry: its map is in Redis, published by an earlier refresh that we hold off
                maps.append(self.store._load_map(old, entry))
        union_keys, union_counts = host_union(maps)
        del maps
        built = build_host_sketches(HostUnion(self.host, config, union_keys, union_counts))
        sketches = {}
        with store_errors(self.url, f"writing the sketches of host {self.host}"):
            for name, (data, params) in built.items():
                key = keys.host_sketch(self.host, name, generation)
                pipe = self.client.pipeline(transaction=False)
                pipe.sadd(keys.pending(self.host), key)
                pipe.set(key, data)
                pipe.execute()
                sketches[name] = SketchEntry(name, generation, len(data), params)
        return sketches, len(union_keys)

    def _publish(self, old: Catalogue | None, new: Catalogue) -> None:
        self.lock.check()
        referenced = new.entry_keys()
        obsolete = sorted(set(old.entry_keys()) - set(referenced)) if old else []
        script = self.client.register_script(_PUBLISH)
        names = [keys.lock(self.host), keys.catalogue(self.host), keys.pending(self.host), keys.garbage(self.host),
                 *referenced]
        with store_errors(self.url, f"publishing host {self.host}"):
            try:
                script(keys=names, args=[self.lock.token, catalogue_mod.encode(new), *obsolete])
            except Exception as exc:
                text = str(exc)
                if "BSLOCKLOST" in text:
                    raise StoreError(f"lost the refresh lock of host {self.host} at {self.url} before "
                                     "publishing; nothing was published, rerun") from None
                if "BSMISSING" in text:
                    raise StoreError(f"entries written by this refresh of host {self.host} vanished from "
                                     f"{self.url} (did Redis restart or evict keys?); nothing was published, "
                                     "rerun") from None
                raise

    def _forget_pending(self) -> None:
        """Best effort after a failure: delete what this refresh wrote (the next refresh would anyway).

        Only while the lock is still ours: otherwise `pending` may name another refresh's keys.
        """
        try:
            self.client.register_script(_FORGET)(keys=[keys.lock(self.host), keys.pending(self.host)],
                                                 args=[self.lock.token])
        except Exception:  # the original failure matters more; leftovers stay named in `pending`
            pass

    def _delete_leftovers(self) -> None:
        self._delete_set_members(keys.pending(self.host))
        self._delete_set_members(keys.garbage(self.host))

    def _collect_garbage(self) -> None:
        with store_errors(self.url, f"deleting old entries of host {self.host}"):
            self._delete_set_members(keys.garbage(self.host))

    def _delete_set_members(self, set_key: str) -> None:
        members = list(self.client.smembers(set_key))
        for start in range(0, len(members), UNLINK_BATCH):
            batch = members[start : start + UNLINK_BATCH]
            self.client.unlink(*batch)
            self.client.srem(set_key, *batch)
        self.client.delete(set_key)

    def _wipe_host(self) -> None:
        keep = {keys.lock(self.host).encode(), keys.generation_counter(self.host).encode()}
        found = [k for k in self.client.scan_iter(match=keys.host_pattern(self.host), count=1000) if k not in keep]
        for start in range(0, len(found), UNLINK_BATCH):
            self.client.unlink(*found[start : start + UNLINK_BATCH])


def refresh_host(store: Store, host: str, paths: list[str], block_size: int,
                 progress: Callable[[int], None] | None = None, *,
                 on_plan: Callable[[int], None] | None = None, fp_rate: float | None = None,
                 lock_wait_s: float = DEFAULT_WAIT_S, image_format: str | None = None) -> RefreshReport:
    """Index the images under ``paths`` as ``host``'s (files or directories), then publish atomically.

    ``progress(n)`` is called with bytes digested; ``on_plan(total)`` once with the bytes to read.
    ``fp_rate`` sets the filters' false-positive rate of a new index (an existing one keeps its own).
    ``image_format`` ("raw" or "qcow2") reads every image as that format; None detects each by its
    magic. The format read is recorded in the image's entry, and an unchanged file whose recorded
    format differs from the one asked for now is read again.
    """
    return _Refresh(store, host, block_size, progress, on_plan, fp_rate, lock_wait_s, image_format).run(paths)
