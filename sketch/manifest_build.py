"""Building a manifest: the exact pass of a source image against every image of a destination host.

Three steps, all vectorised over the non-zero blocks (Python loops run per run, never per block;
nothing is sized by the image's total blocks, so a thin 2 TiB disk costs what its data costs):

1. classify (:func:`plan_blocks`): every block is ZERO (outside the digests' non-zero rows),
   LOCAL (its content is in a destination image: take the block map's ``first`` block there),
   SEND (first occurrence of a content the destination lacks) or DUP (a later occurrence of a
   SEND content). Destination images are tried in order of how many source blocks they hold, so
   most LOCAL blocks come from the best image and runs stay long;
2. coalesce (:func:`plan_runs`): consecutive blocks of one kind and source become runs (a LOCAL
   run maps consecutive source blocks to consecutive blocks of one image; a DUP run copies
   consecutive earlier blocks); LOCAL runs are cut at ``MAX_LOCAL_RUN_BYTES`` and grouped into
   verification groups of about ``MAX_GROUP_BYTES`` (:func:`plan_groups`), so that a stale local
   block costs at most one group (< 2 MiB) to re-send;
3. seal: the whole-image checksum, taken on a second thread right after the digests
   (:class:`sketch.imagesum.ChecksumThread`), and the strong hash of every verification group,
   reading only the LOCAL runs again (:func:`group_hashes`). Before that, every DUP block is
   compared byte for byte with the block it copies, so an MD5 collision inside the source becomes
   a SEND block instead of a wrong copy.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .blockmap import BlockMap, IndexedDigests, find_keys, index_digests
from .blocks import DEFAULT_BLOCK_SIZE, ImageSource, check_block_size, open_image
from .digests import DEFAULT_ALGORITHM, ImageDigests, digest_source
from .errors import BlockSizeMismatch, ImageError
from .imagesum import STRONG_HASH, ChecksumThread, strong_hash
from .manifest import DUP, GROUP_HASH_SIZE, LOCAL, MAX_GROUP_BYTES, SEND, ZERO, LocalImage, Manifest
from .progress import Phases, start_phase

MAX_LOCAL_RUN_BYTES = MAX_GROUP_BYTES
# group_hashes reads a group's whole span at once unless it is this many times its LOCAL bytes.
SPAN_READ_FACTOR = 4
# DUP runs are compared in pieces of this many bytes (bounded memory).
COMPARE_BYTES = 4 << 20

Progress = Callable[[int], None]


@dataclass
class BlockPlan:
    """Classification of the non-zero blocks of a source image; every other block is ZERO.

    Row ``i`` is block ``blocks[i]``: arrays follow the data an image holds, never its size.
    """

    total_blocks: int
    blocks: np.ndarray  # (m,) int64: the non-zero blocks, ascending
    kind: np.ndarray  # (m,) uint8: LOCAL, SEND or DUP
    ref: np.ndarray  # (m,) int64: LOCAL -> block in the local image; DUP -> source block copied; else -1
    image: np.ndarray  # (m,) int32: LOCAL -> index of the local image; else -1


@dataclass
class PlanRuns:
    """Runs of a plan covering every block: ``row`` is the plan row of a run's first block, -1 for ZERO."""

    start: np.ndarray  # (r,) int64: first block
    length: np.ndarray  # (r,) int64
    row: np.ndarray  # (r,) int64

    def kind(self, plan: BlockPlan) -> np.ndarray:
        kind = np.full(len(self.row), ZERO, dtype=np.uint8)
        data = self.row >= 0
        kind[data] = plan.kind[self.row[data]]
        return kind


