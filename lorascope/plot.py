"""Plots that mirror the paper's figures. They take results and an ``ax``, return the Axes,
and never save or show: the caller (CLI, report, notebook) chooses the backend and the file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

from lorascope.analysis.compare import CompareResult, SettleResult, cluster, mean_matrix
from lorascope.analysis.intruders import IntruderResult
from lorascope.analysis.similarity import SimilarityResult

__all__ = [
    "plot_phi",
    "plot_phi_grid",
    "plot_spectrum",
    "plot_singular_values",
    "plot_by_layer",
    "plot_amplification",
    "plot_intruders",
    "plot_intruders_grid",
    "plot_compare_matrix",
    "plot_compare",
    "plot_settle",
]


def _ticks(n: int, max_ticks: int = 8) -> list[int]:
    step = max(1, math.ceil(n / max_ticks))
    return list(range(1, n + 1, step))


def plot_phi(
    phi: np.ndarray,
    ax: Axes | None = None,
    *,
    title: str | None = None,
    cbar: bool = True,
    ylabel: str = "i",
    xlabel: str = "j",
) -> Axes:
    """Heatmap of a φ(i, j) grid (``(max_i, max_j)``), rows ``i`` and columns ``j`` from 1, on
    the fixed colour scale [0, 1] so panels are comparable (Hu et al. 2021, Figures 3, 4, 6–8).
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(max(3.0, 0.12 * phi.shape[1] + 2), 3.0))
    # tick labels are set below; seaborn's own automatic labels cost half the drawing time
    sns.heatmap(
        phi,
        ax=ax,
        vmin=0.0,
        vmax=1.0,
        cmap="viridis",
        cbar=cbar,
        square=False,
        xticklabels=False,
        yticklabels=False,
    )
    ni, nj = phi.shape
    ax.set_yticks([t - 0.5 for t in _ticks(ni)], [str(t) for t in _ticks(ni)], rotation=0)
    ax.set_xticks([t - 0.5 for t in _ticks(nj)], [str(t) for t in _ticks(nj)], rotation=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def plot_phi_grid(
    results: Sequence[SimilarityResult], *, ncols: int = 4, random: bool = False
) -> Figure:
    """Small multiples of φ heatmaps, one panel per module (Figures 6/7 style).

    ``random=True`` plots each result's random baseline instead.
    """
    n = len(results)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False)
    for ax, res in zip(axes.flat, results, strict=False):
        grid = res.random_phi if random else res.phi
        label = f"L{res.layer} {res.kind}" if res.layer is not None else res.module
        other = "W" if res.module_b == "W" else f"r={res.rank_b}"
        plot_phi(grid, ax, title=f"{label} (r={res.rank} vs {other})", cbar=False)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.colorbar(axes.flat[0].collections[0], ax=axes, shrink=0.8, label="φ(i, j)")
    return fig


def plot_spectrum(
    singular_values: Sequence[float], ax: Axes | None = None, *, label: str | None = None
) -> Axes:
    """Cumulative energy ``Σ_{i<=t} σ_i² / Σ σ²`` against ``t`` for one update."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 3))
    s = np.asarray(singular_values, dtype=float)
    energy = np.cumsum(s**2) / np.sum(s**2)
    ax.plot(np.arange(1, len(s) + 1), energy, marker="o", ms=3, label=label)
    ax.set_xlabel("t (singular directions kept)")
    ax.set_ylabel("cumulative energy")
    ax.set_ylim(0, 1.02)
    return ax


def plot_singular_values(
    singular_values: Sequence[float],
    ax: Axes | None = None,
    *,
    label: str | None = None,
    normalize: bool = True,
    color: str | tuple | None = None,
) -> Axes:
    """Singular values ``σ_t`` of one update against ``t`` on a log scale (Hu et al. 2021 §7.2).

    ``normalize=True`` plots ``σ_t / σ_1`` so updates of different size share an axis.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 3))
    s = np.asarray(singular_values, dtype=float)
    y = s / s[0] if normalize and s.size and s[0] > 0 else s
    ax.plot(np.arange(1, len(s) + 1), y, marker="o", ms=2, lw=1, label=label, color=color)
    ax.set_yscale("log")
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("t")
    ax.set_ylabel("σ_t / σ_1" if normalize else "σ_t")
    return ax


def plot_by_layer(
    layers: Sequence[int],
    values: Sequence[float],
    ax: Axes | None = None,
    *,
    label: str | None = None,
    ylabel: str = "effective rank",
    color: str | tuple | None = None,
) -> Axes:
    """One number per layer (e.g. the effective rank of ΔW, or φ(1, 1)) as a line over layers."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 3))
    ax.plot(list(layers), list(values), marker="o", ms=3, label=label, color=color)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    return ax


def plot_amplification(
    ranks: Sequence[int],
    mean: Sequence[float],
    low: Sequence[float] | None = None,
    high: Sequence[float] | None = None,
    ax: Axes | None = None,
    *,
    label: str | None = None,
    color: str | tuple | None = None,
) -> Axes:
    """Amplification factor ``‖ΔW‖_F / ‖Uᵀ W V‖_F`` against the rank ``r`` (log-2 axis), with a
    band from ``low`` to ``high`` (e.g. the range over layers); Hu et al. 2021 §7.3, Table 7."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 3))
    (line,) = ax.plot(list(ranks), list(mean), marker="o", ms=4, label=label, color=color)
    if low is not None and high is not None:
        ax.fill_between(list(ranks), list(low), list(high), alpha=0.2, color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ranks), [str(r) for r in ranks])
    ax.set_xlabel("r")
    ax.set_ylabel("‖ΔW‖_F / ‖UᵀWV‖_F")
    return ax


