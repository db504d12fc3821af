"""The normalized adapter model every reader produces and every analysis consumes.

A LoRA module adapts a frozen weight ``W0`` of shape ``(d_out, d_in)`` (``nn.Linear``
orientation) by ``ΔW = scale · B @ A`` with ``A`` of shape ``(r, d_in)`` and ``B`` of shape
``(d_out, r)`` (Hu et al. 2021, eq. 3). Readers normalize every on-disk layout to this
orientation: GPT-2 ``Conv1D`` / ``fan_in_fan_out`` files, embeddings and conv kernels included.
The tensors keep the dtype they had on disk; the linear-algebra core upcasts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lorascope.errors import MissingModuleError, ShapeError

__all__ = ["LoraModule", "Adapter", "parse_layer", "parse_kind", "FUSED_PARTS"]

# The parts of a fused projection, in the order their rows are stacked (GPT-2 c_attn,
# GPT-NeoX query_key_value, Phi/Falcon-style Wqkv, loralib MergedLinear).
FUSED_PARTS = ("q", "k", "v")

# Module kinds by the last name component(s). Keys are regular expressions matched against the
# tail of the dotted (or, for kohya, underscored) module name; first match wins.
_KIND_RULES: tuple[tuple[str, str], ...] = (
    # fused q/k/v
    (r"(c_attn|qkv|qkv_proj|query_key_value|wqkv|in_proj)", "qkv"),
    # attention output (before the generic MLP "output.dense" rule)
    (r"attention[._]output[._]dense", "o"),
    (r"(attn|attention)[._](c_proj|dense|out_proj)", "o"),
    (r"(o_proj|out_proj|to_out[._]0|to_out|wo|out_lin|o)", "o"),
    (r"(query|q_proj|q_lin|to_q|wq|q)", "q"),
    (r"(key|k_proj|k_lin|to_k|wk|k)", "k"),
    (r"(value|v_proj|v_lin|to_v|wv|v)", "v"),
    # MLP: gate / up (into the wide hidden) / down (back to d_model)
    (r"(gate_proj|w1|gate)", "gate"),
    (
        r"(intermediate[._]dense|up_proj|c_fc|fc1|lin1|dense_h_to_4h|w3|ff[._]net[._]0[._]proj)",
        "up",
    ),
    (r"(output[._]dense|down_proj|mlp[._]c_proj|fc2|lin2|dense_4h_to_h|w2|ff[._]net[._]2)", "down"),
    (r"(embed_tokens|wte|word_embeddings|embeddings|embed|shared)", "embed"),
)
_KIND_RES = tuple(
    (re.compile(rf"(?:^|[._]){pat}$", re.IGNORECASE), kind) for pat, kind in _KIND_RULES
)

# Containers whose next component is the block index: h.3, layer.3, layers.3, blocks.3, block.3.
_LAYER_RE = re.compile(
    r"(?:^|[._])(?:h|layer|layers|blocks|block|transformer_blocks)[._](\d+)(?:[._]|$)"
)
_ANY_INT_RE = re.compile(r"(?:^|[._])(\d+)(?:[._]|$)")


def parse_layer(name: str) -> int | None:
    """Block index of a module name, e.g. ``transformer.h.11.attn.c_attn`` -> 11.

    Looks for the index after a known container (``h``, ``layer``, ``layers``, ``blocks``,
    ``block``); falls back to the first integer component; ``None`` when there is none.
    """
    m = _LAYER_RE.search(name) or _ANY_INT_RE.search(name)
    return int(m.group(1)) if m else None


def parse_kind(name: str) -> str:
    """Projection kind of a module name: q, k, v, o, qkv, gate, up, down, embed or other.

    Covers BERT/RoBERTa (``attention.self.query``, ``attention.output.dense``,
    ``intermediate.dense``, ``output.dense``), GPT-2 (``attn.c_attn``, ``attn.c_proj``,
    ``mlp.c_fc``, ``mlp.c_proj``), Llama/Mistral (``q_proj`` ... ``down_proj``), DistilBERT,
    diffusers (``to_q``, ``to_out.0``) and kohya's underscored names.
    """
    for regex, kind in _KIND_RES:
        if regex.search(name):
            return kind
    return "other"


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One adapted weight: ``ΔW = scale · B @ A`` of shape ``(d_out, d_in)``.

    Attributes
    ----------
    name : str
        Module path as in the model, without PEFT's ``base_model.model.`` prefix
        (e.g. ``transformer.h.0.attn.c_attn``).
    A : torch.Tensor
        ``(r, d_in)`` down-projection, dtype as stored.
    B : torch.Tensor
        ``(d_out, r)`` up-projection, dtype as stored.
    scale : float
        ``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``), already resolved per module.
    alpha : float | None
        The alpha the scale came from, when the file or options gave one.
    part : str | None
        For a part of a fused projection: ``"q"``, ``"k"`` or ``"v"``.
    rows : tuple[int, int] | None
        For a part: the rows ``[start, stop)`` of the fused base weight it updates.
    fan_in_fan_out : bool | None
        Whether the *base* weight is stored transposed, ``(d_in, d_out)`` (GPT-2 ``Conv1D``);
        ``None`` when the file does not say.
    layer, kind :
        Block index and projection kind (see :func:`parse_layer`, :func:`parse_kind`).
    source : str
        The file the factors came from; keys: the tensor names in it.
    """

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    alpha: float | None = None
    part: str | None = None
    rows: tuple[int, int] | None = None
    fan_in_fan_out: bool | None = None
    layer: int | None = None
    kind: str = "other"
    source: str = ""
    keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ShapeError(
                f"{self.source}: {self.name}: A {tuple(self.A.shape)} and B {tuple(self.B.shape)} "
                "do not form B @ A (expected A (r, d_in), B (d_out, r))"
            )

    @property
    def key(self) -> str:
        """Unique name within an adapter: ``name`` or ``name[q]`` for a fused part."""
        return f"{self.name}[{self.part}]" if self.part else self.name

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.A.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.B.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of ΔW, ``(d_out, d_in)``."""
        return (self.d_out, self.d_in)

    def tensor_name(self) -> str:
        """``file: key`` text for error messages."""
        keys = " / ".join(self.keys) if self.keys else self.key
        return f"{self.source}: {keys}"

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense ``ΔW = scale · B @ A``, ``(d_out, d_in)``. For tests and small modules only:
        the analyses work from the factors and never call this."""
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))  # (out, r) @ (r, in)

    def split(self, n_parts: int = 3) -> list[LoraModule]:
        """Split a fused projection (``B`` stacks q, k, v rows) into one module per part.

        The parts share ``A``; part ``p`` keeps rows ``[p·d, (p+1)·d)`` of ``B``, ``d = d_out/n``.
        """
        if self.part is not None:
            return [self]
        if self.d_out % n_parts:
            raise ShapeError(
                f"{self.tensor_name()}: fused output size {self.d_out} is not divisible into "
                f"{n_parts} parts"
            )
        d = self.d_out // n_parts
        return [
            replace(
                self,
                B=self.B[p * d : (p + 1) * d],
                part=FUSED_PARTS[p],
                kind=FUSED_PARTS[p],
                rows=(p * d, (p + 1) * d),
            )
            for p in range(n_parts)
        ]


