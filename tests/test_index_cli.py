"""The index, hosts, images and export-filter commands, run as real processes against a real Redis."""

from __future__ import annotations

import json
import subprocess
import sys

import pybloom_live
import pytest

from sketch.blockmap import key_digests, union_keys
from tests.test_store_index import direct_map, write_fleet


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def indexed(redis_url, tmp_path):
    paths = write_fleet(tmp_path / "images", count=2)
    result = run_cli("index", "--host", "node-a", "--redis", redis_url, str(tmp_path / "images"), "--json")
    assert result.returncode == 0, result.stderr
    return paths, json.loads(result.stdout)


def test_index_json_reports_what_it_did(indexed, redis_url, tmp_path):
    paths, report = indexed
    assert report["host"] == "node-a" and report["images"] == 2 and sorted(report["indexed"]) == paths
    assert report["block_size"] == 512 and report["reused"] == 0 and report["store"] == redis_url
    again = run_cli("index", "--host", "node-a", "--redis", redis_url, str(tmp_path / "images"))
    assert again.returncode == 0 and "2 unchanged" in again.stdout and "0 indexed" in again.stdout


def test_images_and_hosts_json_rows(indexed, redis_url):
    paths, _ = indexed
    images = json.loads(run_cli("images", "--json", "--redis", redis_url).stdout)
    assert [row["path"] for row in images] == paths
    for row, path in zip(images, paths):
        expected = direct_map(path)
        assert {"host", "path", "size_bytes", "total_blocks", "unique_blocks", "zero_blocks",
                "indexed_at"} <= set(row)
        assert (row["total_blocks"], row["zero_blocks"], row["unique_blocks"]) == (
            expected.total_blocks, expected.zero_blocks, expected.unique_blocks)
        assert row["indexed_at"].endswith("Z")
    (host,) = json.loads(run_cli("hosts", "--json", "--redis", redis_url).stdout)
    assert set(host) == {"host", "images", "size_bytes", "disk_bytes", "distinct_blocks", "sketch_bytes",
                         "refreshed_at"}
    assert host["images"] == 2 and host["distinct_blocks"] == len(union_keys([direct_map(p).keys for p in paths]))
    assert json.loads(run_cli("images", "--json", "--host", "nope", "--redis", redis_url).stdout or "null") is None


def test_tables_have_headers_and_one_row_each(indexed, redis_url):
    paths, _ = indexed
    table = run_cli("images", "--redis", redis_url).stdout.splitlines()
    assert table[0].split()[:4] == ["host", "path", "file", "disk"] and len(table) == 3
    assert run_cli("hosts", "--redis", redis_url).stdout.splitlines()[1].startswith("node-a")


def test_unknown_host_is_one_line_and_exit_1(indexed, redis_url):
    result = run_cli("images", "--host", "nope", "--redis", redis_url)
    assert result.returncode == 1
    assert result.stderr.strip() == "blocksketch: error: host nope is not in the index (indexed: node-a)"


def _hex(keys) -> list[str]:
    return [bytes(row).hex() for row in key_digests(keys)]


def test_export_filter_of_an_image_holds_its_exact_digests(indexed, redis_url, tmp_path):
    paths, _ = indexed
    output = tmp_path / "vm0.bloom"
    result = run_cli("export-filter", f"node-a:{paths[0]}", "-o", str(output), "--fp-rate", "0.001",
                     "--redis", redis_url, "--json")
    assert result.returncode == 0, result.stderr
    keys = direct_map(paths[0]).keys
    assert json.loads(result.stdout)["keys"] == len(keys)
    with open(output, "rb") as handle:
        bloom = pybloom_live.BloomFilter.fromfile(handle)
    assert bloom.error_rate == 0.001 and len(bloom) == len(keys)
    assert all(digest in bloom for digest in _hex(keys))


def test_export_filter_of_a_host_holds_the_union(indexed, redis_url, tmp_path):
    paths, _ = indexed
    output = tmp_path / "host.bloom"
    result = run_cli("export-filter", "--host", "node-a", "-o", str(output), "--redis", redis_url)
    assert result.returncode == 0, result.stderr
    union = union_keys([direct_map(p).keys for p in paths])
    with open(output, "rb") as handle:
        bloom = pybloom_live.BloomFilter.fromfile(handle)
    assert len(bloom) == len(union) and bloom.error_rate == 0.01
    assert all(digest in bloom for digest in _hex(union))


@pytest.mark.parametrize("args", [[], ["node-a:/x", "--host", "node-a"], ["no-colon"]])
def test_export_filter_usage_errors_exit_2(redis_url, tmp_path, args):
    result = run_cli("export-filter", *args, "-o", str(tmp_path / "out"), "--redis", redis_url)
    assert result.returncode == 2 and result.stderr.startswith("blocksketch: error:"), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["index", "hosts", "images", "export-filter"])
def test_help_has_an_example(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0 and "Example:\n    blocksketch " + command in result.stdout
