"""The §7 analyses over modules and adapters, against dense numpy/scipy references."""

import doctest
import importlib
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

from lorascope.adapter import Adapter, LoraModule, parse_kind, parse_layer
from lorascope.analysis import (
    amplify,
    module_amplification,
    module_similarity,
    module_spectrum,
    similarity,
    spectrum,
    weight_similarity,
)
from lorascope.errors import MissingModuleError, ShapeError, ZeroUpdateError


def _module(d_out=48, d_in=40, r=6, scale=0.5, seed=0, name="model.layers.3.self_attn.q_proj"):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, d_in, generator=g)
    B = torch.randn(d_out, r, generator=g)
    return LoraModule(
        name,
        A,
        B,
        scale,
        layer=parse_layer(name),
        kind=parse_kind(name),
        source="mem.pt",
        keys=(f"{name}.lora_A", f"{name}.lora_B"),
    )


def _dense_svd(m: LoraModule):
    return np.linalg.svd(m.delta().numpy())


@pytest.mark.parametrize(
    "name",
    [
        "lorascope.linalg",
        "lorascope.columns",
        "lorascope.analysis.compare",
        "lorascope.analysis.intruders",
        "lorascope.analysis.rank",
    ],
)
def test_doctests(name):
    # by module name: `lorascope.analysis.compare` etc. are shadowed by the functions of that name
    importlib.import_module(name)
    res = doctest.testmod(sys.modules[name])
    assert res.attempted > 0 and res.failed == 0


@pytest.mark.parametrize(
    ("name", "layer", "kind"),
    [
        ("encoder.layer.5.attention.self.query", 5, "q"),
        ("encoder.layer.5.attention.self.value", 5, "v"),
        ("encoder.layer.0.attention.output.dense", 0, "o"),
        ("encoder.layer.2.intermediate.dense", 2, "up"),
        ("encoder.layer.2.output.dense", 2, "down"),
        ("transformer.h.11.attn.c_attn", 11, "qkv"),
        ("transformer.h.11.attn.c_proj", 11, "o"),
        ("transformer.h.1.mlp.c_fc", 1, "up"),
        ("transformer.h.1.mlp.c_proj", 1, "down"),
        ("model.layers.31.self_attn.k_proj", 31, "k"),
        ("model.layers.31.self_attn.o_proj", 31, "o"),
        ("model.layers.7.mlp.gate_proj", 7, "gate"),
        ("model.layers.7.mlp.down_proj", 7, "down"),
        ("lora_te_text_model_encoder_layers_4_self_attn_v_proj", 4, "v"),
        ("model.embed_tokens", None, "embed"),
    ],
)
def test_names_to_layer_and_kind(name, layer, kind):
    assert parse_layer(name) == layer
    assert parse_kind(name) == kind


def test_spectrum_against_dense():
    m = _module()
    res = module_spectrum(m)
    sv = np.linalg.svd(m.delta().numpy(), compute_uv=False)[: m.rank]
    np.testing.assert_allclose(res.singular_values, sv, rtol=1e-10)
    np.testing.assert_allclose(res.energy, np.cumsum(sv**2) / np.sum(sv**2), rtol=1e-10)
    p = sv / sv.sum()
    assert res.effective_rank == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-10)
    assert res.stable_rank == pytest.approx((sv**2).sum() / sv[0] ** 2, rel=1e-10)
    assert res.frobenius_norm == pytest.approx(np.linalg.norm(m.delta().numpy()), rel=1e-10)
    assert res.numerical_rank == m.rank
    assert res.to_dict()["module"] == m.name


def test_spectrum_rank_one_and_zero_update():
    m = _module(r=1)
    res = module_spectrum(m)
    assert res.effective_rank == pytest.approx(1.0) and res.stable_rank == pytest.approx(1.0)
    z = LoraModule(
        "h.0.attn.c_attn",
        m.A,
        torch.zeros_like(m.B),
        1.0,
        source="zero.safetensors",
        keys=("h.0.lora_A", "h.0.lora_B"),
    )
    with pytest.raises(
        ZeroUpdateError, match=r"zero\.safetensors: h\.0\.lora_A / h\.0\.lora_B"
    ) as e:
        module_spectrum(z)
    assert "\n" not in str(e.value)


