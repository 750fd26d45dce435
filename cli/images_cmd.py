"""``blocksketch images``: the images in the index."""

from __future__ import annotations

import click

from store import open_store
from store.catalogue import iso_time

from .common import emit_json, human_bytes, json_option, print_table, redis_option


@click.command("images")
@click.option("--host", default=None, help="Only this host's images.")
@redis_option
@json_option
def command(host: str | None, redis_url: str | None, as_json: bool) -> None:
    """List the indexed images: file and disk size, blocks, distinct and all-zero blocks, when indexed,
    format read. "file" is the image file's size; "disk" the guest-visible disk (the blocks counted),
    which a thin or compressed qcow2 file is smaller than. --json: size_bytes (file), disk_bytes.

    \b
    Example:
      blocksketch images --host node-7
      blocksketch images --json
    """
    with open_store(redis_url) as store:
        images = store.images(host)
    if as_json:
        emit_json([i.to_dict() for i in images])
        return
    print_table(["host", "path", "file", "disk", "blocks", "unique", "zero", "indexed at", "format"],
                [[i.host, i.path, human_bytes(i.size_bytes), human_bytes(i.disk_bytes), i.total_blocks, i.unique_blocks,
                  i.zero_blocks, iso_time(i.indexed_at), i.image_format or "-"] for i in images], right_align_from=2)
