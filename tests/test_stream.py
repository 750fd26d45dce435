"""``send | receive``: one read at the source, one stream, an exact image or a clear error at the destination.

Real processes joined by real pipes, a real Redis index, real image files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sketch.apply import partial_path
from sketch.errors import ImageError
from sketch.imagesum import SEGMENT_BYTES
from sketch.manifest import Manifest
from sketch.sample import random_blocks, write_image
from sketch.stream import MAGIC, read_stream_manifest, write_stream
from store import open_store
from store.transfer import host_manifest, prepare_send
from tests.test_manifest import fleet
from tests.test_migrate_cli import one_line_error

HOST = "dst"
CLI = [sys.executable, "-m", "cli"]


def cli_env(redis_url: str, command: str) -> dict:
    """The environment of a CLI process; ``receive`` and ``apply`` run as the destination host."""
    env = {**os.environ, "BLOCKSKETCH_REDIS_URL": redis_url}
    if command in ("receive", "apply"):
        env["BLOCKSKETCH_HOST"] = HOST
    return env


def run(*args: str, redis_url: str, check: bool = True, stdin=None) -> subprocess.CompletedProcess:
    env = cli_env(redis_url, args[0])
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, stdin=stdin)
    if check:
        assert done.returncode == 0, done.stderr.decode()
    return done


def pipe(send_args: list[str], receive_args: list[str], redis_url: str) -> tuple[subprocess.CompletedProcess, ...]:
    """``blocksketch send ... | blocksketch receive ...`` through an OS pipe; both results."""
    sender = subprocess.Popen([*CLI, "send", *send_args], env=cli_env(redis_url, "send"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    receiver = subprocess.Popen([*CLI, "receive", *receive_args], env=cli_env(redis_url, "receive"),
                                stdin=sender.stdout,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sender.stdout.close()  # the receiver holds the only read end: a dead receiver gives the sender EPIPE
    out, err = receiver.communicate(timeout=120)
    sent_err = sender.stderr.read()
    sender.wait(timeout=120)
    sender.stderr.close()
    return (subprocess.CompletedProcess(sender.args, sender.returncode, b"", sent_err),
            subprocess.CompletedProcess(receiver.args, receiver.returncode, out, err))


def spread_fleet(directory: Path, block_size: int = 4096, segments: int = 5, seed: int = 3) -> dict:
    """A source of several checksum segments with every block kind in each, whole zero segments and a
    partial tail; one destination image holding part of it, shifted."""
    rng = np.random.default_rng(seed)
    per_segment = SEGMENT_BYTES // block_size
    total = segments * per_segment
    source = random_blocks(rng, total, block_size)
    source[per_segment : 2 * per_segment] = 0  # a whole zero segment: a hole on both ends
    kinds = rng.integers(0, 4, total)
    source[kinds == 0] = 0
    repeated = np.flatnonzero(kinds == 3)
    source[repeated[1:]] = source[repeated[:-1]]  # DUP chains crossing segment boundaries
    host = np.zeros((total + 40, block_size), np.uint8)
    shared = np.flatnonzero(kinds == 1)
    host[shared + 40] = source[shared]  # LOCAL, at other offsets
    (directory / "dst").mkdir()
    paths = {"source": str(directory / "source.img"), "host": [str(directory / "dst" / "host.img")]}
    write_image(paths["source"], source)
    with open(paths["source"], "ab") as handle:
        handle.write(b"a partial last block")
    write_image(paths["host"][0], host)
    return paths


@pytest.fixture
def indexed(tmp_path, redis_url):
    images = fleet(tmp_path, 512, host_dir="dst")
    run("index", str(tmp_path / "dst"), "--host", HOST, "--block-size", "512", redis_url=redis_url)
    return images


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if "blocksketch-partial" in p.name or ".tmp-" in p.name)


@pytest.mark.parametrize("command", ["send", "receive"])
def test_help_has_an_example(command):
    done = subprocess.run([*CLI, command, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "Example:" in done.stdout and f"blocksketch {command} " in done.stdout


def test_send_picks_the_host_by_rank_and_receive_rebuilds_the_image(tmp_path, redis_url, indexed):
    other = tmp_path / "other"
    other.mkdir()
    write_image(str(other / "unrelated.img"), random_blocks(np.random.default_rng(1), 300, 512))
    run("index", str(other), "--host", "other", "--block-size", "512", redis_url=redis_url)
    out = tmp_path / "out.img"
    sent, received = pipe([indexed["source"], "--json"], ["-o", str(out), "--json"], redis_url)
    assert sent.returncode == 0, sent.stderr.decode()
    assert received.returncode == 0, received.stderr.decode()
    report = json.loads(sent.stderr)
    assert report["host"] == HOST and report["host_chosen_by"] == "rank"
    assert report["ranking"]["winner"] == HOST and report["shared_ratio"] > 0
    assert out.read_bytes() == Path(indexed["source"]).read_bytes()
    answer = json.loads(received.stdout)
    assert answer["status"] == "ok" and answer["host"] == HOST
    assert answer["blocks"] == {"bundle": report["blocks"]["send"], "local": report["blocks"]["local"],
                                "dup": report["blocks"]["dup"]}
    assert report["stream_bytes"] == 16 + report["manifest_bytes"] + report["bundle_bytes"]
    assert report["stream_bytes"] < report["size_bytes"]
    assert leftovers(tmp_path) == []


def test_the_stream_carries_the_manifest_the_manifest_command_builds(tmp_path, redis_url, indexed):
    """One read (digests, checksum beside them, seal over LOCAL runs only) gives the same manifest as
    the step-by-step commands, byte for byte."""
    stream = tmp_path / "vm.stream"
    run("send", indexed["source"], "--to", HOST, "-o", str(stream), redis_url=redis_url)
    with open(stream, "rb") as handle:
        streamed = read_stream_manifest(handle)
    with open_store(redis_url) as store:
        built = host_manifest(store, indexed["source"], HOST)
    assert streamed.to_bytes() == built.to_bytes()
    out = tmp_path / "out.img"
    done = run("receive", str(stream), "-o", str(out), redis_url=redis_url)
    assert b"rebuilt and verified" in done.stdout
    assert out.read_bytes() == Path(indexed["source"]).read_bytes()


@pytest.mark.parametrize("block_size", [512, 4096])
def test_images_of_many_segments_with_every_kind_in_each(tmp_path, redis_url, block_size):
    """The receiver hashes each segment once nothing more is written to it: DUP runs crossing
    segments, zero segments, LOCAL groups and the partial tail must all be in before that."""
    images = spread_fleet(tmp_path, block_size)
    run("index", str(tmp_path / "dst"), "--host", HOST, "--block-size", str(block_size), redis_url=redis_url)
    out = tmp_path / "out.img"
    sent, received = pipe([images["source"], "--to", HOST, "--json"], ["-o", str(out), "--json"], redis_url)
    assert received.returncode == 0, received.stderr.decode()
    blocks = json.loads(sent.stderr)["blocks"]
    assert min(blocks.values()) > 0
    assert out.read_bytes() == Path(images["source"]).read_bytes()
    assert out.stat().st_blocks * 512 < out.stat().st_size  # the zero segment stayed a hole


@pytest.mark.tools("qemu-img")
def test_qcow2_in_and_out(tmp_path, redis_url, indexed):
    source = tmp_path / "source.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", indexed["source"], str(source)], check=True)
    out = tmp_path / "out.qcow2"
    sent, received = pipe([str(source), "--to", HOST], ["-o", str(out), "--output-format", "qcow2"], redis_url)
    assert received.returncode == 0, received.stderr.decode()
    assert subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", indexed["source"], str(out)]
                          ).returncode == 0


def test_a_stale_local_image_fails_with_advice_and_writes_nothing(tmp_path, redis_url, indexed):
    host_image = indexed["host"][0]
    status = os.stat(host_image)
    with open(host_image, "r+b") as handle:  # changed behind the index's back: same size and mtime
        handle.seek(60 * 512)
        handle.write(b"changed after indexing")
    os.utime(host_image, ns=(status.st_atime_ns, status.st_mtime_ns))
    out = tmp_path / "out.img"
    sent, received = pipe([indexed["source"], "--to", HOST], ["-o", str(out)], redis_url)
    one_line_error(_text(received), 1, "did not match the source", "re-index this host")
    assert not out.exists() and leftovers(tmp_path) == []
    assert Path(str(out) + ".missing-ranges.json").exists()


def _text(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def _stream(tmp_path: Path, redis_url: str, images: dict) -> bytes:
    path = tmp_path / "vm.stream"
    run("send", images["source"], "--to", HOST, "-o", str(path), redis_url=redis_url)
    return path.read_bytes()


@pytest.mark.parametrize("cut", [0, 10, 100, -1000, -60, -1])
def test_a_truncated_stream_writes_nothing(tmp_path, redis_url, indexed, cut):
    data = _stream(tmp_path, redis_url, indexed)
    damaged = tmp_path / "damaged.stream"
    damaged.write_bytes(data[:cut])
    out = tmp_path / "out.img"
    with open(damaged, "rb") as stdin:
        done = run("receive", "-o", str(out), redis_url=redis_url, check=False, stdin=stdin)
    one_line_error(_text(done), 1, "stream on stdin")
    assert "empty" in done.stderr.decode() or "truncated" in done.stderr.decode()
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["magic", "manifest", "bundle"])
def test_a_corrupt_stream_writes_nothing(tmp_path, redis_url, indexed, where):
    data = bytearray(_stream(tmp_path, redis_url, indexed))
    position = {"magic": 2, "manifest": 16 + 100, "bundle": len(data) - 300}[where]
    data[position] ^= 0x40
    damaged = tmp_path / "damaged.stream"
    damaged.write_bytes(bytes(data))
    out = tmp_path / "out.img"
    done = run("receive", str(damaged), "-o", str(out), redis_url=redis_url, check=False)
    one_line_error(_text(done), 1, str(damaged))
    assert {"magic": "not a blocksketch migration stream", "manifest": "corrupt",
            "bundle": "corrupt"}[where] in done.stderr.decode()
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_source_changed_after_its_manifest_fails_at_the_receiver(tmp_path, redis_url, indexed):
    """The sender does not re-read the whole image: the receiver's whole-image checksum is what
    stops an image that changed between the manifest and its blocks."""
    stream = tmp_path / "vm.stream"
    with open_store(redis_url) as store:
        outgoing = prepare_send(store, indexed["source"], HOST)
    try:
        manifest = outgoing.manifest
        first_send = int(manifest.runs_of(2)[0][0])
        with open(indexed["source"], "r+b") as handle:
            handle.seek(first_send * 512)
            handle.write(b"written by the VM after the manifest")
        with open(stream, "wb") as handle:  # the stamp taken now: the sender's own check cannot see it
            from sketch.stream import image_stamp

            write_stream(handle, outgoing.source, manifest, image_stamp(indexed["source"]))
    finally:
        outgoing.close()
    out = tmp_path / "out.img"
    done = run("receive", str(stream), "-o", str(out), redis_url=redis_url, check=False)
    one_line_error(_text(done), 1, "does not match the manifest's checksum")
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_source_changed_while_sent_cuts_the_stream(tmp_path, redis_url, indexed):
    with open_store(redis_url) as store:
        outgoing = prepare_send(store, indexed["source"], HOST)
    stream = tmp_path / "vm.stream"
    try:
        os.utime(indexed["source"], ns=(0, 10**9))  # a write would move the mtime like this
        with open(stream, "wb") as handle, pytest.raises(ImageError, match="changed while it was sent"):
            write_stream(handle, outgoing.source, outgoing.manifest, outgoing.stamp)
    finally:
        outgoing.close()
    done = run("receive", str(stream), "-o", str(tmp_path / "out.img"), redis_url=redis_url, check=False)
    one_line_error(_text(done), 1, "truncated")


def test_a_receiver_that_dies_stops_the_sender_with_one_line(tmp_path, redis_url):
    images = spread_fleet(tmp_path)
    run("index", str(tmp_path / "dst"), "--host", HOST, "--block-size", "4096", redis_url=redis_url)
    env = {**os.environ, "BLOCKSKETCH_REDIS_URL": redis_url}
    sender = subprocess.Popen([*CLI, "send", images["source"], "--to", HOST], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    assert sender.stdout.read(len(MAGIC)) == MAGIC
    sender.stdout.close()
    _, err = sender.communicate(timeout=60)
    done = subprocess.CompletedProcess(sender.args, sender.returncode, "", err.decode())
    one_line_error(done, 1, "closed the pipe")


def test_usage_errors(tmp_path, redis_url, indexed):
    done = run("send", indexed["source"], "--to", HOST, "--exclude-host", "x", "-o", str(tmp_path / "s"),
               redis_url=redis_url, check=False)
    one_line_error(_text(done), 2, "do not go with --to")
    assert not (tmp_path / "s").exists()
    done = run("send", str(tmp_path / "missing.img"), "--to", HOST, "-o", str(tmp_path / "s"), redis_url=redis_url,
               check=False)
    assert done.returncode != 0 and b"Traceback" not in done.stderr and not (tmp_path / "s").exists()
    stream = tmp_path / "vm.stream"
    stream.write_bytes(_stream(tmp_path, redis_url, indexed))
    done = run("receive", str(stream), "-o", str(tmp_path / "out.img"), "--host", "elsewhere", redis_url=redis_url,
               check=False)
    one_line_error(_text(done), 2, "built for host")
    out = tmp_path / "exists.img"
    out.write_bytes(b"keep me")
    done = run("receive", str(stream), "-o", str(out), redis_url=redis_url, check=False)
    one_line_error(_text(done), 2, "--force")
    assert out.read_bytes() == b"keep me"
    done = run("receive", str(tmp_path / "nothing.stream"), "-o", str(tmp_path / "o"), redis_url=redis_url,
               check=False)
    one_line_error(_text(done), 2, "cannot read stream")


def test_an_unreachable_index_is_one_line(tmp_path, indexed):
    done = run("send", indexed["source"], "--to", HOST, "-o", str(tmp_path / "s"),
               redis_url="redis://127.0.0.1:1", check=False)
    one_line_error(_text(done), 1)
    assert not (tmp_path / "s").exists()


def test_a_partial_file_of_a_killed_receiver_is_cleaned_by_the_next(tmp_path, redis_url, indexed):
    out = tmp_path / "out.img"
    stale = Path(partial_path(str(out), 999999))  # no such process
    stale.write_bytes(b"left by a receiver killed with -9")
    stream = tmp_path / "vm.stream"
    stream.write_bytes(_stream(tmp_path, redis_url, indexed))
    run("receive", str(stream), "-o", str(out), redis_url=redis_url)
    assert not stale.exists() and out.read_bytes() == Path(indexed["source"]).read_bytes()


def test_manifest_of_the_stream_round_trips(tmp_path, redis_url, indexed):
    data = _stream(tmp_path, redis_url, indexed)
    path = tmp_path / "vm.stream"
    with open(path, "rb") as handle:
        manifest = read_stream_manifest(handle)
        assert handle.tell() == 16 + len(manifest.to_bytes())
    assert Manifest.from_bytes(manifest.to_bytes()).manifest_id == manifest.manifest_id
    assert data.startswith(MAGIC)


def test_a_long_run_to_send_is_read_in_pieces(tmp_path, redis_url):
    """A host that holds none of the image: one SEND run of 10 MiB, read 4 MiB at a time, and a
    partial last block."""
    (tmp_path / "dst").mkdir()
    write_image(str(tmp_path / "dst" / "other.img"), random_blocks(np.random.default_rng(2), 64, 4096))
    run("index", str(tmp_path / "dst"), "--host", HOST, "--block-size", "4096", redis_url=redis_url)
    source = tmp_path / "source.img"
    source.write_bytes(np.random.default_rng(9).bytes((10 << 20) + 100))
    out = tmp_path / "out.img"
    sent, received = pipe([str(source), "--to", HOST, "--json"], ["-o", str(out)], redis_url)
    assert received.returncode == 0, received.stderr.decode()
    assert json.loads(sent.stderr)["blocks"]["send"] == -(-((10 << 20) + 100) // 4096)
    assert out.read_bytes() == source.read_bytes()
