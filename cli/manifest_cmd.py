"""``blocksketch manifest``: classify every block of an image against a destination host's images."""

from __future__ import annotations

import base64
import json
import os
import sys

import click

from sketch.errors import FormatError, UsageError
from sketch.manifest import KIND_NAMES, Manifest
from sketch.output import STDOUT, check_output
from store import open_store
from store.transfer import host_manifest

from .common import (
    PhaseBar,
    backing_dir_option,
    block_size_option,
    force_option,
    format_option,
    human_bytes,
    json_option,
    print_table,
    redis_option,
    server_option,
    service_client,
    show_progress,
    token_file_option,
)


def manifest_from_store(store, image: str, host: str, block_size: int | None, progress: bool,
                        image_format: str | None = None, backing_dirs: tuple[str, ...] = ()) -> Manifest:
    """:func:`store.transfer.host_manifest` with progress bars on a terminal."""
    with PhaseBar(progress) as phases:
        return host_manifest(store, image, host, block_size, image_format, backing_dirs=backing_dirs,
                             phases=phases if progress else None)


def manifest_from_service(server_url: str, token_file: str | None, image: str, host: str,
                          block_size: int | None) -> Manifest:
    """Ask the service for the manifest of the indexed image ``image`` (HOST:PATH) to ``host``."""
    source_host, sep, path = image.partition(":")
    if not sep or not source_host or not path or os.path.exists(image):
        raise UsageError(f"with --server, IMAGE must be HOST:PATH of an image the service can read, not {image!r}")
    with service_client(server_url, token_file) as client:
        if block_size is not None:
            client.check_block_size(block_size)
        answer = client.manifest(image, host, include_manifest=True)
    try:
        data = base64.b64decode(answer["manifest"], validate=True)
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"the service at {server_url} sent no valid manifest") from None
    return Manifest.from_bytes(data, f"manifest from {server_url}")


def summary_rows(summary: dict) -> list[list]:
    return [[kind, summary["blocks"][kind], human_bytes(summary["bytes"][kind]), summary["runs"][kind]]
            for kind in KIND_NAMES]


@click.command("manifest")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--to", "host", required=True, help="Destination host, as named in the index.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Manifest file to write, - for stdout (the summary then goes to stderr) [default: IMAGE's name + "
                   ".HOST.manifest, here].")
@force_option
@block_size_option(default=None)
@format_option
@backing_dir_option
@redis_option
@server_option
@token_file_option
@json_option
def command(image: str, host: str, output: str | None, force: bool, block_size: int | None, image_format: str | None,
            backing_dirs: tuple[str, ...], redis_url: str | None, server_url: str | None, token_file: str | None,
            as_json: bool) -> None:
    """Write the transfer manifest of IMAGE for host HOST (--to).

    Every block of IMAGE is classified exactly against all images the index lists for HOST: zero
    (a hole), local (HOST already has the content: copied there from its own image, verified by
    BLAKE3), send (first occurrence of a content HOST lacks: goes in the bundle) or dup (a later
    copy of a sent block). The block size defaults to the index's. IMAGE may be raw or qcow2
    (detected; --format overrides, and pack needs the same). Then run `blocksketch pack` here and
    `blocksketch apply` on HOST.

    \b
    Example:
      blocksketch manifest vm.img --to node-7 -o vm.manifest
      blocksketch manifest vm.img --to node-7 -o vm.manifest --json
      blocksketch manifest node-3:/srv/vm.img --to node-7 --server http://ranker:8470
    """
    output = output or f"{os.path.basename(image)}.{host}.manifest"
    to_stdout = output == STDOUT
    if to_stdout and sys.stdout.isatty():
        raise UsageError("a manifest is binary: redirect it (> FILE) or pipe it, or write it to a file with -o")
    inputs = [] if server_url else [image]
    check_output(output, force=force, inputs=inputs, what="manifest")  # before any long work
    if server_url:
        if image_format is not None:
            raise UsageError("--format is for a local IMAGE; with --server the service reads the indexed image")
        manifest = manifest_from_service(server_url, token_file, image, host, block_size)
    else:
        with open_store(redis_url) as store:
            manifest = manifest_from_store(store, image, host, block_size, show_progress(as_json), image_format,
                                           backing_dirs)
    size = manifest.save(output, force=force, inputs=inputs)
    summary = {"manifest": output, "manifest_bytes": size, **manifest.summary()}
    if as_json:
        click.echo(json.dumps(summary), err=to_stdout)
        return
    click.echo(f"{image} -> {host}: {manifest.total_blocks} blocks of {manifest.block_size} B, "
               f"{len(manifest.images)} local image(s) used", err=to_stdout)
    print_table(["kind", "blocks", "bytes", "runs"], summary_rows(summary), err=to_stdout)
    click.echo(f"manifest: {'stdout' if to_stdout else output} ({human_bytes(size)})", err=to_stdout)