@dataclass
class Adapter:
    """The modules of one adapter file, in file order, plus where they came from.

    Attributes
    ----------
    modules : list[LoraModule]
    path : str
        The file or directory read.
    format : str
        ``peft``, ``loralib``, ``kohya``, ``hdf5`` or ``plain``.
    config : dict
        The adapter's own configuration as read (``adapter_config.json``, metadata, options).
    full_weights : tuple of str
        Tensors in the file that are not LoRA factors but whole weights (PEFT's
        ``modules_to_save``, e.g. a trained ``lm_head`` or classifier): not part of any
        ``ΔW``; the analyses ignore them, a merge must not.
    """

    modules: list[LoraModule]
    path: str
    format: str
    config: dict[str, Any] = field(default_factory=dict)
    full_weights: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[LoraModule]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def __getitem__(self, key: str) -> LoraModule:
        for m in self.modules:
            if m.key == key or m.name == key:
                return m
        raise MissingModuleError(f"{self.path}: no module named {key!r}")

    @property
    def layers(self) -> list[int]:
        return sorted({m.layer for m in self.modules if m.layer is not None})

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules})

    def select(
        self,
        layer: int | None = None,
        module: str | None = None,
    ) -> list[LoraModule]:
        """Modules at ``layer`` (block index) whose kind, name or key matches ``module``.

        ``module`` is a kind (``q``, ``v``, ``o``, ``up``, ...), an exact name/key, or a
        substring of the name. Asking for ``q``, ``k`` or ``v`` splits fused projections
        (GPT-2 ``c_attn``) into their parts. Raises :class:`MissingModuleError`, listing what
        the adapter has, when nothing matches.
        """
        mods = self.modules
        if layer is not None:
            mods = [m for m in mods if m.layer == layer]
            if not mods:
                raise MissingModuleError(
                    f"{self.path}: no module at layer {layer} (layers: {_ranges(self.layers)})"
                )
        if module is not None:
            if module in FUSED_PARTS:
                mods = [p for m in mods for p in (m.split() if m.kind == "qkv" else [m])]
            exact = [m for m in mods if module in (m.kind, m.key, m.name)]
            mods = exact or [m for m in mods if module in m.key]
            if not mods:
                kinds = sorted({m.kind for m in self.modules})
                raise MissingModuleError(
                    f"{self.path}: no module {module!r}"
                    + (f" at layer {layer}" if layer is not None else "")
                    + f" (kinds: {', '.join(kinds)})"
                )
        return list(mods)


def _ranges(xs: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    if not xs:
        return "none"
    out, start, prev = [], xs[0], xs[0]
    for x in [*xs[1:], None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
        if x is not None:
            start = prev = x
    return ", ".join(out)
