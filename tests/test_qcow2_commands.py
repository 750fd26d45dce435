"""Every command that reads an image, run on qcow2 images: the same answers as on their raw conversions.

The images are built with the real qemu-img (plain and compressed qcow2 of a fleet with known
overlaps), and every result is checked against the same command on ``qemu-img convert -O raw`` of
the same images: equal JSON numbers, and rebuilt images byte-identical to the raw conversion. The
commands run as real processes (``python -m cli``) against a real Redis.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import msgpack
import numpy as np
import pytest

from sketch.errors import FormatError
from sketch.manifest import LocalImage
from sketch.manifest_build import build_manifest
from store import catalogue, keys, open_store, refresh_host
from tests.test_manifest import fleet

pytestmark = pytest.mark.tools("qemu-img")
BLOCK_SIZE = 512
BLOCKS = 4096  # 2 MiB images
VARIANTS = {"plain": [], "compressed": ["-c"]}


@dataclass(frozen=True)
class Images:
    """A source image and a destination directory of two images, all of one format."""

    source: str
    dst: str
    host: list[str]


@dataclass(frozen=True)
class Fleet:
    variant: str
    qcow2: Images
    raw: Images  # qemu-img convert -O raw of each qcow2 image


def qemu_img(*args: str) -> None:
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    assert done.returncode == 0, f"qemu-img {' '.join(args)} failed: {done.stderr}"


def make_fleet(base: Path, variant: str) -> Fleet:
    (base / "orig").mkdir(parents=True)
    made = fleet(base / "orig", BLOCK_SIZE, blocks=BLOCKS, host_dir="dst")
    converted: dict[str, list[str]] = {"qcow2": [], "raw": []}
    for original in [made["source"], *made["host"]]:
        relative = os.path.relpath(original, base / "orig")
        qcow2 = base / "qcow2" / (relative + ".qcow2")
        raw = base / "raw" / relative
        qcow2.parent.mkdir(parents=True, exist_ok=True)
        raw.parent.mkdir(parents=True, exist_ok=True)
        qemu_img("convert", "-f", "raw", "-O", "qcow2", *VARIANTS[variant], original, str(qcow2))
        qemu_img("convert", "-f", "qcow2", "-O", "raw", str(qcow2), str(raw))
        converted["qcow2"].append(str(qcow2))
        converted["raw"].append(str(raw))
    shutil.rmtree(base / "orig")  # only qcow2 images and their conversions remain to be confused
    return Fleet(variant, *(Images(paths[0], os.path.dirname(paths[1]), paths[1:]) for paths in converted.values()))


@pytest.fixture(scope="module", params=list(VARIANTS))
def images(request, tmp_path_factory) -> Fleet:
    return make_fleet(tmp_path_factory.mktemp(f"qcow2-{request.param}"), request.param)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Fleet:
    return make_fleet(tmp_path_factory.mktemp("qcow2-plain-only"), "plain")


def cli(*args: str, redis_url: str | None = None, code: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if redis_url:
        env["BLOCKSKETCH_REDIS_URL"] = redis_url
    done = subprocess.run([sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == code, f"{' '.join(args)}: exit {done.returncode}: {done.stderr}"
    return done


def cli_json(*args: str, redis_url: str | None = None):
    return json.loads(cli(*args, "--json", redis_url=redis_url).stdout)


def without(value, *names: str):
    """``value`` with the keys ``names`` removed from every dict inside it (paths, timings, file sizes)."""
    if isinstance(value, dict):
        return {k: without(v, *names) for k, v in value.items() if k not in names}
    if isinstance(value, list):
        return [without(v, *names) for v in value]
    return value


def container_blocks(path: str) -> int:
    return -(-os.path.getsize(path) // BLOCK_SIZE)


def index(redis_url: str, host: str, *args: str) -> dict:
    return cli_json("index", *args, "--host", host, "--block-size", str(BLOCK_SIZE), redis_url=redis_url)


# -- compare -------------------------------------------------------------------------------------


def test_compare_reads_qcow2_like_its_raw_conversion(images):
    q, r = images.qcow2, images.raw
    lines = [json.loads(line) for source in (q.source, r.source)
             for line in cli("compare", source, q.dst, r.dst, "--json").stdout.splitlines()]
    assert len(lines) == 4
    results = [without(line, "source", "target") for line in lines]
    assert all(result == results[0] for result in results), results
    assert results[0]["shared_blocks"] > 0 and results[0]["send_blocks"] > 0
    assert results[0]["total_blocks"] == -(-os.path.getsize(r.source) // BLOCK_SIZE)


def test_compare_format_raw_reads_the_qcow2_container_bytes(images):
    q, r = images.qcow2, images.raw
    detected = cli_json("compare", q.source, r.source)
    as_raw = cli_json("compare", "--format", "raw", q.source, r.source)
    assert detected["shared_ratio"] == 1.0
    assert as_raw["total_blocks"] == container_blocks(q.source) != detected["total_blocks"]
    assert as_raw["shared_ratio"] < 1.0


# -- index, images -------------------------------------------------------------------------------


def test_index_and_images_of_qcow2_equal_those_of_the_raw_conversions(images, redis_url):
    q, r = images.qcow2, images.raw
    assert sorted(index(redis_url, "q", q.dst)["indexed"]) == sorted(map(os.path.realpath, q.host))
    index(redis_url, "r", r.dst)
    rows = cli_json("images", redis_url=redis_url)
    by_host = {host: sorted((row for row in rows if row["host"] == host), key=lambda row: row["path"])
               for host in ("q", "r")}
    assert [row["format"] for row in rows] == ["qcow2", "qcow2", "raw", "raw"]
    for q_row, r_row, q_path, r_path in zip(by_host["q"], by_host["r"], q.host, r.host):
        assert q_row["size_bytes"] == os.path.getsize(q_path) and r_row["size_bytes"] == os.path.getsize(r_path)
        fields = ("total_blocks", "zero_blocks", "unique_blocks", "distinct_nonzero")
        assert [q_row[f] for f in fields] == [r_row[f] for f in fields]
    hosts = {row["host"]: row for row in cli_json("hosts", redis_url=redis_url)}
    assert hosts["q"]["distinct_blocks"] == hosts["r"]["distinct_blocks"] > 0
    with open_store(redis_url) as store:
        for q_path, r_path in zip(q.host, r.host):
            a, b = store.block_map("q", os.path.realpath(q_path)), store.block_map("r", os.path.realpath(r_path))
            assert np.array_equal(a.keys, b.keys) and np.array_equal(a.counts, b.counts)
            assert np.array_equal(a.first, b.first) and a.zero_blocks == b.zero_blocks
    table = cli("images", "--host", "q", redis_url=redis_url).stdout.splitlines()
    assert table[0].split()[-1] == "format" and all(line.split()[-1] == "qcow2" for line in table[1:])


def test_index_format_raw_then_detected_reads_the_images_again(images, redis_url):
    q, r = images.qcow2, images.raw
    first = index(redis_url, "q", q.dst, "--format", "raw")
    assert len(first["indexed"]) == 2
    rows = cli_json("images", redis_url=redis_url)
    assert [row["format"] for row in rows] == ["raw", "raw"]
    assert sorted(row["total_blocks"] for row in rows) == sorted(container_blocks(p) for p in q.host)
    assert index(redis_url, "q", q.dst, "--format", "raw")["reused"] == 2  # same format: not read again
    again = index(redis_url, "q", q.dst)  # detected as qcow2 now: the recorded raw entries are stale
    assert len(again["indexed"]) == 2 and again["reused"] == 0
    rows = cli_json("images", redis_url=redis_url)
    assert [row["format"] for row in rows] == ["qcow2", "qcow2"]
    index(redis_url, "r", r.dst)
    raw_rows = [row for row in cli_json("images", redis_url=redis_url) if row["host"] == "r"]
    assert [row["total_blocks"] for row in rows] == [row["total_blocks"] for row in raw_rows]
    assert index(redis_url, "q", q.dst)["reused"] == 2


# -- rank ----------------------------------------------------------------------------------------

RANK_VOLATILE = ("image", "seconds", "digests_per_second", "size_bytes", "path")


def test_rank_of_qcow2_equals_rank_of_the_raw_conversion(images, redis_url):
    q, r = images.qcow2, images.raw
    index(redis_url, "q", q.dst)
    index(redis_url, "r", r.dst)
    from_qcow2 = cli_json("rank", q.source, redis_url=redis_url)
    from_raw = cli_json("rank", r.source, redis_url=redis_url)
    assert without(from_qcow2, *RANK_VOLATILE) == without(from_raw, *RANK_VOLATILE)
    # The host holding qcow2 images and the one holding their raw conversions hold the same blocks.
    q_row, r_row = sorted(from_qcow2["hosts"], key=lambda row: row["host"])
    assert without(q_row, "host", "size_bytes", "estimate_rank", "exact_rank") == \
        without(r_row, "host", "size_bytes", "estimate_rank", "exact_rank")
    assert q_row["exact_shared_blocks"] > 0
    as_raw = cli_json("rank", "--format", "raw", q.source, redis_url=redis_url)
    assert as_raw["total_blocks"] == container_blocks(q.source) != from_qcow2["total_blocks"]


# -- manifest, pack, apply ------------------------------------------------------------------------


def transfer(images: Images, host: str, out: Path, redis_url: str, *apply_args: str) -> tuple[dict, dict, dict]:
    manifest, bundle = out.with_suffix(".manifest"), out.with_suffix(".bundle")
    summary = cli_json("manifest", images.source, "--to", host, "-o", str(manifest), redis_url=redis_url)
    packed = cli_json("pack", images.source, str(manifest), "-o", str(bundle), redis_url=redis_url)
    applied = cli_json("apply", str(manifest), str(bundle), "-o", str(out), "--host", host, *apply_args,
                       redis_url=redis_url)
    return summary, packed, applied


def test_manifest_pack_apply_from_a_qcow2_source_with_qcow2_local_images(images, redis_url, tmp_path):
    q, r = images.qcow2, images.raw
    index(redis_url, "dq", q.dst)
    index(redis_url, "dr", r.dst)
    q_summary, q_packed, q_applied = transfer(q, "dq", tmp_path / "from-qcow2.img", redis_url)
    r_summary, r_packed, r_applied = transfer(r, "dr", tmp_path / "from-raw.img", redis_url)
    expected = Path(r.source).read_bytes()
    assert (tmp_path / "from-qcow2.img").read_bytes() == expected
    assert (tmp_path / "from-raw.img").read_bytes() == expected
    assert q_summary["blocks"]["local"] > 0 and q_summary["blocks"]["send"] > 0
    for key in ("blocks", "bytes", "runs"):
        assert q_summary[key] == r_summary[key], key
    assert without(q_packed, "bundle") == without(r_packed, "bundle")
    assert without(q_applied, "output") == without(r_applied, "output")
    assert q_applied["blocks"]["local"] == q_summary["blocks"]["local"]


def test_apply_output_format_qcow2_converts_back_to_the_source_bytes(images, redis_url, tmp_path):
    q, r = images.qcow2, images.raw
    index(redis_url, "dq", q.dst)
    out = tmp_path / "out.qcow2"
    _, _, applied = transfer(q, "dq", out, redis_url, "--output-format", "qcow2")
    assert applied["status"] == "ok" and out.read_bytes()[:4] == b"QFI\xfb"
    back = tmp_path / "back.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(out), str(back))
    assert back.read_bytes() == Path(r.source).read_bytes()


def test_pack_with_another_format_than_the_manifest_is_refused(plain, redis_url, tmp_path):
    q = plain.qcow2
    index(redis_url, "dq", q.dst)
    cli("manifest", q.source, "--to", "dq", "-o", str(tmp_path / "m"), redis_url=redis_url)
    done = cli("pack", "--format", "raw", q.source, str(tmp_path / "m"), "-o", str(tmp_path / "b"), code=1)
    assert "--format" in done.stderr and "read as raw" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


# -- migrate -------------------------------------------------------------------------------------


def test_migrate_of_qcow2_equals_migrate_of_the_raw_conversion(images, redis_url, tmp_path):
    q, r = images.qcow2, images.raw
    index(redis_url, "dq", q.dst)
    index(redis_url, "dr", r.dst)
    from_qcow2 = cli_json("migrate", q.source, "--to", "dq", "-o", str(tmp_path / "q.img"), redis_url=redis_url)
    from_raw = cli_json("migrate", r.source, "--to", "dr", "-o", str(tmp_path / "r.img"), redis_url=redis_url)
    for key in ("size_bytes", "blocks", "bytes", "runs", "bundle_bytes", "extra_bundle_bytes"):
        assert from_qcow2[key] == from_raw[key], key
    assert from_qcow2["blocks"]["local"] > 0 and from_qcow2["extra_bundle_bytes"] == 0
    expected = Path(r.source).read_bytes()
    assert (tmp_path / "q.img").read_bytes() == expected == (tmp_path / "r.img").read_bytes()
    cli("migrate", q.source, "--to", "dq", "-o", str(tmp_path / "q.qcow2"), "--output-format", "qcow2",
        redis_url=redis_url)
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(tmp_path / "q.qcow2"), str(tmp_path / "back.raw"))
    assert (tmp_path / "back.raw").read_bytes() == expected


def test_local_images_indexed_as_raw_are_read_as_raw_by_apply(plain, redis_url, tmp_path):
    """qcow2 files indexed with --format raw hold their container bytes: apply must read them so too
    (read as qcow2 by their magic, their blocks would fail verification and be sent again)."""
    q = plain.qcow2
    index(redis_url, "dq", q.dst, "--format", "raw")
    report = cli_json("migrate", "--format", "raw", q.source, "--to", "dq", "-o", str(tmp_path / "out"),
                      redis_url=redis_url)
    assert report["blocks"]["local"] > 0 and report["extra_bundle_bytes"] == 0
    assert (tmp_path / "out").read_bytes() == Path(q.source).read_bytes()  # the container, byte for byte


# -- matrix --------------------------------------------------------------------------------------

MATRIX_VOLATILE = ("path", "name", "source", "target", "map_from")


def test_matrix_of_qcow2_equals_matrix_of_the_raw_conversions(images, redis_url):
    q, r = images.qcow2, images.raw
    from_qcow2 = cli_json("matrix", q.source, q.dst)
    from_raw = cli_json("matrix", r.source, r.dst)
    assert without(from_qcow2, *MATRIX_VOLATILE) == without(from_raw, *MATRIX_VOLATILE)
    assert from_qcow2["digest_passes"] == 3
    assert any(pair["shared_distinct_nonzero"] for pair in from_qcow2["pairs"])
    index(redis_url, "here", q.dst)
    reused = cli_json("matrix", "--use-index", "--host", "here", q.source, q.dst, redis_url=redis_url)
    assert [image["map_from"] for image in reused["images"]] == ["digest", "index", "index"]
    assert without(reused, *MATRIX_VOLATILE, "digest_passes") == without(from_qcow2, *MATRIX_VOLATILE,
                                                                          "digest_passes")
    # Asked to read them as raw, the index's qcow2 block maps do not fit: every image is digested.
    as_raw = cli_json("matrix", "--format", "raw", "--use-index", "--host", "here", q.source, q.dst,
                      redis_url=redis_url)
    assert [image["map_from"] for image in as_raw["images"]] == ["digest"] * 3
    assert [image["total_blocks"] for image in as_raw["images"]] == [container_blocks(p) for p in
                                                                     (q.source, *q.host)]


# -- --format qcow2 on a raw file -------------------------------------------------------------------


@pytest.fixture
def raw_setup(plain, redis_url, tmp_path) -> dict:
    """The raw fleet indexed as host ``dr``, and the manifest of its source (built in-process)."""
    r = plain.raw
    with open_store(redis_url) as store:
        refresh_host(store, "dr", [r.dst], BLOCK_SIZE)
        targets = [(LocalImage.from_info(info), block_map) for info, block_map in store.host_block_maps("dr")]
    manifest = build_manifest(r.source, "dr", targets, BLOCK_SIZE)
    manifest.save(str(tmp_path / "m"))
    return {"source": r.source, "dst": r.dst, "manifest": str(tmp_path / "m"), "out": str(tmp_path / "out")}


@pytest.mark.parametrize("command", [
    ["compare", "{source}", "{dst}"],
    ["index", "{dst}", "--host", "other"],
    ["rank", "{source}"],
    ["manifest", "{source}", "--to", "dr", "-o", "{out}"],
    ["pack", "{source}", "{manifest}", "-o", "{out}"],
    ["migrate", "{source}", "--to", "dr", "-o", "{out}"],
    ["matrix", "{source}", "{dst}"],
], ids=lambda command: command[0])
def test_format_qcow2_on_a_raw_file_is_a_one_line_error(raw_setup, redis_url, command):
    done = cli(*[part.format(**raw_setup) for part in command], "--format", "qcow2", redis_url=redis_url, code=1)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blocksketch: error: "), done.stderr
    assert "not a qcow2 image" in lines[0] and "Traceback" not in done.stderr
    assert not os.path.exists(raw_setup["out"])


@pytest.mark.parametrize("command", ["index", "rank", "manifest", "pack", "migrate", "matrix", "compare"])
def test_help_names_the_format_option(command):
    done = cli(command, "--help")
    assert "--format [raw|qcow2]" in done.stdout and "Example:" in done.stdout


# -- the recorded format in index entries -----------------------------------------------------------


def test_entries_without_a_recorded_format_are_read_as_their_magic_says(plain, redis_url):
    """An index written before entries recorded their format stays valid and is not re-read."""
    q = plain.qcow2
    with open_store(redis_url) as store:
        refresh_host(store, "q", [q.dst], BLOCK_SIZE)
        current = store.catalogue("q")
        assert [entry.image_format for entry in current.images] == ["qcow2", "qcow2"]
        old = replace(current, images=tuple(replace(entry, image_format=None) for entry in current.images))
        encoded = catalogue.encode(old)
        assert all("format" not in image for image in msgpack.unpackb(encoded)["images"])
        store.client.set(keys.catalogue("q"), encoded)
        assert [info.image_format for info in store.images("q")] == [None, None]
        assert refresh_host(store, "q", [q.dst], BLOCK_SIZE).reused == 2
        assert len(refresh_host(store, "q", [q.dst], BLOCK_SIZE, image_format="raw").indexed) == 2
        assert [info.image_format for info in store.images("q")] == ["raw", "raw"]

        document = msgpack.unpackb(store.client.get(keys.catalogue("q")))
        document["images"][0]["format"] = 7
        store.client.set(keys.catalogue("q"), msgpack.packb(document))
        with pytest.raises(FormatError, match="'format'"):
            store.catalogue("q")
