"""Intruder dimensions: new high-ranking singular directions that LoRA puts into ``W + ΔW``.

Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"
(arXiv:2410.21228), Definition 1: a singular vector ``y_j`` of the fine-tuned ``W + ΔW`` is an
*intruder dimension* iff ``max_i |cos(y_j, x_i)| < ε``, with ``x_i`` the singular vectors of the
pre-trained ``W``. The authors' code (``reeceshuttle/intruder-dimensions``,
``find_intruder_dimensions.py``) and peft's ``reduce_intruder_dimension`` both take the *left*
singular vectors of the thin SVDs (``torch.linalg.svd(..., full_matrices=False)``), the absolute
cosine, the maximum over all ``min(d_out, d_in)`` vectors of ``W``, the top ``k = 10`` vectors of
``W + ΔW``, and ``ε = 0.5`` by default; so do we (the right side is an option).

No SVD of ``W + ΔW`` is needed. With ``W``'s thin SVD ``W = U diag(S) Vᵀ`` (computed once per base
weight and cacheable across adapters: the definition needs *all* of ``W``'s singular vectors) and
orthonormal complements ``P ⟂ U`` of ``B``'s columns and ``Q ⟂ V`` of ``A``'s rows (both empty
for a square ``W``, whose ``U`` and ``V`` are complete; Brand 2006's rank-``r`` SVD update),

    W + s·B A = [U P] · K · [V Q]ᵀ,   K = [[diag(S), 0], [0, 0]] + s·[UᵀB; PᵀB]·[AV, AQ],

exactly. So the singular values of ``W + ΔW`` are ``K``'s, its left singular vectors are
``[U P]·u_K``, and ``|cos(y_j, u_i)| = |u_K[i, j]|``: the similarity matrix is read off ``K``'s
singular vectors. Their top ``k`` come from ARPACK on ``K`` as a linear operator costing
``O((min(d_out, d_in) + r)·r)`` per product, instead of the ``O(d_out·d_in·min(d_out, d_in))`` of a
dense SVD of ``W + ΔW`` (the ``exact`` method, which forms ``W + ΔW`` and is kept for checking);
setting ``K`` up costs ``O(d_out·d_in·r)`` (``UᵀB``, ``AV``).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

from lorascope.adapter import Adapter, LoraModule
from lorascope.analysis._common import Device, checked_weight, module_svdvals, update_fields
from lorascope.cache import SpectralCache
from lorascope.columns import (
    Column,
    Results,
    Tabular,
    ident,
    ident_columns,
    new_figure,
    png_bytes,
)
from lorascope.errors import LoraScopeError, ShapeError, ZeroUpdateError
from lorascope.linalg import SVD, brand_update_factors, top_singular
from lorascope.update import dora_gain, merged_weight, with_base

__all__ = [
    "DEFAULT_K",
    "DEFAULT_EPSILON",
    "IntruderSimilarity",
    "IntruderResult",
    "SVDCache",
    "weight_svd",
    "intruder_similarity",
    "count_intruders",
    "module_intruders",
    "intruders",
]

log = logging.getLogger(__name__)

DEFAULT_K = 10  # the paper's and its code's top-k
DEFAULT_EPSILON = 0.5  # the authors' script and peft's default threshold

Side = Literal["left", "right"]
Method = Literal["auto", "exact", "iterative"]


class IntruderSimilarity(NamedTuple):
    """What :func:`intruder_similarity` returns.

    ``similarity`` is ``(k, p)``: entry ``[j, i]`` is ``|cos(y_j, x_i)|`` between the ``j``-th
    singular vector of ``W + ΔW`` and the ``i``-th of ``W`` (``p = min(d_out, d_in)``, both
    ordered by singular value, from 0). ``singular_values`` is ``(k,)``: ``σ_j(W + ΔW)``.
    ``method`` is the route actually taken (``"exact"`` or ``"iterative"``).
    """

    similarity: torch.Tensor
    singular_values: torch.Tensor
    method: str


def weight_svd(W: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> SVD:
    """Thin SVD of a base weight, all ``p = min(d_out, d_in)`` triplets, deterministic signs.

    ``U (d_out, p)``, ``S (p,)`` descending, ``V (d_in, p)``: the ``x_i`` of the intruder
    definition (Shuttleworth et al. 2024, Def. 1). ``O(d_out·d_in·p)``: the one unavoidable dense
    factorization, so :class:`SVDCache` keeps it for reuse across adapters.
    """
    return top_singular(W, min(W.shape), method="exact", dtype=dtype)


class SVDCache:
    """Thin SVDs of base weights (:func:`weight_svd`), reused across modules and adapters.

    Keyed by content, not by name: the shape, dtype and a BLAKE2 digest of the stored bytes of
    ``W`` (hashing costs ``O(d_out·d_in)``, the SVD it saves ``O(d_out·d_in·min(d_out, d_in))``),
    plus the computation dtype and device. Two adapters of one base model share every entry; a
    different weight never hits. ``hits`` and ``misses`` count lookups. Holds
    ``(d_out + d_in + 1)·p`` numbers per weight: pass ``max_items`` to bound it (oldest dropped).
    """

    def __init__(self, max_items: int | None = None) -> None:
        self.max_items = max_items
        self._store: dict[tuple, SVD] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    @staticmethod
    def key(W: torch.Tensor, dtype: torch.dtype, device: torch.device) -> tuple:
        raw = W.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        digest = hashlib.blake2b(raw.data, digest_size=20).hexdigest()
        return (tuple(W.shape), str(W.dtype), digest, str(dtype), str(device))

    def get(self, W: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> SVD:
        """:func:`weight_svd` of ``W`` (on ``W``'s device), from the cache when it holds it."""
        k = self.key(W, dtype, W.device)
        svd = self._store.get(k)
        if svd is not None:
            self.hits += 1
            return svd
        self.misses += 1
        svd = weight_svd(W, dtype=dtype)
        if self.max_items is not None and len(self._store) >= self.max_items:
            self._store.pop(next(iter(self._store)))
        self._store[k] = svd
        return svd


def _top_left_iterative(
    S: np.ndarray, X: np.ndarray, Yt: np.ndarray, k: int, tol: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` left singular vectors ``(p + rb, k)`` and values ``(k,)`` of
    ``K = D + X Yt`` (``D`` = ``diag(S)`` zero-padded) by ARPACK (``scipy.sparse.linalg.svds``);
    each product costs ``O((p + r)·r)``. Falls back to a dense SVD of ``K`` if ARPACK fails."""
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, svds

    p = S.shape[0]
    shape = (X.shape[0], Yt.shape[1])

    def mm(x: np.ndarray) -> np.ndarray:  # K @ x, x (p + ra,) or (p + ra, c)
        out = X @ (Yt @ x)  # (p + rb, ...)
        out[:p] += S.reshape((p,) + (1,) * (x.ndim - 1)) * x[:p]
        return out

    def rmm(y: np.ndarray) -> np.ndarray:  # Kᵀ @ y
        out = Yt.T @ (X.T @ y)  # (p + ra, ...)
        out[:p] += S.reshape((p,) + (1,) * (y.ndim - 1)) * y[:p]
        return out

    def dense() -> tuple[np.ndarray, np.ndarray]:
        K = mm(np.eye(shape[1]))  # (p + rb, p + ra)
        u, s, _ = np.linalg.svd(K, full_matrices=False)
        return u[:, :k], s[:k]

    if k >= min(shape):  # ARPACK needs k < min(shape): K is small enough to decompose whole
        return dense()
    op = LinearOperator(shape, matvec=mm, rmatvec=rmm, matmat=mm, rmatmat=rmm, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(min(shape))
    try:
        u, s, _ = svds(op, k=k, tol=tol, v0=v0, solver="arpack")
    except ArpackNoConvergence:
        log.warning("ARPACK did not converge (k=%d, shape=%s); dense SVD of K instead", k, shape)
        return dense()
    order = np.argsort(s)[::-1]
    return u[:, order], s[order]


def intruder_similarity(
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float = 1.0,
    *,
    k: int = DEFAULT_K,
    side: Side = "left",
    method: Method = "auto",
    tol: float = 1e-10,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    base_svd: SVD | None = None,
    tuned: torch.Tensor | None = None,
) -> IntruderSimilarity:
    """``|cos|`` between the top-``k`` singular vectors of ``W + s·B A`` and all of ``W``'s.

    Parameters
    ----------
    W : torch.Tensor
        ``(d_out, d_in)`` pre-trained weight (any float dtype; upcast to ``dtype``).
    A, B : torch.Tensor
        ``(r, d_in)`` and ``(d_out, r)`` LoRA factors; ``ΔW = scale · B @ A``.
    scale : float
        ``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``).
    k : int
        How many top singular vectors of ``W + ΔW`` to test; capped at ``p = min(d_out, d_in)``.
    side : {"left", "right"}
        Left (output-space, ``R^{d_out}``, the paper's) or right (input-space) singular vectors.
    method : {"auto", "exact", "iterative"}
        ``"exact"``: dense SVD of the formed ``W + ΔW``, the literal definition
        (``O(d_out·d_in·p)``). ``"iterative"``: ARPACK on the structured ``K`` (module
        docstring), Ritz values to relative tolerance ``tol``, ``O((p + r)·r)`` per product.
        ``"auto"``: iterative unless ``p < max(64, 4k)``, where a dense SVD costs nothing.
    tol : float
        ARPACK's relative tolerance; similarities are then accurate to about
        ``tol · σ_1 / gap`` (``gap``: the distance of ``σ_j`` to its neighbours).
    seed : int
        Seeds ARPACK's start vector.
    base_svd : SVD, optional
        ``W``'s :func:`weight_svd` (e.g. from :class:`SVDCache`); computed when not given.
    tuned : torch.Tensor, optional
        ``(d_out, d_in)``: the fine-tuned weight when it is not ``W + s·B A`` (DoRA's
        ``diag(g)(W + s·B A)``, :func:`lorascope.update.merged_weight`); then it is decomposed
        densely (the exact method) and ``A``, ``B``, ``scale`` are not used.

    Returns
    -------
    IntruderSimilarity
        ``similarity (k, p)`` with entries in ``[0, 1]``, ``singular_values (k,)`` of
        ``W + ΔW``, and the method used.

    Notes
    -----
    Shuttleworth et al. 2024, Def. 1: ``y_j`` is an intruder dimension iff
    ``max_i similarity[j, i] < ε`` (:func:`count_intruders`). Rows of ``similarity`` sum (in
    squares) to ``1 - ‖y_j outside span(U)‖²``: below 1 only when ``W`` is tall (left side) or
    wide (right side) and ``ΔW`` leaves ``W``'s column (row) space.

    Examples
    --------
    >>> import torch
    >>> W = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    >>> A = torch.tensor([[0.0, 0.0, 1.0]]); B = torch.tensor([[0.0], [0.0], [5.0]])
    >>> sim = intruder_similarity(W, A, B, k=2).similarity  # σ_3 = 1 -> 6: e_3 moves to the top
    >>> sim
    tensor([[0., 0., 1.],
            [1., 0., 0.]], dtype=torch.float64)
    """
    if W.ndim != 2 or A.ndim != 2 or B.ndim != 2:
        raise ShapeError(f"W, A, B must be matrices, got {W.ndim}-D, {A.ndim}-D, {B.ndim}-D")
    if tuple(W.shape) != (B.shape[0], A.shape[1]) or A.shape[0] != B.shape[1]:
        raise ShapeError(
            f"W {tuple(W.shape)} does not match ΔW = B {tuple(B.shape)} @ A {tuple(A.shape)}"
        )
    if k < 1:
        raise LoraScopeError(f"k must be at least 1, got {k}")
    if not (math.isfinite(tol) and tol >= 0):
        raise LoraScopeError(f"tol must be a finite number >= 0, got {tol}")
    if side not in ("left", "right"):
        raise LoraScopeError(f"side must be 'left' or 'right', got {side!r}")
    if method not in ("auto", "exact", "iterative"):
        raise LoraScopeError(f"method must be auto, exact or iterative, got {method!r}")
    svd = base_svd if base_svd is not None else weight_svd(W, dtype=dtype)
    A = A.to(device=svd.U.device, dtype=dtype)
    B = B.to(device=svd.U.device, dtype=dtype)
    if side == "right":  # (W + s·B A)ᵀ = Wᵀ + s·Aᵀ Bᵀ, and Wᵀ = V S Uᵀ
        W, A, B, svd = W.mT, B.mT, A.mT, SVD(svd.V, svd.S, svd.U)
    p = svd.S.shape[0]
    k = min(k, p)
    if method == "auto":
        method = "exact" if p < max(64, 4 * k) else "iterative"
    if tuned is not None:
        method = "exact"
    if method == "exact":
        if tuned is None:
            Wt = W.to(device=svd.U.device, dtype=dtype) + scale * (B @ A)  # (m, n): the definition
        else:
            Wt = tuned.to(device=svd.U.device, dtype=dtype)
            Wt = Wt.mT if side == "right" else Wt
        Y, sv, _ = torch.linalg.svd(Wt, full_matrices=False)  # (m, p'), (p',)
        sim = (Y[:, :k].mT @ svd.U).abs()  # (k, m) @ (m, p) -> (k, p)
        return IntruderSimilarity(sim.clamp_(0.0, 1.0), sv[:k], "exact")
    X, Yt = brand_update_factors(svd, A, B)  # K = D + s·X Yt
    u, s = _top_left_iterative(
        svd.S.double().cpu().numpy(),
        (scale * X).double().cpu().numpy(),
        Yt.double().cpu().numpy(),
        k,
        tol,
        seed,
    )
    sim = torch.from_numpy(np.abs(u[:p].T).copy()).to(device=svd.U.device, dtype=dtype)  # (k, p)
    sv = torch.from_numpy(s.copy()).to(device=svd.U.device, dtype=dtype)
    return IntruderSimilarity(sim.clamp_(0.0, 1.0), sv, "iterative")


def count_intruders(max_similarity: torch.Tensor | np.ndarray, epsilon: float) -> int:
    """Number of ``j`` with ``max_i |cos(y_j, x_i)| < ε`` (strict, as in Def. 1 and the
    authors' code), for the ``(k,)`` row maxima of an intruder similarity matrix."""
    return int((np.asarray(max_similarity) < epsilon).sum())


_MATRIX_TIDY = (
    *ident_columns(),
    Column("j", doc="rank of the singular vector of W + ΔW"),
    Column("i", doc="rank of the singular vector of W"),
    Column("similarity", "|cos|", doc="|cos(y_j, x_i)|"),
)


@dataclass
class IntruderResult(Tabular):
    """Intruder dimensions of one module (Shuttleworth et al. 2024, Def. 1).

    Indices are 1-based ranks, as in the paper's figures: ``j`` for ``W + ΔW``, ``i`` for ``W``.

    Attributes
    ----------
    shape : tuple[int, int]
        ``(d_out, d_in)``.
    side : str
        ``"left"`` (the paper's) or ``"right"`` singular vectors.
    k : int
        Top singular vectors of ``W + ΔW`` tested, ``<= min(d_out, d_in)``.
    method : str
        ``"exact"`` (dense SVD of ``W + ΔW``) or ``"iterative"`` (ARPACK on ``K``).
    epsilon : list[float]
        Thresholds ε.
    counts : list[int]
        Intruder dimensions among the top ``k`` at each ε.
    intruders : list[list[int]]
        Their ranks ``j`` at each ε.
    max_similarity : list[float]
        ``max_i |cos(y_j, x_i)|`` for ``j = 1..k``.
    best_match : list[int]
        The ``i`` attaining it.
    singular_values, base_singular_values : list[float]
        ``σ_j(W + ΔW)`` and ``σ_j(W)`` for ``j = 1..k``.
    similarity : numpy.ndarray
        ``(k, min(d_out, d_in))``: ``|cos(y_j, x_i)|`` at ``[j - 1, i - 1]``.
    """

    module: str
    layer: int | None
    kind: str
    rank: int
    shape: tuple[int, int]
    side: str
    k: int
    method: str
    epsilon: list[float]
    counts: list[int]
    intruders: list[list[int]]
    max_similarity: list[float]
    best_match: list[int]
    singular_values: list[float]
    base_singular_values: list[float]
    similarity: np.ndarray
    family: str = "lora"
    update: str = "full"

    MATRIX_TIDY = _MATRIX_TIDY  # ``--csv --matrix``: one row per entry of ``similarity``

    def table_columns(self) -> tuple[Column, ...]:
        eps = self.epsilon
        counts = tuple(
            Column(f"intruders_eps_{e:g}", f"intruders ε={e:g}", get=lambda r, t=t: r.counts[t])
            for t, e in enumerate(eps)
        )
        return (
            *ident_columns(),
            *counts,
            Column(
                "intruders",
                f"at j (ε={eps[0]:g})",
                get=lambda r: ",".join(map(str, r.intruders[0])) or None,
                doc="ranks j of the intruders at the first ε",
            ),
            Column("min_max_similarity", "min max|cos|", get=lambda r: min(r.max_similarity)),
            Column(
                "sigma1_ratio",
                "σ1(W+ΔW)/σ1(W)",
                get=lambda r: r.singular_values[0] / r.base_singular_values[0],
            ),
        )

    def tidy_columns(self) -> tuple[Column, ...]:
        return (
            *ident_columns(),
            Column("j", doc="rank of the singular vector y_j of W + ΔW"),
            Column("singular_value", "σ_j(W+ΔW)"),
            Column("max_similarity", "max|cos|", doc="max_i |cos(y_j, x_i)|"),
            Column("best_match", "best i", doc="the i attaining it"),
            *(
                Column(f"intruder_eps_{e:g}", f"intruder ε={e:g}", doc="1 if max|cos| < ε")
                for e in self.epsilon
            ),
        )

    def tidy(self) -> Iterator[dict]:
        base = ident(self)
        for j in range(self.k):
            ms = self.max_similarity[j]
            yield {
                **base,
                "j": j + 1,
                "singular_value": self.singular_values[j],
                "max_similarity": ms,
                "best_match": self.best_match[j],
                **{f"intruder_eps_{e:g}": int(ms < e) for e in self.epsilon},
            }

    def matrix_rows(self) -> Iterator[list]:
        """Rows of :attr:`MATRIX_TIDY`: ``j``, ``i`` (from 1) and ``|cos(y_j, x_i)|``."""
        base = list(ident(self).values())
        for j, row in enumerate(self.similarity):
            for i, c in enumerate(row):
                yield [*base, j + 1, i + 1, float(c)]

    def caption(self) -> str:
        return (
            f"intruder dimensions of W + ΔW · {self.module} · {self.family} · rank {self.rank} · "
            f"{self.side} singular vectors, top {self.k}"
        )

    def png(self) -> bytes:
        """The ``|cos|`` heatmap (:func:`lorascope.plot.plot_intruders`) as PNG bytes."""
        from lorascope.plot import plot_intruders

        fig = new_figure(5.0, 0.16 * self.k + 1.4)
        plot_intruders(self, fig.add_subplot())
        return png_bytes(fig)

    def to_dict(self, matrix: bool = False) -> dict:
        """JSON-ready; the ``(k, p)`` similarity matrix only with ``matrix=True``."""
        d = {
            "module": self.module,
            "layer": self.layer,
            "kind": self.kind,
            "rank": self.rank,
            "shape": list(self.shape),
            "side": self.side,
            "k": self.k,
            "method": self.method,
            "epsilon": list(self.epsilon),
            "counts": list(self.counts),
            "intruders": [list(x) for x in self.intruders],
            "max_similarity": list(self.max_similarity),
            "best_match": list(self.best_match),
            "singular_values": list(self.singular_values),
            "base_singular_values": list(self.base_singular_values),
            "family": self.family,
            "update": self.update,
        }
        if matrix:
            d["similarity"] = self.similarity.tolist()
        return d


def _epsilons(epsilon: float | Sequence[float]) -> list[float]:
    eps = [float(epsilon)] if isinstance(epsilon, int | float) else [float(e) for e in epsilon]
    if not eps or not all(0.0 < e <= 1.0 for e in eps):
        raise LoraScopeError(f"epsilon must be in (0, 1], got {eps}")
    return eps


def module_intruders(
    module: LoraModule,
    W: torch.Tensor,
    *,
    k: int = DEFAULT_K,
    epsilon: float | Sequence[float] = DEFAULT_EPSILON,
    side: Side = "left",
    method: Method = "auto",
    tol: float = 1e-10,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
    cache: SVDCache | SpectralCache | None = None,
) -> IntruderResult:
    """Intruder dimensions of one module against its pre-trained weight.

    Parameters
    ----------
    module : LoraModule
        ``ΔW = s·B A`` of shape ``(d_out, d_in)``. A DoRA module is compared through its
        merged weight ``diag(g)(W + s·B A)`` (:mod:`lorascope.update`), decomposed densely.
    W : torch.Tensor
        ``(d_out, d_in)`` pre-trained weight, nn.Linear orientation (e.g.
        ``BaseWeights.weight_for(module)``, which transposes Conv1D and slices fused parts).
    k, side, method, tol, seed, dtype :
        See :func:`intruder_similarity`.
    epsilon : float or sequence of float
        Threshold(s) ε in ``(0, 1]``; ``y_j`` is an intruder iff ``max_i |cos| < ε``.
    cache : SVDCache or SpectralCache, optional
        Reuses ``W``'s SVD across calls (e.g. several adapters of one base model): in memory
        (:class:`SVDCache`), or on disk across runs (:class:`lorascope.cache.SpectralCache`).

    Returns
    -------
    IntruderResult

    Raises
    ------
    ShapeError
        ``W`` does not have ΔW's shape. ZeroUpdateError: ``ΔW`` or ``W`` is all zero.
    """
    eps = _epsilons(epsilon)
    W = checked_weight(module, W)
    module_svdvals(module, dtype=dtype, device=device)  # refuses an all-zero or non-finite ΔW
    if device is not None:
        W = W.to(device)
    if not bool(W.any()):
        raise ZeroUpdateError(f"{module.tensor_name()}: the base weight W is all zero")
    svd = cache.get(W, dtype=dtype) if cache is not None else weight_svd(W, dtype=dtype)
    tuned = None
    if module.is_dora and module.update != "dora-rank-r":
        g = dora_gain(module, W, dtype=dtype)  # one pass over W for the merge and the label
        tuned = merged_weight(module, W, dtype=dtype, gain=g)
        module = with_base(module, W, dtype=dtype, gain=g)
    res = intruder_similarity(
        W,
        module.A,
        module.B,
        module.scale,
        k=k,
        side=side,
        method=method,
        tol=tol,
        seed=seed,
        dtype=dtype,
        base_svd=svd,
        tuned=tuned,
    )
    sim = res.similarity.cpu().double().numpy()  # (k, p)
    best = sim.max(axis=1)  # (k,)
    return IntruderResult(
        **update_fields(module),
        module=module.key,
        layer=module.layer,
        kind=module.kind,
        rank=module.rank,
        shape=module.shape,
        side=side,
        k=int(sim.shape[0]),
        method=res.method,
        epsilon=eps,
        counts=[count_intruders(best, e) for e in eps],
        intruders=[[int(j) + 1 for j in np.flatnonzero(best < e)] for e in eps],
        max_similarity=[float(x) for x in best],
        best_match=[int(i) + 1 for i in sim.argmax(axis=1)],
        singular_values=[float(x) for x in res.singular_values.cpu()],
        base_singular_values=[float(x) for x in svd.S[: sim.shape[0]].cpu()],
        similarity=sim,
    )


def intruders(
    adapter: Adapter,
    base,
    *,
    layer: int | None = None,
    module: str | None = None,
    k: int = DEFAULT_K,
    epsilon: float | Sequence[float] = DEFAULT_EPSILON,
    side: Side = "left",
    method: Method = "auto",
    tol: float = 1e-10,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
    cache: SVDCache | SpectralCache | None = None,
) -> Results[IntruderResult]:
    """:func:`module_intruders` for every selected module of ``adapter``.

    ``base`` is a :class:`lorascope.formats.BaseWeights` (or anything with
    ``weight_for(module) -> Tensor``); only the weights of the selected modules are read, one at
    a time. Pass one :class:`SVDCache` to several calls to factor each base weight once (without
    one nothing is kept: a cached SVD of a ``12288²`` weight holds 2.4 GB in float64), or a
    :class:`lorascope.cache.SpectralCache` to keep them on disk for later runs.
    """
    eps = _epsilons(epsilon)  # fail before reading anything
    if k < 1:
        raise LoraScopeError(f"k must be at least 1, got {k}")
    fingerprint = getattr(base, "fingerprint", lambda m: None)
    tag = getattr(cache, "tag", lambda W, source: W)  # a SpectralCache keys W by its source
    return Results(
        module_intruders(
            m,
            tag(base.weight_for(m), fingerprint(m)),
            k=k,
            epsilon=eps,
            side=side,
            method=method,
            tol=tol,
            seed=seed,
            dtype=dtype,
            device=device,
            cache=cache,
        )
        for m in adapter.select(layer=layer, module=module)
    )
