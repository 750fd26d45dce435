"""``blocksketch export-filter``: an image's or a host's exact digests as a pybloom-live filter file."""

from __future__ import annotations

import json
import os
import sys

import click

from sketch.blockmap import union_keys
from sketch.errors import UsageError
from sketch.output import STDOUT, check_output
from store import open_store

from .common import force_option, json_option, redis_option


def split_image_ref(ref: str) -> tuple[str, str]:
    """``HOST:PATH`` -> ``(host, path)``; host names never hold ':'."""
    host, sep, path = ref.partition(":")
    if not sep or not host or not path:
        raise UsageError(f"{ref!r} is not HOST:PATH (e.g. node-7:/var/lib/images/vm.img)")
    return host, path


@click.command("export-filter")
@click.argument("image", required=False, metavar="HOST:PATH")
@click.option("--host", default=None, help="Export the union of this host's images instead of one image.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="File to write; - for stdout (the summary then goes to stderr).")
@force_option
@click.option("--fp-rate", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="False-positive rate of the exported filter [default: the index's].")
@redis_option
@json_option
def command(image: str | None, host: str | None, output: str, force: bool, fp_rate: float | None,
            redis_url: str | None, as_json: bool) -> None:
    """Write a pybloom-live BloomFilter file holding the exact distinct non-zero digests of
    HOST:PATH (or of all of --host's images), for tools that read pybloom-live filters.

    The keys come from the exact block map in the index, not from the stored sketch, so the
    file has exactly the requested FP rate. The file appears whole or not at all.

    \b
    Example:
      blocksketch export-filter node-7:/var/lib/images/web.img -o web.bloom
      blocksketch export-filter --host node-7 -o node-7.bloom --fp-rate 0.001
    """
    from sketch.pybloom_export import write_pybloom_file

    if (image is None) == (host is None):
        raise UsageError("give either HOST:PATH or --host HOST")
    to_stdout = output == STDOUT
    if to_stdout and sys.stdout.isatty():
        raise UsageError("a filter file is binary: redirect it (> FILE) or write it to a file with -o")
    check_output(output, force=force, what="filter file")
    with open_store(redis_url) as store:
        config = store.config()
        fp_rate = fp_rate or (config.fp_rate if config else 0.01)
        if image is not None:
            source, path = split_image_ref(image)
            keys = store.block_map(source, path).keys
            what = f"{source}:{store.image(source, path).path}"
        else:
            keys = union_keys([block_map.keys for _, block_map in store.host_block_maps(host)])
            what = host
    written = write_pybloom_file(keys, output, fp_rate, force=force)
    result = {"source": what, "output": output, "keys": int(written), "fp_rate": fp_rate,
              "size_bytes": None if to_stdout else os.path.getsize(output)}
    if as_json:
        click.echo(json.dumps(result), err=to_stdout)
    else:
        size = "" if to_stdout else f", {result['size_bytes']} bytes"
        click.echo(f"wrote {'stdout' if to_stdout else output}: {result['keys']} digests of {what}, fp rate "
                   f"{fp_rate}{size}", err=to_stdout)
