"""Per-block digests of an image, computed on every core.

The digests of an image are kept for its non-zero blocks only: ``nonzero`` (m,) the block
numbers, increasing, and ``nonzero_digests`` (m, 16) uint8 their digests, beside the image's
``total_blocks``. Every other block is all zeros. So memory follows the data an image holds, not
its virtual size: a 2 TiB thin disk holding 1 GiB costs what the 1 GiB costs (a row per block of
it would be 4G rows at 512 B). All-zero blocks are found with a vectorised OR-reduction and never
hashed; holes of sparse files are not read at all.

Hashing runs on every core over byte ranges of the image. The C accelerator
(``sketch/_blockhash.c``) hashes a whole chunk with the GIL released, so worker threads share the
digest array directly; without it (no compiler at install time), ``hashlib`` per block keeps the
GIL for inputs under 2 KiB, so worker processes are used instead and only digests cross process
boundaries. Each worker opens the image itself and holds one read chunk: memory stays bounded.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np

from .blocks import DEFAULT_BLOCK_SIZE, ImageSource, block_count, check_block_size, open_image, reopen
from .errors import UsageError

DIGEST_SIZE = 16
ALGORITHMS = ("md5",)
DEFAULT_ALGORITHM = "md5"

READ_CHUNK = 4 << 20
# A task is this many bytes of data; small enough to balance two cores on a sparse image,
# large enough that the per-task overhead (pickling ~1 MiB of digests) is noise.
TASK_BYTES = 32 << 20
# Below this much data a process pool costs more than it saves.
PARALLEL_MIN_BYTES = 16 << 20

ProgressCallback = Callable[[int], None]

try:
    from . import _blockhash
except ImportError:  # built without a C compiler: hashlib per block, in processes
    _blockhash = None


def zero_block_digest(block_size: int, algorithm: str = DEFAULT_ALGORITHM) -> bytes:
    """The digest of an all-zero block of ``block_size`` bytes."""
    return _hasher(algorithm)(bytes(block_size)).digest()


def _hasher(algorithm: str):
    if algorithm not in ALGORITHMS:
        raise UsageError(f"unknown digest algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
    return hashlib.md5


class ImageDigests:
    """Digests of the non-zero blocks of one image; every other block is all zeros.

    Built from the sparse rows (``nonzero=``, ``nonzero_digests=``, ``total_blocks=``), or, for
    small images, from dense per-block ``digests`` (n, 16) and ``zero`` (n,) arrays.
    """

    def __init__(self, path: str, size_bytes: int, block_size: int, algorithm: str,
                 digests: np.ndarray | None = None, zero: np.ndarray | None = None, *,
                 nonzero: np.ndarray | None = None, nonzero_digests: np.ndarray | None = None,
                 total_blocks: int | None = None):
        self.path = path
        self.size_bytes = int(size_bytes)
        self.block_size = int(block_size)
        self.algorithm = algorithm
        if nonzero is None:
            self.nonzero = np.flatnonzero(~np.asarray(zero, dtype=bool))
            self.nonzero_digests = np.ascontiguousarray(np.asarray(digests, dtype=np.uint8)[self.nonzero])
            self.total_blocks = len(zero) if total_blocks is None else int(total_blocks)
        else:
            self.nonzero = np.asarray(nonzero, dtype=np.int64)
            self.nonzero_digests = np.asarray(nonzero_digests, dtype=np.uint8).reshape(-1, DIGEST_SIZE)
            self.total_blocks = block_count(self.size_bytes, self.block_size) if total_blocks is None \
                else int(total_blocks)

    @property
    def zero_blocks(self) -> int:
        return self.total_blocks - len(self.nonzero)

    @property
    def zero(self) -> np.ndarray:
        """Dense (n,) bool, True where a block is all zeros. Allocates a row per block: small images only."""
        zero = np.ones(self.total_blocks, dtype=bool)
        zero[self.nonzero] = False
        return zero

    @property
    def digests(self) -> np.ndarray:
        """Dense (n, 16) digests, the all-zero block's in zero rows. Allocates a row per block: small images only."""
        digests = _zero_filled(self.total_blocks, self.block_size, self.algorithm)
        digests[self.nonzero] = self.nonzero_digests
        return digests


