"""diffusers LoRA files: what ``save_lora_weights`` / ``save_lora_adapter`` write, and the older
attention-processor spellings diffusers still loads.

On disk (diffusers 0.42 ``loaders/lora_base.py`` ``_save_lora_weights``, ``loaders/peft.py``
``save_lora_adapter``)::

    pytorch_lora_weights.safetensors (.bin: no metadata)
      <comp>.<module>.lora_A.weight           (r, d_in)   conv: (r, in, kh, kw)
      <comp>.<module>.lora_B.weight           (d_out, r)  conv: (out, r, 1, 1)
      <comp>.<module>.lora_magnitude_vector   (d_out,)    DoRA; conv: (1, out, 1, 1)
      <comp>.<module>.lora_B.bias             (d_out,)    lora_bias=True
      <comp>.<module>.lora_embedding_A/_B     (r, num_embeddings) / (embedding_dim, r)
      __metadata__["lora_adapter_metadata"]   JSON {"<comp>.r": 4, "<comp>.lora_alpha": 8, ...}

``<comp>`` is the pipeline component (``unet``, ``transformer``, ``text_encoder``,
``text_encoder_2`` ...). The model-level writer ``ModelMixin.save_lora_adapter`` writes no
component prefix and the plain ``LoraConfig.to_dict()`` (``{"r": 4, ...}``) as metadata.

The scale of a module, as diffusers resolves it on load (``load_lora_adapter`` ->
``utils/peft_utils.py`` ``_create_lora_config`` -> peft ``LoraModel._create_and_replace``):

* metadata for its component: ``LoraConfig(**metadata)``; ``r``/``lora_alpha`` from the first
  ``rank_pattern``/``alpha_pattern`` key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``, where
  ``name`` is the module path *inside the component* (peft matches the names of the model the
  adapter is injected into: ``down_blocks.0...to_q``, not ``unet.down_blocks.0...to_q``);
  ``s = alpha / r``, rsLoRA ``alpha / sqrt(r)``;
* ``<comp>.<module>.alpha`` tensors (Flux files in "TheLastBen" style, which
  ``FluxLoraLoaderMixin.lora_state_dict`` pops into ``network_alphas``): ``s = alpha / r``;
* neither: ``get_peft_kwargs`` sets ``lora_alpha = r`` for every module, ``s = 1``.

Older spellings (``utils/state_dict_utils.py``: ``KEYS_TO_ALWAYS_REPLACE``, ``UNET_TO_DIFFUSERS``,
``DIFFUSERS_OLD_TO_PEFT``, ``DIFFUSERS_TO_PEFT``), no alpha stored, ``s = 1``::

    <path>.processor.to_{q,k,v,out}_lora.{down,up}.weight -> <path>.to_{q,k,v} / <path>.to_out.0
                                                 (text encoders: <path>.{q,k,v,out}_proj)
    <path>.lora_linear_layer.{down,up}.weight  -> <path>
    <path>.lora.{down,up}.weight               -> <path>          (".processor" dropped)

Module names keep the component prefix (``unet.down_blocks.0...to_q``,
``text_encoder.encoder.layers.0.self_attn.q_proj``) so that the components stay distinct.
Where diffusers itself loads a file wrongly, the file's own numbers win: a stored ``.alpha`` is
used whatever the model (diffusers reads it only for Flux). What cannot be read exactly (an
unknown key, an A without its B, a component without metadata while others have it, a LoRA
variant whose update is not ``s·B A``) is refused with one line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from lorascope.adapter import Adapter, LoraModule, Magnitude
from lorascope.errors import FormatError, ShapeError
from lorascope.formats import kohya
from lorascope.formats._common import (
    PEFT_PREFIX,
    Probe,
    ReadOptions,
    check_tensors,
    loads_json,
    make_module,
    missing_partner,
    parse_lora_key,
    read_tensors,
    scalar,
    scale_for,
    shape,
    warn,
)
from lorascope.formats.peft import (
    CONFIG_FILE,
    MUTATING_INITS,
    config_bool,
    config_int,
    config_number,
    pattern_key,
    read_pattern,
)

__all__ = ["read_diffusers", "COMPONENTS", "WEIGHT_FILES", "METADATA_KEY"]

WEIGHT_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
METADATA_KEY = "lora_adapter_metadata"  # diffusers LORA_ADAPTER_METADATA_KEY
# Key prefixes of the pipeline components diffusers' LoRA mixins save and load
# (``_lora_loadable_modules``), and the older Würstchen / Stable Cascade ones.
COMPONENTS = (
    "unet",
    "transformer",
    "transformer_2",
    "transformer_ref",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "text_conditioner",
    "connectors",
    "prior",
    "decoder",
)
_TEXT_ENCODER_RE = re.compile(r"^text_encoder(_\d+)?$")
# GPT-2 / Bloom / Falcon module paths also start with "transformer.": not a diffusers component.
_NOT_DIFFUSERS_RE = re.compile(r"^transformer\.h\.\d+\.")
_OLD_PROC_RE = re.compile(r"^(?P<path>.+)\.to_(?P<proj>q|k|v|out)_lora\.(?P<role>down|up)\.weight$")
_OLD_LAYER_RE = re.compile(r"^(?P<path>.+)\.(?:lora_linear_layer|lora)\.(?P<role>down|up)\.weight$")
_PROCESSOR_RE = re.compile(r"\.processor(?=\.|$)")
_ALPHA_RE = re.compile(r"^(?P<stem>.+)\.alpha$")
# LoraConfig fields that turn on a variant whose stored factors are not the whole static
# ΔW = s·B A (pooled inputs, packed blocks, routing, a learned diagonal, sampled noise, tokens
# only, parameters instead of modules): refused. (VeLoRA changes only the backward pass.)
_VARIANTS = (
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
    "alora_invocation_tokens",
    "trainable_token_indices",
    "target_parameters",
)
_ROLE_NAMES = {
    "A": "lora_A.weight",
    "B": "lora_B.weight",
    "emb_A": "lora_embedding_A",
    "emb_B": "lora_embedding_B",
    "magnitude": "lora_magnitude_vector",
    "bias": "lora_B.bias",
}


# ----------------------------------------------------------------------------- keys


def _component(name: str) -> str | None:
    head = name.split(".", 1)[0]
    return head if head in COMPONENTS and "." in name else None


def _parse(key: str) -> tuple[str, str, str] | None:
    """``(stem, module name, role)`` of a diffusers factor key, ``None`` for any other key.

    ``stem`` is the key without its factor suffix (where a ``.alpha`` would attach); ``role`` is
    ``A``, ``B``, ``emb_A``, ``emb_B``, ``magnitude`` or ``bias``; the name is normalized as
    diffusers' key conversion does (``.processor`` dropped, ``to_q_lora`` -> ``to_q``).
    """
    m = _OLD_PROC_RE.match(key)
    if m is not None:
        path = _PROCESSOR_RE.sub("", m["path"])
        proj = m["proj"]
        if _TEXT_ENCODER_RE.match(path.split(".", 1)[0]):  # DIFFUSERS_OLD_TO_PEFT
            module = f"{path}.{proj}_proj"
        else:  # UNET_TO_DIFFUSERS
            module = f"{path}.to_out.0" if proj == "out" else f"{path}.to_{proj}"
        role = "A" if m["role"] == "down" else "B"
        return f"{m['path']}.to_{proj}_lora", module, role
    m = _OLD_LAYER_RE.match(key)
    if m is not None:
        return m["path"], _PROCESSOR_RE.sub("", m["path"]), "A" if m["role"] == "down" else "B"
    parsed = parse_lora_key(key)
    if parsed is None or key.startswith(PEFT_PREFIX):
        return None
    name, role, adapter, param = parsed
    if adapter is not None:
        return None
    if role in ("A", "B") and param == "weight":
        return name, name, role
    if role == "B" and param == "bias":
        return name, name, "bias"
    if (role in ("emb_A", "emb_B") and param is None) or (
        role == "magnitude" and param in (None, "weight")
    ):
        return name, name, role
    return None


def _factor_keys(keys: list[str]) -> list[str]:
    """The keys that are a diffusers A or B factor (any spelling)."""
    return [
        k for k in keys if (p := _parse(k)) is not None and p[2] in ("A", "B", "emb_A", "emb_B")
    ]


def _unrecognized(key: str, path: object) -> FormatError:
    return FormatError(
        f"{path}: {key} is not a diffusers LoRA tensor (expected <module>.lora_A.weight, "
        ".lora_B.weight, .lora_magnitude_vector, .alpha, or the older .to_q_lora.down.weight / "
        ".lora_linear_layer.down.weight / .lora.down.weight spellings)"
    )


# ----------------------------------------------------------------------------- metadata


def _configs(metadata: dict | None, path: Path) -> tuple[dict[str | None, dict] | None, Any]:
    """The ``LoraConfig`` dict of each component from ``lora_adapter_metadata`` (key ``None``
    for a model-level file), or ``None`` when the file has none; and the parsed JSON."""
    raw = (metadata or {}).get(METADATA_KEY)
    if raw is None or raw == "":
        return None, None
    data = loads_json(raw, f"{path}: {METADATA_KEY}")
    if data is None:
        return None, None
    if data == {}:
        raise FormatError(f"{path}: {METADATA_KEY} is empty (diffusers' loader fails on it)")
    if not isinstance(data, dict):
        raise FormatError(f"{path}: {METADATA_KEY} should be a JSON object")
    flat = [k for k in data if "." not in k]
    dotted = [k for k in data if "." in k]
    if flat and dotted:
        raise FormatError(
            f"{path}: {METADATA_KEY} mixes model-level fields ({flat[0]}) and component "
            f"fields ({dotted[0]})"
        )
    if flat:  # ModelMixin.save_lora_adapter: LoraConfig.to_dict() as it is
        return {None: data}, data
    per: dict[str | None, dict] = {}
    for key, value in data.items():  # _pack_dict_with_prefix: "<comp>.<field>"
        comp, fld = key.split(".", 1)
        per.setdefault(comp, {})[fld] = value
    return per, data


class _Rule:
    """One component's ``LoraConfig`` fields that set a module's rank and scale."""

    def __init__(self, cfg: dict, where: str) -> None:
        self.where = where
        peft_type = str(cfg.get("peft_type") or "LORA").upper()
        if peft_type != "LORA":
            raise FormatError(f"{where}: peft_type {peft_type} is not LoRA (not read)")
        for fld in _VARIANTS:
            if cfg.get(fld):
                raise FormatError(
                    f"{where}: {fld}={cfg[fld]!r}: this LoRA variant's update is not s·B A "
                    "(not read)"
                )
        src: Any = where  # config_number / read_pattern only print it
        self.r = config_int(cfg, "r", 8, src)  # LoraConfig defaults
        self.alpha = float(config_number(cfg, "lora_alpha", 8, src))
        self.rank_pattern = read_pattern(cfg, "rank_pattern", src)
        self.alpha_pattern = read_pattern(cfg, "alpha_pattern", src)
        self.rslora = config_bool(cfg, "use_rslora", False, src)
        self.dora = config_bool(cfg, "use_dora", False, src)
        self.fan_in_fan_out = config_bool(cfg, "fan_in_fan_out", False, src)
        self.init = cfg.get("init_lora_weights", True)

    def resolve(self, rel: str) -> tuple[int, float]:
        """``(r, alpha)`` peft gives the module at ``rel`` (its path inside the component)."""
        r_key = pattern_key(self.rank_pattern, rel, self.where)
        a_key = pattern_key(self.alpha_pattern, rel, self.where)
        r = self.r if r_key is None else config_int(self.rank_pattern, r_key, self.r, self.where)
        alpha = float(self.alpha_pattern[a_key]) if a_key is not None else self.alpha
        return r, alpha


# ----------------------------------------------------------------------------- reader


def read_diffusers(
    path: str | Path,
    *,
    tensors: dict[str, torch.Tensor] | None = None,
    metadata: dict | None = None,
    alpha: float | None = None,
    fan_in_fan_out: bool | None = None,
) -> Adapter:
    """Read a diffusers LoRA file (``pytorch_lora_weights.safetensors`` or ``.bin``).

    Parameters
    ----------
    path : str or Path
        The weights file.
    tensors, metadata : optional
        Its tensors and safetensors metadata when the caller already read them.
    alpha : float, optional
        Overrides every module's alpha (``scale = alpha / r``, rsLoRA ``alpha / sqrt(r)``).
    fan_in_fan_out : bool, optional
        Orientation of the base weights (default: the metadata's, else False).

    Returns
    -------
    Adapter
        One module per adapted weight: ``A`` ``(r, d_in)`` (conv ``(r, in·kh·kw)``), ``B``
        ``(d_out, r)``, ``ΔW = scale · B @ A`` with the scale diffusers + peft give it (see the
        module docstring); an embedding's ``A = lora_embedding_B.T`` ``(r, embedding_dim)``,
        ``B = lora_embedding_A.T`` ``(num_embeddings, r)``, as peft's ``(B A)ᵀ``. DoRA modules
        (family ``"dora"``) carry ``Magnitude(m, "out")``: peft's ``DoraLinearLayer`` /
        ``DoraConv2dLayer`` norm one output row (conv: one output channel over ``in·kh·kw``),
        ``W' = diag(m / ‖W + s·B A‖_row)·(W + s·B A)``, what ``fuse_lora`` computes.

    Raises
    ------
    FormatError
        An unrecognized key, a component without metadata while others have it, metadata and
        ``.alpha`` tensors together, a LoRA variant that is not ``s·B A``.
    ShapeError
        An A without its B (or a magnitude without either), a rank that disagrees with the
        metadata, a magnitude that does not match the output size.
    """
    path = Path(path)
    if tensors is None:
        tensors, metadata = read_tensors(path)
    configs, parsed_meta = _configs(metadata, path)
    model_level = configs is not None and None in configs

    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    stems: dict[str, str] = {}
    alphas: dict[str, tuple[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _ALPHA_RE.match(key)
        if m is not None:
            alphas[m["stem"]] = (key, t)
            continue
        parsed = _parse(key)
        if parsed is None:
            raise _unrecognized(key, path)
        stem, name, role = parsed
        roles = groups.setdefault(name, {})
        if role in roles:
            raise FormatError(f"{path}: {key} and {roles[role][0]} both hold {name}'s {role}")
        roles[role] = (key, t)
        stems.setdefault(name, stem)
    if not groups:
        some = ", ".join(list(tensors)[:3]) or "none"
        raise FormatError(f"{path}: no diffusers LoRA tensors found (keys: {some})")

    comps = {name: None if model_level else _component(name) for name in groups}
    _check_components(groups, comps, configs, path)
    alpha_of = _stored_alphas(groups, stems, alphas, comps, configs, path)
    rules = {
        comp: _Rule(cfg, f"{path}: {METADATA_KEY}" + (f"[{comp}]" if comp else ""))
        for comp, cfg in (configs or {}).items()
        if comp is None or comp in set(comps.values())
    }
    _check_dora(groups, comps, rules, path)

    modules: list[LoraModule] = []
    assumed: list[str] = []
    biases: list[str] = []
    for name, roles in groups.items():
        comp = comps[name]
        rule = rules.get(comp) if configs is not None else None
        rel = name[len(comp) + 1 :] if comp is not None and not model_level else name
        A, B, keys, magnitude, is_emb = _factors(name, roles, path)
        r = int(A.shape[0]) if A.ndim else 0  # 0-d: make_module rejects it
        rslora = False
        if rule is not None:
            r_expected, mod_alpha = rule.resolve(rel)
            rslora = rule.rslora
            if r != r_expected:
                raise ShapeError(
                    f"{path}: {keys[0]} has rank {r} but {METADATA_KEY} gives "
                    f"r={r_expected} for {rel} (diffusers would fail to load it)"
                )
        elif name in alpha_of:
            mod_alpha = alpha_of[name][1]
        else:
            mod_alpha = float(r)
            assumed.append(name)
        if alpha is not None:
            mod_alpha = float(alpha)
        if name in alpha_of:
            keys = (*keys, alpha_of[name][0])
        if "bias" in roles:
            biases.append(roles["bias"][0])
            keys = (*keys, roles["bias"][0])
        if fan_in_fan_out is not None:
            ffo = fan_in_fan_out
        else:
            ffo = bool(rule is not None and rule.fan_in_fan_out and A.ndim == 2 and not is_emb)
        modules.append(
            make_module(
                name,
                A,
                B,
                alpha=mod_alpha,
                scale=scale_for(mod_alpha, r, rslora),
                source=path,
                keys=keys,
                fan_in_fan_out=ffo,
                family="lora" if magnitude is None else "dora",
                nominal_rank=r,
                n_params=sum(int(t.numel()) for _k, t in roles.values()),
                magnitude=magnitude,
            )
        )

    if assumed and alpha is None:
        warn(
            path,
            f"no {METADATA_KEY} and no .alpha tensors for {len(assumed)} module(s) "
            f"(e.g. {assumed[0]}): scale 1 (alpha = r), as diffusers loads them; pass alpha "
            "(CLI: --alpha) if they were trained with another",
        )
    if biases:
        warn(
            path,
            f"ignoring {len(biases)} LoRA bias tensor(s) (lora_bias: a change of the layer's "
            f"bias, not of W), e.g. {biases[0]}",
        )
    for comp, rule in rules.items():
        if isinstance(rule.init, str) and rule.init.lower().startswith(MUTATING_INITS):
            warn(
                path,
                f"{comp or 'model'}: init_lora_weights={rule.init!r} also changed the base "
                "weights: s·B A is not the whole update",
            )
    config = {k: v for k, v in (metadata or {}).items() if k != METADATA_KEY}
    config[METADATA_KEY] = parsed_meta
    # what a merge must know (lorascope.merge refuses both): the update is more than s·B A
    config["lora_bias"] = bool(biases)
    mutating = [
        r.init
        for r in rules.values()
        if isinstance(r.init, str) and r.init.lower().startswith(MUTATING_INITS)
    ]
    if mutating:
        config["init_lora_weights"] = mutating[0]
    return Adapter(modules=modules, path=str(path), format="diffusers", config=config)


def _check_components(
    groups: dict, comps: dict[str, str | None], configs: dict | None, path: Path
) -> None:
    """Every module in a known component (or none in any), each with metadata when any has."""
    if configs is not None and None in configs:
        return
    prefixed = [n for n, c in comps.items() if c is not None]
    bare = [n for n, c in comps.items() if c is None]
    if bare and (prefixed or configs is not None):
        key = next(iter(groups[bare[0]].values()))[0]
        raise FormatError(
            f"{path}: {key} has no diffusers component prefix "
            f"({', '.join(c + '.' for c in COMPONENTS[:3])} ...) while "
            + (f"{prefixed[0]} has one" if prefixed else f"{METADATA_KEY} is per component")
        )
    if configs is None:
        return
    for name, comp in comps.items():
        if comp not in configs:
            key = next(iter(groups[name].values()))[0]
            have = ", ".join(sorted(c for c in configs if c is not None))
            raise FormatError(
                f"{path}: {key}: {METADATA_KEY} has fields for {have} but none for "
                f"component {comp!r} (diffusers' loader fails on such a file)"
            )


def _stored_alphas(
    groups: dict,
    stems: dict[str, str],
    alphas: dict[str, tuple[str, torch.Tensor]],
    comps: dict[str, str | None],
    configs: dict | None,
    path: Path,
) -> dict[str, tuple[str, float]]:
    """``{module: (key, alpha)}`` from ``<module>.alpha`` tensors, checked: each belongs to a
    module, no metadata beside them, and a component has them for all its modules or none."""
    by_stem = {stem: name for name, stem in stems.items()}
    out: dict[str, tuple[str, float]] = {}
    for stem, (key, t) in alphas.items():
        name = by_stem.get(stem)
        if name is None:
            raise FormatError(f"{path}: {key} is the alpha of no module with LoRA factors")
        if configs is not None:
            raise FormatError(
                f"{path}: {key}: the file has both {METADATA_KEY} and .alpha tensors "
                "(diffusers refuses both at once)"
            )
        value = scalar(t, path, key)
        if not value > 0:
            raise FormatError(f"{path}: {key}={value!r} is not a positive alpha")
        out[name] = (key, value)
    for comp in set(comps.values()):
        names = [n for n, c in comps.items() if c == comp]
        with_alpha = [n for n in names if n in out]
        if with_alpha and len(with_alpha) != len(names):
            missing = next(n for n in names if n not in out)
            key = next(iter(groups[missing].values()))[0]
            raise FormatError(
                f"{path}: {key} has no .alpha while {out[with_alpha[0]][0]} has one "
                "(alpha = r and diffusers' most common alpha disagree: not read)"
            )
    return out


def _check_dora(
    groups: dict, comps: dict[str, str | None], rules: dict[str | None, _Rule], path: Path
) -> None:
    """A magnitude for every module of a DoRA component and none elsewhere."""
    for comp in set(comps.values()):
        names = [n for n, c in comps.items() if c == comp]
        with_m = [n for n in names if "magnitude" in groups[n]]
        rule = rules.get(comp)
        dora = rule.dora if rule is not None else bool(with_m)
        for name in names:
            roles = groups[name]
            if dora != ("magnitude" in roles):
                key = next(iter(roles.values()))[0]
                if rule is not None:
                    why = f"{METADATA_KEY} says use_dora={rule.dora}"
                else:
                    why = f"{with_m[0]} has a lora_magnitude_vector"
                raise FormatError(
                    f"{path}: {key}: "
                    + ("no lora_magnitude_vector" if dora else "a lora_magnitude_vector")
                    + f" while {why} (not read)"
                )


def _factors(
    name: str, roles: dict[str, tuple[str, torch.Tensor]], path: Path
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], Magnitude | None, bool]:
    """``(A, B, keys, magnitude, is_embedding)`` of one module, checked: ``A`` ``(r, d_in)`` or
    conv ``(r, in, kh, kw)``, ``B`` ``(d_out, r)`` or ``(out, r, 1, 1)`` (flattened by
    :func:`make_module`)."""
    for have, want in (("A", "B"), ("B", "A"), ("emb_A", "emb_B"), ("emb_B", "emb_A")):
        if have in roles and want not in roles:
            raise missing_partner(path, roles[have][0], f"{name}.{_ROLE_NAMES[want]}")
    for extra in ("magnitude", "bias"):
        if extra in roles and "A" not in roles and "emb_A" not in roles:
            raise missing_partner(path, roles[extra][0], f"{name}.lora_A.weight")
    if "A" in roles and "emb_A" in roles:
        raise FormatError(f"{path}: {roles['emb_A'][0]} and {roles['A'][0]} adapt one module")
    check_tensors(dict(roles.values()), path)
    if "emb_A" in roles:
        (ka, eA), (kb, eB) = roles["emb_A"], roles["emb_B"]  # (r, n_emb), (emb_dim, r)
        if "magnitude" in roles:
            raise FormatError(f"{path}: {roles['magnitude'][0]}: DoRA on an embedding (not read)")
        if eA.ndim != 2 or eB.ndim != 2 or eA.shape[0] != eB.shape[1]:
            raise ShapeError(
                f"{path}: {ka} {shape(eA)} and {kb} {shape(eB)} do not form an embedding LoRA "
                "(expected (r, num_embeddings) and (embedding_dim, r))"
            )
        # peft: ΔW_emb = (eB @ eA).T · s = eA.T @ eB.T · s: (n_emb, r) @ (r, emb_dim)
        return eB.T, eA.T, (kb, ka), None, True
    (ka, A), (kb, B) = roles["A"], roles["B"]
    if "magnitude" not in roles:
        return A, B, (ka, kb), None, False
    km, m = roles["magnitude"]  # Linear (d_out,), conv (1, out, 1, 1)
    d_out = int(B.shape[0]) if B.ndim else 0
    if m.numel() != d_out or (m.ndim > 1 and m.shape[1] != d_out):
        raise ShapeError(f"{path}: {km} has shape {shape(m)}; {name} has {d_out} output rows")
    return A, B, (ka, kb, km), Magnitude(m.reshape(-1), "out", km), False


# ----------------------------------------------------------------------------- layout


def _weights_in(directory: Path) -> Path | None:
    return next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)


def _is_diffusers_file(probe: Probe, *, beside_config: bool) -> bool:
    """A file with diffusers' metadata or old processor keys; or whose PEFT-style / older
    factor keys all carry a component prefix (any prefix when it is named
    ``pytorch_lora_weights.*``), with no ``adapter_config.json`` beside it."""
    if METADATA_KEY in probe.metadata:
        return True
    keys = probe.keys
    if any(_OLD_PROC_RE.match(k) for k in keys):
        return True
    if beside_config:
        return False
    factors = _factor_keys(keys)
    if not factors:
        return False
    if probe.path.name in WEIGHT_FILES:
        return True
    return all(_component(k) is not None and not _NOT_DIFFUSERS_RE.match(k) for k in factors)


def _claims(probe: Probe) -> bool:
    if probe.container == "dir":
        return _weights_in(probe.path) is not None and not (probe.path / CONFIG_FILE).is_file()
    if probe.container not in ("safetensors", "torch", "unknown"):
        return False
    return _is_diffusers_file(probe, beside_config=probe.sibling(CONFIG_FILE).is_file())


def _read(probe: Probe, options: ReadOptions) -> Adapter:
    if probe.container == "dir":
        weights = _weights_in(probe.path)
        if weights is None:
            raise FormatError(
                f"{probe.path}: no {' or '.join(WEIGHT_FILES)} here (not a diffusers LoRA "
                "directory)"
            )
        inner = Probe.of(weights)
        if not _factor_keys(inner.keys) and kohya.LAYOUT[1](inner):
            return kohya.LAYOUT[2](inner, options)  # sd-scripts keys under diffusers' file name
        adapter = _read(inner, options)
        adapter.path = str(probe.path)
        return adapter
    tensors, metadata = probe.tensors()
    return read_diffusers(
        probe.path,
        tensors=tensors,
        metadata=metadata,
        alpha=options.alpha,
        fan_in_fan_out=options.fan_in_fan_out,
    )


LAYOUT = (
    "diffusers",
    _claims,
    _read,
    "diffusers save_lora_weights: pytorch_lora_weights.safetensors, <component>.<module>.lora_A",
)
