#!/bin/bash
# More real disk images for benchmarks/bench_paper.py, beside the two of
# /work/shared/corpus/build-images.sh (bookworm-min, bookworm-web): other Debian releases, another
# package set, and the same trees on btrfs. Debian root file systems made by debootstrap
# (--variant=minbase), laid into sparse 1 GiB images. Needs root and Debian's package registry.
#
# Usage: benchmarks/corpus/build-more-images.sh [OUT_DIR]   (default: /work/corpus; never the repo)
# Re-running reuses what exists. About 1 minute per debootstrap here; ~6 minutes in all.
#
# Images (all 1 GiB, sparse):
#   bullseye-min.raw      Debian 11 minbase, ext4          (two releases back)
#   trixie-min.raw        Debian 13 minbase, ext4          (next release)
#   bookworm-tools.raw    Debian 12 minbase + curl, less, vim-tiny, procps, iproute2, ext4
#                         (same release, another package set)
#   bookworm-dev.raw      Debian 12 minbase + build-essential, ext4 (a fuller image: ~half the disk)
#   trixie-web.raw        Debian 13 minbase + nginx-light, python3, openssh-server, ext4
#                         (bookworm-web's package set on the next release)
#   bookworm-min-btrfs.raw  the bookworm-min tree on btrfs (mkfs.btrfs --rootdir)
#   bookworm-web-btrfs.raw  the bookworm-web tree on btrfs
# The btrfs ones need rootfs-bookworm-min/-web from build-images.sh in OUT_DIR.
set -euo pipefail
out=${1:-/work/corpus}
mkdir -p "$out"; cd "$out"
need() { command -v "$1" >/dev/null || { apt-get update -qq; apt-get install -y -qq "$2" >/dev/null; }; }
need debootstrap debootstrap
need mkfs.ext4 e2fsprogs
need mkfs.btrfs btrfs-progs

tree() { # name suite extra-packages: a debootstrapped root file system in rootfs-NAME
  local name=$1 suite=$2 extra=$3
  [ -d "rootfs-$name" ] && return
  debootstrap --variant=minbase ${extra:+--include=$extra} "$suite" "rootfs-$name.tmp" >"debootstrap-$name.log" 2>&1
  mv "rootfs-$name.tmp" "rootfs-$name"
}
ext4() { # name: rootfs-NAME into NAME.raw, same mkfs settings as build-images.sh
  local name=$1
  [ -f "$name.raw" ] && { echo "have $name.raw"; return; }
  rm -f "$name.raw.tmp"; truncate -s 1G "$name.raw.tmp"
  E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -b 4096 -d "rootfs-$name" -L "$name" -U clear -E root_owner=0:0 "$name.raw.tmp"
  mv "$name.raw.tmp" "$name.raw"; echo "built $name.raw"
}
btrfs() { # tree image: rootfs-TREE into IMAGE.raw on btrfs (fixed UUID so rebuilds are alike)
  local tree=$1 name=$2
  [ -f "$name.raw" ] && { echo "have $name.raw"; return; }
  [ -d "rootfs-$tree" ] || { echo "skip $name: no rootfs-$tree (run build-images.sh first)"; return; }
  rm -f "$name.raw.tmp"; truncate -s 1G "$name.raw.tmp"
  mkfs.btrfs -q -f -L "$name" -U 00000000-0000-4000-8000-000000000001 --rootdir "rootfs-$tree" "$name.raw.tmp" >/dev/null
  mv "$name.raw.tmp" "$name.raw"; echo "built $name.raw"
}

tree bullseye-min bullseye ""; ext4 bullseye-min
tree trixie-min trixie ""; ext4 trixie-min
tree bookworm-tools bookworm "curl,less,vim-tiny,procps,iproute2"; ext4 bookworm-tools
tree bookworm-dev bookworm "build-essential"; ext4 bookworm-dev
tree trixie-web trixie "nginx-light,python3,openssh-server"; ext4 trixie-web
btrfs bookworm-min bookworm-min-btrfs
btrfs bookworm-web bookworm-web-btrfs
ls -ls "$out"/*.raw
