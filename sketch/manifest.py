"""Transfer manifests: how to rebuild an image on a destination host, run by run.

A manifest classifies every block of a source image (see :mod:`sketch.manifest_build`):

- ``ZERO``: all zeros; becomes a hole in the output;
- ``LOCAL``: the content is in an image the destination already holds; the run records that
  image and the block offset there. Consecutive LOCAL runs form *verification groups* of about
  ``MAX_GROUP_BYTES``; the manifest holds the strong hash (BLAKE3) of each group's bytes as the source has
  them, so apply never writes a block it has not verified, and a stale local block costs at most
  one group to re-send. (A hash per run cost 32 bytes per run: on a real 1 GiB image at 512 B
  that was ~80% of the manifest.)
- ``SEND``: the first occurrence of a non-zero content the destination lacks; its bytes travel in
  a bundle (:mod:`sketch.bundle`);
- ``DUP``: a later occurrence of a SEND content; copied from the first occurrence at the
  destination, never sent twice.

Consecutive blocks of one kind and source coalesce into runs. The byte format is defined field by
field in docs/manifest-format.md; in short: a 52-byte envelope (magic ``BSKMANIF``, version,
body length, SHA-256 of the body) followed by a zstd-compressed msgpack map whose run arrays are
packed little-endian numpy arrays in bin fields.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

import msgpack
import numpy as np
import zstandard

from .blocks import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, block_count, check_block_size
from .digests import ALGORITHMS
from .errors import FormatError, UsageError
from .imagesum import CHECKSUM_ALGORITHM, CHECKSUM_ALGORITHMS, STRONG_HASH
from .output import write_atomic

ZERO, LOCAL, SEND, DUP = 0, 1, 2, 3
KIND_NAMES = ("zero", "local", "send", "dup")

MAGIC = b"BSKMANIF"
VERSION = 1
SCHEMA = "blocksketch.manifest"
_ENVELOPE = struct.Struct("<8sHHQ32s")  # magic, version, reserved, body length, SHA-256(body)
ENVELOPE_SIZE = _ENVELOPE.size  # 52
MAX_GROUP_BYTES = 1 << 20
GROUP_HASHES = ("blake3", "sha256")  # readable; new manifests use imagesum.STRONG_HASH
GROUP_HASH_SIZE = 32
# The body is small next to the bundle, so spend time compressing it.
BODY_ZSTD_LEVEL = 19
MAX_BODY_BYTES = 4 << 30
# 1 EiB: far above any disk image, and low enough that every block number and count of every run
# fits in int64 and is exact as a float64, so numpy arithmetic on checked fields cannot wrap.
MAX_IMAGE_BYTES = 1 << 60
MAX_BLOCKS = MAX_IMAGE_BYTES // MIN_BLOCK_SIZE
VALID_BLOCK_SIZES = tuple(1 << bits for bits in range(MIN_BLOCK_SIZE.bit_length() - 1, MAX_BLOCK_SIZE.bit_length()))
# A decompressed body holds at most this much per block of the image it describes: one run per
# block at worst, each with its kind (1 byte), length (8), a LOCAL run's image and delta (12) and
# a verification group of its own (36), or a DUP run's delta (8). The strings, the image list and
# msgpack's framing fit in BODY_SLACK_BYTES. A body that decompresses past that is refused as it
# decompresses: a small file never costs more than the image it claims can need.
RUN_BODY_BYTES = 1 + 8 + 12 + 36
BODY_SLACK_BYTES = 16 << 20
# Past the slack, a body may also be at most this many times its compressed size. A claimed image of
# a terabyte allows gigabytes of runs, and a few kilobytes of zstd can hold them if they repeat;
# real manifests compress 10-50 times (a 4 GiB image's 102,049 runs: 81 KB), so only a body
# bigger than 16 MiB that is also more regular than any image is refused by this.
MAX_BODY_RATIO = 1024
INFLATE_PIECE_BYTES = 1 << 20
HEAD_BYTES = 4 << 10  # the leading fields (schema, version, size_bytes, block_size) fit in here


@dataclass(frozen=True)
class LocalImage:
    """A destination image as the destination's index records it (its identity, not a trusted path)."""

    host: str
    path: str
    image_id: str
    size_bytes: int  # of the file, part of its identity
    mtime_ns: int
    # Guest-visible blocks at the manifest's block size: LOCAL runs are bounded by these, not by
    # the file's size (a thin qcow2 file is smaller than its disk). None in manifests written
    # before it was recorded, which only ever named raw images (file size = disk size).
    total_blocks: int | None = None

    @classmethod
    def from_info(cls, info) -> LocalImage:
        """From a ``store`` ImageInfo (or anything with the same attributes)."""
        total_blocks = getattr(info, "total_blocks", None)
        return cls(str(info.host), str(info.path), str(info.image_id), int(info.size_bytes), int(info.mtime_ns),
                   None if total_blocks is None else int(total_blocks))

    def matches(self, info) -> bool:
        """Whether an index entry still describes the same image as when the manifest was built."""
        same = (str(info.host), str(info.path), str(info.image_id), int(info.size_bytes), int(info.mtime_ns)) == (
            self.host, self.path, self.image_id, self.size_bytes, self.mtime_ns)
        return same and (self.total_blocks is None or int(info.total_blocks) == self.total_blocks)

    def blocks(self, block_size: int) -> int:
        """Blocks a LOCAL run may read from this image."""
        return self.total_blocks if self.total_blocks is not None else block_count(self.size_bytes, block_size)

    def as_dict(self) -> dict:
        found = {"host": self.host, "path": self.path, "image_id": self.image_id,
                 "size_bytes": self.size_bytes, "mtime_ns": self.mtime_ns}
        if self.total_blocks is not None:
            found["total_blocks"] = self.total_blocks
        return found


