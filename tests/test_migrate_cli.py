"""The manifest, pack, apply and migrate commands, run as a user runs them (real processes, real Redis)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_manifest import fleet

HOST = "dst"


def run(*args: str, redis_url: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "BLOCKSKETCH_REDIS_URL": redis_url, "BLOCKSKETCH_HOST": HOST}
    done = subprocess.run([sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def one_line_error(done: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blocksketch: error: "), done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def indexed(tmp_path, redis_url):
    images = fleet(tmp_path, 512, host_dir="dst")
    run("index", str(tmp_path / "dst"), "--host", HOST, "--block-size", "512", redis_url=redis_url)
    return images


@pytest.mark.parametrize("command", ["manifest", "pack", "apply", "migrate"])
def test_help_has_an_example(command):
    done = subprocess.run([sys.executable, "-m", "cli", command, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "Example:" in done.stdout and f"blocksketch {command} " in done.stdout


def test_migrate_reports_wan_bytes_and_rebuilds_the_image(tmp_path, redis_url, indexed):
    out = tmp_path / "out.img"
    done = run("migrate", indexed["source"], "--to", HOST, "-o", str(out), "--json", redis_url=redis_url)
    report = json.loads(done.stdout)
    assert out.read_bytes() == Path(indexed["source"]).read_bytes()
    blocks = report["blocks"]
    assert sum(blocks.values()) == -(-report["size_bytes"] // 512)
    assert sum(report["bytes"].values()) == report["size_bytes"] == out.stat().st_size
    assert report["wan_bytes"] == report["manifest_bytes"] + report["bundle_bytes"] + report["extra_bundle_bytes"]
    assert report["extra_bundle_bytes"] == 0
    assert report["wan_bytes"] < report["bytes"]["send"] + report["bytes"]["dup"] + report["bytes"]["local"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".blocksketch-migrate")]


def test_migrate_resends_what_a_stale_index_gets_wrong(tmp_path, redis_url, indexed):
    with open(indexed["host"][0], "r+b") as handle:
        handle.seek(60 * 512)
        handle.write(b"changed after indexing")
    out = tmp_path / "out.img"
    report = json.loads(run("migrate", indexed["source"], "--to", HOST, "-o", str(out), "--json",
                            redis_url=redis_url).stdout)
    assert report["extra_bundle_bytes"] > 0
    assert out.read_bytes() == Path(indexed["source"]).read_bytes()


def test_manifest_pack_apply_and_the_ranges_round_trip(tmp_path, redis_url, indexed):
    manifest, bundle, out = tmp_path / "m", tmp_path / "b", tmp_path / "out.img"
    summary = json.loads(run("manifest", indexed["source"], "--to", HOST, "-o", str(manifest), "--json",
                             redis_url=redis_url).stdout)
    assert set(summary["blocks"]) == {"zero", "local", "dup", "send"}
    assert set(summary["bytes"]) == {"zero", "local", "dup", "send"}
    assert summary["manifest_bytes"] == manifest.stat().st_size
    packed = json.loads(run("pack", indexed["source"], str(manifest), "-o", str(bundle), "--json",
                            redis_url=redis_url).stdout)
    assert packed["blocks"] == summary["blocks"]["send"] and packed["bundle_bytes"] == bundle.stat().st_size

    with open(indexed["host"][1], "r+b") as handle:  # stale index on the destination
        handle.seek(0)
        handle.write(b"\xff" * 512)
    failed = run("apply", str(manifest), str(bundle), "-o", str(out), "--json", redis_url=redis_url, check=False)
    one_line_error(failed, 1, "did not match", "missing-ranges.json", "blocksketch pack IMAGE MANIFEST --ranges")
    assert json.loads(failed.stdout)["status"] == "missing"
    assert not out.exists()
    ranges = tmp_path / "out.img.missing-ranges.json"
    run("pack", indexed["source"], str(manifest), "--ranges", str(ranges), "-o", str(tmp_path / "extra"),
        redis_url=redis_url)
    done = run("apply", str(manifest), str(bundle), str(tmp_path / "extra"), "-o", str(out), "--json",
               redis_url=redis_url)
    assert json.loads(done.stdout)["status"] == "ok"
    assert out.read_bytes() == Path(indexed["source"]).read_bytes()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_manifest_is_one_line_and_exit_1(tmp_path, redis_url, indexed, damage):
    manifest = tmp_path / "m"
    run("manifest", indexed["source"], "--to", HOST, "-o", str(manifest), redis_url=redis_url)
    run("pack", indexed["source"], str(manifest), "-o", str(tmp_path / "b"), redis_url=redis_url)
    data = bytearray(manifest.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x80
    else:
        del data[len(data) // 2 :]
    manifest.write_bytes(bytes(data))
    for command in (["apply", str(manifest), str(tmp_path / "b"), "-o", str(tmp_path / "out")],
                    ["pack", indexed["source"], str(manifest), "-o", str(tmp_path / "b2")]):
        one_line_error(run(*command, redis_url=redis_url, check=False), 1, "manifest", "corrupt" if damage == "flip"
                       else "truncated")
    assert not (tmp_path / "out").exists() and not (tmp_path / "b2").exists()


def test_usage_errors_exit_2(tmp_path, redis_url, indexed):
    manifest = tmp_path / "m"
    run("manifest", indexed["source"], "--to", HOST, "-o", str(manifest), redis_url=redis_url)
    run("pack", indexed["source"], str(manifest), "-o", str(tmp_path / "b"), redis_url=redis_url)
    (tmp_path / "out").write_bytes(b"keep")
    one_line_error(run("apply", str(manifest), str(tmp_path / "b"), "-o", str(tmp_path / "out"),
                       redis_url=redis_url, check=False), 2, "--force")
    assert (tmp_path / "out").read_bytes() == b"keep"
    one_line_error(run("apply", str(manifest), str(tmp_path / "b"), "-o", str(tmp_path / "o2"), "--host", "x",
                       redis_url=redis_url, check=False), 2, "built for host")


def test_an_unknown_destination_is_a_clear_error(tmp_path, redis_url, indexed):
    one_line_error(run("manifest", indexed["source"], "--to", "nowhere", "-o", str(tmp_path / "m"),
                       redis_url=redis_url, check=False), 1, "nowhere")
    assert not (tmp_path / "m").exists()


def pack_into_apply(manifest: Path, image: str, out: Path, redis_url: str) -> tuple[subprocess.Popen, subprocess.Popen]:
    """``pack IMAGE MANIFEST -o - | apply MANIFEST - -o OUT`` through a real pipe; both finished processes."""
    env = {**os.environ, "BLOCKSKETCH_REDIS_URL": redis_url, "BLOCKSKETCH_HOST": HOST}
    pack = subprocess.Popen([sys.executable, "-m", "cli", "pack", image, str(manifest), "-o", "-", "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    apply = subprocess.Popen([sys.executable, "-m", "cli", "apply", str(manifest), "-", "-o", str(out), "--json"],
                             env=env, stdin=pack.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pack.stdout.close()  # apply holds the read end; pack sees EPIPE if apply quits early
    pack.stderr_text = pack.stderr.read().decode()
    apply.stdout_text, apply.stderr_text = apply.communicate(timeout=120)
    pack.wait(timeout=120)
    return pack, apply


def test_pack_to_stdout_streams_into_apply(tmp_path, redis_url, indexed):
    manifest, out = tmp_path / "m", tmp_path / "out.img"
    summary = json.loads(run("manifest", indexed["source"], "--to", HOST, "-o", str(manifest), "--json",
                             redis_url=redis_url).stdout)
    pack, apply = pack_into_apply(manifest, indexed["source"], out, redis_url)
    assert pack.returncode == 0 and apply.returncode == 0, (pack.stderr_text, apply.stderr_text)
    assert json.loads(pack.stderr_text)["blocks"] == summary["blocks"]["send"]  # the summary on stderr
    assert json.loads(apply.stdout_text)["status"] == "ok"
    assert out.read_bytes() == Path(indexed["source"]).read_bytes()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_a_streamed_pack_of_a_changed_image_is_rejected_by_apply(tmp_path, redis_url, indexed):
    manifest, out = tmp_path / "m", tmp_path / "out.img"
    run("manifest", indexed["source"], "--to", HOST, "-o", str(manifest), redis_url=redis_url)
    with open(indexed["source"], "r+b") as handle:  # a zero block, not sent: every frame stays valid
        handle.write(b"changed after the manifest")
    pack, apply = pack_into_apply(manifest, indexed["source"], out, redis_url)
    one_line_error(subprocess.CompletedProcess([], pack.returncode, "", pack.stderr_text), 1, "no longer matches")
    one_line_error(subprocess.CompletedProcess([], apply.returncode, "", apply.stderr_text), 1, "truncated")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
