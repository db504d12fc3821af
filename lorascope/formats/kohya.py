"""kohya-ss/sd-scripts and LyCORIS LoRA/LoCon ``.safetensors`` files.

On disk (sd-scripts ``networks/lora.py``, ``LoRAModule``): ``<name>.lora_down.weight``
``(r, in)`` or conv ``(r, in, kh, kw)``, ``<name>.lora_up.weight`` ``(out, r)`` or
``(out, r, 1, 1)``, and ``<name>.alpha``, a scalar; ``scale = alpha / r`` where an alpha that is
0 or absent means ``alpha = r``. ``<name>`` is the module path with dots replaced by underscores
and a ``lora_unet_``/``lora_te_``/``lora_te1_``/``lora_te2_`` prefix. A 3x3 conv merges as
``conv2d(down.permute(1,0,2,3), up).permute(1,0,2,3)``, which is ``up (out, r) @ down
(r, in·kh·kw)`` reshaped, so conv factors are flattened to matrices.

LyCORIS modules that are not ``B @ A`` in stored form (LoHa ``hada_*``, LoKr ``lokr_*``, Tucker
``lora_mid``, full ``diff``, IA3 ...) are skipped with a warning. ``dora_scale`` (DoRA) warns.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lorascope.adapter import Adapter
from lorascope.errors import FormatError
from lorascope.formats._common import (
    make_module,
    missing_partner,
    read_tensors,
    scalar,
    scale_for,
    warn,
)

__all__ = ["read_kohya", "is_kohya_key"]

# Up/down suffixes: sd-scripts / LyCORIS, and the older diffusers attention-processor spellings.
_DOWN = ("lora_down.weight", "lora.down.weight", "lora_linear_layer.down.weight")
_UP = ("lora_up.weight", "lora.up.weight", "lora_linear_layer.up.weight")
_KEY_RE = re.compile(
    r"^(?P<name>.+?)\.(?P<suffix>lora_down\.weight|lora_up\.weight|lora\.down\.weight|lora\.up\.weight"
    r"|lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|alpha|dora_scale"
    r"|lora_mid\.weight|hada_\w+|lokr_\w+|diff|diff_b|w_norm|b_norm|on_input)$"
)
_NOT_BA_RE = re.compile(r"^(hada_|lokr_|lora_mid|diff|w_norm|b_norm|on_input)")


def is_kohya_key(key: str) -> bool:
    """Whether a key is one of sd-scripts' / LyCORIS' per-module tensors."""
    return any(
        s in key for s in ("lora_down", "lora_up", ".hada_", ".lokr_", "lora.down", "lora.up")
    )


def read_kohya(
    path: str | Path,
    *,
    tensors: dict[str, torch.Tensor] | None = None,
    metadata: dict | None = None,
    alpha: float | None = None,
    fan_in_fan_out: bool | None = None,
) -> Adapter:
    """Read a kohya / LyCORIS LoRA file.

    Parameters
    ----------
    path : str or Path
    tensors, metadata : optional
        The file's tensors and safetensors metadata when the caller already read them.
    alpha : float, optional
        Overrides every module's stored alpha.
    fan_in_fan_out : bool, optional
        Orientation of the base weights (default False: sd-scripts patches Linear/Conv2d).

    Returns
    -------
    Adapter
        ``A = lora_down`` ``(r, d_in)`` (conv: ``(r, in·kh·kw)``), ``B = lora_up`` ``(d_out, r)``;
        ``config`` is the file's metadata (``ss_network_dim``, ``ss_network_alpha``, ...).
    """
    path = Path(path)
    if tensors is None:
        tensors, metadata = read_tensors(path)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    others: list[str] = []
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            others.append(key)
        else:
            groups.setdefault(m["name"], {})[m["suffix"]] = (key, t)

    modules, skipped, dora = [], [], []
    for name, parts in groups.items():
        if "dora_scale" in parts:
            dora.append(name)
        down = next((parts[s] for s in _DOWN if s in parts), None)
        up = next((parts[s] for s in _UP if s in parts), None)
        if any(_NOT_BA_RE.match(s) for s in parts):
            skipped.append(name)
            continue
        if down is None and up is None:
            if "alpha" in parts or "dora_scale" in parts:
                others.extend(k for k, _ in parts.values())
            continue
        if down is None or up is None:
            sfx = next(s for s in (*_DOWN, *_UP) if s in parts)
            want = _UP[_DOWN.index(sfx)] if sfx in _DOWN else _DOWN[_UP.index(sfx)]
            raise missing_partner(path, parts[sfx][0], f"{name}.{want}")
        (kd, A), (ku, B) = down, up
        r = int(A.shape[0]) if A.ndim else 0  # 0-d: make_module rejects it
        stored = scalar(parts["alpha"][1], path, parts["alpha"][0]) if "alpha" in parts else 0.0
        mod_alpha = float(alpha) if alpha is not None else (stored if stored != 0 else float(r))
        keys = (kd, ku, parts["alpha"][0]) if "alpha" in parts else (kd, ku)
        modules.append(
            make_module(
                name,
                A,
                B,
                alpha=mod_alpha,
                scale=scale_for(mod_alpha, r),
                source=path,
                keys=keys,
                fan_in_fan_out=bool(fan_in_fan_out),
            )
        )
    if skipped:
        warn(
            path,
            f"skipping {len(skipped)} LyCORIS module(s) that are not B @ A "
            "(LoHa/LoKr/Tucker/full), "
            f"e.g. {skipped[0]}",
        )
    if dora:
        warn(path, f"DoRA (dora_scale) in {len(dora)} module(s): s·B A is not the whole update")
    if others:
        warn(path, f"ignoring {len(others)} tensor(s) that are not LoRA factors, e.g. {others[0]}")
    if not modules:
        why = (
            f"{len(skipped)} module(s) are LoHa/LoKr/other, not B @ A"
            if skipped
            else "no lora_down/lora_up"
        )
        raise FormatError(f"{path}: no LoRA modules to analyse ({why})")
    return Adapter(modules=modules, path=str(path), format="kohya", config=dict(metadata or {}))
