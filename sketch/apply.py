"""Rebuilding an image on the destination from a manifest, its bundles and the host's own images.

What is written, all into a temporary file next to the output (``.NAME.blocksketch-partial-PID``):

- every bundle's blocks, where they belong (bundle blocks take precedence over LOCAL copies:
  that is how a re-sent range repairs a stale local image);
- every LOCAL run, read from the local image *the destination's index lists* (resolved by
  :func:`resolve_local_sources`, never by a path taken from the manifest alone; read as the
  format the index recorded, raw or qcow2), written only once its verification group matched
  the group's strong hash (BLAKE3; SHA-256 in older manifests) from the manifest. Groups that
  fail are collected, and if there are any, apply stops, removes the temp file and writes a
  ranges file naming the blocks it still needs (``blocksketch pack IMAGE MANIFEST --ranges
  FILE`` turns it into a bundle);
- every DUP run, copied from the SEND blocks already in the file.

Then the file is cut to the exact size (ZERO runs stay holes), synced, and its whole-image
checksum compared with the manifest's; only then is it renamed to the output (after an optional
``qemu-img convert`` to qcow2, itself checked with ``qemu-img compare``).

With one bundle of SEND blocks (``pack``'s, or a migration stream's) nothing is written twice, so
the work overlaps the bundle's arrival: LOCAL groups are copied on a second thread while the
bundle is read, DUP runs are copied as soon as the bundle has passed them, and every 4 MiB
segment of the checksum is hashed (from the page cache) as soon as nothing more will be written
to it. What is left when the last bundle byte arrives is the tail of that work and the sync.
With several bundles (a repair) the steps run one after another: bundles, LOCAL, DUP, checksum.

A crash leaves only the clearly named temp file, which the next apply to the same output removes.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .blocks import FileIdentity, ImageSource, open_image, open_indexed
from .bundle import BundleReader, open_bundle
from .errors import ImageError, NotFound, UsageError, VerificationError
from .imagesum import SEGMENT_BYTES, leaf, root, segment_count, segments_touched, strong_hash, zero_leaves
from .manifest import DUP, LOCAL, SEND, ZERO, Manifest
from .output import check_output, create_exclusive
from .pids import pid_alive
from .progress import Phases, start_phase
from .ranges import blocks_below, clip_ranges, first_uncovered, merge_ranges, write_ranges_file

PARTIAL_TAG = ".blocksketch-partial-"
LOCAL_COPY_THREADS = 2
COPY_BYTES = 4 << 20
OUTPUT_FORMATS = ("raw", "qcow2")

Progress = Callable[[int], None]


class MissingBlocks(VerificationError):
    """Some LOCAL runs failed their strong-hash check; the blocks must be sent after all."""

    def __init__(self, start: np.ndarray, count: np.ndarray, ranges_file: str, block_size: int,
                 advice: str | None = None):
        self.start, self.count, self.ranges_file = start, count, ranges_file
        shown = ", ".join(f"{s}+{c}" for s, c in zip(start[:5].tolist(), count[:5].tolist()))
        more = f" and {len(start) - 5} more" if len(start) > 5 else ""
        blocks = int(count.sum())
        advice = advice or (f"on the source run `blocksketch pack IMAGE MANIFEST --ranges "
                            f"{os.path.basename(ranges_file)} -o EXTRA`, then apply again with EXTRA as an extra "
                            "bundle")
        super().__init__(
            f"{blocks} local block(s) ({blocks * block_size} bytes) did not match the source "
            f"(stale index or hash collision): ranges {shown}{more} (start+blocks); no output written. "
            f"Ranges saved to {ranges_file}: {advice}")


@dataclass
class ApplyResult:
    output: str
    size_bytes: int
    blocks: dict[str, int] = field(default_factory=dict)  # blocks written per source: bundle, local, dup
    local_bytes_read: int = 0
    missing: tuple[np.ndarray, np.ndarray] | None = None  # ranges of LOCAL blocks that failed verification


def resolve_local_images(manifest: Manifest, host: str, lookup: Callable[[str, str], object]) -> list[str]:
    """Paths of the manifest's local images, taken from ``host``'s own index entries.

    ``lookup(host, path)`` is ``store.image``: it returns the index entry or raises NotFound.
    Every image must be indexed on ``host`` with the identity the manifest recorded.
    """
    return [source.path for source in resolve_local_sources(manifest, host, lookup)]


@dataclass(frozen=True)
class LocalSource:
    """A local image as the destination's index entry gives it: where, read as what, and the file
    identity that what is opened there must still have (:func:`sketch.blocks.open_indexed`)."""

    path: str
    image_format: str | None  # as indexed; None: not recorded, detect by magic
    identity: FileIdentity


def resolve_local_sources(manifest: Manifest, host: str, lookup: Callable[[str, str], object]) -> list[LocalSource]:
    """The manifest's local images from ``host``'s own index entries, as :func:`resolve_local_images`;
    the format is the one the image was indexed as, so a block offset means the same bytes it meant
    to the index, and the identity the one it had then."""
    if host != manifest.host:
        raise UsageError(f"the manifest was built for host {manifest.host!r}, not {host!r}")
    paths = []
    for image in manifest.images:
        if image.host != host:
            raise UsageError(f"the manifest refers to image {image.path} of host {image.host!r}, not {host!r}")
        try:
            info = lookup(host, image.path)
        except NotFound:
            raise NotFound(f"image {image.path} is not in the index of host {host}; nothing written "
                           "(re-index it, or rebuild the manifest)") from None
        if not image.matches(info):
            raise VerificationError(f"image {image.path} on {host} was re-indexed or replaced since the manifest "
                                    "was built; nothing written (rebuild the manifest)")
        paths.append(LocalSource(str(info.path), getattr(info, "image_format", None), FileIdentity.of_entry(info)))
    return paths


def partial_path(output: str, pid: int | None = None) -> str:
    directory, name = os.path.split(os.path.abspath(output))
    return os.path.join(directory, f".{name}{PARTIAL_TAG}{os.getpid() if pid is None else pid}")


def clean_stale_partials(output: str) -> list[str]:
    """Remove temp files of earlier applies to ``output`` whose process is gone; return them."""
    removed = []
    prefix = partial_path(output, 0)[:-1]
    for path in glob.glob(glob.escape(prefix) + "*"):
        tail = path[len(prefix):].split(".")[0]
        if not (tail.isascii() and tail.isdigit()):
            continue
        pid = int(tail)
        if pid != os.getpid() and pid_alive(pid):
            continue
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def default_ranges_file(output: str) -> str:
    return os.path.abspath(output) + ".missing-ranges.json"


def apply_manifest(manifest: Manifest, bundles: list[str | BundleReader], output: str, local_paths: list[str],
                   force: bool = False, output_format: str = "raw", ranges_file: str | None = None,
                   progress: Progress | None = None, local_formats: list[str | None] | None = None,
                   local_identities: list[FileIdentity] | None = None, inputs: list[str] | tuple[str, ...] = (),
                   phases: Phases | None = None, backing_dirs: tuple[str, ...] = ()) -> ApplyResult:
    """Rebuild the manifest's image at ``output``; see the module docstring for the guarantees.

    ``bundles``: paths (``-`` for stdin) or readers already positioned at a bundle (a migration
    stream's). ``local_paths`` come from :func:`resolve_local_images` (one per ``manifest.images``);
    ``local_formats``, one per path, from :func:`resolve_local_sources` (None: detect by magic), and
    ``local_identities`` (each local image is read only if it is still that file; None: not checked).
    ``output`` replaces an existing file only with ``force``, and never one of the command's own
    files: the bundles, the local images, ``inputs`` (the manifest's or stream's file).
    ``phases`` hears when the final checks start (the checksum's tail and the sync, a conversion).
    ``backing_dirs``: where qcow2 local images' backing files may be besides their own directory.
    """
    if output_format not in OUTPUT_FORMATS:
        raise UsageError(f"unknown output format {output_format!r}; use one of {', '.join(OUTPUT_FORMATS)}")
    if len(local_paths) != len(manifest.images):
        raise UsageError("one local path per manifest image is needed")
    local_formats = list(local_formats) if local_formats is not None else [None] * len(local_paths)
    if len(local_formats) != len(local_paths):
        raise UsageError("one format (or None) per local path is needed")
    if not bundles:
        raise UsageError("at least one bundle is needed")
    if sum(1 for b in bundles if b == "-") > 1:
        raise UsageError("only one bundle can come from stdin")
    output = os.path.abspath(output)
    inputs = [*inputs, *local_paths, *(b for b in bundles if isinstance(b, str))]
    check_output(output, force=force, inputs=inputs)
    if ranges_file is not None:
        check_output(ranges_file, force=force, inputs=[*inputs, output], what="ranges file")
    ranges_file = ranges_file or default_ranges_file(output)
    clean_stale_partials(output)
    temp = partial_path(output)
    converted = temp + ".qcow2"
    handles = []
    try:
        readers = []
        for bundle in bundles:
            if isinstance(bundle, BundleReader):
                readers.append(bundle)
                continue
            handle, reader = open_bundle(bundle, manifest)
            handles.append(handle)
            readers.append(reader)
        covered = _check_coverage(manifest, readers)
        fd = create_exclusive(temp)
        try:
            result = ApplyResult(output, manifest.size_bytes)
            checksum = _Rebuild(fd, manifest, readers, covered, local_paths, local_formats, progress,
                                local_identities, phases, backing_dirs).run(result)
        finally:
            os.close(fd)
        for handle in handles:
            handle.close()
        handles.clear()
        if result.missing is not None:
            # Checked above when named; the default one is this output's own list, replaced each time.
            write_ranges_file(ranges_file, manifest.manifest_id, manifest.block_size, *result.missing, force=True)
            raise MissingBlocks(*result.missing, ranges_file, manifest.block_size)
        if checksum != manifest.checksum:
            raise VerificationError("the rebuilt image does not match the manifest's checksum; no output "
                                    "written (wrong bundle, or the source changed after packing)")
        final = temp
        if output_format == "qcow2":
            start_phase(phases, "convert to qcow2 and compare")
            _to_qcow2(temp, converted)
            final = converted
        check_output(output, force=force, inputs=inputs)  # it may have appeared meanwhile
        os.replace(final, output)
        _sync_directory(os.path.dirname(output))
        if ranges_file == default_ranges_file(output) and os.path.exists(ranges_file):
            os.unlink(ranges_file)  # a successful apply makes an earlier failure's list obsolete
        return result
    except OSError as exc:
        raise ImageError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        for handle in handles:
            handle.close()
        for path in (temp, converted):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _check_coverage(manifest: Manifest, readers) -> tuple[np.ndarray, np.ndarray]:
    """The merged block ranges the bundles cover; every SEND block must be among them.

    Interval arithmetic on the runs and ranges present: a manifest claiming a huge image costs no
    more than one describing a small one.
    """
    if readers:
        start = np.concatenate([r.start for r in readers])
        count = np.concatenate([r.count for r in readers])
    else:
        start = count = np.zeros(0, np.int64)
    covered = merge_ranges(start, count)
    send_start, send_length = (a.astype(np.int64) for a in manifest.runs_of(SEND))
    lacking = send_length - (blocks_below(*covered, send_start + send_length) - blocks_below(*covered, send_start))
    if lacking.any():
        run = int(np.flatnonzero(lacking)[0])
        first = first_uncovered(*covered, int(send_start[run]))
        raise UsageError(f"the bundles lack {int(lacking.sum())} of the blocks the source must send (first at "
                         f"block {first}); pass the bundle made by `blocksketch pack IMAGE MANIFEST`")
    return covered


class _Rebuild:
    """Writes every block of the image into ``fd`` and returns its whole-image checksum."""

    def __init__(self, fd: int, manifest: Manifest, readers: list[BundleReader], covered: tuple[np.ndarray, np.ndarray],
                 local_paths: list[str], local_formats: list[str | None], progress: Progress | None,
                 local_identities: list[FileIdentity] | None = None, phases: Phases | None = None,
                 backing_dirs: tuple[str, ...] = ()):
        self.fd = fd
        self.manifest = manifest
        self.readers = readers
        self.covered = covered
        self.local_paths = local_paths
        self.local_formats = local_formats
        self.local_identities = local_identities or [None] * len(local_paths)
        self.phases = phases
        self.backing_dirs = backing_dirs
        self._progress = progress
        self._progress_lock = threading.Lock()
        self.block_size = manifest.block_size
        start, length = (a.astype(np.int64) for a in manifest.runs_of(LOCAL))
        self.local_start, self.local_length = start, length
        self.covered_count = blocks_below(*covered, start + length) - blocks_below(*covered, start)
        self.group_end = np.cumsum(manifest.group_runs.astype(np.int64))
        self.group_begin = self.group_end - manifest.group_runs.astype(np.int64)
        needed = (self.covered_count < length).astype(np.int64)
        # Groups wholly covered by bundles need no local read at all.
        self.todo = (np.flatnonzero(np.add.reduceat(needed, self.group_begin) > 0) if len(self.group_begin)
                     else self.group_begin).tolist()
        dup_start, dup_length = manifest.runs_of(DUP)
        self.dup_start = dup_start.astype(np.int64).tolist()
        self.dup_end = (dup_start + dup_length).astype(np.int64).tolist()
        self.dup_origin = manifest.dup_origin.astype(np.int64).tolist()
        self.next_dup = 0
        self.dup_blocks = 0
        # Overlap only when no block is written twice: one bundle, none of whose blocks are LOCAL.
        self.overlap = len(readers) == 1 and not self.covered_count.any()
        self.segments = _SegmentHasher(fd, manifest, covered, incremental=self.overlap)
        self.cancel = threading.Event()

    def run(self, result: ApplyResult) -> bytes:
        counts = {"bundle": 0, "local": 0, "dup": 0}
        try:
            if self.overlap:
                with ThreadPoolExecutor(max_workers=1, thread_name_prefix="blocksketch-local-copies") as pool:
                    local = pool.submit(self._write_local)
                    local.add_done_callback(self._stop_if_failed)
                    try:
                        counts["bundle"] = self._write_bundles()
                    except BaseException:
                        self.cancel.set()
                        raise
                counts["local"], read, missing = local.result()
            else:
                counts["bundle"] = self._write_bundles()
                counts["local"], read, missing = self._write_local()
            if missing is None:
                self._copy_dups(self.manifest.total_blocks)
                start_phase(self.phases, "verify the whole image")
                counts["dup"] = self.dup_blocks
                self.segments.advance("bundle", self.manifest.total_blocks)
                os.ftruncate(self.fd, self.manifest.size_bytes)
                os.fsync(self.fd)
                checksum = self.segments.finish()
            else:
                checksum = b""
        finally:
            self.cancel.set()
            self.segments.close()
        result.blocks.update(counts)
        result.local_bytes_read = read
        result.missing = missing
        return checksum

    def _stop_if_failed(self, done) -> None:
        """A failed local copy stops the bundle loop; its error is the one raised."""
        if done.exception() is not None:
            self.cancel.set()

    def _report(self, done: int) -> None:
        if self._progress:
            with self._progress_lock:
                self._progress(done)

    def _write_bundles(self) -> int:
        block_size = self.block_size
        written = 0
        for reader in self.readers:
            for first, data in reader.placed():
                if self.cancel.is_set():
                    return written  # the local copies failed: their error is raised instead
                _pwrite_all(self.fd, data, first * block_size)
                blocks = len(data) // block_size
                written += blocks
                self._report(len(data))
                if self.overlap:
                    # Pieces arrive in block order: every SEND block before ``end`` is in the file.
                    end = first + blocks
                    self._copy_dups(end)
                    pending = self.dup_start[self.next_dup] if self.next_dup < len(self.dup_start) else end
                    self.segments.advance("bundle", min(end, pending))
        return written

    def _copy_dups(self, until_block: int) -> None:
        """Copy the DUP runs not copied yet that end at or before ``until_block``."""
        block_size = self.block_size
        per_piece = max(1, COPY_BYTES // block_size)
        while self.next_dup < len(self.dup_start) and self.dup_end[self.next_dup] <= until_block:
            first, origin = self.dup_start[self.next_dup], self.dup_origin[self.next_dup]
            count = self.dup_end[self.next_dup] - first
            for done in range(0, count, per_piece):
                n = min(per_piece, count - done)
                data = os.pread(self.fd, n * block_size, (origin + done) * block_size)
                if len(data) != n * block_size:
                    raise ImageError("cannot re-read the partial output")
                _pwrite_all(self.fd, data, (first + done) * block_size)
            self.dup_blocks += count
            self.next_dup += 1
            self._report(count * block_size)

    def _write_local(self) -> tuple[int, int, tuple[np.ndarray, np.ndarray] | None]:
        """Verify and write every LOCAL verification group; return (blocks written, bytes read, failed ranges).

        Groups are copied on ``LOCAL_COPY_THREADS`` threads (reads, the hash of a whole group and
        writes all release the GIL), each with its own readers of the local images; the writers'
        frontier advances in group order.
        """
        todo = self.todo
        opened: list[ImageSource] = []
        opened_lock = threading.Lock()
        per_thread = threading.local()

        def source_of(image: int) -> ImageSource:
            sources = getattr(per_thread, "sources", None)
            if sources is None:
                sources = per_thread.sources = {}
            source = sources.get(image)
            if source is None:
                source = sources[image] = _open_local(self.local_paths[image], self.local_formats[image],
                                                      self.local_identities[image], self.backing_dirs)
                with opened_lock:
                    opened.append(source)
            return source

        failed: list[tuple[int, int]] = []
        written = 0
        read = 0
        self.segments.advance("local", self._group_first_block(todo, 0))
        try:
            with ThreadPoolExecutor(max_workers=LOCAL_COPY_THREADS, thread_name_prefix="blocksketch-local") as pool:
                try:
                    results = pool.map(lambda group: self._copy_group(group, source_of), todo)
                    for position, (blocks, bytes_read, bad) in enumerate(results):
                        written += blocks
                        read += bytes_read
                        failed.extend(bad)
                        self.segments.advance("local", self._group_first_block(todo, position + 1))
                except BaseException:
                    self.cancel.set()  # the groups still queued return at once
                    raise
        finally:
            for source in opened:
                source.close()
        if failed:
            pairs = np.array(failed, dtype=np.int64)
            return written, read, merge_ranges(pairs[:, 0], pairs[:, 1])
        return written, read, None

    def _copy_group(self, group: int, source_of: Callable[[int], ImageSource]) -> tuple[int, int, list]:
        """Read one verification group's runs into one buffer, check its strong hash, write it if equal.

        Returns (blocks written, bytes read, the group's runs if it failed)."""
        if self.cancel.is_set():
            return 0, 0, []
        block_size = self.block_size
        manifest = self.manifest
        runs = range(int(self.group_begin[group]), int(self.group_end[group]))
        starts = self.local_start[runs.start : runs.stop].tolist()
        counts = self.local_length[runs.start : runs.stop].tolist()
        # One buffer and one hash update per group: runs are mostly 1-3 blocks, and hashing tiny
        # inputs keeps the GIL.
        buffer = memoryview(bytearray(sum(counts) * block_size))
        pieces = []
        at = 0
        for run, first, count in zip(runs, starts, counts):
            view = buffer[at : at + count * block_size]
            source_of(int(manifest.local_image[run])).read_into(int(manifest.local_block[run]) * block_size, view)
            if self.covered_count[run]:
                # Part of the run came in a bundle: verify the run as it will be written.
                for a, n in zip(*(x.tolist() for x in clip_ranges(*self.covered, first, first + count))):
                    a -= first
                    got = os.preadv(self.fd, [view[a * block_size : (a + n) * block_size]], (first + a) * block_size)
                    if got != n * block_size:
                        raise ImageError("cannot re-read the partial output")
            pieces.append((first, count, view))
            at += len(view)
        if strong_hash(manifest.group_hash_algorithm, buffer).digest() != manifest.group_hash[group].tobytes():
            return 0, len(buffer), [(first, count) for first, count, _ in pieces]
        for first, _, view in pieces:
            _pwrite_all(self.fd, view, first * block_size)
        self._report(len(buffer))
        return sum(counts), len(buffer), []

    def _group_first_block(self, todo: list[int], position: int) -> int:
        """The first block of the ``position``-th group to copy (the image's end after the last)."""
        if position >= len(todo):
            return self.manifest.total_blocks
        return int(self.local_start[self.group_begin[todo[position]]])


class _SegmentHasher:
    """The whole-image checksum (sketch.imagesum) of the file being rebuilt, read back from it.

    With ``incremental``, the writers report how far they got (``advance``: below that block they
    will write nothing more) and each segment is hashed on a helper thread as soon as both have
    passed it, while the rebuild goes on; otherwise everything is hashed in :meth:`finish`.
    Segments that no run and no bundle writes to are holes: their leaf is known without a read.
    """

    def __init__(self, fd: int, manifest: Manifest, covered: tuple[np.ndarray, np.ndarray], incremental: bool):
        self.fd = fd
        self.size_bytes = manifest.size_bytes
        self.algorithm = manifest.checksum_algorithm
        self.count = segment_count(self.size_bytes)
        self.blocks_per_segment = SEGMENT_BYTES // manifest.block_size
        has_data = np.zeros(self.count, dtype=bool)
        data_runs = manifest.run_kind != ZERO
        has_data[segments_touched(self.size_bytes, manifest.run_start[data_runs].astype(np.int64),
                                  manifest.run_length[data_runs].astype(np.int64), manifest.block_size)] = True
        has_data[segments_touched(self.size_bytes, *covered, manifest.block_size)] = True
        # Only the data segments are visited; a hole's leaf is known (a thin 2 TiB disk has 512Ki).
        self.data = np.flatnonzero(has_data).tolist()
        del has_data
        self.total_blocks = manifest.total_blocks
        self._positions = {"local": 0, "bundle": 0}
        self._next = 0  # into self.data
        self._leaves: dict = {}
        self._lock = threading.Lock()
        self._pool = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="blocksketch-checksum") if incremental
                      else None)

    def advance(self, writer: str, block: int) -> None:
        if self._pool is None:
            return
        with self._lock:
            self._positions[writer] = max(self._positions[writer], block)
            frontier = min(self._positions.values())
            ready = self.count if frontier >= self.total_blocks else frontier // self.blocks_per_segment
            while self._next < len(self.data) and self.data[self._next] < ready:
                k = self.data[self._next]
                self._leaves[k] = self._pool.submit(self._leaf, k)
                self._next += 1

    def _leaf(self, k: int) -> bytes:
        offset = k * SEGMENT_BYTES
        length = min(SEGMENT_BYTES, self.size_bytes - offset)
        buffer = memoryview(bytearray(length))
        for start, stop in _file_extents(self.fd, offset, offset + length):
            done = start
            while done < stop:
                got = os.preadv(self.fd, [buffer[done - offset : stop - offset]], done)
                if got == 0:
                    break  # past the end of the file so far: zeros, as the final truncate makes them
                done += got
        digest = leaf(length, buffer, self.algorithm)
        if self._pool is not None and hasattr(os, "posix_fadvise"):
            # Nothing writes to this segment any more: start its writeback now (DONTNEED submits
            # the dirty pages without waiting), so the final fsync finds little left to write.
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
        return digest

    def finish(self) -> bytes:
        """The checksum, once every block is written and the file has its final size."""
        remaining = self.data[self._next :]
        with ThreadPoolExecutor(max_workers=2) as pool:
            for k, value in zip(remaining, pool.map(self._leaf, remaining)):
                self._leaves[k] = value
        leaves = zero_leaves(self.size_bytes, self.algorithm)
        for k, value in self._leaves.items():
            leaves[k] = value if isinstance(value, bytes) else value.result()
        return root(self.size_bytes, leaves, self.algorithm)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _file_extents(fd: int, start: int, stop: int) -> list[tuple[int, int]]:
    """``(start, stop)`` byte ranges of ``fd`` within ``[start, stop)`` that may hold data.

    The rebuilt image is sparse: reading its holes made the kernel zero-fill them, 4 MiB per
    segment where a thin disk's data may fill 1 MiB.
    """
    found = []
    position = start
    while position < stop:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after position
                break
            return [(start, stop)]  # no hole support: read it all
        if data >= stop:
            break
        try:
            hole = min(stop, os.lseek(fd, data, os.SEEK_HOLE))
        except OSError:
            hole = stop
        found.append((data, hole))
        position = hole
    return found


def _open_local(path: str, image_format: str | None, identity: FileIdentity | None,
                backing_dirs: tuple[str, ...]) -> ImageSource:
    try:
        if identity is None:
            return open_image(path, image_format, nofollow=True, backing_dirs=backing_dirs)
        return open_indexed(path, image_format, identity, written_ok=True, backing_dirs=backing_dirs)
    except ImageError as exc:
        raise ImageError(f"local image of the index cannot be read: {exc}") from None


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while len(view):
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done


def _to_qcow2(raw: str, target: str) -> None:
    tool = shutil.which("qemu-img")
    if tool is None:
        raise UsageError("--output-format qcow2 needs qemu-img (install qemu-utils)")
    for command in ([tool, "convert", "-q", "-f", "raw", "-O", "qcow2", raw, target],
                    [tool, "compare", "-q", "-f", "raw", "-F", "qcow2", raw, target]):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            message = (done.stderr.strip().splitlines() or ["failed"])[-1]
            raise ImageError(f"qemu-img {command[1]} failed: {message}")


def _sync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