def plan_blocks(source: ImageDigests, targets: list[BlockMap], indexed: IndexedDigests | None = None) -> BlockPlan:
    """Classify every non-zero block of ``source`` against the destination's block maps ``targets``.

    ``indexed``: :func:`sketch.blockmap.index_digests` of ``source``, when the caller has it.
    """
    if indexed is None:
        indexed = index_digests(source)
    nonzero = indexed.nonzero
    m = len(nonzero)
    kind = np.zeros(m, dtype=np.uint8)
    ref = np.full(m, -1, dtype=np.int64)
    image = np.full(m, -1, dtype=np.int32)
    plan = BlockPlan(source.total_blocks, nonzero, kind, ref, image)
    if m == 0:
        return plan
    unique = indexed.block_map.keys
    group = indexed.row  # the content of every non-zero block, in block order
    multiplicity = indexed.block_map.counts
    first_block = indexed.block_map.first.astype(np.int64)  # the earliest block of each content

    # Try the image holding the most source blocks first.
    coverage = [int(multiplicity[find_keys(t.keys, unique) >= 0].sum()) for t in targets]
    chosen = np.full(len(unique), -1, dtype=np.int32)
    offset = np.full(len(unique), -1, dtype=np.int64)
    for j in sorted(range(len(targets)), key=lambda j: -coverage[j]):
        if coverage[j] == 0:
            continue
        pending = np.flatnonzero(chosen < 0)
        if len(pending) == 0:
            break
        # all keys still pending: ask with the array itself, so a shared lookup can answer
        position = find_keys(targets[j].keys, unique if len(pending) == len(unique) else unique[pending])
        hit = position >= 0
        chosen[pending[hit]] = j
        offset[pending[hit]] = targets[j].first[position[hit]].astype(np.int64)

    block_image = chosen[group]
    local = block_image >= 0
    kind[local] = LOCAL
    ref[local] = offset[group[local]]
    image[local] = block_image[local]
    origin = first_block[group]
    is_first = origin == nonzero
    kind[~local & is_first] = SEND
    dup = ~local & ~is_first
    kind[dup] = DUP
    ref[dup] = origin[dup]
    return plan


