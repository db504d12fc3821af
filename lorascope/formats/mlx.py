"""mlx-lm LoRA/DoRA adapters (``mlx_lm.lora`` training, ``mlx_lm.tuner``).

On disk (``mlx_lm/tuner/trainer.py`` saves ``tree_flatten(model.trainable_parameters())``;
``mlx_lm/lora.py`` writes the whole argument namespace with ``save_config``)::

    adapters.safetensors   <name>.lora_a   Linear (d_in, r); Embedding (vocab, r);
                                           SwitchLinear (E, r, d_in)
                           <name>.lora_b   Linear (r, d_out); Embedding (r, dims);
                                           SwitchLinear (E, d_out, r)
                           <name>.m        DoRA magnitude: Linear (d_out,), Embedding (vocab,)
    adapter_config.json    fine_tune_type ("lora" | "dora" | "full"), num_layers,
                           lora_parameters {"rank", "scale", "dropout", "keys"?}

Names are the model's own (Hugging Face names for the converted models,
``model.layers.3.self_attn.q_proj``); mlx-lm loads HF weights without permuting q/k rows, so the
update is in HF row order. The scale is ``lora_parameters.scale`` itself (mlx-lm never uses an
alpha), and ``fuse()`` (``tuner/lora.py``, ``tuner/dora.py``) computes::

    Linear      W' = W + (scale · lora_b.T) @ lora_a.T        A = lora_a.T, B = lora_b.T
    Embedding   E' = E + (scale · lora_a) @ lora_b            A = lora_b,   B = lora_a
    Switch      W'[e] = W[e] + scale · lora_b[e] @ lora_a[e]  one module per expert
    DoRA        W' = diag(m / ‖W + s·B A‖_row) · (W + s·B A)  (Linear and Embedding alike)

An embedding's update is kept in the embedding's stored ``(vocab, dims)`` orientation (as for
PEFT's ``lora_embedding_A/B``), so its DoRA magnitude, one norm per vocabulary row, is a
per-output-row magnitude too: ``Magnitude(m, "out")`` everywhere. A module is an embedding when
its name says so (:func:`lorascope.adapter.parse_kind` gives ``embed``); LoRA factors have the
same layout either way, and a DoRA magnitude whose length fits neither reading is refused.

A ``LoRASwitchLinear`` (MoE ``switch_mlp``) stores one LoRA per expert; each becomes its own
module ``<name>.experts.<e>`` (kind from ``<name>``), its update exactly
``scale · lora_b[e] @ lora_a[e]``; the base weight ``(E, d_out, d_in)`` is one tensor, so
commands that need the base refuse these modules by name.

Refused: ``fine_tune_type: full`` (whole weights, not factors), a quantized adapter
(``adapter_quantization``), keys other than ``lora_a``/``lora_b``/``m`` (e.g. a fused
``lora_a.0``), a magnitude without ``fine_tune_type: dora`` or the reverse, and factors whose
rank is not ``lora_parameters.rank``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorascope.adapter import Adapter, LoraModule, Magnitude, parse_kind
from lorascope.errors import FormatError, ShapeError
from lorascope.formats._common import (
    Probe,
    ReadOptions,
    check_tensors,
    make_module,
    missing_partner,
    read_json,
    read_tensors,
    scale_for,
    shape,
)
from lorascope.formats.peft import finite_number

__all__ = ["read_mlx", "ADAPTER_FILE", "CONFIG_FILE"]

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
_LEAVES = ("lora_a", "lora_b", "m")


def _resolve(path: Path) -> tuple[Path, Path]:
    """``(adapters.safetensors, adapter_config.json)`` for an adapter directory or file."""
    weights = path / ADAPTER_FILE if path.is_dir() else path
    if not weights.is_file():
        raise FormatError(f"{path}: no {ADAPTER_FILE} here (not an mlx-lm adapter directory)")
    config = weights.parent / CONFIG_FILE
    if not config.is_file():
        raise FormatError(
            f"{weights}: no {CONFIG_FILE} beside it (mlx-lm keeps lora_parameters.scale there)"
        )
    return weights, config


def _number(params: dict, key: str, source: Path, *, positive: bool) -> float:
    value = params.get(key)
    f = finite_number(value)
    if f is None or (positive and f <= 0):
        shown = repr(value) if not isinstance(value, int) else "an integer out of range"
        raise FormatError(f"{source}: lora_parameters.{key}={shown[:40]} is not a finite number")
    return f


def _fine_tune_type(cfg: dict, config_path: Path, weights: Path) -> str:
    ftt = cfg.get("fine_tune_type")
    if ftt is None:  # older mlx-lm: use_dora; load_adapters' default is "lora"
        ftt = "dora" if cfg.get("use_dora") else "lora"
    if ftt == "full":
        raise FormatError(
            f"{weights}: an mlx-lm full fine-tune (fine_tune_type 'full' in {config_path.name}): "
            "it holds whole weights, not LoRA factors"
        )
    if ftt not in ("lora", "dora"):
        raise FormatError(f"{config_path}: fine_tune_type {ftt!r} is not lora or dora")
    if cfg.get("adapter_quantization"):
        raise FormatError(
            f"{weights}: a quantized mlx-lm adapter (adapter_quantization in "
            f"{config_path.name}) is not supported"
        )
    return ftt


def read_mlx(path: str | Path, *, alpha: float | None = None) -> Adapter:
    """Read an mlx-lm adapter directory (or its ``adapters.safetensors``).

    Parameters
    ----------
    path : str or Path
        The ``--adapter-path`` directory, or an ``adapters.safetensors`` (also a checkpoint
        ``0000100_adapters.safetensors``) with ``adapter_config.json`` beside it.
    alpha : float, optional
        Replaces mlx-lm's ``scale`` with ``alpha / r`` for every module.

    Returns
    -------
    Adapter
        ``A`` ``(r, d_in)``, ``B`` ``(d_out, r)``, ``scale = lora_parameters.scale`` (``alpha``
        None) per module; family ``dora`` with ``Magnitude(m, "out")`` for DoRA modules.
        ``config`` is ``adapter_config.json``.

    Raises
    ------
    FormatError
        A full fine-tune, a quantized adapter, an unknown key, a missing or bad config.
    ShapeError
        An unpaired factor, a rank that disagrees with ``lora_parameters.rank``, a magnitude of
        the wrong length.
    """
    path = Path(path)
    weights, config_path = _resolve(path)
    cfg = read_json(config_path)
    ftt = _fine_tune_type(cfg, config_path, weights)
    params = cfg.get("lora_parameters")
    if not isinstance(params, dict):
        raise FormatError(f"{config_path}: lora_parameters is {params!r}, not an object")
    file_scale = _number(params, "scale", config_path, positive=False)
    rank_value = _number(params, "rank", config_path, positive=True)
    if not rank_value.is_integer():
        raise FormatError(f"{config_path}: lora_parameters.rank={rank_value} is not an integer")
    rank = int(rank_value)

    tensors, _meta = read_tensors(weights, "safetensors")
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        name, _, leaf = key.rpartition(".")
        if leaf not in _LEAVES or not name:
            raise FormatError(
                f"{weights}: {key} is not an mlx-lm adapter parameter (<module>.lora_a, "
                ".lora_b or .m)"
            )
        groups.setdefault(name, {})[leaf] = (key, t)
    if not groups:
        raise FormatError(f"{weights}: no lora_a/lora_b tensors")
    check_tensors(tensors, weights)

    modules: list[LoraModule] = []
    for name, leaves in groups.items():
        if "lora_a" not in leaves or "lora_b" not in leaves:
            have = "lora_a" if "lora_a" in leaves else "lora_b" if "lora_b" in leaves else "m"
            want = "lora_b" if have == "lora_a" else "lora_a"
            raise missing_partner(weights, leaves[have][0], f"{name}.{want}")
        modules.extend(_modules(name, leaves, weights, ftt, rank, file_scale, alpha))
    return Adapter(modules=modules, path=str(path), format="mlx", config=cfg)


def _modules(
    name: str,
    leaves: dict[str, tuple[str, torch.Tensor]],
    source: Path,
    ftt: str,
    rank: int,
    file_scale: float,
    alpha: float | None,
) -> list[LoraModule]:
    (ka, a), (kb, b) = leaves["lora_a"], leaves["lora_b"]
    m = leaves.get("m")
    if m is not None and ftt != "dora":
        raise FormatError(
            f"{source}: {m[0]} is a DoRA magnitude but fine_tune_type is {ftt!r} "
            "(mlx-lm would not load it)"
        )
    if m is None and ftt == "dora":
        raise FormatError(
            f"{source}: {ka}: fine_tune_type is 'dora' but the module has no magnitude {name}.m"
        )

    def scale_of(r: int) -> tuple[float | None, float]:
        return (None, file_scale) if alpha is None else (float(alpha), scale_for(alpha, r))

    if a.ndim == 3 and b.ndim == 3:  # LoRASwitchLinear: (E, r, d_in), (E, d_out, r)
        if m is not None or a.shape[0] != b.shape[0]:
            raise ShapeError(
                f"{source}: {ka} {shape(a)} and {kb} {shape(b)} are not one LoRA per expert "
                "(expected (E, r, d_in) and (E, d_out, r), no magnitude)"
            )
        _check_rank(int(a.shape[1]), rank, ka, source)
        a_alpha, scale = scale_of(int(a.shape[1]))
        kind = parse_kind(name)
        return [
            make_module(
                f"{name}.experts.{e}",
                a[e],  # (r, d_in)
                b[e],  # (d_out, r)
                alpha=a_alpha,
                scale=scale,
                source=source,
                keys=(f"{ka}[{e}]", f"{kb}[{e}]"),
                kind=kind,
                nominal_rank=rank,
            )
            for e in range(int(a.shape[0]))
        ]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ShapeError(
            f"{source}: {ka} {shape(a)} and {kb} {shape(b)} do not form an mlx-lm LoRA "
            "(expected (d_in, r) and (r, d_out))"
        )
    _check_rank(int(a.shape[1]), rank, ka, source)
    if parse_kind(name) == "embed":
        # LoRAEmbedding: E' = E + s · lora_a @ lora_b, (vocab, r) @ (r, dims)
        A, B, keys = b, a, (kb, ka)
    else:
        # LoRALinear: W' = W + s · lora_b.T @ lora_a.T, (d_out, r) @ (r, d_in)
        A, B, keys = a.T, b.T, (ka, kb)
    a_alpha, scale = scale_of(int(A.shape[0]))
    magnitude = None
    n_params = None
    if m is not None:
        km, mv = m
        if mv.ndim != 1 or mv.shape[0] != B.shape[0]:
            raise ShapeError(
                f"{source}: {km} has shape {shape(mv)}; {name} has {B.shape[0]} output rows "
                f"(ΔW {B.shape[0]}×{A.shape[1]})"
            )
        magnitude = Magnitude(mv, "out", km)
        n_params = int(a.numel() + b.numel() + mv.numel())
    return [
        make_module(
            name,
            A,
            B,
            alpha=a_alpha,
            scale=scale,
            source=source,
            keys=keys if m is None else (*keys, m[0]),
            family="lora" if m is None else "dora",
            nominal_rank=rank,
            n_params=n_params,
            magnitude=magnitude,
        )
    ]


def _check_rank(r: int, rank: int, key: str, source: Path) -> None:
    if r != rank:
        raise ShapeError(
            f"{source}: {key} has rank {r} but {CONFIG_FILE} gives lora_parameters.rank={rank}"
        )


# ----------------------------------------------------------------------------- layout


def _mlx_config(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        cfg = read_json(path)
    except FormatError:
        return None
    return cfg if ("lora_parameters" in cfg or "fine_tune_type" in cfg) else None


def _claims(probe: Probe) -> bool:
    """A directory holding ``adapters.safetensors``; a safetensors file beside an mlx-lm
    ``adapter_config.json`` (one with ``lora_parameters``/``fine_tune_type``) whose keys end in
    ``.lora_a``/``.lora_b``, or that is named ``*adapters.safetensors``."""
    if probe.container == "dir":
        return (probe.path / ADAPTER_FILE).is_file()
    if probe.container != "safetensors" or _mlx_config(probe.sibling(CONFIG_FILE)) is None:
        return False
    if probe.path.name.endswith(ADAPTER_FILE):
        return True
    return any(k.endswith((".lora_a", ".lora_b")) for k in probe.keys)


def _read(probe: Probe, options: ReadOptions) -> Adapter:
    return read_mlx(probe.path, alpha=options.alpha)


LAYOUT = (
    "mlx",
    _claims,
    _read,
    "mlx-lm adapter: adapters.safetensors (<name>.lora_a / .lora_b / .m) + adapter_config.json",
)
