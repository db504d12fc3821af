"""How similar are two adapters' subspaces? Hu et al. 2021 §7.2, Figures 3, 4, 6–8.

φ(i, j) = ‖U_iᵀ V_j‖_F² / min(i, j) between the top-i directions of one update and the top-j
of another (different ranks, seeds, checkpoints), or of the pre-trained ``W`` (Figure 8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from lorascope.adapter import Adapter, LoraModule
from lorascope.analysis._common import (
    Device,
    batched_svds,
    checked_weight,
    map_modules,
    module_svd,
    pair_modules,
    update_fields,
)
from lorascope.errors import ShapeError
from lorascope.linalg import (
    balance,
    expected_random_similarity,
    phi_from_cross,
    random_similarity,
    singular_basis,
    subspace_similarity,
    top_singular,
)
from lorascope.update import with_base

__all__ = [
    "Factor",
    "SimilarityResult",
    "subspace_basis",
    "module_similarity",
    "similarity",
    "weight_similarity",
]

Factor = Literal["A", "B", "right", "left"]
FACTORS: tuple[str, ...] = ("A", "B", "right", "left")


@dataclass
class SimilarityResult:
    """φ grid for one pair of modules.

    ``phi[i-1, j-1]`` is φ(i, j) for ``i <= rank`` directions of the first update and
    ``j <= rank_b`` of the second; ``random_phi`` is the same grid for two Haar-random
    subspaces of ``R^dim`` (seeded), and ``expected_random`` its closed-form mean
    ``max(i, j)/dim``.
    """

    module: str
    layer: int | None
    kind: str
    rank: int
    rank_b: int
    factor: str
    dim: int
    phi: np.ndarray
    random_phi: np.ndarray | None = None
    module_b: str | None = None
    family: str = "lora"
    update: str = "full"

    @property
    def expected_random(self) -> np.ndarray:
        return expected_random_similarity(self.dim, *self.phi.shape)

    def to_dict(self) -> dict:
        return {
            "module": self.module,
            "module_b": self.module_b or self.module,
            "layer": self.layer,
            "kind": self.kind,
            "rank": self.rank,
            "rank_b": self.rank_b,
            "factor": self.factor,
            "dim": self.dim,
            "phi": self.phi.tolist(),
            "random_phi": None if self.random_phi is None else self.random_phi.tolist(),
            "expected_random": self.expected_random.tolist(),
            "family": self.family,
            "update": self.update,
        }


def subspace_basis(
    module: LoraModule,
    factor: Factor = "A",
    *,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
) -> torch.Tensor:
    """Ordered orthonormal directions of one module that φ compares.

    - ``"A"``: right-singular vectors of ``A`` (``(d_in, r)``), the paper's default (§7.2);
    - ``"B"``: left-singular vectors of ``B`` (``(d_out, r)``);
    - ``"right"`` / ``"left"``: right (``(d_in, k)``) / left (``(d_out, k)``) singular vectors of
      ``ΔW = s·B A`` itself, from the factored SVD.

    Only ``"right"``/``"left"`` are invariant to how the product is split between the factors
    (``B → B G, A → G⁻¹ A``); ``"A"``/``"B"`` order directions by one factor's singular values,
    as the paper does, so they change with ``G`` except at ``i = r``.
    """
    if factor == "A":
        A = module.A if device is None else module.A.to(device)
        return singular_basis(A, "right", dtype=dtype)
    if factor == "B":
        B = module.B if device is None else module.B.to(device)
        return singular_basis(B, "left", dtype=dtype)
    if factor in ("right", "left"):
        svd = module_svd(module, dtype=dtype, device=device)
        return svd.V if factor == "right" else svd.U
    raise ValueError(f"factor must be one of {FACTORS}, got {factor!r}")


# Above this condition number of a factor, φ comes from explicit singular bases instead.
_FAST_COND_MAX = 1e6


def _factor_phi(
    a: LoraModule,
    b: LoraModule,
    factor: str,
    max_i: int | None,
    max_j: int | None,
    *,
    dtype: torch.dtype,
    device: Device,
) -> torch.Tensor | None:
    """φ on the ``"A"``/``"B"`` directions without forming either ``n × r`` basis.

    For a tall factor ``X`` (``Aᵀ`` or ``B``, ``(n, p)``) with ``X = U S Vᵀ``, the ordered basis
    is ``U = X V S⁻¹``, and ``S``, ``V`` come from the SVD of the ``p×p`` triangle ``R`` of
    ``X = Q R`` (only ``R`` is formed). Then ``U_aᵀ U_b = S_a⁻¹ V_aᵀ (X_aᵀ X_b) V_b S_b⁻¹``:
    one ``(p, n) @ (n, q)`` product instead of two ``n × r`` SVDs (2-3× less work at
    ``n = 12288, r = 64``). Recovering ``U`` through ``S⁻¹`` costs accuracy ``~eps·cond(X)``, so
    this returns ``None`` (use the bases) for a factor with ``cond > 1e6`` or a wide factor.
    """
    if factor not in ("A", "B"):
        return None
    Xs = []
    for m in (a, b):
        X = m.A.mT if factor == "A" else m.B  # (n, r)
        if device is not None:
            X = X.to(device)
        if X.shape[0] < X.shape[1]:
            return None
        Xs.append(balance(X, dtype)[0])  # U = X V S⁻¹ does not depend on X's scale
    parts = []
    for X in Xs:
        _, R = torch.linalg.qr(X, mode="r")  # (r, r)
        _, S, Vh = torch.linalg.svd(R)  # R = Ur S Vᵀ, so X = (Q Ur) S Vᵀ
        if not bool(S[-1] > S[0] / _FAST_COND_MAX):  # also catches S = 0 and NaN
            return None
        parts.append(Vh.mT / S)  # (r, r): V S⁻¹, so U = X V S⁻¹
    Pa, Pb = parts
    p, q = Pa.shape[1], Pb.shape[1]
    i = p if max_i is None else min(max_i, p)
    j = q if max_j is None else min(max_j, q)
    cross = Xs[0].mT @ Xs[1]  # (p, n) @ (n, q) -> (p, q)
    return phi_from_cross(Pa[:, :i].mT @ cross @ Pb[:, :j])  # M = U_aᵀ U_b, (i, j)


def module_similarity(
    a: LoraModule,
    b: LoraModule,
    factor: Factor = "A",
    *,
    max_i: int | None = None,
    max_j: int | None = None,
    baseline: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
) -> SimilarityResult:
    """φ(i, j) between module ``a``'s top-i and module ``b``'s top-j directions (eq. 4).

    Parameters
    ----------
    a, b : LoraModule
        Two updates of the same weight (e.g. ``r = 8`` and ``r = 64``, or two seeds).
    factor : {"A", "B", "right", "left"}
        Which directions (see :func:`subspace_basis`); the paper uses ``"A"``.
    max_i, max_j : int, optional
        Grid size, at most the ranks; default the full ranks.
    baseline : bool
        Also compute the grid for two Haar-random subspaces of the same dimension (seeded by
        ``seed``), the paper's Figure 4 random panel.

    Returns
    -------
    SimilarityResult
        ``phi`` of shape ``(max_i, max_j)``, values in [0, 1].
    """
    if a.d_in != b.d_in or a.d_out != b.d_out:
        raise ShapeError(
            f"cannot compare {a.tensor_name()} ΔW {a.shape} with {b.tensor_name()} ΔW {b.shape}"
        )
    if a.scale == 0 or b.scale == 0:
        # φ on A or B alone would ignore a zero scale; route through the checked SVD.
        module_svd(a if a.scale == 0 else b, dtype=dtype, device=device)
    phi = _factor_phi(a, b, factor, max_i, max_j, dtype=dtype, device=device)
    if phi is None:
        Ua = subspace_basis(a, factor, dtype=dtype, device=device)  # (n, p)
        Ub = subspace_basis(b, factor, dtype=dtype, device=device)  # (n, q)
        phi = subspace_similarity(Ua, Ub, max_i, max_j)  # (i, j)
    n = a.d_in if factor in ("A", "right") else a.d_out
    rnd = None
    if baseline:
        g = torch.Generator().manual_seed(seed)
        # φ of two Haar-random subspaces, drawn in O(j³) (no n-long bases; same law)
        rnd = random_similarity(n, *phi.shape, g, dtype=dtype).numpy()
    return SimilarityResult(
        **update_fields(a, b),
        module=a.key,
        module_b=b.key,
        layer=a.layer,
        kind=a.kind,
        rank=a.rank,
        rank_b=b.rank,
        factor=factor,
        dim=n,
        phi=phi.cpu().numpy(),
        random_phi=rnd,
    )


def similarity(
    a: Adapter,
    b: Adapter,
    *,
    layer: int | None = None,
    module: str | None = None,
    factor: Factor = "A",
    max_i: int | None = None,
    max_j: int | None = None,
    baseline: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
    batch: bool | None = None,
) -> list[SimilarityResult]:
    """:func:`module_similarity` for every module the two adapters share (Figures 3, 4, 6, 7).

    Modules are matched by name (then by layer and kind); ``layer``/``module`` select as in
    :meth:`~lorascope.adapter.Adapter.select`. Each pair gets its own seeded baseline
    (``seed + index``). ``batch``: for ``factor="right"``/``"left"``, stack equal-shaped
    modules into batched SVDs (default: on CUDA only; see
    :func:`lorascope.analysis._common.batched_svds`).
    """
    pairs = pair_modules(
        a.select(layer=layer, module=module), b.select(layer=layer, module=module), a.path, b.path
    )
    mods = [m for pair in pairs for m in pair] if factor in ("right", "left") else []
    with batched_svds(mods, dtype=dtype, device=device, enabled=batch):
        return map_modules(
            lambda item: module_similarity(
                item[1][0],
                item[1][1],
                factor,
                max_i=max_i,
                max_j=max_j,
                baseline=baseline,
                seed=seed + item[0],
                dtype=dtype,
                device=device,
            ),
            list(enumerate(pairs)),
            device,
        )


def weight_similarity(
    module: LoraModule,
    W: torch.Tensor,
    *,
    side: Literal["right", "left"] = "right",
    max_i: int = 64,
    max_j: int | None = None,
    baseline: bool = True,
    seed: int = 0,
    method: Literal["auto", "exact", "iterative"] = "auto",
    dtype: torch.dtype = torch.float64,
    device: Device = None,
) -> SimilarityResult:
    """φ between the top-i singular directions of ``W`` and the top-j of ``ΔW`` (Figure 8).

    Parameters
    ----------
    module : LoraModule
        The update, ``ΔW`` of shape ``(d_out, d_in)`` (DoRA: its rank-r part with the magnitude
        applied, :func:`lorascope.update.with_base`).
    W : torch.Tensor
        ``(d_out, d_in)`` pre-trained weight, nn.Linear orientation.
    side : {"right", "left"}
        Input-side (``V``, in ``R^{d_in}``; default, matching the paper's use of ``A``'s row
        space) or output-side (``U``, in ``R^{d_out}``) directions.
    max_i : int
        How many of ``W``'s top directions (computed by :func:`lorascope.linalg.top_singular`:
        exact when cheap, ARPACK otherwise).
    max_j : int, optional
        How many of ``ΔW``'s; default its rank.

    Returns
    -------
    SimilarityResult
        ``phi[i-1, j-1]`` = φ(W top-i, ΔW top-j); ``rank`` and ``rank_b`` are the module's
        rank, ``module_b`` is ``"W"``, ``factor`` is ``"W-" + side``.
    """
    W = checked_weight(module, W)
    if device is not None:
        W = W.to(device)
    module = with_base(module, W, dtype=dtype)  # DoRA: the rank-r part diag(g)·s·B A
    svd = module_svd(module, dtype=dtype, device=device)
    Ud = svd.V if side == "right" else svd.U  # (n, k)
    Wsvd = top_singular(W, max_i, method=method, seed=seed, dtype=dtype)
    Uw = Wsvd.V if side == "right" else Wsvd.U  # (n, max_i)
    phi = subspace_similarity(Uw, Ud, None, max_j)
    n = Uw.shape[0]
    rnd = None
    if baseline:
        g = torch.Generator().manual_seed(seed)
        # a Haar-random i-dim subspace against ΔW's fixed j-dim one has the law of two random
        # ones (rotation invariance), so the O(j³) draw serves here too
        rnd = random_similarity(n, *phi.shape, g, dtype=dtype).numpy()
    return SimilarityResult(
        **update_fields(module),
        module=module.key,
        module_b="W",
        layer=module.layer,
        kind=module.kind,
        rank=module.rank,
        rank_b=module.rank,
        factor=f"W-{side}",
        dim=n,
        phi=phi.cpu().numpy(),
        random_phi=rnd,
    )
