"""The paper's Table 3 on today's images: every pair of real Debian disk images, exactly, at 512 B and 4 KiB.

Usage: python benchmarks/bench_paper.py [--corpus /work/corpus] [--block-size 512 --block-size 4096]
                                        [--out DIR] [--check-compare]

Images: every ``*.raw`` in the corpus directory (build them with /work/shared/corpus/build-images.sh
and benchmarks/corpus/build-more-images.sh). For each block size it prints, per image, how full it
is; per pair (both directions) the paper's "distinct % (duplicates-counted %)", the same shares over
non-zero blocks, and the bytes to send; the paper's own figures beside the nearest analogue; the
512 B / 4 KiB ratio of bytes to send, measured in the same run; and writes heat maps (PNG + HTML)
into --out. With --check-compare it also runs `blocksketch compare --json` on one pair per block
size and checks that every field agrees.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine  # noqa: E402
from sketch.heatmap import render_html, render_png  # noqa: E402
from sketch.matrix import PairShare, ShareMatrix, load_images  # noqa: E402

# What each corpus image is: Debian release number, package set, file system.
KNOWN = {
    "bullseye-min": (11, "minbase", "ext4"),
    "bookworm-min": (12, "minbase", "ext4"),
    "bookworm-tools": (12, "minbase+tools", "ext4"),
    "bookworm-web": (12, "minbase+web", "ext4"),
    "bookworm-dev": (12, "minbase+dev", "ext4"),
    "bookworm-min-btrfs": (12, "minbase", "btrfs"),
    "bookworm-web-btrfs": (12, "minbase+web", "btrfs"),
    "trixie-min": (13, "minbase", "ext4"),
    "trixie-web": (13, "minbase+web", "ext4"),
}

# The paper's Table 3 (KIPS 2010, 3.2 GB images, 512-byte blocks): distinct % (duplicates-counted %).
PAPER = [
    ("Ubuntu 9.04 vs 9.10 (adjacent releases)", 22.85, 32.37),
    ("Ubuntu 9.04 vs 10.04 (two releases apart)", 16.04, 26.36),
    ("Ubuntu 9.04 vs Fedora 13 (other distribution)", 5.62, 15.47),
    ("Ubuntu 9.04 vs CentOS 5.5 (other distribution)", 4.92, 20.74),
    ("Windows XP vs Linux", 0.15, 23.05),
]
PAPER_ANALOGUE = {"adjacent releases": 0, "two releases apart": 1}


def relation(a: str, b: str) -> str:
    """How two corpus images differ, in the paper's terms where it has them."""
    if a not in KNOWN or b not in KNOWN:
        return "?"
    (ra, pa, fa), (rb, pb, fb) = KNOWN[a], KNOWN[b]
    if ra != rb:
        distance = abs(ra - rb)
        apart = "adjacent releases" if distance == 1 else "two releases apart" if distance == 2 else "releases apart"
        return apart + ("" if fa == fb and pa == pb else ", other packages/fs")
    if pa == pb:
        return f"same tree, {fa} vs {fb}"
    return "same release, other packages" + ("" if fa == fb else f", {fa} vs {fb}")


def order_key(path: str) -> tuple:
    name = image_name(path)
    release, packages, fs = KNOWN.get(name, (99, name, "z"))
    return (fs != "ext4", release, packages, name)


def image_name(path: str) -> str:
    return os.path.basename(path).removesuffix(".raw")


def pct(value: float) -> str:
    return f"{value * 100:6.2f}"


def paper_form(pair: PairShare) -> str:
    return f"{pct(pair.metrics.shared_unique_ratio)} ({pct(pair.metrics.shared_ratio)})"


def mib(count: int) -> str:
    return f"{count / 2**20:7.1f}"


def print_images(matrix: ShareMatrix) -> None:
    print(f"{'image':<20} {'release':>7} {'packages':<14} {'fs':<5} {'data MiB':>8} {'zero %':>7} "
          f"{'distinct non-zero':>17} {'repeats %':>9}")
    for image in matrix.images:
        block_map = image.block_map
        release, packages, fs = KNOWN.get(image.name, ("?", "?", "?"))
        nonzero = block_map.total_blocks - block_map.zero_blocks
        repeats = 1 - block_map.distinct_nonzero / nonzero if nonzero else 0.0
        print(f"{image.name:<20} {release!s:>7} {packages:<14} {fs:<5} {mib(nonzero * block_map.block_size):>8} "
              f"{pct(block_map.zero_blocks / block_map.total_blocks):>7} {block_map.distinct_nonzero:>17} "
              f"{pct(repeats):>9}")


def print_pairs(matrix: ShareMatrix) -> None:
    n = len(matrix.images)
    print(f"{'A':<18} {'B':<18} {'relation':<44} {'A->B distinct (counted)':>23} {'B->A distinct (counted)':>23} "
          f"{'non-zero A->B':>13} {'B->A':>6} {'send A->B MiB':>13}")
    for i in range(n):
        for j in range(i + 1, n):
            forward, backward = matrix.pair(i, j), matrix.pair(j, i)
            a, b = matrix.images[i].name, matrix.images[j].name
            print(f"{a:<18} {b:<18} {relation(a, b):<44} {paper_form(forward):>23} {paper_form(backward):>23} "
                  f"{pct(forward.nonzero_shared_unique_ratio):>13} {pct(backward.nonzero_shared_unique_ratio):>6} "
                  f"{mib(forward.send_bytes):>13}")


