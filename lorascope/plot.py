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

from lorascope.analysis.similarity import SimilarityResult

__all__ = [
    "plot_phi",
    "plot_phi_grid",
    "plot_spectrum",
    "plot_singular_values",
    "plot_by_layer",
    "plot_amplification",
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
