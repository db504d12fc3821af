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

:func:`write_kohya` writes the same layout back (``lorascope resize`` of a kohya file).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorascope.adapter import Adapter, LoraModule
from lorascope.errors import FormatError, ShapeError
from lorascope.formats._common import (
    Probe,
    ReadOptions,
    check_finite,
    make_module,
    missing_partner,
    one_line,
    read_tensors,
    scalar,
    scale_for,
    shape,
    warn,
)

__all__ = ["read_kohya", "write_kohya", "is_kohya_key"]

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


# ----------------------------------------------------------------------------- writer

# Metadata that hashes the old tensors (sd-scripts' sshs_model_hash / sshs_legacy_hash): stale.
_STALE_METADATA = ("sshs_model_hash", "sshs_legacy_hash")


def _kohya_alpha(m: LoraModule) -> float:
    """The alpha with ``alpha / r = m.scale`` (``m.alpha`` itself when it gives that scale)."""
    if m.alpha is not None and abs(m.alpha / m.rank - m.scale) <= 1e-12 * abs(m.scale):
        return float(m.alpha)
    return float(m.scale) * m.rank


def _alpha_tensor(alpha: float, like: torch.Tensor | None) -> torch.Tensor:
    """A 0-d tensor holding ``alpha`` exactly: the template's dtype, else float32, else float64
    (so that ``alpha / r`` reads back as the scale that was written)."""
    for dtype in ((like.dtype,) if like is not None else ()) + (torch.float32, torch.float64):
        if dtype.is_floating_point:
            t = torch.tensor(alpha, dtype=dtype)
            if float(t) == alpha:
                return t
    return torch.tensor(alpha, dtype=torch.float64)


def _uniform(values: list[float]) -> str | None:
    """sd-scripts' text for one dim/alpha shared by ``values``, ``"Dynamic"`` when they differ
    (as its ``resize_lora.py`` writes), ``None`` when there are none."""
    if not values:
        return None
    if len(set(values)) > 1:
        return "Dynamic"
    v = values[0]
    return str(int(v)) if float(v).is_integer() else str(float(v))


def _metadata(
    metadata: dict[str, str], linear: list[LoraModule], conv: list[LoraModule]
) -> dict[str, str]:
    """The input's metadata with ``ss_network_dim``/``ss_network_alpha`` (linear and 1x1 conv
    modules) and ``conv_dim``/``conv_alpha`` in ``ss_network_args`` (3x3 conv modules) rewritten
    where present, and the stale tensor hashes dropped."""
    meta = {k: str(v) for k, v in metadata.items() if k not in _STALE_METADATA}
    dim, alpha = _uniform([m.rank for m in linear]), _uniform([_kohya_alpha(m) for m in linear])
    if "ss_network_dim" in meta and dim is not None:
        meta["ss_network_dim"] = dim
    if "ss_network_alpha" in meta and alpha is not None:
        meta["ss_network_alpha"] = alpha
    try:
        args = json.loads(meta.get("ss_network_args", ""))
    except json.JSONDecodeError:
        args = None
    if isinstance(args, dict) and conv:
        if "conv_dim" in args:
            args["conv_dim"] = _uniform([m.rank for m in conv])
        if "conv_alpha" in args:
            args["conv_alpha"] = _uniform([_kohya_alpha(m) for m in conv])
        meta["ss_network_args"] = json.dumps(args)
    return meta


