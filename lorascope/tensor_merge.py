"""Merging an adapter module into a stored checkpoint tensor: where its ``ΔW`` lands, and the
two roundings of ``lorascope merge``.

A stored tensor is not always ``W`` in ``nn.Linear`` orientation: GPT-2 ``Conv1D`` stores
``Wᵀ``, a fused q/k/v projection gives each part its rows, a conv kernel is ``(out, in, *k)``.
:func:`region` is the ``(d_out, d_in)`` view of a :class:`~lorascope.formats.base.Placement`;
:func:`merge_tensor` merges every module that targets one stored tensor, through
:func:`lorascope.update.merged_weight` (every family, DoRA included), in one of two roundings:

``single`` (default)  ``W' = fl_out(W + s·B A)`` with the sum formed in float32 (float64 when
                      ``W`` or the output is float64) and rounded once to the output dtype.
``peft``              what peft 0.21's ``merge_and_unload()`` computes on CPU for a model loaded in
                      the output dtype, bit for bit (``tuners/lora/layer.py``): the LoRA weights
                      live in float32 for a float16/bfloat16 model (``autocast_adapter_dtype``),
                      else in the model's dtype; ``ΔW = (B @ A) · s`` is formed in that dtype
                      (``get_delta_weight``, transposed for ``fan_in_fan_out``; a conv through
                      ``conv2d``; an embedding as ``(B_e @ A_e)ᵀ · s`` and cast to the weight's
                      dtype) and added in place, ``W += ΔW`` (torch's mixed-dtype add: the sum in
                      float32, rounded to the weight's dtype).

For a ``Linear`` in the model's own dtype the two agree bit for bit (both add a float32
``s·(B @ A)`` to ``W`` and round once). They differ where peft rounds something on its own
first: ``W`` cast to a lower output dtype before the sum (``--dtype bfloat16`` from a float32
base), an embedding's ``ΔW`` rounded to the weight's dtype, a conv's ``ΔW`` formed by ``conv2d``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from lorascope.adapter import LoraModule
from lorascope.errors import LoraScopeError, NonFiniteError
from lorascope.formats.base import Placement
from lorascope.linalg import factored_svdvals, safe_norm
from lorascope.update import merged_weight

__all__ = ["ROUNDINGS", "region", "merge_tensor", "peft_delta", "check_peft_mergeable"]

Rounding = Literal["single", "peft"]
ROUNDINGS: tuple[str, ...] = ("single", "peft")


def region(t: torch.Tensor, p: Placement) -> torch.Tensor:
    """The ``(d_out, d_in)`` part of stored tensor ``t`` that ``p`` updates, as a view of ``t``
    (GPT-2 ``Conv1D`` transposed, a conv kernel flattened, a fused part's rows)."""
    v = t.T if p.transposed else t.reshape(p.shape[0], -1)  # Conv1D (d_in, D) -> (D, d_in)
    return v if p.rows is None else v[p.rows[0] : p.rows[1]]  # a fused part: its rows


def _norm(t: torch.Tensor) -> float:
    """``‖t‖_F`` without overflow (:func:`lorascope.linalg.safe_norm`); a norm beyond float64
    is an error, never an ``inf`` in the report."""
    n = safe_norm(t)
    if not math.isfinite(n):
        raise NonFiniteError(f"a merged weight's norm overflows float64 ({t.shape[0]} rows)")
    return n


def _work_dtype(stored: torch.dtype, out: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (stored, out) else torch.float32


def _is_embedding(module: LoraModule) -> bool:
    """A peft ``Embedding`` LoRA (read from ``lora_embedding_A/B``; see formats.peft)."""
    return any("lora_embedding_" in k for k in module.keys)


def check_peft_mergeable(module: LoraModule) -> None:
    """Refuse a module :func:`peft_delta` cannot reproduce: another family, DoRA (its merge is
    not ``W + ΔW``), or a fused part (peft has no such module)."""
    if module.family != "lora" or module.is_dora or module.rows is not None:
        what = "a fused part" if module.rows is not None else f"a {module.family} module"
        raise LoraScopeError(
            f"{module.tensor_name()}: --rounding peft reproduces peft's LoRA merge; this is {what}"
        )


def peft_delta(
    module: LoraModule, p: Placement, weight_dtype: torch.dtype, *, autocast: bool = True
) -> torch.Tensor:
    """``get_delta_weight`` of peft 0.21's LoRA ``Linear``/``Embedding``/``Conv`` on CPU,
    op for op, shaped and oriented as the stored tensor (``p.shape``).

    The LoRA weights are held in ``float32`` when ``weight_dtype`` is float16/bfloat16 and
    ``autocast`` (peft's ``autocast_adapter_dtype=True``, its default), else in
    ``weight_dtype``; the file's factors are rounded to that dtype as peft's ``load_state_dict``
    does. Then, in that dtype: Linear ``transpose(B @ A, fan_in_fan_out) · s``; Embedding
    ``(B_e @ A_e)ᵀ · s`` with ``B_e = Aᵀ``, ``A_e = Bᵀ``; conv ``conv(Aᵀ, B)ᵀ · s`` (``1×1``:
    ``B @ A``); float16/bfloat16 factors are multiplied in float32 and cast back, as peft does
    on CPU. Only the arithmetic is reproduced: the caller adds the result (:func:`merge_tensor`).
    """
    check_peft_mergeable(module)
    low = (torch.float16, torch.bfloat16)
    lora_dtype = torch.float32 if autocast and weight_dtype in low else weight_dtype
    A = module.A.to(lora_dtype).contiguous()  # (r, d_in), as the nn.Linear weight holds it
    B = module.B.to(lora_dtype).contiguous()  # (d_out, r)
    cast = lora_dtype in low  # peft: "cast_to_fp32" on CPU
    if cast:
        A, B = A.float(), B.float()
    s = float(module.scale)
    if _is_embedding(module):
        e_A, e_B = B.T.contiguous(), A.T.contiguous()  # (r, num_emb), (emb_dim, r) as peft holds
        out = (e_B @ e_A).T * s  # (emb_dim, num_emb).T -> (num_emb, emb_dim)
    elif len(p.shape) > 2:  # conv kernel (out, in, *k)
        kernel = tuple(p.shape[2:])
        A_k = A.reshape(A.shape[0], p.shape[1], *kernel)  # (r, in, *k)
        B_k = B.reshape(B.shape[0], B.shape[1], *([1] * len(kernel)))  # (out, r, 1, ...)
        if len(kernel) == 2 and kernel == (1, 1):
            out = (B_k.squeeze(3).squeeze(2) @ A_k.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
            out = out * s
        else:
            conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d}.get(len(kernel))
            if conv is None:
                raise LoraScopeError(
                    f"{module.tensor_name()}: --rounding peft covers 1-D and 2-D convs only"
                )
            out = conv(A_k.transpose(0, 1), B_k).transpose(0, 1) * s  # (out, in, *k)
    else:
        out = B @ A  # (d_out, r) @ (r, d_in) -> (d_out, d_in)
        out = (out.T if p.transposed else out) * s  # peft: transpose(B @ A, fan_in_fan_out)
    if cast:
        out = out.to(lora_dtype)
    if _is_embedding(module):
        out = out.to(weight_dtype)  # peft's Embedding.merge: get_delta_weight(...).to(orig_dtype)
    return out


def merge_tensor(
    W: torch.Tensor,
    placed: Sequence[tuple[LoraModule, Placement]],
    dtype: torch.dtype | None = None,
    where: str = "",
    *,
    rounding: Rounding = "single",
) -> tuple[torch.Tensor, list[tuple[float, float, float]]]:
    """``W + Σ s · B @ A`` over the modules that target one stored tensor, cast to its dtype.

    Parameters
    ----------
    W : torch.Tensor
        The tensor as stored: ``(D, d_in)``, or ``(d_in, D)`` for a transposed placement
        (GPT-2 ``Conv1D``), or a conv kernel ``(out, in, *kernel)``.
    placed : sequence of (LoraModule, Placement)
        The modules that update ``W`` and where (:meth:`BaseWeights.locate`); their rows must
        not overlap.
    dtype : torch.dtype, optional
        Output dtype; default ``W.dtype``.
    where : str
        ``file: tensor`` for error messages.
    rounding : {"single", "peft"}
        ``single``: computed in float32 (float64 if ``W`` or ``dtype`` is float64), every module
        through :func:`merged_weight` (DoRA included), then cast to ``dtype`` once. ``peft``:
        ``W`` cast to ``dtype`` and :func:`peft_delta` added in place, as peft's
        ``merge_and_unload`` computes it (plain LoRA modules only; see the module docstring).

    Returns
    -------
    merged : torch.Tensor
        ``W'``, shaped as ``W``, in ``dtype``.
    norms : list of (float, float, float)
        Per module: ``‖W‖_F``, ``‖ΔW‖_F``, ``‖W' − W‖_F`` over its part of the tensor.

    Raises
    ------
    NonFiniteError
        ``W'`` holds NaN/Inf: from the factors, or because it overflows ``dtype`` (e.g. float16).
    """
    if rounding not in ROUNDINGS:
        raise LoraScopeError(f"rounding {rounding!r} is not one of {', '.join(ROUNDINGS)}")
    dtype = dtype or W.dtype
    work = _work_dtype(W.dtype, dtype)
    w0 = W.to(work)
    norms_delta = []
    if rounding == "peft":
        merged = W.to(dtype)  # the model as loaded in dtype (a copy: W is never written)
        if merged is W:
            merged = W.clone()
        for m, p in placed:
            delta = peft_delta(m, p, dtype)  # stored orientation
            view = merged if p.rows is None else region(merged, p)
            view.add_(delta.reshape(view.shape))  # peft: weight.data += delta (mixed-dtype add)
            S = factored_svdvals(m.A, m.B, m.scale)
            norms_delta.append(float(torch.linalg.vector_norm(S)))
        if not bool(torch.isfinite(merged).all()):
            bad = int((~torch.isfinite(merged)).sum())
            raise NonFiniteError(
                f"{where}: W + ΔW in peft's arithmetic has {bad} values that overflow "
                f"{str(dtype).removeprefix('torch.')} or are NaN; merge with --dtype float32"
            )
        acc = merged.to(work)
    else:
        acc = w0.clone()
        for m, p in placed:
            base = region(w0, p)  # (d_out, d_in) view of the stored tensor
            new = merged_weight(m, base, dtype=work)  # W + s·B A; DoRA: rescaled by its magnitude
            region(acc, p).copy_(new)  # in place, through the view (regions are disjoint)
            if m.is_dora:  # ΔW = W' − W depends on W: measured on the merge itself
                norms_delta.append(_norm(new - base))
            else:  # ‖s·B A‖_F exactly from the factors, whatever the working precision rounds
                S = factored_svdvals(m.A, m.B, m.scale)
                norms_delta.append(float(torch.linalg.vector_norm(S)))
    if not bool(torch.isfinite(acc).all()):
        bad = int((~torch.isfinite(acc)).sum())
        keys = ", ".join(m.key for m, _ in placed)
        raise NonFiniteError(f"{where}: W + ΔW holds {bad} NaN/Inf values (adapter: {keys})")
    if rounding == "single":
        merged = acc.to(dtype)
    if not bool(torch.isfinite(merged).all()):
        top = float(acc.abs().max())
        raise NonFiniteError(
            f"{where}: W + ΔW overflows {str(dtype).removeprefix('torch.')} (largest |value| "
            f"{top:.4g} > {torch.finfo(dtype).max:.4g}); merge with --dtype float32"
        )
    applied = merged.to(work) - w0
    norms = [
        (_norm(region(w0, p)), nd, _norm(region(applied, p)))
        for (_m, p), nd in zip(placed, norms_delta, strict=True)
    ]
    return merged, norms
