"""The report's shared-subspace section (:mod:`lorascope.collection.shared`) for three or more
adapters: per module kind at the report's layer, the share ``E(k)`` of the adapters' energy in
their top-``k`` shared input directions against its null collections, as a figure and a table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from lorascope.collection.plots import shared_figure
from lorascope.collection.shared import SharedResult, shared_from_adapters
from lorascope.report.compute import ReportData
from lorascope.report.figures import ReportFigure
from lorascope.report.tables import Column, Table

__all__ = ["SharedSection", "shared_section"]

LADDER = (1, 2, 4, 8, 16)


@dataclass
class SharedSection:
    results: dict[str, SharedResult]
    tables: list[Table] = field(default_factory=list)
    figures: list[Callable[[], ReportFigure]] = field(default_factory=list)

    def summary(self) -> str:
        parts = []
        for kind, r in self.results.items():
            parts.append(
                f"{kind}: E(1) = {r.energy[0]:.2f} (own-σ null {r.nulls['spectra'][0]:.2f}, "
                f"mean update {r.nulls['mean'][0]:.2f})"
            )
        return "shared subspace " + "; ".join(parts)


def _figure(kind: str, r: SharedResult) -> ReportFigure:
    lay = f"layer {r.layer}"
    caption = (
        f"Share E(k) of the {r.n} adapters' energy (each ΔW scaled to ‖ΔW‖_F = 1) in their top-k "
        f"shared input directions at {lay}, {kind} (top eigenvectors of Σ ΔW_iᵀΔW_i, from the "
        f"factors), against null collections averaged over {r.draws} draws: E(1) = "
        f"{r.energy[0]:.3f}; each adapter's own σ with random directions "
        f"{r.nulls['spectra'][0]:.3f}"
        + (f"; layers shuffled {r.nulls['layers'][0]:.3f}" if r.nulls["layers"] else "")
        + f"; the mean update's top direction {r.nulls['mean'][0]:.3f}; a random direction "
        f"{r.random_fixed[0]:.4f}. Right: φ of each adapter to the shared top-{r.k} (random: "
        f"max(r, k)/d) and its leave-one-out error (random: {r.loo_random:.3f})."
    )
    return ReportFigure(f"shared_{kind}", f"Shared subspace ({kind}, {lay})", caption,
                        shared_figure(r))  # fmt: skip


def shared_section(d: ReportData, *, draws: int = 5) -> SharedSection | None:
    """The section for the report's adapters (``None`` with fewer than three)."""
    if len(d.members) < 3 or d.options.layer is None:
        return None
    adapters = [m.adapter for m in d.members]
    labels = [m.label for m in d.members]
    results = {
        kind: shared_from_adapters(
            adapters,
            layer=d.options.layer,
            module=kind,
            labels=labels,
            draws=draws,
            seed=d.options.seed,
        )
        for kind in d.options.kinds
    }
    sec = SharedSection(results)
    cols = [Column("kind", "kind"), Column("curve", "curve")] + [
        Column(f"k{k}", f"k={k}", f"$k={k}$") for k in LADDER
    ]
    rows = []
    for kind, r in results.items():
        curves = [("collection", r.energy), ("null: own σ", r.nulls["spectra"]),
                  ("null: layers shuffled", r.nulls["layers"]),
                  ("mean update's directions", r.nulls["mean"]),
                  ("random subspace (k/d)", r.random_fixed)]  # fmt: skip
        for name, c in curves:
            if c is not None:
                rows.append([kind, name] + [c[k - 1] if k <= len(c) else None for k in LADDER])
    title = (
        f"Shared subspace of the {len(adapters)} adapters at layer {d.options.layer}: share "
        "E(k) of their energy in the top-k shared input directions, and its nulls"
    )
    sec.tables = [Table("shared", title, cols, rows)]
    sec.figures = [partial(_figure, kind, r) for kind, r in results.items()]
    return sec
