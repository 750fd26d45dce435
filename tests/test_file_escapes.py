"""No file outside what the operator gave is read: symlinks out of indexed trees, indexed paths
swapped after indexing, and qcow2 backing files naming any file they like.

Real files, real Redis, real `qemu-img` overlays, the CLI as a process, the service over HTTP.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sketch.blocks import FileIdentity, StaleImage, open_image, open_indexed
from tests import test_server
from tests.test_store_index import write_fleet

HOST = "node-a"
service = test_server.service  # the service as a real process on a loopback port


def run(*args: str, redis_url: str | None = None, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "BLOCKSKETCH_REDIS_URL": redis_url} if redis_url else dict(os.environ)
    if args[0] in ("apply", "receive"):
        env["BLOCKSKETCH_HOST"] = HOST  # they run on the destination
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, timeout=120, input=stdin,
                          env=env)


def one_line_error(done: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    stderr = done.stderr.decode() if isinstance(done.stderr, bytes) else done.stderr
    assert done.returncode == code, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blocksketch: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def indexed_paths(redis_url: str, host: str = HOST) -> list[str]:
    done = run("images", "--host", host, "--json", redis_url=redis_url)
    return [row["path"] for row in json.loads(done.stdout or "[]")]


def overlay(path: Path, backing: str, backing_format: str = "raw") -> Path:
    """A qcow2 overlay naming ``backing`` as written (``-u``: qemu-img does not open it)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", backing_format, str(path),
                    "1M"], check=True)
    return path


# -- symlinks out of the indexed trees ---------------------------------------------------------------


def test_a_symlink_to_a_file_outside_the_roots_is_never_indexed(tmp_path, redis_url):
    tree = tmp_path / "images"
    (image,) = write_fleet(tree, count=1)
    (tree / "s.img").symlink_to("/etc/passwd")
    done = run("index", "--host", HOST, str(tree), redis_url=redis_url)
    assert done.returncode == 0, done.stderr
    assert done.stderr.decode().strip() == f"blocksketch: warning: skipped {tree}/s.img: symlink out of the tree"
    assert indexed_paths(redis_url) == [image]
    one_line_error(run("rank", f"{HOST}:/etc/passwd", redis_url=redis_url), 1, "no image /etc/passwd")


def test_the_service_has_no_manifest_of_a_file_a_symlink_pointed_at(tmp_path, redis_url, service):
    tree = tmp_path / "images"
    write_fleet(tree, count=1)
    (tree / "s.img").symlink_to("/etc/passwd")
    assert run("index", "--host", HOST, str(tree), redis_url=redis_url).returncode == 0
    response = service.post("/v1/manifest", json={"image": f"{HOST}:/etc/passwd", "to": HOST})
    assert response.status_code == 404


def test_a_symlink_between_two_roots_is_followed_and_indexed_once(tmp_path, redis_url):
    (first,) = write_fleet(tmp_path / "a", count=1)
    write_fleet(tmp_path / "b", count=0)
    (tmp_path / "b" / "alias.img").symlink_to(first)
    done = run("index", "--host", HOST, str(tmp_path / "a"), str(tmp_path / "b"), redis_url=redis_url)
    assert done.returncode == 0 and done.stderr == b""
    assert indexed_paths(redis_url) == [first]


def test_follow_symlinks_indexes_a_file_outside_only_when_asked(tmp_path, redis_url):
    tree = tmp_path / "images"
    write_fleet(tree, count=1)
    (far,) = write_fleet(tmp_path / "elsewhere", count=1, seed=9)
    (tree / "far.img").symlink_to(far)
    done = run("index", "--host", HOST, "--follow-symlinks", str(tree), redis_url=redis_url)
    assert done.returncode == 0 and done.stderr == b""
    assert far in indexed_paths(redis_url)


# -- an indexed path whose file was swapped after indexing ---------------------------------------------


def _swap_for_a_symlink_to_a_copy(path: str, elsewhere: Path) -> None:
    """Same bytes, another file: only the file's identity can tell (its blocks all verify)."""
    elsewhere.mkdir(exist_ok=True)
    copy = elsewhere / os.path.basename(path)
    shutil.copy2(path, copy)
    os.unlink(path)
    os.symlink(copy, path)


def _swap_for_a_copy(path: str, elsewhere: Path) -> None:
    shutil.copy2(path, path + ".new")
    os.replace(path + ".new", path)


