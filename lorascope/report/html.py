"""``index.html``: the report's page (:mod:`lorascope.report.page`) as one HTML file.

Self-contained but for the figures: the style sheet is inline, there is no script and nothing
from the network; each figure is the PNG beside the page, referenced by a relative path (the
PNGs are written anyway, and embedding them would store every image twice, a third larger as
base64), so the folder opens from disk in any browser. Every piece of text is escaped
(:func:`html.escape`); the output depends only on the page, so a re-run writes the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from lorascope.report.page import (
    Block,
    Bullets,
    Code,
    FigureBlock,
    Heading,
    Inline,
    Link,
    Page,
    Paragraph,
    files_links,
)
from lorascope.report.tables import Table

__all__ = ["to_html"]

CSS = """
body { margin: 0; background: #fff; color: #1b1b1b; font: 15px/1.5 system-ui, -apple-system,
  "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 72rem; margin: 0 auto; padding: 1rem 1.5rem 3rem; }
h1 { font-size: 1.6rem; margin: 0.5rem 0 1rem; }
h2 { font-size: 1.3rem; margin-top: 2.5rem; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05rem; margin-top: 1.8rem; }
code { font: 0.9em ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
  background: #f2f2f2; padding: 0 0.2em; border-radius: 3px; }
figure { margin: 0.5rem 0 1.5rem; }
figure img { display: block; max-width: 100%; height: auto; }
figcaption { font-size: 0.92rem; color: #333; max-width: 60rem; margin-top: 0.4rem; }
.scroll { overflow-x: auto; margin: 0.5rem 0; }
table { border-collapse: collapse; font-size: 0.85rem; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d4d4d4; padding: 0.15rem 0.5rem; vertical-align: top; }
th { background: #f4f4f4; }
.r { text-align: right; }
.l { text-align: left; }
tbody tr:nth-child(even) { background: #fafafa; }
details { margin: 0.5rem 0; }
summary { cursor: pointer; }
.files { font-size: 0.9rem; }
"""


def _inline(parts: Sequence[Inline]) -> str:
    out = []
    for p in parts:
        if isinstance(p, Code):
            out.append(f"<code>{escape(p.text)}</code>")
        elif isinstance(p, Link):
            out.append(f'<a href="{escape(p.href)}">{escape(p.text)}</a>')
        else:
            out.append(escape(p))
    return "".join(out)


def _anchor(name: str) -> str:
    return escape(name.replace(" ", "-"))


def _table(t: Table) -> str:
    aligns = ["r" if a == "right" else "l" for a in t.aligns()]
    head = "".join(
        f'<th class="{a}" scope="col">{escape(c.label)}</th>'
        for c, a in zip(t.columns, aligns, strict=True)
    )
    code = [c.code for c in t.columns]
    rows = []
    for row in t.text_rows():
        cells = (
            f'<td class="{a}">{f"<code>{escape(v)}</code>" if c else escape(v)}</td>'
            for v, a, c in zip(row, aligns, code, strict=True)
        )
        rows.append(f"<tr>{''.join(cells)}</tr>")
    body = "\n".join(rows)
    return (
        '<div class="scroll"><table>\n'
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table></div>"
    )


def _block(b: Block) -> str:
    if isinstance(b, Heading):
        return f"<h{b.level}>{escape(b.text)}</h{b.level}>"
    if isinstance(b, Paragraph):
        return f"<p>{_inline(b.parts)}</p>"
    if isinstance(b, Bullets):
        items = "\n".join(f"<li>{_inline(item)}</li>" for item in b.items)
        return f"<ul>\n{items}\n</ul>"
    if isinstance(b, FigureBlock):
        pdf = f'<a href="{escape(b.name)}.pdf">PDF</a>'
        return (
            f'<section id="fig-{_anchor(b.name)}">\n<h3>{escape(b.title)}</h3>\n<figure>\n'
            f'<img src="{escape(b.name)}.png" alt="{escape(b.title)}">\n'
            f"<figcaption>{escape(b.caption)} ({pdf})</figcaption>\n</figure>\n</section>"
        )
    t = b.table  # a TableBlock
    parts = [f"<h3>{escape(t.title)}</h3>"] if b.heading else []
    if b.full:
        parts.append(_table(t))
    else:
        parts.append(
            f"<details>\n<summary>{len(t.rows)} rows (click to show)</summary>\n{_table(t)}\n"
            "</details>"
        )
    if b.files:
        parts.append(f'<p class="files">{_inline(files_links(t.name))}</p>')
    inner = "\n".join(parts)
    return f'<section id="tab-{_anchor(t.name)}">\n{inner}\n</section>'


def to_html(page: Page) -> str:
    """The page as one HTML5 document (UTF-8, inline CSS, no script)."""
    body = "\n".join(_block(b) for b in page.blocks)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'  # no favicon request
        f"<title>{escape(page.title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )
