"""``blocksketch pack``: the blocks a destination lacks, compressed into a bundle."""

from __future__ import annotations

import json
import os

import click

from sketch.bundle import pack_bundle
from sketch.digests import data_bytes
from sketch.manifest import Manifest
from sketch.output import check_output
from sketch.ranges import read_ranges_file

from .common import (
    Progress,
    backing_dir_option,
    emit_json,
    force_option,
    format_option,
    human_bytes,
    json_option,
    level_option,
    show_progress,
)


@click.command("pack")
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Bundle file to write; - streams it to stdout (the summary then goes to stderr).")
@click.option("--ranges", "ranges_path", type=click.Path(dir_okay=False), default=None,
              help="Pack only these block ranges: the ranges file a failed `blocksketch apply` wrote.")
@level_option
@force_option
@format_option
@backing_dir_option
@json_option
def command(image: str, manifest_path: str, output: str, ranges_path: str | None, level: int | None, force: bool,
            image_format: str | None, backing_dirs: tuple[str, ...], as_json: bool) -> None:
    """Pack the blocks of IMAGE that MANIFEST says must be sent (each content once) into a bundle.

    IMAGE must still be the image MANIFEST was built from, read the same way (raw or qcow2,
    detected; pass the --format given to manifest, if any): its whole-image checksum is checked
    while packing, and on a mismatch no bundle is written. With --ranges, the bundle holds just
    the blocks a failed apply asked for; give it to apply as an extra bundle.

    With -o -, the bundle streams to stdout as it is compressed, so sending and apply run while
    packing goes on; the summary (or --json) goes to stderr. The checksum is only known at the
    end, so a mismatch then leaves a bundle without its trailer, which apply rejects.

    \b
    Example:
      blocksketch pack vm.img vm.manifest -o vm.bundle
      blocksketch pack vm.img vm.manifest -o - | ssh dst blocksketch apply vm.manifest - -o vm.img
      blocksketch pack vm.img vm.manifest --ranges vm.img.missing-ranges.json -o vm.extra
    """
    inputs = [manifest_path] + ([ranges_path] if ranges_path else [])
    check_output(output, force=force, inputs=[image, *inputs], what="bundle")
    manifest = Manifest.load(manifest_path)
    ranges = None
    if ranges_path is not None:
        ranges = read_ranges_file(ranges_path, manifest.manifest_id, manifest.total_blocks)
    enabled = show_progress(as_json)
    total = data_bytes(image, manifest.block_size, image_format, backing_dirs) if enabled else 0
    with Progress(enabled, total, f"pack {os.path.basename(image)}") as progress:
        info = pack_bundle(image, manifest, output, ranges, level=level, progress=progress, image_format=image_format,
                           force=force, inputs=inputs, backing_dirs=backing_dirs)
    result = {"bundle": output, "contents": info.contents, "blocks": info.blocks, "raw_bytes": info.raw_bytes,
              "bundle_bytes": info.bytes_written}
    # With -o -, stdout carries only bundle bytes; the summary goes to stderr.
    to_stderr = output == "-"
    if as_json:
        if to_stderr:
            click.echo(json.dumps(result), err=True)
        else:
            emit_json(result)
        return
    click.echo(f"bundle: {'stdout' if to_stderr else output}: {info.blocks} blocks ({human_bytes(info.raw_bytes)}) in "
               f"{human_bytes(info.bytes_written)}", err=to_stderr)
