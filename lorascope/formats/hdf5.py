"""lorascope's own HDF5 adapter file: the normalized model, exactly, readable without lorascope.

Layout (version 2; version 1 files, without the family attributes, are read too)::

    /                       attrs: format = "lorascope", version = 2,
                                   adapter_format, adapter_path (where it was read from),
                                   config (the adapter's config as JSON text)
    /modules                group, creation order = adapter order
    /modules/<i>            one group per module, i = 0, 1, ... in adapter order (version 1
                            named them by LoraModule.key, "/" written as "%2F"; both are read:
                            the module's name is its ``name`` attribute)
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
import math
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lorascope.adapter import FAMILIES, Adapter, LoraModule, Magnitude
from lorascope.errors import FormatError, LoraScopeError
from lorascope.formats._common import (
    check_regular,
    check_tensors,
    loads_json,
    make_module,
    one_line,
)

if TYPE_CHECKING:
    import h5py

__all__ = ["save_h5", "read_h5", "H5_VERSION"]

H5_FORMAT = "lorascope"
H5_VERSION = 2


_STORED_AS_FLOAT32 = {
    getattr(torch, n): n
    for n in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
}


def _to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str | None]:
    t = t.detach().cpu()
    if t.dtype in _STORED_AS_FLOAT32:  # numpy has no bfloat16 or float8: exact in float32
        return t.float().numpy(), str(t.dtype).removeprefix("torch.")
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
    import h5py  # here, not at the top: h5py is slow to import and only .h5 files need it

    try:
        with h5py.File(path, "w") as f:
            f.attrs["format"] = H5_FORMAT
            f.attrs["version"] = H5_VERSION
            for k, v in root.items():
                f.attrs[k] = v
            group = f.create_group("modules", track_order=True)
            for i, m in enumerate(modules):
                g = group.create_group(str(i))  # names are attributes: any string fits
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
                    ds.attrs["eps"] = float(m.magnitude.eps)
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


_MISSING = object()


def _attr(obj, key: str, kind: type, path: Path, default=_MISSING):
    """Attribute ``key`` of ``obj`` as a scalar of ``kind`` (str, int, float or bool), or
    ``default`` when absent; anything else (an array, a wrong type, a non-finite number, an
    integer that does not fit) is a one-line :class:`FormatError` naming the attribute."""
    where = f"{path}: {obj.name} attribute {key!r}"
    try:
        v = obj.attrs.get(key, _MISSING)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise FormatError(f"{where}: unreadable: {one_line(e)}") from None
    if v is _MISSING:
        if default is _MISSING:
            raise FormatError(f"{where}: missing")
        return default
    if isinstance(v, np.ndarray):
        if v.ndim != 0:
            raise FormatError(f"{where}: an array of shape {v.shape}, expected a scalar")
        v = v[()]
    if isinstance(v, bytes):
        try:
            v = v.decode()
        except UnicodeDecodeError:
            raise FormatError(f"{where}: not valid UTF-8") from None
    if isinstance(v, np.generic):
        v = v.item()
    if kind is str and isinstance(v, str):
        return v
    if kind is bool and isinstance(v, bool):
        return v
    if kind in (int, float) and isinstance(v, (int, float)) and not isinstance(v, bool):
        if not math.isfinite(v):
            raise FormatError(f"{where}: {v} is not finite")
        if kind is int:
            if v != int(v) or abs(v) >= 2**62:
                raise FormatError(f"{where}: {v!r} is not an integer in range")
            return int(v)
        return float(v)
    raise FormatError(f"{where}: {v!r} is not a {kind.__name__}")


def _tensor(g: h5py.Group, label: str, path: Path) -> torch.Tensor:
    """Dataset ``label`` of ``g``: a float vector or matrix whose bytes the file really holds
    (a dataset declared multi-TB and never written is refused before anything is allocated)."""
    import h5py

    ds = g.get(label)
    if not isinstance(ds, h5py.Dataset):
        raise FormatError(f"{path}: {g.name} has no dataset {label}")
    where = f"{path}: {ds.name}"
    if ds.ndim not in (1, 2) or ds.dtype.kind != "f" or ds.dtype.itemsize not in (2, 4, 8):
        raise FormatError(f"{where}: {ds.dtype} {ds.shape}, expected a float vector or matrix")
    try:
        stored = ds.id.get_storage_size()
    except (OSError, RuntimeError, ValueError) as e:
        raise FormatError(f"{where}: unreadable: {one_line(e)}") from None
    slack = 64 if ds.compression else 1  # a compressed dataset may hold more than it stores
    if ds.nbytes > max(stored, 0) * slack or ds.nbytes > path.stat().st_size * slack:
        raise FormatError(
            f"{where}: declares {ds.nbytes} bytes ({ds.shape}) but the file stores {stored}"
        )
    t = torch.from_numpy(np.asarray(ds[()]))
    name = _attr(ds, "dtype", str, path, None)
    if name is None:
        return t
    if name not in _STORED_AS_FLOAT32.values():
        raise FormatError(f"{where}: attribute dtype={name!r} is not one lorascope writes")
    return t.to(getattr(torch, name))


def read_h5(path: str | Path) -> Adapter:
    """Read a file written by :func:`save_h5`.

    Returns
    -------
    Adapter
        The modules as saved (``A`` ``(r, d_in)``, ``B`` ``(d_out, r)``, scale, part, rows, ...),
        validated like every other reader's; ``format`` is ``"hdf5"``.

    Raises
    ------
    FormatError
        Not a lorascope file, or any attribute or dataset that is not what the layout says
        (arrays where scalars belong, non-finite numbers, undeclared families, datasets larger
        than the bytes the file holds).
    """
    import h5py  # here, not at the top: h5py is slow to import and only .h5 files need it

    path = Path(path)
    check_regular(path)
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError, RuntimeError) as e:
        raise FormatError(f"{path}: not a readable HDF5 file: {one_line(e)}") from None
    try:
        with f:
            return _read(f, path)
    except LoraScopeError:
        raise
    except (OSError, KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        raise FormatError(f"{path}: damaged lorascope HDF5 file: {one_line(e)}") from None


def _read(f: h5py.File, path: Path) -> Adapter:
    import h5py

    if _attr(f, "format", str, path, None) != H5_FORMAT:
        raise FormatError(f"{path}: HDF5 file is not a lorascope adapter (no format='lorascope')")
    version = _attr(f, "version", int, path, None)
    if version is None or not 1 <= version <= H5_VERSION:
        raise FormatError(
            f"{path}: lorascope HDF5 version {version!r}; this lorascope reads 1-{H5_VERSION}"
        )
    group = f.get("modules")
    if not isinstance(group, h5py.Group) or len(group) == 0:
        raise FormatError(f"{path}: no modules in this lorascope HDF5 file")
    text = _attr(f, "config", str, path, "{}")
    config = loads_json(text, f"{path}: the config attribute")
    if not isinstance(config, dict):
        raise FormatError(f"{path}: the config attribute is a {type(config).__name__}, not a dict")
    modules = [_module(group[label], label, path) for label in group]
    return Adapter(modules=modules, path=str(path), format="hdf5", config=config)


def _module(g: h5py.Group, label: str, path: Path) -> LoraModule:
    import h5py

    if not isinstance(g, h5py.Group):
        raise FormatError(f"{path}: /modules/{label} is not a group")
    A, B = _tensor(g, "A", path), _tensor(g, "B", path)
    family = _attr(g, "family", str, path, "lora")
    if family not in FAMILIES:
        raise FormatError(f"{path}: {g.name} has unknown family {family!r}")
    magnitude = None
    if "m" in g:
        m_t = _tensor(g, "m", path)
        check_tensors({f"{g.name}/m": m_t}, path)
        axis = _attr(g["m"], "axis", str, path, "out")
        if axis not in ("out", "in"):
            raise FormatError(f"{path}: {g.name}/m has axis {axis!r} (expected out or in)")
        key = _attr(g["m"], "key", str, path, f"{g.name}/m")
        eps = _attr(g["m"], "eps", float, path, 0.0)
        magnitude = Magnitude(m_t.reshape(-1), axis, key, eps)
    update = _attr(g, "update", str, path, "full")
    if update != ("full" if magnitude is None else "dora-direction"):
        raise FormatError(f"{path}: {g.name} has update {update!r}; save the module as read")
    rows = g.attrs.get("rows")
    if rows is not None:
        rows = np.asarray(rows)
        if rows.shape != (2,) or rows.dtype.kind not in "iu" or not 0 <= rows[0] < rows[1]:
            raise FormatError(f"{path}: {g.name} attribute 'rows' is {rows!r}, not [start, stop)")
        rows = (int(rows[0]), int(rows[1]))
    alpha = _attr(g, "alpha", float, path, None)
    if alpha is not None and alpha <= 0:
        raise FormatError(f"{path}: {g.name} attribute 'alpha' is {alpha}, not positive")
    m = make_module(
        _attr(g, "name", str, path, label),
        A,
        B,
        alpha=alpha,
        scale=_attr(g, "scale", float, path),
        source=path,
        keys=(f"{g.name}/A", f"{g.name}/B"),
        part=_attr(g, "part", str, path, None),
        rows=rows,
        fan_in_fan_out=_attr(g, "fan_in_fan_out", bool, path, None),
        kind=_attr(g, "kind", str, path, None),
        family=family,
        nominal_rank=_attr(g, "nominal_rank", int, path, None),
        n_params=_attr(g, "n_params", int, path, None),
        magnitude=magnitude,
    )
    return replace(m, layer=_attr(g, "layer", int, path, None))


LAYOUT = (
    "hdf5",
    lambda probe: probe.container == "hdf5",
    lambda probe, options: read_h5(probe.path),
    "lorascope's own .h5: the normalized modules, exactly",
)
