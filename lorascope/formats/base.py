"""Lazy reader of base (pre-trained) weights: only the tensors asked for are ever read.

Accepts a single-tensor ``.pt``; a state dict (``.pt``, ``.bin``, ``.safetensors``); a Hugging Face
model directory (``model.safetensors[.index.json]``, ``pytorch_model.bin[.index.json]``); or a
sharded checkpoint's ``*.index.json``; or a Hub name ``org/name[@rev]`` already in the local
Hugging Face cache (:mod:`lorascope.hub`, never downloaded). safetensors files are opened with
``safe_open`` (header checks) and each tensor (or block of rows) is read alone with ``os.preadv``
into memory freed when it is dropped, so a pass over a 16 GB checkpoint holds the tensors in
flight, not the shards; torch files are loaded with ``mmap=True, weights_only=True``, so only
the pages of the tensors used are touched.

Writing (for ``lorascope merge``): :func:`write_safetensors` streams a safetensors file one tensor
at a time, so a merged checkpoint never has to be held in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from lorascope.adapter import LoraModule
from lorascope.errors import FormatError, MissingModuleError, ShapeError
from lorascope.formats._common import (
    TORCH_SUFFIXES,
    check_finite,
    check_regular,
    loaded_tensor,
    one_line,
    open_safetensors,
    read_json,
    sniff,
    torch_load,
    unwrap,
)
from lorascope.hub import resolve_path

__all__ = ["BaseWeights", "Placement", "load_base", "write_safetensors", "SAFETENSORS_DTYPES"]

# Preferred files in a model directory, best first.
_DIR_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
)

# safetensors dtype names, in the order the reference serializer stores tensors (its Dtype enum,
# largest first), so that every tensor in a file we write starts aligned to its element size.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "U64": torch.uint64,
    "I64": torch.int64,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F32": torch.float32,
    "U32": torch.uint32,
    "I32": torch.int32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "U16": torch.uint16,
    "I16": torch.int16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# what BaseWeights reads itself (os.preadv); other dtypes go through safe_open
_PREAD_DTYPES = {k: SAFETENSORS_DTYPES[k] for k in ("F64", "F32", "F16", "BF16")}
_DTYPE_ORDER = {name: i for i, name in enumerate(SAFETENSORS_DTYPES)}


@dataclass(frozen=True)
class Placement:
    """Where a module's ``ΔW`` (``(d_out, d_in)``) lands in a stored base tensor.

    Attributes
    ----------
    key : str
        The tensor's name in the checkpoint.
    file : Path
        The file holding it.
    shape : tuple of int
        Its stored shape: ``(d_out, d_in)``; ``(d_in, d_out)`` when ``transposed``; a conv kernel
        ``(out, in, *kernel)`` (then ``ΔW`` is ``(out, in·prod(kernel))``, reshaped to it).
    transposed : bool
        Stored ``(d_in, D)`` (GPT-2 ``Conv1D``, ``fan_in_fan_out``): ``ΔWᵀ`` goes in.
    rows : tuple of int or None
        For a fused part, the rows ``[start, stop)`` of the ``(D, d_in)`` view that ``ΔW``
        updates (columns of the stored tensor when ``transposed``); None for the whole tensor.
    """

    key: str
    file: Path
    shape: tuple[int, ...]
    transposed: bool
    rows: tuple[int, int] | None


def _entry(path: Path) -> Path:
    """The file to read for ``path`` (a directory resolves to its weights or index file)."""
    try:
        is_dir = path.is_dir()
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {one_line(e)}") from None
    if not is_dir:
        check_regular(path)  # a FIFO or /dev/zero is refused before anything reads it
        return path
    for name in _DIR_FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", *TORCH_SUFFIXES))
    indexes = sorted(path.glob("*.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    if len(found) == 1:
        return found[0]
    listed = ", ".join(p.name for p in found[:4]) or "none"
    raise FormatError(
        f"{path}: no model weights found (model.safetensors, index.json; saw: {listed})"
    )


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False (not an exception) for a name too long or with a NUL byte."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _shard(index: Path, name: object) -> Path:
    """The shard file an index names: a relative path inside the index's directory."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise FormatError(f"{index}: weight_map names a shard {name!r}, not a file name")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise FormatError(f"{index}: weight_map names {name!r}, outside the index's directory")
    return index.parent / rel


