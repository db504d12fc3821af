"""llama.cpp GGUF LoRA adapters (``convert_lora_to_gguf.py``, also ollama's adapter export).

On disk (gguf ``GGUFWriter``; checked by llama.cpp ``llama_adapter_lora_init_impl``)::

    general.type          "adapter"            (a model file says "model", or has no type)
    adapter.type          "lora"
    adapter.lora.alpha    f32, PEFT's lora_alpha (absent or 0: no alpha)
    general.architecture  e.g. "llama", "qwen2"
    <gguf name>.weight.lora_a   numpy (r, d_in)    ggml ne [d_in, r]
    <gguf name>.weight.lora_b   numpy (d_out, r)   ggml ne [r, d_out]

Tensor names are the base model's GGUF names (``blk.3.attn_q``, ``blk.3.ffn_down``,
``token_embd``, ``output``); lorascope keeps them, without ``.weight``. Factors are F32, F16,
BF16 or Q8_0, often mixed in one file (the converter falls back to F16 where a row is not a
multiple of Q8_0's 32-wide block); each is dequantized with ``gguf.quants.dequantize`` exactly
as stored, and a type it cannot dequantize is refused.

The update is llama.cpp's (``llm_graph_context::build_lora_mm``,
``llama_adapter_lora_weight::get_scale``)::

    ΔW = s · lora_b @ lora_a,   s = alpha / r  (r = lora_b's columns, per tensor)
                                s = 1          when alpha is absent or 0

``token_embd`` is the exception: the converter stores ``lora_a`` transposed, ``(vocab, r)``, and
``build_inp_embd`` adds ``s · lora_b @ lora_a[token]`` to a token's row, so the embedding's
update in its stored ``(vocab, d)`` orientation is ``ΔE = s · lora_a @ lora_b.T``: ``B =
lora_a``, ``A = lora_b.T`` (lorascope's embedding orientation, as for PEFT's
``lora_embedding_A/B``).

Row order. For llama-family archs (``llama``: Llama, Mistral, Mixtral, ...) the converter
permutes the rows of ``attn_q`` and ``attn_k`` into llama.cpp's rotary order
(``LlamaModel.permute``: ``B_gguf = permute(B_hf)``, ``A`` unchanged), exactly as it permutes
the base model's own ``attn_q``/``attn_k``. The file stores no head counts, so the rows are
kept in llama.cpp's order: singular values, norms, ranks and input-side (right) singular
vectors are unchanged by a row permutation; output-side (left) vectors are permuted. Relating
such an adapter to a Hugging Face base by name is refused (the names differ: ``blk.3.attn_q``
is not ``model.layers.3.self_attn.q_proj``).

Refused, with one line naming the file and the tensor: a GGUF that is not a LoRA adapter, a
tensor that is not half of a ``.lora_a``/``.lora_b`` pair (e.g. mergekit-extract-lora's full
norm vectors, which llama.cpp skips), per-expert 3-D factors (``ffn_*_exps``), tensor types
``gguf`` cannot dequantize, byte-swapped (big-endian) files, and truncated files.
"""

from __future__ import annotations

import importlib.metadata
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorascope.adapter import Adapter, LoraModule
from lorascope.errors import FormatError, ShapeError
from lorascope.formats._common import (
    Probe,
    ReadOptions,
    check_tensors,
    make_module,
    missing_partner,
    one_line,
    scale_for,
)

__all__ = ["read_gguf"]

_INSTALL = "pip install 'lorascope[gguf]'"
_SUFFIXES = {".lora_a": "a", ".lora_b": "b"}
_EMBED = "token_embd"
# stored precision kept for lossless float types; quantized blocks come back as float32
_KEEP = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _gguf(path: Path):
    """The ``gguf`` package, imported only when a GGUF file is read."""
    try:
        import gguf
        import gguf.gguf_reader
        import gguf.quants
    except ImportError:
        raise FormatError(f"{path}: reading GGUF needs the gguf package ({_INSTALL})") from None
    if not hasattr(gguf.gguf_reader.ReaderField, "contents"):  # added in gguf 0.16
        try:
            found = importlib.metadata.version("gguf")
        except importlib.metadata.PackageNotFoundError:
            found = "an older version"
        raise FormatError(f"{path}: reading GGUF needs gguf>=0.16, found {found} ({_INSTALL})")
    return gguf


