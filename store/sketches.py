"""Per-host sketches built at refresh time from the union of a host's images.

A host sketch is built from the host's *union*: the sorted unique non-zero keys of all its images
and, per key, how often it occurs over all of them. The host Bloom filter is the first; another
module can add its own (e.g. a fixed-size filter over a content-defined sample of the keys) with
:func:`register_host_sketch`, and every later refresh builds, stores and publishes it with the rest
of the host's catalogue (a host whose catalogue lacks a registered sketch is rebuilt on its next
refresh even if no image changed).

A builder returns the bytes to store at ``blocksketch:{host}:sketch:<name>:<generation>`` and a
small dict of parameters (msgpack-able) kept in the catalogue to read it back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .config import IndexConfig

HOST_FILTER = "filter"


@dataclass(frozen=True)
class HostUnion:
    """The distinct non-zero contents of all of one host's images."""

    host: str
    config: IndexConfig
    keys: np.ndarray  # (u, 2) uint64, sorted, unique
    counts: np.ndarray  # (u,) uint64: occurrences summed over the host's images


HostSketchBuilder = Callable[[HostUnion], tuple[bytes, dict]]


def build_host_filter(union: HostUnion) -> tuple[bytes, dict]:
    """The host's Bloom filter over its distinct non-zero digests, raw MSB-first bitmap."""
    from sketch.bloom import BloomFilter

    bloom = BloomFilter.from_keys(union.keys, union.config.fp_rate, k=union.config.k)
    return bloom.to_bytes(), {"m_bits": int(bloom.m_bits), "k": int(bloom.k), "popcount": int(bloom.popcount())}


HOST_SKETCHES: dict[str, HostSketchBuilder] = {HOST_FILTER: build_host_filter}


def register_host_sketch(name: str, builder: HostSketchBuilder) -> None:
    """Add a per-host sketch that every refresh builds from the host's union (idempotent)."""
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"host sketch name {name!r} must be letters, digits, - and _")
    HOST_SKETCHES[name] = builder


def build_host_sketches(union: HostUnion) -> dict[str, tuple[bytes, dict]]:
    """Every registered host sketch of ``union``."""
    return {name: builder(union) for name, builder in HOST_SKETCHES.items()}
