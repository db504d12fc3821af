"""Readers and writers: every on-disk LoRA layout in, one normalized ``Adapter`` out.

=========  ==========================================================================
format     what it reads
=========  ==========================================================================
peft       a ``save_pretrained`` directory, or its ``adapter_model.safetensors``/``.bin``
loralib    a ``loralib.lora_state_dict`` saved with ``torch.save`` (``<name>.lora_A``)
kohya      sd-scripts / LyCORIS ``.safetensors`` (``lora_down``/``lora_up``/``alpha``)
hdf5       lorascope's own ``.h5`` (see :mod:`lorascope.formats.hdf5`)
plain      ``<name>.lora_A[.weight]``/``lora_B`` or bare ``lora_A``/``lora_B`` tensors
=========  ==========================================================================

Writers: :func:`save_adapter` (PEFT, kohya or ``.h5``, atomically; see
:mod:`lorascope.formats.write`), and the lower-level :func:`write_peft_adapter`,
:func:`write_kohya`, :func:`save_h5`.

Nothing here executes code from a file: safetensors, HDF5 and ``torch.load(weights_only=True)``.
Every failure is a ``LoraScopeError`` with a one-line message naming the file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from lorascope.adapter import Adapter
from lorascope.errors import FormatError
from lorascope.formats._common import read_tensors, sniff
from lorascope.formats.base import BaseWeights, load_base
from lorascope.formats.hdf5 import read_h5, save_h5
from lorascope.formats.kohya import is_kohya_key, read_kohya, write_kohya
from lorascope.formats.loralib import read_loralib
from lorascope.formats.peft import ADAPTER_FILES, CONFIG_FILE, read_peft, write_peft_adapter
from lorascope.formats.plain import read_plain
from lorascope.formats.write import (
    OUT_FORMATS,
    check_out,
    rank_pattern_config,
    save_adapter,
    save_rank_pattern,
)

__all__ = [
    "load_adapter",
    "load_base",
    "BaseWeights",
    "save_h5",
    "write_peft_adapter",
    "write_kohya",
    "save_adapter",
    "check_out",
    "rank_pattern_config",
    "save_rank_pattern",
    "FORMATS",
    "OUT_FORMATS",
]

FORMATS = ("peft", "loralib", "kohya", "hdf5", "plain")


def _detect(path: Path, keys: list[str], container: str) -> str:
    """Format of an adapter file from its key layout (and, for PEFT, its config beside it)."""
    if any(is_kohya_key(k) for k in keys):
        return "kohya"
    lora = [
        k
        for k in keys
        if ".lora_A" in k
        or ".lora_B" in k
        or ".lora_embedding_" in k
        or k in ("lora_A", "lora_B", "lora_A.weight", "lora_B.weight")
    ]
    if not lora:
        some = ", ".join(keys[:3]) or "none"
        raise FormatError(
            f"{path}: no LoRA tensors found (expected lora_A/lora_B or lora_down/lora_up keys; "
            f"saw: {some})"
        )
    named = all("." in k and not k.startswith(("lora_A", "lora_B")) for k in lora)
    loralib_style = [k for k in lora if k.endswith((".lora_A", ".lora_B"))]  # no ".weight"
    if named and not loralib_style and (path.parent / CONFIG_FILE).is_file():
        return "peft"
    if named and container == "torch" and len(loralib_style) == len(lora):
        return "loralib"
    return "plain"


def load_adapter(
    path: str | Path,
    *,
    fmt: str | None = None,
    alpha: float | None = None,
    enable_lora: Sequence[bool] | None = None,
    fan_in_fan_out: bool | None = None,
    parts: Sequence[str] | None = None,
) -> Adapter:
    """Read a LoRA adapter in any supported format and normalize it.

    Parameters
    ----------
    path : str or Path
        A PEFT directory, or an adapter file (``.safetensors``, ``.pt``/``.bin``, ``.h5``).
    fmt : {"peft", "loralib", "kohya", "hdf5", "plain"}, optional
        Skip autodetection.
    alpha : float, optional
        For loralib and plain files, which do not store it, the training ``lora_alpha``; for the
        others, an override applied to every module (``scale = alpha / r``).
    enable_lora : sequence of bool, optional
        For a loralib ``MergedLinear`` (A rows != B columns): which fused blocks carry LoRA,
        e.g. ``[True, False, True]``.
    fan_in_fan_out : bool, optional
        Override the orientation of the *base* weights (True: stored ``(d_in, d_out)``).
    parts : sequence of str, optional
        Names of the fused blocks, in order (default ``("q", "k", "v")`` for three).

    Returns
    -------
    Adapter
        Modules with ``A`` ``(r, d_in)``, ``B`` ``(d_out, r)``, ``ΔW = scale · B @ A``.

    Raises
    ------
    FormatError
        Missing, empty, truncated, garbage or unrecognized input (``UnsafeFileError`` for a
        pickle that asks to build anything but tensors).
    ShapeError
        A without B, factors that do not form ``B @ A``, a rank that disagrees with the config.
    NonFiniteError
        NaN/Inf in a factor.
    """
    path = Path(path)
    if alpha is not None and (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not (math.isfinite(alpha) and alpha > 0)
    ):
        raise FormatError(f"{path}: alpha={alpha!r} must be a positive finite number")
    if fmt is not None and fmt.lower() in ("h5", "hdf5"):
        fmt = "hdf5"
    if fmt is not None and fmt not in FORMATS:
        raise FormatError(f"{path}: unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if not path.exists():
        raise FormatError(f"{path}: no such file or directory")
    if path.is_dir():
        if fmt not in (None, "peft"):
            raise FormatError(f"{path}: is a directory; only PEFT adapters are directories")
        return read_peft(path, alpha=alpha, fan_in_fan_out=fan_in_fan_out)
    if path.stat().st_size == 0:
        raise FormatError(f"{path}: empty file")
    container = sniff(path)
    if fmt == "hdf5" or (fmt is None and container == "hdf5"):
        return read_h5(path)
    if fmt == "peft" or (
        fmt is None and path.name in ADAPTER_FILES and (path.parent / CONFIG_FILE).is_file()
    ):
        return read_peft(path, alpha=alpha, fan_in_fan_out=fan_in_fan_out)
    tensors, metadata = read_tensors(path, container if container != "unknown" else None)
    fmt = fmt or _detect(path, list(tensors), container)
    if fmt == "peft":
        return read_peft(path, alpha=alpha, fan_in_fan_out=fan_in_fan_out)
    if fmt == "kohya":
        return read_kohya(
            path, tensors=tensors, metadata=metadata, alpha=alpha, fan_in_fan_out=fan_in_fan_out
        )
    reader = read_loralib if fmt == "loralib" else read_plain
    return reader(
        path,
        tensors=tensors,
        alpha=alpha,
        enable_lora=enable_lora,
        fan_in_fan_out=fan_in_fan_out,
        parts=parts,
    )
