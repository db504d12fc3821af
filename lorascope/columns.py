"""Results that describe their own columns: one description, printed as a table, CSV, JSON
records or notebook HTML.

Each result class declares its columns once, as :class:`Column` objects (name, header, how to
read the value, digits, unit, meaning). Two views exist because one number per module and one
row per number are both useful:

- the **summary** (:meth:`Tabular.table_columns`, :meth:`Tabular.row`): one row per result, the
  human table the CLI prints and the notebook shows;
- the **tidy** form (:meth:`Tabular.tidy_columns`, :meth:`Tabular.records`): one row per number
  that varies (singular value ``i``, grid cell ``(i, j)``, pair ``(a, b)``), identifying
  columns repeated, what ``--csv`` prints.

``--json`` prints each result's ``to_dict()``. :class:`Results` is a list of results with the
same views over all of them; analyses return it, so a notebook cell that ends with
``spectrum(adapter)`` shows an HTML table. Nothing here knows about click or files; plots are
drawn by :mod:`lorascope.plot` on the Agg backend only when a notebook asks for HTML.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

__all__ = ["Column", "Tabular", "Results", "format_value", "html_table", "ident", "ident_columns"]

T = TypeVar("T")

# Rows an HTML table shows before "… N more rows".
MAX_HTML_ROWS = 20


def format_value(x: Any, digits: int = 4) -> str:
    """Numbers for humans: ``digits`` significant digits, ``-`` for missing, ``inf``/``-inf``.

    >>> format_value(3.14159), format_value(None), format_value(float("inf")), format_value(7)
    ('3.142', '-', 'inf', '7')
    """
    if x is None:
        return "-"
    if isinstance(x, float | np.floating):
        x = float(x)
        if math.isnan(x):
            return "nan"
        if not math.isfinite(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.{digits}g}"
    return str(x)


def _read(name: str) -> Callable[[Any], Any]:
    def get(obj: Any) -> Any:
        return obj[name] if isinstance(obj, dict) else getattr(obj, name)

    return get


@dataclass(frozen=True)
class Column:
    """One column of a result table.

    Attributes
    ----------
    name : str
        Machine name: the CSV header and the key of :meth:`Tabular.records`.
    header : str, optional
        Human header of the table and the HTML (default ``name``), e.g. ``"‖ΔW‖_F"``.
    get : callable, optional
        Reads the value from a row object (a result, or a tidy row dict); default the
        attribute or key ``name``.
    digits : int
        Significant digits of floats in the table and the HTML (CSV and JSON keep all).
    unit : str
        Unit of the value, if any (``"rad"``); shown in the HTML header's tooltip.
    doc : str
        What the value is, in a few words (the HTML header's tooltip).
    """

    name: str
    header: str | None = None
    get: Callable[[Any], Any] | None = field(default=None, compare=False)
    digits: int = 4
    unit: str = ""
    doc: str = ""

    @property
    def label(self) -> str:
        return self.header or self.name

    def value(self, obj: Any) -> Any:
        return (self.get or _read(self.name))(obj)

    def format(self, x: Any) -> str:
        return format_value(x, self.digits)


def ident_columns(rank: bool = True) -> tuple[Column, ...]:
    """The identifying columns most results start with: module, layer, kind (and rank)."""
    cols = (
        Column("module", doc="module name (key in the adapter)"),
        Column("layer", doc="transformer block index"),
        Column("kind", doc="projection kind (q, k, v, o, ...)"),
    )
    return (*cols, Column("rank", doc="rank r of the factors")) if rank else cols


def ident(obj: Any, rank: bool = True) -> dict:
    """``{module, layer, kind[, rank]}`` of a result: the start of its tidy rows."""
    d = {"module": obj.module, "layer": obj.layer, "kind": obj.kind}
    if rank:
        d["rank"] = obj.rank
    return d


def html_table(
    columns: Sequence[Column],
    rows: Iterable[Sequence[Any]],
    *,
    caption: str | None = None,
    max_rows: int = MAX_HTML_ROWS,
) -> str:
    """A compact HTML table of ``rows`` (values in the order of ``columns``), every text
    escaped; past ``max_rows`` rows a last row says ``… N more rows``."""
    esc = html.escape
    head = "".join(
        f'<th title="{esc(" ".join(x for x in (c.doc, f"[{c.unit}]" if c.unit else "") if x))}"'
        f">{esc(c.label)}</th>"
        for c in columns
    )
    body, n = [], 0
    for row in rows:
        n += 1
        if n <= max_rows:
            cells = "".join(
                f'<td style="text-align:{"left" if k == 0 else "right"}">{esc(c.format(v))}</td>'
                for k, (c, v) in enumerate(zip(columns, row, strict=True))
            )
            body.append(f"<tr>{cells}</tr>")
    if n > max_rows:
        more = n - max_rows
        body.append(
            f'<tr><td colspan="{len(columns)}" style="text-align:left">'
            f"… {more} more row{'s' if more > 1 else ''}</td></tr>"
        )
    cap = f"<caption style='text-align:left'>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure outside pyplot (Agg canvas): nothing global changes, nothing is
    shown, and no figure is left open in a notebook."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def png_bytes(fig: Any, dpi: int = 90) -> bytes:
    """PNG of a matplotlib Figure, without the version metadata, so that the same figure
    gives the same bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def img_tag(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/>'


class Tabular:
    """Mixin of a result that describes its own columns (see the module docstring).

    Subclasses set ``COLUMNS`` (the summary, one row per result) and, when the tidy form has
    other rows, ``TIDY`` and :meth:`tidy`; either may be overridden per instance through
    :meth:`table_columns` / :meth:`tidy_columns` when a column depends on the result (the ε of
    an intruder count, say).
    """

    COLUMNS: ClassVar[tuple[Column, ...]] = ()
    TIDY: ClassVar[tuple[Column, ...] | None] = None
    # Whether the HTML shows the tidy rows under the summary (off where a heatmap says more).
    HTML_TIDY: ClassVar[bool] = True

    def table_columns(self) -> tuple[Column, ...]:
        return self.COLUMNS

    def tidy_columns(self) -> tuple[Column, ...]:
        return self.COLUMNS if self.TIDY is None else self.TIDY

    def row(self) -> list:
        """This result's summary row: one value per :meth:`table_columns`."""
        return [c.value(self) for c in self.table_columns()]

    def tidy(self) -> Iterator[Any]:
        """The objects the tidy columns read, one per tidy row (default: the result itself)."""
        yield self

    def tidy_rows(self) -> Iterator[list]:
        cols = self.tidy_columns()
        for obj in self.tidy():
            yield [c.value(obj) for c in cols]

    def records(self) -> list[dict]:
        """The tidy form as ``{name: value}`` dicts (what ``--csv`` prints, one per line)."""
        names = [c.name for c in self.tidy_columns()]
        return [dict(zip(names, row, strict=True)) for row in self.tidy_rows()]

    def caption(self) -> str:
        """One line saying what the result is (the HTML's header line)."""
        fam = getattr(self, "family", None)
        mod = getattr(self, "module", "")
        return " · ".join(str(x) for x in (type(self).__name__, mod, fam and f"family {fam}") if x)

    def png(self) -> bytes | None:
        """A small heatmap of the result as PNG bytes, for results that have one."""
        return None

    def _repr_html_(self) -> str:
        summary = self.table_columns()
        parts = [html_table(summary, [self.row()], caption=self.caption())]
        # the tidy rows below it, without the columns the summary already shows
        shown = {c.name for c in summary}
        keep = [k for k, c in enumerate(self.tidy_columns()) if c.name not in shown]
        keep = keep if self.HTML_TIDY else []
        if keep:
            cols = [self.tidy_columns()[k] for k in keep]
            rows = ([row[k] for k in keep] for row in self.tidy_rows())
            parts.append(html_table(cols, rows))
        png = self.png()
        if png is not None:
            parts.append(img_tag(png, f"heatmap: {self.caption()}"))
        return f'<div class="lorascope-result">{"".join(parts)}</div>'


class Results(list[T], Generic[T]):
    """A list of results of one analysis (one per module), with the views of its items:
    :meth:`table_columns`/:meth:`rows` (one row per result), :meth:`tidy_columns`/
    :meth:`tidy_rows`/:meth:`records` (the tidy form), :meth:`to_dicts` (the JSON) and an HTML
    table for notebooks. A plain ``list`` in every other respect."""

    def table_columns(self) -> tuple[Column, ...]:
        return self[0].table_columns() if self else ()

    def tidy_columns(self) -> tuple[Column, ...]:
        return self[0].tidy_columns() if self else ()

    def rows(self) -> list[list]:
        return [r.row() for r in self]

    def tidy_rows(self) -> Iterator[list]:
        for r in self:
            yield from r.tidy_rows()

    def records(self) -> list[dict]:
        return [d for r in self for d in r.records()]

    def to_dicts(self) -> list[dict]:
        return [r.to_dict() for r in self]

    def caption(self) -> str:
        if not self:
            return "no results"
        kinds = list(dict.fromkeys(type(r).__name__ for r in self))
        fams = list(dict.fromkeys(str(getattr(r, "family", "")) for r in self))
        fams = [f for f in fams if f]
        what = f"{len(self)} × {'/'.join(kinds)}"
        return what + (f" · family {', '.join(fams)}" if fams else "")

    def png(self) -> bytes | None:
        png = getattr(type(self[0]), "group_png", None) if self else None
        return png(list(self)) if png is not None else None

    def _repr_html_(self) -> str:
        if not self:
            return "<p>no results</p>"
        parts = [html_table(self.table_columns(), self.rows(), caption=self.caption())]
        png = self.png()
        if png is not None:
            parts.append(img_tag(png, f"heatmap: {self.caption()}"))
        return f'<div class="lorascope-result">{"".join(parts)}</div>'