@dataclass
class Manifest:
    """A decoded manifest. Run arrays are numpy; ``runs_start`` is derived from the lengths."""

    size_bytes: int
    block_size: int
    algorithm: str
    host: str
    checksum: bytes  # whole-image checksum (sketch.imagesum)
    images: list[LocalImage]
    run_kind: np.ndarray  # (r,) uint8
    run_length: np.ndarray  # (r,) uint64, blocks
    local_image: np.ndarray  # (l,) uint32: index into images, per LOCAL run
    local_block: np.ndarray  # (l,) uint64: first block of the run in that image
    group_runs: np.ndarray  # (g,) uint32: LOCAL runs in each verification group, in order
    group_hash: np.ndarray  # (g, 32) uint8: strong hash of the group's runs' source bytes (full blocks), in order
    dup_origin: np.ndarray  # (d,) uint64: first source block copied, per DUP run
    source_path: str = ""
    checksum_algorithm: str = CHECKSUM_ALGORITHM
    group_hash_algorithm: str = STRONG_HASH
    _id: bytes | None = field(default=None, repr=False)

    @property
    def total_blocks(self) -> int:
        return block_count(self.size_bytes, self.block_size)

    @property
    def run_start(self) -> np.ndarray:
        starts = np.zeros(len(self.run_length), dtype=np.uint64)
        np.cumsum(self.run_length[:-1], out=starts[1:])
        return starts

    def runs_of(self, kind: int) -> tuple[np.ndarray, np.ndarray]:
        """``(start, length)`` block arrays of the runs of one kind, in source order."""
        mask = self.run_kind == kind
        return self.run_start[mask], self.run_length[mask]

    def block_counts(self) -> dict[str, int]:
        counts = np.bincount(self.run_kind, weights=self.run_length, minlength=4)
        return {name: int(counts[k]) for k, name in enumerate(KIND_NAMES)}

    def byte_counts(self) -> dict[str, int]:
        """Image bytes per kind (the partial last block counts its real bytes only)."""
        out = {name: n * self.block_size for name, n in self.block_counts().items()}
        if len(self.run_kind):
            out[KIND_NAMES[int(self.run_kind[-1])]] -= self.total_blocks * self.block_size - self.size_bytes
        return out

    @property
    def local_group(self) -> np.ndarray:
        """The verification group of every LOCAL run."""
        return np.repeat(np.arange(len(self.group_runs)), self.group_runs.astype(np.int64))

    @property
    def manifest_id(self) -> bytes:
        """SHA-256 of the encoded body: bundles and ranges files name their manifest by it."""
        if self._id is None:
            self.to_bytes()
        return self._id

    def summary(self) -> dict:
        """The numbers ``blocksketch manifest --json`` prints."""
        return {"size_bytes": self.size_bytes, "block_size": self.block_size, "host": self.host,
                "blocks": self.block_counts(), "bytes": self.byte_counts(),
                "runs": {name: int(np.count_nonzero(self.run_kind == k)) for k, name in enumerate(KIND_NAMES)},
                "images": [i.as_dict() for i in self.images]}

    # -- encoding -------------------------------------------------------------------------------

    def _body(self) -> dict:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "size_bytes": self.size_bytes,
            "block_size": self.block_size,
            "algorithm": self.algorithm,
            "host": self.host,
            "source_path": self.source_path,
            "checksum": {"algorithm": self.checksum_algorithm, "digest": self.checksum},
            "group_hash": self.group_hash_algorithm,
            "images": [i.as_dict() for i in self.images],
            "counts": self.block_counts(),
            "runs": {"kind": _pack(self.run_kind, "u1"), "length": _pack(self.run_length, "<u8")},
            # Offsets in a local image are stored relative to the run's source start: images
            # built from similar trees put files at similar places, so the deltas compress well.
            "local": {"image": _pack(self.local_image, "<u4"),
                      "delta": _pack(self.local_block.astype(np.int64)
                                     - self.run_start[self.run_kind == LOCAL].astype(np.int64), "<i8"),
                      "group_runs": _pack(self.group_runs, "<u4"),
                      "hash": _pack(self.group_hash, "u1")},
            "dup": {"delta": _pack(self.run_start[self.run_kind == DUP] - self.dup_origin, "<u8")},
        }

    def to_bytes(self) -> bytes:
        """The manifest file's bytes."""
        raw = msgpack.packb(self._body(), use_bin_type=True)
        body = zstandard.ZstdCompressor(level=BODY_ZSTD_LEVEL).compress(raw)
        digest = hashlib.sha256(body).digest()
        self._id = digest
        return _ENVELOPE.pack(MAGIC, VERSION, 0, len(body), digest) + body

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "manifest") -> Manifest:
        """Decode and validate; any damage or inconsistency is a FormatError naming ``what``."""
        if len(data) < ENVELOPE_SIZE:
            raise FormatError(f"{what} is truncated or not a blocksketch manifest")
        magic, version, reserved, length, digest = _ENVELOPE.unpack_from(data)
        if magic != MAGIC:
            raise FormatError(f"{what} is not a blocksketch manifest (bad magic)")
        if reserved != 0:
            raise FormatError(f"{what} is corrupt (reserved envelope bits set)")
        if version != VERSION:
            raise FormatError(f"{what} has unknown version {version} (this blocksketch reads {VERSION}); "
                              "upgrade blocksketch or rebuild the manifest")
        body = data[ENVELOPE_SIZE:]
        if len(body) < length:
            raise FormatError(f"{what} is truncated ({len(data)} of {ENVELOPE_SIZE + length} bytes)")
        if len(body) > length:
            raise FormatError(f"{what} has {len(body) - length} stray bytes after its end")
        if hashlib.sha256(body).digest() != digest:
            raise FormatError(f"{what} is corrupt (checksum mismatch)")
        manifest = _decode(_inflate(body, what), what)
        manifest._id = digest
        return manifest

    def save(self, path: str, force: bool = False, inputs: tuple[str, ...] | list[str] = ()) -> int:
        """Write to ``path`` as :func:`sketch.output.atomic_output` does (``-``: stdout); return the size."""
        data = self.to_bytes()
        write_atomic(path, data, force=force, inputs=inputs, what="manifest")
        return len(data)

    @classmethod
    def load(cls, path: str) -> Manifest:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise UsageError(f"cannot read manifest {path}: {exc.strerror}") from None
        return cls.from_bytes(data, f"manifest {path}")


