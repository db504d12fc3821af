"""PEFT LoRA adapters: read what ``save_pretrained`` writes; write adapters peft can load.

On disk (peft ``utils/save_and_load.py``, ``tuners/lora/layer.py``)::

    adapter_config.json                 LoraConfig: r, lora_alpha, use_rslora, rank_pattern, ...
    adapter_model.safetensors (.bin)    base_model.model.<name>.lora_A.weight   (r, d_in)
                                        base_model.model.<name>.lora_B.weight   (d_out, r)
                                        base_model.model.<name>.lora_embedding_A (r, num_embeddings)
                                        base_model.model.<name>.lora_embedding_B (embedding_dim, r)

``lora_A``/``lora_B`` are ``nn.Linear`` weights, so they are in Linear orientation even for GPT-2
``Conv1D`` (``fan_in_fan_out`` only says the *base* weight is stored transposed). peft's embedding
delta is ``(B @ A).T · s`` in the embedding's ``(num_embeddings, embedding_dim)`` orientation, so it
is normalized to ``A' = lora_embedding_B.T``, ``B' = lora_embedding_A.T``. Conv LoRA factors
``(r, in, kh, kw)`` / ``(out, r, 1, 1)`` become ``(r, in·kh·kw)`` / ``(out, r)``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lorascope.adapter import Adapter, LoraModule
from lorascope.errors import FormatError, ShapeError
from lorascope.formats._common import (
    PEFT_PREFIX,
    Probe,
    ReadOptions,
    make_module,
    missing_partner,
    one_line,
    parse_lora_key,
    read_json,
    read_tensors,
    scale_for,
    shape,
    warn,
)

__all__ = ["read_peft", "write_peft_adapter", "pattern_key", "ADAPTER_FILES", "CONFIG_FILE"]

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
CONFIG_FILE = "adapter_config.json"
# init_lora_weights values whose init subtracts B@A from the base weight (pissa_niter_4, ...):
# the saved factors are then not the whole update (peft tuners/lora/layer.py, update_layer).
MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

# A complete LoraConfig, restricted to fields every peft >= 0.13 knows (newer peft fills the rest).
_DEFAULT_CONFIG: dict[str, Any] = {
    "peft_type": "LORA",
    "task_type": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": True,
    "r": 8,
    "target_modules": None,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "fan_in_fan_out": False,
    "bias": "none",
    "use_rslora": False,
    "modules_to_save": None,
    "init_lora_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "loftq_config": {},
    "use_dora": False,
    "layer_replication": None,
}


def pattern_key(patterns: Iterable[str], name: str, source: object = "") -> str | None:
    """The first ``rank_pattern``/``alpha_pattern`` key that matches module ``name``, as peft does.

    peft (``utils/other.py``, ``get_pattern_key``) tries each key in order with
    ``re.match(rf"(.*\\.)?({key})$", name)``, ``name`` being the module path without
    ``base_model.model.``; so ``"q_proj"`` matches every ``...q_proj`` and
    ``"model.layers.0.self_attn.q_proj"`` only that module.
    """
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return key
        except re.error as e:
            raise FormatError(f"{source}: pattern {key!r} is not a valid regex: {e}") from None
    return None


def _resolve(path: Path) -> tuple[Path, Path]:
    """``(weights file, adapter_config.json)`` for a PEFT directory or adapter file."""
    if path.is_dir():
        weights = next((path / f for f in ADAPTER_FILES if (path / f).is_file()), None)
        if weights is None:
            raise FormatError(
                f"{path}: no {' or '.join(ADAPTER_FILES)} here (not a PEFT adapter directory)"
            )
        config = path / CONFIG_FILE
    else:
        weights, config = path, path.parent / CONFIG_FILE
    if not config.is_file():
        raise FormatError(f"{weights}: no {CONFIG_FILE} next to it (needed for r and lora_alpha)")
    return weights, config


def config_number(
    config: dict, field: str, default: float | None, source: Path, positive: bool = True
) -> float:
    """``config[field]`` (``default`` when absent or null), refused unless a finite (positive)
    number, with a one-line :class:`FormatError` naming ``source``."""
    value = config.get(field, default)
    if value is None:
        value = default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or (positive and value <= 0)
    ):
        raise FormatError(f"{source}: {field}={value!r} is not a positive finite number")
    return value


def read_pattern(config: dict, field: str, source: Path) -> dict[str, Any]:
    value = config.get(field) or {}
    if not isinstance(value, dict):
        raise FormatError(f"{source}: {field} should be a JSON object, got {type(value).__name__}")
    for key, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
            raise FormatError(f"{source}: {field}[{key!r}]={v!r} is not a positive finite number")
    return value


def read_peft(
    path: str | Path, *, alpha: float | None = None, fan_in_fan_out: bool | None = None
) -> Adapter:
    """Read a PEFT LoRA adapter (directory, or its ``adapter_model.safetensors``/``.bin``).

    Parameters
    ----------
    path : str or Path
        The ``save_pretrained`` directory, or the weights file beside its ``adapter_config.json``.
    alpha : float, optional
        Overrides ``lora_alpha`` and ``alpha_pattern`` for every module.
    fan_in_fan_out : bool, optional
        Overrides the config's ``fan_in_fan_out`` (orientation of the *base* weights).

    Returns
    -------
    Adapter
        One :class:`LoraModule` per adapted weight: ``A`` ``(r, d_in)``, ``B`` ``(d_out, r)``,
        ``scale = alpha / r`` (rsLoRA ``alpha / sqrt(r)``), per-module rank and alpha resolved
        from ``rank_pattern`` / ``alpha_pattern`` the way peft matches them.
    """
    weights, config_path = _resolve(Path(path))
    config = read_json(config_path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise FormatError(
            f"{config_path}: peft_type {peft_type} is not LoRA (its update is not s·B A)"
        )
    r_default = int(config_number(config, "r", 8, config_path))
    alpha_default = config_number(config, "lora_alpha", 8, config_path)
    rank_pattern = read_pattern(config, "rank_pattern", config_path)
    alpha_pattern = read_pattern(config, "alpha_pattern", config_path)
    use_rslora = bool(config.get("use_rslora", False))
    ffo_default = bool(config.get("fan_in_fan_out", False))

    tensors, _meta = read_tensors(weights)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    adapters, others, biases, dora = set(), [], [], []
    for key, t in tensors.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            others.append(key)
            continue
        name, role, adapter_name, param = parsed
        if adapter_name is not None:
            adapters.add(adapter_name)
        if role == "magnitude":
            dora.append(key)
        elif param == "bias":
            biases.append(key)
        else:
            groups.setdefault(name, {})[role] = (key, t)
    if len(adapters) > 1:
        raise FormatError(
            f"{weights}: holds several adapters ({', '.join(sorted(adapters))}); save one"
        )

    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(MUTATING_INITS):
        warn(
            weights,
            f"init_lora_weights={init!r} also changed the base weights: "
            "s·B A is not the whole update",
        )
    if dora or config.get("use_dora"):
        warn(
            weights,
            "DoRA adapter: its magnitude vector rescales W0 + s·B A, "
            "so s·B A is not the whole update",
        )
    if biases:
        warn(weights, f"ignoring {len(biases)} LoRA bias tensor(s) (lora_bias), e.g. {biases[0]}")
    if others:
        warn(
            weights,
            f"ignoring {len(others)} non-LoRA tensor(s) (modules_to_save / full weights), "
            f"e.g. {others[0]}",
        )

    modules = []
    for name, roles in groups.items():
        module = _module(name, roles, weights, fan_in_fan_out, ffo_default)
        r_key = pattern_key(rank_pattern, name, config_path)
        r_expected = int(rank_pattern[r_key]) if r_key is not None else r_default
        if module.rank != r_expected:
            where = f"rank_pattern[{r_key!r}]" if r_key is not None else "r"
            raise ShapeError(
                f"{weights}: {module.keys[0]} has rank {module.rank} but {config_path.name} gives "
                f"{where}={r_expected} for {name}"
            )
        a_key = pattern_key(alpha_pattern, name, config_path)
        mod_alpha = alpha if alpha is not None else float(alpha_pattern.get(a_key, alpha_default))
        scale = scale_for(mod_alpha, module.rank, use_rslora)
        modules.append(replace(module, alpha=float(mod_alpha), scale=float(scale)))
    if not modules:
        some = ", ".join(list(tensors)[:3]) or "none"
        raise FormatError(f"{weights}: no lora_A/lora_B tensors found (keys: {some})")
    return Adapter(
        modules=modules, path=str(path), format="peft", config=config, full_weights=tuple(others)
    )


def _module(
    name: str,
    roles: dict[str, tuple[str, torch.Tensor]],
    source: Path,
    ffo_option: bool | None,
    ffo_default: bool,
) -> LoraModule:
    """Normalize one module's tensors (scale filled in by the caller)."""
    if "A" in roles or "B" in roles:
        if "A" not in roles or "B" not in roles:
            have, want = ("A", "B") if "A" in roles else ("B", "A")
            raise missing_partner(source, roles[have][0], f"{name}.lora_{want}.weight")
        (ka, A), (kb, B) = roles["A"], roles["B"]
        ffo = ffo_option if ffo_option is not None else (ffo_default if A.ndim == 2 else False)
        return make_module(
            name, A, B, alpha=None, scale=1.0, source=source, keys=(ka, kb), fan_in_fan_out=ffo
        )
    if "emb_A" not in roles or "emb_B" not in roles:
        have, want = ("emb_A", "B") if "emb_A" in roles else ("emb_B", "A")
        raise missing_partner(source, roles[have][0], f"{name}.lora_embedding_{want}")
    (ka, eA), (kb, eB) = roles["emb_A"], roles["emb_B"]  # (r, num_embeddings), (embedding_dim, r)
    if eA.ndim != 2 or eB.ndim != 2 or eA.shape[0] != eB.shape[1]:
        raise ShapeError(
            f"{source}: {ka} {shape(eA)} and {kb} {shape(eB)} do not form an embedding LoRA "
            "(expected (r, num_embeddings) and (embedding_dim, r))"
        )
    # ΔW_emb = (eB @ eA).T = eA.T @ eB.T: (num_embeddings, r) @ (r, embedding_dim)
    return make_module(
        name,
        eB.T,
        eA.T,
        alpha=None,
        scale=1.0,
        source=source,
        keys=(kb, ka),
        fan_in_fan_out=False if ffo_option is None else ffo_option,
    )


