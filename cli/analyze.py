"""The analysis commands: inspect, spectrum, similarity, amplify (Hu et al. 2021 §7)."""

from __future__ import annotations

import math
from pathlib import Path

import click

from lorascope.adapter import Adapter, LoraModule
from lorascope.analysis import amplify as amplify_api
from lorascope.analysis import similarity as similarity_api
from lorascope.analysis import spectrum as spectrum_api
from lorascope.cache import SpectralCache
from lorascope.cli.options import (
    base_delta_options,
    compute_options,
    method_option,
    output_options,
    reading_options,
    selection_options,
    side_option,
)
from lorascope.cli.output import print_csv, print_json, print_results, print_table, save_plot
from lorascope.errors import NonFiniteError
from lorascope.formats import load_base
from lorascope.linalg import safe_norm


@click.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@reading_options
@selection_options
@output_options
def inspect(adapter: Path, read, layer, module, out) -> None:
    """List an adapter's modules: layer, kind, family, rank (width of the exact factored form
    ΔW = s·B' A'; 'r' is the configured rank), parameters, shape, scale, factor norms."""
    ad: Adapter = read(adapter)
    mods = ad.select(layer=layer, module=module)
    for m in mods:
        if not all(math.isfinite(safe_norm(t)) for t in (m.A, m.B)):
            raise NonFiniteError(f"{m.tensor_name()}: the norm of a factor overflows float64")
    if out == "json":
        print_json(ad.records(mods))
    elif out == "csv":
        print_csv(LoraModule.COLUMNS, [m.row() for m in mods])
    else:
        print_table(ad.caption(len(mods)), LoraModule.COLUMNS, [m.row() for m in mods])


@click.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@reading_options
@selection_options
@compute_options
@output_options
@click.option("--rcond", type=float, help="Relative cut-off for the numerical rank.")
def spectrum(adapter: Path, read, layer, module, dtype, device, seed, out, rcond) -> None:
    """Singular values of each ΔW = (alpha/r)·B A, cumulative energy, effective and stable rank
    (paper §7.2), from the factors: ΔW is never formed."""
    results = spectrum_api(
        read(adapter), layer=layer, module=module, rcond=rcond, dtype=dtype, device=device
    )
    print_results(results, out, f"spectrum of ΔW: {adapter}")


def _grid_columns(n: int) -> list[int]:
    """j values to show in a terminal: all up to 16, else 1..8 and powers of two."""
    if n <= 16:
        return list(range(1, n + 1))
    return sorted({*range(1, 9), *(2**k for k in range(4, 12) if 2**k <= n), n})


@click.command()
@click.argument("adapter_a", type=click.Path(path_type=Path))
@click.argument("adapter_b", type=click.Path(path_type=Path))
@reading_options
@selection_options
@compute_options
@output_options
@click.option(
    "--factor",
    type=click.Choice(["A", "B", "right", "left"]),
    default="A",
    show_default=True,
    help="Directions compared: A's right-singular vectors (the paper's), B's left-singular "
    "vectors, or ΔW's right/left singular vectors.",
)
@click.option("--max-i", type=click.IntRange(min=1), help="Rows i (default: rank of A).")
@click.option("--max-j", type=click.IntRange(min=1), help="Columns j (default: rank of B).")
@click.option("--no-baseline", is_flag=True, help="Skip the random-subspace baseline.")
@click.option("--plot", type=click.Path(path_type=Path), help="Save heatmap(s) (png/pdf/svg).")
def similarity(
    adapter_a: Path,
    adapter_b: Path,
    read,
    layer,
    module,
    dtype,
    device,
    seed,
    out,
    factor,
    max_i,
    max_j,
    no_baseline,
    plot,
) -> None:
    """Normalized subspace similarity φ(i, j) = ‖U_iᵀ V_j‖_F² / min(i, j) between two adapters
    (paper §7.2, eq. 4, Figures 3 and 4), for every i <= max-i, j <= max-j and module."""
    a, b = read(adapter_a), read(adapter_b)
    results = similarity_api(
        a,
        b,
        layer=layer,
        module=module,
        factor=factor,
        max_i=max_i,
        max_j=max_j,
        baseline=not no_baseline,
        seed=seed,
        dtype=dtype,
        device=device,
    )
    if plot is not None:
        _save_phi_plot(results, plot)
    print_results(results, out, f"φ on {factor}: {adapter_a} vs {adapter_b}")
    if out != "table":
        return
    if len(results) == 1:
        r = results[0]
        js = _grid_columns(r.phi.shape[1])
        print_table(
            f"φ(i, j) for {r.module} (rows i <= {r.phi.shape[0]}, columns j)",
            ["i", *[f"j={j}" for j in js]],
            [[i + 1, *(float(r.phi[i, j - 1]) for j in js)] for i in range(r.phi.shape[0])],
        )


