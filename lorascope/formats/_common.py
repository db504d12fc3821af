"""Shared plumbing of the readers: safe file access, key parsing, and the one validation helper.

Everything that touches bytes on disk goes through here, so every reader fails the same way:
a :class:`~lorascope.errors.LoraScopeError` subclass with a one-line message naming the file and,
where there is one, the tensor. ``torch.load`` is only ever called with ``weights_only=True``.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import pickle
import pickletools
import re
import stat
import struct
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lorascope.adapter import LoraModule, Magnitude, parse_kind, parse_layer
from lorascope.errors import (
    FormatError,
    LoraScopeWarning,
    NonFiniteError,
    ShapeError,
    UnsafeFileError,
)

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
HDF5_SUFFIXES = (".h5", ".hdf5")
GGUF_SUFFIXES = (".gguf",)
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_GGUF_MAGIC = b"GGUF"
# Globals a plain tensor checkpoint may name; anything else in a refused pickle is "unsafe".
_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")

# PEFT / loralib parameter names -> role in the normalized pair.
_ROLES = {
    "lora_A": "A",
    "lora_B": "B",
    "lora_embedding_A": "emb_A",
    "lora_embedding_B": "emb_B",
    "lora_magnitude_vector": "magnitude",
}
PEFT_PREFIX = "base_model.model."
_WRAPPERS = ("model_state_dict", "state_dict", "model", "module")


def one_line(text: object, limit: int = 200) -> str:
    """First non-empty line of ``text``, shortened to ``limit`` characters."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = lines[0] if lines else type(text).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def warn(path: object, msg: str) -> None:
    """Emit a one-line :class:`LoraScopeWarning` naming ``path``."""
    warnings.warn(one_line(f"{path}: {msg}", limit=400), LoraScopeWarning, stacklevel=3)


def shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


# ----------------------------------------------------------------------------- file access


def sniff(path: Path) -> str:
    """File container: ``safetensors``, ``torch``, ``hdf5``, ``gguf`` or ``unknown`` (suffix,
    then bytes)."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in HDF5_SUFFIXES:
        return "hdf5"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    if suffix in GGUF_SUFFIXES:
        return "gguf"
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {one_line(e)}") from None
    if head.startswith(_HDF5_MAGIC[:8]):
        return "hdf5"
    if head.startswith(_GGUF_MAGIC):
        return "gguf"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def _pickle_globals_unchecked(path: Path) -> list[str]:
    """Names of the globals a pickle asks for, found by reading opcodes (nothing is executed)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(member) if member else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile, KeyError):
        return []
    found: list[str] = []
    stream = io.BytesIO(data)
    for _ in range(5):  # the legacy format is several pickles in a row
        strings: list[str] = []
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # garbage after (or instead of) a pickle: stop scanning
            break
        if stream.tell() >= len(data):
            break
    return found


def _pickle_globals(path: Path) -> list[str]:
    """Names of the globals a pickle asks for (for the refusal message only): whatever a
    damaged file does to the opcode scan, the answer is a list, possibly empty."""
    try:
        return _pickle_globals_unchecked(path)
    except Exception:  # a diagnostic: a broken scan must not mask the refusal
        return []


