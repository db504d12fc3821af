"""lorascope's own HDF5 adapter file: the normalized model, exactly, readable without lorascope.

Layout (version 2; version 1 files, without the family attributes, are read too)::

    /                       attrs: format = "lorascope", version = 2,
                                   adapter_format, adapter_path (where it was read from),
                                   config (the adapter's config as JSON text)
    /modules                group, creation order = adapter order
    /modules/<key>          one group per module; <key> is LoraModule.key ("name" or "name[q]"),
                            with "/" written as "%2F"
        A                   dataset (r, d_in)   dtype as in memory (bfloat16 is stored as
        B                   dataset (d_out, r)  float32 with attr dtype = "bfloat16")
        m                   dataset (DoRA only): the magnitude vector, attrs axis ("out"/"in"), key
        attrs: name, scale, kind, origin_source, origin_keys, family, update, and when set:
               alpha, part, rows (int64[2]: [start, stop) in the fused weight),
               fan_in_fan_out (bool), layer (int), nominal_rank (int), n_params (int)

``ΔW = scale · B @ A`` of shape ``(d_out, d_in)``, in ``nn.Linear`` orientation: the exact
factored form of the module's family (DoRA: before the magnitude rescaling).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import torch

from lorascope.adapter import FAMILIES, Adapter, LoraModule, Magnitude
from lorascope.errors import FormatError
from lorascope.formats._common import check_tensors, make_module, one_line

__all__ = ["save_h5", "read_h5", "H5_VERSION"]

H5_FORMAT = "lorascope"
H5_VERSION = 2


def _to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str | None]:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        return t.float().numpy(), "bfloat16"
    return t.contiguous().numpy(), None


def save_h5(adapter_or_modules: Adapter | Iterable[LoraModule], path: str | Path) -> None:
    """Write an adapter (or any modules) in the lorascope HDF5 layout (see the module docstring).

    Parameters
    ----------
    adapter_or_modules : Adapter or iterable of LoraModule
        Each module's ``A`` ``(r, d_in)`` and ``B`` ``(d_out, r)`` are stored as they are.
    path : str or Path
        Overwritten if it exists.
    """
    path = Path(path)
    if isinstance(adapter_or_modules, Adapter):
        modules = list(adapter_or_modules.modules)
        root = {
            "adapter_format": adapter_or_modules.format,
            "adapter_path": adapter_or_modules.path,
            "config": json.dumps(adapter_or_modules.config, default=str, sort_keys=True),
        }
    else:
        modules = list(adapter_or_modules)
        root = {"adapter_format": "", "adapter_path": "", "config": "{}"}
    keys = [m.key for m in modules]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise FormatError(f"{path}: two modules share the key {dup!r}")
    try:
        with h5py.File(path, "w") as f:
            f.attrs["format"] = H5_FORMAT
            f.attrs["version"] = H5_VERSION
            for k, v in root.items():
                f.attrs[k] = v
            group = f.create_group("modules", track_order=True)
            for m in modules:
                g = group.create_group(m.key.replace("/", "%2F"))
                for label, t in (("A", m.A), ("B", m.B)):
                    data, dtype = _to_numpy(t)
                    ds = g.create_dataset(label, data=data)
                    if dtype:
                        ds.attrs["dtype"] = dtype
                g.attrs["name"] = m.name
                g.attrs["scale"] = float(m.scale)
                g.attrs["kind"] = m.kind
                g.attrs["origin_source"] = m.source
                g.attrs["origin_keys"] = json.dumps(list(m.keys))
                g.attrs["family"] = m.family
                g.attrs["update"] = m.update
                if m.magnitude is not None:
                    data, dtype = _to_numpy(m.magnitude.m)
                    ds = g.create_dataset("m", data=data)
                    ds.attrs["axis"] = m.magnitude.axis
                    ds.attrs["key"] = m.magnitude.key
                    if dtype:
                        ds.attrs["dtype"] = dtype
                optional = {
                    "alpha": m.alpha,
                    "part": m.part,
                    "fan_in_fan_out": m.fan_in_fan_out,
                    "layer": m.layer,
                    "nominal_rank": m.nominal_rank,
                    "n_params": m.n_params,
                }
                for k, v in optional.items():
                    if v is not None:
                        g.attrs[k] = v
                if m.rows is not None:
                    g.attrs["rows"] = np.asarray(m.rows, dtype=np.int64)
    except OSError as e:
        raise FormatError(f"{path}: cannot write HDF5: {one_line(e)}") from None


def _attr(g: h5py.Group, key: str, default=None):
    v = g.attrs.get(key, default)
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    return v


def _tensor(g: h5py.Group, label: str, path: Path) -> torch.Tensor:
    ds = g.get(label)
    if not isinstance(ds, h5py.Dataset):
        raise FormatError(f"{path}: {g.name} has no dataset {label}")
    t = torch.from_numpy(np.asarray(ds[()]))
    return t.to(torch.bfloat16) if _attr(ds, "dtype") == "bfloat16" else t


def read_h5(path: str | Path) -> Adapter:
    """Read a file written by :func:`save_h5`.

    Returns
    -------
    Adapter
        The modules as saved (``A`` ``(r, d_in)``, ``B`` ``(d_out, r)``, scale, part, rows, ...),
        validated like every other reader's; ``format`` is ``"hdf5"``.
    """
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise FormatError(f"{path}: not a readable HDF5 file: {one_line(e)}") from None
    with f:
        if _attr(f, "format") != H5_FORMAT:
            raise FormatError(
                f"{path}: HDF5 file is not a lorascope adapter (no format='lorascope')"
            )
        version = _attr(f, "version")
        if not isinstance(version, int) or version > H5_VERSION:
            raise FormatError(
                f"{path}: lorascope HDF5 version {version!r}; this lorascope reads 1-{H5_VERSION}"
            )
        group = f.get("modules")
        if not isinstance(group, h5py.Group) or len(group) == 0:
            raise FormatError(f"{path}: no modules in this lorascope HDF5 file")
        try:
            config = json.loads(_attr(f, "config", "{}"))
        except (TypeError, json.JSONDecodeError):
            config = {}
        try:
            modules = [_module(group[label], label, path) for label in group]
        except (OSError, KeyError, ValueError, TypeError, IndexError) as e:
            raise FormatError(f"{path}: damaged lorascope HDF5 file: {one_line(e)}") from None
    return Adapter(modules=modules, path=str(path), format="hdf5", config=config)


def _optional_int(g: h5py.Group, key: str) -> int | None:
    v = _attr(g, key)
    return None if v is None else int(v)


def _module(g: h5py.Group, label: str, path: Path) -> LoraModule:
    if "scale" not in g.attrs:
        raise FormatError(f"{path}: {g.name} has no scale attribute")
    A, B = _tensor(g, "A", path), _tensor(g, "B", path)
    rows = g.attrs.get("rows")
    ffo = _attr(g, "fan_in_fan_out")
    family = str(_attr(g, "family", "lora"))
    if family not in FAMILIES:
        raise FormatError(f"{path}: {g.name} has unknown family {family!r}")
    magnitude = None
    if "m" in g:
        m_t = _tensor(g, "m", path)
        check_tensors({f"{g.name}/m": m_t}, path)
        axis = str(_attr(g["m"], "axis", "out"))
        if axis not in ("out", "in"):
            raise FormatError(f"{path}: {g.name}/m has axis {axis!r} (expected out or in)")
        magnitude = Magnitude(m_t.reshape(-1), axis, str(_attr(g["m"], "key", f"{g.name}/m")))
    update = str(_attr(g, "update", "full"))
    if update == "dora-rank-r":
        raise FormatError(
            f"{path}: {g.name} holds a DoRA update resolved against a base; save the module as "
            "read instead"
        )
    m = make_module(
        str(_attr(g, "name", label)),
        A,
        B,
        alpha=_attr(g, "alpha"),
        scale=float(_attr(g, "scale", float("nan"))),
        source=path,
        keys=(f"{g.name}/A", f"{g.name}/B"),
        part=_attr(g, "part"),
        rows=None if rows is None else (int(rows[0]), int(rows[1])),
        fan_in_fan_out=None if ffo is None else bool(ffo),
        kind=_attr(g, "kind"),
        family=family,
        nominal_rank=_optional_int(g, "nominal_rank"),
        n_params=_optional_int(g, "n_params"),
        magnitude=magnitude,
    )
    layer = _attr(g, "layer")
    return replace(m, layer=None if layer is None else int(layer))


LAYOUT = (
    "hdf5",
    lambda probe: probe.container == "hdf5",
    lambda probe, options: read_h5(probe.path),
    "lorascope's own .h5: the normalized modules, exactly",
)
