"""``blocksketch apply``: rebuild an image on its destination from a manifest, bundles and local images."""

from __future__ import annotations

import click

from sketch.apply import MissingBlocks, apply_manifest, resolve_local_sources
from sketch.manifest import Manifest
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


def apply_with_store(store, manifest: Manifest, bundles: list[str], output: str, host: str | None, force: bool,
                     output_format: str, ranges_out: str | None, progress: bool, inputs: list[str] | tuple = (),
                     backing_dirs: tuple[str, ...] = ()):
    """Resolve the manifest's local images through ``host``'s own index entries, then apply."""
    host = host or manifest.host
    store.check_block_size(manifest.block_size)
    local = resolve_local_sources(manifest, host, store.image)
    counts = manifest.byte_counts()
    with PhaseBar(progress) as phases:
        bar = phases("apply", manifest.size_bytes - counts["zero"])
        return apply_manifest(manifest, bundles, output, [source.path for source in local], force=force,
                              output_format=output_format, ranges_file=ranges_out, progress=bar,
                              local_formats=[source.image_format for source in local],
                              local_identities=[source.identity for source in local], inputs=inputs,
                              phases=phases, backing_dirs=backing_dirs)


@click.command("apply")
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(dir_okay=False))
@click.argument("bundles", metavar="BUNDLE...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@rebuild_options("manifest")
@redis_option
@json_option
def command(manifest_path: str, bundles: tuple[str, ...], output: str, host: str | None, force: bool,
            backing_dirs: tuple[str, ...], output_format: str, ranges_out: str | None, redis_url: str | None,
            as_json: bool) -> None:
    """Rebuild the image of MANIFEST as OUTPUT from BUNDLE(s) and this host's indexed images.

    Local blocks are read only from images this host's index lists with the identity the manifest
    recorded (raw or qcow2, read as they were indexed), and each run is checked with BLAKE3
    before it is written. If some do not match (an
    image changed since it was indexed), nothing is written and the blocks still needed are saved
    to a ranges file: `blocksketch pack IMAGE MANIFEST --ranges FILE -o EXTRA` on the source, then
    apply again with EXTRA added. OUTPUT appears only once its whole-image checksum matches.
    A BUNDLE of `-` is read from stdin.

    \b
    Example:
      blocksketch apply vm.manifest vm.bundle -o /var/lib/images/vm.img
      blocksketch apply vm.manifest vm.bundle vm.extra -o vm.qcow2 --output-format qcow2
    """
    manifest = Manifest.load(manifest_path)
    host = destination_host(host, manifest.host, "manifest")
    try:
        with open_store(redis_url) as store:
            result = apply_with_store(store, manifest, list(bundles), output, host, force, output_format,
                                      ranges_out, show_progress(as_json), inputs=[manifest_path],
                                      backing_dirs=backing_dirs)
    except MissingBlocks as missing:
        if as_json:
            emit_json({"status": "missing", "ranges_file": missing.ranges_file,
                       "blocks": int(missing.count.sum()),
                       "ranges": [[int(s), int(c)] for s, c in zip(missing.start, missing.count)]})
        raise
    if as_json:
        emit_json({"status": "ok", "output": result.output, "size_bytes": result.size_bytes, "blocks": result.blocks,
                   "local_bytes_read": result.local_bytes_read})
        return
    click.echo(f"{result.output}: {human_bytes(result.size_bytes)} rebuilt and verified "
               f"({result.blocks['bundle']} blocks from bundles, {result.blocks['local']} local, "
               f"{result.blocks['dup']} copied)")
