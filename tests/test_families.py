"""The family kernels (lorascope.families) and the update rules (lorascope.update) against dense
products computed independently here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorascope.adapter import LoraModule, Magnitude
from lorascope.analysis import amplify, spectrum
from lorascope.families import (
    face_split,
    full_as_factors,
    hadamard_factors,
    khatri_rao,
    kron_factors,
    tucker_factors,
)
from lorascope.linalg import factored_svdvals
from lorascope.update import delta_weight, dora_gain, full_update_svdvals, merged_weight, with_base

g = torch.Generator().manual_seed(0)


def rnd(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_face_split_and_khatri_rao_entries():
    P1, P2 = rnd(5, 2), rnd(5, 3)
    F = face_split(P1, P2)  # (5, 6)
    for i in range(5):
        assert torch.equal(F[i], torch.kron(P1[i], P2[i]))
    Q1, Q2 = rnd(2, 4), rnd(3, 4)
    K = khatri_rao(Q1, Q2)  # (6, 4)
    for j in range(4):
        assert torch.equal(K[:, j], torch.kron(Q1[:, j], Q2[:, j]))


def test_hadamard_of_low_rank_products_is_exact():
    w1a, w1b, w2a, w2b = rnd(7, 3), rnd(3, 9), rnd(7, 2), rnd(2, 9)
    B, A = hadamard_factors(w1a, w1b, w2a, w2b)
    assert B.shape == (7, 6) and A.shape == (6, 9)
    dense = (w1a @ w1b) * (w2a @ w2b)
    torch.testing.assert_close(B @ A, dense, rtol=1e-13, atol=1e-13)
    # the rank bound r1·r2 is reached for generic factors
    assert np.linalg.matrix_rank(dense.numpy()) == 6


@pytest.mark.parametrize("full1, full2", [(True, False), (False, True), (True, True)])
def test_kron_of_factored_or_full_matrices_is_exact(full1, full2):
    W1 = rnd(4, 3) if full1 else rnd(4, 2) @ rnd(2, 3)
    W2 = rnd(5, 6) if full2 else rnd(5, 2) @ rnd(2, 6)
    P1, Q1 = full_as_factors(W1) if full1 else (None, None)
    P2, Q2 = full_as_factors(W2) if full2 else (None, None)
    if not full1:
        U, S, Vh = torch.linalg.svd(W1)
        P1, Q1 = U[:, :2] * S[:2], Vh[:2]
    if not full2:
        U, S, Vh = torch.linalg.svd(W2)
        P2, Q2 = U[:, :2] * S[:2], Vh[:2]
    B, A = kron_factors(P1, Q1, P2, Q2)
    torch.testing.assert_close(B @ A, torch.kron(W1, W2), rtol=1e-12, atol=1e-12)
    # singular values of a Kronecker product are the products of the factors'
    s = factored_svdvals(A, B, 1.0)
    prod = torch.sort(torch.outer(torch.linalg.svdvals(W1), torch.linalg.svdvals(W2)).flatten())
    expect = prod.values.flip(0)[: s.numel()]
    torch.testing.assert_close(s, expect, rtol=1e-10, atol=1e-12)


def test_kron_conv_layout_matches_torch_kron_of_4d_kernels():
    W1 = rnd(2, 3)
    W2 = rnd(4, 5, 3, 3)  # (c, d, kh, kw)
    dense = torch.kron(W1[:, :, None, None], W2)  # (2·4, 3·5, 3, 3), as LyCORIS' make_kron
    P1, Q1 = full_as_factors(W1)
    P2, Q2 = full_as_factors(W2.reshape(4, -1))
    B, A = kron_factors(P1, Q1, P2, Q2)
    torch.testing.assert_close(B @ A, dense.reshape(8, -1), rtol=1e-12, atol=1e-12)


def test_tucker_factors_match_the_einsum():
    core, down, up = rnd(3, 2, 3, 3), rnd(2, 5), rnd(3, 4)
    dense = torch.einsum("ij...,jr,ip->pr...", core, down, up)  # LyCORIS rebuild_tucker
    P, Q = tucker_factors(core, down, up)
    torch.testing.assert_close(P @ Q, dense.reshape(4, -1), rtol=1e-12, atol=1e-12)


def _dora_module(axis: str, d_out=6, d_in=8, r=2, scale=0.5) -> LoraModule:
    A, B = rnd(r, d_in), rnd(d_out, r)
    m = rnd(d_out if axis == "out" else d_in).abs() + 0.5
    return LoraModule(
        "layers.0.q_proj",
        A,
        B,
        scale,
        family="dora",
        magnitude=Magnitude(m, axis, "m"),
        update="dora-direction",
        layer=0,
        kind="q",
    )


@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora_merge_and_rank_r_part(axis):
    mod = _dora_module(axis)
    W = rnd(*mod.shape).float()
    V = W.double() + mod.scale * (mod.B @ mod.A)
    norm = V.norm(dim=1 if axis == "out" else 0)
    gain = mod.magnitude.m / norm
    merged = gain[:, None] * V if axis == "out" else V * gain[None, :]
    torch.testing.assert_close(dora_gain(mod, W), gain, rtol=1e-12, atol=0)
    torch.testing.assert_close(merged_weight(mod, W, dtype=torch.float64), merged)
    torch.testing.assert_close(delta_weight(mod, W), merged - W.double())
    rr = with_base(mod, W)
    assert rr.update == "dora-rank-r"
    part = (gain[:, None] if axis == "out" else 1) * mod.scale * (mod.B @ mod.A)
    if axis == "in":
        part = mod.scale * (mod.B @ mod.A) * gain[None, :]
    torch.testing.assert_close(rr.delta(), part, rtol=1e-12, atol=1e-12)
    # the whole update's spectrum through the operator equals a dense SVD of W' − W
    S, fro = full_update_svdvals(mod, W, 3)
    dense = np.linalg.svd((merged - W.double()).numpy(), compute_uv=False)
    np.testing.assert_allclose(S, dense[:3], rtol=1e-10)
    assert fro == pytest.approx(float(np.sqrt((dense**2).sum())), rel=1e-12)


def test_dora_full_update_by_arpack_on_a_larger_weight():
    mod = _dora_module("out", d_out=120, d_in=90, r=4)
    W = rnd(120, 90)
    S, _ = full_update_svdvals(mod, W, 4)
    dense = np.linalg.svd(delta_weight(mod, W).numpy(), compute_uv=False)
    np.testing.assert_allclose(S, dense[:4], rtol=1e-9)


def test_dora_grouped_input_magnitude_is_per_channel():
    # a conv weight (out=3, in=2, 2×2) flattened to (3, 8): one magnitude per input channel
    A, B = rnd(2, 8), rnd(3, 2)
    mag = rnd(2).abs() + 0.5
    mod = LoraModule("conv", A, B, 1.0, magnitude=Magnitude(mag, "in", "dora_scale"))
    W = rnd(3, 8)
    V = (W + B @ A).reshape(3, 2, 4)
    norm = V.square().sum(dim=(0, 2)).sqrt()  # (2,): over out and kernel, per input channel
    expect = (V * (mag / norm)[None, :, None]).reshape(3, 8)
    torch.testing.assert_close(merged_weight(mod, W), expect)


def test_analyses_without_and_with_base_name_the_update():
    mod = _dora_module("out", d_out=16, d_in=12, r=2)
    from lorascope.adapter import Adapter

    ad = Adapter([mod], "x", "plain")
    (sp,) = spectrum(ad)
    assert sp.update == "dora-direction" and sp.family == "dora"
    np.testing.assert_allclose(
        sp.singular_values,
        np.linalg.svd((mod.scale * mod.B @ mod.A).numpy(), compute_uv=False)[:2],
        rtol=1e-12,
    )
    W = rnd(16, 12)

    class Base:
        def weight_for(self, m):
            return W

    (res,) = amplify(ad, Base())
    assert res.update == "dora-rank-r"
    true = delta_weight(mod, W).numpy()
    assert res.full_norm_delta == pytest.approx(float(np.linalg.norm(true)), rel=1e-12)
    np.testing.assert_allclose(
        res.full_singular_values, np.linalg.svd(true, compute_uv=False)[:2], rtol=1e-10
    )
    part = with_base(mod, W).delta().numpy()
    assert res.norm_delta == pytest.approx(float(np.linalg.norm(part)), rel=1e-12)


def test_intruders_of_dora_compare_the_merged_weight_with_w():
    """Intruders of a DoRA module: the top singular vectors of W' = diag(g)(W + s·B A) (not of
    W + s·B A) against all of W's, by a dense numpy SVD of both."""
    from lorascope.analysis import module_intruders

    mod = _dora_module("out", d_out=20, d_in=16, r=3, scale=2.0)
    W = rnd(20, 16)
    res = module_intruders(mod, W, k=5, epsilon=[0.3, 0.9])
    assert res.update == "dora-rank-r" and res.family == "dora"
    Wt = merged_weight(mod, W, dtype=torch.float64).numpy()
    Y = np.linalg.svd(Wt)[0][:, :5]
    X = np.linalg.svd(W.numpy())[0][:, :16]
    best = np.abs(Y.T @ X).max(axis=1)
    np.testing.assert_allclose(res.max_similarity, best, atol=1e-10)
    plain = W.numpy() + mod.scale * (mod.B @ mod.A).numpy()  # what ignoring g would compare
    Yp = np.linalg.svd(plain)[0][:, :5]
    assert not np.allclose(np.abs(Yp.T @ X).max(axis=1), best, atol=1e-6)
