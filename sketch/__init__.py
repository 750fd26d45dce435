"""blocksketch's library: blocks, digests, block maps, filters, estimates, manifests.

It knows nothing of Redis, HTTP or the command line; ``store``, ``server`` and ``cli`` call into it.

The public names below are imported from their modules on first use (PEP 562), so that
``import sketch.errors`` (every command does) does not pay for numpy, zstd and the transfer code
(~0.2 s of a command's start-up).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "apply": ["MissingBlocks", "apply_manifest", "resolve_local_images", "resolve_local_sources"],
    "blockmap": ["BlockMap", "contains", "digest_keys", "key_digests"],
    "blocks": ["DEFAULT_BLOCK_SIZE", "check_block_size", "list_images", "open_image"],
    "bloom": ["BloomFilter"],
    "bundle": ["pack_bundle"],
    "digests": ["ImageDigests", "digest_image", "digest_source"],
    "errors": ["BlockSizeMismatch", "BlocksketchError", "FormatError", "ImageError", "NotFound", "StoreError",
               "UsageError", "VerificationError"],
    "manifest": ["LocalImage", "Manifest"],
    "manifest_build": ["build_manifest"],
    "metrics": ["ShareMetrics", "share_metrics", "shared_mask"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
