"""The normalized adapter model every reader produces and every analysis consumes.

A LoRA module adapts a frozen weight ``W0`` of shape ``(d_out, d_in)`` (``nn.Linear``
orientation) by ``ΔW = scale · B @ A`` with ``A`` of shape ``(r, d_in)`` and ``B`` of shape
``(d_out, r)`` (Hu et al. 2021, eq. 3). Readers normalize every on-disk layout to this
orientation: GPT-2 ``Conv1D`` / ``fan_in_fan_out`` files, embeddings and conv kernels included.
The tensors keep the dtype they had on disk; the linear-algebra core upcasts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lorascope.columns import Column, Tabular, html_table, ident_columns
from lorascope.errors import MissingModuleError, ShapeError

__all__ = [
    "LoraModule",
    "alpha_from_scale",
    "Magnitude",
    "Adapter",
    "parse_layer",
    "parse_kind",
    "FUSED_PARTS",
    "FAMILIES",
    "UPDATES",
]

# The parts of a fused projection, in the order their rows are stacked (GPT-2 c_attn,
# GPT-NeoX query_key_value, Phi/Falcon-style Wqkv, loralib MergedLinear).
FUSED_PARTS = ("q", "k", "v")

# Update families, each normalized on load to the exact factored form ΔW = s·B' A' (see
# lorascope.families for the kernels): the additive ones are the whole update; "dora" is LoRA
# whose merged weight is rescaled by a learned magnitude (see Magnitude).
FAMILIES = ("lora", "dora", "adalora", "vera", "loha", "lokr")

# What a module's factored form ``s·B A`` stands for, named in every result's ``update`` field:
#   full         the whole update ΔW (every additive family);
#   dora-direction  DoRA read without its base: only the rank-r part s·B A, before the
#                magnitude rescaling (the true ΔW = diag(g − 1)·W + diag(g)·s·B A needs W);
#   dora-rank-r  DoRA with its base: the rank-r part diag(g)·s·B A of the true update exactly
#                (the rest, diag(g − 1)·W, is a rescaling of W's rows).
UPDATES = ("full", "dora-direction", "dora-rank-r")

# Module kinds by the last name component(s). Keys are regular expressions matched against the
# tail of the dotted (or, for kohya, underscored) module name; first match wins.
_KIND_RULES: tuple[tuple[str, str], ...] = (
    # fused q/k/v
    (r"(c_attn|qkv|qkv_proj|query_key_value|wqkv|in_proj)", "qkv"),
    # attention output (before the generic MLP "output.dense" rule)
    (r"attention[._]output[._]dense", "o"),
    (r"(attn|attention)[._](c_proj|dense|out_proj)", "o"),
    (r"(o_proj|out_proj|output_proj|to_out[._]0|to_out|wo|out_lin|attn_output|o)", "o"),
    (r"(query|q_proj|q_lin|to_q|wq|attn_q|q)", "q"),
    (r"(key|k_proj|k_lin|to_k|wk|attn_k|k)", "k"),
    (r"(value|v_proj|v_lin|to_v|wv|attn_v|v)", "v"),
    # MoE routers (a "gate" that picks experts, not the MLP's gate projection)
    (r"(block_sparse_moe[._]gate|mlp[._]gate|shared_expert_gate|ffn_gate_inp|router)", "router"),
    # MLP: gate / up (into the wide hidden) / down (back to d_model)
    (r"(gate_proj|w1|gate|ffn_gate|ffn_gate_exps|ffn_gate_shexp)", "gate"),
    (
        r"(intermediate[._]dense|up_proj|c_fc|fc1|lin1|dense_h_to_4h|w3|ff[._]net[._]0[._]proj"
        r"|ffn_up|ffn_up_exps|ffn_up_shexp)",
        "up",
    ),
    (
        r"(output[._]dense|down_proj|mlp[._]c_proj|fc2|lin2|dense_4h_to_h|w2|ff[._]net[._]2"
        r"|ffn_down|ffn_down_exps|ffn_down_shexp)",
        "down",
    ),
    (r"(embed_tokens|wte|word_embeddings|embeddings|embed|shared|token_embd)", "embed"),
)
_KIND_RES = tuple(
    (re.compile(rf"(?:^|[._]){pat}$", re.IGNORECASE), kind) for pat, kind in _KIND_RULES
)

# Containers whose next component is the block index: h.3, layer.3, layers.3, blocks.3, block.3,
# blk.3 (llama.cpp), double_blocks.3 / single_blocks.3 (Flux).
_LAYER_RE = re.compile(
    r"(?:^|[._])(?:h|layer|layers|blocks|block|blk|transformer_blocks|single_transformer_blocks"
    r"|double_blocks|single_blocks)[._](\d+)(?:[._]|$)"
)
_ANY_INT_RE = re.compile(r"(?:^|[._])(\d+)(?:[._]|$)")


def parse_layer(name: str) -> int | None:
    """Block index of a module name, e.g. ``transformer.h.11.attn.c_attn`` -> 11.

    Looks for the index after a known container (``h``, ``layer``, ``layers``, ``blocks``,
    ``block``); falls back to the first integer component; ``None`` when there is none.
    """
    m = _LAYER_RE.search(name) or _ANY_INT_RE.search(name)
    if not m or len(m.group(1)) > 9:  # not a block index (a hash, a date, a hostile name)
        return None
    return int(m.group(1))


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


def alpha_from_scale(scale: float, r: int, use_rslora: bool = False) -> float:
    """The ``lora_alpha`` that gives ``scale`` at rank ``r``: ``scale·r``, or ``scale·sqrt(r)``
    with rsLoRA (Kalajdzievski 2023) — the inverse of ``s = alpha / r`` (Hu et al. 2021, §4.1)
    and of rsLoRA's ``s = alpha / sqrt(r)``. Writers and rank suggestions use it to keep a
    module's scale when its rank changes or the file must store an alpha.

    >>> alpha_from_scale(2.0, 8), alpha_from_scale(4.0, 4, use_rslora=True)
    (16.0, 8.0)
    """
    return float(scale) * (math.sqrt(r) if use_rslora else float(r))


@dataclass(frozen=True, eq=False)
class Magnitude:
    """DoRA's learned magnitude (Liu et al. 2024): the merged weight is rescaled by ``g``.

    ``axis="out"`` (PEFT Linear/Conv, LyCORIS ``wd_on_out=True``, mlx, diffusers): one norm per
    output row, ``W' = diag(g)·(W + ΔW_lr)`` with ``g = m / ‖(W + ΔW_lr)[i, :]‖``.
    ``axis="in"`` (PEFT Embedding, LyCORIS ``wd_on_out=False``): one norm per input column (per
    group of ``d_in / len(m)`` consecutive columns: a conv input channel's kernel), and
    ``W' = (W + ΔW_lr)·diag(g)``. The true update is then ``ΔW = W' − W``: a rescaling of ``W``
    plus the factored part scaled by ``g`` (see :mod:`lorascope.update`).

    Attributes
    ----------
    m : torch.Tensor
        ``(d_out,)`` for ``axis="out"``, ``(n_groups,)`` for ``axis="in"``; dtype as stored.
    axis : {"out", "in"}
    key : str
        Its tensor name in the file.
    eps : float
        Added to the norm before dividing, where the producing library does (LyCORIS:
        ``m / (‖W + ΔW‖ + eps)``); 0 for PEFT, mlx-lm and diffusers.
    """

    m: torch.Tensor
    axis: str = "out"
    key: str = ""
    eps: float = 0.0


def _norm(name: str) -> Callable[[LoraModule], float]:
    def get(m: LoraModule) -> float:
        from lorascope.linalg import safe_norm

        return safe_norm(getattr(m, name))

    return get


# What `lorascope inspect` and a notebook show per module (the JSON: LoraModule.to_dict).
_MODULE_COLUMNS = (
    Column("module", get=lambda m: m.key, doc="module name (key in the adapter)"),
    *ident_columns(rank=False)[1:],
    Column("rank", doc="width k of the exact factored form ΔW = s·B' A'"),
    Column(
        "family",
        get=lambda m: m.family + ("+dora" if m.is_dora and m.family != "dora" else ""),
        doc="update family (+dora: with a DoRA magnitude)",
    ),
    Column("r", doc="the configured rank"),
    Column("params", doc="trainable parameters stored"),
    Column("d_out", doc="rows of ΔW"),
    Column("d_in", doc="columns of ΔW"),
    Column("scale", doc="s in ΔW = s·B A"),
    Column("alpha", doc="the alpha s came from"),
    Column("dtype", get=lambda m: str(m.A.dtype).removeprefix("torch."), doc="stored dtype"),
    Column("norm_A", get=_norm("A"), doc="‖A‖_F"),
    Column("norm_B", get=_norm("B"), doc="‖B‖_F"),
)


@dataclass(frozen=True, eq=False)
class LoraModule(Tabular):
    """One adapted weight: its update in the exact factored form ``ΔW = scale · B @ A``.

    Every family is normalized to this on load (:mod:`lorascope.families`): LoRA's own factors;
    AdaLoRA ``B, (E ⊙ A)``; VeRA ``diag(λ_b)·B_s, diag(λ_d)·A_s``; LoHa's face-splitting and
    Khatri–Rao products (width ``r1·r2``); LoKr's Kronecker products of its factors. So the
    analyses need no special case: ``rank`` is the width ``k`` of that form (a bound on the rank
    of ΔW), ``nominal_rank`` the ``r`` the user chose.

    Attributes
    ----------
    name : str
        Module path as in the model, without PEFT's ``base_model.model.`` prefix
        (e.g. ``transformer.h.0.attn.c_attn``).
    A : torch.Tensor
        ``(k, d_in)`` right factor, dtype as stored (or as the family's product came out).
    B : torch.Tensor
        ``(d_out, k)`` left factor.
    scale : float
        ``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``; the family's own rule), resolved per module.
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
    family : str
        One of :data:`FAMILIES`.
    nominal_rank : int | None
        The rank the adapter was configured with (LoHa ``r``, not ``r²``); None: ``rank``.
    n_params : int | None
        Trainable parameters the file stores for this module; None: ``A`` and ``B``'s sizes.
    magnitude : Magnitude | None
        DoRA's magnitude vector (then ``s·B A`` is not the whole update).
    update : str
        What ``s·B A`` stands for (:data:`UPDATES`): ``"full"``, or for DoRA
        ``"dora-direction"`` (no base) / ``"dora-rank-r"`` (``diag(g)`` folded in from the base).
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
    family: str = "lora"
    nominal_rank: int | None = None
    n_params: int | None = None
    magnitude: Magnitude | None = None
    update: str = "full"

    COLUMNS = _MODULE_COLUMNS

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
    def r(self) -> int:
        """The configured rank: ``nominal_rank``, else the width of the factored form."""
        return self.nominal_rank if self.nominal_rank is not None else self.rank

    @property
    def params(self) -> int:
        """Trainable parameters of this module as stored (``n_params``, else ``|A| + |B|``)."""
        if self.n_params is not None:
            return self.n_params
        return int(self.A.numel() + self.B.numel())

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

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

    def to_dict(self) -> dict:
        """JSON-ready summary (what ``lorascope inspect --json`` prints, without ``format``)."""
        get = {c.name: c for c in self.COLUMNS}
        return {
            "module": self.key,
            "layer": self.layer,
            "kind": self.kind,
            "rank": self.rank,
            "family": self.family,
            "r": self.r,
            "params": self.params,
            "dora": self.is_dora,
            "update": self.update,
            "shape": [self.d_out, self.d_in],
            "scale": float(self.scale),
            "alpha": self.alpha,
            "dtype": get["dtype"].value(self),
            "norm_A": get["norm_A"].value(self),
            "norm_B": get["norm_B"].value(self),
            "source": self.source,
        }

    def caption(self) -> str:
        return (
            f"LoraModule · {self.key} · {self.family} · rank {self.rank} · "
            f"{self.d_out}×{self.d_in} · scale {self.scale:.4g}"
        )

    def tensor_name(self) -> str:
        """``file: key`` text for error messages."""
        keys = " / ".join(self.keys) if self.keys else self.key
        return f"{self.source}: {keys}"

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense ``scale · B @ A``, ``(d_out, d_in)``: the whole ΔW unless ``update`` says
        otherwise (DoRA: :func:`lorascope.update.delta_weight` with the base). For tests and
        small modules only: the analyses work from the factors and never call this."""
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
        mag = self.magnitude
        if mag is not None and mag.axis != "out":
            raise ShapeError(
                f"{self.tensor_name()}: a DoRA magnitude over input columns couples the fused "
                "parts; analyse the whole module"
            )
        return [
            replace(
                self,
                B=self.B[p * d : (p + 1) * d],
                part=FUSED_PARTS[p],
                kind=FUSED_PARTS[p],
                rows=(p * d, (p + 1) * d),
                magnitude=None if mag is None else replace(mag, m=mag.m[p * d : (p + 1) * d]),
                n_params=None,
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
        The file layout (:data:`lorascope.formats.FORMATS`): ``peft``, ``diffusers``, ``kohya``
        (sd-scripts and LyCORIS), ``loralib``, ``plain``, ``hdf5``, ``gguf``, ``mlx`` or
        ``torchtune``; the update family is each module's ``family``.
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
    def families(self) -> list[str]:
        """The update families of the modules, in first-seen order."""
        return list(dict.fromkeys(m.family for m in self.modules))

    @property
    def layers(self) -> list[int]:
        return sorted({m.layer for m in self.modules if m.layer is not None})

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules})

    def records(self, modules: list[LoraModule] | None = None) -> list[dict]:
        """One JSON-ready dict per module (default all; ``lorascope inspect --json``):
        :meth:`LoraModule.to_dict` plus the file ``format``."""
        out = []
        for m in self.modules if modules is None else modules:
            d = m.to_dict()
            source = d.pop("source")
            out.append({**d, "format": self.format, "source": source})
        return out

    def caption(self, n: int | None = None) -> str:
        """``path (format, families): N modules, rank r1, r2`` (the inspect table's title)."""
        ranks = ", ".join(map(str, self.ranks))
        n = len(self.modules) if n is None else n
        return f"{self.path} ({self.format}, {', '.join(self.families)}): {n} modules, rank {ranks}"

    def _repr_html_(self) -> str:
        """A header line (file, format, families, ranks) and one row per module."""
        rows = [m.row() for m in self.modules]
        table = html_table(_MODULE_COLUMNS, rows, caption=f"Adapter · {self.caption()}")
        return f'<div class="lorascope-result">{table}</div>'

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
