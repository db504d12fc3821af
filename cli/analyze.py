"""The analysis commands: inspect, spectrum, similarity, amplify (Hu et al. 2021 §7)."""

from __future__ import annotations

import math
from pathlib import Path

import click
import numpy as np

from lorascope.adapter import Adapter
from lorascope.analysis import amplify as amplify_api
from lorascope.analysis import similarity as similarity_api
from lorascope.analysis import spectrum as spectrum_api
from lorascope.cli.options import (
    base_delta_options,
    compute_options,
    method_option,
    output_options,
    reading_options,
    selection_options,
    side_option,
)
from lorascope.cli.output import print_csv, print_json, print_table, save_plot
from lorascope.errors import NonFiniteError
from lorascope.formats import load_base
from lorascope.linalg import safe_norm


def _ident(d: dict) -> list:
    return [d["module"], d["layer"], d["kind"], d["rank"]]


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
    rows = [
        {
            "module": m.key,
            "layer": m.layer,
            "kind": m.kind,
            "rank": m.rank,
            "family": m.family,
            "r": m.r,
            "params": m.params,
            "dora": m.is_dora,
            "update": m.update,
            "shape": [m.d_out, m.d_in],
            "scale": float(m.scale),
            "alpha": m.alpha,
            "dtype": str(m.A.dtype).removeprefix("torch."),
            "norm_A": safe_norm(m.A),
            "norm_B": safe_norm(m.B),
            "format": ad.format,
            "source": m.source,
        }
        for m in mods
    ]
    cols = [
        "module",
        "layer",
        "kind",
        "rank",
        "family",
        "r",
        "params",
        "d_out",
        "d_in",
        "scale",
        "alpha",
        "dtype",
        "norm_A",
        "norm_B",
    ]
    table = [
        [
            *_ident(r),
            r["family"] + ("+dora" if r["dora"] and r["family"] != "dora" else ""),
            r["r"],
            r["params"],
            *r["shape"],
            r["scale"],
            r["alpha"],
            r["dtype"],
            r["norm_A"],
            r["norm_B"],
        ]
        for r in rows
    ]
    if out == "json":
        print_json(rows)
    elif out == "csv":
        print_csv(cols, table)
    else:
        ranks = ", ".join(map(str, ad.ranks))
        fams = ", ".join(ad.families)
        print_table(
            f"{ad.path} ({ad.format}, {fams}): {len(mods)} modules, rank {ranks}", cols, table
        )


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
    dicts = [r.to_dict() for r in results]
    if out == "json":
        print_json(dicts)
    elif out == "csv":
        print_csv(
            ["module", "layer", "kind", "rank", "index", "singular_value", "energy"],
            [
                [*_ident(d), i + 1, s, e]
                for d in dicts
                for i, (s, e) in enumerate(zip(d["singular_values"], d["energy"], strict=True))
            ],
        )
    else:
        cols = [
            "module",
            "layer",
            "kind",
            "rank",
            "‖ΔW‖_F",
            "σ1",
            "σ2/σ1",
            "top-1 energy",
            "eff. rank",
            "stable rank",
            "num. rank",
        ]
        rows = [
            [
                *_ident(d),
                d["frobenius_norm"],
                d["spectral_norm"],
                d["singular_values"][1] / d["spectral_norm"]
                if len(d["singular_values"]) > 1
                else None,
                d["energy"][0],
                d["effective_rank"],
                d["stable_rank"],
                d["numerical_rank"],
            ]
            for d in dicts
        ]
        print_table(f"spectrum of ΔW: {adapter}", cols, rows)


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
    dicts = [r.to_dict() for r in results]
    if out == "json":
        print_json(dicts)
        return
    if out == "csv":
        cols = [
            "module",
            "layer",
            "kind",
            "rank",
            "rank_b",
            "factor",
            "i",
            "j",
            "phi",
            "random_phi",
            "expected_random",
        ]
        rows = [
            [
                *_ident(d),
                d["rank_b"],
                d["factor"],
                i + 1,
                j + 1,
                v,
                None if r.random_phi is None else float(r.random_phi[i, j]),
                float(r.expected_random[i, j]),
            ]
            for d, r in zip(dicts, results, strict=True)
            for i, row in enumerate(r.phi)
            for j, v in enumerate(row.tolist())
        ]
        print_csv(cols, rows)
        return
    cols = [
        "module",
        "layer",
        "kind",
        "rank",
        "rank_b",
        "φ(1,1)",
        "φ(i,i) mean",
        "φ mean",
        "random mean",
    ]
    rows = []
    for r in results:
        k = min(r.phi.shape)
        rnd = r.random_phi if r.random_phi is not None else r.expected_random
        rows.append(
            [
                r.module,
                r.layer,
                r.kind,
                r.rank,
                r.rank_b,
                float(r.phi[0, 0]),
                float(np.mean(np.diagonal(r.phi)[:k])),
                float(r.phi.mean()),
                float(rnd.mean()),
            ]
        )
    print_table(f"φ on {factor}: {adapter_a} vs {adapter_b}", cols, rows)
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


