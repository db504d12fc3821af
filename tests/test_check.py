"""``lorascope check``: CI verdicts on adapters written by the real peft, each finding checked
against an independent computation (dense numpy SVD, the dense merged weight, the intruders
command), and the exit status: 0 pass, 3 fail, 2 bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from lorascope.check import Thresholds, check_adapter
from lorascope.errors import LoraScopeError
from lorascope.formats import load_adapter, write_peft_adapter
from tests.conftest import build_tiny_llama
from tests.test_merge import perturb_lora, run

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def case(tmp_path):
    model = build_tiny_llama()
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    perturb_lora(pm, 1)
    pm.save_pretrained(tmp_path / "adapter")
    return tmp_path


def _energy_rank(delta: np.ndarray, share: float) -> int:
    """Smallest k whose top-k squared singular values hold ``share`` (dense numpy SVD)."""
    s2 = np.linalg.svd(delta, compute_uv=False) ** 2
    return int(np.searchsorted(np.cumsum(s2) / s2.sum(), share - 1e-12) + 1)


def test_healthy_adapter_passes_with_values_from_dense_reference(case):
    res = run("check", case / "adapter", "--base", case / "base", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["verdict"] == "pass" and out["counts"]["fail"] == out["counts"]["warn"] == 0
    ad = load_adapter(case / "adapter")
    base = load_file(case / "base" / "model.safetensors")
    by = {(f["module"], f["check"]): f for f in out["findings"]}
    assert len(by) == 2 * len(ad)
    for m in ad:
        delta = m.delta().numpy()
        k = by[(m.key, "unused-rank")]
        assert k["level"] == "info" and k["value"] == _energy_rank(delta, 0.99) == 8
        assert k["threshold"] == 0.25 * 8
        o = by[(m.key, "overflow")]
        dense = base[f"{m.name}.weight"].double() + m.delta()
        assert o["value"] == pytest.approx(float(dense.abs().max()), rel=1e-12)
        assert o["threshold"] == pytest.approx(float(torch.finfo(torch.float32).max))
    assert "PASS" in run("check", case / "adapter").output


def test_unused_rank_warns_and_fail_on_warn_exits_3(tmp_path):
    """r = 8 with a rank-1 A (every row the same direction, up to noise 1e-4): 99 % of the
    energy in one direction; a warning, which fails only with --fail-on warn."""
    g = torch.Generator().manual_seed(2)
    v = torch.randn(1, 32, generator=g)
    A = v.repeat(8, 1) + 1e-4 * torch.randn(8, 32, generator=g)  # (r, d_in)
    B = torch.randn(32, 8, generator=g)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B}
    write_peft_adapter(tensors, {"r": 8, "lora_alpha": 8}, tmp_path / "ad")
    expected = _energy_rank((B @ A).double().numpy(), 0.99)
    assert expected == 1

    res = run("check", tmp_path / "ad", "--json")
    assert res.exit_code == 0, res.output
    (f,) = json.loads(res.stdout)["findings"]
    assert (f["check"], f["level"], f["value"], f["threshold"]) == ("unused-rank", "warn", 1, 2)
    res = run("check", tmp_path / "ad", "--fail-on", "warn")
    assert res.exit_code == 3, res.output
    assert "FAIL" in res.output and "unused-rank" in res.output
    # a stricter energy share counts the noise directions: no warning
    res = run("check", tmp_path / "ad", "--energy", "0.999999999", "--fail-on", "warn")
    assert res.exit_code == 0, res.output
    assert run("check", tmp_path / "ad", "--unused-rank", "0", "--fail-on", "warn").exit_code == 0


def test_nan_is_a_fail_not_bad_input(case):
    f = case / "adapter" / "adapter_model.safetensors"
    tensors = load_file(f)
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key][1, 2] = float("nan")
    save_file(tensors, f)
    res = run("check", case / "adapter", "--json")
    assert res.exit_code == 3, res.output
    out = json.loads(res.stdout)
    assert out["verdict"] == "fail"
    (finding,) = out["findings"]
    assert finding["check"] == "nonfinite" and finding["level"] == "fail"
    assert key in finding["message"] and "NaN" in finding["message"]


def test_untrained_adapter_fails(tmp_path):
    model = build_tiny_llama()
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS))  # B = 0 at init
    pm.save_pretrained(tmp_path / "ad")
    res = run("check", tmp_path / "ad", "--json")
    assert res.exit_code == 3, res.output
    findings = json.loads(res.stdout)["findings"]
    assert len(findings) == 4 and {f["check"] for f in findings} == {"zero-update"}


def _fp16_case(tmp_path, fill: float, b: float):
    model = build_tiny_llama().half()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.fill_(fill)
    model.save_pretrained(tmp_path / "base")
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{key}.lora_A.weight": torch.ones(2, 32), f"{key}.lora_B.weight": torch.eye(32, 2)}
    tensors[f"{key}.lora_B.weight"] *= b
    write_peft_adapter(tensors, {"r": 2, "lora_alpha": 2}, tmp_path / "ad")
    return tmp_path / "base", tmp_path / "ad"


def test_overflow_fail_and_headroom_warn(tmp_path):
    base, ad = _fp16_case(tmp_path / "a", 60000.0, 6000.0)  # 66000 > 65504 (+ half an ulp)
    res = run("check", ad, "--base", base, "--json")
    assert res.exit_code == 3, res.output
    (f,) = [f for f in json.loads(res.stdout)["findings"] if f["check"] == "overflow"]
    assert f["level"] == "fail" and f["value"] == 66000.0 and f["threshold"] == 65504.0
    assert "64 value(s) become Inf" in f["message"]  # rows 0 and 1 of ΔW = B A, 32 each

    base, ad = _fp16_case(tmp_path / "b", 30000.0, 4000.0)  # 34000 > 0.5 · 65504
    res = run("check", ad, "--base", base, "--json")
    assert res.exit_code == 0, res.output
    (f,) = [f for f in json.loads(res.stdout)["findings"] if f["check"] == "overflow"]
    assert f["level"] == "warn" and f["value"] == 34000.0
    assert run("check", ad, "--base", base, "--overflow-headroom", "0.6").exit_code == 0
    res = run("check", ad, "--base", base, "--json", "--overflow-headroom", "0.6")
    assert "warn" not in {f["level"] for f in json.loads(res.stdout)["findings"]}


def test_merge_dtype_judges_a_float32_base(tmp_path):
    model = build_tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.fill_(70000.0)  # fine in float32
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    perturb_lora(pm, 3)
    pm.save_pretrained(tmp_path / "ad")
    args = ["check", tmp_path / "ad", "--base", tmp_path / "base"]
    assert run(*args).exit_code == 0
    res = run(*args, "--merge-dtype", "float16")
    assert res.exit_code == 3 and "overflows float16" in res.output, res.output


def test_dora_without_base_and_pissa_warn(tmp_path):
    model = build_tiny_llama()
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(model, LoraConfig(r=4, use_dora=True, target_modules=TARGETS))
    perturb_lora(pm, 4)
    pm.save_pretrained(tmp_path / "dora")
    res = run("check", tmp_path / "dora", "--json")
    assert res.exit_code == 0, res.output
    first = json.loads(res.stdout)["findings"][0]
    assert (first["module"], first["check"], first["level"], first["value"]) == (
        None,
        "dora-no-base",
        "warn",
        4,
    )
    assert run("check", tmp_path / "dora", "--fail-on", "warn").exit_code == 3
    res = run("check", tmp_path / "dora", "--base", tmp_path / "base", "--json")
    checks = {f["check"] for f in json.loads(res.stdout)["findings"]}
    assert "dora-no-base" not in checks and "overflow" in checks

    cfg_path = tmp_path / "dora" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(use_dora=False, init_lora_weights="pissa_niter_4")
    cfg_path.write_text(json.dumps(cfg))
    weights = tmp_path / "dora" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "magnitude" not in k}, weights)
    res = run("check", tmp_path / "dora", "--json")
    findings = json.loads(res.stdout)["findings"]
    assert [f["check"] for f in findings if f["level"] == "warn"] == ["init-mutates-base"]
    assert "pissa_niter_4" in findings[0]["message"]


def test_intruders_match_the_intruders_command(case):
    res = run(
        "check", case / "adapter", "--base", case / "base", "--intruders", "--max-intruders",
        "1", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    found = {
        f["module"]: f for f in json.loads(res.stdout)["findings"] if f["check"] == "intruders"
    }
    ref = run(
        "intruders", "--base", case / "base", "--delta", case / "adapter", "--json",
    )  # fmt: skip
    assert ref.exit_code == 0, ref.output
    counts = {r["module"]: r["counts"][0] for r in json.loads(ref.stdout)}
    assert counts and {k: f["value"] for k, f in found.items()} == counts
    for k, f in found.items():
        assert f["level"] == ("warn" if counts[k] > 1 else "info")
    assert {f["level"] for f in found.values()} == {"info", "warn"}  # both sides of the bound
    assert json.loads(res.stdout)["verdict"] == "pass"  # warnings fail only with --fail-on warn


def test_bad_input_exits_2(tmp_path, case):
    res = run("check", tmp_path / "nope")
    assert res.exit_code == 2 and res.output.startswith("error: ")
    res = run("check", case / "adapter", "--intruders")
    assert res.exit_code == 2 and "--intruders needs --base" in res.output
    with pytest.raises(LoraScopeError, match="unused_rank"):
        Thresholds(unused_rank=1.5)
    with pytest.raises(LoraScopeError, match="fail_on"):
        check_adapter(case / "adapter", fail_on="info")
