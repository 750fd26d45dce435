"""Structure-aware mutators for benchmarks/fuzz_formats.py: decode a valid artefact, change one thing,
re-encode it with valid checksums (so the change reaches the decoder behind them), or damage its bytes.

Every mutator is ``mutator(rng, artefact) -> (bytes, description)``: ``rng`` is a ``random.Random``
seeded by the case id, so a case replays exactly; the description names the field and the value.
The codecs here follow docs/manifest-format.md, docs/index-format.md and QEMU's qcow2 spec; they
are written from the docs, not imported from sketch/, so a bug in the library's encoder cannot hide
the same bug in its decoder.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import zlib
from dataclasses import dataclass, field, replace

import msgpack
import numpy as np
import zstandard

# -- values at their limits -----------------------------------------------------------------------

U64_LIMITS = [0, 1, 2, 7, 8, 511, 512, 4095, 4096, 4097, (1 << 20), (1 << 31) - 1, 1 << 31, (1 << 32) - 1,
              1 << 32, 1 << 40, 1 << 53, (1 << 62), (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
I64_LIMITS = [0, 1, -1, -2, (1 << 31), -(1 << 31), (1 << 32), -(1 << 32), (1 << 62), -(1 << 62),
              (1 << 63) - 1, -(1 << 63)]
U32_LIMITS = [0, 1, 2, 7, 8, 9, 16, 21, 22, 31, 32, 63, 64, 255, 256, 1023, 1024, 4095, 4096, 65535, 65536,
              (1 << 31) - 1, 1 << 31, (1 << 32) - 1]
# What a msgpack int field may be given: every limit a 64-bit field can carry, negative ones too.
INT_LIMITS = sorted(set(U64_LIMITS + I64_LIMITS))
WRONG_TYPES = [None, True, False, 1.5, float("nan"), float("inf"), -0.0, "", "x", "A" * 70000, b"", b"\0" * 33,
               [], [1, 2], {}, {"a": 1}]


def limit_int(rng: random.Random) -> int:
    return rng.choice(INT_LIMITS)


def any_value(rng: random.Random):
    """A value of another kind, or an integer at a limit."""
    return limit_int(rng) if rng.random() < 0.5 else rng.choice(WRONG_TYPES)


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:24]}...({len(text)} chars)"


# -- raw byte mutations, for any artefact ----------------------------------------------------------


def truncate(rng: random.Random, data: bytes, hot: list[int] | None = None) -> tuple[bytes, str]:
    points = [0, 1, len(data) // 2, max(0, len(data) - 1), max(0, len(data) - 8), max(0, len(data) - 24),
              max(0, len(data) - 56), max(0, len(data) - 80)] + (hot or [])
    cut = rng.choice(points) if rng.random() < 0.6 else rng.randrange(len(data) + 1)
    cut = max(0, min(cut, len(data)))
    return data[:cut], f"truncated to {cut} of {len(data)} bytes"


def extend(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    kind = rng.choice(["zeros", "random", "self", "ff"])
    count = rng.choice([1, 7, 8, 24, 56, 512, 4096, 65536])
    if kind == "zeros":
        tail = bytes(count)
    elif kind == "ff":
        tail = b"\xff" * count
    elif kind == "random":
        tail = rng.randbytes(count)
    else:
        tail = data[:count]
    return data + tail, f"extended by {len(tail)} {kind} bytes"


def bitflip(rng: random.Random, data: bytes, region: tuple[int, int] | None = None) -> tuple[bytes, str]:
    if not data:
        return b"\x01", "bit flip of an empty file: one byte"
    out = bytearray(data)
    lo, hi = region or ((0, min(len(data), 256)) if rng.random() < 0.5 else (0, len(data)))
    hi = max(lo + 1, min(hi, len(data)))
    flips = []
    for _ in range(rng.choice([1, 1, 1, 2, 4, 8])):
        at = rng.randrange(lo, hi)
        bit = rng.randrange(8)
        out[at] ^= 1 << bit
        flips.append(f"{at}.{bit}")
    return bytes(out), f"bit flip at {','.join(flips)}"


def splice(rng: random.Random, data: bytes, other: bytes) -> tuple[bytes, str]:
    if not data or not other:
        return data + other, "spliced (concatenated)"
    a = rng.randrange(len(data))
    b = min(len(data), a + rng.randrange(1, 4097))
    c = rng.randrange(len(other))
    d = min(len(other), c + rng.randrange(1, 4097))
    return data[:a] + other[c:d] + data[b:], f"spliced other[{c}:{d}] over [{a}:{b}]"


def overwrite_int(rng: random.Random, data: bytes, region: tuple[int, int] | None = None) -> tuple[bytes, str]:
    fmt = rng.choice(["<H", "<I", "<Q", ">I", ">Q"])
    size = struct.calcsize(fmt)
    if len(data) < size:
        return data, "too short to overwrite an integer"
    lo, hi = region or (0, len(data))
    hi = max(lo + 1, min(hi, len(data) - size + 1))
    at = rng.randrange(lo, hi)
    if rng.random() < 0.5:
        at -= at % size
    bits = size * 8
    value = rng.choice([v for v in U64_LIMITS if v < 1 << bits] + [(1 << bits) - 1, 1 << (bits - 1)])
    return data[:at] + struct.pack(fmt, value) + data[at + size:], f"{fmt} {value} at offset {at}"


def raw_mutation(rng: random.Random, data: bytes, other: bytes = b"", hot: list[int] | None = None,
                 region: tuple[int, int] | None = None) -> tuple[bytes, str]:
    """One of truncate, extend, bit flip, splice, integer overwrite."""
    kind = rng.choice(["truncate", "extend", "bitflip", "bitflip", "splice", "int", "int"])
    if kind == "truncate":
        return truncate(rng, data, hot)
    if kind == "extend":
        return extend(rng, data)
    if kind == "bitflip":
        return bitflip(rng, data, region)
    if kind == "splice":
        return splice(rng, data, other or data)
    return overwrite_int(rng, data, region)


# -- big compressed payloads (built once per run, they are slow to make) ------------------------------


def zstd_of_zeros(size: int, prefix: bytes = b"", level: int = 1, content_size: bool = False) -> bytes:
    """One zstd frame of ``prefix`` + ``size`` zero bytes: a few KiB that decompress to ``size``."""
    params = zstandard.ZstdCompressor(level=level, write_content_size=content_size)
    out = params.compressobj(size=len(prefix) + size if content_size else -1)
    parts = [out.compress(prefix)]
    chunk = bytes(1 << 20)
    left = size
    while left:
        take = min(left, len(chunk))
        parts.append(out.compress(chunk[:take]))
        left -= take
    parts.append(out.flush())
    return b"".join(parts)


def msgpack_bin_header(length: int) -> bytes:
    return b"\xc6" + struct.pack(">I", length)


# -- manifest --------------------------------------------------------------------------------------

MANIFEST_ENVELOPE = struct.Struct("<8sHHQ32s")


def decode_manifest(data: bytes) -> dict:
    body = data[MANIFEST_ENVELOPE.size:]
    return msgpack.unpackb(zstandard.ZstdDecompressor().decompress(body), raw=False)


def seal_body(body: bytes, version: int = 1, reserved: int = 0) -> bytes:
    return MANIFEST_ENVELOPE.pack(b"BSKMANIF", version, reserved, len(body), hashlib.sha256(body).digest()) + body


def seal_manifest(doc: dict) -> bytes:
    """A manifest file of ``doc`` with a valid envelope (zstd level 3: fast, any level decodes)."""
    return seal_body(zstandard.ZstdCompressor(level=3).compress(msgpack.packb(doc, use_bin_type=True)))


def manifest_id(data: bytes) -> bytes:
    return hashlib.sha256(data[MANIFEST_ENVELOPE.size:]).digest()


# (path, numpy dtype) of the packed arrays of a manifest body
MANIFEST_ARRAYS = [(("runs", "kind"), "u1"), (("runs", "length"), "<u8"), (("local", "image"), "<u4"),
                   (("local", "delta"), "<i8"), (("local", "group_runs"), "<u4"), (("local", "hash"), "u1"),
                   (("dup", "delta"), "<u8")]
KIND_NAMES = ("zero", "local", "send", "dup")


def _get(doc, path):
    for part in path:
        doc = doc[part]
    return doc


def _set(doc, path, value):
    for part in path[:-1]:
        doc = doc[part]
    doc[path[-1]] = value


def _array(doc, path, dtype) -> np.ndarray:
    return np.frombuffer(_get(doc, path), dtype=dtype).copy()


def recount(doc: dict) -> None:
    """Make ``counts`` agree with ``runs`` again (so a run change gets past that check)."""
    try:
        kind = _array(doc, ("runs", "kind"), "u1")
        length = _array(doc, ("runs", "length"), "<u8")
        if len(kind) != len(length):
            return
        counts = {name: 0 for name in KIND_NAMES}
        for k, n in zip(kind.tolist(), length.tolist()):
            if k < 4:
                counts[KIND_NAMES[k]] += n
        doc["counts"] = counts
    except (KeyError, TypeError, ValueError):
        pass


def _limit_for(dtype: str, rng: random.Random) -> int:
    info = np.iinfo(np.dtype(dtype))
    choices = [v for v in INT_LIMITS if info.min <= v <= info.max] + [info.max, info.min]
    if dtype == "u1":
        choices += [0, 1, 2, 3, 4, 5, 128, 255]
    return rng.choice(choices)


def mutate_manifest_doc(rng: random.Random, doc: dict, paths: dict) -> str:
    """Change one thing of a decoded manifest body in place; return what."""
    kind = rng.choice(["field", "field", "array", "array", "array", "array_length", "image", "semantic",
                       "semantic", "checksum"])
    if kind == "field":
        name = rng.choice(["schema", "version", "size_bytes", "block_size", "algorithm", "host", "source_path",
                           "group_hash", "images", "counts", "runs", "local", "dup", "checksum"])
        if rng.random() < 0.15:
            doc.pop(name, None)
            return f"body field {name} removed"
        value = any_value(rng)
        doc[name] = value
        return f"body field {name} = {short(value)}"
    if kind == "checksum":
        part = rng.choice(["algorithm", "digest"])
        value = rng.choice(["sha256-tree-4m", "blake3-tree-4m", "md5", b"\0" * 32, b"\0" * 31, any_value(rng)])
        doc["checksum"][part] = value
        return f"checksum.{part} = {short(value)}"
    if kind in ("array", "array_length"):
        path, dtype = rng.choice(MANIFEST_ARRAYS)
        array = _array(doc, path, dtype)
        width = 32 if path[-1] == "hash" else 1
        if kind == "array_length":
            how = rng.choice(["drop", "add", "empty", "odd"])
            raw = _get(doc, path)
            item = np.dtype(dtype).itemsize * width
            if how == "drop":
                raw = raw[:-item] if raw else raw
            elif how == "add":
                raw = raw + (raw[-item:] if raw else bytes(item))
            elif how == "empty":
                raw = b""
            else:
                raw = raw + b"\x01"
            _set(doc, path, raw)
            if rng.random() < 0.5:
                recount(doc)
            return f"{'.'.join(path)} array: {how} one element"
        if not len(array):
            _set(doc, path, np.array([_limit_for(dtype, rng)], dtype=dtype).tobytes() * width)
            return f"{'.'.join(path)}: one element added to an empty array"
        at = rng.randrange(len(array))
        value = _limit_for(dtype, rng)
        old = int(array[at])
        array[at] = value
        note = ""
        if path == ("runs", "length") and len(array) > 1 and rng.random() < 0.5:
            # keep the total so the runs still tile the image: the next check is the one tested
            other = (at + 1) % len(array)
            array[other] = (int(array[other]) + old - value) % (1 << 64)
            note = f", run {other} compensates"
        _set(doc, path, array.tobytes())
        fixed = rng.random() < 0.6
        if fixed:
            recount(doc)
        return f"{'.'.join(path)}[{at}] = {value} (was {old}){note}{', counts fixed' if fixed else ''}"
    if kind == "image":
        images = doc.get("images")
        if not isinstance(images, list) or not images:
            doc["images"] = [{"host": "x"}]
            return "images = one bogus entry"
        at = rng.randrange(len(images))
        name = rng.choice(["host", "path", "image_id", "size_bytes", "mtime_ns", "total_blocks"])
        if name == "path":
            value = rng.choice(["/etc/passwd", "../../etc/passwd", "relative.img", "", "/dev/zero", "/proc/self/mem",
                                paths["source"], paths["other_image"], paths["outside"], "/nonexistent/x.img",
                                "\udcff" if False else "bad\x00nul"])
        elif name == "host":
            value = rng.choice(["fra-2", "lon-3", "", "ams-1 ", "{ams-1}", "a" * 300, limit_int(rng)])
        else:
            value = any_value(rng) if rng.random() < 0.3 else limit_int(rng)
        images[at][name] = value
        return f"images[{at}].{name} = {short(value)}"
    # semantic changes that keep the document consistent
    what = rng.choice(["huge_image", "flip_kind", "group_hash", "dup_far", "local_past_end", "swap_images",
                       "block_size"])
    if what == "huge_image":
        block_size = doc["block_size"]
        exponent = rng.choice([30, 40, 50, 62])
        total = -(-doc["size_bytes"] // block_size)
        target_blocks = max(total + 1, (1 << exponent) // block_size)
        kind_arr = _array(doc, ("runs", "kind"), "u1")
        length = _array(doc, ("runs", "length"), "<u8")
        doc["runs"]["kind"] = np.append(kind_arr, 0).astype("u1").tobytes()
        doc["runs"]["length"] = np.append(length, target_blocks - total).astype("<u8").tobytes()
        doc["size_bytes"] = target_blocks * block_size
        recount(doc)
        return f"image claims 2^{exponent} bytes (a zero run appended)"
    if what == "flip_kind":
        kind_arr = _array(doc, ("runs", "kind"), "u1")
        at = rng.randrange(len(kind_arr))
        new = rng.choice([k for k in range(4) if k != kind_arr[at]])
        old = int(kind_arr[at])
        kind_arr[at] = new
        doc["runs"]["kind"] = kind_arr.tobytes()
        recount(doc)
        return f"run {at} kind {old} -> {new}, counts fixed"
    if what == "group_hash":
        hashes = bytearray(doc["local"].get("hash", b""))
        if hashes:
            hashes[rng.randrange(len(hashes))] ^= 0x55
            doc["local"]["hash"] = bytes(hashes)
        return "one verification group hash changed"
    if what == "dup_far":
        delta = _array(doc, ("dup", "delta"), "<u8")
        if len(delta):
            at = rng.randrange(len(delta))
            delta[at] = rng.choice([1, int(delta[at]) + 1, int(delta[at]) - 1 or 1, 1 << 63])
            doc["dup"]["delta"] = delta.tobytes()
        return "a dup run points elsewhere"
    if what == "local_past_end":
        delta = _array(doc, ("local", "delta"), "<i8")
        if len(delta):
            at = rng.randrange(len(delta))
            delta[at] += rng.choice([1, -1, 255, 1 << 20, -(1 << 20)])
            doc["local"]["delta"] = delta.tobytes()
        return "a local run shifted in its image"
    if what == "swap_images":
        images = doc.get("images", [])
        if len(images) > 1:
            images[0], images[1] = images[1], images[0]
        return "local images swapped"
    value = rng.choice([512, 1024, 2048, 8192, 65536, 131072, 3, 0])
    doc["block_size"] = value
    return f"block_size = {value} (runs unchanged)"


def mutate_manifest(rng: random.Random, valid: bytes, paths: dict, bombs: dict) -> tuple[bytes, str]:
    """A damaged manifest file: a body field (re-sealed), the envelope, a bomb, or raw bytes."""
    kind = rng.choices(["doc", "envelope", "bomb", "raw"], weights=[55, 15, 5, 25])[0]
    if kind == "doc":
        doc = decode_manifest(valid)
        what = mutate_manifest_doc(rng, doc, paths)
        try:
            return seal_manifest(doc), what
        except (OverflowError, TypeError, ValueError) as exc:
            return seal_manifest(decode_manifest(valid)), f"{what} (unencodable: {exc}; sent unchanged)"
    if kind == "envelope":
        magic, version, reserved, length, digest = MANIFEST_ENVELOPE.unpack_from(valid)
        body = valid[MANIFEST_ENVELOPE.size:]
        name = rng.choice(["magic", "version", "reserved", "length", "digest"])
        if name == "magic":
            magic = rng.choice([b"BSKMANIX", b"\0" * 8, b"BSKBUNDL", b"BSKSTRM\0"])
        elif name == "version":
            version = rng.choice([0, 2, 0xFFFF])
        elif name == "reserved":
            reserved = rng.choice([1, 0xFFFF])
        elif name == "length":
            length = rng.choice([0, len(body) - 1, len(body) + 1, 1 << 32, (1 << 63) - 1, (1 << 64) - 1])
        else:
            digest = bytes(32)
        return MANIFEST_ENVELOPE.pack(magic, version, reserved, length, digest) + body, f"envelope {name} changed"
    if kind == "bomb":
        name = rng.choice(sorted(bombs))
        return seal_body(bombs[name]), f"body is a zstd bomb ({name})"
    return raw_mutation(rng, valid, hot=[8, 12, 20, 52, 53])


# -- bundle ----------------------------------------------------------------------------------------

BUNDLE_PREFIX = struct.Struct("<8sHHI")
BUNDLE_FRAME = struct.Struct("<II16s")
BUNDLE_TRAILER = struct.Struct("<QQ32s8s")


@dataclass
class Frame:
    raw_length: int
    packed: bytes
    packed_length: int | None = None  # None: len(packed)
    check: bytes | None = None  # None: computed


@dataclass
class Bundle:
    """A bundle taken apart; :meth:`seal` puts it back with every checksum recomputed."""

    header: dict
    frames: list[Frame]
    version: int = 2
    reserved: int = 0
    magic: bytes = b"BSKBUNDL"
    end_check: bytes = bytes(16)
    trailer_count: int | None = None
    trailer_raw: int | None = None
    trailer_chain: bytes | None = None
    end_magic: bytes = b"BSKBEND\0"
    stray: bytes = b""
    header_bytes: bytes | None = None  # raw header bytes to use instead of packing ``header``
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, data: bytes) -> Bundle:
        magic, version, reserved, length = BUNDLE_PREFIX.unpack_from(data)
        at = BUNDLE_PREFIX.size
        header = msgpack.unpackb(data[at : at + length], raw=False)
        at += length + 32
        frames = []
        while True:
            raw_length, packed_length, _check = BUNDLE_FRAME.unpack_from(data, at)
            at += BUNDLE_FRAME.size
            if raw_length == 0 and packed_length == 0:
                break
            frames.append(Frame(raw_length, data[at : at + packed_length]))
            at += packed_length
        at += BUNDLE_TRAILER.size
        return cls(header, frames, version, reserved, magic, stray=data[at:])

    def seal(self) -> bytes:
        body = self.header_bytes if self.header_bytes is not None else msgpack.packb(self.header, use_bin_type=True)
        prefix = BUNDLE_PREFIX.pack(self.magic, self.version, self.reserved, len(body)) + body
        header_sum = hashlib.sha256(prefix).digest()
        chain = hashlib.sha256(header_sum)
        out = [prefix, header_sum]
        raw_total = 0
        for frame in self.frames:
            check = frame.check if frame.check is not None else hashlib.sha256(frame.packed).digest()[:16]
            chain.update(check)
            length = frame.packed_length if frame.packed_length is not None else len(frame.packed)
            out.append(BUNDLE_FRAME.pack(frame.raw_length, length, check) + frame.packed)
            raw_total += frame.raw_length
        out.append(BUNDLE_FRAME.pack(0, 0, self.end_check))
        out.append(BUNDLE_TRAILER.pack(len(self.frames) if self.trailer_count is None else self.trailer_count,
                                       raw_total if self.trailer_raw is None else self.trailer_raw,
                                       chain.digest() if self.trailer_chain is None else self.trailer_chain,
                                       self.end_magic))
        out.append(self.stray)
        return b"".join(out)

    def raw_blocks(self) -> bytes:
        """The frames' raw bytes, decompressed (valid bundles only)."""
        decompressor = zstandard.ZstdDecompressor(max_window_size=1 << 27).decompressobj(read_across_frames=True)
        return b"".join(decompressor.decompress(f.packed) for f in self.frames)


