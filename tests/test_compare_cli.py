"""`blocksketch compare` on bad input: one line on stderr, exit 2 for usage errors and 1 otherwise."""

import os
import subprocess
import sys

import pytest


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "a.img"
    path.write_bytes(b"\x01" * 4096)
    return str(path)


@pytest.mark.parametrize("make_args, code, words", [
    (lambda d, img: [str(d / "missing.img"), img], 1, "no such image"),
    (lambda d, img: [img, str(d / "missing.img")], 1, "no such file"),
    (lambda d, img: [str(d), img], 2, "directory"),
    (lambda d, img: [str(d / "empty.img"), img], 1, "empty"),
    (lambda d, img: [img, img, "--block-size", "1000"], 2, "power of two"),
    (lambda d, img: [img, img, "--block-size", "131072"], 2, "power of two"),
    (lambda d, img: [img], 2, "Missing argument"),
    (lambda d, img: [str(d / "empty-dir"), img], 2, "directory"),
    (lambda d, img: [img, str(d / "empty-dir")], 1, "holds no images"),
])
def test_bad_input_is_one_line_and_the_right_exit_code(tmp_path, image, make_args, code, words):
    (tmp_path / "empty.img").write_bytes(b"")
    (tmp_path / "empty-dir").mkdir()
    result = run_cli("compare", *make_args(tmp_path, image))
    assert result.returncode == code, result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_unreadable_image_is_exit_1(tmp_path, image):
    locked = tmp_path / "locked.img"
    locked.write_bytes(b"\x01" * 512)
    os.chmod(locked, 0)
    path = str(locked) if not os.access(locked, os.R_OK) else "/proc/1/mem"  # root reads anything
    result = run_cli("compare", path, image)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1


def test_human_table_has_one_row_per_target(image, tmp_path):
    result = run_cli("compare", image, image, str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["target", "blocks"]
    assert len(lines) == 3
