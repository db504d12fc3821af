"""Figures of a tracked run: σ trajectories, k@90 % over steps, the settling heatmap and the
settling step per module (``lorascope dynamics --plot``, the report's dynamics section).

Each function takes the :class:`~lorascope.tracking.dynamics.ModuleDynamics` list of
:func:`~lorascope.tracking.dynamics.dynamics` and returns a :class:`matplotlib.figure.Figure`
built without pyplot (no global state, no backend needed); :func:`save_dynamics_figures` writes
them all. A value not measured (``None``: an all-zero ΔW, the first snapshot, a step without
amplification) is left out of a line or drawn as a grey cell, never plotted as a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

from lorascope.errors import LoraScopeError
from lorascope.tracking.dynamics import ModuleDynamics

__all__ = [
    "sigma_figure",
    "k90_figure",
    "settling_heatmap",
    "settling_figure",
    "DYNAMICS_FIGURES",
    "save_dynamics_figures",
]

MAX_LAYERS = 8  # the σ small multiples show at most this many layers, evenly spaced
_MARKERS = ["o", "s", "^", "D", "v", "P"]
# metadata without dates, so re-rendering the same run gives the same bytes
_METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None}, "svg": {"Date": None}}


def _arr(values: Sequence[float | int | None]) -> np.ndarray:
    """``None`` -> NaN, as float (matplotlib leaves NaN points out of a line)."""
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _label(d: ModuleDynamics) -> str:
    return f"L{d.layer} {d.kind}" if d.layer is not None else d.module


def _ordered(results: Sequence[ModuleDynamics]) -> list[ModuleDynamics]:
    """By layer (modules without one last, in file order), then kind in first-seen order."""
    kinds = list(dict.fromkeys(d.kind for d in results))
    return sorted(
        results,
        key=lambda d: (d.layer is None, d.layer if d.layer is not None else 0, kinds.index(d.kind)),
    )


def _layer_color(results: Sequence[ModuleDynamics]) -> Callable[[int, ModuleDynamics], tuple]:
    """Colour by layer (viridis, as :func:`lorascope.plot.plot_settle`), by index without one."""
    layers = sorted({d.layer for d in results if d.layer is not None})
    cmap = colormaps["viridis"]

    def color(n: int, d: ModuleDynamics):
        if d.layer is None:
            return f"C{n % 10}"
        return cmap(layers.index(d.layer) / max(len(layers) - 1, 1) * 0.9)

    return color


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _need(results: Sequence[ModuleDynamics]) -> None:
    if not results:
        raise LoraScopeError("no modules to plot")


def _grid(results: Sequence[ModuleDynamics]) -> tuple[int, int, list[tuple[int, int]]]:
    """A row per layer and a column per kind when every (layer, kind) is unique (q and v of
    each block), else four panels a row; the cell of each result."""
    n = len(results)
    keys = [(d.layer, d.kind) for d in results]
    if len(set(keys)) == n and all(d.layer is not None for d in results):
        layers = sorted({d.layer for d in results})
        kinds = list(dict.fromkeys(d.kind for d in results))
        if len(kinds) <= 4:
            cells = [(layers.index(d.layer), kinds.index(d.kind)) for d in results]
            return len(layers), len(kinds), cells
    ncols = min(4, n)
    return math.ceil(n / ncols), ncols, [divmod(i, ncols) for i in range(n)]


# ----------------------------------------------------------------------------- σ


def sigma_figure(results: Sequence[ModuleDynamics]) -> Figure:
    """σ_1..σ_r of ``ΔW`` over the steps, one panel per module (small multiples), σ_1 darkest;
    log scale when the values span more than a decade (ΔW grows from zero)."""
    _need(results)
    results = _ordered(results)
    layers = sorted({d.layer for d in results if d.layer is not None})
    shown = layers
    if len(layers) > MAX_LAYERS:  # evenly spaced layers, first and last included
        idx = np.unique(np.linspace(0, len(layers) - 1, MAX_LAYERS).round().astype(int))
        shown = [layers[k] for k in idx]
        results = [d for d in results if d.layer is None or d.layer in shown]
    nrows, ncols, cells = _grid(results)
    fig = Figure(figsize=(3.0 * ncols + 0.4, 1.9 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    for ax in axes.flat:
        ax.set_visible(False)
    cmap = colormaps["magma"]
    for d, (i, j) in zip(results, cells, strict=True):
        ax = axes[i, j]
        ax.set_visible(True)
        ax.set_title(f"{_label(d)} (r={d.nominal_rank})", fontsize=8)
        steps = np.asarray(d.steps, dtype=float)
        S = np.array(
            [[np.nan if v is None else float(v) for v in row] for row in d.singular_values],
            dtype=float,
        ).reshape(len(d.steps), -1)  # (n, k)
        finite = S[np.isfinite(S) & (S > 0)]
        if finite.size == 0:
            _empty(ax, "σ not measured at any snapshot")
            continue
        k = S.shape[1]
        for t in range(k - 1, -1, -1):  # σ_1 drawn last, on top
            ax.plot(steps, S[:, t], lw=1.0 if t else 1.4, color=cmap(0.8 * t / max(k - 1, 1)))
        if finite.max() / finite.min() > 10.0:
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
    for j in range(ncols):
        for i in range(nrows - 1, -1, -1):
            if axes[i, j].get_visible():
                axes[i, j].set_xlabel("step", fontsize=8)
                break
    for i in range(nrows):
        axes[i, 0].set_ylabel("σ_t of ΔW", fontsize=8)
    some = f"; {len(shown)} of {len(layers)} layers" if len(shown) < len(layers) else ""
    fig.suptitle(f"singular values of ΔW over training (σ_1 darkest{some})", fontsize=9)
    return fig


# ----------------------------------------------------------------------------- k@90 %


def k90_figure(results: Sequence[ModuleDynamics]) -> Figure:
    """k@90 % of ``‖ΔW‖_F²`` over the steps, one panel per kind and a line per module (colour by
    layer); k@50 % and k@99 % as faint lines when a panel has at most four modules. Lines are
    offset by a few hundredths so that equal integers stay tellable apart; the nominal rank r
    is dashed."""
    _need(results)
    results = _ordered(results)
    kinds = list(dict.fromkeys(d.kind for d in results))
    fig = Figure(figsize=(3.6 * len(kinds) + 1.4, 3.0), layout="constrained")
    axes = fig.subplots(1, len(kinds), squeeze=False, sharey=True)[0]
    color = _layer_color(results)
    for ax, kind in zip(axes, kinds, strict=True):
        sub = [d for d in results if d.kind == kind]
        faint = len(sub) <= 4
        top = 1
        for n, d in enumerate(sub):
            off = (
                (n - (len(sub) - 1) / 2) * min(0.06, 0.5 / max(len(sub), 1)) if len(sub) > 1 else 0
            )
            steps = np.asarray(d.steps, dtype=float)
            c = color(results.index(d), d)
            k90 = _arr(d.k90)
            ax.plot(steps, k90 + off, lw=1.2, color=c, drawstyle="steps-post", label=_label(d))
            if faint:
                for ks in (d.k50, d.k99):
                    ax.plot(
                        steps,
                        _arr(ks) + off,
                        lw=0.8,
                        alpha=0.35,
                        color=c,
                        ls=":",
                        drawstyle="steps-post",
                    )
            top = max(top, d.nominal_rank)
        for r in sorted({d.nominal_rank for d in sub}):
            ax.axhline(r, ls="--", lw=0.8, color="0.5")
        ax.set_ylim(0.5, top + 0.5)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        ax.set_title(f"{kind} ({len(sub)} module{'s' if len(sub) != 1 else ''})", fontsize=9)
        ax.set_xlabel("step")
        if len(sub) <= 12:
            ax.legend(fontsize=7, ncol=2 if len(sub) > 6 else 1, loc="upper right")
    what = (
        "k@90 % (dotted: k@50 %, k@99 %)"
        if any(sum(d.kind == k for d in results) <= 4 for k in kinds)
        else "k@90 %"
    )
    axes[0].set_ylabel(what)
    fig.suptitle("directions holding 90 % of ‖ΔW‖_F² (dashed: r)", fontsize=9)
    return fig


# ----------------------------------------------------------------------------- settling


def settling_heatmap(results: Sequence[ModuleDynamics]) -> Figure:
    """φ(i, i) of each stored snapshot's top-i directions to the final update's, modules
    (layer, then kind) × factor steps, on the fixed scale [0, 1]; grey: not measured. The
    settling step of each module (from which φ stays ``>= threshold``) is outlined in red."""
    _need(results)
    results = _ordered(results)
    fsteps = results[0].factor_steps
    n, f = len(results), len(fsteps)
    fig = Figure(
        figsize=(min(0.32 * f, 12.0) + 2.8, min(0.24 * n, 16.0) + 1.3), layout="constrained"
    )
    ax = fig.subplots()
    if f == 0:
        _empty(ax, "no factor snapshot stored yet")
        return fig
    P = np.array([_arr(d.phi_to_final) for d in results])  # (n, f)
    cmap = colormaps["viridis"].with_extremes(bad="0.85")
    im = ax.imshow(
        np.ma.masked_invalid(P),
        vmin=0.0,
        vmax=1.0,
        cmap=cmap,
        aspect="auto",
        interpolation="nearest",
    )
    if f <= 16 and n <= 32:  # the values, as in lorascope.plot.plot_compare_matrix
        for (r, c), v in np.ndenumerate(P):
            if np.isfinite(v):
                ax.text(
                    c,
                    r,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if v > 0.6 else "white",
                )
    col = {s: c for c, s in enumerate(fsteps)}
    for row, d in enumerate(results):
        if d.settled_step is not None and d.settled_step in col:
            c = col[d.settled_step]
            ax.add_patch(_rect(c, row, "red"))
    step = max(1, math.ceil(f / 12))
    xt = list(range(0, f, step))
    ax.set_xticks(xt, [str(fsteps[c]) for c in xt], fontsize=7, rotation=45 if f > 8 else 0)
    yt = list(range(n)) if n <= 40 else list(range(0, n, math.ceil(n / 40)))
    ax.set_yticks(yt, [_label(results[r]) for r in yt], fontsize=7)
    ax.set_xlabel("step (stored factors)")
    i_s = sorted({d.i for d in results})
    what = f"φ({i_s[0]},{i_s[0]})" if len(i_s) == 1 else "φ(i,i)"
    fig.colorbar(im, ax=ax, shrink=0.9, label=f"{what} to the final update")
    ax.set_title(
        f"settling: {what} of each snapshot to the final one "
        f"(red: settled at, φ ≥ {results[0].threshold:g} from there on)",
        fontsize=8,
    )
    return fig


def _rect(c: int, r: int, color: str):
    from matplotlib.patches import Rectangle

    return Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor=color, linewidth=1.4)


def settling_figure(results: Sequence[ModuleDynamics]) -> Figure:
    """The settling step of each module by layer, one series (marker) per kind; modules not
    yet measured are left out. The last stored step is dashed: a module settled there has not
    settled before the end."""
    _need(results)
    results = _ordered(results)
    kinds = list(dict.fromkeys(d.kind for d in results))
    by_layer = all(d.layer is not None for d in results)
    fig = Figure(figsize=(max(3.6, 0.35 * len(results) + 1.8), 3.0), layout="constrained")
    ax = fig.subplots()
    fsteps = results[0].factor_steps
    if not any(d.settled_step is not None for d in results):
        _empty(ax, "no settling step (fewer than one stored snapshot with ΔW ≠ 0)")
        return fig
    width = 0.6 / max(len(kinds), 1)
    for j, kind in enumerate(kinds):
        sub = [(n, d) for n, d in enumerate(results) if d.kind == kind]
        xs, ys = [], []
        for n, d in sub:
            if d.settled_step is None:
                continue
            x = d.layer if by_layer else n
            xs.append(x + (j - (len(kinds) - 1) / 2) * width)
            ys.append(d.settled_step)
        ax.plot(
            xs, ys, ls="none", marker=_MARKERS[j % len(_MARKERS)], ms=6, color=f"C{j}", label=kind
        )
    if fsteps:
        ax.axhline(fsteps[-1], ls="--", lw=0.8, color="0.5", label=f"last stored ({fsteps[-1]})")
        ax.set_ylim(min(0, fsteps[0]), fsteps[-1] * 1.08 + 1)
    if by_layer:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
    else:
        ax.set_xticks(
            range(len(results)), [_label(d) for d in results], rotation=45, ha="right", fontsize=7
        )
        ax.set_xlabel("module")
    ax.set_ylabel("settled at step")
    ax.legend(fontsize=7)
    ax.set_title(
        f"first stored step from which φ to the final update stays ≥ {results[0].threshold:g}",
        fontsize=8,
    )
    return fig


# ----------------------------------------------------------------------------- files

DYNAMICS_FIGURES: dict[str, Callable[[Sequence[ModuleDynamics]], Figure]] = {
    "sigma": sigma_figure,
    "k90": k90_figure,
    "settling_heatmap": settling_heatmap,
    "settling": settling_figure,
}


def save_dynamics_figures(
    results: Sequence[ModuleDynamics],
    out_dir: str | Path,
    formats: Sequence[str] = ("png", "pdf"),
    *,
    dpi: int = 150,
) -> list[Path]:
    """Write every figure of :data:`DYNAMICS_FIGURES` as ``out_dir/dynamics_<name>.<format>``
    (``dynamics_sigma.png``, ``dynamics_k90.png``, ``dynamics_settling_heatmap.png``,
    ``dynamics_settling.png``, ...), creating ``out_dir``; returns the paths written."""
    _need(results)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LoraScopeError(f"{out}: not a directory; --plot takes a folder for the figures")
    bad = [f for f in formats if f not in Figure().canvas.get_supported_filetypes()]
    if bad:
        raise LoraScopeError(f"cannot save figures as {', '.join(bad)}")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in DYNAMICS_FIGURES.items():
        fig = draw(results)
        for ext in formats:
            path = out / f"dynamics_{name}.{ext}"
            fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata=_METADATA.get(ext))
            paths.append(path)
    return paths
