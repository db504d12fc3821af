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

import contextvars
import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch

__all__ = [
    "SVD",
    "factored_svd",
    "factored_svdvals",
    "top_singular",
    "top_singular_krylov",
    "TopSVDInfo",
    "TOP_PROVIDER",
    "WEIGHT_MEMO",
    "blocked_matmul",
    "frobenius_norm",
    "singular_basis",
    "random_orthonormal",
    "random_similarity",
    "subspace_similarity",
    "phi_from_cross",
    "principal_angles",
    "grassmann_distance",
    "compare_bases",
    "average_linkage",
    "orthonormal_complement",
    "brand_update_factors",
    "expected_random_similarity",
    "projection_norm",
    "weight_products",
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
    exact_max: int = 512,
    tol: float = 1e-9,
    angle_tol: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    info: bool = False,
):
    """Top-``k`` singular triplets of a dense matrix ``W`` (``(m, n)``), any float dtype.

    ``method="exact"`` runs a full ``torch.linalg.svd`` of ``W`` upcast to ``dtype`` (one copy of
    ``W``: asked for) and truncates: ``"auto"`` picks it when ``min(m, n) <= exact_max`` or
    ``k`` is close to ``min(m, n)`` (a dense SVD costs ``O(m·n·min(m, n))``, the iterative
    route about ``60·b·m·n``: a 1024 × 4096 bf16 weight took 2.3 s exact, 0.1 s iterative).
    ``"iterative"`` (DESIGN.md: never a full SVD of a large ``W``) runs
    :func:`top_singular_krylov`: a randomized block Krylov method in float32 GEMMs (float64 when
    ``W`` is stored in float64), then a float64 Rayleigh–Ritz step checked by its residuals,
    iterated until the singular values are accurate to ``tol`` (relative) or the bound stops
    improving; ``angle_tol`` asks the same of the subspaces. The achieved bounds are
    :func:`top_singular_krylov`'s :class:`TopSVDInfo` (``info=True`` returns them).

    Returns an :class:`SVD` with ``U (m, k)``, ``S (k,)`` descending, ``V (n, k)``,
    deterministic signs (and the :class:`TopSVDInfo` with ``info=True``; ``None`` for the exact
    route).
    """
    m, n = W.shape
    k = min(k, m, n)
    if method == "auto":
        method = "exact" if min(m, n) <= exact_max or k >= min(m, n) - 1 else "iterative"
    exact = method == "exact" or k >= min(m, n)

    def compute() -> tuple[SVD, TopSVDInfo | None]:
        if exact:
            U, S, Vh = torch.linalg.svd(_upcast(W, dtype), full_matrices=False)
            U, V = _fix_signs(U[:, :k], Vh[:k].mT)
            return SVD(U, S[:k], V), None
        return top_singular_krylov(W, k, tol=tol, angle_tol=angle_tol, seed=seed, dtype=dtype)

    provider = TOP_PROVIDER.get()
    if provider is None:
        svd, stats = compute()
    else:  # e.g. lorascope.cache: the same triplets, from an earlier run when it has them
        svd, stats = provider(
            W, k, exact=exact, tol=tol, angle_tol=angle_tol, dtype=dtype, compute=compute
        )
    return (svd, stats) if info else svd


# Where :func:`top_singular` may find its triplets already computed: a callable
# ``provider(W, k, *, exact, tol, angle_tol, dtype, compute) -> (SVD, TopSVDInfo | None)`` that
# returns ``compute()``'s result, or an equal one it kept. None (the default): always compute.
# :mod:`lorascope.cache` installs one (``with cache.active():``); kernels never see files.
TOP_PROVIDER: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "lorascope_top_provider", default=None
)

# Small per-weight results that several analyses of one run share (Table 7's ‖W‖_F and random
# baseline for the adapters of a report): an object with ``recall(W, name)`` (None when
# absent) and ``keep(W, name, value)``, keyed by ``W``'s content. :mod:`lorascope.cache`
# installs one for the run (``with cache.active():``); None: nothing is shared.
WEIGHT_MEMO: contextvars.ContextVar = contextvars.ContextVar("lorascope_weight_memo", default=None)


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


