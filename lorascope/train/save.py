"""Save a model's LoRA layers as a PEFT adapter, and load a PEFT adapter back into a model.

On disk (peft's layout, written by :func:`lorascope.formats.write_peft_adapter`):

- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` ``(r, d_in)`` and
  ``...lora_B.weight`` ``(d_out, r)`` for every adapted module, in ``nn.Linear`` orientation
  even for GPT-2 ``Conv1D`` (peft's convention; ``fan_in_fan_out`` only tells how to merge);
- ``adapter_config.json``: ``r``, ``lora_alpha``, ``target_modules``, ``rank_pattern``,
  ``alpha_pattern``, ``use_rslora``, ``fan_in_fan_out``, ``base_model_name_or_path``.

The most common rank and alpha become ``r`` and ``lora_alpha``; every module that differs is
named exactly in ``rank_pattern`` / ``alpha_pattern``. A :class:`MergedLoRALinear` with ``k``
enabled parts is written as the equivalent plain LoRA of rank ``k·r``: ``A`` stacks the parts'
``A_p``, ``B`` is block-diagonal (part ``p``'s rows, columns ``p·r:(p+1)·r``), and alpha is
scaled so that ``alpha' / (k·r) = alpha / r`` (rsLoRA: ``alpha' / sqrt(k·r) = alpha / sqrt(r)``).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorascope.adapter import alpha_from_scale
from lorascope.errors import LoraScopeError
from lorascope.train.inject import inject, lora_layers
from lorascope.train.layers import LoRALinear, MergedLoRALinear

__all__ = ["adapter_tensors", "save_adapter", "load_adapter"]

PREFIX = "base_model.model."


def _peft_factors(layer: LoRALinear | MergedLoRALinear) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A (r', d_in), B (d_out, r'), alpha')`` of the plain LoRA equal to ``layer``."""
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    if isinstance(layer, LoRALinear):
        return A, B, layer.alpha
    k, r, d = layer.n_enabled, layer.r, layer.part_size
    B_full = B.new_zeros(layer.out_features, k * r)  # (out, k·r), block-diagonal
    for j in range(k):
        rows = layer.part_rows[j * d : (j + 1) * d]
        B_full[rows, j * r : (j + 1) * r] = B[j * d : (j + 1) * d]  # (d, r) block of part j
    alpha = layer.alpha * (math.sqrt(k) if layer.use_rslora else k)
    return A, B_full, alpha


def adapter_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The PEFT tensors and LoRA config of every LoRA layer in ``model``.

    Returns
    -------
    tensors : dict
        ``{"base_model.model.<name>.lora_A.weight": (r, d_in), "...lora_B.weight": (d_out, r)}``,
        contiguous CPU copies.
    config : dict
        ``r``, ``lora_alpha``, ``target_modules``, ``rank_pattern``, ``alpha_pattern``,
        ``use_rslora``, ``fan_in_fan_out``, ``lora_dropout``, ``peft_type``, ``bias``.
    """
    layers = list(lora_layers(model))
    if not layers:
        raise LoraScopeError("the model has no LoRA layers to save")
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas = {}, {}
    for name, layer in layers:
        A, B, alpha = _peft_factors(layer)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A.cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B.cpu().contiguous()
        ranks[name], alphas[name] = int(A.shape[0]), float(alpha)
    for flag in ("use_rslora", "fan_in_fan_out"):
        if len({getattr(lay, flag) for _, lay in layers}) > 1:
            raise LoraScopeError(f"PEFT needs one {flag} for all modules; this model mixes them")
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    names = [n for n, _ in layers]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    every_leaf = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves and n]
    first = layers[0][1]
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        # short names when they select exactly the adapted modules, else the full names
        "target_modules": leaves if sorted(every_leaf) == sorted(names) else names,
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "use_rslora": first.use_rslora,
        "fan_in_fan_out": first.fan_in_fan_out,
        "lora_dropout": float(getattr(first.dropout, "p", 0.0)),
        "bias": "none",
    }
    return tensors, config


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    base_model_name_or_path: str,
    **config: Any,
) -> Path:
    """Write ``model``'s LoRA layers as a PEFT adapter directory; returns ``out_dir``.

    Extra keyword arguments go into ``adapter_config.json`` (e.g. ``task_type``).
    """
    from lorascope.formats import write_peft_adapter

    tensors, cfg = adapter_tensors(model)
    cfg.update(base_model_name_or_path=base_model_name_or_path, **config)
    out_dir = Path(out_dir)
    write_peft_adapter(tensors, cfg, out_dir)
    return out_dir


def load_adapter(model: nn.Module, path: str | Path) -> list[str]:
    """Inject LoRA layers into ``model`` and fill them from a PEFT adapter at ``path``.

    Every module of the file becomes a :class:`LoRALinear` with the file's rank and alpha
    (a fused module saved by :func:`save_adapter` comes back as its equivalent plain LoRA).
    Returns the injected module names.
    """
    from lorascope.formats import load_adapter as read_adapter

    adapter = read_adapter(path)
    cfg = adapter.config
    names = [m.name for m in adapter]
    inject(
        model,
        names,
        r=int(cfg.get("r", 8)),
        alpha=float(cfg.get("lora_alpha", 8)),
        use_rslora=bool(cfg.get("use_rslora", False)),
        rank_pattern={m.name: m.rank for m in adapter},
        alpha_pattern={m.name: _alpha(m, cfg) for m in adapter},
        fan_in_fan_out=cfg.get("fan_in_fan_out"),
    )
    with torch.no_grad():
        for m in adapter:
            layer = model.get_submodule(m.name)
            layer.lora_A.copy_(m.A)
            layer.lora_B.copy_(m.B)
    return names


def _alpha(m: Any, cfg: dict) -> float:
    """A module's alpha: as read, else recovered from its scale."""
    if m.alpha is not None:
        return float(m.alpha)
    return alpha_from_scale(m.scale, m.rank, bool(cfg.get("use_rslora")))
