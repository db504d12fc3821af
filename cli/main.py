"""``lorascope`` — the click application. Thin: parse, load, call the public API, write.

Bad input (any :class:`~lorascope.errors.LoraScopeError`, or a file the OS cannot open) ends
with one line ``error: ...`` on stderr and exit status 2; warnings are one line each.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import click

from lorascope import __version__
from lorascope.errors import LoraScopeError, LoraScopeWarning


class _Group(click.Group):
    """Turns bad-input errors (and a command's bad options) into one line on stderr and exit
    status 2 (bugs still raise)."""

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("always", LoraScopeWarning)
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except LoraScopeError as e:
                _fail(ctx, str(e))
            except click.UsageError as e:  # a bad option of a command: one line too, exit 2
                where = e.ctx.command_path if e.ctx is not None else ctx.command_path
                _fail(ctx, f"{e.format_message()} (see '{where} --help')")
            except OSError as e:  # missing file, a directory where a file was expected, ...
                name = e.filename if e.filename is not None else ""
                _fail(ctx, f"{name}: {e.strerror or e}" if name else str(e))


def _fail(ctx: click.Context, message: str) -> None:
    click.echo(f"error: {' '.join(message.split())}", err=True)
    ctx.exit(2)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, LoraScopeWarning):
        click.echo(f"warning: {' '.join(str(message).split())}", err=True)
    else:
        logging.getLogger("lorascope").debug("%s: %s", category.__name__, message)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorascope")
@click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
def main(verbose: bool) -> None:
    """What did the LoRA adapter learn? The analyses of section 7 of the LoRA paper
    (Hu et al., ICLR 2022) for PEFT, loralib, kohya/LyCORIS, HDF5 and plain adapter files."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s"
    )


def _add_commands() -> None:
    from lorascope.cli.analyze import (
        amplify,
        inspect,
        similarity,
        spectrum,
        weight_similarity,
    )
    from lorascope.cli.collection import neighbors, outliers, shared
    from lorascope.cli.compare import compare
    from lorascope.cli.dynamics import dynamics_cmd
    from lorascope.cli.intruders import intruders
    from lorascope.cli.merge import merge
    from lorascope.cli.rank import rank, resize
    from lorascope.cli.report import report
    from lorascope.cli.scan import scan
    from lorascope.cli.train import train

    for cmd in (
        inspect,
        spectrum,
        similarity,
        amplify,
        weight_similarity,
        rank,
        resize,
        merge,
        intruders,
        compare,
        dynamics_cmd,
        shared,
        neighbors,
        outliers,
        report,
        train,
        scan,
    ):
        main.add_command(cmd)


_add_commands()
