"""``lorascope merge --rounding peft``: bit-identical to the real peft's ``merge_and_unload`` on
CPU (fp32, fp16 and bf16 models; GPT-2 ``Conv1D``; embeddings and conv kernels; a base loaded in a
lower dtype than stored), while the default keeps its single rounding of ``W + ΔW``."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

from lorascope.adapter import Adapter
from lorascope.cli.main import main
from lorascope.errors import LoraScopeError
from lorascope.formats import load_adapter
from lorascope.merge import merge_adapter
from tests.conftest import build_tiny_gpt2, build_tiny_llama
from tests.test_merge import peft_merged, perturb_lora, tensors_of


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1), b.view(-1))


def assert_bit_identical(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Every tensor peft wrote is in ``got`` with the same dtype and the same bits (tied weights
    such as GPT-2's ``lm_head`` are not in the checkpoint)."""
    missing = [k for k in got if k not in expected]
    assert not missing, missing
    for key, t in got.items():
        assert bits_equal(t, expected[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_llama_bit_identical_to_merge_and_unload(tmp_path, dtype):
    model = build_tiny_llama().to(dtype)
    model.save_pretrained(tmp_path / "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    perturb_lora(pm, 1)
    pm.save_pretrained(tmp_path / "adapter")
    expected = peft_merged(pm)

    res = CliRunner().invoke(
        main,
        [
            "merge", "--base", str(tmp_path / "base"), "--delta", str(tmp_path / "adapter"),
            "--out", str(tmp_path / "peft"), "--rounding", "peft",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    got = tensors_of(tmp_path / "peft")
    assert {t.dtype for t in got.values()} == {dtype}
    assert_bit_identical(got, expected)
    adapted = {f"{m.name}.weight" for m in load_adapter(tmp_path / "adapter")}
    base = tensors_of(tmp_path / "base")
    assert all(not torch.equal(got[k], base[k]) for k in adapted)  # the update did land


def test_gpt2_conv1d_fp16_bit_identical(tmp_path):
    model = build_tiny_gpt2().half()
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"],
                   fan_in_fan_out=True),
    )  # fmt: skip
    perturb_lora(pm, 2)
    pm.save_pretrained(tmp_path / "adapter")
    expected = peft_merged(pm)
    merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "m", rounding="peft")
    assert_bit_identical(tensors_of(tmp_path / "m"), expected)


class _Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.conv = torch.nn.Conv2d(3, 6, kernel_size=3)
        self.pw = torch.nn.Conv2d(6, 4, kernel_size=1)
        self.fc = torch.nn.Linear(8, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_and_convs_bit_identical(tmp_path, dtype):
    model = _Small().to(dtype)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors"
    )
    pm = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=3, target_modules=["emb", "conv", "pw", "fc"])
    )
    perturb_lora(pm, 3)
    pm.save_pretrained(tmp_path / "adapter")
    expected = peft_merged(pm)
    merge_adapter(tmp_path / "w.safetensors", tmp_path / "adapter", tmp_path / "m", rounding="peft")
    got = tensors_of(tmp_path / "m")
    assert sorted(got) == sorted(expected)
    assert_bit_identical(got, expected)
    # the default arithmetic is not peft's here: fp32 convs go through conv2d in peft, and
    # peft rounds a bf16 embedding's ΔW to bf16 before adding it
    merge_adapter(tmp_path / "w.safetensors", tmp_path / "adapter", tmp_path / "single")
    single = tensors_of(tmp_path / "single")
    differs = {k for k in got if not bits_equal(single[k], got[k])}
    assert differs == ({"conv.weight"} if dtype == torch.float32 else {"emb.weight"})


def test_lower_dtype_load_differs_from_single_rounding(tmp_path):
    """A float32 base merged to bfloat16: peft loads W in bf16 (one rounding) and adds ΔW (a
    second); ``--rounding peft --dtype bfloat16`` gives exactly that, the default rounds
    ``W + ΔW`` once and is closer to the float64 sum."""
    from transformers import LlamaForCausalLM

    model = build_tiny_llama()
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    perturb_lora(pm, 4)
    pm.save_pretrained(tmp_path / "adapter")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    expected = peft_merged(PeftModel.from_pretrained(loaded, tmp_path / "adapter"))

    bf16 = torch.bfloat16
    peft_like = merge_adapter(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "p", dtype=bf16, rounding="peft"
    )
    assert peft_like.rounding == "peft"
    got_peft = tensors_of(tmp_path / "p")
    assert_bit_identical(got_peft, expected)

    merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "s", dtype=bf16)
    got_single, base = tensors_of(tmp_path / "s"), tensors_of(tmp_path / "base")
    differs, err_single, err_peft = 0, 0.0, 0.0
    for m in load_adapter(tmp_path / "adapter"):
        key = f"{m.name}.weight"
        exact = base[key].double() + m.delta()  # float64 reference of W + ΔW
        differs += int((got_single[key] != got_peft[key]).sum())
        err_single += float((got_single[key].double() - exact).abs().sum())
        err_peft += float((got_peft[key].double() - exact).abs().sum())
        # the default is the correctly rounded sum of float32 W and ΔW
        ref = (base[key] + m.delta(torch.float32)).to(bf16)
        assert bits_equal(got_single[key], ref), key
    assert differs > 0  # the two roundings are not the same arithmetic
    assert err_single < err_peft


def test_peft_rounding_refuses_what_peft_does_not_merge_this_way(tmp_path):
    model = build_tiny_gpt2()
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    perturb_lora(pm, 5)
    pm.save_pretrained(tmp_path / "adapter")
    whole = load_adapter(tmp_path / "adapter")["transformer.h.0.attn.c_attn"]
    parts = Adapter(modules=whole.split()[:1], path="parts", format="plain")
    with pytest.raises(LoraScopeError, match="fused part") as info:
        merge_adapter(tmp_path / "base", parts, tmp_path / "o", rounding="peft")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()
    with pytest.raises(LoraScopeError, match="rounding"):
        merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "o", rounding="twice")
