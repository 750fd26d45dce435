"""``blocksketch migrate``: manifest, bundle and apply in one go, on one machine."""

from __future__ import annotations

import os
import tempfile

import click

from sketch.apply import OUTPUT_FORMATS, MissingBlocks
from sketch.bundle import write_bundle
from sketch.digests import data_bytes
from sketch.output import check_output
from store import open_store
from store.transfer import prepare_send

from .apply_cmd import apply_with_store
from .common import (
    Progress,
    backing_dir_option,
    block_size_option,
    emit_json,
    force_option,
    format_option,
    human_bytes,
    json_option,
    percent,
    print_table,
    redis_option,
    show_progress,
)
from .manifest_cmd import summary_rows


def migrate_with_store(store, image: str, host: str, output: str, block_size: int | None = None,
                       force: bool = False, output_format: str = "raw", progress: bool = False,
                       image_format: str | None = None, backing_dirs: tuple[str, ...] = ()) -> tuple[dict, object]:
    """Manifest, bundle and apply ``image`` for ``host`` into ``output``: the report and the manifest.

    The image is read as ``send`` reads it (one digest pass, the checksum beside it, then only the
    blocks to send); ``image_format`` is how to read it (None: detected by magic). An extra bundle
    is made and applied when a local image changed since it was indexed.
    """
    check_output(output, force=force, inputs=[image])  # before any long work
    directory = os.path.dirname(os.path.abspath(output))
    block_size = store.check_block_size(block_size)
    total = data_bytes(image, block_size, image_format, backing_dirs) if progress else 0
    with tempfile.TemporaryDirectory(dir=directory, prefix=".blocksketch-migrate-") as scratch:
        with Progress(progress, total, f"digest {os.path.basename(image)}") as digest_bar:
            outgoing = prepare_send(store, image, host, block_size=block_size, image_format=image_format,
                                    digest_progress=digest_bar, backing_dirs=backing_dirs)
        try:
            manifest = outgoing.manifest
            manifest_bytes = manifest.save(os.path.join(scratch, "manifest"))

            def bundle(name: str, ranges=None) -> tuple[str, int]:
                path = os.path.join(scratch, name)
                with open(path, "wb") as handle:
                    # apply checks the rebuilt image against the manifest's checksum
                    info = write_bundle(handle, outgoing.source, manifest, ranges, verify_checksum=False)
                return path, info.bytes_written

            main, bundle_bytes = bundle("bundle")
            extra_bytes = 0
            missing_file = os.path.join(scratch, "missing.json")
            try:
                result = apply_with_store(store, manifest, [main], output, host, force, output_format, missing_file,
                                          progress, inputs=[image], backing_dirs=backing_dirs)
            except MissingBlocks as missing:
                extra, extra_bytes = bundle("extra", (missing.start, missing.count))
                result = apply_with_store(store, manifest, [main, extra], output, host, force, output_format,
                                          missing_file + ".again", progress, inputs=[image], backing_dirs=backing_dirs)
        finally:
            outgoing.close()
    wan = manifest_bytes + bundle_bytes + extra_bytes
    summary = manifest.summary()
    report = {"image": image, "host": host, "output": result.output, "size_bytes": manifest.size_bytes,
              "block_size": manifest.block_size, "blocks": summary["blocks"], "bytes": summary["bytes"],
              "runs": summary["runs"], "manifest_bytes": manifest_bytes, "bundle_bytes": bundle_bytes,
              "extra_bundle_bytes": extra_bytes, "wan_bytes": wan, "wan_ratio": wan / manifest.size_bytes}
    return report, manifest


@click.command("migrate")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--to", "host", required=True, help="Destination host, as named in the index.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Image file to create.")
@force_option
@click.option("--output-format", type=click.Choice(OUTPUT_FORMATS), default="raw", show_default=True,
              help="Write a sparse raw image, or convert it to qcow2 once verified.")
@block_size_option(default=None)
@format_option
@backing_dir_option
@redis_option
@json_option
def command(image: str, host: str, output: str, force: bool, output_format: str, block_size: int | None,
            image_format: str | None, backing_dirs: tuple[str, ...], redis_url: str | None, as_json: bool) -> None:
    """Move IMAGE to OUTPUT as host HOST (--to) would receive it: manifest, pack, apply.

    For when source and destination share a machine (a test, or a host reachable by file
    system): reports the bytes that would cross the WAN (manifest + bundle, plus any extra bundle
    needed because a local image changed since it was indexed) against the image's size. IMAGE
    and the destination's images may be raw or qcow2 (--format overrides IMAGE's detected format).

    \b
    Example:
      blocksketch migrate vm.img --to node-7 -o /var/lib/images/vm.img
      blocksketch migrate vm.img --to node-7 -o vm.copy --json
      blocksketch migrate vm.qcow2 --to node-7 -o vm.qcow2 --output-format qcow2
    """
    with open_store(redis_url) as store:
        report, manifest = migrate_with_store(store, image, host, output, block_size, force, output_format,
                                              show_progress(as_json), image_format, backing_dirs)
    if as_json:
        emit_json(report)
        return
    print_table(["kind", "blocks", "bytes", "runs"], summary_rows(manifest.summary()))
    click.echo(wan_line(report))


def wan_line(report: dict) -> str:
    """One line: what was rebuilt and what crossed the WAN."""
    bundles = report["bundle_bytes"] + report["extra_bundle_bytes"]
    return (f"{report['output']}: rebuilt and verified; WAN bytes {human_bytes(report['wan_bytes'])} (manifest "
            f"{human_bytes(report['manifest_bytes'])} + bundle {human_bytes(bundles)}) = "
            f"{percent(report['wan_ratio'])} of {human_bytes(report['size_bytes'])}")
