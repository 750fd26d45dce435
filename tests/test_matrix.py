"""sketch/matrix.py, sketch/heatmap.py and `blocksketch matrix`: exact pairs, n digest passes, heat maps, errors."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from sketch.blockmap import BlockMap
from sketch.digests import digest_image
from sketch.errors import UsageError
from sketch.heatmap import color, html_page, render_html, render_png, shorten, text_color
from sketch.matrix import ShareMatrix, build_matrix, pair_share, short_names
from sketch.sample import mixed_image, random_blocks, write_image

COMPARE_KEYS = ["source", "target", "block_size", "total_blocks", "zero_blocks", "unique_blocks", "shared_blocks",
                "shared_unique_blocks", "shared_ratio", "shared_unique_ratio", "send_blocks"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def fleet(tmp_path) -> list[str]:
    """Three small sparse images sharing 80%, 40% and 10% of a common pool, with zeros and repeats."""
    rng = np.random.default_rng(7)
    pool = random_blocks(rng, 600, 512)
    paths = []
    for name, share in (("alpha.img", 0.8), ("beta.img", 0.4), ("gamma.img", 0.1)):
        path = str(tmp_path / "images" / name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_image(path, mixed_image(rng, pool, share, 1024))
        paths.append(path)
    return paths


def write_blocks(path: str, letters: str, block_size: int = 512) -> str:
    """An image whose blocks are named by letters: ``Z`` is all zeros, any other letter a fixed random block."""
    rows = [np.zeros(block_size, np.uint8) if letter == "Z" else
            random_blocks(np.random.default_rng(ord(letter)), 1, block_size)[0] for letter in letters]
    write_image(path, np.stack(rows))
    return path


def block_map(path: str, block_size: int = 512) -> BlockMap:
    return BlockMap.from_digests(digest_image(path, block_size))


def test_pair_share_counts_zero_blocks_apart_from_the_non_zero_shares(tmp_path):
    # The paper's Table 1 shape, with its "0" as the all-zero block: source Z A B A Z C C C D E, target A B D C Z.
    source = block_map(write_blocks(str(tmp_path / "s.img"), "ZABAZCCCDE"))
    target = block_map(write_blocks(str(tmp_path / "t.img"), "ABDCZ"))
    pair = pair_share(source, target, "s", "t")
    assert (pair.metrics.shared_blocks, pair.metrics.shared_unique_blocks, pair.metrics.send_blocks) == (9, 5, 1)
    assert pair.zero_ratio == pytest.approx(0.2)
    assert (pair.nonzero_blocks, pair.distinct_nonzero) == (8, 5)
    assert pair.shared_nonzero_blocks == 7  # A B A C C C D; E is missing
    assert pair.nonzero_shared_ratio == pytest.approx(7 / 8)
    assert pair.nonzero_shared_unique_ratio == pytest.approx(4 / 5)
    assert pair.send_bytes == 512


def test_share_matrix_pairs_are_every_ordered_pair_once_and_agree_with_pair_share(fleet):
    matrix = build_matrix(fleet, 512)
    assert matrix.digest_passes == 3
    assert [(p.source, p.target) for p in matrix.pairs] == [(s, t) for s in fleet for t in fleet if s != t]
    maps = [block_map(p) for p in fleet]
    for i in range(3):
        for j in range(3):
            if i != j:
                assert matrix.pair(i, j).as_dict() == pair_share(maps[i], maps[j], fleet[i], fleet[j]).as_dict()
    grid = matrix.grid("counted")
    assert np.isnan(np.diag(grid)).all()
    assert grid[0, 1] == pytest.approx(matrix.pair(0, 1).metrics.shared_ratio)


def test_share_matrix_takes_block_maps_from_the_lookup_without_digesting_them(fleet):
    known = {fleet[0]: block_map(fleet[0]), fleet[2]: block_map(fleet[2])}
    matrix = build_matrix(fleet, 512, lookup=known.get)
    assert matrix.digest_passes == 1
    assert [image.from_index for image in matrix.images] == [True, False, True]
    assert matrix.as_dict()["pairs"] == build_matrix(fleet, 512).as_dict()["pairs"]


@pytest.mark.parametrize("paths, expected", [
    (["/a/x.img", "/b/y.img"], ["x.img", "y.img"]),
    (["/h1/vm0.img", "/h2/vm0.img", "/h2/vm1.img"], ["h1/vm0.img", "h2/vm0.img", "vm1.img"]),
    (["/r/a/h/vm.img", "/r/b/h/vm.img"], ["a/h/vm.img", "b/h/vm.img"]),
    (["vm.img", "sub/vm.img"], ["vm.img", "sub/vm.img"]),
])
def test_short_names_add_parent_directories_only_where_base_names_collide(paths, expected):
    assert short_names(paths) == expected


def test_build_matrix_refuses_a_single_image_before_reading_it(fleet):
    with pytest.raises(UsageError, match="at least two images"):
        build_matrix([fleet[0], fleet[0]], 512)
    with pytest.raises(UsageError, match="at least two images"):
        ShareMatrix.from_images([], 0)


def test_matrix_json_equals_compare_json_for_every_pair(fleet, tmp_path):
    result = run_cli("matrix", os.path.dirname(fleet[0]), "--block-size", "512", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["digest_passes"] == 3
    assert [image["path"] for image in report["images"]] == fleet
    pairs = {(p["source"], p["target"]): p for p in report["pairs"]}
    assert len(pairs) == 6
    for source in fleet:
        others = [path for path in fleet if path != source]
        compared = run_cli("compare", source, *others, "--block-size", "512", "--json")
        assert compared.returncode == 0, compared.stderr
        for line in compared.stdout.splitlines():
            expected = json.loads(line)
            ours = pairs[(expected["source"], expected["target"])]
            assert {key: ours[key] for key in COMPARE_KEYS} == {key: expected[key] for key in COMPARE_KEYS}
            assert ours["send_bytes"] == expected["send_blocks"] * 512
            assert ours["zero_ratio"] == expected["zero_blocks"] / expected["total_blocks"]


def test_matrix_human_output_lists_images_and_pairs_in_the_papers_form(fleet):
    result = run_cli("matrix", *fleet, "--block-size", "4096")
    assert result.returncode == 0, result.stderr
    assert "3 images, 4096-byte blocks, 3 digest passes" in result.stdout
    matrix = build_matrix(fleet, 4096)
    pair = matrix.pair(0, 1)
    expected = f"{pair.metrics.shared_unique_ratio * 100:.2f}% ({pair.metrics.shared_ratio * 100:.2f}%)"
    row = next(line for line in result.stdout.splitlines() if line.startswith("alpha.img") and "beta.img" in line)
    assert expected in row
    assert f"{pair.nonzero_shared_unique_ratio * 100:.2f}%" in row


def png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as handle:
        data = handle.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    chunk_crc = struct.unpack(">I", data[29:33])[0]
    assert zlib.crc32(data[12:29]) == chunk_crc
    assert data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", data[16:24])


def test_matrix_writes_a_png_and_an_html_page_naming_every_image(fleet, tmp_path):
    png, page = str(tmp_path / "out" / "m.png"), str(tmp_path / "out" / "m.html")
    os.makedirs(os.path.dirname(png))
    result = run_cli("matrix", *fleet, "--png", png, "--html", page, "--json")
    assert result.returncode == 0, result.stderr
    width, height = png_size(png)
    assert 500 <= width <= 3000 and 400 <= height <= 3000
    assert os.path.getsize(png) > 20_000  # text and colours, not an empty canvas
    text = open(page, encoding="utf-8").read()
    for name in ("alpha.img", "beta.img", "gamma.img"):
        assert name in text
    assert "512-byte blocks" in text and "<script" not in text and "http" not in text.replace("<!DOCTYPE html>", "")
    assert sorted(os.listdir(tmp_path / "out")) == ["m.html", "m.png"]  # no temporary files left


def test_heatmap_cells_show_the_chosen_ratio_with_readable_text(fleet, tmp_path):
    matrix = build_matrix(fleet, 512)
    page = html_page(matrix, "counted")
    assert f"<b>{matrix.pair(0, 1).metrics.shared_ratio * 100:.1f}%</b>" in page
    assert text_color((0.03, 0.11, 0.35)) == "#ffffff"  # darkest palette colour: white text
    assert text_color((1.0, 1.0, 0.85)) == "#000000"
    assert color(0.0) == "#ffffd9" and color(1.0) == "#081d58"
    long = "debian-12-bookworm-genericcloud-amd64-20261120-1570.raw"
    short = shorten(long, 30)
    assert len(short) == 30 and short.startswith("debian-12") and short.endswith("1570.raw")
    render_png(matrix, str(tmp_path / "a.png"), "distinct")
    render_html(matrix, str(tmp_path / "a.html"))
    assert png_size(str(tmp_path / "a.png"))[0] > 0 and os.path.getsize(tmp_path / "a.html") > 1000


def test_the_same_file_named_twice_is_one_image(fleet):
    result = run_cli("matrix", fleet[0], fleet[1], fleet[0], "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (len(report["images"]), len(report["pairs"]), report["digest_passes"]) == (2, 2, 2)


@pytest.mark.parametrize("args, code, message", [
    (["{missing}", "{a}"], 1, "no such file or directory"),
    (["{a}"], 2, "at least two images"),
    (["{a}", "{a}"], 2, "at least two images"),
    (["{single_dir}"], 2, "at least two images"),
    (["{a}", "{b}", "--color-by", "purple"], 2, "purple"),
    (["{a}", "{b}", "--png", "{missing}/m.png"], 1, "no such directory"),
    (["{a}", "{b}", "--html", "{single_dir}"], 2, "is a directory"),
])
def test_bad_input_gives_a_one_line_error_and_an_exit_code(fleet, tmp_path, args, code, message):
    single = tmp_path / "single"
    single.mkdir()
    os.link(fleet[0], single / "only.img")
    names = {"missing": str(tmp_path / "nope.img"), "a": fleet[0], "b": fleet[1], "single_dir": str(single)}
    result = run_cli("matrix", *[arg.format(**names) for arg in args])
    assert result.returncode == code
    assert message in result.stderr
    if code == 1 or "two images" in message:  # ours; click prints its own usage errors
        assert len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.stderr


def test_use_index_reuses_indexed_block_maps_and_digests_changed_images(fleet, redis_url):
    indexed = run_cli("index", os.path.dirname(fleet[0]), "--host", "node-1", "--redis", redis_url,
                      "--block-size", "512", "--json")
    assert indexed.returncode == 0, indexed.stderr
    plain = json.loads(run_cli("matrix", *fleet, "--json").stdout)
    reused = run_cli("matrix", *fleet, "--use-index", "--host", "node-1", "--redis", redis_url, "--json")
    assert reused.returncode == 0, reused.stderr
    report = json.loads(reused.stdout)
    assert report["digest_passes"] == 0
    assert [image["map_from"] for image in report["images"]] == ["index"] * 3
    assert report["pairs"] == plain["pairs"]

    stat = os.stat(fleet[1])
    os.utime(fleet[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # changed since indexing
    report = json.loads(run_cli("matrix", *fleet, "--use-index", "--host", "node-1", "--redis", redis_url,
                                "--json").stdout)
    assert report["digest_passes"] == 1
    assert [image["map_from"] for image in report["images"]] == ["index", "digest", "index"]

    other_size = json.loads(run_cli("matrix", *fleet, "--block-size", "4096", "--use-index", "--host", "node-1",
                                    "--redis", redis_url, "--json").stdout)
    assert other_size["digest_passes"] == 3  # the index holds 512-byte maps: nothing to reuse at 4 KiB
