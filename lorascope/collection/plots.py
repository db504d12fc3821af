"""Figures of a collection's shared subspace (:mod:`lorascope.collection.shared`)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from lorascope.collection.shared import SharedResult

__all__ = ["shared_figure"]


def shared_figure(res: SharedResult) -> Figure:
    """Left: the share ``E(k)`` of the collection's energy in its top-``k`` shared directions,
    with the nulls (own spectra, shuffled layers, the mean update's directions, a random fixed
    subspace ``k/d``). Right: per adapter, φ of its directions to the shared top-``k`` and the
    leave-one-out error, each with its random expectation."""
    fig = Figure(figsize=(10, 3.6))
    fig.set_layout_engine("constrained")
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1.1, 1])
    k = np.arange(1, len(res.energy) + 1)
    ax1.plot(k, res.energy, color="black", lw=2, label=f"{res.n} adapters")
    styles = {"spectra": ("C0", "own σ, random directions"), "layers": ("C1", "layers shuffled"),
              "mean": ("C2", "mean update's directions")}  # fmt: skip
    for name, (color, label) in styles.items():
        curve = res.nulls.get(name)
        if curve is not None:
            ax1.plot(k, curve, color=color, ls="--", label=label)
    ax1.plot(k, res.random_fixed, color="grey", ls=":", label="random fixed subspace (k/d)")
    ax1.set_xlabel("k (shared directions)")
    ax1.set_ylabel("share of Σ‖ΔW_i‖²_F")
    ax1.set_ylim(0, 1.02)
    ax1.set_xscale("log", base=2)
    ax1.legend(fontsize=7, loc="lower right")
    where = f"layer {res.layer} {res.kind}" if res.layer is not None else res.kind
    ax1.set_title(f"shared subspace, {where} ({res.side} side, d = {res.dim})", fontsize=9)
    x = np.arange(res.n)
    ax2.bar(x - 0.2, res.phi, width=0.4, color="C0", label=f"φ to shared top-{res.k}")
    ax2.scatter(x - 0.2, res.phi_random, color="C0", marker="_", s=80, label="φ random")
    if res.loo_error is not None:
        ax2.bar(x + 0.2, res.loo_error, width=0.4, color="C3", label="leave-one-out error")
        ax2.axhline(res.loo_random, color="C3", ls=":", lw=1, label="LOO error, random")
    ax2.set_xticks(x, [str(i) for i in x], fontsize=6)
    ax2.set_xlabel("adapter")
    ax2.set_ylim(0, 1.05)
    ax2.legend(fontsize=7, loc="upper right")
    return fig
