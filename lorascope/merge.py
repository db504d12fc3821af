"""Merge an adapter into its base checkpoint: ``W' = W + s·B A``, written as safetensors.

Every family merges through :func:`lorascope.update.merged_weight`: ``W + s·B' A'`` for the
additive ones (LoRA, AdaLoRA, VeRA, LoHa, LoKr, from their exact factored forms) and DoRA's
``diag(g)(W + s·B A)``, as the producing library merges it.

The result is a plain checkpoint that loads without peft (Hu et al. 2021, §4.1: "we can
explicitly compute and store W = W0 + BA and perform inference as usual"). This module is the
glue: it matches every module to its base tensor (nothing is written unless all match), the
arithmetic is :func:`lorascope.tensor_merge.merge_tensor` (``single`` rounding by default, or
``peft`` for output bit-identical to peft's ``merge_and_unload``), and the checkpoint writer is
:func:`lorascope.formats.merged.write_checkpoint` (layout mirrored shard for shard, torch files
become safetensors, other files copied, written atomically). Memory: one tensor in flight.

Safety: the merged tensors are checked finite after the cast (an fp16 overflow is an error, not
an Inf); a failure leaves nothing behind; an existing ``out`` is never overwritten unless asked
(``force``), and the inputs never are.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from lorascope.adapter import Adapter, LoraModule
from lorascope.columns import Column, Tabular, ident_columns
from lorascope.errors import FormatError, LoraScopeError, LoraScopeWarning, ShapeError
from lorascope.formats import load_adapter, load_base
from lorascope.formats._common import check_finite
from lorascope.formats.base import BaseWeights, Placement
from lorascope.formats.merged import check_writable, write_checkpoint
from lorascope.formats.peft import MUTATING_INITS
from lorascope.tensor_merge import ROUNDINGS, Rounding, check_peft_mergeable, merge_tensor

__all__ = [
    "MergeReport",
    "MergedModule",
    "merge_adapter",
    "merge_tensor",
    "OUT_DTYPES",
    "ROUNDINGS",
]

OUT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


_FILE = Column("file", doc="the output file now holding it")
_DTYPE = Column("dtype", doc="the merged tensor's dtype as written")
_NORMS = (
    Column("norm_w", "‖W‖_F", doc="the base weight's part"),
    Column("norm_delta", "‖ΔW‖_F", doc="the update, from the factors"),
    Column("norm_applied", "‖W'−W‖_F", doc="what the merge changed, as written"),
)


@dataclass(frozen=True)
class MergedModule(Tabular):
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

    COLUMNS: ClassVar[tuple[Column, ...]] = (*ident_columns(), _FILE, _DTYPE, *_NORMS)
    TIDY: ClassVar[tuple[Column, ...]] = (
        *ident_columns(),
        Column("tensor", doc="the base tensor merged into"),
        _FILE,
        _DTYPE,
        Column("scale", doc="s in ΔW = s·B A"),
        *_NORMS,
    )

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
    rounding : str
        The arithmetic used (:data:`lorascope.tensor_merge.ROUNDINGS`).
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
    rounding: str = "single"


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


# ----------------------------------------------------------------------------- API


def merge_adapter(
    base: str | Path,
    adapter: Adapter | str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    force: bool = False,
    rounding: Rounding = "single",
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
    rounding : {"single", "peft"}
        ``single`` (default): ``W + s·B A`` formed in float32 (float64 for float64 tensors) and
        rounded once to the output dtype. ``peft``: bit-identical to peft's
        ``merge_and_unload()`` on CPU for the base loaded in the output dtype (``ΔW`` rounded in
        the LoRA weights' dtype, then added; plain LoRA modules only). See
        :func:`lorascope.tensor_merge.merge_tensor`.

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
    if rounding not in ROUNDINGS:
        raise LoraScopeError(f"rounding {rounding!r} is not one of {', '.join(ROUNDINGS)}")
    base_path, out = Path(base), Path(out)
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter)
    _refuse_partial(adapter)
    if rounding == "peft":
        for m in adapter:
            check_peft_mergeable(m)
    bw = load_base(base_path)
    check_writable(bw)
    groups = _plan(bw, adapter)
    results: dict[str, MergedModule] = {}

    def replace(key: str, W: torch.Tensor, where: str, name: str) -> torch.Tensor:
        merged, norms = merge_tensor(W, groups[key], dtype, where, rounding=rounding)
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

    written = write_checkpoint(
        bw,
        out,
        replace,
        groups,
        dtype=dtype,
        force=force,
        inputs=[adapter.path] if adapter.path else [],
    )
    return MergeReport(
        base=str(base_path),
        adapter=adapter.path,
        out=str(out),
        modules=[results[m.key] for m in adapter],
        files=written.files,
        copied_tensors=written.copied_tensors,
        copied_files=written.copied_files,
        skipped_files=written.skipped_files,
        converted=written.converted,
        bytes_written=written.bytes_written,
        rounding=rounding,
    )
