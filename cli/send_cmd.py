"""``blocksketch send``: rank, manifest and bundle of an image in one read, as one stream for ``receive``."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from sketch.digests import data_bytes
from sketch.errors import BlocksketchError, OutputError, UsageError
from sketch.output import atomic_output, check_output
from sketch.rank import DEFAULT_EXACT_TOP
from sketch.stream import write_stream
from store import open_store
from store.transfer import prepare_send

from .common import (
    PhaseBar,
    backing_dir_option,
    block_size_option,
    emit_json,
    force_option,
    format_option,
    human_bytes,
    json_option,
    level_option,
    percent,
    redis_option,
    show_progress,
    source_host_option,
    source_hosts,
)


@click.command("send")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--to", "host", default=None,
              help="Destination host, as named in the index [default: the host `rank` finds best].")
@click.option("-o", "--output", default="-", show_default=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="Where the stream goes: - is stdout (a pipe into `blocksketch receive`), else a file.")
@click.option("--exact-top", type=click.IntRange(min=0), default=DEFAULT_EXACT_TOP, show_default=True,
              help="Without --to: best-estimated hosts to confirm with an exact pass (0: trust the estimate).")
@click.option("--exclude-host", "exclude_hosts", multiple=True, metavar="HOST",
              help="Without --to: never pick this host (repeatable).")
@source_host_option
@level_option
@force_option
@block_size_option(default=None)
@format_option
@backing_dir_option
@redis_option
@json_option
def command(image: str, host: str | None, output: str, exact_top: int, exclude_hosts: tuple[str, ...],
            source_host: str | None, level: int | None, force: bool, block_size: int | None, image_format: str | None,
            backing_dirs: tuple[str, ...],
            redis_url: str | None, as_json: bool) -> None:
    """Stream IMAGE to the host that already holds most of it, for `blocksketch receive` there.

    Digests IMAGE once: the digests rank the fleet (unless --to names the host; the host IMAGE
    lives on, this machine unless --from says otherwise, is left out) and build the
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
    if host is not None and (exclude_hosts or source_host or exact_top != DEFAULT_EXACT_TOP):
        raise UsageError("--exact-top, --exclude-host and --from choose the host; they do not go with --to")
    lenient, exclude_hosts = source_hosts(source_host, exclude_hosts)
    to_stdout = output == "-"
    if to_stdout and sys.stdout.isatty():
        raise UsageError("the stream is binary: pipe it (e.g. into `ssh HOST blocksketch receive -o FILE`) "
                         "or write it to a file with -o")
    check_output(output, force=force, inputs=[image], what="stream")  # before any long work
    started = time.perf_counter()
    progress = show_progress(as_json)
    with PhaseBar(progress) as phases:
        with open_store(redis_url) as store:
            block_size = store.check_block_size(block_size)
            total = data_bytes(image, block_size, image_format, backing_dirs) if progress else 0
            outgoing = prepare_send(store, image, host, block_size=block_size, image_format=image_format,
                                    exact_top=exact_top, exclude_hosts=exclude_hosts, source_host=lenient,
                                    digest_progress=phases(f"digest {os.path.basename(image)}", total),
                                    phases=phases, backing_dirs=backing_dirs)
        prepared = time.perf_counter()
        try:
            info = _write(outgoing, output, level, phases, force, image)
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


def _write(outgoing, output: str, level: int | None, phases: PhaseBar, force: bool, image: str):
    """Write the stream to stdout as it is made, or to ``output`` as :func:`sketch.output.atomic_output`."""
    manifest = outgoing.manifest
    try:
        with atomic_output(output, force=force, inputs=[image], what="stream") as handle:
            bar = phases(f"send to {manifest.host} (blocks read)", manifest.byte_counts()["send"])
            return write_stream(handle, outgoing.source, manifest, outgoing.stamp, level, bar)
    except BrokenPipeError:
        raise BlocksketchError("cannot write the stream to stdout: its reader closed the pipe") from None
    except OSError as exc:
        raise OutputError(f"cannot write stream {output}: {exc.strerror or exc}") from None
