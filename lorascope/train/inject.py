"""Put LoRA layers into a model by module name, and the loralib-style helpers around them.

Name matching follows peft, so a config means the same thing here and there:

- ``target_modules`` as a list: a module matches when its dotted name equals an entry or ends
  with ``"." + entry`` (``["query", "value"]`` hits ``encoder.layer.3.attention.self.query``);
  as a string: a regular expression that must match the whole name.
- ``rank_pattern`` / ``alpha_pattern``: ``{pattern: value}``; the first pattern ``p`` with
  ``re.match(rf"(.*\\.)?({p})$", name)`` overrides ``r`` / ``alpha`` for that module.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from lorascope.errors import MissingModuleError
from lorascope.train.layers import LoRALinear, MergedLoRALinear

__all__ = [
    "inject",
    "lora_layers",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "merge",
    "unmerge",
    "count_parameters",
    "match_target",
    "pattern_value",
]

LoRALayer = LoRALinear | MergedLoRALinear


def match_target(name: str, target_modules: str | Sequence[str]) -> bool:
    """Whether module ``name`` is targeted (peft's rule, see the module docstring)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in target_modules)


def pattern_value(name: str, patterns: Mapping[str, float] | None, default: float) -> float:
    """The value of the first pattern matching the end of ``name`` (peft's rule), else default."""
    for pat, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", name):
            return value
    return default


def inject(
    model: nn.Module,
    target_modules: str | Sequence[str],
    r: int = 8,
    alpha: float = 8.0,
    dropout: float = 0.0,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    fused: Mapping[str, Sequence[bool]] | None = None,
    fan_in_fan_out: bool | None = None,
) -> list[str]:
    """Replace the targeted layers of ``model`` (in place) by LoRA layers.

    Parameters
    ----------
    model : nn.Module
    target_modules : str or sequence of str
        Module names, suffixes or one full-name regex (peft's semantics).
    r, alpha : int, float
        Default rank and scale numerator, ``s = alpha / r`` (``alpha / sqrt(r)`` with
        ``use_rslora``).
    dropout : float
        Dropout on the input of every low-rank path.
    rank_pattern, alpha_pattern : mapping, optional
        Per-module overrides of ``r`` and ``alpha`` by name pattern.
    fused : mapping, optional
        ``{pattern: enable_lora}`` for fused projections, e.g. ``{"c_attn": (True, False,
        True)}`` gives GPT-2's ``c_attn`` one update for q and one for v
        (:class:`MergedLoRALinear`). Patterns match like ``rank_pattern``.
    fan_in_fan_out : bool, optional
        Force the weight orientation; by default GPT-2 ``Conv1D`` is detected.

    Returns
    -------
    list of str
        The names of the injected modules, in model order.

    Raises
    ------
    MissingModuleError
        When no module matches ``target_modules``.
    """
    names = [
        n
        for n, m in model.named_modules()
        if n
        and match_target(n, target_modules)
        and not isinstance(m, LoRALinear | MergedLoRALinear)
    ]
    if not names:
        raise MissingModuleError(
            f"no module of the model matches target_modules={target_modules!r}"
        )
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        kw = dict(
            r=int(pattern_value(name, rank_pattern, r)),
            alpha=float(pattern_value(name, alpha_pattern, alpha)),
            dropout=dropout,
            use_rslora=use_rslora,
            fan_in_fan_out=fan_in_fan_out,
        )
        enable = next(
            (e for p, e in (fused or {}).items() if re.match(rf"(.*\.)?({p})$", name)), None
        )
        layer = (
            MergedLoRALinear(base, enable_lora=tuple(enable), **kw)
            if enable
            else LoRALinear(base, **kw)
        )
        setattr(parent, child, layer)
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """``(name, layer)`` for every LoRA layer of ``model``, in model order."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear | MergedLoRALinear):
            yield name, m


def mark_only_lora_as_trainable(model: nn.Module, also: Sequence[str] = ()) -> None:
    """Freeze every parameter except the LoRA factors and those whose name starts with ``also``.

    ``also=("classifier",)`` keeps a task head trainable (peft's ``modules_to_save``).
    """
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or any(name.startswith(a) for a in also))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA factors only: ``{"<module>.lora_A": (r, d_in), "<module>.lora_B": (d_out, r)}``."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def merge(model: nn.Module) -> None:
    """Fold every update into its base weight: inference then costs what the base model costs."""
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge` on every LoRA layer."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; tied tensors are counted once."""
    seen = {id(p): p for p in model.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in seen.values())
