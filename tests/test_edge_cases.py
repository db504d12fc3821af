"""Edge cases found by adversarial testing of rank, intruders, compare, merge and the CLI: each
is bad input that must end in one ``error:`` line with exit 2, or a valid input that must give
the right numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from lorascope.adapter import LoraModule
from lorascope.analysis import RankRule, module_rank
from lorascope.analysis.intruders import intruder_similarity
from lorascope.cli import main
from lorascope.errors import FormatError, LoraScopeError, ZeroUpdateError
from lorascope.formats import load_adapter


def _run(args):
    return CliRunner().invoke(main, args)


def _one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    return lines[0]


def _plain(path, scale=1.0, d_out=24, d_in=20, r=6):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for p in ("q", "v"):
        name = f"model.layers.0.self_attn.{p}_proj"
        tensors[f"{name}.lora_A.weight"] = torch.randn(r, d_in, generator=g) * scale
        tensors[f"{name}.lora_B.weight"] = torch.randn(d_out, r, generator=g) * scale
    save_file(tensors, str(path))
    return path


# ----------------------------------------------------------------------------- intruders


def test_intruders_iterative_with_k_as_large_as_the_weight_equals_exact():
    """k capped to min(d_out, d_in) leaves ARPACK nothing to do (it needs k < min(shape)): the
    iterative route decomposes the small K whole and agrees with the dense definition."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 32, generator=g, dtype=torch.float64)
    A = torch.randn(4, 32, generator=g, dtype=torch.float64)
    B = torch.randn(16, 4, generator=g, dtype=torch.float64)
    for k in (15, 16, 1000):
        it = intruder_similarity(W, A, B, 0.5, k=k, method="iterative")
        ex = intruder_similarity(W, A, B, 0.5, k=k, method="exact")
        assert it.similarity.shape == ex.similarity.shape == (min(k, 16), 16)
        np.testing.assert_allclose(it.similarity, ex.similarity, atol=1e-10)


@pytest.mark.parametrize("tol", [float("nan"), float("inf"), -1.0])
def test_intruders_refuses_a_non_finite_tolerance(tol):
    W, A, B = torch.eye(8, dtype=torch.float64), torch.ones(1, 8), torch.ones(8, 1)
    with pytest.raises(LoraScopeError, match="tol must be"):
        intruder_similarity(W, A, B, k=2, method="iterative", tol=tol)


# ----------------------------------------------------------------------------- rank


def test_rank_in_float32_sums_energies_in_float64(tmp_path):
    """σ ≈ 1e36 fits float32 but σ² does not: the energies and errors must still be finite and
    equal the float64 analysis (the relative quantities do not depend on the scale)."""
    ad = load_adapter(_plain(tmp_path / "a.safetensors", scale=1e18), alpha=6)
    for m in ad:
        lo = module_rank(m, RankRule("energy", 0.9), dtype=torch.float32)
        hi = module_rank(m, RankRule("energy", 0.9), dtype=torch.float64)
        assert lo.new_rank == hi.new_rank
        for f in ("energy_kept", "relative_error", "nuclear_kept"):
            assert np.isfinite(getattr(lo, f))
            assert getattr(lo, f) == pytest.approx(getattr(hi, f), rel=1e-5)
        assert np.isfinite(lo.frobenius_error)


@pytest.mark.parametrize("rcond", ["nan", "-1", "inf"])
def test_rank_refuses_a_bad_rcond(tmp_path, rcond):
    path = _plain(tmp_path / "a.safetensors")
    msg = _one_error_line(_run(["rank", str(path), "--alpha", "6", "--rcond", rcond]))
    assert "rcond" in msg


def test_tiny_factors_in_float32_say_underflow_not_zero(tmp_path):
    ad = load_adapter(_plain(tmp_path / "a.safetensors", scale=1e-30), alpha=6)
    m = ad.modules[0]
    with pytest.raises(ZeroUpdateError, match="underflow to 0 in float32"):
        module_rank(m, dtype=torch.float32)
    assert module_rank(m, dtype=torch.float64).new_rank >= 1  # float64 resolves them
    zero = LoraModule("z", torch.zeros(2, 4), torch.ones(3, 2), 1.0)
    with pytest.raises(ZeroUpdateError, match="exactly zero"):
        module_rank(zero)


# ----------------------------------------------------------------------------- formats


def test_nan_lora_alpha_in_the_config_is_blamed_on_the_config(tmp_path, tiny_llama):
    pm = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["lora_alpha"] = float("nan")
    cfg_path.write_text(json.dumps(cfg))  # Python writes NaN, as a careless script would
    with pytest.raises(FormatError, match=r"adapter_config.json: lora_alpha=nan"):
        load_adapter(tmp_path / "a")


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("kind", ["dir", "noext"])
def test_plot_to_a_directory_or_without_extension_is_refused(tmp_path, kind):
    a = _plain(tmp_path / "a.safetensors")
    b = _plain(tmp_path / "b.safetensors", scale=2.0)
    target = tmp_path / ("plots" if kind == "dir" else "phi")
    if kind == "dir":
        target.mkdir()
    res = _run(["compare", str(a), str(b), "--alpha", "6", "--plot", str(target)])
    _one_error_line(res)
    assert not (tmp_path / "phi.png").exists() and not (tmp_path / "plots.png").exists()


def test_bad_options_are_one_error_line_too(tmp_path):
    path = _plain(tmp_path / "a.safetensors")
    msg = _one_error_line(_run(["rank", str(path), "--energy", "0"]))
    assert "--energy" in msg and "rank --help" in msg
    _one_error_line(_run(["rank", str(path), "--no-such-option"]))
    _one_error_line(_run(["rank"]))


# ----------------------------------------------------------------------------- merge


def test_merge_refuses_an_adapter_with_modules_to_save(tmp_path, tiny_llama):
    """peft's merge_and_unload puts the saved lm_head in place of the base's; a merge of the
    factors alone would silently keep the old head, so it is refused, and nothing written."""
    tiny_llama.save_pretrained(tmp_path / "base")
    pm = get_peft_model(
        tiny_llama,
        LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    )
    pm.save_pretrained(tmp_path / "a")
    _one_error_line(_run(["merge", "--base", str(tmp_path / "base")]))  # no --delta/--out
    args = ["merge", "--base", str(tmp_path / "base"), "--delta", str(tmp_path / "a")]
    res = _run([*args, "--out", str(tmp_path / "m")])
    assert "modules_to_save" in _one_error_line(res)
    assert not (tmp_path / "m").exists()


def test_merge_warns_about_an_all_zero_update(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "base")
    pm = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj"]))  # B = 0
    pm.save_pretrained(tmp_path / "a")
    out = tmp_path / "m"
    args = ["merge", "--base", str(tmp_path / "base"), "--delta", str(tmp_path / "a")]
    res = _run([*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "exactly zero" in res.stderr and res.stderr.startswith("warning:")
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), 0, None])
def test_plain_file_beside_a_bad_config_alpha_is_refused(tmp_path, alpha):
    """A plain factors file takes lora_alpha from a sibling adapter_config.json, checked by the
    same rule as PEFT's reader (Infinity used to pass as 'positive')."""
    path = _plain(tmp_path / "factors.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": alpha}))
    with pytest.raises(FormatError, match=r"adapter_config.json: lora_alpha=.* positive finite"):
        load_adapter(path, fmt="plain")
