"""``blocksketch hosts``: the hosts in the index."""

from __future__ import annotations

import click

from store import open_store
from store.catalogue import iso_time

from .common import emit_json, human_bytes, json_option, print_table, redis_option


@click.command("hosts")
@redis_option
@json_option
def command(redis_url: str | None, as_json: bool) -> None:
    """List the indexed hosts: images, their files' and disks' size, distinct blocks, sketch size,
    last refresh. "files" adds up the image files; "disks" the guest-visible disks (thin and
    compressed qcow2 files are smaller than their disks). --json: size_bytes (files), disk_bytes.

    \b
    Example:
      blocksketch hosts
      blocksketch hosts --redis redis://index.example:6379/0 --json
    """
    with open_store(redis_url) as store:
        hosts = store.hosts()
    if as_json:
        emit_json([h.to_dict() for h in hosts])
        return
    print_table(["host", "images", "files", "disks", "distinct blocks", "sketch", "refreshed at"],
                [[h.host, h.images, human_bytes(h.size_bytes), human_bytes(h.disk_bytes), h.distinct_blocks,
                  human_bytes(h.sketch_bytes), iso_time(h.refreshed_at)] for h in hosts])
