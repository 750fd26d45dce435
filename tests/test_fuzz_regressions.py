"""What the fuzz campaign (benchmarks/fuzz_formats.py, seed 1) found, one minimized test per distinct failure.

Each test names its target and a case id of that run (``python benchmarks/fuzz_formats.py --seed 1
--case ID`` replays it). The contract is the fuzzer's: bad input ends in exit 1 or 2 with one line
``blocksketch: error: ...`` (never a traceback or an "internal error"), within 256 MiB and 5 s, with
nothing left at the output; or, for an input that is valid after all, the right result.

Commands run as real processes. Those that must stay within memory run through :data:`LIMITED`,
which imports the CLI, then sets ``RLIMIT_AS`` to the process's size plus 256 MiB before the
command starts (as the fuzzer's fork server does), and report their peak RSS (``VmHWM``) at exit.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zstandard

from sketch.errors import FormatError
from sketch.manifest import Manifest
from sketch.ranges import read_ranges_file

ROOT = Path(__file__).resolve().parent.parent
HOST = "ams-1"
BLOCK_SIZE = 4096
LIMIT_MIB = 256
LIMITED = """
import atexit, ctypes, importlib, os, resource, sys
import cli.main


def peak() -> None:  # VmHWM: this process's own peak (ru_maxrss also counts the parent's, from before exec)
    with open("/proc/self/status") as status, open(os.environ["FUZZ_TEST_HWM"], "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))


atexit.register(peak)
importlib.import_module("cli." + sys.argv[1].replace("-", "_") + "_cmd")
ctypes.CDLL(None).mallopt(-8, 1)  # one malloc arena: thread arenas would count as address space
with open("/proc/self/status") as status:
    size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + (256 << 20),) * 2)