@click.command()
@base_delta_options
@reading_options
@selection_options
@compute_options
@output_options
@method_option
def amplify(
    base_path: Path, delta_path: Path, read, layer, module, dtype, device, seed, out, method
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
    )
    dicts = [r.to_dict() for r in results]
    cols = [
        "module",
        "layer",
        "kind",
        "rank",
        "‖W‖_F",
        "‖ΔW‖_F",
        "‖UᵀWV‖ ΔW",
        "‖UᵀWV‖ W",
        "‖UᵀWV‖ random",
        "amplification",
    ]
    rows = [
        [
            *_ident(d),
            d["norm_weight"],
            d["norm_delta"],
            d["proj_delta"],
            d["proj_weight"],
            d["proj_random"],
            r.amplification,
        ]
        for d, r in zip(dicts, results, strict=True)
    ]
    if out == "json":
        print_json(dicts)
    elif out == "csv":
        print_csv(
            [
                "module",
                "layer",
                "kind",
                "rank",
                "norm_weight",
                "norm_delta",
                "proj_delta",
                "proj_weight",
                "proj_random",
                "amplification",
            ],
            [[*row[:-1], d["amplification"]] for row, d in zip(rows, dicts, strict=True)],
        )
    else:
        print_table(f"projection of W onto ΔW's subspace: {delta_path} on {base_path}", cols, rows)


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
) -> None:
    """φ(i, j) between the top-i singular directions of W and the top-j of ΔW, with a random
    baseline (paper §7.3, Figure 8): does ΔW pick up directions W already emphasises?"""
    from lorascope.analysis import weight_similarity as wsim_api

    ad = read(delta_path, base_path)
    base = load_base(base_path)
    results = [
        wsim_api(
            m,
            base.weight_for(m),
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
    dicts = [r.to_dict() for r in results]
    if out == "json":
        print_json(dicts)
    elif out == "csv":
        print_csv(
            ["module", "layer", "kind", "rank", "side", "i", "j", "phi", "random_phi"],
            [
                [*_ident(d), side, i + 1, j + 1, float(r.phi[i, j]), float(r.random_phi[i, j])]
                for d, r in zip(dicts, results, strict=True)
                for i in range(r.phi.shape[0])
                for j in range(r.phi.shape[1])
            ],
        )
    else:
        cols = [
            "module",
            "layer",
            "kind",
            "ΔW rank",
            f"φ(W top-{max_i}, ΔW top-1)",
            f"φ(W top-{max_i}, ΔW all)",
            "random",
        ]
        rows = [
            [
                r.module,
                r.layer,
                r.kind,
                r.rank,
                float(r.phi[-1, 0]),
                float(r.phi[-1, -1]),
                float(r.random_phi[-1, -1]),
            ]
            for r in results
        ]
        print_table(f"W vs ΔW directions ({side}): {delta_path} on {base_path}", cols, rows)
