"""``lorascope merge``: the base checkpoint with the adapter merged in, W' = W + s·B A."""

from __future__ import annotations

from pathlib import Path

import click

from lorascope.cli.options import base_delta_options, output_options, reading_options
from lorascope.cli.output import print_csv, print_json, print_table
from lorascope.merge import OUT_DTYPES, merge_adapter

_COLS = [
    "module",
    "layer",
    "kind",
    "rank",
    "tensor",
    "file",
    "dtype",
    "scale",
    "norm_w",
    "norm_delta",
    "norm_applied",
]


@click.command()
@base_delta_options
@reading_options
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Where to write: a directory (the base's layout), or one file ending in .safetensors.",
)
@click.option(
    "--dtype",
    type=click.Choice(list(OUT_DTYPES)),
    help="Cast every floating tensor to this dtype (default: keep each tensor's own).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing --out (a model directory or .safetensors file; never an input).",
)
@output_options
def merge(base_path: Path, delta_path: Path, read, out_path: Path, dtype, force, out) -> None:
    """Write the base model with the adapter merged in, W' = W + (alpha/r)·B A, as safetensors.

    A model directory gives a directory with the same file names (torch .bin shards become
    .safetensors) and its config and tokenizer files, loadable by transformers; a sharded
    checkpoint keeps its shards and gets a new index. Nothing is written unless every module
    finds its base weight and every merged weight is finite in its dtype; --out must not exist.
    """
    report = merge_adapter(
        base_path,
        read(delta_path, base_path),
        out_path,
        dtype=None if dtype is None else OUT_DTYPES[dtype],
        force=force,
    )
    dicts = [m.to_dict() for m in report.modules]
    if out == "json":
        print_json(dicts)
        return
    rows = [[d[c] for c in _COLS] for d in dicts]
    if out == "csv":
        print_csv(_COLS, rows)
        return
    title = (
        f"{report.out}: {len(dicts)} modules merged; {len(report.files)} weight file(s)"
        + (" (torch -> safetensors)" if report.converted else "")
        + f", {report.copied_tensors} tensors copied unchanged, "
        f"{len(report.copied_files)} other files copied"
    )
    print_table(
        title,
        ["module", "layer", "kind", "rank", "file", "dtype", "‖W‖_F", "‖ΔW‖_F", "‖W'−W‖_F"],
        [
            [
                d["module"],
                d["layer"],
                d["kind"],
                d["rank"],
                d["file"],
                d["dtype"],
                d["norm_w"],
                d["norm_delta"],
                d["norm_applied"],
            ]
            for d in dicts
        ],
    )
