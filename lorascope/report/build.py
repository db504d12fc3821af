"""``build_report``: adapters in, the paper's §7 figures and tables out, in one directory.

Everything is computed and rendered in memory first; files are written only when all of it
succeeded, each through a temporary file and an atomic rename, so an error never leaves a
half-written report or clobbers a previous one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lorascope._files import write_atomic
from lorascope.adapter import Adapter
from lorascope.errors import LoraScopeError
from lorascope.formats import BaseWeights
from lorascope.report.compute import ReportData, ReportOptions, compute_report
from lorascope.report.figures import figure_plan, render
from lorascope.report.html import to_html
from lorascope.report.inputs import group_adapters
from lorascope.report.page import report_page, to_markdown
from lorascope.report.store import write_h5
from lorascope.report.tables import report_tables

__all__ = ["Report", "build_report"]

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What :func:`build_report` wrote.

    Attributes
    ----------
    out_dir : Path
    files : list of Path
        Every file written (``index.md``, ``index.html``, ``results.h5``, figures as PNG and
        PDF, tables as Markdown, CSV and LaTeX).
    data : ReportData
        The results themselves, with the resolved options.
    captions : dict
        Figure name -> caption.
    seconds : float
    """

    out_dir: Path
    files: list[Path]
    data: ReportData
    captions: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    dynamics: Any = None  # lorascope.report.dynamics.DynamicsSection, with a tracking file
    shared: Any = None  # lorascope.report.shared.SharedSection, with three or more adapters

    def summary(self) -> str:
        """One line: what was written and the headline numbers."""
        d = self.data
        ranks = ", ".join(str(r) for r in sorted({m.rank for m in d.members}))
        parts = [
            f"wrote {len(self.files)} files to {self.out_dir} in {self.seconds:.1f} s",
            f"{len(d.members)} adapters (r = {ranks}), layer {d.options.layer}",
        ]
        if d.rank_pair:
            lo, hi = d.rank_pair
            phi = ", ".join(
                f"{d.at_layer(d.rank_sim[k])[0].phi[0, 0]:.2f} ({k})" for k in d.options.kinds
            )
            parts.append(f"φ(1,1) r={lo.rank} vs r={hi.rank}: {phi}")
        if d.projections:
            amp = []
            for r in sorted({m.rank for m in d.members}):
                a = [
                    p.amplification
                    for m in d.members
                    if m.rank == r
                    for p in d.projections[m.label]
                    if np.isfinite(p.amplification)
                ]
                if a:
                    amp.append(f"{np.mean(a):.1f} (r={r})")
            parts.append("mean amplification " + ", ".join(amp))
        if self.shared is not None:
            parts.append(self.shared.summary())
        if self.dynamics is not None:
            parts.append("dynamics: " + self.dynamics.summary())
        return "; ".join(parts)


def build_report(
    adapters: Sequence[str | Path | Adapter],
    base: str | Path | BaseWeights | None = None,
    *,
    out_dir: str | Path,
    layer: int | None = None,
    seeds: Sequence[int] | None = None,
    options: ReportOptions | None = None,
    command: str | None = None,
    tracking: str | Path | None = None,
    **overrides: Any,
) -> Report:
    """Compute the analyses of Hu et al. 2021 §7 for ``adapters`` and write them to ``out_dir``.

    Parameters
    ----------
    adapters : sequence of path or Adapter
        Grouped by rank and seed (:func:`lorascope.report.group_adapters`): Figure 3 compares
        the two largest ranks, Figure 4 two seeds of the highest rank that has two.
    base : path or BaseWeights, optional
        Pre-trained weights for Figure 8 and Table 7 (skipped, and noted, without them).
    out_dir : path
        Created if needed; files of the same names are replaced, nothing else is touched.
    layer : int, optional
        Layer of Figures 3, 4, 8 and the paper-style Table 7 (default: the middle layer).
    seeds : sequence of int, optional
        One seed per adapter, overriding what their training configurations say.
    options : ReportOptions, optional
        Everything else; keyword ``overrides`` (e.g. ``zoom=4``, ``progress=False``) replace
        single fields.
    command : str, optional
        The command that made the report, quoted in ``index.md`` and ``index.html``.
    tracking : path, optional
        A tracking file (:mod:`lorascope.tracking`): adds the training-dynamics section (σ
        trajectories, k@90 %, the settling heatmap and steps, a per-module table).

    Returns
    -------
    Report
        ``report.summary()`` is one line with the headline numbers.

    Raises
    ------
    LoraScopeError
        Bad input of any kind; nothing is written then.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LoraScopeError(f"{out}: exists and is not a directory")
    options = options or ReportOptions()
    try:
        options = replace(options, **overrides, **({"layer": layer} if layer is not None else {}))
    except TypeError as e:
        raise LoraScopeError(f"build_report: {e}") from None
    section = None
    if tracking is not None:  # read first: a bad tracking file fails before any heavy work
        from lorascope.report.dynamics import dynamics_section

        section = dynamics_section(tracking)
    data = compute_report(group_adapters(adapters, seeds), base, options)
    tables = report_tables(data)
    plan = figure_plan(data)
    from lorascope.report.shared import shared_section

    shared = shared_section(data)
    if shared is not None:
        tables += shared.tables
        plan += shared.figures
    if section is not None:
        tables += section.tables
        plan += section.figures
    files: dict[str, bytes] = {}
    for t in tables:
        files[f"{t.name}.md"] = f"## {t.title}\n\n{t.to_markdown()}".encode()
        files[f"{t.name}.csv"] = t.to_csv().encode()
        files[f"{t.name}.tex"] = t.to_latex().encode()
    figures: dict[str, dict[str, Any]] = {}
    for make in tqdm(plan, desc="lorascope figures", disable=not data.options.progress):
        f = make()
        for ext, blob in render(f.figure, data.options.dpi).items():
            files[f"{f.name}.{ext}"] = blob
        figures[f.name] = {"title": f.title, "caption": f.caption, "datasets": f.datasets}
        f.figure.clear()
    files["results.h5"] = write_h5(data, {t.name: t.to_csv() for t in tables}, figures)
    page = report_page(data, tables, figures, command, section)
    files["index.md"] = to_markdown(page).encode()
    files["index.html"] = to_html(page).encode()
    out.mkdir(parents=True, exist_ok=True)
    written = [write_atomic(out / name, blob) for name, blob in files.items()]
    captions = {k: v["caption"] for k, v in figures.items()}
    report = Report(out, written, data, captions, 0.0, section, shared)
    report.seconds = time.perf_counter() - t0
    log.info("%s", report.summary())
    return report