def compare_bases(
    bases: Sequence[torch.Tensor], i: int, j: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Directed φ and Grassmann matrices between N ordered orthonormal bases of one space.

    Parameters
    ----------
    bases : sequence of torch.Tensor
        N bases, ``(n, k_a)`` each, columns ordered by importance (singular value).
    i, j : int
        Directions taken from the row and from the column basis; each capped by its ``k_a``.
        ``j`` defaults to ``i``.

    Returns
    -------
    phi, grassmann : torch.Tensor
        ``(N, N)`` each. Entry ``[a, b]`` compares ``U_a[:, :min(i, k_a)]`` with
        ``U_b[:, :min(j, k_b)]``: ``φ = ‖U_aᵀ U_b‖_F² / min(·, ·)`` (Hu et al. 2021 §7.2, eq. 4;
        ``= mean cos² θ``) and ``sqrt(Σ θ²)``. Directed: symmetric only when ``i = j``. The
        diagonal is exactly 1 and 0 (a basis against itself: nested subspaces).
    """
    j = i if j is None else j
    n = len(bases)
    phi = torch.empty(n, n, dtype=torch.float64)
    dist = torch.empty(n, n, dtype=torch.float64)
    for a, Ua in enumerate(bases):
        Ua = Ua[:, :i]  # (n, i_a)
        for b, Ub in enumerate(bases):
            if a == b:  # top-i vs top-j of one basis: nested subspaces, every angle 0
                phi[a, b], dist[a, b] = 1.0, 0.0
                continue
            Ub = Ub[:, :j]  # (n, j_b)
            phi[a, b] = subspace_similarity(Ua, Ub)[-1, -1]  # φ(i_a, j_b), one (i_a, j_b) grid
            dist[a, b] = grassmann_distance(Ua, Ub)
    return phi, dist


def average_linkage(distance: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Average-linkage clustering of an ``(N, N)`` distance matrix (``N >= 2``).

    The matrix is symmetrized (``(D + Dᵀ)/2``), clipped at 0 and given a zero diagonal first.
    Returns the scipy linkage matrix ``Z`` (``(N − 1, 4)``) and the leaf order (optimal
    ordering: adjacent leaves as close as possible), the order heatmaps follow.

    Examples
    --------
    >>> D = np.array([[0.0, 0.9, 0.1], [0.9, 0.0, 0.8], [0.1, 0.8, 0.0]])
    >>> Z, order = average_linkage(D)   # 0 and 2 are close: merged first, adjacent leaves
    >>> sorted(Z[0, :2].tolist()), float(Z[0, 2]), abs(order.index(0) - order.index(2))
    ([0.0, 2.0], 0.1, 1)
    """
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    D = np.asarray(distance, dtype=float)
    D = np.clip((D + D.T) / 2, 0.0, None)
    np.fill_diagonal(D, 0.0)
    Z = linkage(squareform(D, checks=False), method="average", optimal_ordering=D.shape[0] > 2)
    return Z, leaves_list(Z).tolist()


def projection_norm(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """``‖Uᵀ W V‖_F`` for ``W (m, n)``, ``U (m, k)``, ``V (n, k)`` (paper §7.3, Table 7).

    Computed as ``Uᵀ (W V)`` in ``U``'s dtype: ``O(k·m·n)``, never squaring ``W``, and ``W``
    (e.g. fp16 as stored) upcast one block of rows at a time (:func:`blocked_matmul`).
    """
    P = U.mT @ blocked_matmul(W, V, dtype=U.dtype)  # (k, m) @ ((m, n) @ (n, k)) -> (k, k)
    return float(torch.linalg.matrix_norm(P))


def orthonormal_complement(Q: torch.Tensor, M: torch.Tensor, dim: int) -> torch.Tensor:
    """Orthonormal ``(n, dim)`` basis ⟂ ``Q`` (``(n, p)`` orthonormal) that spans the part of
    ``range(M)`` (``M (n, r)``) outside ``range(Q)``: the new directions of Brand's (2006)
    rank-``r`` SVD update. Extra directions are harmless to the update (they only add
    rows/columns that the exact factors fill). Re-projected and re-orthonormalized (up to three
    times) until ``|Qᵀ P| <= 16·eps``, so it is ⟂ ``Q`` to working precision even when ``M``
    lies (almost) inside ``range(Q)``, where the first projection is all rounding.
    """
    R = M - Q @ (Q.mT @ M)  # (n, r): the part of M's columns outside range(Q)
    P = torch.linalg.svd(R, full_matrices=False).U[:, :dim]  # (n, dim), R's main directions first
    tiny = 16 * torch.finfo(P.dtype).eps
    for _ in range(3):  # "twice is enough" (Kahan–Parlett), once more for an all-inside M
        C = Q.mT @ P  # (p, dim)
        if float(C.abs().max()) <= tiny:
            break
        P = torch.linalg.qr(P - Q @ C).Q
    return P


def brand_update_factors(
    svd: SVD, A: torch.Tensor, B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brand's (2006) SVD update of ``W = U diag(S) Vᵀ`` by ``B A``, as factors of a small core.

    With ``P ⟂ U`` spanning ``B``'s columns outside ``range(U)`` and ``Q ⟂ V`` spanning ``A``'s
    rows outside ``range(V)`` (:func:`orthonormal_complement`; both empty for a square ``W``,
    whose thin ``U`` and ``V`` are complete),

        W + s·B A = [U P] · K · [V Q]ᵀ,   K = [[diag(S), 0], [0, 0]] + s·X Yt,

    exactly, with ``X = [UᵀB; PᵀB]`` (``(p + rb, r)``) and ``Yt = [AV, AQ]`` (``(r, p + ra)``),
    returned here (``svd``: ``U (m, p)``, ``S (p,)``, ``V (n, p)``; ``A (r, n)``,
    ``B (m, r)``, all of one dtype and device). So the singular values of ``W + s·B A`` are
    ``K``'s and its singular vectors ``[U P]·u_K``, ``[V Q]·v_K``. Cost ``O(m·n·r)``.
    """
    U, V = svd.U, svd.V  # (m, p), (n, p)
    m, p = U.shape
    n = V.shape[0]
    r = A.shape[0]
    X = U.mT @ B  # (p, m) @ (m, r) -> (p, r)
    Yt = A @ V  # (r, n) @ (n, p) -> (r, p)
    if m > p:  # tall W: U does not span R^m; B may leave range(U)
        P = orthonormal_complement(U, B, min(r, m - p))  # (m, rb)
        X = torch.cat([X, P.mT @ B])  # (p + rb, r)
    if n > p:  # wide W: V does not span R^n; Aᵀ may leave range(V)
        Q = orthonormal_complement(V, A.mT, min(r, n - p))  # (n, ra)
        Yt = torch.cat([Yt, A @ Q], dim=1)  # (r, p + ra)
    return X, Yt


class TopSVDInfo(NamedTuple):
    """What :func:`top_singular_krylov` achieved, from float64 residuals of the returned triplets.

    With ``R₁ = W V̂ − Û Σ̂`` and ``R₂ = Wᵀ Û − V̂ Σ̂`` (top ``k`` columns; ``r_i`` the norm of
    column ``i`` of ``[R₁; R₂]``) and ``δ = σ̂_k − (σ̂_{k+1} + r_{k+1})`` the estimated gap to the
    rest of the spectrum:

    - ``residual``: ``max_i r_i / σ̂_i``;
    - ``sigma_bound``: ``min(max_i r_i / √2, ‖[R₁; R₂]‖_F² / 2δ) / σ̂_k``, a bound on the
      relative error of every returned singular value: the residual bounds of the Jordan–Wielandt
      matrix ``[[0, W], [Wᵀ, 0]]`` at the unit vectors ``(û_i; v̂_i)/√2`` (residual ``r_i/√2``),
      linear (Weyl; always) and quadratic (Mathias 1998; needs ``δ > 0``), plus the float64
      rounding of the step itself, ``sqrt(n)·ε·σ̂_1/σ̂_k``;
    - ``angle_bound``: ``‖[R₁; R₂]‖_F / δ``, Wedin's (1972) bound on
      ``sqrt(‖sin Θ_U‖² + ‖sin Θ_V‖²)`` between the returned top-``k`` subspaces and ``W``'s
      (``inf`` when ``δ <= 0``, e.g. ``σ_k = σ_{k+1}``, where the top-``k`` subspace is not
      defined);
    - ``gap``: ``δ / σ̂_1``; ``passes``: products with ``W`` or ``Wᵀ`` (each one read of ``W``);
      ``converged``: the tolerances asked for were met.

    ``δ`` takes ``σ_{k+1} <= σ̂_{k+1} + r_{k+1}``, true once the search space has met ``W``'s
    top ``k + 1`` directions (a random start does with probability 1).
    """

    residual: float
    sigma_bound: float
    angle_bound: float
    gap: float
    passes: int
    converged: bool


def _orth(X: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal basis of ``span(X)`` with ``basis``'s span projected out (twice: Kahan)."""
    for _ in range(2):
        if basis is not None and basis.shape[1]:
            X = X - basis @ (basis.mT @ X)  # (n, b)
        X = torch.linalg.qr(X).Q
    return X


def _residual_info(
    W: torch.Tensor, Q: torch.Tensor, k: int, dtype: torch.dtype
) -> tuple[SVD, torch.Tensor, TopSVDInfo]:
    """Float64 Rayleigh–Ritz of ``W`` on ``span(Q)`` (``(n, b)`` orthonormal) and the residual
    bounds of its top ``k`` (:class:`TopSVDInfo`); also returns ``Wᵀ Û`` for the next step."""
    Y = blocked_matmul(W, Q, dtype=dtype)  # (m, n) @ (n, b) -> (m, b)
    Uy, S, Zh = torch.linalg.svd(Y, full_matrices=False)  # (m, b), (b,), (b, b)
    V = Q @ Zh.mT  # (n, b)
    P = blocked_matmul(W, Uy, transpose=True, dtype=dtype)  # (n, m) @ (m, b) -> (n, b)
    R2 = P - V * S  # (n, b): Wᵀû_i − σ̂_i v̂_i
    R1 = Y @ Zh.mT - Uy * S  # (m, b): W v̂_i − σ̂_i û_i, rounding-level by construction
    r = (R1.square().sum(0) + R2.square().sum(0)).sqrt()  # (b,)
    b, n = S.shape[0], Q.shape[0]
    s = S.clamp_min(torch.finfo(dtype).tiny)
    res = float((r[:k] / s[:k]).max())
    # rounding of the float64 products and SVD themselves: about sqrt(n)·ε·σ̂_1 in each σ̂_i
    floor = math.sqrt(n) * torch.finfo(dtype).eps * float(s[0] / s[k - 1])
    frob = float(r[:k].square().sum().sqrt())
    if k < b:
        gap = float(S[k - 1] - S[k] - r[k])
    elif b >= n:  # the whole space: no rest of the spectrum (W has min(m, n) = b values)
        gap = float(S[k - 1])
    else:  # nothing known of σ_{k+1}: only the linear bounds hold
        gap = -1.0
    if gap > 0:
        # the Jordan–Wielandt vectors (û; v̂)/√2 have residuals r_i/√2
        sigma = min(float(r[:k].max()) / 2**0.5, frob * frob / (2 * gap)) / float(s[k - 1])
        sigma += floor
        angle = frob / gap
    else:
        sigma, angle = float(r[:k].max()) / 2**0.5 / float(s[k - 1]) + floor, math.inf
    info = TopSVDInfo(res, sigma, angle, gap / float(s[0]), 2, False)
    return SVD(Uy, S, V), P, info


def _gram(W: torch.Tensor, X: torch.Tensor, flip: bool, work: torch.dtype) -> torch.Tensor:
    """``Wᵀ W X`` (``W Wᵀ X`` when ``flip``) in ``work`` from one read of ``W``, a block of about
    4 MB at a time: rows (``Σ_i W_iᵀ (W_i X)``) or, flipped, columns (``Σ_j W_j (W_jᵀ X)``),
    each block serving both products while it is in cache. A block is a view when ``W`` is
    already in ``work``, else upcast. Measured on a 14336 × 4096 weight: 55 ms per product
    from a float32 copy, 80 ms upcasting bf16 blocks, 170 ms as two whole-matrix GEMMs (which
    stream ``W`` from memory twice)."""
    m, n = W.shape
    size = torch.empty((), dtype=work).element_size()
    out = torch.zeros(X.shape[0], X.shape[1], dtype=work, device=W.device)  # (N, w)
    if flip:  # X in R^m
        cols = max(1, (4 << 20) // max(1, m * size))
        for j in range(0, n, cols):
            blk = W[:, j : j + cols].to(work)  # (m, cols)
            out.addmm_(blk, blk.mT @ X)  # (m, cols) @ ((cols, m) @ (m, w))
        return out
    rows = max(1, (4 << 20) // max(1, n * size))
    if torch.get_num_threads() == 1 and W.device.type == "cpu":
        # one thread (modules in parallel, analysis._common.map_modules): both products as
        # row-major GEMMs into (Wᵀ W X)ᵀ, measured 70 ms against 101 ms at 14336 × 4096
        # (with two threads the other order is faster: 54 ms against 61 ms)
        outT, XT = out.mT.contiguous(), X.mT.contiguous()  # (w, N), (w, n)
        for i in range(0, m, rows):
            blk = W[i : i + rows].to(work)  # (rows, n)
            outT.addmm_(XT @ blk.mT, blk)  # ((w, n) @ (n, rows)) @ (rows, n)
        return outT.mT
    for i in range(0, m, rows):
        blk = W[i : i + rows].to(work)  # (rows, n)
        out.addmm_(blk.mT, blk @ X)  # (n, rows) @ ((rows, n) @ (n, w))
    return out


def top_singular_krylov(
    W: torch.Tensor,
    k: int,
    *,
    tol: float = 1e-9,
    angle_tol: float | None = None,
    oversample: int | None = None,
    block: int | None = None,
    max_passes: int = 400,
    max_refine: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    copy_bytes: int = 1 << 30,
) -> tuple[SVD, TopSVDInfo]:
    """Top-``k`` singular triplets of a dense ``W`` (``(m, n)``) by a restarted randomized block
    Krylov method, then a float64 Rayleigh–Ritz step with residual bounds.

    Parameters
    ----------
    W : torch.Tensor
        ``(m, n)``, any float dtype (fp16/bf16 as stored).
    k : int
        Triplets wanted, ``1 <= k < min(m, n)`` (larger ``k``: use an exact SVD).
    tol : float
        Target bound on the relative error of every singular value (``TopSVDInfo.sigma_bound``);
        the default 1e-9 holds ``‖σ_top-k‖`` (Table 7) well inside 1e-8.
    angle_tol : float, optional
        Target of Wedin's bound on the top-``k`` subspaces (``TopSVDInfo.angle_bound``); None
        asks for the values only (e.g. ``‖σ_top-k‖`` of Table 7).
    oversample : int, optional
        The float64 step works on ``b = k + oversample`` Ritz vectors; default
        ``max(8, k // 2)``.
    block : int, optional
        Width of the Krylov blocks, default ``max(16, k // 2)`` (at most ``b``): narrower blocks
        need fewer flops per digit in theory, but below ~16 columns per read of ``W`` the
        products turn bandwidth-bound and the per-block Rayleigh–Ritz dominates (measured on
        4096² and 14336 × 4096 bf16 weights: 16 columns fastest for ``k = 16``, 32 for 64).
    max_passes : int
        Most products with ``W``/``Wᵀ`` (each one read of ``W``) before giving up.
    max_refine : int
        Most float64 subspace-iteration steps after the Krylov phase.
    dtype : torch.dtype
        Precision of the Rayleigh–Ritz step, the residuals and the result (float64).
    copy_bytes : int
        Phase 1 works on one copy of ``W`` in its working precision (a 14336 × 4096 bf16
        weight: 235 MB in float32) when the copy is at most this large, instead of upcasting
        every block in every pass (measured 1.5× faster per pass). A larger ``W`` is upcast
        one block at a time in each pass, with no copy.

    Returns
    -------
    (SVD, TopSVDInfo)
        ``U (m, k)``, ``S (k,)`` descending, ``V (n, k)`` in ``dtype`` with deterministic signs,
        and the achieved accuracy.

    Notes
    -----
    Phase 1, in ``W``'s working precision (float32 GEMMs for fp16/bf16/fp32 ``W``, whose values
    float32 holds exactly): block Krylov ``[Q, (WᵀW) Q, (WᵀW)² Q, …]`` from a Gaussian start,
    block size ``b``, with full reorthogonalization and Rayleigh–Ritz on the whole basis after
    each block (from ``QᵀWᵀWQ``, no extra product); when the basis reaches ``max(6b, 320)``
    columns it is thick-restarted (the best ``2b`` Ritz vectors kept, with their ``WᵀW``
    images). It stops when the relative residual is a tenth of what the float64 step needs
    (``sqrt(tol)``, and ``angle_tol``), or stops falling (the working precision's floor). The
    gain over subspace iteration is the square root of the gap in the rate (Musco & Musco 2015),
    which matters for the flat spectra of LLM weights. Phase 2, in ``dtype``: Rayleigh–Ritz of
    ``W`` on the top-``b`` Ritz subspace, ``Y = W Q = Û Σ̂ Zᵀ``, ``V̂ = Q Z``, then ``Wᵀ Û`` for
    the residuals (:class:`TopSVDInfo`); while the bounds miss the tolerances and the last step
    at least halved the residual, one float64 subspace-iteration step ``Q ← orth(Wᵀ Û)`` and
    again (two reads of ``W`` each; a tiny gap at ``σ_k`` ends it with ``converged=False``).
    The values are then accurate to about ``ε_32² ‖W‖² / δ`` and the subspaces to
    ``ε_32 ‖W‖ / δ``. Cost ``O(m·n·b)`` per pass (about 30 passes for the top 16 of a
    14336 × 4096 weight whose 16th value sits at the edge of its noise bulk); memory:
    ``(m + n)·(a few b)`` numbers and the float32 copy of ``W`` (``copy_bytes``).
    """
    m, n = W.shape
    if not 1 <= k < min(m, n):
        raise ValueError(f"k={k} must be in [1, {min(m, n) - 1}] for W of shape {(m, n)}")
    flip = m < n  # iterate in R^min(m, n): the Krylov basis lives on the short side
    N = min(m, n)
    work = torch.float32 if W.dtype in (torch.float16, torch.bfloat16, torch.float32) else dtype
    b = min(N - 1, k + (max(8, k // 2) if oversample is None else oversample))
    b = max(b, k)  # the subspace of the float64 step
    step = min(b, block if block is not None else max(16, k // 2))  # Krylov block width
    cap = min(N, max(6 * b, 320))
    eps = torch.finfo(work).eps
    Wk = W  # phase 1's W: one copy in `work` when small enough (float32 holds fp16/bf16 exactly)
    if W.dtype != work and W.numel() * torch.empty((), dtype=work).element_size() <= copy_bytes:
        Wk = W.to(work)
    g = torch.Generator(device="cpu").manual_seed(seed)
    fresh = _orth(torch.randn(N, step, generator=g, dtype=work).to(W.device))  # (N, step)
    passes = 0
    want_angle = angle_tol is not None
    best, stalled, skip = math.inf, 0, 0
    target = min(math.sqrt(tol / 100), angle_tol / 10 if want_angle else math.inf)
    basis = fresh  # (N, c): orthonormal, grows by `step` per block
    WWb = fresh[:, :0]  # (N, c): Wᵀ W basis, known column for column
    T = torch.zeros(0, 0, dtype=torch.float64, device=W.device)  # basisᵀ WᵀW basis
    while True:
        new = _gram(Wk, fresh, flip, work)  # (N, w): WᵀW fresh (W Wᵀ when flipped)
        passes += 2
        WWb = torch.cat([WWb, new], 1)  # (N, c)
        side = (basis.mT @ new).double()  # (c, w): the new columns of T (T is symmetric)
        c, w = basis.shape[1], new.shape[1]
        T = torch.cat([torch.cat([T, side[: c - w].mT], 0), side], 1)  # (c, c)
        if skip > 0 and c + step <= cap and passes + 2 < max_passes and c < N:
            skip -= 1  # the residual cannot have met the target yet: extend, check later
            fresh = _orth(new[:, : min(step, cap - c)], basis)  # (N, w) ⟂ basis
            basis = torch.cat([basis, fresh], 1)
            continue
        theta, E = torch.linalg.eigh((T + T.mT) / 2)  # ascending
        theta, E = theta.flip(0).clamp_min(0), E.flip(1)  # descending σ̂², Ritz coefficients
        need = min(c, max(b, 2 * step))  # the Ritz vectors used below
        Ew = E[:, :need].to(work)
        ritz = basis @ Ew  # (N, need) Ritz vectors
        WWr = WWb @ Ew  # (N, need): WᵀW ritz
        R = WWr - ritz * theta[:need].to(work)  # (N, need) residuals of WᵀW
        sig = theta[:need].sqrt().clamp_min(1e-300)  # σ̂, descending
        rn = R.norm(dim=0).double() / sig  # ≈ ‖Wᵀû − σ̂ v̂‖ per triplet
        kk = min(k, c)
        res = float((rn[:kk] / sig[:kk]).max())
        # stop once the float64 Rayleigh–Ritz step will meet `tol` (its error is quadratic in
        # the residual) and, for vectors, the angle; or at the working precision's floor
        ok = res * res <= tol / 100 and (not want_angle or res <= angle_tol / 10)
        floor = res <= 10 * eps * float(sig[0] / sig[kk - 1])
        # no longer falling, once good enough for the float64 step (early blocks of a Krylov
        # space may not move the top residuals at all)
        stalled = stalled + 1 if res > 0.9 * best and res * res <= tol else 0
        best = min(best, res)
        if (ok and c >= b) or floor or stalled >= 3 or passes + 2 >= max_passes or c >= N:
            break
        # blocks before the next check (its eigh and residuals cost ~10 % of a 4096-wide
        # run): the residual falls at most ~10× a block (measured 2–4×), so it cannot meet the
        # target sooner
        skip = max(0, math.floor(math.log10(max(res / target, 1.0))) - 1)
        if c + step > cap:  # thick restart: keep the best Ritz vectors and their WᵀW images
            basis, WWb = ritz, WWr
            T = (basis.mT @ WWb).double()  # ≈ diag(θ), recomputed: (need, need)
            # continue the Krylov space from the residuals' main directions
            nxt = torch.linalg.svd(R, full_matrices=False).U[:, :step]  # (N, step)
        else:
            nxt = new  # block Lanczos: the next block is WᵀW of the last, ⟂ the basis
        width = min(step, cap - basis.shape[1], nxt.shape[1])  # narrower when N is small
        if width <= 0:
            break
        fresh = _orth(nxt[:, :width], basis)  # (N, width) ⟂ basis
        basis = torch.cat([basis, fresh], 1)
    del Wk  # phase 2 upcasts the stored W block by block
    # phase 2: float64 Rayleigh–Ritz on the top-b Ritz subspace, refined while short of target
    Q = _orth(ritz[:, :b].to(dtype))  # (N, b)
    Wd = W.mT if flip else W  # the stored W: products upcast block by block
    last = math.inf
    for _ in range(max_refine + 1):
        svd, P, info = _residual_info(Wd, Q, k, dtype)
        passes += 2
        ok = info.sigma_bound <= tol and (not want_angle or info.angle_bound <= angle_tol)
        if ok or passes >= max_passes or info.residual > 0.5 * last:
            break  # met, out of passes, or improving too slowly (a small gap at σ_k, rounding)
        last = info.residual
        Q = _orth(P)  # one float64 subspace-iteration step
    info = info._replace(passes=passes, converged=ok)
    U, S, V = svd.U[:, :k], svd.S[:k], svd.V[:, :k]
    if flip:
        U, V = V, U
    U, V = _fix_signs(U, V)
    return SVD(U, S, V), info


def float32_products_exact_enough(W: torch.Tensor) -> bool:
    """Whether products with ``W`` may run as float32 GEMMs (:func:`weight_products`): ``W``'s
    values are exact in float32 (stored as fp16, bf16 or fp32) and float32 matmuls are IEEE
    float32 (``torch.get_float32_matmul_precision() == "highest"``, so no TF32 or bf16 inner
    products, which would lose three or more digits)."""
    return (
        W.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and torch.get_float32_matmul_precision() == "highest"
    )


def weight_products(
    W: torch.Tensor,
    V: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    products: torch.dtype | None = None,
    norm: bool = True,
    block_bytes: int = 4 << 20,
) -> tuple[torch.Tensor, float | None]:
    """``W @ V`` and ``‖W‖_F`` from one pass over ``W``, upcast one block of rows at a time.

    Parameters
    ----------
    W : torch.Tensor
        ``(m, n)`` in its stored dtype (fp16, bf16, fp32, ...).
    V : torch.Tensor
        ``(n, c)``: every direction the caller needs ``W`` applied to, side by side (Table 7:
        ``ΔW``'s top-``k`` right singular vectors and ``k`` random ones, ``c = 2k``).
    dtype : torch.dtype
        Precision of the returned product and of the norm (float64 by default).
    products : torch.dtype, optional
        Precision of the GEMMs. None: float32 when :func:`float32_products_exact_enough`
        (``W`` as stored is exact in float32), else ``dtype``. ``‖W‖_F²`` is always a float64
        dot product.

    Returns
    -------
    (torch.Tensor, float)
        ``(m, c)`` in ``dtype``, and ``‖W‖_F``. Then ``‖Uᵀ W V_j‖_F = ‖Uᵀ (W V)_j‖_F`` for any
        block ``j`` of columns (:func:`projection_norm` without another read of ``W``).

    Notes
    -----
    Cost ``O(m·n·c)`` and one read of ``W``; memory beyond ``W``: one block (about
    ``block_bytes``) and the ``(m, c)`` result. Float32 GEMMs are 3–4× faster than float64 on
    CPU; each entry of ``W V`` then carries a relative error of about ``√n·ε₃₂`` (measured
    2.6e-7 in Frobenius norm at 14336 × 4096), which the projection ``Uᵀ (W V)`` averages
    down: ``‖Uᵀ W V‖_F`` agreed with float64 products to 4e-8 relative or better at
    14336 × 4096, 4096² and 1024 × 4096 (``tests/test_linalg.py`` holds it to 1e-6). A
    product or square that overflows float32 (entries beyond ~1e19) reruns in ``dtype``.
    """
    m, n = W.shape
    if products is None:
        products = torch.float32 if float32_products_exact_enough(W) else dtype
    Vp = V.to(device=W.device, dtype=products)
    out = torch.empty(m, V.shape[1], dtype=products, device=W.device)  # (m, c)
    rows = max(1, block_bytes // max(1, n * torch.empty((), dtype=products).element_size()))
    total = torch.zeros((), dtype=torch.float64, device=W.device)
    for i in range(0, m, rows):
        blk = W[i : i + rows].to(products)  # (rows, n): the only upcast copy
        torch.mm(blk, Vp, out=out[i : i + rows])  # (rows, n) @ (n, c)
        if norm:
            flat = (blk if products == torch.float64 else W[i : i + rows]).reshape(-1)
            flat = flat.to(torch.float64)  # from W as stored: cheaper than from float32 blocks
            total += torch.dot(flat, flat)  # Σ w² in float64 (2.5× faster than torch.sum)
    size = float(total) ** 0.5 if norm else None
    if products != dtype and not (math.isfinite(size or 0.0) and bool(torch.isfinite(out).all())):
        return weight_products(
            W, V, dtype=dtype, products=dtype, norm=norm, block_bytes=block_bytes
        )
    return out.to(dtype), size
