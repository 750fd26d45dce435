"""qcow2 images read directly: the guest-visible bytes, the same stream ``qemu-img convert -O raw`` gives.

No qemu is needed at run time. Versions 2 and 3 are read, with zlib or zstd compressed clusters,
zero clusters, extended L2 entries (subclusters) and backing chains (raw or qcow2 backing files).
Anything else is refused with an :class:`~sketch.errors.ImageError` naming the image and the
reason, never read as silent zeros.

The format (QEMU's ``docs/interop/qcow2.txt``; every number big-endian) as this module reads it:

Header, first cluster of the file:

====== ===== =====================================================================
offset bytes field
====== ===== =====================================================================
0      4     magic ``QFI\\xfb``
4      4     version: 2 or 3 (1 is the older qcow format, refused)
8      8     backing_file_offset: where the backing file name is, 0 for none
16     4     backing_file_size: length of that name (not NUL-terminated, <= 1023)
20     4     cluster_bits: cluster size is ``1 << cluster_bits``, 9..21 (512 B..2 MiB)
24     8     size: the virtual (guest-visible) size in bytes
32     4     crypt_method: 0 none, 1 AES, 2 LUKS (anything but 0 is refused)
36     4     l1_size: entries in the active L1 table
40     8     l1_table_offset: cluster-aligned file offset of the L1 table
48     8     refcount_table_offset (not needed to read)
56     4     refcount_table_clusters (not needed to read)
60     4     nb_snapshots (internal snapshots are ignored: the active L1 table is read)
64     8     snapshots_offset
72     8     v3: incompatible_features: bit 0 dirty (read anyway, refcounts do not matter to
             a reader), bit 1 corrupt (refused), bit 2 external data file (refused), bit 3
             compression type field in use, bit 4 extended L2 entries; other bits refused
80     8     v3: compatible_features (ignored, as the spec allows)
88     8     v3: autoclear_features (ignored: they concern writers)
96     4     v3: refcount_order (<= 6)
100    4     v3: header_length (>= 104, a multiple of 8; 72 for v2)
104    1     v3, when header_length > 104: compression_type, 0 zlib, 1 zstd
====== ===== =====================================================================

Header extensions follow the header (at 72 for v2, at header_length for v3) up to the backing
file name or the end of the first cluster: ``type`` (4), ``length`` (4), data padded to 8 bytes;
type 0 ends the list. Read here: 0xe2792aca backing file format name (``raw`` or ``qcow2``;
without it the backing file's format is detected by magic, as QEMU does) and 0x6803f857 feature
name table (48-byte entries: kind, bit, name) used only to name unknown feature bits.

Mapping: guest cluster ``c`` lives at L1 index ``c // l2_entries``, L2 index ``c % l2_entries``
with ``l2_entries = cluster_size / 8`` (``/ 16`` with extended L2 entries). An L1 entry's bits
9-55 give the L2 table's file offset (0: the whole table is unallocated). An L2 entry:

* bit 62 set: compressed. With ``x = 62 - (cluster_bits - 8)``, bits 0..x-1 are the byte offset of
  the compressed data, bits x..61 the number of 512-byte sectors it spans beyond the first one. The
  data is a raw deflate stream (zlib) or zstd frames, decompressed until one cluster is produced.
* else bit 0 set (standard entries only): the cluster reads as zeros (even over a backing file).
* else bits 9-55 (cluster aligned) are the host offset of the data; 0 means unallocated: the
  bytes come from the backing file, or are zeros past its end or without one.

Extended L2 entries add a second 64-bit word to every entry: bits 0-31 say subcluster ``i``
(``cluster_size / 32`` bytes) is allocated at ``host + i * subcluster_size``, bits 32-63 that it
reads as zeros; neither means unallocated. Both at once, or allocation bits without a host
offset, are corrupt and refused.

Memory stays bounded whatever the image size: L1 slices and L2 tables are read on demand into one
byte-bounded LRU cache shared by a whole backing chain, and a read holds at most one decompressed
cluster. Opening reads only the first cluster, so worker threads and processes each open their own
reader cheaply; reads use ``pread`` only, so any number may read one image at once.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import struct
import zlib
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from .blocks import FileIdentity, RawImage, detect_format, open_file
from .errors import ImageError

MAGIC = b"QFI\xfb"
VERSIONS = (2, 3)
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # QEMU's own limit (2 MiB clusters)
MIN_EXTENDED_L2_CLUSTER_BITS = 14
MAX_L1_BYTES = 32 << 20  # QEMU's limit; it also bounds the virtual size
MAX_BACKING_NAME = 1023
MAX_CHAIN_DEPTH = 16
# L1 slices and L2 tables of a whole backing chain share this many bytes: one 64 KiB L2 table
# maps 512 MiB of guest data, and even four of the largest tables (4 MiB: 2 MiB clusters with
# extended entries) fit, so a read alternating between the layers of a chain does not thrash.
TABLE_CACHE_BYTES = 16 << 20
L1_SLICE_ENTRIES = 8192
# Data runs are probed for holes of the qcow2 file (SEEK_DATA) once per this many bytes.
HOLE_PROBE_BYTES = 64 << 10
# Longest stretch of mapping units classified at once: bounds the temporaries of one step.
MAX_PIECE_UNITS = 1 << 16

V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
V3_FIELDS = struct.Struct(">QQQII")  # bytes 72-103
V3_HEADER_LENGTH = 104

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION_TYPE = 1 << 3
INCOMPAT_EXTENDED_L2 = 1 << 4
KNOWN_INCOMPAT = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION_TYPE
                  | INCOMPAT_EXTENDED_L2)

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857

COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}
CRYPT_METHODS = {1: "AES", 2: "LUKS"}

OFFSET_MASK = 0x00FFFFFFFFFFFE00
COMPRESSED_FLAG = 1 << 62
ZERO_FLAG = 1
SUBCLUSTERS = 32

# What a mapping unit (a cluster, or a subcluster with extended L2 entries) reads as.
UNALLOCATED, ZERO, DATA, COMPRESSED = 0, 1, 2, 3


# Magic bytes of other image formats (offset, bytes, name): a backing file whose format the image
# does not record is probed, and one of these must not be read as raw bytes.
FOREIGN_MAGICS = (
    (0, b"KDMV", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0, b"QED\0", "qed"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (64, b"\x7f\x10\xda\xbe", "vdi"),
)


def _probe_foreign_format(path: str) -> str | None:
    """The name of a non-raw, non-qcow2 image format ``path`` starts like, or None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(128)
    except OSError:
        return None
    for offset, magic, name in FOREIGN_MAGICS:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


