"""Shared plumbing of the analyses: the checked SVD of one module, and module pairing."""

from __future__ import annotations

import torch

from lorascope.adapter import LoraModule
from lorascope.errors import MissingModuleError, NonFiniteError, ZeroUpdateError
from lorascope.linalg import SVD, factored_svd

DType = torch.dtype
Device = str | torch.device | None


def module_svd(module: LoraModule, *, dtype: DType = torch.float64, device: Device = None) -> SVD:
    """Exact thin SVD of the module's ``ΔW = s·B A`` (see :func:`lorascope.linalg.factored_svd`),
    refusing an all-zero or non-finite update with a one-line error naming file and tensors."""
    A, B = module.A, module.B
    if device is not None:
        A, B = A.to(device), B.to(device)
    svd = factored_svd(A, B, module.scale, dtype=dtype)
    if not bool(torch.isfinite(svd.S).all()):
        raise NonFiniteError(f"{module.tensor_name()}: ΔW has non-finite singular values")
    if svd.S.numel() == 0 or float(svd.S[0]) == 0.0:
        raise ZeroUpdateError(
            f"{module.tensor_name()}: ΔW = s·B·A is exactly zero "
            f"(‖A‖={float(A.float().norm()):.3g}, ‖B‖={float(B.float().norm()):.3g}; "
            "an untrained adapter?) — nothing to analyse"
        )
    return svd


def pair_modules(
    a: list[LoraModule], b: list[LoraModule], what_a: str, what_b: str
) -> list[tuple[LoraModule, LoraModule]]:
    """Match the modules of two adapters: by key, else by (layer, kind) when that is unique."""
    by_key = {m.key: m for m in b}
    pairs = [(m, by_key[m.key]) for m in a if m.key in by_key]
    if pairs:
        return pairs
    by_lk: dict[tuple, list[LoraModule]] = {}
    for m in b:
        by_lk.setdefault((m.layer, m.kind), []).append(m)
    count_a: dict[tuple, int] = {}
    for m in a:
        count_a[(m.layer, m.kind)] = count_a.get((m.layer, m.kind), 0) + 1
    pairs = [
        (m, by_lk[(m.layer, m.kind)][0])
        for m in a
        if len(by_lk.get((m.layer, m.kind), [])) == 1 and count_a[(m.layer, m.kind)] == 1
    ]
    if not pairs:
        raise MissingModuleError(
            f"{what_a} and {what_b} share no module (by name, or by layer and kind)"
        )
    return pairs
