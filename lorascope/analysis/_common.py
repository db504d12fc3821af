"""Shared plumbing of the analyses: the checked SVD of one module, and module pairing."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

from lorascope.adapter import LoraModule
from lorascope.errors import MissingModuleError, NonFiniteError, ShapeError, ZeroUpdateError
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
            # each item runs in a copy of the caller's context (so `batched_svds` reaches it)
            ctx = contextvars.copy_context()
            return list(pool.map(lambda x: ctx.copy().run(fn, x), items))
    finally:
        torch.set_num_threads(n)


# SVDs computed ahead by `batched_svds`, keyed by (id(module), dtype, device); empty otherwise.
_BATCHED: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "lorascope_svds", default=None
)

# Largest float stack (bytes of the upcast A and B) one batched factorization may hold.
_BATCH_BYTES = 256 << 20


def _device_key(device: Device) -> str:
    return str(torch.device(device)) if device is not None else "cpu"


def _batched(module: LoraModule, dtype: DType, device: Device) -> SVD | None:
    table = _BATCHED.get()
    return None if table is None else table.get((id(module), dtype, _device_key(device)))


@contextmanager
def batched_svds(
    modules: Sequence[LoraModule],
    *,
    dtype: DType = torch.float64,
    device: Device = None,
    enabled: bool | None = None,
) -> Iterator[None]:
    """Within the block, :func:`module_svd`/:func:`module_svdvals` of ``modules`` come from a
    few batched factorizations instead of one small one per module.

    Modules with equal factor shapes (every layer's ``W_q``, say) are stacked into
    ``A (L, r, d_in)``, ``B (L, d_out, r)`` and decomposed by one batched
    :func:`~lorascope.linalg.factored_svd` call (at most ``_BATCH_BYTES`` of upcast factors per
    call) with ``scale = 1``; each module's ``|s|`` (and the sign of ``s``, moved into ``V``)
    is applied afterwards. The results equal the per-module ones to rounding.

    ``enabled=None`` batches on CUDA only: there, 192 tiny kernels leave the device idle, while
    on the CPU the per-module kernels already run in parallel (:func:`map_modules`). Tests
    pass ``enabled=True`` to run the batched route on the CPU.
    """
    if enabled is None:
        enabled = device is not None and torch.device(device).type == "cuda"
    if not enabled or not modules:
        yield
        return
    groups: dict[tuple, list[LoraModule]] = {}
    for m in modules:
        groups.setdefault((m.A.shape, m.B.shape, m.A.dtype, m.B.dtype), []).append(m)
    table = dict(_BATCHED.get() or {})
    for (a_shape, b_shape, *_), members in groups.items():
        per = (a_shape.numel() + b_shape.numel()) * torch.empty((), dtype=dtype).element_size()
        step = max(1, _BATCH_BYTES // max(1, per))
        for i in range(0, len(members), step):
            chunk = members[i : i + step]
            A = torch.stack([m.A for m in chunk]).to(device)  # (L, r, d_in), dtype as stored
            B = torch.stack([m.B for m in chunk]).to(device)  # (L, d_out, r)
            svd = factored_svd(A, B, 1.0, dtype=dtype)  # (L, d_out, k), (L, k), (L, d_in, k)
            for l, m in enumerate(chunk):
                sign = -1.0 if m.scale < 0 else 1.0  # σ >= 0; U keeps its fixed signs
                S = svd.S[l] * abs(float(m.scale))
                table[(id(m), dtype, _device_key(device))] = SVD(svd.U[l], S, svd.V[l] * sign)
    token = _BATCHED.set(table)
    try:
        yield
    finally:
        _BATCHED.reset(token)


def module_svd(module: LoraModule, *, dtype: DType = torch.float64, device: Device = None) -> SVD:
    """Exact thin SVD of the module's ``ΔW = s·B A`` (see :func:`lorascope.linalg.factored_svd`),
    refusing an all-zero or non-finite update with a one-line error naming file and tensors."""
    A, B = module.A, module.B
    svd = _batched(module, dtype, device)
    if svd is None:
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
    svd = _batched(module, dtype, device)
    if svd is not None:
        S = svd.S
    else:
        if device is not None:
            A, B = A.to(device), B.to(device)
        S = factored_svdvals(A, B, module.scale, dtype=dtype)
    _check_singular_values(module, S, A, B)
    return S


# Largest |entry| of a base weight the analyses accept: its squares and products with unit
# vectors stay far inside float64 (2^500 ≈ 3e150; real weights are below 1e4).
_MAX_WEIGHT = 2.0**500


def checked_weight(module: LoraModule, W: torch.Tensor) -> torch.Tensor:
    """``W`` after the checks every analysis with a base needs: ``ΔW``'s shape, and entries
    small enough that norms and products cannot overflow float64 (a one-line error naming the
    module otherwise; NaN/Inf were refused when it was read)."""
    if tuple(W.shape) != module.shape:
        raise ShapeError(f"{module.tensor_name()}: base W {tuple(W.shape)} vs ΔW {module.shape}")
    if not W.is_floating_point():
        raise ShapeError(f"{module.tensor_name()}: its base weight has dtype {W.dtype}, not float")
    top = 0.0
    if W.numel():  # aminmax: no |W| temporary (10x faster than abs().amax() on a 14336×4096)
        lo, hi = torch.aminmax(W if W.element_size() > 1 else W.float())
        top = max(-float(lo), float(hi))
    if top > _MAX_WEIGHT:
        raise NonFiniteError(
            f"{module.tensor_name()}: its base weight holds values up to {top:.3g}, too large "
            "to analyse in float64"
        )
    return W


def _check_singular_values(
    module: LoraModule, S: torch.Tensor, A: torch.Tensor, B: torch.Tensor
) -> None:
    if not bool(torch.isfinite(S).all()):
        raise NonFiniteError(
            f"{module.tensor_name()}: the singular values of ΔW overflow "
            f"{str(S.dtype).removeprefix('torch.')} (factors up to {float(A.abs().amax()):.3g} "
            f"and {float(B.abs().amax()):.3g}, scale {module.scale:.3g})"
        )
    if S.numel() == 0 or float(S[0]) == 0.0:
        if module.scale != 0 and bool(A.any()) and bool(B.any()):  # tiny, not zero
            raise ZeroUpdateError(
                f"{module.tensor_name()}: the singular values of ΔW = s·B·A underflow to 0 in "
                f"{str(S.dtype).removeprefix('torch.')} (‖A‖={float(A.double().norm()):.3g}, "
                f"‖B‖={float(B.double().norm()):.3g}); analyse in float64"
            )
        raise ZeroUpdateError(
            f"{module.tensor_name()}: ΔW = s·B·A is exactly zero "
            f"(‖A‖={float(A.double().norm()):.3g}, ‖B‖={float(B.double().norm()):.3g}; "
            "an untrained adapter?) — nothing to analyse"
        )


def update_fields(*modules: LoraModule) -> dict[str, str]:
    """``family`` and ``update`` of a result, from the module(s) it describes: each the single
    value they share, else their values joined by ``/`` in order (e.g. ``"lora/dora"``).

    ``update`` names what the factored form stood for (:data:`lorascope.adapter.UPDATES`): the
    whole ΔW (``full``), or for DoRA its direction part alone (no base) or its rank-r part with
    the magnitude applied (with a base)."""

    def join(values: list[str]) -> str:
        return "/".join(dict.fromkeys(values))

    return {
        "family": join([m.family for m in modules]),
        "update": join([m.update for m in modules]),
    }


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