@pytest.mark.parametrize("swap, says", [
    (_swap_for_a_symlink_to_a_copy, "is a symbolic link now"),
    (_swap_for_a_copy, "is not the file that was indexed"),
])
def test_apply_never_reads_a_local_image_that_is_no_longer_the_indexed_file(tmp_path, redis_url, swap, says):
    (host_image,) = write_fleet(tmp_path / "host", count=1)
    assert run("index", "--host", HOST, str(tmp_path / "host"), redis_url=redis_url).returncode == 0
    source = tmp_path / "vm.img"
    shutil.copy(host_image, source)  # every block is LOCAL on the host
    manifest, bundle = tmp_path / "vm.manifest", tmp_path / "vm.bundle"
    assert run("manifest", str(source), "--to", HOST, "-o", str(manifest), redis_url=redis_url).returncode == 0
    assert run("pack", str(source), str(manifest), "-o", str(bundle)).returncode == 0
    swap(host_image, tmp_path / "elsewhere")
    out = tmp_path / "out.img"
    done = run("apply", str(manifest), str(bundle), "-o", str(out), redis_url=redis_url)
    one_line_error(done, 1, host_image, says)
    assert not out.exists()


def test_apply_still_repairs_a_local_image_written_since_it_was_indexed(tmp_path, redis_url):
    (host_image,) = write_fleet(tmp_path / "host", count=1)
    assert run("index", "--host", HOST, str(tmp_path / "host"), redis_url=redis_url).returncode == 0
    source = tmp_path / "vm.img"
    shutil.copy(host_image, source)
    with open(host_image, "r+b") as handle:  # the same file, written: its changed blocks are asked again
        handle.seek(60 * 512)
        handle.write(b"changed after indexing")
    out = tmp_path / "out.img"
    done = run("migrate", str(source), "--to", HOST, "-o", str(out), "--json", redis_url=redis_url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["extra_bundle_bytes"] > 0 and out.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("swap", [_swap_for_a_symlink_to_a_copy, _swap_for_a_copy])
def test_the_service_refuses_a_manifest_of_an_indexed_path_now_another_file(tmp_path, redis_url, service, swap):
    (image,) = write_fleet(tmp_path / "images", count=1)
    assert run("index", "--host", HOST, str(tmp_path / "images"), redis_url=redis_url).returncode == 0
    assert service.post("/v1/manifest", json={"image": f"{HOST}:{image}", "to": HOST}).status_code == 200
    swap(image, tmp_path / "elsewhere")
    response = service.post("/v1/manifest", json={"image": f"{HOST}:{image}", "to": HOST})
    assert response.status_code == 422 and "changed since it was indexed" in response.text


def test_matrix_use_index_takes_no_block_map_for_a_replaced_file(tmp_path, redis_url):
    paths = write_fleet(tmp_path / "images", count=2)
    assert run("index", "--host", HOST, str(tmp_path / "images"), redis_url=redis_url).returncode == 0
    before = json.loads(run("matrix", "--use-index", "--host", HOST, "--json", *paths, redis_url=redis_url).stdout)
    assert before["digest_passes"] == 0
    _swap_for_a_copy(paths[0], tmp_path)
    after = json.loads(run("matrix", "--use-index", "--host", HOST, "--json", *paths, redis_url=redis_url).stdout)
    assert after["digest_passes"] == 1


def _symlinked(path: str) -> None:
    _swap_for_a_symlink_to_a_copy(path, Path(path).parent.parent / "elsewhere")


def _replaced(path: str) -> None:
    _swap_for_a_copy(path, Path(path).parent)


def _written(path: str) -> None:
    with open(path, "r+b") as handle:
        handle.write(b"x")


@pytest.mark.parametrize("change, refused, refused_when_written_ok", [
    (_symlinked, True, True),
    (_replaced, True, True),
    (_written, True, False),
])
def test_open_indexed_reads_only_the_file_an_entry_describes(tmp_path, change, refused, refused_when_written_ok):
    (path,) = write_fleet(tmp_path / "images", count=1)
    with open_image(path) as source:
        recorded = source.identity
    assert recorded == FileIdentity.of(os.stat(path))
    open_indexed(path, "raw", recorded).close()
    change(path)
    for written_ok, expected in ((False, refused), (True, refused_when_written_ok)):
        if expected:
            with pytest.raises(StaleImage):
                open_indexed(path, "raw", recorded, written_ok=written_ok)
        else:
            open_indexed(path, "raw", recorded, written_ok=written_ok).close()


# -- qcow2 backing files ------------------------------------------------------------------------------


@pytest.fixture
def escaping(tmp_path, redis_url):
    """A tree with a good image and a qcow2 whose backing file is /etc/passwd; an indexed host."""
    tree = tmp_path / "images"
    write_fleet(tree, count=1)
    assert run("index", "--host", HOST, str(tree), redis_url=redis_url).returncode == 0
    return overlay(tree / "e.qcow2", "/etc/passwd")


@pytest.mark.parametrize("command", [
    lambda e, t: ("compare", e, e),
    lambda e, t: ("matrix", e, str(t / "other.img")),
    lambda e, t: ("index", "--host", "node-b", e),
    lambda e, t: ("rank", e),
    lambda e, t: ("manifest", e, "--to", HOST, "-o", str(t / "m")),
    lambda e, t: ("send", e, "--to", HOST, "-o", str(t / "s")),
    lambda e, t: ("migrate", e, "--to", HOST, "-o", str(t / "out")),
])
def test_a_qcow2_naming_etc_passwd_as_backing_file_is_refused(tmp_path, redis_url, escaping, command):
    shutil.copy(next((tmp_path / "images").glob("*.img")), tmp_path / "other.img")
    done = run(*command(str(escaping), tmp_path), redis_url=redis_url)
    one_line_error(done, 1, "backing file '/etc/passwd'", "outside the image's directory")
    assert not any((tmp_path / name).exists() for name in ("m", "s", "out"))
    assert "/etc/passwd" not in indexed_paths(redis_url, "node-b")


def test_the_issue_pipe_ships_no_byte_of_etc_passwd(tmp_path, redis_url, escaping):
    sent = run("send", str(escaping), "--to", HOST, redis_url=redis_url)
    one_line_error(sent, 1, "refused")
    assert sent.stdout == b""
    received = run("receive", "-o", str(tmp_path / "e.out"), redis_url=redis_url, stdin=sent.stdout)
    assert received.returncode == 1 and not (tmp_path / "e.out").exists()


def test_pack_refuses_it_too(tmp_path, redis_url):
    base = tmp_path / "images" / "base.raw"
    (image,) = write_fleet(tmp_path / "images", count=1)
    shutil.copy(image, base)
    good = overlay(tmp_path / "images" / "e.qcow2", "base.raw")
    assert run("index", "--host", HOST, str(tmp_path / "images"), redis_url=redis_url).returncode == 0
    assert run("manifest", str(good), "--to", HOST, "-o", str(tmp_path / "m"), redis_url=redis_url).returncode == 0
    evil = overlay(tmp_path / "evil.qcow2", "/etc/passwd")
    one_line_error(run("pack", str(evil), str(tmp_path / "m"), "-o", str(tmp_path / "b")), 1, "refused")
    assert not (tmp_path / "b").exists()


def test_a_legit_overlay_on_a_base_in_its_directory_reads_as_qemu_does(tmp_path, redis_url):
    tree = tmp_path / "images"
    (base,) = write_fleet(tree, count=1)
    top = overlay(tree / "top.qcow2", os.path.basename(base))
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 4096 8192", str(top)], check=True, capture_output=True)
    flat = tmp_path / "top.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(top), str(flat)], check=True)
    compared = run("compare", str(top), str(flat), "--json")
    assert compared.returncode == 0, compared.stderr
    assert json.loads(compared.stdout)["shared_ratio"] == 1.0
    done = run("index", "--host", HOST, str(tree), "--json", redis_url=redis_url)
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(done.stdout)["indexed"]) == sorted([base, str(top)])
    sent = run("send", str(top), "--to", HOST, redis_url=redis_url)
    assert sent.returncode == 0, sent.stderr
    out = tmp_path / "out.img"
    received = run("receive", "-o", str(out), redis_url=redis_url, stdin=sent.stdout)
    assert received.returncode == 0, received.stderr
    assert out.read_bytes() == flat.read_bytes()


