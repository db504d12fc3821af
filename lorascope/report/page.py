"""The report's index page as one list of blocks, rendered to ``index.md`` and ``index.html``.

:func:`report_page` decides what the page says and in which order (the run, its options, the
figures with their captions, the tables, the training-dynamics section); :func:`to_markdown`
and :func:`lorascope.report.html.to_html` only render, so the two pages cannot drift apart.
Text is plain (no markup of either language); inline code and links are their own pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lorascope import __version__
from lorascope.report.compute import ReportData
from lorascope.report.figures import directions
from lorascope.report.inputs import display_path
from lorascope.report.tables import Column, Table

__all__ = [
    "Bullets",
    "Code",
    "FigureBlock",
    "Heading",
    "Link",
    "Page",
    "Paragraph",
    "TableBlock",
    "report_page",
    "to_markdown",
]

# shown in full on the page; the others as a row count and links (HTML: folded)
INLINE_TABLES = (
    "similarity",
    "table7",
    "table7_summary",
    "effective_rank",
    "shared",
    "dynamics",
)
NOT_SHOWN = ("progress", "cache")  # how a run went, not what it computed: same page either way
TITLE = "What did the LoRA updates learn? (Hu et al. 2021, §7 and Appendix H)"


@dataclass(frozen=True)
class Code:
    """Inline code (a path, a command)."""

    text: str


@dataclass(frozen=True)
class Link:
    """A link to a file beside the page (relative ``href``)."""

    text: str
    href: str


Inline = str | Code | Link


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    parts: tuple[Inline, ...]


@dataclass(frozen=True)
class Bullets:
    items: tuple[tuple[Inline, ...], ...]


@dataclass(frozen=True)
class FigureBlock:
    """A figure under its own heading: ``{name}.png`` shown, ``{name}.pdf`` linked."""

    name: str
    title: str
    caption: str


@dataclass(frozen=True)
class TableBlock:
    """A table under its own heading (``heading=False``: none), in full or (``full=False``) as a
    row count; ``files``: link its Markdown, CSV and LaTeX files."""

    table: Table
    full: bool = True
    files: bool = True
    heading: bool = True


Block = Heading | Paragraph | Bullets | FigureBlock | TableBlock


@dataclass
class Page:
    title: str
    blocks: list[Block] = field(default_factory=list)


def files_links(name: str) -> tuple[Inline, ...]:
    """Links to a table's Markdown, CSV and LaTeX files."""
    return (
        Link("Markdown", f"{name}.md"),
        " · ",
        Link("CSV", f"{name}.csv"),
        " · ",
        Link("LaTeX", f"{name}.tex"),
    )


def _adapters(d: ReportData) -> Table:
    cols = [
        Column("adapter", "adapter"),
        Column("path", "path", code=True),
        Column("rank", "r"),
        Column("seed", "seed"),
        Column("seed_from", "seed from"),
        Column("modules", "modules"),
    ]
    rows = [
        [m.label, display_path(m.path), m.rank, m.seed, m.seed_from, len(m.adapter)]
        for m in d.members
    ]
    return Table("adapters", "Adapters", cols, rows)


def _options(d: ReportData) -> Table:
    """Every resolved option that shapes the results (all of them are in ``results.h5``)."""
    rows = [
        [k, ", ".join(map(str, v)) if isinstance(v, tuple | list) else str(v)]
        for k, v in d.options.to_dict().items()
        if k not in NOT_SHOWN
    ]
    cols = [Column("option", "option"), Column("value", "value")]
    return Table("options", "Options (resolved; also in results.h5)", cols, rows)


def _figure_blocks(figures: dict[str, dict[str, Any]], dynamics: bool) -> list[Block]:
    return [
        FigureBlock(name, meta["title"], meta["caption"])
        for name, meta in figures.items()
        if name.startswith("dynamics_") == dynamics
    ]


