"""The ``blocksketch`` click group: every error becomes one line on stderr and an exit code."""

from __future__ import annotations

import signal
import sys

import click

from sketch.errors import BlocksketchError, ForceNeeded


class Terminated(KeyboardInterrupt):
    """SIGTERM (``systemctl stop``, ``kill``): unwinds like Ctrl-C, so every ``finally`` runs: temp
    files go, the refresh lock and the embedded store are released."""


def _terminate(signum, frame) -> None:
    raise Terminated()


class BlocksketchGroup(click.Group):
    """Maps library errors to one-line messages: exit 2 for usage errors, 1 for failures.

    A command's module is imported only when that command runs (or --help lists them all), so a
    command starts without importing the others' dependencies (matplotlib, the HTTP stack).
    """

    def main(self, *args, **kwargs):
        """Click's own usage errors as one line too (click prints four), and SIGTERM as an interrupt."""
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _terminate)
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "blocksketch"
            click.echo(f"blocksketch: error: {exc.format_message()} (see '{where} --help')", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"blocksketch: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("blocksketch: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *_command_modules()})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands:
            module = _command_modules().get(name)
            if module is None:
                return None
            self.add_command(_load(name, module))
        return self.commands[name]

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BlocksketchError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            hint = "; pass --force to overwrite it" if isinstance(exc, ForceNeeded) else ""
            click.echo(f"blocksketch: error: {exc}{hint}", err=True)
            ctx.exit(exc.exit_code)
        except Terminated:
            click.echo("blocksketch: stopped (SIGTERM); nothing half-written was left", err=True)
            ctx.exit(128 + signal.SIGTERM)
        except KeyboardInterrupt:
            click.echo("blocksketch: interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            sys.stderr.close()
            ctx.exit(1)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except MemoryError:
            click.echo("blocksketch: error: out of memory", err=True)
            ctx.exit(1)
        except Exception as exc:  # a bug: still one line unless --debug asks for the traceback
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"blocksketch: internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)",
                       err=True)
            ctx.exit(1)


@click.group(cls=BlocksketchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the traceback of an error instead of one line.")
@click.version_option(package_name="blocksketch")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Find the host that already holds most of a disk image's blocks, and move only the rest.

    \b
    Example:
      blocksketch demo
      blocksketch compare vm.img /var/lib/images --block-size 4096
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _command_modules() -> dict[str, str]:
    """Command name -> module, from the ``cli/*_cmd.py`` files: one small module per command."""
    import pkgutil

    from . import __path__ as package_path

    return {info.name[: -len("_cmd")].replace("_", "-"): f"{__package__}.{info.name}"
            for info in pkgutil.iter_modules(package_path) if info.name.endswith("_cmd")}


def _load(name: str, module: str) -> click.Command:
    import importlib

    command = importlib.import_module(module).command
    if command.name != name:  # the module's file name is its command's name
        raise RuntimeError(f"{module} defines command {command.name!r}, not {name!r}")
    return command
