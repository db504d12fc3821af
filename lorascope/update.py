"""The one place that turns a module and its base weight into an effective update or a merged W.

For every additive family the module's factored form is the whole update,
``W' = W + s · B A``. DoRA (Liu et al. 2024) rescales the merged weight by a learned magnitude
``m`` (:class:`~lorascope.adapter.Magnitude`)::

    axis "out":  W' = diag(g) · (W + s·B A),   g_i = m_i / (‖(W + s·B A)[i, :]‖ + eps)
    axis "in":   W' = (W + s·B A) · diag(g),   g_j = m_j / (‖(W + s·B A)[:, j]‖ + eps)

so the true update is ``ΔW = W' − W = diag(g − 1)·W + diag(g)·s·B A`` (axis "out"; mirrored for
"in"): a rescaling of ``W`` plus a rank-``r`` part that stays factored. This is PEFT's
``DoraLinearLayer`` / ``DoraEmbeddingLayer`` merge, LyCORIS' ``apply_weight_decompose``
(``wd_on_out``), mlx-lm's ``DoRALinear.fuse`` and diffusers' DoRA.

Everything here takes ``W`` in ``nn.Linear`` orientation, ``(d_out, d_in)`` (a conv kernel
flattened to ``(out, in·kh·kw)``), as :meth:`lorascope.formats.BaseWeights.weight_for` returns
it, and reads ``W`` one block of rows at a time: nothing ``W``-sized is allocated beyond what a
caller asks for (``merged_weight``; :func:`merged_blocks` hands it out one block at a time).

Merging into a stored checkpoint tensor (a transposed ``Conv1D``, a fused part's rows, a conv
kernel), with ``lorascope merge``'s two roundings, is :mod:`lorascope.tensor_merge`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch

from lorascope.adapter import LoraModule
from lorascope.errors import NonFiniteError, ShapeError, ZeroUpdateError

__all__ = [
    "dora_gain",
    "with_base",
    "merged_weight",
    "merged_blocks",
    "delta_weight",
    "full_update_svdvals",
]

_BLOCK_BYTES = 4 << 20


def _check(module: LoraModule, W: torch.Tensor) -> None:
    if tuple(W.shape) != module.shape:
        raise ShapeError(f"{module.tensor_name()}: base W {tuple(W.shape)} vs ΔW {module.shape}")


def _rows(n_rows: int, n_cols: int, dtype: torch.dtype) -> int:
    return max(1, _BLOCK_BYTES // max(1, n_cols * torch.empty((), dtype=dtype).element_size()))


def _lowrank_norms(
    module: LoraModule, W: torch.Tensor, axis: str, dtype: torch.dtype
) -> torch.Tensor:
    """Row norms (``axis="out"``, ``(d_out,)``) or squared column norms (``"in"``, ``(d_in,)``,
    summed per channel by the caller) of ``W + s·B A``, one block of rows of ``W`` at a time in
    ``dtype``."""
    A = module.A.to(device=W.device, dtype=dtype)  # (r, d_in)
    B = module.B.to(device=W.device, dtype=dtype)  # (d_out, r)
    d_out, d_in = module.shape
    step = _rows(d_out, d_in, dtype)
    if axis == "out":
        out = torch.empty(d_out, dtype=dtype, device=W.device)
        for i in range(0, d_out, step):
            blk = W[i : i + step].to(dtype) + module.scale * (B[i : i + step] @ A)  # (rows, in)
            out[i : i + step] = torch.linalg.vector_norm(blk, dim=1)
        return out
    sq = torch.zeros(d_in, dtype=dtype, device=W.device)
    for i in range(0, d_out, step):
        blk = W[i : i + step].to(dtype) + module.scale * (B[i : i + step] @ A)  # (rows, in)
        sq += blk.square().sum(dim=0)
    return sq


def dora_gain(
    module: LoraModule, W: torch.Tensor, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """DoRA's rescaling ``g = m / (‖W + s·B A‖ + eps)`` along the magnitude's axis.

    Parameters
    ----------
    module : LoraModule
        With ``magnitude`` set and ``update != "dora-rank-r"`` (its factors are ``s·B A``).
    W : torch.Tensor
        ``(d_out, d_in)`` base weight, any float dtype.

    Returns
    -------
    torch.Tensor
        ``(d_out,)`` for axis ``"out"``; ``(d_in,)`` for axis ``"in"`` (a grouped magnitude,
        one value per conv input channel, repeated over the channel's ``kh·kw`` columns).

    Raises
    ------
    ZeroUpdateError
        A norm of ``W + s·B A`` is zero where ``m`` is not (the rescaling is undefined).
    """
    mag = module.magnitude
    if mag is None:
        raise ShapeError(f"{module.tensor_name()}: not a DoRA module (no magnitude)")
    if module.update == "dora-rank-r":
        raise ShapeError(f"{module.tensor_name()}: the base is already applied")
    _check(module, W)
    norms = _lowrank_norms(module, W, mag.axis, dtype)
    m = mag.m.to(device=W.device, dtype=dtype).reshape(-1)
    if mag.axis == "in":
        d_in = module.d_in
        if d_in % m.numel():
            raise ShapeError(
                f"{module.source}: {mag.key} has {m.numel()} entries, which do not divide the "
                f"{d_in} input columns of {module.key}"
            )
        group = d_in // m.numel()
        norms = norms.reshape(m.numel(), group).sum(dim=1).sqrt()  # per channel: Σ over kernel
        gain = m / (norms + mag.eps)
        gain = gain.repeat_interleave(group)  # (d_in,)
    else:
        if m.numel() != module.d_out:
            raise ShapeError(
                f"{module.source}: {mag.key} has {m.numel()} entries; {module.key} has "
                f"{module.d_out} output rows"
            )
        gain = m / (norms + mag.eps)
    if not bool(torch.isfinite(gain).all()):
        raise ZeroUpdateError(
            f"{module.source}: {mag.key}: ‖W + s·B A‖ is zero along some "
            f"{'row' if mag.axis == 'out' else 'column'}, so DoRA's rescaling is undefined"
        )
    return gain


def with_base(
    module: LoraModule,
    W: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    gain: torch.Tensor | None = None,
) -> LoraModule:
    """The module whose factored form is the part of its true update that the factors carry.

    Additive families (and a DoRA module already resolved) come back unchanged. For DoRA the
    rank-``r`` part ``diag(g)·s·B A`` (axis "out": ``B' = diag(g) B``; axis "in":
    ``A' = A diag(g)``) comes back with ``update="dora-rank-r"``, in ``dtype``; the remaining
    ``diag(g − 1)·W`` is a rescaling of ``W`` itself (:func:`full_update_svdvals` gives the
    whole update's spectrum). ``gain``: :func:`dora_gain` when the caller has it already.
    """
    if module.magnitude is None or module.update == "dora-rank-r":
        return module
    g = dora_gain(module, W, dtype=dtype) if gain is None else gain
    if module.magnitude.axis == "out":
        B = g.reshape(-1, 1) * module.B.to(device=g.device, dtype=dtype)  # (d_out, r)
        return replace(
            module, B=B, A=module.A.to(device=g.device, dtype=dtype), update="dora-rank-r"
        )
    A = module.A.to(device=g.device, dtype=dtype) * g.reshape(1, -1)  # (r, d_in)
    return replace(module, A=A, B=module.B.to(device=g.device, dtype=dtype), update="dora-rank-r")


def merged_weight(
    module: LoraModule,
    W: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    gain: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W'``, the weight the adapted layer computes with, ``(d_out, d_in)`` in ``dtype``.

    ``W + s·B A`` for additive families; ``diag(g)(W + s·B A)`` (or ``(W + s·B A) diag(g)``) for
    DoRA, which is what PEFT's ``merge_and_unload``, LyCORIS' merge and mlx-lm's ``fuse``
    compute. ``dtype`` defaults to float32 (float64 if ``W`` is float64). ``gain``:
    :func:`dora_gain` in ``dtype`` when the caller has it already.
    """
    _check(module, W)
    if module.update == "dora-rank-r":
        raise ShapeError(f"{module.tensor_name()}: merge from the module as read, not resolved")
    dtype = dtype or (torch.float64 if W.dtype == torch.float64 else torch.float32)
    A = module.A.to(device=W.device, dtype=dtype)
    B = module.B.to(device=W.device, dtype=dtype)
    out = W.to(dtype) + module.scale * (B @ A)  # (d_out, r) @ (r, d_in) -> (d_out, d_in)
    if module.magnitude is not None:
        g = dora_gain(module, W, dtype=dtype) if gain is None else gain.to(dtype)
        out = g.reshape(-1, 1) * out if module.magnitude.axis == "out" else out * g.reshape(1, -1)
    return out


def merged_blocks(
    module: LoraModule,
    W: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    gain: torch.Tensor | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """:func:`merged_weight` one block of rows at a time: ``(i, W[i:i+n], W'[i:i+n])`` in
    ``dtype``, so a caller can scan ``W' = W + ΔW`` (or DoRA's rescaled sum) holding a few MB.

    ``W`` is ``(d_out, d_in)``, any float dtype (a memory-mapped tensor is read block by
    block). DoRA's gain (:func:`dora_gain`, one more pass over ``W``) is computed first unless
    given.
    """
    _check(module, W)
    if module.update == "dora-rank-r":
        raise ShapeError(f"{module.tensor_name()}: merge from the module as read, not resolved")
    A = module.A.to(device=W.device, dtype=dtype)  # (r, d_in)
    B = module.B.to(device=W.device, dtype=dtype)  # (d_out, r)
    g = None
    if module.magnitude is not None:
        g = dora_gain(module, W, dtype=dtype) if gain is None else gain.to(dtype)
    d_out, d_in = module.shape
    step = _rows(d_out, d_in, dtype)
    for i in range(0, d_out, step):
        w = W[i : i + step].to(dtype)  # (rows, d_in)
        new = w + module.scale * (B[i : i + step] @ A)  # (rows, r) @ (r, d_in)
        if g is not None:
            axis_out = module.magnitude.axis == "out"
            new = g[i : i + step].reshape(-1, 1) * new if axis_out else new * g.reshape(1, -1)
        yield i, w, new


def delta_weight(
    module: LoraModule, W: torch.Tensor | None = None, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Dense true update ``W' − W`` (``(d_out, d_in)``, ``dtype``), for tests and small modules.

    Without ``W`` only additive modules have one (``s·B A``); a DoRA module raises.
    """
    if module.magnitude is None or module.update == "dora-rank-r":
        return module.scale * (module.B.to(dtype) @ module.A.to(dtype))
    if W is None:
        raise ShapeError(f"{module.tensor_name()}: a DoRA update needs its base weight")
    return merged_weight(module, W, dtype=dtype) - W.to(dtype)


def full_update_svdvals(
    module: LoraModule,
    W: torch.Tensor,
    k: int,
    *,
    dtype: torch.dtype = torch.float64,
    tol: float = 1e-10,
    seed: int = 0,
    gain: torch.Tensor | None = None,
) -> tuple[np.ndarray, float]:
    """Top-``k`` singular values and the Frobenius norm of DoRA's whole ``ΔW = W' − W``,
    through an operator: ``x ↦ (g−1)⊙(W x) + g⊙(s B (A x))`` (axis "out"), never dense.

    ARPACK (``scipy.sparse.linalg.svds``, relative tolerance ``tol``) on that operator; ``W`` is
    applied block by block (:func:`lorascope.linalg.blocked_matmul`). The norm is exact,
    accumulated one block of rows at a time. ``gain``: :func:`dora_gain` when the caller has it.

    Returns
    -------
    (np.ndarray, float)
        ``σ_1 ≥ … ≥ σ_k`` and ``‖ΔW‖_F``.
    """
    from scipy.sparse.linalg import LinearOperator, svds

    from lorascope.linalg import blocked_matmul

    _check(module, W)
    axis = module.magnitude.axis if module.magnitude is not None else "out"
    if module.magnitude is None:
        g = torch.ones(module.d_out, dtype=dtype, device=W.device)
    else:
        g = dora_gain(module, W, dtype=dtype) if gain is None else gain
    resolved = with_base(module, W, dtype=dtype, gain=g)
    A = resolved.A.to(device=W.device, dtype=dtype)  # (r, d_in), g folded in for axis "in"
    B = resolved.B.to(device=W.device, dtype=dtype)  # (d_out, r), g folded in for axis "out"
    s = float(module.scale)
    gm1 = (g - 1).reshape(-1, 1)
    d_out, d_in = module.shape

    def matmat(X: np.ndarray) -> np.ndarray:
        X = torch.from_numpy(np.ascontiguousarray(X)).to(W.device, dtype).reshape(d_in, -1)
        if axis == "out":  # diag(g−1) W X + B' (A X)
            Y = gm1 * blocked_matmul(W, X, dtype=dtype) + s * (B @ (A @ X))
        else:  # W diag(g−1) X + B (A' X)
            Y = blocked_matmul(W, gm1 * X, dtype=dtype) + s * (B @ (A @ X))
        return Y.cpu().numpy()

    def rmatmat(Y: np.ndarray) -> np.ndarray:
        Y = torch.from_numpy(np.ascontiguousarray(Y)).to(W.device, dtype).reshape(d_out, -1)
        if axis == "out":  # Wᵀ diag(g−1) Y + Aᵀ (B'ᵀ Y)
            X = blocked_matmul(W, gm1 * Y, transpose=True, dtype=dtype) + s * (A.T @ (B.T @ Y))
        else:
            X = gm1 * blocked_matmul(W, Y, transpose=True, dtype=dtype) + s * (A.T @ (B.T @ Y))
        return X.cpu().numpy()

    # ‖ΔW‖_F exactly, one block of rows at a time
    sq = 0.0
    step = _rows(d_out, d_in, dtype)
    for i in range(0, d_out, step):
        w = W[i : i + step].to(dtype)
        blk = s * (B[i : i + step] @ A)  # (rows, in): the rank-r part's rows
        blk = blk + (gm1[i : i + step] * w if axis == "out" else w * gm1.reshape(1, -1))
        sq += float(blk.square().sum())
    k = max(1, min(k, d_out, d_in))
    if k >= min(d_out, d_in) - 1:  # ARPACK needs k < min(shape): decompose the small case
        dense = torch.from_numpy(matmat(np.eye(d_in)))
        S = torch.linalg.svdvals(dense).numpy()[:k]
    else:
        op = LinearOperator(
            (d_out, d_in),
            matvec=matmat,
            rmatvec=rmatmat,
            matmat=matmat,
            rmatmat=rmatmat,
            dtype=np.float64,
        )
        v0 = np.random.default_rng(seed).standard_normal(min(d_out, d_in))
        S = np.sort(svds(op, k=k, tol=tol, v0=v0, solver="arpack", return_singular_vectors=False))
        S = S[::-1].copy()
    if not (np.isfinite(S).all() and np.isfinite(sq)):
        raise NonFiniteError(f"{module.tensor_name()}: the DoRA update has non-finite values")
    return S, sq**0.5
