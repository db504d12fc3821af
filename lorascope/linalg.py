"""Linear-algebra kernels: tensors in, tensors out. Nothing here knows about files or modules.

The central trick (DESIGN.md): never form ``ΔW = s·B A`` to analyse it. With thin QR
factorizations ``B = Q_b R_b`` and ``Aᵀ = Q_a R_a``,

    ΔW = s · Q_b (R_b R_aᵀ) Q_aᵀ,

so the SVD of the small ``r×r`` core ``R_b R_aᵀ = U_c Σ V_cᵀ`` gives the exact thin SVD
``ΔW = (Q_b U_c)(s Σ)(Q_a V_c)ᵀ`` in ``O((d_out + d_in)·r²)`` instead of the
``O(d_out·d_in·min(d_out, d_in))`` of a dense SVD.

All kernels upcast to ``dtype`` (float64 by default) before any factorization: half-precision
QR/SVD is either unsupported or loses the small singular values the analyses care about.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np
import torch

__all__ = [
    "SVD",
    "factored_svd",
    "factored_svdvals",
    "top_singular",
    "blocked_matmul",
    "frobenius_norm",
    "singular_basis",
    "random_orthonormal",
    "random_similarity",
    "subspace_similarity",
    "phi_from_cross",
    "principal_angles",
    "grassmann_distance",
    "expected_random_similarity",
    "projection_norm",
    "default_rcond",
]


class SVD(NamedTuple):
    """A thin SVD ``M ≈ U diag(S) Vᵀ`` with ``S`` descending.

    ``U`` is ``(m, k)``, ``S`` is ``(k,)``, ``V`` is ``(n, k)`` (note: ``V``, not ``Vᴴ``).
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


def _upcast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # fp16/bf16 -> dtype before any factorization (peft does the same before its SVDs).
    return x.to(dtype) if x.dtype != dtype else x


