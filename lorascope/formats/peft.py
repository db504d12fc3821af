"""PEFT adapters: read what ``save_pretrained`` writes; write LoRA adapters peft can load.

On disk (peft ``utils/save_and_load.py``): ``adapter_config.json`` (its ``peft_type`` says the
family) and ``adapter_model.safetensors`` (or ``.bin``), keyed ``base_model.model.<name>.<param>``
with the adapter name stripped. What each family stores, and the exact factored form
``ΔW = s · B' A'`` it is read into (:mod:`lorascope.families`, products in float64):

=========  ========================================  ==========================================
peft_type  tensors per module                        B', A', s
=========  ========================================  ==========================================
LORA       ``lora_A.weight (r, in)``,                ``lora_B``, ``lora_A``; ``α/r`` (rsLoRA
           ``lora_B.weight (out, r)``                ``α/√r``), r and α per module from
                                                     ``rank_pattern``/``alpha_pattern``
 +DoRA     ``lora_magnitude_vector``                 as LoRA, plus :class:`Magnitude` m
 +params   ``target_parameters``: ``lora_A (r·E,     one module per expert e:
           in)``, ``lora_B (out, r·E)`` on the       ``B[:, e::E]``, ``A[e·r:(e+1)·r]``
           module holding the 3-D parameter
ADALORA    ``lora_A (k, in)``, ``lora_E (k, 1)``,    ``lora_B``, ``E ⊙ A``; ``α/(init_r+1e-5)``
           ``lora_B (out, k)``, k ≤ init_r kept
VERA       ``vera_lambda_b (out,)``,                 ``diag(λ_b)·vera_B[:out]``,
           ``vera_lambda_d (r,)``; shared            ``diag(λ_d)·vera_A[:, :in]``; 1
           ``base_model.vera_A (r, max_in)``,
           ``base_model.vera_B (max_out, r)``
LOHA       ``hada_w{1,2}_a (out, r)``,               face-splitting × Khatri–Rao products
           ``hada_w{1,2}_b (r, in·K)``; conv CP:     (width r²); ``alpha/r``
           ``hada_t{1,2} (r, r, kh, kw)``,
           ``hada_w_a (r, out)``, ``hada_w_b (r, in)``
LOKR       ``lokr_w1 (a, c)`` or ``lokr_w1_a/_b``;   Kronecker products of the factors'
           ``lokr_w2 (b, d[, kh, kw])`` or           factors (width k1·k2); ``alpha/r``
           ``lokr_w2_a/_b`` or Tucker ``lokr_t2``
=========  ========================================  ==========================================

Orientation: ``lora_A``/``lora_B`` are ``nn.Linear`` weights, so they are in Linear orientation
even for GPT-2 ``Conv1D`` (``fan_in_fan_out`` only says the *base* weight is stored transposed).
peft's embedding delta is ``(B @ A).T · s`` in the embedding's ``(num_embeddings,
embedding_dim)`` orientation, so it is normalized to ``A' = lora_embedding_B.T``,
``B' = lora_embedding_A.T``; its DoRA magnitude (one norm per embedding column, over the vocab)
is then ``axis="in"``. Conv factors ``(r, in, kh, kw)`` / ``(out, r, 1, 1)`` become
``(r, in·kh·kw)`` / ``(out, r)``.

Every other ``peft_type`` (IA3, OFT, prompt tuning, ...) is refused with one line saying what
its update is. A tensor that the family does not define is refused, never skipped; whole weights
peft saves beside the adapter (``modules_to_save``, embeddings, ``bias="all"``) are listed in
:attr:`Adapter.full_weights`.

This module reads the layout, LoRA/DoRA and ``target_parameters``, and writes LoRA adapters;
the AdaLoRA, VeRA, LoHa and LoKr readers are in :mod:`lorascope.formats.peft_families`.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lorascope._files import save_safetensors
from lorascope.adapter import Adapter, LoraModule, Magnitude, parse_kind, parse_layer
from lorascope.errors import FormatError, ShapeError
from lorascope.formats._common import (
    PEFT_PREFIX,
    PatternMatcher,
    Probe,
    ReadOptions,
    check_tensors,
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

__all__ = [
    "finite_number",
    "read_peft",
    "write_peft_adapter",
    "pattern_key",
    "ADAPTER_FILES",
    "CONFIG_FILE",
]

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

# What each peft_type this reader does not read does to a weight (peft 0.21: each tuner's
# config.py and layer.py), for its one-line refusal.
_MULTIPLICATIVE = {
    "IA3": "W' = W ⊙ l: a learned vector rescales output rows (input columns in feed-forward)",
    "OFT": "W' = W Rᵀ with R block-diagonal orthogonal on the input dimension",
    "BOFT": "W' = (W Rᵀ)·s with R a product of butterfly orthogonal matrices",
    "HRA": "W' = W H with H a product of Householder reflections",
    "ROAD": "W' = R W: 2×2 rotations and scalings of pairs of output features",
    "HIRA": "W' = W + W ⊙ (B A): a low-rank matrix applied to W by Hadamard product",
    "GLORA": "W' = W + W ⊙ A + B: terms that depend on the base weight",
    "DEFT": "W' = (I − P) W + Q R: a learned output subspace of W projected out and replaced",
    "FROD": "W' = U (S_sparse + diag λ) Vᵀ, built from a decomposition of W",
    "PEANUT": "ΔW = MLP(Wᵀ)ᵀ: a small network applied to the base weight",
}
_PROMPT = {
    "PROMPT_TUNING": "learned virtual tokens prepended to the input",
    "MULTITASK_PROMPT_TUNING": "learned virtual tokens, shared across tasks",
    "P_TUNING": "virtual tokens produced by a prompt encoder",
    "PREFIX_TUNING": "learned key/value prefixes in every attention layer",
    "CPT": "context-aware prompt tokens",
    "ADAPTION_PROMPT": "LLaMA-Adapter prompt tokens behind a zero-initialized attention gate",
    "CARTRIDGE": "a trained KV-cache prefix",
}
_UNSUPPORTED = {
    "MISS": "shard-sharing ΔW, one trained block tiled along the input dimension",
    "OSF": "trains the low singular subspace of W; its update needs the base weight's SVD",
    "ADAMSS": "SVD subspace clusters of W with frozen factors from the base weight",
    "PSOFT": "ΔW = s·B (R − I) A with A, B from the base weight's SVD (not saved)",
    "TINYLORA": "ΔW = B (Σ vᵢ Pᵢ) A with B, A from the base weight's SVD",
    "DELORA": "a normalized low-rank update scaled by the base weight's column norms",
    "RANDLORA": "fixed random bases with trained diagonal scalings; full rank in general",
    "PVERA": "VeRA with a sampled half of the shared projections",
    "VBLORA": "LoRA factors assembled from a shared vector bank by top-k mixtures",
    "UNILORA": "LoRA factors gathered from one shared trainable vector",
    "GRALORA": "a k×k grid of block-wise low-rank adapters",
    "SHIRA": "a sparse high-rank ΔW at fixed indices",
    "SUPERTUNING": "a sparse scatter of trained values at positions chosen from W",
    "FOURIERFT": "ΔW = inverse FFT of a sparse trained spectrum (dense, full rank)",
    "WAVEFT": "ΔW = inverse wavelet transform of sparse trained coefficients (dense, full rank)",
    "C3A": "a block-circulant ΔW from trained circular-convolution kernels",
    "LILY": "an input-dependent router mixing up-projections; no static ΔW",
    "POLY": "a task-routed mixture of LoRA modules; ΔW depends on the task id",
    "XLORA": "a mixture of LoRA experts scaled per token by a learned classifier",
    "BEFT": "trains bias vectors only; no weight update",
    "LN_TUNING": "trains copies of the normalization layers; no low-rank update",
    "TRAINABLE_TOKENS": "selected embedding rows replaced by trained vectors",
    "SHADOW": "a parallel trainable network in each block; input-dependent",
}
# LoraConfig fields that turn on a variant whose saved factors are not the whole static ΔW.
_LORA_VARIANTS = {
    "alora_invocation_tokens": "aLoRA acts only on tokens after its invocation sequence",
    "use_qalora": "QALoRA's lora_A acts on the input pooled in groups",
    "use_bdlora": "BD-LoRA stores a block-diagonal lora_A or lora_B in packed form",
    "arrow_config": "Arrow routes each token through a mixture of LoRA experts",
    "kasa_config": "KaSA inserts a learned diagonal and truncates the base weight's SVD",
    "trainable_token_indices": "trainable tokens replace embedding rows outside the LoRA factors",
}
# Components of a key that name a tuner's tensor: such a key is never a whole model weight.
_TUNER_PART = re.compile(
    r"^(lora_|hada_|lokr_|vera_|ia3_|oft_|boft_|hra_|ranknum$|token_adapter$|trainable_tokens)"
)


def pattern_key(patterns: Iterable[str], name: str, source: object = "") -> str | None:
    """The first ``rank_pattern``/``alpha_pattern`` key that matches module ``name``, as peft does.

    peft (``utils/other.py``, ``get_pattern_key``) tries each key in order with
    ``re.match(rf"(.*\\.)?({key})$", name)``, ``name`` being the module path without
    ``base_model.model.``; so ``"q_proj"`` matches every ``...q_proj`` and
    ``"model.layers.0.self_attn.q_proj"`` only that module. The match is bounded in time
    (:class:`~lorascope.formats._common.PatternMatcher`): keys are regexes a stranger wrote.
    """
    return PatternMatcher(source).first(patterns, name)


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


def finite_number(value: Any) -> float | None:
    """``float(value)`` for a JSON number (not a bool) that is finite as a float, else None:
    ``1e309`` (read as inf), NaN, and integers too large for a float are all refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        f = float(value)
    except OverflowError:  # an integer of hundreds of digits
        return None
    return f if math.isfinite(f) else None


