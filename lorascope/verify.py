"""Verify a merge someone else made: is ``W' − W`` the adapter's ``ΔW``, within rounding?

For every adapter module, :func:`verify_merge` reads its base weight ``W`` and the merged
weight ``W'`` (same tensor name, either checkpoint lazily, one module at a time) and compares
``D = W' − W`` with the adapter's update ``ΔW`` (:mod:`lorascope.update`: ``s·B A``, or DoRA's
``diag(g)(W + s·B A) − W``), one block of rows at a time in float64, so a ``14336 × 4096``
module costs a few MB beyond the two memory-mapped tensors.

The rounding bound
------------------
A merge stored in a dtype with unit roundoff ``u = eps/2`` (round to nearest) that computed
``ΔW`` in a precision with unit roundoff ``u_d`` satisfies, per element,

    |W' − (W + ΔW)| ≤ u·|W + ΔW|                   (rounding the sum to the stored dtype)
                    + |W − fl(W)|                   (W cast to the stored dtype first, as
                                                     peft does for a model loaded in bf16)
                    + u_d·(|ΔW| + r·|s|·(|B||A|))   (forming s·B A: the product's r terms
                                                     and the scaling, Higham's γ_r bound)

with ``u_d = max(u, 2⁻²⁴)`` (float32 or the stored dtype, whichever is coarser; peft and
``lorascope merge`` form ``ΔW`` in float32 or in the weight's dtype), plus half the smallest
subnormal spacing. DoRA adds ``4·u_d·|W'|`` for the norms it divides by. The check allows
twice this bound (a fused add rounding once more, double rounding through float32). An element
past it is *bad*; a module with none is consistent with its update.

Diagnosis
---------
From ``⟨D, D⟩``, ``⟨D, ΔW⟩``, ``⟨ΔW, ΔW⟩`` (and ``⟨D, ΔWᵀ⟩`` for a square weight), with the
allowed slack ``τ = 0.1·‖ΔW‖_F + ‖bound‖_F``:

=============  ==============================================================================
status         when
=============  ==============================================================================
ok             no bad element, and rounding lost at most ``max_lost`` of ``‖ΔW‖_F``
underflow      no bad element, but ``‖W' − W − ΔW‖_F > max_lost·‖ΔW‖_F``: ``ΔW`` is below
               half an ulp of ``W`` in much of the tensor, so ``W' == W`` there — the merge
               is the correct rounding, and the update is mostly gone (merge in a wider dtype)
not-applied    bad elements and ``‖D‖_F ≤ τ``: ``W' ≈ W``
sign-flipped   ``‖D + ΔW‖_F ≤ τ``: ``W − ΔW`` was stored
transposed     a square weight with ``‖D − ΔWᵀ‖_F ≤ τ``; or ``W'`` stored ``(d_in, d_out)``
               where the base stores ``(d_out, d_in)`` (compared after transposing back)
scale          ``‖D − c·ΔW‖_F ≤ τ`` for the least-squares ``c = ⟨D, ΔW⟩ / ⟨ΔW, ΔW⟩`` far
               from 1 (an ``alpha`` vs ``alpha/r`` slip gives ``c = r`` or ``1/r``)
mismatch       none of these; ``rows`` says how many rows differ (a fused part left out shows
               as a block of rows)
=============  ==============================================================================

Across modules, some ``ok`` and some not is reported as a partial merge in the summary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from lorascope.adapter import Adapter, LoraModule
from lorascope.columns import Column, Tabular, ident_columns
from lorascope.errors import LoraScopeError, ShapeError
from lorascope.formats import BaseWeights, load_adapter, load_base
from lorascope.formats.base import Placement
from lorascope.tensor_merge import region
from lorascope.update import dora_gain, merged_blocks

__all__ = ["STATUSES", "VerifiedModule", "VerifyResult", "verify_merge", "verify_module"]

STATUSES = (
    "ok",
    "underflow",
    "not-applied",
    "sign-flipped",
    "transposed",
    "scale",
    "mismatch",
)
DEFAULT_MAX_LOST = 0.5
_FIT = 0.1  # a candidate explanation must account for D to within 10 % of ‖ΔW‖_F (+ rounding)


_MODULE, _LAYER, _KIND, _RANK = ident_columns()
_STATUS = Column("status", doc="ok, underflow, or the likely cause of a mismatch")
_C = Column("scale_factor", "c", doc="least-squares c in W' − W ≈ c·ΔW")
_LOST = Column("lost", doc="‖W' − W − ΔW‖_F / ‖ΔW‖_F")
_BAD = Column("bad", doc="elements past the rounding bound")
_NORM_DELTA = Column("norm_delta", "‖ΔW‖_F", doc="the adapter's update")
_MESSAGE = Column("message", doc="the status in words")


@dataclass(frozen=True)
class VerifiedModule(Tabular):
    """How one module's merged weight compares with its update.

    Attributes
    ----------
    module, layer, kind, rank :
        As in every lorascope result.
    tensor : str
        The tensor compared in both checkpoints; ``dtype``: the merged one's dtype.
    status : str
        One of :data:`STATUSES`; ``message`` says it in words.
    bad : int
        Elements past the rounding bound, of ``elements``; ``rows``: rows holding any.
    scale_factor : float or None
        Least-squares ``c`` in ``W' − W ≈ c·ΔW`` (1 for a good merge).
    lost : float or None
        ``‖W' − W − ΔW‖_F / ‖ΔW‖_F``: the share of the update that did not land.
    norm_delta, norm_diff : float
        ``‖ΔW‖_F`` and ``‖W' − W‖_F``.
    """

    COLUMNS: ClassVar[tuple[Column, ...]] = (
        _MODULE,
        Column("dtype", doc="the merged tensor's dtype"),
        _STATUS,
        _BAD,
        _C,
        _LOST,
        _NORM_DELTA,
        _MESSAGE,
    )
    TIDY: ClassVar[tuple[Column, ...]] = (
        _MODULE,
        _LAYER,
        _KIND,
        _RANK,
        Column("tensor", doc="tensor name in both checkpoints"),
        Column("dtype", doc="the merged tensor's dtype"),
        _STATUS,
        _BAD,
        Column("elements", doc="elements compared"),
        Column("rows", doc="rows holding a bad element"),
        _C,
        _LOST,
        _NORM_DELTA,
        Column("norm_diff", "‖W'−W‖_F", doc="what the merge changed"),
        _MESSAGE,
    )

    module: str
    layer: int | None
    kind: str
    rank: int
    tensor: str
    dtype: str
    status: str
    bad: int
    elements: int
    rows: int
    scale_factor: float | None
    lost: float | None
    norm_delta: float
    norm_diff: float
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VerifyResult:
    """The per-module comparisons of :func:`verify_merge` and what they add up to.

    ``allow_underflow``: whether an ``underflow`` module counts as ok in :attr:`verdict`.
    """

    base: str
    adapter: str
    merged: str
    allow_underflow: bool = False
    modules: list[VerifiedModule] = field(default_factory=list)

    def _good(self, m: VerifiedModule) -> bool:
        return m.status == "ok" or (self.allow_underflow and m.status == "underflow")

    @property
    def verdict(self) -> str:
        """``"ok"`` when every module is, else ``"mismatch"``."""
        return "ok" if all(self._good(m) for m in self.modules) else "mismatch"

    @property
    def summary(self) -> str:
        n, good = len(self.modules), sum(self._good(m) for m in self.modules)
        if good == n:
            return f"all {n} modules match the adapter within rounding"
        causes: dict[str, int] = {}
        for m in self.modules:
            if not self._good(m):
                causes[m.status] = causes.get(m.status, 0) + 1
        what = ", ".join(f"{k} {v}" for k, v in causes.items())
        if good:
            return f"partially applied: {good} of {n} modules match; the others: {what}"
        return f"no module matches: {what}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "adapter": self.adapter,
            "merged": self.merged,
            "verdict": self.verdict,
            "summary": self.summary,
            "modules": [m.to_dict() for m in self.modules],
        }


def verify_merge(
    base: BaseWeights | str | Path,
    adapter: Adapter | str | Path,
    merged: BaseWeights | str | Path,
    *,
    max_lost: float = DEFAULT_MAX_LOST,
    allow_underflow: bool = False,
) -> VerifyResult:
    """Whether ``merged`` holds ``W + ΔW`` for every module of ``adapter``, within the rounding
    of its dtype, and if not the likely cause (see the module docstring).

    Parameters
    ----------
    base, merged : BaseWeights, str or Path
        The checkpoint the adapter was trained on, and the merged one (any layout
        :func:`~lorascope.formats.load_base` reads; tensors matched by module name).
    adapter : Adapter, str or Path
    max_lost : float
        ``underflow`` when rounding lost more than this share of ``‖ΔW‖_F``, in ``(0, 1]``.
    allow_underflow : bool
        Count ``underflow`` modules as matching in the verdict.

    Raises
    ------
    LoraScopeError
        Unreadable inputs, a module whose weight either checkpoint lacks or whose shapes do not
        fit, NaN/Inf in the base or the adapter (NaN/Inf in the merged weights are a mismatch).
    """
    if not 0 < max_lost <= 1:
        raise LoraScopeError(f"verify-merge: max_lost={max_lost!r} must be in (0, 1]")
    bw = base if isinstance(base, BaseWeights) else load_base(base)
    mw = merged if isinstance(merged, BaseWeights) else load_base(merged)
    ad = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    result = VerifyResult(
        base=bw.path, adapter=ad.path, merged=mw.path, allow_underflow=allow_underflow
    )
    for m in ad:
        result.modules.append(verify_module(m, bw, mw, max_lost=max_lost))
    return result


def _locate_merged(m: LoraModule, mw: BaseWeights) -> Placement:
    """Where ``m`` sits in the merged checkpoint; a stored orientation opposite to the file's
    declared one is found too (the caller compares it with the base's)."""
    try:
        return mw.locate(m)
    except ShapeError:
        if m.fan_in_fan_out is None:
            raise
        return mw.locate(replace(m, fan_in_fan_out=None))


def verify_module(
    m: LoraModule, base: BaseWeights, merged: BaseWeights, *, max_lost: float = DEFAULT_MAX_LOST
) -> VerifiedModule:
    """:func:`verify_merge` for one module (see the module docstring for the bound)."""
    pb = base.locate(m)
    pm = _locate_merged(m, merged)
    swapped = pm.transposed != pb.transposed and len(pm.shape) == 2 and pm.shape != pb.shape
    W = region(base.tensor(pb.key), pb)  # (d_out, d_in) view; NaN/Inf in the base is an error
    M = region(merged.tensor(pm.key, check=False), pm)  # (d_out, d_in) view of W'
    if tuple(M.shape) != m.shape:
        raise ShapeError(f"{pm.file}: {pm.key}: merged {tuple(M.shape)} vs ΔW {m.shape}")
    if not (M.is_floating_point() and W.is_floating_point()):
        raise ShapeError(f"{pm.file}: {pm.key} is {M.dtype}: only float weights are compared")
    u = torch.finfo(M.dtype).eps / 2  # unit roundoff of the stored merge
    u_d = max(u, torch.finfo(torch.float32).eps / 2)
    tiny = 2 * torch.finfo(M.dtype).smallest_normal * u
    d_out, d_in = m.shape
    f64 = torch.float64
    A, B, s = m.A.to(f64), m.B.to(f64), float(m.scale)
    absBA = (B.abs(), A.abs())  # for the γ_r bound on forming s·B A
    gain = dora_gain(m, W, dtype=f64) if m.is_dora else None
    square = d_out == d_in and not m.is_dora
    acc = dict.fromkeys(("DD", "DX", "XX", "RR", "TT", "DXT"), 0.0)
    bad = bad_rows = 0
    finite = True
    for i, w, new in merged_blocks(m, W, dtype=f64, gain=gain):  # (rows, d_in) float64
        n = w.shape[0]
        X = new - w  # ΔW's rows
        Mb = M[i : i + n].to(f64)
        if not bool(torch.isfinite(Mb).all()):
            finite = False
            Mb = torch.nan_to_num(Mb, nan=0.0, posinf=0.0, neginf=0.0)
        D = Mb - w  # W' − W
        R = D - X
        cast_err = (w - W[i : i + n].to(M.dtype).to(f64)).abs()  # W rounded to W''s dtype
        gamma = m.rank * abs(s) * (absBA[0][i : i + n] @ absBA[1])  # (rows, d_in)
        if gain is not None:
            gamma = gamma * gain.abs().max() + 4 * new.abs()
        tol = 2 * (u * new.abs() + cast_err + u_d * (X.abs() + gamma)) + tiny
        over = R.abs() > tol
        bad += int(over.sum())
        bad_rows += int(over.any(dim=1).sum())
        acc["DD"] += float((D * D).sum())
        acc["DX"] += float((D * X).sum())
        acc["XX"] += float((X * X).sum())
        acc["RR"] += float((R * R).sum())
        acc["TT"] += float((tol * tol).sum())
        if square:
            XT = s * (A[:, i : i + n].T @ B.T)  # rows i.. of ΔWᵀ: (rows, r) @ (r, d_out)
            acc["DXT"] += float((D * XT).sum())
    if not finite:
        bad = max(bad, 1)
    nX, nD = math.sqrt(acc["XX"]), math.sqrt(acc["DD"])
    lost = math.sqrt(acc["RR"]) / nX if nX > 0 else None
    c = acc["DX"] / acc["XX"] if acc["XX"] > 0 else None
    stored = (tuple(pb.shape), tuple(pm.shape)) if swapped else None
    status, msg = _diagnose(acc, bad, bad_rows, d_out, stored, square, finite, lost, c, max_lost)
    return VerifiedModule(
        module=m.key,
        layer=m.layer,
        kind=m.kind,
        rank=m.rank,
        tensor=pm.key,
        dtype=str(M.dtype).removeprefix("torch."),
        status=status,
        bad=bad,
        elements=d_out * d_in,
        rows=bad_rows,
        scale_factor=c,
        lost=lost,
        norm_delta=nX,
        norm_diff=nD,
        message=msg,
    )


def _diagnose(
    acc: dict[str, float],
    bad: int,
    bad_rows: int,
    d_out: int,
    stored: tuple[tuple[int, ...], tuple[int, ...]] | None,
    square: bool,
    finite: bool,
    lost: float | None,
    c: float | None,
    max_lost: float,
) -> tuple[str, str]:
    """The status and message of one module from its accumulated inner products; ``stored``:
    the base's and the merged tensor's stored shapes when they are swapped."""
    nX = math.sqrt(acc["XX"])
    slack = _FIT * nX + math.sqrt(acc["TT"])

    def misfit(c0: float, cross: str = "DX") -> float:  # ‖D − c0·X‖_F from the sums
        return math.sqrt(max(0.0, acc["DD"] - 2 * c0 * acc[cross] + c0 * c0 * acc["XX"]))

    where = f" in {bad_rows} of {d_out} rows" if 0 < bad_rows < d_out else ""
    if stored is not None:
        how = "and its values match once transposed back" if bad == 0 else "and it differs too"
        return "transposed", (
            f"W' is stored {stored[1]}, transposed against the base's {stored[0]}, {how}"
        )
    if not finite:
        return "mismatch", "W' holds NaN/Inf"
    if bad == 0:
        share = 0.0 if lost is None else lost
        if share > max_lost:
            return "underflow", (
                f"W' is W + ΔW correctly rounded, but rounding lost {share:.0%} of ‖ΔW‖_F "
                "(ΔW below half an ulp of W); merge in a wider dtype"
            )
        return "ok", f"W' − W = ΔW within rounding (lost {share:.2%} of ‖ΔW‖_F)"
    head = f"{bad} element(s) past the rounding bound{where}"
    if nX == 0:
        return "mismatch", f"{head}; the adapter's ΔW is zero but W' differs from W"
    if misfit(0.0) <= slack:
        return "not-applied", f"{head}: W' ≈ W, the update was not applied"
    if misfit(-1.0) <= slack:
        return "sign-flipped", f"{head}: W' ≈ W − ΔW, the update was subtracted"
    if square and misfit(1.0, "DXT") <= slack:
        return "transposed", f"{head}: W' ≈ W + ΔWᵀ, the update was added transposed"
    if c is not None and abs(c - 1) > _FIT and misfit(c) <= slack * max(1.0, abs(c)):
        return "scale", f"{head}: W' ≈ W + c·ΔW with c = {c:.4g} (alpha/r or scale off?)"
    return "mismatch", (
        f"{head}; best fit W + c·ΔW has c = {c:.4g} and leaves "
        f"{misfit(c) / nX:.0%} of ‖ΔW‖_F unexplained"
    )
