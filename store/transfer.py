"""Transfer manifests against what a host's index holds: the store side of ``sketch.manifest_build``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from sketch.blockmap import index_digests, shared_lookups
from sketch.blocks import FileIdentity, ImageSource, open_image, open_indexed
from sketch.digests import digest_source, source_data_bytes
from sketch.imagesum import ChecksumThread
from sketch.manifest import LocalImage, Manifest
from sketch.manifest_build import manifest_from_digests, manifest_of_source
from sketch.progress import Phases, start_phase
from sketch.rank import DEFAULT_EXACT_TOP, DEFAULT_TOP, RankQuery
from sketch.stream import image_stamp

from .ranking import rank_image
from .reader import Store

Progress = Callable[[int], None]


def host_manifest(store: Store, image: str, host: str, block_size: int | None = None,
                  image_format: str | None = None, digest_progress: Progress | None = None,
                  seal_progress: Progress | None = None, *, backing_dirs: tuple[str, ...] = (),
                  expected: FileIdentity | None = None, phases: Phases | None = None) -> Manifest:
    """The manifest of the local ``image`` (read as ``image_format``, None: detected) against every
    image the index lists for ``host``, at the index's block size.

    ``expected``: ``image`` is an indexed path, to be read only if the file there is still the one
    its entry describes (:func:`sketch.blocks.open_indexed`); the service builds manifests so.
    ``phases`` hears each step start: reading the host's block maps, the digest pass (with its
    bytes, unless ``digest_progress`` listens to it), the plan.
    """
    block_size = store.check_block_size(block_size)
    start_phase(phases, f"read {host}'s block maps")
    targets = [(LocalImage.from_info(info), block_map) for info, block_map in store.host_block_maps(host)]
    path = os.path.abspath(image)
    source = (open_image(path, image_format, backing_dirs=backing_dirs) if expected is None
              else open_indexed(path, image_format, expected, backing_dirs=backing_dirs))
    try:
        if digest_progress is None and phases is not None:
            digest_progress = start_phase(phases, f"digest {os.path.basename(path)}",
                                          source_data_bytes(source, block_size))
        return manifest_of_source(source, host, targets, block_size, digest_progress=digest_progress,
                                  seal_progress=seal_progress, phases=phases)
    finally:
        source.close()


@dataclass
class Outgoing:
    """What ``send`` streams: the manifest, the open source it was built from, and why that host."""

    manifest: Manifest
    source: ImageSource
    stamp: tuple[int, int, int]  # sketch.stream.image_stamp before the image was read
    ranking: dict | None  # rank's answer when the host was chosen by ranking
    seconds: dict[str, float]  # wall time of each step: digest, rank, manifest

    def close(self) -> None:
        self.source.close()


def prepare_send(store: Store, image: str, host: str | None = None, *, block_size: int | None = None,
                 image_format: str | None = None, top: int = DEFAULT_TOP, exact_top: int = DEFAULT_EXACT_TOP,
                 exclude_hosts: tuple[str, ...] | list[str] = (), source_host: str | None = None,
                 digest_progress: Progress | None = None, seal_progress: Progress | None = None,
                 phases: Phases | None = None, backing_dirs: tuple[str, ...] = ()) -> Outgoing:
    """Read ``image`` once and build its manifest for ``host``, or for rank's winner when None
    (``exclude_hosts`` and ``source_host`` as :func:`store.ranking.rank_image` takes them).
    ``phases`` hears when ranking and planning start (the digest pass reports to ``digest_progress``).

    The digests rank the fleet and plan the manifest (sorted once for both); the whole-image
    checksum is computed on a second thread while rank and the plan, mostly one core's work, run
    (:class:`sketch.imagesum.ChecksumThread`); the seal then reads just the LOCAL runs again.
    """
    block_size = store.check_block_size(block_size)
    path = os.path.abspath(image)
    stamp = image_stamp(path)
    source = open_image(path, image_format, backing_dirs=backing_dirs)
    checksum = None
    clock = _Clock()
    try:
        # rank's exact pass, its best-image pick and the plan look the same keys up in the same maps
        with shared_lookups():
            digests = digest_source(source, block_size, progress=digest_progress)
            checksum = ChecksumThread(source)
            indexed = index_digests(digests)
            clock.lap("digest")
            ranking = None
            if host is None:
                start_phase(phases, "rank")
                ranking = rank_image(store, RankQuery.from_block_map(indexed.block_map, image), top=top,
                                     exact_top=exact_top, exclude_hosts=exclude_hosts, block_size=block_size,
                                source_host=source_host)
                host = ranking["winner"]
                clock.lap("rank")
            start_phase(phases, f"plan for {host}")
            targets = [(LocalImage.from_info(info), block_map) for info, block_map in store.host_block_maps(host)]
            manifest = manifest_from_digests(source, digests, host, targets, checksum=checksum.result,
                                             seal_progress=seal_progress, source_path=path, indexed=indexed)
            clock.lap("manifest")
    except BaseException:
        if checksum is not None:
            checksum.cancel()
        source.close()
        raise
    return Outgoing(manifest, source, stamp, ranking, clock.laps)


class _Clock:
    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now
