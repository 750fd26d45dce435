"""blocksketch's library: blocks, digests, block maps, filters, estimates, manifests.

It knows nothing of Redis, HTTP or the command line; ``store``, ``server`` and ``cli`` call into it.
"""

from .blockmap import BlockMap, contains, digest_keys, key_digests
from .blocks import DEFAULT_BLOCK_SIZE, check_block_size, list_images, open_image
from .bloom import BloomFilter
from .digests import ImageDigests, digest_image, digest_source
from .errors import (
    BlocksketchError,
    BlockSizeMismatch,
    FormatError,
    ImageError,
    NotFound,
    StoreError,
    UsageError,
    VerificationError,
)
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
    "NotFound",
    "ShareMetrics",
    "StoreError",
    "UsageError",
    "VerificationError",
    "check_block_size",
    "contains",
    "digest_image",
    "digest_keys",
    "digest_source",
    "key_digests",
    "list_images",
    "open_image",
    "share_metrics",
    "shared_mask",
]