def compress_frames(raw: bytes, frame_bytes: int, level: int = 3) -> list[Frame]:
    """``raw`` as one zstd stream flushed into frames of ``frame_bytes`` (as the writer does)."""
    params = zstandard.ZstdCompressionParameters.from_level(level, window_log=27, enable_ldm=True, write_checksum=True)
    compressor = zstandard.ZstdCompressor(compression_params=params).compressobj()
    frames = []
    for at in range(0, len(raw), frame_bytes):
        part = raw[at : at + frame_bytes]
        packed = compressor.compress(part)
        packed += compressor.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH if at + frame_bytes >= len(raw)
                                   else zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        frames.append(Frame(len(part), packed))
    return frames


def mutate_bundle_parts(rng: random.Random, bundle: Bundle, block_size: int, total_blocks: int, bombs: dict) -> str:
    """Change one thing of a parsed bundle in place; sealing fixes every checksum."""
    kind = rng.choice(["header", "header", "ranges", "frame", "frame", "payload", "payload", "frames", "trailer",
                       "prefix", "reframe"])
    header = bundle.header
    if kind == "header":
        name = rng.choice(["schema", "version", "manifest_id", "block_size", "size_bytes", "contents", "ranges",
                           "blocks", "compression", "level", "adaptive", "window_log", "frame_bytes"])
        if rng.random() < 0.15:
            header.pop(name, None)
            return f"bundle header field {name} removed"
        specials = {"contents": ["ranges", "send", "all", ""], "compression": ["zstd", "gzip", "none"],
                    "manifest_id": [bytes(32), b"\x01" * 32, header.get("manifest_id", b"")[:31]],
                    "block_size": [512, 8192, 65536, 0, 1 << 40]}
        value = rng.choice(specials[name]) if name in specials and rng.random() < 0.6 else any_value(rng)
        header[name] = value
        return f"bundle header {name} = {short(value)}"
    if kind == "ranges":
        header["contents"] = "ranges"
        pairs = rng.choice([
            [(0, total_blocks)], [(0, 1)], [(total_blocks - 1, 1)], [(total_blocks, 1)], [(0, 0)],
            [(1 << 62, 1 << 62)], [((1 << 64) - 1, 1)], [(1, (1 << 64) - 1)], [(0, 2), (1, 2)], [(5, 1), (2, 1)],
            [(0, 1 << 40)], [((1 << 63) - 1, (1 << 63) - 1)], [(i, 1) for i in range(0, total_blocks, 2)],
        ])
        header["ranges"] = np.array(pairs, dtype=np.uint64).astype("<u8").tobytes()
        blocks = sum(c for _, c in pairs) % (1 << 64)
        header["blocks"] = blocks if blocks < 1 << 63 and rng.random() < 0.8 else limit_int(rng)
        return f"contents ranges {pairs[:3]}{'...' if len(pairs) > 3 else ''}"
    if kind == "prefix":
        name = rng.choice(["magic", "version", "reserved"])
        if name == "magic":
            bundle.magic = rng.choice([b"BSKBUNDX", b"BSKMANIF", b"\0" * 8])
        elif name == "version":
            bundle.version = rng.choice([0, 1, 3, 0xFFFF])
            if rng.random() < 0.5:
                header["version"] = bundle.version
        else:
            bundle.reserved = rng.choice([1, 0xFFFF])
        return f"bundle prefix {name} changed ({bundle.magic!r} v{bundle.version} r{bundle.reserved})"
    if kind == "trailer":
        name = rng.choice(["count", "raw", "chain", "magic", "end_check", "stray"])
        if name == "count":
            bundle.trailer_count = rng.choice([0, len(bundle.frames) + 1, (1 << 64) - 1])
        elif name == "raw":
            bundle.trailer_raw = rng.choice([0, 1, (1 << 64) - 1, block_size])
        elif name == "chain":
            bundle.trailer_chain = bytes(32)
        elif name == "magic":
            bundle.end_magic = b"BSKBENDX"
        elif name == "end_check":
            bundle.end_check = b"\x01" + bytes(15)
        else:
            bundle.stray = rng.choice([b"\0", b"BSKBUNDL" + bytes(100)])
        return f"bundle trailer {name} changed"
    if not bundle.frames:
        bundle.frames.append(Frame(block_size, zstandard.ZstdCompressor().compress(bytes(block_size))))
        return "a frame added to a bundle without frames"
    at = rng.randrange(len(bundle.frames))
    frame = bundle.frames[at]
    if kind == "frame":
        name = rng.choice(["raw_length", "packed_length", "check"])
        if name == "raw_length":
            frame.raw_length = rng.choice([0, 1, block_size - 1, block_size, frame.raw_length + block_size,
                                           frame.raw_length - block_size, 64 << 20, (64 << 20) + block_size,
                                           (1 << 32) - 1]) % (1 << 32)
        elif name == "packed_length":
            frame.packed_length = rng.choice([0, 1, len(frame.packed) - 1, len(frame.packed) + 1, (65 << 20),
                                              (1 << 32) - 1])
        else:
            frame.check = bytes(16)
        return f"frame {at} {name} changed"
    if kind == "payload":
        name = rng.choice(["bomb", "bomb", "garbage", "flip", "empty", "other_data", "raw_frame", "skippable"])
        if name == "bomb":
            label = rng.choice(sorted(bombs))
            frame.packed = bombs[label]
            return f"frame {at} payload is a zstd bomb ({label}), raw length {frame.raw_length}"
        if name == "garbage":
            frame.packed = rng.randbytes(len(frame.packed) or 64)
        elif name == "flip":
            data = bytearray(frame.packed)
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            frame.packed = bytes(data)
        elif name == "empty":
            frame.packed = b""
        elif name == "other_data":
            # a well-formed frame of the right length whose blocks are not the image's
            frame.packed = zstandard.ZstdCompressor(level=1).compress(rng.randbytes(16) * (frame.raw_length // 16))
            if at + 1 < len(bundle.frames):
                return f"frame {at} replaced by other data (one zstd frame; later frames lose their history)"
        elif name == "raw_frame":
            frame.packed = zstandard.ZstdCompressor(level=1).compress(bytes(frame.raw_length))
        else:
            frame.packed = b"\x50\x2a\x4d\x18" + struct.pack("<I", 8) + bytes(8) + frame.packed
        return f"frame {at} payload: {name}"
    if kind == "frames":
        name = rng.choice(["drop", "duplicate", "swap", "split"])
        if name == "drop":
            bundle.frames.pop(at)
        elif name == "duplicate":
            bundle.frames.insert(at, replace(frame))
        elif name == "swap" and len(bundle.frames) > 1:
            other = (at + 1) % len(bundle.frames)
            bundle.frames[at], bundle.frames[other] = bundle.frames[other], bundle.frames[at]
        else:
            half = len(frame.packed) // 2
            bundle.frames[at : at + 1] = [Frame(frame.raw_length, frame.packed[:half]), Frame(0, frame.packed[half:])]
        return f"frames: {name} frame {at}"
    # re-frame: the same blocks compressed otherwise; a valid bundle that must apply byte-exact
    raw = bundle.raw_blocks()
    size = rng.choice([block_size, 4 * block_size, 1 << 20, 64 << 20])
    level = rng.choice([1, 3, 19])
    bundle.frames = compress_frames(raw, size, level)
    return f"re-framed: {size}-byte frames at zstd {level} (valid)"


def mutate_bundle(rng: random.Random, valid: bytes, block_size: int, total_blocks: int,
                  bombs: dict) -> tuple[bytes, str]:
    if rng.random() < 0.75:
        bundle = Bundle.parse(valid)
        what = mutate_bundle_parts(rng, bundle, block_size, total_blocks, bombs)
        try:
            return bundle.seal(), what
        except (OverflowError, TypeError, ValueError, struct.error) as exc:
            return valid, f"{what} (unencodable: {exc}; sent unchanged)"
    return raw_mutation(rng, valid, hot=[8, 12, 16])


def reseal_bundle_for(bundle_bytes: bytes, manifest_bytes: bytes) -> bytes:
    """The same bundle, naming another manifest (so a changed manifest still gets its blocks)."""
    bundle = Bundle.parse(bundle_bytes)
    bundle.header["manifest_id"] = manifest_id(manifest_bytes)
    return bundle.seal()


# -- migration stream ------------------------------------------------------------------------------

STREAM_PREFIX = struct.Struct("<8sHHI")


def split_stream(data: bytes) -> tuple[bytes, bytes]:
    _magic, _version, _reserved, length = STREAM_PREFIX.unpack_from(data)
    return data[STREAM_PREFIX.size : STREAM_PREFIX.size + length], data[STREAM_PREFIX.size + length:]


def make_stream(manifest: bytes, bundle: bytes, magic=b"BSKSTRM\0", version=1, reserved=0, length=None) -> bytes:
    return STREAM_PREFIX.pack(magic, version, reserved, len(manifest) if length is None else length) + manifest + bundle


def mutate_stream(rng: random.Random, valid: bytes, paths: dict, block_size: int, total_blocks: int,
                  bombs: dict) -> tuple[bytes, str]:
    manifest, bundle = split_stream(valid)
    kind = rng.choices(["prefix", "manifest", "bundle", "raw"], weights=[15, 35, 30, 20])[0]
    if kind == "prefix":
        name = rng.choice(["magic", "version", "reserved", "length"])
        if name == "magic":
            return make_stream(manifest, bundle, magic=b"BSKSTRMX"), "stream magic changed"
        if name == "version":
            return make_stream(manifest, bundle, version=rng.choice([0, 2, 0xFFFF])), "stream version changed"
        if name == "reserved":
            return make_stream(manifest, bundle, reserved=1), "stream reserved set"
        value = rng.choice([0, len(manifest) - 1, len(manifest) + 1, 1 << 31, (1 << 32) - 1])
        return make_stream(manifest, bundle, length=value), f"stream manifest length = {value}"
    if kind == "manifest":
        mutated, what = mutate_manifest(rng, manifest, paths, bombs)
        try:
            bundle = reseal_bundle_for(bundle, mutated)
            what += "; bundle re-sealed for it"
        except Exception:  # noqa: BLE001 - a manifest too damaged to name: leave the bundle as it was
            pass
        return make_stream(mutated, bundle), f"stream manifest: {what}"
    if kind == "bundle":
        mutated, what = mutate_bundle(rng, bundle, block_size, total_blocks, bombs)
        return make_stream(manifest, mutated), f"stream bundle: {what}"
    return raw_mutation(rng, valid, hot=[16, 16 + len(manifest), 16 + len(manifest) + 16])


# -- ranges file -------------------------------------------------------------------------------------


def mutate_ranges(rng: random.Random, valid: bytes, total_blocks: int) -> tuple[bytes, str]:
    doc = json.loads(valid)
    kind = rng.choices(["field", "pairs", "raw", "text"], weights=[30, 45, 15, 10])[0]
    if kind == "field":
        name = rng.choice(["format", "version", "manifest_id", "block_size", "blocks", "ranges"])
        if rng.random() < 0.2:
            doc.pop(name)
            return json.dumps(doc).encode(), f"ranges field {name} removed"
        value = rng.choice([0, -1, 2 ** 63, 2 ** 64, 10 ** 30, 1e308, None, True, "x", [], {},
                            doc["manifest_id"].upper(), doc["manifest_id"][:-1], "blocksketch-ranges", 2])
        doc[name] = value
        return json.dumps(doc).encode(), f"ranges field {name} = {short(value)}"
    if kind == "pairs":
        pairs = rng.choice([
            [], [[0, 0]], [[-1, 1]], [[0, -1]], [[0, total_blocks]], [[0, total_blocks + 1]],
            [[total_blocks, 1]], [[total_blocks - 1, 1]], [[2 ** 62, 2 ** 62]], [[2 ** 63 - 1, 1]],
            [[0, 2 ** 63 - 1]], [[2 ** 64, 1]], [[10 ** 30, 1]], [[0, 1.5]], [[0, True]], [["0", 1]], [[0]],
            [[0, 1, 2]], [0, 1], [[3, 1], [0, 1]], [[0, 2], [1, 2]], [[0, 1]] * 100000,
            [[i, 1] for i in range(0, total_blocks)], [[-(2 ** 63), 2 ** 63]], [[5, 2 ** 64 - 5]],
            [[1, 2 ** 63 - 1], [2, 1]],
        ])
        doc["ranges"] = pairs
        if rng.random() < 0.5:
            try:
                doc["blocks"] = sum(p[1] for p in pairs)
            except (TypeError, IndexError):
                pass
        return json.dumps(doc).encode(), f"ranges = {short(pairs)}"
    if kind == "text":
        text = rng.choice(['{"format": "blocksketch-ranges", "version": 1, "ranges": ' + "[" * 100000 + "]" * 100000
                           + "}", "[]", "null", '"x"', "", "\ufeff" + valid.decode(), valid.decode() + "\n{}",
                           valid.decode().replace('"ranges"', '"ranges": 1, "ranges"')])
        return text.encode("utf-8", "surrogatepass"), "ranges file text replaced"
    return raw_mutation(rng, valid)


# -- qcow2 --------------------------------------------------------------------------------------------

QCOW2_FIELDS = [  # name, offset, struct format (big-endian)
    ("magic", 0, ">I"), ("version", 4, ">I"), ("backing_file_offset", 8, ">Q"), ("backing_file_size", 16, ">I"),
    ("cluster_bits", 20, ">I"), ("size", 24, ">Q"), ("crypt_method", 32, ">I"), ("l1_size", 36, ">I"),
    ("l1_table_offset", 40, ">Q"), ("refcount_table_offset", 48, ">Q"), ("refcount_table_clusters", 56, ">I"),
    ("nb_snapshots", 60, ">I"), ("snapshots_offset", 64, ">Q"), ("incompatible_features", 72, ">Q"),
    ("compatible_features", 80, ">Q"), ("autoclear_features", 88, ">Q"), ("refcount_order", 96, ">I"),
    ("header_length", 100, ">I"),
]
QCOW2_SPECIAL = {
    "version": [0, 1, 2, 3, 4], "cluster_bits": [0, 8, 9, 12, 16, 21, 22, 30, 31, 32, 63],
    "crypt_method": [1, 2, 3], "incompatible_features": [1, 2, 4, 8, 16, 24, 32, 1 << 63],
    "refcount_order": [0, 4, 6, 7, 64], "header_length": [0, 72, 96, 104, 105, 112, 4096, 65536],
    "size": [0, 1, 511, 513, (1 << 20) + 1, 1 << 30, 1 << 40, 1 << 50, 1 << 62, (1 << 63) - 1, (1 << 64) - 1],
}


@dataclass
class Qcow2Layout:
    """Where the tables of a valid qcow2 file are (found by walking it as the spec says)."""

    version: int
    cluster_bits: int
    size: int
    l1_offset: int
    l1_size: int
    l2_offsets: list[int]  # distinct L2 tables in use
    refcount_offset: int
    data_entries: list[tuple[int, int]]  # (file offset of the L2 entry, its value) of allocated clusters
    compressed_entries: list[tuple[int, int]]
    header_length: int
    backing_offset: int
    backing_size: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def qcow2_layout(data: bytes) -> Qcow2Layout:
    get = {name: struct.unpack_from(fmt, data, offset)[0] for name, offset, fmt in QCOW2_FIELDS[:13]}
    version = get["version"]
    header_length = struct.unpack_from(">I", data, 100)[0] if version == 3 else 72
    cluster = 1 << get["cluster_bits"]
    l1 = np.frombuffer(data, dtype=">u8", count=get["l1_size"], offset=get["l1_table_offset"])
    l2_offsets = sorted({int(e) & 0x00FFFFFFFFFFFE00 for e in l1 if int(e) & 0x00FFFFFFFFFFFE00})
    data_entries, compressed = [], []
    for table in l2_offsets:
        entries = np.frombuffer(data, dtype=">u8", count=cluster // 8, offset=table)
        for index, entry in enumerate(entries.tolist()):
            where = table + 8 * index
            if entry & (1 << 62):
                compressed.append((where, entry))
            elif entry & 0x00FFFFFFFFFFFE00:
                data_entries.append((where, entry))
    return Qcow2Layout(version, get["cluster_bits"], get["size"], get["l1_table_offset"], get["l1_size"], l2_offsets,
                       get["refcount_table_offset"], data_entries, compressed, header_length,
                       get["backing_file_offset"], get["backing_file_size"])


def _put(data: bytearray, offset: int, fmt: str, value: int) -> None:
    size = struct.calcsize(fmt)
    bits = size * 8
    struct.pack_into(fmt, data, offset, value % (1 << bits))


def set_backing(data: bytearray, layout: Qcow2Layout, name: bytes, fmt: bytes | None = None) -> None:
    """Point the image at backing file ``name`` (stored after the header extensions, in cluster 0)."""
    at = 2048 if layout.cluster_size > 2048 else layout.header_length + 64
    data[at : at + len(name)] = name
    _put(data, 8, ">Q", at)
    _put(data, 16, ">I", len(name))
    if fmt is not None and layout.version == 3:
        ext = struct.pack(">II", 0xE2792ACA, len(fmt)) + fmt + bytes(-len(fmt) % 8) + bytes(8)
        data[layout.header_length : layout.header_length + len(ext)] = ext


def mutate_qcow2(rng: random.Random, valid: bytes, names: dict) -> tuple[bytes, str]:
    """One change to a qcow2 file: a header field, a table entry, a compressed cluster descriptor, the
    backing file fields, a header extension, data, or raw bytes. ``names`` holds the backing names to
    try: ``outside`` (a file outside the image's directory), ``self``, ``sibling`` (a valid base)."""
    layout = qcow2_layout(valid)
    data = bytearray(valid)
    cluster = layout.cluster_size
    kind = rng.choices(["header", "l1", "l2", "compressed", "refcount", "backing", "extension", "data", "raw"],
                       weights=[22, 10, 16, 10, 4, 12, 8, 6, 12])[0]
    if kind == "header":
        fields = QCOW2_FIELDS if layout.version == 3 else QCOW2_FIELDS[:13]
        name, offset, fmt = rng.choice(fields)
        bits = struct.calcsize(fmt) * 8
        if name in QCOW2_SPECIAL and rng.random() < 0.6:
            value = rng.choice(QCOW2_SPECIAL[name])
        elif name.endswith("offset"):
            value = rng.choice([0, 1, 512, cluster, len(valid), len(valid) - 8, len(valid) + cluster,
                                layout.l1_offset, layout.refcount_offset, 1 << 62, (1 << 64) - 1, (1 << 63) - cluster])
        else:
            value = rng.choice([v for v in U64_LIMITS if v < 1 << bits] + [(1 << bits) - 1])
        _put(data, offset, fmt, value)
        return bytes(data), f"header {name} = {value}"
    if kind == "l1":
        if not layout.l1_size:
            return bytes(data), "no L1 entries"
        index = rng.randrange(layout.l1_size)
        at = layout.l1_offset + 8 * index
        value = rng.choice([0, 1, 1 << 63, layout.l1_offset, 0, cluster, len(valid), len(valid) + cluster,
                            (len(valid) // cluster) * cluster, layout.refcount_offset, 512, (1 << 56) - cluster,
                            (1 << 64) - 1] + [t | (1 << 63) for t in layout.l2_offsets])
        _put(data, at, ">Q", value)
        return bytes(data), f"L1[{index}] = {value:#x}"
    if kind == "l2":
        entries = layout.data_entries + layout.compressed_entries
        if not entries:
            return bytes(data), "no L2 entries"
        where, entry = rng.choice(entries)
        base = entry & 0x00FFFFFFFFFFFE00
        value = rng.choice([0, 1, base | 1, base + 512, base + cluster, len(valid), len(valid) + cluster,
                            len(valid) - cluster, 0, layout.l1_offset, cluster, (1 << 56) - cluster, (1 << 64) - 1,
                            (1 << 62) | base, (1 << 62) | (1 << 61) | base, (1 << 62) | ((1 << 62) - 1),
                            base | (1 << 63)] + [t for t in layout.l2_offsets])
        _put(data, where, ">Q", value)
        return bytes(data), f"L2 entry at {where} = {value:#x}"
    if kind == "compressed":
        if not layout.compressed_entries:
            where, _entry = rng.choice(layout.data_entries) if layout.data_entries else (None, 0)
            if where is None:
                return bytes(data), "no L2 entries"
            shift = 62 - (layout.cluster_bits - 8)
            value = (1 << 62) | (rng.choice([0, 1, (1 << (layout.cluster_bits - 8)) - 1]) << shift) | \
                rng.choice([0, 512, cluster, len(valid) - 1, len(valid)])
            _put(data, where, ">Q", value)
            return bytes(data), f"a data L2 entry at {where} made compressed: {value:#x}"
        where, entry = rng.choice(layout.compressed_entries)
        shift = 62 - (layout.cluster_bits - 8)
        host = entry & ((1 << shift) - 1)
        sectors = (entry >> shift) & ((1 << (layout.cluster_bits - 8)) - 1)
        how = rng.choice(["sectors_max", "sectors_zero", "host_zero", "host_eof", "host_past", "host_l1", "data_junk",
                          "data_zero", "host_shift"])
        if how == "sectors_max":
            sectors = (1 << (layout.cluster_bits - 8)) - 1
        elif how == "sectors_zero":
            sectors = 0
        elif how == "host_zero":
            host = 0
        elif how == "host_eof":
            host = len(valid) - 1
        elif how == "host_past":
            host = len(valid) + 4096
        elif how == "host_l1":
            host = layout.l1_offset
        elif how == "host_shift":
            host += rng.choice([1, 7, 511, -1])
        elif how in ("data_junk", "data_zero"):
            length = min((sectors + 1) * 512, len(valid) - host)
            data[host : host + length] = rng.randbytes(length) if how == "data_junk" else bytes(length)
            return bytes(data), f"compressed cluster at {host}: data replaced ({how})"
        _put(data, where, ">Q", (1 << 62) | (sectors << shift) | (host % (1 << shift)))
        return bytes(data), f"compressed descriptor at {where}: {how} (host {host}, sectors {sectors})"
    if kind == "refcount":
        how = rng.choice(["offset", "clusters", "entry"])
        if how == "offset":
            _put(data, 48, ">Q", rng.choice([0, 1, len(valid), (1 << 64) - 1]))
        elif how == "clusters":
            _put(data, 56, ">I", rng.choice([0, (1 << 32) - 1]))
        else:
            _put(data, layout.refcount_offset, ">Q", rng.choice([0, (1 << 64) - 1, len(valid) + cluster]))
        return bytes(data), f"refcount {how} changed"
    if kind == "backing":
        how = rng.choice(["outside_abs", "outside_rel", "self", "missing", "json", "url", "long", "not_utf8", "dir",
                          "offset_past", "size_huge", "devzero", "proc", "sibling_raw", "fmt_vmdk", "empty"])
        if how == "offset_past":
            _put(data, 8, ">Q", rng.choice([len(valid), cluster - 1, (1 << 63)]))
            _put(data, 16, ">I", rng.choice([1, 8, 1023]))
        elif how == "size_huge":
            if not layout.backing_offset:
                set_backing(data, layout, names["sibling"])
            _put(data, 16, ">I", rng.choice([1024, 4096, (1 << 32) - 1]))
        else:
            name = {"outside_abs": names["outside_abs"], "outside_rel": names["outside_rel"], "self": names["self"],
                    "missing": b"no-such-base.qcow2", "json": b'json:{"file.filename":"/etc/hostname"}',
                    "url": b"nbd://127.0.0.1:1/x", "long": b"a" * 1023, "not_utf8": b"\xff\xfe.img",
                    "dir": b".", "devzero": b"/dev/zero", "proc": b"/proc/self/environ",
                    "sibling_raw": names["sibling"], "fmt_vmdk": names["sibling"], "empty": b""}[how]
            fmt = rng.choice([None, b"raw", b"qcow2"]) if how != "fmt_vmdk" else b"vmdk"
            set_backing(data, layout, name, fmt)
        return bytes(data), f"backing file: {how}"
    if kind == "extension":
        if layout.version != 3:
            return raw_mutation(rng, bytes(data), region=(72, 512))
        how = rng.choice(["huge_length", "unknown", "feature_names", "compression_type", "backing_fmt_long"])
        start = layout.header_length
        if how == "huge_length":
            data[start : start + 8] = struct.pack(">II", 0x12345678, rng.choice([8, 4000, (1 << 32) - 1]))
        elif how == "unknown":
            data[start : start + 16] = struct.pack(">II", 0x12345678, 8) + bytes(8)
        elif how == "feature_names":
            table = bytes([0, 5]) + b"x" * 46 + bytes([0, 63]) + b"y" * 46
            data[start : start + 8 + len(table)] = struct.pack(">II", 0x6803F857, len(table)) + table
            _put(data, 72, ">Q", (1 << 5) | (1 << 63))
        elif how == "compression_type":
            if layout.header_length > 104:
                data[104] = rng.choice([1, 2, 255])
            _put(data, 72, ">Q", rng.choice([0, 8]))
        else:
            data[start : start + 8 + 1024] = struct.pack(">II", 0xE2792ACA, 1024) + b"q" * 1024
        return bytes(data), f"header extension: {how}"
    if kind == "data":
        if not layout.data_entries:
            return raw_mutation(rng, bytes(data))
        _where, entry = rng.choice(layout.data_entries)
        base = entry & 0x00FFFFFFFFFFFE00
        at = base + rng.randrange(cluster)
        data[at] ^= 0xFF
        return bytes(data), f"one data byte changed at {at} (a valid image of other content)"
    hot = [8, 20, 24, 72, 104, layout.l1_offset, cluster, len(valid) - cluster]
    regions = [(0, min(len(valid), cluster)), (layout.l1_offset, layout.l1_offset + 8 * max(1, layout.l1_size))]
    regions += [(t, t + cluster) for t in layout.l2_offsets]
    return raw_mutation(rng, bytes(data), hot=hot, region=rng.choice(regions))


# -- Redis entries ----------------------------------------------------------------------------------------

CHUNK_HEADER = struct.Struct("<4sHHIIII")


def mutate_msgpack_doc(rng: random.Random, valid: bytes) -> tuple[bytes, str]:
    """A catalogue or config document with one field changed (anywhere in its tree)."""
    doc = msgpack.unpackb(valid, raw=False)
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                paths.append((*path, key))
                walk(value, (*path, key))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                paths.append((*path, index))
                walk(value, (*path, index))

    walk(doc, ())
    path = rng.choice(paths)
    how = rng.choice(["value", "value", "value", "remove", "wrong"])
    parent = _get(doc, path[:-1])
    if how == "remove":
        parent.pop(path[-1]) if isinstance(parent, dict) else parent.pop(path[-1])
        what = f"{'.'.join(map(str, path))} removed"
    else:
        old = parent[path[-1]]
        if how == "value" and isinstance(old, int) and not isinstance(old, bool):
            value = rng.choice(INT_LIMITS + [old + 1, old - 1, old * 2, old // 2])
        elif how == "value" and isinstance(old, str):
            value = rng.choice(["", old + "x", "/etc/passwd", "../" + old, "raw", "qcow2", "vmdk", "md5", "sha1",
                                "blocksketch.catalogue", "a" * 70000, "ams-1", "fra-2"])
        elif how == "value" and isinstance(old, float):
            value = rng.choice([0.0, -1.0, 1e308, float("nan"), float("inf"), 1.0, 2.0])
        else:
            value = any_value(rng)
        parent[path[-1]] = value
        what = f"{'.'.join(map(str, path))} = {short(value)}"
    try:
        return msgpack.packb(doc, use_bin_type=True), what
    except (OverflowError, TypeError, ValueError):
        return valid, f"{what} (unencodable; unchanged)"


def mutate_chunk(rng: random.Random, valid: bytes) -> tuple[bytes, str]:
    """A block map chunk: a header field, a row (CRC recomputed), the order, or raw bytes."""
    magic, version, flags, rows, index, crc, reserved = CHUNK_HEADER.unpack_from(valid)
    payload = bytearray(valid[CHUNK_HEADER.size:])
    kind = rng.choice(["header", "header", "row", "row", "order", "rows_fixed", "raw"])
    if kind == "header":
        name = rng.choice(["magic", "version", "flags", "rows", "index", "crc", "reserved"])
        value = {"magic": b"BSMX", "version": rng.choice([0, 2, 0xFFFF]), "flags": 0xFFFF,
                 "rows": rng.choice([0, rows - 1, rows + 1, (1 << 32) - 1, 1 << 31]),
                 "index": rng.choice([1, (1 << 32) - 1]), "crc": crc ^ 1, "reserved": 1}[name]
        fields = dict(magic=magic, version=version, flags=flags, rows=rows, index=index, crc=crc, reserved=reserved)
        fields[name] = value
        header = CHUNK_HEADER.pack(*fields.values())
        return header + bytes(payload), f"chunk header {name} = {short(value)}"
    if kind in ("row", "order") and rows:
        at = rng.randrange(rows)
        if kind == "row":
            part = rng.choice(["digest", "count", "first"])
            if part == "digest":
                payload[16 * at : 16 * at + 16] = rng.choice([bytes(16), b"\xff" * 16, rng.randbytes(16)])
            elif part == "count":
                struct.pack_into("<I", payload, 16 * rows + 4 * at, rng.choice([0, 1, (1 << 31), (1 << 32) - 1]))
            else:
                struct.pack_into("<Q", payload, 20 * rows + 8 * at,
                                 rng.choice([0, (1 << 63) - 1, (1 << 64) - 1, 1 << 32, 1 << 20]))
            what = f"chunk row {at} {part} changed (CRC fixed)"
        else:
            other = rng.randrange(rows)
            a, b = bytes(payload[16 * at : 16 * at + 16]), bytes(payload[16 * other : 16 * other + 16])
            payload[16 * at : 16 * at + 16], payload[16 * other : 16 * other + 16] = b, a
            what = f"chunk rows {at} and {other} swapped (CRC fixed)"
        header = CHUNK_HEADER.pack(magic, version, flags, rows, index, zlib.crc32(payload), reserved)
        return header + bytes(payload), what
    if kind == "rows_fixed" and rows:
        keep = rng.choice([0, rows - 1, rows // 2])
        new = bytes(payload[: 16 * keep]) + bytes(payload[16 * rows : 16 * rows + 4 * keep]) + \
            bytes(payload[20 * rows : 20 * rows + 8 * keep])
        return CHUNK_HEADER.pack(magic, version, flags, keep, index, zlib.crc32(new), reserved) + new, \
            f"chunk cut to {keep} rows (consistent, CRC fixed)"
    return raw_mutation(rng, valid, hot=[4, 8, 12, 16, 24])


def mutate_bitmap(rng: random.Random, valid: bytes) -> tuple[bytes, str]:
    kind = rng.choice(["truncate", "extend", "zeros", "ones", "flip", "half", "empty"])
    if kind == "truncate":
        return valid[: rng.choice([0, 1, len(valid) - 1, len(valid) // 2])], "bitmap truncated"
    if kind == "extend":
        return valid + bytes(rng.choice([1, len(valid)])), "bitmap extended"
    if kind == "zeros":
        return bytes(len(valid)), "bitmap all zeros"
    if kind == "ones":
        return b"\xff" * len(valid), "bitmap all ones"
    if kind == "half":
        return valid[: len(valid) // 2], "bitmap halved (a folded size)"
    if kind == "empty":
        return b"", "bitmap empty"
    return bitflip(rng, valid)


# -- HTTP bodies ---------------------------------------------------------------------------------------


def nested(depth: int, kind: str) -> str:
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)


def mutate_http(rng: random.Random, bodies: dict) -> tuple[str, str, bytes, str]:
    """``(path, content type, body, description)`` of one request to the service."""
    which = rng.choice(["rank_json", "rank_json", "rank_msgpack", "rank_msgpack", "manifest", "manifest"])
    path = "/v1/manifest" if which == "manifest" else "/v1/rank"
    content_type = "application/msgpack" if which == "rank_msgpack" else "application/json"
    doc = dict(bodies[which])
    kind = rng.choices(["field", "extra", "raw", "text", "msgpack_shape"], weights=[45, 10, 20, 15, 10])[0]
    if kind == "field":
        names = list(doc) + ["top", "exact_top", "exclude_hosts", "include_manifest", "source_host", "name"]
        name = rng.choice(names)
        if rng.random() < 0.15:
            doc.pop(name, None)
            what = f"{name} removed"
        else:
            value = rng.choice([any_value(rng), limit_int(rng), "ams-1:" + "/x" * 3000, "nohost:/x", ":", "ams-1:",
                                "fra-2", "ams-1", "{bad}", ["ams-1", 5], ["a" * 300], bytes(16), b"\0" * 15])
            if content_type == "application/json" and isinstance(value, bytes):
                value = value.decode("latin-1")
            if isinstance(value, float) and value != value and content_type == "application/json":
                value = 1e308
            doc[name] = value
            what = f"{name} = {short(value)}"
        if which == "rank_msgpack" and rng.random() < 0.5 and name in ("digests", "counts"):
            pass
        body = _encode_http(doc, content_type)
        return path, content_type, body, f"{which}: {what}"
    if kind == "msgpack_shape":
        content_type = "application/msgpack"
        doc = dict(bodies["rank_msgpack"])
        rows = rng.choice([0, 1, 7, 100000])
        how = rng.choice(["consistent", "counts_short", "zero_counts", "max_counts", "dup_digests", "total_lies"])
        digests = rng.randbytes(16 * rows)
        counts = np.ones(rows, dtype="<u4")
        if how == "counts_short":
            counts = counts[:-1] if rows else np.ones(1, dtype="<u4")
        elif how == "zero_counts":
            counts[:] = 0
        elif how == "max_counts":
            counts[:] = (1 << 32) - 1
        elif how == "dup_digests":
            digests = (bytes(16) * rows)
        doc.update(digests=digests, counts=counts.tobytes(), total_blocks=int(counts.sum(dtype=np.uint64)))
        if how == "total_lies":
            doc["total_blocks"] = rng.choice([0, (1 << 64) - 1, 1])
        body = msgpack.packb(doc, use_bin_type=True)
        return "/v1/rank", content_type, body, f"msgpack rank query: {rows} rows, {how}"
    if kind == "extra":
        doc[rng.choice(["x", "", "a" * 1000])] = any_value(rng)
        body = _encode_http(doc, content_type)
        return path, content_type, body, f"{which}: an extra field"
    if kind == "text":
        choice = rng.choice(["deep_list", "deep_map", "empty", "null", "array", "string", "big_number", "bad_utf8",
                             "content_type", "nan", "dup_keys", "msgpack_deep", "msgpack_ext", "huge_str"])
        if choice == "deep_list":
            return path, "application/json", nested(rng.choice([1000, 100000]), "list").encode(), "deeply nested list"
        if choice == "deep_map":
            return path, "application/json", nested(rng.choice([1000, 100000]), "map").encode(), "deeply nested map"
        if choice == "msgpack_deep":
            return path, "application/msgpack", b"\x91" * 100000 + b"\xc0", "msgpack nested 100000 deep"
        if choice == "msgpack_ext":
            return path, "application/msgpack", b"\x81\xa5image\xc7\x01\x05x", "msgpack ext type value"
        body = {"empty": b"", "null": b"null", "array": b"[1,2]", "string": b'"x"',
                "big_number": b'{"image": "ams-1:/x", "top": 1' + b"0" * 5000 + b"}",
                "bad_utf8": b'{"image": "\xff\xfe"}', "content_type": _encode_http(doc, content_type),
                "nan": b'{"image": "ams-1:/x", "top": NaN}', "dup_keys": b'{"top": 1, "top": 2, "image": "a:b"}',
                "huge_str": b'{"image": "' + b"a" * (2 << 20) + b'"}'}[choice]
        ctype = rng.choice(["text/plain", "application/msgpack", "", "application/json; charset=latin-1"]) \
            if choice == "content_type" else "application/json"
        return path, ctype, body, f"body text: {choice}"
    body = _encode_http(doc, content_type)
    mutated, what = raw_mutation(rng, body)
    return path, content_type, mutated, f"{which}: {what}"


def _encode_http(doc: dict, content_type: str) -> bytes:
    if content_type == "application/msgpack":
        try:
            return msgpack.packb(doc, use_bin_type=True)
        except (OverflowError, TypeError, ValueError):
            return msgpack.packb({k: v for k, v in doc.items() if not isinstance(v, int) or -(1 << 63) <= v < 1 << 64},
                                 use_bin_type=True)
    return json.dumps(doc, default=lambda v: v.decode("latin-1") if isinstance(v, bytes) else str(v)).encode()