def plan_runs(plan: BlockPlan, max_local_blocks: int) -> PlanRuns:
    """The runs of a plan (LOCAL runs cut at ``max_local_blocks``), the gaps between its rows as ZERO runs."""
    kind, ref, image, blocks = plan.kind, plan.ref, plan.image, plan.blocks
    m = len(kind)
    start = np.zeros(0, np.int64)  # rows
    length = np.zeros(0, np.int64)
    if m:
        breaks = np.ones(m, dtype=bool)
        chained = (kind[1:] == LOCAL) | (kind[1:] == DUP)
        breaks[1:] = (blocks[1:] != blocks[:-1] + 1) | (kind[1:] != kind[:-1]) | (image[1:] != image[:-1]) | \
            (chained & (ref[1:] != ref[:-1] + 1))
        start = np.flatnonzero(breaks)
        length = np.diff(np.append(start, m))
        pieces = np.where(kind[start] == LOCAL, -(-length // max_local_blocks), 1)
        if (pieces > 1).any():
            # Run i becomes pieces[i] runs starting every max_local_blocks blocks.
            owner = np.repeat(np.arange(len(start)), pieces)
            index_in_run = np.arange(len(owner)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
            new_start = start[owner] + index_in_run * max_local_blocks
            end = start[owner] + length[owner]  # pieces of other runs are whole runs: end - start
            length = np.minimum(new_start + np.where(pieces[owner] > 1, max_local_blocks, end), end) - new_start
            start = new_start
    # A run's rows are consecutive blocks, so its block is its first row's; the gaps are ZERO.
    block_start = blocks[start].astype(np.int64)
    block_end = block_start + length
    gap_start = np.append(0, block_end)
    gap_length = np.append(block_start, plan.total_blocks) - gap_start
    count = len(start)
    out_start = np.empty(2 * count + 1, dtype=np.int64)
    out_length = np.empty(2 * count + 1, dtype=np.int64)
    out_row = np.full(2 * count + 1, -1, dtype=np.int64)
    out_start[0::2], out_length[0::2] = gap_start, gap_length
    out_start[1::2], out_length[1::2], out_row[1::2] = block_start, length, start
    keep = out_length > 0
    return PlanRuns(out_start[keep], out_length[keep], out_row[keep])


def plan_groups(local_length: np.ndarray, max_group_blocks: int) -> np.ndarray:
    """LOCAL runs per verification group: a run joins the group of the ``max_group_blocks`` window
    of the LOCAL block stream where it starts (so a group holds less than twice that)."""
    if len(local_length) == 0:
        return np.zeros(0, dtype=np.uint32)
    before = np.cumsum(local_length) - local_length
    _, runs = np.unique(before // max_group_blocks, return_counts=True)
    return runs.astype(np.uint32)


def _fix_dup_collisions(source: ImageSource, plan: BlockPlan, runs: PlanRuns, block_size: int) -> int:
    """Compare every DUP block with the block it copies; demote differing ones to SEND.

    Returns how many were demoted (an MD5 collision inside the source, or a change under us).
    """
    dup_runs = np.flatnonzero(runs.kind(plan) == DUP)
    per_piece = max(1, COMPARE_BYTES // block_size)
    demoted = 0
    for run in dup_runs.tolist():
        first, count, row = int(runs.start[run]), int(runs.length[run]), int(runs.row[run])
        origin = int(plan.ref[row])
        for done in range(0, count, per_piece):
            blocks = min(per_piece, count - done)
            here = bytearray(blocks * block_size)
            there = bytearray(blocks * block_size)
            source.read_into((first + done) * block_size, memoryview(here))
            source.read_into((origin + done) * block_size, memoryview(there))
            if here == there:
                continue
            a = np.frombuffer(here, dtype=np.uint8).reshape(blocks, block_size)
            b = np.frombuffer(there, dtype=np.uint8).reshape(blocks, block_size)
            differ = row + done + np.flatnonzero(np.any(a != b, axis=1))
            plan.kind[differ] = SEND
            plan.ref[differ] = -1
            demoted += len(differ)
    return demoted


def _changed(path: str) -> ImageError:
    return ImageError(f"image {path} changed while the manifest was built; stop the VM using it and retry")


def build_manifest(image_path: str, host: str, targets: list[tuple[LocalImage, BlockMap]],
                   block_size: int = DEFAULT_BLOCK_SIZE, algorithm: str = DEFAULT_ALGORITHM,
                   digest_progress: Progress | None = None, seal_progress: Progress | None = None,
                   image_format: str | None = None, backing_dirs: tuple[str, ...] = (),
                   phases: Phases | None = None) -> Manifest:
    """The manifest rebuilding ``image_path`` on ``host`` from its images ``targets`` plus a bundle.

    ``targets`` are the destination's index entries with their block maps (``store.host_block_maps``).
    ``image_format`` ("raw" or "qcow2") is how to read ``image_path``; None detects it by magic.
    The manifest describes the guest-visible bytes, so pack must read the image the same way.
    """
    source = open_image(image_path, image_format, backing_dirs=backing_dirs)
    try:
        return manifest_of_source(source, host, targets, block_size, algorithm, digest_progress, seal_progress,
                                  phases)
    finally:
        source.close()


def manifest_of_source(source: ImageSource, host: str, targets: list[tuple[LocalImage, BlockMap]],
                       block_size: int = DEFAULT_BLOCK_SIZE, algorithm: str = DEFAULT_ALGORITHM,
                       digest_progress: Progress | None = None, seal_progress: Progress | None = None,
                       phases: Phases | None = None) -> Manifest:
    """:func:`build_manifest` of an image already open (the caller closes it); ``phases`` hears
    when the plan starts, after the digest pass."""
    check_block_size(block_size)
    _check_targets(targets, block_size)
    checksum = None
    try:
        digests = digest_source(source, block_size, algorithm, progress=digest_progress)
        checksum = ChecksumThread(source)
        start_phase(phases, f"plan for {host}")
        return manifest_from_digests(source, digests, host, targets, checksum.result, seal_progress,
                                     source_path=source.path)
    except BaseException:
        if checksum is not None:
            checksum.cancel()
        raise


def manifest_from_digests(source: ImageSource, digests: ImageDigests, host: str,
                          targets: list[tuple[LocalImage, BlockMap]], checksum: bytes | Callable[[], bytes],
                          seal_progress: Progress | None = None, source_path: str | None = None,
                          indexed: IndexedDigests | None = None) -> Manifest:
    """The manifest of an open ``source`` whose blocks were already digested (``digests``).

    ``checksum`` is the whole-image checksum, or a callable returning it (asked last: a
    :class:`sketch.imagesum.ChecksumThread` started after the digests); the seal reads only the
    LOCAL runs again, for their group hashes. A change of the image after its digests shows as a
    checksum the rebuilt image does not match (pack checks it before writing a bundle file, apply
    before writing the output). ``indexed``: the digests' one sort
    (:func:`sketch.blockmap.index_digests`), when a rank query already made it.
    """
    block_size = digests.block_size
    _check_targets(targets, block_size)
    if digests.size_bytes != source.size_bytes:
        raise _changed(source.path)
    plan = plan_blocks(digests, [m for _, m in targets], indexed)
    max_local = max(1, MAX_LOCAL_RUN_BYTES // block_size)
    runs = plan_runs(plan, max_local)
    if _fix_dup_collisions(source, plan, runs, block_size):
        runs = plan_runs(plan, max_local)
    start, length = runs.start, runs.length
    run_kind = runs.kind(plan)
    is_local = run_kind == LOCAL
    local_rows = runs.row[is_local]
    group_runs = plan_groups(length[is_local], max(1, MAX_GROUP_BYTES // block_size))
    hashes = group_hashes(source, start[is_local], length[is_local], group_runs, block_size, seal_progress)
    if callable(checksum):
        checksum = checksum()
    # Keep only the images a LOCAL run uses, numbered in order of first use.
    used, local_image = np.unique(plan.image[local_rows], return_inverse=True)
    images = [LocalImage.from_info(targets[int(j)][0]) for j in used]
    return Manifest(
        size_bytes=source.size_bytes,
        block_size=block_size,
        algorithm=digests.algorithm,
        host=host,
        checksum=checksum,
        images=images,
        run_kind=run_kind.astype(np.uint8),
        run_length=length.astype(np.uint64),
        local_image=local_image.astype(np.uint32),
        local_block=plan.ref[local_rows].astype(np.uint64),
        group_runs=group_runs,
        group_hash=hashes,
        dup_origin=plan.ref[runs.row[run_kind == DUP]].astype(np.uint64),
        source_path=source_path if source_path is not None else source.path,
    )


def _check_targets(targets: list[tuple[LocalImage, BlockMap]], block_size: int) -> None:
    for info, block_map in targets:
        if block_map.block_size != block_size:
            raise BlockSizeMismatch(f"the index of {info.host} ({info.path})", block_map.block_size, block_size)


def group_hashes(source: ImageSource, local_start: np.ndarray, local_length: np.ndarray, group_runs: np.ndarray,
                 block_size: int, progress: Progress | None = None) -> np.ndarray:
    """The strong hash (BLAKE3) of every verification group's source bytes, reading only the LOCAL
    runs.

    Groups hash on two threads for raw images (the hash and ``preadv`` release the GIL); a qcow2
    reader keeps caches, so it is read from one thread.
    """
    hashes = np.zeros((len(group_runs), GROUP_HASH_SIZE), dtype=np.uint8)
    group_end = np.cumsum(group_runs.astype(np.int64))
    group_begin = group_end - group_runs.astype(np.int64)
    starts = local_start.tolist()
    lengths = local_length.tolist()

    def one(group: int) -> int:
        digest = strong_hash(STRONG_HASH)
        runs = range(int(group_begin[group]), int(group_end[group]))
        first, end = starts[runs[0]], starts[runs[-1]] + lengths[runs[-1]]
        wanted = sum(lengths[run] for run in runs)
        if end - first <= SPAN_READ_FACTOR * wanted:
            # One read of the group's whole span, its LOCAL blocks gathered into one buffer, one
            # update: a group has ~70 runs on a real image, mostly of 1-3 blocks, and hashing
            # tiny inputs keeps the GIL (hashlib: under 2 KiB), so hashing them run by run serialised the threads.
            span = bytearray((end - first) * block_size)
            source.read_into(first * block_size, memoryview(span))
            local = np.zeros(end - first, dtype=bool)
            for run in runs:
                local[starts[run] - first : starts[run] - first + lengths[run]] = True
            digest.update(np.frombuffer(span, dtype=np.uint8).reshape(-1, block_size)[local])
        else:
            for run in runs:
                view = memoryview(bytearray(lengths[run] * block_size))
                source.read_into(starts[run] * block_size, view)
                digest.update(view)
        hashes[group] = np.frombuffer(digest.digest(), dtype=np.uint8)
        return wanted * block_size

    workers = 2 if getattr(source, "format", "") == "raw" else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done in pool.map(one, range(len(group_runs))):
            if progress:
                progress(done)
    return hashes


__all__ = ["MAX_LOCAL_RUN_BYTES", "BlockPlan", "PlanRuns", "build_manifest", "group_hashes", "manifest_from_digests",
           "plan_blocks", "plan_groups", "plan_runs"]
