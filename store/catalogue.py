"""A host's catalogue: the one document that says which entries make up the host's current index.

Stored at ``blocksketch:{host}:catalogue`` as a msgpack map, schema ``blocksketch.catalogue``,
version 1 (docs/index-format.md lists every field). A refresh writes new entries under new keys,
then replaces this one document atomically, so readers see either the old or the new index, whole.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from sketch.errors import FormatError

from . import codec, keys

SCHEMA = "blocksketch.catalogue"
VERSION = 1


def iso_time(seconds: float) -> str:
    """Unix seconds as an ISO-8601 UTC string, for listings."""
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class FilterEntry:
    """Where a Bloom filter bitmap lives and its geometry."""

    key: str
    m_bits: int
    k: int
    popcount: int

    @property
    def size_bytes(self) -> int:
        return self.m_bits // 8


@dataclass(frozen=True)
class ImageEntry:
    """One indexed image: file identity (for incremental refresh), block counts, where its entries live."""

    path: str
    image_id: str
    generation: int
    size_bytes: int
    mtime_ns: int
    inode: int
    total_blocks: int
    zero_blocks: int
    distinct: int  # distinct non-zero digests (rows of the block map)
    chunks: int
    indexed_at: float
    filter_m_bits: int
    filter_popcount: int
    # The format it was read as ("raw", "qcow2"); None in entries written before it was recorded,
    # which were always read as detected by magic.
    image_format: str | None = None
    device: int | None = None  # st_dev when indexed; None in entries written before it was recorded
    # The real root the refresh walked when it found the image (its path may lie elsewhere, reached
    # through a symlink): a refresh of that root drops the entry once it no longer reaches it.
    root: str | None = None

    def unchanged(self, size_bytes: int, mtime_ns: int, inode: int) -> bool:
        return (self.size_bytes, self.mtime_ns, self.inode) == (size_bytes, mtime_ns, inode)

    def map_keys(self, host: str) -> list[str]:
        return keys.map_chunks(host, self.generation, self.image_id, self.chunks)

    def filter_key(self, host: str) -> str:
        return keys.image_filter(host, self.generation, self.image_id)

    def all_keys(self, host: str) -> list[str]:
        return [*self.map_keys(host), self.filter_key(host)]


@dataclass(frozen=True)
class SketchEntry:
    """A per-host sketch (the host Bloom filter, or a derived one): its key, size and parameters."""

    name: str
    generation: int
    size_bytes: int
    params: dict = field(default_factory=dict)  # e.g. m_bits, k, popcount for filters

    def key(self, host: str) -> str:
        return keys.host_sketch(host, self.name, self.generation)


@dataclass(frozen=True)
class Catalogue:
    """The published state of one host."""

    host: str
    generation: int
    refreshed_at: float
    block_size: int
    algorithm: str
    distinct_blocks: int  # distinct non-zero digests over all the host's images
    images: tuple[ImageEntry, ...]
    sketches: dict[str, SketchEntry]
    filter_layout: int = 1  # sketch.bloom.LAYOUT_VERSION of every filter bitmap this catalogue names

    def image(self, path: str) -> ImageEntry | None:
        for entry in self.images:
            if entry.path == path:
                return entry
        return None

    def entry_keys(self) -> list[str]:
        """Every entry key this catalogue references."""
        found = [key for image in self.images for key in image.all_keys(self.host)]
        found.extend(sketch.key(self.host) for sketch in self.sketches.values())
        return found


_IMAGE_FIELDS = {"path": str, "image_id": str, "generation": int, "size_bytes": int, "mtime_ns": int,
                 "inode": int, "total_blocks": int, "zero_blocks": int, "distinct": int, "chunks": int,
                 "indexed_at": (int, float), "filter_m_bits": int, "filter_popcount": int}


def encode(catalogue: Catalogue) -> bytes:
    return codec.pack({
        "schema": SCHEMA,
        "version": VERSION,
        "host": catalogue.host,
        "generation": catalogue.generation,
        "refreshed_at": catalogue.refreshed_at,
        "block_size": catalogue.block_size,
        "algorithm": catalogue.algorithm,
        "distinct_blocks": catalogue.distinct_blocks,
        "filter_layout": catalogue.filter_layout,
        "images": [_encode_image(image) for image in catalogue.images],
        "sketches": {name: {"generation": s.generation, "size_bytes": s.size_bytes, "params": s.params}
                     for name, s in catalogue.sketches.items()},
    })


def _encode_image(image: ImageEntry) -> dict:
    fields = {name: getattr(image, name) for name in _IMAGE_FIELDS}
    if image.image_format is not None:  # optional: readers of entries without it detect by magic
        fields["format"] = image.image_format
    if image.device is not None:
        fields["device"] = image.device
    if image.root is not None:
        fields["root"] = image.root
    return fields


def decode(data: bytes | None, host: str) -> Catalogue:
    what = f"catalogue of host {host} ({keys.catalogue(host)})"
    document = codec.unpack(data, what, SCHEMA, (VERSION,))
    if codec.field(document, "host", str, what) != host:
        raise FormatError(f"{what} is corrupt (it names another host)")
    images = []
    for raw in codec.field(document, "images", list, what):
        if not isinstance(raw, dict):
            raise FormatError(f"{what} is corrupt (an image entry is not a map)")
        values = {name: codec.field(raw, name, kind, what) for name, kind in _IMAGE_FIELDS.items()}
        values["indexed_at"] = _timestamp(values["indexed_at"], what)
        if "format" in raw:
            values["image_format"] = codec.field(raw, "format", str, what)
        if "device" in raw:
            values["device"] = codec.field(raw, "device", int, what)
        if "root" in raw:
            values["root"] = codec.field(raw, "root", str, what)
        image = ImageEntry(**values)
        if min(image.size_bytes, image.total_blocks, image.zero_blocks, image.distinct, image.chunks - 1,
               image.filter_m_bits - 8) < 0 or image.zero_blocks + image.distinct > image.total_blocks \
                or image.chunks > max(1, image.distinct):  # every chunk but an empty map's holds a row
            raise FormatError(f"{what} is corrupt (impossible counts for image {image.path})")
        images.append(image)
    sketches = {}
    for name, raw in codec.field(document, "sketches", dict, what).items():
        if not isinstance(raw, dict):
            raise FormatError(f"{what} is corrupt (sketch {name!r} is not a map)")
        sketches[name] = SketchEntry(name, codec.field(raw, "generation", int, what),
                                     codec.field(raw, "size_bytes", int, what),
                                     codec.field(raw, "params", dict, what))
    return Catalogue(
        host=host,
        generation=codec.field(document, "generation", int, what),
        refreshed_at=_timestamp(codec.field(document, "refreshed_at", (int, float), what), what),
        block_size=codec.field(document, "block_size", int, what),
        algorithm=codec.field(document, "algorithm", str, what),
        distinct_blocks=codec.field(document, "distinct_blocks", int, what),
        images=tuple(images),
        sketches=sketches,
        filter_layout=_filter_layout(document, what),
    )


# Years 1-9999, what iso_time can print: NaN or year 10000 would fail in a listing, far from the cause.
_TIMES = (-62135596800.0, 253402300800.0)


def _timestamp(value: float, what: str) -> float:
    if not _TIMES[0] <= value < _TIMES[1]:  # False for NaN too
        raise FormatError(f"{what} is corrupt (impossible time {value!r})")
    return float(value)


def _filter_layout(document: dict, what: str) -> int:
    from sketch.bloom import LAYOUT_VERSION

    layout = codec.field(document, "filter_layout", int, what)
    if layout != LAYOUT_VERSION:
        raise FormatError(f"{what} names Bloom filters of layout version {layout}; this blocksketch reads "
                          f"version {LAYOUT_VERSION}: upgrade blocksketch or re-index the host")
    return layout


@dataclass(frozen=True)
class ImageInfo:
    """What the index knows about one image (a row of ``blocksketch images``)."""

    host: str
    path: str
    image_id: str
    size_bytes: int
    total_blocks: int
    unique_blocks: int  # distinct contents, the all-zero block counting as one when present
    zero_blocks: int
    indexed_at: float
    mtime_ns: int
    inode: int
    block_size: int
    algorithm: str
    distinct_nonzero: int = 0
    generation: int = 0
    image_format: str | None = None  # as read when indexed; None: not recorded (detect by magic)
    device: int | None = None  # st_dev when indexed; None: not recorded

    @classmethod
    def from_entry(cls, catalogue: Catalogue, entry: ImageEntry) -> ImageInfo:
        return cls(catalogue.host, entry.path, entry.image_id, entry.size_bytes, entry.total_blocks,
                   entry.distinct + (1 if entry.zero_blocks else 0), entry.zero_blocks, entry.indexed_at,
                   entry.mtime_ns, entry.inode, catalogue.block_size, catalogue.algorithm, entry.distinct,
                   entry.generation, entry.image_format, entry.device)

    @property
    def disk_bytes(self) -> int:
        """The guest-visible disk, in whole blocks (a thin or compressed qcow2 file is smaller, a raw
        file with a partial last block a little larger than ``size_bytes``, the file's size)."""
        return self.total_blocks * self.block_size

    def to_dict(self) -> dict:
        return {"host": self.host, "path": self.path, "image_id": self.image_id, "size_bytes": self.size_bytes,
                "disk_bytes": self.disk_bytes,
                "total_blocks": self.total_blocks, "unique_blocks": self.unique_blocks,
                "zero_blocks": self.zero_blocks, "distinct_nonzero": self.distinct_nonzero,
                "indexed_at": iso_time(self.indexed_at), "mtime_ns": self.mtime_ns, "inode": self.inode,
                "block_size": self.block_size, "algorithm": self.algorithm, "format": self.image_format}


@dataclass(frozen=True)
class HostInfo:
    """What the index knows about one host (a row of ``blocksketch hosts``)."""

    host: str
    images: int
    size_bytes: int  # of the image files
    distinct_blocks: int  # distinct non-zero digests over the host's images
    sketch_bytes: int  # bytes of the host's sketches (its Bloom filter and any derived sketch)
    refreshed_at: float
    generation: int = 0
    disk_bytes: int = 0  # of the guest-visible disks, in whole blocks

    @classmethod
    def from_catalogue(cls, catalogue: Catalogue) -> HostInfo:
        return cls(catalogue.host, len(catalogue.images), sum(i.size_bytes for i in catalogue.images),
                   catalogue.distinct_blocks, sum(s.size_bytes for s in catalogue.sketches.values()),
                   catalogue.refreshed_at, catalogue.generation,
                   sum(i.total_blocks for i in catalogue.images) * catalogue.block_size)

    def to_dict(self) -> dict:
        return {"host": self.host, "images": self.images, "size_bytes": self.size_bytes,
                "disk_bytes": self.disk_bytes,
                "distinct_blocks": self.distinct_blocks, "sketch_bytes": self.sketch_bytes,
                "refreshed_at": iso_time(self.refreshed_at)}
