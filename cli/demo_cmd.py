"""``blocksketch demo``: the main job on a built-in sample fleet."""

from __future__ import annotations

import os
import tempfile

import click

from sketch.blockmap import BlockMap
from sketch.digests import digest_image
from sketch.metrics import share_metrics
from sketch.sample import write_sample_fleet

from .common import emit_json, json_option, percent, print_table


@click.command("demo")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
              help="Where to write the sample images (default: a temporary directory, removed after).")
@json_option
def command(directory: str | None, as_json: bool) -> None:
    """Run blocksketch on a built-in sample: one source image and three hosts sharing 15-75% of it.

    \b
    Example:
      blocksketch demo
    """
    with tempfile.TemporaryDirectory(prefix="blocksketch-demo-") as scratch:
        fleet = write_sample_fleet(directory or scratch)
        block_size = 4096
        source = BlockMap.from_digests(digest_image(fleet["source"], block_size))
        rows = []
        for host, paths in fleet["hosts"].items():
            metrics = share_metrics(source, [BlockMap.from_digests(digest_image(p, block_size)) for p in paths])
            rows.append({"host": host, **metrics.as_dict()})
        rows.sort(key=lambda r: (r["shared_ratio"], r["shared_unique_blocks"]), reverse=True)
        if as_json:
            emit_json({"source": os.path.basename(fleet["source"]), "block_size": block_size,
                       "winner": rows[0]["host"], "hosts": rows})
            return
        click.echo(f"source image: {fleet['source']} ({source.total_blocks} blocks of {block_size} B)")
        print_table(["host", "shared %", "distinct shared %", "blocks to send"],
                    [[r["host"], percent(r["shared_ratio"]), percent(r["shared_unique_ratio"]), r["send_blocks"]]
                     for r in rows])
        click.echo(f"best host: {rows[0]['host']}")