def _right_basis(M):
    return np.linalg.svd(M, full_matrices=False)[2].T


def test_similarity_matches_principal_angles_on_A():
    a, b = _module(r=4, seed=1), _module(r=8, seed=2)
    # make b share two of a's input directions, so φ is well above the random level
    b.A[:2] = a.A[:2] * 3.0
    res = module_similarity(a, b, "A")
    Ua, Ub = _right_basis(a.A.double().numpy()), _right_basis(b.A.double().numpy())
    assert res.phi.shape == (4, 8)
    for i in range(1, 5):
        for j in range(1, 9):
            theta = scipy.linalg.subspace_angles(Ua[:, :i], Ub[:, :j])
            assert res.phi[i - 1, j - 1] == pytest.approx(np.mean(np.cos(theta) ** 2), abs=1e-10)
    assert res.phi[-1, -1] > 0.45  # the shared 2 of 4 directions
    assert res.random_phi.shape == (4, 8)
    np.testing.assert_allclose(
        res.expected_random, np.maximum.outer(np.arange(1, 5), np.arange(1, 9)) / a.d_in
    )


@pytest.mark.parametrize("factor", ["right", "left"])
def test_similarity_of_delta_directions_matches_dense(factor):
    a, b = _module(r=5, seed=3), _module(r=7, seed=4)
    ua, _, vha = _dense_svd(a)
    ub, _, vhb = _dense_svd(b)
    Xa, Xb = (vha[:5].T, vhb[:7].T) if factor == "right" else (ua[:, :5], ub[:, :7])
    res = module_similarity(a, b, factor, max_i=3, max_j=6)
    assert res.phi.shape == (3, 6)
    theta = scipy.linalg.subspace_angles(Xa[:, :3], Xb[:, :6])
    assert res.phi[2, 5] == pytest.approx(np.mean(np.cos(theta) ** 2), abs=1e-10)


def test_similarity_invariances():
    a, b = _module(r=6, seed=5), _module(r=6, seed=6)
    g = torch.Generator().manual_seed(9)
    G = torch.randn(6, 6, generator=g, dtype=torch.float64) + 3 * torch.eye(6, dtype=torch.float64)
    a2 = LoraModule(a.name, torch.linalg.solve(G, a.A.double()), a.B.double() @ G, a.scale)
    a3 = LoraModule(a.name, a.A.double() * 10.0, a.B, a.scale * 7.0)  # rescaled
    for factor in ("right", "left"):
        ref = module_similarity(a, b, factor).phi
        np.testing.assert_allclose(module_similarity(a2, b, factor).phi, ref, atol=1e-10)
        np.testing.assert_allclose(module_similarity(a3, b, factor).phi, ref, atol=1e-10)
    # A's own directions: invariant to rescaling, and at i = r to any invertible G
    ref = module_similarity(a, b, "A").phi
    np.testing.assert_allclose(module_similarity(a3, b, "A").phi, ref, atol=1e-10)
    np.testing.assert_allclose(module_similarity(a2, b, "A").phi[-1], ref[-1], atol=1e-10)


def test_similarity_self_is_one_and_orthogonal_is_zero():
    a = _module(r=4, seed=7)
    np.testing.assert_allclose(np.diag(module_similarity(a, a, "A").phi), 1.0, atol=1e-12)
    # b's row space orthogonal to a's
    Q = torch.linalg.qr(torch.randn(40, 8, dtype=torch.float64))[0]
    a = LoraModule("x", Q[:, :4].T.clone(), torch.randn(48, 4, dtype=torch.float64), 1.0)
    b = LoraModule("x", Q[:, 4:].T.clone(), torch.randn(48, 4, dtype=torch.float64), 1.0)
    assert np.abs(module_similarity(a, b, "A").phi).max() < 1e-12


