"""``blocksketch matrix``: every image against every other, exactly, with an optional heat map."""

from __future__ import annotations

import os

import click

from sketch.blockmap import BlockMap
from sketch.blocks import FileIdentity, detect_format
from sketch.errors import ImageError, NotFound, UsageError
from sketch.matrix import CELL_VALUES, DEFAULT_CELL_VALUE, ShareMatrix, bytes_to_digest, expand_paths, load_images
from sketch.output import check_output

from .common import (
    Progress,
    backing_dir_option,
    block_size_option,
    emit_json,
    force_option,
    format_option,
    human_bytes,
    json_option,
    percent,
    print_table,
    redis_option,
    show_progress,
    this_host,
)


class IndexLookup:
    """Block maps of images the index holds unchanged (same real path, size, mtime, inode, and read
    as the same format) for ``host``."""

    def __init__(self, store, host: str, block_size: int, image_format: str | None = None):
        self.store = store
        self.host = host
        self.image_format = image_format
        self.entries: dict = {}
        config = store.config()
        if config is None or config.block_size != block_size:
            return  # another block size: nothing to reuse, every image is digested
        try:
            self.entries = {info.path: info for info in store.images(host)}
        except NotFound:
            return

    def __call__(self, path: str) -> BlockMap | None:
        real = os.path.realpath(path)
        info = self.entries.get(real)
        if info is None:
            return None
        if not FileIdentity.of_entry(info).matches(FileIdentity.of(os.stat(real))):
            return None
        if self.image_format is not None or info.image_format is not None:
            try:  # an entry without a recorded format was read as detected
                if (self.image_format or detect_format(real)) != (info.image_format or detect_format(real)):
                    return None
            except ImageError:
                return None  # digesting it reports why it cannot be read
        return self.store.block_map(self.host, real)


def _load(paths: list[str], block_size: int, progress_enabled: bool, lookup,
          image_format: str | None = None, backing_dirs: tuple[str, ...] = ()) -> ShareMatrix:
    total = 0 if lookup is not None or not progress_enabled else bytes_to_digest(paths, block_size, image_format,
                                                                                 backing_dirs)
    with Progress(progress_enabled, total, "matrix") as progress:
        images, passes = load_images(paths, block_size, progress, lookup, image_format, backing_dirs)
    return ShareMatrix.from_images(images, passes)


@click.command("matrix")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@block_size_option()
@format_option
@backing_dir_option
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the heat map as a self-contained HTML page.")
@click.option("--png", "png_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the heat map as a PNG picture.")
@click.option("--color-by", type=click.Choice(list(CELL_VALUES)), default=DEFAULT_CELL_VALUE, show_default=True,
              help="What the heat map's colour shows: nonzero = distinct non-zero blocks of the row image found "
                   "in the column image; distinct / counted = the paper's ratios over all blocks.")
@click.option("--use-index", is_flag=True,
              help="Take block maps from the index for images it holds unchanged (same size, mtime, inode, "
                   "block size) under --host; digest only the others.")
@click.option("--host", default=this_host, show_default="$BLOCKSKETCH_HOST, else this machine's host name",
              help="With --use-index: the host the images were indexed under.")
@force_option
@redis_option
@json_option
def command(paths: tuple[str, ...], block_size: int, image_format: str | None, backing_dirs: tuple[str, ...],
            html_path: str | None, png_path: str | None, color_by: str, use_index: bool, host: str, force: bool,
            redis_url: str | None,
            as_json: bool) -> None:
    """Every image in PATHS (files or directories of images) against every other, exactly.

    For each ordered pair (source, target) it prints the paper's "distinct % (duplicates-counted %)"
    of source blocks whose content the target holds, the share of all-zero blocks (which every host
    has and which dominate real images), the same share over distinct non-zero blocks, and the bytes
    that would cross the WAN (each missing distinct non-zero block once). Each image is read once,
    as raw or qcow2 by its magic (--format reads every image as that format).
    --json prints one document: images, digest_passes, and one object per ordered pair with the keys
    of `blocksketch compare --json` plus send_bytes and the non-zero shares.

    \b
    Example:
      blocksketch matrix /srv/images --block-size 4096 --png matrix.png
      blocksketch matrix a.img b.img c.img --json --html matrix.html
    """
    found = expand_paths(paths)
    if len(found) < 2:
        raise UsageError(f"a matrix needs at least two images, got {len(found)} ({', '.join(found)})")
    for path in (png_path, html_path):
        if path:
            check_output(path, force=force, inputs=found, what="heat map")  # fail before reading any image
    progress = show_progress(as_json)
    if use_index:
        from store import open_store

        with open_store(redis_url) as store:
            matrix = _load(found, block_size, progress, IndexLookup(store, host, block_size, image_format),
                           image_format, backing_dirs)
    else:
        matrix = _load(found, block_size, progress, None, image_format, backing_dirs)
    if png_path:
        from sketch.heatmap import render_png

        render_png(matrix, png_path, color_by, force=force)
    if html_path:
        from sketch.heatmap import render_html

        render_html(matrix, html_path, color_by, force=force)
    if as_json:
        emit_json(matrix.as_dict())
        return
    _print_human(matrix)


def _print_human(matrix: ShareMatrix) -> None:
    reused = sum(image.from_index for image in matrix.images)
    click.echo(f"{len(matrix.images)} images, {matrix.block_size}-byte blocks, {matrix.digest_passes} digest passes"
               + (f", {reused} block maps from the index" if reused else ""))
    print_table(["#", "image", "blocks", "zero", "distinct non-zero"],
                [[index + 1, image.name, image.block_map.total_blocks,
                  percent(image.block_map.zero_blocks / image.block_map.total_blocks),
                  image.block_map.distinct_nonzero] for index, image in enumerate(matrix.images)],
                right_align_from=2)
    click.echo("")
    names = {image.path: image.name for image in matrix.images}
    print_table(["source", "target", "distinct (counted)", "zero", "non-zero distinct", "non-zero counted", "send"],
                [[names[pair.source], names[pair.target],
                  f"{percent(pair.metrics.shared_unique_ratio)} ({percent(pair.metrics.shared_ratio)})",
                  percent(pair.zero_ratio), percent(pair.nonzero_shared_unique_ratio),
                  percent(pair.nonzero_shared_ratio), human_bytes(pair.send_bytes)] for pair in matrix.pairs],
                right_align_from=2)

