"""The fast paths of the kernels (issue 5) against the plain routes they replace."""

from dataclasses import replace

import numpy as np
import pytest
import scipy.stats
import torch

from lorascope.adapter import Adapter, LoraModule
from lorascope.analysis import similarity, spectrum
from lorascope.analysis._common import module_svd, module_svdvals
from lorascope.errors import ZeroUpdateError
from lorascope.linalg import (
    expected_random_similarity,
    factored_svd,
    factored_svdvals,
    random_orthonormal,
    random_similarity,
    singular_basis,
    subspace_similarity,
)


def _factors(d_out, d_in, r, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(r, d_in, generator=g) / d_in**0.5).to(dtype)
    B = torch.randn(d_out, r, generator=g).to(dtype)
    return A, B


@pytest.mark.parametrize(("d_out", "d_in", "r"), [(300, 200, 8), (64, 96, 64), (6, 10, 8)])
def test_factored_svdvals_equals_factored_svd_and_dense(d_out, d_in, r):
    A, B = _factors(d_out, d_in, r)
    S = factored_svdvals(A, B, -0.5)
    np.testing.assert_allclose(S.numpy(), factored_svd(A, B, -0.5).S.numpy(), rtol=1e-12)
    dense = np.linalg.svd(-0.5 * (B.double().numpy() @ A.double().numpy()), compute_uv=False)
    np.testing.assert_allclose(S.numpy(), dense[: S.numel()], rtol=1e-10, atol=1e-13 * dense[0])


def test_factored_svdvals_batched_equals_per_module():
    pairs = [_factors(128, 96, 8, seed=s) for s in range(4)]
    A = torch.stack([a for a, _ in pairs])  # (4, r, d_in)
    B = torch.stack([b for _, b in pairs])  # (4, d_out, r)
    batched = factored_svdvals(A, B, 2.0)
    for k, (a, b) in enumerate(pairs):
        torch.testing.assert_close(batched[k], factored_svdvals(a, b, 2.0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(8, 500), (500, 8), (7, 7)])
def test_singular_basis_wide_and_tall_match_dense(shape):
    g = torch.Generator().manual_seed(1)
    M = torch.randn(*shape, generator=g)
    U, _, Vh = np.linalg.svd(M.double().numpy(), full_matrices=False)
    for side, ref in (("right", Vh.T), ("left", U)):
        X = singular_basis(M, side).numpy()
        # each vector equals the dense one up to sign, and the sign is the deterministic one
        np.testing.assert_allclose(np.abs(np.sum(X * ref, 0)), 1, atol=1e-10)
    Ub = singular_basis(M, "left").numpy()
    assert np.all(Ub[np.abs(Ub).argmax(0), np.arange(Ub.shape[1])] > 0)


def test_module_svdvals_checks_like_module_svd():
    A, B = _factors(40, 30, 4)
    m = LoraModule(name="h.0.q", A=A, B=B, scale=0.25)
    torch.testing.assert_close(module_svdvals(m, device="cpu"), module_svd(m).S, rtol=1e-12, atol=0)
    zero = LoraModule(name="h.0.q", A=A, B=torch.zeros_like(B), scale=0.25)
    with pytest.raises(ZeroUpdateError):
        module_svdvals(zero)


def test_random_similarity_cholesky_route_is_the_qr_route():
    """The algebra behind the O(j³) draw: for one Gaussian G, G[:i] R⁻¹ (R = chol(GᵀG)) is the
    first i rows of the sign-fixed QR factor of G, whose φ grid against e_1..e_i is the one
    random_orthonormal/subspace_similarity give."""
    g = torch.Generator().manual_seed(2)
    n, i, j = 60, 5, 9
    G = torch.randn(n, j, generator=g, dtype=torch.float64)
    R = torch.linalg.cholesky(G.mT @ G, upper=True)
    M = torch.linalg.solve_triangular(R, G[:i], upper=True, left=False)
    Q, Rq = torch.linalg.qr(G)
    Q = Q * torch.sign(torch.diagonal(Rq))
    torch.testing.assert_close(M, Q[:i], rtol=0, atol=1e-12)
    E = torch.eye(n, dtype=torch.float64)[:, :i]
    C = (M * M).cumsum(0).cumsum(1) / torch.minimum(
        torch.arange(1, i + 1)[:, None], torch.arange(1, j + 1)[None, :]
    )
    torch.testing.assert_close(C, subspace_similarity(E, Q), rtol=0, atol=1e-12)


def test_random_similarity_has_the_law_of_random_bases():
    g = torch.Generator().manual_seed(3)
    n, i, j, N = 30, 3, 6, 4000
    fast = np.stack([random_similarity(n, i, j, g).numpy() for _ in range(N)])
    slow = np.stack(
        [
            subspace_similarity(random_orthonormal(n, i, g), random_orthonormal(n, j, g)).numpy()
            for _ in range(N)
        ]
    )
    assert fast.shape == (N, i, j) and fast.min() >= 0 and fast.max() <= 1
    z = (fast.mean(0) - expected_random_similarity(n, i, j)) / (fast.std(0) / np.sqrt(N))
    assert np.abs(z).max() < 4.5  # E[φ] = max(i, j)/n, cell by cell
    for a, b in ((0, 0), (2, 5), (1, 3)):  # and the same distribution as drawing both bases
        assert scipy.stats.ks_2samp(fast[:, a, b], slow[:, a, b]).pvalue > 1e-3


