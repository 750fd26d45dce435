"""Bundles: the blocks a destination lacks, compressed, with integrity data, streamed.

A bundle holds a list of source blocks in order: either the manifest's SEND blocks (contents
``send``: each missing content once) or explicit block ranges (contents ``ranges``: what apply
reported it still needs). The blocks are one zstd stream through one compression context (so
the whole bundle compresses at least like ``zstd -3`` of the blocks; an adaptive bundle may
switch once to a stronger level, starting a second zstd frame), flushed into frames of
``FRAME_BYTES`` of raw data; every frame carries its lengths and a checksum, and a trailer closes
the bundle with a checksum over the header and every frame checksum. Memory stays bounded by one
frame and one image segment, reading or writing.

Byte layout (version 2, which reads version 1 too; integers little-endian;
docs/manifest-format.md has the full table):

- header: ``b"BSKBUNDL"``, u16 version, u16 reserved, u32 ``H``, then ``H`` bytes of msgpack map
  (schema, version, manifest_id, block_size, size_bytes, contents, ranges, blocks, compression,
  level, adaptive, window_log, frame_bytes), then SHA-256 of everything before it (32 bytes);
- frames: u32 raw length (whole blocks), u32 compressed length, 16 bytes = SHA-256 of the
  compressed bytes truncated, then the compressed bytes;
- trailer: a frame header of zeros (24 bytes), u64 frame count, u64 raw bytes, 32 bytes =
  SHA-256 over the header checksum and every frame checksum, ``b"BSKBEND\\0"``.
"""

from __future__ import annotations

import hashlib
import struct
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import msgpack
import numpy as np
import zstandard

from .blocks import ImageSource, open_image
from .errors import BlocksketchError, FormatError, OutputError, UsageError, VerificationError
from .imagesum import CHECKSUM_ALGORITHM, SEGMENT_BYTES, TreeHasher, iter_data_segments
from .manifest import SEND, Manifest
from .output import atomic_output, check_output
from .ranges import merge_ranges

MAGIC = b"BSKBUNDL"
END_MAGIC = b"BSKBEND\0"
VERSION = 2  # 2: the compressed bytes may be several zstd frames (adaptive level); 1: exactly one
READABLE_VERSIONS = (1, 2)
SCHEMA = "blocksketch.bundle"
FRAME_BYTES = 4 << 20
MAX_FRAME_BYTES = 64 << 20
MAX_HEADER_BYTES = 1 << 30
READ_PIECE_BYTES = 1 << 20
# The zstd reader takes a frame's compressed bytes in pieces this small, so bytes a frame holds
# past its declared output stay visible here (at most a piece hides in the reader's buffer).
INPUT_PIECE_BYTES = 16 << 10
MAX_FRAME_SLACK = 16
DEFAULT_LEVEL = 3
# Long-distance matching over a 128 MiB window: SEND blocks are distinct but often near-duplicates
# far apart (files that differ in a few bytes); on a real Debian image this made bundles ~5%
# smaller than plain level 3 (benchmarks/RESULTS.md). 128 MiB is zstd's default decoder limit.
WINDOW_LOG = 27
# Adaptive compression starts at ADAPT_START_LEVEL, skips the first frames (they fill pipe and socket
# buffers), measures at least the next ones, then switches once, when it pays, to the strongest of
# these levels whose CPU cost (relative to level 3, measured on a real bundle: 6.4 s at 9, 3.8 s
# at 6, 1.85 s at 3 for 268 MB) fits in the time a frame takes to get out, with ADAPT_SAFETY to
# spare; down to 3 when compression sets the pace (a fast link, or a file).
# Starting at 6 was tried before compression moved to its own thread: level 6 then could not keep
# up with 100 Mbit/s on the same-release pair (both ends on two cores) and fell back to 3.
ADAPT_START_LEVEL = 3
ADAPT_COSTS = {3: 1.0, 6: 2.0, 9: 3.5}
ADAPT_SAFETY = 1.5
ADAPT_CPU_BOUND = 1.2  # frames taking less than this many times their compression: CPU-bound
ADAPT_SKIP_FRAMES = 2
ADAPT_WINDOW_FRAMES = 2
# Never switch with less than half of the raw bytes left: the new zstd frame starts without
# history, and on a real 79 MB bundle a switch to 6 after 10 of 19 frames made it 0.4% bigger.
ADAPT_MIN_LEFT = 0.5
# Reading just the blocks to send: ranges this close share one read, of at most this much.
COALESCE_GAP_BYTES = 256 << 10
READ_SPAN_BYTES = 4 << 20
_PREFIX = struct.Struct("<8sHHI")
_FRAME = struct.Struct("<II16s")
_TRAILER = struct.Struct("<QQ32s8s")