# ----------------------------------------------------------------------------- writer


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def write_peft_adapter(tensors: dict[str, torch.Tensor], config: dict, out_dir: str | Path) -> None:
    """Write ``out_dir/adapter_model.safetensors`` and ``adapter_config.json`` that peft can load.

    Parameters
    ----------
    tensors : dict of str to torch.Tensor
        Keyed as peft saves them: ``base_model.model.<name>.lora_A.weight`` ``(r, d_in)`` and
        ``...lora_B.weight`` ``(d_out, r)`` (also ``lora_embedding_A`` ``(r, num_embeddings)`` /
        ``lora_embedding_B`` ``(embedding_dim, r)``). A key without the ``base_model.model.``
        prefix gets it.
    config : dict
        Fills/overrides a complete LoraConfig dict. When absent: ``r`` is the most common rank,
        ``target_modules`` the exact module names, and ``rank_pattern`` lists the modules whose
        rank differs from ``r``.
    out_dir : str or Path
        Created if needed.

    Raises
    ------
    ShapeError
        An A without its B, factors that do not form ``B @ A``, or a rank that disagrees with what
        peft would build from ``r``/``rank_pattern`` (peft would refuse to load it).
    NonFiniteError
        NaN/Inf in a factor.
    """
    out_dir = Path(out_dir)
    source = out_dir / ADAPTER_FILES[0]
    clean: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        key = key if key.startswith(PEFT_PREFIX) else PEFT_PREFIX + key
        parsed = parse_lora_key(key)
        if parsed is not None and parsed[2] is not None:
            raise FormatError(f"{source}: key {key} holds an adapter name; use peft's saved keys")
        if parsed is not None and parsed[3] != "bias" and parsed[1] != "magnitude":
            groups.setdefault(parsed[0], {})[parsed[1]] = (key, t)
        clean[key] = t.detach().to("cpu").contiguous().clone()
    ranks = {name: _module(name, roles, source, None, False).rank for name, roles in groups.items()}
    if not ranks:
        raise FormatError(f"{source}: no lora_A/lora_B tensors to write")

    cfg = dict(_DEFAULT_CONFIG)
    cfg.update({k: _jsonable(v) for k, v in config.items()})
    if "r" not in config:
        cfg["r"] = Counter(ranks.values()).most_common(1)[0][0]
    if config.get("target_modules") is None:
        cfg["target_modules"] = sorted(ranks)
    if "rank_pattern" not in config:
        cfg["rank_pattern"] = {n: r for n, r in ranks.items() if r != cfg["r"]}
    for name, rank in ranks.items():
        r_key = pattern_key(cfg["rank_pattern"] or {}, name, source)
        expected = int(cfg["rank_pattern"][r_key]) if r_key is not None else int(cfg["r"])
        if rank != expected:
            raise ShapeError(
                f"{source}: {name} has rank {rank} but the config gives r={expected} for it "
                "(peft would refuse to load the adapter)"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        save_file(clean, str(source), metadata={"format": "pt"})
        (out_dir / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    except (OSError, TypeError, ValueError) as e:
        raise FormatError(f"{out_dir}: cannot write the adapter: {one_line(e)}") from None


# ----------------------------------------------------------------------------- layout


def _loralib_style(keys: list[str]) -> bool:
    return any(k.endswith((".lora_A", ".lora_B")) for k in keys)


def _claims(probe: Probe) -> bool:
    """A directory with ``adapter_config.json``; a weights file beside one whose keys are named
    PEFT-style (``<name>.lora_A.weight``, not loralib's bare ``<name>.lora_A``)."""
    if probe.container == "dir":
        return (probe.path / CONFIG_FILE).is_file()
    if probe.container not in ("safetensors", "torch", "unknown"):
        return False
    if not probe.sibling(CONFIG_FILE).is_file():
        return False
    if probe.path.name in ADAPTER_FILES:
        return True
    named = [k for k in probe.keys if parse_lora_key(k) is not None and "." in k]
    return (
        bool(named)
        and not _loralib_style(named)
        and not any(k.startswith(("lora_A", "lora_B")) for k in named)
    )


def _read(probe: Probe, options: ReadOptions) -> Adapter:
    return read_peft(probe.path, alpha=options.alpha, fan_in_fan_out=options.fan_in_fan_out)


LAYOUT = ("peft", _claims, _read, "PEFT save_pretrained: adapter_config.json + adapter_model.*")
