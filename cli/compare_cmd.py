"""``blocksketch compare``: the paper's share metrics, exactly, for one image against targets."""

from __future__ import annotations

import os

import click

from sketch.blockmap import BlockMap
from sketch.blocks import list_images
from sketch.digests import data_bytes, digest_image
from sketch.metrics import share_metrics

from .common import (
    Progress,
    backing_dir_option,
    block_size_option,
    emit_json,
    format_option,
    json_option,
    percent,
    print_table,
    show_progress,
)


def digest_maps(paths: list[str], block_size: int, progress_enabled: bool, description: str,
                image_format: str | None = None, backing_dirs: tuple[str, ...] = ()) -> list[BlockMap]:
    """Block maps of several images, with one progress bar over all their data."""
    total = sum(data_bytes(p, block_size, image_format, backing_dirs) for p in paths)
    maps = []
    with Progress(progress_enabled, total, description) as progress:
        for path in paths:
            digests = digest_image(path, block_size, image_format=image_format, progress=progress,
                                   backing_dirs=backing_dirs)
            maps.append(BlockMap.from_digests(digests))
    return maps


@click.command("compare")
@click.argument("source", type=click.Path(dir_okay=False))
@click.argument("targets", nargs=-1, required=True, type=click.Path())
@block_size_option()
@format_option
@backing_dir_option
@json_option
def command(source: str, targets: tuple[str, ...], block_size: int, image_format: str | None,
            backing_dirs: tuple[str, ...], as_json: bool) -> None:
    """Share metrics of SOURCE against each TARGET (a file, or a directory: the union of its images).

    Counts blocks of SOURCE whose content occurs in TARGET, with duplicates (shared_ratio) and
    distinct (shared_unique_ratio), as in the paper's Table 1, and the distinct non-zero blocks
    that would have to be sent.

    \b
    Example:
      blocksketch compare vm.img other.img /srv/images --block-size 4096 --json
    """
    progress = show_progress(as_json)
    target_images = {target: list_images(target) for target in targets}
    (source_map,) = digest_maps([source], block_size, progress, os.path.basename(source), image_format, backing_dirs)
    rows = []
    for target, paths in target_images.items():
        target_maps = digest_maps(paths, block_size, progress, os.path.basename(target), image_format, backing_dirs)
        metrics = share_metrics(source_map, target_maps)
        result = {"source": source, "target": target, **metrics.as_dict()}
        if as_json:
            emit_json(result)
        rows.append(result)
    if not as_json:
        print_table(
            ["target", "blocks", "zero", "unique", "shared", "shared %", "shared uniq", "uniq %", "send"],
            [[r["target"], r["total_blocks"], r["zero_blocks"], r["unique_blocks"], r["shared_blocks"],
              percent(r["shared_ratio"]), r["shared_unique_blocks"], percent(r["shared_unique_ratio"]),
              r["send_blocks"]] for r in rows],
        )
