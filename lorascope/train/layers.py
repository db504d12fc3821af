"""LoRA layers: a frozen weight plus a trainable low-rank update (Hu et al. 2021, eq. 3).

``h = W0 x + s · B A x`` with ``W0`` of shape ``(d_out, d_in)``, ``A`` of shape ``(r, d_in)``
(Kaiming-uniform init), ``B`` of shape ``(d_out, r)`` (zero init, so ``ΔW = 0`` at step 0) and
``s = alpha / r`` (rsLoRA, Kalajdzievski 2023: ``alpha / sqrt(r)``). Dropout acts on the input of
the low-rank path only, as in loralib and peft.

The layers *take over* the base layer's ``weight`` and ``bias`` parameters under the same names,
so a state dict keeps the base model's keys (``...query.weight``) and adds ``lora_A`` and
``lora_B`` beside them (loralib's layout). GPT-2's ``Conv1D`` stores its weight transposed,
``(d_in, d_out)``: such a base is wrapped with ``fan_in_fan_out=True`` and every transpose is
marked below. The factors themselves are always in ``nn.Linear`` orientation.

``merge()`` folds ``ΔW`` into the weight; afterwards the forward pass is the plain base layer
(no extra latency, paper §4.1). ``unmerge()`` subtracts it again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorascope.errors import ShapeError

__all__ = ["LoRALinear", "MergedLoRALinear", "lora_scale"]


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The update's scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.

    >>> lora_scale(8, 16), lora_scale(4, 8, use_rslora=True)
    (2.0, 4.0)
    """
    if r <= 0:
        raise ShapeError(f"LoRA rank must be positive, got r={r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D`` (weight ``(d_in, d_out)``), by duck type."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class _LoRABase(nn.Module):
    """Shared state of the LoRA layers: the taken-over base parameters and the merge flag."""

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        fan_in_fan_out: bool | None,
    ) -> None:
        super().__init__()
        self.fan_in_fan_out = _is_conv1d(base) if fan_in_fan_out is None else fan_in_fan_out
        self.weight = base.weight  # (out, in), or (in, out) when fan_in_fan_out
        self.bias = base.bias  # (out,) or None
        self.weight.requires_grad_(False)
        d_in, d_out = self.weight.shape[::-1] if not self.fan_in_fan_out else self.weight.shape
        self.in_features, self.out_features = int(d_in), int(d_out)
        self.r, self.alpha, self.use_rslora = int(r), float(alpha), bool(use_rslora)
        self.scale = lora_scale(self.r, self.alpha, self.use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def _w(self) -> torch.Tensor:
        """The base weight in ``(out, in)`` orientation (a view)."""
        return self.weight.T if self.fan_in_fan_out else self.weight  # Conv1D: (in, out).T

    def delta_weight(self) -> torch.Tensor:
        """Dense ``ΔW = s · B @ A`` of shape ``(d_out, d_in)`` (for merging and tests)."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``ΔW`` into the base weight; the forward pass becomes the plain base layer."""
        if not self.merged:
            self._w().add_(self.delta_weight().to(self.weight.dtype))  # in place through the view
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ``ΔW`` from the base weight again (exact up to floating-point rounding)."""
        if self.merged:
            self._w().sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._w(), self.bias)  # (..., in) -> (..., out)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha:g}, "
            f"scale={self.scale:g}, fan_in_fan_out={self.fan_in_fan_out}, merged={self.merged}"
        )


class LoRALinear(_LoRABase):
    """``nn.Linear`` (or GPT-2 ``Conv1D``) with a LoRA update ``s · B A``.

    Parameters
    ----------
    base : nn.Module
        The layer to adapt: ``nn.Linear`` with weight ``(d_out, d_in)``, or a ``Conv1D`` with
        weight ``(d_in, d_out)``. Its ``weight`` and ``bias`` are taken over, frozen.
    r : int
        Rank of the update.
    alpha : float
        Scale numerator: ``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
    dropout : float
        Dropout probability on the input of the low-rank path.
    use_rslora : bool
        Use the rank-stabilised scale ``alpha / sqrt(r)``.
    fan_in_fan_out : bool or None
        Whether the base weight is stored ``(d_in, d_out)``; ``None`` detects ``Conv1D``.

    Attributes
    ----------
    lora_A : nn.Parameter
        ``(r, d_in)``, Kaiming-uniform (``a = sqrt(5)``, as ``nn.Linear`` and peft).
    lora_B : nn.Parameter
        ``(d_out, r)``, zeros.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float = 1.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        fan_in_fan_out: bool | None = None,
    ) -> None:
        super().__init__(base, r, alpha, dropout, use_rslora, fan_in_fan_out)
        dev, dt = self.weight.device, self.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)  # (out, r) @ (r, in) -> (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., d_in) -> (..., d_out)``."""
        y = self._base_forward(x)  # (..., out)
        if self.merged:
            return y
        h = self.dropout(x) @ self.lora_A.T  # (..., in) @ (in, r) -> (..., r)
        # y + s · h Bᵀ in one kernel: (..., r) @ (r, out) -> (..., out)
        return torch.add(y, h @ self.lora_B.T, alpha=self.scale)


