"""How many directions does ΔW need? Rank selection and rank resizing by truncated SVD.

Hu et al. 2021 §7.2 find that "a very low rank (r = 1 or 2) suffices" and that directions past
the top few of an ``r = 64`` update are mostly noise. These functions act on it per module:
:func:`rank` says how many singular directions of ``ΔW = s·B A`` hold a given share of it, and
:func:`resize` keeps only those, writing new factors ``A' (k, d_in)``, ``B' (d_out, k)``.

By the Eckart–Young–Mirsky theorem the rank-``k`` truncated SVD ``ΔW_k = U_k Σ_k V_kᵀ`` is the
best rank-``k`` approximation in both the Frobenius and the spectral norm, with

    ‖ΔW − ΔW_k‖_F² = Σ_{i>k} σ_i²,     ‖ΔW − ΔW_k‖_2 = σ_{k+1},

so every error reported here comes from the singular values alone, and the SVD itself comes
from the factors (:func:`lorascope.linalg.factored_svd`): ``ΔW`` is never formed.

A rule picks ``k`` per module (:class:`RankRule`), for ``σ_1 >= ... >= σ_n``:

``energy``   smallest ``k`` with ``Σ_{i<=k} σ_i² >= F · Σ_i σ_i²`` (share ``F`` of ``‖ΔW‖_F²``;
             relative Frobenius error ``<= sqrt(1 − F)``); kohya's ``sv_fro`` at ``F = f²``.
``nuclear``  smallest ``k`` with ``Σ_{i<=k} σ_i >= F · Σ_i σ_i`` (share ``F`` of the nuclear
             norm ``‖ΔW‖_* = Σ σ_i``); kohya's ``sv_cumulative``.
``ratio``    ``k = #{i : σ_i >= T · σ_1}`` (kohya's ``sv_ratio`` at ``T = 1/ratio``, which
             drops a σ_i equal to the bound).
``rank``     a fixed ``k = min(K, n)``.

Ties are decided in float64 exactly as computed: for ``energy``/``nuclear`` with weights
``w_i = σ_i²`` or ``σ_i``, the tail sums ``t_k = Σ_{i>k} w_i`` are accumulated from the smallest
``σ`` upward (``t_0`` is the total) and ``k`` is the first with ``t_k <= fl(1 − F) · t_0``;
``ratio`` tests ``σ_i >= fl(T · σ_1)``. Equality counts as reached: a share ``F`` that the top-``k``
sum hits exactly keeps ``k``, the next float above it needs ``k + 1``; ``T = σ_k/σ_1`` exactly
keeps ``k``, the next float above it ``k − 1`` (tests pin both sides on dyadic spectra).

``energy``, ``nuclear`` and ``ratio`` never keep a direction at or below the numerical rank
cut-off ``σ_i <= rcond · σ_1`` (``rcond = eps·max(d_out, d_in)`` by default), and always keep
one; ``rank`` keeps what it is told (up to ``n``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
import torch

from lorascope.adapter import Adapter, LoraModule
from lorascope.analysis._common import (
    Device,
    map_modules,
    module_svd,
    module_svdvals,
    update_fields,
)
from lorascope.columns import Column, Results, Tabular, ident_columns
from lorascope.errors import LoraScopeError, NonFiniteError
from lorascope.linalg import default_rcond

__all__ = [
    "ENERGY_LADDER",
    "RankRule",
    "RankResult",
    "ResizeResult",
    "select_rank",
    "suggest_ranks",
    "module_rank",
    "rank",
    "module_resize",
    "resize",
]

# The energy shares whose ranks every result lists (k@50%, k@90%, k@99% in the CLI table).
ENERGY_LADDER = (0.5, 0.9, 0.99)

Method = Literal["energy", "nuclear", "ratio", "rank"]
_SHARES = ("energy", "nuclear")
_PART_KEY = re.compile(r"^(?P<name>.+)\[(?P<part>[^\[\]]+)\]$")


@dataclass(frozen=True)
class RankRule:
    """How to choose the rank ``k`` of a module from its singular values.

    Attributes
    ----------
    method : {"energy", "nuclear", "ratio", "rank"}
        ``energy``: smallest ``k`` with ``Σ_{i<=k} σ_i² >= value·Σ σ_i²``, ``value`` in (0, 1].
        ``nuclear``: smallest ``k`` with ``Σ_{i<=k} σ_i >= value·Σ σ_i``, ``value`` in (0, 1].
        ``ratio``: ``k = #{i : σ_i >= value·σ_1}``, ``value`` in (0, 1].
        ``rank``: ``k = min(value, n)``, ``value`` a positive integer.
        (Float ties: see the module docstring; equality keeps ``k``.)
    value : float
        The threshold (or the rank) of ``method``.
    """

    method: Method = "energy"
    value: float = 0.9

    def __post_init__(self) -> None:
        v = self.value
        if self.method not in ("energy", "nuclear", "ratio", "rank"):
            raise LoraScopeError(
                f"rank rule: unknown method {self.method!r} (choose energy, nuclear, ratio or rank)"
            )
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise LoraScopeError(f"rank rule: {self.method}={v!r} is not a finite number")
        if self.method == "rank" and (v < 1 or v != int(v)):
            raise LoraScopeError(f"rank rule: rank={v!r} must be a positive integer")
        if self.method != "rank" and not 0 < v <= 1:
            raise LoraScopeError(f"rank rule: {self.method}={v!r} must be in (0, 1]")

    def __str__(self) -> str:
        if self.method == "rank":
            return f"rank {int(self.value)}"
        if self.method in _SHARES:
            return f"{self.method} >= {self.value:g}"
        return f"σ_i/σ_1 >= {self.value:g}"


def select_rank(S: np.ndarray | torch.Tensor, rule: RankRule, *, rcond: float = 0.0) -> int:
    """The rank ``k`` that ``rule`` keeps for descending singular values ``S`` (``(n,)``).

    ``energy``: smallest ``k`` with ``Σ_{i<=k} σ_i² >= F·Σ σ_i²``; ``nuclear``: the same with
    ``σ_i``; ``ratio``: ``#{i : σ_i >= T·σ_1}``; ``rank``: ``min(K, n)``. In float64, with the
    tail sums ``t_k = Σ_{i>k} w_i`` accumulated from the small end, ``k`` is the first with
    ``t_k <= fl(1 − F)·t_0``: a threshold hit exactly keeps ``k`` (see the module docstring).

    Parameters
    ----------
    S : array of shape (n,)
        ``σ_1 >= ... >= σ_n >= 0`` with ``σ_1 > 0``.
    rule : RankRule
    rcond : float
        ``energy``/``nuclear``/``ratio`` keep no ``σ_i <= rcond·σ_1`` (numerically zero
        directions) and at least one.

    Returns
    -------
    int
        ``1 <= k <= n``.

    Examples
    --------
    >>> import numpy as np
    >>> S = np.array([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14: top-2 hold 13/14 = 0.93
    >>> select_rank(S, RankRule("energy", 0.9)), select_rank(S, RankRule("energy", 0.95))
    (2, 3)
    >>> select_rank(S, RankRule("nuclear", 0.75))  # σ: (3 + 2)/6 >= 0.75 > 3/6
    2
    >>> select_rank(S, RankRule("ratio", 0.5)), select_rank(S, RankRule("rank", 8))
    (2, 3)
    """
    S = np.asarray(S.cpu() if isinstance(S, torch.Tensor) else S, dtype=np.float64)  # (n,)
    n = int(S.size)
    if rule.method == "rank":
        return min(int(rule.value), n)
    numerical = max(1, int((S > rcond * S[0]).sum()))
    if rule.method == "ratio":
        k = int((S >= rule.value * S[0]).sum())
    else:
        rel = S / S[0]  # shares are scale-free: σ/σ_1 cannot overflow when squared
        tail = _tails(rel**2 if rule.method == "energy" else rel)  # (n + 1,)
        k = int(np.argmax(tail <= (1.0 - rule.value) * tail[0]))
    return max(1, min(k, numerical))


def _tails(w: np.ndarray) -> np.ndarray:
    """``t[k] = Σ_{i>k} w_i`` for ``k = 0..n`` (``(n + 1,)``), summed from the small end so the
    tail of a steep spectrum stays accurate; ``t[0]`` is the total."""
    return np.concatenate([np.cumsum(w[::-1])[::-1], [0.0]])


def _ladder_columns(header: str, name: str) -> tuple[Column, ...]:
    return tuple(
        Column(
            name.format(e=f"{e:g}"),
            header.format(e=f"{e:.0%}"),
            get=lambda r, e=e: r.energy_ranks[f"{e:g}"],
            doc=f"smallest k holding {e:.0%} of ‖ΔW‖_F²",
        )
        for e in ENERGY_LADDER
    )


_COST = (
    Column("frobenius_error", "‖ΔW−ΔW_k‖_F", doc="sqrt(Σ_{i>k} σ_i²), Eckart–Young"),
    Column("relative_error", "rel. error", doc="‖ΔW−ΔW_k‖_F / ‖ΔW‖_F"),
    Column("spectral_error", "σ_k+1/σ1", doc="‖ΔW−ΔW_k‖_2 / ‖ΔW‖_2"),
)
_RANK_COLUMNS = (
    *ident_columns(),
    *_ladder_columns("k@{e}", "rank_energy_{e}"),
    Column("new_rank", "keep", doc="k the rule keeps"),
    Column("energy_kept", "energy", doc="Σ_{i<=k} σ_i² / Σ σ_i²"),
    *_COST,
    Column("params", get=lambda r: f"{r.params:,} -> {r.new_params:,}", doc="factor entries"),
)
_RESIZE_COLUMNS = (
    *ident_columns(),
    Column("new_rank", "new rank", doc="k the rule keeps"),
    Column("energy_kept", "kept energy", doc="Σ_{i<=k} σ_i² / Σ σ_i²"),
    *_COST,
    Column("alpha", doc="alpha of the factors read"),
    Column("new_alpha", "new alpha", doc="alpha of the rank-k factors"),
)
_RANK_TIDY = (
    *ident_columns(),
    Column("new_rank"),
    Column("method"),
    Column("value"),
    Column("energy_kept"),
    Column("nuclear_kept"),
    *_COST,
    Column("numerical_rank"),
    *_ladder_columns("k@{e}", "rank_energy_{e}"),
    Column("params"),
    Column("new_params"),
    Column("scale"),
    Column("new_scale"),
    Column("alpha"),
    Column("new_alpha"),
)


@dataclass
class RankResult(Tabular):
    """The rank a rule keeps for one module, and what the truncation costs.

    Attributes
    ----------
    rank, new_rank : int
        ``r`` of the factors, and the ``k`` the rule keeps.
    shape : tuple of int
        ``(d_out, d_in)`` of ``ΔW``.
    method, value :
        The :class:`RankRule`.
    energy_kept : float
        ``Σ_{i<=k} σ_i² / Σ σ_i²``.
    nuclear_kept : float
        ``Σ_{i<=k} σ_i / Σ σ_i``.
    frobenius_error : float
        ``‖ΔW − ΔW_k‖_F = sqrt(Σ_{i>k} σ_i²)`` (Eckart–Young), absolute.
    relative_error : float
        ``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F = sqrt(Σ_{i>k} σ_i² / Σ σ_i²)``.
    spectral_error : float
        ``‖ΔW − ΔW_k‖_2 / ‖ΔW‖_2 = σ_{k+1} / σ_1`` (0 when nothing is dropped).
    numerical_rank : int
        Count of ``σ_i > rcond·σ_1``.
    energy_ranks : dict of str to int
        The ``energy`` rank at each share of :data:`ENERGY_LADDER`, keyed ``"0.5"``, ...
    params, new_params : int
        Factor entries ``r·(d_out + d_in)`` and ``k·(d_out + d_in)``.
    scale, new_scale : float
        ``s`` of the factors and ``s'`` of the rank-``k`` factors (``ΔW_k = s'·B' A'``).
    alpha, new_alpha : float or None
        The alpha ``s`` comes from, and ``alpha'`` with ``s' = alpha'/k`` (rsLoRA
        ``alpha'/sqrt(k)``); by default the scale is kept, ``alpha' = |s|·k``.
    """

    module: str
    layer: int | None
    kind: str
    rank: int
    new_rank: int
    shape: tuple[int, int]
    method: str
    value: float
    energy_kept: float
    nuclear_kept: float
    frobenius_error: float
    relative_error: float
    spectral_error: float
    numerical_rank: int
    energy_ranks: dict[str, int]
    params: int
    new_params: int
    scale: float
    new_scale: float
    alpha: float | None
    new_alpha: float
    family: str = "lora"
    update: str = "full"

    COLUMNS = _RANK_COLUMNS
    TIDY = _RANK_TIDY

    def caption(self) -> str:
        return (
            f"rank of ΔW · {self.module} · {self.family} · rank {self.rank} → keep "
            f"{self.new_rank} ({self.method} {self.value:g})"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass
class ResizeResult(RankResult):
    """:class:`RankResult` of a module :func:`module_resize` rewrote: ``new_scale`` and
    ``new_alpha`` are those of the factors it returned."""

    COLUMNS = _RESIZE_COLUMNS


def _result(
    module: LoraModule,
    S: np.ndarray,
    rule: RankRule,
    rcond: float | None,
    *,
    rslora: bool = False,
    new_alpha: float | None = None,
    cls: type[RankResult] = RankResult,
) -> RankResult:
    """The :class:`RankResult` (or ``cls``) of ``module`` with singular values ``S`` (``(n,)``)."""
    rcond = default_rcond(module.shape) if rcond is None else rcond
    if not (math.isfinite(rcond) and rcond >= 0):
        raise LoraScopeError(f"rcond must be a finite number >= 0, got {rcond}")
    k = select_rank(S, rule, rcond=rcond)
    s1 = float(S[0])
    rel = S / s1  # (n,): σ/σ_1, so that huge or tiny finite σ cannot overflow σ² (issue 11)
    sq, nuc = _tails(rel**2), _tails(rel)  # (n + 1,): Σ_{i>j} σ_i², Σ_{i>j} σ_i, over σ_1², σ_1
    width = module.d_out + module.d_in
    ladder = {f"{e:g}": select_rank(S, RankRule("energy", e), rcond=rcond) for e in ENERGY_LADDER}
    root_k = math.sqrt(k) if rslora else float(k)
    if new_alpha is None:
        new_scale = abs(float(module.scale))
        new_alpha = new_scale * root_k
    else:
        new_scale = float(new_alpha) / root_k
    return cls(
        **update_fields(module),
        module=module.key,
        layer=module.layer,
        kind=module.kind,
        rank=module.rank,
        new_rank=k,
        shape=module.shape,
        method=rule.method,
        value=float(rule.value),
        energy_kept=1.0 - float(sq[k] / sq[0]),
        nuclear_kept=1.0 - float(nuc[k] / nuc[0]),
        frobenius_error=s1 * math.sqrt(float(sq[k])),
        relative_error=math.sqrt(float(sq[k] / sq[0])),
        spectral_error=float(S[k] / S[0]) if k < S.size else 0.0,
        numerical_rank=int((S > rcond * S[0]).sum()),
        energy_ranks=ladder,
        params=module.params,
        new_params=k * width,
        scale=float(module.scale),
        new_scale=new_scale,
        alpha=module.alpha,
        new_alpha=float(new_alpha),
    )


def suggest_ranks(results: Sequence[RankResult]) -> dict[str, tuple[int, float]]:
    """``{module name: (k, alpha_k)}`` from :func:`rank` results, for a PEFT ``rank_pattern``.

    ``alpha_k`` is the result's ``new_alpha``: the alpha that keeps the module's scale at the
    new rank (``|s|·k``; rsLoRA ``|s|·sqrt(k)``).

    Raises :class:`LoraScopeError` for a part of a fused projection (key ``name[q]``): PEFT's
    pattern sizes the whole fused module, whose rank a part's spectrum does not give (the
    whole ``[ΔW_q; ΔW_k; ΔW_v]`` can need more directions than any part).
    """
    out: dict[str, tuple[int, float]] = {}
    for r in results:
        m = _PART_KEY.match(r.module)
        if m:
            raise LoraScopeError(
                f"{r.module}: a rank_pattern sizes the whole fused module {m['name']}, not its "
                f"{m['part']} part; rank it without splitting it (no --module q/k/v)"
            )
        out[r.module] = (r.new_rank, float(r.new_alpha))
    return out


def module_rank(
    module: LoraModule,
    rule: RankRule = RankRule(),
    *,
    rslora: bool = False,
    rcond: float | None = None,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
) -> RankResult:
    """The rank ``rule`` keeps for one module's ``ΔW = s·B A`` and the error of truncating to it.

    Only the singular values are computed (:func:`lorascope.linalg.factored_svdvals`). The
    errors are exact by Eckart–Young: ``‖ΔW − ΔW_k‖_F² = Σ_{i>k} σ_i²`` and
    ``‖ΔW − ΔW_k‖_2 = σ_{k+1}`` (Hu et al. 2021 §7.2 on how low a rank suffices).

    Parameters
    ----------
    module : LoraModule
        ``A (r, d_in)``, ``B (d_out, r)``.
    rule : RankRule
        Default: the fewest directions holding 90 % of ``‖ΔW‖_F²``.
    rslora : bool
        Scale convention for the suggested ``new_alpha`` (``|s|·sqrt(k)`` instead of ``|s|·k``).
    rcond : float, optional
        Numerical-rank cut-off relative to ``σ_1``; default ``eps(float64)·max(d_out, d_in)``.

    Examples
    --------
    >>> import torch
    >>> from lorascope.adapter import LoraModule
    >>> m = LoraModule("w", torch.eye(2), torch.diag(torch.tensor([3.0, 1.0])), scale=2.0)
    >>> res = module_rank(m, RankRule("rank", 1))  # ΔW = diag(6, 2): drops σ_2 = 2
    >>> res.new_rank, round(res.frobenius_error, 12), res.new_alpha
    (1, 2.0, 2.0)

    Raises
    ------
    ZeroUpdateError
        ``ΔW = 0``; ``NonFiniteError`` for non-finite singular values.
    """
    S = module_svdvals(module, dtype=dtype, device=device).cpu().double().numpy()  # (k,), f64 sums
    return _result(module, S, rule, rcond, rslora=rslora)


def rank(
    adapter: Adapter,
    rule: RankRule = RankRule(),
    *,
    layer: int | None = None,
    module: str | None = None,
    rslora: bool | None = None,
    rcond: float | None = None,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
) -> Results[RankResult]:
    """:func:`module_rank` for every module of ``adapter`` selected by ``layer``/``module``
    (see :meth:`lorascope.adapter.Adapter.select`); ``rslora`` defaults to the adapter's
    ``use_rslora``. :func:`suggest_ranks` turns the results into a PEFT ``rank_pattern``."""
    rslora = _rslora(adapter) if rslora is None else rslora
    return Results(
        map_modules(
            lambda m: module_rank(m, rule, rslora=rslora, rcond=rcond, dtype=dtype, device=device),
            adapter.select(layer=layer, module=module),
            device,
        )
    )


def module_resize(
    module: LoraModule,
    rule: RankRule,
    *,
    alpha: float | None = None,
    rslora: bool = False,
    rcond: float | None = None,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[LoraModule, ResizeResult]:
    """The best rank-``k`` LoRA factors of one module's ``ΔW = s·B A`` (``k`` from ``rule``).

    With the factored SVD ``ΔW = U Σ Vᵀ`` (:func:`lorascope.linalg.factored_svd`) and the new
    scale ``s'``, the factors split each singular value evenly between them::

        B' = U_k diag(sqrt(σ/s'))   (d_out, k)
        A' = diag(sqrt(σ/s')) V_kᵀ  (k, d_in)        s'·B' A' = U_k Σ_k V_kᵀ = ΔW_k,

    the rank-``k`` truncated SVD: the best approximation of rank ``k`` in the Frobenius and the
    spectral norm (Eckart–Young), with ``‖ΔW − ΔW_k‖_F² = Σ_{i>k} σ_i²``. Column ``i`` of
    ``B'`` and row ``i`` of ``A'`` have the same norm ``sqrt(σ_i/s')``. This is the "SVD
    truncation" route of Hu et al. 2021 §7.2 (and of kohya's ``resize_lora``), done from the
    factors in ``O((d_out + d_in)·r²)``: ``ΔW`` is never formed.

    Parameters
    ----------
    module : LoraModule
        ``A (r, d_in)``, ``B (d_out, r)``, ``scale`` ``s``.
    rule : RankRule
        How ``k`` is chosen.
    alpha : float, optional
        ``alpha'`` of the output, ``s' = alpha'/k`` (rsLoRA: ``alpha'/sqrt(k)``). By default the
        scale is kept, ``s' = s``, and ``alpha' = s·k`` (rsLoRA ``s·sqrt(k)``).
    rslora : bool
        The output's scale convention (peft's ``use_rslora``).
    rcond : float, optional
        Numerical-rank cut-off (see :func:`select_rank`).
    dtype, device :
        Computation precision and device; the new factors come back on the CPU.
    out_dtype : torch.dtype, optional
        dtype of ``A'``, ``B'``; default the dtype of ``module.A``.

    Returns
    -------
    (LoraModule, ResizeResult)
        The module with ``A'``, ``B'``, ``scale = s'``, ``alpha = alpha'`` (name, layer, kind,
        part and orientation kept), and the numbers of the truncation.

    Raises
    ------
    ZeroUpdateError
        ``ΔW = 0``. ``NonFiniteError`` when the factors overflow ``out_dtype``;
        ``LoraScopeError`` for a non-positive ``alpha``.

    Examples
    --------
    >>> import torch
    >>> from lorascope.adapter import LoraModule
    >>> A = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # ΔW = 2·diag(3, 1): σ = 6, 2
    >>> m = LoraModule("w", A, torch.diag(torch.tensor([3.0, 1.0])), scale=2.0)
    >>> small, res = module_resize(m, RankRule("rank", 1))
    >>> small.rank, small.scale, round(res.relative_error**2, 12)  # 2² / (6² + 2²)
    (1, 2.0, 0.1)
    """
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise LoraScopeError(f"{module.tensor_name()}: new alpha={alpha!r} must be positive")
    svd = module_svd(module, dtype=dtype, device=device)  # U (out, n), S (n,), V (in, n)
    S = svd.S.cpu().double().numpy()  # sums of σ² in float64 even for --dtype float32
    res = _result(module, S, rule, rcond, rslora=rslora, new_alpha=alpha, cls=ResizeResult)
    k, new_scale = res.new_rank, res.new_scale
    half = torch.sqrt(svd.S[:k] / new_scale)  # (k,)
    B = svd.U[:, :k] * half  # (out, k) · (k,) -> (out, k)
    A = half[:, None] * svd.V[:, :k].mT  # (k, 1) · (k, in) -> (k, in)
    out_dtype = module.A.dtype if out_dtype is None else out_dtype
    A, B = A.to("cpu", out_dtype).contiguous(), B.to("cpu", out_dtype).contiguous()
    if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
        raise NonFiniteError(
            f"{module.tensor_name()}: the rank-{k} factors overflow {out_dtype} "
            "(choose a wider output dtype)"
        )
    plain = dict(family="lora", nominal_rank=None, n_params=None)  # an extraction: plain LoRA
    return replace(module, A=A, B=B, scale=new_scale, alpha=res.new_alpha, **plain), res


def resize(
    adapter: Adapter,
    rule: RankRule,
    *,
    layer: int | None = None,
    module: str | None = None,
    alpha: float | None = None,
    rslora: bool | None = None,
    rcond: float | None = None,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Adapter, Results[ResizeResult]]:
    """A copy of ``adapter`` whose selected modules are truncated by :func:`module_resize`.

    The result is always plain LoRA: for AdaLoRA, VeRA, LoHa and LoKr modules the truncation is
    an *extraction*, the best rank-``k`` LoRA of the exact update (Eckart–Young on the factored
    SVD), and the modules not selected are written as the plain LoRA of their exact factored
    form (width ``k`` of :mod:`lorascope.families`, lossless). DoRA is refused: its update
    depends on the base weight.

    Modules not selected by ``layer``/``module`` (see :meth:`lorascope.adapter.Adapter.select`)
    are kept as they are, so the result is still the whole adapter; module order is kept.
    ``rslora`` defaults to the adapter's ``use_rslora`` (peft's config field). Write the result
    with :func:`lorascope.formats.save_adapter`.

    Returns
    -------
    (Adapter, list of ResizeResult)
        The new adapter (same ``path``, ``format`` and ``config``: the caller writes it) and
        one result per resized module, in adapter order.

    Raises
    ------
    LoraScopeError
        ``module`` picks a part (``q``/``k``/``v``) of a fused projection: its parts share
        ``A``, so only the whole fused module can be resized. ``MissingModuleError`` when the
        selection is empty; the errors of :func:`module_resize`.
    """
    rslora = _rslora(adapter) if rslora is None else rslora
    dora = next((m for m in adapter if m.is_dora), None)
    if dora is not None:
        raise LoraScopeError(
            f"{dora.tensor_name()}: a DoRA update needs its base weight (the magnitude rescales "
            "W + s·B A), so it has no plain-LoRA extraction from the adapter alone"
        )
    chosen = adapter.select(layer=layer, module=module)
    keys = {m.key for m in adapter.modules}
    for m in chosen:
        if m.key not in keys:
            raise LoraScopeError(
                f"{m.tensor_name()}: {m.key} is a part of the fused {m.name}, whose parts share "
                "A; resize the whole module (select it by name or kind 'qkv')"
            )
    done = dict(
        zip(
            [m.key for m in chosen],
            map_modules(
                lambda m: module_resize(
                    m,
                    rule,
                    alpha=alpha,
                    rslora=rslora,
                    rcond=rcond,
                    dtype=dtype,
                    device=device,
                    out_dtype=out_dtype,
                ),
                chosen,
                device,
            ),
            strict=True,
        )
    )
    # modules not selected keep their exact factored form, which is a plain LoRA of its width
    plain = dict(family="lora", nominal_rank=None, n_params=None)
    modules = [
        done[m.key][0] if m.key in done else (m if m.family == "lora" else replace(m, **plain))
        for m in adapter.modules
    ]
    results = Results(done[m.key][1] for m in adapter.modules if m.key in done)
    return replace(adapter, modules=modules, config=dict(adapter.config)), results


def _rslora(adapter: Adapter) -> bool:
    """Whether the adapter's scales are rsLoRA's ``alpha/sqrt(r)`` (peft ``use_rslora``)."""
    return bool(adapter.config.get("use_rslora", False))
