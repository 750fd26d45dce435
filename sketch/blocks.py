"""Disk images as fixed-size blocks.

An image is read through an :class:`ImageSource`: its guest-visible size, the byte ranges that
may hold data (everything outside them reads as zeros), and a way to read bytes at an offset.
Raw files find their holes with ``SEEK_DATA``/``SEEK_HOLE``, so a sparse 10 GiB image holding
200 MiB of data costs about as much as its 200 MiB.

Block ``i`` covers bytes ``[i * block_size, (i + 1) * block_size)``. When the image size is not
a multiple of the block size, the last block is the partial tail padded with zeros to a full
block: its digest is the digest of ``tail + b"\\0" * (block_size - len(tail))``. A rebuilt image
is truncated back to the source's byte size, so padding never changes the bytes moved.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from .errors import ImageError, UsageError

DEFAULT_BLOCK_SIZE = 512
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 65536


def check_block_size(block_size: int) -> int:
    """Return ``block_size`` if it is a power of two from 512 to 65536, else raise UsageError."""
    if (
        not isinstance(block_size, int)
        or block_size < MIN_BLOCK_SIZE
        or block_size > MAX_BLOCK_SIZE
        or block_size & (block_size - 1)
    ):
        raise UsageError(
            f"block size {block_size} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
        )
    return block_size


def block_count(size_bytes: int, block_size: int) -> int:
    """Number of blocks covering ``size_bytes`` (the partial tail counts as one block)."""
    return -(-size_bytes // block_size)


class ImageSource(Protocol):
    """Guest-visible content of one disk image, whatever its on-disk format.

    ``identity`` is the opened file's, taken from its descriptor; ``backing_dirs`` the extra
    directories its backing files may come from (qcow2; :func:`reopen` keeps both)."""

    path: str
    format: str
    size_bytes: int
    identity: FileIdentity
    backing_dirs: tuple[str, ...]

    def data_extents(self, start: int, stop: int) -> Iterator[tuple[int, int]]:
        """Yield ``(offset, length)`` ranges within ``[start, stop)`` that may hold non-zero bytes,
        in increasing order; bytes outside them are zeros."""

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the image's bytes at ``offset`` (zeros past the end)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class FileIdentity:
    """What tells one file apart from another that later takes its name: device, inode, size, mtime.

    An index entry records it when its image is digested; whoever opens an indexed path later
    checks the opened descriptor against it with :meth:`matches` (:func:`open_indexed`), so a file
    replaced, or a name turned into a symlink to something else, is never read as that entry.
    """

    device: int | None  # None: recorded before devices were (entries of older refreshes)
    inode: int
    size_bytes: int
    mtime_ns: int

    @classmethod
    def of(cls, info: os.stat_result) -> FileIdentity:
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)

    @classmethod
    def of_entry(cls, entry) -> FileIdentity:
        """From an index entry (``store`` ImageInfo, or anything with the same attributes)."""
        device = getattr(entry, "device", None)
        return cls(None if device is None else int(device), int(entry.inode), int(entry.size_bytes),
                   int(entry.mtime_ns))

    def matches(self, found: FileIdentity) -> bool:
        """Whether ``found`` (an opened file's) is still this file, unchanged: THE check that a file
        is the one an index entry describes, wherever an indexed path is opened or trusted."""
        if self.device is not None and found.device != self.device:
            return False
        return (found.inode, found.size_bytes, found.mtime_ns) == (self.inode, self.size_bytes, self.mtime_ns)

    def same_file(self, found: FileIdentity) -> bool:
        """Whether ``found`` is the same inode (perhaps written to since)."""
        if self.device is not None and found.device != self.device:
            return False
        return found.inode == self.inode


class StaleImage(ImageError):
    """The file at an indexed (or resolved) path is no longer the file it was."""


def open_file(path: str, nofollow: bool = False) -> int:
    """A read-only descriptor of ``path``, which must be a regular file or a block device.

    Never blocks (a FIFO put in an image's place is refused, not waited on); ``nofollow`` refuses
    a symlink as the last component (O_NOFOLLOW), for paths that were resolved already.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (os.O_NOFOLLOW if nofollow else 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if nofollow and exc.errno == errno.ELOOP:
            raise StaleImage(f"image {path} is a symbolic link now; not following it") from None
        raise ImageError(f"cannot open image {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise ImageError(f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return fd


class RawImage:
    """A raw image file; holes are found with SEEK_DATA/SEEK_HOLE where the file system has them."""

    format = "raw"
    backing_dirs: tuple[str, ...] = ()

    def __init__(self, path: str, *, nofollow: bool = False):
        self.path = path
        self._fd = open_file(path, nofollow)
        info = os.fstat(self._fd)
        self.identity = FileIdentity.of(info)
        self.size_bytes = info.st_size

    def data_extents(self, start: int, stop: int) -> Iterator[tuple[int, int]]:
        stop = min(stop, self.size_bytes)
        position = start
        while position < stop:
            try:
                data = os.lseek(self._fd, position, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after position: the rest is a hole
                    return
                if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # file system without hole support
                    yield position, stop - position
                    return
                raise ImageError(f"cannot read image {self.path}: {exc.strerror}") from None
            if data >= stop:
                return
            try:
                hole = os.lseek(self._fd, data, os.SEEK_HOLE)
            except OSError:
                hole = stop
            hole = min(hole, stop)
            yield data, hole - data
            position = hole

    def read_into(self, offset: int, buffer: memoryview) -> None:
        wanted = len(buffer)
        done = 0
        while done < wanted:
            try:
                got = os.preadv(self._fd, [buffer[done:]], offset + done)
            except OSError as exc:
                raise ImageError(f"cannot read image {self.path}: {exc.strerror}") from None
            if got == 0:
                buffer[done:] = bytes(wanted - done)  # past the end: the zero padding of the tail
                return
            done += got

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RawImage:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


IMAGE_FORMATS = ("raw", "qcow2")


def detect_format(path: str) -> str:
    """The image format by magic: ``qcow2`` for ``QFI\\xfb``, otherwise ``raw``."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ImageError(f"cannot open image {path}: {exc.strerror}") from None
    return "qcow2" if magic == b"QFI\xfb" else "raw"


def check_image_path(path: str) -> None:
    """Raise a clear error unless ``path`` is a readable, non-empty regular file (or block device)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"no such image: {path}") from None
    except OSError as exc:
        raise ImageError(f"cannot open image {path}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{path} is a directory; an image file is needed here")
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode)):
        raise ImageError(f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise ImageError(f"cannot open image {path}: permission denied")


def open_image(path: str, image_format: str | None = None, *, backing_dirs: tuple[str, ...] = (),
               nofollow: bool = False) -> ImageSource:
    """Open ``path`` as an image of ``image_format`` (detected by magic when None).

    A qcow2's backing files must lie in the directory of the image naming them, or in one of
    ``backing_dirs`` (:mod:`sketch.qcow2`); ``nofollow`` refuses ``path`` if it is a symlink.
    """
    check_image_path(path)
    image_format = image_format or detect_format(path)
    backing_dirs = tuple(backing_dirs)
    if image_format == "raw":
        source: ImageSource = RawImage(path, nofollow=nofollow)
    elif image_format == "qcow2":
        from .qcow2 import Qcow2Image

        source = Qcow2Image(path, backing_dirs=backing_dirs, nofollow=nofollow)
    else:
        raise UsageError(f"unknown image format {image_format!r}; use one of {', '.join(IMAGE_FORMATS)}")
    source.backing_dirs = backing_dirs
    if source.size_bytes == 0:
        source.close()
        raise ImageError(f"image {path} is empty")
    return source


def open_indexed(path: str, image_format: str | None, expected: FileIdentity, *,
                 backing_dirs: tuple[str, ...] = (), written_ok: bool = False) -> ImageSource:
    """Open the image an index entry describes, or raise StaleImage.

    The entry's path is the real path the refresh found, so a symlink there now is refused
    (O_NOFOLLOW), and the opened descriptor must match the entry's identity (device, inode, size,
    mtime; :meth:`FileIdentity.matches`): whatever took the path's place since is never read as
    that entry. ``written_ok`` accepts the same file written to since (same device and inode), for
    a reader that verifies every block it takes (``apply``: changed blocks are asked again).
    """
    source = open_image(path, image_format, backing_dirs=backing_dirs, nofollow=True)
    if not (expected.same_file if written_ok else expected.matches)(source.identity):
        source.close()
        raise StaleImage(f"image {path} is not the file that was indexed (it was "
                         f"{'replaced' if written_ok else 'changed or replaced'} since)")
    return source


def reopen(source: ImageSource) -> ImageSource:
    """A second reader of an open ``source`` (its own caches, for another thread): the same file,
    read the same way, or ImageError if the path names another file now."""
    again = open_image(source.path, source.format, backing_dirs=source.backing_dirs)
    if not source.identity.same_file(again.identity):
        again.close()
        raise StaleImage(f"image {source.path} was replaced while it was being read")
    return again


SECTOR_SIZE = 512


@dataclass
class ImageListing:
    """What a walk of a directory found: image files, and the files it passed over, with why."""

    images: list[str]
    skipped: list[tuple[str, str]]  # (path, reason)


NOT_AN_IMAGE = "not an image"
SYMLINK_OUT = "symlink out of the tree"


def is_image_file(path: str, info: os.stat_result) -> bool:
    """Whether a regular file found in a directory is taken as an image: a qcow2 by its magic, or
    a raw image, whose size is a positive multiple of the 512-byte sector (a disk's size always
    is; a text note or a partial download almost never)."""
    if info.st_size == 0:
        return False
    if info.st_size % SECTOR_SIZE == 0:
        return True
    try:
        return detect_format(path) == "qcow2"
    except ImageError:
        return False


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def walk_images(path: str, within: list[str] | None = None) -> ImageListing:
    """``path`` itself if it is a file (named, so taken as it is), else the image files below it
    (sorted; hidden names skipped; other files skipped as not images, see :func:`is_image_file`).

    ``within``: real paths of the trees a symlink may lead into (None: anywhere); a symlink
    leading elsewhere is skipped. A directory that cannot be listed is an error, never an empty
    listing, so a refresh job cannot mistake it for deleted images.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"no such file or directory: {path}") from None
    except OSError as exc:
        raise ImageError(f"cannot open {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        return ImageListing([path], [])

    def unreadable(error: OSError) -> None:
        raise ImageError(f"cannot list {error.filename}: {error.strerror}")

    listing = ImageListing([], [])
    for root, dirs, files in os.walk(path, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            full = os.path.join(root, name)
            if within is not None and os.path.islink(full) and not _inside(os.path.realpath(full), within):
                listing.skipped.append((full, SYMLINK_OUT))
                continue
            try:
                found = os.stat(full)
            except OSError:
                continue  # a dangling symlink, or gone since listed: nothing to read
            if not stat.S_ISREG(found.st_mode):
                continue
            if is_image_file(full, found):
                listing.images.append(full)
            else:
                listing.skipped.append((full, NOT_AN_IMAGE))
    return listing


def list_images(path: str, require_images: bool = True) -> list[str]:
    """``path`` itself if it is a file, else the image files below it (:func:`walk_images`). An
    empty directory is an error when ``require_images``."""
    found = walk_images(path).images
    if not found and require_images:
        raise ImageError(f"directory {path} holds no images")
    return found
