"""The shared subspace of a collection (lorascope.collection.shared) against dense numpy
eigendecompositions, brute-force leave-one-out, and the closed-form random expectations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lorascope.adapter import LoraModule
from lorascope.collection.shared import shared_basis, shared_subspace
from lorascope.errors import LoraScopeError, ShapeError


def _module(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0, name: str = "m") -> LoraModule:
    return LoraModule(name=name, A=A, B=B, scale=scale, layer=0, kind="q", source=name)


def _random(n: int, d_out: int, d_in: int, r: int, seed: int, shared: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    mods = []
    for i in range(n):
        A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
        if shared is not None:  # plant a common input direction in every adapter
            A[0] = 20.0 * shared
        B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
        mods.append(_module(A, B, scale=0.5 + i, name=f"a{i}"))
    return mods


def _dense(mods, side="right", normalize=True):
    """Σ c_i² ΔW_iᵀ ΔW_i (or ΔW_i ΔW_iᵀ), formed densely in numpy."""
    M = 0
    for m in mods:
        D = m.scale * (m.B.numpy() @ m.A.numpy())
        c = 1.0 / np.linalg.norm(D) if normalize else 1.0
        D = c * D
        M = M + (D.T @ D if side == "right" else D @ D.T)
    return M


def _phi_sub(P, Q):
    """φ between two equal-dimension subspaces: ‖PᵀQ‖² / k."""
    return float(np.linalg.norm(P.T @ Q) ** 2 / P.shape[1])


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("n", [3, 12])  # Σk = 12 <= d = 20, and Σk = 48 > d: both QR routes
def test_shared_basis_equals_dense_eigendecomposition(side, n):
    mods = _random(n, 24, 20, 4, seed=n)
    res = shared_subspace(mods, side=side, draws=1, k=2)
    M = _dense(mods, side)
    w, Q = np.linalg.eigh(M)
    w, Q = w[::-1], Q[:, ::-1]
    K = len(res.energy)
    np.testing.assert_allclose(res.energy, np.cumsum(w[:K]) / w.sum(), rtol=1e-10, atol=1e-12)
    P = res.basis.numpy()
    for k in (1, 3):  # eigen-gaps of random matrices: the top-k subspaces agree
        assert _phi_sub(P[:, :k], Q[:, :k]) == pytest.approx(1.0, abs=1e-9)
    assert res.dim == (20 if side == "right" else 24)


def test_shared_basis_routes_agree():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(10, 30, generator=g, dtype=torch.float64)  # m > d
    P, S = shared_basis(X)
    U, s, _ = np.linalg.svd(X.numpy(), full_matrices=False)
    np.testing.assert_allclose(S.numpy(), s, rtol=1e-12)
    _, S2 = shared_basis(X[:, :8])  # m <= d
    np.testing.assert_allclose(S2.numpy(), np.linalg.svd(X[:, :8].numpy(), compute_uv=False))
    assert _phi_sub(P.numpy()[:, :3], U[:, :3]) == pytest.approx(1.0, abs=1e-10)


# Σk = 12, 18 <= d = 18 (QR route), 24 > d (Gram route); the mean update: factored (Σr = 12 <=
# min(d_out, d_in) = 16) or dense (18, 24)
@pytest.mark.parametrize("n", [4, 6, 8])
def test_leave_one_out_equals_brute_force_and_mean_baseline_equals_dense(n):
    mods = _random(n, 16, 18, 3, seed=4)
    k = 2
    res = shared_subspace(mods, k=k, draws=1)
    for i in range(len(mods)):
        others = [m for j, m in enumerate(mods) if j != i]
        _, Q = np.linalg.eigh(_dense(others))
        P = Q[:, ::-1][:, :k]
        D = mods[i].scale * (mods[i].B.numpy() @ mods[i].A.numpy())
        err = np.linalg.norm(D - D @ P @ P.T) / np.linalg.norm(D)
        assert res.loo_error[i] == pytest.approx(err, rel=1e-9)
    # the mean update's top directions, and the share of the collection they capture
    Ds = [m.scale * (m.B.numpy() @ m.A.numpy()) for m in mods]
    Ds = [D / np.linalg.norm(D) for D in Ds]
    _, _, Vt = np.linalg.svd(np.mean(Ds, axis=0))
    cap = [sum(np.linalg.norm(D @ Vt[:j].T) ** 2 for D in Ds) / len(Ds) for j in (1, 2, 3)]
    np.testing.assert_allclose(res.nulls["mean"][:3], cap, rtol=1e-9)
    # φ of each adapter's top-r_i input directions to the shared top-k
    _, Q = np.linalg.eigh(_dense(mods))
    Pk = Q[:, ::-1][:, :k]
    for i, D in enumerate(Ds):
        V = np.linalg.svd(D)[2][:3].T
        assert res.phi[i] == pytest.approx(np.linalg.norm(V.T @ Pk) ** 2 / min(3, k), rel=1e-9)
    assert res.phi_random == [max(3, k) / 18] * n
    assert res.loo_random == pytest.approx(math.sqrt(1 - k / 18))


def test_unrelated_adapters_match_the_spectra_null_and_the_closed_forms():
    """Independent random adapters: the collection's E(k) sits on its spectra null, the mean
    φ to the shared subspace of the *others* is max(r, k)/d, and the mean kept energy of an
    adapter in the others' subspace is k/d (Haar invariance)."""
    d, r, k, n = 40, 2, 4, 30
    mods = _random(n, 30, d, r, seed=11)
    res = shared_subspace(mods, k=k, draws=20, seed=1)
    E, N = np.array(res.energy), np.array(res.nulls["spectra"])
    assert np.max(np.abs(E - N)) < 0.05
    kept = 1 - np.square(res.loo_error)
    se = kept.std(ddof=1) / math.sqrt(n)
    assert abs(kept.mean() - k / d) < 4 * se + 1e-3


