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
    """Guest-visible content of one disk image, whatever its on-disk format."""

    path: str
    format: str
    size_bytes: int

    def data_extents(self, start: int, stop: int) -> Iterator[tuple[int, int]]:
        """Yield ``(offset, length)`` ranges within ``[start, stop)`` that may hold non-zero bytes,
        in increasing order; bytes outside them are zeros."""

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the image's bytes at ``offset`` (zeros past the end)."""

    def close(self) -> None: ...


class RawImage:
    """A raw image file; holes are found with SEEK_DATA/SEEK_HOLE where the file system has them."""

    format = "raw"

    def __init__(self, path: str):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise ImageError(f"cannot open image {path}: {exc.strerror}") from None
        self.size_bytes = os.fstat(self._fd).st_size

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


def open_image(path: str, image_format: str | None = None) -> ImageSource:
    """Open ``path`` as an image of ``image_format`` (detected by magic when None)."""
    check_image_path(path)
    image_format = image_format or detect_format(path)
    if image_format == "raw":
        source: ImageSource = RawImage(path)
    elif image_format == "qcow2":
        from .qcow2 import Qcow2Image

        source = Qcow2Image(path)
    else:
        raise UsageError(f"unknown image format {image_format!r}; use one of {', '.join(IMAGE_FORMATS)}")
    if source.size_bytes == 0:
        source.close()
        raise ImageError(f"image {path} is empty")
    return source


def list_images(path: str, require_images: bool = True) -> list[str]:
    """``path`` itself if it is a file, else every non-empty regular file below it (sorted, hidden ones
    skipped). A directory that cannot be listed is an error, never an empty listing, so a refresh
    job cannot mistake it for deleted images; an empty one is an error when ``require_images``."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"no such file or directory: {path}") from None
    except OSError as exc:
        raise ImageError(f"cannot open {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        return [path]

    def unreadable(error: OSError) -> None:
        raise ImageError(f"cannot list {error.filename}: {error.strerror}")

    found = []
    for root, dirs, files in os.walk(path, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            full = os.path.join(root, name)
            if not name.startswith(".") and os.path.isfile(full) and os.path.getsize(full) > 0:
                found.append(full)
    if not found and require_images:
        raise ImageError(f"directory {path} holds no images")
    return found
