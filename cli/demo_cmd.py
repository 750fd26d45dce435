"""``blocksketch demo``: the main job, end to end, on a built-in sample fleet."""

from __future__ import annotations

import filecmp
import os
import tempfile
from contextlib import contextmanager

import click

from sketch.digests import digest_image
from sketch.errors import VerificationError
from sketch.rank import RankQuery
from sketch.sample import write_sample_fleet
from store import open_store, refresh_host
from store.ranking import rank_image

from .common import emit_json, human_bytes, json_option, percent, print_table
from .manifest_cmd import summary_rows
from .migrate_cmd import migrate_with_store
from .rank_cmd import print_ranking

DEMO_BLOCK_SIZE = 4096


@contextmanager
def private_home(directory: str):
    """Point the embedded default store at ``directory`` for the demo, so it never touches the user's index."""
    before = os.environ.get("BLOCKSKETCH_HOME")
    os.environ["BLOCKSKETCH_HOME"] = directory
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("BLOCKSKETCH_HOME", None)
        else:
            os.environ["BLOCKSKETCH_HOME"] = before


def run_demo(directory: str) -> dict:
    """Write the sample, index its hosts, rank the source, migrate it to the winner, check the copy."""
    fleet = write_sample_fleet(os.path.join(directory, "images"), block_size=DEMO_BLOCK_SIZE)
    with private_home(os.path.join(directory, "home")), open_store(None) as store:
        indexed = []
        for host, paths in fleet["hosts"].items():
            report = refresh_host(store, host, [os.path.dirname(paths[0])], DEMO_BLOCK_SIZE)
            indexed.append({"host": host, "images": report.images, "distinct_blocks": report.distinct_blocks})
        query = RankQuery.from_digests(digest_image(fleet["source"], DEMO_BLOCK_SIZE), fleet["source"])
        ranking = rank_image(store, query)
        output = os.path.join(directory, f"arrived-at-{ranking['winner']}.img")
        migration, _ = migrate_with_store(store, fleet["source"], ranking["winner"], output, force=True)
        store_url = store.url
    if not filecmp.cmp(fleet["source"], output, shallow=False):
        raise VerificationError(f"demo: {output} differs from {fleet['source']}")
    return {"sample": directory, "store": store_url, "block_size": DEMO_BLOCK_SIZE, "indexed": indexed,
            "ranking": ranking, "migration": migration, "identical": True}


@click.command("demo")
@click.option("--keep", "keep_dir", type=click.Path(file_okay=False), default=None,
              help="Keep the sample images, the store and the migrated image in this directory "
                   "(default: a temporary directory, removed after).")
@json_option
def command(keep_dir: str | None, as_json: bool) -> None:
    """Run the main job on a built-in sample: index three hosts, rank them for an image, move it.

    The sample is a source image and three hosts whose images hold much (ams-1), some (fra-2) and
    little (lon-3) of its content. The demo indexes the hosts into the embedded default store (a
    private one under the sample directory, so your own index is untouched), ranks the hosts for
    the source image, moves it to the winner (manifest, bundle, apply: each block is a zero, a
    local copy there, a repeat of an earlier block, or sent), and checks the copy is byte-identical.
    Without --keep the sample lives in a temporary directory that is removed at the end.

    \b
    Example:
      blocksketch demo
      blocksketch demo --keep /tmp/blocksketch-demo --json
    """
    if keep_dir:
        os.makedirs(keep_dir, exist_ok=True)
        result = run_demo(os.path.abspath(keep_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="blocksketch-demo-") as scratch:
            result = run_demo(scratch)
    if as_json:
        emit_json(result)
        return
    click.echo(f"1. indexed {len(result['indexed'])} hosts into {result['store']}")
    print_table(["host", "images", "distinct blocks"],
                [[row["host"], row["images"], row["distinct_blocks"]] for row in result["indexed"]])
    click.echo("\n2. ranked the hosts for the source image")
    print_ranking(result["ranking"])
    migration = result["migration"]
    host = migration["host"]
    click.echo(f"\n3. migrated the source image to {host}: where each of its blocks came from")
    meaning = {"zero": "all zeros: a hole, nothing moved", "local": f"copied from {host}'s own images",
               "dup": "a repeat of a block sent earlier: copied there", "send": "sent over the link, once, compressed"}
    print_table(["kind", "meaning", "blocks", "bytes", "runs"],
                [[row[0], meaning[row[0]], *row[1:]] for row in summary_rows(migration)], right_align_from=2)
    bundles = migration["bundle_bytes"] + migration["extra_bundle_bytes"]
    click.echo(f"crossed the link: {human_bytes(migration['wan_bytes'])} (manifest "
               f"{human_bytes(migration['manifest_bytes'])} + bundle {human_bytes(bundles)}) = "
               f"{percent(migration['wan_ratio'])} of the {human_bytes(migration['size_bytes'])} image")
    click.echo(f"\n4. the copy is byte-identical to the source; {human_bytes(migration['wan_bytes'])} crossed "
               f"the WAN instead of {human_bytes(migration['size_bytes'])}")
    if keep_dir:
        click.echo(f"\nsample images, store and copy kept in {keep_dir}")
    else:
        click.echo("\nthe sample lived in a temporary directory, now removed; `blocksketch demo --keep DIR` keeps "
                   "its images, store and copy")