def test_a_planted_shared_direction_beats_every_null():
    d = 30
    g = torch.Generator().manual_seed(3)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    u /= u.norm()
    mods = _random(10, 25, d, 3, seed=5, shared=u)
    res = shared_subspace(mods, k=1, draws=10)
    assert res.energy[0] > res.nulls["spectra"][0] + 0.3
    P1 = res.basis[:, 0].numpy()
    assert abs(P1 @ u.numpy()) > 0.99
    assert max(res.phi) <= 1.0 and min(res.phi) > 3 * max(res.phi_random)
    # the planted direction is also the mean update's top input direction
    assert res.nulls["mean"][0] == pytest.approx(res.energy[0], rel=0.05)


def test_layers_null_and_errors():
    mods = _random(4, 12, 10, 2, seed=1)
    same = shared_subspace(mods, others={0: mods, 1: mods}, draws=3)
    np.testing.assert_allclose(same.nulls["layers"], same.energy, rtol=1e-12)  # identical layers
    other = _random(4, 12, 10, 2, seed=2)
    res = shared_subspace(mods, others={0: mods, 1: other}, draws=3)
    assert res.nulls["layers"] is not None and len(res.nulls["layers"]) == len(res.energy)
    with pytest.raises(ShapeError):
        shared_subspace([*mods[:2], _random(1, 12, 11, 2, seed=0)[0]])
    with pytest.raises(LoraScopeError):
        shared_subspace(mods[:1])
    with pytest.raises(LoraScopeError):
        shared_subspace(mods, k=11)
    d = res.to_dict()
    assert "basis" not in d and d["n"] == 4


def test_dask_tsqr_route_equals_local():
    pytest.importorskip("dask.array")
    distributed = pytest.importorskip("distributed")
    mods = _random(12, 16, 10, 3, seed=8)  # Σk = 36 > d = 10: the tall-skinny route
    local = shared_subspace(mods, draws=1, k=2)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:  # fmt: skip
        with distributed.Client(cluster):
            remote = shared_subspace(mods, draws=1, k=2, dask=True)
    np.testing.assert_allclose(remote.energy, local.energy, rtol=1e-12)
    P, Q = remote.basis.numpy(), local.basis.numpy()
    assert _phi_sub(P[:, :3], Q[:, :3]) == pytest.approx(1.0, abs=1e-10)