def report_page(
    d: ReportData,
    tables: Sequence[Table],
    figures: dict[str, dict[str, Any]],
    command: str | None = None,
    section: Any = None,
) -> Page:
    """The index page of a report.

    Parameters
    ----------
    d : ReportData
    tables : sequence of Table
        In page order; ``dynamics`` goes to the training-dynamics section.
    figures : dict
        Figure name -> ``{"title", "caption", ...}`` in page order; ``dynamics_*`` go to the
        training-dynamics section.
    command : str, optional
        The command that made the report.
    section : DynamicsSection, optional
    """
    o = d.options
    made: list[Inline] = [f"Made by lorascope {__version__}"]
    if command:
        made += [" with ", Code(command)]
    made += [
        ". Every plotted and tabulated number, with the options below, is in ",
        Link("results.h5", "results.h5"),
        "; each figure is also a PDF.",
    ]
    pair = f"r = {o.ranks[0]} vs r = {o.ranks[1]}" if o.ranks else "none"
    paper = " (the paper's)" if o.factor == "A" else ""
    setup = (
        f". Layer {o.layer} for Figures 3, 4, 8 and Table 7 (layers: "
        f"{', '.join(map(str, d.layers))}); modules {', '.join(o.kinds)}; ranks compared {pair}; "
        f"φ on the {directions(o.factor)}{paper}; Figure 8 on W's top {o.weight_top} "
        f"{o.side}-singular directions; random baselines seeded with {o.seed}; {o.dtype}."
    )
    blocks: list[Block] = [
        Heading(1, TITLE),
        Paragraph(tuple(made)),
        TableBlock(_adapters(d), files=False, heading=False),
        Paragraph(("Base weights: ", Code(d.base) if d.base else "none", setup)),
    ]
    blocks.append(TableBlock(_options(d), files=False, heading=False))
    if d.notes:
        blocks.append(Bullets(tuple((n,) for n in d.notes)))
    blocks += [Heading(2, "Figures"), *_figure_blocks(figures, dynamics=False)]
    blocks.append(Heading(2, "Tables"))
    blocks += [TableBlock(t, t.name in INLINE_TABLES) for t in tables if t.name != "dynamics"]
    if section is not None:
        blocks += [
            Heading(2, "Training dynamics"),
            Paragraph(
                (
                    "From the tracking file ",
                    Code(display_path(section.path)),
                    " (written during training by ",
                    Code("lorascope.tracking"),
                    "; ",
                    Code("lorascope dynamics"),
                    f" reads it): {section.summary()}.",
                )
            ),
        ]
        advice = [line for r in section.results for line in r.advice()]
        if advice:
            blocks.append(Bullets(tuple((a,) for a in advice)))
        blocks += _figure_blocks(figures, dynamics=True)
        blocks += [TableBlock(t) for t in tables if t.name == "dynamics"]
    return Page(TITLE, blocks)


def _md_inline(parts: Sequence[Inline]) -> str:
    out = []
    for p in parts:
        if isinstance(p, Code):
            out.append(f"`{p.text}`")
        elif isinstance(p, Link):
            out.append(f"[{p.text}]({p.href})")
        else:
            out.append(p)
    return "".join(out)


def _md_block(b: Block) -> str:
    if isinstance(b, Heading):
        return f"{'#' * b.level} {b.text}"
    if isinstance(b, Paragraph):
        return _md_inline(b.parts)
    if isinstance(b, Bullets):
        return "\n".join(f"- {_md_inline(item)}" for item in b.items)
    if isinstance(b, FigureBlock):
        return f"### {b.title}\n\n![{b.title}]({b.name}.png)\n\n{b.caption} ([PDF]({b.name}.pdf))"
    t = b.table
    head = f"### {t.title}\n\n" if b.heading else ""
    files = _md_inline(files_links(t.name)) if b.files else ""
    if not b.full:
        return f"{head}{len(t.rows)} rows: {files}"
    return head + t.to_markdown().rstrip("\n") + (f"\n\n{files}" if files else "")


def to_markdown(page: Page) -> str:
    """``index.md``: blocks separated by a blank line, ending in a newline."""
    return "\n\n".join(_md_block(b) for b in page.blocks) + "\n"
