"""``blocksketch rank``: which host holds most of an image, estimated for all, exact for the best few."""

from __future__ import annotations

import os

import click

from sketch.digests import data_bytes, digest_image
from sketch.errors import ImageError, UsageError
from sketch.rank import DEFAULT_EXACT_TOP, DEFAULT_TOP, RankQuery
from store import open_store
from store.ranking import parse_indexed, rank_image

from .common import (
    Progress,
    backing_dir_option,
    block_size_option,
    emit_json,
    format_option,
    human_bytes,
    json_option,
    percent,
    print_table,
    redis_option,
    server_option,
    service_client,
    show_progress,
    source_host_option,
    source_hosts,
    token_file_option,
)


def _points(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.2f}"


def print_ranking(result: dict) -> None:
    """The human form of a ranking: a table best first, then the winner and any disagreement."""
    zero = result["zero_blocks"] / result["total_blocks"] if result["total_blocks"] else 0.0
    click.echo(f"image: {result['image']} ({result['total_blocks']} blocks of {result['block_size']} B, "
               f"{percent(zero)} zero); {result['hosts_ranked']} hosts ranked")
    print_table(
        ["host", "estimated %", "± points (95%)", "exact %", "exact distinct %", "images", "files"],
        [[h["host"], percent(h["estimated_shared_ratio"]), _points(h["estimate_error"]),
          percent(h["exact_shared_ratio"]), percent(h["exact_shared_unique_ratio"]),
          "-" if h["images"] is None else h["images"], human_bytes(h["size_bytes"])] for h in result["hosts"]],
    )
    winner = next(h for h in result["hosts"] if h["host"] == result["winner"])
    if result["winner_by"] == "exact":
        click.echo(f"best host: {winner['host']} ({percent(winner['exact_shared_ratio'])} of the blocks shared, "
                   f"{winner['send_blocks']} distinct blocks to send)")
    else:
        click.echo(f"best host (estimate only): {winner['host']} ({percent(winner['estimated_shared_ratio'])} "
                   "estimated)")
    best = result["best_image"]
    if best:
        click.echo(f"best single image there: {best['path']} ({percent(best['shared_ratio'])} shared)")
    if result["estimate_order_agrees"] is False:
        checked = [h for h in result["hosts"] if h["exact_rank"] is not None]
        by_estimate = ", ".join(h["host"] for h in sorted(checked, key=lambda h: h["estimate_rank"]))
        by_exact = ", ".join(h["host"] for h in checked)
        click.echo(f"note: the estimate ordered the checked hosts {by_estimate}; the exact pass orders them {by_exact}")


@click.command("rank")
@click.argument("image")
@click.option("--top", type=click.IntRange(min=1), default=DEFAULT_TOP, show_default=True,
              help="Hosts to list.")
@click.option("--exact-top", type=click.IntRange(min=0), default=DEFAULT_EXACT_TOP, show_default=True,
              help="Best-estimated hosts to confirm with an exact pass over their block maps (0: estimate only).")
@click.option("--exclude-host", "exclude_hosts", multiple=True, metavar="HOST",
              help="Leave this host out (repeatable), e.g. the image's current host.")
