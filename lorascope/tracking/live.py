"""The LoRA modules of a model *while it trains*, as :class:`~lorascope.adapter.LoraModule`.

The tracker reads each adapted layer's factors and the scale the forward pass applies, never
``ΔW``. Three kinds of layer are recognised, by duck type (no import of peft or loralib):

- lorascope's own :class:`~lorascope.train.layers.LoRALinear` (``lora_A (r, d_in)``,
  ``lora_B (d_out, r)``, ``scale``) and :class:`~lorascope.train.layers.MergedLoRALinear`
  (written as the equivalent plain LoRA of width ``k·r``, as its PEFT file is);
- PEFT's ``LoraLayer`` (Linear, Conv, Embedding; every active adapter): the scale is
  ``layer.scaling[adapter]``, which is what peft multiplies by (``alpha/r``, rsLoRA's
  ``alpha/√r``, ``rank_pattern``/``alpha_pattern`` and any later ``set_scale``); DoRA layers are
  read as family ``"dora"`` with update ``"dora-direction"`` (the factors' ``s·B A``: DoRA's
  direction part, before the magnitude rescaling); AdaLoRA's ``SVDLinear`` as
  ``B, (E ⊙ A)`` with scale ``scaling / (ranknum + 1e-5)`` (peft's ``get_delta_weight``);
- loralib's layers (``lora_A``/``lora_B`` parameters and a float ``scaling``; an ``Embedding``
  as ``ΔW = (B A)ᵀ``, ``(num_embeddings, dim)``, the orientation of its saved file).

Names drop the wrappers a training framework adds (``module.`` of DDP, ``_orig_mod.`` of
``torch.compile``) and PEFT's ``base_model.model.``, so a tracked module has the key lorascope
reads from the adapter file saved at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorascope.adapter import LoraModule, Magnitude
from lorascope.errors import LoraScopeError
from lorascope.formats._common import make_module

__all__ = ["LiveModule", "live_modules"]

_WRAPPERS = ("module.", "_orig_mod.", "base_model.model.")


@dataclass(frozen=True)
class LiveModule:
    """One adapted layer of a live model.

    Attributes
    ----------
    name : str
        Module path without wrappers (the key of the saved adapter file).
    layer : nn.Module
        The adapted layer itself.
    adapter : str | None
        PEFT adapter name (``None`` for lorascope's and loralib's layers).
    """

    name: str
    layer: nn.Module
    adapter: str | None = None

    def module(self) -> LoraModule:
        """The layer's current update as a :class:`LoraModule`: detached factors (no copy),
        the applied scale, family and DoRA magnitude. Raises :class:`LoraScopeError` for
        non-finite factors or a scale outside what a trained adapter can have."""
        return _read(self)

    def base_weight(self) -> torch.Tensor | None:
        """The frozen base weight in ``(d_out, d_in)`` orientation (detached, a view), or
        ``None`` when the layer has none lorascope can use (quantized, a conv kernel)."""
        return _base_weight(self)


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for w in _WRAPPERS:
            if name.startswith(w):
                name, changed = name[len(w) :], True
    return name


def _is_peft(m: nn.Module) -> bool:
    return isinstance(getattr(m, "scaling", None), dict) and (
        isinstance(getattr(m, "lora_A", None), nn.ModuleDict | nn.ParameterDict)
        or isinstance(getattr(m, "lora_embedding_A", None), nn.ParameterDict)
    )


def _is_plain(m: nn.Module) -> bool:
    return isinstance(getattr(m, "lora_A", None), nn.Parameter) and isinstance(
        getattr(m, "lora_B", None), nn.Parameter
    )


def live_modules(model: nn.Module) -> list[LiveModule]:
    """Every adapted layer of ``model`` (peft ``PeftModel``, a model with lorascope's or
    loralib's layers, or any wrapper of those), in model order.

    Raises
    ------
    LoraScopeError
        No LoRA layer found, or a PEFT layer of a family the tracker does not read live.
    """
    out: list[LiveModule] = []
    for raw, m in model.named_modules():
        if _is_peft(m):
            adapters = getattr(m, "active_adapters", None) or list(m.scaling)
            for a in adapters:
                if a in m.scaling and (_has(m, "lora_A", a) or _has(m, "lora_embedding_A", a)):
                    out.append(LiveModule(_strip(raw), m, a))
        elif _is_plain(m):
            if (
                hasattr(m, "enable_lora")
                and not hasattr(m, "part_rows")
                and m.lora_A.shape[0] != m.lora_B.shape[-1]
            ):  # an error of the layer, not of one snapshot: raise before the first one
                raise LoraScopeError(f"{_strip(raw)}: loralib MergedLinear is not tracked live")
            out.append(LiveModule(_strip(raw), m, None))
        elif type(m).__name__ in ("LoHaLayer", "LoKrLayer", "VeraLayer") or hasattr(m, "hada_w1_a"):
            raise LoraScopeError(
                f"{_strip(raw)}: a {type(m).__name__} layer; tracking reads LoRA, DoRA and "
                "AdaLoRA layers live (save checkpoints and use `lorascope compare --settle`)"
            )
    if not out:
        raise LoraScopeError(
            f"no LoRA layer in the model ({type(model).__name__}): nothing to track"
        )
    if len({lm.name for lm in out}) < len(out):  # several active PEFT adapters on one layer
        out = [LiveModule(f"{lm.name}@{lm.adapter}", lm.layer, lm.adapter) for lm in out]
    return out


def _has(m: nn.Module, attr: str, adapter: str) -> bool:
    d = getattr(m, attr, None)
    return d is not None and adapter in d


def _weight(x: nn.Module | torch.Tensor) -> torch.Tensor:
    return (x.weight if isinstance(x, nn.Module) else x).detach()


def _read(lm: LiveModule) -> LoraModule:
    m, a, name = lm.layer, lm.adapter, lm.name
    keys = (f"{name}.lora_A", f"{name}.lora_B")
    magnitude = None
    if a is None:  # lorascope's / loralib's layers
        if hasattr(m, "part_rows"):  # lorascope MergedLoRALinear: its PEFT equivalent
            from lorascope.train.save import _peft_factors

            A, B, _ = _peft_factors(m)
        else:
            A, B = m.lora_A.detach(), m.lora_B.detach()
            if A.shape[0] != B.shape[-1] and hasattr(m, "enable_lora"):
                raise LoraScopeError(f"{name}: loralib MergedLinear is not tracked live")
            if isinstance(m, nn.Embedding):  # loralib: ΔW = (B A)ᵀ, (num_embeddings, dim),
                A, B = B.T, A.T  # as lorascope reads its saved file
                keys = (f"{name}.lora_B", f"{name}.lora_A")
        scale = float(getattr(m, "scale", getattr(m, "scaling", 1.0)))
        return make_module(
            name, A, B, alpha=getattr(m, "alpha", None), scale=scale, source="model", keys=keys
        )
    scale = float(m.scaling[a])
    if _has(m, "lora_E", a):  # AdaLoRA SVDLinear: B (A ⊙ E) · scaling / (ranknum + 1e-5)
        A = m.lora_A[a].detach() * m.lora_E[a].detach()  # (r, d_in) ⊙ (r, 1)
        B = m.lora_B[a].detach()
        scale = scale / (float(m.ranknum[a]) + 1e-5)
        return make_module(
            name,
            A,
            B,
            alpha=None,
            scale=scale,
            source="model",
            keys=keys,
            family="adalora",
            nominal_rank=int(m.r[a]),
        )
    if _has(m, "lora_A", a):
        A, B = _weight(m.lora_A[a]), _weight(m.lora_B[a])  # (r, d_in[, k..]), (d_out, r[, 1..])
        axis = "out"
    else:  # embedding: ΔW (num_embeddings, dim) = s·(B_e A_e)ᵀ = s·A_eᵀ B_eᵀ
        A, B = m.lora_embedding_B[a].detach().T, m.lora_embedding_A[a].detach().T
        keys = (f"{name}.lora_embedding_B", f"{name}.lora_embedding_A")
        axis = "in"
    dora = bool(getattr(m, "use_dora", {}).get(a, False))
    if dora and _has(m, "lora_magnitude_vector", a):
        mag = m.lora_magnitude_vector[a]
        magnitude = Magnitude(_weight(mag).reshape(-1), axis, f"{name}.lora_magnitude_vector")
    alpha = getattr(m, "lora_alpha", {}).get(a)
    return make_module(
        name,
        A,
        B,
        alpha=None if alpha is None else float(alpha),
        scale=scale,
        source="model",
        keys=keys,
        family="dora" if magnitude is not None else "lora",
        magnitude=magnitude,
        nominal_rank=int(m.r[a]) if isinstance(getattr(m, "r", None), dict) else None,
    )


def _base_weight(lm: LiveModule) -> torch.Tensor | None:
    m = lm.layer
    base = m.get_base_layer() if hasattr(m, "get_base_layer") else m
    W = getattr(base, "weight", None)
    if not isinstance(W, torch.Tensor) or not W.is_floating_point() or W.ndim != 2:
        return None  # quantized (bitsandbytes Params4bit is uint8), conv kernels
    W = W.detach()
    if lm.adapter is not None and _has(m, "lora_embedding_A", lm.adapter):
        return W  # (num_embeddings, dim): ΔW's orientation already
    ffo = bool(getattr(m, "fan_in_fan_out", False))
    return W.T if ffo else W  # GPT-2 Conv1D stores (d_in, d_out)