cli.main.main.main(sys.argv[1:], prog_name="blocksketch")
"""


# -- a small indexed world, made once for the module --------------------------------------------------


@pytest.fixture(scope="module")
def world(redis_node, tmp_path_factory):
    """The sample fleet indexed as ams-1, fra-2, lon-3 (4 KiB blocks); the source's manifest for
    ams-1, its bundle and its send stream."""
    import redis

    from sketch.blocks import open_image
    from sketch.bundle import pack_bundle
    from sketch.sample import write_sample_fleet
    from sketch.stream import image_stamp, write_stream
    from store import open_store, refresh_host
    from store.transfer import host_manifest

    client = redis.Redis.from_url(redis_node.url)
    client.flushall()
    client.close()
    top = tmp_path_factory.mktemp("fuzz-world")
    fleet = write_sample_fleet(str(top / "fleet"), block_size=BLOCK_SIZE, blocks_per_image=256)
    with open_store(redis_node.url) as store:
        for host, paths in fleet["hosts"].items():
            refresh_host(store, host, [os.path.dirname(paths[0])], BLOCK_SIZE)
        manifest = host_manifest(store, fleet["source"], HOST)
    paths = {name: str(top / name) for name in ("valid.manifest", "valid.bundle", "valid.stream")}
    manifest.save(paths["valid.manifest"])
    pack_bundle(fleet["source"], manifest, paths["valid.bundle"])
    source = open_image(fleet["source"])
    try:
        with open(paths["valid.stream"], "wb") as handle:
            write_stream(handle, source, manifest, image_stamp(fleet["source"]))
    finally:
        source.close()
    return {"url": redis_node.url, "source": fleet["source"], "fleet": fleet, "manifest": manifest,
            **{name: Path(path).read_bytes() for name, path in paths.items()},
            "paths": paths, "expected": Path(fleet["source"]).read_bytes()}


def blocksketch(args: list[str], cwd: Path, world: dict, stdin: str | None = None) -> dict:
    """``blocksketch ARGS`` as a process limited to its size + 256 MiB; how it ended and its peak RSS."""
    out_path, err_path, peak_path = cwd / ".stdout", cwd / ".stderr", cwd / ".peak"
    env = {**os.environ, "BLOCKSKETCH_REDIS_URL": world["url"], "PYTHONPATH": str(ROOT),
           "FUZZ_TEST_HWM": str(peak_path)}
    with open(stdin or os.devnull, "rb") as handle, open(out_path, "wb") as out, open(err_path, "wb") as err:
        done = subprocess.run([sys.executable, "-c", LIMITED, *args], cwd=cwd, env=env, stdin=handle, stdout=out,
                              stderr=err, timeout=60)
    result = {"code": done.returncode, "stdout": out_path.read_text(), "stderr": err_path.read_text(),
              "rss_mib": int(peak_path.read_text()) / 1024 if peak_path.exists() else float("inf")}
    for path in (out_path, err_path, peak_path):
        path.unlink(missing_ok=True)
    return result


def assert_refused(done: dict, output: Path | None = None, *fragments: str) -> None:
    """Exit 1 or 2, one ``blocksketch: error:`` line, no sign of the memory limit, nothing at ``output``."""
    lines = done["stderr"].strip().splitlines()
    assert done["code"] in (1, 2), done
    assert len(lines) == 1 and lines[0].startswith("blocksketch: error: "), done["stderr"]
    for sign in ("MemoryError", "out of memory", "internal error", "Traceback"):
        assert sign not in done["stderr"], done["stderr"]
    for fragment in fragments:
        assert fragment in lines[0]
    if output is not None:
        assert not output.exists()
        assert [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")] == []


# -- byte surgery: valid checksums around a hostile payload -------------------------------------------------


def seal_manifest_body(body: bytes) -> bytes:
    """A manifest file whose envelope (length, SHA-256) is valid for ``body``, whatever it holds."""
    return struct.pack("<8sHHQ32s", b"BSKMANIF", 1, 0, len(body), hashlib.sha256(body).digest()) + body


def manifest_doc(world: dict) -> dict:
    return msgpack.unpackb(zstandard.ZstdDecompressor().decompress(world["valid.manifest"][52:]), raw=False)


def seal_manifest_doc(doc: dict) -> bytes:
    return seal_manifest_body(zstandard.ZstdCompressor(level=3).compress(msgpack.packb(doc, use_bin_type=True)))


def zeros_frame(size: int, prefix: bytes = b"", content_size: bool = False) -> bytes:
    """One zstd frame of ``prefix`` and ``size`` zero bytes: a few KiB standing for ``size``."""
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=content_size).compressobj(
        size=len(prefix) + size if content_size else -1)
    parts = [compressor.compress(prefix)]
    chunk = bytes(1 << 20)
    for at in range(0, size, len(chunk)):
        parts.append(compressor.compress(chunk[: min(len(chunk), size - at)]))
    parts.append(compressor.flush())
    return b"".join(parts)


def bundle_parts(data: bytes) -> tuple[dict, list[tuple[int, bytes]]]:
    """A bundle's header map and its frames ``(raw length, compressed bytes)`` (docs/manifest-format.md)."""
    (length,) = struct.unpack_from("<I", data, 12)
    header = msgpack.unpackb(data[16 : 16 + length], raw=False)
    at, frames = 16 + length + 32, []
    while True:
        raw, packed = struct.unpack_from("<II", data, at)
        at += 24
        if raw == 0 and packed == 0:
            return header, frames
        frames.append((raw, data[at : at + packed]))
        at += packed


def seal_bundle(header: dict, frames: list[tuple[int, bytes]]) -> bytes:
    """A bundle with every checksum (header, frames, chain, trailer) valid for what it holds."""
    body = msgpack.packb(header, use_bin_type=True)
    prefix = struct.pack("<8sHHI", b"BSKBUNDL", 2, 0, len(body)) + body
    header_sum = hashlib.sha256(prefix).digest()
    chain = hashlib.sha256(header_sum)
    out = [prefix, header_sum]
    for raw, packed in frames:
        check = hashlib.sha256(packed).digest()[:16]
        chain.update(check)
        out.append(struct.pack("<II16s", raw, len(packed), check) + packed)
    out.append(bytes(24) + struct.pack("<QQ32s8s", len(frames), sum(r for r, _ in frames), chain.digest(),
                                       b"BSKBEND\0"))
    return b"".join(out)


