"""The refresh job: index one host's images into the store, incrementally and atomically.

One refresh of a host, under the host's lock (:mod:`store.lock`):

1. Delete what an interrupted refresh left: keys named in the host's ``pending`` set (written,
   never published) and ``garbage`` set (unpublished already, not yet deleted).
2. Compare the images under the given roots (:func:`scan_images`) with the published catalogue:
   an image whose size, mtime_ns and inode are unchanged keeps its entry (``reused``); a new or
   changed one is digested and written under keys of a fresh generation (each key first named in
   ``pending``); an entry of these roots (under one, or found through one) that the walk no longer
   reaches is dropped. Entries of other roots stay as they are. A root that is missing, or holds
   no image while the host has entries of it, stops the refresh (:class:`EmptyRoot`) unless the
   caller allows it: an unmounted disk must not read as "every image deleted".
3. If any entry changed, rebuild the host sketches (its Bloom filter, and any registered in
   :mod:`store.sketches`) from the union of all its images' block maps.
4. Publish with one script, atomic even on a cluster (every key of the host shares its slot):
   check the lock is still ours and every referenced entry exists, replace the catalogue, forget
   ``pending``, name the now unreferenced keys in ``garbage``.
5. Delete the garbage.

:func:`forget_images` drops entries (or a whole host) by the same steps 1, 3, 4 and 5.

A refresh killed at any point leaves the previous catalogue and all its entries whole; the next
refresh of the host removes the leftovers and finishes the job.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sketch.blockmap import KEY_DTYPE, BlockMap, lexsort_keys
from sketch.blocks import detect_format, walk_images
from sketch.digests import DEFAULT_ALGORITHM, data_bytes, digest_image
from sketch.errors import BlocksketchError, FormatError, ImageError, NotFound, StoreError
from sketch.progress import Phases, Progress, start_phase

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
_DROP_CATALOGUE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('BSLOCKLOST') end
redis.call('DEL', KEYS[2])
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
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): files the walk passed over
    bytes_read: int = 0
    distinct_blocks: int = 0
    sketches_rebuilt: bool = False
    lock_wait_s: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"host": self.host, "store": self.url, "block_size": self.block_size, "generation": self.generation,
                "images": self.images, "indexed": self.indexed, "reused": self.reused, "removed": self.removed,
                "failed": [{"path": p, "error": e} for p, e in self.failed],
                "skipped": len(self.skipped), "skipped_by_reason": self.skipped_by_reason(),
                "bytes_read": self.bytes_read,
                "distinct_blocks": self.distinct_blocks, "sketches_rebuilt": self.sketches_rebuilt,
                "lock_wait_s": round(self.lock_wait_s, 3), "seconds": round(self.seconds, 3)}

    def skipped_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, reason in self.skipped:
            counts[reason] = counts.get(reason, 0) + 1
        return counts


class EmptyRoot(ImageError):
    """A root given to a refresh is missing, or holds no image while the host has entries of it."""


NOT_UTF8 = "name is not UTF-8"


@dataclass(frozen=True)
class _File:
    path: str
    size_bytes: int
    mtime_ns: int
    inode: int
    device: int
    root: str  # the real root whose walk found it


@dataclass
class Scan:
    """What a refresh found under its roots."""

    targets: list[str]  # the real roots
    files: list[_File]  # image files, by real path, each once
    skipped: list[tuple[str, str]]  # (path, reason)
    missing: list[str]  # roots that do not exist


def scan_images(paths: list[str], follow_symlinks: bool = False, allow_missing: bool = False) -> Scan:
    """The image files under ``paths`` (files or directories), each by its real path, stat'ed once.

    A symlink below a root is followed only into one of the roots, unless ``follow_symlinks``: an
    image reached through one is indexed by its real path. Files whose real path is not UTF-8 are
    skipped (an index path is UTF-8 everywhere it travels: catalogue, manifest, JSON). A missing
    root raises ImageError, or with ``allow_missing`` is listed in ``missing``.
    """
    targets = [os.path.realpath(p) for p in paths]
    files: dict[str, _File] = {}
    scan = Scan(targets, [], [], [])
    for target in targets:
        if not os.path.lexists(target):
            if not allow_missing:
                raise EmptyRoot(f"{target} does not exist (is its storage mounted?); nothing changed")
            scan.missing.append(target)
            continue
        listing = walk_images(target, within=None if follow_symlinks else targets)
        scan.skipped.extend(listing.skipped)
        for candidate in listing.images:
            real = os.path.realpath(candidate)
            try:
                real.encode("utf-8")
            except UnicodeEncodeError:
                scan.skipped.append((real, NOT_UTF8))
                continue
            try:
                info = os.stat(real)
            except OSError:
                continue  # vanished while listing: the next refresh sees the truth
            if (stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode)) and real not in files:
                if stat.S_ISREG(info.st_mode) and info.st_size == 0:
                    continue
                files[real] = _File(real, info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev, target)
    scan.files = sorted(files.values(), key=lambda f: f.path)
    return scan


def _under(path: str, targets: list[str]) -> bool:
    return any(path == t or path.startswith(t.rstrip("/") + "/") for t in targets)


def _owned_by(entry: ImageEntry, root: str) -> bool:
    """Whether a refresh of ``root`` judges ``entry``: it lies under the root, or was found through it."""
    return _under(entry.path, [root]) or entry.root == root


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

    def __init__(self, store: Store, host: str, block_size: int, progress, phases, fp_rate, lock_wait_s,
                 image_format: str | None = None, backing_dirs: tuple[str, ...] = ()):
        self.backing_dirs = tuple(backing_dirs)
        self.store = store
        self.image_format = image_format
        self.client = store.client
        self.url = store.url
        self.host = keys.check_host(host)
        self.block_size = block_size
        self.progress = progress
        self.phases = phases
        self.fp_rate = fp_rate
        self.lock_wait_s = lock_wait_s
        self.report = RefreshReport(host, store.url, block_size)

    def run(self, paths: list[str], follow_symlinks: bool = False, allow_empty: bool = False) -> RefreshReport:
        started = time.monotonic()
        config = self.store.ensure_config(self.block_size, DEFAULT_ALGORITHM, self.fp_rate)
        scan = scan_images(paths, follow_symlinks, allow_missing=allow_empty)
        self.report.skipped = scan.skipped
        with HostLock(self.client, self.url, self.host, wait_s=self.lock_wait_s) as lock:
            self.lock = lock
            self.report.lock_wait_s = lock.waited_s
            with store_errors(self.url, f"refreshing host {self.host}"):
                self.client.sadd(keys.HOSTS, self.host)
                self._delete_leftovers()
                old = self._old_catalogue()
            if old is not None and not allow_empty:
                self._check_roots(old, scan)
            with store_errors(self.url, f"refreshing host {self.host}"):
                generation = int(self.client.incr(keys.generation_counter(self.host)))
            try:
                new = self._build(config, generation, old, scan.targets, scan.files)
                start_phase(self.phases, "publish")
                self._publish(old, new)
            except BaseException:
                self._forget_pending()
                raise
            self._collect_garbage()
        self.report.seconds = time.monotonic() - started
        return self.report

    # -- steps ---------------------------------------------------------------------------------

    def _check_roots(self, old: Catalogue, scan: Scan) -> None:
        """Refuse a root that holds no image while the host has entries of it (not mounted?)."""
        for root in scan.targets:
            if any(f.root == root or _under(f.path, [root]) for f in scan.files):
                continue
            held = [e.path for e in old.images if _owned_by(e, root)]
            if held:
                raise EmptyRoot(f"{root} holds no image, but host {self.host} has {len(held)} indexed under it "
                                f"(is its storage mounted?); nothing changed")

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
            if not any(_owned_by(entry, t) for t in targets):
                entries[path] = entry  # another tree of this host: not ours to judge
            elif path not in on_disk:
                self.report.removed.append(path)
        to_read = []
        for found in files:
            entry = old_images.get(found.path)
            if entry is not None and entry.unchanged(found.size_bytes, found.mtime_ns, found.inode) \
                    and entry.device in (None, found.device) and self._same_format(entry):
                # Entries of older refreshes learn their device and root without being read again.
                entries[found.path] = dataclasses.replace(entry, device=found.device, root=found.root)
                self.report.reused += 1
            else:
                to_read.append(found)
        progress = self.progress
        if self.phases is not None:
            shown = start_phase(self.phases, "digest", sum(self._data_bytes(f.path) for f in to_read))
            progress = _both(self.progress, shown)
        fresh: dict[str, BlockMap] = {}
        for found in to_read:
            try:
                image_format = self.image_format or detect_format(found.path)
                digests = digest_image(found.path, self.block_size, config.algorithm, image_format=image_format,
                                       progress=progress, backing_dirs=self.backing_dirs)
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
            start_phase(self.phases, "host sketches")
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
            return data_bytes(path, self.block_size, self.image_format, self.backing_dirs)
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
                          int(bloom.m_bits), int(bloom.popcount()), image_format, found.device, found.root)

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
                 phases: Phases | None = None, fp_rate: float | None = None,
                 lock_wait_s: float = DEFAULT_WAIT_S, image_format: str | None = None,
                 backing_dirs: tuple[str, ...] = (), follow_symlinks: bool = False,
                 allow_empty: bool = False) -> RefreshReport:
    """Index the images under ``paths`` as ``host``'s (files or directories), then publish atomically.

    ``progress(n)`` is called with bytes digested; ``phases`` hears each step start (digest, with
    the bytes to read; host sketches; publish).
    ``fp_rate`` sets the filters' false-positive rate of a new index (an existing one keeps its own).
    ``image_format`` ("raw" or "qcow2") reads every image as that format; None detects each by its
    magic. The format read is recorded in the image's entry, and an unchanged file whose recorded
    format differs from the one asked for now is read again. ``backing_dirs``: where else qcow2
    backing files may lie (:func:`sketch.qcow2.backing_roots`); ``follow_symlinks``: follow
    symlinks out of ``paths`` too; ``allow_empty``: a missing or empty root drops its entries
    instead of raising :class:`EmptyRoot`.
    """
    return _Refresh(store, host, block_size, progress, phases, fp_rate, lock_wait_s, image_format,
                    backing_dirs).run(paths, follow_symlinks, allow_empty)


def _both(first: Progress | None, second: Progress | None) -> Progress | None:
    if first is None or second is None:
        return first or second

    def report(done: int) -> None:
        first(done)
        second(done)

    return report


@dataclass
class ForgetReport:
    """What one ``forget`` did."""

    host: str
    url: str
    removed: list[str] = field(default_factory=list)  # paths of the entries dropped
    images: int = 0  # images left in the host's catalogue
    whole_host: bool = False  # the host is gone from the index
    generation: int = 0  # of the catalogue published (0: none, the host was forgotten whole)

    def to_dict(self) -> dict:
        return {"host": self.host, "store": self.url, "removed": self.removed, "images": self.images,
                "whole_host": self.whole_host, "generation": self.generation}


class _Forget(_Refresh):
    """Drop index entries without reading any image: the refresh's publish, with entries left out."""

    def __init__(self, store: Store, host: str, lock_wait_s: float):
        super().__init__(store, host, 0, None, None, None, lock_wait_s)
        self.forgotten = ForgetReport(self.host, store.url)

    def run(self, paths: list[str] | None) -> ForgetReport:  # type: ignore[override]
        with HostLock(self.client, self.url, self.host, wait_s=self.lock_wait_s) as lock:
            self.lock = lock
            with store_errors(self.url, f"forgetting host {self.host}"):
                self._delete_leftovers()
                old = self._old_catalogue()
            if paths is None:
                self._drop_host(old)
            else:
                self._drop_images(old, paths)
        if paths is None:
            with store_errors(self.url, f"forgetting host {self.host}"):
                # Another slot than the host's keys: after the catalogue is gone, so a kill between
                # the two leaves a name without a catalogue, which readers ignore and a rerun removes.
                self.client.srem(keys.HOSTS, self.host)
        return self.forgotten

    def _drop_host(self, old: Catalogue | None) -> None:
        with store_errors(self.url, f"forgetting host {self.host}"):
            if old is None and not self.client.sismember(keys.HOSTS, self.host):
                raise NotFound(f"host {self.host} is not in the index")
            self.lock.check()
            try:
                self.client.register_script(_DROP_CATALOGUE)(
                    keys=[keys.lock(self.host), keys.catalogue(self.host)], args=[self.lock.token])
            except Exception as exc:
                if "BSLOCKLOST" in str(exc):
                    raise StoreError(f"lost the lock of host {self.host} at {self.url}; nothing was forgotten, "
                                     "rerun") from None
                raise
            # Readers start at the catalogue, now gone: every other key of the host is unreachable.
            self._wipe_host()
            self.client.delete(keys.generation_counter(self.host))
        self.forgotten.removed = [e.path for e in old.images] if old else []
        self.forgotten.whole_host = True

    def _drop_images(self, old: Catalogue | None, paths: list[str]) -> None:
        if old is None:
            raise NotFound(f"host {self.host} is not in the index")
        dropped = {self._find(old, path) for path in paths}
        config = self.store.config()
        if config is None:
            raise FormatError("the index config is missing while hosts are indexed")
        with store_errors(self.url, f"forgetting images of host {self.host}"):
            generation = int(self.client.incr(keys.generation_counter(self.host)))
        try:
            images = tuple(e for e in old.images if e.path not in dropped)
            sketches, distinct = self._write_host_sketches(config, generation, old, images, {})
            from sketch.bloom import LAYOUT_VERSION

            new = Catalogue(self.host, generation, time.time(), config.block_size, config.algorithm, distinct,
                            images, sketches, LAYOUT_VERSION)
            self._publish(old, new)
        except BaseException:
            self._forget_pending()
            raise
        self._collect_garbage()
        self.forgotten.removed = sorted(dropped)
        self.forgotten.images = len(images)
        self.forgotten.generation = generation

    def _find(self, old: Catalogue, path: str) -> str:
        """The catalogue path ``path`` names: as written, or made absolute (never guessed by basename)."""
        for candidate in (path, os.path.abspath(path), os.path.realpath(path)):
            if old.image(candidate) is not None:
                return candidate
        names = [e.path for e in old.images]
        known = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        raise NotFound(f"no image {path} on host {self.host}" + (f" (indexed: {known})" if names else
                                                                 " (it has no images)"))


def forget_images(store: Store, host: str, paths: list[str] | None = None, *,
                  lock_wait_s: float = DEFAULT_WAIT_S) -> ForgetReport:
    """Drop the entries of ``paths`` from ``host``'s index, or the whole host when None, atomically.

    Under the host's lock, like a refresh: readers see the previous catalogue until the new one
    (without those entries, host sketches rebuilt from the rest) is published whole. Forgetting the
    whole host deletes its catalogue first, then every key of it, then its name in the hosts set.
    No image is read: the files may well be gone.
    """
    return _Forget(store, host, lock_wait_s).run(paths)
