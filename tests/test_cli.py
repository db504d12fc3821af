"""The command line: each command, its three output forms, and bad input -> one line, exit 2."""

import csv
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lorascope.analysis import module_amplification, similarity, spectrum, weight_similarity
from lorascope.cli import main
from lorascope.formats import load_adapter

D = 96  # d_model of the synthetic adapters
LAYERS = range(46, 50)


def _write_adapter(path, r, seed, zero_b=False):
    """A plain safetensors adapter with q and v on layers 46..49 (names as Llama/PEFT)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in LAYERS:
        for p in ("q", "v"):
            name = f"model.layers.{i}.self_attn.{p}_proj"
            tensors[f"{name}.lora_A.weight"] = torch.randn(r, D, generator=g)
            B = torch.randn(D, r, generator=g)
            tensors[f"{name}.lora_B.weight"] = torch.zeros_like(B) if zero_b else B
    save_file(tensors, str(path))
    return path


@pytest.fixture
def adapters(tmp_path):
    return (
        _write_adapter(tmp_path / "a_r8.safetensors", 8, 0),
        _write_adapter(tmp_path / "a_r64.safetensors", 64, 1),
    )


def _run(args, cwd=None):
    runner = CliRunner()
    if cwd is not None:
        old = os.getcwd()
        os.chdir(cwd)
    try:
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        if cwd is not None:
            os.chdir(old)


def test_similarity_as_in_the_readme(adapters, tmp_path):
    res = _run(["similarity", "a_r8.safetensors", "a_r64.safetensors", "--layer", "48"], tmp_path)
    assert res.exit_code == 0, res.output
    assert "model.layers.48.self_attn.q_proj" in res.output
    assert "model.layers.48.self_attn.v_proj" in res.output
    assert "model.layers.47" not in res.output


def test_similarity_json_equals_library(adapters):
    a, b = adapters
    res = _run(["similarity", a, b, "--layer", "48", "--module", "q", "--max-j", "16", "--json"])
    assert res.exit_code == 0, res.output
    (obj,) = json.loads(res.stdout)
    assert {"module", "layer", "kind", "rank", "phi"} <= obj.keys()
    assert (obj["module"], obj["layer"], obj["kind"], obj["rank"]) == (
        "model.layers.48.self_attn.q_proj",
        48,
        "q",
        8,
    )
    (ref,) = similarity(load_adapter(a), load_adapter(b), layer=48, module="q", max_j=16)
    np.testing.assert_allclose(np.array(obj["phi"]), ref.phi, rtol=1e-12)
    assert np.array(obj["phi"]).shape == (8, 16)


def test_similarity_csv_and_plot(adapters, tmp_path):
    a, b = adapters
    png = tmp_path / "phi.png"
    res = _run(
        [
            "similarity",
            a,
            b,
            "--module",
            "v",
            "--factor",
            "right",
            "--max-i",
            "4",
            "--max-j",
            "8",
            "--csv",
            "--plot",
            png,
        ]
    )
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert len(rows) == len(LAYERS) * 4 * 8
    assert all(0.0 <= float(r["phi"]) <= 1.0 for r in rows)
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_amplify_as_in_the_readme(tmp_path):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 30, generator=g)
    torch.save(W, tmp_path / "w.pt")
    A, B = torch.randn(4, 30, generator=g), torch.randn(40, 4, generator=g)
    torch.save({"lora_A": A, "lora_B": B}, tmp_path / "adapter.pt")
    res = _run(["amplify", "--base", "w.pt", "--delta", "adapter.pt"], tmp_path)
    assert res.exit_code == 0, res.output
    assert "amplification" in res.output
    res = _run(["amplify", "--base", "w.pt", "--delta", "adapter.pt", "--json"], tmp_path)
    (obj,) = json.loads(res.stdout)
    (mod,) = load_adapter(tmp_path / "adapter.pt").modules
    ref = module_amplification(mod, W)
    assert obj["amplification"] == pytest.approx(ref.amplification, rel=1e-12)
    assert obj["rank"] == 4 and obj["proj_delta"] == pytest.approx(ref.proj_delta)


def test_weight_similarity_json_equals_library(tmp_path):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(40, 30, generator=g)
    torch.save(W, tmp_path / "w.pt")
    torch.save(
        {"lora_A": torch.randn(4, 30, generator=g), "lora_B": torch.randn(40, 4, generator=g)},
        tmp_path / "d.pt",
    )
    res = _run(
        [
            "weight-similarity",
            "--base",
            tmp_path / "w.pt",
            "--delta",
            tmp_path / "d.pt",
            "--max-i",
            "12",
            "--side",
            "left",
            "--json",
            "--plot",
            tmp_path / "f8.pdf",
        ]
    )
    assert res.exit_code == 0, res.output
    (obj,) = json.loads(res.stdout)
    (mod,) = load_adapter(tmp_path / "d.pt").modules
    ref = weight_similarity(mod, W, side="left", max_i=12)
    np.testing.assert_allclose(np.array(obj["phi"]), ref.phi, rtol=1e-12)
    assert (obj["rank"], obj["module_b"], np.array(obj["phi"]).shape) == (4, "W", (12, 4))
    assert (tmp_path / "f8.pdf").read_bytes()[:4] == b"%PDF"


def test_spectrum_and_inspect(adapters):
    a, _ = adapters
    res = _run(["spectrum", a, "--json"])
    objs = json.loads(res.stdout)
    ref = spectrum(load_adapter(a))
    assert [o["module"] for o in objs] == [r.module for r in ref]
    np.testing.assert_allclose(objs[0]["singular_values"], ref[0].singular_values)
    res = _run(["spectrum", a, "--csv", "--layer", "46"])
    assert len(list(csv.DictReader(io.StringIO(res.stdout)))) == 2 * 8
    res = _run(["inspect", a])
    assert res.exit_code == 0 and "model.layers.49.self_attn.v_proj" in res.output
    objs = json.loads(_run(["inspect", a, "--json"]).stdout)
    assert len(objs) == 8 and objs[0]["shape"] == [D, D]


def test_python_dash_m_runs_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "lorascope", "--help"], capture_output=True, text=True, check=True
    )
    assert "similarity" in out.stdout and "amplify" in out.stdout


def _assert_one_line_error(res, *fragments):
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    err = [x for x in lines if not x.startswith("warning: ")]
    assert len(err) == 1 and err[0].startswith("error: ") and lines[-1] == err[0], res.stderr
    assert "Traceback" not in res.output
    for f in fragments:
        assert f in err[0], err[0]


def test_bad_inputs_exit_2_with_one_line(adapters, tmp_path):
    a, b = adapters
    # a layer that does not exist
    _assert_one_line_error(_run(["similarity", a, b, "--layer", "3"]), "layer 3", "a_r8")
    # a missing file
    _assert_one_line_error(_run(["spectrum", tmp_path / "nope.safetensors"]), "nope.safetensors")
    # truncated file
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(a.read_bytes()[:300])
    _assert_one_line_error(_run(["inspect", trunc]), "trunc.safetensors")
    # empty file
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    _assert_one_line_error(_run(["inspect", empty]), "empty.pt")
    # all-zero update
    zero = _write_adapter(tmp_path / "zero.safetensors", 4, 2, zero_b=True)
    res = _run(["spectrum", zero])
    _assert_one_line_error(res, "zero.safetensors", "lora_B")
    assert "nan" not in res.output.lower()
    # a directory with no adapter
    (tmp_path / "emptydir").mkdir()
    _assert_one_line_error(_run(["inspect", tmp_path / "emptydir"]), "emptydir")


def test_nan_factor(tmp_path):
    A, B = torch.randn(2, 8), torch.randn(8, 2)
    A[1, 3] = float("nan")
    save_file({"m.lora_A.weight": A, "m.lora_B.weight": B}, str(tmp_path / "nan.safetensors"))
    _assert_one_line_error(
        _run(["spectrum", tmp_path / "nan.safetensors"]), "nan.safetensors", "m.lora_A.weight"
    )


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "adapter.pt"
    with open(path, "wb") as f:
        pickle.dump({"x.lora_A": _Evil(marker)}, f)
    torch.save({"x.lora_A": torch.zeros(1), "evil": _Evil(marker)}, tmp_path / "evil2.pt")
    _assert_one_line_error(_run(["inspect", path]), "adapter.pt")
    _assert_one_line_error(_run(["inspect", tmp_path / "evil2.pt"]), "evil2.pt")
    _assert_one_line_error(
        _run(["amplify", "--base", tmp_path / "evil2.pt", "--delta", tmp_path / "evil2.pt"]),
        "evil2.pt",
    )
    assert not marker.exists()


def test_amplify_shape_mismatch(tmp_path):
    torch.save(torch.randn(10, 7), tmp_path / "w.pt")
    torch.save({"lora_A": torch.randn(2, 30), "lora_B": torch.randn(40, 2)}, tmp_path / "d.pt")
    _assert_one_line_error(
        _run(["amplify", "--base", tmp_path / "w.pt", "--delta", tmp_path / "d.pt"]), "w.pt"
    )


def test_single_tensor_base_is_not_reused_for_another_module(adapters, tmp_path):
    a, _ = adapters
    torch.save(torch.randn(D, D), tmp_path / "w.pt")
    res = _run(["amplify", "--base", tmp_path / "w.pt", "--delta", a, "--layer", "47"])
    _assert_one_line_error(res, "w.pt", "holds one tensor")
    res = _run(
        [
            "amplify",
            "--base",
            tmp_path / "w.pt",
            "--delta",
            a,
            "--layer",
            "47",
            "--module",
            "v",
            "--json",
        ]
    )
    assert res.exit_code == 0 and len(json.loads(res.stdout)) == 1