def config_number(
    config: dict, field: str, default: float | None, source: Path, positive: bool = True
) -> float:
    """``config[field]`` (``default`` when absent or null), refused unless a finite (positive)
    number, with a one-line :class:`FormatError` naming ``source``."""
    value = config.get(field, default)
    if value is None:
        value = default
    f = finite_number(value)
    if f is None or (positive and f <= 0):
        what = "a positive finite" if positive else "a finite"
        raise FormatError(f"{source}: {field}={_show(value)} is not {what} number")
    return value if isinstance(value, int) else f


def config_int(config: dict, field: str, default: int, source: Path) -> int:
    """``config[field]`` (``default`` when absent or null) as PEFT requires a rank: a JSON
    integer in ``[1, 2³¹)`` (``8.5``, ``"8"``, ``true`` and ``10**400`` are refused)."""
    value = config.get(field, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
        raise FormatError(f"{source}: {field}={_show(value)} is not a positive integer")
    return value


def config_bool(config: dict, field: str, default: bool, source: Path) -> bool:
    """``config[field]`` (``default`` when absent or null) as a JSON boolean; ``"false"``,
    ``0`` and the like are refused (``bool("false")`` is True)."""
    value = config.get(field, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise FormatError(f"{source}: {field}={_show(value)} is not true or false")
    return value


def _show(value: Any) -> str:
    """``repr`` of a config value, shortened (an integer of 5000 digits is not a message)."""
    try:
        text = repr(value)
    except ValueError:  # int too large to convert to str
        text = "<an integer too large to print>"
    return text if len(text) <= 40 else text[:37] + "..."


def read_pattern(config: dict, field: str, source: Path) -> dict[str, Any]:
    value = config.get(field) or {}
    if not isinstance(value, dict):
        raise FormatError(f"{source}: {field} should be a JSON object, got {type(value).__name__}")
    for key, v in value.items():
        f = finite_number(v)
        if f is None or f <= 0:
            raise FormatError(
                f"{source}: {field}[{key!r}]={_show(v)} is not a positive finite number"
            )
    return value


def read_peft(
    path: str | Path,
    *,
    alpha: float | None = None,
    fan_in_fan_out: bool | None = None,
    in_features: Mapping[str, int] | None = None,
) -> Adapter:
    """Read a PEFT adapter (directory, or its ``adapter_model.safetensors``/``.bin``).

    Parameters
    ----------
    path : str or Path
        The ``save_pretrained`` directory, or the weights file beside its ``adapter_config.json``.
    alpha : float, optional
        Overrides ``lora_alpha`` (LoHa/LoKr: ``alpha``) and ``alpha_pattern`` for every module.
    fan_in_fan_out : bool, optional
        Overrides the config's ``fan_in_fan_out`` (orientation of the *base* weights).
    in_features : mapping of str to int, optional
        Each module's input size, by module name. Only VeRA needs it: it slices the shared
        ``vera_A`` ``(r, max_in)`` to ``[:, :in_features]``, and only the base model records
        ``in_features``.

    Returns
    -------
    Adapter
        One :class:`LoraModule` per adapted weight (per expert for ``target_parameters``) in the
        exact factored form of its family (see the module docstring); ``config`` is the
        adapter_config.json as read (AdaLoRA adds ``pruned_modules``: the modules pruned to rank
        0, whose ΔW is zero and which are left out).

    Raises
    ------
    FormatError
        A ``peft_type`` that is not LoRA, AdaLoRA, VeRA, LoHa or LoKr (the message says what its
        update is); a LoRA variant whose factors are not the whole update; a tensor the family
        does not define; VeRA without its projections or ``in_features``.
    ShapeError
        Factors that do not fit together, or ranks that disagree with the config.
    """
    weights, config_path = _resolve(Path(path))
    config = read_json(config_path)
    peft_type = str(config.get("peft_type") or "LORA").upper()
    family = _families().get(peft_type)
    if family is None:
        raise FormatError(_refusal(config_path, peft_type))
    ctx = _Ctx(weights, config_path, config, peft_type, alpha, fan_in_fan_out, in_features)
    tensors, _meta = read_tensors(weights)
    modules, full, extra = family(ctx, tensors)
    if full:
        warn(
            weights,
            f"ignoring {len(full)} non-{_LABELS[peft_type]} tensor(s) (modules_to_save / full "
            f"weights), e.g. {full[0]}",
        )
    if not modules:
        some = ", ".join(list(tensors)[:3]) or "none"
        raise FormatError(f"{weights}: no {_LABELS[peft_type]} tensors found (keys: {some})")
    return Adapter(
        modules=modules,
        path=str(path),
        format="peft",
        config={**config, **extra},
        full_weights=tuple(full),
    )


_LABELS = {"LORA": "LoRA", "ADALORA": "AdaLoRA", "VERA": "VeRA", "LOHA": "LoHa", "LOKR": "LoKr"}


def _refusal(config_path: Path, peft_type: str) -> str:
    """The one-line refusal of a ``peft_type`` this reader does not read."""
    shown = peft_type if re.fullmatch(r"[A-Z0-9_]{1,40}", peft_type) else repr(peft_type[:40])
    head = f"{config_path}: peft_type {shown}"
    if peft_type in _MULTIPLICATIVE:
        what = _MULTIPLICATIVE[peft_type]
        return f"{head} is multiplicative, not an additive low-rank update: {what}"
    if peft_type in _PROMPT:
        return f"{head} has no weight update: {_PROMPT[peft_type]}"
    what = _UNSUPPORTED.get(peft_type, "not a PEFT type this version of lorascope knows")
    return f"{head} is not supported: {what}"


@dataclass(frozen=True)
class _Ctx:
    """What every family reader needs: where it reads, the config, and the caller's overrides."""

    weights: Path
    config_path: Path
    config: dict
    peft_type: str
    alpha: float | None
    ffo: bool | None
    in_features: Mapping[str, int] | None

    def ffo_for(self, default: bool = False) -> bool:
        """The base weights' orientation: the override, else the config's ``fan_in_fan_out``."""
        if self.ffo is not None:
            return self.ffo
        return config_bool(self.config, "fan_in_fan_out", default, self.config_path)

    def r_alpha(
        self, key: str, r_default: int, alpha_default: float, ranks: dict, alphas: dict
    ) -> tuple[int, float, str]:
        """``(r, alpha, where r came from)`` for pattern key ``key``, resolved as peft does."""
        r_key = pattern_key(ranks, key, self.config_path)
        r = r_default if r_key is None else config_int(ranks, r_key, r_default, self.config_path)
        where = f"rank_pattern[{r_key!r}]" if r_key is not None else "r"
        if self.alpha is not None:
            return r, float(self.alpha), where
        a_key = pattern_key(alphas, key, self.config_path)
        return r, float(alphas[a_key] if a_key is not None else alpha_default), where

    def rank_error(self, key: str, got: int, where: str, expected: int, name: str) -> ShapeError:
        return ShapeError(
            f"{self.weights}: {key} has rank {got} but {self.config_path.name} gives "
            f"{where}={expected} for {name}"
        )


def _one_adapter(ctx: _Ctx, adapters: set[str]) -> None:
    if len(adapters) > 1:
        raise FormatError(
            f"{ctx.weights}: holds several adapters ({', '.join(sorted(adapters))}); save one"
        )


def _full_weight(ctx: _Ctx, key: str) -> str:
    """``key`` if it is a whole model weight peft saved beside the adapter, else a refusal.

    peft saves ``modules_to_save`` copies (``<module>.<param>``), the embeddings
    (``save_embedding_layers``: ``embed_tokens.weight``, ``...base_layer.weight``) and, with
    ``bias="all"``/``"lora_only"``, biases: a ``.weight``/``.bias`` key, or any key under a
    ``modules_to_save`` module, that names no tuner tensor. Anything else is a tensor of some
    family or variant this reader does not read: refused, never skipped.
    """
    parts = key.removeprefix(PEFT_PREFIX).split(".")
    module = "." + ".".join(parts[:-1]) + "."
    saved = ctx.config.get("modules_to_save") or []
    saved = [saved] if isinstance(saved, str) else saved
    whole = not any(_TUNER_PART.match(p) for p in parts) and (
        parts[-1] in ("weight", "bias")
        or any(isinstance(m, str) and f".{m}." in module for m in saved)
    )
    if not whole:
        raise FormatError(
            f"{ctx.weights}: {key} is not a {_LABELS[ctx.peft_type]} tensor nor a whole model "
            f"weight (peft_type {ctx.peft_type}); refusing it rather than skipping it"
        )
    return key


def _split_key(key: str, params: tuple[str, ...]) -> tuple[str, str, str | None] | None:
    """``(module name, param, adapter name)`` of a ``ParameterDict`` key
    ``base_model.model.<name>.<param>`` (as saved) or ``<name>.<param>.<adapter>`` (a raw
    ``state_dict``); None for any other key."""
    parts = key.split(".")
    if len(parts) > 1 and parts[-1] in params:
        return ".".join(parts[:-1]).removeprefix(PEFT_PREFIX), parts[-1], None
    if len(parts) > 2 and parts[-2] in params and parts[-1] not in ("weight", "bias"):
        return ".".join(parts[:-2]).removeprefix(PEFT_PREFIX), parts[-2], parts[-1]
    return None


_Groups = dict[str, dict[str, tuple[str, torch.Tensor]]]


def _collect(ctx: _Ctx, tensors: dict[str, torch.Tensor], params: tuple[str, ...]):
    """The family's tensors grouped by module (``{name: {param: (key, tensor)}}``), in file
    order, and the whole weights beside them (:func:`_full_weight`)."""
    groups: _Groups = {}
    full: list[str] = []
    adapters: set[str] = set()
    for key, t in tensors.items():
        hit = _split_key(key, params)
        if hit is None:
            full.append(_full_weight(ctx, key))
            continue
        name, param, adapter = hit
        if adapter is not None:
            adapters.add(adapter)
        groups.setdefault(name, {})[param] = (key, t)
    _one_adapter(ctx, adapters)
    return groups, full


def _require(ctx: _Ctx, name: str, p: dict, needed: Iterable[str], family: str) -> None:
    missing = [x for x in needed if x not in p]
    if missing:
        have = next(iter(p.values()))[0]
        raise ShapeError(
            f"{ctx.weights}: {have} has no partner {name}.{missing[0]} ({family} stores "
            f"{', '.join(needed)})"
        )


def _numel(p: dict) -> int:
    return int(sum(t.numel() for _k, t in p.values()))


# ----------------------------------------------------------------------------- LoRA, DoRA


def _read_lora(ctx: _Ctx, tensors: dict[str, torch.Tensor]):
    """LoRA (rsLoRA, rank/alpha patterns), DoRA, and ``target_parameters`` experts."""
    cfg, src, weights = ctx.config, ctx.config_path, ctx.weights
    for field, why in _LORA_VARIANTS.items():
        if cfg.get(field):
            raise FormatError(
                f"{src}: {field} is set: {why}, so the saved factors are not the whole update "
                "(not supported)"
            )
    opts = _LoraOptions(
        r=config_int(cfg, "r", 8, src),
        alpha=config_number(cfg, "lora_alpha", 8, src),
        ranks=read_pattern(cfg, "rank_pattern", src),
        alphas=read_pattern(cfg, "alpha_pattern", src),
        rslora=config_bool(cfg, "use_rslora", False, src),
        dora=config_bool(cfg, "use_dora", False, src),
        ffo=config_bool(cfg, "fan_in_fan_out", False, src),
    )
    groups: _Groups = {}
    full, biases, adapters = [], [], set()
    for key, t in tensors.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            full.append(_full_weight(ctx, key))
            continue
        name, role, adapter_name, param = parsed
        if adapter_name is not None:
            adapters.add(adapter_name)
        if param == "bias":
            biases.append(key)
        else:
            groups.setdefault(name, {})[role] = (key, t)
    _one_adapter(ctx, adapters)

    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(MUTATING_INITS):
        warn(
            weights,
            f"init_lora_weights={init!r} also changed the base weights: "
            "s·B A is not the whole update",
        )
    if biases:
        warn(weights, f"ignoring {len(biases)} LoRA bias tensor(s) (lora_bias), e.g. {biases[0]}")

    targets = cfg.get("target_parameters") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise FormatError(f"{src}: target_parameters should be a list of names, got {targets!r}")
    wrapped: dict[str, dict[int, str]] = {}  # module -> nesting depth -> group name
    for name in groups:
        base, depth = _unwrap(name)
        if depth or _param_candidates(base, targets):
            wrapped.setdefault(base, {})[depth] = name
    modules: list[LoraModule] = []
    emitted: set[str] = set()
    for name, roles in groups.items():
        base, _depth = _unwrap(name)
        if base not in wrapped:
            modules.append(_lora_module(ctx, name, roles, opts))
        elif base not in emitted:  # all of a module's wrappers at once, where it first appears
            emitted.add(base)
            levels = {d: (n, groups[n]) for d, n in wrapped[base].items()}
            modules.extend(_expert_modules(ctx, base, levels, targets, opts))
    return modules, full, {}


@dataclass(frozen=True)
class _LoraOptions:
    r: int
    alpha: float
    ranks: dict
    alphas: dict
    rslora: bool
    dora: bool
    ffo: bool


def _stored_rank(roles: dict[str, tuple[str, torch.Tensor]]) -> int | None:
    for role in ("A", "emb_A"):
        if role in roles and roles[role][1].ndim >= 1:
            return int(roles[role][1].shape[0])
    return None


def _lora_module(ctx: _Ctx, name: str, roles: dict, opts: _LoraOptions) -> LoraModule:
    """One LoRA or DoRA module: factors as stored, scale ``α/r`` (``α/√r``), the magnitude.

    DoRA (peft ``tuners/lora/dora.py``, ``variants.py``): ``lora_magnitude_vector`` ``m`` is one
    norm per output row of ``W + s·B A`` (Linear; GPT-2 ``Conv1D`` after transposing W; conv
    ``(1, out, 1, 1)`` over ``in·kh·kw``), so ``axis="out"``; for an embedding it is one norm
    per embedding column over the vocabulary, ``(embedding_dim,)``, which is ``axis="in"`` of
    ΔW in the embedding's ``(num_embeddings, embedding_dim)`` orientation.
    """
    weights = ctx.weights
    if not roles.keys() & {"A", "B", "emb_A", "emb_B"}:
        key = next(iter(roles.values()))[0]
        raise ShapeError(f"{weights}: {key} has no lora_A/lora_B beside it")
    r_key = pattern_key(opts.ranks, name, ctx.config_path)
    r_expected = opts.r if r_key is None else config_int(opts.ranks, r_key, opts.r, ctx.config_path)
    stored = _stored_rank(roles)
    if stored is not None and stored != r_expected:
        where = f"rank_pattern[{r_key!r}]" if r_key is not None else "r"
        key = roles.get("A", roles.get("emb_A"))[0]
        raise ctx.rank_error(key, stored, where, r_expected, name)
    a_key = pattern_key(opts.alphas, name, ctx.config_path)
    mod_alpha = ctx.alpha if ctx.alpha is not None else float(opts.alphas.get(a_key, opts.alpha))
    scale = scale_for(mod_alpha, r_expected, opts.rslora)

    mag = roles.get("magnitude")
    if mag is None and opts.dora:
        raise FormatError(
            f"{weights}: {ctx.config_path.name} has use_dora=true but {name} has no "
            "lora_magnitude_vector (peft would use an untrained magnitude)"
        )
    if mag is not None and not opts.dora:
        raise FormatError(
            f"{weights}: {mag[0]} is a DoRA magnitude but {ctx.config_path.name} has use_dora=false"
        )
    magnitude = None
    if mag is not None:
        key, m = mag
        check_tensors({key: m}, weights)
        axis = "in" if "emb_A" in roles or "emb_B" in roles else "out"
        magnitude = Magnitude(m.reshape(-1), axis, key)
    module = _module(
        name,
        roles,
        weights,
        ctx.ffo,
        opts.ffo,
        alpha=float(mod_alpha),
        scale=float(scale),
        family="lora" if magnitude is None else "dora",
        magnitude=magnitude,
        n_params=None if mag is None else _numel(roles),
    )
    if mag is not None:
        key, m = mag
        n = module.d_in if magnitude.axis == "in" else module.d_out
        if m.numel() != n or sum(int(s) != 1 for s in m.shape) > 1:
            side = "embedding columns" if magnitude.axis == "in" else "output rows"
            raise ShapeError(
                f"{weights}: {key} has shape {shape(m)}; {name} has {n} {side} (one norm each)"
            )
    return module


def _unwrap(name: str) -> tuple[str, int]:
    """``(module, depth)``: peft nests a second targeted parameter's wrapper around the first,
    so their factors sit at ``<module>[.base_layer]*.lora_A``."""
    depth = 0
    while name.endswith(".base_layer"):
        name, depth = name[: -len(".base_layer")], depth + 1
    return name, depth


def _param_candidates(module: str, targets: list[str]) -> list[str]:
    """Parameters of ``module`` that ``target_parameters`` names, as peft matches them
    (``BaseTuner._inject_parameters``): ``<module>.<param>`` equal to an entry or ending in
    ``.<entry>``."""
    out = []
    for t in targets:
        param = t.rpartition(".")[2]
        key = f"{module}.{param}"
        if key == t or key.endswith("." + t):
            out.append(param)
    return sorted(set(out))


def _expert_modules(
    ctx: _Ctx, base: str, levels: dict, targets: list[str], opts: _LoraOptions
) -> list[LoraModule]:
    """LoRA on an ``nn.Parameter`` (``target_parameters``, peft ``lora.ParamWrapper``): one
    module per expert.

    ``lora_A.weight`` is ``(r·E, in)`` with expert-major rows, ``lora_B.weight`` ``(out, r·E)``
    with expert-minor columns (``ParamWrapper.get_delta_weight``: ``A.reshape(E, r, in)``,
    ``B.reshape(out, r, E)``), so expert ``e`` has ``ΔW_e = s · B[:, e::E] @ A[e·r:(e+1)·r]``
    ``(out, in)``. ``E = rows / r`` (r from the config and its patterns, keyed
    ``<module>.<param>``). peft stores ``ΔW_e`` in the parameter's orientation, ``(E, out, in)``
    or, for experts marked ``is_transposed`` (GPT-OSS), ``(E, in, out)``: the file does not
    say which, so ``fan_in_fan_out`` is None (a 2-D parameter, E = 1, is ``(out, in)``).
    """
    weights = ctx.weights
    cands = _param_candidates(base, targets)
    names = ", ".join(n for _d, (n, _r) in sorted(levels.items()))
    if len(levels) > 1:
        raise FormatError(
            f"{weights}: {base} carries {len(levels)} nested target_parameters wrappers "
            f"({', '.join(cands) or 'unnamed'}): peft nests them in the base module's parameter "
            "registration order, which the file does not record, so which factors belong to "
            "which parameter cannot be read (not supported)"
        )
    ((depth, (name, roles)),) = levels.items()
    key = next(iter(roles.values()))[0]
    if depth:
        raise FormatError(f"{weights}: {key} is nested under .base_layer with nothing around it")
    if len(cands) != 1:
        raise FormatError(
            f"{weights}: {key}: target_parameters {targets} name "
            f"{'no parameter' if not cands else 'several parameters'} of {base} "
            f"({', '.join(cands) or names}); which one these factors adapt cannot be read"
        )
    if roles.keys() - {"A", "B"}:
        raise FormatError(
            f"{weights}: {key}: a target_parameters wrapper holds only lora_A/lora_B (peft "
            "allows no DoRA or embedding factors there)"
        )
    if "A" not in roles or "B" not in roles:
        have, want = ("A", "B") if "A" in roles else ("B", "A")
        raise missing_partner(weights, roles[have][0], f"{name}.lora_{want}.weight")
    param = cands[0]
    (ka, A), (kb, B) = roles["A"], roles["B"]
    check_tensors({ka: A, kb: B}, weights)
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ShapeError(
            f"{weights}: {ka} {shape(A)} and {kb} {shape(B)} do not form B @ A "
            "(expected (r·E, in) and (out, r·E))"
        )
    pkey = f"{base}.{param}"
    r, alpha, where = ctx.r_alpha(pkey, opts.r, opts.alpha, opts.ranks, opts.alphas)
    rows = int(A.shape[0])
    if rows % r:
        raise ShapeError(
            f"{weights}: {ka} has {rows} rows, not a multiple of {where}={r} for {pkey} "
            "(rows = r · number of experts)"
        )
    n_exp = rows // r
    scale = scale_for(alpha, r, opts.rslora)
    out = []
    for e in range(n_exp):
        A_e = A[e * r : (e + 1) * r]  # (r, in): expert-major rows
        B_e = B[:, e::n_exp].contiguous()  # (out, r): expert-minor columns
        if n_exp > 1:
            mod_name = f"{pkey}.{e}"
        else:  # a 2-D parameter: an ordinary weight ("weight" of a Linear is the module's)
            mod_name = base if param == "weight" else pkey
        module = make_module(
            mod_name,
            A_e,
            B_e,
            alpha=alpha,
            scale=scale,
            source=weights,
            keys=(ka, kb),
            fan_in_fan_out=None if n_exp > 1 else False,
            kind=parse_kind(base if param == "weight" else pkey),
            family="lora",
            nominal_rank=r,
            n_params=int(A_e.numel() + B_e.numel()),
        )
        out.append(replace(module, layer=parse_layer(pkey)))  # not the expert index
    return out


def _families() -> dict:
    """``peft_type -> reader``; the non-LoRA families live in :mod:`.peft_families`, which
    builds on this module's context (imported here, at call time, to keep imports one-way)."""
    from lorascope.formats import peft_families as fam

    return {
        "LORA": _read_lora,
        "ADALORA": fam.read_adalora,
        "VERA": fam.read_vera,
        "LOHA": fam.read_loha,
        "LOKR": fam.read_lokr,
    }


def _module(
    name: str,
    roles: dict[str, tuple[str, torch.Tensor]],
    source: Path,
    ffo_option: bool | None,
    ffo_default: bool,
    **extra: Any,
) -> LoraModule:
    """Normalize one module's tensors; ``extra`` goes to :func:`make_module` (``scale`` 1 and
    no ``alpha`` unless given: the writer only checks shapes)."""
    extra = {"alpha": None, "scale": 1.0, **extra}
    if "A" in roles or "B" in roles:
        if "A" not in roles or "B" not in roles:
            have, want = ("A", "B") if "A" in roles else ("B", "A")
            raise missing_partner(source, roles[have][0], f"{name}.lora_{want}.weight")
        (ka, A), (kb, B) = roles["A"], roles["B"]
        ffo = ffo_option if ffo_option is not None else (ffo_default if A.ndim == 2 else False)
        return make_module(name, A, B, source=source, keys=(ka, kb), fan_in_fan_out=ffo, **extra)
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
        source=source,
        keys=(kb, ka),
        fan_in_fan_out=False if ffo_option is None else ffo_option,
        **extra,
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
        save_safetensors(clean, source, metadata={"format": "pt"})  # not 0o600 as save_file
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
    return read_peft(
        probe.path,
        alpha=options.alpha,
        fan_in_fan_out=options.fan_in_fan_out,
        in_features=options.in_features,  # VeRA
    )


LAYOUT = ("peft", _claims, _read, "PEFT save_pretrained: adapter_config.json + adapter_model.*")