def _field(reader: Any, key: str, path: Path) -> Any:
    """The value of key/value field ``key`` (None when absent)."""
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        value = field.contents()
    except Exception as e:  # a field the reader cannot decode
        raise FormatError(f"{path}: field {key} cannot be read: {one_line(e)}") from None
    return value.item() if isinstance(value, np.generic) else value


def _fields(reader: Any, path: Path) -> dict[str, Any]:
    """Every key/value field except the reader's own ``GGUF.*`` bookkeeping (an adapter's
    handful; a model file's tokenizer arrays are never decoded)."""
    return {k: _field(reader, k, path) for k in reader.fields if not k.startswith("GGUF.")}


def _factor(t: Any, path: Path, dequantize) -> torch.Tensor:
    """One stored factor, dequantized, numpy (row-major) orientation: ``reversed(ne)``."""
    qtype = t.tensor_type.name
    expected = tuple(int(n) for n in reversed(t.shape.tolist()))
    try:
        x = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise FormatError(
            f"{path}: {t.name} has tensor type {qtype}, which gguf cannot dequantize"
        ) from None
    except Exception as e:  # corrupt block data
        raise FormatError(f"{path}: {t.name} ({qtype}) cannot be read: {one_line(e)}") from None
    x = np.array(x, dtype=np.float32)  # a copy: the reader's memory map stays read-only
    if x.shape != expected:
        raise ShapeError(f"{path}: {t.name} dequantized to {x.shape}, its header says {expected}")
    return torch.from_numpy(x).to(_KEEP.get(qtype, torch.float32))


