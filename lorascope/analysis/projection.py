"""How does ΔW relate to W? Projections and amplification, Hu et al. 2021 §7.3, Table 7.

Project the pre-trained ``W`` onto the ``r``-dimensional subspace of ``ΔW``: ``‖Uᵀ W V‖_F``
with ``U``, ``V`` the top-``r`` left/right singular vectors of ``ΔW``; compare with ``U``, ``V``
from ``W``'s own top-``r`` and from a random matrix. The amplification factor
``‖ΔW‖_F / ‖Uᵀ W V‖_F`` says how strongly ΔW amplifies directions that ``W`` has but does not
emphasise (paper, GPT-3 layer 48 W_q: 6.91/0.32 ≈ 21.5 at r = 4, ≈ 1.9 at r = 64).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from lorascope.adapter import Adapter, LoraModule
from lorascope.analysis._common import (
    Device,
    batched_svds,
    checked_weight,
    map_modules,
    module_svd,
    update_fields,
)
from lorascope.cache import SpectralCache
from lorascope.columns import Column, Results, Tabular, ident_columns
from lorascope.errors import ZeroUpdateError
from lorascope.linalg import WEIGHT_MEMO, random_orthonormal, top_singular, weight_products
from lorascope.update import dora_gain, full_update_svdvals, with_base

__all__ = ["ProjectionResult", "module_amplification", "amplify"]


_NORMS = (
    Column("norm_weight", "‖W‖_F", doc="Frobenius norm of W"),
    Column("norm_delta", "‖ΔW‖_F", doc="Frobenius norm of ΔW"),
    Column("proj_delta", "‖UᵀWV‖ ΔW", doc="‖UᵀWV‖_F, U, V: top-k singular vectors of ΔW"),
    Column("proj_weight", "‖UᵀWV‖ W", doc="‖UᵀWV‖_F, U, V: top-k singular vectors of W"),
    Column("proj_random", "‖UᵀWV‖ random", doc="‖UᵀWV‖_F, U, V: random (seeded)"),
)
_AMP_DOC = "‖ΔW‖_F / ‖UᵀWV‖_F with ΔW's directions (paper §7.3, Table 7)"


@dataclass
class ProjectionResult(Tabular):
    """Table 7 for one module; every norm is a Frobenius norm.

    Attributes
    ----------
    k : int
        Dimension of the projection, ``min(r, d_out, d_in)``.
    norm_delta, norm_weight : float
        ``‖ΔW‖_F``, ``‖W‖_F``.
    proj_delta, proj_weight, proj_random : float
        ``‖Uᵀ W V‖_F`` with ``U, V`` the top-``k`` singular vectors of ``ΔW``, of ``W``, and of
        a seeded random Gaussian matrix. ``proj_weight`` (``= ‖σ_1..k(W)‖``) is None when the
        W baseline was skipped (``w_baseline=False``).
    random_expected : float
        ``k·‖W‖_F / sqrt(d_out·d_in)``, the closed-form size of ``proj_random``.
    amplification : float
        ``‖ΔW‖_F / proj_delta`` (``inf`` if ``W`` has no component in ΔW's subspace).
    full_norm_delta, full_singular_values : float, list of float, or None
        DoRA only: ``‖W' − W‖_F`` and the top-``k`` singular values of the whole update
        ``diag(g − 1)·W + diag(g)·s·B A`` (by ARPACK on an operator, never dense); the other
        columns describe its rank-r part ``diag(g)·s·B A`` (``update="dora-rank-r"``).
    proj_weight_bound : float or None
        Bound on the relative error of ``proj_weight`` when ``W``'s top-``k`` came from the
        iterative route (:class:`lorascope.linalg.TopSVDInfo` ``sigma_bound``); None when exact.
    """

    module: str
    layer: int | None
    kind: str
    rank: int
    k: int
    shape: tuple[int, int]
    norm_delta: float
    norm_weight: float
    proj_delta: float
    proj_weight: float | None
    proj_random: float
    random_expected: float
    amplification: float
    family: str = "lora"
    update: str = "full"
    full_norm_delta: float | None = None
    full_singular_values: list[float] | None = None
    proj_weight_bound: float | None = None

    COLUMNS = (*ident_columns(), *_NORMS, Column("amplification", doc=_AMP_DOC))
    TIDY = (  # CSV: an infinite amplification is empty, as in the JSON (null)
        *ident_columns(),
        *_NORMS,
        Column("amplification", get=lambda r: r.to_dict()["amplification"], doc=_AMP_DOC),
    )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        if not math.isfinite(self.amplification):
            d["amplification"] = None
        return d


def module_amplification(
    module: LoraModule,
    W: torch.Tensor,
    *,
    seed: int = 0,
    method: Literal["auto", "exact", "iterative"] = "auto",
    dtype: torch.dtype = torch.float64,
    device: Device = None,
    w_baseline: bool = True,
    products: torch.dtype | None = None,
) -> ProjectionResult:
    """Table 7 quantities for one module against its pre-trained weight.

    Parameters
    ----------
    module : LoraModule
        ``ΔW = s·B A`` of shape ``(d_out, d_in)``, rank ``r``. For DoRA the columns describe
        the rank-r part ``diag(g)·s·B A`` of the true update, and ``full_*`` the whole of it.
    W : torch.Tensor
        ``(d_out, d_in)`` pre-trained weight in nn.Linear orientation (any float dtype).
    seed : int
        Seeds the random baseline.
    method :
        How ``W``'s top-``r`` subspace is found (:func:`lorascope.linalg.top_singular`; inside
        ``SpectralCache.active()`` it comes from the cache when an earlier run computed it).
    w_baseline : bool
        Compute ``proj_weight`` (``W``'s top-``k`` singular values, the one column that needs a
        factorization of ``W``); False leaves it None and costs one read of ``W``.
    products : torch.dtype, optional
        Precision of the GEMMs with ``W`` (:func:`lorascope.linalg.weight_products`). None:
        float32 when ``W``'s stored values are exact in float32 (fp16/bf16/fp32) and
        ``k >= 8``, which keeps ``proj_delta`` and ``proj_random`` within about 1e-6 of float64
        products (measured 4e-8 or better at k = 16 on Llama-shaped weights) at a third of the
        cost; float64 below ``k = 8``, where a few cancelling entries are not averaged out
        (1e-5 seen at k = 1); ``torch.float64`` for products accurate to rounding.

    Returns
    -------
    ProjectionResult

    Notes
    -----
    ``‖W‖_F``, ``W V_ΔW`` and ``W V_random`` come from one pass over ``W`` (upcast a block of
    rows at a time, :func:`lorascope.linalg.weight_products`); then ``‖Uᵀ W V‖_F`` is a
    ``(k, d_out) @ (d_out, k)`` product for each. ``ΔW`` is never formed (its factored SVD,
    :func:`lorascope.linalg.factored_svd`). ``proj_weight = ‖Σ_top-k(W)‖`` since
    ``U_Wᵀ W V_W = Σ_top-k``.
    """
    W = checked_weight(module, W)
    full = None
    if module.is_dora and module.update != "dora-rank-r":
        g = dora_gain(module, W, dtype=dtype)  # one pass over W serves both
        full = full_update_svdvals(module, W, module.rank, dtype=dtype, seed=seed, gain=g)
        module = with_base(module, W, dtype=dtype, gain=g)  # the rank-r part diag(g)·s·B A
    svd = module_svd(module, dtype=dtype, device=device)
    # W stays in its stored dtype (fp16 for a 12288² W is 302 MB; a float64 copy would be 1.2 GB):
    # every product below upcasts it one block of rows at a time (linalg.weight_products).
    W = W.to(device=svd.U.device)
    k = min(module.rank, *module.shape)
    U, V = svd.U[:, :k], svd.V[:, :k]  # (out, k), (in, k)
    if products is None and k < 8:
        # float32 errors are averaged over the k² entries of Uᵀ W V: at k = 1, 2 one entry of
        # the MiniLM sample base moved by up to 1e-5 relative (a cancelling inner product);
        # few columns cost little in float64
        products = dtype
    # ‖W‖_F and the random baseline depend on W, k and the seed only: shared by the adapters
    # of one run (a report's ranks and seeds) through the cache's memo, else computed here
    memo = WEIGHT_MEMO.get()
    name = f"table7 k={k} seed={seed} {dtype} {products}"
    known = memo.recall(W, name) if memo is not None else None
    if known is None:
        g = torch.Generator().manual_seed(seed)
        Ur = random_orthonormal(module.d_out, k, g, dtype=dtype).to(W.device)  # (out, k)
        Vr = random_orthonormal(module.d_in, k, g, dtype=dtype).to(W.device)  # (in, k)
        VV = torch.cat([V, Vr], 1)  # (in, 2k)
        WV, norm_w = weight_products(W, VV, dtype=dtype, products=products)  # (out, 2k)
        if norm_w == 0.0:
            raise ZeroUpdateError(f"{module.tensor_name()}: the base weight W is all zero")
        proj_random = float(torch.linalg.matrix_norm(Ur.mT @ WV[:, k:]))
        if memo is not None:
            memo.keep(W, name, (norm_w, proj_random))
    else:
        norm_w, proj_random = known
        WV, _ = weight_products(W, V, dtype=dtype, products=products, norm=False)  # (out, k)
    proj_delta = float(torch.linalg.matrix_norm(U.mT @ WV[:, :k]))  # (k, out) @ (out, k)
    proj_weight = bound = None
    if w_baseline:
        top, stats = top_singular(W, k, method=method, seed=seed, dtype=dtype, info=True)
        proj_weight = float(torch.linalg.vector_norm(top.S))
        bound = None if stats is None else stats.sigma_bound
    norm_delta = float(torch.linalg.vector_norm(svd.S))
    return ProjectionResult(
        **update_fields(module),
        module=module.key,
        layer=module.layer,
        kind=module.kind,
        rank=module.rank,
        k=k,
        shape=module.shape,
        norm_delta=norm_delta,
        norm_weight=norm_w,
        proj_delta=proj_delta,
        proj_weight=proj_weight,
        proj_random=proj_random,
        random_expected=k * norm_w / math.sqrt(module.d_out * module.d_in),
        amplification=norm_delta / proj_delta if proj_delta > 0 else math.inf,
        full_norm_delta=None if full is None else full[1],
        full_singular_values=None if full is None else [float(x) for x in full[0]],
        proj_weight_bound=bound,
    )


def amplify(
    adapter: Adapter,
    base,
    *,
    layer: int | None = None,
    module: str | None = None,
    seed: int = 0,
    method: Literal["auto", "exact", "iterative"] = "auto",
    dtype: torch.dtype = torch.float64,
    device: Device = None,
    batch: bool | None = None,
    w_baseline: bool = True,
    cache: SpectralCache | None = None,
    products: torch.dtype | None = None,
) -> Results[ProjectionResult]:
    """:func:`module_amplification` for every selected module of ``adapter``.

    ``base`` is a :class:`lorascope.formats.BaseWeights` (or anything with
    ``weight_for(module) -> Tensor``); only the weights of the selected modules are read, each
    in its stored dtype. On the CPU the modules run in parallel, one per core, each reading
    its own ``W`` and computing with one intra-op thread (``_common.map_modules``; memory: one
    ``W`` and its float32 copy per core). A reader thread beside two-thread GEMMs made both
    wait: a cold Llama-8B layer took 15.2 s that way, 9.3 s read and computed in turn, 7.9 s
    in parallel. On CUDA, one module after the other.
    ``batch``: see :func:`lorascope.analysis._common.batched_svds` (default: on CUDA only).
    ``cache``: ``W``'s top-``k`` singular values come from it when an earlier run (any adapter
    on this base) stored them, and are stored there otherwise
    (:class:`lorascope.cache.SpectralCache`). ``products``: see :func:`module_amplification`.
    """
    mods = adapter.select(layer=layer, module=module)
    cache = cache if cache is not None else SpectralCache(enabled=False)
    fingerprint = getattr(base, "fingerprint", lambda m: None)
    kw = {"seed": seed, "method": method, "dtype": dtype, "device": device, "products": products}

    def one(m: LoraModule) -> ProjectionResult:
        W = cache.tag(base.weight_for(m), fingerprint(m))  # (d_out, d_in), as stored
        return module_amplification(m, W, w_baseline=w_baseline, **kw)

    with batched_svds(mods, dtype=dtype, device=device, enabled=batch), cache.active():
        return Results(map_modules(one, mods, device))