def digest_chunk(buffer: memoryview, block_size: int, digests: np.ndarray, zero: np.ndarray,
                 algorithm: str = DEFAULT_ALGORITHM) -> None:
    """Digest the whole blocks in ``buffer`` into the matching rows of ``digests`` and ``zero``.

    Rows of all-zero blocks in ``digests`` are left as they are.
    """
    md5 = _hasher(algorithm)
    if _blockhash is not None and algorithm == "md5":
        _blockhash.md5_blocks(buffer, block_size, digests, zero.view(np.uint8))
        return
    words = np.frombuffer(buffer, dtype=np.uint64).reshape(-1, block_size // 8)
    nonzero = np.bitwise_or.reduce(words, axis=1) != 0
    offsets = (np.flatnonzero(nonzero) * block_size).tolist()
    joined = b"".join([md5(buffer[o : o + block_size]).digest() for o in offsets])
    zero[:] = ~nonzero
    digests[nonzero] = np.frombuffer(joined, dtype=np.uint8).reshape(-1, DIGEST_SIZE)


def _digest_span(source: ImageSource, start: int, stop: int, base: int, block_size: int, algorithm: str,
                 digests: np.ndarray, zero: np.ndarray, progress: ProgressCallback | None) -> None:
    """Digest bytes ``[start, stop)`` (block aligned) into ``digests``/``zero`` from row ``base`` on."""
    chunk = bytearray(min(READ_CHUNK, stop - start))
    view = memoryview(chunk)
    position = start
    while position < stop:
        length = min(len(chunk), stop - position)
        length += -length % block_size
        part = view[:length]
        source.read_into(position, part)
        first = base + (position - start) // block_size
        rows = slice(first, first + length // block_size)
        digest_chunk(part, block_size, digests[rows], zero[rows], algorithm)
        position += length
        if progress:
            progress(length)


def _zero_filled(count: int, block_size: int, algorithm: str) -> np.ndarray:
    """Digest rows for ``count`` blocks, each preset to the all-zero block's digest (holes stay so)."""
    digests = np.empty((count, DIGEST_SIZE), dtype=np.uint8)
    digests[:] = np.frombuffer(zero_block_digest(block_size, algorithm), dtype=np.uint8)
    return digests


def _data_spans(source: ImageSource, block_size: int, size_bytes: int) -> list[tuple[int, int]]:
    """Block-aligned ``(start, stop)`` byte spans covering every data extent, merged and cut into tasks."""
    spans: list[list[int]] = []
    padded = block_count(size_bytes, block_size) * block_size
    for offset, length in source.data_extents(0, size_bytes):
        start = offset - offset % block_size
        stop = min(padded, offset + length + (-(offset + length) % block_size))
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], stop)
        else:
            spans.append([start, stop])
    tasks = []
    for start, stop in spans:
        for task_start in range(start, stop, TASK_BYTES):
            tasks.append((task_start, min(stop, task_start + TASK_BYTES)))
    return tasks


_worker_sources: dict[tuple[str, str, tuple[str, ...]], ImageSource] = {}


def _worker_digest(path: str, image_format: str, backing_dirs: tuple[str, ...], start: int, stop: int,
                   block_size: int, algorithm: str):
    key = (path, image_format, backing_dirs)
    source = _worker_sources.get(key)
    if source is None:
        for old in _worker_sources.values():
            old.close()
        _worker_sources.clear()
        source = _worker_sources[key] = open_image(path, image_format, backing_dirs=backing_dirs)
    count = (stop - start) // block_size
    digests = np.empty((count, DIGEST_SIZE), dtype=np.uint8)
    zero = np.ones(count, dtype=bool)
    _digest_span(source, start, stop, 0, block_size, algorithm, digests, zero, None)
    return digests, zero


_pool: ProcessPoolExecutor | None = None
_pool_pid = 0


