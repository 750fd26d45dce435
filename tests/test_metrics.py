import json
import os
import subprocess
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sketch.blockmap import BlockMap
from sketch.digests import digest_image
from sketch.metrics import share_metrics
from tests.reference import reference_metrics

BLOCK = 512


def labelled_block(label: int) -> bytes:
    """A distinct non-zero block per label (label 0 is a content like any other, as in the paper)."""
    return bytes([label + 1]) * BLOCK


def write(path, labels) -> str:
    path.write_bytes(b"".join(labelled_block(x) for x in labels))
    return str(path)


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True)


def test_compare_json_reproduces_table_1(tmp_path):
    source = write(tmp_path / "source.img", [0, 1, 2, 1, 0, 4, 4, 4, 3, 5])
    target = write(tmp_path / "target.img", [1, 2, 3, 4])
    result = run_cli("compare", source, target, "--json")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["total_blocks"] == 10
    assert row["shared_blocks"] == 7 and row["shared_ratio"] == 0.7
    assert row["shared_unique_blocks"] == 4 and row["shared_unique_ratio"] == 0.4
    assert row["send_blocks"] == 2
    assert row["unique_blocks"] == 6 and row["zero_blocks"] == 0
    assert {"source", "target", "block_size"} <= row.keys()


def test_directory_target_is_the_union_of_its_images(tmp_path):
    source = write(tmp_path / "source.img", [0, 1, 2, 3])
    host = tmp_path / "host"
    host.mkdir()
    write(host / "a.img", [0])
    write(host / "b.img", [2])
    result = run_cli("compare", source, str(host), str(host / "a.img"), "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["shared_blocks"] for r in rows] == [2, 1]


image_bytes = st.builds(
    lambda labels, tail: b"".join(bytes(BLOCK) if x == 0 else bytes([x]) * BLOCK for x in labels) + tail,
    st.lists(st.integers(0, 6), min_size=0, max_size=40),
    st.binary(min_size=0, max_size=BLOCK - 1).filter(lambda t: True),
)


@settings(max_examples=60, deadline=None)
@given(source=image_bytes, targets=st.lists(image_bytes, min_size=1, max_size=3))
def test_metrics_equal_a_plain_reference(tmp_path_factory, source, targets):
    if not source:
        source = b"\x01"
    scratch = tmp_path_factory.mktemp("prop")
    paths = []
    for number, data in enumerate([source, *targets]):
        path = scratch / f"{number}.img"
        path.write_bytes(data)
        paths.append(str(path))
    maps = [BlockMap.from_digests(digest_image(p, BLOCK, image_format="raw")) for p in paths if os.path.getsize(p)]
    expected = reference_metrics(source, [t for t in targets if t], BLOCK)
    got = share_metrics(maps[0], maps[1:]).as_dict()
    assert {k: got[k] for k in expected} == expected


def test_zero_blocks_are_shared_only_with_targets_that_have_some(tmp_path):
    source = tmp_path / "s.img"
    source.write_bytes(bytes(BLOCK) * 3 + b"\x07" * BLOCK)
    with_zero = tmp_path / "z.img"
    with_zero.write_bytes(bytes(BLOCK))
    without_zero = tmp_path / "n.img"
    without_zero.write_bytes(b"\x09" * BLOCK)
    src = BlockMap.from_digests(digest_image(str(source), BLOCK))
    shared_with_zero = share_metrics(src, [BlockMap.from_digests(digest_image(str(with_zero), BLOCK))])
    shared_without = share_metrics(src, [BlockMap.from_digests(digest_image(str(without_zero), BLOCK))])
    assert (shared_with_zero.shared_blocks, shared_with_zero.shared_unique_blocks) == (3, 1)
    assert (shared_without.shared_blocks, shared_without.shared_unique_blocks) == (0, 0)
    assert shared_with_zero.send_blocks == shared_without.send_blocks == 1


def test_block_map_counts_and_first_positions():
    from sketch.digests import ImageDigests

    digests = np.zeros((6, 16), dtype=np.uint8)
    for row, label in enumerate([5, 3, 5, 0, 3, 5]):
        digests[row, 0] = label
    zero = np.array([False, False, False, True, False, False])
    block_map = BlockMap.from_digests(ImageDigests("x", 6 * BLOCK, BLOCK, "md5", digests, zero))
    assert block_map.keys[:, 0].tolist() == [3 << 56, 5 << 56]
    assert block_map.counts.tolist() == [2, 3]
    assert block_map.first.tolist() == [1, 0]
    assert block_map.zero_blocks == 1 and block_map.unique_blocks == 3
