"""``blocksketch index``: a node's refresh job, publishing its images' sketches to the index."""

from __future__ import annotations

import os

import click

from sketch.blocks import DEFAULT_BLOCK_SIZE, NOT_AN_IMAGE
from sketch.errors import ImageError
from store import EmptyRoot, open_store, refresh_host

from .common import (
    PhaseBar,
    backing_dir_option,
    block_size_option,
    emit_json,
    format_option,
    human_bytes,
    json_option,
    redis_option,
    show_progress,
    this_host,
)


@click.command("index")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--host", default=this_host, show_default="$BLOCKSKETCH_HOST, else this machine's host name",
              help="Host name the images are indexed under.")
@block_size_option(default=None)
@click.option("--fp-rate", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="False-positive rate of the Bloom filters of a new index [default: 0.01]; "
                   "an existing index keeps its own.")
@click.option("--lock-timeout", type=click.FloatRange(0), default=600.0, show_default=True,
              help="Seconds to wait while another refresh of the same host runs.")
@click.option("--allow-empty", is_flag=True,
              help="Let a missing or empty PATH drop the host's images under it (refused by default: an "
                   "unmounted disk is not a deleted one).")
@click.option("--follow-symlinks", is_flag=True,
              help="Follow symlinks that lead out of PATHS too (by default such a symlink is skipped with a "
                   "warning: the index holds only files under the trees it was given).")
@format_option
@backing_dir_option
@redis_option
@json_option
def command(paths: tuple[str, ...], host: str, block_size: int | None, fp_rate: float | None,
            lock_timeout: float, allow_empty: bool, follow_symlinks: bool, image_format: str | None,
            backing_dirs: tuple[str, ...], redis_url: str | None, as_json: bool) -> None:
    """Index the images in PATHS (files or directories) as HOST's, incrementally.

    Run it periodically on every node (see docs/refresh-job.md). Unchanged images (same size,
    mtime and inode) are not read again, changed ones are re-indexed, and images no longer found
    under PATHS leave the index. Readers see the previous index until the new one is published
    whole. The block size defaults to the index's (512 for a new index). Images may be raw or
    qcow2, each detected by its magic; --format reads every image of PATHS as that format (the
    format read is recorded; an unchanged image read differently before is read again).

    In a directory, a file is an image if it is a qcow2 (by its magic) or its size is a positive
    multiple of 512 bytes (a disk's always is); other files (NOTES.txt, partial downloads) and
    hidden ones are skipped and counted. A file named in PATHS is indexed as it is. Files whose
    name is not UTF-8, and symlinks leading out of PATHS, are skipped with a warning. A PATH that
    is missing, or empty while HOST has images indexed under it, is refused (--allow-empty lets
    it drop them). Exit status: 0 done, 1 failure (nothing half-published; rerun), 2 usage error.

    \b
    Example:
      blocksketch index /var/lib/libvirt/images --host node-7
      blocksketch index --redis redis://index.example:6379/0 /srv/vm --json
      blocksketch index /srv/vm --backing-dir /srv/bases
    """
    with open_store(redis_url) as store:
        if block_size is None:
            config = store.config()
            block_size = config.block_size if config else DEFAULT_BLOCK_SIZE
        phases = PhaseBar(show_progress(as_json), prefix=f"index {host}: ")
        try:
            report = refresh_host(store, host, list(paths), block_size, phases=phases, fp_rate=fp_rate,
                                  lock_wait_s=lock_timeout, image_format=image_format, backing_dirs=backing_dirs,
                                  follow_symlinks=follow_symlinks, allow_empty=allow_empty)
        except EmptyRoot as exc:
            raise EmptyRoot(f"{exc} (pass --allow-empty if its images are really gone)") from None
        finally:
            phases.close()
    for path, reason in report.skipped:
        if reason != NOT_AN_IMAGE:
            click.echo(f"blocksketch: warning: skipped {printable_path(path)}: {reason}", err=True)
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(f"host {report.host}: {report.images} images, {len(report.indexed)} indexed "
                   f"({human_bytes(report.bytes_read)}), {report.reused} unchanged, {len(report.removed)} removed, "
                   f"{len(report.skipped)} skipped; {report.distinct_blocks} distinct blocks of {report.block_size} B; "
                   f"generation {report.generation} in {report.url} ({report.seconds:.2f} s)")
    if report.failed:
        path, reason = report.failed[0]
        more = f" (and {len(report.failed) - 1} more)" if len(report.failed) > 1 else ""
        raise ImageError(f"{len(report.failed)} image(s) could not be indexed{more}: {reason}")


def printable_path(path: str) -> str:
    """A path whose name may hold bytes that are not UTF-8, printable on one line."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
