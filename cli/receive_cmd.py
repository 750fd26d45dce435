"""``blocksketch receive``: rebuild an image from a ``send`` stream and this host's own images."""

from __future__ import annotations

import sys

import click

from sketch.apply import MissingBlocks, apply_manifest, resolve_local_sources
from sketch.errors import UsageError
from sketch.stream import open_stream_bundle, read_stream_manifest
from store import open_store

from .common import (
    PhaseBar,
    destination_host,
    emit_json,
    human_bytes,
    json_option,
    rebuild_options,
    redis_option,
    show_progress,
)


@click.command("receive")
@click.argument("stream", default="-", type=click.Path(dir_okay=False, allow_dash=True))
@rebuild_options("stream")
@redis_option
@json_option
def command(stream: str, output: str, host: str | None, force: bool, backing_dirs: tuple[str, ...],
            output_format: str, ranges_out: str | None, redis_url: str | None, as_json: bool) -> None:
    """Rebuild OUTPUT from STREAM (default: stdin), made by `blocksketch send` for this host.

    The manifest at the head of the stream names the blocks this host already has; they are read
    from the images this host's index lists (checked by BLAKE3) while the rest of the stream
    arrives. OUTPUT appears only once the whole rebuilt image matches the sender's checksum; on any
    failure nothing is written. If local images changed since they were indexed, re-index this
    host (`blocksketch index`) and send again.

    \b
    Example:
      blocksketch send vm.img | ssh node-7 blocksketch receive -o /var/lib/images/vm.img
      blocksketch receive vm.stream -o vm.qcow2 --output-format qcow2 --json
    """
    if stream == "-":
        if sys.stdin.isatty():
            raise UsageError("no stream on stdin: pipe `blocksketch send` into this command, or name a stream file")
        handle, what = sys.stdin.buffer, "the stream on stdin"
    else:
        try:
            handle = open(stream, "rb")
        except OSError as exc:
            raise UsageError(f"cannot read stream {stream}: {exc.strerror}") from None
        what = f"stream {stream}"
    try:
        manifest = read_stream_manifest(handle, what)
        host = destination_host(host, manifest.host, "stream")
        with open_store(redis_url) as store:
            store.check_block_size(manifest.block_size)
            local = resolve_local_sources(manifest, host, store.image)
        reader = open_stream_bundle(handle, manifest, what)
        with PhaseBar(show_progress(as_json)) as phases:
            bar = phases("receive", manifest.size_bytes - manifest.byte_counts()["zero"])
            result = apply_manifest(manifest, [reader], output, [source.path for source in local], force=force,
                                    output_format=output_format, ranges_file=ranges_out, progress=bar,
                                    local_formats=[source.image_format for source in local],
                                    local_identities=[source.identity for source in local],
                                    inputs=[] if stream == "-" else [stream], phases=phases,
                                    backing_dirs=backing_dirs)
    except MissingBlocks as missing:
        if as_json:
            emit_json({"status": "missing", "ranges_file": missing.ranges_file, "blocks": int(missing.count.sum())})
        raise MissingBlocks(missing.start, missing.count, missing.ranges_file, manifest.block_size,
                            advice=f"re-index this host (`blocksketch index ... --host {manifest.host}`) and send "
                                   "again") from None
    finally:
        if handle is not sys.stdin.buffer:
            handle.close()
    if as_json:
        emit_json({"status": "ok", "output": result.output, "host": manifest.host, "size_bytes": result.size_bytes,
                   "blocks": result.blocks, "local_bytes_read": result.local_bytes_read})
        return
    click.echo(f"{result.output}: {human_bytes(result.size_bytes)} rebuilt and verified "
               f"({result.blocks['bundle']} blocks received, {result.blocks['local']} local, "
               f"{result.blocks['dup']} copied)")
