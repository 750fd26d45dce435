"""Every documented flow on the fleets users have: raw and qcow2 sources, destinations holding raw,
thin qcow2, compressed qcow2 and qcow2 overlays, through every way an image is moved.

The flow matrix runs real processes (``python -m cli``), a real Redis, a real ``serve`` and the
real qemu-img. Each destination host holds the same template, in its own format; the source is the
template with blocks moved, changed, repeated and zeroed, so every manifest has LOCAL, SEND, DUP and
ZERO runs and its LOCAL runs reach past the end of the thin qcow2 files (data beyond the file's
length). Every output must equal the source's guest-visible bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from sketch.sample import random_blocks, write_image
from tests.redis_server import RedisProcess
from tests.service_process import running_service

BLOCK_SIZE = 512
CLUSTER = 64 << 10  # qcow2's default cluster size
DISK_BYTES = 8 << 20
TOKEN = "flows-token"
DESTINATIONS = ("raw", "thin", "compressed", "overlay")
SOURCES = ("raw", "qcow2")
FLOWS = ("files", "pipe", "migrate", "service")


def qemu_img(*args: str) -> None:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not found: install qemu-utils")
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    assert done.returncode == 0, f"qemu-img {' '.join(args)}: {done.stderr}"


def cli(*args: str, env: dict, code: int = 0, stdin=None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "cli", *args], env=env, capture_output=True, stdin=stdin,
                          timeout=120)
    assert done.returncode == code, f"{' '.join(args)}: exit {done.returncode}: {done.stderr.decode()}"
    return done


def cli_env(redis_url: str, host: str | None = None) -> dict:
    env = {**os.environ, "BLOCKSKETCH_REDIS_URL": redis_url}
    if host is not None:
        env["BLOCKSKETCH_HOST"] = host
    return env


def template_bytes(rng: np.random.Generator) -> bytes:
    """A thin template: one 64 KiB stretch of data in every 512 KiB, the rest zeros."""
    image = bytearray(DISK_BYTES)
    for offset in range(0, DISK_BYTES, 8 * CLUSTER):
        image[offset : offset + CLUSTER] = random_blocks(rng, CLUSTER // BLOCK_SIZE, BLOCK_SIZE).tobytes()
    return bytes(image)


def source_bytes(template: bytes, rng: np.random.Generator) -> bytes:
    """The template with its stretches moved by a few blocks (LOCAL at other offsets), one stretch
    rewritten (SEND), a new block repeated (DUP) and one stretch zeroed (ZERO)."""
    image = bytearray(DISK_BYTES)
    stretches = list(range(0, DISK_BYTES, 8 * CLUSTER))
    for n, offset in enumerate(stretches):
        shift = (n % 5) * BLOCK_SIZE
        image[offset + shift + CLUSTER : offset + shift + 2 * CLUSTER] = template[offset : offset + CLUSTER]
    fresh = random_blocks(rng, 40, BLOCK_SIZE).tobytes()
    image[stretches[3] : stretches[3] + len(fresh)] = fresh
    image[stretches[5] : stretches[5] + len(fresh)] = fresh  # sent once, copied at the destination
    image[stretches[6] + CLUSTER : stretches[6] + 3 * CLUSTER] = bytes(2 * CLUSTER)
    return bytes(image[: DISK_BYTES - 1000])  # a partial last block


@dataclass(frozen=True)
class Fleet:
    root: Path
    sources: dict[str, str]  # format -> path
    expected: bytes  # the source's guest-visible bytes
    redis_url: str


@pytest.fixture(scope="module")
def flows_redis(tmp_path_factory):
    """A Redis of this module's own: other tests flush the shared one between tests."""
    server = RedisProcess(tmp_path_factory.mktemp("flows-redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, flows_redis) -> Fleet:
    root = tmp_path_factory.mktemp("flows")
    rng = np.random.default_rng(12)
    template = template_bytes(rng)
    (root / "template.raw").write_bytes(template)
    source = source_bytes(template, rng)
    (root / "src").mkdir()
    write_image(str(root / "src" / "vm.img"), np.frombuffer(source + bytes(-len(source) % BLOCK_SIZE), np.uint8)
                .reshape(-1, BLOCK_SIZE))
    os.truncate(root / "src" / "vm.img", len(source))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(root / "src" / "vm.img"), str(root / "src" / "vm.qcow2"))
    for name in DESTINATIONS:
        (root / name).mkdir()
    shutil.copy(root / "template.raw", root / "raw" / "base.img")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(root / "template.raw"), str(root / "thin" / "base.qcow2"))
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(root / "template.raw"),
             str(root / "compressed" / "base.qcow2"))
    # The overlay's base holds the first half of the template; the overlay itself only the rest.
    half = bytearray(template)
    half[DISK_BYTES // 2 :] = bytes(DISK_BYTES // 2)
    (root / "half.raw").write_bytes(bytes(half))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(root / "half.raw"), str(root / "overlay" / "base.qcow2"))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", str(root / "template.raw"),
             str(root / "overlay" / "vm.qcow2"))
    thin = os.path.getsize(root / "thin" / "base.qcow2")
    assert thin < DISK_BYTES // 2, "the thin qcow2 must hold data beyond its file's length"

    env = cli_env(flows_redis.url)
    for name in DESTINATIONS:
        cli("index", str(root / name), "--host", name, "--block-size", str(BLOCK_SIZE), env=env)
    sources = {"raw": str(root / "src" / "vm.img"), "qcow2": str(root / "src" / "vm.qcow2")}
    # Named one by one: a directory walk skips a raw file that is not whole sectors, as vm.img is.
    cli("index", *sources.values(), "--host", "origin", "--block-size", str(BLOCK_SIZE), env=env)
    return Fleet(root, sources, source, flows_redis.url)


