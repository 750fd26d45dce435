"""Rebuilding an image on the destination from a manifest, its bundles and the host's own images.

Order of work, all into a temporary file next to the output (``.NAME.blocksketch-partial-PID``):

1. every bundle's blocks are written where they belong (bundle blocks take precedence over
   LOCAL copies: that is how a re-sent range repairs a stale local image);
2. every LOCAL run is read from the local image *the destination's index lists* (resolved by
   :func:`resolve_local_sources`, never by a path taken from the manifest alone; read as the
   format the index recorded, raw or qcow2), its
   verification group checked against the group's SHA-256 from the manifest, and only then
   written; groups that fail are collected, and
   if there are any, apply stops, removes the temp file and writes a ranges file naming the blocks
   it still needs (``blocksketch pack IMAGE MANIFEST --ranges FILE`` turns it into a bundle);
3. DUP runs are copied from the SEND blocks already in the file;
4. the file is cut to the exact size (ZERO runs stay holes), synced, and its whole-image
   checksum compared with the manifest's; only then is it renamed to the output (after an
   optional ``qemu-img convert`` to qcow2, itself checked with ``qemu-img compare``).

A crash leaves only the clearly named temp file, which the next apply to the same output removes.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .blocks import ImageSource, RawImage, open_image
from .bundle import open_bundle
from .errors import ImageError, NotFound, UsageError, VerificationError
from .imagesum import image_checksum
from .manifest import DUP, LOCAL, SEND, Manifest
from .pids import pid_alive
from .ranges import mask_ranges, merge_ranges, ranges_mask, write_ranges_file

PARTIAL_TAG = ".blocksketch-partial-"
COPY_BYTES = 4 << 20
OUTPUT_FORMATS = ("raw", "qcow2")

Progress = Callable[[int], None]


class MissingBlocks(VerificationError):
    """Some LOCAL runs failed their strong-hash check; the blocks must be sent after all."""

    def __init__(self, start: np.ndarray, count: np.ndarray, ranges_file: str, block_size: int):
        self.start, self.count, self.ranges_file = start, count, ranges_file
        shown = ", ".join(f"{s}+{c}" for s, c in zip(start[:5].tolist(), count[:5].tolist()))
        more = f" and {len(start) - 5} more" if len(start) > 5 else ""
        blocks = int(count.sum())
        super().__init__(
            f"{blocks} local block(s) ({blocks * block_size} bytes) did not match the source "
            f"(stale index or hash collision): ranges {shown}{more} (start+blocks); no output written. "
            f"Ranges saved to {ranges_file}: on the source run `blocksketch pack IMAGE MANIFEST --ranges "
            f"{os.path.basename(ranges_file)} -o EXTRA`, then apply again with EXTRA as an extra bundle")


@dataclass
class ApplyResult:
    output: str
    size_bytes: int
    blocks: dict[str, int] = field(default_factory=dict)  # blocks written per source: bundle, local, dup
    local_bytes_read: int = 0


def resolve_local_images(manifest: Manifest, host: str, lookup: Callable[[str, str], object]) -> list[str]:
    """Paths of the manifest's local images, taken from ``host``'s own index entries.

    ``lookup(host, path)`` is ``store.image``: it returns the index entry or raises NotFound.
    Every image must be indexed on ``host`` with the identity the manifest recorded.
    """
    return [path for path, _ in resolve_local_sources(manifest, host, lookup)]


def resolve_local_sources(manifest: Manifest, host: str,
                          lookup: Callable[[str, str], object]) -> list[tuple[str, str | None]]:
    """``(path, format)`` of the manifest's local images from ``host``'s own index entries, as
    :func:`resolve_local_images`; the format is the one the image was indexed as (None: not
    recorded, detect by magic), so a block offset means the same bytes it meant to the index."""
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
        paths.append((str(info.path), getattr(info, "image_format", None)))
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
        if not tail.isdigit():
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


def apply_manifest(manifest: Manifest, bundles: list[str], output: str, local_paths: list[str],
                   force: bool = False, output_format: str = "raw", ranges_file: str | None = None,
                   progress: Progress | None = None,
                   local_formats: list[str | None] | None = None) -> ApplyResult:
    """Rebuild the manifest's image at ``output``; see the module docstring for the guarantees.

    ``local_paths`` come from :func:`resolve_local_images` (one per ``manifest.images``);
    ``local_formats``, one per path, from :func:`resolve_local_sources` (None: detect by magic).
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
    if bundles.count("-") > 1:
        raise UsageError("only one bundle can come from stdin")
    output = os.path.abspath(output)
    if os.path.isdir(output):
        raise UsageError(f"{output} is a directory")
    if os.path.lexists(output) and not force:
        raise UsageError(f"{output} exists; pass --force to overwrite it")
    if not os.path.isdir(os.path.dirname(output)):
        raise UsageError(f"directory {os.path.dirname(output)} does not exist")
    ranges_file = ranges_file or default_ranges_file(output)
    clean_stale_partials(output)
    temp = partial_path(output)
    converted = temp + ".qcow2"
    handles = []
    try:
        readers = []
        for path in bundles:
            handle, reader = open_bundle(path, manifest)
            handles.append(handle)
            readers.append(reader)
        covered = _check_coverage(manifest, readers)
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            result = ApplyResult(output, manifest.size_bytes)
            result.blocks["bundle"] = _write_bundles(fd, manifest, readers, progress)
            for handle in handles:
                handle.close()
            handles.clear()
            result.blocks["local"], result.local_bytes_read, missing = _write_local(
                fd, manifest, local_paths, local_formats, covered, progress)
            if len(missing[0]):
                write_ranges_file(ranges_file, manifest.manifest_id, manifest.block_size, *missing)
                raise MissingBlocks(*missing, ranges_file, manifest.block_size)
            result.blocks["dup"] = _copy_dups(fd, manifest, progress)
            os.ftruncate(fd, manifest.size_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
        with RawImage(temp) as rebuilt:
            if image_checksum(rebuilt) != manifest.checksum:
                raise VerificationError("the rebuilt image does not match the manifest's checksum; no output "
                                        "written (wrong bundle, or the source changed after packing)")
        final = temp
        if output_format == "qcow2":
            _to_qcow2(temp, converted)
            final = converted
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


def _check_coverage(manifest: Manifest, readers) -> np.ndarray:
    """Blocks the bundles cover; every SEND block must be among them."""
    total = manifest.total_blocks
    if readers:
        start = np.concatenate([r.start for r in readers])
        count = np.concatenate([r.count for r in readers])
    else:
        start = count = np.zeros(0, np.int64)
    covered = ranges_mask(total, *merge_ranges(start, count))
    send = ranges_mask(total, *manifest.runs_of(SEND))
    lacking = send & ~covered
    if lacking.any():
        first = int(np.argmax(lacking))
        raise UsageError(f"the bundles lack {int(lacking.sum())} of the blocks the source must send (first at "
                         f"block {first}); pass the bundle made by `blocksketch pack IMAGE MANIFEST`")
    return covered


def _write_bundles(fd: int, manifest: Manifest, readers, progress: Progress | None) -> int:
    block_size = manifest.block_size
    written = 0
    for reader in readers:
        for first, data in reader.placed():
            _pwrite_all(fd, data, first * block_size)
            written += len(data) // block_size
            if progress:
                progress(len(data))
    return written


def _write_local(fd: int, manifest: Manifest, local_paths: list[str], local_formats: list[str | None],
                 covered: np.ndarray, progress: Progress | None) -> tuple[int, int, tuple[np.ndarray, np.ndarray]]:
    """Verify and write every LOCAL verification group; return (blocks written, bytes read, failed ranges)."""
    block_size = manifest.block_size
    start, length = (a.astype(np.int64) for a in manifest.runs_of(LOCAL))
    covered_before = np.concatenate(([0], np.cumsum(covered, dtype=np.int64)))
    covered_count = covered_before[start + length] - covered_before[start]
    group_end = np.cumsum(manifest.group_runs.astype(np.int64))
    group_begin = group_end - manifest.group_runs.astype(np.int64)
    needed = (covered_count < length).astype(np.int64)
    # Groups wholly covered by bundles need no local read at all.
    todo = np.flatnonzero(np.add.reduceat(needed, group_begin) > 0) if len(group_begin) else group_begin
    sources: dict[int, ImageSource] = {}
    failed: list[tuple[int, int]] = []
    written = 0
    read = 0
    try:
        for group in todo.tolist():
            pieces = []
            digest = hashlib.sha256()
            for run in range(int(group_begin[group]), int(group_end[group])):
                first, count = int(start[run]), int(length[run])
                image = int(manifest.local_image[run])
                source = sources.get(image)
                if source is None:
                    source = sources[image] = _open_local(local_paths[image], local_formats[image])
                view = memoryview(bytearray(count * block_size))
                source.read_into(int(manifest.local_block[run]) * block_size, view)
                read += len(view)
                if covered_count[run]:
                    # Part of the run came in a bundle: verify the run as it will be written.
                    for a, n in zip(*mask_ranges(covered[first : first + count])):
                        got = os.preadv(fd, [view[a * block_size : (a + n) * block_size]], (first + a) * block_size)
                        if got != n * block_size:
                            raise ImageError("cannot re-read the partial output")
                digest.update(view)
                pieces.append((first, count, view))
            if digest.digest() != manifest.group_hash[group].tobytes():
                failed.extend((first, count) for first, count, _ in pieces)
                continue
            for first, count, view in pieces:
                _pwrite_all(fd, view, first * block_size)
                written += count
                if progress:
                    progress(len(view))
    finally:
        for source in sources.values():
            source.close()
    if failed:
        pairs = np.array(failed, dtype=np.int64)
        return written, read, merge_ranges(pairs[:, 0], pairs[:, 1])
    return written, read, (np.zeros(0, np.int64), np.zeros(0, np.int64))


def _open_local(path: str, image_format: str | None) -> ImageSource:
    try:
        return open_image(path, image_format)
    except ImageError as exc:
        raise ImageError(f"local image of the index cannot be read: {exc}") from None


def _copy_dups(fd: int, manifest: Manifest, progress: Progress | None) -> int:
    block_size = manifest.block_size
    start, length = manifest.runs_of(DUP)
    per_piece = max(1, COPY_BYTES // block_size)
    copied = 0
    for first, count, origin in zip(start.tolist(), length.tolist(), manifest.dup_origin.tolist()):
        for done in range(0, count, per_piece):
            n = min(per_piece, count - done)
            data = os.pread(fd, n * block_size, (origin + done) * block_size)
            if len(data) != n * block_size:
                raise ImageError("cannot re-read the partial output")
            _pwrite_all(fd, data, (first + done) * block_size)
        copied += count
        if progress:
            progress(count * block_size)
    return copied


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