class MergedLoRALinear(_LoRABase):
    """A fused projection (GPT-2 ``c_attn``: q, k, v stacked) with one LoRA per enabled part.

    The base output of size ``d_out = n · d`` is split into ``n = len(enable_lora)`` equal parts;
    part ``p`` gets its own ``B_p A_p`` when ``enable_lora[p]``. Storage follows loralib's
    ``MergedLinear``: ``lora_A`` stacks the enabled parts' ``A_p`` row-wise, ``(k·r, d_in)``,
    and ``lora_B`` stacks their ``B_p``, ``(k·d, r)``, for ``k`` enabled parts.

    Parameters
    ----------
    base, r, alpha, dropout, use_rslora, fan_in_fan_out :
        As in :class:`LoRALinear`.
    enable_lora : sequence of bool
        Which parts get an update, e.g. ``(True, False, True)`` for q and v of a fused qkv.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float = 1.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        fan_in_fan_out: bool | None = None,
        enable_lora: tuple[bool, ...] = (True, False, True),
    ) -> None:
        super().__init__(base, r, alpha, dropout, use_rslora, fan_in_fan_out)
        n = len(enable_lora)
        if n == 0 or self.out_features % n or not any(enable_lora):
            raise ShapeError(
                f"cannot split output size {self.out_features} into {n} parts with "
                f"enable_lora={tuple(enable_lora)}"
            )
        self.enable_lora = tuple(bool(e) for e in enable_lora)
        self.part_size = self.out_features // n
        parts = [p for p, e in enumerate(self.enable_lora) if e]
        k, d = len(parts), self.part_size
        # output rows each enabled part writes: (k·d,)
        rows = torch.cat([torch.arange(p * d, (p + 1) * d) for p in parts])
        self.register_buffer("part_rows", rows, persistent=False)
        dev, dt = self.weight.device, self.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(k * self.r, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(k * d, self.r, device=dev, dtype=dt))
        for A_p in self.lora_A.data.split(self.r):  # each part initialised like a LoRALinear
            nn.init.kaiming_uniform_(A_p, a=math.sqrt(5))

    @property
    def n_enabled(self) -> int:
        return sum(self.enable_lora)

    def _part_updates(self, h: torch.Tensor) -> torch.Tensor:
        """``(..., k·r) -> (..., k·d)``: each part's ``B_p`` applied to its own ``A_p x``."""
        k, r, d = self.n_enabled, self.r, self.part_size
        h = h.unflatten(-1, (k, r))  # (..., k, r)
        B = self.lora_B.view(k, d, r)  # (k, d, r)
        return torch.einsum("...kr,kdr->...kd", h, B).flatten(-2)  # (..., k·d)

    def delta_weight(self) -> torch.Tensor:
        k, r, d = self.n_enabled, self.r, self.part_size
        A = self.lora_A.view(k, r, self.in_features)  # (k, r, in)
        B = self.lora_B.view(k, d, r)  # (k, d, r)
        blocks = (B @ A).reshape(k * d, self.in_features)  # (k, d, in) -> (k·d, in)
        delta = self.lora_A.new_zeros(self.out_features, self.in_features)  # (out, in)
        delta[self.part_rows] = self.scale * blocks
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., d_in) -> (..., d_out)``; rows of disabled parts get the base output only."""
        y = self._base_forward(x)  # (..., out)
        if self.merged:
            return y
        h = self.dropout(x) @ self.lora_A.T  # (..., in) @ (in, k·r) -> (..., k·r)
        upd = self.scale * self._part_updates(h)  # (..., k·d)
        return y.index_add(-1, self.part_rows, upd)  # scatter into the enabled parts' rows

    def extra_repr(self) -> str:
        return super().extra_repr() + f", enable_lora={self.enable_lora}"
