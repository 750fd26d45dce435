"""sketch/apply.py against a real Redis index: exact images or a clear error, never a wrong output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sketch.apply import MissingBlocks, apply_manifest, partial_path, resolve_local_images
from sketch.bundle import FRAME_BYTES, pack_bundle
from sketch.errors import ForceNeeded, FormatError, NotFound, UsageError, VerificationError
from sketch.manifest import LOCAL, MAX_GROUP_BYTES, LocalImage, Manifest
from sketch.manifest_build import build_manifest
from sketch.ranges import ranges_mask, read_ranges_file
from sketch.sample import random_blocks, write_image
from store import open_store, refresh_host
from tests.test_manifest import COLLISION_A, COLLISION_B, block_kinds, fleet

HOST = "dst"


@pytest.fixture
def store(redis_url):
    opened = open_store(redis_url)
    yield opened
    opened.close()


def index_and_build(store, images: dict, block_size: int, host: str = HOST) -> Manifest:
    refresh_host(store, host, images["host"], block_size)
    targets = [(LocalImage.from_info(info), block_map) for info, block_map in store.host_block_maps(host)]
    return build_manifest(images["source"], host, targets, block_size)


def rebuild(store, manifest: Manifest, bundles: list[str], output: Path, **options):
    paths = resolve_local_images(manifest, options.pop("host", HOST), store.image)
    return apply_manifest(manifest, [str(b) for b in bundles], str(output), paths, **options)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if "blocksketch-partial" in p.name or ".tmp-" in p.name)


@pytest.fixture
def transfer(tmp_path, store):
    images = fleet(tmp_path, 512, host_dir="dst")
    manifest = index_and_build(store, images, 512)
    bundle = tmp_path / "b.bundle"
    pack_bundle(images["source"], manifest, str(bundle))
    return images, manifest, bundle


@pytest.mark.parametrize("block_size", [512, 4096])
def test_round_trip_is_byte_identical_and_sparse(tmp_path, store, block_size):
    images = fleet(tmp_path, block_size)
    manifest = index_and_build(store, images, block_size)
    counts = manifest.block_counts()
    assert counts["local"] and counts["send"] and counts["dup"] and counts["zero"]
    pack_bundle(images["source"], manifest, str(tmp_path / "b"))
    out = tmp_path / "out.img"
    result = rebuild(store, manifest, [tmp_path / "b"], out)
    assert subprocess.run(["cmp", images["source"], str(out)]).returncode == 0
    assert result.blocks == {"bundle": counts["send"], "local": counts["local"], "dup": counts["dup"]}
    assert out.stat().st_blocks * 512 < out.stat().st_size - counts["zero"] * block_size // 2  # zeros are holes
    assert leftovers(tmp_path) == []


def test_a_stale_local_block_is_refetched_not_written(tmp_path, store, transfer):
    images, manifest, bundle = transfer
    with open(images["host"][0], "r+b") as handle:  # changed after indexing: the index still says old bytes
        handle.seek(60 * 512 + 100)
        handle.write(b"stale!")
    out = tmp_path / "out.img"
    with pytest.raises(MissingBlocks) as caught:
        rebuild(store, manifest, [bundle], out)
    assert not out.exists() and leftovers(tmp_path) == []
    ranges_file = Path(caught.value.ranges_file)
    assert ranges_file == tmp_path / "out.img.missing-ranges.json"
    assert str(ranges_file) in str(caught.value)
    start, count = read_ranges_file(str(ranges_file), manifest.manifest_id, manifest.total_blocks)
    # The verification group holding source block 20 (host0 block 60), and nothing outside LOCAL runs.
    asked = ranges_mask(manifest.total_blocks, start, count)
    assert asked[20] and (block_kinds(manifest)[asked] == LOCAL).all()
    assert int(count.sum()) * 512 < 2 * MAX_GROUP_BYTES
    pack_bundle(images["source"], manifest, str(tmp_path / "extra"), (start, count))
    rebuild(store, manifest, [bundle, tmp_path / "extra"], out)
    assert out.read_bytes() == Path(images["source"]).read_bytes()
    assert not ranges_file.exists()  # the failure's list is obsolete once the image is there


def test_an_md5_colliding_local_block_never_reaches_the_output(tmp_path, store):
    block_size = 512
    suffix = bytes(range(256)) * 2
    suffix = suffix[: block_size - 128]
    rng = np.random.default_rng(2)
    shared = random_blocks(rng, 8, block_size).tobytes()
    source = COLLISION_A + suffix + shared + bytes(block_size)
    host = shared + COLLISION_B + suffix
    (tmp_path / "s.img").write_bytes(source)
    (tmp_path / "h.img").write_bytes(host)
    images = {"source": str(tmp_path / "s.img"), "host": [str(tmp_path / "h.img")]}
    manifest = index_and_build(store, images, block_size)
    assert manifest.block_counts() == {"zero": 1, "local": 9, "send": 0, "dup": 0}  # MD5 says all local
    pack_bundle(images["source"], manifest, str(tmp_path / "b"))
    out = tmp_path / "out.img"
    with pytest.raises(MissingBlocks) as caught:
        rebuild(store, manifest, [tmp_path / "b"], out)
    assert not out.exists()
    # Block 0 fails, and with it its verification group: here all nine LOCAL blocks.
    assert caught.value.start.tolist() == [0] and caught.value.count.tolist() == [9]
    pack_bundle(images["source"], manifest, str(tmp_path / "x"), (caught.value.start, caught.value.count))
    rebuild(store, manifest, [tmp_path / "b", tmp_path / "x"], out)
    assert out.read_bytes() == source


def test_an_extra_bundle_covering_part_of_a_run_takes_precedence(tmp_path, store, transfer):
    images, manifest, bundle = transfer
    start, length = manifest.runs_of(LOCAL)
    first = int(start[0])
    pack_bundle(images["source"], manifest, str(tmp_path / "x"), (np.array([first + 3]), np.array([4])))
    out = tmp_path / "out.img"
    rebuild(store, manifest, [bundle, tmp_path / "x"], out)
    assert out.read_bytes() == Path(images["source"]).read_bytes()


def test_an_image_the_host_no_longer_indexes_is_refused(tmp_path, store, transfer):
    images, manifest, bundle = transfer
    os.rename(images["host"][0], tmp_path / "dst" / ".host0.img.moved")  # hidden: not an image any more
    refresh_host(store, HOST, [str(tmp_path / "dst")], 512)  # so host0 leaves the index
    with pytest.raises(NotFound, match="host0.img is not in the index of host dst"):
        rebuild(store, manifest, [bundle], tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists() and leftovers(tmp_path) == []


def test_an_image_reindexed_since_the_manifest_is_refused(tmp_path, store, transfer):
    images, manifest, bundle = transfer
    with open(images["host"][0], "ab") as handle:
        handle.write(b"x" * 512)
    refresh_host(store, HOST, images["host"], 512)
    with pytest.raises(VerificationError, match="re-indexed or replaced"):
        rebuild(store, manifest, [bundle], tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists()


def test_a_manifest_for_another_host_is_refused(tmp_path, store, transfer):
    _, manifest, bundle = transfer
    with pytest.raises(UsageError, match="built for host 'dst', not 'other'"):
        rebuild(store, manifest, [bundle], tmp_path / "out.img", host="other")


def test_a_manifest_naming_a_path_the_host_does_not_index_is_refused(tmp_path, store, transfer):
    """A manifest cannot make apply read an arbitrary file: only the host's index entries count."""
    images, manifest, bundle = transfer
    (tmp_path / "secret").write_bytes(Path(images["host"][0]).read_bytes())
    info = os.stat(tmp_path / "secret")
    manifest.images[0] = LocalImage(HOST, str(tmp_path / "secret"), manifest.images[0].image_id, info.st_size,
                                    info.st_mtime_ns)
    forged = Manifest.from_bytes(manifest.to_bytes())
    with pytest.raises(NotFound, match="secret is not in the index"):
        rebuild(store, forged, [bundle], tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists()


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_a_damaged_bundle_leaves_no_output(tmp_path, store, transfer, where):
    _, manifest, bundle = transfer
    data = bytearray(bundle.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    bundle.write_bytes(bytes(data))
    with pytest.raises(FormatError):
        rebuild(store, manifest, [bundle], tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists() and leftovers(tmp_path) == []


def test_a_truncated_bundle_leaves_no_output(tmp_path, store, transfer):
    _, manifest, bundle = transfer
    bundle.write_bytes(bundle.read_bytes()[:-100])
    with pytest.raises(FormatError, match="truncated"):
        rebuild(store, manifest, [bundle], tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists() and leftovers(tmp_path) == []


def test_bundles_without_the_send_blocks_are_refused(tmp_path, store, transfer):
    images, manifest, _ = transfer
    pack_bundle(images["source"], manifest, str(tmp_path / "x"), (np.array([0]), np.array([3])))
    with pytest.raises(UsageError, match="lack"):
        rebuild(store, manifest, [tmp_path / "x"], tmp_path / "out.img")


def test_an_existing_output_needs_force(tmp_path, store, transfer):
    images, manifest, bundle = transfer
    out = tmp_path / "out.img"
    out.write_bytes(b"precious")
    with pytest.raises(ForceNeeded, match="exists"):  # the CLI adds how to overwrite it
        rebuild(store, manifest, [bundle], out)
    assert out.read_bytes() == b"precious"
    rebuild(store, manifest, [bundle], out, force=True)
    assert out.read_bytes() == Path(images["source"]).read_bytes()


@pytest.mark.tools("qemu-img")
def test_qcow2_output_holds_the_same_image(tmp_path, store, transfer):
    images, manifest, bundle = transfer
    out = tmp_path / "out.qcow2"
    rebuild(store, manifest, [bundle], out, output_format="qcow2")
    assert out.read_bytes()[:4] == b"QFI\xfb"
    # The qcow2 keeps the source's size rounded up to its 512-byte sectors.
    compared = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", images["source"], str(out)],
                              capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert leftovers(tmp_path) == []


def test_kill_9_during_apply_leaves_no_output_and_the_next_run_cleans_up(tmp_path, store, redis_url):
    """apply reads the bundle from a FIFO; killed mid-bundle, it must leave only its named temp file."""
    block_size = 4096
    rng = np.random.default_rng(9)
    write_image(str(tmp_path / "s.img"), random_blocks(rng, FRAME_BYTES // block_size * 2, block_size))
    write_image(str(tmp_path / "h.img"), random_blocks(rng, 8, block_size))
    images = {"source": str(tmp_path / "s.img"), "host": [str(tmp_path / "h.img")]}
    manifest = index_and_build(store, images, block_size)
    manifest.save(str(tmp_path / "m"))
    pack_bundle(images["source"], manifest, str(tmp_path / "b"))
    data = (tmp_path / "b").read_bytes()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    out = tmp_path / "out.img"
    env = {**os.environ, "BLOCKSKETCH_REDIS_URL": redis_url, "BLOCKSKETCH_HOST": HOST}
    apply = subprocess.Popen([sys.executable, "-m", "cli", "apply", str(tmp_path / "m"), str(fifo), "-o", str(out)],
                             env=env, stderr=subprocess.PIPE)
    with open(fifo, "wb") as writer:
        writer.write(data[: len(data) // 2])
        writer.flush()
        deadline = time.monotonic() + 30
        partial = Path(partial_path(str(out), apply.pid))
        while not partial.exists() and time.monotonic() < deadline and apply.poll() is None:
            time.sleep(0.01)
        assert partial.exists(), apply.stderr.read() if apply.poll() is not None else "no partial file"
        apply.send_signal(signal.SIGKILL)
        apply.wait()
    apply.stderr.close()
    assert not out.exists()
    assert partial.name == f".out.img.blocksketch-partial-{apply.pid}"  # clearly named
    done = subprocess.run([sys.executable, "-m", "cli", "apply", str(tmp_path / "m"), str(tmp_path / "b"),
                           "-o", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == (tmp_path / "s.img").read_bytes()
    assert not partial.exists() and leftovers(tmp_path) == []


@pytest.mark.tools("qemu-img")
def test_a_qcow2_source_and_qcow2_local_images_round_trip(tmp_path, store):
    images = fleet(tmp_path, 512, host_dir="dst")
    for path in [images["source"], *images["host"]]:
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", path, path + ".qcow2"], check=True)
        os.unlink(path)
    qcow2 = {"source": images["source"] + ".qcow2", "host": [p + ".qcow2" for p in images["host"]]}
    manifest = index_and_build(store, qcow2, 512)
    assert manifest.block_counts()["local"] > 0
    pack_bundle(qcow2["source"], manifest, str(tmp_path / "b"))
    out = tmp_path / "out.img"
    rebuild(store, manifest, [tmp_path / "b"], out)
    compared = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(out), qcow2["source"]],
                              capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert out.stat().st_size == manifest.size_bytes


def test_a_manifest_of_sha256_days_is_still_verified_with_sha256(tmp_path, store):
    """Manifests written before BLAKE3 name SHA-256 for the groups and the image checksum, and store
    the group hashes under the key "sha256": apply reads and verifies them with SHA-256."""
    import hashlib

    import msgpack
    import zstandard

    from sketch.blocks import open_image
    from sketch.imagesum import image_checksum
    from sketch.manifest import _ENVELOPE, BODY_ZSTD_LEVEL, MAGIC, VERSION

    images = fleet(tmp_path, 512, host_dir="dst")
    manifest = index_and_build(store, images, 512)
    source = Path(images["source"]).read_bytes()
    start, length = manifest.runs_of(LOCAL)
    groups = np.repeat(np.arange(len(manifest.group_runs)), manifest.group_runs.astype(np.int64))
    pieces: dict[int, list[bytes]] = {}
    for s, n, g in zip(start.tolist(), length.tolist(), groups.tolist()):
        pieces.setdefault(g, []).append(source[s * 512 : (s + n) * 512])
    with open_image(images["source"]) as image:
        checksum = image_checksum(image, algorithm="sha256-tree-4m")
    body = manifest._body()
    body["checksum"] = {"algorithm": "sha256-tree-4m", "digest": checksum}
    body["group_hash"] = "sha256"
    local = body["local"]
    del local["hash"]
    local["sha256"] = b"".join(hashlib.sha256(b"".join(pieces[g])).digest() for g in sorted(pieces))
    packed = zstandard.ZstdCompressor(level=BODY_ZSTD_LEVEL).compress(msgpack.packb(body, use_bin_type=True))
    data = _ENVELOPE.pack(MAGIC, VERSION, 0, len(packed), hashlib.sha256(packed).digest()) + packed
    old = Manifest.from_bytes(data)
    assert (old.checksum_algorithm, old.group_hash_algorithm) == ("sha256-tree-4m", "sha256")
    old.save(str(tmp_path / "old.manifest"))
    pack_bundle(images["source"], old, str(tmp_path / "b"))
    out = tmp_path / "out.img"
    rebuild(store, old, [tmp_path / "b"], out)
    assert out.read_bytes() == source