@pytest.mark.parametrize("name, place", [
    ("../base.raw", "parent"),  # climbs out of the image's directory
    ("base.raw", "symlink"),  # in the directory, but a symlink to a file outside it
])
def test_a_backing_file_outside_the_directory_needs_backing_dir(tmp_path, name, place):
    tree = tmp_path / "images"
    tree.mkdir()
    (image,) = write_fleet(tmp_path / "bases", count=1)
    if place == "parent":
        shutil.copy(image, tmp_path / "base.raw")
        allowed = tmp_path
    else:
        (tree / "base.raw").symlink_to(image)
        allowed = tmp_path / "bases"
    top = overlay(tree / "top.qcow2", name)
    one_line_error(run("compare", str(top), image), 1, "outside the image's directory")
    done = run("compare", str(top), image, "--backing-dir", str(allowed), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["shared_ratio"] == 1.0


def _fifo(tree: Path) -> tuple[str, str]:
    os.mkfifo(tree / "base.raw")
    return "base.raw", str(tree)


@pytest.mark.parametrize("backing", [
    _fifo,
    lambda tree: ("/dev/zero", "/dev"),
    lambda tree: ("/proc/self/environ", "/proc"),
    lambda tree: ("/sys/kernel/mm/transparent_hugepage/enabled", "/sys"),
])
def test_a_device_a_fifo_proc_or_sys_is_never_a_backing_file_even_when_allowed(tmp_path, backing):
    tree = tmp_path / "images"
    tree.mkdir()
    name, allowed = backing(tree)
    top = overlay(tree / "top.qcow2", name)
    one_line_error(run("compare", str(top), str(top), "--backing-dir", allowed), 1, "refused")
