"""``lorascope`` — the click application. Thin: parse, load, call the public API, write.

Bad input (any :class:`~lorascope.errors.LoraScopeError`, or a file the OS cannot open) ends
with one line ``error: ...`` on stderr and exit status 2; warnings are one line each. A reader
that closes the pipe early (``lorascope ... | head``) ends it quietly, with status 141.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from typing import Any

import click

from lorascope import __version__
from lorascope.errors import LoraScopeError, LoraScopeWarning

# Each command's module, imported only when the command runs (or ``lorascope --help`` lists the
# short help of all): one command does not pay for the imports of the others (h5py, rich,
# sqlite3, the collection and tracking code). The click "LazyGroup" pattern.
_COMMANDS: dict[str, str] = {
    "inspect": "lorascope.cli.analyze:inspect",
    "spectrum": "lorascope.cli.analyze:spectrum",
    "similarity": "lorascope.cli.analyze:similarity",
    "amplify": "lorascope.cli.analyze:amplify",
    "weight-similarity": "lorascope.cli.analyze:weight_similarity",
    "rank": "lorascope.cli.rank:rank",
    "resize": "lorascope.cli.rank:resize",
    "merge": "lorascope.cli.merge:merge",
    "verify-merge": "lorascope.cli.verify:verify_merge",
    "check": "lorascope.cli.check:check",
    "intruders": "lorascope.cli.intruders:intruders",
    "compare": "lorascope.cli.compare:compare",
    "dynamics": "lorascope.cli.dynamics:dynamics_cmd",
    "shared": "lorascope.cli.collection:shared",
    "neighbors": "lorascope.cli.collection:neighbors",
    "outliers": "lorascope.cli.collection:outliers",
    "report": "lorascope.cli.report:report",
    "train": "lorascope.cli.train:train",
    "scan": "lorascope.cli.scan:scan",
}


class _Group(click.Group):
    """Turns bad-input errors (and a command's bad options) into one line on stderr and exit
    status 2 (bugs still raise). Commands are listed from :data:`_COMMANDS` and imported on
    first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(_COMMANDS))  # click.Group's order: by name

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in _COMMANDS:
            module, attribute = _COMMANDS[cmd_name].split(":")
            command = getattr(importlib.import_module(module), attribute)
            if command.name != cmd_name:  # else `--help` lists a name that no longer resolves
                raise RuntimeError(f"{_COMMANDS[cmd_name]} is named {command.name!r}")
            self.add_command(command)
        return self.commands.get(cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("always", LoraScopeWarning)
            warnings.showwarning = _show_warning
            try:
                result = super().invoke(ctx)
                sys.stdout.flush()  # here, not at exit, so that a reader gone is handled below
                return result
            except BrokenPipeError:  # `lorascope ... | head`: the reader has gone away
                _reader_gone(ctx)
            except SystemExit as e:  # rich's Console exits 1 itself on a broken pipe
                if isinstance(e.__context__, BrokenPipeError):
                    _reader_gone(ctx)
                raise
            except LoraScopeError as e:
                _fail(ctx, str(e))
            except click.UsageError as e:  # a bad option of a command: one line too, exit 2
                where = e.ctx.command_path if e.ctx is not None else ctx.command_path
                _fail(ctx, f"{e.format_message()} (see '{where} --help')")
            except OSError as e:  # missing file, a directory where a file was expected, ...
                name = e.filename if e.filename is not None else ""
                _fail(ctx, f"{name}: {e.strerror or e}" if name else str(e))


def _reader_gone(ctx: click.Context) -> None:
    """Stop quietly when stdout's reader has closed the pipe (``lorascope spectrum A | head``).

    Python ignores SIGPIPE, so the write raised ``BrokenPipeError`` instead of killing the
    process; stdout is pointed at ``/dev/null`` so that the flush at exit cannot raise (and print
    "Exception ignored ... BrokenPipeError") again. The exit status is 141 = 128 + SIGPIPE, what
    the shell reports for a tool that SIGPIPE ended (``yes | head``): with ``set -o pipefail`` a
    script treats lorascope like every other tool, and it is told apart from bad input (2) and
    bugs (1).
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor
        pass
    ctx.exit(141)


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
