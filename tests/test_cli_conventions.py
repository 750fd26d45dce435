"""Conventions every command keeps: one-line errors, ``-`` is stdout, no file replaced unasked and
none ever written onto an input, write failures exit 1, SIGTERM leaves nothing half-done."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sketch.manifest import Manifest
from sketch.sample import random_blocks, write_image
from tests.test_manifest import fleet

HOST = "dst"
CLI = [sys.executable, "-m", "cli"]


def run(*args: str, redis_url: str | None = None, stdout=subprocess.PIPE, preexec_fn=None,
        code: int | None = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "BLOCKSKETCH_HOST": HOST}
    if redis_url:
        env["BLOCKSKETCH_REDIS_URL"] = redis_url
    done = subprocess.run([*CLI, *args], env=env, stdout=stdout, stderr=subprocess.PIPE, timeout=120,
                          preexec_fn=preexec_fn)
    if code is not None:
        assert done.returncode == code, f"{args}: exit {done.returncode}: {done.stderr.decode()}"
    return done


def one_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blocksketch: error: "), done.stderr.decode()
    return lines[0]


@pytest.fixture
def indexed(tmp_path, redis_url):
    images = fleet(tmp_path, 512, host_dir="dst")
    run("index", str(tmp_path / "dst"), "--host", HOST, "--block-size", "512", redis_url=redis_url)
    return {"source": str(images["source"]), "host": [str(p) for p in images["host"]]}


@pytest.mark.parametrize("args, fragment", [
    (["index", "--bogus"], "No such option '--bogus'"),
    (["rank"], "Missing argument 'IMAGE'"),
    (["pack", "a", "b", "-o", "c", "--level", "99"], "'99' is not auto or a zstd level from 1 to 22"),
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
])
def test_a_usage_error_is_one_line_and_exit_2(args, fragment):
    line = one_line(run(*args, code=2))
    assert fragment in line and "--help" in line


def test_debug_is_documented_in_help():
    assert "--debug" in run("--help").stdout.decode()


@pytest.mark.parametrize("command", ["manifest", "pack", "send"])
def test_no_command_writes_onto_its_own_input_even_with_force(indexed, tmp_path, redis_url, command):
    source = indexed["source"]
    before = Path(source).read_bytes()
    run("manifest", source, "--to", HOST, "-o", str(tmp_path / "m"), redis_url=redis_url)
    args = {"manifest": ["manifest", source, "--to", HOST, "-o", source],
            "pack": ["pack", source, str(tmp_path / "m"), "-o", source],
            "send": ["send", source, "--to", HOST, "-o", source]}[command]
    for force in ([], ["--force"]):
        line = one_line(run(*args, *force, redis_url=redis_url, code=2))
        assert "an input of this command" in line
    assert Path(source).read_bytes() == before


def test_a_link_to_an_input_is_that_input(indexed, tmp_path, redis_url):
    source = indexed["source"]
    os.symlink(source, tmp_path / "alias.img")
    os.link(source, tmp_path / "hard.img")
    run("manifest", source, "--to", HOST, "-o", str(tmp_path / "m"), redis_url=redis_url)
    for alias in ("alias.img", "hard.img"):
        line = one_line(run("pack", source, str(tmp_path / "m"), "-o", str(tmp_path / alias), "--force",
                            redis_url=redis_url, code=2))
        assert "is the same file as an input" in line
    assert Path(tmp_path / "hard.img").read_bytes() == Path(source).read_bytes()


@pytest.mark.parametrize("command", ["manifest", "pack", "send", "export-filter"])
def test_an_existing_output_is_replaced_only_with_force(indexed, tmp_path, redis_url, command):
    source = indexed["source"]
    run("manifest", source, "--to", HOST, "-o", str(tmp_path / "m"), redis_url=redis_url)
    out = tmp_path / "precious"
    out.write_bytes(b"precious")
    args = {"manifest": ["manifest", source, "--to", HOST],
            "pack": ["pack", source, str(tmp_path / "m")],
            "send": ["send", source, "--to", HOST],
            "export-filter": ["export-filter", "--host", HOST]}[command]
    line = one_line(run(*args, "-o", str(out), redis_url=redis_url, code=2))
    assert line.endswith("exists; pass --force to overwrite it")
    assert out.read_bytes() == b"precious"
    run(*args, "-o", str(out), "--force", redis_url=redis_url)
    assert out.read_bytes() != b"precious"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_dash_is_stdout_for_every_command_that_writes(indexed, tmp_path, redis_url):
    source = indexed["source"]
    with open(tmp_path / "m", "wb") as out:
        done = run("manifest", source, "--to", HOST, "-o", "-", "--json", redis_url=redis_url, stdout=out)
    assert json.loads(done.stderr)["manifest"] == "-"
    assert Manifest.load(str(tmp_path / "m")).host == HOST
    assert not (tmp_path / "-").exists() and not Path("-").exists()
    with open(tmp_path / "f", "wb") as out:
        run("export-filter", "--host", HOST, "-o", "-", redis_url=redis_url, stdout=out)
    assert (tmp_path / "f").stat().st_size > 40
    with open(tmp_path / "b", "wb") as out:
        run("pack", source, str(tmp_path / "m"), "-o", "-", "--level", "auto", redis_url=redis_url, stdout=out)
    run("apply", str(tmp_path / "m"), str(tmp_path / "b"), "-o", str(tmp_path / "out"), redis_url=redis_url)
    assert (tmp_path / "out").read_bytes() == Path(source).read_bytes()


def _limit_file_size():
    # Past RLIMIT_FSIZE a write fails with EFBIG, as it fails with ENOSPC on a full disk; without
    # ignoring SIGXFSZ the kernel would kill the process instead.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


@pytest.mark.parametrize("command", ["manifest", "pack", "send"])
def test_a_write_that_fails_is_exit_1_and_leaves_nothing(indexed, tmp_path, redis_url, command):
    source = indexed["source"]
    run("manifest", source, "--to", HOST, "-o", str(tmp_path / "m"), redis_url=redis_url)
    out = tmp_path / "out"
    args = {"manifest": ["manifest", source, "--to", HOST, "--block-size", "512"],
            "pack": ["pack", source, str(tmp_path / "m"), "--level", "1"],
            "send": ["send", source, "--to", HOST, "--level", "1"]}[command]
    # The manifest is small: give it a limit below its size.
    limit = _limit_file_size if command != "manifest" else _limit_tiny
    line = one_line(run(*args, "-o", str(out), redis_url=redis_url, preexec_fn=limit, code=1))
    assert "cannot write" in line and "File too large" in line
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _limit_tiny():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))


def _wait_for(predicate, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_sigterm_to_receive_leaves_no_partial_file(indexed, tmp_path, redis_url):
    source = indexed["source"]
    run("send", source, "--to", HOST, "-o", str(tmp_path / "s"), redis_url=redis_url)
    data = (tmp_path / "s").read_bytes()
    out = tmp_path / "out.img"
    env = {**os.environ, "BLOCKSKETCH_HOST": HOST, "BLOCKSKETCH_REDIS_URL": redis_url}
    receiver = subprocess.Popen([*CLI, "receive", "-o", str(out)], env=env, stdin=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    receiver.stdin.write(data[: len(data) // 2])  # half a stream, then nothing: receive waits
    receiver.stdin.flush()
    _wait_for(lambda: any(p.name.startswith(".out.img.blocksketch-partial-") for p in tmp_path.iterdir()))
    receiver.send_signal(signal.SIGTERM)
    _, err = receiver.communicate(timeout=30)
    assert receiver.returncode == 128 + signal.SIGTERM
    assert err.decode().strip() == "blocksketch: stopped (SIGTERM); nothing half-written was left"
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_sigterm_to_index_releases_the_lock_and_the_embedded_store(tmp_path, isolated_home):
    images = tmp_path / "images"
    images.mkdir()
    rng = __import__("numpy").random.default_rng(1)
    for n in range(6):
        write_image(str(images / f"{n}.img"), random_blocks(rng, 60_000, 512))  # ~30 MiB each
    env = {**os.environ, "BLOCKSKETCH_HOST": HOST}
    indexer = subprocess.Popen([*CLI, "index", str(images), "--host", HOST], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    pid_file = isolated_home / "store" / "server.pid"
    _wait_for(pid_file.exists)
    # Stop it while it holds the host's refresh lock (it digests for a while after taking it).
    import redis

    from store.embedded import EmbeddedServer

    client = redis.Redis.from_url(EmbeddedServer(isolated_home).url)
    _wait_for(lambda: client.exists(f"blocksketch:{{{HOST}}}:lock") or indexer.poll() is not None, 60)
    assert indexer.poll() is None, "the refresh finished before it could be stopped"
    indexer.send_signal(signal.SIGTERM)
    _, err = indexer.communicate(timeout=60)
    assert indexer.returncode == 128 + signal.SIGTERM, err.decode()
    assert "stopped (SIGTERM)" in err.decode()
    client.close()
    server_pid = int(pid_file.read_text()) if pid_file.exists() else None
    if server_pid is not None:
        _wait_for(lambda: not os.path.exists(f"/proc/{server_pid}") or
                  Path(f"/proc/{server_pid}/stat").read_text().split()[2] == "Z", 30)
    # The lock is free: the next refresh runs at once and indexes everything.
    done = run("index", str(images), "--host", HOST, "--json")
    assert json.loads(done.stdout)["images"] == 6


def _stderr_on_a_terminal(args: list[str], env: dict, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal (progress is for terminals only); its text."""
    import fcntl
    import pty
    import struct
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a real terminal's size
    process = subprocess.Popen([*CLI, *args], env=env, stdin=stdin, stdout=stdout, stderr=terminal)
    os.close(terminal)
    seen = bytearray()
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the process closed its end
            break
        if not chunk:
            break
        seen.extend(chunk)
    os.close(controller)
    return process.wait(timeout=60), seen.decode(errors="replace")