class BaseWeights:
    """Lazy view of a base checkpoint's weights.

    Attributes
    ----------
    path : str
        What was opened (file, directory or index JSON).
    bytes_read : int
        Running total of tensor bytes actually read by :meth:`weight_for`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.bytes_read = 0
        entry = _entry(resolve_path(path))  # org/name[@rev]: the local HF cache's snapshot
        self.entry = entry  # the file read first: weights, or the index of a sharded checkpoint
        self._key_file: dict[str, Path] = {}  # tensor key -> the file holding it
        self._torch: dict[Path, object] = {}  # mmap'ed torch files, loaded on first use
        self._headers: dict[Path, tuple[int, dict, str]] = {}  # safetensors: data start, header
        self._digests: dict[Path, str | None] = {}  # torch zip files: digest of the CRCs
        self._stems: dict[str, str] | None = None
        self._single_owner: str | None = None  # the module a single-tensor .pt was used for
        if entry.name.endswith(".index.json"):
            weight_map = read_json(entry).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise FormatError(f"{entry}: index has no weight_map")
            self._key_file = {str(k): _shard(entry, v) for k, v in weight_map.items()}
        elif sniff(entry) == "safetensors":
            with open_safetensors(entry) as f:
                self._key_file = dict.fromkeys(f.keys(), entry)
        elif sniff(entry) == "torch":
            obj = self._load_torch(entry)
            keys = [""] if isinstance(obj, torch.Tensor) else list(obj)
            self._key_file = dict.fromkeys(keys, entry)
        else:
            raise FormatError(
                f"{entry}: unknown checkpoint format (expected .safetensors, .pt/.bin)"
            )
        if not self._key_file:
            raise FormatError(f"{entry}: holds no tensors")

    def __repr__(self) -> str:
        n = len(self._key_file)
        return f"BaseWeights({self.path!r}, {n} tensors, bytes_read={self.bytes_read})"

    def keys(self) -> list[str]:
        """Tensor names in the checkpoint (``[""]`` for a single-tensor ``.pt``)."""
        return list(self._key_file)

    def file_of(self, key: str) -> Path:
        """The file holding tensor ``key`` (a shard, for a sharded checkpoint)."""
        if key not in self._key_file:
            raise MissingModuleError(f"{self.path}: has no tensor {key}")
        return self._key_file[key]

    def files(self) -> list[Path]:
        """The weight files, in the order their first tensor appears (shards in index order)."""
        return list(dict.fromkeys(self._key_file.values()))

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Stored shape and dtype of tensor ``key``, from the header alone (nothing is read)."""
        file = self.file_of(key)
        if not _is_file(file):
            raise FormatError(f"{file}: shard named in the index is missing (for {key})")
        if sniff(file) == "safetensors":
            with open_safetensors(file) as f:
                try:
                    sl = f.get_slice(key)
                    shape, name = tuple(int(s) for s in sl.get_shape()), sl.get_dtype()
                except Exception as e:
                    raise FormatError(f"{file}: {key}: {one_line(e)}") from None
            if name not in SAFETENSORS_DTYPES:
                raise FormatError(f"{file}: {key} has dtype {name}, which torch cannot hold")
            return shape, SAFETENSORS_DTYPES[name]
        obj = self._load_torch(file)
        t = obj if isinstance(obj, torch.Tensor) else obj.get(key)
        if t is None:
            raise FormatError(f"{file}: has no tensor {key} (the index says it does)")
        return tuple(int(s) for s in t.shape), t.dtype

    def metadata(self, file: Path) -> dict[str, str]:
        """The ``__metadata__`` of a safetensors weight file (``{}`` for a torch file)."""
        if sniff(file) != "safetensors":
            return {}
        with open_safetensors(file) as f:
            return dict(f.metadata() or {})

    def tensor(self, key: str, *, check: bool = True) -> torch.Tensor:
        """Tensor ``key`` whole, exactly as stored (dtype and orientation), counted in
        :attr:`bytes_read`; NaN/Inf raise :class:`NonFiniteError` unless ``check`` is False."""
        self.file_of(key)
        return self._read(key, None, check=check)

    # ------------------------------------------------------------------ reading

    def _load_torch(self, file: Path):
        if file not in self._torch:
            obj = torch_load(file, mmap=True)
            if isinstance(obj, dict):
                obj = {
                    str(k): loaded_tensor(v, file, str(k))
                    for k, v in unwrap(obj).items()
                    if isinstance(v, torch.Tensor)
                }
            elif isinstance(obj, torch.Tensor):
                obj = loaded_tensor(obj, file, "<tensor>")
            else:
                raise FormatError(f"{file}: holds a {type(obj).__name__}, not tensors")
            self._torch[file] = obj
        return self._torch[file]

    def _shape(self, key: str) -> tuple[int, ...]:
        file = self._key_file[key]
        if not _is_file(file):
            raise FormatError(f"{file}: shard named in the index is missing (for {key})")
        if sniff(file) == "safetensors":
            with open_safetensors(file) as f:
                try:
                    return tuple(int(s) for s in f.get_slice(key).get_shape())
                except Exception as e:
                    raise FormatError(f"{file}: {key}: {one_line(e)}") from None
        obj = self._load_torch(file)
        t = obj if isinstance(obj, torch.Tensor) else obj.get(key)
        if t is None:
            raise FormatError(f"{file}: has no tensor {key} (the index says it does)")
        return tuple(int(s) for s in t.shape)

    def _read(self, key: str, index: tuple[slice, ...] | None, check: bool = True) -> torch.Tensor:
        """Read tensor ``key`` (or ``key[index]``), counting the bytes."""
        file = self._key_file[key]
        try:
            if sniff(file) == "safetensors":
                t = self._pread(file, key, index)
                if t is None:  # a dtype or layout _pread does not cover: let safetensors copy it
                    with open_safetensors(file) as f:
                        t = f.get_tensor(key) if index is None else f.get_slice(key)[index]
            else:
                obj = self._load_torch(file)
                t = obj if isinstance(obj, torch.Tensor) else obj[key]
                t = t if index is None else t[index]
                t = t.clone()  # touch only these pages of the mmap
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise FormatError(f"{file}: cannot read {key}: {one_line(e)}") from None
        self.bytes_read += t.numel() * t.element_size()
        if check and not _surely_finite(t):
            check_finite(t, file, key)  # the full check, and its one-line error
        return t

    def _header(self, file: Path) -> tuple[int, dict, str]:
        """``(data start, header, header digest)`` of a safetensors file, parsed once (after
        ``safe_open`` has checked the header against the file's size)."""
        if file not in self._headers:
            with open_safetensors(file):
                pass
            with open(file, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                raw = fh.read(n)
            digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
            self._headers[file] = (8 + n, json.loads(raw), digest)
        return self._headers[file]

    def _pread(self, file: Path, key: str, index: tuple[slice, ...] | None) -> torch.Tensor | None:
        """Tensor ``key`` of a safetensors file (or a block of its rows, ``index = (rows,)``)
        read with ``os.preadv`` into memory this process owns.

        Nothing stays mapped: the tensor's pages are freed when the caller drops it, so a pass
        over a 16 GB checkpoint holds the tensors in flight, not the shards (a map of each shard
        kept every page it had touched resident: issue 15). Other slices read the tensor whole
        and copy the slice out. None for a dtype this does not read (safetensors copies it).
        """
        start, header, _ = self._header(file)
        info = header.get(key)
        dtype = _PREAD_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
        if dtype is None:
            return None
        shape = tuple(int(x) for x in info.get("shape", ()))
        begin, end = (int(x) for x in info.get("data_offsets", (0, 0)))
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize or not shape:
            return None
        rows = None
        if index is not None and len(index) == 1 and index[0].step in (None, 1):
            rows = index[0].indices(shape[0])[:2]
            rows = (rows[0], max(rows))
        per_row = count // shape[0] * dtype.itemsize if shape[0] else 0
        lo, hi = (0, end - begin) if rows is None else (rows[0] * per_row, rows[1] * per_row)
        t = torch.empty(((hi - lo) // max(1, per_row), *shape[1:]), dtype=dtype)
        if hi > lo:
            buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            fd = os.open(file, os.O_RDONLY)
            try:
                done = 0
                while done < hi - lo:
                    got = os.preadv(fd, [buf[done:]], start + begin + lo + done)
                    if got <= 0:
                        raise FormatError(
                            f"{file}: {key} ends {hi - lo - done} bytes before its data does "
                            "(a truncated file?)"
                        )
                    done += got
            finally:
                os.close(fd)
        if index is not None and rows is None:
            t = t[index].contiguous()  # e.g. the columns of a fused Conv1D part
        return t

    def fingerprint(self, module: LoraModule) -> str | None:
        """A cheap identity of the stored weight ``module`` adapts, for content-keyed caches
        (:class:`lorascope.cache.SpectralCache`): the digest of the safetensors header (every
        name, dtype, shape and offset of the file) or of a torch zip file's CRC-32 directory,
        with the tensor's name, shape, orientation and slice. None for a legacy (non-zip) torch
        file: the cache then hashes the tensor itself. Nothing but headers is read."""
        p = self.locate(module)
        if sniff(p.file) == "safetensors":
            digest = self._header(p.file)[2]
        else:
            if p.file not in self._digests:
                self._digests[p.file] = _zip_digest(p.file)
            digest = self._digests[p.file]
            if digest is None:
                return None
        return f"{digest}|{p.key}|{p.shape}|{p.transposed}|{p.rows}"

    # ------------------------------------------------------------------ matching

    def _find_key(self, module: LoraModule) -> str:
        if len(self._key_file) == 1 and "" in self._key_file:
            # A single-tensor .pt is the base of exactly one module (its fused parts included):
            # never silently reuse W_q as the base of W_v.
            if self._single_owner not in (None, module.name):
                raise MissingModuleError(
                    f"{self.path}: holds one tensor, the base of {self._single_owner}; it cannot "
                    f"also be the base of {module.name} (select one module with --layer/--module)"
                )
            self._single_owner = module.name
            return ""
        name = module.name
        if self._stems is None:
            self._stems = {}
            for key in self._key_file:
                if key.endswith(".weight"):
                    stem = key[: -len(".weight")].removesuffix(".base_layer")
                    self._stems.setdefault(stem, key)
        if name in self._stems:
            return self._stems[name]
        for sep, norm in ((".", lambda s: s), ("_", lambda s: s.replace(".", "_"))):
            target = norm(name)
            hits = []
            for stem, key in self._stems.items():
                s = norm(stem)
                if s == target or s.endswith(sep + target) or target.endswith(sep + s):
                    hits.append((min(len(s), len(target)), key))
            if hits:
                best = max(h[0] for h in hits)
                keys = sorted({k for n, k in hits if n == best})
                if len(keys) > 1:
                    raise MissingModuleError(
                        f"{self.path}: {name} matches several weights ({', '.join(keys[:3])})"
                    )
                return keys[0]
        raise MissingModuleError(
            f"{self.path}: no weight for module {name} ({len(self._stems)} weights)"
        )

    def locate(self, module: LoraModule) -> Placement:
        """Which stored tensor ``module`` adapts, and how ``ΔW`` sits in it; nothing is read.

        Name matching and orientation are those of :meth:`weight_for` (which reads what this
        finds); the stored shape is cross-checked against ``module.shape`` either way round.

        Raises
        ------
        MissingModuleError
            No (or more than one) matching weight.
        ShapeError
            The stored shape fits neither orientation (or not the declared one).
        """
        key = self._find_key(module)
        file = self._key_file[key]
        where = f"{file}: {key or '<tensor>'}"
        stored = self._shape(key)
        if len(stored) > 2:  # conv kernel (out, in, kh, kw) <-> ΔW (out, in*kh*kw)
            flat = (stored[0], int(torch.Size(stored[1:]).numel()))
            if module.rows is None and flat == module.shape:
                return Placement(key, file, stored, transposed=False, rows=None)
            raise ShapeError(f"{where} has shape {stored}; {module.key} needs {module.shape}")
        if len(stored) != 2:
            raise ShapeError(
                f"{where} has shape {stored}, not a matrix; {module.key} needs {module.shape}"
            )
        d_out, d_in = module.shape

        def fits(s: tuple[int, int]) -> bool:  # s is a candidate (out, in) view
            if module.rows is not None:
                return (
                    s[1] == d_in
                    and s[0] >= module.rows[1]
                    and module.rows[1] - module.rows[0] == d_out
                )
            return s == (d_out, d_in)

        as_linear, as_conv1d = fits(stored), fits((stored[1], stored[0]))
        ffo = module.fan_in_fan_out
        if ffo is None:
            if not (as_linear or as_conv1d):
                raise ShapeError(
                    f"{where} has shape {stored}; {module.key} needs {module.shape} "
                    "(either way round)"
                )
            transposed = as_conv1d and not as_linear
        else:
            transposed = ffo
            if not (as_conv1d if ffo else as_linear):
                raise ShapeError(
                    f"{where} has shape {stored} but {module.key} (fan_in_fan_out={ffo}) needs "
                    f"{(d_in, d_out) if ffo else (d_out, d_in)}; "
                    f"pass fan_in_fan_out={not ffo} if the file is wrong"
                )
        return Placement(key, file, stored, transposed=transposed, rows=module.rows)

    def input_sizes(self) -> _InputSizes:
        """A lazy mapping ``module name -> d_in`` (``.get(name)``) of the weights a module name
        matches (as :meth:`weight_for` matches them): a Linear's ``shape[1]``, a conv's
        ``in·kh·kw``; for readers of layouts that do not record layer sizes (PEFT VeRA)."""
        return _InputSizes(self)

    def weight_for(self, module: LoraModule) -> torch.Tensor:
        """The base weight ``W`` that ``module`` adapts, read alone, in ``nn.Linear`` orientation.

        Parameters
        ----------
        module : LoraModule
            Matched by name: ``name.weight``, ``name.base_layer.weight``, or a unique suffix match
            in either direction, dotted or kohya-underscored.

        Returns
        -------
        torch.Tensor
            ``(module.d_out, module.d_in)``, dtype as stored: for a fused part only its
            ``module.rows``; transposed when ``module.fan_in_fan_out`` is True; when it is None,
            the orientation whose shape fits (a square weight is taken as stored). A conv kernel
            ``(out, in, kh, kw)`` comes back as ``(out, in·kh·kw)``.

        Raises
        ------
        MissingModuleError
            No (or more than one) matching weight.
        ShapeError
            The stored shape fits neither orientation (or not the declared one).
        NonFiniteError
            NaN/Inf in the weight.
        """
        p = self.locate(module)
        if len(p.shape) > 2:  # conv kernel: read whole, flatten to (out, in*kh*kw)
            return self._read(p.key, None).reshape(module.shape)
        rows = slice(*p.rows) if p.rows is not None else None
        if p.transposed:  # stored (d_in, D): slice columns, then .T -> (d_out, d_in)
            return self._read(p.key, None if rows is None else (slice(None), rows)).T
        return self._read(p.key, None if rows is None else (rows,))


def _surely_finite(t: torch.Tensor) -> bool:
    """True when ``t``'s smallest and largest entries are finite (so all are: NaN propagates
    through min/max): one ``aminmax`` pass, 20× faster than the float32 sum of
    :func:`check_finite` on a bf16 weight. False means "check properly", not "bad"."""
    if t.numel() == 0 or t.element_size() < 2 or not t.is_floating_point():
        return False
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _zip_digest(file: Path) -> str | None:
    """Digest of a zip file's directory (names, sizes, CRC-32s): a torch file's content
    identity, from its last few kilobytes; None for a file that is not a zip."""
    try:
        with zipfile.ZipFile(file) as z:
            listing = "|".join(f"{i.filename}:{i.file_size}:{i.CRC}" for i in z.infolist())
    except (OSError, zipfile.BadZipFile):
        return None
    return hashlib.blake2b(listing.encode(), digest_size=16).hexdigest()


class _InputSizes:
    """``name -> d_in`` of a base checkpoint's weights, read from headers on demand."""

    def __init__(self, base: BaseWeights) -> None:
        self._base = base

    def get(self, name: str, default: int | None = None) -> int | None:
        probe = LoraModule(name, torch.empty(1, 1), torch.empty(1, 1), 1.0)
        try:
            key = self._base._find_key(probe)
        except MissingModuleError:
            return default
        stored = self._base._shape(key)
        if len(stored) < 2:
            return default
        return int(torch.Size(stored[1:]).numel())


def load_base(path: str | Path) -> BaseWeights:
    """Open base weights lazily (see :class:`BaseWeights`); nothing but the index is read yet."""
    try:
        return BaseWeights(path)
    except OSError as e:  # an unreadable directory, a name too long
        raise FormatError(f"{path}: cannot read: {one_line(e)}") from None


# ----------------------------------------------------------------------------- writing


def write_safetensors(
    path: str | Path,
    specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file one tensor at a time: at most one tensor is ever in memory.

    The header (names, dtypes, shapes, byte offsets) is known up front from ``specs``; the data
    follow in the reference serializer's order (largest dtype first, then by name), each tensor
    asked for with ``produce(name)`` just before its bytes are written. For the same tensors and
    metadata the file is byte-identical to ``safetensors.torch.save_file``'s.

    Parameters
    ----------
    path : str or Path
        The file to create (an existing one is replaced: callers write into a fresh directory).
    specs : iterable of (name, shape, dtype)
    produce : callable
        ``produce(name)`` returns the tensor ``name``; its shape and dtype must match its spec.
    metadata : dict of str to str, optional
        The header's ``__metadata__`` (``{"format": "pt"}`` for ``transformers``).

    Returns
    -------
    int
        Bytes of tensor data written.

    Raises
    ------
    FormatError
        A dtype safetensors cannot store, duplicate names, or a produced tensor that disagrees
        with its spec.
    """
    path = Path(path)
    if sys.byteorder != "little":  # safetensors stores little-endian bytes
        raise FormatError(f"{path}: writing safetensors needs a little-endian machine")
    entries: list[tuple[str, tuple[int, ...], str]] = []
    for name, shape, dtype in specs:
        if dtype not in _DTYPE_NAMES:
            raise FormatError(f"{path}: {name} has dtype {dtype}, which safetensors cannot store")
        entries.append((name, tuple(int(s) for s in shape), _DTYPE_NAMES[dtype]))
    if len({e[0] for e in entries}) != len(entries):
        raise FormatError(f"{path}: duplicate tensor names")
    entries.sort(key=lambda e: (_DTYPE_ORDER[e[2]], e[0]))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, shape, dt in entries:
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=SAFETENSORS_DTYPES[dt]).itemsize
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)  # the data start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name, shape, dt in entries:
            t = produce(name)
            if tuple(t.shape) != shape or t.dtype != SAFETENSORS_DTYPES[dt]:
                raise FormatError(
                    f"{path}: {name} came out {tuple(t.shape)} {t.dtype}, "
                    f"not the {shape} {SAFETENSORS_DTYPES[dt]} of the header"
                )
            _write_bytes(f, t)
    return offset


def _write_bytes(f: BinaryIO, t: torch.Tensor) -> None:
    """The raw little-endian bytes of ``t`` (row-major), without a copy when it is contiguous."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel():
        f.write(memoryview(flat.view(torch.uint8).numpy()))