Progress = Callable[[int], None]


@dataclass
class BundleInfo:
    """What a bundle holds: ``blocks`` source blocks, in the order of the ranges."""

    path: str
    manifest_id: bytes
    block_size: int
    contents: str  # "send" or "ranges"
    start: np.ndarray  # (k,) int64 first block of each range
    count: np.ndarray  # (k,) int64 blocks in each range
    blocks: int
    bytes_written: int = 0
    raw_bytes: int = 0
    levels: list[int] | None = None  # zstd levels used, in order (two when an adaptive bundle switched)


def bundle_ranges(manifest: Manifest, ranges: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """The block ranges a bundle holds: the SEND runs, or ``ranges`` merged."""
    if ranges is None:
        start, count = manifest.runs_of(SEND)
        return start.astype(np.int64), count.astype(np.int64)
    return merge_ranges(*ranges)


def bundle_header(manifest: Manifest, start: np.ndarray, count: np.ndarray, contents: str, level: int,
                  adaptive: bool = False) -> dict:
    return {"schema": SCHEMA, "version": VERSION, "manifest_id": manifest.manifest_id,
            "block_size": manifest.block_size, "size_bytes": manifest.size_bytes, "contents": contents,
            "ranges": b"" if contents == "send" else np.stack([start, count], axis=1).astype("<u8").tobytes(),
            "blocks": int(count.sum()), "compression": "zstd", "level": level, "adaptive": adaptive,
            "window_log": WINDOW_LOG, "frame_bytes": FRAME_BYTES}


def pack_bundle(image_path: str, manifest: Manifest, output: str, ranges: tuple[np.ndarray, np.ndarray] | None = None,
                level: int | None = DEFAULT_LEVEL, progress: Progress | None = None,
                image_format: str | None = None, force: bool = False,
                inputs: tuple[str, ...] | list[str] = (), backing_dirs: tuple[str, ...] = ()) -> BundleInfo:
    """Write the bundle of ``image_path`` for ``manifest`` to ``output`` (as
    :func:`sketch.output.atomic_output`: whole or not at all, ``force`` to replace a file, never
    onto the image or another of ``inputs``), or stream it. ``level`` None compresses adaptively,
    as a migration stream does (:func:`write_bundle`'s ``adaptive``).

    ``image_format`` ("raw" or "qcow2") is how to read the image, as when the manifest was built;
    None detects it by magic. Checks while packing that the image still has the manifest's
    whole-image checksum; if not, no bundle is left behind.

    ``output`` ``"-"`` streams the bundle to stdout as it is compressed (no temp file, no rename,
    no fsync), so a reader (a socket, ``apply -``) starts while packing goes on. The checksum can
    only be checked once the whole image was read, so a failed pack then leaves the frames already
    written but never the trailer: apply rejects such a truncated bundle ("is truncated") and
    writes no output.
    """
    check_output(output, force=force, inputs=[image_path, *inputs], what="bundle")
    source = open_image(image_path, image_format, backing_dirs=backing_dirs)
    try:
        with atomic_output(output, force=force, inputs=[image_path, *inputs], what="bundle") as handle:
            info = write_bundle(handle, source, manifest, ranges, level or DEFAULT_LEVEL, progress,
                                adaptive=level is None)
    except BrokenPipeError:
        raise BlocksketchError("cannot write the bundle to stdout: its reader closed the pipe") from None
    except OSError as exc:
        raise OutputError(f"cannot write bundle {output}: {exc.strerror}") from None
    finally:
        source.close()
    info.path = output
    return info


def write_bundle(handle: BinaryIO, source: ImageSource, manifest: Manifest,
                 ranges: tuple[np.ndarray, np.ndarray] | None = None, level: int = DEFAULT_LEVEL,
                 progress: Progress | None = None, verify_checksum: bool = True,
                 before_trailer: Callable[[], None] | None = None, adaptive: bool = False) -> BundleInfo:
    """Write the bundle of the open ``source`` for ``manifest`` into ``handle``.

    With ``verify_checksum`` the whole image is read and its checksum compared with the
    manifest's before the trailer is written (on a mismatch the bundle stays without trailer and
    VerificationError is raised). Without it only the segments holding bundle blocks are read:
    for a sender that computed the manifest's checksum from the same read as its digests moments
    ago, and whose receiver checks the rebuilt image against that checksum anyway.
    ``before_trailer`` runs last before the trailer: raising there leaves the bundle truncated.
    ``adaptive``: start at ``level`` and switch to a stronger one if the output is the bottleneck
    (see ``_Writer``); the levels used are in ``BundleInfo.levels``.
    """
    start, count = bundle_ranges(manifest, ranges)
    if len(start) and int((start + count).max()) > manifest.total_blocks:
        raise UsageError("ranges name blocks outside the image")
    contents = "send" if ranges is None else "ranges"
    # Read as another format than the manifest's, an image has other bytes: say so, not just "changed".
    retry = f"rebuild the manifest, or pack with the --format it was built with (the image was read as {source.format})"
    if source.size_bytes != manifest.size_bytes:
        raise VerificationError(f"image {source.path} is {source.size_bytes} bytes but the manifest describes "
                                f"{manifest.size_bytes}; {retry}")
    writer = _Writer(handle, bundle_header(manifest, start, count, contents, level, adaptive), level, adaptive)
    try:
        if not verify_checksum:
            _stream_ranges(source, manifest.block_size, start, count, writer, progress)
        elif _stream_blocks(source, manifest.block_size, start, count, writer, progress,
                            manifest.checksum_algorithm) != manifest.checksum:
            raise VerificationError(f"image {source.path} no longer matches the manifest (its checksum differs); "
                                    f"{retry}")
        if before_trailer is not None:
            before_trailer()
        writer.finish()
    finally:
        writer.close()
    return BundleInfo("", manifest.manifest_id, manifest.block_size, contents, start, count, int(count.sum()),
                      writer.bytes_written, writer.raw_bytes, writer.levels)


def _stream_blocks(source, block_size: int, start: np.ndarray, count: np.ndarray, writer: _Writer,
                   progress: Progress | None, algorithm: str = CHECKSUM_ALGORITHM) -> bytes:
    """Feed the blocks of the ranges to ``writer`` in order, reading every data segment; return the
    whole-image checksum. Hole segments are neither read nor visited (a thin disk has 512Ki per 2 TiB)."""
    begin = (start * block_size).tolist()
    end = ((start + count) * block_size).tolist()
    at = 0
    threads = 1 if getattr(source, "format", "") == "raw" else 0

    def zeros_until(stop: int) -> None:
        """Ranges (or their parts) below ``stop`` lie in holes: zeros, 4 MiB at a time."""
        nonlocal at
        while at < len(begin) and begin[at] < stop:
            b = min(end[at], stop)
            for piece in range(begin[at], b, SEGMENT_BYTES):
                writer.write(bytes(min(SEGMENT_BYTES, b - piece)))
            if end[at] > stop:
                begin[at] = stop
                return
            at += 1

    with TreeHasher(source.size_bytes, threads=threads, algorithm=algorithm) as tree:
        for k, offset, length, data in iter_data_segments(source):
            tree.add(k, data)
            zeros_until(offset)
            blocks = -(-length // block_size)
            segment_end = offset + blocks * block_size
            while at < len(begin) and begin[at] < segment_end:
                a = max(begin[at], offset)
                b = min(end[at], segment_end)
                if b - offset > length:  # the partial last block, zero padded
                    writer.write(bytes(data[a - offset : length]) + bytes(b - offset - length))
                else:
                    writer.write(data[a - offset : b - offset])
                if end[at] > segment_end:
                    begin[at] = segment_end  # the rest follows in the next segment, data or hole
                    break
                at += 1
            if progress:
                progress(length)
        zeros_until(max(end, default=0))
        return tree.digest()


def _stream_ranges(source, block_size: int, start: np.ndarray, count: np.ndarray, writer: _Writer,
                   progress: Progress | None) -> None:
    """Feed the blocks of the ranges to ``writer``, reading only them: ranges closer than
    ``COALESCE_GAP_BYTES`` share a read of at most ``READ_SPAN_BYTES``. When the blocks to send
    are few and scattered (a host holding nearly everything), reading whole 4 MiB segments read
    the whole image for them (0.35 s for 5 MB on a real 1 GiB image)."""
    begin = (start * block_size).tolist()
    end = ((start + count) * block_size).tolist()
    at = 0
    while at < len(begin):
        span_start = begin[at]
        last = at
        # Grow the read while the next range is close and the read stays small; a long range
        # alone is cut into reads of READ_SPAN_BYTES.
        while last + 1 < len(begin) and begin[last + 1] - end[last] <= COALESCE_GAP_BYTES \
                and end[last + 1] - span_start <= READ_SPAN_BYTES:
            last += 1
        span_end = min(end[last], span_start + READ_SPAN_BYTES)
        buffer = memoryview(bytearray(span_end - span_start))
        source.read_into(span_start, buffer)  # zeros past the end: the partial last block's padding
        for index in range(at, last + 1):
            a, b = max(begin[index], span_start), min(end[index], span_end)
            writer.write(buffer[a - span_start : b - span_start])
            if progress:
                progress(b - a)
        if end[last] > span_end:  # a long range continues in the next read
            begin[last] = span_end
            at = last
        else:
            at = last + 1


class _Writer:
    """Frames of a zstd stream, each flushed at a block boundary.

    Frame ``n`` is compressed on a worker thread while this one writes frame ``n - 1`` (zstd and
    the write both release the GIL), so compressing and sending overlap instead of taking turns.

    With ``adaptive``, the stream starts at ``level`` and may switch once (:func:`adapted_level`):
    to a stronger level when a frame takes much longer to get out than to compress (the link, not
    the CPU, is the limit, so CPU time buys fewer bytes on the wire: zstd's own ``--adapt`` idea),
    to the cheapest when compressing is what sets the pace. A switch ends the zstd frame and starts a new
    one at the next bundle frame; losing the history costs little (on a 268 MB real bundle,
    switching from 3 to 9 after 8 MiB gave 112.4 MB against 112.0 MB for level 9 throughout,
    117.4 MB for level 3).
    """

    def __init__(self, handle: BinaryIO, header: dict, level: int, adaptive: bool = False):
        self._raw_total = header["blocks"] * header["block_size"]
        self._handle = handle
        body = msgpack.packb(header, use_bin_type=True)
        prefix = _PREFIX.pack(MAGIC, VERSION, 0, len(body)) + body
        header_sum = hashlib.sha256(prefix).digest()
        handle.write(prefix + header_sum)
        self._chain = hashlib.sha256(header_sum)
        self._compressor = _compressor(level)  # used by the worker thread only
        self.levels = [level]
        self._adaptive = adaptive
        self._compress_s = self._period_s = 0.0
        self._last_emit = time.perf_counter()
        self._pending: list = []
        self._pending_bytes = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blocksketch-zstd")
        self._in_flight = None
        self._submitted = 0
        self.frames = 0
        self.bytes_written = len(prefix) + len(header_sum)
        self.raw_bytes = 0

    def write(self, data) -> None:
        """Queue ``data`` (the caller must not change it until the bundle is finished)."""
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes < FRAME_BYTES:
            return
        # One join per frame rather than a bytearray append per run: a bundle is thousands of
        # short runs, and the appends and front deletions cost a fifth of pack's time.
        joined = memoryview(b"".join(self._pending))
        at = 0
        while len(joined) - at >= FRAME_BYTES:
            self._frame(joined[at : at + FRAME_BYTES], zstandard.COMPRESSOBJ_FLUSH_BLOCK)
            at += FRAME_BYTES
        self._pending = [joined[at:]] if at < len(joined) else []
        self._pending_bytes = len(joined) - at

    def _frame(self, raw, flush: int) -> None:
        job = self._worker.submit(self._compress, raw, flush, self._submitted)
        self._submitted += 1
        if self._in_flight is not None:
            self._emit(self._in_flight.result())
        self._in_flight = job

    def _compress(self, raw, flush: int, number: int) -> tuple[int, bytes, bytes, float]:
        started = time.perf_counter()
        packed = self._switch(number) + self._compressor.compress(raw) + self._compressor.flush(flush)
        check = hashlib.sha256(packed).digest()[:16]
        return len(raw), packed, check, time.perf_counter() - started

    def _emit(self, compressed: tuple[int, bytes, bytes, float]) -> None:
        raw_length, packed, check, compress_s = compressed
        self._handle.write(_FRAME.pack(raw_length, len(packed), check))
        self._handle.write(packed)
        now = time.perf_counter()
        self._chain.update(check)
        self.frames += 1
        self.bytes_written += _FRAME.size + len(packed)
        self.raw_bytes += raw_length
        if self.frames > ADAPT_SKIP_FRAMES:  # the first frames fill the pipe and socket buffers
            self._compress_s += compress_s
            self._period_s += now - self._last_emit  # what one frame takes, whatever the bottleneck
        self._last_emit = now

    def _switch(self, number: int) -> bytes:
        """The end of the current zstd frame if the level changes before frame ``number``.

        Asked before every frame once a few were written and measured, until it switches or too
        little is left for another level to pay for the history it loses.
        """
        if not self._adaptive or self.frames < ADAPT_SKIP_FRAMES + ADAPT_WINDOW_FRAMES:
            return b""
        if self._raw_total - number * FRAME_BYTES < max(2 * FRAME_BYTES, self._raw_total * ADAPT_MIN_LEFT):
            self._adaptive = False
            return b""
        level = adapted_level(self.levels[0], self._compress_s, self._period_s)
        if level == self.levels[0]:
            return b""
        self._adaptive = False  # switch once
        tail = self._compressor.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)
        self._compressor = _compressor(level)
        self.levels.append(level)
        return tail

    def finish(self) -> None:
        if self._pending or self._submitted:
            self._frame(b"".join(self._pending), zstandard.COMPRESSOBJ_FLUSH_FINISH)
            self._pending, self._pending_bytes = [], 0
        if self._in_flight is not None:
            self._emit(self._in_flight.result())
            self._in_flight = None
        trailer = _FRAME.pack(0, 0, bytes(16)) + _TRAILER.pack(self.frames, self.raw_bytes, self._chain.digest(),
                                                               END_MAGIC)
        self._handle.write(trailer)
        self.bytes_written += len(trailer)

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)