def test_send_and_receive_on_a_terminal_show_every_phase(indexed, tmp_path, redis_url):
    env = {**os.environ, "BLOCKSKETCH_REDIS_URL": redis_url, "BLOCKSKETCH_HOST": "elsewhere"}
    with open(tmp_path / "s", "wb") as stream:
        code, shown = _stderr_on_a_terminal(["send", indexed["source"]], env, stdout=stream)
    assert code == 0, shown
    for phase in ("digest source.img", "rank", "plan for dst", "send to dst (blocks read)"):
        assert phase in shown, shown
    env["BLOCKSKETCH_HOST"] = HOST
    with open(tmp_path / "s", "rb") as stream:
        code, shown = _stderr_on_a_terminal(["receive", "-o", str(tmp_path / "out")], env, stdin=stream)
    assert code == 0, shown
    for phase in ("receive", "verify the whole image"):
        assert phase in shown, shown
    assert (tmp_path / "out").read_bytes() == Path(indexed["source"]).read_bytes()


def test_index_on_a_terminal_shows_digest_sketches_and_publish(tmp_path, redis_url):
    images = tmp_path / "images"
    images.mkdir()
    rng = __import__("numpy").random.default_rng(2)
    write_image(str(images / "a.img"), random_blocks(rng, 4000, 512))
    env = {**os.environ, "BLOCKSKETCH_REDIS_URL": redis_url}
    code, shown = _stderr_on_a_terminal(["index", str(images), "--host", "node-a"], env)
    assert code == 0, shown
    for phase in ("index node-a: digest", "index node-a: host sketches", "index node-a: publish"):
        assert phase in shown, shown


def test_manifest_on_a_terminal_shows_maps_digest_and_plan(indexed, tmp_path, redis_url):
    env = {**os.environ, "BLOCKSKETCH_REDIS_URL": redis_url}
    code, shown = _stderr_on_a_terminal(["manifest", indexed["source"], "--to", HOST, "-o", str(tmp_path / "m")],
                                        env)
    assert code == 0, shown
    for phase in (f"read {HOST}'s block maps", "digest source.img", f"plan for {HOST}"):
        assert phase in shown, shown
