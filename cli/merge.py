"""``lorascope merge``: the base checkpoint with the adapter merged in, W' = W + s·B A."""

from __future__ import annotations

from pathlib import Path

import click

from lorascope.cli.options import base_delta_options, output_options, reading_options
from lorascope.cli.output import print_results
from lorascope.merge import OUT_DTYPES, ROUNDINGS, merge_adapter


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
@click.option(
    "--rounding",
    type=click.Choice(list(ROUNDINGS)),
    default="single",
    show_default=True,
    help="single: W + ΔW rounded once to the dtype. peft: bit-identical to peft's "
    "merge_and_unload() on CPU with the base loaded in the output dtype (ΔW rounded on its own, "
    "then added; plain LoRA only).",
)
@output_options
def merge(
    base_path: Path, delta_path: Path, read, out_path: Path, dtype, force, rounding, out
) -> None:
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
        rounding=rounding,
    )
    title = (
        f"{report.out}: {len(report.modules)} modules merged; {len(report.files)} weight file(s)"
        + (" (torch -> safetensors)" if report.converted else "")
        + f", {report.copied_tensors} tensors copied unchanged, "
        f"{len(report.copied_files)} other files copied"
        + ("; peft's rounding" if report.rounding == "peft" else "")
    )
    print_results(report.modules, out, title)