def write_kohya(
    modules: Iterable[LoraModule],
    path: str | Path,
    *,
    template: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write modules as an sd-scripts LoRA ``.safetensors`` file (what :func:`read_kohya` reads).

    Per module ``<name>`` (a kohya name such as ``lora_unet_..._to_q``, no dots)::

        <name>.lora_down.weight   (k, d_in)  or conv (k, in, kh, kw)
        <name>.lora_up.weight     (d_out, k) or conv (d_out, k, 1, 1)
        <name>.alpha              0-d, alpha = scale·k, so sd-scripts' alpha / k is the scale

    and sd-scripts merges ``ΔW = up @ down · alpha / k`` (conv: the same product on the
    flattened kernel, ``networks/lora.py``), which is ``module.delta()``.

    Parameters
    ----------
    modules : iterable of LoraModule
        ``A`` ``(k, d_in)`` (conv: ``(k, in·kh·kw)``), ``B`` ``(d_out, k)``, in their dtypes.
    path : str or Path
        The file to write (replaced if it exists: callers write to a fresh path).
    template : dict of str to torch.Tensor, optional
        The tensors of the kohya file the modules came from. Its key spellings are kept
        (``lora_down.weight`` or the older ``lora.down.weight``), conv factors get its stored
        kernel shapes back, and its tensors of modules not written (LyCORIS LoHa/LoKr, ...) are
        copied unchanged. Without one, every module is written as a Linear pair.
    metadata : dict of str to str, optional
        The input's safetensors metadata: kept, with ``ss_network_dim``/``ss_network_alpha``
        (and ``conv_dim``/``conv_alpha`` in ``ss_network_args``) set to the new rank and alpha,
        or ``"Dynamic"`` when modules differ, as sd-scripts' ``resize_lora.py`` does; the
        ``sshs_*`` hashes of the old tensors are dropped.

    Raises
    ------
    FormatError
        A part of a fused projection, a module name with dots that is not from a kohya file, or
        an unwritable path. ``ShapeError`` when a template kernel does not fit the factors;
        ``NonFiniteError`` for NaN/Inf.
    """
    path = Path(path)
    template = template or {}
    tensors: dict[str, torch.Tensor] = {}
    written: set[str] = set()
    linear: list[LoraModule] = []
    conv: list[LoraModule] = []
    for m in modules:
        if m.part is not None:
            raise FormatError(
                f"{m.tensor_name()}: {m.key} is a part of a fused projection; kohya files hold "
                "whole modules (write a .h5 file instead)"
            )
        kd, ku = _factor_keys(m, path)
        A, B = m.A.detach().to("cpu"), m.B.detach().to("cpu")  # (k, d_in), (d_out, k)
        stored = template.get(kd)
        if stored is not None and stored.ndim == 4:  # conv (r, in, kh, kw) as the file had it
            kernel = tuple(int(s) for s in stored.shape[1:])
            if kernel[0] * kernel[1] * kernel[2] != m.d_in:
                raise ShapeError(
                    f"{path}: {kd}: the template's kernel {shape(stored)} does not fit "
                    f"factors of {m.d_in} inputs"
                )
            A = A.reshape(m.rank, *kernel)  # (k, in·kh·kw) -> (k, in, kh, kw)
            B = B.reshape(m.d_out, m.rank, 1, 1)  # (out, k) -> (out, k, 1, 1)
        is_conv = stored is not None and stored.ndim == 4 and tuple(stored.shape[2:]) != (1, 1)
        (conv if is_conv else linear).append(m)  # sd-scripts: conv_dim for kernels, else dim
        for key, t in ((kd, A), (ku, B)):
            check_finite(t, path, key)
            tensors[key] = t.contiguous()
        alpha_key = f"{m.name}.alpha"
        tensors[alpha_key] = _alpha_tensor(_kohya_alpha(m), template.get(alpha_key))
        written.add(m.name)
    if not written:
        raise FormatError(f"{path}: no modules to write")
    for key, t in template.items():  # modules lorascope does not model are copied as they were
        match = _KEY_RE.match(key)
        if key not in tensors and not (match and match["name"] in written):
            tensors[key] = t
    try:
        save_file(tensors, str(path), metadata=_metadata(dict(metadata or {}), linear, conv))
    except (OSError, TypeError, ValueError, RuntimeError) as e:
        raise FormatError(f"{path}: cannot write the kohya file: {one_line(e)}") from None


def _factor_keys(m: LoraModule, path: Path) -> tuple[str, str]:
    """The down/up keys of ``m``: the spellings of the file it came from, or sd-scripts' own."""
    if len(m.keys) >= 2:
        kd, ku = m.keys[0], m.keys[1]
        md, mu = _KEY_RE.match(kd), _KEY_RE.match(ku)
        if (
            md is not None
            and mu is not None
            and md["name"] == mu["name"] == m.name
            and md["suffix"] in _DOWN
            and mu["suffix"] == _UP[_DOWN.index(md["suffix"])]
        ):
            return kd, ku
    if "." in m.name:
        raise FormatError(
            f"{m.tensor_name()}: {m.name} is not a kohya module name (kohya names have no dots, "
            "e.g. lora_unet_..._to_q); write PEFT or a .h5 file instead"
        )
    return f"{m.name}.lora_down.weight", f"{m.name}.lora_up.weight"


# ----------------------------------------------------------------------------- layout


def _claims(probe: Probe) -> bool:
    return probe.container in ("safetensors", "torch", "unknown") and any(
        is_kohya_key(k) for k in probe.keys
    )


def _read(probe: Probe, options: ReadOptions) -> Adapter:
    tensors, metadata = probe.tensors()
    return read_kohya(
        probe.path,
        tensors=tensors,
        metadata=metadata,
        alpha=options.alpha,
        fan_in_fan_out=options.fan_in_fan_out,
    )


LAYOUT = ("kohya", _claims, _read, "sd-scripts / LyCORIS: lora_down/lora_up/alpha, hada_*, lokr_*")