def _compressor(level: int):
    params = zstandard.ZstdCompressionParameters.from_level(level, window_log=WINDOW_LOG, enable_ldm=True,
                                                            write_checksum=True)
    return zstandard.ZstdCompressor(compression_params=params).compressobj()


def adapted_level(level: int, compress_s: float, period_s: float) -> int:
    """The level to continue at (one of ``ADAPT_COSTS``), given the time spent at ``level``
    compressing frames and the time frames took to get out (compression overlaps the writing,
    see :class:`_Writer`, so a frame takes the longer of the two and of the reading).

    Frames taking clearly longer than their compression (the link sets the pace): the strongest
    level whose compression fits in that time with ``ADAPT_SAFETY`` to spare, at least the current
    one. Frames taking about their compression time (compression sets the pace): the cheapest.
    """
    if compress_s <= 0 or level not in ADAPT_COSTS:
        return level
    ratio = period_s / compress_s
    if ratio < ADAPT_CPU_BOUND:
        return min(ADAPT_COSTS)
    budget = ratio / ADAPT_SAFETY * ADAPT_COSTS[level]
    return max([level, *(c for c, cost in ADAPT_COSTS.items() if cost <= budget)])


class _FrameInput:
    """The compressed bytes of the frames, handed to one zstd reader as they arrive.

    The zstd stream runs through every frame, so one decompression context must see them all; the
    reader pulls a frame's bytes from here only while it still owes that frame output.
    """

    def __init__(self):
        self._data = memoryview(b"")

    def add(self, packed: bytes) -> None:
        self._data = memoryview(bytes(self._data) + packed) if len(self._data) else memoryview(packed)

    @property
    def left(self) -> int:
        return len(self._data)

    def read(self, size: int = -1) -> bytes:
        size = len(self._data) if size < 0 else size
        part, self._data = self._data[:size], self._data[size:]
        return bytes(part)