def _save_phi_plot(results, path: Path) -> None:
    from lorascope.plot import plot_phi, plot_phi_grid

    def draw(plt):
        if len(results) > 1:
            return plot_phi_grid(results)
        r = results[0]
        fig, ax = plt.subplots(figsize=(max(4.0, 0.12 * r.phi.shape[1] + 2.5), 3.2))
        other = "W" if r.module_b == "W" else f"r={r.rank_b}"
        plot_phi(r.phi, ax, title=f"φ({r.module}, r={r.rank} vs {other})")
        return fig

    save_plot(draw, path)


_NO_CACHE_HELP = (
    "Neither read nor write W's spectral data in the cache directory ($LORASCOPE_CACHE_DIR, "
    "else $XDG_CACHE_HOME/lorascope or ~/.cache/lorascope)."
)


@click.command()
@base_delta_options
@reading_options
@selection_options
@compute_options
@output_options
@method_option
@click.option(
    "--no-w-baseline",
    is_flag=True,
    help="Skip the ‖UᵀWV‖ W column (W's top-r: the one column that factors W); one read of W.",
)
@click.option("--no-cache", is_flag=True, help=_NO_CACHE_HELP)
def amplify(
    base_path: Path,
    delta_path: Path,
    read,
    layer,
    module,
    dtype,
    device,
    seed,
    out,
    method,
    no_w_baseline,
    no_cache,
) -> None:
    """How ΔW relates to W (paper §7.3, Table 7): ‖Uᵀ W V‖_F with U, V the top-r singular
    vectors of ΔW, of W, and of a random matrix; ‖W‖_F, ‖ΔW‖_F and the amplification factor
    ‖ΔW‖_F / ‖Uᵀ W V‖_F."""
    ad = read(delta_path, base_path)
    base = load_base(base_path)
    results = amplify_api(
        ad,
        base,
        layer=layer,
        module=module,
        seed=seed,
        method=method,
        dtype=dtype,
        device=device,
        w_baseline=not no_w_baseline,
        cache=SpectralCache(enabled=not no_cache),
    )
    print_results(results, out, f"projection of W onto ΔW's subspace: {delta_path} on {base_path}")


@click.command("weight-similarity")
@base_delta_options
@reading_options
@selection_options
@compute_options
@output_options
@side_option("right", "Input-side (right, V) or output-side (left, U) singular directions.")
@click.option(
    "--max-i",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="How many of W's top singular directions.",
)
@click.option("--max-j", type=click.IntRange(min=1), help="How many of ΔW's (default: rank).")
@click.option("--no-cache", is_flag=True, help=_NO_CACHE_HELP)
@method_option
@click.option("--plot", type=click.Path(path_type=Path), help="Save heatmap(s) (png/pdf/svg).")
def weight_similarity(
    base_path: Path,
    delta_path: Path,
    read,
    layer,
    module,
    dtype,
    device,
    seed,
    out,
    side,
    max_i,
    max_j,
    method,
    plot,
    no_cache,
) -> None:
    """φ(i, j) between the top-i singular directions of W and the top-j of ΔW, with a random
    baseline (paper §7.3, Figure 8): does ΔW pick up directions W already emphasises?"""
    from lorascope.analysis import weight_similarity as wsim_api

    ad = read(delta_path, base_path)
    base = load_base(base_path)
    with SpectralCache(enabled=not no_cache).active() as cache:
        results = [
            wsim_api(
                m,
                cache.tag(base.weight_for(m), base.fingerprint(m)),
                side=side,
                max_i=max_i,
                max_j=max_j,
                seed=seed,
                method=method,
                dtype=dtype,
                device=device,
            )
            for m in ad.select(layer=layer, module=module)
        ]
    if plot is not None:
        _save_phi_plot(results, plot)
    print_results(results, out, f"W vs ΔW directions ({side}): {delta_path} on {base_path}")
