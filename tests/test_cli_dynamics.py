"""`lorascope dynamics` on tracking files written by a real Tracker during a real (tiny) training
run: the table, --json, --csv and --plot against dense numpy computations on the stored factors,
a run cut off before its end, and bad input -> one line, exit 2."""

import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from lorascope.cli import main
from lorascope.tracking import Tracker, dynamics, read_run
from lorascope.tracking.store import RunWriter
from lorascope.train.inject import inject

D, R, STEPS = 16, 4, 20
FACTORS_EVERY = 5
NAMES = [f"layers.{i}.{p}_proj" for i in range(2) for p in ("q", "v")]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.v_proj(torch.tanh(self.q_proj(x)))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


def _train(path, *, finish: bool = True, steps: int = STEPS) -> None:
    """A 2-block model with LoRA on q_proj and v_proj, AdamW on random data, tracked every
    step (factors every 5). ``finish=False`` closes the file without the end of the run (as
    a kill leaves it: no settling curve)."""
    torch.manual_seed(0)
    model = _Net()
    inject(model, ["q_proj", "v_proj"], r=R, alpha=8)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora" in n], lr=2e-2)
    X, Y = torch.randn(64, D), torch.randn(64, D)
    tracker = Tracker(path, every=1, amplify_every=5, factors_every=FACTORS_EVERY)
    for step in range(1, steps + 1):
        loss = ((model(X) - Y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        tracker.step(model, step, loss=loss.item())
    if finish:
        tracker.close(model, steps)
    else:
        tracker._writer.close()  # the file as a killed process leaves it


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dyn") / "tracking.h5"
    _train(path)
    return path


@pytest.fixture(scope="module")
def cut_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dyn_cut") / "tracking.h5"
    _train(path, finish=False, steps=13)
    return path


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _no_nan(text: str):
    def bad(c):
        raise AssertionError(f"{c} in JSON")

    return json.loads(text, parse_constant=bad)


def _dense(path):
    """Per module, from the stored factors with numpy alone: σ and the top-k right singular
    vectors of ΔW = s·B A at every stored step."""
    out = {}
    with h5py.File(path, "r") as f:
        modules = json.loads(f.attrs["modules"])
        fsteps = [int(s) for s in f["factor_steps"][:]]
        for m, meta in enumerate(modules):
            g = f["factors"][f"{m:03d}"]
            per = []
            for t in range(len(fsteps)):
                A = np.asarray(g["A"][t], dtype=np.float64)  # (k, d_in)
                B = np.asarray(g["B"][t], dtype=np.float64)  # (d_out, k)
                _, S, Vt = np.linalg.svd(meta["scale"] * B @ A)  # (d_out, d_in)
                k = meta["rank"]
                per.append((S[:k], Vt[:k].T))  # (k,), (d_in, k)
            out[meta["name"]] = per
    return fsteps, out


def _settled_dense(bases, threshold):
    """The settling rule on dense φ: the first stored snapshot from which φ(k, k) of the top-k
    right singular vectors to the final ones, ‖V_tᵀ V_f‖_F² / k, stays >= threshold."""
    Vf = bases[-1][1]
    phi = [float(np.sum((V.T @ Vf) ** 2) / V.shape[1]) for _, V in bases]
    first = len(phi) - 1
    for t in range(len(phi) - 1, -1, -1):
        if phi[t] < threshold:
            break
        first = t
    return first, phi


def _table_rows(text: str) -> dict[str, list[str]]:
    """The per-module rows of a rich table, cells stripped, by module name."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0] in NAMES:
            rows[cells[0]] = cells
    return rows


def _header(text: str) -> list[str]:
    for line in text.splitlines():
        if "┃ module" in line:
            return [c.strip() for c in line.split("┃")[1:-1]]
    raise AssertionError(text)


# ----------------------------------------------------------------------------- table


def test_table_names_every_module_and_its_settling_step(run_file):
    res = _run(["dynamics", run_file])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert f"{STEPS} snapshots at steps 1–{STEPS} (every 1)" in out
    assert "run completed" in out and "cut off" not in out
    rows = _table_rows(out)
    assert sorted(rows) == sorted(NAMES)
    cols = _header(out)
    fsteps, dense = _dense(run_file)
    assert fsteps == list(range(FACTORS_EVERY, STEPS + 1, FACTORS_EVERY))
    results = {d.module: d for d in dynamics(read_run(run_file))}
    for name, cells in rows.items():
        row = dict(zip(cols, cells, strict=True))
        layer, kind = int(name.split(".")[1]), name.split(".")[2][0]
        assert row["layer"] == str(layer) and row["kind"] == kind and row["r"] == str(R)
        t, _ = _settled_dense(dense[name], 0.9)
        expect = str(fsteps[t]) + (" (final)" if t == len(fsteps) - 1 else "")
        assert row["settled at"] == expect
        d = results[name]
        assert d.settled_step == fsteps[t]
        # k@90 % path: first and last recorded values at its ends
        k90 = [x for x in d.k90 if x is not None]
        assert row["k@90 %"].split("→")[0] == str(k90[0])
        assert row["k@90 %"].split("→")[-1] == str(k90[-1])
        # ‖ΔW‖_F of the last snapshot: the dense σ of the final stored factors
        fro = float(np.sqrt(np.sum(dense[name][-1][0] ** 2)))
        assert float(row["‖ΔW‖_F"]) == pytest.approx(fro, rel=1e-3)
    for line in (x for d in results.values() for x in d.advice()):
        assert line in out


def test_threshold_changes_the_settling_step_as_dense_phi_says(run_file):
    fsteps, dense = _dense(run_file)
    name = NAMES[0]
    _, phi = _settled_dense(dense[name], 0.9)
    # a threshold just above the smallest φ before the final: settled later than at a
    # threshold below it (unless every φ is already >= both)
    lo = min(phi[:-1])
    for thr in (max(lo - 0.01, 1e-3), min(lo + 0.01, 1.0)):
        res = _run(["dynamics", run_file, "--threshold", thr, "--module", name])
        assert res.exit_code == 0, res.output
        row = dict(zip(_header(res.stdout), _table_rows(res.stdout)[name], strict=True))
        t, _ = _settled_dense(dense[name], thr)
        assert row["settled at"].split()[0] == str(fsteps[t])


def test_layer_and_module_select(run_file):
    res = _run(["dynamics", run_file, "--layer", 1])
    assert sorted(_table_rows(res.stdout)) == ["layers.1.q_proj", "layers.1.v_proj"]
    assert "2 of 4 modules" in res.stdout
    res = _run(["dynamics", run_file, "--module", "v"])
    assert sorted(_table_rows(res.stdout)) == ["layers.0.v_proj", "layers.1.v_proj"]
    res = _run(["dynamics", run_file, "--module", "layers.0.q_proj", "--json"])
    assert [o["module"] for o in _no_nan(res.stdout)] == ["layers.0.q_proj"]


# ----------------------------------------------------------------------------- json / csv


def test_json_is_dynamics_and_matches_dense_svd(run_file):
    res = _run(["dynamics", run_file, "--json"])
    assert res.exit_code == 0, res.output
    objs = _no_nan(res.stdout)
    expect = [json.loads(json.dumps(d.to_dict())) for d in dynamics(read_run(run_file))]
    assert objs == expect
    fsteps, dense = _dense(run_file)
    for o in objs:
        assert o["steps"] == list(range(1, STEPS + 1))
        assert o["factor_steps"] == fsteps
        for t, step in enumerate(fsteps):
            S = dense[o["module"]][t][0]
            got = np.array(o["singular_values"][step - 1])
            np.testing.assert_allclose(got, S, rtol=0, atol=1e-10 * S[0])
        t, phi = _settled_dense(dense[o["module"]], 0.9)
        np.testing.assert_allclose(o["phi_to_final"], phi, atol=1e-10)
        assert o["settled_step"] == fsteps[t]
        assert o["phi_prev"][0] is None  # the first snapshot has no previous one
    # --k and --threshold reach dynamics()
    objs = _no_nan(_run(["dynamics", run_file, "--json", "--k", 1, "--threshold", 0.5]).stdout)
    assert {o["i"] for o in objs} == {1} and {o["threshold"] for o in objs} == {0.5}
    for o in objs:
        V = [V for _, V in dense[o["module"]]]
        phi1 = [float((v[:, 0] @ V[-1][:, 0]) ** 2) for v in V]
        np.testing.assert_allclose(o["phi_to_final"], phi1, atol=1e-10)


def test_csv_is_one_row_per_module_and_step(run_file):
    res = _run(["dynamics", run_file, "--csv"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert len(rows) == len(NAMES) * STEPS
    assert [f"sigma_{t}" for t in range(1, R + 1)] == [c for c in rows[0] if c.startswith("sigma")]
    fsteps, dense = _dense(run_file)
    run = read_run(run_file)
    by = {(r["module"], int(r["step"])): r for r in rows}
    assert len(by) == len(rows)
    for name in NAMES:
        for t, step in enumerate(fsteps):
            r = by[(name, step)]
            assert r["factors_stored"] == "True"
            S = dense[name][t][0]
            got = np.array([float(r[f"sigma_{i}"]) for i in range(1, R + 1)])
            np.testing.assert_allclose(got, S, rtol=0, atol=1e-10 * S[0])
            assert float(r["fro"]) == pytest.approx(float(np.sqrt(np.sum(S**2))), rel=1e-12)
        for step in set(range(1, STEPS + 1)) - set(fsteps):
            r = by[(name, step)]
            assert r["factors_stored"] == "False" and r["phi_to_final"] == ""
        assert by[(name, 1)]["phi_prev"] == ""  # not measured -> empty, never "nan"
        assert float(by[(name, 3)]["loss"]) == pytest.approx(float(run.loss[2]))
    assert "nan" not in res.stdout.lower()


# ----------------------------------------------------------------------------- plots


def test_plot_writes_the_figures(run_file, tmp_path):
    out = tmp_path / "figs"
    res = _run(["dynamics", run_file, "--plot", out])
    assert res.exit_code == 0, res.output
    names = {"sigma", "k90", "settling_heatmap", "settling"}
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"dynamics_{n}.{e}" for n in names for e in ("png", "pdf"))
    for p in out.glob("*.png"):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert str(out / "dynamics_sigma.png") in res.stdout
    # --plot with --json keeps stdout pure JSON
    res = _run(["dynamics", run_file, "--plot", tmp_path / "figs2", "--json"])
    assert len(_no_nan(res.stdout)) == len(NAMES)
    assert len(list((tmp_path / "figs2").glob("*.png"))) == 4


def test_plots_skip_values_not_measured(run_file, tmp_path):
    """None (not measured) anywhere in the trajectories must not break a figure."""
    from lorascope.tracking.plots import save_dynamics_figures

    results = dynamics(read_run(run_file))
    d = results[0]
    d.singular_values[3] = [None] * R
    d.k90[2] = d.k50[2] = d.k99[2] = None
    d.phi_to_final[0] = None
    results[1].settled_step = None
    results[2].singular_values = [[None] * R for _ in d.steps]  # ΔW = 0 throughout
    paths = save_dynamics_figures(results, tmp_path / "x", formats=("png",))
    assert len(paths) == 4 and all(p.stat().st_size > 5000 for p in paths)


def test_sigma_panels_are_capped_at_evenly_spaced_layers(run_file):
    from dataclasses import replace

    from lorascope.tracking.plots import MAX_LAYERS, k90_figure, settling_heatmap, sigma_figure

    base = dynamics(read_run(run_file))[:2]  # layer 0: q and v
    many = [replace(d, layer=layer) for layer in range(13) for d in base]
    fig = sigma_figure(many)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    layers = sorted({int(t.split()[0][1:]) for t in titles})
    assert len(titles) == 2 * MAX_LAYERS and layers[0] == 0 and layers[-1] == 12
    assert f"{MAX_LAYERS} of 13 layers" in fig.get_suptitle()
    heat = settling_heatmap(many)  # every module is a row
    assert heat.axes[0].images[0].get_array().shape == (26, len(base[0].factor_steps))
    assert [ax.get_title() for ax in k90_figure(many).axes[:2]] == [
        "q (13 modules)",
        "v (13 modules)",
    ]


# ----------------------------------------------------------------------------- cut-off run


def test_a_cut_off_run_is_read_and_said_so(cut_file, tmp_path):
    run = read_run(cut_file)
    assert run.phi_final is None and len(run) == 13
    res = _run(["dynamics", cut_file])
    assert res.exit_code == 0, res.output
    assert "cut off (or still running) after step 13" in res.stdout
    assert "last stored factors (step 10)" in res.stdout
    fsteps, dense = _dense(cut_file)
    assert fsteps == [5, 10]
    rows = _table_rows(res.stdout)
    for name in NAMES:
        t, _ = _settled_dense(dense[name], 0.9)
        assert rows[name][_header(res.stdout).index("settled at")].split()[0] == str(fsteps[t])
    objs = _no_nan(_run(["dynamics", cut_file, "--json"]).stdout)
    assert all(len(o["steps"]) == 13 for o in objs)
    res = _run(["dynamics", cut_file, "--plot", tmp_path / "f"])
    assert res.exit_code == 0 and len(list((tmp_path / "f").glob("*.png"))) == 4


# ----------------------------------------------------------------------------- bad input


def _assert_one_line_error(res, *fragments):
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    for f in fragments:
        assert str(f) in lines[0], lines[0]


def test_bad_inputs_exit_2_with_one_line(run_file, tmp_path):
    missing = tmp_path / "nope.h5"
    _assert_one_line_error(_run(["dynamics", missing]), missing)
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5\n")
    _assert_one_line_error(_run(["dynamics", text]), text)
    results = tmp_path / "results.h5"  # an HDF5 file, but lorascope's results, not a run
    with h5py.File(results, "w") as f:
        f.create_dataset("spectrum/sigma", data=np.ones(3))
    _assert_one_line_error(_run(["dynamics", results]), results, "not a lorascope tracking")
    empty = tmp_path / "empty.h5"
    meta = {"name": "layers.0.q_proj", "layer": 0, "kind": "q", "d_out": D, "d_in": D, "rank": R}
    RunWriter(empty, [meta], [np.float32], {"every": 1}).close()
    _assert_one_line_error(_run(["dynamics", empty]), empty, "no snapshot")
    _assert_one_line_error(_run(["dynamics", run_file, "--layer", 7]), run_file, "layer 7")
    _assert_one_line_error(_run(["dynamics", run_file, "--module", "down"]), run_file, "'down'")
    _assert_one_line_error(_run(["dynamics", run_file, "--json", "--csv"]), "exclusive")
    _assert_one_line_error(_run(["dynamics", run_file, "--threshold", 0]), "threshold")
    not_dir = tmp_path / "file.txt"
    not_dir.write_text("x")
    _assert_one_line_error(_run(["dynamics", run_file, "--plot", not_dir]), not_dir)
    assert math.isfinite(read_run(run_file).steps.sum())  # the source file is untouched
    shutil.copy(run_file, tmp_path / "copy.h5")
    assert _run(["dynamics", tmp_path / "copy.h5"]).exit_code == 0


def test_a_truncated_copy_exits_2_with_one_line(run_file, tmp_path):
    """A copy cut off half-way (a partial download or copy). Run in a subprocess with a time
    limit: HDF5's SWMR reader retries a metadata read that fails its checksum with a back-off
    that can last an hour, so a hang must fail this test rather than stall the suite."""
    cut = tmp_path / "truncated.h5"
    data = run_file.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    try:
        res = subprocess.run(
            [sys.executable, "-m", "lorascope", "dynamics", str(cut)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"lorascope dynamics {cut} still reading after 60 s (SWMR read retries)")
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(cut) in lines[0], res.stderr
