"""sketch/manifest.py and sketch/manifest_build.py: classification, runs, the byte format and its damage."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import blake3
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sketch.blockmap import BlockMap
from sketch.digests import digest_image
from sketch.errors import FormatError
from sketch.manifest import DUP, ENVELOPE_SIZE, KIND_NAMES, LOCAL, SEND, ZERO, LocalImage, Manifest
from sketch.manifest_build import MAX_LOCAL_RUN_BYTES, build_manifest, find_keys, plan_groups
from sketch.sample import random_blocks, write_image

DATA = Path(__file__).parent / "data"
COLLISION_A = (DATA / "md5-collision-a.bin").read_bytes()
COLLISION_B = (DATA / "md5-collision-b.bin").read_bytes()


# -- helpers shared by the transfer tests (test_bundle, test_apply, test_migrate_cli import them) --------

def identity(path: str, host: str = "dst") -> LocalImage:
    """An index-like identity of a file, for library tests that run without Redis."""
    info = os.stat(path)
    return LocalImage(host, path, f"id-{os.path.basename(path)}", info.st_size, info.st_mtime_ns)


def targets_of(paths: list[str], block_size: int, host: str = "dst") -> list[tuple[LocalImage, BlockMap]]:
    return [(identity(p, host), BlockMap.from_digests(digest_image(p, block_size))) for p in paths]


def fleet(directory: Path, block_size: int, blocks: int = 600, seed: int = 7, host_dir: str = "") -> dict:
    """A source image and two destination images with known overlaps, zeros, repeats and a partial tail.

    Source blocks (in order of regions): a run copied from host image 0 (shifted), scattered blocks
    from host image 1, fresh blocks, repeats of fresh blocks, zeros, a compressible region. The
    destination's images go to the subdirectory ``host_dir``.
    """
    rng = np.random.default_rng(seed)
    pool = random_blocks(rng, blocks, block_size)
    host0 = np.zeros((blocks, block_size), np.uint8)
    host0[50 : 50 + blocks // 4] = pool[: blocks // 4]
    host1 = np.zeros((blocks, block_size), np.uint8)
    host1[::3] = pool[blocks // 4 : blocks // 4 + len(host1[::3])]
    source = np.zeros((blocks, block_size), np.uint8)
    q = blocks // 8
    source[10 : 10 + 2 * q] = pool[: 2 * q]  # from host 0, shifted by 40 blocks
    source[2 * q + 20 : 3 * q + 20] = pool[blocks // 4 : blocks // 4 + q][::-1]  # from host 1, reversed
    fresh = random_blocks(rng, q, block_size)
    source[4 * q : 5 * q] = fresh
    source[5 * q : 5 * q + q // 2] = fresh[: q // 2]  # repeats: DUP
    source[6 * q + 5] = fresh[3]
    text = np.frombuffer((b"blocksketch compressible text " * (block_size * q // 30 + 1))[: block_size * q],
                         np.uint8).reshape(q, block_size)
    source[7 * q : 8 * q] = text  # compressible, repeated lines: SEND blocks zstd can shrink
    (directory / host_dir).mkdir(exist_ok=True)
    paths = {"source": directory / "source.img",
             "host": [directory / host_dir / "host0.img", directory / host_dir / "host1.img"]}
    write_image(str(paths["source"]), source)
    with open(paths["source"], "ab") as handle:
        handle.write(b"partial tail block")  # size not a multiple of the block size
    write_image(str(paths["host"][0]), host0)
    write_image(str(paths["host"][1]), host1)
    return {"source": str(paths["source"]), "host": [str(p) for p in paths["host"]]}


def reference_kinds(source: bytes, hosts: list[bytes], block_size: int) -> list[int]:
    """Plain Python: ZERO, LOCAL (content in a host image), SEND (first time seen), DUP (seen before)."""
    def blocks(data):
        out = [data[i : i + block_size] for i in range(0, len(data), block_size)]
        return [b + bytes(block_size - len(b)) for b in out]

    host_contents = {b for data in hosts for b in blocks(data)}
    seen = set()
    kinds = []
    for block in blocks(source):
        if block == bytes(block_size):
            kinds.append(ZERO)
        elif block in host_contents:
            kinds.append(LOCAL)
        elif block in seen:
            kinds.append(DUP)
        else:
            seen.add(block)
            kinds.append(SEND)
    return kinds


def block_kinds(manifest: Manifest) -> np.ndarray:
    return np.repeat(manifest.run_kind, manifest.run_length.astype(np.int64))


# -- classification -------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [512, 4096])
def test_counts_add_up_and_match_the_reference(tmp_path, block_size):
    images = fleet(tmp_path, block_size)
    manifest = build_manifest(images["source"], "dst", targets_of(images["host"], block_size), block_size)
    source = Path(images["source"]).read_bytes()
    hosts = [Path(p).read_bytes() for p in images["host"]]
    expected = reference_kinds(source, hosts, block_size)
    assert block_kinds(manifest).tolist() == expected
    counts = manifest.block_counts()
    assert sum(counts.values()) == manifest.total_blocks == -(-len(source) // block_size)
    assert sum(manifest.byte_counts().values()) == len(source)
    assert all(counts[k] > 0 for k in KIND_NAMES)


def test_local_and_dup_runs_point_at_equal_bytes(tmp_path):
    block_size = 512
    images = fleet(tmp_path, block_size)
    manifest = build_manifest(images["source"], "dst", targets_of(images["host"], block_size), block_size)
    source = Path(images["source"]).read_bytes()
    start, length = manifest.runs_of(LOCAL)
    group_bytes: dict[int, list[bytes]] = {}
    for s, n, image, block, group in zip(start.tolist(), length.tolist(), manifest.local_image.tolist(),
                                         manifest.local_block.tolist(), manifest.local_group.tolist()):
        local = Path(manifest.images[image].path).read_bytes()[block * block_size : (block + n) * block_size]
        ours = source[s * block_size : (s + n) * block_size]
        assert local == ours
        group_bytes.setdefault(group, []).append(ours)
    assert sorted(group_bytes) == list(range(len(manifest.group_runs)))
    for group, pieces in group_bytes.items():
        assert blake3.blake3(b"".join(pieces)).digest() == manifest.group_hash[group].tobytes()
    kinds = block_kinds(manifest)
    start, length = manifest.runs_of(DUP)
    for s, n, origin in zip(start.tolist(), length.tolist(), manifest.dup_origin.tolist()):
        assert origin < s
        assert (kinds[origin : origin + n] == SEND).all()
        assert source[s * block_size : (s + n) * block_size] == source[origin * block_size : (origin + n) * block_size]


def test_a_shifted_copy_of_a_local_region_is_one_run(tmp_path):
    block_size = 512
    images = fleet(tmp_path, block_size, blocks=800)
    manifest = build_manifest(images["source"], "dst", targets_of(images["host"], block_size), block_size)
    start, length = manifest.runs_of(LOCAL)
    q = 800 // 8
    first = int(np.flatnonzero(start == 10)[0])
    assert int(length[first]) == 2 * q  # 200 blocks from host0, one run
    assert manifest.images[int(manifest.local_image[first])].path.endswith("host0.img")
    assert int(manifest.local_block[first]) == 50


def test_local_runs_are_cut_to_bound_what_a_stale_block_costs(tmp_path):
    block_size = 512
    per_run = MAX_LOCAL_RUN_BYTES // block_size
    rng = np.random.default_rng(3)
    data = random_blocks(rng, per_run * 2 + 10, block_size)
    write_image(str(tmp_path / "host.img"), data)
    write_image(str(tmp_path / "source.img"), data)
    manifest = build_manifest(str(tmp_path / "source.img"), "dst", targets_of([str(tmp_path / "host.img")],
                                                                               block_size), block_size)
    _, length = manifest.runs_of(LOCAL)
    assert length.tolist() == [per_run, per_run, 10]
    assert manifest.group_runs.tolist() == [1, 1, 1]


@pytest.mark.parametrize("lengths, runs", [
    ([1], [1]),
    ([3, 3, 3, 3, 3], [4, 1]),  # windows of 10 blocks: runs starting at 0, 3, 6, 9 | 12
    ([10, 10, 1], [1, 1, 1]),
    ([5, 9, 10, 2, 2], [2, 1, 2]),  # starts 0, 5 | 14 | 24, 26
    ([], []),
])
def test_verification_groups_cut_the_local_stream_into_windows(lengths, runs):
    assert plan_groups(np.array(lengths, dtype=np.int64), 10).tolist() == runs


def test_an_md5_collision_inside_the_source_is_sent_not_copied(tmp_path):
    block_size = 512
    suffix = bytes(range(256)) + bytes(block_size - 128 - 256)
    a, b = COLLISION_A + suffix, COLLISION_B + suffix
    assert hashlib.md5(a).digest() == hashlib.md5(b).digest() and a != b
    (tmp_path / "source.img").write_bytes(a + bytes(block_size) + b + a)
    (tmp_path / "host.img").write_bytes(bytes(block_size))
    manifest = build_manifest(str(tmp_path / "source.img"), "dst", targets_of([str(tmp_path / "host.img")],
                                                                               block_size), block_size)
    assert block_kinds(manifest).tolist() == [SEND, ZERO, SEND, DUP]
    assert manifest.dup_origin.tolist() == [0]


def test_a_host_without_images_gets_everything_sent(tmp_path):
    images = fleet(tmp_path, 512)
    manifest = build_manifest(images["source"], "dst", [], 512)
    counts = manifest.block_counts()
    assert counts["local"] == 0 and manifest.images == []
    assert counts["send"] + counts["dup"] + counts["zero"] == manifest.total_blocks


def test_find_keys_returns_rows_and_minus_one():
    keys = np.array([[1, 5], [1, 9], [2, 0], [7, 7]], dtype=np.uint64)
    queries = np.array([[1, 9], [1, 6], [7, 7], [0, 0], [9, 9]], dtype=np.uint64)
    assert find_keys(keys, queries).tolist() == [1, -1, 3, -1, -1]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(source=st.lists(st.integers(0, 12), min_size=1, max_size=40),
       host_a=st.lists(st.integers(0, 12), min_size=1, max_size=20),
       host_b=st.lists(st.integers(0, 12), max_size=20),
       tail=st.integers(0, 511))
def test_counts_equal_a_plain_reference_on_random_images(tmp_path_factory, source, host_a, host_b, tail):
    """Images drawn from 12 block contents (0 = zeros): repeats, sharing and partial tails everywhere."""
    block_size = 512
    directory = tmp_path_factory.mktemp("prop")
    palette = [bytes(block_size)] + [bytes([v]) * block_size for v in range(1, 13)]

    def image(name, ids, cut=0):
        data = b"".join(palette[i] for i in ids)
        data = data[: len(data) - cut] if cut < len(data) else data
        (directory / name).write_bytes(data)
        return str(directory / name), data

    source_path, source_data = image("s", source, tail)
    hosts = [image("a", host_a)] + ([image("b", host_b)] if host_b else [])
    manifest = build_manifest(source_path, "dst", targets_of([p for p, _ in hosts], block_size), block_size)
    expected = reference_kinds(source_data, [d for _, d in hosts], block_size)
    assert block_kinds(manifest).tolist() == expected
    roundtrip = Manifest.from_bytes(manifest.to_bytes())
    assert block_kinds(roundtrip).tolist() == expected


# -- the byte format ------------------------------------------------------------------------------------

@pytest.fixture
def built(tmp_path) -> tuple[Manifest, bytes]:
    images = fleet(tmp_path, 512)
    manifest = build_manifest(images["source"], "dst", targets_of(images["host"], 512), 512)
    return manifest, manifest.to_bytes()


def test_round_trip_keeps_every_field(built):
    manifest, data = built
    again = Manifest.from_bytes(data)
    for name in ("size_bytes", "block_size", "algorithm", "host", "checksum", "images", "source_path"):
        assert getattr(again, name) == getattr(manifest, name)
    for name in ("run_kind", "run_length", "local_image", "local_block", "group_runs", "group_hash", "dup_origin"):
        assert np.array_equal(getattr(again, name), getattr(manifest, name))
    assert again.manifest_id == manifest.manifest_id == hashlib.sha256(data[ENVELOPE_SIZE:]).digest()


def test_save_is_atomic_and_load_reads_it(built, tmp_path):
    manifest, data = built
    path = tmp_path / "m.manifest"
    assert manifest.save(str(path)) == len(data)
    assert Manifest.load(str(path)).manifest_id == manifest.manifest_id
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.manifest")] == []


@pytest.mark.parametrize("where", [0, 7, 8, 9, 10, 11, 12, 19, 20, 51, ENVELOPE_SIZE, ENVELOPE_SIZE + 100, -200, -1])
def test_a_flipped_bit_is_a_format_error(built, where):
    _, data = built
    damaged = bytearray(data)
    damaged[where] ^= 0x10
    with pytest.raises(FormatError):
        Manifest.from_bytes(bytes(damaged))


@pytest.mark.parametrize("keep", [0, 5, ENVELOPE_SIZE - 1, ENVELOPE_SIZE, ENVELOPE_SIZE + 1, 0.5, -1])
def test_a_truncated_manifest_is_a_format_error(built, keep):
    _, data = built
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    with pytest.raises(FormatError, match="truncated|not a blocksketch"):
        Manifest.from_bytes(data[:cut])


def test_appended_bytes_and_unknown_versions_are_format_errors(built):
    _, data = built
    with pytest.raises(FormatError, match="stray"):
        Manifest.from_bytes(data + b"x")
    newer = bytearray(data)
    newer[8] = 9
    with pytest.raises(FormatError, match="unknown version 9"):
        Manifest.from_bytes(bytes(newer))
    with pytest.raises(FormatError, match="not a blocksketch manifest"):
        Manifest.from_bytes(b"BSKBUNDL" + data[8:])


def test_a_consistent_but_lying_manifest_is_rejected(built):
    """Checksums only catch accidents: a re-sealed manifest must still describe a sane image."""
    manifest, _ = built
    manifest.dup_origin = manifest.dup_origin.copy()
    manifest.dup_origin[0] = manifest.run_start[manifest.run_kind == DUP][0]  # copies itself
    manifest._id = None
    with pytest.raises(FormatError, match="duplicate run"):
        Manifest.from_bytes(manifest.to_bytes())


def test_the_manifest_is_small_next_to_the_data_it_describes(built):
    manifest, data = built
    assert len(data) < manifest.size_bytes / 10