def test_random_similarity_small_n_falls_back_and_is_seeded():
    phi = random_similarity(5, 3, 4, torch.Generator().manual_seed(4))  # i + j > n
    g = torch.Generator().manual_seed(4)
    U, V = random_orthonormal(5, 3, g), random_orthonormal(5, 4, g)
    torch.testing.assert_close(phi, subspace_similarity(U, V), rtol=0, atol=0)
    a = random_similarity(100, 4, 8, torch.Generator().manual_seed(7), device="cpu")
    b = random_similarity(100, 4, 8, torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _adapter(n_layers, r, seed):
    g = torch.Generator().manual_seed(seed)
    mods = [
        LoraModule(
            name=f"layers.{layer}.{p}_proj",
            A=torch.randn(r, 64, generator=g).half(),
            B=torch.randn(48, r, generator=g).half(),
            scale=2.0,
            layer=layer,
            kind=p,
        )
        for layer in range(n_layers)
        for p in ("q", "v")
    ]
    return Adapter(modules=mods, path=f"mem{seed}", format="plain")


def test_cuda_route_forced_on_cpu_tensors_matches_the_cpu_route(monkeypatch):
    """What a CUDA ``device=`` changes, forced on CPU tensors: equal-shaped modules go through
    batched SVDs (``batch=True``, the CUDA default), modules run in a plain loop (what
    ``map_modules`` does off the CPU, and with one thread), factors move with ``.to(device)``.
    The route must be taken (one 3-D factorization per shape group, none per module; none at
    all by default on the CPU) and give the CPU route's numbers, a negative scale included."""
    import lorascope.analysis._common as common

    a, b = _adapter(3, 4, 0), _adapter(3, 16, 1)
    b.modules[1] = replace(b.modules[1], scale=-0.5)  # its sign moves into V when batched
    ndims = []
    real = common.factored_svd
    monkeypatch.setattr(
        common, "factored_svd", lambda A, *x, **k: ndims.append(A.ndim) or real(A, *x, **k)
    )
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    for factor in ("A", "B", "right", "left"):
        plain = similarity(a, b, factor=factor)
        ndims.clear()
        assert len(similarity(a, b, factor=factor, device="cpu")) == 6
        assert 3 not in ndims  # the CPU default never batches
        ndims.clear()
        cuda = similarity(a, b, factor=factor, device="cpu", batch=True)
        if factor in ("right", "left"):
            assert ndims == [3, 3]  # one per shape group: r = 4 and r = 16 (q, v alike)
        assert len(plain) == len(cuda) == 6
        for x, y in zip(plain, cuda, strict=True):
            assert x.module == y.module
            np.testing.assert_allclose(y.phi, x.phi, rtol=0, atol=1e-12)
            np.testing.assert_array_equal(y.random_phi, x.random_phi)
    ndims.clear()
    cuda = spectrum(b, device="cpu", batch=True)
    assert ndims == [3]  # all six modules of b in one stack
    for x, y in zip(spectrum(b), cuda, strict=True):
        np.testing.assert_allclose(y.singular_values, x.singular_values, rtol=1e-12)


@pytest.mark.parametrize("factor", ["A", "B"])
@pytest.mark.parametrize("rank_deficient", [False, True])
def test_factor_phi_without_bases_equals_the_basis_route(factor, rank_deficient):
    from lorascope.analysis import module_similarity, subspace_basis
    from lorascope.analysis.similarity import _factor_phi

    a, b = _adapter(1, 4, 5).modules[0], _adapter(1, 16, 6).modules[0]
    if rank_deficient:  # cond = inf: the fast route must step aside for the explicit bases
        A = b.A.clone()
        A[3] = A[2]
        B = b.B.clone()
        B[:, 3] = B[:, 2]
        b = LoraModule(name=b.name, A=A, B=B, scale=b.scale, layer=b.layer, kind=b.kind)
    fast = _factor_phi(a, b, factor, 3, 10, dtype=torch.float64, device=None)
    assert (fast is None) == rank_deficient
    ref = subspace_similarity(subspace_basis(a, factor), subspace_basis(b, factor), 3, 10)
    got = module_similarity(a, b, factor, max_i=3, max_j=10).phi
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-12)


def test_map_modules_threads_keep_order_results_and_settings():
    from lorascope.analysis._common import map_modules

    a, b = _adapter(4, 4, 0), _adapter(4, 16, 1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial_sp, serial_sim = spectrum(b), similarity(a, b)
        torch.set_num_threads(2)
        par_sp, par_sim = spectrum(b), similarity(a, b)
        assert torch.get_num_threads() == 2  # restored after the pool
    finally:
        torch.set_num_threads(before)
    assert [r.module for r in par_sp] == [r.module for r in serial_sp]
    for x, y in zip(serial_sp, par_sp, strict=True):
        assert x.singular_values == y.singular_values
    for x, y in zip(serial_sim, par_sim, strict=True):
        np.testing.assert_array_equal(x.phi, y.phi)
        np.testing.assert_array_equal(x.random_phi, y.random_phi)  # seed + index, as before

    def boom(x):
        raise ZeroUpdateError(f"bad {x}")

    torch.set_num_threads(2)
    try:
        with pytest.raises(ZeroUpdateError, match="bad 0"):
            map_modules(boom, [0, 1, 2])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