def torch_load(path: Path, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``, with every failure turned into a lorascope error.

    A pickle that asks for anything but tensors and plain containers is refused by torch's
    weights-only unpickler before any of it runs; that refusal becomes :class:`UnsafeFileError`.
    """
    check_regular(path)
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols is noise here
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if mmap and "mmap can only be used" in str(e):  # legacy (non-zip) format
                    return torch.load(path, map_location="cpu", weights_only=True)
                raise
    except pickle.UnpicklingError as e:
        unsafe = [
            g
            for g in _pickle_globals(path)
            if _IDENT_RE.match(g) and not g.startswith(_SAFE_GLOBAL_PREFIXES)
        ]
        named = re.search(r"GLOBAL ([\w.]+)", str(e))
        if unsafe or named:
            what = unsafe[0] if unsafe else named.group(1)
            raise UnsafeFileError(
                f"{path}: refusing to unpickle: it asks for {what} (only tensors and plain "
                "containers are loaded; convert it to safetensors)"
            ) from None
        raise FormatError(
            f"{path}: not a readable PyTorch file (corrupt or not a checkpoint)"
        ) from None
    except EOFError:
        raise FormatError(f"{path}: empty or truncated PyTorch file") from None
    except Exception as e:  # torch raises RuntimeError, KeyError, ValueError ... for bad bytes
        raise FormatError(f"{path}: not a readable PyTorch file: {one_line(e)}") from None


def open_safetensors(path: Path):
    """``safe_open(path)``, with a truncated/empty/garbage file turned into :class:`FormatError`."""
    check_regular(path)
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError, OSError
        raise FormatError(f"{path}: not a readable safetensors file: {one_line(e)}") from None


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The float tensors of a safetensors file as zero-copy views of a private memory map.

    The bytes stay in the page cache (clean, reclaimable) instead of being copied into the
    process: reading a 600 MB adapter allocates nothing, and the analyses upcast one module at a
    time, so the memory a run owns is bounded by the tensors in flight, not by the files
    (issue 5). The map is copy-on-write (``ACCESS_COPY``): nothing can write to the file. Tensors
    of other dtypes, or any file this cannot map (big-endian host, odd header), come back
    empty here and are read by ``safe_open`` instead.
    """
    if sys.byteorder != "little":
        return {}
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError, struct.error):
        return {}
    out = {}
    for key, info in header.items():
        if key == "__metadata__" or not isinstance(info, dict):
            continue
        dtype = _ST_DTYPES.get(info.get("dtype"))
        shape = tuple(info.get("shape", ()))
        begin, end = info.get("data_offsets", (0, 0))
        count = math.prod(shape)
        if dtype is None or count == 0 or end - begin != count * dtype.itemsize:
            continue
        offset = 8 + n + begin
        if offset % dtype.itemsize:  # unaligned data: let safe_open copy it
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(mm, dtype=dtype, count=count, offset=offset)
        out[key] = t.view(shape)  # (…) as stored; shares the map's pages
    return out


def _flatten_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {"": loaded_tensor(obj, path, "<tensor>")}
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    return {
        str(k): loaded_tensor(v, path, str(k))
        for k, v in unwrap(obj).items()
        if isinstance(v, torch.Tensor)
    }


def unwrap(obj: dict) -> dict:
    """The state dict inside a training checkpoint's wrapper, or ``obj`` itself.

    microsoft/LoRA's ``gpt2_ft.py`` saves ``{"model_state_dict": lora_state_dict(model)}``;
    Lightning uses ``state_dict``, DeepSpeed ``module``.
    """
    for wrapper in _WRAPPERS:
        inner = obj.get(wrapper)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return obj


def read_tensors(path: Path, container: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of a (small) adapter file, and its safetensors metadata.

    A single-tensor ``.pt`` comes back under the key ``""``.
    """
    container = container or sniff(path)
    if container == "safetensors":
        f = open_safetensors(path)  # validates the header against the file's size
        try:
            with f:
                meta = dict(f.metadata() or {})
                mapped = map_safetensors(path)
                tensors = {k: mapped[k] if k in mapped else f.get_tensor(k) for k in f.keys()}
                return tensors, meta
        except Exception as e:
            raise FormatError(f"{path}: not a readable safetensors file: {one_line(e)}") from None
    if container == "torch":
        return _flatten_state_dict(torch_load(path), path), {}
    raise FormatError(f"{path}: unknown file format (expected .safetensors, .pt/.bin, or .h5)")


@dataclass(frozen=True)
class ReadOptions:
    """What the caller says about an adapter that its file may not (one object for every reader).

    Attributes
    ----------
    alpha : float, optional
        ``lora_alpha`` for layouts that do not store it; an override for those that do.
    enable_lora : tuple of bool, optional
        loralib ``MergedLinear``: which fused blocks carry LoRA.
    fan_in_fan_out : bool, optional
        Orientation of the *base* weights (True: stored ``(d_in, d_out)``).
    parts : tuple of str, optional
        Names of a fused projection's blocks, in order.
    in_features : mapping of str to int, optional
        Each module's input size, for layouts that do not record it (PEFT VeRA slices one shared
        projection per layer); :meth:`lorascope.formats.BaseWeights.input_sizes` gives it.
    """

    alpha: float | None = None
    enable_lora: tuple[bool, ...] | None = None
    fan_in_fan_out: bool | None = None
    parts: tuple[str, ...] | None = None
    in_features: Any = None


@dataclass
class Probe:
    """What layout detection looks at: the path, its container, and (read once, on demand) the
    tensors and safetensors metadata of a single file.

    Attributes
    ----------
    path : Path
        As given: a file or a directory.
    container : str
        ``dir``, ``safetensors``, ``torch``, ``hdf5``, ``gguf`` or ``unknown``.
    """

    path: Path
    container: str
    _loaded: tuple[dict[str, torch.Tensor], dict] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, path: Path) -> Probe:
        """Check that ``path`` is an existing directory or non-empty regular file."""
        try:
            if path.is_dir():
                return cls(path, "dir")
            if not path.exists():
                raise FormatError(f"{path}: no such file or directory")
            if not path.is_file():
                raise FormatError(f"{path}: not a regular file")
            if path.stat().st_size == 0:
                raise FormatError(f"{path}: empty file")
        except OSError as e:
            raise FormatError(f"{path}: cannot read: {one_line(e)}") from None
        return cls(path, sniff(path))

    def tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The file's tensors and metadata (:func:`read_tensors`), read at most once."""
        if self._loaded is None:
            if self.container not in ("safetensors", "torch", "unknown"):
                raise FormatError(f"{self.path}: a {self.container} file holds no tensor dict")
            self._loaded = read_tensors(
                self.path, self.container if self.container != "unknown" else None
            )
        return self._loaded

    @property
    def keys(self) -> list[str]:
        return list(self.tensors()[0])

    @property
    def metadata(self) -> dict:
        return self.tensors()[1]

    def sibling(self, name: str) -> Path:
        """``name`` in the directory (or beside the file) that was given."""
        return (self.path if self.container == "dir" else self.path.parent) / name


