"""``blocksketch send``: rank, manifest and bundle of an image in one read, as one stream for ``receive``."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from sketch.digests import data_bytes
from sketch.errors import BlocksketchError, UsageError
from sketch.rank import DEFAULT_EXACT_TOP
from sketch.stream import write_stream
from store import open_store
from store.transfer import prepare_send

from .common import (
    Progress,
    backing_dir_option,
    block_size_option,
    emit_json,
    format_option,
    human_bytes,
    json_option,
    percent,
    redis_option,
    show_progress,
)


def _parse_level(ctx, param, value: str) -> int | None:
    if value == "auto":
        return None
    try:
        level = int(value)
    except ValueError:
        level = 0
    if not 1 <= level <= 22:
        raise click.BadParameter(f"{value!r} is not auto or a zstd level from 1 to 22")
    return level


@click.command("send")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--to", "host", default=None,
              help="Destination host, as named in the index [default: the host `rank` finds best].")
@click.option("-o", "--output", default="-", show_default=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="Where the stream goes: - is stdout (a pipe into `blocksketch receive`), else a file.")
@click.option("--exact-top", type=click.IntRange(min=0), default=DEFAULT_EXACT_TOP, show_default=True,
              help="Without --to: best-estimated hosts to confirm with an exact pass (0: trust the estimate).")
@click.option("--exclude-host", "exclude_hosts", multiple=True, metavar="HOST",
              help="Without --to: never pick this host (repeatable), e.g. the image's current host.")
@click.option("--level", default="auto", show_default=True, callback=_parse_level,
              help="zstd level of the blocks sent (1-22), or auto: 3, raised to 6 or 9 once the link turns out "
                   "to be much slower than compression.")
@block_size_option(default=None)
@format_option
@backing_dir_option
@redis_option
@json_option
def command(image: str, host: str | None, output: str, exact_top: int, exclude_hosts: tuple[str, ...],
            level: int | None, block_size: int | None, image_format: str | None, backing_dirs: tuple[str, ...],
            redis_url: str | None, as_json: bool) -> None:
    """Stream IMAGE to the host that already holds most of it, for `blocksketch receive` there.

    Digests IMAGE once: the digests rank the fleet (unless --to names the host) and build the
    manifest against the chosen host's images, while the whole-image checksum the receiver
    verifies is taken beside them. The stream (manifest, then the blocks the host lacks, compressed) starts
    as soon as the manifest is sealed, so the receiver copies its local blocks while the rest is
    on the wire. Any one-way transport carries it: a pipe, ssh, a socket. The summary (or --json)
    goes to stderr when the stream goes to stdout.

    \b
    Example:
      blocksketch send vm.img | ssh node-7 blocksketch receive -o /var/lib/images/vm.img
      blocksketch send vm.img --exclude-host node-3 --json 2>report.json | ssh node-7 blocksketch receive -o vm.img
      blocksketch send vm.qcow2 --to node-7 -o vm.stream --json
    """
    if host is not None and (exclude_hosts or exact_top != DEFAULT_EXACT_TOP):
        raise UsageError("--exact-top and --exclude-host choose the host; they do not go with --to")
    to_stdout = output == "-"
    if to_stdout and sys.stdout.isatty():
        raise UsageError("the stream is binary: pipe it (e.g. into `ssh HOST blocksketch receive -o FILE`) "
                         "or write it to a file with -o")
    started = time.perf_counter()
    progress = show_progress(as_json)
    with open_store(redis_url) as store:
        block_size = store.check_block_size(block_size)
        total = data_bytes(image, block_size, image_format, backing_dirs) if progress else 0
        with Progress(progress, total, f"digest {os.path.basename(image)}") as digest_bar:
            outgoing = prepare_send(store, image, host, block_size=block_size, image_format=image_format,
                                    exact_top=exact_top, exclude_hosts=exclude_hosts, digest_progress=digest_bar,
                                    backing_dirs=backing_dirs)
    prepared = time.perf_counter()
    try:
        info = _write(outgoing, output, level, progress)
    finally:
        outgoing.close()
    seconds = {**outgoing.seconds, "before_stream": round(prepared - started, 3),
               "stream": round(time.perf_counter() - prepared, 3)}
    manifest = outgoing.manifest
    summary = manifest.summary()
    report = {"image": image, "host": manifest.host, "host_chosen_by": "--to" if host else "rank",
              "stream": output, "stream_bytes": info.bytes_written, "manifest_bytes": info.manifest_bytes,
              "bundle_bytes": info.bundle.bytes_written, "raw_bytes": info.bundle.raw_bytes,
              "zstd_levels": info.bundle.levels,
              "size_bytes": manifest.size_bytes, "block_size": manifest.block_size, "blocks": summary["blocks"],
              "wan_ratio": info.bytes_written / manifest.size_bytes if manifest.size_bytes else 0.0,
              "seconds": seconds}
    if outgoing.ranking is not None:
        winner = next(h for h in outgoing.ranking["hosts"] if h["host"] == manifest.host)
        report["shared_ratio"] = winner["exact_shared_ratio"] if winner["exact_shared_ratio"] is not None \
            else winner["estimated_shared_ratio"]
        report["ranking"] = outgoing.ranking  # what `blocksketch rank --json` prints
    if as_json:
        if to_stdout:
            click.echo(json.dumps(report), err=True)
        else:
            emit_json(report)
        return
    chosen = f"(rank: {percent(report['shared_ratio'])} shared)" if "shared_ratio" in report else "(--to)"
    click.echo(f"{image} -> {manifest.host} {chosen}: {human_bytes(info.bytes_written)} streamed to "
               f"{'stdout' if to_stdout else output} = {percent(report['wan_ratio'])} of "
               f"{human_bytes(manifest.size_bytes)} ({summary['blocks']['send']} blocks sent, "
               f"{summary['blocks']['local']} local there, {summary['blocks']['dup']} repeated, "
               f"{summary['blocks']['zero']} zero)", err=to_stdout)


def _write(outgoing, output: str, level: int | None, progress: bool):
    """Write the stream to stdout as it is made, or to ``output`` through a temp file and a rename."""
    manifest = outgoing.manifest
    temp = None if output == "-" else os.path.join(os.path.dirname(os.path.abspath(output)),
                                                   f".{os.path.basename(output)}.tmp-{os.getpid()}")
    try:
        with Progress(progress, manifest.byte_counts()["send"], "send") as bar:
            if temp is None:
                info = write_stream(sys.stdout.buffer, outgoing.source, manifest, outgoing.stamp, level, bar)
                sys.stdout.buffer.flush()
                return info
            with open(temp, "wb") as handle:
                info = write_stream(handle, outgoing.source, manifest, outgoing.stamp, level, bar)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, output)
            return info
    except BrokenPipeError:
        raise BlocksketchError("cannot write the stream to stdout: its reader closed the pipe") from None
    except OSError as exc:
        raise UsageError(f"cannot write stream {output}: {exc.strerror or exc}") from None
    finally:
        if temp is not None and os.path.exists(temp):
            os.unlink(temp)
