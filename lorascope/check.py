"""Verdicts for CI: is this adapter fit to ship? One row per finding, and pass or fail.

:func:`check_adapter` runs a few cheap checks on an adapter (and, given its base, on the merged
weights it would make) and returns a :class:`CheckResult`: one :class:`Finding` per (module,
check) with a level ``info`` / ``warn`` / ``fail``, the measured value and the threshold it was
held to, and a verdict: ``fail`` when any finding is at or above the ``fail_on`` level. The CLI
(``lorascope check``) exits 0 on pass, 3 on fail, 2 on input it cannot read.

=================  =====  =====================================================================
check              needs  finding
=================  =====  =====================================================================
``unused-rank``           ``k`` = directions holding 99 % of ``‖ΔW‖_F²`` (``energy`` rule of
                          :mod:`lorascope.analysis.rank`); warn when ``k ≤ f · r``
                          (``f = 0.25``): three quarters of the rank carry under 1 % of the
                          update, so ``lorascope resize`` to ``k`` keeps ``‖ΔW‖_F`` within 10 %
                          (``sqrt(0.01)``) at a quarter of the parameters (Hu et al. 2021 §7.2:
                          a very low rank often suffices). info otherwise.
``zero-update``           ``ΔW = 0`` (``B`` still at its zero init: saved before training): fail.
``nonfinite``             NaN/Inf in a factor, the base weight, or the update's spectrum: fail.
``overflow``       base   ``max |W + ΔW|`` (DoRA: ``diag(g)(W + s·B A)``), scanned one block
                          of rows at a time in float64, against ``finfo(dtype).max`` of the
                          stored (or ``merge_dtype``) dtype: fail when the cast gives an Inf,
                          warn above ``headroom · max`` (``0.5``), info otherwise.
``intruders``      base,  intruder dimensions among the top ``k = 10`` singular vectors of
                   opt-in ``W + ΔW`` at ``ε = 0.5`` (:mod:`lorascope.analysis.intruders`;
                          needs an SVD of ``W``, so only when asked): warn above
                          ``max_intruders`` (``0``), info otherwise.
``dora-no-base``          DoRA modules checked without their base: only the direction part
                          ``s·B A`` is seen, not the magnitude's rescaling of ``W``: warn.
``init-mutates-base``     the config records a PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA init: the
                          factors were cut from ``W`` and ``W`` itself changed, so ``s·B A`` is
                          not the whole update against the original base: warn.
=================  =====  =====================================================================

NaN/Inf are a *fail* (exit 3), not bad input (exit 2): the file was readable and what it holds
is exactly what a pipeline must stop on. Reading still refuses such a file before any module is
seen, so an adapter with a NaN gives that one finding and nothing else. Exit 2 stays for input
that cannot be checked at all (missing or unreadable files, unknown layouts, shapes that do not
fit the base).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from lorascope.adapter import Adapter, LoraModule
from lorascope.analysis._common import module_svdvals
from lorascope.analysis.intruders import DEFAULT_EPSILON, DEFAULT_K, module_intruders
from lorascope.analysis.rank import RankRule, select_rank
from lorascope.columns import Column, Tabular
from lorascope.errors import LoraScopeError, NonFiniteError, ShapeError, ZeroUpdateError
from lorascope.formats import BaseWeights, load_adapter, load_base
from lorascope.formats._common import check_finite
from lorascope.formats.peft import MUTATING_INITS
from lorascope.linalg import default_rcond
from lorascope.update import merged_blocks

__all__ = ["LEVELS", "Thresholds", "Finding", "CheckResult", "check_adapter"]

Level = Literal["info", "warn", "fail"]
LEVELS: tuple[str, ...] = ("info", "warn", "fail")


@dataclass(frozen=True)
class Thresholds:
    """What each check holds an adapter to (defaults: see the module docstring).

    Attributes
    ----------
    unused_rank : float
        Warn when ``k@energy ≤ unused_rank · r``; in ``[0, 1)`` (0 turns it off).
    energy : float
        The share of ``‖ΔW‖_F²`` that ``k`` must hold, in ``(0, 1]``.
    overflow_headroom : float
        Warn when ``max |W + ΔW| > overflow_headroom · finfo(dtype).max``; in ``(0, 1]``.
    merge_dtype : torch.dtype, optional
        Judge overflow against this dtype (the one a merge will write) instead of each base
        tensor's own.
    intruders : bool
        Run the intruder check (an SVD of every adapted base weight).
    max_intruders : int
        Warn when more intruder dimensions than this are found.
    intruder_k, intruder_epsilon :
        Top singular vectors tested and the threshold ε (Shuttleworth et al. 2024, Def. 1).
    """

    unused_rank: float = 0.25
    energy: float = 0.99
    overflow_headroom: float = 0.5
    merge_dtype: torch.dtype | None = None
    intruders: bool = False
    max_intruders: int = 0
    intruder_k: int = DEFAULT_K
    intruder_epsilon: float = DEFAULT_EPSILON

    def __post_init__(self) -> None:
        def bad(name: str, v: object, want: str) -> LoraScopeError:
            return LoraScopeError(f"check: {name}={v!r} must be {want}")

        if not 0 <= self.unused_rank < 1:
            raise bad("unused_rank", self.unused_rank, "in [0, 1)")
        if not 0 < self.energy <= 1:
            raise bad("energy", self.energy, "in (0, 1]")
        if not 0 < self.overflow_headroom <= 1:
            raise bad("overflow_headroom", self.overflow_headroom, "in (0, 1]")
        if self.merge_dtype is not None and not self.merge_dtype.is_floating_point:
            raise bad("merge_dtype", self.merge_dtype, "a floating dtype")
        if self.max_intruders < 0 or self.intruder_k < 1:
            raise bad("max_intruders/intruder_k", (self.max_intruders, self.intruder_k), ">= 0/1")
        if not 0 < self.intruder_epsilon <= 1:
            raise bad("intruder_epsilon", self.intruder_epsilon, "in (0, 1]")


@dataclass(frozen=True)
class Finding(Tabular):
    """One check of one module (``module`` None: the adapter as a whole).

    ``value`` is what was measured and ``threshold`` what it was held to (None where the check
    is a yes/no); ``message`` says both in words."""

    COLUMNS: ClassVar[tuple[Column, ...]] = (
        Column("module", doc="module key; empty for the adapter as a whole"),
        Column("check", doc="which check (see lorascope.check)"),
        Column("level", doc="info (passed), warn or fail"),
        Column("value", doc="what was measured"),
        Column("threshold", doc="what it was held to"),
        Column("message", doc="both in words"),
    )

    module: str | None
    check: str
    level: Level
    value: float | None
    threshold: float | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CheckResult:
    """The findings of :func:`check_adapter` and the verdict they give.

    Attributes
    ----------
    adapter, base : str
        What was checked (``base`` None without one).
    fail_on : {"warn", "fail"}
        The lowest level that fails the verdict.
    findings : list of Finding
        Adapter-level findings first, then per module in adapter order.
    """

    adapter: str
    base: str | None
    fail_on: Level = "fail"
    findings: list[Finding] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """``"fail"`` if any finding is at or above ``fail_on``, else ``"pass"``."""
        floor = LEVELS.index(self.fail_on)
        return "fail" if any(LEVELS.index(f.level) >= floor for f in self.findings) else "pass"

    @property
    def counts(self) -> dict[str, int]:
        return {lvl: sum(f.level == lvl for f in self.findings) for lvl in LEVELS}

    def to_dict(self) -> dict[str, Any]:
        """The JSON verdict: ``verdict``, ``fail_on``, ``counts``, ``findings``."""
        return {
            "adapter": self.adapter,
            "base": self.base,
            "verdict": self.verdict,
            "fail_on": self.fail_on,
            "counts": self.counts,
            "findings": [f.to_dict() for f in self.findings],
        }


def check_adapter(
    adapter: Adapter | str | Path,
    base: BaseWeights | str | Path | None = None,
    *,
    thresholds: Thresholds = Thresholds(),
    fail_on: Level = "fail",
    load: Callable[[Path], Adapter] | None = None,
) -> CheckResult:
    """Run the checks of the module docstring on ``adapter`` (and its merge into ``base``).

    Parameters
    ----------
    adapter : Adapter, str or Path
        The adapter, or a path read with ``load`` (default :func:`~lorascope.formats.load_adapter`).
    base : BaseWeights, str or Path, optional
        Its base checkpoint: enables ``overflow`` (and ``intruders`` when asked) and resolves
        DoRA; each module's weight is read once, alone.
    thresholds : Thresholds
    fail_on : {"warn", "fail"}
        ``warn``: any warning fails the verdict too.

    Returns
    -------
    CheckResult

    Raises
    ------
    LoraScopeError
        Input that cannot be checked (unreadable, unknown layout, a module without its base
        weight). NaN/Inf are findings, not errors.
    """
    if fail_on not in ("warn", "fail"):
        raise LoraScopeError(f"check: fail_on={fail_on!r} must be 'warn' or 'fail'")
    path = adapter.path if isinstance(adapter, Adapter) else str(adapter)
    bw = load_base(base) if isinstance(base, str | Path) else base
    result = CheckResult(adapter=path, base=None if bw is None else bw.path, fail_on=fail_on)
    add = result.findings.append
    if not isinstance(adapter, Adapter):
        try:
            adapter = (load or load_adapter)(Path(adapter))
        except NonFiniteError as e:
            add(Finding(None, "nonfinite", "fail", None, None, str(e)))
            return result
    for f in _adapter_findings(adapter, bw is not None):
        add(f)
    for m in adapter:
        result.findings.extend(_module_findings(m, bw, thresholds))
    return result


def _adapter_findings(adapter: Adapter, with_base: bool) -> list[Finding]:
    out = []
    n_dora = sum(m.is_dora for m in adapter)
    if n_dora and not with_base:
        out.append(
            Finding(
                None,
                "dora-no-base",
                "warn",
                float(n_dora),
                None,
                f"{n_dora} DoRA module(s) checked without --base: only the direction part "
                "s·B A is seen, not the magnitude's rescaling of W",
            )
        )
    init = adapter.config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(MUTATING_INITS):
        tail = (
            "the base given is compared as if it were the one trained on"
            if with_base
            else "without --base nothing of W's change is seen"
        )
        out.append(
            Finding(
                None,
                "init-mutates-base",
                "warn",
                None,
                None,
                f"init_lora_weights={init!r}: the factors were cut from W and W itself changed, "
                f"so s·B A is not the whole update; {tail}",
            )
        )
    return out


def _module_findings(m: LoraModule, bw: BaseWeights | None, th: Thresholds) -> list[Finding]:
    """Every finding for one module; a NaN/Inf or zero update stops its other checks."""
    key = m.key
    try:
        check_finite(m.A, m.source, m.keys[0] if m.keys else f"{key} A")
        check_finite(m.B, m.source, m.keys[1] if len(m.keys) > 1 else f"{key} B")
        S = module_svdvals(m).cpu().double().numpy()  # (k,) descending, float64
    except NonFiniteError as e:
        return [Finding(key, "nonfinite", "fail", None, None, str(e))]
    except ZeroUpdateError as e:
        return [Finding(key, "zero-update", "fail", 0.0, None, str(e))]
    out = [_unused_rank(m, S, th)]
    if bw is None:
        return out
    try:
        W = bw.weight_for(m)  # (d_out, d_in) as stored, memory-mapped where it can be
    except NonFiniteError as e:
        return [*out, Finding(key, "nonfinite", "fail", None, None, str(e))]
    if not W.is_floating_point():
        raise ShapeError(f"{m.tensor_name()}: its base weight is {W.dtype}, not float")
    out.append(_overflow(m, W, th))
    if th.intruders:
        res = module_intruders(m, W, k=th.intruder_k, epsilon=th.intruder_epsilon)
        n = res.counts[0]
        level: Level = "warn" if n > th.max_intruders else "info"
        out.append(
            Finding(
                key,
                "intruders",
                level,
                float(n),
                float(th.max_intruders),
                f"{n} intruder dimension(s) among the top {res.k} singular vectors of W + ΔW "
                f"(ε = {th.intruder_epsilon:g}; at j = {res.intruders[0] or '-'}); "
                f"allowed {th.max_intruders}",
            )
        )
    return out


def _unused_rank(m: LoraModule, S: Any, th: Thresholds) -> Finding:
    r = m.r
    k = select_rank(S, RankRule("energy", th.energy), rcond=default_rcond(m.shape))
    limit = th.unused_rank * r
    level: Level = "warn" if k <= limit else "info"
    what = "≤" if level == "warn" else ">"
    return Finding(
        m.key,
        "unused-rank",
        level,
        float(k),
        limit,
        f"{k} of r = {r} directions hold {th.energy:.4g} of ‖ΔW‖_F² ({what} {th.unused_rank:g}·r"
        + ("; lorascope resize could drop the rest" if level == "warn" else "")
        + ")",
    )


def _overflow(m: LoraModule, W: torch.Tensor, th: Thresholds) -> Finding:
    """``max |W'|`` over ``W' = W + ΔW`` one block of rows at a time, and whether casting to
    the dtype gives an Inf (round to nearest: values past ``max`` by half an ulp or more)."""
    dtype = th.merge_dtype or W.dtype
    top, n_inf = 0.0, 0
    for _i, _w, new in merged_blocks(m, W, dtype=torch.float64):  # (rows, d_in) float64
        if not bool(torch.isfinite(new).all()):
            raise NonFiniteError(f"{m.tensor_name()}: W + ΔW is not finite even in float64")
        top = max(top, float(new.abs().amax()))
        n_inf += int(torch.isinf(new.to(dtype)).sum())
    fmax = float(torch.finfo(dtype).max)
    name = str(dtype).removeprefix("torch.")
    if n_inf:
        level: Level = "fail"
        msg = f"W + ΔW overflows {name}: {n_inf} value(s) become Inf (largest {top:.4g})"
    elif top > th.overflow_headroom * fmax:
        level = "warn"
        msg = f"max |W + ΔW| = {top:.4g} is within {th.overflow_headroom:g}·max of {name}"
    else:
        level = "info"
        msg = f"max |W + ΔW| = {top:.4g}, {name} holds {fmax:.4g}"
    if not math.isfinite(top):
        top = fmax
    return Finding(m.key, "overflow", level, top, fmax, msg)