def read_gguf(path: str | Path, *, alpha: float | None = None) -> Adapter:
    """Read a llama.cpp GGUF LoRA adapter.

    Parameters
    ----------
    path : str or Path
        A ``.gguf`` file with ``general.type = "adapter"`` and ``adapter.type = "lora"``.
    alpha : float, optional
        Overrides ``adapter.lora.alpha``: ``s = alpha / r`` for every tensor.

    Returns
    -------
    Adapter
        One :class:`LoraModule` per ``.lora_a``/``.lora_b`` pair, named as in the file without
        ``.weight`` (``blk.3.attn_q``): ``A`` ``(r, d_in)`` = ``lora_a``, ``B`` ``(d_out, r)`` =
        ``lora_b`` (``token_embd``: ``B`` = ``lora_a`` ``(vocab, r)``, ``A`` = ``lora_b.T``),
        ``scale`` as llama.cpp's ``get_scale`` with a user scale of 1. ``config`` holds the
        file's key/value fields, the tensor types and the rule the scale came from.

    Raises
    ------
    FormatError
        Not a GGUF LoRA adapter, a non-LoRA tensor, an unreadable or truncated file, a tensor
        type that cannot be dequantized, or the ``gguf`` package missing.
    ShapeError
        An unpaired factor, a 3-D (per-expert) factor, factors that do not form ``B @ A``.
    """
    path = Path(path)
    gguf = _gguf(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # ValueError (magic, version, truncation), KeyError, IndexError
        raise FormatError(f"{path}: not a readable GGUF file: {one_line(e)}") from None
    if reader.byte_order != "I":
        raise FormatError(f"{path}: a byte-swapped (big-endian) GGUF file is not supported")
    gtype, atype = _field(reader, "general.type", path), _field(reader, "adapter.type", path)
    arch = _field(reader, "general.architecture", path) or "unknown"
    if gtype != "adapter":
        what = f"general.type={gtype!r}" if gtype is not None else "no general.type"
        raise FormatError(
            f"{path}: a GGUF {arch} file with {what}, not a LoRA adapter "
            "(expected general.type='adapter', adapter.type='lora')"
        )
    if atype != "lora":
        raise FormatError(
            f"{path}: a GGUF adapter of type {atype!r}, not LoRA (expected adapter.type='lora')"
        )
    fields = _fields(reader, path)
    file_alpha = fields.get("adapter.lora.alpha")
    if file_alpha is not None and not isinstance(file_alpha, (int, float)):
        raise FormatError(f"{path}: adapter.lora.alpha={file_alpha!r} is not a number")

    pairs: dict[str, dict[str, Any]] = {}
    for t in reader.tensors:
        role = next((r for s, r in _SUFFIXES.items() if t.name.endswith(s)), None)
        if role is None:
            raise FormatError(
                f"{path}: tensor {t.name} is not a LoRA factor (.lora_a/.lora_b); refusing a "
                "file with other tensors (e.g. mergekit-extract-lora's full norm vectors)"
            )
        pairs.setdefault(t.name[: -len(".lora_a")], {})[role] = t
    if not pairs:
        raise FormatError(f"{path}: a GGUF LoRA adapter with no .lora_a/.lora_b tensors")

    dequantize = gguf.quants.dequantize
    modules: list[LoraModule] = []
    types: Counter[str] = Counter()
    for base, ab in pairs.items():
        if "a" not in ab or "b" not in ab:
            have, want = ("a", "b") if "a" in ab else ("b", "a")
            raise missing_partner(path, ab[have].name, f"{base}.lora_{want}")
        ta, tb = ab["a"], ab["b"]
        a, b = _factor(ta, path, dequantize), _factor(tb, path, dequantize)
        types.update([ta.tensor_type.name, tb.tensor_type.name])
        check_tensors({ta.name: a, tb.name: b}, path)
        if a.ndim != 2 or b.ndim != 2:
            raise ShapeError(
                f"{path}: {ta.name} {tuple(a.shape)} / {tb.name} {tuple(b.shape)}: only 2-D "
                "LoRA factors are read (per-expert 3-D factors are not supported)"
            )
        name = base.removesuffix(".weight")
        if name == _EMBED:
            # lora_a (vocab, r), lora_b (d, r): ΔE (vocab, d) = s · lora_a @ lora_b.T
            A, B, keys = b.T, a, (tb.name, ta.name)
        else:
            # lora_a (r, d_in), lora_b (d_out, r): ΔW (d_out, d_in) = s · lora_b @ lora_a
            A, B, keys = a, b, (ta.name, tb.name)
        r = int(b.shape[-1])  # llama.cpp: rank = b->ne[0]
        if alpha is not None:
            mod_alpha, scale = float(alpha), scale_for(float(alpha), r)
        elif file_alpha:
            mod_alpha, scale = float(file_alpha), float(file_alpha) / r
        else:
            mod_alpha, scale = None, 1.0
        modules.append(
            make_module(
                name, A, B, alpha=mod_alpha, scale=scale, source=path, keys=keys, nominal_rank=r
            )
        )

    config: dict[str, Any] = dict(fields)
    config["tensor_types"] = dict(sorted(types.items()))
    if alpha is not None:
        config["scale_rule"] = f"alpha={float(alpha)} given by the caller: s = alpha / r"
    elif file_alpha:
        config["scale_rule"] = "s = adapter.lora.alpha / r per tensor (llama.cpp get_scale)"
    else:
        config["scale_rule"] = (
            "adapter.lora.alpha absent or 0: s = 1, as llama.cpp applies it (get_scale)"
        )
    config["row_order"] = (
        "llama.cpp's (attn_q/attn_k rows permuted for llama-family archs; not un-permuted)"
    )
    return Adapter(modules=modules, path=str(path), format="gguf", config=config)


# ----------------------------------------------------------------------------- layout


def _claims(probe: Probe) -> bool:
    return probe.container == "gguf"


def _read(probe: Probe, options: ReadOptions) -> Adapter:
    return read_gguf(probe.path, alpha=options.alpha)


LAYOUT = (
    "gguf",
    _claims,
    _read,
    "llama.cpp GGUF LoRA adapter (convert_lora_to_gguf.py): <name>.weight.lora_a / .lora_b",
)
