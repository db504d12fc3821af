"""One rule for alpha from a scale (``alpha = s·r``, rsLoRA ``s·sqrt(r)``), checked against
the scale peft itself computes from a LoraConfig and against lorascope's own scale rules."""

from __future__ import annotations

import pytest
from conftest import build_tiny_gpt2
from peft import LoraConfig, get_peft_model

from lorascope.adapter import alpha_from_scale
from lorascope.formats._common import scale_for
from lorascope.train.layers import lora_scale


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("r", [1, 3, 8])
def test_peft_scales_an_alpha_from_scale_back_to_the_scale(r, use_rslora):
    s = 0.37
    alpha = alpha_from_scale(s, r, use_rslora)
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=["c_attn"])
    layer = get_peft_model(build_tiny_gpt2(), cfg).base_model.model.transformer.h[0].attn.c_attn
    assert layer.scaling["default"] == pytest.approx(s, rel=1e-15)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("s", [2.0, 0.125, -0.5, 1 / 3])
@pytest.mark.parametrize("r", [1, 2, 7, 64])
def test_inverse_of_the_scale_rules(s, r, use_rslora):
    alpha = alpha_from_scale(s, r, use_rslora)
    assert scale_for(alpha, r, use_rslora) == pytest.approx(s, rel=1e-15)
    assert lora_scale(r, alpha, use_rslora) == pytest.approx(s, rel=1e-15)
