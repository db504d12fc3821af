"""Is ΔW really low-rank? Singular values, cumulative energy, effective and stable rank.

Hu et al. 2021 §7.2 ask whether the update has a "very low intrinsic rank"; these numbers answer
it per module, from the exact factored SVD (never a dense ΔW).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lorascope.adapter import Adapter, LoraModule
from lorascope.analysis._common import (
    Device,
    batched_svds,
    map_modules,
    module_svdvals,
    update_fields,
)
from lorascope.columns import Column, Results, Tabular, ident, ident_columns
from lorascope.linalg import default_rcond

__all__ = ["SpectrumResult", "module_spectrum", "spectrum", "spectrum_values"]


def _sigma2_ratio(r: SpectrumResult) -> float | None:
    S = r.singular_values
    return S[1] / r.spectral_norm if len(S) > 1 else None


@dataclass
class SpectrumResult(Tabular):
    """Spectrum of one module's ``ΔW`` (``(d_out, d_in)``, rank ``r``).

    Attributes
    ----------
    singular_values : list[float]
        σ_1 >= ... >= σ_k of ``ΔW = s·B A``, ``k = min(r, d_out, d_in)``.
    energy : list[float]
        Cumulative energy ``Σ_{i<=t} σ_i² / Σ σ_i²`` for t = 1..k.
    frobenius_norm, spectral_norm : float
        ``‖ΔW‖_F = sqrt(Σ σ²)`` and ``‖ΔW‖_2 = σ_1``.
    effective_rank : float
        Entropy effective rank ``exp(−Σ p_i log p_i)``, ``p = σ / Σσ`` (Roy & Vetterli 2007).
    stable_rank : float
        ``‖ΔW‖_F² / ‖ΔW‖_2²``.
    numerical_rank : int
        Count of ``σ_i > rcond · σ_1``.
    """

    module: str
    layer: int | None
    kind: str
    rank: int
    shape: tuple[int, int]
    scale: float
    singular_values: list[float]
    energy: list[float]
    frobenius_norm: float
    spectral_norm: float
    effective_rank: float
    stable_rank: float
    numerical_rank: int
    family: str = "lora"
    update: str = "full"

    COLUMNS = (
        *ident_columns(),
        Column("frobenius_norm", "‖ΔW‖_F", doc="Frobenius norm of ΔW"),
        Column("spectral_norm", "σ1", doc="largest singular value of ΔW"),
        Column("sigma2_ratio", "σ2/σ1", get=_sigma2_ratio, doc="second over first σ"),
        Column("top1_energy", "top-1 energy", get=lambda r: r.energy[0], doc="σ1² / Σ σ²"),
        Column("effective_rank", "eff. rank", doc="entropy effective rank exp(H(σ/Σσ))"),
        Column("stable_rank", "stable rank", doc="‖ΔW‖_F² / ‖ΔW‖_2²"),
        Column("numerical_rank", "num. rank", doc="count of σ_i > rcond·σ_1"),
    )
    TIDY = (
        *ident_columns(),
        Column("index", doc="i, from 1"),
        Column("singular_value", "σ_i", doc="i-th singular value of ΔW"),
        Column("energy", doc="cumulative energy Σ_{t<=i} σ_t² / Σ σ²"),
    )

    def tidy(self) -> Iterator[dict]:
        base = ident(self)
        for i, (s, e) in enumerate(zip(self.singular_values, self.energy, strict=True)):
            yield {**base, "index": i + 1, "singular_value": s, "energy": e}

    def caption(self) -> str:
        return (
            f"spectrum of ΔW · {self.module} · {self.family} · rank {self.rank} · "
            f"{self.shape[0]}×{self.shape[1]}"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def module_spectrum(
    module: LoraModule,
    *,
    rcond: float | None = None,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
) -> SpectrumResult:
    """Spectrum of one module's update (Hu et al. 2021 §7.2), from the factored SVD.

    ``rcond`` defaults to ``eps(dtype)·max(d_out, d_in)`` (as ``numpy.linalg.matrix_rank``).
    Raises :class:`~lorascope.errors.ZeroUpdateError` when ``ΔW = 0``.
    """
    S = module_svdvals(module, dtype=dtype, device=device).cpu().numpy()  # (k,)
    rcond = default_rcond(module.shape, dtype) if rcond is None else rcond
    return SpectrumResult(
        **update_fields(module),
        module=module.key,
        layer=module.layer,
        kind=module.kind,
        rank=module.rank,
        shape=module.shape,
        scale=float(module.scale),
        **spectrum_values(S, rcond),
    )


def spectrum_values(S: np.ndarray, rcond: float) -> dict:
    """The spectral summaries of :class:`SpectrumResult` from ``S`` (``(k,)``, descending,
    ``σ_1 > 0``, finite): ``singular_values``, ``energy``, ``frobenius_norm``,
    ``spectral_norm``, ``effective_rank``, ``stable_rank``, ``numerical_rank``
    (``σ_i > rcond·σ_1``). Shares and ratios come from ``σ/σ_1``, so huge or tiny finite σ
    cannot overflow ``σ²`` (issue 11)."""
    S = np.asarray(S, dtype=np.float64)
    rel = S / S[0]  # (k,), rel[0] = 1
    sq = rel**2
    total = float(sq.sum())  # ‖ΔW‖_F² / σ_1², in [1, k]
    p = rel[rel > 0] / rel.sum()
    return dict(
        singular_values=S.tolist(),
        energy=(np.cumsum(sq) / total).tolist(),
        frobenius_norm=float(S[0]) * float(np.sqrt(total)),
        spectral_norm=float(S[0]),
        effective_rank=float(np.exp(-(p * np.log(p)).sum())),
        stable_rank=total,
        numerical_rank=int((S > rcond * S[0]).sum()),
    )


def spectrum(
    adapter: Adapter,
    *,
    layer: int | None = None,
    module: str | None = None,
    rcond: float | None = None,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
    batch: bool | None = None,
) -> Results[SpectrumResult]:
    """:func:`module_spectrum` for every module of ``adapter`` selected by ``layer``/``module``
    (see :meth:`lorascope.adapter.Adapter.select`).

    ``batch`` stacks equal-shaped modules into batched factorizations (default: on CUDA only;
    see :func:`lorascope.analysis._common.batched_svds`)."""
    mods = adapter.select(layer=layer, module=module)
    with batched_svds(mods, dtype=dtype, device=device, enabled=batch):
        return Results(
            map_modules(
                lambda m: module_spectrum(m, rcond=rcond, dtype=dtype, device=device), mods, device
            )
        )