def test_similarity_over_adapters_pairs_and_selects():
    names = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(3) for p in "qv"]
    a = Adapter([_module(r=2, seed=i, name=n) for i, n in enumerate(names)], "a.pt", "plain")
    b = Adapter([_module(r=8, seed=10 + i, name=n) for i, n in enumerate(names)], "b.pt", "plain")
    res = similarity(a, b)
    assert [r.module for r in res] == names
    res = similarity(a, b, layer=1, module="v")
    assert [r.module for r in res] == ["model.layers.1.self_attn.v_proj"]
    assert res[0].phi.shape == (2, 8)
    with pytest.raises(MissingModuleError, match="layer 9"):
        similarity(a, b, layer=9)
    other = Adapter([_module(r=2, name="x.layers.1.self_attn.v_proj")], "c.pt", "plain")
    assert len(similarity(other, b)) == 1  # matched by (layer, kind)
    small = Adapter([_module(d_in=12, name=names[0])], "d.pt", "plain")
    with pytest.raises(ShapeError, match="cannot compare"):
        similarity(small, b)


def test_fused_projection_split():
    m = _module(d_out=3 * 16, d_in=16, r=4, name="transformer.h.2.attn.c_attn")
    assert m.kind == "qkv"
    ad = Adapter([m], "gpt2.safetensors", "peft")
    (q,) = ad.select(module="q")
    (v,) = ad.select(layer=2, module="v")
    assert (q.part, q.rows, v.rows) == ("q", (0, 16), (32, 48))
    torch.testing.assert_close(v.delta(), m.delta()[32:48])
    assert q.key == "transformer.h.2.attn.c_attn[q]"


class _Base:
    def __init__(self, weights):
        self.weights = weights

    def weight_for(self, m):
        return self.weights[m.key]


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("method", ["exact", "iterative"])
def test_amplification_against_dense(wdtype, method):
    # W as stored in fp32/fp16 is never copied to float64 whole (issue 5); the products are
    # float32 GEMMs by default (W's values are exact in float32): ‖UᵀWV‖ to 1e-6; float64
    # products, asked for, match numpy on the same values to ~1e-13
    m = _module(d_out=30, d_in=20, r=3, scale=2.0)
    W = torch.randn(30, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    res = module_amplification(m, W.to(wdtype), method=method)
    u, _, vh = _dense_svd(m)
    Wn = W.to(wdtype).double().numpy()
    proj = np.linalg.norm(u[:, :3].T @ Wn @ vh[:3].T)
    assert res.proj_delta == pytest.approx(proj, rel=1e-6)
    exact = module_amplification(m, W.to(wdtype), method=method, products=torch.float64)
    assert exact.proj_delta == pytest.approx(proj, rel=1e-12)
    assert exact.amplification == pytest.approx(exact.norm_delta / proj, rel=1e-12)
    assert res.norm_delta == pytest.approx(np.linalg.norm(m.delta().numpy()), rel=1e-10)
    assert res.norm_weight == pytest.approx(np.linalg.norm(Wn), rel=1e-10)
    sw = np.linalg.svd(Wn, compute_uv=False)
    assert res.proj_weight == pytest.approx(np.sqrt((sw[:3] ** 2).sum()), rel=1e-10)
    assert res.amplification == pytest.approx(res.norm_delta / proj, rel=1e-6)
    assert res.random_expected == pytest.approx(3 * np.linalg.norm(Wn) / np.sqrt(600))
    out = amplify(Adapter([m], "a.pt", "plain"), _Base({m.key: W.to(wdtype)}), method=method)
    assert out[0].to_dict()["amplification"] == pytest.approx(res.amplification)


def test_amplification_closed_form():
    # W = Q diag(σ) Pᵀ and ΔW = c·q_k p_kᵀ along W's weakest direction: ‖UᵀWV‖ = σ_k and the
    # amplification factor is c / σ_k.
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.standard_normal((12, 12)))[0]
    P = np.linalg.qr(rng.standard_normal((10, 10)))[0]
    sig = np.linspace(5.0, 0.5, 10)
    W = torch.from_numpy(Q[:, :10] @ np.diag(sig) @ P.T)
    c = 3.0
    m = LoraModule("w", torch.from_numpy(P[:, -1:].T.copy()), torch.from_numpy(Q[:, 9:10]), c)
    res = module_amplification(m, W)
    assert res.proj_delta == pytest.approx(0.5, rel=1e-12)
    assert res.amplification == pytest.approx(c / 0.5, rel=1e-12)
    assert res.proj_weight == pytest.approx(5.0, rel=1e-12)


