"""What a refresh keeps, drops and skips, and `forget`: real files, real Redis, the CLI as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import redis

from sketch.blockmap import union_keys
from store import keys, open_store
from store.lock import HostLock
from tests.test_store_index import direct_map, write_fleet

HOST = "node-a"


def run_cli(*args: str, redis_url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args, "--redis", redis_url], capture_output=True, text=True,
                          timeout=120)


def index(redis_url: str, *paths, host: str = HOST, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return run_cli("index", "--host", host, *options, *map(str, paths), redis_url=redis_url)


def indexed_paths(redis_url: str, host: str = HOST) -> list[str]:
    with open_store(redis_url) as store:
        catalogue = store.catalogue(host)
    return [] if catalogue is None else [image.path for image in catalogue.images]


def host_keys(redis_url: str, host: str) -> list[bytes]:
    client = redis.Redis.from_url(redis_url)
    try:
        return list(client.scan_iter(match=keys.host_pattern(host), count=1000))
    finally:
        client.close()


def one_line_error(done: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert done.returncode == code, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blocksketch: error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- entries nothing used to remove ----------------------------------------------------------------


def test_an_image_reached_through_a_symlink_leaves_the_index_with_the_symlink(tmp_path, redis_url):
    tree, outside = tmp_path / "images", tmp_path / "elsewhere"
    (own,) = write_fleet(tree, count=1)
    (far,) = write_fleet(outside, count=1, seed=8)
    (tree / "link.img").symlink_to(far)
    assert index(redis_url, tree, options=("--follow-symlinks",)).returncode == 0
    assert indexed_paths(redis_url) == sorted([own, far])
    (tree / "link.img").unlink()
    done = index(redis_url, tree, options=("--json",))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["removed"] == [far]
    assert indexed_paths(redis_url) == [own]


def test_a_refresh_of_one_root_keeps_the_entries_of_another(tmp_path, redis_url):
    first = write_fleet(tmp_path / "a", count=1)
    second = write_fleet(tmp_path / "b", count=1, seed=8)
    assert index(redis_url, tmp_path / "a").returncode == 0
    assert index(redis_url, tmp_path / "b").returncode == 0
    os.unlink(second[0])
    write_fleet(tmp_path / "b", count=0)
    assert index(redis_url, tmp_path / "a").returncode == 0
    assert indexed_paths(redis_url) == first + second


def test_forget_one_image_keeps_the_others_and_rebuilds_the_host_sketches(tmp_path, redis_url):
    paths = write_fleet(tmp_path / "images", count=3)
    assert index(redis_url, tmp_path / "images").returncode == 0
    done = run_cli("forget", "--host", HOST, paths[1], "--json", redis_url=redis_url)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["removed"] == [paths[1]] and report["images"] == 2 and not report["whole_host"]
    assert indexed_paths(redis_url) == [paths[0], paths[2]]
    (host,) = json.loads(run_cli("hosts", "--json", redis_url=redis_url).stdout)
    assert host["distinct_blocks"] == len(union_keys([direct_map(p).keys for p in (paths[0], paths[2])]))
    with open_store(redis_url) as store:
        catalogue = store.catalogue(HOST)
        referenced = {key.encode() for key in catalogue.entry_keys()}
        bloom = store.host_filter(HOST)
    left = set(host_keys(redis_url, HOST)) - referenced
    assert left == {keys.catalogue(HOST).encode(), keys.generation_counter(HOST).encode()}  # no garbage behind
    kept = union_keys([direct_map(p).keys for p in (paths[0], paths[2])])
    assert bloom.contains(kept).all()
    kept_set = {bytes(row) for row in kept.view("u1").reshape(len(kept), -1)}
    gone = [row for row in direct_map(paths[1]).keys if bytes(row.view("u1")) not in kept_set]
    assert gone and bloom.contains(np.array(gone)).mean() < 0.1  # the forgotten image's own blocks left the filter


def test_forget_names_an_image_as_the_index_lists_it_even_when_the_file_is_gone(tmp_path, redis_url):
    paths = write_fleet(tmp_path / "images", count=2)
    assert index(redis_url, tmp_path / "images").returncode == 0
    os.unlink(paths[0])
    done = run_cli("forget", "--host", HOST, paths[0], redis_url=redis_url)
    assert done.returncode == 0, done.stderr
    assert "1 images forgotten, 1 left" in done.stdout
    assert indexed_paths(redis_url) == [paths[1]]


def test_forget_a_whole_host_leaves_neither_its_name_nor_any_of_its_keys(tmp_path, redis_url):
    write_fleet(tmp_path / "a", count=2)
    write_fleet(tmp_path / "b", count=1, seed=9)
    assert index(redis_url, tmp_path / "a").returncode == 0
    assert index(redis_url, tmp_path / "b", host="node-b").returncode == 0
    done = run_cli("forget", "--host", HOST, "--json", redis_url=redis_url)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["whole_host"] and len(report["removed"]) == 2
    assert [row["host"] for row in json.loads(run_cli("hosts", "--json", redis_url=redis_url).stdout)] == ["node-b"]
    assert host_keys(redis_url, HOST) == []
    client = redis.Redis.from_url(redis_url)
    assert client.smembers(keys.HOSTS) == {b"node-b"}
    client.close()
    # the host can be indexed again from scratch
    assert index(redis_url, tmp_path / "a").returncode == 0 and len(indexed_paths(redis_url)) == 2


def test_an_emptied_host_can_be_forgotten(tmp_path, redis_url):
    write_fleet(tmp_path / "images", count=1)
    assert index(redis_url, tmp_path / "images").returncode == 0
    for name in os.listdir(tmp_path / "images"):
        os.unlink(tmp_path / "images" / name)
    assert index(redis_url, tmp_path / "images", options=("--allow-empty",)).returncode == 0
    assert json.loads(run_cli("hosts", "--json", redis_url=redis_url).stdout)[0]["images"] == 0
    assert run_cli("forget", "--host", HOST, redis_url=redis_url).returncode == 0
    assert json.loads(run_cli("hosts", "--json", redis_url=redis_url).stdout) == []


@pytest.mark.parametrize("args, fragments", [
    (("--host", "nope"), ("host nope is not in the index",)),
    (("--host", HOST, "/no/such.img"), ("no image /no/such.img on host node-a", "indexed: ")),
    (("--host", HOST, "vm0.img"), ("no image vm0.img",)),  # never guessed from a base name
])
def test_forget_of_something_not_indexed_is_one_line_and_changes_nothing(tmp_path, redis_url, args, fragments):
    paths = write_fleet(tmp_path / "images", count=2)
    assert index(redis_url, tmp_path / "images").returncode == 0
    one_line_error(run_cli("forget", *args, redis_url=redis_url), 1, *fragments)
    assert indexed_paths(redis_url) == paths


def test_forget_waits_for_the_hosts_lock_and_changes_nothing_without_it(tmp_path, redis_url):
    paths = write_fleet(tmp_path / "images", count=2)
    assert index(redis_url, tmp_path / "images").returncode == 0
    client = redis.Redis.from_url(redis_url)
    try:
        with HostLock(client, redis_url, HOST):
            done = run_cli("forget", "--host", HOST, "--lock-timeout", "0.2", redis_url=redis_url)
    finally:
        client.close()
    one_line_error(done, 1, HOST)
    assert indexed_paths(redis_url) == paths


def test_forget_has_help_with_an_example(redis_url):
    done = run_cli("forget", "--help", redis_url=redis_url)
    assert done.returncode == 0 and "Example:" in done.stdout and "--host" in done.stdout


# -- roots that are missing or empty -----------------------------------------------------------------


@pytest.mark.parametrize("damage", ["removed", "emptied"])
def test_a_missing_or_empty_root_is_refused_and_keeps_the_hosts_images(tmp_path, redis_url, damage):
    tree = tmp_path / "images"
    paths = write_fleet(tree, count=2)
    assert index(redis_url, tree).returncode == 0
    for path in paths:
        os.unlink(path)
    if damage == "removed":
        tree.rmdir()
    done = index(redis_url, tree)
    one_line_error(done, 1, str(tree), "--allow-empty")
    assert indexed_paths(redis_url) == paths
    allowed = index(redis_url, tree, options=("--allow-empty", "--json"))
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["removed"] == paths and indexed_paths(redis_url) == []


def test_an_empty_root_is_fine_when_the_host_has_nothing_under_it(tmp_path, redis_url):
    write_fleet(tmp_path / "a", count=1)
    (tmp_path / "b").mkdir()
    assert index(redis_url, tmp_path / "a").returncode == 0
    done = index(redis_url, tmp_path / "b")
    assert done.returncode == 0, done.stderr
    assert len(indexed_paths(redis_url)) == 1


def test_a_missing_root_of_a_new_host_is_refused_too(tmp_path, redis_url):
    one_line_error(index(redis_url, tmp_path / "absent"), 1, "does not exist")
    assert indexed_paths(redis_url) == []


def test_index_help_says_what_is_an_image_and_what_is_refused(redis_url):
    text = " ".join(run_cli("index", "--help", redis_url=redis_url).stdout.split())
    for words in ("multiple of 512 bytes", "skipped and counted", "not UTF-8", "--allow-empty", "--follow-symlinks",
                  "--backing-dir", "Example:"):
        assert words in text


# -- what a directory walk takes as an image ---------------------------------------------------------


def _qcow2_with_a_trailing_byte(path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    with open(path, "ab") as handle:
        handle.write(b"\0")  # a size no raw disk has: still an image, by its magic


@pytest.mark.parametrize("name, make, is_image", [
    ("NOTES.txt", lambda p: p.write_text("what lives here\n"), False),
    ("partial.img", lambda p: p.write_bytes(os.urandom(1000)), False),
    ("one-sector.img", lambda p: p.write_bytes(os.urandom(512)), True),
    ("odd.qcow2", _qcow2_with_a_trailing_byte, True),
    (".hidden.img", lambda p: p.write_bytes(os.urandom(4096)), False),
])
def test_a_directory_walk_takes_qcow2_and_sector_multiples_and_counts_what_it_skips(tmp_path, redis_url, name,
                                                                                     make, is_image):
    tree = tmp_path / "images"
    (image,) = write_fleet(tree, count=1)
    make(tree / name)
    done = index(redis_url, tree, options=("--json",))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    expected = sorted([image, str(tree / name)]) if is_image else [image]
    assert indexed_paths(redis_url) == expected
    visible_skip = not is_image and not name.startswith(".")
    assert report["skipped"] == int(visible_skip)
    assert report["skipped_by_reason"] == ({"not an image": 1} if visible_skip else {})
    assert done.stderr == ""  # skipping a note is routine: no warning
    summary = index(redis_url, tree)
    assert f"{int(visible_skip)} skipped" in summary.stdout


def test_a_file_named_on_the_command_line_is_indexed_whatever_its_size(tmp_path, redis_url):
    odd = tmp_path / "odd.img"
    odd.write_bytes(os.urandom(1000))
    assert index(redis_url, odd).returncode == 0
    assert indexed_paths(redis_url) == [str(odd)]


def test_a_name_that_is_not_utf8_is_skipped_with_a_warning_and_the_others_are_indexed(tmp_path, redis_url):
    tree = tmp_path / "images"
    paths = write_fleet(tree, count=2)
    bad = os.path.join(os.fsencode(tree), b"\xffvm.img")
    with open(bad, "wb") as handle:
        handle.write(os.urandom(4096))
    done = index(redis_url, tree, options=("--json",))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert sorted(report["indexed"]) == paths and report["skipped_by_reason"] == {"name is not UTF-8": 1}
    assert done.stderr.strip() == f"blocksketch: warning: skipped {tree}/\\xffvm.img: name is not UTF-8"
    assert indexed_paths(redis_url) == paths
    assert run_cli("images", "--json", redis_url=redis_url).returncode == 0
