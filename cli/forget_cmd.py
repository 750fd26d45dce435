"""``blocksketch forget``: drop index entries, or a whole host, that no refresh would remove."""

from __future__ import annotations

import click

from store import forget_images, open_store

from .common import emit_json, json_option, redis_option


@click.command("forget")
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--host", required=True, help="Host whose entries are dropped.")
@click.option("--lock-timeout", type=click.FloatRange(0), default=600.0, show_default=True,
              help="Seconds to wait while a refresh of the same host runs.")
@redis_option
@json_option
def command(paths: tuple[str, ...], host: str, lock_timeout: float, redis_url: str | None, as_json: bool) -> None:
    """Drop the images PATHS from HOST's index, or the whole host when no PATH is given.

    For what a refresh cannot see: an image of a tree no longer indexed, a retired or emptied
    host. PATH is an image's path as `blocksketch images` lists it (the file need not exist;
    no image is read). Like a refresh it holds the host's lock and publishes atomically: readers
    see the old index or the new one, whole. A host forgotten whole leaves `blocksketch hosts`.
    Exit status: 0 done, 1 failure (unknown host or image, store unreachable), 2 usage error.

    \b
    Example:
      blocksketch forget --host node-7 /var/lib/libvirt/images/old.img
      blocksketch forget --host node-3 --json
    """
    with open_store(redis_url) as store:
        report = forget_images(store, host, list(paths) if paths else None, lock_wait_s=lock_timeout)
    if as_json:
        emit_json(report.to_dict())
    elif report.whole_host:
        click.echo(f"host {report.host}: forgotten ({len(report.removed)} images) in {report.url}")
    else:
        click.echo(f"host {report.host}: {len(report.removed)} images forgotten, {report.images} left; "
                   f"generation {report.generation} in {report.url}")
