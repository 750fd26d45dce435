"""The index-level configuration: one block size, digest algorithm and filter FP rate per index.

Stored at ``blocksketch:config`` as a msgpack map (schema ``blocksketch.index``, version 1):

- ``block_size`` (int): bytes per block of every image in the index.
- ``algorithm`` (str): the block digest, ``"md5"``.
- ``fp_rate`` (float): the target false-positive rate of every Bloom filter in the index.
- ``k`` (int): hash functions per filter, fixed by ``fp_rate`` so all filters can be combined.
- ``created_at`` (float): Unix time the index was created.

The first refresh creates it (``SET NX``, so two first refreshes agree on one); later ones must
match it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sketch.errors import BlockSizeMismatch, FormatError, NotFound, UsageError

from . import codec, keys

SCHEMA = "blocksketch.index"
VERSION = 1
DEFAULT_FP_RATE = 0.01


@dataclass(frozen=True)
class IndexConfig:
    """What every entry of one index shares."""

    block_size: int
    algorithm: str
    fp_rate: float
    k: int
    created_at: float

    def to_dict(self) -> dict:
        return {"block_size": self.block_size, "algorithm": self.algorithm, "fp_rate": self.fp_rate, "k": self.k,
                "created_at": self.created_at}


def encode(config: IndexConfig) -> bytes:
    return codec.pack({"schema": SCHEMA, "version": VERSION, **config.to_dict()})


def decode(data: bytes | None) -> IndexConfig:
    what = f"index config {keys.CONFIG}"
    document = codec.unpack(data, what, SCHEMA, (VERSION,))
    config = IndexConfig(
        block_size=codec.field(document, "block_size", int, what),
        algorithm=codec.field(document, "algorithm", str, what),
        fp_rate=float(codec.field(document, "fp_rate", (int, float), what)),
        k=codec.field(document, "k", int, what),
        created_at=float(codec.field(document, "created_at", (int, float), what)),
    )
    if not 0 < config.fp_rate < 1 or config.k < 1 or config.block_size < 1:
        raise FormatError(f"{what} is corrupt (impossible values)")
    return config


def new_config(block_size: int, algorithm: str, fp_rate: float) -> IndexConfig:
    """A configuration for a new index; ``k`` follows from ``fp_rate``."""
    from sketch.bloom import k_for_fp_rate

    if not 0 < fp_rate < 1:
        raise UsageError(f"filter FP rate {fp_rate} must be between 0 and 1")
    return IndexConfig(block_size, algorithm, float(fp_rate), int(k_for_fp_rate(fp_rate)), time.time())


def check_block_size(config: IndexConfig | None, block_size: int | None) -> int:
    """The index's block size; BlockSizeMismatch if ``block_size`` is given and differs; NotFound if empty."""
    if config is None:
        raise NotFound("the index is empty: run `blocksketch index` on the hosts first")
    if block_size is not None and block_size != config.block_size:
        raise BlockSizeMismatch("the index", config.block_size, block_size)
    return config.block_size
