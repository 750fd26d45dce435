"""Migration streams: a manifest and its bundle in one byte stream, for ``send | receive``.

A source that knows its destination host can digest the image once and start sending as soon as
the manifest is sealed; the destination starts copying its LOCAL blocks as soon as the manifest
has arrived, while the bundle is still on the wire. One stream also fits any one-way transport
(a pipe, ``ssh host blocksketch receive``, a TCP socket).

Byte layout (version 1; integers little-endian; docs/manifest-format.md has the full table):

- ``b"BSKSTRM\\0"``, u16 version, u16 reserved (0), u32 ``M``;
- ``M`` bytes: the manifest, exactly as a manifest file (its envelope carries its own checksum);
- a bundle of the manifest's SEND blocks (sketch.bundle), which ends the stream.

The sender does not re-read the whole image while packing (the bundle's ``verify_checksum`` is
off; it reads only the ranges it sends): the manifest's whole-image checksum was taken right after
the digests, and the receiver compares the rebuilt image with it before anything appears at the
output, so an image that changed under the sender fails there. The sender also checks that the
image's size, modification time and inode did not change while it was sent, and if they did,
ends the stream without the bundle's trailer, which the receiver rejects as truncated.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from .blocks import ImageSource
from .bundle import ADAPT_START_LEVEL, BundleInfo, BundleReader, read_claimed, write_bundle
from .errors import FormatError, ImageError
from .manifest import MAX_BODY_BYTES, Manifest

MAGIC = b"BSKSTRM\0"
VERSION = 1
_PREFIX = struct.Struct("<8sHHI")

Progress = Callable[[int], None]


@dataclass
class StreamInfo:
    manifest_bytes: int
    bundle: BundleInfo

    @property
    def bytes_written(self) -> int:
        return _PREFIX.size + self.manifest_bytes + self.bundle.bytes_written


def image_stamp(path: str) -> tuple[int, int, int]:
    """What changes when an image is written: size, modification time, inode."""
    try:
        status = os.stat(path)
    except OSError as exc:
        raise ImageError(f"cannot stat image {path}: {exc.strerror}") from None
    return status.st_size, status.st_mtime_ns, status.st_ino


def write_stream(handle: BinaryIO, source: ImageSource, manifest: Manifest, stamp: tuple[int, int, int],
                 level: int | None = None, progress: Progress | None = None) -> StreamInfo:
    """Write the migration stream of ``manifest`` (built from ``source``) into ``handle``.

    ``stamp`` is :func:`image_stamp` of the image taken before it was digested; if the image
    changed since, the bundle is left without its trailer and ImageError is raised. ``level``
    None compresses adaptively: zstd level 3, then 6 or 9 if the output turns out to be the
    bottleneck (a slow link; sketch.bundle).
    """
    body = manifest.to_bytes()
    handle.write(_PREFIX.pack(MAGIC, VERSION, 0, len(body)))
    handle.write(body)
    handle.flush()  # the destination starts its local copies while the bundle is packed

    def unchanged() -> None:
        if image_stamp(source.path) != stamp:
            raise ImageError(f"image {source.path} changed while it was sent (stop the VM using it and send "
                             "again); the stream was cut before its end, so the receiver writes nothing")

    bundle = write_bundle(handle, source, manifest, level=ADAPT_START_LEVEL if level is None else level,
                          progress=progress, verify_checksum=False, before_trailer=unchanged, adaptive=level is None)
    return StreamInfo(len(body), bundle)


def read_stream_manifest(handle: BinaryIO, what: str = "stream") -> Manifest:
    """Read a stream's prefix and manifest; the handle is left at the start of its bundle."""
    prefix = handle.read(_PREFIX.size)
    if len(prefix) == 0:
        raise FormatError(f"{what} is empty (did the sender fail?)")
    if len(prefix) != _PREFIX.size:
        raise FormatError(f"{what} is truncated (in its header)")
    magic, version, reserved, length = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FormatError(f"{what} is not a blocksketch migration stream (bad magic)")
    if version != VERSION:
        raise FormatError(f"{what} has unknown version {version} (this blocksketch reads {VERSION})")
    if reserved != 0 or length > MAX_BODY_BYTES:
        raise FormatError(f"{what} is corrupt (header)")
    body = read_claimed(handle, length)
    if len(body) != length:
        raise FormatError(f"{what} is truncated (in its manifest)")
    return Manifest.from_bytes(body, f"the manifest of {what}")


def open_stream_bundle(handle: BinaryIO, manifest: Manifest, what: str = "stream") -> BundleReader:
    """The bundle that follows a stream's manifest."""
    reader = BundleReader(handle, manifest, f"the bundle of {what}")
    if reader.contents != "send":
        raise FormatError(f"{what} is corrupt (its bundle does not hold the manifest's SEND blocks)")
    return reader
