"""microsoft/LoRA ``loralib`` state dicts (``lora_state_dict`` saved with ``torch.save``).

On disk: ``<name>.lora_A`` ``(r, d_in)`` and ``<name>.lora_B`` ``(d_out, r)`` (no ``.weight``),
possibly beside the full model weights. Neither ``r`` nor ``lora_alpha`` is stored: ``r`` comes
from the shapes, ``alpha`` from the caller, else loralib's default ``lora_alpha=1``.

``MergedLinear`` (GPT-2 ``c_attn`` with ``enable_lora=[True, False, True]``, loralib
``layers.py``) stores ``lora_A`` ``(r·g, d_in)`` and ``lora_B`` ``(d·g, r)`` with
``g = sum(enable_lora)``, ``d = out_features / len(enable_lora)``. Its ``merge_AB`` is a grouped
``conv1d`` (``groups=g``): the k-th enabled part is ``B[k·d:(k+1)·d] @ A[k·r:(k+1)·r]`` and
``zero_pad`` writes it into rows ``[i·d, (i+1)·d)`` of the fused weight, ``i`` its index in
``enable_lora``. loralib's ``Embedding`` stores ``lora_A`` ``(r, num_embeddings)``, ``lora_B``
``(embedding_dim, r)`` and merges ``(B @ A).T``; it is normalized like peft's embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lorascope.adapter import FUSED_PARTS, Adapter, LoraModule, parse_kind
from lorascope.errors import FormatError, ShapeError
from lorascope.formats._common import (
    Probe,
    ReadOptions,
    make_module,
    missing_partner,
    parse_lora_key,
    read_tensors,
    scale_for,
    shape,
    warn,
)

__all__ = ["read_loralib", "modules_from_pairs", "group_pairs", "is_pair_key"]

# (name, r) -> (alpha, scale)
AlphaRule = Callable[[str, int], tuple[float, float]]


def group_pairs(
    tensors: dict[str, torch.Tensor], stem: str
) -> tuple[dict[str, dict[str, tuple[str, torch.Tensor]]], dict[str, tuple[int, ...]]]:
    """``{name: {"A": (key, A), "B": (key, B)}}`` and ``{name: full weight shape}`` of a state dict.

    Bare ``lora_A``/``lora_B`` keys form one module named ``stem``.
    """
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    full: dict[str, tuple[int, ...]] = {}
    for key, t in tensors.items():
        parsed = parse_lora_key(key)
        if parsed is not None and parsed[1] in ("A", "B") and parsed[3] != "bias":
            groups.setdefault(parsed[0] or stem, {})[parsed[1]] = (key, t)
        elif key.endswith(".weight") and "lora_" not in key:
            full[key[: -len(".weight")]] = shape(t)
    return groups, full


def _orientation(stored: tuple[int, ...] | None, d_out: int, d_in: int) -> bool | None:
    """fan_in_fan_out from a full weight's shape: (d_out, d_in) -> False, (d_in, d_out) -> True."""
    if stored is None or len(stored) != 2 or d_out == d_in:
        return None
    if stored == (d_out, d_in):
        return False
    if stored == (d_in, d_out):
        return True
    return None


def modules_from_pairs(
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]],
    full: dict[str, tuple[int, ...]],
    *,
    source: Path,
    alpha_rule: AlphaRule,
    enable_lora: Sequence[bool] | None = None,
    parts: Sequence[str] | None = None,
    fan_in_fan_out: bool | None = None,
) -> list[LoraModule]:
    """Turn A/B pairs into modules, splitting ``MergedLinear`` pairs (A rows != B columns)."""
    modules: list[LoraModule] = []
    for name, roles in groups.items():
        if "A" not in roles or "B" not in roles:
            have, want = ("A", "B") if "A" in roles else ("B", "A")
            key = roles[have][0]
            raise missing_partner(source, key, f"lora_{want}".join(key.rsplit(f"lora_{have}", 1)))
        (ka, A), (kb, B) = roles["A"], roles["B"]
        plain_2d = A.ndim == 2 and B.ndim == 2 and B.shape[1] > 0
        if plain_2d and A.shape[0] != B.shape[1] and A.shape[0] % B.shape[1] == 0:
            modules += _split_merged(
                name,
                ka,
                A,
                kb,
                B,
                full.get(name),
                source,
                alpha_rule,
                enable_lora,
                parts,
                fan_in_fan_out,
            )
            continue
        r = int(A.shape[0]) if A.ndim else 0  # 0-d: make_module rejects it
        alpha, scale = alpha_rule(name, r)
        stored = full.get(name)
        if (
            A.ndim == 2
            and B.ndim == 2
            and parse_kind(name) == "embed"
            and stored in (None, (A.shape[1], B.shape[0]))
        ):
            # loralib Embedding: ΔW = (B @ A).T = A.T @ B.T, (num_embeddings, embedding_dim)
            modules.append(
                make_module(
                    name,
                    B.T,
                    A.T,
                    alpha=alpha,
                    scale=scale,
                    source=source,
                    keys=(kb, ka),
                    fan_in_fan_out=False,
                )
            )
            continue
        ffo = fan_in_fan_out
        if ffo is None and A.ndim == 2 and B.ndim == 2:
            ffo = _orientation(stored, int(B.shape[0]), int(A.shape[1]))
        modules.append(
            make_module(
                name,
                A,
                B,
                alpha=alpha,
                scale=scale,
                source=source,
                keys=(ka, kb),
                fan_in_fan_out=ffo,
            )
        )
    return modules


