"""The report's tables, each written as Markdown (for ``index.md``), CSV and LaTeX.

CSV headers are snake_case keys with full-precision numbers; Markdown and LaTeX show 4
significant digits. No table ever holds NaN or inf: a missing value is empty (CSV) or ``-``.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from lorascope.report.compute import ReportData

__all__ = ["Column", "Table", "report_tables"]


@dataclass(frozen=True)
class Column:
    """A column: ``key`` (CSV), ``label`` (Markdown and HTML), ``tex`` (LaTeX, default
    ``label``); ``code``: cells shown as code (paths) in Markdown and HTML."""

    key: str
    label: str
    tex: str | None = None
    code: bool = False


@dataclass
class Table:
    """A titled table; ``rows`` are lists of str, int, float or None."""

    name: str
    title: str
    columns: list[Column]
    rows: list[list[Any]]

    def to_csv(self) -> str:
        buf = io.StringIO()
        out = csv.writer(buf, lineterminator="\n")
        out.writerow([c.key for c in self.columns])
        for row in self.rows:
            out.writerow(["" if _missing(v) else v for v in row])
        return buf.getvalue()

    def aligns(self) -> list[str]:
        """``"left"`` or ``"right"`` per column: left for the first column and for text, right
        for numbers."""
        text = [any(isinstance(row[k], str) for row in self.rows) for k in range(len(self.columns))]
        return ["left" if k == 0 or text[k] else "right" for k in range(len(self.columns))]

    def text_rows(self) -> list[list[str]]:
        """The rows as shown in Markdown and HTML: 4 significant digits, ``-`` if missing."""
        return [[_fmt(v) for v in row] for row in self.rows]

    def to_markdown(self) -> str:
        head = "| " + " | ".join(c.label for c in self.columns) + " |"
        rule = "|" + "|".join("---" if a == "left" else "---:" for a in self.aligns()) + "|"
        code = [c.code for c in self.columns]
        body = [
            "| " + " | ".join(f"`{v}`" if c else v for v, c in zip(row, code, strict=True)) + " |"
            for row in self.text_rows()
        ]
        return "\n".join([head, rule, *body]) + "\n"

    def to_latex(self) -> str:
        spec = "".join(a[0] for a in self.aligns())  # "l" / "r"
        head = " & ".join(c.tex or _tex(c.label) for c in self.columns) + r" \\"
        body = [" & ".join(_tex(_fmt(v)) for v in row) + r" \\" for row in self.rows]
        return "\n".join(
            [
                f"% {self.title}",
                rf"\begin{{tabular}}{{{spec}}}",
                r"\toprule",
                head,
                r"\midrule",
                *body,
                r"\bottomrule",
                r"\end{tabular}",
                "",
            ]
        )


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and not math.isfinite(v))


def _fmt(v: Any) -> str:
    if _missing(v):
        return "-"
    if isinstance(v, float | np.floating):
        return f"{float(v):.4g}"
    return str(v)


_TEX = {"_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "‖": r"$\|$", "φ": r"$\phi$"}


def _tex(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in s)


def _similarity_table(d: ReportData) -> Table | None:
    """φ(1, 1) and mean φ per layer and kind: ranks compared, seeds compared, random."""
    if not d.rank_sim and not d.seed_sim:
        return None
    cols = [Column("layer", "layer"), Column("kind", "kind")]
    if d.rank_pair:
        lo, hi = (m.rank for m in d.rank_pair)
        cols += [
            Column("phi11_ranks", f"φ(1,1) r={lo} vs r={hi}", rf"$\phi(1,1)$ $r={lo}$ vs ${hi}$"),
            Column("diag_mean_ranks", f"mean φ(i,i), i≤{lo}", rf"mean $\phi(i,i)$, $i\le{lo}$"),
        ]
    if d.seed_pair:
        r = d.seed_pair[0].rank
        cols += [
            Column("phi11_seeds", f"φ(1,1) seeds, r={r}", rf"$\phi(1,1)$ seeds, $r={r}$"),
            Column("mean_seeds", f"mean φ seeds, i,j≤{r}", rf"mean $\phi$ seeds, $i,j\le{r}$"),
            Column("mean_random", f"mean φ random, i,j≤{r}", rf"mean $\phi$ random, $i,j\le{r}$"),
        ]
    rows = []
    for kind in d.options.kinds:
        for layer in d.layers:
            row: list[Any] = [layer, kind]
            if d.rank_pair:
                res = d.at_layer(d.rank_sim[kind], layer)[0]
                k = min(res.phi.shape)
                row += [float(res.phi[0, 0]), float(np.mean(np.diagonal(res.phi)[:k]))]
            if d.seed_pair:
                res = d.at_layer(d.seed_sim[kind], layer)[0]
                rnd = res.random_phi if res.random_phi is not None else res.expected_random
                row += [float(res.phi[0, 0]), float(res.phi.mean()), float(rnd.mean())]
            rows.append(row)
    return Table("similarity", "Subspace similarity φ per layer (Hu et al. 2021 §7.2)", cols, rows)


_PROJ_COLS = [
    Column("proj_delta", "‖UᵀWV‖_F, U,V of ΔW", r"$\|U^\top W V\|_F$, $\Delta W$"),
    Column("proj_weight", "‖UᵀWV‖_F, U,V of W", r"$\|U^\top W V\|_F$, $W$"),
    Column("proj_random", "‖UᵀWV‖_F, random", r"$\|U^\top W V\|_F$, random"),
    Column("norm_weight", "‖W‖_F", r"$\|W\|_F$"),
    Column("norm_delta", "‖ΔW‖_F", r"$\|\Delta W\|_F$"),
    Column("amplification", "amplification ‖ΔW‖_F/‖UᵀWV‖_F", r"amplification"),
]


def _table7(d: ReportData) -> Table:
    """The paper's Table 7 layout at the chosen layer: quantities down, ranks across."""
    prim = [m for m in d.primaries if m.label in d.projections]
    cols = [Column("kind", "kind"), Column("quantity", "quantity")] + [
        Column(f"r{m.rank}", f"r = {m.rank}", f"$r = {m.rank}$") for m in prim
    ]
    at = {m.label: {p.kind: p for p in d.at_layer(d.projections[m.label])} for m in prim}
    rows = []
    for kind in d.options.kinds:
        for c in _PROJ_COLS:
            vals = [
                getattr(at[m.label][kind], c.key) if kind in at[m.label] else None for m in prim
            ]
            rows.append([kind, c.label, *vals])
    title = f"Table 7 analogue at layer {d.options.layer} (Hu et al. 2021 §7.3)"
    return Table("table7", title, cols, rows)