def apply_args(manifest: str, *bundles: str) -> list[str]:
    return ["apply", manifest, *bundles, "-o", "out.img", "--host", HOST]


# -- manifests -------------------------------------------------------------------------------------------


def _bomb_1gib_bin() -> bytes:
    head = msgpack.packb({"schema": "blocksketch.manifest", "version": 1}, use_bin_type=True)
    return zeros_frame(1 << 30, b"\x83" + head[1:] + b"\xa3pad\xc6" + struct.pack(">I", 1 << 30))


def _claims_3gib() -> bytes:
    frame = bytearray(zstandard.ZstdCompressor(level=1, write_content_size=True).compress(bytes(70000)))
    offset = 5 + (0 if frame[4] & 0x20 else 1)  # the 4-byte content size field
    frame[offset : offset + 4] = struct.pack("<I", 3 << 30)
    return bytes(frame)


MANIFEST_BOMBS = {
    # manifest-13: 1 GiB of zeros in a 32 KiB body
    "1GiB of zeros": lambda: zeros_frame(1 << 30),
    # manifest-20: a msgpack map whose 'pad' field is a 1 GiB bin, in a 32 KiB body
    "1GiB bin field": _bomb_1gib_bin,
    # manifest-115: a 1 KiB frame whose header claims 3 GiB of content
    "3GiB claimed": _claims_3gib,
    # manifest-60: 64 MiB without a content size: the decoder sizes its buffer by the 4 GiB cap
    "64MiB, no content size": lambda: zeros_frame(64 << 20),
}


@pytest.mark.parametrize("bomb", sorted(MANIFEST_BOMBS))
def test_a_manifest_body_that_decompresses_far_beyond_its_size_is_refused_within_256_mib(world, tmp_path, bomb):
    # target manifest, cases manifest-13, manifest-20, manifest-115, manifest-60
    manifest = tmp_path / "m.manifest"
    manifest.write_bytes(seal_manifest_body(MANIFEST_BOMBS[bomb]()))
    done = blocksketch(apply_args(str(manifest), world["paths"]["valid.bundle"]), tmp_path, world)
    assert_refused(done, tmp_path / "out.img", "corrupt")
    assert done["rss_mib"] <= LIMIT_MIB


def test_a_stream_whose_manifest_is_a_decompression_bomb_is_refused_within_256_mib(world, tmp_path):
    # target stream, case stream-62 (the stream's manifest replaced by a sealed 1 GiB body)
    manifest = seal_manifest_body(_bomb_1gib_bin())
    stream = tmp_path / "s.stream"
    stream.write_bytes(struct.pack("<8sHHI", b"BSKSTRM\0", 1, 0, len(manifest)) + manifest + world["valid.bundle"])
    done = blocksketch(["receive", str(stream), "-o", "out.img", "--host", HOST], tmp_path, world)
    assert_refused(done, tmp_path / "out.img")
    assert done["rss_mib"] <= LIMIT_MIB


@pytest.mark.parametrize("value", [{}, [1, 2]])
def test_a_manifest_checksum_algorithm_of_an_unhashable_type_is_a_format_error(world, value):
    # target manifest, cases manifest-451 ({}) and manifest-1464 ([1, 2])
    doc = manifest_doc(world)
    doc["checksum"]["algorithm"] = value
    with pytest.raises(FormatError):
        Manifest.from_bytes(seal_manifest_doc(doc))


# -- bundles ---------------------------------------------------------------------------------------------


