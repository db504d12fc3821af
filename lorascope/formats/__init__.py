"""Readers and writers: every on-disk layout in, one normalized ``Adapter`` out.

A *layout* is how a library lays its tensors out on disk (names, orientation, where alpha
lives); a *family* is what update those tensors define (:mod:`lorascope.families`). Each layout
is one module here with its reader (and writer, where there is one) and a :class:`Layout` entry
in :data:`LAYOUTS`; :func:`load_adapter` sniffs the file, asks each layout in order whether it
claims it, and calls the first that does. Every reader normalizes to the exact factored form of
its families on load and refuses what it cannot read exactly.

==========  ================================================================================
layout      what it reads
==========  ================================================================================
hdf5        lorascope's own ``.h5`` (see :mod:`lorascope.formats.hdf5`): every family
gguf        llama.cpp GGUF LoRA adapters (``convert_lora_to_gguf.py``), dequantized
mlx         mlx-lm ``adapters.safetensors`` + ``adapter_config.json``: LoRA, DoRA, MoE experts
torchtune   torchtune's native ``adapter_model.pt`` (``...lora_a.weight``): LoRA, DoRA
diffusers   ``pytorch_lora_weights.safetensors`` (``save_lora_weights``/``save_lora_adapter``):
            component-prefixed PEFT keys, ``lora_adapter_metadata``, ``.alpha``, DoRA, and the
            old attention-processor keys
peft        a ``save_pretrained`` directory or its weights file: LoRA (rsLoRA, rank/alpha
            patterns, DoRA, ``target_parameters``), AdaLoRA, VeRA, LoHa, LoKr
kohya       sd-scripts / LyCORIS ``.safetensors``: LoRA/LoCon (Tucker), LoHa, LoKr, DoRA
loralib     a ``loralib.lora_state_dict`` saved with ``torch.save`` (``<name>.lora_A``)
plain       ``<name>.lora_A[.weight]``/``lora_B`` or bare ``lora_A``/``lora_B`` tensors
==========  ================================================================================

Writers: :func:`save_adapter` (PEFT, kohya or ``.h5``, atomically; see
:mod:`lorascope.formats.write`), and the lower-level :func:`write_peft_adapter`,
:func:`write_kohya`, :func:`save_h5`. Checkpoints: :func:`write_checkpoint` writes a base
checkpoint again, shard for shard, with some tensors replaced (``lorascope merge``; see
:mod:`lorascope.formats.merged`).

Nothing here executes code from a file: safetensors, HDF5, GGUF and
``torch.load(weights_only=True)``. Every failure is a ``LoraScopeError`` with a one-line message
naming the file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from lorascope.adapter import Adapter
from lorascope.errors import FormatError
from lorascope.formats._common import Probe, ReadOptions, one_line, warn
from lorascope.formats.base import BaseWeights, load_base
from lorascope.formats.hdf5 import save_h5
from lorascope.formats.kohya import write_kohya
from lorascope.formats.layouts import LAYOUTS, Layout, detect
from lorascope.formats.merged import write_checkpoint
from lorascope.formats.peft import write_peft_adapter
from lorascope.formats.write import (
    OUT_FORMATS,
    check_out,
    rank_pattern_config,
    save_adapter,
    save_rank_pattern,
)
from lorascope.hub import resolve_path

__all__ = [
    "load_adapter",
    "load_base",
    "BaseWeights",
    "ReadOptions",
    "Layout",
    "LAYOUTS",
    "save_h5",
    "write_peft_adapter",
    "write_kohya",
    "write_checkpoint",
    "save_adapter",
    "check_out",
    "rank_pattern_config",
    "save_rank_pattern",
    "FORMATS",
    "OUT_FORMATS",
]

FORMATS = tuple(layout.name for layout in LAYOUTS)


def load_adapter(
    path: str | Path,
    *,
    fmt: str | None = None,
    alpha: float | None = None,
    enable_lora: Sequence[bool] | None = None,
    fan_in_fan_out: bool | None = None,
    parts: Sequence[str] | None = None,
    in_features: Mapping[str, int] | None = None,
) -> Adapter:
    """Read an adapter in any supported layout and family, normalized to factored form.

    Parameters
    ----------
    path : str or Path
        A directory (PEFT, mlx-lm, diffusers, torchtune) or an adapter file (``.safetensors``,
        ``.pt``/``.bin``, ``.h5``, ``.gguf``); or a Hub name ``org/name[/sub][@rev]`` already in
        the local Hugging Face cache (:func:`lorascope.hub.resolve_path`; never downloads).
    fmt : str, optional
        Skip autodetection: one of :data:`FORMATS`.
    alpha : float, optional
        For layouts that do not store it (loralib, plain, torchtune), the training
        ``lora_alpha``; for the others, an override applied to every module
        (``scale = alpha / r``).
    enable_lora : sequence of bool, optional
        For a loralib ``MergedLinear`` (A rows != B columns): which fused blocks carry LoRA,
        e.g. ``[True, False, True]``.
    fan_in_fan_out : bool, optional
        Override the orientation of the *base* weights (True: stored ``(d_in, d_out)``).
    parts : sequence of str, optional
        Names of the fused blocks, in order (default ``("q", "k", "v")`` for three).
    in_features : mapping of str to int, optional
        Each module's input size where the file does not record it (PEFT VeRA), e.g.
        ``load_base(base).input_sizes()``.

    Returns
    -------
    Adapter
        Modules with ``A`` ``(k, d_in)``, ``B`` ``(d_out, k)``, ``ΔW = scale · B @ A`` (for DoRA
        the part before the magnitude rescaling: see :mod:`lorascope.update`).

    Raises
    ------
    FormatError
        Missing, empty, truncated, garbage or unrecognized input, or a family or key the
        layout does not know (``UnsafeFileError`` for a pickle that asks to build anything but
        tensors).
    ShapeError
        A without B, factors that do not form ``B @ A``, a rank that disagrees with the config.
    NonFiniteError
        NaN/Inf in a factor.
    """
    path = resolve_path(path)  # a local path, or org/name[@rev] from the local HF cache
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
    options = ReadOptions(
        alpha=alpha,
        enable_lora=None if enable_lora is None else tuple(bool(e) for e in enable_lora),
        fan_in_fan_out=fan_in_fan_out,
        parts=None if parts is None else tuple(parts),
        in_features=in_features,
    )
    try:
        probe = Probe.of(path)
        adapter = detect(probe, fmt).read(probe, options)
    except OSError as e:  # an unreadable directory, a name too long, a file gone mid-read
        raise FormatError(f"{path}: cannot read: {one_line(e)}") from None
    n_dora = sum(m.is_dora for m in adapter)
    if n_dora:
        warn(
            path,
            f"DoRA in {n_dora} module(s): the magnitude rescales W + s·B A, so without the base "
            "only the direction part s·B A is analysed (JSON update='dora-direction'); commands "
            "given --base use the true update",
        )
    return adapter
