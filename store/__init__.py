"""The sketch index in Redis: per-host catalogues of images, exact block maps and Bloom filters.

``open_store()`` connects (``--redis URL``, ``BLOCKSKETCH_REDIS_URL``, or a private embedded
server), ``refresh_host()`` is a node's periodic refresh job, and :class:`Store` reads the index.
The byte formats and keys are documented in docs/index-format.md.
"""

from __future__ import annotations

import os

from . import ranking as ranking  # registers the "rank" host sketch that every refresh builds
from .catalogue import HostInfo, ImageInfo
from .config import DEFAULT_FP_RATE, IndexConfig
from .connect import connect, printable_url
from .embedded import EmbeddedServer, blocksketch_home
from .index import EmptyRoot, ForgetReport, RefreshReport, forget_images, host_union, refresh_host
from .reader import Store
from .sketches import HOST_FILTER, HostUnion, register_host_sketch

URL_ENV = "BLOCKSKETCH_REDIS_URL"


def open_store(url: str | None = None) -> Store:
    """Open the index at ``url``; None means ``$BLOCKSKETCH_REDIS_URL``, else the embedded default store."""
    url = url or os.environ.get(URL_ENV) or None
    if url is not None:
        return Store(connect(url), printable_url(url))
    embedded = EmbeddedServer()
    local_url = embedded.acquire()
    try:
        return Store(connect(local_url), f"embedded store in {embedded.directory}", embedded)
    except BaseException:
        embedded.release()
        raise


__all__ = [
    "DEFAULT_FP_RATE",
    "EmptyRoot",
    "ForgetReport",
    "HOST_FILTER",
    "HostInfo",
    "HostUnion",
    "ImageInfo",
    "IndexConfig",
    "RefreshReport",
    "Store",
    "URL_ENV",
    "blocksketch_home",
    "forget_images",
    "host_union",
    "open_store",
    "refresh_host",
    "register_host_sketch",
]