def test_a_bundle_frame_that_decompresses_past_its_declared_length_is_refused_within_256_mib(world, tmp_path):
    # target bundle, cases bundle-22 (1 GiB of zeros) and bundle-175 (1 GiB in a msgpack bin)
    header, frames = bundle_parts(world["valid.bundle"])
    frames[0] = (frames[0][0], zeros_frame(1 << 30))
    bundle = tmp_path / "b.bundle"
    bundle.write_bytes(seal_bundle(header, frames))
    done = blocksketch(apply_args(world["paths"]["valid.manifest"], str(bundle)), tmp_path, world)
    assert_refused(done, tmp_path / "out.img", "corrupt")
    assert done["rss_mib"] <= LIMIT_MIB


@pytest.mark.parametrize("start, count", [((1 << 63) - 1, (1 << 63) - 1), (1 << 62, 1 << 62)])
def test_bundle_ranges_whose_end_overflows_64_bits_are_refused_in_one_line(world, tmp_path, start, count):
    # target bundle, cases bundle-71 (2^63-1, 2^63-1) and bundle-206 (2^62, 2^62)
    header, frames = bundle_parts(world["valid.bundle"])
    header.update(contents="ranges", ranges=np.array([[start, count]], dtype="<u8").tobytes(),
                  blocks=(start + count) % (1 << 64) - start if start + count < 1 << 64 else count)
    bundle = tmp_path / "b.bundle"
    bundle.write_bytes(seal_bundle(header, frames))
    done = blocksketch(apply_args(world["paths"]["valid.manifest"], world["paths"]["valid.bundle"], str(bundle)),
                       tmp_path, world)
    assert_refused(done, tmp_path / "out.img")


# -- streams ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("claimed", [(1 << 32) - 1, 1 << 31])
def test_a_stream_header_claiming_a_huge_manifest_is_refused_within_256_mib(world, tmp_path, claimed):
    # target stream, cases stream-76 (2^32-1) and the 2^31 ones of the same mutation
    stream = tmp_path / "s.stream"
    stream.write_bytes(struct.pack("<8sHHI", b"BSKSTRM\0", 1, 0, claimed) + world["valid.stream"][16:])
    done = blocksketch(["receive", str(stream), "-o", "out.img", "--host", HOST], tmp_path, world)
    assert_refused(done, tmp_path / "out.img", "truncated")
    assert done["rss_mib"] <= LIMIT_MIB


# -- ranges files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pairs", [[[10 ** 30, 1]], [[-(2 ** 63), 2 ** 63]], [[2 ** 64, 1]], [[5, 2 ** 64 - 5]]])
def test_a_ranges_file_with_integers_beyond_64_bits_is_a_format_error(world, tmp_path, pairs):
    # target ranges, cases ranges-7, ranges-14 and the 2^64 ones of the same mutation
    manifest = world["manifest"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"format": "blocksketch-ranges", "version": 1, "manifest_id": manifest.manifest_id.hex(),
                                "block_size": BLOCK_SIZE, "blocks": 1, "ranges": pairs}))
    with pytest.raises(FormatError):
        read_ranges_file(str(path), manifest.manifest_id, manifest.total_blocks)


def test_a_deeply_nested_ranges_file_is_a_format_error(world, tmp_path):
    # target ranges, the "ranges file text replaced" cases (100,000 nested lists)
    path = tmp_path / "r.json"
    path.write_text('{"format": "blocksketch-ranges", "ranges": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(FormatError):
        read_ranges_file(str(path), world["manifest"].manifest_id, world["manifest"].total_blocks)


# -- qcow2 -----------------------------------------------------------------------------------------------


def qcow2_of(raw: Path, directory: Path, *options: str) -> Path:
    path = directory / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", *options, str(raw),
                    str(path)], check=True, capture_output=True)
    return path


def qemu_raw(path: Path) -> bytes:
    out = path.with_suffix(".qemu.raw")
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(path), str(out)], check=True,
                   capture_output=True)
    return out.read_bytes()