def _table7_layers(d: ReportData) -> Table:
    cols = [
        Column("adapter", "adapter"),
        Column("rank", "r"),
        Column("seed", "seed"),
        Column("layer", "layer"),
        Column("kind", "kind"),
        *_PROJ_COLS,
        Column("random_expected", "random, expected r‖W‖_F/√(d_out d_in)", "random, expected"),
    ]
    rows = [
        [m.label, m.rank, m.seed, p.layer, p.kind] + [getattr(p, c.key) for c in cols[5:]]
        for m in d.members
        for p in d.projections.get(m.label, [])
    ]
    return Table("table7_layers", "Table 7 quantities for every module", cols, rows)


def _table7_summary(d: ReportData) -> Table:
    groups: dict[tuple[str, int], list] = defaultdict(list)
    for m in d.members:
        for p in d.projections.get(m.label, []):
            groups[p.kind, m.rank].append(p)
    cols = [
        Column("kind", "kind"),
        Column("rank", "r"),
        Column("n", "modules"),
        Column("norm_delta_mean", "mean ‖ΔW‖_F", r"mean $\|\Delta W\|_F$"),
        Column("proj_delta_mean", "mean ‖UᵀWV‖_F (ΔW)", r"mean $\|U^\top W V\|_F$"),
        Column("proj_random_mean", "mean ‖UᵀWV‖_F (random)", r"mean random"),
        Column("amplification_mean", "mean amplification", "mean amplification"),
        Column("amplification_min", "min", "min"),
        Column("amplification_max", "max", "max"),
    ]
    rows = []
    for kind in d.options.kinds:
        for rank in sorted({r for k, r in groups if k == kind}):
            ps = groups[kind, rank]
            amp = [p.amplification for p in ps if math.isfinite(p.amplification)]
            rows.append(
                [kind, rank, len(ps)]
                + [
                    float(np.mean([getattr(p, k) for p in ps]))
                    for k in ("norm_delta", "proj_delta")
                ]
                + [float(np.mean([p.proj_random for p in ps]))]
                + ([float(np.mean(amp)), min(amp), max(amp)] if amp else [None] * 3)
            )
    title = "Table 7 summarised over layers and seeds: amplification per kind and rank"
    return Table("table7_summary", title, cols, rows)


def _spectra(d: ReportData) -> Table:
    cols = [
        Column("adapter", "adapter"),
        Column("rank", "r"),
        Column("seed", "seed"),
        Column("layer", "layer"),
        Column("kind", "kind"),
        Column("frobenius_norm", "‖ΔW‖_F", r"$\|\Delta W\|_F$"),
        Column("spectral_norm", "σ₁", r"$\sigma_1$"),
        Column("top1_energy", "top-1 energy"),
        Column("effective_rank", "effective rank"),
        Column("stable_rank", "stable rank"),
        Column("numerical_rank", "numerical rank"),
    ]
    rows = [
        [
            *(m.label, m.rank, m.seed, s.layer, s.kind, s.frobenius_norm, s.spectral_norm),
            *(s.energy[0], s.effective_rank, s.stable_rank, s.numerical_rank),
        ]
        for m in d.members
        for s in d.spectra[m.label]
    ]
    return Table("spectra", "Spectrum of every module's ΔW (§7.2)", cols, rows)


def _effective_rank(d: ReportData) -> Table:
    prim = d.primaries
    cols = [Column("layer", "layer")] + [
        Column(f"{k}_r{m.rank}", f"{k}, r={m.rank}", f"{k}, $r={m.rank}$")
        for k in d.options.kinds
        for m in prim
    ]
    eff = {(m.label, s.layer, s.kind): s.effective_rank for m in prim for s in d.spectra[m.label]}
    rows = [
        [layer] + [eff.get((m.label, layer, k)) for k in d.options.kinds for m in prim]
        for layer in d.layers
    ]
    title = "Entropy effective rank of ΔW per layer, exp(−Σ p log p), p = σ/Σσ"
    return Table("effective_rank", title, cols, rows)


def report_tables(d: ReportData) -> list[Table]:
    """Every table the data supports, in the order ``index.md`` shows them."""
    tables = [_similarity_table(d)]
    if d.projections:
        tables += [_table7(d), _table7_summary(d), _table7_layers(d)]
    tables += [_effective_rank(d), _spectra(d)]
    return [t for t in tables if t is not None]
