"""The report: every promised file, numbers equal to the library's, figures that show them, and a
thin CLI whose bad input ends in one line and exit status 2 without touching the output."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lorascope.analysis import amplify, similarity, spectrum, weight_similarity
from lorascope.cli import main
from lorascope.errors import LoraScopeError
from lorascope.formats import load_adapter, load_base, write_peft_adapter
from lorascope.report import build_report, group_adapters, sample_inputs
from lorascope.report.figures import report_figures

D = 64  # d_model of the test model
LAYERS = (0, 1)
QV = ("query", "value")
W_TOP = 16  # W's top directions in Figure 8
FIGURES = (
    "fig3_rank_similarity",
    "fig4_seed_similarity",
    "fig67_layers_q",
    "fig67_layers_v",
    "fig8_weight_similarity",
    "amplification",
    "spectra",
    "effective_rank",
    "shared_q",  # three adapters: the shared-subspace section
    "shared_v",
)
TABLES = (
    "similarity",
    "table7",
    "table7_summary",
    "table7_layers",
    "effective_rank",
    "spectra",
    "shared",
)


def _name(layer: int, p: str) -> str:
    return f"encoder.layer.{layer}.attention.self.{p}"


def _adapter(path, r: int, seed: int | None, w: dict) -> str:
    """A PEFT adapter on query/value whose A rows lean towards W's top right-singular vectors
    (so the updates are not pure noise), with the seed in train_config.json when given."""
    g = torch.Generator().manual_seed(1000 * r + (seed or 0))
    tensors = {}
    for layer in LAYERS:
        for p in QV:
            V = torch.linalg.svd(w[f"{_name(layer, p)}.weight"])[2][:4]  # (4, D)
            mix = torch.randn(r, 4, generator=g) @ V  # (r, D) in W's top-4 row space
            tensors[f"{_name(layer, p)}.lora_A.weight"] = mix + 0.5 * torch.randn(r, D, generator=g)
            tensors[f"{_name(layer, p)}.lora_B.weight"] = torch.randn(D, r, generator=g)
    write_peft_adapter(tensors, {"r": r, "lora_alpha": 8}, path)
    if seed is not None:
        (path / "train_config.json").write_text(json.dumps({"r": r, "seed": seed}))
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_inputs")
    g = torch.Generator().manual_seed(7)
    w = {f"{_name(la, p)}.weight": torch.randn(D, D, generator=g) for la in LAYERS for p in QV}
    save_file(w, str(root / "model.safetensors"))
    paths = {
        "r2": _adapter(root / "lora_r2", 2, 0, w),
        "r16": _adapter(root / "lora_r16", 16, 0, w),
        "r16_seed1": _adapter(root / "lora_r16_seed1", 16, 1, w),
    }
    return root, paths, str(root / "model.safetensors")


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory):
    _, paths, base = inputs
    out = tmp_path_factory.mktemp("report_out")
    report = build_report(
        list(paths.values()), base, out_dir=out, layer=1, weight_top=W_TOP, zoom=2, progress=False
    )
    return report, out


def test_report_writes_every_promised_file(built):
    report, out = built
    expected = {f"{f}.{e}" for f in FIGURES for e in ("png", "pdf")}
    expected |= {f"{t}.{e}" for t in TABLES for e in ("md", "csv", "tex")}
    expected |= {"results.h5", "index.md", "index.html"}
    assert {p.name for p in out.iterdir()} == expected
    assert {p.name for p in report.files} == expected
    index = (out / "index.md").read_text()
    for f in FIGURES:
        assert "![" in index and f"({f}.png)" in index and f"({f}.pdf)" in index
        assert (out / f"{f}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{f}.pdf").read_bytes()[:5] == b"%PDF-"
        assert (out / f"{f}.png").stat().st_size < 400_000
    for t in TABLES:
        assert f"({t}.csv)" in index and "\\begin{tabular}" in (out / f"{t}.tex").read_text()
        for ext in ("md", "csv", "tex"):
            text = (out / f"{t}.{ext}").read_text().lower()
            assert "nan" not in text and "inf" not in text.replace("info", "")
    assert "φ(1,1) r=2 vs r=16" in report.summary() and "\n" not in report.summary()


def test_report_shared_section_equals_the_library(built, inputs):
    import csv

    from lorascope.collection.shared import shared_from_adapters

    report, out = built
    _, paths, _ = inputs
    ads = [load_adapter(p) for p in paths.values()]
    rows = list(csv.DictReader((out / "shared.csv").open()))
    for kind in ("q", "v"):
        lib = shared_from_adapters(ads, layer=1, module=kind, draws=5, seed=0)
        got = {r["curve"]: r for r in rows if r["kind"] == kind}
        for name, curve in (("collection", lib.energy), ("null: own σ", lib.nulls["spectra"]),
                            ("mean update's directions", lib.nulls["mean"])):  # fmt: skip
            assert float(got[name]["k1"]) == pytest.approx(curve[0], rel=1e-12)
            assert float(got[name]["k2"]) == pytest.approx(curve[1], rel=1e-12)
    assert "shared subspace q: E(1) = " in report.summary()


def test_results_h5_equals_the_library(built, inputs):
    _, out = built
    _, paths, base_path = inputs
    a2, a16, a16b = (load_adapter(paths[k]) for k in ("r2", "r16", "r16_seed1"))
    base = load_base(base_path)
    with h5py.File(out / "results.h5") as f:
        assert f.attrs["layer"] == 1 and list(f.attrs["ranks"]) == [2, 16]
        assert json.loads(f.attrs["options"])["weight_top"] == W_TOP
        assert list(f.attrs["kinds"]) == ["q", "v"]
        assert f["adapters/r16_s1"].attrs["seed_from"] == "train_config.json"
        for kind in ("q", "v"):
            for layer in LAYERS:
                lib = similarity(a2, a16, module=kind, layer=layer)[0]
                np.testing.assert_allclose(f[f"similarity/ranks/{kind}/layer_{layer}/phi"], lib.phi)
                lib = similarity(a16, a16b, module=kind, layer=layer)[0]
                np.testing.assert_allclose(f[f"similarity/seeds/{kind}/layer_{layer}/phi"], lib.phi)
            m = a16.select(layer=1, module=kind)[0]
            lib = weight_similarity(m, base.weight_for(m), max_i=W_TOP)
            np.testing.assert_allclose(f[f"weight_similarity/r16_s0/{kind}/phi"], lib.phi)
            np.testing.assert_allclose(
                f[f"weight_similarity/r16_s0/{kind}/random_phi"], lib.random_phi
            )
        for label, ad in (("r2_s0", a2), ("r16_s0", a16), ("r16_s1", a16b)):
            lib = {p.module: p for p in amplify(ad, base)}
            g = f[f"projections/{label}"]
            modules = [m.decode() for m in g["module"][()]]
            assert sorted(modules) == sorted(lib)
            for k in ("norm_delta", "norm_weight", "proj_delta", "proj_weight", "amplification"):
                want = [getattr(lib[m], k) for m in modules]
                np.testing.assert_allclose(g[k][()], want, rtol=1e-12)
            for s in spectrum(ad):
                np.testing.assert_allclose(
                    f[f"spectra/{label}/{s.module}/singular_values"], s.singular_values
                )
    rows = (out / "table7_layers.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 2 * len(LAYERS)


def test_heatmap_data_in_unit_interval_and_figures_name_their_data(built):
    _, out = built
    seen = 0
    with h5py.File(out / "results.h5") as f:

        def check(name, obj):
            nonlocal seen
            if isinstance(obj, h5py.Dataset) and name.rsplit("/", 1)[-1] in ("phi", "random_phi"):
                seen += 1
                assert obj[()].min() >= 0.0 and obj[()].max() <= 1.0, name

        f.visititems(check)
        for fig in FIGURES:
            for path in json.loads(f[f"figures/{fig}"].attrs["datasets"]):
                assert path in f, (fig, path)
    assert seen >= 2 * 2 * len(LAYERS) * 2


def _mesh(ax) -> np.ndarray:
    return np.asarray(ax.collections[0].get_array())


def test_fig3_top_left_cell_is_the_library_phi11(built, inputs):
    report, _ = built
    _, paths, _ = inputs
    fig3 = next(report_figures(report.data))
    assert fig3.name == "fig3_rank_similarity"
    a2, a16 = load_adapter(paths["r2"]), load_adapter(paths["r16"])
    full, zoom = fig3.figure.axes[0], fig3.figure.axes[1]  # row of ΔW_q at layer 1
    phi = similarity(a2, a16, module="q", layer=1)[0].phi
    grid = _mesh(full).reshape(phi.shape)
    assert grid[0, 0] == pytest.approx(phi[0, 0], abs=1e-12)
    np.testing.assert_allclose(grid, phi)
    np.testing.assert_allclose(_mesh(zoom).reshape(2, 2), phi[:2, :2])
    assert f"φ(1, 1) = {phi[0, 0]:.2f} (q)" in fig3.caption
    assert full.collections[0].get_clim() == (0.0, 1.0)


def test_fig4_random_panel_mean_is_max_ij_over_d(built):
    report, _ = built
    fig4 = next(f for f in report_figures(report.data) if f.name == "fig4_seed_similarity")
    random_panel = fig4.figure.axes[2]  # after ΔW_q and ΔW_v
    grid = _mesh(random_panel).reshape(16, 16)
    i, j = np.indices((16, 16)) + 1
    assert grid.mean() == pytest.approx((np.maximum(i, j) / D).mean(), abs=0.04)
    assert 0.0 <= grid.min() and grid.max() <= 1.0
    q = _mesh(fig4.figure.axes[0]).reshape(16, 16)
    assert q[-1, -1] == pytest.approx(16 / D, abs=0.15)  # φ(r, r) of two r-dim subspaces


def test_group_adapters_by_rank_and_seed(inputs, tmp_path):
    _, paths, _ = inputs
    members = group_adapters([paths["r16_seed1"], paths["r2"], paths["r16"]])
    assert [(m.label, m.seed_from) for m in members] == [
        ("r2_s0", "train_config.json"),
        ("r16_s0", "train_config.json"),
        ("r16_s1", "train_config.json"),
    ]
    members = group_adapters([paths["r16"], paths["r16_seed1"]], seeds=[5, 3])
    assert [m.label for m in members] == ["r16_s3", "r16_s5"]
    with pytest.raises(LoraScopeError, match="both have rank 16 and seed 0"):
        group_adapters([paths["r16"], paths["r16"]])
    # no recorded seed: the order given
    a = load_adapter(paths["r16"])
    plain = [a, a]
    for ad in plain:
        ad.path = str(tmp_path / "x.safetensors")
    assert [m.seed_from for m in group_adapters(plain)] == ["order", "order"]
    with pytest.raises(LoraScopeError, match="no sample adapters"):
        sample_inputs(tmp_path / "nothing")


def _run(args, cwd=None, monkeypatch=None):
    if cwd is not None:
        monkeypatch.chdir(cwd)
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _one_line_error(res, *fragments) -> str:
    assert res.exit_code == 2, res.output
    lines = [x for x in res.stderr.strip().splitlines() if not x.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


def test_cli_report_without_base(inputs, tmp_path):
    _, paths, _ = inputs
    out = tmp_path / "out"
    res = _run(["report", paths["r2"], paths["r16"], "--out", out, "--no-progress", "--zoom", 2])
    assert res.exit_code == 0, res.output
    assert res.stdout.count("\n") == 1 and f"files to {out}" in res.stdout
    names = {p.name for p in out.iterdir()}
    assert "fig3_rank_similarity.png" in names and "results.h5" in names
    assert "fig8_weight_similarity.png" not in names and "table7.csv" not in names
    index = (out / "index.md").read_text()
    assert "lorascope report" in index and "--zoom 2" in index
    assert "Figure 8 and Table 7 skipped" in index and "Figure 4 skipped" in index
    assert "Layer 0 for Figures 3, 4, 8" in index  # the middle layer: layers[(n - 1) // 2]


def test_cli_bad_input_exits_2_and_writes_nothing(inputs, tmp_path, monkeypatch):
    _, paths, _ = inputs
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.md").write_text("previous report")
    a, b = paths["r2"], paths["r16"]
    _one_line_error(_run(["report", a, b, "--out", out, "--layer", 7]), "layer 7", "0, 1")
    _one_line_error(_run(["report", a, tmp_path / "nope", "--out", out]), "nope")
    _one_line_error(_run(["report", a, b, "--out", out, "--ranks", "2"]), "--ranks")
    _one_line_error(_run(["report", a, b, "--out", out, "--ranks", "4,16"]), "rank 4")
    _one_line_error(_run(["report", a, b, "--out", out, "--seeds", "1"]), "1 seeds", "2 adapters")
    _one_line_error(_run(["report", a, b, "--out", out, "--module", "k"]), "'k'")
    _one_line_error(_run(["report", a, "--out", out / "index.md"]), "not a directory")
    _one_line_error(_run(["report", a, "--out", out, "--base", tmp_path]), str(tmp_path))
    assert (out / "index.md").read_text() == "previous report"
    assert [p.name for p in out.iterdir()] == ["index.md"]
    # no adapters and no sample adapters anywhere
    monkeypatch.setattr("lorascope.report.inputs._repo_root", lambda: tmp_path)
    msg = _one_line_error(_run(["report", "--out", out], tmp_path, monkeypatch))
    assert "no sample adapters" in msg


def _tracked_run(path):
    """A real tracking file: lorascope LoRA on two Linear layers, 12 AdamW steps."""
    from torch import nn

    from lorascope.tracking import Tracker
    from lorascope.train.inject import inject

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))
    inject(model, ["0", "2"], r=4, alpha=8)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora" in n], lr=1e-2)
    X, Y = torch.randn(64, 16), torch.randn(64, 8)
    tracker = Tracker(path, every=2, factors_every=4)
    for step in range(1, 13):
        ((model(X) - Y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        tracker.step(model, step)
    tracker.close(model, 12)
    return path


def test_report_dynamics_section_from_a_tracking_file(inputs, tmp_path):
    from lorascope.report.tables import Table  # noqa: F401  (the CSV below is a Table's)
    from lorascope.tracking import dynamics, read_run

    _, paths, _ = inputs
    run_file = _tracked_run(tmp_path / "run.h5")
    out = tmp_path / "out"
    res = _run(["report", paths["r2"], paths["r16"], "--out", out, "--no-progress",
                "--tracking", run_file])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "dynamics: 6 snapshots of 2 modules" in res.stdout
    names = {p.name for p in out.iterdir()}
    for stem in ("dynamics_sigma", "dynamics_k90", "dynamics_settling_heatmap",
                 "dynamics_settling"):  # fmt: skip
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    assert {"dynamics.md", "dynamics.csv", "dynamics.tex"} <= names
    index = (out / "index.md").read_text()
    assert "## Training dynamics" in index and "run.h5" in index
    import csv

    rows = list(csv.DictReader((out / "dynamics.csv").open()))
    expected = dynamics(read_run(run_file))
    assert [r["module"] for r in rows] == [d.module for d in expected] == ["0", "2"]
    for row, d in zip(rows, expected, strict=True):
        assert float(row["fro_final"]) == pytest.approx(d.fro[-1], rel=1e-12)
        assert row["settled_step"] == str(d.settled_step)
        assert float(row["phi_first"]) == pytest.approx(d.phi_to_final[0], rel=1e-12)
        assert "nan" not in ",".join(row.values()).lower()
    # a bad tracking file: one line, exit 2, nothing written
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    out2 = tmp_path / "out2"
    res = _run(["report", paths["r2"], "--out", out2, "--no-progress", "--tracking", bad])
    _one_line_error(res, "bad.h5")
    assert not out2.exists()
