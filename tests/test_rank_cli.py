"""`blocksketch rank` as a user runs it: real files, a real Redis index, a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sketch.blockmap import BlockMap
from sketch.digests import digest_image
from sketch.metrics import share_metrics
from sketch.sample import random_blocks, write_image
from store import open_store, refresh_host

BLOCK = 512


def run_cli(*args: str, url: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("BLOCKSKETCH_REDIS_URL", None)
    if url:
        env["BLOCKSKETCH_REDIS_URL"] = url
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env, timeout=300)


def write_host(directory, rng, data: np.ndarray, share: float) -> list[str]:
    """Two images holding ``share`` of ``data`` (distinct blocks) between them, plus their own blocks."""
    os.makedirs(directory, exist_ok=True)
    chosen = data[rng.random(len(data)) < share]
    paths = []
    for number, part in enumerate(np.array_split(chosen, 2)):
        blocks = np.concatenate([part, random_blocks(rng, 16_000, BLOCK), np.zeros((2000, BLOCK), np.uint8)])
        path = os.path.join(directory, f"vm{number}.img")
        write_image(path, blocks[rng.permutation(len(blocks))])
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, redis_node):
    """A source image and four indexed hosts; the two best within ~1 point of each other.

    Hosts hold 32,000-49,000 distinct 512-byte blocks, more than a 32 KiB ranking sketch keeps at 2%
    FP, so their sketches sample (shift >= 1) and the estimate is really an estimate.
    """
    import redis

    client = redis.Redis.from_url(redis_node.url)
    client.flushall()
    client.close()
    root = tmp_path_factory.mktemp("rank-fleet")
    rng = np.random.default_rng(2010)
    data = random_blocks(rng, 27_000, BLOCK)
    source = np.concatenate([data, data[:3000], np.zeros((10_000, BLOCK), np.uint8)])
    source_path = str(root / "source.img")
    write_image(source_path, source[rng.permutation(len(source))])
    hosts = {}
    with open_store(redis_node.url) as store:
        for host, share in (("ams-1", 0.62), ("fra-2", 0.605), ("lon-3", 0.3), ("par-4", 0.0)):
            hosts[host] = write_host(root / host, rng, data, share)
            refresh_host(store, host, hosts[host], BLOCK)
    source_map = BlockMap.from_digests(digest_image(source_path, BLOCK))
    truth = {host: share_metrics(source_map, [BlockMap.from_digests(digest_image(p, BLOCK)) for p in paths])
             for host, paths in hosts.items()}
    return redis_node.url, source_path, hosts, truth


def test_rank_json_names_the_true_best_host_against_a_close_runner_up(fleet):
    url, source, _, truth = fleet
    ordered = sorted(truth, key=lambda h: (truth[h].shared_ratio, truth[h].shared_unique_blocks), reverse=True)
    gap = truth[ordered[0]].shared_ratio - truth[ordered[1]].shared_ratio
    assert 0 < gap < 0.015  # the runner-up is within 1.5 points

    done = run_cli("rank", source, "--json", url=url)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["winner"] == ordered[0] and result["block_size"] == BLOCK
    assert result["hosts_ranked"] == 4 and len(result["hosts"]) == 4
    for row in result["hosts"]:
        exact = truth[row["host"]]
        assert row["sample_shift"] >= 1  # sampled, not a full membership test
        assert abs(row["estimated_shared_ratio"] - exact.shared_ratio) <= 0.02
        assert abs(row["estimated_shared_unique_ratio"] - exact.shared_unique_ratio) <= 0.02
        if row["exact_rank"] is not None:
            assert row["exact_shared_ratio"] == exact.shared_ratio
            assert row["exact_shared_unique_ratio"] == exact.shared_unique_ratio
    assert [h["exact_rank"] for h in result["hosts"][:3]] == [1, 2, 3]
    assert result["best_image"]["host"] == ordered[0]
    assert isinstance(result["estimate_order_agrees"], bool)


def test_rank_prints_a_table_and_the_best_host(fleet):
    url, source, _, truth = fleet
    best = max(truth, key=lambda h: truth[h].shared_ratio)
    done = run_cli("rank", source, "--top", "2", url=url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].split()[:3] == ["host", "estimated", "%"]
    assert len(lines) >= 5 and lines[2].startswith(best)
    assert f"best host: {best}" in done.stdout and "best single image there:" in done.stdout


def test_rank_an_indexed_image_leaves_its_host_out(fleet):
    url, _, hosts, _ = fleet
    done = run_cli("rank", f"lon-3:{hosts['lon-3'][0]}", "--json", "--exact-top", "2", url=url)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert "lon-3" not in [h["host"] for h in result["hosts"]] and result["excluded_hosts"] == ["lon-3"]
    assert result["winner"] in ("ams-1", "fra-2")


def test_rank_errors_are_one_line(fleet, tmp_path):
    url, source, hosts, _ = fleet
    zeros = str(tmp_path / "zeros.img")
    write_image(zeros, np.zeros((64, BLOCK), np.uint8), sparse=False)
    cases = [
        (["rank", "nowhere:/a.img"], 1, "host nowhere is not in the index (indexed: ams-1, fra-2, lon-3, par-4)"),
        (["rank", "ams-1:/a.img"], 1, "no image /a.img on host ams-1 (indexed: "),
        (["rank", str(tmp_path / "missing.img")], 1, "no such image"),
        (["rank", source, "--block-size", "4096"], 1, "block size mismatch"),
        (["rank", zeros], 1, "has no non-zero blocks"),
        (["rank", source, "--exclude-host", "mars"], 1, "cannot exclude unknown host mars"),
    ]
    for args, code, message in cases:
        done = run_cli(*args, url=url)
        assert done.returncode == code, (args, done.stderr)
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, (args, done.stderr)
        assert "Traceback" not in done.stderr
    usage = run_cli("rank", source, "--top", "0", url=url)  # click's usage error: exit 2
    assert usage.returncode == 2 and "Invalid value for '--top'" in usage.stderr


def test_rank_on_an_empty_index(redis_url, tmp_path):
    image = str(tmp_path / "a.img")
    write_image(image, random_blocks(np.random.default_rng(1), 8, BLOCK))
    done = run_cli("rank", image, url=redis_url)
    assert done.returncode == 1 and "the index is empty" in done.stderr


def test_rank_help_has_an_example():
    done = run_cli("rank", "--help")
    assert done.returncode == 0 and "Example:" in done.stdout and "--exact-top" in done.stdout