@source_host_option
@block_size_option(default=None)
@format_option
@backing_dir_option
@redis_option
@server_option
@token_file_option
@json_option
def command(image: str, top: int, exact_top: int, exclude_hosts: tuple[str, ...], source_host: str | None,
            block_size: int | None, image_format: str | None, backing_dirs: tuple[str, ...], redis_url: str | None,
            server_url: str | None,
            token_file: str | None, as_json: bool) -> None:
    """Rank every indexed host by how much of IMAGE it already holds.

    IMAGE is a local image file, raw or qcow2 (digested here; it need not be indexed; --format
    overrides the detected format; the host it lives on, this machine unless --from says
    otherwise, is left out) or HOST:PATH naming an indexed image (its stored block map is used
    and its own host is left out). Every host gets a
    fast estimate from its ranking sketch, with a 95% error bound in points; the best --exact-top
    hosts are then checked exactly against their images' block maps (the numbers `compare`
    prints against the union of the host's images), and the highest exact share wins.

    \b
    Example:
      blocksketch rank vm.img
      blocksketch rank ams-1:/srv/images/web.img --top 5 --exact-top 3 --json
      blocksketch rank vm.img --server http://ranker:8470 --token-file ~/.blocksketch-token
    """
    if image_format is not None and not os.path.exists(image):
        raise UsageError(f"--format is for a local image file; {image} is not one (an indexed HOST:PATH is "
                         "ranked from its stored block map)")
    if source_host is not None and not os.path.exists(image):
        raise UsageError(f"--from is for a local image file; {image} is not one (an indexed HOST:PATH names its "
                         "host)")
    lenient, exclude_hosts = source_hosts(source_host, exclude_hosts)
    if server_url:
        result = rank_with_service(server_url, token_file, image, top, exact_top, exclude_hosts, block_size,
                                   show_progress(as_json), image_format, backing_dirs, lenient)
    else:
        result = rank_with_store(redis_url, image, top, exact_top, exclude_hosts, block_size, show_progress(as_json),
                                 image_format, backing_dirs, lenient)
    if as_json:
        emit_json(result)
    else:
        print_ranking(result)


def local_query(image: str, block_size: int, progress: bool, image_format: str | None = None,
                backing_dirs: tuple[str, ...] = ()) -> RankQuery:
    """Digest a local image (read as ``image_format``, None: detected) into a ranking query."""
    total = data_bytes(image, block_size, image_format, backing_dirs) if progress else 0
    with Progress(progress, total, os.path.basename(image)) as bar:
        return RankQuery.from_digests(digest_image(image, block_size, image_format=image_format, progress=bar,
                                                   backing_dirs=backing_dirs), image)


def rank_with_service(server_url: str, token_file: str | None, image: str, top: int, exact_top: int,
                      exclude_hosts: tuple[str, ...], block_size: int | None, progress: bool,
                      image_format: str | None = None, backing_dirs: tuple[str, ...] = (),
                      source_host: str | None = None) -> dict:
    """Ask the service: an indexed image by name, a local one as its digests and counts."""
    from server.handlers import rank_query_to_body

    options = {"top": top, "exact_top": exact_top, "exclude_hosts": list(exclude_hosts)}
    with service_client(server_url, token_file) as client:
        if os.path.exists(image):
            query = local_query(image, client.check_block_size(block_size), progress, image_format, backing_dirs)
            query.require_data()
            if source_host is not None:
                options["source_host"] = source_host
            return client.rank({**rank_query_to_body(query), **options})
        if parse_indexed(image) is None:
            raise ImageError(f"no such image: {image} (give a local image file or HOST:PATH of an indexed image)")
        if block_size is not None:
            client.check_block_size(block_size)
        return client.rank({"image": image, **options})


def rank_with_store(redis_url: str | None, image: str, top: int, exact_top: int, exclude_hosts: tuple[str, ...],
                    block_size: int | None, progress: bool, image_format: str | None = None,
                    backing_dirs: tuple[str, ...] = (), source_host: str | None = None) -> dict:
    with open_store(redis_url) as store:
        if os.path.exists(image):
            query = local_query(image, store.check_block_size(block_size), progress, image_format, backing_dirs)
            return rank_image(store, query, top=top, exact_top=exact_top, exclude_hosts=exclude_hosts,
                              block_size=block_size, source_host=source_host)
        if parse_indexed(image) is not None:
            return rank_image(store, image, top=top, exact_top=exact_top, exclude_hosts=exclude_hosts,
                              block_size=block_size)
        raise ImageError(f"no such image: {image} (give a local image file or HOST:PATH of an indexed image)")