def default_workers() -> int:
    """Worker processes used for hashing: one per usable core."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _get_pool(workers: int) -> ProcessPoolExecutor:
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid() or _pool._max_workers != workers:
        # fork: workers inherit the imported modules, so a pool starts in milliseconds.
        _pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))
        _pool_pid = os.getpid()
    return _pool


def _digest_in_threads(source: ImageSource, spans: list[tuple[int, int, int]], block_size: int, algorithm: str,
                       digests: np.ndarray, zero: np.ndarray, progress: ProgressCallback | None,
                       workers: int) -> None:
    """Digest spans on worker threads, each with its own open image (qcow2 caches are per reader)."""
    local = threading.local()
    opened: list[ImageSource] = []
    lock = threading.Lock()

    def report(done: int) -> None:
        with lock:
            progress(done)

    def work(span: tuple[int, int, int]) -> None:
        reader = getattr(local, "reader", None)
        if reader is None:
            reader = local.reader = reopen(source)
            with lock:
                opened.append(reader)
        _digest_span(reader, *span, block_size, algorithm, digests, zero, report if progress else None)

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(work, spans):
                pass
    finally:
        for reader in opened:
            reader.close()


def digest_source(source: ImageSource, block_size: int = DEFAULT_BLOCK_SIZE, algorithm: str = DEFAULT_ALGORITHM,
                  workers: int | None = None, progress: ProgressCallback | None = None) -> ImageDigests:
    """Digest every block of an open image source (rows for its data extents only)."""
    check_block_size(block_size)
    size_bytes = source.size_bytes
    total = block_count(size_bytes, block_size)
    spans = _data_spans(source, block_size, size_bytes)
    # Row r of the arrays is block r - row_base[k] + span_first[k] of the span k holding it.
    span_rows = np.array([(stop - start) // block_size for start, stop in spans], dtype=np.int64)
    row_base = np.cumsum(span_rows) - span_rows
    span_first = np.array([start // block_size for start, _ in spans], dtype=np.int64)
    rows = int(span_rows.sum())
    digests = np.empty((rows, DIGEST_SIZE), dtype=np.uint8)
    zero = np.ones(rows, dtype=bool)
    tasks = [(start, stop, int(base)) for (start, stop), base in zip(spans, row_base.tolist())]
    data_bytes = rows * block_size
    workers = default_workers() if workers is None else max(1, workers)
    if workers == 1 or data_bytes < PARALLEL_MIN_BYTES or len(spans) < 2:
        for start, stop, base in tasks:
            _digest_span(source, start, stop, base, block_size, algorithm, digests, zero, progress)
    elif _blockhash is not None:
        _digest_in_threads(source, tasks, block_size, algorithm, digests, zero, progress, workers)
    else:
        pool = _get_pool(workers)
        jobs = [pool.submit(_worker_digest, source.path, source.format, source.backing_dirs, start, stop, block_size,
                            algorithm)
                for start, stop, _ in tasks]
        try:
            for job, (start, stop, base) in zip(jobs, tasks):
                part, part_zero = job.result()
                digests[base : base + len(part_zero)] = part
                zero[base : base + len(part_zero)] = part_zero
                if progress:
                    progress(stop - start)
        finally:
            for job in jobs:
                job.cancel()
    keep = np.flatnonzero(~zero)
    del zero
    span = np.searchsorted(row_base, keep, side="right") - 1
    nonzero = keep - row_base[span] + span_first[span]
    kept = digests[keep] if len(keep) < rows else digests
    return ImageDigests(source.path, size_bytes, block_size, algorithm, nonzero=nonzero, nonzero_digests=kept,
                        total_blocks=total)


def digest_image(path: str, block_size: int = DEFAULT_BLOCK_SIZE, algorithm: str = DEFAULT_ALGORITHM,
                 image_format: str | None = None, workers: int | None = None,
                 progress: ProgressCallback | None = None, backing_dirs: tuple[str, ...] = ()) -> ImageDigests:
    """Digest every block of the image at ``path`` (format detected by magic unless given; a qcow2's
    backing files from its own directory or ``backing_dirs``)."""
    check_block_size(block_size)
    source = open_image(path, image_format, backing_dirs=backing_dirs)
    try:
        return digest_source(source, block_size, algorithm, workers, progress)
    finally:
        source.close()


def data_bytes(path: str, block_size: int = DEFAULT_BLOCK_SIZE, image_format: str | None = None,
               backing_dirs: tuple[str, ...] = ()) -> int:
    """Bytes that digesting ``path`` will actually read (its data extents), for progress bars."""
    source = open_image(path, image_format, backing_dirs=backing_dirs)
    try:
        return source_data_bytes(source, block_size)
    finally:
        source.close()


def source_data_bytes(source: ImageSource, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """:func:`data_bytes` of an image already open."""
    return sum(stop - start for start, stop in _data_spans(source, block_size, source.size_bytes))
