"""`lorascope shared` end to end on PEFT adapter files: its JSON equals the library on the
same modules, the energy curve equals a dense eigendecomposition, bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lorascope.cli import main
from lorascope.formats import write_peft_adapter

D_IN, D_OUT, R = 24, 16, 3


def _name(layer: int, kind: str) -> str:
    return f"model.layers.{layer}.self_attn.{kind}_proj"


def _write(path, seed: int, layers=(0, 1, 2), shared: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for la in layers:
        for kind in ("q", "v"):
            A = torch.randn(R, D_IN, generator=g)
            if shared is not None and la == 1 and kind == "q":
                A[0] += 15 * shared
            tensors[f"{_name(la, kind)}.lora_A.weight"] = A
            tensors[f"{_name(la, kind)}.lora_B.weight"] = torch.randn(D_OUT, R, generator=g)
    write_peft_adapter(tensors, {"r": R, "lora_alpha": 2 * R}, path)
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    u = torch.randn(D_IN, generator=torch.Generator().manual_seed(99))
    return [_write(root / f"a{i}", i, shared=u / u.norm()) for i in range(5)]


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_shared_json_equals_dense_and_beats_its_nulls(zoo):
    res = _run("shared", *zoo, "--layer", 1, "--module", "q", "--json", "--draws", 3)
    assert res.exit_code == 0, res.output
    (d,) = json.loads(res.stdout)
    assert d["n"] == 5 and d["dim"] == D_IN and d["layer"] == 1 and d["kind"] == "q"
    from safetensors.torch import load_file

    M = 0
    for p in zoo:
        t = load_file(p / "adapter_model.safetensors")
        key = f"base_model.model.{_name(1, 'q')}"
        dW = 2.0 * (t[f"{key}.lora_B.weight"].double() @ t[f"{key}.lora_A.weight"].double())
        dW = dW / torch.linalg.matrix_norm(dW)
        M = M + (dW.T @ dW).numpy()
    w = np.linalg.eigvalsh(M)[::-1]
    np.testing.assert_allclose(d["energy"], (np.cumsum(w) / w.sum())[: len(d["energy"])],
                               rtol=1e-10)  # fmt: skip
    assert d["energy"][0] > d["nulls"]["spectra"][0] + 0.1  # the planted direction
    assert d["energy"][0] > d["nulls"]["layers"][0]
    assert all(x is not None for x in d["loo_error"]) and "NaN" not in res.stdout
    table = _run("shared", *zoo, "--layer", 1, "--module", "q")
    assert table.exit_code == 0 and "share of energy in top-k" in table.stdout
    csv_out = _run("shared", *zoo, "--layer", 1, "--module", "q", "--csv").stdout.splitlines()
    assert csv_out[0].startswith("k,E(k)") and len(csv_out) > 2


def test_shared_plot_and_errors(zoo, tmp_path):
    png = tmp_path / "shared.png"
    res = _run("shared", *zoo, "--layer", 0, "--module", "v", "--plot", png)
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for args, frag in (
        ((zoo[0], "--layer", 0, "--module", "q"), "at least two"),
        ((*zoo[:2], "--layer", 7, "--module", "q"), "layer 7"),
        ((*zoo[:2], "--layer", 0, "--module", "q", "--k", 99), "k must be"),
        ((zoo[0], tmp_path / "nope", "--layer", 0, "--module", "q"), "nope"),
    ):
        res = _run("shared", *args)
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and frag in lines[0], lines


def test_shared_on_a_dask_scheduler_equals_local(zoo):
    distributed = pytest.importorskip("distributed")
    # every adapter twice: 30 directions > d = 24, so the tall-skinny (tsqr) route runs
    args = ("shared", *zoo, *zoo, "--layer", 2, "--module", "v", "--json", "--draws", 2)
    local = json.loads(_run(*args).stdout)[0]
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:  # fmt: skip
        res = _run(*args, "--scheduler", cluster.scheduler_address)
    assert res.exit_code == 0, res.output
    remote = json.loads(res.stdout)[0]
    np.testing.assert_allclose(remote["energy"], local["energy"], rtol=1e-12)
    assert remote["loo_error"] == pytest.approx(local["loo_error"], rel=1e-12)


def _dense_V(path, k):
    """Top-k right singular vectors of every module's ΔW, from the file, by numpy."""
    from safetensors.torch import load_file

    t = load_file(path / "adapter_model.safetensors")
    out = {}
    for key in t:
        if key.endswith("lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            dW = 2.0 * (t[key.replace("lora_A", "lora_B")].double() @ t[key].double()).numpy()
            out[name] = np.linalg.svd(dW)[2][:k].T
    return out


def test_neighbors_outliers_and_shared_from_a_scanned_db(zoo, tmp_path):
    from lorascope.collection import scan

    db = tmp_path / "zoo.db"
    scan(zoo, db, workers=1, top_k=2)
    res = _run("neighbors", zoo[0], "--db", db, "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert len(got) == len(zoo) - 1
    q = _dense_V(zoo[0], 2)
    for n in got:
        c = _dense_V(type(zoo[0])(n["path"]), 2)
        phis = [np.linalg.norm(q[m].T @ c[m]) ** 2 / 2 for m in q]
        assert n["mean_phi"] == pytest.approx(np.mean(phis), abs=1e-6)  # V stored as float32
        assert n["modules"] == len(q) and n["phi_random"] == pytest.approx(2 / D_IN)
    assert [n["mean_phi"] for n in got] == sorted((n["mean_phi"] for n in got), reverse=True)
    table = _run("neighbors", zoo[0], "--db", db)
    assert table.exit_code == 0 and "nearest to" in table.stdout
    out = _run("outliers", "--db", db, "--json")
    assert out.exit_code == 0, out.output
    scores = json.loads(out.stdout)
    assert len(scores) == len(zoo) and all(s["max_abs_z"] >= 0 for s in scores)
    via_db = json.loads(_run("shared", "--db", db, "--layer", 1, "--module", "q", "--json").stdout)
    direct = json.loads(_run("shared", *zoo, "--layer", 1, "--module", "q", "--json").stdout)
    np.testing.assert_allclose(via_db[0]["energy"], direct[0]["energy"], rtol=1e-12)
    bad = _run("neighbors", tmp_path / "elsewhere", "--db", db)
    assert bad.exit_code == 2 and "not in" in bad.stderr and "Traceback" not in bad.output
