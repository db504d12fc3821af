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

from lorascope.analysis.similarity import SimilarityResult

__all__ = ["plot_phi", "plot_phi_grid", "plot_spectrum"]


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
    sns.heatmap(phi, ax=ax, vmin=0.0, vmax=1.0, cmap="viridis", cbar=cbar, square=False)
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
