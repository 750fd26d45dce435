"""Transfer manifests against what a host's index holds: the store side of ``sketch.manifest_build``."""

from __future__ import annotations

import os
from collections.abc import Callable

from sketch.manifest import LocalImage, Manifest
from sketch.manifest_build import build_manifest

from .reader import Store

Progress = Callable[[int], None]


def host_manifest(store: Store, image: str, host: str, block_size: int | None = None,
                  image_format: str | None = None, digest_progress: Progress | None = None,
                  seal_progress: Progress | None = None) -> Manifest:
    """The manifest of the local ``image`` (read as ``image_format``, None: detected) against every
    image the index lists for ``host``, at the index's block size."""
    block_size = store.check_block_size(block_size)
    targets = [(LocalImage.from_info(info), block_map) for info, block_map in store.host_block_maps(host)]
    return build_manifest(os.path.abspath(image), host, targets, block_size, digest_progress=digest_progress,
                          seal_progress=seal_progress, image_format=image_format)
