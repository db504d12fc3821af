"""``lorascope verify-merge``: does a merged checkpoint hold W + ΔW, within its dtype's rounding?

Exit status: 0 every module matches, 3 a mismatch (with its likely cause), 2 input that cannot
be read. The bound and the diagnoses are those of :mod:`lorascope.verify`.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from lorascope.cli.options import output_options, reading_options
from lorascope.cli.output import print_results
from lorascope.verify import DEFAULT_MAX_LOST
from lorascope.verify import verify_merge as verify_api

FAIL_STATUS = 3


@click.command("verify-merge")
@click.option(
    "--base",
    "base_path",
    required=True,
    type=click.Path(path_type=Path),
    help="The checkpoint the adapter was trained on (a HF dir, index.json or state dict).",
)
@click.option(
    "--adapter",
    "adapter_path",
    required=True,
    type=click.Path(path_type=Path),
    help="The adapter that was merged.",
)
@click.option(
    "--merged",
    "merged_path",
    required=True,
    type=click.Path(path_type=Path),
    help="The merged checkpoint to verify.",
)
@reading_options
@click.option(
    "--max-lost",
    type=click.FloatRange(0, 1, min_open=True),
    default=DEFAULT_MAX_LOST,
    show_default=True,
    help="A correctly rounded module that lost more than this share of ‖ΔW‖_F to rounding is "
    "'underflow'.",
)
@click.option(
    "--allow-underflow",
    is_flag=True,
    help="Count 'underflow' modules (the update mostly rounded away) as matching.",
)
@output_options
@click.pass_context
def verify_merge(
    ctx: click.Context,
    base_path: Path,
    adapter_path: Path,
    merged_path: Path,
    read,
    max_lost,
    allow_underflow,
    out,
) -> None:
    """Verify a merge: per module, whether W' − W equals the adapter's ΔW within the rounding of
    the merged dtype, and if not the likely cause (not applied, sign flipped, scale off by a
    factor, transposed, partially applied, precision underflow).

    Exit status 0 when every module matches, 3 on a mismatch, 2 when an input cannot be read.
    """
    result = verify_api(
        base_path,
        read(adapter_path, base_path),
        merged_path,
        max_lost=max_lost,
        allow_underflow=allow_underflow,
    )
    if out == "json":
        click.echo(json.dumps(result.to_dict(), indent=2, allow_nan=False))
    else:
        print_results(
            result.modules, out, f"{result.merged}: {result.verdict.upper()}: {result.summary}"
        )
    if result.verdict != "ok":
        ctx.exit(FAIL_STATUS)
