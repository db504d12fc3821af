"""LoRA layers, injection, merge/unmerge and patterns (lorascope.train.layers / inject)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorascope.errors import MissingModuleError, ShapeError
from lorascope.train import (
    LoRALinear,
    MergedLoRALinear,
    count_parameters,
    inject,
    lora_scale,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge,
    unmerge,
)

torch.set_num_threads(1)


def _randomize(layer: nn.Module, seed: int = 0) -> None:
    """Give B (zero at init) random values so ΔW != 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(8, 8)
        self.key = nn.Linear(8, 8)
        self.value = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.query(x) + self.key(x) * self.value(x))


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([_Block(), _Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.layer:
            x = torch.cat([b(x), b(x)], -1)
        return x


def test_init_b_zero_and_delta_zero():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    ref = F.linear(torch.ones(1, 16), base.weight, base.bias)
    layer = LoRALinear(base, r=4, alpha=8)
    assert layer.lora_A.shape == (4, 16) and layer.lora_B.shape == (12, 4)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()  # Kaiming, not zeros
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) bound for fan_in 16
    assert layer.lora_A.abs().max() <= bound
    assert torch.count_nonzero(layer.delta_weight()) == 0
    assert torch.equal(layer(torch.ones(1, 16)), ref)  # ΔW = 0: exactly the base layer


def test_takes_over_base_parameters_and_names():
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, r=2)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}


def test_forward_matches_formula():
    torch.manual_seed(1)
    layer = LoRALinear(nn.Linear(10, 7), r=3, alpha=6)
    _randomize(layer)
    x = torch.randn(2, 5, 10)
    want = x @ layer.weight.T + layer.bias + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), want)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.lora_B @ layer.lora_A)


def test_merge_unmerge_restores_weight_and_outputs_agree():
    torch.manual_seed(2)
    layer = LoRALinear(nn.Linear(32, 24), r=4, alpha=16)
    _randomize(layer)
    w0 = layer.weight.detach().clone()
    x = torch.randn(3, 32)
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.weight, w0 + layer.delta_weight())
    # merged forward is the plain base layer: no low-rank path left
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    layer.merge()  # idempotent
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), y, atol=1e-6, rtol=1e-6)


def test_scale_alpha_over_r_and_rslora():
    assert lora_scale(8, 16) == 2.0
    assert lora_scale(16, 8, use_rslora=True) == 2.0
    with pytest.raises(ShapeError):
        lora_scale(0, 8)
    layer = LoRALinear(nn.Linear(4, 4), r=4, alpha=8, use_rslora=True)
    _randomize(layer)
    assert layer.scale == 4.0  # 8 / sqrt(4)
    torch.testing.assert_close(layer.delta_weight(), 4.0 * layer.lora_B @ layer.lora_A)


def test_dropout_only_on_low_rank_path():
    torch.manual_seed(3)
    layer = LoRALinear(nn.Linear(8, 8), r=2, dropout=0.9)
    x = torch.randn(4, 8)
    layer.train()
    base = F.linear(x, layer.weight, layer.bias)
    assert torch.equal(layer(x), base)  # B = 0: dropout cannot change anything
    _randomize(layer)
    layer.eval()
    torch.testing.assert_close(layer(x), base + x @ layer.delta_weight().T)


def test_conv1d_fan_in_fan_out_detected():
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(4)
    conv = Conv1D(nf=12, nx=8)  # weight (in=8, out=12)
    x = torch.randn(2, 3, 8)
    ref = conv(x)
    layer = LoRALinear(conv, r=2, alpha=4)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (8, 12)
    assert layer.lora_A.shape == (2, 8) and layer.lora_B.shape == (12, 2)
    torch.testing.assert_close(layer(x), ref)
    _randomize(layer)
    y = layer(x)
    torch.testing.assert_close(y, ref + x @ layer.delta_weight().T)
    w0 = layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer.weight, w0 + layer.delta_weight().T)  # stored (in, out)
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, atol=1e-6, rtol=0)


def test_merged_lora_linear_parts():
    torch.manual_seed(5)
    fused = nn.Linear(8, 3 * 6)  # q, k, v of size 6
    x = torch.randn(2, 8)
    layer = MergedLoRALinear(fused, r=2, alpha=4, enable_lora=(True, False, True))
    assert layer.lora_A.shape == (4, 8) and layer.lora_B.shape == (12, 2)
    assert torch.count_nonzero(layer.delta_weight()) == 0
    _randomize(layer)
    delta = layer.delta_weight()
    assert torch.count_nonzero(delta[6:12]) == 0  # k untouched
    A_q, A_v = layer.lora_A[:2], layer.lora_A[2:]
    B_q, B_v = layer.lora_B[:6], layer.lora_B[6:]
    torch.testing.assert_close(delta[:6], 2.0 * B_q @ A_q)
    torch.testing.assert_close(delta[12:], 2.0 * B_v @ A_v)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, fused.weight, fused.bias) + x @ delta.T)
    w0 = layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, atol=1e-6, rtol=0)
    with pytest.raises(ShapeError):
        MergedLoRALinear(nn.Linear(8, 10), r=2, enable_lora=(True, False, True))


def test_inject_patterns_and_trainable():
    torch.manual_seed(6)
    model = _Tiny()
    names = inject(
        model,
        ["query", "value"],
        r=4,
        alpha=8,
        rank_pattern={"layer.1.query": 2},
        alpha_pattern={"value": 3},
    )
    assert names == ["layer.0.query", "layer.0.value", "layer.1.query", "layer.1.value"]
    assert model.layer[0].query.r == 4 and model.layer[1].query.r == 2
    assert model.layer[0].query.alpha == 8 and model.layer[0].value.alpha == 3
    assert isinstance(model.layer[0].key, nn.Linear) and not isinstance(
        model.layer[0].key, LoRALinear
    )
    mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{m}" for n in names for m in "AB"}
    assert count_parameters(model) == sum(r * 8 + 8 * r for r in (4, 4, 2, 4))
    assert set(lora_state_dict(model)) == trainable
    mark_only_lora_as_trainable(model, also=("layer.0.out",))
    assert model.layer[0].out.weight.requires_grad
    # a regex string must match the whole name
    assert inject(_Tiny(), r"layer\.1\.(key|value)", r=1) == ["layer.1.key", "layer.1.value"]
    with pytest.raises(MissingModuleError):
        inject(_Tiny(), ["nothing_here"])


def test_model_merge_equals_unmerged():
    torch.manual_seed(7)
    model = _Tiny()
    x = torch.randn(5, 8)
    y0 = model(x)
    inject(model, ["query", "key", "value", "out"], r=3, alpha=5)
    assert torch.equal(model(x), y0)  # ΔW = 0 at init
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            _randomize(m, seed=len(n))
    y = model(x)
    assert not torch.allclose(y, y0)
    merge(model)
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
    unmerge(model)
    torch.testing.assert_close(model(x), y, atol=1e-6, rtol=1e-6)


def test_gradients_reach_only_factors():
    torch.manual_seed(8)
    layer = LoRALinear(nn.Linear(6, 6), r=2)
    layer(torch.randn(3, 6)).sum().backward()
    assert layer.weight.grad is None
    assert layer.lora_A.grad is not None and torch.count_nonzero(layer.lora_A.grad) == 0  # B = 0
    assert torch.count_nonzero(layer.lora_B.grad) > 0
