"""Merge an adapter into its base checkpoint: ``W' = W + s·B A``, written as safetensors.

Every family merges through :func:`lorascope.update.merged_weight`: ``W + s·B' A'`` for the
additive ones (LoRA, AdaLoRA, VeRA, LoHa, LoKr, from their exact factored forms) and DoRA's
``diag(g)(W + s·B A)``, as the producing library merges it.

The result is a plain checkpoint that loads without peft (Hu et al. 2021, §4.1: "we can
explicitly compute and store W = W0 + BA and perform inference as usual"). The output mirrors the
input: a single file gives a single file; a sharded checkpoint gives the same shards with the same
tensors in each and a new ``*.index.json``; a Hugging Face model directory gives a directory with
the same file names and its other files (``config.json``, tokenizer files, ...) copied, so
``transformers`` loads it as it loaded the base. Torch inputs (``.bin``/``.pt``) come out as
``.safetensors`` (``pytorch_model*.bin`` -> ``model*.safetensors``).

Arithmetic, per stored tensor: ``W`` is upcast to float32 (float64 when it, or the requested
output dtype, is float64), every module that targets it puts ``merged_weight(module, W)``
in its place
(transposed for GPT-2 ``Conv1D`` / ``fan_in_fan_out``; only its rows for a fused q/k/v part;
reshaped to the kernel for a conv), and the sum is cast back to the tensor's dtype. Tensors that
no module touches are copied through byte for byte. Memory: one tensor in flight, never the model.

Safety: every module is matched to its base tensor before anything is written; the merged
tensors are checked finite after the cast (an fp16 overflow is an error, not an Inf); the output
is written into a hidden sibling directory and renamed into place at the end, so a failure leaves
nothing behind; an existing ``out`` is never overwritten unless asked (``force``), and the inputs
never are.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import secrets
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorascope.adapter import Adapter, LoraModule
from lorascope.errors import (
    FormatError,
    LoraScopeError,
    LoraScopeWarning,
    NonFiniteError,
    ShapeError,
)
from lorascope.formats import load_adapter, load_base
from lorascope.formats._common import TORCH_SUFFIXES, check_finite, one_line, read_json
from lorascope.formats.base import BaseWeights, Placement, write_safetensors
from lorascope.formats.peft import MUTATING_INITS
from lorascope.linalg import factored_svdvals, safe_norm
from lorascope.update import merged_weight

__all__ = ["MergeReport", "MergedModule", "merge_adapter", "merge_tensor", "OUT_DTYPES"]

log = logging.getLogger(__name__)

OUT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
# Files that hold a model's weights (in some format): never copied from a base directory's top
# level, where they are the base itself, or the same unmerged model in another format.
_WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES, ".h5", ".msgpack", ".gguf", ".onnx")
# Sub-folders that hold exports of the unmerged model.
_EXPORT_DIRS = ("onnx", "openvino")
_INDEX = ".index.json"


@dataclass(frozen=True)
class MergedModule:
    """What merging one adapter module did.

    Attributes
    ----------
    module, layer, kind, rank :
        As in every lorascope result (``module`` is the module's key, ``name[q]`` for a part).
    tensor : str
        The base tensor it was merged into; ``file``: the output file now holding it.
    shape : tuple of int
        ``ΔW``'s ``(d_out, d_in)``.
    dtype : str
        The merged tensor's dtype as written.
    scale : float
        ``s`` in ``ΔW = s · B @ A``.
    norm_w, norm_delta : float
        ``‖W‖_F`` and ``‖ΔW‖_F`` over the module's part of the tensor (computation precision).
    norm_applied : float
        ``‖W' − W‖_F`` with ``W'`` as written: ``‖ΔW‖_F`` less what rounding to ``dtype`` lost.
    """

    module: str
    layer: int | None
    kind: str
    rank: int
    tensor: str
    file: str
    shape: tuple[int, int]
    dtype: str
    scale: float
    norm_w: float
    norm_delta: float
    norm_applied: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass
class MergeReport:
    """The outcome of :func:`merge_adapter`.

    Attributes
    ----------
    base, adapter, out : str
        What was read and where the result is.
    modules : list of MergedModule
        One per adapter module, in adapter order.
    files : list of str
        Weight files written (relative to ``out`` for a directory; the index last, if any).
    copied_tensors : int
        Tensors no module touches, written unchanged (cast only when ``dtype`` was given).
    copied_files, skipped_files : list of str
        Other files of a base directory copied along, and weight files of other formats left out.
    converted : bool
        The base was a torch file (``.bin``/``.pt``) and is now safetensors.
    bytes_written : int
        Tensor data written.
    """

    base: str
    adapter: str
    out: str
    modules: list[MergedModule] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    copied_tensors: int = 0
    copied_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    converted: bool = False
    bytes_written: int = 0


# ----------------------------------------------------------------------------- arithmetic


def _region(t: torch.Tensor, p: Placement) -> torch.Tensor:
    """The ``(d_out, d_in)`` part of stored tensor ``t`` that ``p`` updates, as a view of ``t``."""
    v = t.T if p.transposed else t.reshape(p.shape[0], -1)  # Conv1D (d_in, D) -> (D, d_in)
    return v if p.rows is None else v[p.rows[0] : p.rows[1]]  # a fused part: its rows


def _norm(t: torch.Tensor) -> float:
    """``‖t‖_F`` without overflow (:func:`lorascope.linalg.safe_norm`); a norm beyond float64
    is an error, never an ``inf`` in the report."""
    n = safe_norm(t)
    if not math.isfinite(n):
        raise NonFiniteError(f"a merged weight's norm overflows float64 ({t.shape[0]} rows)")
    return n


def _work_dtype(stored: torch.dtype, out: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (stored, out) else torch.float32


def merge_tensor(
    W: torch.Tensor,
    placed: Sequence[tuple[LoraModule, Placement]],
    dtype: torch.dtype | None = None,
    where: str = "",
) -> tuple[torch.Tensor, list[tuple[float, float, float]]]:
    """``W + Σ s · B @ A`` over the modules that target one stored tensor, cast to its dtype.

    Parameters
    ----------
    W : torch.Tensor
        The tensor as stored: ``(D, d_in)``, or ``(d_in, D)`` for a transposed placement
        (GPT-2 ``Conv1D``), or a conv kernel ``(out, in, *kernel)``.
    placed : sequence of (LoraModule, Placement)
        The modules that update ``W`` and where (:meth:`BaseWeights.locate`); their rows must
        not overlap.
    dtype : torch.dtype, optional
        Output dtype; default ``W.dtype``.
    where : str
        ``file: tensor`` for error messages.

    Returns
    -------
    merged : torch.Tensor
        ``W'``, shaped as ``W``: computed in float32 (float64 if ``W`` or ``dtype`` is float64),
        then cast to ``dtype``.
    norms : list of (float, float, float)
        Per module: ``‖W‖_F``, ``‖ΔW‖_F``, ``‖W' − W‖_F`` over its part of the tensor.

    Raises
    ------
    NonFiniteError
        ``W'`` holds NaN/Inf: from the factors, or because it overflows ``dtype`` (e.g. float16).
    """
    dtype = dtype or W.dtype
    work = _work_dtype(W.dtype, dtype)
    w0 = W.to(work)
    acc = w0.clone()
    norms_delta = []
    for m, p in placed:
        base = _region(w0, p)  # (d_out, d_in) view of the stored tensor
        new = merged_weight(m, base, dtype=work)  # W + s·B A; DoRA: rescaled by its magnitude
        _region(acc, p).copy_(new)  # in place, through the view (regions are disjoint)
        if m.is_dora:  # ΔW = W' − W depends on W: measured on the merge itself
            norms_delta.append(_norm(new - base))
        else:  # ‖s·B A‖_F exactly from the factors, whatever the working precision rounds
            S = factored_svdvals(m.A, m.B, m.scale)
            norms_delta.append(float(torch.linalg.vector_norm(S)))
    if not bool(torch.isfinite(acc).all()):
        bad = int((~torch.isfinite(acc)).sum())
        keys = ", ".join(m.key for m, _ in placed)
        raise NonFiniteError(f"{where}: W + ΔW holds {bad} NaN/Inf values (adapter: {keys})")
    merged = acc.to(dtype)
    if not bool(torch.isfinite(merged).all()):
        top = float(acc.abs().max())
        raise NonFiniteError(
            f"{where}: W + ΔW overflows {str(dtype).removeprefix('torch.')} (largest |value| "
            f"{top:.4g} > {torch.finfo(dtype).max:.4g}); merge with --dtype float32"
        )
    applied = merged.to(work) - w0
    norms = [
        (
            _norm(_region(w0, p)),
            nd,
            _norm(_region(applied, p)),
        )
        for (_m, p), nd in zip(placed, norms_delta, strict=True)
    ]
    return merged, norms


# ----------------------------------------------------------------------------- planning


def _refuse_partial(adapter: Adapter) -> None:
    """Adapters whose update is more than ``s·B A``: merging the factors alone would be wrong."""
    cfg = adapter.config if adapter.format in ("peft", "diffusers") else {}
    init = cfg.get("init_lora_weights", True)
    why = None
    if isinstance(init, str) and init.lower().startswith(MUTATING_INITS):
        why = f"init_lora_weights={init!r} changed the base weights too"
    elif cfg.get("lora_bias"):
        why = "it trains a LoRA bias (lora_bias=True)"
    elif adapter.full_weights:
        n = len(adapter.full_weights)
        why = (
            f"it also holds {n} whole trained weight(s) (modules_to_save, e.g. "
            f"{adapter.full_weights[0]}), which peft's merge puts in place of the base's and "
            "this merge does not"
        )
    if why:
        raise FormatError(f"{adapter.path}: cannot merge: {why}; s·B A is not the whole update")


def _plan(base: BaseWeights, adapter: Adapter) -> dict[str, list[tuple[LoraModule, Placement]]]:
    """Every module matched to its base tensor (or an error), grouped by tensor; rows disjoint."""
    groups: dict[str, list[tuple[LoraModule, Placement]]] = {}
    for m in adapter:
        check_finite(m.A, m.source, m.keys[0] if m.keys else f"{m.key} A")
        check_finite(m.B, m.source, m.keys[1] if len(m.keys) > 1 else f"{m.key} B")
        if m.scale == 0 or not bool(m.A.any()) or not bool(m.B.any()):
            warnings.warn(
                f"{m.source}: {m.key}: ΔW = s·B·A is exactly zero (an untrained adapter?); "
                "its base weight is written unchanged",
                LoraScopeWarning,
                stacklevel=2,
            )
        p = base.locate(m)
        groups.setdefault(p.key, []).append((m, p))
    for key, placed in groups.items():
        p = placed[0][1]
        n_rows = p.shape[1] if p.transposed else p.shape[0]
        spans = sorted((q.rows or (0, n_rows), m.key) for m, q in placed)
        for (a, ka), (b, kb) in itertools.pairwise(spans):
            if b[0] < a[1]:
                raise ShapeError(
                    f"{p.file}: {key}: updated twice, by {ka} and {kb} (rows {a} and {b})"
                )
        _shape, stored = base.info(key)
        if not stored.is_floating_point or stored.itemsize < 2:
            raise FormatError(
                f"{p.file}: {key} is {stored}: merging into quantized, float8 or integer weights "
                "is not supported"
            )
    return groups


def _out_name(name: str) -> str:
    """The safetensors name of a weight file: ``pytorch_model-00001-of-00002.bin`` ->
    ``model-00001-of-00002.safetensors``; ``adapter.pt`` -> ``adapter.safetensors``."""
    if name.endswith(_INDEX):
        inner = _out_name(name[: -len(_INDEX)])
        return inner + _INDEX
    stem, suffix = os.path.splitext(name)
    if suffix.lower() not in TORCH_SUFFIXES:
        return name
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model") :]
    return stem + ".safetensors"


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_out(
    out: Path, inputs: list[Path], base_dir: Path | None, single: bool, force: bool
) -> bool:
    """Refuse an ``out`` that is, contains or sits inside an input; return whether it exists."""
    target = out.resolve()
    for p in inputs:
        if _is_within(p.resolve(), target):
            raise LoraScopeError(f"{out}: is (or contains) the input {p}; choose another --out")
    if base_dir is not None and _is_within(target, base_dir.resolve()):
        raise LoraScopeError(f"{out}: lies inside the base model directory {base_dir}")
    if not (out.exists() or out.is_symlink()):
        return False
    if not force:
        raise LoraScopeError(f"{out}: already exists; choose another --out (or --force)")
    if single:
        looks_like = out.is_file()
    else:
        looks_like = out.is_dir() and (
            any(out.glob("*.safetensors")) or any(out.glob(f"*{_INDEX}"))
        )
    if out.is_symlink() or not looks_like:
        what = "a .safetensors file" if single else "a model directory (*.safetensors)"
        raise LoraScopeError(f"{out}: exists and is not {what}; not replacing it")
    return True


def _sibling(out: Path, tag: str) -> Path:
    """A fresh hidden name beside ``out`` (``.name.<random>.tag``), not yet created."""
    return out.parent / f".{out.name}.{secrets.token_hex(4)}.{tag}"


# ----------------------------------------------------------------------------- API


def merge_adapter(
    base: str | Path,
    adapter: Adapter | str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    force: bool = False,
) -> MergeReport:
    """Write the base checkpoint with the adapter merged in: ``W' = W + s · B @ A``.

    Parameters
    ----------
    base : str or Path
        The base checkpoint: a Hugging Face model directory, a ``*.index.json``, or one
        ``.safetensors`` / ``.bin`` / ``.pt`` state dict (see :func:`~lorascope.formats.load_base`).
    adapter : Adapter, str or Path
        The adapter, or a path for :func:`~lorascope.formats.load_adapter`.
    out : str or Path
        Ends in ``.safetensors``: one file (the base must be a single file). Otherwise a
        directory: the base's weight files under the same names (torch ones renamed to
        ``.safetensors``), a new index for a sharded base, and, when ``base`` is a directory, its
        other files (config, tokenizer, ...; weight files of other formats are left out).
    dtype : torch.dtype, optional
        Cast every floating tensor to this dtype; default: each keeps its stored dtype.
    force : bool
        Replace an existing ``out`` (a ``.safetensors`` file or a model directory; never an
        input, never a directory that contains one).

    Returns
    -------
    MergeReport
        Per module ``‖W‖_F``, ``‖ΔW‖_F``, ``‖W' − W‖_F``; the files written and copied.

    Raises
    ------
    MissingModuleError
        A module without its base tensor (nothing is written).
    ShapeError
        A base tensor whose shape does not fit ``ΔW``; two modules updating the same rows.
    NonFiniteError
        NaN/Inf in a factor or a merged weight, or a merged weight that overflows its dtype.
    FormatError
        Unreadable inputs; a DoRA/PiSSA-style adapter whose update is not just ``s · B A``.
    LoraScopeError
        ``out`` exists (without ``force``) or would overwrite an input.

    Notes
    -----
    Merged and cast tensors are checked finite; tensors copied unchanged are not judged.
    Safetensors metadata: the base file's, with ``{"format": "pt"}`` (``transformers`` needs it).
    """
    if dtype is not None and dtype not in OUT_DTYPES.values():
        raise LoraScopeError(f"dtype {dtype} is not one of {', '.join(OUT_DTYPES)}")
    base_path, out = Path(base), Path(out)
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter)
    _refuse_partial(adapter)
    bw = load_base(base_path)
    if bw.keys() == [""]:
        raise FormatError(
            f"{bw.entry}: holds one bare tensor, not a state dict; there is no checkpoint to write"
        )
    groups = _plan(bw, adapter)

    entry, files = bw.entry, bw.files()
    sharded = entry.name.endswith(_INDEX)
    single = out.suffix == ".safetensors"
    if single and (sharded or len(files) > 1):
        raise LoraScopeError(
            f"{out}: the base {base_path} is sharded ({len(files)} files); give a directory"
        )
    root = entry.parent
    names: dict[Path, str] = {}
    for f in files:
        try:
            rel = f.relative_to(root).as_posix()
        except ValueError:
            raise FormatError(f"{entry}: shard {f} lies outside {root}") from None
        if ".." in Path(rel).parts:
            raise FormatError(f"{entry}: shard {rel} lies outside {root}")
        names[f] = out.name if single else _out_name(rel)
    if len(set(names.values())) != len(names):
        raise FormatError(f"{entry}: two weight files would both be written as the same name")
    base_dir = base_path if base_path.is_dir() else None
    adapter_path = Path(adapter.path) if adapter.path else None
    inputs = [*files, entry, *([adapter_path] if adapter_path is not None else [])]
    replace = _check_out(out, inputs, base_dir, single, force)

    report = MergeReport(base=str(base_path), adapter=adapter.path, out=str(out))
    report.converted = any(f.suffix.lower() in TORCH_SUFFIXES for f in files)
    parent = out.absolute().parent
    created = [p for p in (parent, *parent.parents) if not p.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out.absolute(), "partial")
    try:
        tmp.mkdir()  # with the usual permissions (umask), unlike mkdtemp
        _write(bw, adapter, groups, files, names, tmp, dtype, report)
        if sharded:
            report.files.append(_write_index(bw, entry, names, tmp, report))
        if base_dir is not None and not single:
            _copy_others(base_dir, tmp, set(report.files), dtype, report)
        _commit(tmp, out, single, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # the folders made for out, deepest first, if still empty
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return report


# ----------------------------------------------------------------------------- writing


def _write(
    bw: BaseWeights,
    adapter: Adapter,
    groups: dict[str, list[tuple[LoraModule, Placement]]],
    files: list[Path],
    names: dict[Path, str],
    tmp: Path,
    dtype: torch.dtype | None,
    report: MergeReport,
) -> None:
    """Every weight file, one tensor in flight: merged where a module targets it, else copied."""
    by_file: dict[Path, list[str]] = {f: [] for f in files}
    for key in bw.keys():
        by_file[bw.file_of(key)].append(key)
    results: dict[str, MergedModule] = {}
    for f in files:
        name = names[f]
        specs = []
        for key in by_file[f]:
            shape, stored = bw.info(key)
            cast = dtype is not None and stored.is_floating_point
            specs.append((key, shape, dtype if cast else stored))

        def produce(key: str, f: Path = f, name: str = name) -> torch.Tensor:
            where = f"{f}: {key}"
            if key in groups:
                W = bw.tensor(key)  # NaN/Inf in a weight being merged is an error
                merged, norms = merge_tensor(W, groups[key], dtype, where)
                for (m, _p), (nw, nd, na) in zip(groups[key], norms, strict=True):
                    results[m.key] = MergedModule(
                        module=m.key,
                        layer=m.layer,
                        kind=m.kind,
                        rank=m.rank,
                        tensor=key,
                        file=name,
                        shape=m.shape,
                        dtype=str(merged.dtype).removeprefix("torch."),
                        scale=float(m.scale),
                        norm_w=nw,
                        norm_delta=nd,
                        norm_applied=na,
                    )
                return merged
            t = bw.tensor(key, check=False)  # not ours to judge: copied as stored
            report.copied_tensors += 1
            if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)
                if not bool(torch.isfinite(t).all()):
                    raise NonFiniteError(f"{where}: overflows {dtype} when cast")
            return t

        meta = {**bw.metadata(f), "format": "pt"}
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("writing %s", target.name)
        try:
            report.bytes_written += write_safetensors(target, specs, produce, meta)
        except OSError as e:
            raise FormatError(f"{target}: cannot write: {one_line(e)}") from None
        report.files.append(name)
    report.modules = [results[m.key] for m in adapter]


def _write_index(
    bw: BaseWeights,
    entry: Path,
    names: dict[Path, str],
    tmp: Path,
    report: MergeReport,
) -> str:
    """A new ``*.index.json``: the same keys, mapped to the output file names."""
    index = read_json(entry)
    metadata = index.get("metadata")
    metadata = dict(metadata) if isinstance(metadata, dict) else {}  # informational only
    metadata["total_size"] = report.bytes_written
    index = {
        **index,
        "metadata": metadata,
        "weight_map": {key: names[bw.file_of(key)] for key in bw.keys()},
    }
    name = _out_name(entry.name)
    (tmp / name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return name


def _copy_others(
    base_dir: Path, tmp: Path, written: set[str], dtype: torch.dtype | None, report: MergeReport
) -> None:
    """The base directory's other files (config, tokenizer, sub-folders), without weights."""
    for dirpath, dirnames, filenames in os.walk(base_dir):
        here = Path(dirpath)
        rel = here.relative_to(base_dir)
        top = rel == Path(".")
        keep = []
        for d in sorted(dirnames):
            if d.startswith(".") or (top and d in _EXPORT_DIRS):
                report.skipped_files.append((rel / d).as_posix() + "/")
            else:
                keep.append(d)
        dirnames[:] = keep
        for fname in sorted(filenames):
            src, relname = here / fname, (rel / fname).as_posix()
            if relname in written:
                continue
            if top and (fname.endswith(_INDEX) or fname.lower().endswith(_WEIGHT_SUFFIXES)):
                report.skipped_files.append(relname)
                continue
            dst = tmp / relname
            dst.parent.mkdir(parents=True, exist_ok=True)
            if top and fname == "config.json" and dtype is not None:
                _copy_config(src, dst, dtype)
            else:
                shutil.copyfile(src, dst)
            report.copied_files.append(relname)


def _copy_config(src: Path, dst: Path, dtype: torch.dtype) -> None:
    """``config.json`` with its ``torch_dtype``/``dtype`` set to the new dtype."""
    try:
        cfg = json.loads(src.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        shutil.copyfile(src, dst)
        return
    name = str(dtype).removeprefix("torch.")
    if isinstance(cfg, dict):
        for k in ("torch_dtype", "dtype"):
            if k in cfg:
                cfg[k] = name
    dst.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def _commit(tmp: Path, out: Path, single: bool, replace: bool) -> None:
    """Move the finished result into place (replacing the old ``out`` only when asked)."""
    if single:
        os.replace(tmp / out.name, out)
        tmp.rmdir()
        return
    if not replace:
        os.rename(tmp, out)
        return
    old = _sibling(out.absolute(), "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
