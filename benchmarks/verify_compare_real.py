"""Check `blocksketch compare --json` against an independent plain-Python reference on real images.

Usage: python benchmarks/verify_compare_real.py IMAGE_A IMAGE_B [--block-size 512 --block-size 4096]

The reference reads every byte with plain file reads (no SEEK_DATA, no C accelerator), hashes each
block with hashlib, and counts with Python sets and Counters. It prints both results and whether
every field agrees; exit status 1 on any difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from collections import Counter


def reference(source: str, target: str, block_size: int) -> dict:
    def digests(path: str) -> list[bytes]:
        out = []
        with open(path, "rb") as handle:
            while block := handle.read(block_size):
                out.append(hashlib.md5(block.ljust(block_size, b"\0")).digest())
        return out

    zero = hashlib.md5(bytes(block_size)).digest()
    source_digests = digests(source)
    target_set = set(digests(target))
    counts = Counter(source_digests)
    return {
        "total_blocks": len(source_digests),
        "zero_blocks": counts.get(zero, 0),
        "unique_blocks": len(counts),
        "shared_blocks": sum(c for d, c in counts.items() if d in target_set),
        "shared_unique_blocks": sum(1 for d in counts if d in target_set),
        "send_blocks": sum(1 for d in counts if d != zero and d not in target_set),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--block-size", type=int, action="append")
    args = parser.parse_args()
    failures = 0
    for block_size in args.block_size or [512, 4096]:
        start = time.perf_counter()
        out = subprocess.run(["blocksketch", "compare", args.source, args.target, "--block-size", str(block_size),
                              "--json"], capture_output=True, text=True, check=True).stdout
        ours_seconds = time.perf_counter() - start
        ours = json.loads(out)
        start = time.perf_counter()
        expected = reference(args.source, args.target, block_size)
        reference_seconds = time.perf_counter() - start
        same = all(ours[key] == value for key, value in expected.items())
        failures += not same
        print(f"block size {block_size}: {'AGREE' if same else 'DIFFER'}"
              f" (blocksketch {ours_seconds:.1f} s, reference {reference_seconds:.1f} s)")
        for key, value in expected.items():
            print(f"  {key:22} reference {value:>10}  blocksketch {ours[key]:>10}")
        print(f"  shared_ratio {ours['shared_ratio']:.4%}  shared_unique_ratio {ours['shared_unique_ratio']:.4%}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