@pytest.mark.tools("qemu-img")
@pytest.mark.parametrize("size", [511, 513, 4095, (1 << 20) + 1])
def test_a_qcow2_virtual_size_off_the_sector_grid_reads_as_qemu_img_reads_it(world, tmp_path, size):
    # target qcow2, cases qcow2-720 (511), qcow2-342 (513), qcow2-1360 (4095), qcow2-878 (1 MiB + 1)
    from sketch.qcow2 import Qcow2Image

    path = qcow2_of(Path(world["source"]), tmp_path)
    data = bytearray(path.read_bytes())
    struct.pack_into(">Q", data, 24, size)
    path.write_bytes(data)
    expected = qemu_raw(path)
    with Qcow2Image(str(path)) as image:
        got = bytearray(image.size_bytes)
        image.read_into(0, memoryview(got))
    assert bytes(got) == expected


@pytest.mark.tools("qemu-img")
def test_a_zero_flag_in_a_version_2_qcow2_is_refused_not_read_as_zeros(world, tmp_path):
    # target qcow2, cases qcow2-1326, qcow2-1397, qcow2-951, qcow2-index-2 (v2: an L2 entry | 1);
    # qemu-img: "Zero cluster entry found in pre-v3 image"
    from sketch.errors import ImageError
    from sketch.qcow2 import Qcow2Image

    path = qcow2_of(Path(world["source"]), tmp_path, "-o", "compat=0.10")
    data = bytearray(path.read_bytes())
    l1_offset, = struct.unpack_from(">Q", data, 40)
    l2_offset = struct.unpack_from(">Q", data, l1_offset)[0] & 0x00FFFFFFFFFFFE00
    entries = np.frombuffer(bytes(data[l2_offset : l2_offset + 4096]), dtype=">u8")
    allocated = int(np.flatnonzero(entries)[0])
    struct.pack_into(">Q", data, l2_offset + 8 * allocated, int(entries[allocated]) | 1)
    path.write_bytes(data)
    with pytest.raises(ImageError), Qcow2Image(str(path)) as image:
        image.read_into(0, memoryview(bytearray(image.size_bytes)))


@pytest.mark.tools("qemu-img")
def test_a_backing_file_name_holding_a_nul_byte_is_refused_in_one_line(world, tmp_path):
    # target qcow2, cases qcow2-183, qcow2-645 of the second run (after the fixes): a backing name
    # with a NUL made every path call raise ValueError, an internal error
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(tmp_path / "base.qcow2"), "1M"], check=True,
                   capture_output=True)
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-u", "-b", "base.qcow2", "-F", "qcow2", str(disk), "1M"],
                   check=True, capture_output=True)
    data = bytearray(disk.read_bytes())
    name_offset, = struct.unpack_from(">Q", data, 8)
    data[name_offset + 4] = 0  # "base\0qcow2"
    disk.write_bytes(data)
    for args, output in ((["compare", str(disk), str(disk)], None),
                         (["send", str(disk), "--to", HOST, "-o", "s.stream"], tmp_path / "s.stream")):
        assert_refused(blocksketch(args, tmp_path, world), output, "NUL byte")


@pytest.mark.tools("qemu-img")
def test_send_refuses_a_qcow2_backed_by_a_file_under_proc(world, tmp_path):
    # target qcow2, case qcow2-1474 (overlay: backing file /proc/self/environ)
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", str(base), "1M"], check=True,
                   capture_output=True)
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-u", "-b", "/proc/self/environ", "-F", "raw", "-o",
                    "cluster_size=4096", str(tmp_path / "disk.qcow2"), "1M"], check=True, capture_output=True)
    done = blocksketch(["send", str(tmp_path / "disk.qcow2"), "--to", HOST, "-o", "s.stream"], tmp_path, world)
    assert_refused(done, tmp_path / "s.stream")


