"""blocksketch's library: blocks, digests, block maps, filters, estimates, manifests.

It knows nothing of Redis, HTTP or the command line; ``store``, ``server`` and ``cli`` call into it.
"""

from .apply import MissingBlocks, apply_manifest, resolve_local_images, resolve_local_sources
from .blockmap import BlockMap, contains, digest_keys, key_digests
from .blocks import DEFAULT_BLOCK_SIZE, check_block_size, list_images, open_image
from .bloom import BloomFilter
from .bundle import pack_bundle
from .digests import ImageDigests, digest_image, digest_source
from .errors import (
    BlockSizeMismatch,
    BlocksketchError,
    FormatError,
    ImageError,
    NotFound,
    StoreError,
    UsageError,
    VerificationError,
)
from .manifest import LocalImage, Manifest
from .manifest_build import build_manifest
from .metrics import ShareMetrics, share_metrics, shared_mask

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "BlockMap",
    "BlockSizeMismatch",
    "BloomFilter",
    "BlocksketchError",
    "FormatError",
    "ImageDigests",
    "ImageError",
    "LocalImage",
    "Manifest",
    "MissingBlocks",
    "NotFound",
    "ShareMetrics",
    "StoreError",
    "UsageError",
    "VerificationError",
    "apply_manifest",
    "build_manifest",
    "check_block_size",
    "contains",
    "digest_image",
    "digest_keys",
    "digest_source",
    "key_digests",
    "list_images",
    "open_image",
    "pack_bundle",
    "resolve_local_images",
    "resolve_local_sources",
    "share_metrics",
    "shared_mask",
]
