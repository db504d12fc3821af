"""Results and adapters display themselves in a notebook (``_repr_html_``, heatmaps as PNG).

The HTML is parsed back with :mod:`html.parser` and its cells checked against independent
computations (numpy SVD of the dense ``ΔW``, scipy's principal angles, the intruder definition
on a dense ``W + ΔW``); names are escaped; long tables are cut; heatmaps decode and are not blank.
"""

from __future__ import annotations

import base64
import csv
import io
from html.parser import HTMLParser

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file
from scipy.linalg import subspace_angles

from lorascope.adapter import Adapter, LoraModule
from lorascope.analysis import (
    RankRule,
    compare,
    intruders,
    module_amplification,
    rank,
    similarity,
    spectrum,
)
from lorascope.cli import main
from lorascope.columns import MAX_HTML_ROWS, Results
from lorascope.formats import load_adapter

D_OUT, D_IN = 12, 10


class _Tables(HTMLParser):
    """Tables (caption, header cells, body rows of cell texts) and image sources."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[dict] = []
        self.images: list[str] = []
        self._where = ""  # "caption", "thead" or "tbody"
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append({"caption": "", "header": [], "rows": []})
        elif tag in ("caption", "thead", "tbody"):
            self._where = tag
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag in ("caption", "thead", "tbody"):
            self._where = ""
        elif tag in ("td", "th"):
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr":
            t = self.tables[-1]
            if self._where == "thead":
                t["header"] = self._row
            else:
                t["rows"].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        elif self._where == "caption":
            self.tables[-1]["caption"] += data


def _parse(text: str) -> _Tables:
    p = _Tables()
    p.feed(text)
    p.close()
    return p


def _column(table: dict, header: str) -> list[str]:
    k = table["header"].index(header)
    return [row[k] for row in table["rows"] if len(row) == len(table["header"])]


def _module(A, B, scale=1.0, layer=0, kind="q", name=None) -> LoraModule:
    name = name or f"model.layers.{layer}.self_attn.{kind}_proj"
    return LoraModule(
        name=name, A=A, B=B, scale=scale, layer=layer, kind=kind, source="mem", keys=(name,)
    )


def _adapter(r=4, seed=0, layers=(0, 1), path=None, scale=0.5) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    mods = [
        _module(
            torch.randn(r, D_IN, generator=g, dtype=torch.float64),
            torch.randn(D_OUT, r, generator=g, dtype=torch.float64),
            scale,
            layer,
            kind,
        )
        for layer in layers
        for kind in ("q", "v")
    ]
    return Adapter(modules=mods, path=path or f"runs/r{r}_seed{seed}", format="plain")


def _png(src: str) -> np.ndarray:
    assert src.startswith("data:image/png;base64,")
    raw = base64.b64decode(src.split(",", 1)[1])
    return _decode(raw)


def _decode(raw: bytes) -> np.ndarray:
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    img = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    assert img.shape[0] > 50 and img.shape[1] > 50
    colours = np.unique(img.reshape(-1, 3), axis=0)
    assert len(colours) > 20 and img.std() > 10  # a heatmap, not a blank canvas
    return img


def _num(text: str) -> float:
    return float(text)


# ------------------------------------------------------------------------------ the tables


def test_spectrum_html_holds_the_dense_svd_values():
    ad = _adapter(r=5, seed=1)
    res = spectrum(ad)
    assert isinstance(res, Results) and isinstance(res, list)
    page = _parse(res._repr_html_())
    (table,) = page.tables
    assert len(table["rows"]) == len(ad.modules) and "SpectrumResult" in table["caption"]
    assert table["header"][:4] == ["module", "layer", "kind", "rank"]
    for m, frob, s1, ratio in zip(
        ad.modules,
        _column(table, "‖ΔW‖_F"),
        _column(table, "σ1"),
        _column(table, "σ2/σ1"),
        strict=True,
    ):
        S = np.linalg.svd(m.scale * (m.B.numpy() @ m.A.numpy()), compute_uv=False)  # dense
        assert _num(frob) == pytest.approx(np.sqrt((S**2).sum()), rel=5e-4)
        assert _num(s1) == pytest.approx(S[0], rel=5e-4)
        assert _num(ratio) == pytest.approx(S[1] / S[0], rel=5e-4)
    # one result: its summary row, then one row per singular value (no repeated identity)
    one = _parse(res[0]._repr_html_())
    summary, detail = one.tables
    assert summary["rows"][0][0] == ad.modules[0].key and "rank 5" in summary["caption"]
    assert detail["header"] == ["index", "σ_i", "energy"]
    S = np.linalg.svd(ad.modules[0].delta().numpy(), compute_uv=False)[:5]
    got = [_num(x) for x in _column(detail, "σ_i")]
    np.testing.assert_allclose(got, S, rtol=5e-4)
    energy = [_num(x) for x in _column(detail, "energy")]
    np.testing.assert_allclose(energy, np.cumsum(S**2) / (S**2).sum(), rtol=5e-4)


def test_records_are_the_tidy_columns():
    res = spectrum(_adapter(r=3))
    recs = res.records()
    assert len(recs) == 4 * 3
    names = [c.name for c in res.tidy_columns()]
    assert all(list(r) == names for r in recs)
    assert [r["index"] for r in recs[:3]] == [1, 2, 3]
    assert recs[0]["singular_value"] == res[0].singular_values[0]
    assert len(res.rows()) == 4 and len(res.rows()[0]) == len(res.table_columns())


def test_names_are_escaped():
    evil = 'model.layers.0.<img src=x onerror="alert(1)">&q'
    g = torch.Generator().manual_seed(0)
    m = _module(
        torch.randn(2, D_IN, generator=g, dtype=torch.float64),
        torch.randn(D_OUT, 2, generator=g, dtype=torch.float64),
        name=evil,
    )
    ad = Adapter(modules=[m], path="<b>dir</b>", format="plain")
    for text in (ad._repr_html_(), spectrum(ad)._repr_html_(), spectrum(ad)[0]._repr_html_()):
        assert "<img src=x" not in text and "<b>dir" not in text
        page = _parse(text)
        assert page.tables[0]["rows"][0][0] == evil  # shown literally
    assert "<b>dir</b>" in _parse(ad._repr_html_()).tables[0]["caption"]


def test_long_tables_are_cut():
    ad = _adapter(r=2, layers=range(13))  # 26 modules
    page = _parse(ad._repr_html_())
    (table,) = page.tables
    rows = table["rows"]
    assert len(rows) == MAX_HTML_ROWS + 1
    assert rows[-1] == [f"… {26 - MAX_HTML_ROWS} more rows"]
    assert "26 modules" in table["caption"] and "rank 2" in table["caption"]
    assert "plain" in table["caption"] and ad.path in table["caption"]
    # the module rows: ‖A‖_F and ‖B‖_F against torch, the shape from the factors
    for m, a, b, d_out in zip(
        ad.modules,
        _column(table, "norm_A"),
        _column(table, "norm_B"),
        _column(table, "d_out"),
        strict=False,
    ):
        assert _num(a) == pytest.approx(float(torch.linalg.norm(m.A)), rel=5e-4)
        assert _num(b) == pytest.approx(float(torch.linalg.norm(m.B)), rel=5e-4)
        assert int(d_out) == D_OUT


# ------------------------------------------------------------------------------ φ heatmaps


def test_similarity_html_and_heatmap():
    a, b = _adapter(r=3, seed=2), _adapter(r=6, seed=3)
    res = similarity(a, b, factor="A")
    page = _parse(res._repr_html_())
    (table,) = page.tables
    for m, n, cell in zip(a.modules, b.modules, _column(table, "φ(1,1)"), strict=True):
        # φ(1, 1) = cos² of the angle between the top right-singular vectors of the two A's
        va = np.linalg.svd(m.A.numpy())[2][0]
        vb = np.linalg.svd(n.A.numpy())[2][0]
        assert _num(cell) == pytest.approx(float(va @ vb) ** 2, rel=5e-4, abs=5e-5)
    (img,) = page.images  # small multiples for the list
    _png(img)
    one = res[0]
    page = _parse(one._repr_html_())
    assert len(page.tables) == 1  # the heatmap shows the grid, no 18-row table
    (img,) = page.images
    _png(img)
    assert one.png() == one.png()  # deterministic bytes
    _decode(one.png())
    assert plt.get_fignums() == []  # drawn outside pyplot: nothing left open to show twice


def test_compare_html_and_heatmap():
    ads = [_adapter(r=3, seed=s, path=f"runs/seed{s}") for s in range(3)]
    res = compare(ads)
    page = _parse(res._repr_html_())
    assert len(page.tables[0]["rows"]) == 4 and len(page.images) == 1
    _png(page.images[0])
    one = _parse(res[0]._repr_html_())
    summary, pairs = one.tables
    assert "seed0" in summary["caption"] or "3 adapters" in summary["caption"]
    assert len(pairs["rows"]) == 9
    # every φ against scipy's principal angles between the dense ΔWs' top-3 right vectors
    bases = [np.linalg.svd(ad.modules[0].delta().numpy())[2][:3].T for ad in ads]
    for row in pairs["rows"]:
        a = int(row[pairs["header"].index("a")]) - 1
        b = int(row[pairs["header"].index("b")]) - 1
        theta = subspace_angles(bases[a], bases[b])
        phi = _num(row[pairs["header"].index("φ")])
        assert phi == pytest.approx(np.mean(np.cos(theta) ** 2), rel=5e-4, abs=5e-5)
    _png(one.images[0])


# ------------------------------------------------------------------------------ other results


def test_rank_html_k_at_90_percent():
    ad = _adapter(r=6, seed=4)
    res = rank(ad, RankRule("energy", 0.9))
    (table,) = _parse(res._repr_html_()).tables
    for m, k in zip(ad.modules, _column(table, "k@90%"), strict=True):
        S = np.linalg.svd(m.delta().numpy(), compute_uv=False)
        share = np.cumsum(S**2) / (S**2).sum()
        assert int(k) == int(np.argmax(share >= 0.9 - 1e-12)) + 1


class _Base:
    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights

    def weight_for(self, m: LoraModule) -> torch.Tensor:
        return self.weights[m.name]


def test_amplify_and_intruders_html():
    ad = _adapter(r=2, seed=5, layers=(0,))
    g = torch.Generator().manual_seed(6)
    base = _Base(
        {m.name: torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64) for m in ad.modules}
    )
    m = ad.modules[0]
    W = base.weight_for(m).numpy()
    amp = module_amplification(m, base.weight_for(m))
    (table,) = _parse(amp._repr_html_()).tables[:1]
    U, S, Vt = np.linalg.svd(m.delta().numpy())  # dense ΔW
    proj = np.linalg.norm(U[:, :2].T @ W @ Vt[:2].T)
    assert _num(_column(table, "amplification")[0]) == pytest.approx(
        np.sqrt((S**2).sum()) / proj, rel=5e-4
    )

    res = intruders(ad, base, k=4, epsilon=[0.5, 0.9])
    page = _parse(res._repr_html_())
    (table,) = page.tables
    for mod, c5, c9 in zip(
        ad.modules,
        _column(table, "intruders ε=0.5"),
        _column(table, "intruders ε=0.9"),
        strict=True,
    ):
        Wm = base.weight_for(mod).numpy()
        Y = np.linalg.svd(Wm + mod.delta().numpy())[0][:, :4]  # definition: left vectors
        X = np.linalg.svd(Wm)[0]
        best = np.abs(Y.T @ X).max(axis=1)
        assert int(c5) == int((best < 0.5).sum()) and int(c9) == int((best < 0.9).sum())
    one = _parse(res[0]._repr_html_())
    assert _column(one.tables[1], "j") == ["1", "2", "3", "4"]
    _png(one.images[0])


# ------------------------------------------------------------------------------ one description


def test_cli_prints_from_the_same_columns(tmp_path):
    """`spectrum` as a table and as CSV: the headers and rows of the result's own columns."""
    ad = _adapter(r=3, seed=7)
    tensors = {}
    for m in ad.modules:
        tensors[f"{m.name}.lora_A.weight"] = m.A.float().contiguous()
        tensors[f"{m.name}.lora_B.weight"] = m.B.float().contiguous()
    path = tmp_path / "adapter.safetensors"
    save_file(tensors, str(path))
    res = spectrum(load_adapter(path, alpha=3))
    run = CliRunner().invoke(main, ["spectrum", str(path), "--alpha", "3", "--csv"])
    assert run.exit_code == 0, run.output
    rows = list(csv.reader(io.StringIO(run.stdout)))
    assert rows[0] == [c.name for c in res.tidy_columns()]
    assert rows[1:] == [["" if v is None else str(v) for v in r] for r in res.tidy_rows()]
    run = CliRunner().invoke(main, ["spectrum", str(path), "--alpha", "3"])
    assert run.exit_code == 0, run.output
    for c in res.table_columns():
        assert c.label in run.stdout
    for r in res:  # the table's cells are the HTML's cells
        (table,) = _parse(r._repr_html_()).tables[:1]
        assert all(cell in run.stdout for cell in table["rows"][0][1:])