def _read_full(reader, size: int) -> bytes:
    """``size`` bytes from a zstd reader, fewer only if its input ends."""
    parts = []
    got = 0
    while got < size:
        part = reader.read(size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_claimed(handle: BinaryIO, size: int) -> bytes:
    """Read ``size`` bytes that a header claims follow (fewer if the input ends first).

    In pieces that grow with what has arrived: ``handle.read(size)`` would allocate the whole
    claimed size up front, so a few bytes claiming a gigabyte would cost that gigabyte.
    """
    if size <= READ_PIECE_BYTES:
        return handle.read(size)
    parts = []
    got = 0
    while got < size:
        part = handle.read(min(size - got, max(READ_PIECE_BYTES, got)))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


class BundleReader:
    """Reads a bundle sequentially (a pipe is fine) and yields its blocks with their positions."""

    def __init__(self, handle: BinaryIO, manifest: Manifest, what: str):
        self._handle = handle
        self.what = what
        self._manifest = manifest
        prefix = self._read(_PREFIX.size, "header")
        magic, version, _reserved, length = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise FormatError(f"{what} is not a blocksketch bundle (bad magic)")
        if version not in READABLE_VERSIONS:
            raise FormatError(f"{what} has unknown version {version} (this blocksketch reads "
                              f"{', '.join(map(str, READABLE_VERSIONS))})")
        if length > MAX_HEADER_BYTES:
            raise FormatError(f"{what} is corrupt (header length)")
        body = self._read(length, "header")
        header_sum = self._read(32, "header")
        if hashlib.sha256(prefix + body).digest() != header_sum:
            raise FormatError(f"{what} is corrupt (header checksum mismatch)")
        try:
            header = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated classes
            raise FormatError(f"{what} is corrupt ({type(exc).__name__})") from None
        if not isinstance(header, dict) or header.get("schema") != SCHEMA or header.get("version") != version:
            raise FormatError(f"{what} is corrupt (not a {SCHEMA} v{version} header)")
        if header.get("manifest_id") != manifest.manifest_id:
            raise UsageError(f"{what} was packed for another manifest")
        if header.get("block_size") != manifest.block_size or header.get("size_bytes") != manifest.size_bytes:
            raise FormatError(f"{what} is corrupt (block size or image size disagree with the manifest)")
        if header.get("compression") != "zstd":
            raise FormatError(f"{what} uses unknown compression {header.get('compression')!r}")
        self.contents = header.get("contents")
        if self.contents == "send":
            self.start, self.count = bundle_ranges(manifest, None)
        elif self.contents == "ranges":
            raw = header.get("ranges")
            if not isinstance(raw, bytes) or len(raw) % 16:
                raise FormatError(f"{what} is corrupt (ranges)")
            pairs = np.frombuffer(raw, dtype="<u8").reshape(-1, 2)
            total = np.uint64(manifest.total_blocks)
            # In uint64 and in this order, so no sum can wrap before its operands are known small.
            if (pairs[:, 1] == 0).any() or (pairs[:, 0] >= total).any() or (pairs[:, 1] > total - pairs[:, 0]).any():
                raise FormatError(f"{what} is corrupt (ranges)")
            self.start, self.count = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
            if len(self.start) > 1 and (self.start[1:] < self.start[:-1] + self.count[:-1]).any():
                raise FormatError(f"{what} is corrupt (ranges)")
        else:
            raise FormatError(f"{what} has unknown contents {self.contents!r}")
        self.blocks = int(self.count.sum())
        if header.get("blocks") != self.blocks:
            raise FormatError(f"{what} is corrupt (block count)")
        self._chain = hashlib.sha256(header_sum)

    def _read(self, size: int, part: str) -> bytes:
        data = read_claimed(self._handle, size)
        if len(data) != size:
            raise FormatError(f"{self.what} is truncated (in its {part})")
        return data

    def frames(self) -> Iterator[bytes]:
        """The raw bytes of every frame, each verified; ends after checking the trailer."""
        block_size = self._manifest.block_size
        # Each frame is decompressed into at most the length it declares (a read of that size):
        # a frame that would expand without limit costs its declared length, never its expansion.
        packed_input = _FrameInput()
        decompressor = zstandard.ZstdDecompressor(max_window_size=1 << WINDOW_LOG).stream_reader(
            packed_input, read_size=INPUT_PIECE_BYTES, read_across_frames=True)
        frames = 0
        raw_total = 0
        expected = self.blocks * block_size
        while True:
            raw_length, packed_length, check = _FRAME.unpack(self._read(_FRAME.size, "frames"))
            if raw_length == 0 and packed_length == 0:
                if check != bytes(16):
                    raise FormatError(f"{self.what} is corrupt (end marker)")
                break
            if raw_length % block_size or raw_length > MAX_FRAME_BYTES or raw_total + raw_length > expected \
                    or packed_length > MAX_FRAME_BYTES + (1 << 20):
                raise FormatError(f"{self.what} is corrupt (frame {frames} lengths)")
            packed = self._read(packed_length, f"frame {frames}")
            if hashlib.sha256(packed).digest()[:16] != check:
                raise FormatError(f"{self.what} is corrupt (frame {frames} checksum mismatch)")
            self._chain.update(check)
            packed_input.add(packed)
            try:
                raw = _read_full(decompressor, raw_length)
            except zstandard.ZstdError as exc:
                raise FormatError(f"{self.what} is corrupt (frame {frames}: {exc})") from None
            # A frame's bytes all go into its own output; what a writer leaves unread is at most the
            # 4-byte checksum ending a zstd frame. More is data hidden past the declared length.
            if len(raw) != raw_length or packed_input.left > MAX_FRAME_SLACK:
                raise FormatError(f"{self.what} is corrupt (frame {frames} does not decompress to the "
                                  f"{raw_length} bytes it declares)")
            frames += 1
            raw_total += raw_length
            yield raw
        count, raw_bytes, chain, end = _TRAILER.unpack(self._read(_TRAILER.size, "trailer"))
        if end != END_MAGIC or count != frames or raw_bytes != raw_total or chain != self._chain.digest():
            raise FormatError(f"{self.what} is corrupt (trailer mismatch)")
        if raw_total != expected:
            raise FormatError(f"{self.what} is truncated ({raw_total} of {expected} bytes of blocks)")
        if self._handle.read(1):
            raise FormatError(f"{self.what} has stray bytes after its end")

    def placed(self) -> Iterator[tuple[int, memoryview]]:
        """``(first_block, data)`` pieces: ``data`` (whole blocks) belongs at ``first_block``."""
        block_size = self._manifest.block_size
        starts = self.start.tolist()
        counts = self.count.tolist()
        at = 0
        used = 0  # blocks of range ``at`` already placed
        for raw in self.frames():
            view = memoryview(raw)
            while len(view):
                take = min(counts[at] - used, len(view) // block_size)
                yield starts[at] + used, view[: take * block_size]
                view = view[take * block_size :]
                used += take
                if used == counts[at]:
                    at += 1
                    used = 0


def open_bundle(path: str, manifest: Manifest) -> tuple[BinaryIO, BundleReader]:
    """Open ``path`` (``-`` for stdin) and read its header."""
    what = "bundle from stdin" if path == "-" else f"bundle {path}"
    if path == "-":
        handle = sys.stdin.buffer
    else:
        try:
            handle = open(path, "rb")
        except OSError as exc:
            raise UsageError(f"cannot read bundle {path}: {exc.strerror}") from None
    try:
        return handle, BundleReader(handle, manifest, what)
    except BaseException:
        handle.close()
        raise

