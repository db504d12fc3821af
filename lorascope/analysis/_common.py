"""Shared plumbing of the analyses: the checked SVD of one module, and module pairing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from lorascope.adapter import LoraModule
from lorascope.errors import MissingModuleError, NonFiniteError, ZeroUpdateError
from lorascope.linalg import SVD, factored_svd, factored_svdvals

DType = torch.dtype
Device = str | torch.device | None
T = TypeVar("T")
R = TypeVar("R")


def map_modules(fn: Callable[[T], R], items: Sequence[T], device: Device = None) -> list[R]:
    """``[fn(x) for x in items]``, on the CPU spread over ``torch.get_num_threads()`` threads.

    The per-module kernels are small tall-skinny QRs/SVDs (``12288 × 64``) that LAPACK threads
    badly: on 2 cores, 2 intra-op threads made a 192-module ``spectrum`` 5× *slower* than 1.
    So the modules run in parallel instead, one intra-op thread each (torch's linalg releases
    the GIL), and the thread setting is restored afterwards. Results keep the order of
    ``items``; the first exception propagates. On CUDA, or with one thread, it is a plain loop.
    """
    n = torch.get_num_threads()
    on_cpu = device is None or torch.device(device).type == "cpu"
    if n <= 1 or len(items) < 2 or not on_cpu:
        return [fn(x) for x in items]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=min(n, len(items))) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(n)


def module_svd(module: LoraModule, *, dtype: DType = torch.float64, device: Device = None) -> SVD:
    """Exact thin SVD of the module's ``ΔW = s·B A`` (see :func:`lorascope.linalg.factored_svd`),
    refusing an all-zero or non-finite update with a one-line error naming file and tensors."""
    A, B = module.A, module.B
    if device is not None:
        A, B = A.to(device), B.to(device)
    svd = factored_svd(A, B, module.scale, dtype=dtype)
    _check_singular_values(module, svd.S, A, B)
    return svd


def module_svdvals(
    module: LoraModule, *, dtype: DType = torch.float64, device: Device = None
) -> torch.Tensor:
    """Singular values only of the module's ``ΔW`` (:func:`lorascope.linalg.factored_svdvals`:
    no singular vectors are formed), with the same checks as :func:`module_svd`."""
    A, B = module.A, module.B
    if device is not None:
        A, B = A.to(device), B.to(device)
    S = factored_svdvals(A, B, module.scale, dtype=dtype)
    _check_singular_values(module, S, A, B)
    return S


def _check_singular_values(
    module: LoraModule, S: torch.Tensor, A: torch.Tensor, B: torch.Tensor
) -> None:
    if not bool(torch.isfinite(S).all()):
        raise NonFiniteError(f"{module.tensor_name()}: ΔW has non-finite singular values")
    if S.numel() == 0 or float(S[0]) == 0.0:
        raise ZeroUpdateError(
            f"{module.tensor_name()}: ΔW = s·B·A is exactly zero "
            f"(‖A‖={float(A.float().norm()):.3g}, ‖B‖={float(B.float().norm()):.3g}; "
            "an untrained adapter?) — nothing to analyse"
        )


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