def test_weight_similarity_against_dense():
    m = _module(d_out=30, d_in=25, r=4)
    W = torch.randn(30, 25, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    W = W + 4 * m.delta()  # W shares ΔW's directions, so φ is large
    res = weight_similarity(m, W, side="right", max_i=10)
    assert res.phi.shape == (10, 4)
    vw = np.linalg.svd(W.numpy())[2][:10].T
    vd = _dense_svd(m)[2][:4].T
    theta = scipy.linalg.subspace_angles(vw, vd)
    assert res.phi[-1, -1] == pytest.approx(np.mean(np.cos(theta) ** 2), abs=1e-10)
    assert res.phi[-1, -1] > res.random_phi[-1, -1]
    left = weight_similarity(m, W, side="left", max_i=10, max_j=2)
    uw, ud = np.linalg.svd(W.numpy())[0][:, :10], _dense_svd(m)[0][:, :2]
    theta = scipy.linalg.subspace_angles(uw, ud)
    assert left.phi[-1, -1] == pytest.approx(np.mean(np.cos(theta) ** 2), abs=1e-10)


def test_spectrum_over_adapter_selects():
    names = [f"encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]
    ad = Adapter([_module(name=n, seed=i) for i, n in enumerate(names)], "a.h5", "hdf5")
    assert [r.module for r in spectrum(ad, module="q")] == names[0::2]
    assert len(spectrum(ad, layer=1)) == 2


def test_batched_svds_equal_per_module_ones_and_batch(monkeypatch):
    """The CUDA route (equal-shaped modules stacked into one factorization) run on the CPU:
    spectra, similarity on ΔW's own directions and amplification equal the per-module route,
    with one factored_svd call per shape group instead of one per module."""
    import lorascope.analysis._common as common

    g = torch.Generator().manual_seed(11)

    def mods(r):
        out = []
        for layer in range(4):
            for kind, d_out in (("q", 12), ("v", 9)):
                A = torch.randn(r, 10, generator=g, dtype=torch.float32)
                B = torch.randn(d_out, r, generator=g, dtype=torch.float32)
                scale = -0.5 if layer == 1 else 2.0 / r  # a negative scale too
                out.append(LoraModule(f"h.{layer}.{kind}", A, B, scale, layer=layer, kind=kind))
        return Adapter(out, f"r{r}.pt", "plain")

    a, b = mods(3), mods(5)
    calls = []
    real = common.factored_svd
    monkeypatch.setattr(
        common, "factored_svd", lambda *x, **k: calls.append(x[0].shape) or real(*x, **k)
    )
    values = []
    real_vals = common.factored_svdvals
    monkeypatch.setattr(
        common, "factored_svdvals", lambda *x, **k: values.append(1) or real_vals(*x, **k)
    )
    per = spectrum(a, batch=False)
    assert len(calls) == 0 and len(values) == 8  # the unbatched spectrum: values per module
    bat = spectrum(a, batch=True)
    assert [c[0] for c in calls] == [4, 4]  # two shape groups (q, v) of four layers
    assert len(values) == 8  # ... and nothing more per module
    for x, y in zip(per, bat, strict=True):
        np.testing.assert_allclose(y.singular_values, x.singular_values, rtol=1e-12)
    for factor in ("right", "left"):
        calls.clear()
        per = similarity(a, b, factor=factor, batch=False)
        n_per = len(calls)
        calls.clear()
        bat = similarity(a, b, factor=factor, batch=True)
        assert n_per == 16 and len(calls) == 4
        for x, y in zip(per, bat, strict=True):
            np.testing.assert_allclose(y.phi, x.phi, rtol=1e-10, atol=1e-12)
    weights = {m.key: torch.randn(*m.shape, generator=g).half() for m in a.modules}
    per = amplify(a, _Base(weights), batch=False)
    bat = amplify(a, _Base(weights), batch=True)
    for x, y in zip(per, bat, strict=True):
        assert y.proj_delta == pytest.approx(x.proj_delta, rel=1e-10)
        assert y.amplification == pytest.approx(x.amplification, rel=1e-10)
