"""torchtune's native LoRA/DoRA adapter checkpoints (``adapter_model.pt``, older ``adapter_N.pt``).

On disk (torchtune ``training/checkpointing/_checkpointer.py``: every checkpointer saves
``torch.save(get_adapter_state_dict(model.state_dict()))`` to ``epoch_N/adapter_model.pt``;
releases before 0.3 wrote ``output_dir/adapter_N.pt``)::

    layers.3.attn.q_proj.lora_a.weight   (r, d_in)    nn.Linear(in_dim, rank)
    layers.3.attn.q_proj.lora_b.weight   (d_out, r)   nn.Linear(rank, out_dim)
    layers.3.attn.q_proj.magnitude       (d_out,)     DoRA only

``LoRALinear.forward`` (``modules/peft/lora.py``) adds ``(alpha / rank) · lora_b(lora_a(x))``,
so ``ΔW = (alpha / r) · B @ A`` with ``A = lora_a.weight``, ``B = lora_b.weight``, ``r`` from
the shapes. ``DoRALinear`` (``modules/peft/dora.py``) and ``get_merged_lora_ckpt``
(``modules/peft/_utils.py``) give ``W' = diag(magnitude / ‖W + s·B A‖_row) · (W + s·B A)``:
``Magnitude(magnitude, "out")``, family ``dora``.

``alpha`` is not in the ``.pt``. It comes from, in order: the caller; ``lora_alpha`` in the
PEFT ``adapter_config.json`` torchtune writes beside it; ``model.lora_alpha`` in the recipe
config ``torchtune_config.yaml`` (beside the file or in the output directory above
``epoch_N/``; read only if PyYAML is installed); else ``alpha = r`` (scale 1) with a warning.

Names and row order are torchtune's own (``layers.3.attn.q_proj``, ``attn.output_proj``,
``mlp.w1``/``w2``/``w3``, ``output``). For Llama-family models torchtune keeps ``q_proj`` and
``k_proj`` rows in Meta's interleaved rotary order (``convert_weights.hf_to_tune`` permutes
them; the same order as llama.cpp), so ``ΔW`` applies to torchtune/Meta-format weights as is.
A row permutation leaves singular values, norms and input-side directions unchanged; relating
the adapter to a Hugging Face base by name is refused (the names differ). Qwen2 is not
permuted. A directory that also holds torchtune's PEFT export (``adapter_model.safetensors``)
is read as PEFT, which has HF names and rows.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from lorascope.adapter import Adapter, LoraModule, Magnitude
from lorascope.errors import FormatError, ShapeError
from lorascope.formats._common import (
    Probe,
    ReadOptions,
    check_tensors,
    make_module,
    missing_partner,
    one_line,
    read_json,
    read_tensors,
    scale_for,
    shape,
    warn,
)
from lorascope.formats.peft import ADAPTER_FILES, CONFIG_FILE, finite_number

__all__ = ["read_torchtune"]

RECIPE_CONFIG = "torchtune_config.yaml"
_FILE_RE = re.compile(r"^adapter_(model|\d+)\.pt$")
_EPOCH_RE = re.compile(r"^epoch_\d+$")
_ROLES = {".lora_a.weight": "A", ".lora_b.weight": "B", ".magnitude": "m"}


def _candidates(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if _FILE_RE.match(p.name) and p.is_file())


def _resolve(path: Path) -> Path:
    if not path.is_dir():
        return path
    found = _candidates(path)
    if not found:
        raise FormatError(f"{path}: no adapter_model.pt or adapter_<N>.pt here")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise FormatError(f"{path}: holds several torchtune adapters ({names}); name one file")
    return found[0]


def _positive(value: Any) -> bool:
    f = finite_number(value)
    return f is not None and f > 0


def _alpha_source(weights: Path) -> tuple[float | None, int | None, dict]:
    """``(alpha, configured r, config read)`` from the files torchtune writes beside an
    adapter; ``(None, None, {})`` when none says."""
    peft_config = weights.parent / CONFIG_FILE
    if peft_config.is_file():
        cfg = read_json(peft_config)
        alpha = cfg.get("lora_alpha")
        if alpha is not None:
            if not _positive(alpha):
                raise FormatError(f"{peft_config}: lora_alpha={alpha!r} is not a positive number")
            r = cfg.get("r")
            return float(alpha), (int(r) if _positive(r) else None), {CONFIG_FILE: cfg}
    places = [weights.parent / RECIPE_CONFIG]
    if _EPOCH_RE.match(weights.parent.name):  # output_dir/epoch_N/adapter_model.pt
        places.append(weights.parent.parent / RECIPE_CONFIG)
    for recipe in places:
        if not recipe.is_file():
            continue
        try:
            import yaml
        except ImportError:  # PyYAML is not a dependency: fall through to the default
            break
        try:
            cfg = yaml.safe_load(recipe.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise FormatError(f"{recipe}: not readable YAML: {one_line(e)}") from None
        model = cfg.get("model") if isinstance(cfg, dict) else None
        alpha = model.get("lora_alpha") if isinstance(model, dict) else None
        if alpha is None or isinstance(alpha, str):  # absent, or an unresolved ${...}
            continue
        if not _positive(alpha):
            raise FormatError(f"{recipe}: model.lora_alpha={alpha!r} is not a positive number")
        r = model.get("lora_rank")
        return float(alpha), (int(r) if _positive(r) else None), {RECIPE_CONFIG: cfg}
    return None, None, {}


def read_torchtune(
    path: str | Path,
    *,
    tensors: dict[str, torch.Tensor] | None = None,
    alpha: float | None = None,
) -> Adapter:
    """Read a torchtune native adapter (``adapter_model.pt``/``adapter_<N>.pt`` or its folder).

    Parameters
    ----------
    path : str or Path
        The ``.pt`` file, or the ``epoch_N`` (or older output) directory holding one.
    tensors : dict, optional
        The file's tensors when the caller already read them.
    alpha : float, optional
        torchtune's ``lora_alpha``; see the module docstring for where it is found otherwise.

    Returns
    -------
    Adapter
        ``A`` ``(r, d_in)`` = ``lora_a.weight``, ``B`` ``(d_out, r)`` = ``lora_b.weight``,
        ``scale = alpha / r``; DoRA modules carry ``Magnitude(magnitude, "out")``.

    Raises
    ------
    FormatError
        An unreadable file, a LoRA key it does not know, a bad alpha in a config.
    ShapeError
        An A without its B (or the reverse), a rank that disagrees with the config, a
        magnitude of the wrong length.
    """
    path = Path(path)
    weights = _resolve(path)
    if tensors is None:
        tensors, _ = read_tensors(weights, "torch")
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    others = []
    for key, t in tensors.items():
        suffix = next((s for s in _ROLES if key.endswith(s)), None)
        if suffix is not None and len(key) > len(suffix):
            groups.setdefault(key[: -len(suffix)], {})[_ROLES[suffix]] = (key, t)
        elif "lora" in key or "magnitude" in key:
            raise FormatError(
                f"{weights}: {key} is not a torchtune adapter parameter "
                "(<module>.lora_a.weight, .lora_b.weight or .magnitude)"
            )
        else:
            others.append(key)
    if not groups:
        raise FormatError(f"{weights}: no torchtune lora_a.weight/lora_b.weight tensors")
    if others:
        warn(
            weights,
            f"ignoring {len(others)} non-adapter tensor(s) (whole weights), e.g. {others[0]}",
        )

    r_config = None
    if alpha is not None:
        a: float | None = float(alpha)
        config: dict[str, Any] = {"alpha": a, "alpha_source": "given by the caller"}
    else:
        a, r_config, read = _alpha_source(weights)
        source = next(iter(read), None)
        config = {"alpha": a, "alpha_source": source or "none: alpha = r (scale 1) assumed"}
        config.update(read)
        if a is None:
            warn(
                weights,
                "no alpha given or found (adapter_config.json, torchtune_config.yaml): "
                "assuming alpha = r (scale 1); pass alpha (CLI: --alpha)",
            )
    modules = [_module(name, roles, weights, a, r_config) for name, roles in groups.items()]
    return Adapter(
        modules=modules,
        path=str(path),
        format="torchtune",
        config=config,
        full_weights=tuple(others),
    )


def _module(
    name: str,
    roles: dict[str, tuple[str, torch.Tensor]],
    source: Path,
    alpha: float | None,
    r_config: int | None,
) -> LoraModule:
    if "A" not in roles or "B" not in roles:
        have = "A" if "A" in roles else "B" if "B" in roles else "m"
        want = "lora_b.weight" if have == "A" else "lora_a.weight"
        raise missing_partner(source, roles[have][0], f"{name}.{want}")
    (ka, A), (kb, B) = roles["A"], roles["B"]
    check_tensors({k: t for k, t in roles.values()}, source)
    if A.ndim != 2 or B.ndim != 2:
        raise ShapeError(
            f"{source}: {ka} {shape(A)} and {kb} {shape(B)} are not the matrices of a LoRALinear"
        )
    r = int(A.shape[0])
    if r_config is not None and r != r_config:
        raise ShapeError(
            f"{source}: {ka} {shape(A)} has rank {r} but the config gives r={r_config}"
        )
    mod_alpha = float(r) if alpha is None else alpha
    scale = scale_for(mod_alpha, r)
    magnitude = None
    n_params = None
    keys: tuple[str, ...] = (ka, kb)
    if "m" in roles:
        km, m = roles["m"]
        if m.ndim != 1 or B.ndim != 2 or m.shape[0] != B.shape[0]:
            raise ShapeError(
                f"{source}: {km} has shape {shape(m)}; {kb} {shape(B)} has {B.shape[0]} output rows"
            )
        magnitude = Magnitude(m, "out", km)
        n_params = int(A.numel() + B.numel() + m.numel())
        keys = (ka, kb, km)
    return make_module(
        name,
        A,
        B,
        alpha=mod_alpha,
        scale=scale,
        source=source,
        keys=keys,
        family="lora" if magnitude is None else "dora",
        nominal_rank=r_config,
        n_params=n_params,
        magnitude=magnitude,
    )


# ----------------------------------------------------------------------------- layout


def _is_torchtune_key(k: str) -> bool:
    return k.endswith((".lora_a.weight", ".lora_b.weight"))


def _claims(probe: Probe) -> bool:
    """A torch file with ``<module>.lora_a.weight``/``.lora_b.weight`` keys (lowercase a/b);
    a directory with ``adapter_model.pt``/``adapter_<N>.pt`` and no PEFT weights (a torchtune
    output directory with its PEFT export is read as PEFT)."""
    if probe.container == "dir":
        if any((probe.path / f).is_file() for f in ADAPTER_FILES):
            return False
        return bool(_candidates(probe.path))
    if probe.container != "torch":
        return False
    return any(_is_torchtune_key(k) for k in probe.keys)


def _read(probe: Probe, options: ReadOptions) -> Adapter:
    tensors = probe.tensors()[0] if probe.container != "dir" else None
    return read_torchtune(probe.path, tensors=tensors, alpha=options.alpha)


LAYOUT = (
    "torchtune",
    _claims,
    _read,
    "torchtune adapter_model.pt: <module>.lora_a.weight / .lora_b.weight (/ .magnitude)",
)
