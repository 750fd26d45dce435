"""Options, output and progress shared by every command."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable

import click

from sketch.blocks import DEFAULT_BLOCK_SIZE, IMAGE_FORMATS, check_block_size
from sketch.errors import UsageError


def _check_block_size(ctx, param, value):
    if value is None:
        return None
    try:
        return check_block_size(value)
    except UsageError as exc:
        raise click.BadParameter(str(exc)) from None


def block_size_option(default: int | None = DEFAULT_BLOCK_SIZE):
    return click.option(
        "--block-size",
        type=int,
        default=default,
        show_default=default is not None,
        callback=_check_block_size,
        help="Block size in bytes: a power of two from 512 to 65536.",
    )


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")

format_option = click.option(
    "--format", "image_format", type=click.Choice(list(IMAGE_FORMATS)), default=None,
    help="Image format [default: detected from the file's magic bytes].",
)

backing_dir_option = click.option(
    "--backing-dir", "backing_dirs", multiple=True, type=click.Path(file_okay=False), metavar="DIR",
    callback=lambda ctx, param, value: tuple(value),
    help="A directory qcow2 backing files may also come from (repeatable) [default: only the directory "
         "of the image naming them; never a device, a FIFO, /proc or /sys].",
)


def emit_json(value) -> None:
    click.echo(json.dumps(value, sort_keys=False))


def show_progress(as_json: bool) -> bool:
    """Progress bars go to a terminal only, and never with --json."""
    return not as_json and sys.stderr.isatty()


class Progress:
    """A byte-count progress bar on stderr, or nothing when output is not a terminal."""

    def __init__(self, enabled: bool, total: int, description: str):
        self._bar = None
        if enabled and total:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024,
                             file=sys.stderr, leave=False, dynamic_ncols=True)

    def __call__(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.2f}%"


def human_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"  # pragma: no cover


def print_table(headers: list[str], rows: Iterable[list], right_align_from: int = 1) -> None:
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i >= right_align_from else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    click.echo(line(headers))
    for row in rows:
        click.echo(line(row))


redis_option = click.option(
    "--redis", "redis_url", envvar="BLOCKSKETCH_REDIS_URL", default=None, metavar="URL",
    help="Index store: a redis://, rediss:// or unix:// URL of a node or a cluster "
         "[default: $BLOCKSKETCH_REDIS_URL, else the embedded store under $BLOCKSKETCH_HOME].",
)


server_option = click.option(
    "--server", "server_url", envvar="BLOCKSKETCH_SERVER", default=None, metavar="URL",
    help="Ask a running `blocksketch serve` at URL instead of the store (token from --token-file or "
         "$BLOCKSKETCH_TOKEN).",
)
token_file_option = click.option(
    "--token-file", type=click.Path(dir_okay=False), default=None,
    help="File holding the service's bearer token [default: $BLOCKSKETCH_TOKEN].",
)


def service_client(server_url: str, token_file: str | None):
    """A client of the query service at ``server_url``."""
    from server.client import ServiceClient

    from .serve_cmd import read_token

    return ServiceClient(server_url, read_token(token_file))


def rebuild_options(source: str):
    """The options of a command that rebuilds an image on this host (``apply``, ``receive``);
    ``source`` names where the destination host is recorded ("manifest", "stream")."""
    from sketch.apply import OUTPUT_FORMATS

    options = [
        click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Image file to create."),
        click.option("--host", default=None,
                     help=f"This host's name in the index [default: the {source}'s destination; must match it]."),
        click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists."),
        click.option("--output-format", type=click.Choice(OUTPUT_FORMATS), default="raw", show_default=True,
                     help="Write a sparse raw image, or convert it to qcow2 (qemu-img) once verified."),
        click.option("--ranges-out", type=click.Path(dir_okay=False), default=None,
                     help="Where to list the blocks still needed if local blocks fail verification "
                          "[default: OUTPUT.missing-ranges.json]."),
    ]

    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function

    return decorate
