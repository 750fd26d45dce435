"""Options, output and progress shared by every command."""

from __future__ import annotations

import json
import os
import socket
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


level_option = click.option(
    "--level", default="auto", show_default=True, callback=_parse_level, metavar="auto|1-22",
    help="zstd level of the blocks sent, or auto: 3, raised once to 6 or 9 when the output turns out to be much "
         "slower than compression (a slow link).")

force_option = click.option("--force", is_flag=True,
                            help="Overwrite the output file if it exists (never one of the command's inputs).")

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


class PhaseBar:
    """The steps of a long command on stderr, one at a time: a byte bar with rate when the step's
    total is known, else its name and elapsed time, ticking so a slow step never looks stuck.
    Nothing when ``enabled`` is false (not a terminal, or --json). Call it as a
    :data:`sketch.progress.Phases`; ``close`` ends the last step."""

    TICK_S = 0.25

    def __init__(self, enabled: bool, prefix: str = ""):
        self.enabled = enabled
        self.prefix = prefix
        self._bar = None
        self._ticker = None

    def __call__(self, name: str, total: int | None = None):
        self.close()
        if not self.enabled:
            return None
        import threading

        from tqdm import tqdm

        description = f"{self.prefix}{name}"
        if total:
            self._bar = tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024,
                             file=sys.stderr, leave=False, dynamic_ncols=True)
        else:
            self._bar = tqdm(total=None, desc=description, bar_format="{desc}: {elapsed}", file=sys.stderr,
                             leave=False, dynamic_ncols=True)
        bar = self._bar
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(self.TICK_S):
                bar.refresh()

        self._ticker = (stop, threading.Thread(target=tick, name="blocksketch-progress", daemon=True))
        self._ticker[1].start()
        return bar.update

    def close(self) -> None:
        if self._ticker is not None:
            stop, thread = self._ticker
            stop.set()
            thread.join()
            self._ticker = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> PhaseBar:
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


def print_table(headers: list[str], rows: Iterable[list], right_align_from: int = 1, err: bool = False) -> None:
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i >= right_align_from else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    click.echo(line(headers), err=err)
    for row in rows:
        click.echo(line(row), err=err)


HOST_ENV = "BLOCKSKETCH_HOST"


def this_host() -> str:
    """The name this machine is indexed under unless told otherwise (``index --host``'s default):
    ``$BLOCKSKETCH_HOST``, else the host name."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def destination_host(given: str | None, made_for: str, source: str) -> str:
    """The host a rebuild reads local images of: ``--host``, else this machine, which must be the
    host the ``source`` ("manifest", "stream") was made for; another host's images are not ours to
    read just because a file says so."""
    if given is not None:
        return given
    host = this_host()
    if host != made_for:
        raise UsageError(f"the {source} was made for host {made_for!r}, but this machine is {host!r}: run it there, "
                         f"or pass --host {made_for} if this machine is indexed under that name")
    return host


source_host_option = click.option(
    "--from", "source_host", default=None, metavar="HOST",
    help="The host IMAGE lives on, left out of the ranking [default: this machine's host name, when the index "
         "holds it: a source indexed by its own node's refresh job would otherwise win with nothing to send].",
)


def source_hosts(source_host: str | None, exclude_hosts: tuple[str, ...]) -> tuple[str | None, tuple[str, ...]]:
    """``(lenient, strict)`` exclusions for a local image: this machine is left out only if indexed,
    while a host named with --from must be indexed, like one named with --exclude-host (a typo
    would otherwise let the source's own host win)."""
    if source_host is None:
        return this_host(), tuple(exclude_hosts)
    return None, (*exclude_hosts, source_host)


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
                     help=f"This host's name in the index; must be the {source}'s destination [default: "
                          f"${HOST_ENV}, else this machine's host name]."),
        force_option,
        backing_dir_option,
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
