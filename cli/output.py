"""Writing results: a readable table (rich) by default, or ``--json`` / ``--csv`` for scripts.

The JSON is a list with one object per module (see README, "JSON output"); the CSV is tidy
(one row per number that varies, identifying columns repeated). Results describe their own
columns (:mod:`lorascope.columns`); :func:`print_results` prints any of the three from them.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from lorascope.columns import Column, format_value

if TYPE_CHECKING:
    from rich.console import Console


def console() -> Console:
    from rich.console import Console  # here, not at the top: --json/--csv runs never need rich

    # A fixed width when piped, so CliRunner output and logs are not squeezed to 80 columns.
    return Console(width=None if sys.stdout.isatty() else 160, soft_wrap=False)


def fmt(x: Any, digits: int = 4) -> str:
    """Numbers for humans: 4 significant digits, ``-`` for missing."""
    return format_value(x, digits)


def print_table(title: str, columns: Sequence[str | Column], rows: Iterable[Sequence[Any]]) -> None:
    """A rich table; a :class:`~lorascope.columns.Column` gives its header and digits, a plain
    string is a header of a 4-digit column."""
    from rich.table import Table

    cols = [c if isinstance(c, Column) else Column(c) for c in columns]
    table = Table(title=title, title_justify="left", header_style="bold")
    for i, c in enumerate(cols):
        table.add_column(c.label, justify="left" if i == 0 else "right", overflow="fold")
    for row in rows:
        table.add_row(*(c.format(v) for c, v in zip(cols, row, strict=True)))
    console().print(table)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def print_json(objects: list[dict]) -> None:
    click.echo(json.dumps(_json_safe(objects), indent=2, allow_nan=False))


def print_csv(columns: Sequence[str | Column], rows: Iterable[Sequence[Any]]) -> None:
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow([c.name if isinstance(c, Column) else c for c in columns])
    for row in rows:
        out.writerow(["" if v is None else v for v in row])
    sys.stdout.flush()


def print_results(results: Sequence[Any], out: str, title: str) -> None:
    """Print analysis results (:class:`~lorascope.columns.Tabular`, all of one kind) as
    ``--json`` (their ``to_dict()``), ``--csv`` (their tidy columns and rows) or a table (their
    summary columns, one row per result)."""
    if out == "json":
        print_json([r.to_dict() for r in results])
    elif out == "csv":
        cols = results[0].tidy_columns() if results else ()
        print_csv(cols, (row for r in results for row in r.tidy_rows()))
    else:
        cols = results[0].table_columns() if results else ()
        print_table(title, cols, [r.row() for r in results])


def save_plot(draw: Callable[[Any], Any], path: Path) -> None:
    """Draw a figure with the Agg backend and save it to ``path`` (format from the suffix).

    ``draw`` receives ``matplotlib.pyplot`` and returns the Figure (the plot functions of
    :mod:`lorascope.plot` never save); an unknown suffix is a one-line ``LoraScopeError``.
    """
    from lorascope.errors import LoraScopeError

    if path.is_dir():
        raise LoraScopeError(f"{path}: is a directory; give a file such as {path / 'plot.png'}")
    if not path.suffix:  # matplotlib would silently write PATH.png instead
        raise LoraScopeError(f"{path}: no file extension; give e.g. {path}.png, .pdf or .svg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt)
    try:
        fig.savefig(path, bbox_inches="tight", dpi=150)
    except ValueError as e:  # unknown extension
        raise LoraScopeError(f"{path}: cannot save plot: {e}") from None
    finally:
        plt.close(fig)
