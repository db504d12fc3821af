"""``lorascope rank`` and ``lorascope resize``: how many directions each ΔW needs, and an adapter
truncated to them (best rank-k by truncated SVD, from the factors). Parse, load, call the API,
write, print: the math is in :mod:`lorascope.analysis.rank`, the files in :mod:`lorascope.formats`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import click
import torch

from lorascope.analysis.rank import RankResult, RankRule, suggest_ranks
from lorascope.analysis.rank import rank as rank_api
from lorascope.analysis.rank import resize as resize_api
from lorascope.cli.options import (
    output_options,
    precision_options,
    reading_options,
    selection_options,
)
from lorascope.cli.output import print_results
from lorascope.formats import OUT_FORMATS, check_out, save_adapter, save_rank_pattern

_SAVE_DTYPES = {
    "same": None,
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_SHARE = click.FloatRange(0, 1, min_open=True)


def _rule_options(default: RankRule | None) -> Callable[[Callable], Callable]:
    """``--energy F | --nuclear F | --ratio T | --rank K`` -> ``rule=RankRule(...)``."""

    def decorate(f: Callable) -> Callable:
        @click.option(
            "--energy",
            type=_SHARE,
            help="Smallest k with Σ_{i<=k} σ_i² >= F·Σ σ_i² (share F of ‖ΔW‖_F², e.g. 0.9)."
            + (f" [default: {default.value:g}]" if default is not None else ""),
        )
        @click.option(
            "--nuclear",
            type=_SHARE,
            help="Smallest k with Σ_{i<=k} σ_i >= F·Σ σ_i (share F of the nuclear norm).",
        )
        @click.option(
            "--ratio",
            type=_SHARE,
            help="Keep every direction with σ_i >= RATIO·σ_1.",
        )
        @click.option(
            "--rank",
            "fixed",
            type=click.IntRange(min=1),
            help="Keep min(RANK, r) directions in every module.",
        )
        @functools.wraps(f)
        def wrapper(*args, energy, nuclear, ratio, fixed, **kwargs):
            options = (("energy", energy), ("nuclear", nuclear), ("ratio", ratio), ("rank", fixed))
            given = [(m, v) for m, v in options if v is not None]
            if len(given) > 1:
                raise click.UsageError("--energy, --nuclear, --ratio and --rank are exclusive")
            if not given and default is None:
                raise click.UsageError(
                    "say how to choose the rank: --energy, --nuclear, --ratio or --rank"
                )
            rule = RankRule(*given[0]) if given else default
            return f(*args, rule=rule, **kwargs)

        return wrapper

    return decorate


_rcond_option = click.option(
    "--rcond", type=float, help="Relative cut-off below which σ_i counts as zero."
)


def _params_line(results: list[RankResult]) -> str:
    before = sum(r.params for r in results)
    after = sum(r.new_params for r in results)
    return (
        f"{len(results)} modules: {before:,} -> {after:,} factor parameters "
        f"({after / before:.1%}); kept energy: min {min(r.energy_kept for r in results):.4g}"
    )


@click.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@reading_options
@selection_options
@_rule_options(RankRule("energy", 0.9))
@click.option(
    "--pattern-out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the suggested PEFT r, lora_alpha, rank_pattern, alpha_pattern (and "
    "target_modules, use_rslora) as JSON; alpha keeps each module's scale (alpha_k = s·k).",
)
@precision_options
@_rcond_option
@output_options
def rank(adapter: Path, read, layer, module, rule, pattern_out, dtype, device, rcond, out) -> None:
    """How many singular directions each ΔW = (alpha/r)·B A needs (paper §7.2), and what
    truncating to them costs: kept energy, ‖ΔW − ΔW_k‖_F (absolute and relative to ‖ΔW‖_F) and
    σ_{k+1}/σ_1 (exact, by Eckart–Young), plus the ranks holding 50/90/99 % of ‖ΔW‖_F². ΔW is
    never formed."""
    ad = read(adapter)
    results = rank_api(
        ad, rule, layer=layer, module=module, rcond=rcond, dtype=dtype, device=device
    )
    pattern = save_rank_pattern(ad, suggest_ranks(results), pattern_out) if pattern_out else None
    print_results(results, out, f"rank of ΔW: {adapter} (keep {rule})")
    if out == "table":
        click.echo(_params_line(results))
    if pattern is not None:
        click.echo(
            f"wrote {pattern_out}: r={pattern['r']}, lora_alpha={pattern['lora_alpha']}, "
            f"{len(pattern['rank_pattern'])} rank_pattern and "
            f"{len(pattern['alpha_pattern'])} alpha_pattern entries",
            err=out != "table",
        )


@click.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Where to write: a PEFT directory, a kohya .safetensors file (kohya input), or a "
    "lorascope .h5 file (any input).",
)
@click.option(
    "--to",
    "to",
    type=click.Choice(list(OUT_FORMATS)),
    help="Output format [default: hdf5 for a .h5 OUT, else kohya for a kohya input, else peft].",
)
@reading_options
@selection_options
@_rule_options(None)
@click.option(
    "--new-alpha",
    type=click.FloatRange(0, min_open=True),
    help="alpha of every resized module (scale alpha/k; rsLoRA alpha/√k). "
    "Default: keep each module's scale.",
)
@click.option(
    "--save-dtype",
    type=click.Choice(list(_SAVE_DTYPES)),
    default="same",
    show_default=True,
    help="dtype of the written factors ('same': as read).",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists (never the input).")
@precision_options
@_rcond_option
@output_options
def resize(
    adapter: Path,
    out_path: Path,
    to,
    read,
    layer,
    module,
    rule,
    new_alpha,
    save_dtype,
    force,
    dtype,
    device,
    rcond,
    out,
) -> None:
    """Truncate an adapter to fewer ranks: each selected ΔW = s·B A is replaced by its best
    rank-k approximation (truncated SVD from the factors; k by --energy, --nuclear, --ratio or
    --rank), split evenly into new A (k, d_in) and B (d_out, k). Other modules are copied
    unchanged. Writes the input's format: PEFT (rank_pattern/alpha_pattern where ranks differ),
    kohya (alpha tensors), or a .h5 file; atomically, never over the input. For AdaLoRA, VeRA,
    LoHa and LoKr this is an extraction (plain LoRA out); DoRA is refused."""
    ad = read(adapter)
    check_out(ad, out_path, fmt=to, force=force)  # fail before the SVDs, not after
    save = _SAVE_DTYPES[save_dtype]
    new, results = resize_api(
        ad,
        rule,
        layer=layer,
        module=module,
        alpha=new_alpha,
        rcond=rcond,
        dtype=dtype,
        device=device,
        out_dtype=save,
    )
    fmt = save_adapter(new, out_path, fmt=to, dtype=save, force=force)
    print_results(results, out, f"resize {adapter} (keep {rule})")
    kept = len(new.modules) - len(results)
    others = [f for f in ad.families if f != "lora"]
    click.echo(
        f"wrote {out_path} ({fmt}): {_params_line(results)}"
        + (f"; {kept} other modules copied unchanged" if kept else "")
        + (
            f"; an extraction: plain LoRA from the exact {'/'.join(others)} update"
            + (" (unselected modules as their exact factored form)" if kept else "")
            if others
            else ""
        ),
        err=out != "table",
    )
