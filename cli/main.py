"""The ``blocksketch`` click group: every error becomes one line on stderr and an exit code."""

from __future__ import annotations

import sys

import click

from sketch.errors import BlocksketchError


class BlocksketchGroup(click.Group):
    """Maps library errors to one-line messages: exit 2 for usage errors, 1 for failures."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BlocksketchError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"blocksketch: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
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
@click.option("--debug", is_flag=True, hidden=True, help="Show tracebacks.")
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


def _register() -> None:
    """Add every ``cli/*_cmd.py`` module's ``command``: one small module per command."""
    import importlib
    import pkgutil

    from . import __path__ as package_path

    for info in sorted(pkgutil.iter_modules(package_path), key=lambda i: i.name):
        if info.name.endswith("_cmd"):
            main.add_command(importlib.import_module(f"{__package__}.{info.name}").command)


_register()
