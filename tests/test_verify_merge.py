"""``lorascope verify-merge``: merges written by the real peft (``merge_and_unload``, fp32, bf16
with and without its float32 adapter weights, GPT-2 ``Conv1D``, DoRA) verify as ok; the same
merges corrupted in each way a merge goes wrong are caught and named."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from lorascope.formats import load_adapter
from lorascope.verify import verify_merge
from tests.conftest import build_tiny_gpt2, build_tiny_llama
from tests.test_merge import perturb_lora, run

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _merged_state(pm) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        sd = pm.merge_and_unload().state_dict()
    return {k: v.detach().clone().contiguous() for k, v in sd.items() if k != "lm_head.weight"}


@pytest.fixture
def llama(tmp_path):
    """fp32 tiny Llama: base dir, adapter dir, peft's merge as one safetensors file."""
    model = build_tiny_llama()
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    perturb_lora(pm, 1)
    pm.save_pretrained(tmp_path / "adapter")
    merged = _merged_state(pm)
    save_file(merged, tmp_path / "merged.safetensors")
    base = load_file(tmp_path / "base" / "model.safetensors")
    return tmp_path, base, merged


def _save(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def test_peft_merge_verifies_ok_and_exit_0(llama):
    tmp, _, _ = llama
    res = run(
        "verify-merge", "--base", tmp / "base", "--adapter", tmp / "adapter",
        "--merged", tmp / "merged.safetensors", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["verdict"] == "ok" and len(out["modules"]) == 2 * len(TARGETS)
    for m in out["modules"]:
        assert m["status"] == "ok" and m["bad"] == 0, m
        assert m["scale_factor"] == pytest.approx(1.0, abs=1e-5)
        assert m["lost"] < 1e-5  # float32: the update landed whole
    table = run(
        "verify-merge", "--base", tmp / "base", "--adapter", tmp / "adapter",
        "--merged", tmp / "merged.safetensors",
    )  # fmt: skip
    assert table.exit_code == 0 and "OK" in table.output


def test_each_corruption_is_named(llama):
    tmp, base, merged = llama
    ad = load_adapter(tmp / "adapter")
    mods = {m.name: m for m in ad}
    q0 = "model.layers.0.self_attn.q_proj"  # 32 × 32: square
    k0 = "model.layers.0.self_attn.k_proj"  # 16 × 32
    up1 = "model.layers.1.mlp.up_proj"
    down1 = "model.layers.1.mlp.down_proj"
    o1 = "model.layers.1.self_attn.o_proj"
    bad = dict(merged)

    def delta(name: str) -> torch.Tensor:
        return mods[name].delta(torch.float32)  # (d_out, d_in)

    w = f"{q0}.weight"
    bad[w] = base[w] + delta(q0).T  # the update added transposed
    w = f"{k0}.weight"
    bad[w] = merged[w].T.contiguous()  # the merged weight stored transposed: (32, 16)
    w = f"{up1}.weight"
    bad[w] = base[w] - delta(up1)  # sign flipped
    w = f"{down1}.weight"
    bad[w] = base[w] + 2 * delta(down1)  # scale off by 2
    w = f"{o1}.weight"
    bad[w] = base[w].clone()  # not applied
    path = _save(tmp / "bad.safetensors", bad)

    res = verify_merge(tmp / "base", tmp / "adapter", path)
    status = {m.module: m for m in res.modules}
    assert status[q0].status == "transposed" and "ΔWᵀ" in status[q0].message
    assert status[k0].status == "transposed" and "stored (32, 16)" in status[k0].message
    assert status[up1].status == "sign-flipped"
    assert status[up1].scale_factor == pytest.approx(-1.0, abs=1e-4)
    assert status[down1].status == "scale"
    assert status[down1].scale_factor == pytest.approx(2.0, abs=1e-4)
    assert status[o1].status == "not-applied" and status[o1].rows == 32
    assert status[o1].scale_factor == pytest.approx(0.0, abs=1e-6)
    broken = {q0, k0, up1, down1, o1}
    assert all(m.status == "ok" for m in res.modules if m.module not in broken)
    assert res.verdict == "mismatch"
    assert res.summary.startswith(f"partially applied: {len(ad) - 5} of {len(ad)} modules")

    cli = run(
        "verify-merge", "--base", tmp / "base", "--adapter", tmp / "adapter", "--merged", path
    )
    assert cli.exit_code == 3, cli.output
    assert "partially applied" in cli.output


def test_a_few_ulps_in_one_row_are_caught(llama):
    """The bound is tight: 64 ulps on two elements of one row are a mismatch in that row."""
    tmp, _, merged = llama
    bad = dict(merged)
    w = "model.layers.0.mlp.gate_proj.weight"
    t = bad[w].clone()
    for j in (3, 7):
        t[5, j] = t[5, j] + 64 * torch.finfo(torch.float32).eps * t[5, j].abs()
    bad[w] = t
    res = verify_merge(tmp / "base", tmp / "adapter", _save(tmp / "ulps.safetensors", bad))
    m = next(m for m in res.modules if m.tensor == w)
    assert (m.status, m.bad, m.rows) == ("mismatch", 2, 1)
    assert "in 1 of 64 rows" in m.message
    others = [x for x in res.modules if x.tensor != w]
    assert all(x.status == "ok" for x in others)


def test_nan_in_merged_is_a_mismatch_not_bad_input(llama):
    tmp, _, merged = llama
    bad = dict(merged)
    w = "model.layers.1.self_attn.v_proj.weight"
    bad[w] = bad[w].clone()
    bad[w][0, 0] = float("inf")
    path = _save(tmp / "inf.safetensors", bad)
    res = run(
        "verify-merge", "--base", tmp / "base", "--adapter", tmp / "adapter", "--merged", path
    )
    assert res.exit_code == 3, res.output
    out = verify_merge(tmp / "base", tmp / "adapter", path)
    assert next(m for m in out.modules if m.tensor == w).status == "mismatch"


def test_missing_tensor_is_bad_input_exit_2(llama):
    tmp, _, merged = llama
    less = {k: v for k, v in merged.items() if "layers.1.mlp.up_proj" not in k}
    path = _save(tmp / "less.safetensors", less)
    res = run(
        "verify-merge", "--base", tmp / "base", "--adapter", tmp / "adapter", "--merged", path
    )
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and res.output.count("\n") == 1
    assert "up_proj" in res.output


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_peft_merges_are_within_the_bound(tmp_path, autocast):
    """bf16: peft adds a float32 ΔW (autocast) or a ΔW already rounded to bf16 (not): both
    inside the bound; and the bound still catches a 2× scale."""
    model = build_tiny_llama().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
        autocast_adapter_dtype=autocast,
    )
    perturb_lora(pm, 2, size=0.2)  # ΔW large enough to survive bf16 rounding
    pm.save_pretrained(tmp_path / "adapter")
    merged = _merged_state(pm)
    path = _save(tmp_path / "m.safetensors", merged)
    res = verify_merge(tmp_path / "base", tmp_path / "adapter", path)
    assert res.verdict == "ok", [(m.module, m.status, m.bad, m.lost) for m in res.modules]
    assert {m.dtype for m in res.modules} == {"bfloat16"}

    base = load_file(tmp_path / "base" / "model.safetensors")
    m0 = load_adapter(tmp_path / "adapter").modules[0]
    w = f"{m0.name}.weight"
    merged[w] = (base[w].double() + 2 * m0.delta()).to(torch.bfloat16)
    res = verify_merge(tmp_path / "base", tmp_path / "adapter", _save(tmp_path / "x.st", merged))
    assert res.modules[0].status == "scale"
    assert res.modules[0].scale_factor == pytest.approx(2.0, rel=0.05)


def test_fp16_underflow(tmp_path):
    """A tiny ΔW on large fp16 weights: peft's merge leaves W' == W. That is the correct
    rounding (no bad element) but the update is gone: 'underflow', exit 3 unless allowed."""
    model = build_tiny_llama().half()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.uniform_(4.0, 8.0)  # half-ulp 2⁻⁹ ≈ 0.002 or more
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    perturb_lora(pm, 3, size=0.01)  # |ΔW| ~ 2·1e-4, far below half an ulp
    pm.save_pretrained(tmp_path / "adapter")
    merged = _merged_state(pm)
    base = load_file(tmp_path / "base" / "model.safetensors")
    for m in load_adapter(tmp_path / "adapter"):
        assert torch.equal(merged[f"{m.name}.weight"], base[f"{m.name}.weight"])
    path = _save(tmp_path / "m.safetensors", merged)
    res = verify_merge(tmp_path / "base", tmp_path / "adapter", path)
    assert [m.status for m in res.modules] == ["underflow", "underflow"]
    assert all(m.bad == 0 and m.lost == pytest.approx(1.0) for m in res.modules)
    args = ["verify-merge", "--base", tmp_path / "base", "--adapter", tmp_path / "adapter"]
    assert run(*args, "--merged", path).exit_code == 3
    assert run(*args, "--merged", path, "--allow-underflow").exit_code == 0


def test_gpt2_conv1d_and_dora_merges_verify(tmp_path):
    model = build_tiny_gpt2()
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=16, use_dora=True, fan_in_fan_out=True,
                   target_modules=["c_attn", "c_proj", "c_fc"]),
    )  # fmt: skip
    perturb_lora(pm, 4)
    with torch.no_grad():  # move the magnitude off ‖W‖: a real rescaling
        for n, p in pm.named_parameters():
            if "magnitude" in n:
                p.mul_(1.1)
    pm.save_pretrained(tmp_path / "adapter")
    merged = _merged_state(pm)
    path = _save(tmp_path / "m.safetensors", merged)
    res = verify_merge(tmp_path / "base", tmp_path / "adapter", path)
    assert res.verdict == "ok", [(m.module, m.status, m.bad) for m in res.modules]
    assert len(res.modules) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in 2 blocks
    base = load_file(tmp_path / "base" / "model.safetensors")
    w = "transformer.h.0.mlp.c_fc.weight"  # Conv1D (32, 128): a DoRA merge left out
    merged[w] = base[w]
    res = verify_merge(tmp_path / "base", tmp_path / "adapter", _save(tmp_path / "x.st", merged))
    assert next(m for m in res.modules if m.tensor == w).status == "not-applied"


def test_merged_blocks_equal_the_dense_merge(tmp_path, monkeypatch):
    """The block scan the checks read (one row per block here) is merged_weight, DoRA too."""
    import lorascope.update as update

    model = build_tiny_llama()
    pm = get_peft_model(model, LoraConfig(r=4, use_dora=True, target_modules=["k_proj"]))
    perturb_lora(pm, 6)
    pm.save_pretrained(tmp_path / "ad")
    m = load_adapter(tmp_path / "ad").modules[0]
    W = model.model.layers[0].self_attn.k_proj.base_layer.weight.detach()  # (16, 32)
    monkeypatch.setattr(update, "_BLOCK_BYTES", 32 * 8)  # one float64 row per block
    blocks = list(update.merged_blocks(m, W))
    assert [i for i, _, _ in blocks] == list(range(16))
    got = torch.cat([new for _, _, new in blocks])
    torch.testing.assert_close(got, update.merged_weight(m, W, dtype=torch.float64))
    plain = update.merged_weight(replace(m, magnitude=None), W, dtype=torch.float64)
    assert not torch.allclose(got, plain)  # the magnitude did rescale