def body_limit(size_bytes: int, block_size: int) -> int:
    """The most bytes the decompressed body of a manifest of this image can honestly need."""
    return min(MAX_BODY_BYTES, BODY_SLACK_BYTES + RUN_BODY_BYTES * block_count(size_bytes, block_size))


def _claimed_limit(body: bytes) -> int:
    """:func:`body_limit` for the size and block size the body's leading fields claim, or the
    slack alone if they are not where a writer puts them (then only a tiny body can pass)."""
    try:
        head = zstandard.ZstdDecompressor().stream_reader(body).read(HEAD_BYTES)
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=True)
        unpacker.feed(head)
        fields: dict = {}
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            fields[key] = unpacker.unpack()
            if "size_bytes" in fields and "block_size" in fields:
                break
    except Exception:  # zstd and msgpack raise several unrelated classes; _inflate names the damage
        return BODY_SLACK_BYTES
    size_bytes, block_size = fields.get("size_bytes"), fields.get("block_size")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (size_bytes, block_size)) \
            or not 0 < size_bytes <= MAX_IMAGE_BYTES or block_size not in VALID_BLOCK_SIZES:
        return BODY_SLACK_BYTES
    return body_limit(size_bytes, block_size)


def _inflate(body: bytes, what: str):
    """The msgpack document of a compressed body, decompressed piece by piece up to the bound its
    claimed image allows (:func:`body_limit`); memory follows what was actually decompressed."""
    limit = min(_claimed_limit(body), max(BODY_SLACK_BYTES, MAX_BODY_RATIO * len(body)))
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=limit)
    inflated = 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(body)
        while True:
            try:
                doc = unpacker.unpack()
                break
            except msgpack.OutOfData:
                pass
            # Pieces grow with what arrived, so a large body is not parsed in a million steps.
            piece = reader.read(min(max(INFLATE_PIECE_BYTES, inflated), limit + 1 - inflated))
            if not piece:
                raise FormatError(f"{what} is corrupt (its body ends inside its document)")
            inflated += len(piece)
            if inflated > limit:
                raise FormatError(f"{what} is corrupt (its body decompresses to more than {limit} bytes, the most "
                                  f"a manifest of its image can need or {MAX_BODY_RATIO} times its compressed size)")
            unpacker.feed(piece)
        if unpacker.tell() != inflated or reader.read(1):
            raise FormatError(f"{what} is corrupt (stray data after its document)")
    except FormatError:
        raise
    except Exception as exc:  # zstd and msgpack raise several unrelated classes
        raise FormatError(f"{what} is corrupt ({type(exc).__name__})") from None
    return doc


