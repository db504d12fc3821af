"""The report's training-dynamics section, from a tracking file (:mod:`lorascope.tracking`).

One table (per module: σ_1 and ``‖ΔW‖_F`` at the end, k@90 % first → last and since when it has
stayed there, the settling step, the rank suggestion) and four figures (σ trajectories,
k@90 % over steps, the layers × steps heatmap of φ to the final update, the settling step per
module), each caption stating its numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from lorascope.report.figures import ReportFigure
from lorascope.report.inputs import display_path
from lorascope.report.tables import Column, Table
from lorascope.tracking import ModuleDynamics, Run, dynamics, read_run

__all__ = ["DynamicsSection", "dynamics_section"]


@dataclass
class DynamicsSection:
    """What the report shows of one tracked run."""

    path: Path
    run: Run
    results: list[ModuleDynamics]
    tables: list[Table] = field(default_factory=list)
    figures: list[Callable[[], ReportFigure]] = field(default_factory=list)

    def summary(self) -> str:
        """One sentence of headline numbers (also the section's opening line)."""
        res = self.results
        settled = [d.settled_step for d in res if d.settled_step is not None]
        k_last = [d.k90_final for d in res if d.k90_final is not None]
        status = "complete" if self.run.phi_final is not None else "cut off before its end"
        parts = [
            f"{len(self.run)} snapshots of {len(res)} modules over steps "
            f"{int(self.run.steps[0])}-{int(self.run.steps[-1])} ({status})",
        ]
        if settled:
            parts.append(
                f"φ to the final update (top-{res[0].i} directions) stays >= "
                f"{res[0].threshold:g} from step {int(np.median(settled))} (median; "
                f"{min(settled)}-{max(settled)})"
            )
        if k_last:
            r = sorted({d.nominal_rank for d in res})
            parts.append(
                f"k@90 % at the end: {min(k_last)}-{max(k_last)} of r = {', '.join(map(str, r))}"
            )
        return "; ".join(parts)


def _table(res: list[ModuleDynamics]) -> Table:
    cols = [
        Column("module", "module"),
        Column("layer", "layer"),
        Column("kind", "kind"),
        Column("r", "r", "$r$"),
        Column("sigma1_final", "σ1 (end)", r"$\sigma_1$ (end)"),
        Column("fro_final", "‖ΔW‖_F (end)", r"$\|\Delta W\|_F$ (end)"),
        Column("k90_first", "k@90% (first)", r"$k_{90\%}$ (first)"),
        Column("k90_final", "k@90% (end)", r"$k_{90\%}$ (end)"),
        Column("k90_since", "k@90% <= end since step", r"$k_{90\%}\le$ end since"),
        Column("phi_first", "φ first→final", r"$\phi$ first$\to$final"),
        Column("settled_step", "settled at step", "settled at"),
        Column("amplification_final", "amplification (end)", "amplification (end)"),
        Column("suggested_rank", "suggested r", "suggested $r$"),
    ]

    def last(xs):
        return next((x for x in reversed(xs) if x is not None), None)

    def first(xs):
        return next((x for x in xs if x is not None), None)

    rows = [
        [
            d.module,
            d.layer,
            d.kind,
            d.nominal_rank,
            last([s[0] if s else None for s in d.singular_values]),
            last(d.fro),
            first(d.k90),
            d.k90_final,
            d.k90_since,
            first(d.phi_to_final),
            d.settled_step,
            last(d.amplification),
            d.suggested_rank,
        ]
        for d in res
    ]
    k = res[0].i if res else "k"
    title = (
        f"Training dynamics per module: σ, k@90 % and φ(top-{k}) to the final update "
        "(settled: φ stays >= threshold from that step on)"
    )
    return Table("dynamics", title, cols, rows)


def _figure(name: str, title: str, make, caption: str, res) -> ReportFigure:
    return ReportFigure(name, title, caption, make(res))


def dynamics_section(path: str | Path, *, k: int | None = None) -> DynamicsSection:
    """Read the tracking file at ``path`` and plan its table and figures."""
    from lorascope.tracking.plots import (
        k90_figure,
        settling_figure,
        settling_heatmap,
        sigma_figure,
    )

    path = Path(path)
    run = read_run(path)
    res = dynamics(run, k=k)
    sec = DynamicsSection(path, run, res)
    sec.tables = [_table(res)]
    where = display_path(path)  # captions are plain text (index.md, index.html, results.h5)
    n, every = len(run), run.attrs.get("every")
    s1_first = [next((s[0] for s in d.singular_values if s and s[0]), None) for d in res]
    s1_last = [d.singular_values[-1][0] if d.singular_values[-1] else None for d in res]
    growth = [b / a for a, b in zip(s1_first, s1_last, strict=True) if a and b]
    k_first = [next((x for x in d.k90 if x is not None), None) for d in res]
    k_final = [d.k90_final for d in res]
    settled = [d.settled_step for d in res if d.settled_step is not None]
    i = res[0].i if res else 0
    cap_sigma = (
        f"Singular values of each module's ΔW = s·B A over {n} snapshots (every {every} steps) "
        f"from {where}, computed from the factors at each step. σ_1 grew "
        f"{np.median(growth):.1f}× (median over modules) from the first snapshot to the last."
        if growth
        else f"Singular values of each module's ΔW over {n} snapshots from {where}."
    )
    cap_k90 = (
        f"k@90 %: the fewest singular directions holding 90 % of ‖ΔW‖_F², per module and step. "
        f"First snapshot: {_span(k_first)}; last: {_span(k_final)} (r = "
        f"{', '.join(str(r) for r in sorted({d.nominal_rank for d in res}))})."
    )
    cap_heat = (
        f"φ(i, i), i = {i} (Hu et al. 2021 eq. 4), of each stored snapshot's top right-singular "
        f"directions to the final update's, per module (rows) and step (columns). "
        + (
            f"Modules settle (φ stays >= {res[0].threshold:g}) at steps {min(settled)}-"
            f"{max(settled)}, median {int(np.median(settled))}."
            if settled
            else ""
        )
    )
    cap_settle = "The settling step of each module (see the heatmap), by layer."
    specs = [
        ("dynamics_sigma", "Singular values during training", sigma_figure, cap_sigma),
        ("dynamics_k90", "Rank use during training (k@90 %)", k90_figure, cap_k90),
        ("dynamics_settling_heatmap", "Settling: φ to the final update", settling_heatmap,
         cap_heat),
        ("dynamics_settling", "Settling step per module", settling_figure, cap_settle),
    ]  # fmt: skip
    sec.figures = [partial(_figure, nm, t, mk, c, res) for nm, t, mk, c in specs]
    return sec


def _span(xs: list) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{min(xs)}" if min(xs) == max(xs) else f"{min(xs)}-{max(xs)}"
