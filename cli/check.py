"""``lorascope check``: a pass/fail verdict on an adapter for a CI pipeline.

Exit status: 0 pass, 3 fail (a finding at or above ``--fail-on``), 2 input that cannot be read.
The checks and their defaults are those of :mod:`lorascope.check`.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from lorascope.check import CheckResult, Finding, Thresholds, check_adapter
from lorascope.cli.options import output_options, reading_options
from lorascope.cli.output import print_csv, print_table
from lorascope.merge import OUT_DTYPES

FAIL_STATUS = 3


@click.command()
@click.argument("adapter_path", metavar="ADAPTER", type=click.Path(path_type=Path))
@click.option(
    "--base",
    "base_path",
    type=click.Path(path_type=Path),
    help="Its base checkpoint: also checks the merged weights (overflow, --intruders) and DoRA.",
)
@reading_options
@click.option(
    "--fail-on",
    type=click.Choice(["warn", "fail"]),
    default="fail",
    show_default=True,
    help="Lowest finding level that fails the verdict (exit status 3).",
)
@click.option(
    "--unused-rank",
    type=click.FloatRange(0, 1, max_open=True),
    default=Thresholds.unused_rank,
    show_default=True,
    help="Warn when the directions holding --energy of ‖ΔW‖_F² number at most this share of r "
    "(0: off).",
)
@click.option(
    "--energy",
    type=click.FloatRange(0, 1, min_open=True),
    default=Thresholds.energy,
    show_default=True,
    help="Share of ‖ΔW‖_F² the counted directions hold (unused-rank).",
)
@click.option(
    "--overflow-headroom",
    type=click.FloatRange(0, 1, min_open=True),
    default=Thresholds.overflow_headroom,
    show_default=True,
    help="Warn when max |W + ΔW| exceeds this share of the dtype's largest value (needs --base; "
    "an Inf after the cast is a fail).",
)
@click.option(
    "--merge-dtype",
    type=click.Choice(list(OUT_DTYPES)),
    help="Judge overflow against this dtype (the one a merge will write) instead of each base "
    "tensor's own.",
)
@click.option(
    "--intruders",
    "run_intruders",
    is_flag=True,
    help="Also count intruder dimensions of W + ΔW (needs --base; an SVD of every adapted W).",
)
@click.option(
    "--max-intruders",
    type=click.IntRange(min=0),
    default=Thresholds.max_intruders,
    show_default=True,
    help="Warn when more intruder dimensions than this are found (with --intruders).",
)
@click.option(
    "--epsilon",
    type=click.FloatRange(0, 1, min_open=True),
    default=Thresholds.intruder_epsilon,
    show_default=True,
    help="Intruder threshold ε on max |cos| (with --intruders).",
)
@click.option(
    "--all", "show_all", is_flag=True, help="List the passing (info) findings in the table too."
)
@output_options
@click.pass_context
def check(
    ctx: click.Context,
    adapter_path: Path,
    base_path: Path | None,
    read,
    fail_on,
    unused_rank,
    energy,
    overflow_headroom,
    merge_dtype,
    run_intruders,
    max_intruders,
    epsilon,
    show_all,
    out,
) -> None:
    """Check ADAPTER for CI: unused rank, NaN/Inf, an all-zero update, DoRA/PiSSA without their
    base, and with --base the merged weights' overflow (and intruders with --intruders).

    Exit status 0 when it passes, 3 when a finding reaches --fail-on, 2 when an input cannot be
    read. NaN/Inf in a file is a fail (3), not bad input. --json prints the whole verdict.
    """
    if run_intruders and base_path is None:
        raise click.UsageError("--intruders needs --base")
    thresholds = Thresholds(
        unused_rank=unused_rank,
        energy=energy,
        overflow_headroom=overflow_headroom,
        merge_dtype=None if merge_dtype is None else OUT_DTYPES[merge_dtype],
        intruders=run_intruders,
        max_intruders=max_intruders,
        intruder_epsilon=epsilon,
    )
    result = check_adapter(
        adapter_path,
        base_path,
        thresholds=thresholds,
        fail_on=fail_on,
        load=lambda p: read(p, base_path),
    )
    _print(result, out, show_all)
    if result.verdict == "fail":
        ctx.exit(FAIL_STATUS)


def _print(result: CheckResult, out: str, show_all: bool) -> None:
    if out == "json":
        click.echo(json.dumps(result.to_dict(), indent=2, allow_nan=False))
        return
    rows = [f.row() for f in result.findings]
    if out == "csv":
        print_csv(Finding.COLUMNS, rows)
        return
    c = result.counts
    title = (
        f"{result.adapter}: {result.verdict.upper()} (fail on {result.fail_on}): "
        f"{c['fail']} fail, {c['warn']} warn, {c['info']} info"
    )
    shown = [r for r, f in zip(rows, result.findings, strict=True) if show_all or f.level != "info"]
    print_table(title, Finding.COLUMNS, shown)