def _split_merged(
    name: str,
    ka: str,
    A: torch.Tensor,
    kb: str,
    B: torch.Tensor,
    stored: tuple[int, ...] | None,
    source: Path,
    alpha_rule: AlphaRule,
    enable_lora: Sequence[bool] | None,
    parts: Sequence[str] | None,
    fan_in_fan_out: bool | None,
) -> list[LoraModule]:
    """One module per enabled part of a loralib ``MergedLinear``."""
    if enable_lora is None:
        raise ShapeError(
            f"{source}: {ka} {shape(A)} has {A.shape[0]} rows but {kb} {shape(B)} has rank "
            f"{B.shape[1]}: if this is a loralib MergedLinear, pass enable_lora "
            "(CLI: --enable-lora q,v)"
        )
    flags = [bool(e) for e in enable_lora]
    n, g, r = len(flags), sum(flags), int(B.shape[1])
    if g == 0 or A.shape[0] != r * g or B.shape[0] % g:
        raise ShapeError(
            f"{source}: {ka} {shape(A)} and {kb} {shape(B)} do not fit enable_lora={flags} "
            f"(expected A ({r}·{g}, d_in) and B (d·{g}, {r}))"
        )
    names = list(parts) if parts is not None else (list(FUSED_PARTS) if n == 3 else None)
    if names is None or len(names) != n:
        raise FormatError(
            f"{source}: {name}: enable_lora has {n} entries; pass parts with {n} names"
        )
    d = int(B.shape[0]) // g  # rows of one part in the fused weight
    ffo = fan_in_fan_out
    if ffo is None:
        ffo = _orientation(stored, d * n, int(A.shape[1]))
    alpha, scale = alpha_rule(name, r)
    out, k = [], 0
    for i, on in enumerate(flags):
        if not on:
            continue
        A_k = A[k * r : (k + 1) * r]  # (r, d_in)
        B_k = B[k * d : (k + 1) * d]  # (d, r)
        out.append(
            make_module(
                name,
                A_k,
                B_k,
                alpha=alpha,
                scale=scale,
                source=source,
                keys=(ka, kb),
                part=names[i],
                kind=names[i],
                rows=(i * d, (i + 1) * d),
                fan_in_fan_out=ffo,
            )
        )
        k += 1
    return out


def read_loralib(
    path: str | Path,
    *,
    tensors: dict[str, torch.Tensor] | None = None,
    alpha: float | None = None,
    enable_lora: Sequence[bool] | None = None,
    fan_in_fan_out: bool | None = None,
    parts: Sequence[str] | None = None,
) -> Adapter:
    """Read a loralib state dict (``.pt``/``.bin``).

    Parameters
    ----------
    path : str or Path
    tensors : dict, optional
        The file's tensors when the caller already read them.
    alpha : float, optional
        The ``lora_alpha`` used in training; loralib does not store it. Default: loralib's
        ``lora_alpha=1`` (``scale = 1/r``), with a warning.
    enable_lora : sequence of bool, optional
        Required for ``MergedLinear`` pairs, e.g. ``[True, False, True]`` for q and v of c_attn.
    fan_in_fan_out : bool, optional
        Orientation of the base weights; default: inferred from full weights in the file, if any.
    parts : sequence of str, optional
        Names of the fused blocks in order; default ``("q", "k", "v")`` for three.

    Returns
    -------
    Adapter
        ``A`` ``(r, d_in)``, ``B`` ``(d_out, r)`` per module (per enabled part for MergedLinear).
    """
    path = Path(path)
    if tensors is None:
        tensors, _ = read_tensors(path)
    groups, full = group_pairs(tensors, path.stem)
    if not groups:
        raise FormatError(
            f"{path}: no <name>.lora_A / <name>.lora_B tensors (not a loralib state dict)"
        )
    if alpha is None:
        warn(
            path,
            "loralib does not store lora_alpha: assuming loralib's default 1 (scale 1/r); "
            "pass alpha (CLI: --alpha)",
        )
    a = 1.0 if alpha is None else float(alpha)
    modules = modules_from_pairs(
        groups,
        full,
        source=path,
        alpha_rule=lambda _n, r: (a, scale_for(a, r)),
        enable_lora=enable_lora,
        parts=parts,
        fan_in_fan_out=fan_in_fan_out,
    )
    config = {
        "alpha": a,
        "enable_lora": None if enable_lora is None else [bool(e) for e in enable_lora],
    }
    return Adapter(modules=modules, path=str(path), format="loralib", config=config)


# ----------------------------------------------------------------------------- layout


def is_pair_key(k: str) -> bool:
    """A PEFT/loralib/plain LoRA factor key (``.lora_A``, ``.lora_B``, ``.lora_embedding_*``)."""
    return (
        ".lora_A" in k
        or ".lora_B" in k
        or ".lora_embedding_" in k
        or k in ("lora_A", "lora_B", "lora_A.weight", "lora_B.weight")
    )


def _claims(probe: Probe) -> bool:
    """A torch file whose LoRA keys are all loralib's bare ``<name>.lora_A``/``.lora_B``."""
    if probe.container != "torch":
        return False
    lora = [k for k in probe.keys if is_pair_key(k)]
    named = all("." in k and not k.startswith(("lora_A", "lora_B")) for k in lora)
    return bool(lora) and named and all(k.endswith((".lora_A", ".lora_B")) for k in lora)


def _read(probe: Probe, options: ReadOptions) -> Adapter:
    return read_loralib(
        probe.path,
        tensors=probe.tensors()[0],
        alpha=options.alpha,
        enable_lora=options.enable_lora,
        fan_in_fan_out=options.fan_in_fan_out,
        parts=options.parts,
    )


LAYOUT = (
    "loralib",
    _claims,
    _read,
    "loralib lora_state_dict (torch.save): <name>.lora_A / .lora_B",
)
