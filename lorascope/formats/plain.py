"""Plain ``.pt``/``.safetensors`` files of LoRA factors, from scripts that are not a library.

Keys ``<name>.lora_A[.weight]`` ``(r, d_in)`` / ``<name>.lora_B[.weight]`` ``(d_out, r)`` (a
``base_model.model.`` prefix is dropped), or bare ``lora_A``/``lora_B``: a single module named
after the file stem. ``alpha`` comes from the caller, else from an ``adapter_config.json`` beside
the file (``lora_alpha``, ``alpha_pattern``, ``use_rslora``), else ``alpha = r`` (scale 1) with
a warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lorascope.adapter import Adapter
from lorascope.errors import FormatError
from lorascope.formats._common import (
    Probe,
    ReadOptions,
    read_json,
    read_tensors,
    scale_for,
    warn,
)
from lorascope.formats.loralib import AlphaRule, group_pairs, is_pair_key, modules_from_pairs
from lorascope.formats.peft import (
    CONFIG_FILE,
    config_bool,
    config_number,
    pattern_key,
    read_pattern,
)

__all__ = ["read_plain"]


def _alpha_rule(path: Path, alpha: float | None) -> tuple[AlphaRule, dict]:
    if alpha is not None:
        a = float(alpha)
        return (lambda _n, r: (a, scale_for(a, r))), {"alpha": a}
    config_path = path.parent / CONFIG_FILE
    if config_path.is_file():
        cfg = read_json(config_path)
        base = config_number(cfg, "lora_alpha", None, config_path)
        patterns = read_pattern(cfg, "alpha_pattern", config_path)
        rslora = config_bool(cfg, "use_rslora", False, config_path)

        def rule(name: str, r: int) -> tuple[float, float]:
            key = pattern_key(patterns, name, config_path)
            a = float(patterns[key]) if key is not None else float(base)
            return a, scale_for(a, r, rslora)

        return rule, cfg
    warn(path, "no alpha given or stored: assuming alpha = r (scale 1); pass alpha (CLI: --alpha)")
    return (lambda _n, r: (float(r), 1.0)), {}


def read_plain(
    path: str | Path,
    *,
    tensors: dict[str, torch.Tensor] | None = None,
    alpha: float | None = None,
    enable_lora: Sequence[bool] | None = None,
    fan_in_fan_out: bool | None = None,
    parts: Sequence[str] | None = None,
) -> Adapter:
    """Read a plain file of LoRA factors.

    Parameters
    ----------
    path : str or Path
    tensors : dict, optional
        The file's tensors when the caller already read them.
    alpha : float, optional
        Scale is ``alpha / r`` per module; see the module docstring for the default.
    enable_lora, parts, fan_in_fan_out :
        As for :func:`lorascope.formats.loralib.read_loralib` (fused: A rows != B columns).

    Returns
    -------
    Adapter
        ``A`` ``(r, d_in)``, ``B`` ``(d_out, r)`` per module.
    """
    path = Path(path)
    if tensors is None:
        tensors, _ = read_tensors(path)
    groups, full = group_pairs(tensors, path.stem)
    if not groups:
        some = ", ".join(list(tensors)[:3]) or "none"
        raise FormatError(f"{path}: no lora_A/lora_B tensors found (keys: {some})")
    rule, config = _alpha_rule(path, alpha)
    modules = modules_from_pairs(
        groups,
        full,
        source=path,
        alpha_rule=rule,
        enable_lora=enable_lora,
        parts=parts,
        fan_in_fan_out=fan_in_fan_out,
    )
    return Adapter(modules=modules, path=str(path), format="plain", config=config)


# ----------------------------------------------------------------------------- layout


def _claims(probe: Probe) -> bool:
    return probe.container in ("safetensors", "torch", "unknown") and any(
        is_pair_key(k) for k in probe.keys
    )


def _read(probe: Probe, options: ReadOptions) -> Adapter:
    return read_plain(
        probe.path,
        tensors=probe.tensors()[0],
        alpha=options.alpha,
        enable_lora=options.enable_lora,
        fan_in_fan_out=options.fan_in_fan_out,
        parts=options.parts,
    )


LAYOUT = (
    "plain",
    _claims,
    _read,
    "plain <name>.lora_A[.weight] / lora_B tensors (alpha from an option or a config beside)",
)