# ----------------------------------------------------------------------------- intruders


def plot_intruders(
    result: IntruderResult,
    ax: Axes | None = None,
    *,
    epsilon: float | None = None,
    max_cols: int | None = None,
    cbar: bool = True,
    title: str | None = None,
) -> Axes:
    """Heatmap of ``|cos(y_j, x_i)|``: rows ``j`` are the top-``k`` singular vectors of
    ``W + ΔW``, columns ``i`` those of ``W``, both by singular value, on the fixed scale [0, 1]
    (Shuttleworth et al. 2024, Figure 1). Rows that are intruder dimensions at ``epsilon``
    (default: the result's first ε) are outlined in red: no bright cell anywhere in the row.

    ``max_cols`` keeps the first columns of the ``min(d_out, d_in)``; by default
    ``max(4k, largest best match)``, so every row's brightest cell is in view.
    """
    sim = np.asarray(result.similarity)  # (k, p)
    p_all = sim.shape[1]
    if max_cols is None:
        max_cols = max(4 * sim.shape[0], *result.best_match)
    sim = sim[:, :max_cols]
    k, p = sim.shape
    if ax is None:
        _, ax = plt.subplots(figsize=(6.0, 0.2 * k + 1.4))
    im = ax.imshow(sim, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
    eps = result.epsilon[0] if epsilon is None else epsilon
    bad = [j for j, m in enumerate(result.max_similarity, start=1) if m < eps]
    for j in bad:
        ax.axhspan(j - 1.5, j - 0.5, facecolor="none", edgecolor="red", linewidth=1.2)
    ax.set_yticks([t - 1 for t in _ticks(k, 10)], [str(t) for t in _ticks(k, 10)])
    ax.set_xticks([t - 1 for t in _ticks(p)], [str(t) for t in _ticks(p)])
    shown = f", first {p} of {p_all}" if p < p_all else ""
    ax.set_xlabel(f"i (singular vector of W{shown})")
    ax.set_ylabel("j (of W + ΔW)")
    if title is None:
        where = f"L{result.layer} {result.kind}" if result.layer is not None else result.module
        title = f"{where} (r={result.rank}): {len(bad)} intruder(s) at ε={eps:g}"
    ax.set_title(title, fontsize=9)
    if cbar:
        ax.figure.colorbar(im, ax=ax, label="|cos|", shrink=0.9)
    return ax


def plot_intruders_grid(
    results: Sequence[IntruderResult],
    *,
    epsilon: float | None = None,
    max_cols: int | None = None,
) -> Figure:
    """One :func:`plot_intruders` panel per module: a row per layer and a column per kind when
    every (layer, kind) is unique (e.g. q and v of each block), else two panels a row."""
    n = len(results)
    keys = [(r.layer, r.kind) for r in results]
    if len(set(keys)) == n and all(r.layer is not None for r in results):
        layers = sorted({r.layer for r in results})
        kinds = list(dict.fromkeys(r.kind for r in results))
        cells = [(layers.index(r.layer), kinds.index(r.kind)) for r in results]
        nrows, ncols = len(layers), len(kinds)
    else:
        ncols = min(2, n)
        nrows = math.ceil(n / ncols)
        cells = [divmod(i, ncols) for i in range(n)]
    k = max(r.k for r in results)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(5.0 * ncols, (0.2 * k + 1.5) * nrows),
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.flat:
        ax.set_visible(False)
    for res, (i, j) in zip(results, cells, strict=True):
        ax = axes[i, j]
        ax.set_visible(True)
        plot_intruders(res, ax, epsilon=epsilon, max_cols=max_cols, cbar=False)
    first = axes[cells[0][0], cells[0][1]]
    fig.colorbar(first.images[0], ax=axes, shrink=0.8, label="|cos(y_j, x_i)|")
    return fig


# ----------------------------------------------------------------------------- compare

_COMPARE_LABELS = {"phi": "φ", "grassmann": "Grassmann distance (rad)"}


def plot_compare_matrix(
    matrix: np.ndarray,
    labels: Sequence[str],
    ax: Axes | None = None,
    *,
    metric: str = "phi",
    order: Sequence[int] | None = None,
    title: str | None = None,
    annotate: bool | None = None,
    cbar: bool = True,
    aspect: str = "equal",
) -> Axes:
    """Heatmap of one ``(N, N)`` comparison matrix of N adapters (``lorascope compare``).

    ``metric="phi"`` draws φ on the fixed scale [0, 1] (Hu et al. 2021 §7.2, eq. 4); the
    Grassmann distance (``"grassmann"``) runs from 0 to its maximum, reversed colours, so close
    pairs are bright either way. ``order`` permutes rows and columns (e.g. a dendrogram's leaf
    order); ``annotate`` (default: ``N <= 12``) writes the values into the cells.
    """
    M = np.asarray(matrix, dtype=float)
    n = M.shape[0]
    order = list(range(n)) if order is None else list(order)
    M = M[np.ix_(order, order)]  # (N, N) in display order
    names = [str(labels[k]) for k in order]
    if ax is None:
        _, ax = plt.subplots(figsize=(0.5 * n + 2.5, 0.5 * n + 2.0))
    if metric == "phi":
        vmin, vmax, cmap = 0.0, 1.0, "viridis"
    else:
        vmin, vmax, cmap = 0.0, max(float(M.max()), 1e-12), "viridis_r"
    im = ax.imshow(M, vmin=vmin, vmax=vmax, cmap=cmap, interpolation="nearest", aspect=aspect)
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    if annotate if annotate is not None else n <= 12:
        for a in range(n):
            for b in range(n):
                bright = (M[a, b] - vmin) / (vmax - vmin) > 0.6
                bright = not bright if metric != "phi" else bright
                ax.text(
                    b,
                    a,
                    f"{M[a, b]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if bright else "white",
                )
    if cbar:
        ax.figure.colorbar(im, ax=ax, shrink=0.8, label=_COMPARE_LABELS.get(metric, metric))
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def plot_compare(
    results: Sequence[CompareResult],
    fig: Figure | None = None,
    *,
    metric: str = "phi",
    title: str | None = None,
) -> Figure:
    """Dendrogram over a heatmap of the module-mean comparison matrix (a clustermap).

    The mean over ``results`` of φ (or of the Grassmann distance) is clustered by average
    linkage on ``1 − φ`` (or the distance itself), see :func:`lorascope.analysis.compare.cluster`;
    the heatmap's rows and columns follow the dendrogram's leaves. Returns the Figure (drawn into
    ``fig`` when given).
    """
    from scipy.cluster.hierarchy import dendrogram

    M = mean_matrix(results, metric)  # (N, N)
    Z, order = cluster(1.0 - M if metric == "phi" else M)
    n = M.shape[0]
    if fig is None:
        fig = plt.figure(figsize=(0.55 * n + 3.2, 0.55 * n + 3.0))
    gs = fig.add_gridspec(
        2, 2, height_ratios=[1, 4], width_ratios=[24, 1], hspace=0.03, wspace=0.05
    )
    ax_d = fig.add_subplot(gs[0, 0])
    ax_h = fig.add_subplot(gs[1, 0])
    cax = fig.add_subplot(gs[1, 1])
    # leaves sit at x = 5, 15, ..., 10N - 5: the same columns as the heatmap's 0 .. N - 1
    dendrogram(Z, ax=ax_d, no_labels=True, color_threshold=0, above_threshold_color="0.3")
    ax_d.set_xlim(0, 10 * n)
    ax_d.set_axis_off()
    plot_compare_matrix(
        M, results[0].labels, ax_h, metric=metric, order=order, cbar=False, aspect="auto"
    )
    fig.colorbar(ax_h.images[0], cax=cax, label=_COMPARE_LABELS.get(metric, metric))
    what = f"{len(results)} modules" if len(results) > 1 else results[0].module
    ax_d.set_title(title or f"mean {_COMPARE_LABELS.get(metric, metric)} over {what}", fontsize=9)
    return fig


def plot_settle(
    results: Sequence[SettleResult],
    ax: Axes | None = None,
    *,
    threshold: float | None = None,
    legend: bool | None = None,
) -> Axes:
    """φ of each checkpoint's top directions to the final ones, one line per module, with the
    threshold of the settling rule (:func:`lorascope.analysis.compare.settle`) dashed."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    labels = results[0].labels
    x = np.arange(len(labels))
    # colour by layer, line style by kind: a dozen modules stay tellable apart
    layers = sorted({r.layer for r in results if r.layer is not None})
    kinds = list(dict.fromkeys(r.kind for r in results))
    styles = ["-", "--", ":", "-."]
    cmap = plt.get_cmap("viridis")
    lows = []
    for n, r in enumerate(results):
        if r.layer is not None:
            color = cmap(layers.index(r.layer) / max(len(layers) - 1, 1) * 0.9)
        else:
            color = f"C{n % 10}"
        name = f"L{r.layer} {r.kind}" if r.layer is not None else r.module
        ls = styles[kinds.index(r.kind) % len(styles)]
        ax.plot(x, r.phi_to_final, marker="o", ms=3, lw=1, ls=ls, color=color, label=name)
        lows.append(min(r.phi_to_final))
    threshold = results[0].threshold if threshold is None else threshold
    ax.axhline(threshold, ls="--", lw=1, color="0.4")
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(max(0.0, min([*lows, threshold]) - 0.05), 1.01)
    ax.set_xlabel("checkpoint")
    ax.set_ylabel("φ to the final checkpoint")
    if legend if legend is not None else len(results) <= 12:
        ax.legend(fontsize=7, ncol=2)
    return ax