def print_paper(matrices: dict[int, ShareMatrix]) -> None:
    print("the paper's Table 3 beside today's nearest analogue (distinct % (duplicates-counted %); "
          "non-zero distinct %, mean of both directions):")
    for index, (label, distinct, counted) in enumerate(PAPER):
        print(f"  paper  {label:<48} {distinct:6.2f} ({counted:6.2f})")
        for block_size, matrix in matrices.items():
            n = len(matrix.images)
            for i in range(n):
                for j in range(i + 1, n):
                    a, b = matrix.images[i].name, matrix.images[j].name
                    if PAPER_ANALOGUE.get(relation(a, b)) != index:
                        continue
                    forward, backward = matrix.pair(i, j), matrix.pair(j, i)
                    mean_nonzero = (forward.nonzero_shared_unique_ratio + backward.nonzero_shared_unique_ratio) / 2
                    print(f"  today  {f'{a} vs {b} @ {block_size} B':<48} {paper_form(forward)}  "
                          f"non-zero {pct(mean_nonzero)}")
    print("  (no other distribution or Windows image in this corpus: only Debian's registry is reachable here)")


def print_block_size_ratio(small: ShareMatrix, large: ShareMatrix) -> None:
    """Bytes to send at the small vs the large block size, per ordered pair, summarised by relation."""
    groups: dict[str, list[tuple[float, float, float, float]]] = {}
    n = len(small.images)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            a, b = small.pair(i, j), large.pair(i, j)
            key = relation(small.images[i].name, small.images[j].name)
            groups.setdefault(key, []).append((a.send_bytes, b.send_bytes, a.nonzero_shared_unique_ratio,
                                               b.nonzero_shared_unique_ratio))
    print(f"bytes to send at {small.block_size} B vs {large.block_size} B (ordered pairs, medians per relation; "
          f"same run):")
    print(f"{'relation':<48} {'pairs':>5} {f'{small.block_size} B MiB':>10} {f'{large.block_size} B MiB':>11} "
          f"{'ratio':>6}  {f'non-zero distinct % @{small.block_size}':>26} {f'@{large.block_size}':>6}")
    everything = []
    for key, rows in sorted(groups.items()):
        ratios = [x[0] / x[1] for x in rows if x[1]]
        everything.extend(ratios)
        print(f"{key:<48} {len(rows):>5} {mib(median([x[0] for x in rows])):>10} "
              f"{mib(median([x[1] for x in rows])):>11} {median(ratios):6.3f}  "
              f"{pct(median([x[2] for x in rows])):>26} {pct(median([x[3] for x in rows])):>6}")
    print(f"all {len(everything)} pairs: send-bytes ratio {small.block_size} B / {large.block_size} B "
          f"median {median(everything):.3f}, range {min(everything):.3f}-{max(everything):.3f}")


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def check_compare(matrix: ShareMatrix) -> bool:
    """`blocksketch compare --json` of the first two images must equal the matrix's pair, field by field."""
    source, target = matrix.images[0].path, matrix.images[1].path
    out = subprocess.run([sys.executable, "-m", "cli", "compare", source, target, "--block-size",
                          str(matrix.block_size), "--json"], capture_output=True, text=True, check=True).stdout
    expected = json.loads(out)
    ours = matrix.pair(0, 1).as_dict()
    same = all(ours[key] == value for key, value in expected.items())
    print(f"compare --json {matrix.images[0].name} {matrix.images[1].name} @ {matrix.block_size} B: "
          f"{'AGREE' if same else 'DIFFER'}")
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="/work/corpus")
    parser.add_argument("--block-size", type=int, action="append")
    parser.add_argument("--out", default=None, help="where heat maps go (default: the corpus directory)")
    parser.add_argument("--check-compare", action="store_true")
    args = parser.parse_args()
    paths = sorted(glob.glob(os.path.join(args.corpus, "*.raw")), key=order_key)
    if len(paths) < 2:
        print(f"need at least two *.raw images in {args.corpus}; build them first", file=sys.stderr)
        return 1
    out = args.out or args.corpus
    os.makedirs(out, exist_ok=True)
    print(f"machine: {machine()}")
    print(f"images: {len(paths)} from {args.corpus}; {len(paths)} digest passes per block size, "
          f"{len(paths) * (len(paths) - 1)} ordered pairs")
    matrices: dict[int, ShareMatrix] = {}
    agree = True
    for block_size in args.block_size or [512, 4096]:
        started = time.perf_counter()
        images, passes = load_images(paths, block_size)
        # Display names without the .raw suffix; the block maps are what they are.
        images = [type(image)(image.path, image_name(image.path), image.block_map) for image in images]
        digested = time.perf_counter()
        matrix = ShareMatrix.from_images(images, passes)
        finished = time.perf_counter()
        matrices[block_size] = matrix
        data = sum(image.block_map.total_blocks - image.block_map.zero_blocks for image in images) * block_size
        print(f"\n=== {block_size}-byte blocks: {passes} digest passes over {data / 2**20:.0f} MiB of non-zero data "
              f"in {digested - started:.1f} s; {len(matrix.pairs)} pairs in {finished - digested:.2f} s "
              f"(pairs / digesting = {(finished - digested) / (digested - started):.3f})")
        print_images(matrix)
        print()
        print_pairs(matrix)
        for cell_value in ("nonzero", "distinct"):
            render_png(matrix, os.path.join(out, f"paper-matrix-{block_size}-{cell_value}.png"), cell_value)
        render_html(matrix, os.path.join(out, f"paper-matrix-{block_size}.html"))
        if args.check_compare:
            agree &= check_compare(matrix)
    print()
    print_paper(matrices)
    sizes = sorted(matrices)
    if len(sizes) >= 2:
        print()
        print_block_size_ratio(matrices[sizes[0]], matrices[sizes[-1]])
    print(f"\nheat maps: {out}/paper-matrix-*.png, *.html")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