# Never a backing file, whatever the caller allows: kernel files that look like regular files.
PSEUDO_FILE_SYSTEMS = ("/proc", "/sys")


def backing_roots(image_path: str, backing_dirs: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The real directories a backing file named by ``image_path`` may lie in (or below): the
    image's own directory (as named, and where the image really is), then ``backing_dirs``.

    A qcow2 names its backing file by any path it likes, so without this rule an image from
    anyone would make blocksketch read, digest and ship any file it can read (``/etc/shadow``).
    """
    own = os.path.realpath(os.path.dirname(os.path.abspath(image_path)))
    where = os.path.dirname(os.path.realpath(image_path))
    roots = [own] + ([where] if where != own else [])
    roots.extend(os.path.realpath(d) for d in backing_dirs)
    return tuple(roots)


def _opened_path(source) -> str | None:
    """The path the kernel knows an open source's file by (Linux), or None where it cannot say."""
    try:
        return os.readlink(f"/proc/self/fd/{source._fd}")
    except OSError:
        return None


_tokens = itertools.count()  # tells apart the images sharing one TableCache


class TableCache:
    """Decoded L1 slices and L2 tables, least recently used first out, bounded in bytes.

    The newest table is always kept, so a budget smaller than one table still works (slowly).
    """

    def __init__(self, budget: int = TABLE_CACHE_BYTES):
        self.budget = budget
        self.bytes = 0
        self._tables: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def get(self, key: tuple) -> np.ndarray | None:
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
        return table

    def put(self, key: tuple, table: np.ndarray) -> None:
        self._tables[key] = table
        self.bytes += table.nbytes
        while self.bytes > self.budget and len(self._tables) > 1:
            _, old = self._tables.popitem(last=False)
            self.bytes -= old.nbytes


class _Allocation:
    """What one walk over an image's mapping met, against what its file can hold.

    In an image QEMU wrote, every L1 entry has an L2 table of its own, every data cluster of the
    active tables its own host cluster, and every compressed cluster its own bytes. A file whose
    tables map one host cluster (or one L2 table, or one compressed cluster) over and over claims
    far more guest data than it holds: 256 KiB could stand for 16 GiB to hash. Such tables are
    refused before any of that work, with memory for at most one offset per compressed cluster
    (8 bytes, as its L2 entry takes in the file).
    """

    def __init__(self, image: Qcow2Image):
        self._image = image
        self._tables: dict[int, int] = {}
        self._data_units = 0
        self._data_limit = -(-image.file_size >> image._unit_bits)
        self._compressed: list[np.ndarray] = []
        self._last_cluster = -1  # guest cluster whose compressed entry was recorded last

    def add_piece(self, l1_index: int, l2_offset: int, unit: int, kinds: np.ndarray, hosts: np.ndarray) -> None:
        """One classified piece of the L2 table at ``l2_offset``, starting at mapping unit ``unit``."""
        other = self._tables.setdefault(l2_offset, l1_index)
        if other != l1_index:
            raise self._image._fail(f"L1 entries {other} and {l1_index} share the L2 table at offset {l2_offset} "
                                    "(corrupt tables)")
        self.add_data(int(np.count_nonzero(kinds == DATA)))
        at = np.flatnonzero(kinds == COMPRESSED)
        if len(at):
            # One entry per guest cluster, however many subcluster units it spans (or pieces it straddles).
            clusters = (unit + at) // self._image._units_per_cluster
            first = np.ones(len(at), dtype=bool)
            first[1:] = clusters[1:] != clusters[:-1]
            first &= clusters > self._last_cluster
            self._last_cluster = max(self._last_cluster, int(clusters[-1]))
            self._compressed.append(hosts[at[first]] & np.uint64((1 << self._image._csize_shift) - 1))

    def add_data(self, units: int) -> None:
        self._data_units += units
        if self._data_units > self._data_limit:
            raise self._image._fail(f"its tables map more data clusters than the {self._image.file_size}-byte "
                                    "file holds (host clusters used repeatedly: corrupt tables)")

    def finish(self) -> None:
        offsets = np.sort(np.concatenate(self._compressed)) if self._compressed else np.zeros(0, np.uint64)
        if len(offsets) > 1 and (offsets[1:] == offsets[:-1]).any():
            repeated = int(offsets[1:][offsets[1:] == offsets[:-1]][0])
            raise self._image._fail(f"the compressed cluster at host offset {repeated} is mapped more than once "
                                    "(corrupt tables)")


class Qcow2Image:
    """A qcow2 image as an :class:`~sketch.blocks.ImageSource`: guest-visible bytes and data extents.

    ``backing`` is the opened backing image (a :class:`Qcow2Image` or a
    :class:`~sketch.blocks.RawImage`) or None. The keyword arguments are for opening backing files
    and tests; callers use ``Qcow2Image(path)`` or ``sketch.blocks.open_image``.
    """

    format = "qcow2"

    def __init__(self, path: str, *, cache: TableCache | None = None, backing_dirs: tuple[str, ...] = (),
                 nofollow: bool = False, _chain: tuple[str, ...] = ()):
        self.path = path
        self.backing: Qcow2Image | RawImage | None = None
        self.backing_dirs = tuple(backing_dirs)
        self._fd = -1
        self._cache = cache if cache is not None else TableCache()
        self._zstd = None
        self._token = next(_tokens)
        self._last_cluster: tuple[int, bytes] | None = None
        self._fd = open_file(path, nofollow)
        try:
            info = os.fstat(self._fd)
            self.identity = FileIdentity.of(info)
            self.file_size = info.st_size
            self._read_header()
            if self.backing_name is not None:
                self.backing = self._open_backing(_chain + (os.path.realpath(path),))
        except BaseException:
            self.close()
            raise

    # --- header -------------------------------------------------------------------------------

    def _fail(self, reason: str) -> ImageError:
        return ImageError(f"qcow2 image {self.path}: {reason}")

    def _read_header(self) -> None:
        head = os.pread(self._fd, 4096, 0)
        if len(head) < V2_HEADER.size:
            raise self._fail("file too short for a qcow2 header")
        (magic, version, backing_offset, backing_size, cluster_bits, size, crypt_method, l1_size,
         l1_offset, _refcount_offset, _refcount_clusters, _snapshots, _snapshots_offset) = V2_HEADER.unpack_from(head)
        if magic != MAGIC:
            raise self._fail("not a qcow2 image (bad magic)")
        if version == 1:
            raise self._fail("qcow version 1 is not supported; convert it with qemu-img convert -O qcow2")
        if version not in VERSIONS:
            raise self._fail(f"unsupported qcow2 version {version} (2 and 3 are supported)")
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise self._fail(f"cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
        cluster_size = 1 << cluster_bits
        head = head[:cluster_size] if cluster_size <= len(head) else os.pread(self._fd, cluster_size, 0)
        if crypt_method:
            kind = CRYPT_METHODS.get(crypt_method, f"method {crypt_method}")
            raise self._fail(f"encrypted ({kind}); only unencrypted images can be read")
        incompatible = 0
        header_length = V2_HEADER.size
        compression_type = 0
        if version == 3:
            if len(head) < V3_HEADER_LENGTH:
                raise self._fail("file too short for a version 3 header")
            incompatible, _compatible, _autoclear, refcount_order, header_length = V3_FIELDS.unpack_from(
                head, V2_HEADER.size)
            if header_length < V3_HEADER_LENGTH or header_length % 8 or header_length > len(head):
                raise self._fail(f"invalid header_length {header_length}")
            if refcount_order > 6:
                raise self._fail(f"invalid refcount_order {refcount_order}")
            if header_length > V3_HEADER_LENGTH:
                compression_type = head[V3_HEADER_LENGTH]
        backing_format, feature_names = self._read_extensions(head, header_length, backing_offset, cluster_size)
        self._check_features(incompatible, feature_names)
        extended = bool(incompatible & INCOMPAT_EXTENDED_L2)
        if bool(incompatible & INCOMPAT_COMPRESSION_TYPE) != (compression_type != 0):
            raise self._fail("compression_type field and its incompatible feature bit disagree")
        if compression_type not in COMPRESSION_TYPES:
            raise self._fail(f"unknown compression type {compression_type}")
        if extended and cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS:
            raise self._fail("extended L2 entries need clusters of at least 16 KiB")

        entry_bytes = 16 if extended else 8
        l2_entries = cluster_size // entry_bytes
        needed_l1 = -(-size // (cluster_size * l2_entries))
        if needed_l1 * 8 > MAX_L1_BYTES:
            raise self._fail(f"virtual size {size} bytes is too large (its L1 table would exceed 32 MiB)")
        if l1_size * 8 > MAX_L1_BYTES:
            raise self._fail(f"L1 table of {l1_size} entries exceeds 32 MiB")
        if l1_size < needed_l1:
            raise self._fail(f"L1 table of {l1_size} entries is too small for a virtual size of {size} bytes")
        if l1_size and (l1_offset % cluster_size or l1_offset + l1_size * 8 > self.file_size):
            raise self._fail(f"L1 table at offset {l1_offset} is misaligned or past the end of the file")

        self.backing_name: str | None = None
        self.backing_format = backing_format
        if backing_offset:
            if backing_size > MAX_BACKING_NAME:
                raise self._fail(f"backing file name of {backing_size} bytes is too long")
            if backing_offset + backing_size > len(head):
                raise self._fail("backing file name lies outside the first cluster")
            raw_name = head[backing_offset : backing_offset + backing_size]
            try:
                self.backing_name = raw_name.decode()
            except UnicodeDecodeError:
                raise self._fail("backing file name is not valid UTF-8") from None
            if "\0" in self.backing_name:
                raise self._fail("backing file name holds a NUL byte")
            if not self.backing_name:
                self.backing_name = None

        self.version = version
        self.cluster_bits = cluster_bits
        self.cluster_size = cluster_size
        # QEMU's disk is whole 512-byte sectors: a size off that grid ends at the last whole one.
        self.size_bytes = size - size % 512
        self.compression = COMPRESSION_TYPES[compression_type]
        self.extended_l2 = extended
        self._l1_size = l1_size
        self._l1_offset = l1_offset
        self._entry_words = entry_bytes // 8
        self._l2_entries = l2_entries
        self._units_per_cluster = SUBCLUSTERS if extended else 1
        self._unit_bits = cluster_bits - (5 if extended else 0)
        self._units_per_table = l2_entries * self._units_per_cluster
        self._csize_shift = 62 - (cluster_bits - 8)

    def _read_extensions(self, head: bytes, start: int, backing_offset: int,
                         cluster_size: int) -> tuple[str | None, dict[int, str]]:
        """The backing format name and incompatible feature names from the header extensions."""
        end = backing_offset if backing_offset else min(cluster_size, len(head))
        end = min(end, len(head))
        backing_format = None
        names: dict[int, str] = {}
        position = start
        while position + 8 <= end:
            kind, length = struct.unpack_from(">II", head, position)
            if kind == EXT_END:
                break
            data_start = position + 8
            if data_start + length > end:
                raise self._fail(f"header extension {kind:#010x} runs past the header area")
            data = head[data_start : data_start + length]
            if kind == EXT_BACKING_FORMAT:
                backing_format = data.decode(errors="replace")
            elif kind == EXT_FEATURE_NAMES:
                for entry in range(0, length - length % 48, 48):
                    if data[entry] == 0:  # incompatible feature
                        names[data[entry + 1]] = data[entry + 2 : entry + 48].rstrip(b"\0").decode(errors="replace")
            position = data_start + length + (-length % 8)
        return backing_format, names

    def _check_features(self, incompatible: int, names: dict[int, str]) -> None:
        unknown = incompatible & ~KNOWN_INCOMPAT
        if unknown:
            bits = [bit for bit in range(64) if unknown >> bit & 1]
            described = ", ".join(f"bit {bit}" + (f" ({names[bit]})" if bit in names else "") for bit in bits)
            raise self._fail(f"uses unsupported incompatible features: {described}")
        if incompatible & INCOMPAT_CORRUPT:
            raise self._fail("marked corrupt by QEMU; repair it with qemu-img check -r all first")
        if incompatible & INCOMPAT_DATA_FILE:
            raise self._fail("keeps its data in an external data file, which is not supported")

    def _open_backing(self, chain: tuple[str, ...]) -> Qcow2Image | RawImage:
        """Open the backing file, if it may be read: see :func:`backing_roots` for where from."""
        name = self.backing_name
        assert name is not None
        if name.startswith("json:") or "://" in name:
            raise self._fail(f"backing file {name!r} is not a local file")
        # QEMU resolves a relative name against the directory of the image as it was named.
        path = name if os.path.isabs(name) else os.path.join(os.path.dirname(self.path), name)
        real = os.path.realpath(path)
        roots = backing_roots(self.path, self.backing_dirs)
        self._check_backing_place(name, real, roots)
        try:
            info = os.lstat(real)
        except OSError:
            raise self._fail(f"backing file {path} is missing") from None
        if not stat.S_ISREG(info.st_mode):
            raise self._fail(f"backing file {name!r} is not a regular file; refused")
        if real in chain:
            raise self._fail(f"backing chain loops back to {path}")
        if len(chain) >= MAX_CHAIN_DEPTH:
            raise self._fail(f"backing chain is deeper than {MAX_CHAIN_DEPTH} images")
        backing_format = self.backing_format
        if backing_format is None:  # old images do not record it: probe, as QEMU does
            backing_format = _probe_foreign_format(real) or detect_format(real)
        if backing_format == "raw":
            backing: Qcow2Image | RawImage = RawImage(real, nofollow=True)
        elif backing_format == "qcow2":
            backing = Qcow2Image(real, cache=self._cache, backing_dirs=self.backing_dirs, nofollow=True,
                                 _chain=chain)
        else:
            raise self._fail(f"backing file {path} has unsupported format {backing_format!r}")
        # What was opened, not what was checked: a directory swapped for a symlink meanwhile, or a
        # device put in the file's place, is caught here.
        opened = _opened_path(backing)
        if not backing.identity.same_file(FileIdentity.of(info)) or (opened is not None and opened != real):
            backing.close()
            raise self._fail(f"backing file {name!r} changed while it was opened; refused")
        return backing

    def _check_backing_place(self, name: str, real: str, roots: tuple[str, ...]) -> None:
        if any(real == fs or real.startswith(fs + "/") for fs in PSEUDO_FILE_SYSTEMS):
            raise self._fail(f"backing file {name!r} resolves to {real}, under /proc or /sys; refused")
        if not any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots):
            raise self._fail(f"backing file {name!r} resolves to {real}, outside the image's directory "
                             f"{roots[0]} and every directory allowed for backing files; refused")

    # --- mapping ------------------------------------------------------------------------------

    def _pread_exact(self, offset: int, length: int, what: str) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise self._fail(f"{what} at offset {offset} lies past the end of the file")
        return data

    def _l1_entry(self, index: int) -> int:
        first = index - index % L1_SLICE_ENTRIES
        key = (self._token, "l1", first)
        table = self._cache.get(key)
        if table is None:
            count = min(L1_SLICE_ENTRIES, self._l1_size - first)
            data = self._pread_exact(self._l1_offset + first * 8, count * 8, "L1 table")
            table = np.frombuffer(data, dtype=">u8").astype(np.uint64)
            self._cache.put(key, table)
        return int(table[index - first])

    def _l2_table(self, offset: int) -> np.ndarray:
        key = (self._token, "l2", offset)
        table = self._cache.get(key)
        if table is None:
            if offset % self.cluster_size:
                raise self._fail(f"L2 table offset {offset} is not cluster aligned")
            data = self._pread_exact(offset, self.cluster_size, "L2 table")
            table = np.frombuffer(data, dtype=">u8").astype(np.uint64).reshape(-1, self._entry_words)
            self._cache.put(key, table)
        return table

    def _pieces(self, first: int, stop: int, allocation: _Allocation | None = None,
                ) -> Iterator[tuple[int, int, int | np.ndarray, np.ndarray | None]]:
        """Classify mapping units ``[first, stop)``: yield ``(unit, end, kinds, hosts)`` in order.

        ``kinds`` is one kind for the whole piece (then ``hosts`` is None) or a uint8 array; ``hosts``
        holds the file offset of each DATA unit and the L2 entry of each COMPRESSED one.
        """
        per_table = self._units_per_table
        unit = first
        while unit < stop:
            l1_index, within = divmod(unit, per_table)
            table_end = unit - within + per_table
            l2_offset = self._l1_entry(l1_index) & OFFSET_MASK
            if l2_offset == 0:
                end = min(stop, table_end)
                yield unit, end, UNALLOCATED, None
            else:
                end = min(stop, table_end, unit + MAX_PIECE_UNITS)
                kinds, hosts = self._classify(self._l2_table(l2_offset), within, within + end - unit)
                if allocation is not None:
                    allocation.add_piece(l1_index, l2_offset, unit, kinds, hosts)
                yield unit, end, kinds, hosts
            unit = end

    def _classify(self, table: np.ndarray, first: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Kinds and hosts of units ``[first, stop)`` of one L2 table, checked for corruption."""
        upc = self._units_per_cluster
        c0, c1 = first // upc, -(-stop // upc)
        entries = table[c0:c1, 0]
        compressed = (entries & np.uint64(COMPRESSED_FLAG)) != 0
        base = entries & np.uint64(OFFSET_MASK)
        if self.version < 3 and np.any(~compressed & ((entries & np.uint64(ZERO_FLAG)) != 0)):
            raise self._fail("corrupt L2 entry (a zero cluster flag in a version 2 image)")
        if upc == 1:
            kinds = np.where(compressed, np.uint8(COMPRESSED),
                             np.where((entries & np.uint64(ZERO_FLAG)) != 0, np.uint8(ZERO),
                                      np.where(base != 0, np.uint8(DATA), np.uint8(UNALLOCATED))))
            hosts = np.where(compressed, entries, base)
            self._check_aligned(base[kinds == DATA])
        else:
            bitmaps = table[c0:c1, 1]
            alloc = bitmaps & np.uint64(0xFFFFFFFF)
            zeros = bitmaps >> np.uint64(32)
            standard = ~compressed
            if np.any(standard & ((alloc & zeros) != 0)) or np.any(standard & (base == 0) & (alloc != 0)):
                raise self._fail("corrupt extended L2 entry (subcluster both allocated and zero, or "
                                 "allocated without a host cluster)")
            self._check_aligned(base[standard & (alloc != 0)])
            bits = np.arange(SUBCLUSTERS, dtype=np.uint64)
            kinds2 = np.full((len(entries), SUBCLUSTERS), UNALLOCATED, dtype=np.uint8)
            kinds2[((zeros[:, None] >> bits) & np.uint64(1)) != 0] = ZERO
            kinds2[((alloc[:, None] >> bits) & np.uint64(1)) != 0] = DATA
            kinds2[compressed] = COMPRESSED
            hosts2 = base[:, None] + bits * np.uint64(1 << self._unit_bits)
            hosts2[compressed] = entries[compressed, None]
            skip = first - c0 * upc
            kinds = kinds2.reshape(-1)[skip : skip + stop - first]
            hosts = hosts2.reshape(-1)[skip : skip + stop - first]
        data = kinds == DATA
        if data.any() and np.any(hosts[data] >= np.uint64(self.file_size)):
            bad = int(hosts[data][hosts[data] >= np.uint64(self.file_size)][0])
            raise self._fail(f"a data cluster at host offset {bad} lies past the end of the file")
        return kinds, hosts

    def _check_aligned(self, bases: np.ndarray) -> None:
        misaligned = bases[(bases & np.uint64(self.cluster_size - 1)) != 0]
        if len(misaligned):
            raise self._fail(f"a data cluster at host offset {int(misaligned[0])} is not cluster aligned")

    def _runs(self, unit0: int, kinds: np.ndarray, hosts: np.ndarray) -> Iterator[tuple[int, int, int, int]]:
        """Split a classified piece into ``(unit, end, kind, host)`` runs one read can serve."""
        count = len(kinds)
        cut = np.ones(count, dtype=bool)
        if count > 1:
            step = np.uint64(1 << self._unit_bits)
            cut[1:] = (kinds[1:] != kinds[:-1]) | ((kinds[1:] == DATA) & (hosts[1:] != hosts[:-1] + step))
        if self._units_per_cluster > 1:
            # a compressed cluster is one run however many subcluster units it spans
            units = np.arange(unit0, unit0 + count)
            cut |= (kinds == COMPRESSED) & (units % self._units_per_cluster == 0)
        else:
            cut |= kinds == COMPRESSED
        starts = np.flatnonzero(cut)
        ends = np.append(starts[1:], count)
        for start, end, kind, host in zip(starts.tolist(), ends.tolist(), kinds[starts].tolist(),
                                          hosts[starts].tolist()):
            yield unit0 + start, unit0 + end, kind, host

    def _runs_of(self, first: int, stop: int,
                 allocation: _Allocation | None = None) -> Iterator[tuple[int, int, int, int]]:
        for unit, end, kinds, hosts in self._pieces(first, stop, allocation):
            if hosts is None:
                yield unit, end, int(kinds), 0
            else:
                yield from self._runs(unit, kinds, hosts)

    # --- ImageSource --------------------------------------------------------------------------

    def data_extents(self, start: int, stop: int) -> Iterator[tuple[int, int]]:
        """Merged ``(offset, length)`` ranges in ``[start, stop)`` that may hold data (allocated here,
        compressed, or provided by the backing chain); zero and unallocated clusters are left out."""
        stop = min(stop, self.size_bytes)
        if start >= stop:
            return
        bits = self._unit_bits
        current: list[int] | None = None
        for a, b in self._extent_parts(start, stop, bits):
            if current is not None and a <= current[1]:
                current[1] = max(current[1], b)
                continue
            if current is not None:
                yield current[0], current[1] - current[0]
            current = [a, b]
        if current is not None:
            yield current[0], current[1] - current[0]

    def _extent_parts(self, start: int, stop: int, bits: int) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` byte ranges that may hold data, in order, not yet merged.

        Checks on the way that the mapping claims no more than the file holds (:class:`_Allocation`),
        so every consumer of the extents (digests, checksums) works in proportion to the file."""
        allocation = _Allocation(self)
        for unit, end, kind, host in self._runs_of(start >> bits, -(-stop >> bits), allocation):
            run_start = unit << bits
            a, b = max(start, run_start), min(stop, end << bits)
            if kind == DATA:
                yield from self._unholed(host + (a - run_start), a, b)
            elif kind == COMPRESSED:
                yield a, b
            elif kind == UNALLOCATED and self.backing is not None:
                for offset, length in self.backing.data_extents(a, b):
                    yield offset, offset + length
        allocation.finish()

    def _unholed(self, host: int, start: int, stop: int) -> Iterator[tuple[int, int]]:
        """Parts of guest range ``[start, stop)``, stored contiguously from ``host`` on, that are not
        holes of the qcow2 file (preallocation=metadata maps clusters onto holes)."""
        if host + (stop - start) > self.file_size:  # a probe would call the missing part a hole
            raise self._fail(f"data at host offset {host} runs past the end of the file (truncated image?)")
        cursor = start
        for hole_start, hole_stop in self._host_holes(host, start, stop):
            if hole_start > cursor:
                yield cursor, hole_start
            cursor = hole_stop
        if cursor < stop:
            yield cursor, stop

    def _host_holes(self, host: int, start: int, stop: int) -> Iterator[tuple[int, int]]:
        """Whole-unit guest ranges in ``[start, stop)`` whose host bytes are holes.

        Only ``SEEK_DATA`` is used, once per ``HOLE_PROBE_BYTES`` of data: ``SEEK_HOLE`` scans the
        page cache page by page over fallocated extents (qemu's), which cost as much as reading.
        Holes that no probe lands in are missed, which only costs reading some zeros.
        """
        unit = 1 << self._unit_bits
        guest = start
        while guest < stop:
            try:
                data = os.lseek(self._fd, host + (guest - start), os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # no hole support here: treat everything as data
                    return
                data = host + (stop - start)  # nothing but a hole up to the end of the file
            data_guest = min(stop, start + (data - host))
            if data_guest > guest:
                hole_start = -(-guest // unit) * unit
                hole_stop = data_guest if data_guest == stop else data_guest - data_guest % unit
                if hole_stop > hole_start:
                    yield hole_start, hole_stop
            guest = data_guest - data_guest % HOLE_PROBE_BYTES + HOLE_PROBE_BYTES

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with guest bytes at ``offset``; past the virtual size they are zeros."""
        out = np.frombuffer(buffer, dtype=np.uint8)
        stop = offset + len(out)
        visible = min(stop, self.size_bytes)
        if visible < stop:
            out[max(0, visible - offset) :] = 0
        if offset >= visible:
            return
        bits = self._unit_bits
        for unit, end, kind, host in self._runs_of(offset >> bits, -(-visible >> bits)):
            run_start = unit << bits
            a, b = max(offset, run_start), min(visible, end << bits)
            target = buffer[a - offset : b - offset]
            if kind == DATA:
                self._read_data(host + (a - run_start), target)
            elif kind == COMPRESSED:
                cluster_start = a - a % self.cluster_size
                data = self._decompress(host)
                target[:] = memoryview(data)[a - cluster_start : b - cluster_start]
            elif kind == UNALLOCATED and self.backing is not None:
                self.backing.read_into(a, target)
            else:
                out[a - offset : b - offset] = 0

    def _read_data(self, host: int, target: memoryview) -> None:
        done = 0
        wanted = len(target)
        while done < wanted:
            try:
                got = os.preadv(self._fd, [target[done:]], host + done)
            except OSError as exc:
                raise self._fail(f"cannot read: {exc.strerror}") from None
            if got == 0:
                raise self._fail(f"data at host offset {host + done} lies past the end of the file "
                                 f"(truncated image?)")
            done += got

    def _decompress(self, entry: int) -> bytes:
        """The guest cluster that compressed L2 entry ``entry`` describes (the last one is kept)."""
        if self._last_cluster is not None and self._last_cluster[0] == entry:
            return self._last_cluster[1]
        shift = self._csize_shift
        host = entry & ((1 << shift) - 1)
        sectors = ((entry >> shift) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        length = sectors * 512 - (host & 511)
        if host >= self.file_size:
            raise self._fail(f"compressed cluster at host offset {host} lies past the end of the file")
        # The last sector may be cut short at the end of the file: QEMU reads it as zeros, and the
        # decompressor stops once it has a cluster anyway.
        data = os.pread(self._fd, min(length, self.file_size - host), host)
        size = self.cluster_size
        try:
            if self.compression == "zlib":
                cluster = zlib.decompressobj(-15).decompress(data, size)
            else:
                cluster = self._zstd_decompress(data, size)
        except (zlib.error, ValueError, RuntimeError) as exc:
            raise self._fail(f"compressed cluster at host offset {host} does not decompress: {exc}") from None
        if len(cluster) != size:
            raise self._fail(f"compressed cluster at host offset {host} decompresses to {len(cluster)} bytes, "
                             f"not {size}")
        self._last_cluster = (entry, cluster)
        return cluster

    def _zstd_decompress(self, data: bytes, size: int) -> bytes:
        import zstandard

        if self._zstd is None:
            self._zstd = zstandard.ZstdDecompressor()
        # QEMU reads frames until it has a whole cluster; whatever follows is padding, never touched.
        try:
            reader = self._zstd.stream_reader(data, read_across_frames=True)
            parts = []
            got = 0
            while got < size:
                part = reader.read(size - got)
                if not part:
                    break
                parts.append(part)
                got += len(part)
        except zstandard.ZstdError as exc:
            raise ValueError(str(exc)) from None
        return b"".join(parts)

    def close(self) -> None:
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Qcow2Image:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
