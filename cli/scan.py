"""``lorascope scan``: read many adapters once into a collection database (SQLite)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from lorascope.cli.options import _parse_enable_lora
from lorascope.collection import Collection
from lorascope.collection import scan as scan_api
from lorascope.collection.scan import ENV_SCHEDULER
from lorascope.formats import FORMATS


@click.command("scan")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option(
    "--db",
    required=True,
    type=click.Path(path_type=Path),
    help="The collection database (SQLite; created when missing).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Local worker processes (1: in this process). Default: one per CPU.",
)
@click.option(
    "--scheduler",
    metavar="ADDRESS",
    help=f"Run on this Dask scheduler, e.g. tcp://host:8786 (default: ${ENV_SCHEDULER}). "
    "Needs pip install 'lorascope[collection]'.",
)
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Singular directions stored per module; fixed per database.",
)
@click.option(
    "--directions",
    type=click.Choice(["right", "both"]),
    help="Store the top right singular vectors V (what neighbors compares), or V and U (twice "
    "the size); fixed per database. Default: the database's setting, else right.",
)
@click.option("--retry-errors", is_flag=True, help="Read again adapters recorded as errors.")
@click.option("--verify", is_flag=True, help="Hash every adapter, even unmodified ones.")
@click.option(
    "--prune", is_flag=True, help="Delete from the database adapters whose paths are gone."
)
@click.option(
    "--export",
    "export_path",
    type=click.Path(path_type=Path),
    help="After the scan, write a table to FILE.csv or FILE.parquet (needs pyarrow).",
)
@click.option(
    "--table",
    type=click.Choice(["adapters", "modules"]),
    default="adapters",
    show_default=True,
    help="The table --export writes.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--alpha", type=float, help="LoRA alpha when the files do not store it.")
@click.option(
    "--enable-lora",
    metavar="PARTS",
    help="Fused (MergedLinear) parts that carry LoRA, e.g. 'q,v' (loralib files).",
)
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), help="Skip format detection.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="A progress bar on stderr (default: when stderr is a terminal).",
)
def scan(
    paths: tuple[str, ...],
    db: Path,
    workers: int | None,
    scheduler: str | None,
    top_k: int,
    directions: str | None,
    retry_errors: bool,
    verify: bool,
    prune: bool,
    export_path: Path | None,
    table: str,
    as_json: bool,
    alpha: float | None,
    enable_lora: str | None,
    fmt: str | None,
    progress: bool | None,
) -> None:
    """Scan adapters into a collection database: PATHs are files, directories (walked for
    adapter directories and *.safetensors/.pt/.bin/.gguf/.h5 files), glob patterns or
    @list.txt. Unchanged adapters are not read again; a killed scan resumes; a bad file is
    recorded with its error and counted, and the scan goes on (exit status 0)."""
    if workers is not None and scheduler is not None:
        raise click.UsageError("--workers and --scheduler are exclusive")
    summary = scan_api(
        paths,
        db,
        workers=workers,
        scheduler=scheduler,
        top_k=top_k,
        directions=directions,
        retry_errors=retry_errors,
        verify=verify,
        prune=prune,
        progress=sys.stderr.isatty() if progress is None else progress,
        fmt=fmt,
        alpha=alpha,
        enable_lora=_parse_enable_lora(enable_lora),
    )
    for message in summary.new_errors:
        click.echo(f"warning: recorded as an error: {message}", err=True)
    exported = None
    if export_path is not None:
        with Collection(db) as collection:
            rows = collection.export(table, export_path)
        exported = {"path": str(export_path), "table": table, "rows": rows}
    if as_json:
        click.echo(json.dumps({**summary.to_dict(), "export": exported}, indent=2))
    else:
        click.echo(summary.line())
        if exported is not None:
            click.echo(f"{rows} {table} rows -> {export_path}")
