"""`lorascope compare`: N adapters of one base, per-module N×N φ and Grassmann distance."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from lorascope.analysis.compare import (
    CompareResult,
    SettleResult,
    cluster,
    mean_matrix,
    settle,
)
from lorascope.analysis.compare import compare as compare_api
from lorascope.cli.options import output_options, reading_options, selection_options
from lorascope.cli.output import fmt, print_results, print_table, save_plot

# Above this many pairs the per-module table shows a summary instead of one column per pair.
_MAX_PAIR_COLUMNS = 10


@click.command()
@click.argument("adapters", nargs=-1, type=click.Path(path_type=Path))
@reading_options
@selection_options
@output_options
@click.option(
    "--k",
    "k",
    type=click.IntRange(min=1),
    help="Top-k directions of every adapter (i = j = k). Default: the smallest rank.",
)
@click.option("-i", "i", type=click.IntRange(min=1), help="Top-i directions of the row adapter.")
@click.option(
    "-j", "j", type=click.IntRange(min=1), help="Top-j of the column adapter (default: i)."
)
@click.option(
    "--factor",
    type=click.Choice(["right", "left"]),
    default="right",
    show_default=True,
    help="ΔW's right (input side, the paper's A side) or left (output side) singular vectors.",
)
@click.option(
    "--settle",
    "settle_flag",
    is_flag=True,
    help="Checkpoints of one run in training order, the final one last: when does each "
    "module's φ to the final stay above --threshold?",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=0.9,
    show_default=True,
    help="φ to the final checkpoint from which a module counts as settled (--settle).",
)
@click.option(
    "--plot",
    type=click.Path(path_type=Path),
    help="Save a clustered heatmap (with --settle: φ to the final per checkpoint).",
)
def compare(
    adapters: tuple[Path, ...],
    read,
    layer,
    module,
    out,
    k,
    i,
    j,
    factor,
    settle_flag,
    threshold,
    plot,
) -> None:
    """Subspace similarity of N adapters of one base (seeds, tasks, checkpoints): per module an
    N×N matrix of φ = ‖U_iᵀ V_j‖_F² / min(i, j) (Hu et al. 2021 §7.2, eq. 4) and the Grassmann
    distance sqrt(Σ θ²) over the principal angles, on ΔW's own singular vectors (invariant to
    how alpha and G split between A and B). Default i = j = the smallest rank."""
    loaded = [read(p) for p in adapters]
    results = compare_api(loaded, k=k, i=i, j=j, factor=factor, layer=layer, module=module)
    if settle_flag:
        settled = settle(results, threshold)
        if plot is not None:
            _save_plot(settled, plot, settle=True)
        _print_settle(settled, out)
        return
    if plot is not None:
        _save_plot(results, plot, settle=False)
    _print_compare(results, out)


def _ij(r: CompareResult) -> str:
    return f"{r.i},{r.j}"


def _print_compare(results: list[CompareResult], out: str) -> None:
    if out != "table":
        print_results(results, out, "")
        return
    r0 = results[0]
    n = len(r0.labels)
    order = _mean_order(results)
    side = "right (input)" if r0.factor == "right" else "left (output)"
    ijs = list(dict.fromkeys(_ij(r) for r in results))
    rnds = list(dict.fromkeys(r.expected_random for r in results))
    what = f"φ({ijs[0]})" if len(ijs) == 1 else "φ(i,j)"
    modules = f"{len(results)} modules" if len(results) > 1 else results[0].module
    click.echo(
        f"{n} adapters, {len(results)} shared modules, ΔW's {side} singular vectors; "
        "matrices in average-linkage dendrogram order (1 − φ)"
    )
    names = [f"{a + 1} {r0.labels[a]}" for a in order]
    for title, M in (
        (f"mean {what} over {modules}", mean_matrix(results, "phi")),
        (f"mean Grassmann distance (rad) over {modules}", mean_matrix(results, "grassmann")),
    ):
        print_table(
            title,
            ["adapter", *[str(a + 1) for a in order]],
            [[nm, *(float(M[a, b]) for b in order)] for nm, a in zip(names, order, strict=True)],
        )
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    # i,j and the random baseline go into the title when every module shares them
    ident = ["module", "layer", "kind", *(["i,j"] if len(ijs) > 1 else [])]
    extra = ["random φ"] if len(rnds) > 1 else []
    random_note = f"random φ = max(i,j)/n = {fmt(rnds[0])}" if len(rnds) == 1 else "random φ"

    def head(r: CompareResult) -> list:
        return [r.module, r.layer, r.kind, *([_ij(r)] if len(ijs) > 1 else [])]

    def tail(r: CompareResult) -> list:
        return [r.expected_random] if extra else []

    if len(pairs) <= _MAX_PAIR_COLUMNS:
        cols = [*ident, *(f"{a + 1}·{b + 1}" for a, b in pairs), *extra]
        rows = [
            [*head(r), *(_cell(r.phi[a, b], r.grassmann[a, b]) for a, b in pairs), *tail(r)]
            for r in results
        ]
        rows += [
            [
                f"mean ({kind})",
                None,
                kind,
                *([None] if len(ijs) > 1 else []),
                *(
                    _cell(
                        np.mean([r.phi[a, b] for r in sub]),
                        np.mean([r.grassmann[a, b] for r in sub]),
                    )
                    for a, b in pairs
                ),
                *([float(np.mean([r.expected_random for r in sub]))] if extra else []),
            ]
            for kind, sub in _by_kind(results)
        ]
        cells = f"cells: {what} (Grassmann distance); {random_note}"
    else:
        cols = [*ident, "mean φ", "min φ", "min pair", "max φ", "max pair", "mean dist", *extra]
        rows = []
        for r in results:
            vals = [r.phi[a, b] for a, b in pairs]
            lo, hi = int(np.argmin(vals)), int(np.argmax(vals))
            rows.append(
                [
                    *head(r),
                    float(np.mean(vals)),
                    float(vals[lo]),
                    "{}·{}".format(*(x + 1 for x in pairs[lo])),
                    float(vals[hi]),
                    "{}·{}".format(*(x + 1 for x in pairs[hi])),
                    float(np.mean([r.grassmann[a, b] for a, b in pairs])),
                    *tail(r),
                ]
            )
        cells = f"{what} over all pairs of adapters; {random_note}"
    print_table(f"per module ({cells})", cols, rows)


def _cell(phi: float, dist: float) -> str:
    return f"{phi:.3f} ({dist:.2f})"


def _by_kind(results: list[CompareResult]) -> list[tuple[str, list[CompareResult]]]:
    kinds = list(dict.fromkeys(r.kind for r in results))
    groups = [(kind, [r for r in results if r.kind == kind]) for kind in kinds]
    if len(results) > 1 and len(kinds) > 1:
        groups.append(("all", list(results)))
    return groups if len(results) > 1 else []


def _mean_order(results: list[CompareResult]) -> list[int]:
    return cluster(1.0 - mean_matrix(results, "phi"))[1]


def _print_settle(settled: list[SettleResult], out: str) -> None:
    if out != "table":
        print_results(settled, out, "")
        return
    s0 = settled[0]
    uniform = len({(s.i, s.j) for s in settled}) == 1
    n_early = sum(s.settled_before_final for s in settled)
    click.echo(
        f"settled at = the first checkpoint from which φ to the final ({s0.labels[-1]}) stays "
        f">= {fmt(s0.threshold)}; {n_early} of {len(settled)} modules settled before the final"
    )
    cols = [
        "module",
        "layer",
        "kind",
        *([] if uniform else ["i,j"]),
        *(f"φ {x}" for x in s0.labels[:-1]),
        "settled at",
    ]
    rows = [
        [
            s.module,
            s.layer,
            s.kind,
            *([] if uniform else [f"{s.i},{s.j}"]),
            *s.phi_to_final[:-1],
            s.settled_label if s.settled_before_final else f"{s.settled_label} (final)",
        ]
        for s in settled
    ]
    what = f"φ({s0.i},{s0.j})" if uniform else "φ(i,j)"
    print_table(f"{what} of each checkpoint's top directions to the final", cols, rows)


def _save_plot(results, path: Path, *, settle: bool) -> None:
    from lorascope.plot import plot_compare, plot_settle

    def draw(plt):
        if not settle:
            return plot_compare(results)
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        plot_settle(results, ax)
        return fig

    save_plot(draw, path)