# The scales (alpha / r, ...) a module may have: real adapters sit within a few orders of 1;
# beyond this range products with the factors leave float64 long before they mean anything.
SCALE_RANGE = (1e-30, 1e30)

# A layout's reader: (probe, options) -> Adapter; its detector: probe -> claims it or not.
Reader = Callable[[Probe, ReadOptions], Any]
Detector = Callable[[Probe], bool]


# JSON files lorascope reads (configs, index files) are small; these bound what a hostile one
# can make it allocate or recurse into.
MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 64


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, giving up (returning ``limit + 1``) past ``limit``."""
    stack, deepest = [(obj, 1)], 0
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return deepest


def loads_json(text: str | bytes, where: object) -> Any:
    """Parse JSON text from a file (a config, a metadata string, an HDF5 attribute) within the
    same bounds as :func:`read_json`: at most :data:`MAX_JSON_BYTES`, nested at most
    :data:`MAX_JSON_DEPTH` deep; anything else is a one-line :class:`FormatError` naming
    ``where``."""
    if not isinstance(text, (str, bytes)):
        raise FormatError(f"{where}: expected JSON text, got {type(text).__name__}")
    if len(text) > MAX_JSON_BYTES:
        raise FormatError(f"{where}: larger than {MAX_JSON_BYTES >> 20} MiB; not a config")
    try:
        data = json.loads(text)
    except RecursionError:
        raise FormatError(f"{where}: not valid JSON: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, the int digit limit
        raise FormatError(f"{where}: not valid JSON: {one_line(e)}") from None
    if _depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise FormatError(f"{where}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
    return data


def read_json(path: Path) -> dict:
    """A JSON object from a regular file (:func:`loads_json`'s bounds), or a one-line
    :class:`FormatError`.

    Numbers are parsed as Python does (``1e309`` becomes ``inf``, integers of more than 4300
    digits are refused); whoever reads a field checks its range (:func:`config_number` and
    friends in :mod:`lorascope.formats.peft`)."""
    check_regular(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {one_line(e)}") from None
    data = loads_json(raw, path)
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_regular(path: Path) -> None:
    """Refuse anything but an existing regular file (a FIFO, a device such as ``/dev/zero``, a
    directory, a dangling or looping link) with a one-line :class:`FormatError`."""
    try:
        st = path.stat()
    except (OSError, ValueError) as e:  # missing, a link loop, too long, a NUL byte, no access
        raise FormatError(f"{path}: cannot read: {one_line(e)}") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise FormatError(f"{path}: {what}")


def loaded_tensor(t: torch.Tensor, path: object, key: str) -> torch.Tensor:
    """A tensor from ``torch.load`` made safe to compute with: detached (an ``nn.Parameter``
    or a tensor saved with ``requires_grad`` is data here), and refused when it claims more
    elements than its storage holds (a zero-stride view that "holds" 2³¹ elements of one
    stored value would make any copy of it that large)."""
    t = t.detach()
    if t.requires_grad:  # pragma: no cover - detach always clears it
        t = t.clone()
    need = t.numel() * t.element_size()
    have = t.untyped_storage().nbytes()
    if need > have:
        raise ShapeError(
            f"{path}: {key} {shape(t)} claims {need} bytes but its storage holds {have} "
            "(an overlapping view; save the tensor itself)"
        )
    return t


# ----------------------------------------------------------------------------- patterns

# Time a whole config's pattern matching may take (PEFT keys are regexes a stranger wrote).
PATTERN_BUDGET_S = 1.0


class PatternMatcher:
    r"""PEFT's ``rank_pattern``/``alpha_pattern`` matching, bounded in time.

    peft (``utils/other.py``, ``get_pattern_key``) tries each key in order with
    ``re.match(rf"(.*\.)?({key})$", name)``. The same expression runs here on the ``regex``
    engine (compatible with ``re``), with a timeout: a catastrophic pattern such as ``(a+)+$``
    is a one-line :class:`FormatError` within :data:`PATTERN_BUDGET_S` seconds (the first
    timeout ends the read), not a hang.
    """

    def __init__(self, source: object, budget: float = PATTERN_BUDGET_S) -> None:
        import time

        self.source = source
        self._clock = time.monotonic
        self._deadline = self._clock() + budget
        self._compiled: dict[str, Any] = {}

    def _compile(self, key: str):
        import regex

        if key not in self._compiled:
            if not isinstance(key, str):
                raise FormatError(f"{self.source}: pattern {key!r} is not a string")
            try:
                self._compiled[key] = regex.compile(rf"(.*\.)?({key})$")
            except (regex.error, ValueError, OverflowError, RecursionError) as e:
                raise FormatError(
                    f"{self.source}: pattern {key!r} is not a valid regex: {one_line(e)}"
                ) from None
        return self._compiled[key]

    def first(self, patterns: Any, name: str) -> str | None:
        """The first key of ``patterns`` (in order) that matches module ``name``, or None."""
        for key in patterns:
            left = self._deadline - self._clock()
            if left <= 0:
                raise FormatError(f"{self.source}: matching its patterns takes too long")
            try:
                hit = self._compile(key).match(name, timeout=left)
            except TimeoutError:
                raise FormatError(
                    f"{self.source}: pattern {key!r} takes too long to match (a catastrophic "
                    "regular expression?)"
                ) from None
            if hit:
                return key
        return None


# ----------------------------------------------------------------------------- keys


def parse_lora_key(key: str) -> tuple[str, str, str | None, str | None] | None:
    """Split a PEFT/loralib key into ``(module name, role, adapter name, param)``.

    ``base_model.model.h.0.c_attn.lora_A.weight`` -> ``("h.0.c_attn", "A", None, "weight")``;
    ``q_proj.lora_B.default.weight`` -> ``("q_proj", "B", "default", "weight")``;
    loralib's ``fc.lora_A`` -> ``("fc", "A", None, None)``. ``None`` for any other key.
    """
    parts = key.split(".")
    idx = next((i for i in range(len(parts) - 1, -1, -1) if parts[i] in _ROLES), None)
    if idx is None:
        return None
    rest = parts[idx + 1 :]
    param = rest.pop() if rest and rest[-1] in ("weight", "bias") else None
    if len(rest) > 1:
        return None
    name = ".".join(parts[:idx])
    name = name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name
    return name, _ROLES[parts[idx]], (rest[0] if rest else None), param


def check_finite(t: torch.Tensor, path: object, key: str) -> None:
    """Raise :class:`NonFiniteError` if ``t`` holds NaN or Inf.

    First one float32 sum (NaN and ±Inf propagate through additions, so a finite sum proves
    every element finite; 10-20× faster than an elementwise mask on fp16 factors); only a
    non-finite sum (a bad value, or an overflow of finite ones) takes the elementwise check,
    ``2**22`` elements at a time, so a 12288² base weight costs a 4 MB mask, not a 150 MB one."""
    if not t.is_floating_point():
        return
    if t.element_size() > 1 and bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return
    flat = t.reshape(-1)
    step = 1 << 22
    for i in range(0, flat.numel(), step):
        chunk = flat[i : i + step]
        if chunk.element_size() == 1:  # float8: isfinite is not implemented
            chunk = chunk.float()
        if not bool(torch.isfinite(chunk).all()):
            break
    else:
        return
    if t.element_size() == 1:
        t = t.float()
    if not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise NonFiniteError(f"{path}: {key} {shape(t)} holds {n_nan} NaN and {n_inf} Inf values")


def scalar(t: torch.Tensor, path: object, key: str) -> float:
    """The value of a one-element tensor (e.g. kohya's ``alpha``), checked finite."""
    if t.numel() != 1:
        raise ShapeError(f"{path}: {key} should be a scalar, got shape {shape(t)}")
    value = float(t.detach().double().reshape(()))
    if not math.isfinite(value):
        raise NonFiniteError(f"{path}: {key} is {value}")
    return value


def scale_for(alpha: float, r: int, use_rslora: bool = False) -> float:
    """``alpha / r``, or rsLoRA's ``alpha / sqrt(r)``; NaN for ``r <= 0`` (rejected later)."""
    if r <= 0:
        return float("nan")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def make_module(
    name: str,
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    alpha: float | None,
    scale: float,
    source: object,
    keys: tuple[str, ...],
    part: str | None = None,
    rows: tuple[int, int] | None = None,
    fan_in_fan_out: bool | None = None,
    kind: str | None = None,
    family: str = "lora",
    nominal_rank: int | None = None,
    n_params: int | None = None,
    magnitude: Magnitude | None = None,
) -> LoraModule:
    """The one boundary check every reader goes through, then a :class:`LoraModule`.

    ``A``/``B`` are the module's exact factored form (a family's products computed by the
    reader with :mod:`lorascope.families`, in float64, from tensors already passed through
    :func:`check_tensors`); ``family``, ``nominal_rank``, ``n_params`` and ``magnitude`` are
    stored as given (see :class:`~lorascope.adapter.LoraModule`).

    Parameters
    ----------
    A : torch.Tensor
        ``(r, d_in)``, or a conv down-projection ``(r, in, *kernel)`` reshaped here to
        ``(r, in·prod(kernel))``.
    B : torch.Tensor
        ``(d_out, r)``, or a conv up-projection ``(out, r, 1, ...)`` reshaped here to ``(out, r)``.
    keys : tuple of str
        The tensor names in ``source`` (A's key first, then B's), used in every message.

    Raises
    ------
    FormatError
        A factor that is not floating point.
    ShapeError
        Wrong ndim, empty, a conv up-projection with a kernel, or ``A.shape[0] != B.shape[1]``.
    NonFiniteError
        NaN/Inf in a factor or in the scale.
    """
    key_a, key_b = keys[0], keys[1]
    if not name.isprintable() or not name:
        raise FormatError(f"{source}: {key_a}: module name {name!r} is empty or unprintable")
    for key, t in ((key_a, A), (key_b, B)):
        if not t.is_floating_point():
            raise FormatError(
                f"{source}: {key} has dtype {t.dtype}, expected a floating-point tensor"
            )
        if t.ndim < 2 or t.numel() == 0:
            raise ShapeError(f"{source}: {key} has shape {shape(t)}, expected a non-empty matrix")
    if A.ndim > 2:  # conv down-projection (r, in, kh, kw) -> (r, in*kh*kw)
        A = A.reshape(A.shape[0], -1)
    if B.ndim > 2:  # conv up-projection (out, r, 1, 1) -> (out, r)
        if any(int(s) != 1 for s in B.shape[2:]):
            raise ShapeError(
                f"{source}: {key_b} has shape {shape(B)}: an up-projection with a kernel "
                "is not B @ A"
            )
        B = B.reshape(B.shape[0], B.shape[1])
    if A.shape[0] != B.shape[1]:
        raise ShapeError(
            f"{source}: {key_a} {shape(A)} and {key_b} {shape(B)} do not form B @ A "
            f"(A has {A.shape[0]} rows, B has {B.shape[1]} columns)"
        )
    check_finite(A, source, key_a)
    check_finite(B, source, key_b)
    if not math.isfinite(scale):
        raise NonFiniteError(f"{source}: {key_a}: scale is {scale} (alpha={alpha})")
    if scale != 0 and not SCALE_RANGE[0] <= abs(scale) <= SCALE_RANGE[1]:
        raise FormatError(
            f"{source}: {key_a}: scale {scale:.3g} (alpha={alpha}) is outside "
            f"[{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}]: not a trained adapter's"
        )
    return LoraModule(
        name=name,
        A=A,
        B=B,
        scale=float(scale),
        alpha=None if alpha is None else float(alpha),
        part=part,
        rows=rows,
        fan_in_fan_out=fan_in_fan_out,
        layer=parse_layer(name),
        kind=kind or parse_kind(name),
        source=str(source),
        keys=tuple(keys),
        family=family,
        nominal_rank=nominal_rank,
        n_params=n_params,
        magnitude=magnitude,
        update="full" if magnitude is None else "dora-direction",
    )


def check_tensors(tensors: dict[str, torch.Tensor], source: object) -> None:
    """Every tensor a family is built from: floating point, non-empty and finite (checked
    before any product, so an error names the stored tensor)."""
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise FormatError(
                f"{source}: {key} has dtype {t.dtype}, expected a floating-point tensor"
            )
        if t.numel() == 0:
            raise ShapeError(f"{source}: {key} has shape {shape(t)}, expected a non-empty tensor")
        check_finite(t, source, key)


def missing_partner(source: object, have: str, want: str) -> ShapeError:
    """The error for an A without its B (or the reverse)."""
    return ShapeError(f"{source}: {have} has no partner {want} (an A needs its B and vice versa)")
