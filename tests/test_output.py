"""sketch.output: files appear whole or not at all, never over a file unasked, never onto an input,
never through a planted symlink."""

from __future__ import annotations

import os

import pytest

from sketch.errors import ForceNeeded, OutputError, UsageError
from sketch.output import atomic_output, create_exclusive, temp_path, write_atomic


def hidden(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("."))


def test_a_symlink_planted_at_a_temporary_name_is_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    planted = temp_path(str(tmp_path / "out"))
    os.symlink(victim, planted)
    with pytest.raises(FileExistsError):
        create_exclusive(planted)
    assert victim.read_bytes() == b"keep me"


def test_a_symlink_at_the_output_is_replaced_with_force_never_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    os.symlink(victim, tmp_path / "out")
    with pytest.raises(ForceNeeded):
        write_atomic(str(tmp_path / "out"), b"new", force=False)
    write_atomic(str(tmp_path / "out"), b"new", force=True)
    assert victim.read_bytes() == b"keep me"
    assert not os.path.islink(tmp_path / "out") and (tmp_path / "out").read_bytes() == b"new"


def test_a_failure_inside_the_block_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "out"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(str(out), force=True) as handle:
        handle.write(b"half")
        raise RuntimeError("interrupted")
    assert out.read_bytes() == b"old" and hidden(tmp_path) == []


def test_a_file_that_appears_while_writing_is_not_clobbered_without_force(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ForceNeeded), atomic_output(str(out), force=False) as handle:
        handle.write(b"mine")
        out.write_bytes(b"theirs")  # another writer got there first
    assert out.read_bytes() == b"theirs" and hidden(tmp_path) == []


@pytest.mark.parametrize("make_alias", [os.symlink, os.link])
def test_an_input_is_refused_as_output_by_any_name(tmp_path, make_alias):
    image = tmp_path / "vm.img"
    image.write_bytes(b"image")
    make_alias(image, tmp_path / "alias")
    for target in (image, tmp_path / "alias"):
        with pytest.raises(UsageError, match="an input of this command"):
            write_atomic(str(target), b"bundle", force=True, inputs=[str(image)])
    assert image.read_bytes() == b"image"


def test_a_directory_or_a_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="it is a directory"):
        write_atomic(str(tmp_path), b"x", force=True)
    with pytest.raises(OutputError, match="no such directory"):
        write_atomic(str(tmp_path / "nowhere" / "out"), b"x", force=True)
