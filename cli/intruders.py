"""``lorascope intruders``: intruder dimensions of W + ΔW (Shuttleworth et al. 2024, Def. 1)."""

from __future__ import annotations

from pathlib import Path

import click

from lorascope.analysis.intruders import DEFAULT_EPSILON, DEFAULT_K, IntruderResult
from lorascope.analysis.intruders import intruders as intruders_api
from lorascope.cache import SpectralCache
from lorascope.cli.options import (
    base_delta_options,
    compute_options,
    output_options,
    reading_options,
    selection_options,
    side_option,
)
from lorascope.cli.output import print_csv, print_json, print_results, save_plot
from lorascope.formats import load_base


@click.command()
@base_delta_options
@reading_options
@selection_options
@compute_options
@output_options
@click.option(
    "-k",
    "--top",
    "k",
    type=click.IntRange(min=1),
    default=DEFAULT_K,
    show_default=True,
    help="How many top singular vectors of W + ΔW to test.",
)
@click.option(
    "--epsilon",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    multiple=True,
    help=f"Threshold ε: y_j is an intruder iff max_i |cos(y_j, x_i)| < ε. Repeat for several "
    f"(default {DEFAULT_EPSILON}).",
)
@side_option("left", "Left (output-space, the paper's) or right (input-space) singular vectors.")
@click.option(
    "--method",
    type=click.Choice(["auto", "exact", "iterative"]),
    default="auto",
    show_default=True,
    help="Top-k of W + ΔW: dense SVD of the formed W + ΔW (exact), or ARPACK on its low-rank "
    "update of W's SVD (iterative; never forms W + ΔW).",
)
@click.option(
    "--tol",
    type=click.FloatRange(min=0.0),
    default=1e-10,
    show_default=True,
    help="ARPACK's relative tolerance (iterative method).",
)
@click.option(
    "--matrix",
    is_flag=True,
    help="Include the whole k × min(d_out, d_in) similarity matrix in --json / --csv.",
)
@click.option(
    "--plot",
    type=click.Path(path_type=Path),
    help="Save the similarity heatmaps, one panel per module (png/pdf/svg).",
)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Neither read nor write W's SVD in the cache directory ($LORASCOPE_CACHE_DIR, else "
    "$XDG_CACHE_HOME/lorascope or ~/.cache/lorascope).",
)
def intruders(
    base_path: Path,
    delta_path: Path,
    read,
    layer,
    module,
    dtype,
    device,
    seed,
    out,
    k,
    epsilon,
    side,
    method,
    tol,
    matrix,
    plot,
    no_cache,
) -> None:
    """Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
    Equivalence", Def. 1): top-k singular vectors y_j of W + ΔW whose best |cos| against every
    singular vector x_i of W is below ε."""
    eps = list(epsilon) or [DEFAULT_EPSILON]
    ad = read(delta_path, base_path)
    base = load_base(base_path)
    results = intruders_api(
        ad,
        base,
        layer=layer,
        module=module,
        k=k,
        epsilon=eps,
        side=side,
        method=method,
        tol=tol,
        seed=seed,
        dtype=dtype,
        device=device,
        cache=SpectralCache(enabled=not no_cache),
    )
    if plot is not None:
        _save_plot(results, plot)
    if out == "json":
        print_json([r.to_dict(matrix=matrix) for r in results])
    elif out == "csv" and matrix:
        print_csv(IntruderResult.MATRIX_TIDY, (row for r in results for row in r.matrix_rows()))
    else:
        totals = ", ".join(
            f"{sum(r.counts[i] for r in results)} at ε={e:g}" for i, e in enumerate(eps)
        )
        k_used = max(r.k for r in results)
        print_results(
            results,
            out,
            f"intruder dimensions of W + ΔW ({side} singular vectors, top {k_used}): "
            f"{delta_path} on {base_path}; total {totals}",
        )


def _save_plot(results: list[IntruderResult], path: Path) -> None:
    from lorascope.plot import plot_intruders, plot_intruders_grid

    def draw(plt):
        if len(results) > 1:
            return plot_intruders_grid(results)
        fig, ax = plt.subplots(figsize=(6.5, 0.2 * results[0].k + 1.6), layout="constrained")
        plot_intruders(results[0], ax)
        return fig

    save_plot(draw, path)