@pytest.fixture(scope="module")
def service(fleet, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("flows-token") / "token"
    token_file.write_text(TOKEN)
    with running_service(str(token_file), fleet.redis_url) as url:
        yield url, str(token_file)


def move(flow: str, source: str, host: str, out: Path, fleet: Fleet, service) -> dict:
    """Move ``source`` to ``host`` as ``out`` through ``flow``; the manifest's block counts."""
    sender, receiver = cli_env(fleet.redis_url, "origin"), cli_env(fleet.redis_url, host)
    manifest, bundle = out.with_suffix(".manifest"), out.with_suffix(".bundle")
    if flow in ("files", "service"):
        if flow == "files":
            made = cli("manifest", source, "--to", host, "-o", str(manifest), "--json", env=sender)
        else:
            url, token_file = service
            made = cli("manifest", f"origin:{source}", "--to", host, "--server", url, "--token-file", token_file,
                       "-o", str(manifest), "--json", env=sender)
        cli("pack", source, str(manifest), "-o", str(bundle), env=sender)
        cli("apply", str(manifest), str(bundle), "-o", str(out), env=receiver)
        return json.loads(made.stdout)["blocks"]
    if flow == "pipe":
        stream = out.with_suffix(".stream")
        sent = json.loads(cli("send", source, "--to", host, "-o", str(stream), "--json", env=sender).stdout)
        with open(stream, "rb") as handle:
            cli("receive", "-o", str(out), env=receiver, stdin=handle)
        return sent["blocks"]
    report = json.loads(cli("migrate", source, "--to", host, "-o", str(out), "--json", env=sender).stdout)
    return report["blocks"]


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("destination", DESTINATIONS)
@pytest.mark.parametrize("source_format", SOURCES)
def test_every_flow_rebuilds_the_source_exactly_on_every_kind_of_destination(fleet, service, tmp_path, flow,
                                                                              destination, source_format):
    out = tmp_path / "out.img"
    blocks = move(flow, fleet.sources[source_format], destination, out, fleet, service)
    expected = fleet.expected
    if source_format == "qcow2":  # a qcow2 disk is whole sectors: qemu-img pads the raw tail with zeros
        expected += bytes(-len(expected) % 512)
    assert out.read_bytes() == expected
    assert blocks["local"] > 0 and blocks["send"] > 0 and blocks["dup"] > 0 and blocks["zero"] > 0


@pytest.mark.parametrize("destination", ["thin", "overlay"])
def test_a_qcow2_output_on_a_qcow2_destination_equals_the_source(fleet, tmp_path, destination):
    out = tmp_path / "out.qcow2"
    env = cli_env(fleet.redis_url, destination)
    with open(tmp_path / "s", "wb") as stream:
        subprocess.run([sys.executable, "-m", "cli", "send", fleet.sources["qcow2"], "--to", destination],
                       env=env, stdout=stream, check=True, timeout=120)
    with open(tmp_path / "s", "rb") as stream:
        cli("receive", "-o", str(out), "--output-format", "qcow2", env=env, stdin=stream)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", fleet.sources["raw"], str(out))


# -- a fleet where every node runs the refresh job ----------------------------------------------


@pytest.fixture
def indexed_everywhere(tmp_path, redis_url) -> dict:
    """This machine ("here") holds the source and is indexed; "near" holds most of it, "far" little."""
    rng = np.random.default_rng(5)
    pool = random_blocks(rng, 2000, BLOCK_SIZE)
    paths = {}
    for host in ("here", "near", "far"):
        (tmp_path / host).mkdir()
    write_image(str(tmp_path / "here" / "web.img"), pool)
    write_image(str(tmp_path / "near" / "base.img"), np.concatenate([pool[:1800], random_blocks(rng, 200, 512)]))
    write_image(str(tmp_path / "far" / "other.img"), np.concatenate([pool[:100], random_blocks(rng, 1900, 512)]))
    for host in ("here", "near", "far"):
        cli("index", str(tmp_path / host), "--host", host, "--block-size", str(BLOCK_SIZE),
            env=cli_env(redis_url))
        paths[host] = str(tmp_path / host)
    paths["source"] = str(tmp_path / "here" / "web.img")
    return paths


def test_send_from_an_indexed_source_picks_another_host_and_receive_rebuilds_it(indexed_everywhere, redis_url,
                                                                                tmp_path):
    source = indexed_everywhere["source"]
    out = tmp_path / "web.out"
    sender = subprocess.Popen([sys.executable, "-m", "cli", "send", source, "--json"],
                              env=cli_env(redis_url, "here"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    receiver = subprocess.run([sys.executable, "-m", "cli", "receive", "-o", str(out)], stdin=sender.stdout,
                              env=cli_env(redis_url, "near"), capture_output=True, timeout=120)
    sender.stdout.close()
    report = json.loads(sender.stderr.read())
    sender.wait(timeout=60)
    sender.stderr.close()
    assert sender.returncode == 0 and receiver.returncode == 0, receiver.stderr.decode()
    assert report["host"] == "near" and "here" in report["ranking"]["excluded_hosts"]
    assert out.read_bytes() == Path(source).read_bytes()


def test_rank_of_a_local_image_leaves_out_the_host_this_machine_is_indexed_as(indexed_everywhere, redis_url):
    source = indexed_everywhere["source"]
    ranked = json.loads(cli("rank", source, "--json", env=cli_env(redis_url, "here")).stdout)
    assert ranked["winner"] == "near" and ranked["excluded_hosts"] == ["here"]
    # --from names the source's host otherwise; this machine is then an ordinary candidate.
    ranked = json.loads(cli("rank", source, "--from", "far", "--json", env=cli_env(redis_url, "here")).stdout)
    assert ranked["winner"] == "here" and ranked["excluded_hosts"] == ["far"]
    # A machine that is not indexed excludes nothing and is no error.
    ranked = json.loads(cli("rank", source, "--json", env=cli_env(redis_url, "laptop")).stdout)
    assert ranked["winner"] == "here" and ranked["excluded_hosts"] == []


def test_a_source_host_named_with_from_must_be_indexed(indexed_everywhere, redis_url):
    done = cli("rank", indexed_everywhere["source"], "--from", "nohost", env=cli_env(redis_url, "here"), code=1)
    assert done.stderr.decode().strip() == \
        "blocksketch: error: cannot exclude unknown host nohost (indexed: far, here, near)"


def test_receive_on_another_machine_than_the_stream_names_is_refused(indexed_everywhere, redis_url, tmp_path):
    stream = tmp_path / "s"
    cli("send", indexed_everywhere["source"], "--to", "near", "-o", str(stream), env=cli_env(redis_url, "here"))
    with open(stream, "rb") as handle:
        done = cli("receive", "-o", str(tmp_path / "out"), env=cli_env(redis_url, "far"), stdin=handle, code=2)
    assert done.stderr.decode().strip() == (
        "blocksketch: error: the stream was made for host 'near', but this machine is 'far': run it there, "
        "or pass --host near if this machine is indexed under that name")
    assert not (tmp_path / "out").exists()


def test_images_and_hosts_show_a_thin_qcow2_file_beside_its_larger_disk(fleet):
    env = cli_env(fleet.redis_url)
    (row,) = json.loads(cli("images", "--host", "thin", "--json", env=env).stdout)
    assert row["size_bytes"] == os.path.getsize(fleet.root / "thin" / "base.qcow2") < row["disk_bytes"] == DISK_BYTES
    host = next(h for h in json.loads(cli("hosts", "--json", env=env).stdout) if h["host"] == "thin")
    assert host["size_bytes"] == row["size_bytes"] and host["disk_bytes"] == DISK_BYTES
    table = cli("images", "--host", "thin", env=env).stdout.decode().splitlines()
    assert table[0].split()[2:4] == ["file", "disk"] and "8.0 MiB" in table[1]


def test_a_destination_overlay_on_a_base_elsewhere_needs_the_same_backing_dir_at_apply(fleet, tmp_path):
    """An operator who keeps bases apart indexes with --backing-dir; apply and receive take it too."""
    bases, images = tmp_path / "bases", tmp_path / "images"
    bases.mkdir()
    images.mkdir()
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(fleet.root / "half.raw"), str(bases / "base.qcow2"))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-B", str(bases / "base.qcow2"), "-F", "qcow2",
             str(fleet.root / "template.raw"), str(images / "vm.qcow2"))
    env = cli_env(fleet.redis_url, "split")
    cli("index", str(images), "--host", "split", "--backing-dir", str(bases), "--block-size", str(BLOCK_SIZE),
        env=env)
    stream = tmp_path / "s"
    cli("send", fleet.sources["raw"], "--to", "split", "-o", str(stream), env=cli_env(fleet.redis_url, "origin"))
    with open(stream, "rb") as handle:
        refused = cli("receive", "-o", str(tmp_path / "out"), env=env, stdin=handle, code=1)
    line = refused.stderr.decode().strip()
    assert line.startswith("blocksketch: error: local image of the index cannot be read") and "\n" not in line
    assert not (tmp_path / "out").exists()
    with open(stream, "rb") as handle:
        cli("receive", "-o", str(tmp_path / "out"), "--backing-dir", str(bases), env=env, stdin=handle)
    assert (tmp_path / "out").read_bytes() == fleet.expected
