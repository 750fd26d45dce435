"""Thin disks: a 2 TiB sparse image holding a few MiB costs what its data costs (issue 15, item 1).

Every command runs as a child process under an address-space limit (RLIMIT_AS) of 1 GiB: a row
per block of a 2 TiB disk at 512 B would be 4Gi rows (64 GiB of digests, 4 GiB of zero flags
alone), so any array sized by the disk's blocks fails at once. Outputs are compared extent by
extent (SEEK_DATA/SEEK_HOLE) and must stay sparse: reading 2 TiB of holes would take minutes.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TIB = 1 << 40
MIB = 1 << 20
VIRTUAL = 2 * TIB
ADDRESS_SPACE = 1 << 30  # a Python + numpy + CLI process needs well under 512 MiB here
BLOCK = 512


def limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def cli(*args: str, env: dict, stdin=None, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "cli", *args], env=env, stdin=stdin, stdout=stdout,
                          stderr=subprocess.PIPE, preexec_fn=limited, timeout=120)
    assert done.returncode == 0, f"{' '.join(args)}: exit {done.returncode}: {done.stderr.decode()}"
    return done


def data_extents(path: str) -> list[tuple[int, int]]:
    extents = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                break
            offset = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, offset - start))
    finally:
        os.close(fd)
    return extents


def assert_same_sparse_image(source: str, output: str) -> None:
    """Same size, same bytes in every data extent of either file, and the output stays thin."""
    assert os.path.getsize(output) == os.path.getsize(source)
    assert os.stat(output).st_blocks * 512 < 64 * MIB, "the rebuilt image is not sparse"
    with open(source, "rb") as a, open(output, "rb") as b:
        for path in (source, output):
            for offset, length in data_extents(path):
                assert os.pread(a.fileno(), length, offset) == os.pread(b.fileno(), length, offset), \
                    f"bytes differ in [{offset}, {offset + length}) of {path}"


@pytest.fixture(scope="module")
def thin(tmp_path_factory) -> dict:
    """A 2 TiB raw disk with 4 MiB of data at its start, middle and very end, and a basis image.

    The data holds zero blocks inside extents, a repeated block, blocks the destination has (its
    basis is the first MiB of the source) and blocks it lacks.
    """
    work = tmp_path_factory.mktemp("thin")
    rng = np.random.default_rng(15)
    first = rng.integers(0, 256, MIB, dtype=np.uint8)
    first[64 * BLOCK : 80 * BLOCK] = 0  # zero blocks inside a data extent
    middle = rng.integers(0, 256, 2 * MIB, dtype=np.uint8)
    middle[:BLOCK] = first[BLOCK : 2 * BLOCK]  # a block the destination holds
    middle[4 * BLOCK : 5 * BLOCK] = middle[9 * BLOCK : 10 * BLOCK]  # a repeated block
    last = rng.integers(0, 256, MIB, dtype=np.uint8)
    source = str(work / "thin.raw")
    with open(source, "wb") as handle:
        handle.truncate(VIRTUAL)
        for offset, data in ((0, first), (TIB + 12345 * BLOCK, middle), (VIRTUAL - MIB, last)):
            handle.seek(offset)
            handle.write(data.tobytes())
    basis = str(work / "basis.raw")
    Path(basis).write_bytes(first.tobytes())
    qcow2 = str(work / "thin.qcow2")
    done = subprocess.run(["qemu-img", "convert", "-O", "qcow2", source, qcow2], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return {"work": work, "source": source, "qcow2": qcow2, "basis": basis,
            "data_blocks": (4 * MIB) // BLOCK - 16}


@pytest.fixture
def fleet(thin, redis_url) -> dict:
    env = {**os.environ, "BLOCKSKETCH_REDIS_URL": redis_url, "BLOCKSKETCH_HOST": "dst"}
    cli("index", thin["basis"], "--host", "dst", "--block-size", str(BLOCK), env=env)
    return env


@pytest.mark.tools("qemu-img")
@pytest.mark.parametrize("kind", ["source", "qcow2"])
def test_a_2_tib_thin_image_is_indexed_and_ranked_in_bounded_memory(thin, fleet, kind):
    image = thin[kind]
    indexed = json.loads(cli("index", image, "--host", "thin-host", "--json", env=fleet).stdout)
    assert indexed, "index printed nothing"
    ranked = json.loads(cli("rank", image, "--from", "thin-host", "--json", env=fleet).stdout)
    assert ranked["total_blocks"] == VIRTUAL // BLOCK
    assert ranked["total_blocks"] - ranked["zero_blocks"] == thin["data_blocks"]
    assert ranked["hosts"][0]["host"] == "dst"
    compared = json.loads(cli("compare", image, thin["basis"], "--json", env=fleet).stdout)
    assert compared["zero_blocks"] == VIRTUAL // BLOCK - thin["data_blocks"]


@pytest.mark.tools("qemu-img")
@pytest.mark.parametrize("kind", ["source", "qcow2"])
def test_a_2_tib_thin_image_migrates_byte_exact_through_send_and_receive(thin, fleet, kind, tmp_path):
    output = str(tmp_path / "received.raw")
    sender = subprocess.Popen([sys.executable, "-m", "cli", "send", thin[kind], "--to", "dst"], env=fleet,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limited)
    try:
        cli("receive", "-o", output, "--host", "dst", env=fleet, stdin=sender.stdout)
    finally:
        sender.stdout.close()
        _, err = sender.communicate(timeout=120)
    assert sender.returncode == 0, err.decode()
    assert_same_sparse_image(thin["source"], output)


@pytest.mark.tools("qemu-img")
def test_a_2_tib_thin_image_migrates_byte_exact_through_manifest_pack_and_apply(thin, fleet, tmp_path):
    manifest, bundle, output = (str(tmp_path / name) for name in ("thin.manifest", "thin.bundle", "out.raw"))
    summary = json.loads(cli("manifest", thin["source"], "--to", "dst", "-o", manifest, "--json", env=fleet).stdout)
    assert summary, "manifest printed nothing"
    cli("pack", thin["source"], manifest, "-o", bundle, env=fleet)
    assert os.path.getsize(bundle) < 8 * MIB
    cli("apply", manifest, bundle, "-o", output, "--host", "dst", env=fleet)
    assert_same_sparse_image(thin["source"], output)
