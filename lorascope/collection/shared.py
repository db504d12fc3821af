"""Do adapters for different tasks share directions? The shared subspace of a collection,
against null models.

For ``N`` updates ``ΔW_i = U_i diag(σ_i) V_iᵀ`` of one weight (one layer and module kind, each
from its exact factored SVD), the input-side shared subspace is spanned by the top
eigenvectors of

    M = Σ_i ΔW_iᵀ ΔW_i = Σ_i V_i diag(σ_i²) V_iᵀ = X Xᵀ,   X = [V_1 diag(σ_1), …, V_N diag(σ_N)]

(``d_in × Σ k_i``), i.e. the left singular vectors of ``X``; the output side uses
``ΔW_i ΔW_iᵀ`` and ``U_i``. ``M`` is never formed: a thin QR of ``X`` (or, when
``Σ k_i > d``, of ``Xᵀ``) and the SVD of the small triangular factor give them exactly
(:func:`shared_basis`). By the Ky Fan maximum principle the top-``k`` eigenvectors ``P_k``
capture the largest possible share of the collection's energy in any ``k``-dimensional
subspace,

    E(k) = Σ_i ‖ΔW_i P_k‖_F² / Σ_i ‖ΔW_i‖_F² = Σ_{j≤k} λ_j / Σ_j λ_j,

so a large ``E(k)`` alone proves little: ``E`` is maximised over subspaces, and ``N`` updates of
rank ``r`` always fill ``N·r`` dimensions. It is read against null collections (Kaushik et al.
2025 claim a "universal" subspace; the stress test that disputes it asks exactly for these):

- ``spectra``: every adapter keeps its own singular values, its directions are Haar-random
  (``E_null`` averaged over ``draws``): what the optimum gives for unrelated updates of the
  same spectra;
- ``layers``: every adapter's update of the same kind taken from a random layer (of the same
  shape): is the sharing specific to this layer;
- ``mean``: the energy the top-``k`` directions of the *mean* update ``(1/N) Σ ΔW_i`` capture
  (a fixed, not an optimised, subspace): is the shared subspace just the common component.

Per adapter: the leave-one-out relative error ``‖ΔW_i − ΔW_i P Pᵀ‖_F / ‖ΔW_i‖_F`` with ``P``
the top-``k`` shared directions of the *other* adapters (its random-subspace expectation is
``sqrt(1 − k/d)``: a Haar-random ``k``-dimensional subspace holds ``k/d`` of any update's
energy), and φ (Hu et al. 2021 eq. 4) of its top-``r_i`` directions to the shared top-``k``,
whose random expectation is ``max(r_i, k)/d`` (:func:`lorascope.linalg.expected_random_similarity`).

With ``normalize`` (the default) every ``ΔW_i`` is scaled to ``‖ΔW_i‖_F = 1`` first, so each
adapter counts once whatever its scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from lorascope.adapter import LoraModule
from lorascope.analysis._common import module_svd
from lorascope.errors import LoraScopeError, ShapeError
from lorascope.linalg import factored_svd, phi_from_cross

__all__ = [
    "SharedResult",
    "shared_basis",
    "stack_directions",
    "shared_subspace",
    "shared_from_adapters",
]

Side = Literal["right", "left"]


def stack_directions(
    svds: Sequence[tuple[torch.Tensor, torch.Tensor]], normalize: bool = True
) -> torch.Tensor:
    """``X = [D_1 diag(σ_1), …, D_N diag(σ_N)]`` (``(d, Σ k_i)``, float64) from each update's
    singular directions ``D_i`` (``(d, k_i)``, orthonormal) and values ``σ_i`` (``(k_i,)``);
    with ``normalize`` each block is divided by ``‖σ_i‖`` (``‖ΔW_i‖_F``)."""
    return torch.cat([D.to(torch.float64) * _weights(S, normalize) for D, S in svds], dim=1)


def _top_eigh(G: np.ndarray, K: int, vectors: bool = True):
    """The top ``K`` eigenpairs of a symmetric ``G`` (``(d, d)``) by LAPACK's ``syevr`` on the
    index range only (no full eigendecomposition), in descending order; eigenvalues below 0
    (rounding of a positive semi-definite Gram) are clamped to 0."""
    from scipy.linalg import eigh

    d = G.shape[0]
    K = min(K, d)
    res = eigh(G, subset_by_index=[d - K, d - 1], driver="evr", eigvals_only=not vectors,
               check_finite=False)  # fmt: skip
    w, V = (res, None) if not vectors else res
    w = np.clip(w[::-1], 0.0, None)
    return (w, None) if V is None else (w, np.ascontiguousarray(V[:, ::-1]))


def gram(blocks: Iterable[torch.Tensor | np.ndarray], d: int) -> np.ndarray:
    """``Σ_c X_c X_cᵀ`` (``(d, d)``, float64) over column blocks ``X_c`` (``(d, m_c)``), each
    product a BLAS ``syrk`` (numpy's ``X @ X.T``): the Gram matrix of a stack without holding
    the stack."""
    G = np.zeros((d, d))
    for X in blocks:
        Xn = X.numpy() if isinstance(X, torch.Tensor) else X
        Xn = np.asarray(Xn, dtype=np.float64)
        G += Xn @ Xn.T
    return G


def shared_basis(
    X: torch.Tensor, max_k: int | None = None, *, dask: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and values of ``X`` (``(d, m)``): the eigenvectors of ``X Xᵀ`` and
    the square roots of its eigenvalues.

    ``m <= d``: ``X = Q R`` (thin QR), SVD ``R = U_R Σ W_Rᵀ``, so ``X = (Q U_R) Σ W_Rᵀ``
    (``O(d m²)``, ``X Xᵀ`` never formed).
    ``m > d`` (more directions than dimensions): the ``d × d`` Gram matrix ``G = X Xᵀ`` (one
    BLAS ``syrk``, ``d² m`` flops, half a QR of ``Xᵀ``) and its top ``K`` eigenpairs only
    (LAPACK ``syevr``), ``σ_j = sqrt(λ_j)``. In float64 the eigenvalues carry an absolute
    error of order ``d·ε·λ_1`` (``ε`` = 2.2e-16), far below any energy share reported. With
    ``dask`` the ``m > d`` case is instead a tall-skinny QR of ``Xᵀ`` on ``dask.array``
    (``dask.array.linalg.tsqr`` over row blocks, on the active ``dask.distributed`` client if
    any; only ``R`` ``(d, d)`` comes back), then the SVD of ``Rᵀ``.

    Returns ``P`` ``(d, K)`` and ``s`` ``(K,)`` descending, ``K = min(d, m, max_k)``."""
    d, m = X.shape
    K = min(d, m) if max_k is None else min(max_k, d, m)
    if m <= d:
        Q, R = torch.linalg.qr(X)  # (d, m), (m, m)
        Ur, S, _ = torch.linalg.svd(R)
        P = Q @ Ur  # (d, m)
    elif dask:
        import dask.array as da

        rows = max(d, -(-m // 8))  # ~8 row blocks, each at least d tall (tsqr needs it)
        Xt = da.from_array(X.mT.contiguous().numpy(), chunks=(rows, d))
        R = torch.from_numpy(np.asarray(da.linalg.tsqr(Xt)[1].compute()))  # (d, d)
        P, S, _ = torch.linalg.svd(R.mT)  # (d, d), (d,)
    else:
        w, V = _top_eigh(gram([X], d), K)
        P, S = torch.from_numpy(V), torch.from_numpy(np.sqrt(w))
    return P[:, :K], S[:K]


def _energy(S: torch.Tensor, total: float) -> np.ndarray:
    return (torch.cumsum(S.square(), 0) / total).clamp_(max=1.0).cpu().numpy()


def _captured(X: torch.Tensor, P: torch.Tensor, total: float) -> np.ndarray:
    """Cumulative share of ``‖X‖_F²`` in ``span(P[:, :k])``, ``k = 1..K`` (``P`` orthonormal)."""
    C = P.mT @ X  # (K, m)
    return (torch.cumsum(C.square().sum(1), 0) / total).clamp_(max=1.0).cpu().numpy()


def _haar(d: int, k: int, g: torch.Generator) -> torch.Tensor:
    """A Haar-random ``(d, k)`` orthonormal frame: QR of a Gaussian with the signs of ``R``'s
    diagonal moved into ``Q`` (Mezzadri 2007)."""
    Q, R = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, 1.0)


def _weights(S: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The column weights of one block of ``X``: ``σ_i``, or ``σ_i / ‖σ_i‖`` with ``normalize``
    (float64)."""
    S = S.to(torch.float64)
    return S / torch.linalg.vector_norm(S) if normalize else S


def _chunks(blocks: Iterable[torch.Tensor], width: int = 1024) -> Iterator[torch.Tensor]:
    """Column blocks regrouped into chunks of at least ``width`` columns (a Gram update of a
    16-column block is bound by memory traffic over ``G``, one of ~1000 columns by flops)."""
    buf: list[torch.Tensor] = []
    cols = 0
    for b in blocks:
        buf.append(b)
        cols += b.shape[1]
        if cols >= width:
            yield torch.cat(buf, dim=1)
            buf, cols = [], 0
    if buf:
        yield torch.cat(buf, dim=1)


def _energy_of(blocks: Iterable[torch.Tensor], d: int, m: int, K: int) -> np.ndarray:
    """``E(k)``, ``k = 1..K``, of the collection whose stacked ``X`` has the column ``blocks``
    (``(d, k_i)`` float64, ``m`` columns in all): from the singular values of ``X``
    (:func:`shared_basis`) when ``m <= d``, else from the top eigenvalues of the Gram matrix
    accumulated chunk by chunk (the stack is never held)."""
    total = 0.0

    def counted(bs: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        nonlocal total
        for b in bs:
            total += float(b.square().sum())
            yield b

    if m <= d:
        X = torch.cat(list(counted(blocks)), dim=1)
        _, S = shared_basis(X, K)
        return _pad(_energy(S, total), K)
    G = gram(_chunks(counted(blocks)), d)
    w, _ = _top_eigh(G, K, vectors=False)
    return _pad(np.minimum(np.cumsum(w) / total, 1.0), K)


@dataclass
class SharedResult:
    """The shared subspace of one weight across a collection (see the module docstring).

    Attributes
    ----------
    layer, kind, side : the weight and the side (``right``: input, ``R^{d_in}``; ``left``).
    dim : int
        ``d_in`` (right) or ``d_out`` (left).
    labels : list of str
        One per adapter, in input order.
    ranks : list of int
        Each update's width ``k_i``.
    normalize : bool
    energy : list of float
        ``E(k)``, k = 1..K, of the collection.
    nulls : dict
        ``{"spectra": [...], "layers": [...] or None, "mean": [...]}``, each ``(K,)``.
    random_fixed : list of float
        ``k/d``: the share a random fixed ``k``-dimensional subspace holds in expectation.
    k : int
        The ``k`` of the per-adapter numbers below.
    loo_error : list of float or None
        Per adapter, ``‖ΔW_i − ΔW_i P Pᵀ‖_F / ‖ΔW_i‖_F`` with ``P`` the others' top-``k``;
        random expectation ``loo_random = sqrt(1 − k/d)``.
    phi : list of float
        Per adapter, φ of its top-``r_i`` directions to the shared top-``k``; random
        expectation ``phi_random[i] = max(r_i, k)/d``.
    basis : torch.Tensor
        ``(dim, K)``, the shared directions (not in :meth:`to_dict`).
    """

    layer: int | None
    kind: str
    side: str
    dim: int
    labels: list[str]
    ranks: list[int]
    normalize: bool
    energy: list[float]
    nulls: dict[str, list[float] | None]
    random_fixed: list[float]
    k: int
    loo_error: list[float] | None
    loo_random: float
    phi: list[float]
    phi_random: list[float]
    draws: int
    basis: torch.Tensor | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "basis"}
        d["n"] = self.n
        return d


def _svd_of(m: LoraModule, side: Side, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    svd = module_svd(m, dtype=dtype)
    return (svd.V if side == "right" else svd.U), svd.S


def _stack(
    modules: Sequence[LoraModule], side: Side, normalize: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``X`` (:func:`stack_directions`) filled module by module into one preallocated float64
    tensor (no list of blocks, no second copy), and every module's singular values."""
    sigmas = []
    first = _svd_of(modules[0], side, torch.float64)
    d = int(first[0].shape[0])
    widths = [min(m.A.shape[0], *m.shape) for m in modules]  # k_i of the factored SVD
    X = torch.empty(d, sum(widths), dtype=torch.float64)
    off = 0
    for i, m in enumerate(modules):
        D, S = first if i == 0 else _svd_of(m, side, torch.float64)
        X[:, off : off + D.shape[1]] = D * _weights(S, normalize)
        off += D.shape[1]
        sigmas.append(S)
    return X[:, :off], sigmas


def _directions(
    X: torch.Tensor,
    offs: np.ndarray,
    i: int,
    sigmas: list[torch.Tensor],
    normalize: bool,
    module: LoraModule,
    side: Side,
) -> torch.Tensor:
    """Adapter ``i``'s orthonormal directions ``D_i`` (``(d, k_i)``) back from its block of
    ``X`` (``D_i diag(w_i)``), or from its factored SVD again when a weight is 0."""
    w = _weights(sigmas[i], normalize)
    if bool((w > 0).all()):
        return X[:, offs[i] : offs[i + 1]] / w
    return _svd_of(module, side, torch.float64)[0]


def shared_subspace(
    modules: Sequence[LoraModule],
    *,
    side: Side = "right",
    k: int | None = None,
    max_k: int = 64,
    normalize: bool = True,
    draws: int = 5,
    seed: int = 0,
    others: Mapping[Any, Sequence[LoraModule]] | None = None,
    loo: bool | None = None,
    labels: Sequence[str] | None = None,
    layer: int | None = None,
    kind: str | None = None,
    dask: bool = False,
) -> SharedResult:
    """The shared subspace of ``N`` updates of one weight, with its nulls (module docstring).

    Parameters
    ----------
    modules : sequence of LoraModule
        One per adapter, all of the same ``ΔW`` shape (the same layer and kind).
    side : {"right", "left"}
        Input-side (``ΔW_iᵀ ΔW_i``, the paper's ``A`` side) or output-side directions.
    k : int, optional
        The dimension of the per-adapter numbers (LOO error, φ); default the median width.
    max_k : int
        Curves are reported for ``k = 1..min(max_k, d, Σ k_i)``.
    normalize : bool
        Scale each ``ΔW_i`` to unit Frobenius norm first.
    draws : int
        Random draws for the ``spectra`` and ``layers`` nulls (seeded by ``seed``).
    others : mapping, optional
        ``{layer: [module of adapter i at that layer, ...]}`` for the same kind, aligned with
        ``modules`` (``None`` where an adapter lacks it): enables the ``layers`` null.
    loo : bool, optional
        Compute the leave-one-out errors (``N`` factorizations); default when ``N <= 256``.
    dask : bool
        The collection's QR on ``dask.array`` (:func:`shared_basis`); the nulls stay local.

    Returns
    -------
    SharedResult
    """
    n = len(modules)
    if n < 2:
        raise LoraScopeError(f"a shared subspace needs at least two adapters, got {n}")
    shapes = {m.shape for m in modules}
    if len(shapes) > 1:
        raise ShapeError(
            f"updates of different shapes cannot share a subspace: {sorted(shapes)} "
            f"({modules[0].tensor_name()} ...)"
        )
    dtype = torch.float64
    X, sigmas = _stack(modules, side, normalize)  # (d, Σk): the only stack held
    d = int(X.shape[0])
    ranks = [int(S.shape[0]) for S in sigmas]
    kk = int(np.median(ranks)) if k is None else int(k)
    if not 1 <= kk <= d:
        raise LoraScopeError(f"k must be in [1, {d}], got {kk}")
    total = float(torch.linalg.vector_norm(X)) ** 2  # ‖X‖_F², without a squared copy of X
    P, S = shared_basis(X, max_k, dask=dask)
    K = int(S.shape[0])
    energy = _energy(S, total)
    g = torch.Generator().manual_seed(seed)

    # null 1: own spectra, Haar-random directions (drawn lazily: no second stack in memory)
    spectra = np.zeros(K)
    for _ in range(draws):
        blocks = (_haar(d, S_i.shape[0], g) * _weights(S_i, normalize) for S_i in sigmas)
        spectra += _energy_of(blocks, d, X.shape[1], K)
    spectra /= max(draws, 1)

    # null 2: each adapter's update from a random layer of the same shape
    layer_null = None
    if others:
        pools = [
            [mods[i] for mods in others.values() if mods[i] is not None
             and mods[i].shape == modules[i].shape]
            for i in range(n)
        ]  # fmt: skip
        if all(len(p) >= 2 for p in pools):
            layer_null = np.zeros(K)
            for _ in range(draws):
                pick = [p[int(torch.randint(len(p), (1,), generator=g))] for p in pools]
                blocks, m_l = [], 0
                for m in pick:
                    D, S_m = _svd_of(m, side, dtype)
                    blocks.append(D * _weights(S_m, normalize))
                    m_l += D.shape[1]
                layer_null += _energy_of(blocks, d, m_l, K)
            layer_null /= draws

    # null 3: the mean update's own top-k directions
    mean = _mean_directions(modules, side, normalize, sigmas, K)
    mean_curve = _pad(_captured(X, mean, total), K)

    # per adapter: φ to the shared top-k, leave-one-out error
    Pk = P[:, : min(kk, K)]
    offs = np.cumsum([0, *ranks])
    phi = [  # φ(r_i, k) = ‖D_iᵀ P_k‖² / min(r_i, k)
        float(phi_from_cross(_directions(X, offs, i, sigmas, normalize, modules[i], side).mT @ Pk)
              [-1, -1])
        for i in range(n)
    ]  # fmt: skip
    do_loo = n <= 256 if loo is None else loo
    loo_err = _leave_one_out(X, ranks, kk) if do_loo else None
    first = modules[0]
    return SharedResult(
        layer=first.layer if layer is None else layer,
        kind=first.kind if kind is None else kind,
        side=side,
        dim=d,
        labels=[m.source for m in modules] if labels is None else [str(x) for x in labels],
        ranks=ranks,
        normalize=normalize,
        energy=energy.tolist(),
        nulls={
            "spectra": spectra.tolist(),
            "layers": None if layer_null is None else layer_null.tolist(),
            "mean": mean_curve.tolist(),
        },
        random_fixed=[min(1.0, (j + 1) / d) for j in range(K)],
        k=kk,
        loo_error=loo_err,
        loo_random=math.sqrt(max(0.0, 1.0 - kk / d)),
        phi=phi,
        phi_random=[max(r, kk) / d for r in ranks],
        draws=draws,
        basis=P,
    )


def _leave_one_out(X: torch.Tensor, ranks: list[int], k: int) -> list[float]:
    """``sqrt(1 − ‖P_{−i}ᵀ X_i‖² / ‖X_i‖²)`` per block ``X_i`` of ``X``, ``P_{−i}`` the top-``k``
    left singular vectors of ``X`` without block ``i``.

    ``m = Σ k_i <= d``: one thin QR ``X = Q R``; then ``X_{−i} = Q R_{−i}`` and ``X_i = Q R_i``,
    so everything happens in ``R^m`` (an ``m × m`` SVD per adapter). ``m > d``: the ``d × d``
    Gram matrix ``X Xᵀ − X_i X_iᵀ`` and its eigenvectors (``eigh``) per adapter."""
    d, m = X.shape
    offs = np.cumsum([0, *ranks])
    out = []
    if m <= d:
        _, R = torch.linalg.qr(X)  # (m, m)
        base, blocks = R, [R[:, offs[i] : offs[i + 1]] for i in range(len(ranks))]
    else:
        G = gram(_chunks([X]), d)  # (d, d)
        blocks = [X[:, offs[i] : offs[i + 1]] for i in range(len(ranks))]
    for i, Xi in enumerate(blocks):
        if m <= d:
            rest = torch.cat([base[:, : offs[i]], base[:, offs[i + 1] :]], dim=1)
            U = torch.linalg.svd(rest, full_matrices=False)[0][:, :k]
        else:
            Xn = Xi.numpy()
            U = torch.from_numpy(_top_eigh(G - Xn @ Xn.T, k)[1])
        kept = float((U.mT @ Xi).square().sum() / Xi.square().sum())
        out.append(math.sqrt(max(0.0, 1.0 - kept)))
    return out


def _pad(curve: np.ndarray, K: int) -> np.ndarray:
    """A cumulative curve extended to length ``K`` with its last value (a null collection can
    span fewer dimensions than the real one)."""
    if curve.size >= K:
        return curve[:K]
    return np.concatenate([curve, np.full(K - curve.size, curve[-1] if curve.size else 0.0)])


def _mean_directions(
    modules: Sequence[LoraModule],
    side: Side,
    normalize: bool,
    sigmas: list[torch.Tensor],
    K: int,
) -> torch.Tensor:
    """Top ``K`` singular directions of ``ΔW̄ = (1/N) Σ c_i ΔW_i`` (``c_i = 1/‖ΔW_i‖_F`` with
    ``normalize``): ``(d, K)``, ``d`` the side's dimension.

    ``Σ r_i <= min(d_out, d_in)``: the exact factored SVD of the stacked factors
    ``[c_1 s_1 B_1, …] @ [A_1; …]``. Wider: the factored form is no longer cheaper, so ``ΔW̄`` is
    accumulated densely (float64 GEMMs, chunk by chunk) and the directions are the top
    eigenvectors of ``ΔW̄ᵀΔW̄`` (right) or ``ΔW̄ΔW̄ᵀ`` (left)."""
    weights = []
    for m, S in zip(modules, sigmas, strict=True):
        c = (1.0 / float(torch.linalg.vector_norm(S))) if normalize else 1.0
        weights.append(m.scale * c / len(modules))
    width = sum(m.A.shape[0] for m in modules)
    d_out, d_in = modules[0].shape
    if width <= min(d_out, d_in):
        A = torch.cat([m.A.to(torch.float64) for m in modules], 0)  # (Σr, d_in)
        B = torch.cat([m.B.to(torch.float64) * w for m, w in zip(modules, weights, strict=True)], 1)
        svd = factored_svd(A, B, 1.0)
        D = svd.V if side == "right" else svd.U
        return D[:, :K]
    mean = np.zeros((d_out, d_in))
    step = max(1, 1024 // max(1, modules[0].A.shape[0]))
    for lo in range(0, len(modules), step):
        part = range(lo, min(lo + step, len(modules)))
        B = torch.cat([modules[i].B.to(torch.float64) * weights[i] for i in part], 1)
        A = torch.cat([modules[i].A.to(torch.float64) for i in part], 0)
        mean += B.numpy() @ A.numpy()
    M = mean if side == "left" else mean.T  # directions = left singular vectors of M
    return torch.from_numpy(_top_eigh(gram([M], M.shape[0]), K)[1])


def shared_from_adapters(
    adapters: Sequence[Any],
    *,
    layer: int,
    module: str,
    labels: Sequence[str] | None = None,
    **options: Any,
) -> SharedResult:
    """:func:`shared_subspace` of module kind (or name) ``module`` at ``layer`` across
    ``adapters`` (:class:`~lorascope.adapter.Adapter`), with the ``layers`` null drawn from the
    same kind at the adapters' other layers. Every adapter must have exactly one such module
    (:meth:`~lorascope.adapter.Adapter.select` raises a one-line error otherwise)."""
    mods = []
    for ad in adapters:
        sel = ad.select(layer=layer, module=module)
        if len(sel) != 1:
            raise LoraScopeError(
                f"{ad.path}: {len(sel)} modules match layer {layer}, module {module!r}; "
                "name one (e.g. --module with the full name)"
            )
        mods.append(sel[0])
    others: dict[int, list[LoraModule | None]] = {}
    layers = sorted({m.layer for ad in adapters for m in ad.select(module=module)} - {None})
    for other in layers:
        row: list[LoraModule | None] = []
        for ad in adapters:
            found = [m for m in ad.select(module=module) if m.layer == other]
            row.append(found[0] if len(found) == 1 else None)
        others[other] = row
    names = [str(ad.path) for ad in adapters] if labels is None else labels
    return shared_subspace(mods, others=others, labels=names, layer=layer, **options)
