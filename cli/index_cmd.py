"""``blocksketch index``: a node's refresh job, publishing its images' sketches to the index."""

from __future__ import annotations

import socket

import click

from sketch.blocks import DEFAULT_BLOCK_SIZE
from sketch.errors import ImageError
from store import open_store, refresh_host

from .common import (
    Progress,
    block_size_option,
    emit_json,
    format_option,
    human_bytes,
    json_option,
    redis_option,
    show_progress,
)


@click.command("index")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--host", default=socket.gethostname, show_default="this machine's host name",
              help="Host name the images are indexed under.")
@block_size_option(default=None)
@click.option("--fp-rate", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="False-positive rate of the Bloom filters of a new index [default: 0.01]; "
                   "an existing index keeps its own.")
@click.option("--lock-timeout", type=click.FloatRange(0), default=600.0, show_default=True,
              help="Seconds to wait while another refresh of the same host runs.")
@format_option
@redis_option
@json_option
def command(paths: tuple[str, ...], host: str, block_size: int | None, fp_rate: float | None,
            lock_timeout: float, image_format: str | None, redis_url: str | None, as_json: bool) -> None:
    """Index the images in PATHS (files or directories) as HOST's, incrementally.

    Run it periodically on every node (see docs/refresh-job.md). Unchanged images (same size,
    mtime and inode) are not read again, changed ones are re-indexed, and images gone from under
    PATHS leave the index. Readers see the previous index until the new one is published whole.
    The block size defaults to the index's (512 for a new index). Images may be raw or qcow2,
    each detected by its magic; --format reads every image of PATHS as that format (the format
    read is recorded; an unchanged image read differently before is read again). Exit status:
    0 done, 1 failure (nothing half-published; rerun), 2 usage error.

    \b
    Example:
      blocksketch index /var/lib/libvirt/images --host node-7
      blocksketch index --redis redis://index.example:6379/0 /srv/vm --json
    """
    with open_store(redis_url) as store:
        if block_size is None:
            config = store.config()
            block_size = config.block_size if config else DEFAULT_BLOCK_SIZE
        bars: list[Progress] = []

        def on_plan(total: int) -> None:
            bars.append(Progress(show_progress(as_json), total, f"index {host}"))

        def progress(done: int) -> None:
            if bars:
                bars[0](done)

        try:
            report = refresh_host(store, host, list(paths), block_size, progress, on_plan=on_plan, fp_rate=fp_rate,
                                  lock_wait_s=lock_timeout, image_format=image_format)
        finally:
            for bar in bars:
                bar.close()
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(f"host {report.host}: {report.images} images, {len(report.indexed)} indexed "
                   f"({human_bytes(report.bytes_read)}), {report.reused} unchanged, {len(report.removed)} removed; "
                   f"{report.distinct_blocks} distinct blocks of {report.block_size} B; generation "
                   f"{report.generation} in {report.url} ({report.seconds:.2f} s)")
    if report.failed:
        path, reason = report.failed[0]
        more = f" (and {len(report.failed) - 1} more)" if len(report.failed) > 1 else ""
        raise ImageError(f"{len(report.failed)} image(s) could not be indexed{more}: {reason}")
