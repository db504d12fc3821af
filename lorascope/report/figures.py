"""The report's figures: the paper's Figures 3, 4, 6/7 and 8, spectra, effective rank and
amplification, each with a caption that states what it shows in numbers.

Figures are built on :class:`matplotlib.figure.Figure` (no pyplot state, no backend needed) from
the plot functions of :mod:`lorascope.plot`; heatmaps share the fixed colour scale [0, 1], rows
``i`` and columns ``j`` counted from 1 as in the paper.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from lorascope.plot import (
    plot_amplification,
    plot_by_layer,
    plot_phi,
    plot_singular_values,
    plot_spectrum,
)
from lorascope.report.compute import ReportData
from lorascope.report.store import sim_path, spec_path, wsim_path

__all__ = ["ReportFigure", "figure_plan", "report_figures", "render"]

MAX_LAYER_ROWS = 8  # Figures 6/7 show at most this many layers, evenly spaced (all are in h5)


@dataclass
class ReportFigure:
    """A figure, its caption (numbers included) and the ``results.h5`` paths it plots."""

    name: str
    title: str
    caption: str
    figure: Figure
    datasets: list[str] = field(default_factory=list)


def render(fig: Figure, dpi: int) -> dict[str, bytes]:
    """PNG and PDF bytes of ``fig``; metadata without dates, so re-rendering is reproducible."""
    out = {}
    for ext, meta in (("png", {"Software": None}), ("pdf", {"CreationDate": None})):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=dpi, metadata=meta)
        out[ext] = buf.getvalue()
    return out


def _heat(
    ax: Axes, phi: np.ndarray, title: str, *, i: str = "i", j: str = "j", max_xticks: int = 8
) -> None:
    plot_phi(phi, ax, title=title, cbar=False, ylabel=i, xlabel=j)
    ax.collections[0].set_rasterized(True)  # one image in the PDF, not i·j rectangles
    n = phi.shape[1]
    if n > max_xticks:  # fewer column labels on narrow panels
        step = -(-n // max_xticks)
        ticks = list(range(1, n + 1, step)) if step < 4 else [1, *range(step, n + 1, step)]
        ax.set_xticks([t - 0.5 for t in ticks], [str(t) for t in ticks], rotation=0)


def _colorbar(fig: Figure, axes: list[Axes]) -> None:
    height = fig.get_figheight()
    shrink = 0.8 if height < 6 else 4.8 / height  # about 4.8 in tall on tall figures
    fig.colorbar(axes[0].collections[0], ax=axes, shrink=shrink, label="φ(i, j)")


def _sub(kind: str) -> str:
    return f"ΔW_{kind}"


def _nums(values: dict[str, float]) -> str:
    return ", ".join(f"{v:.2f} ({k})" for k, v in values.items())


def _one_or_each(values: dict[str, str]) -> str:
    """``"x"`` when every key has the value ``x``, else ``"x (k1), y (k2)"``."""
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return ", ".join(f"{v} ({k})" for k, v in values.items())


def directions(factor: str) -> str:
    """What φ compares for ``factor`` (:class:`~lorascope.report.ReportOptions`)."""
    return {
        "A": "right-singular directions of A",
        "B": "left-singular directions of B",
        "right": "right-singular directions of ΔW",
        "left": "left-singular directions of ΔW",
    }[factor]


def _random_level(i: int, j: int, n: int) -> str:
    """``E[φ(i, j)] = max(i, j)/n`` for two random subspaces of ``R^n`` (DESIGN.md), as text."""
    return f"{max(i, j)}/{n} = {max(i, j) / n:.3f}"


def _fig3(d: ReportData) -> ReportFigure:
    lo, hi = d.rank_pair
    o = d.options
    z = min(o.zoom, lo.rank, hi.rank)
    kinds = list(o.kinds)
    fig = Figure(figsize=(0.07 * hi.rank + 2.2 + 2.4, 1.9 * len(kinds) + 0.4), layout="constrained")
    axes = fig.subplots(len(kinds), 2, squeeze=False, width_ratios=[max(hi.rank, 8) / 8 + 1, 2])
    paths, phi11, diag = [], {}, {}
    for row, kind in zip(axes, kinds, strict=True):
        res = d.at_layer(d.rank_sim[kind])[0]
        name = f"φ(A_r={lo.rank}, A_r={hi.rank}) {_sub(kind)}, layer {o.layer}"
        _heat(row[0], res.phi, name)
        _heat(row[1], res.phi[:z, :z], f"i, j ≤ {z}")
        paths.append(sim_path("ranks", kind, o.layer))
        phi11[kind] = float(res.phi[0, 0])
        diag[kind] = float(np.mean(np.diagonal(res.phi)[:z]))
    _colorbar(fig, list(axes.flat))
    # n: d_in for A's / ΔW's right directions, d_out for B's / ΔW's left ones (GQA: k, v differ)
    dims = {kind: d.at_layer(d.rank_sim[kind])[0].dim for kind in kinds}
    if len(set(dims.values())) == 1:
        dim = dims[kinds[0]]
        rnd = f"subspaces of R^{dim} would give max(i, j)/{dim}, {1 / dim:.3f} at (1, 1)."
    else:
        at11 = _one_or_each({k: _random_level(1, 1, n) for k, n in dims.items()})
        rnd = f"subspaces of R^n would give max(i, j)/n, at (1, 1) {at11}."
    caption = (
        f"Subspace similarity φ(A_r={lo.rank}, A_r={hi.rank}, i, j) between the top-i "
        f"{directions(o.factor)} at r = {lo.rank} and the top-j at r = {hi.rank} "
        f"(i ≤ {lo.rank}, j ≤ {hi.rank}), layer {o.layer}; right: zoomed to i, j ≤ {z}. "
        f"φ(1, 1) = {_nums(phi11)}; mean φ(i, i) for i ≤ {z} = {_nums(diag)}; two random {rnd}"
    )
    return ReportFigure("fig3_rank_similarity", "Figure 3 analogue", caption, fig, paths)


def _fig4(d: ReportData) -> ReportFigure:
    a, b = d.seed_pair
    o = d.options
    kinds = list(o.kinds)
    n = len(kinds) + 1
    fig = Figure(figsize=(2.6 * n + 0.8, 2.7), layout="constrained")
    axes = list(fig.subplots(1, n, squeeze=False).flat)
    paths, means = [], {}
    for ax, kind in zip(axes, kinds, strict=False):
        res = d.at_layer(d.seed_sim[kind])[0]
        _heat(ax, res.phi, f"{_sub(kind)}: seed {a.seed} vs {b.seed}", max_xticks=6)
        paths.append(sim_path("seeds", kind, o.layer))
        means[kind] = float(res.phi.mean())
    first = d.at_layer(d.seed_sim[kinds[0]])[0]
    _heat(axes[-1], first.random_phi, f"random Gaussian, {a.rank}×{first.dim}", max_xticks=6)
    paths.append(sim_path("seeds", kinds[0], o.layer) + "/random_phi")
    _colorbar(fig, axes)
    dims = {kind: d.at_layer(d.seed_sim[kind])[0].dim for kind in kinds}
    if len(set(dims.values())) == 1:
        expected = f"max(i, j)/{first.dim} = {float(first.expected_random.mean()):.3f}"
        shape = f"{a.rank}×{first.dim}"
    else:  # the random panel is drawn in the first kind's space
        mean = {k: float(d.at_layer(d.seed_sim[k])[0].expected_random.mean()) for k in kinds}
        expected = "max(i, j)/n = " + ", ".join(
            f"{mean[k]:.3f} ({k}, n = {n})" for k, n in dims.items()
        )
        shape = f"{a.rank}×{first.dim} (as for {_sub(kinds[0])})"
    caption = (
        f"φ(A_r={a.rank}, A'_r={a.rank}, i, j) between two runs at r = {a.rank} (seeds {a.seed} "
        f"and {b.seed}), layer {o.layer}, i, j ≤ {a.rank}; right: the same for the right-singular "
        f"directions of two random Gaussian matrices of shape {shape}. Mean φ over the grid = "
        f"{_nums(means)}; random {float(first.random_phi.mean()):.3f} (expected mean of "
        f"{expected})."
    )
    return ReportFigure("fig4_seed_similarity", "Figure 4 analogue", caption, fig, paths)


def _shown_layers(layers: list) -> list:
    if len(layers) <= MAX_LAYER_ROWS:
        return list(layers)
    idx = np.unique(np.linspace(0, len(layers) - 1, MAX_LAYER_ROWS).round().astype(int))
    return [layers[k] for k in idx]


def _fig67(d: ReportData, kind: str) -> ReportFigure:
    lo, hi = d.rank_pair
    z = min(d.options.zoom, lo.rank, hi.rank)
    layers = _shown_layers(d.layers)
    seeds = kind in d.seed_sim
    ncol = 3 if seeds else 2
    ratios = [max(hi.rank, 8) / 8 + 1, 2] + ([2.4] if seeds else [])
    fig = Figure(figsize=(0.07 * hi.rank + 4.6 + 2.6 * seeds, 1.8 * len(layers) + 0.4))
    fig.set_layout_engine("constrained")
    axes = fig.subplots(len(layers), ncol, squeeze=False, width_ratios=ratios)
    paths, phi11 = [], {}
    for row, layer in zip(axes, layers, strict=True):
        res = d.at_layer(d.rank_sim[kind], layer)[0]
        _heat(row[0], res.phi, f"layer {layer}: r={lo.rank} vs r={hi.rank}")
        _heat(row[1], res.phi[:z, :z], f"i, j ≤ {z}")
        paths.append(sim_path("ranks", kind, layer))
        phi11[f"layer {layer}"] = float(res.phi[0, 0])
        if seeds:
            s = d.at_layer(d.seed_sim[kind], layer)[0]
            _heat(row[2], s.phi, f"seeds at r={s.rank}", max_xticks=4)
            paths.append(sim_path("seeds", kind, layer))
    _colorbar(fig, list(axes.flat))
    which = {"q": "Figure 6", "v": "Figure 7"}.get(kind, "Figures 6/7")
    shown = (
        "every layer"
        if len(layers) == len(d.layers)
        else f"{len(layers)} of {len(d.layers)} layers"
    )
    caption = (
        f"φ(A_r={lo.rank}, A_r={hi.rank}, i, j) for {_sub(kind)} at {shown} "
        f"(left i ≤ {lo.rank}, j ≤ {hi.rank}; middle zoomed to {z}"
        + (f"; right two seeds at r = {d.seed_pair[0].rank}" if seeds else "")
        + f"). φ(1, 1) by layer: {_nums(phi11)}."
    )
    return ReportFigure(
        f"fig67_layers_{kind}", f"{which} analogue ({_sub(kind)})", caption, fig, paths
    )


def _fig8(d: ReportData) -> ReportFigure:
    o = d.options
    prim = [m for m in d.primaries if m.label in d.weight_sim]
    kinds = list(o.kinds)
    fig = Figure(figsize=(1.9 * (len(prim) + 1) + 0.8, 2.4 * len(kinds) + 0.3))
    fig.set_layout_engine("constrained")
    axes = fig.subplots(len(kinds), len(prim) + 1, squeeze=False)
    paths, top, w_i = [], {}, {}
    rnd: dict[str, dict[str, str]] = {kind: {} for kind in kinds}  # kind -> "r=…" -> level
    for row, kind in zip(axes, kinds, strict=True):
        for ax, m in zip(row, prim, strict=False):
            res = d.weight_sim[m.label][kind]
            _heat(ax, res.phi, f"{_sub(kind)}, r={m.rank}", i="i (W)", j="j (ΔW)", max_xticks=4)
            paths.append(wsim_path(m.label, kind))
            # W has min(d_out, d_in) directions, in R^d_in (right) or R^d_out (left): per kind
            i, j = res.phi.shape
            w_i[kind] = str(i)
            top[f"{kind}, r={m.rank}"] = float(res.phi[-1, -1])
            rnd[kind][f"r={m.rank}"] = _random_level(i, j, res.dim)
        last = d.weight_sim[prim[-1].label][kind]
        title = f"random vs {_sub(kind)}, r={prim[-1].rank}"
        _heat(row[-1], last.random_phi, title, i="i (random)", j="j (ΔW)", max_xticks=4)
        paths.append(wsim_path(prim[-1].label, kind) + "/random_phi")
    _colorbar(fig, list(axes.flat))
    top_i = _one_or_each(w_i)
    if len(set(w_i.values())) == 1:
        share = f"W's top {top_i}, φ({top_i}, r)"
    else:
        share = "W's top i, φ(i, r)"
    if all(len(set(by_r.values())) == 1 for by_r in rnd.values()):  # r ≤ i throughout
        levels = {kind: next(iter(by_r.values())) for kind, by_r in rnd.items()}
    else:  # r > i: the level is max(i, r)/n, one per rank
        levels = {f"{kind}, {r}": v for kind, by_r in rnd.items() for r, v in by_r.items()}
    caption = (
        f"φ between the top-i {o.side}-singular directions of W (i ≤ {top_i}) and the top-j of "
        f"ΔW, layer {o.layer}, for r = {', '.join(str(m.rank) for m in prim)}; right: random "
        f"directions in place of W's. The share of ΔW's subspace inside {share} = "
        f"{_nums(top)}; random: {_one_or_each(levels)}."
    )
    return ReportFigure("fig8_weight_similarity", "Figure 8 analogue", caption, fig, paths)


def _spectra(d: ReportData) -> ReportFigure:
    prim = [m for m in d.primaries if m.rank > 1] or d.primaries  # r = 1: a single σ
    kinds = list(d.options.kinds)
    fig = Figure(figsize=(2.3 * len(prim) + 0.6, 2.0 * 2 * len(kinds) + 0.3))
    fig.set_layout_engine("constrained")
    axes = fig.subplots(2 * len(kinds), len(prim), squeeze=False)
    colors = _layer_colors(d.layers)
    paths, top1 = [], {}
    for k, kind in enumerate(kinds):
        for c, m in enumerate(prim):
            ss = [s for s in d.spectra[m.label] if s.kind == kind]
            for s in ss:
                lab = f"layer {s.layer}"
                plot_singular_values(
                    s.singular_values, axes[2 * k, c], label=lab, color=colors.get(s.layer)
                )
                plot_spectrum(s.singular_values, axes[2 * k + 1, c], label=lab)
                axes[2 * k + 1, c].lines[-1].set_color(colors.get(s.layer, "grey"))
                paths.append(spec_path(m.label, s.module))
            axes[2 * k, c].set_title(f"{_sub(kind)}, r={m.rank}", fontsize=9)
            for ax in axes[2 * k : 2 * k + 2, c]:
                ax.set_xlabel("t")
                if m.rank > 16:  # log-2 t axis: the first few directions hold the energy
                    ticks = [2**e for e in range(m.rank.bit_length()) if 2**e <= m.rank]
                    ax.set_xscale("log", base=2)
                    ax.set_xticks(ticks, [str(t) for t in ticks])
                else:
                    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            top1[f"{kind}, r={m.rank}"] = float(np.mean([s.energy[0] for s in ss]))
    axes[1, -1].legend(fontsize=6, loc="lower right")
    caption = (
        "Singular values σ_t/σ_1 (upper row of each pair, log scale) and cumulative energy "
        "Σ_{s≤t} σ_s²/Σ σ² (lower row) of every module's ΔW, one line per layer, for "
        f"r = {', '.join(str(m.rank) for m in prim)}. Mean energy in the top direction: "
        f"{_nums(top1)}."
    )
    return ReportFigure("spectra", "Spectra of ΔW", caption, fig, paths)


def _layer_colors(layers: list) -> dict:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    n = max(len(layers) - 1, 1)
    return {layer: cmap(0.9 * k / n) for k, layer in enumerate(layers)}


def _effective_rank(d: ReportData) -> ReportFigure:
    kinds, prim = list(d.options.kinds), d.primaries
    fig = Figure(figsize=(3.0 * len(kinds) + 0.6, 2.8), layout="constrained")
    axes = list(fig.subplots(1, len(kinds), squeeze=False).flat)
    paths, span = [], {}
    for ax, kind in zip(axes, kinds, strict=True):
        for m in prim:
            ss = [s for s in d.spectra[m.label] if s.kind == kind and s.layer is not None]
            if ss:
                plot_by_layer(
                    [s.layer for s in ss], [s.effective_rank for s in ss], ax, label=f"r={m.rank}"
                )
                paths += [spec_path(m.label, s.module) for s in ss]
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_title(_sub(kind), fontsize=9)
        hi = [s.effective_rank for s in d.spectra[prim[-1].label] if s.kind == kind]
        span[kind] = f"{min(hi):.1f}–{max(hi):.1f}"
    axes[-1].legend(fontsize=7)
    caption = (
        "Entropy effective rank exp(−Σ p log p), p = σ/Σσ, of ΔW per layer for every rank. "
        f"At r = {prim[-1].rank} it spans "
        + ", ".join(f"{v} ({k})" for k, v in span.items())
        + " over layers."
    )
    return ReportFigure("effective_rank", "Effective rank per layer", caption, fig, paths)


def _amplification(d: ReportData) -> ReportFigure:
    kinds = list(d.options.kinds)
    fig = Figure(figsize=(3.8, 2.9), layout="constrained")
    ax = fig.subplots()
    ranks = sorted({m.rank for m in d.members})
    means, paths = {}, [f"projections/{m.label}" for m in d.members]
    for kind in kinds:
        amp = {
            r: [
                p.amplification
                for m in d.members
                if m.rank == r
                for p in d.projections[m.label]
                if p.kind == kind and np.isfinite(p.amplification)
            ]
            for r in ranks
        }
        rs = [r for r in ranks if amp[r]]
        mean = [float(np.mean(amp[r])) for r in rs]
        plot_amplification(
            rs, mean, [min(amp[r]) for r in rs], [max(amp[r]) for r in rs], ax, label=_sub(kind)
        )
        means[kind] = ", ".join(f"{m:.1f} (r={r})" for r, m in zip(rs, mean, strict=True))
    ax.legend(fontsize=7)
    caption = (
        "Amplification factor ‖ΔW‖_F/‖UᵀWV‖_F against r, mean over layers and seeds (band: "
        "min–max). "
        + "; ".join(f"{_sub(k)}: {v}" for k, v in means.items())
        + ". The paper (GPT-3, layer 48, W_q): 6.91/0.32 ≈ 21.5 at r = 4, ≈ 1.9 at r = 64."
    )
    return ReportFigure("amplification", "Table 7 as a figure: amplification", caption, fig, paths)


def figure_plan(d: ReportData) -> list[Callable[[], ReportFigure]]:
    """One builder per figure the data supports, in the order ``index.md`` shows them."""
    plan: list[Callable[[], ReportFigure]] = []
    if d.rank_pair:
        plan.append(partial(_fig3, d))
    if d.seed_pair:
        plan.append(partial(_fig4, d))
    if d.rank_pair:
        plan += [partial(_fig67, d, kind) for kind in d.options.kinds]
    if d.weight_sim:
        plan.append(partial(_fig8, d))
    if d.projections:
        plan.append(partial(_amplification, d))
    return [*plan, partial(_spectra, d), partial(_effective_rank, d)]


def report_figures(d: ReportData) -> Iterator[ReportFigure]:
    """Every figure the data supports, built one at a time (so a caller can render and drop
    each before the next)."""
    for make in figure_plan(d):
        yield make()
