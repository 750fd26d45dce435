import json
import os
import subprocess
import sys


def test_demo_indexes_ranks_and_migrates_with_the_embedded_store(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "BLOCKSKETCH_REDIS_URL"}
    env["BLOCKSKETCH_HOME"] = str(tmp_path / "user-home")
    result = subprocess.run([sys.executable, "-m", "cli", "demo", "--json", "--keep", str(tmp_path / "demo")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ranking"]["winner"] == "ams-1"
    assert [h["host"] for h in report["ranking"]["hosts"]] == ["ams-1", "fra-2", "lon-3"]
    assert report["identical"] is True
    assert report["migration"]["wan_bytes"] < report["migration"]["size_bytes"] / 3
    assert "embedded" in report["store"]
    assert not (tmp_path / "user-home").exists()  # the user's own index is untouched
    assert (tmp_path / "demo" / "arrived-at-ams-1.img").exists()


def test_demo_prints_the_four_steps():
    result = subprocess.run([sys.executable, "-m", "cli", "demo"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for step in ("1. indexed 3 hosts", "2. ranked", "3. migrated", "4. the copy is byte-identical"):
        assert step in result.stdout


def test_demo_shows_where_each_block_came_from_and_how_to_keep_the_sample():
    result = subprocess.run([sys.executable, "-m", "cli", "demo"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("where each of its blocks came from\n")[1].splitlines()
    assert table[0].split()[:2] == ["kind", "meaning"]
    assert [line.split()[0] for line in table[1:5]] == ["zero", "local", "send", "dup"]
    assert table[5].startswith("crossed the link: ")
    assert "`blocksketch demo --keep DIR` keeps its images, store and copy" in result.stdout


def test_demo_help_promises_no_share_it_does_not_print():
    result = subprocess.run([sys.executable, "-m", "cli", "demo", "--help"], capture_output=True, text=True)
    assert "%" not in result.stdout