def _pack(array: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(array, dtype=np.dtype(dtype)).tobytes()


def _unpack(doc: dict, name: str, dtype: str, what: str, count: int | None = None, width: int = 1) -> np.ndarray:
    value = doc.get(name) if isinstance(doc, dict) else None
    if not isinstance(value, bytes):
        raise FormatError(f"{what} is corrupt (field {name!r} missing)")
    itemsize = np.dtype(dtype).itemsize * width
    if len(value) % itemsize or (count is not None and len(value) // itemsize != count):
        raise FormatError(f"{what} is corrupt (field {name!r} has the wrong length)")
    array = np.frombuffer(value, dtype=np.dtype(dtype))
    return array.reshape(-1, width) if width > 1 else array


def _field(doc: dict, name: str, kind, what: str):
    value = doc.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FormatError(f"{what} is corrupt (field {name!r} missing or of the wrong type)")
    return value


def _decode(doc, what: str) -> Manifest:
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise FormatError(f"{what} is corrupt (not a {SCHEMA} document)")
    if doc.get("version") != VERSION:
        raise FormatError(f"{what} has unknown schema version {doc.get('version')!r}")
    size_bytes = _field(doc, "size_bytes", int, what)
    block_size = _field(doc, "block_size", int, what)
    algorithm = _field(doc, "algorithm", str, what)
    if not 0 < size_bytes <= MAX_IMAGE_BYTES or block_size > MAX_BLOCK_SIZE:
        raise FormatError(f"{what} is corrupt (bad size)")
    try:
        check_block_size(block_size)
    except UsageError:
        raise FormatError(f"{what} is corrupt (bad block size {block_size})") from None
    if algorithm not in ALGORITHMS:
        raise FormatError(f"{what} uses unknown digest algorithm {algorithm!r}")
    checksum = _field(doc, "checksum", dict, what)
    if not isinstance(checksum.get("algorithm"), str) or checksum["algorithm"] not in CHECKSUM_ALGORITHMS \
            or not isinstance(checksum.get("digest"), bytes) \
            or len(checksum["digest"]) != 32:
        raise FormatError(f"{what} uses an unknown image checksum {checksum.get('algorithm')!r}")
    if doc.get("group_hash") not in GROUP_HASHES:
        raise FormatError(f"{what} uses an unknown group hash {doc.get('group_hash')!r}")
    images = []
    for entry in _field(doc, "images", list, what):
        if not isinstance(entry, dict):
            raise FormatError(f"{what} is corrupt (bad image entry)")
        total_blocks = _field(entry, "total_blocks", int, what) if "total_blocks" in entry else None
        if total_blocks is not None and not 0 < total_blocks < 1 << 62:
            raise FormatError(f"{what} is corrupt (bad image entry)")
        images.append(LocalImage(_field(entry, "host", str, what), _field(entry, "path", str, what),
                                 _field(entry, "image_id", str, what), _field(entry, "size_bytes", int, what),
                                 _field(entry, "mtime_ns", int, what), total_blocks))
    runs = _field(doc, "runs", dict, what)
    kind = _unpack(runs, "kind", "u1", what)
    length = _unpack(runs, "length", "<u8", what, len(kind)).astype(np.uint64)
    local = _field(doc, "local", dict, what)
    n_local = int(np.count_nonzero(kind == LOCAL))
    local_image = _unpack(local, "image", "<u4", what, n_local).astype(np.uint32)
    local_delta = _unpack(local, "delta", "<i8", what, n_local).astype(np.int64)
    group_runs = _unpack(local, "group_runs", "<u4", what).astype(np.uint32)
    # "sha256" was the field's name before the group hash could be another one
    group_hash = _unpack(local, "hash" if "hash" in local else "sha256", "u1", what, len(group_runs),
                         GROUP_HASH_SIZE)
    if (group_runs == 0).any() or int(group_runs.sum(dtype=np.uint64)) != n_local:
        raise FormatError(f"{what} is corrupt (verification groups do not cover the local runs)")
    dup = _field(doc, "dup", dict, what)
    dup_delta = _unpack(dup, "delta", "<u8", what, int(np.count_nonzero(kind == DUP))).astype(np.uint64)
    host = _field(doc, "host", str, what)
    source_path = doc.get("source_path") if isinstance(doc.get("source_path"), str) else ""

    # Structure: the runs tile the image exactly and every reference points somewhere valid.
    # Every bound is checked before the numpy arithmetic it protects, so nothing wraps: each length
    # is at most the image's blocks (< 2**51), and the float sum rules out a uint64 overflow.
    total = block_count(size_bytes, block_size)
    if (kind > DUP).any() or len(length) > total or (length == 0).any() or (length > np.uint64(total)).any() \
            or float(length.sum(dtype=np.float64)) > 2.0 * total or int(length.sum(dtype=np.uint64)) != total:
        raise FormatError(f"{what} is corrupt (runs do not cover the image)")
    if any(not 0 <= image.size_bytes <= MAX_IMAGE_BYTES for image in images) \
            or (local_delta > MAX_BLOCKS).any() or (local_delta < -MAX_BLOCKS).any():
        raise FormatError(f"{what} is corrupt (bad local run)")
    manifest = Manifest(size_bytes, block_size, algorithm, host, checksum["digest"], images, kind, length,
                        local_image, np.zeros(0, np.uint64), group_runs, np.ascontiguousarray(group_hash),
                        np.zeros(0, np.uint64), source_path, checksum_algorithm=checksum["algorithm"],
                        group_hash_algorithm=doc["group_hash"])
    start = manifest.run_start
    local_start = start[kind == LOCAL].astype(np.int64)
    local_block = local_start + local_delta
    if n_local:
        if (local_image >= len(images)).any() or (local_block < 0).any():
            raise FormatError(f"{what} is corrupt (bad local run)")
        image_blocks = np.array([i.blocks(block_size) for i in images], dtype=np.int64)
        if (local_block + length[kind == LOCAL].astype(np.int64) > image_blocks[local_image]).any():
            raise FormatError(f"{what} is corrupt (a local run reaches past its image)")
    manifest.local_block = local_block.astype(np.uint64)
    dup_start = start[kind == DUP]
    if (dup_delta == 0).any() or (dup_delta > dup_start).any():
        raise FormatError(f"{what} is corrupt (bad duplicate run)")
    manifest.dup_origin = dup_start - dup_delta
    if len(dup_delta):
        # A DUP run copies SEND blocks that precede it.
        send_start, send_length = manifest.runs_of(SEND)
        dup_length = length[kind == DUP]
        at = np.searchsorted(send_start, manifest.dup_origin, side="right") - 1
        if (at < 0).any() or (manifest.dup_origin + dup_length > send_start[at] + send_length[at]).any():
            raise FormatError(f"{what} is corrupt (a duplicate run copies blocks that are not sent)")
    counts = doc.get("counts")
    if counts != manifest.block_counts():
        raise FormatError(f"{what} is corrupt (block counts disagree with its runs)")
    return manifest