def balance(X: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``X / c`` in ``dtype`` (default ``X``'s) and ``c`` (float64, ``(..., 1, 1)``), ``c`` the
    power of two nearest below ``max|X|`` per matrix (1 for an all-zero matrix).

    An exact rescaling, computed in ``X``'s own precision before any cast, that keeps the QRs
    and the core SVD of :func:`factored_svd` away from overflow and underflow whatever the
    size of the stored values: a float64 factor of 1e300 or 1e-300 decomposes like one of 1,
    also in float32."""
    dtype = dtype or X.dtype
    Xw = X if X.dtype in (torch.float32, torch.float64) else X.float()  # fp16/bf16/fp8: exact
    top = Xw.abs().amax(dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    _, e = torch.frexp(top)
    one = torch.ones_like(top)
    c = torch.where(top > 0, torch.ldexp(one, e - 1), one)
    return (Xw / c).to(dtype), c.to(torch.float64)


def _fix_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic signs: the largest-magnitude entry of each column of ``U`` is positive.

    The same flip is applied to ``V`` so ``U diag(S) Vᵀ`` is unchanged. Works batched
    (``U`` of shape ``(..., m, k)``).
    """
    # the largest |entry| is positive iff max ≥ −min (a tie, or a zero column, counts as +):
    # two plain reductions instead of abs + argmax + gather (3× faster at 4096 × 16)
    top, bottom = U.amax(dim=-2, keepdim=True), U.amin(dim=-2, keepdim=True)  # (..., 1, k)
    signs = torch.where(top >= -bottom, 1.0, -1.0).to(U.dtype)
    return U * signs, V * signs


def factored_svd(
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float = 1.0,
    *,
    dtype: torch.dtype = torch.float64,
) -> SVD:
    """Exact thin SVD of ``ΔW = scale · B @ A`` without forming ``ΔW``.

    Parameters
    ----------
    A : torch.Tensor
        ``(..., r, d_in)`` down-projection (any float dtype; upcast to ``dtype``).
    B : torch.Tensor
        ``(..., d_out, r)`` up-projection.
    scale : float
        ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA).
    dtype : torch.dtype
        Computation dtype, float64 by default.

    Returns
    -------
    SVD
        ``U (..., d_out, k)``, ``S (..., k)`` descending and ``>= 0``, ``V (..., d_in, k)``
        with ``k = min(r, d_out, d_in)``; signs fixed so the largest entry of each ``U``
        column is positive.

    Notes
    -----
    With ``B = Q_b R_b`` and ``Aᵀ = Q_a R_a`` (thin QR), ``ΔW = s·Q_b (R_b R_aᵀ) Q_aᵀ``; the
    SVD of the ``r×r`` core gives ``ΔW``'s. Cost ``O((d_out + d_in)·r² + r³)`` versus
    ``O(d_out·d_in·min(d_out, d_in))`` for ``numpy.linalg.svd(s·B@A)`` (the peers' route).
    Singular vectors beyond the numerical rank span an arbitrary completion, as in a dense SVD.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[1.0, 0.0, 0.0]])          # (r=1, d_in=3)
    >>> B = torch.tensor([[0.0], [2.0]])             # (d_out=2, r=1)
    >>> factored_svd(A, B, scale=0.5).S              # ΔW = 0.5·B@A has one σ = 0.5·2·1
    tensor([1.], dtype=torch.float64)
    """
    A, ca = balance(A, dtype)  # exact powers of two, (.., 1, 1) float64 each
    B, cb = balance(B, dtype)
    Qb, Rb = torch.linalg.qr(B)  # (.., out, kb), (.., kb, r)
    Qa, Ra = torch.linalg.qr(A.mT)  # (.., in, ka), (.., ka, r)
    core = Rb @ Ra.mT  # (.., kb, r) @ (.., r, ka) -> (.., kb, ka)
    Uc, Sc, Vch = torch.linalg.svd(core, full_matrices=False)  # (.., kb, k), (.., k), (.., k, ka)
    # (Ucᵀ Q_bᵀ)ᵀ: LAPACK's Q is column-major, and this order runs 2-3× faster than Q_b @ U_c
    U = (Uc.mT @ Qb.mT).mT  # ((.., k, kb) @ (.., kb, out))ᵀ -> (.., out, k)
    V = (Vch @ Qa.mT).mT  # ((.., k, ka) @ (.., ka, in))ᵀ -> (.., in, k)
    S = Sc * ((ca * cb).squeeze(-1) * abs(float(scale))).to(Sc.dtype)  # (.., k): inf on overflow
    if scale < 0:  # σ >= 0: move the sign into U
        U = -U
    U, V = _fix_signs(U, V)
    return SVD(U, S, V)


def factored_svdvals(
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float = 1.0,
    *,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Singular values of ``ΔW = scale · B @ A`` only: :func:`factored_svd` without the vectors.

    The same exact route (Householder QR of both factors, SVD of the ``r×r`` core), but only the
    triangular factors are formed (``torch.linalg.qr(mode="r")``): about half the work of
    :func:`factored_svd` at ``d = 12288, r = 64``. Works batched (``A (..., r, d_in)``,
    ``B (..., d_out, r)``). Returns ``S (..., k)`` descending, ``k = min(r, d_out, d_in)``.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[1.0, 0.0, 0.0]])
    >>> B = torch.tensor([[0.0], [2.0]])
    >>> factored_svdvals(A, B, scale=0.5)
    tensor([1.], dtype=torch.float64)
    """
    A, ca = balance(A, dtype)  # exact powers of two, (.., 1, 1) float64 each
    B, cb = balance(B, dtype)
    _, Rb = torch.linalg.qr(B, mode="r")  # (.., kb, r)
    _, Ra = torch.linalg.qr(A.mT, mode="r")  # (.., ka, r)
    core = Rb @ Ra.mT  # (.., kb, r) @ (.., r, ka) -> (.., kb, ka)
    S = torch.linalg.svdvals(core)  # (.., k)
    return S * ((ca * cb).squeeze(-1) * abs(float(scale))).to(S.dtype)


def default_rcond(shape: tuple[int, int], dtype: torch.dtype = torch.float64) -> float:
    """Relative cut-off below which a singular value counts as zero: ``eps(dtype)·max(shape)``.

    The same rule as ``scipy.linalg.orth`` / ``numpy.linalg.matrix_rank``.
    """
    return float(torch.finfo(dtype).eps * max(shape))


def singular_basis(
    M: torch.Tensor, side: Literal["left", "right"], *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Orthonormal singular vectors of a small-rank factor, ordered by singular value.

    ``side="right"`` returns ``V`` (``(n, min(m, n))``), ``"left"`` returns ``U``
    (``(m, min(m, n))``), for ``M`` of shape ``(m, n)``. For a LoRA ``A`` (``r×d_in``) the right
    singular vectors span its row space, the paper's default input to φ (Hu et al. 2021 §7.2).
    """
    M, _ = balance(M, dtype)  # directions only: an exact rescaling keeps them finite
    if M.shape[-2] < M.shape[-1]:
        # LAPACK's SVD of a wide r×d matrix is ~3× slower than of its tall transpose (d = 12288,
        # r = 64: 72 ms vs 25 ms); decompose Mᵀ = V Σ Uᵀ and swap the roles.
        V, _, Uh = torch.linalg.svd(M.mT, full_matrices=False)  # (n, k), (k,), (k, m)
        U = Uh.mT
    else:
        U, _, Vh = torch.linalg.svd(M, full_matrices=False)  # (m, k), (k,), (k, n)
        V = Vh.mT
    U, V = _fix_signs(U, V)
    return V if side == "right" else U


def top_singular(
    W: torch.Tensor,
    k: int,
    *,
    method: Literal["auto", "exact", "iterative"] = "auto",
    exact_max: int = 2048,
    tol: float = 1e-10,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> SVD:
    """Top-``k`` singular triplets of a dense matrix ``W`` (``(m, n)``), any float dtype.

    ``method="exact"`` runs a full ``torch.linalg.svd`` of ``W`` upcast to ``dtype`` (one copy of
    ``W``: asked for) and truncates: ``"auto"`` picks it when ``min(m, n) <= exact_max`` or
    ``k`` is close to ``min(m, n)``. ``"iterative"`` (DESIGN.md: never a full SVD of a large
    ``W``) runs ARPACK's implicitly restarted Lanczos (``scipy.sparse.linalg.svds``) on an
    operator that applies ``W`` and ``Wᵀ`` block by block (:func:`blocked_matmul`), never
    copying ``W``:

    - ``W`` stored in float64 (or ``dtype`` itself): the products run in that precision and
      ARPACK's relative tolerance on the singular values is ``tol``;
    - ``W`` stored in fp16/bf16/fp32: the products run in float32 (fp16 and bf16 values are
      exact in float32, only the sums round), ARPACK stops at ``max(tol, 1e-6)``, and one
      Rayleigh–Ritz step in ``dtype`` follows: ``Y = W Q`` (``Q`` the ARPACK right basis),
      ``Y = U Σ Zᵀ``, ``V = Q Z``. Singular values then carry errors of order ``ε_32² ·
      ‖W‖²/gap`` and the subspaces agree with an exact SVD to ``φ ≈ 1 − 1e-12`` when the
      top-``k`` is separated from the rest.

    Memory beyond ``W``: a few ``(max(m, n), k)`` bases and one block of rows in ``dtype``.

    Returns an :class:`SVD` with ``U (m, k)``, ``S (k,)`` descending, ``V (n, k)``,
    deterministic signs.
    """
    m, n = W.shape
    k = min(k, m, n)
    if method == "auto":
        method = "exact" if min(m, n) <= exact_max or k >= min(m, n) - 1 else "iterative"
    if method == "exact" or k >= min(m, n):
        U, S, Vh = torch.linalg.svd(_upcast(W, dtype), full_matrices=False)
        U, V = _fix_signs(U[:, :k], Vh[:k].mT)
        return SVD(U, S[:k], V)
    from scipy.sparse.linalg import LinearOperator, svds

    # Products in W's own precision (at least float32): no copy of W, and fp16 -> fp32 is exact.
    work = W.dtype if W.dtype in (torch.float32, torch.float64) else torch.float32
    work = dtype if work == torch.float64 else work

    def apply(x: np.ndarray, transpose: bool) -> np.ndarray:
        X = torch.from_numpy(np.ascontiguousarray(x)).to(W.device)
        X = X.reshape(X.shape[0], -1)  # matvec gets (n,) or (n, 1); matmat (n, b)
        Y = blocked_matmul(W, X, transpose=transpose, dtype=work)
        return Y.to(torch.float64).cpu().numpy()

    op = LinearOperator(
        (m, n),
        matvec=lambda x: apply(x, False),
        rmatvec=lambda y: apply(y, True),
        matmat=lambda X: apply(X, False),
        rmatmat=lambda Y: apply(Y, True),
        dtype=np.float64,
    )
    v0 = np.random.default_rng(seed).standard_normal(min(m, n))
    arpack_tol = tol if work == dtype else max(tol, 1e-6)
    u, s, vh = svds(op, k=k, tol=arpack_tol, v0=v0, solver="arpack")
    order = np.argsort(s)[::-1].copy()
    V = torch.from_numpy(vh[order].T.copy()).to(device=W.device, dtype=dtype)  # (n, k)
    if work == dtype:
        U = torch.from_numpy(u[:, order].copy()).to(device=W.device, dtype=dtype)
        S = torch.from_numpy(s[order].copy()).to(device=W.device, dtype=dtype)
    else:  # one Rayleigh–Ritz step in `dtype` on the right subspace ARPACK found
        Q, _ = torch.linalg.qr(V)  # (n, k)
        Y = blocked_matmul(W, Q, dtype=dtype)  # (m, n) @ (n, k) -> (m, k)
        U, S, Zh = torch.linalg.svd(Y, full_matrices=False)  # (m, k), (k,), (k, k)
        V = Q @ Zh.mT  # (n, k)
    U, V = _fix_signs(U, V)
    return SVD(U, S, V)


def blocked_matmul(
    W: torch.Tensor,
    X: torch.Tensor,
    *,
    transpose: bool = False,
    dtype: torch.dtype = torch.float64,
    block_bytes: int = 4 << 20,
) -> torch.Tensor:
    """``W @ X`` (or ``Wᵀ @ X``) in ``dtype`` without a ``dtype`` copy of the whole ``W``.

    Parameters
    ----------
    W : torch.Tensor
        ``(m, n)`` in its stored dtype (fp16, bf16, fp32, ...).
    X : torch.Tensor
        ``(n, b)``, or ``(m, b)`` when ``transpose``.
    dtype :
        Precision of the products; ``W`` is upcast one block of rows at a time (about
        ``block_bytes`` each), so memory beyond ``W`` is one block plus the result. When ``W``
        already has ``dtype`` it is used as is.

    Returns
    -------
    torch.Tensor
        ``(m, b)`` (``(n, b)`` when ``transpose``) in ``dtype``.
    """
    X = X.to(device=W.device, dtype=dtype)
    if W.dtype == dtype:
        return (W.mT if transpose else W) @ X
    m, n = W.shape
    rows = max(1, block_bytes // max(1, n * torch.empty((), dtype=dtype).element_size()))
    if transpose:
        out = torch.zeros(n, X.shape[1], dtype=dtype, device=W.device)
        for i in range(0, m, rows):
            out.addmm_(W[i : i + rows].to(dtype).mT, X[i : i + rows])  # (n, rows) @ (rows, b)
        return out
    out = torch.empty(m, X.shape[1], dtype=dtype, device=W.device)
    for i in range(0, m, rows):
        torch.mm(W[i : i + rows].to(dtype), X, out=out[i : i + rows])  # (rows, n) @ (n, b)
    return out


def safe_norm(t: torch.Tensor) -> float:
    """``‖t‖_F`` (2-norm of all entries) without overflow for any finite entries: computed on
    ``t / c`` with ``c`` the power of two below ``max|t|``, then scaled back; ``inf`` only when
    the norm itself exceeds float64."""
    if t.numel() == 0:
        return 0.0
    x = t.detach().to(torch.float64)
    top = float(x.abs().amax())
    if top == 0.0 or not math.isfinite(top):
        return top
    c = 2.0 ** math.floor(math.log2(top))
    return c * float(torch.linalg.vector_norm(x / c))


def frobenius_norm(W: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> float:
    """``‖W‖_F`` accumulated in ``dtype`` one block of rows at a time (no copy of ``W``)."""
    if W.dtype == dtype:
        return float(torch.linalg.matrix_norm(W))
    rows = max(1, (4 << 20) // max(1, W.shape[1] * 8))
    total = sum(float(W[i : i + rows].to(dtype).square().sum()) for i in range(0, W.shape[0], rows))
    return total**0.5


def random_orthonormal(
    n: int,
    k: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """A Haar-random orthonormal ``(n, k)`` basis: QR of a Gaussian matrix, signs of ``R``'s
    diagonal moved into ``Q``.

    These are the singular directions of a random Gaussian matrix, the paper's baseline in
    Figure 4 and Table 7 (Hu et al. 2021 §7.2–7.3).
    """
    G = torch.randn(n, k, generator=generator, dtype=dtype)
    Q, R = torch.linalg.qr(G)  # (n, k), (k, k)
    return Q * torch.sign(torch.diagonal(R)).unsqueeze(0)


def random_similarity(
    n: int,
    max_i: int,
    max_j: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """φ grid of two independent Haar-random subspaces of ``R^n`` (dims ``max_i``, ``max_j``),
    in ``O(max_j³)`` instead of the ``O(n·(max_i + max_j)²)`` of drawing both bases.

    The same distribution as ``subspace_similarity(random_orthonormal(n, max_i, g),
    random_orthonormal(n, max_j, g))`` (the paper's random baseline, Hu et al. 2021 Figure 4),
    drawn without any ``n``-long vector: by rotation invariance ``UᵀV`` has the law of the first
    ``max_i`` rows of one Haar ``(n, max_j)`` frame ``Q = G R⁻¹`` (``G`` Gaussian, ``R`` the
    Cholesky factor of ``GᵀG``). Split ``G`` into its first rows ``X`` (``(max_i, max_j)``) and
    the rest ``Y``: ``GᵀG = XᵀX + YᵀY`` with ``YᵀY ~ Wishart(n − max_i, I)`` independent of
    ``X``, drawn by Bartlett's decomposition (``L`` lower triangular, ``L_kk² ~ χ²(n − max_i −
    k)``, ``k = 0, 1, …``, ``N(0, 1)`` below the diagonal). Then ``UᵀV ~ X R⁻¹``.

    Needs ``max_i + max_j <= n``; otherwise (tiny ``n``) it falls back to drawing both bases.
    Returns ``(max_i, max_j)`` on ``device`` (the draws are made on the CPU generator).
    """
    if max_i + max_j > n:
        U = random_orthonormal(n, max_i, generator, dtype=dtype)
        V = random_orthonormal(n, max_j, generator, dtype=dtype)
        return subspace_similarity(U, V).to(device)
    i, j = max_i, max_j
    X = torch.randn(i, j, generator=generator, dtype=dtype)  # the first i rows of G
    L = torch.randn(j, j, generator=generator, dtype=dtype).tril_(-1)  # below-diagonal N(0, 1)
    df = (n - i) - torch.arange(j, dtype=dtype)  # χ² degrees of freedom, n - i - k
    chi2 = torch._standard_gamma(df / 2, generator=generator) * 2  # χ²(df) = 2·Gamma(df/2)
    L.diagonal().copy_(chi2.sqrt())
    gram = (X.mT @ X + L @ L.mT).to(device)  # GᵀG, (j, j)
    R = torch.linalg.cholesky(gram, upper=True)  # GᵀG = RᵀR, R upper with a positive diagonal
    M = torch.linalg.solve_triangular(R, X.to(device), upper=True, left=False)  # X R⁻¹, (i, j)
    return phi_from_cross(M)


def subspace_similarity(
    U: torch.Tensor,
    V: torch.Tensor,
    max_i: int | None = None,
    max_j: int | None = None,
) -> torch.Tensor:
    """Normalized subspace similarity for every ``i <= max_i``, ``j <= max_j`` (paper eq. 4).

    .. math:: φ(i, j) = ‖U_{:, :i}ᵀ V_{:, :j}‖_F² / \\min(i, j)  ∈ [0, 1]

    Parameters
    ----------
    U : torch.Tensor
        ``(n, p)`` orthonormal columns, ordered (e.g. by singular value).
    V : torch.Tensor
        ``(n, q)`` orthonormal columns.
    max_i, max_j : int, optional
        Grid size; default and upper limit ``p`` and ``q``.

    Returns
    -------
    torch.Tensor
        ``(max_i, max_j)``; entry ``[i-1, j-1]`` is φ(i, j). Equals ``mean(cos² θ)`` over the
        principal angles θ between the two subspaces (``scipy.linalg.subspace_angles``).

    Notes
    -----
    One product ``M = UᵀV`` and a 2-D cumulative sum of ``M²`` give the whole grid, since
    ``‖U_iᵀ V_j‖_F² = Σ_{a<i, b<j} M[a, b]²`` (Hu et al. 2021 §7.2, Appendix G).

    Examples
    --------
    >>> import torch
    >>> I = torch.eye(4, dtype=torch.float64)
    >>> subspace_similarity(I[:, :2], I[:, :2])      # identical subspaces
    tensor([[1., 1.],
            [1., 1.]], dtype=torch.float64)
    >>> subspace_similarity(I[:, :2], I[:, 2:])      # orthogonal subspaces
    tensor([[0., 0.],
            [0., 0.]], dtype=torch.float64)
    """
    p, q = U.shape[-1], V.shape[-1]
    max_i = p if max_i is None else min(max_i, p)
    max_j = q if max_j is None else min(max_j, q)
    M = U[..., :max_i].mT @ V[..., :max_j]  # (.., i, n) @ (.., n, j) -> (.., i, j)
    return phi_from_cross(M)


def phi_from_cross(M: torch.Tensor) -> torch.Tensor:
    """The φ grid from the cross-product ``M = UᵀV`` (``(..., i, j)``) of two ordered
    orthonormal bases: ``φ(i, j) = Σ_{a<i, b<j} M[a, b]² / min(i, j)``, clipped to [0, 1].

    The one place the normalisation of eq. 4 (Hu et al. 2021 §7.2) is written; every route to
    ``M`` (explicit bases, small R factors, random draws) ends here.
    """
    C = (M * M).cumsum(-2).cumsum(-1)  # ‖U_iᵀ V_j‖_F² for every (i, j)
    i = torch.arange(1, M.shape[-2] + 1, dtype=C.dtype, device=C.device)
    j = torch.arange(1, M.shape[-1] + 1, dtype=C.dtype, device=C.device)
    return (C / torch.minimum(i[:, None], j[None, :])).clamp_(0.0, 1.0)


def principal_angles(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Principal angles between ``span(U)`` and ``span(V)``, ascending, in ``[0, π/2]``.

    Parameters
    ----------
    U : torch.Tensor
        ``(n, p)`` orthonormal columns.
    V : torch.Tensor
        ``(n, q)`` orthonormal columns.

    Returns
    -------
    torch.Tensor
        ``(min(p, q),)`` angles θ, ascending.

    Notes
    -----
    ``cos θ`` are the singular values of ``UᵀV`` (Björck & Golub 1973), clipped to [0, 1]
    before ``arccos``. ``arccos`` is ill-conditioned near 0 (σ = 1 − 1e-16 gives θ ≈ 1.5e-8), so,
    as ``scipy.linalg.subspace_angles`` does, angles with ``cos² θ >= 1/2`` are taken from
    ``arcsin`` of the singular values of the residual ``(I − UUᵀ) V`` (``U`` being the wider
    basis), which are ``sin θ``. Cost ``O(n·p·q)``.

    Examples
    --------
    >>> import torch
    >>> I = torch.eye(3, dtype=torch.float64)
    >>> principal_angles(I[:, :2], I[:, 1:])      # one shared axis, one at right angles
    tensor([0.0000, 1.5708], dtype=torch.float64)
    """
    if U.shape[-1] < V.shape[-1]:
        U, V = V, U  # U the wider basis: V - U UᵀV is then the residual of the narrower one
    M = U.mT @ V  # (p, n) @ (n, q) -> (p, q)
    cos = torch.linalg.svdvals(M).clamp(0.0, 1.0)  # (q,) descending: θ ascending
    R = V - U @ M  # (n, q): the part of span(V) outside span(U)
    sin = torch.linalg.svdvals(R).flip(-1).clamp(0.0, 1.0)  # (q,) ascending: θ ascending
    return torch.where(cos * cos >= 0.5, torch.arcsin(sin), torch.arccos(cos))


def grassmann_distance(U: torch.Tensor, V: torch.Tensor) -> float:
    """Geodesic (arc-length) Grassmann distance ``sqrt(Σ_t θ_t²)`` between ``span(U)`` and
    ``span(V)`` (``(n, p)``, ``(n, q)`` orthonormal; the ``min(p, q)`` principal angles of
    :func:`principal_angles`). 0 for equal subspaces, ``π/2·sqrt(k)`` for orthogonal ``k``-dim
    ones (Edelman, Arias & Smith 1998, §4.3).
    """
    return float(principal_angles(U, V).square().sum().sqrt())


def expected_random_similarity(n: int, max_i: int, max_j: int) -> np.ndarray:
    """``E[φ(i, j)] = max(i, j) / n`` for two independent Haar-random subspaces of ``R^n``.

    Derivation: for a random ``i``-frame ``U`` and any fixed ``j``-frame ``V``,
    ``E‖UᵀV‖_F² = i·j/n``; dividing by ``min(i, j)`` leaves ``max(i, j)/n``.
    """
    i = np.arange(1, max_i + 1)[:, None]
    j = np.arange(1, max_j + 1)[None, :]
    return np.maximum(i, j) / n


def projection_norm(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """``‖Uᵀ W V‖_F`` for ``W (m, n)``, ``U (m, k)``, ``V (n, k)`` (paper §7.3, Table 7).

    Computed as ``Uᵀ (W V)`` in ``U``'s dtype: ``O(k·m·n)``, never squaring ``W``, and ``W``
    (e.g. fp16 as stored) upcast one block of rows at a time (:func:`blocked_matmul`).
    """
    P = U.mT @ blocked_matmul(W, V, dtype=U.dtype)  # (k, m) @ ((m, n) @ (n, k)) -> (k, k)
    return float(torch.linalg.matrix_norm(P))