@pytest.mark.tools("qemu-img")
def test_index_never_reads_a_backing_file_outside_the_image_directory(world, tmp_path):
    # target qcow2-index, cases qcow2-index-101 and qcow2-index-235 (backing name ../../canary.raw)
    outside = tmp_path / "outside.raw"
    outside.write_bytes(b"CANARY: outside every image directory\n" * 30000)
    images = tmp_path / "images"
    images.mkdir()
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", "../outside.raw", "-F", "raw", "-o",
                    "cluster_size=4096", "disk.qcow2"], check=True, capture_output=True, cwd=images)
    done = blocksketch(["index", "--host", "fq-escape", str(images), "--json"], tmp_path, world)
    from store import open_store

    with open_store(world["url"]) as store:
        catalogue = store.catalogue("fq-escape")
    indexed = [] if catalogue is None else [entry.path for entry in catalogue.images]
    assert str(images / "disk.qcow2") not in indexed, done
    if done["code"] != 0:
        assert_refused(done)


# -- Redis entries ------------------------------------------------------------------------------------------


@pytest.fixture
def catalogue_of_ams(world):
    """ams-1's catalogue document, decoded, to change; the original is put back afterwards."""
    import redis

    client = redis.Redis.from_url(world["url"])
    key = "blocksketch:{ams-1}:catalogue"
    original = client.get(key)
    document = msgpack.unpackb(original, raw=False)

    def publish(changed: dict) -> None:
        client.set(key, msgpack.packb(changed, use_bin_type=True))

    yield document, publish
    client.set(key, original)
    client.close()


@pytest.mark.parametrize("chunks", [1 << 31, (1 << 53), (1 << 63) - 1])
def test_a_catalogue_entry_claiming_billions_of_map_chunks_is_refused_within_256_mib(world, tmp_path,
                                                                                       catalogue_of_ams, chunks):
    # target redis, cases redis-313 (2^31), redis-533 (2^53), redis-261 (2^63-1): `manifest` built a
    # key name per claimed chunk before reading one
    document, publish = catalogue_of_ams
    document["images"][0]["chunks"] = chunks
    publish(document)
    done = blocksketch(["manifest", world["source"], "--to", HOST, "-o", "m.manifest"], tmp_path, world)
    assert_refused(done, tmp_path / "m.manifest", "impossible counts")
    assert done["rss_mib"] <= LIMIT_MIB


@pytest.mark.parametrize("field, value", [("refreshed_at", float("nan")), ("refreshed_at", float("inf")),
                                          ("refreshed_at", 1e308), ("indexed_at", float("nan")),
                                          ("indexed_at", -1e20)])
def test_a_catalogue_time_no_listing_can_print_is_refused_in_one_line(world, tmp_path, catalogue_of_ams, field,
                                                                       value):
    # target redis, case redis-1180 (refreshed_at = NaN: `hosts` died in datetime)
    document, publish = catalogue_of_ams
    (document if field == "refreshed_at" else document["images"][0])[field] = value
    publish(document)
    for command in (["hosts", "--json"], ["images", "--json"]):
        done = blocksketch(command, tmp_path, world)
        assert_refused(done, None, "impossible time")


# -- HTTP bodies (last: the service fixture flushes Redis) ---------------------------------------------------

from tests.test_server import service  # noqa: E402, F401 - the real `blocksketch serve` fixture


@pytest.mark.parametrize("path", ["/v1/rank", "/v1/manifest"])
@pytest.mark.parametrize("nesting", ["lists", "maps"])
def test_a_deeply_nested_json_body_is_a_400(request, path, nesting):
    # target http, cases http-142 (nested lists) and http-123 (nested maps)
    client = request.getfixturevalue("service")
    body = "[" * 100000 + "]" * 100000 if nesting == "lists" else '{"a":' * 100000 + "1" + "}" * 100000
    response = client.post(path, content=body.encode(), headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert "error" in response.json()
