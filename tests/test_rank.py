"""Rank selection and resizing: against dense numpy SVDs (Eckart–Young) and the real peft."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Embedding as PeftEmbedding
from safetensors.torch import save_file

from lorascope.adapter import Adapter, LoraModule
from lorascope.analysis.rank import (
    ENERGY_LADDER,
    RankRule,
    module_rank,
    module_resize,
    rank,
    resize,
    select_rank,
    suggest_ranks,
)
from lorascope.analysis.spectrum import module_spectrum
from lorascope.cli import main
from lorascope.errors import LoraScopeError, ZeroUpdateError
from lorascope.formats import load_adapter, rank_pattern_config, save_adapter

SAMPLE_R8 = Path(__file__).resolve().parents[1] / "sample_adapters" / "lora_r8"


# ----------------------------------------------------------------------------- references


def dense_svd(m: LoraModule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy's SVD of the dense ΔW = s·B@A: the independent reference."""
    return np.linalg.svd(m.delta().numpy(), full_matrices=False)


def truncated(m: LoraModule, k: int) -> np.ndarray:
    U, S, Vt = dense_svd(m)
    return (U[:, :k] * S[:k]) @ Vt[:k]  # (out, k) @ (k, in)


def brute_energy_rank(S: np.ndarray, share: float, tol: float = 0.0, power: int = 2) -> int:
    """Smallest k with Σ_{i<=k} σ^p >= share·Σσ^p (p = 2: energy, 1: nuclear), by a loop."""
    total = float((S**power).sum())
    for k in range(1, S.size + 1):
        if float((S[:k] ** power).sum()) >= share * total - tol:
            return k
    raise AssertionError("unreachable")


def planted(spectrum, d_out=40, d_in=30, scale=0.5, dtype=torch.float64, seed=0) -> LoraModule:
    """A module whose ΔW has exactly the singular values ``spectrum`` (random bases)."""
    g = torch.Generator().manual_seed(seed)
    r = len(spectrum)
    U, _ = torch.linalg.qr(torch.randn(d_out, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d_in, r, generator=g, dtype=torch.float64))
    S = torch.tensor(spectrum, dtype=torch.float64) / scale
    B = U * S  # (out, r)
    return LoraModule("m.layers.3.q_proj", V.T.to(dtype), B.to(dtype), scale=scale, alpha=scale * r)


def random_module(r=8, d_out=48, d_in=32, scale=2.0, dtype=torch.float64, seed=0) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, d_in, generator=g).to(dtype)
    B = torch.randn(d_out, r, generator=g).to(dtype)
    return LoraModule("m.layers.1.v_proj", A, B, scale=scale, alpha=scale * r, layer=1, kind="v")


# ----------------------------------------------------------------------------- rules


def test_select_rank_closed_form():
    S = np.array([4.0, 2.0, 1.0, 0.5])  # σ² = 16, 4, 1, 0.25 of 21.25
    assert select_rank(S, RankRule("energy", 16 / 21.25)) == 1
    assert select_rank(S, RankRule("energy", 16 / 21.25 + 1e-9)) == 2
    assert select_rank(S, RankRule("energy", 1.0)) == 4
    assert select_rank(S, RankRule("ratio", 0.25)) == 3  # 1/4 >= 0.25, 0.5/4 < 0.25
    assert select_rank(S, RankRule("ratio", 1.0)) == 1
    assert select_rank(S, RankRule("rank", 2)) == 2
    assert select_rank(S, RankRule("rank", 10)) == 4


@pytest.mark.parametrize("seed", range(5))
def test_select_rank_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    S = np.sort(rng.exponential(size=12) ** 3)[::-1]
    for share in (0.3, 0.5, 0.9, 0.99, 0.999):
        assert select_rank(S, RankRule("energy", share)) == brute_energy_rank(S, share)
        assert select_rank(S, RankRule("nuclear", share)) == brute_energy_rank(S, share, power=1)
    for t in (0.01, 0.1, 0.5):
        assert select_rank(S, RankRule("ratio", t)) == int((S / S[0] >= t).sum())


def test_select_rank_never_keeps_numerically_zero_directions():
    S = np.array([1.0, 1e-3, 1e-18, 1e-19])
    assert select_rank(S, RankRule("energy", 1.0), rcond=1e-12) == 2
    assert select_rank(S, RankRule("ratio", 1e-20), rcond=1e-12) == 2
    assert select_rank(S, RankRule("rank", 4), rcond=1e-12) == 4  # a fixed rank is kept


# Spectra whose cumulative sums are exact in float64 (dyadic), so a threshold can be hit exactly.
EDGES = [
    # (rule, S, threshold the top-k hits exactly, k)
    ("energy", [2.0, 1.0, 1.0, 1.0, 1.0], 5 / 8, 2),  # σ² = 4, 1, 1, 1, 1: 4 + 1 = 5 of 8
    ("energy", [2.0, 1.0, 1.0, 1.0, 1.0], 1 / 2, 1),  # 4 of 8
    ("nuclear", [4.0, 2.0, 1.0, 1.0], 3 / 4, 2),  # 4 + 2 = 6 of 8
    ("nuclear", [4.0, 2.0, 1.0, 1.0], 1 / 2, 1),  # 4 of 8
    ("ratio", [4.0, 1.0, 0.5], 1 / 4, 2),  # σ_2 = σ_1/4 exactly
]


@pytest.mark.parametrize("method, S, threshold, k", EDGES)
def test_threshold_hit_exactly_keeps_k_and_the_next_float_needs_more(method, S, threshold, k):
    S = np.array(S)
    power = 2 if method == "energy" else 1
    if method != "ratio":  # the premise: the top-k sum equals threshold·total in float64
        assert (S[:k] ** power).sum() == threshold * (S**power).sum()
        assert brute_energy_rank(S, threshold, power=power) == k
    else:
        assert S[k - 1] == threshold * S[0]
    below, above = np.nextafter(threshold, 0.0), np.nextafter(threshold, 1.0)
    assert select_rank(S, RankRule(method, threshold)) == k  # a tie counts as reached
    assert select_rank(S, RankRule(method, below)) == k
    if method == "ratio":
        assert select_rank(S, RankRule(method, above)) == k - 1
    else:
        assert select_rank(S, RankRule(method, above)) == k + 1


RULES = [
    RankRule("energy", 1e-9),
    RankRule("energy", 1.0),
    RankRule("nuclear", 0.5),
    RankRule("nuclear", 1.0),
    RankRule("ratio", 1e-9),
    RankRule("ratio", 1.0),
    RankRule("rank", 1),
    RankRule("rank", 7),
]


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_rank_one_modules_keep_their_one_direction(rule):
    assert select_rank(np.array([0.3]), rule) == 1
    m = random_module(r=1, scale=3.0, seed=4)
    res = module_rank(m, rule)
    assert (res.rank, res.new_rank, res.numerical_rank) == (1, 1, 1)
    assert (res.energy_kept, res.nuclear_kept, res.spectral_error) == (1.0, 1.0, 0.0)
    assert res.frobenius_error == res.relative_error == 0.0
    assert res.energy_ranks == {f"{e:g}": 1 for e in ENERGY_LADDER}
    new, _ = module_resize(m, rule)
    assert new.rank == 1 and new.scale == 3.0
    dW = m.delta().numpy()
    np.testing.assert_allclose(new.delta().numpy(), dW, rtol=0, atol=1e-12 * np.abs(dW).max())


def test_cli_rank_one_sample_adapter_every_rule():
    r1 = SAMPLE_R8.parent / "lora_r1"
    n = len(load_adapter(r1))
    for flag, value in (("--energy", 1.0), ("--nuclear", 1.0), ("--ratio", 1e-6), ("--rank", 3)):
        res = _run(["rank", r1, flag, value, "--json"])
        assert res.exit_code == 0, res.output
        objs = json.loads(res.stdout)
        assert len(objs) == n and {(o["rank"], o["new_rank"]) for o in objs} == {(1, 1)}


@pytest.mark.parametrize(
    "method, value",
    [
        ("energy", 0.0),
        ("energy", 1.5),
        ("ratio", -0.1),
        ("rank", 0),
        ("rank", 2.5),
        ("energy", float("nan")),
        ("energy", True),
        ("svd", 3),
    ],
)
def test_rank_rule_refuses_bad_values(method, value):
    with pytest.raises(LoraScopeError) as e:
        RankRule(method, value)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- rank


@pytest.mark.parametrize(
    "rule",
    [
        RankRule("energy", 0.8),
        RankRule("nuclear", 0.8),
        RankRule("ratio", 0.4),
        RankRule("rank", 3),
    ],
)
def test_module_rank_matches_dense_truncation(rule):
    m = random_module()
    res = module_rank(m, rule)
    _, S, _ = dense_svd(m)
    S = S[: m.rank]
    k = res.new_rank
    if rule.method == "energy":
        assert k == brute_energy_rank(S, rule.value)
    elif rule.method == "nuclear":
        assert k == brute_energy_rank(S, rule.value, power=1)
    elif rule.method == "ratio":
        assert k == int((S / S[0] >= rule.value).sum())
    else:
        assert k == 3
    dW = m.delta().numpy()
    err = dW - truncated(m, k)
    np.testing.assert_allclose(
        res.relative_error, np.linalg.norm(err) / np.linalg.norm(dW), rtol=1e-10
    )
    np.testing.assert_allclose(res.frobenius_error, np.linalg.norm(err), rtol=1e-10)
    np.testing.assert_allclose(res.frobenius_error, np.sqrt((S[k:] ** 2).sum()), rtol=1e-10)
    np.testing.assert_allclose(res.nuclear_kept, S[:k].sum() / S.sum(), rtol=1e-12)
    assert res.new_scale == m.scale and res.new_alpha == pytest.approx(m.scale * k, rel=1e-15)
    np.testing.assert_allclose(
        res.spectral_error, np.linalg.norm(err, 2) / np.linalg.norm(dW, 2), rtol=1e-10
    )
    np.testing.assert_allclose(res.energy_kept, (S[:k] ** 2).sum() / (S**2).sum(), rtol=1e-12)
    assert res.energy_ranks == {f"{e:g}": brute_energy_rank(S, e, 1e-12) for e in ENERGY_LADDER}
    assert res.numerical_rank == np.linalg.matrix_rank(dW)
    assert (res.params, res.new_params) == (8 * (48 + 32), k * (48 + 32))
    d = res.to_dict()
    assert list(d)[:4] == ["module", "layer", "kind", "rank"]
    json.dumps(d, allow_nan=False)


def test_rank_of_a_planted_spectrum():
    m = planted([3.0, 2.0, 1.0, 1e-14])  # numerically rank 3
    res = module_rank(m, RankRule("energy", 1.0))
    assert res.new_rank == res.numerical_rank == np.linalg.matrix_rank(m.delta().numpy()) == 3
    assert res.energy_ranks["0.5"] == 1  # 9 of 14


def test_rank_of_a_zero_update_is_an_error(one_line_error):
    m = LoraModule("x.q", torch.randn(2, 5), torch.zeros(4, 2), scale=1.0, source="f.pt")
    with pytest.raises(ZeroUpdateError) as e:
        module_rank(m)
    one_line_error(e, "f.pt")


# ----------------------------------------------------------------------------- resize


@pytest.mark.parametrize(
    "dtype, tol",
    [
        (torch.float64, 1e-12),
        (torch.float32, 1e-5),
        (torch.float16, 2e-3),
        (torch.bfloat16, 2e-2),
    ],
)
@pytest.mark.parametrize("k", [1, 3, 8])
def test_resize_is_the_truncated_svd(dtype, tol, k):
    m = random_module(dtype=dtype)
    new, res = module_resize(m, RankRule("rank", k))
    assert new.A.dtype == new.B.dtype == dtype and new.rank == k
    assert new.A.shape == (k, m.d_in) and new.B.shape == (m.d_out, k)
    assert (new.name, new.layer, new.kind) == (m.name, m.layer, m.kind)
    assert new.scale == m.scale and new.alpha == m.scale * k  # the scale is kept by default
    ref = truncated(m, k)  # numpy's rank-k truncation of the dense ΔW
    scale = np.abs(m.delta().numpy()).max()
    np.testing.assert_allclose(new.delta().numpy(), ref, atol=tol * scale, rtol=0)
    if dtype == torch.float64:  # Eckart–Young: the error is the dropped singular values
        dW = m.delta().numpy()
        dense_err = np.linalg.norm(dW - new.delta().numpy())  # ‖ΔW − ΔW_k‖_F, formed densely
        np.testing.assert_allclose(
            dense_err, res.relative_error * np.linalg.norm(dW), atol=1e-12 * np.linalg.norm(dW)
        )
        np.testing.assert_allclose(
            res.frobenius_error, dense_err, rtol=1e-10, atol=1e-12 * np.linalg.norm(dW)
        )
        _, S, _ = dense_svd(m)
        np.testing.assert_allclose(  # Eckart–Young: the norm of the tail singular values
            res.frobenius_error, np.sqrt((S[k:] ** 2).sum()), atol=1e-12 * np.linalg.norm(dW)
        )
        # balanced factors: column i of B' and row i of A' have norm sqrt(σ_i / s')
        expect = np.sqrt(S[:k] / m.scale)
        np.testing.assert_allclose(new.B.norm(dim=0).numpy(), expect, rtol=1e-10)
        np.testing.assert_allclose(new.A.norm(dim=1).numpy(), expect, rtol=1e-10)


def test_resize_beats_other_rank_k_factorizations():
    """Eckart–Young from the other side: keeping k of the original factor pairs is worse."""
    m = random_module(r=6, seed=3)
    new, _ = module_resize(m, RankRule("rank", 2))
    dW = m.delta().numpy()
    ours = np.linalg.norm(dW - new.delta().numpy())
    for cols in ([0, 1], [2, 5], [3, 4]):
        other = m.scale * (m.B[:, cols] @ m.A[cols]).numpy()
        assert ours < np.linalg.norm(dW - other)


@pytest.mark.parametrize("rslora", [False, True])
def test_resize_alpha_and_scale(rslora):
    m = random_module(scale=0.25)
    root = math.sqrt(3) if rslora else 3
    kept, _ = module_resize(m, RankRule("rank", 3), rslora=rslora)
    assert kept.scale == 0.25 and kept.alpha == pytest.approx(0.25 * root)
    given, res = module_resize(m, RankRule("rank", 3), alpha=6.0, rslora=rslora)
    assert given.alpha == 6.0 and given.scale == pytest.approx(6.0 / root)
    assert (res.new_alpha, res.new_scale) == (given.alpha, given.scale)
    torch.testing.assert_close(given.delta(), kept.delta(), rtol=1e-12, atol=1e-12)
    with pytest.raises(LoraScopeError):
        module_resize(m, RankRule("rank", 3), alpha=-1.0)


def test_resize_to_full_rank_changes_nothing():
    m = random_module()
    new, res = module_resize(m, RankRule("rank", 64))
    assert new.rank == m.rank and res.relative_error < 1e-7  # σ only: √(rounding) of 0
    torch.testing.assert_close(new.delta(), m.delta(), rtol=0, atol=1e-12)
    again, _ = module_resize(new, RankRule("rank", 64))
    torch.testing.assert_close(again.delta(), m.delta(), rtol=0, atol=1e-12)


def test_resize_adapter_keeps_unselected_modules_and_order():
    mods = [
        replace(
            random_module(seed=i),
            name=f"model.layers.{i // 2}.self_attn.{'qv'[i % 2]}_proj",
            layer=i // 2,
            kind="qv"[i % 2],
        )
        for i in range(4)
    ]
    ad = Adapter(mods, path="x", format="plain", config={"k": 1})
    new, results = resize(ad, RankRule("rank", 2), module="v")
    assert [m.key for m in new] == [m.key for m in ad]
    assert [r.module for r in results] == [mods[1].key, mods[3].key]
    assert [m.rank for m in new] == [8, 2, 8, 2]
    assert new.modules[0] is mods[0] and new.modules[2] is mods[2]
    assert new.config == ad.config and new.config is not ad.config
    assert [m.rank for m in ad] == [8] * 4  # the input is untouched
    everything = rank(ad, RankRule("rank", 2))
    assert len(everything) == 4


def test_resize_refuses_a_part_of_a_fused_module(tmp_path, tiny_gpt2):
    pm = get_peft_model(
        tiny_gpt2, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False)
    )
    pm.save_pretrained(tmp_path / "g")
    ad = load_adapter(tmp_path / "g")
    with pytest.raises(LoraScopeError, match="part of the fused"):
        resize(ad, RankRule("rank", 2), module="q")
    new, _ = resize(ad, RankRule("rank", 2), module="qkv")
    assert {m.rank for m in new} == {2}


# ----------------------------------------------------------------------------- real peft


def _peft_deltas(pm) -> dict[str, torch.Tensor]:
    """peft's own ΔW per module, in lorascope's orientation (d_out, d_in), conv flattened."""
    out = {}
    for name, layer in pm.base_model.model.named_modules():
        if isinstance(layer, LoraLayer) and layer.r:
            with torch.no_grad():
                d = layer.get_delta_weight("default").double()
            if not isinstance(layer, PeftEmbedding) and getattr(layer, "fan_in_fan_out", False):
                d = d.T
            out[name] = d.reshape(d.shape[0], -1)
    return out


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _conv_net():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    return net.eval()


CASES = {
    "llama": (
        "tiny_llama",
        dict(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            rank_pattern={"v_proj": 4},
            modules_to_save=["lm_head"],
        ),
    ),
    "rslora": ("tiny_llama", dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj"])),
    "embedding": ("tiny_llama", dict(r=6, lora_alpha=6, target_modules=["embed_tokens", "q_proj"])),
    "gpt2": ("tiny_gpt2", dict(r=6, lora_alpha=12, target_modules=["c_attn"], fan_in_fan_out=True)),
    "conv": ("conv", dict(r=3, lora_alpha=3, target_modules=["0"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resized_adapter_loads_in_peft(case, tmp_path, request):
    fixture, kwargs = CASES[case]
    base = _conv_net() if fixture == "conv" else request.getfixturevalue(fixture)
    fresh = copy.deepcopy(base)
    pm = get_peft_model(base, LoraConfig(init_lora_weights=False, **kwargs))
    if case == "llama":  # make the saved lm_head differ from the base one
        with torch.no_grad():
            pm.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
    pm.save_pretrained(tmp_path / "in")
    before = _peft_deltas(pm)

    res = _run(["resize", tmp_path / "in", "--out", tmp_path / "out", "--energy", 0.8, "--json"])
    assert res.exit_code == 0, res.output
    objs = {d["module"]: d for d in json.loads(res.stdout)}
    chosen = {name: d["new_rank"] for name, d in objs.items()}
    if case == "llama":  # r = 8 and 4: the ranks and the alphas need rank/alpha_pattern
        assert len(set(chosen.values())) > 1
        cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
        assert cfg["rank_pattern"] and cfg["alpha_pattern"]

    loaded = PeftModel.from_pretrained(fresh, tmp_path / "out")
    after = _peft_deltas(loaded)
    assert sorted(after) == sorted(before) == sorted(chosen)
    for name, d in before.items():
        U, S, Vt = np.linalg.svd(d.numpy(), full_matrices=False)
        k = brute_energy_rank(S, 0.8)
        assert chosen[name] == k
        layer = dict(loaded.base_model.model.named_modules())[name]
        assert layer.r["default"] == k
        ref = (U[:, :k] * S[:k]) @ Vt[:k]
        np.testing.assert_allclose(after[name].numpy(), ref, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_allclose(  # ‖ΔW − ΔW_k‖_F against peft's own dense ΔW
            objs[name]["frobenius_error"], np.linalg.norm(d.numpy() - ref), rtol=1e-5
        )
    if case == "llama":
        torch.testing.assert_close(
            loaded.base_model.model.lm_head.modules_to_save["default"].weight,
            pm.base_model.model.lm_head.modules_to_save["default"].weight,
        )
        x = torch.arange(10)[None]
        loaded.eval()
        with torch.no_grad():  # the model runs and differs from the original only by truncation
            assert torch.isfinite(loaded(x).logits).all()


# ----------------------------------------------------------------------------- rank_pattern


def _plant(pm, n_big_of) -> None:
    """Give every LoRA layer of ``pm`` factors whose ΔW has ``n_big_of(i)`` unit singular values
    and the rest 1e-3 (so the energy rank differs from module to module)."""
    g = torch.Generator().manual_seed(1)
    layers = [m for _, m in pm.base_model.model.named_modules() if isinstance(m, LoraLayer)]
    for i, layer in enumerate(layers):
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
        r = A.shape[0]
        S = torch.tensor([1.0] * n_big_of(i) + [1e-3] * (r - n_big_of(i)))
        U, _ = torch.linalg.qr(torch.randn(B.shape[0], r, generator=g))
        V, _ = torch.linalg.qr(torch.randn(A.shape[1], r, generator=g))
        with torch.no_grad():
            B.copy_(U * S)
            A.copy_(V.T)


@pytest.mark.parametrize("rslora", [False, True])
def test_pattern_out_builds_the_suggested_ranks_in_peft(tmp_path, tiny_llama, rslora):
    from peft.utils.other import get_pattern_key

    fresh = copy.deepcopy(tiny_llama)
    cfg = dict(r=6, lora_alpha=12, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    if not rslora:  # source scales differ by module: 12/6 = 2, and 12/3 = 4 for v_proj
        cfg["rank_pattern"] = {"v_proj": 3}
    pm = get_peft_model(tiny_llama, LoraConfig(init_lora_weights=False, use_rslora=rslora, **cfg))
    _plant(pm, lambda i: 1 + i % 3)
    pm.save_pretrained(tmp_path / "in")
    before = {
        n: layer for n, layer in pm.base_model.model.named_modules() if isinstance(layer, LoraLayer)
    }
    deltas = _peft_deltas(pm)

    res = _run(
        ["rank", tmp_path / "in", "--energy", 0.8, "--pattern-out", tmp_path / "p.json", "--json"]
    )
    assert res.exit_code == 0, res.output
    objs = {o["module"]: o for o in json.loads(res.stdout)}
    suggestion = json.loads((tmp_path / "p.json").read_text())
    assert {"r", "lora_alpha", "rank_pattern", "alpha_pattern"} <= suggestion.keys()
    assert suggestion["rank_pattern"] and suggestion["use_rslora"] is rslora
    assert not any(k.startswith("base_model") for k in suggestion["rank_pattern"])

    built = get_peft_model(fresh, LoraConfig(**suggestion))  # real peft, from the JSON alone
    layers = {n: m for n, m in built.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(layers) == sorted(before) == sorted(objs)
    for name, layer in layers.items():
        _, S, _ = np.linalg.svd(deltas[name].numpy())
        k = brute_energy_rank(S[: before[name].r["default"]], 0.8)  # independent of lorascope
        assert layer.r["default"] == objs[name]["new_rank"] == k
        # the suggested alpha keeps the module's scale: peft's scaling is the source's
        assert layer.scaling["default"] == pytest.approx(before[name].scaling["default"], rel=1e-12)
        assert objs[name]["new_alpha"] == pytest.approx(
            before[name].scaling["default"] * (math.sqrt(k) if rslora else k), rel=1e-12
        )
        key = get_pattern_key(suggestion["rank_pattern"].keys(), name)  # peft's own matching
        assert suggestion["rank_pattern"].get(key, suggestion["r"]) == k
    assert len({layer.r["default"] for layer in layers.values()}) == 3


def test_rank_pattern_keys_match_only_their_module():
    """Nested and look-alike names: every module resolves to its own rank and alpha under
    peft's regex matching, whatever the key order (the PEFT writer sorts keys)."""
    from peft.utils.other import get_pattern_key

    ranks = {
        "layers.1.q": 2,
        "model.layers.1.q": 4,  # ends with ".layers.1.q": the plain key "layers.1.q" matches it
        "model.layers_1_q": 4,  # "." in a key is a regex wildcard
        "model.layers.11.q": 4,
        "v": 3,
        "model.layers.1.v": 4,
    }
    alphas = {n: 2.0 * k for n, k in ranks.items()}
    cfg = rank_pattern_config(ranks, alphas)
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 8)
    for field, want, default in (("rank_pattern", ranks, 4), ("alpha_pattern", alphas, 8)):
        for keys in (list(cfg[field]), list(reversed(cfg[field]))):
            for name in ranks:
                key = get_pattern_key(keys, name)
                assert cfg[field].get(key, default) == want[name], (field, name, key)
    assert "v" not in cfg["rank_pattern"]  # "v" would also match "model.layers.1.v"


def test_suggest_ranks_refuses_a_part_of_a_fused_module(tmp_path, tiny_gpt2):
    """PEFT's rank_pattern sizes the whole fused c_attn; its q part's k is not that module's k,
    so no suggestion is made from parts, while the whole module gives one."""
    pm = get_peft_model(
        tiny_gpt2, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)
    )
    pm.save_pretrained(tmp_path / "g")
    ad = load_adapter(tmp_path / "g")
    rule = RankRule("energy", 0.9)
    parts = rank(ad, rule, module="q")
    whole = rank(ad, rule)
    with pytest.raises(LoraScopeError, match=r"whole fused module .*c_attn"):
        suggest_ranks(parts)
    got = suggest_ranks(whole)
    assert got == {r.module: (r.new_rank, float(r.new_alpha)) for r in whole}
    assert sorted(got) == sorted(m.name for m in ad)
    out = CliRunner().invoke(
        main, ["rank", str(tmp_path / "g"), "--module", "q", "--pattern-out", str(tmp_path / "p")]
    )
    assert out.exit_code == 2 and not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------- CLI


def _plain_adapter(path, zero_b=False):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(2):
        for p in ("q", "v"):
            name = f"model.layers.{i}.self_attn.{p}_proj"
            tensors[f"{name}.lora_A.weight"] = torch.randn(8, 24, generator=g)
            B = torch.randn(24, 8, generator=g)
            tensors[f"{name}.lora_B.weight"] = torch.zeros_like(B) if zero_b else B
    save_file(tensors, str(path))
    return path


def test_cli_rank_on_the_sample_adapter():
    res = _run(["rank", SAMPLE_R8, "--layer", "2", "--json"])
    assert res.exit_code == 0, res.output
    objs = json.loads(res.stdout)
    ad = load_adapter(SAMPLE_R8)
    assert [o["module"] for o in objs] == [m.key for m in ad.select(layer=2)]
    for o in objs:
        assert list(o)[:4] == ["module", "layer", "kind", "rank"]
        spec = module_spectrum(ad[o["module"]])  # an independent route: the spectrum's energy
        S = np.array(spec.singular_values)
        assert o["method"] == "energy" and o["value"] == 0.9
        assert o["new_rank"] == brute_energy_rank(S, 0.9)
        assert o["energy_kept"] == pytest.approx(spec.energy[o["new_rank"] - 1], rel=1e-12)
    table = _run(["rank", SAMPLE_R8, "--layer", "2", "--rank", "2"])
    assert table.exit_code == 0, table.output
    assert "encoder.layer.2.attention.self.query" in table.output
    assert "2 modules: 12,288 -> 3,072 factor parameters (25.0%)" in table.output


def test_cli_rank_csv(tmp_path):
    path = _plain_adapter(tmp_path / "a.safetensors")
    res = _run(["rank", path, "--ratio", 0.5, "--csv"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("module,layer,kind,rank,new_rank,method,value,energy_kept")
    assert len(lines) == 5 and all(",ratio,0.5," in line for line in lines[1:])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--energy", "0.9", "--rank", "2"], "exclusive"),
        ([], "--energy, --nuclear, --ratio or --rank"),
        (["--energy", "1.5"], "1.5"),
    ],
)
def test_cli_resize_option_errors(tmp_path, args, message):
    path = _plain_adapter(tmp_path / "a.safetensors")
    res = _run(["resize", path, "--out", tmp_path / "out", *args])
    assert res.exit_code == 2 and message in res.output
    assert not (tmp_path / "out").exists()


def test_cli_resize_plain_to_peft_and_h5(tmp_path):
    path = _plain_adapter(tmp_path / "a.safetensors")
    with pytest.warns(Warning):  # no alpha in a plain file: assumed = r
        ad = load_adapter(path)
    res = _run(["resize", path, "--out", tmp_path / "peft", "--rank", "3", "--module", "q"])
    assert res.exit_code == 0, res.output
    assert "2 other modules copied unchanged" in res.output
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    back = load_adapter(tmp_path / "peft")
    expect, _ = resize(ad, RankRule("rank", 3), module="q")
    for a, b in zip(back, expect, strict=True):
        assert (a.key, a.rank) == (b.key, b.rank)
        torch.testing.assert_close(a.delta(), b.delta(), rtol=0, atol=1e-12)
    res = _run(["resize", path, "--out", tmp_path / "r.h5", "--energy", "0.5"])
    assert res.exit_code == 0, res.output
    h5 = load_adapter(tmp_path / "r.h5")
    expect, _ = resize(ad, RankRule("energy", 0.5))
    assert [m.rank for m in h5] == [m.rank for m in expect]
    for a, b in zip(h5, expect, strict=True):
        torch.testing.assert_close(a.delta(), b.delta(), rtol=0, atol=1e-12)


def test_cli_resize_never_replaces_without_force(tmp_path):
    path = _plain_adapter(tmp_path / "a.safetensors")
    out = tmp_path / "out"
    assert _run(["resize", path, "--out", out, "--rank", "4"]).exit_code == 0
    first = (out / "adapter_model.safetensors").read_bytes()
    res = _run(["resize", path, "--out", out, "--rank", "2"])
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {out}: exists (pass --force to replace it)"]
    assert (out / "adapter_model.safetensors").read_bytes() == first
    res = _run(["resize", path, "--out", out, "--rank", "2", "--force"])
    assert res.exit_code == 0, res.output
    assert {m.rank for m in load_adapter(out)} == {2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "out"]  # no temp left


def test_cli_resize_bad_input_writes_nothing(tmp_path):
    path = _plain_adapter(tmp_path / "zero.safetensors", zero_b=True)
    res = _run(["resize", path, "--out", tmp_path / "out", "--rank", "2"])
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "exactly zero" in errors[0] and str(path) in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zero.safetensors"]


TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
TE_V = "lora_te_text_model_encoder_layers_0_self_attn_v_proj"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
CONV1 = "lora_unet_down_blocks_0_attentions_0_proj_in"
LOHA = "lora_unet_mid_block_resnets_0_conv2"


def sd_scripts_delta(down, up, alpha):
    """ΔW as sd-scripts merges it (networks/lora.py, LoRAInfModule.get_weight, multiplier 1):
    linear ``up @ down · alpha/r``, 3x3 conv ``conv2d(down.permute(1,0,2,3), up).permute(...)``,
    returned as (d_out, d_in·kh·kw). An independent route to the one lorascope's reader takes."""
    import torch.nn.functional as F

    r = down.shape[0]
    down, up = down.double(), up.double()
    if down.ndim == 2:
        d = up @ down
    elif down.shape[2:] == (1, 1):
        d = (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None]
    else:
        d = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)  # (out, in, kh, kw)
    return (d * (alpha / r)).reshape(d.shape[0], -1).numpy()


def _kohya_file(path: Path) -> tuple[dict, dict]:
    """A LoCon file in sd-scripts' layout: linear te q/v (r 8), a 3x3 and a 1x1 conv (r 4), the
    alphas in fp16 as sd-scripts saves them in half precision, a LyCORIS LoHa module (a 3x3
    conv, r 2, its factors flattened to (r, in·kh·kw) as LyCORIS stores them), its metadata."""
    g = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    tensors = {
        f"{TE}.lora_down.weight": rnd(8, 32),
        f"{TE}.lora_up.weight": rnd(32, 8),
        f"{TE}.alpha": torch.tensor(4.0, dtype=torch.float16),
        f"{TE_V}.lora_down.weight": rnd(8, 32),
        f"{TE_V}.lora_up.weight": rnd(32, 8),
        f"{TE_V}.alpha": torch.tensor(4.0, dtype=torch.float16),
        f"{CONV}.lora_down.weight": rnd(4, 8, 3, 3),
        f"{CONV}.lora_up.weight": rnd(16, 4, 1, 1),
        f"{CONV}.alpha": torch.tensor(2.0, dtype=torch.float16),
        f"{CONV1}.lora_down.weight": rnd(4, 8, 1, 1),
        f"{CONV1}.lora_up.weight": rnd(16, 4, 1, 1),
        f"{CONV1}.alpha": torch.tensor(2.0, dtype=torch.float16),
        f"{LOHA}.hada_w1_a": rnd(16, 2),
        f"{LOHA}.hada_w1_b": rnd(2, 72),
        f"{LOHA}.hada_w2_a": rnd(16, 2),
        f"{LOHA}.hada_w2_b": rnd(2, 72),
        f"{LOHA}.alpha": torch.tensor(1.0, dtype=torch.float16),
    }
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "8",
        "ss_network_alpha": "4.0",
        "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "2"}),
        "sshs_model_hash": "0" * 64,
        "sshs_legacy_hash": "0" * 8,
    }
    save_file(tensors, str(path), metadata=metadata)
    return tensors, metadata


@pytest.mark.parametrize("flag, value", [("--rank", 2), ("--energy", 0.6)])
def test_cli_resize_kohya_writes_kohya(tmp_path, flag, value):
    from safetensors import safe_open

    src = tmp_path / "k.safetensors"
    tensors, _ = _kohya_file(src)
    out = tmp_path / "small.safetensors"
    res = _run(["resize", src, "--out", out, flag, value, "--json"])
    assert res.exit_code == 0, res.output
    chosen = {o["module"]: o for o in json.loads(res.stdout)}
    with safe_open(str(out), "pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    for name in (TE, TE_V, CONV, CONV1):
        down, up = (tensors[f"{name}.lora_{p}.weight"] for p in ("down", "up"))
        before = sd_scripts_delta(down, up, float(tensors[f"{name}.alpha"]))
        U, S, Vt = np.linalg.svd(before, full_matrices=False)
        k = 2 if flag == "--rank" else brute_energy_rank(S, value)
        assert chosen[name]["new_rank"] == k
        ref = (U[:, :k] * S[:k]) @ Vt[:k]  # numpy's rank-k truncation of sd-scripts' ΔW
        new_down, new_up = written[f"{name}.lora_down.weight"], written[f"{name}.lora_up.weight"]
        assert new_down.shape == (k, *down.shape[1:]) and new_up.shape == (
            up.shape[0],
            k,
            *up.shape[2:],
        )
        alpha = float(written[f"{name}.alpha"])
        assert written[f"{name}.alpha"].ndim == 0 and alpha / k == pytest.approx(
            float(tensors[f"{name}.alpha"]) / down.shape[0], rel=1e-12
        )  # the scale alpha/r is kept
        after = sd_scripts_delta(new_down, new_up, alpha)  # sd-scripts' merge of the new file
        np.testing.assert_allclose(after, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
        err = np.linalg.norm(before - ref)
        np.testing.assert_allclose(chosen[name]["frobenius_error"], err, rtol=1e-6, atol=1e-9)
        back = load_adapter(out)[name]  # lorascope's reader agrees
        np.testing.assert_allclose(back.delta().numpy(), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    # the LoHa is read and extracted like the rest: LyCORIS' ΔW = (w1a w1b) ⊙ (w2a w2b)·alpha/r,
    # truncated, written as a lora_down/lora_up pair in place of its hada_* tensors; its file
    # shows no kernel shape (hada_w1_b is (r, in·kh·kw)), so the pair is a (k, 72) matrix
    w = {s: tensors[f"{LOHA}.{s}"].double() for s in ("hada_w1_a", "hada_w1_b")}
    w |= {s: tensors[f"{LOHA}.{s}"].double() for s in ("hada_w2_a", "hada_w2_b")}
    before = ((w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) / 2).numpy()
    U, S, Vt = np.linalg.svd(before, full_matrices=False)
    k = 2 if flag == "--rank" else brute_energy_rank(S, value)
    assert chosen[LOHA]["new_rank"] == k
    ref = (U[:, :k] * S[:k]) @ Vt[:k]
    new_down, new_up = written[f"{LOHA}.lora_down.weight"], written[f"{LOHA}.lora_up.weight"]
    assert new_down.shape == (k, 72) and new_up.shape == (16, k)
    after = sd_scripts_delta(new_down, new_up, float(written[f"{LOHA}.alpha"]))
    np.testing.assert_allclose(after, ref, rtol=0, atol=1e-9 * np.abs(ref).max())
    np.testing.assert_allclose(
        chosen[LOHA]["frobenius_error"], np.linalg.norm(before - ref), rtol=1e-6, atol=1e-9
    )
    assert not any(".hada_" in key for key in written)
    ranks = {chosen[n]["new_rank"] for n in (TE, TE_V, CONV1, LOHA)}
    conv_rank = chosen[CONV]["new_rank"]
    assert meta["ss_network_dim"] == (str(ranks.pop()) if len(ranks) == 1 else "Dynamic")
    args = json.loads(meta["ss_network_args"])
    assert args["conv_dim"] == str(conv_rank)
    assert meta["ss_network_module"] == "networks.lora"
    assert "sshs_model_hash" not in meta and "sshs_legacy_hash" not in meta
    if flag == "--rank":  # every scale is kept: alpha' = (alpha/r)·2 = 1 for all
        assert (meta["ss_network_alpha"], args["conv_alpha"]) == ("1", "1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors", "small.safetensors"]


def test_cli_resize_kohya_to_peft_is_refused(tmp_path):
    src = tmp_path / "k.safetensors"
    _kohya_file(src)
    res = _run(["resize", src, "--out", tmp_path / "o", "--to", "peft", "--rank", "2"])
    assert res.exit_code == 2 and "kohya" in res.output
    assert not (tmp_path / "o").exists()
    res = _run(["resize", src, "--out", tmp_path / "o.h5", "--rank", "2"])
    assert res.exit_code == 0, res.output
    m = load_adapter(tmp_path / "o.h5")[TE]
    assert m.rank == 2 and m.scale == pytest.approx(0.5)
    res = _run(["rank", src, "--pattern-out", tmp_path / "p.json"])
    assert res.exit_code == 2 and "kohya" in res.output and not (tmp_path / "p.json").exists()


def test_save_adapter_never_touches_its_input(tmp_path):
    path = _plain_adapter(tmp_path / "a.safetensors")
    before = path.read_bytes()
    for out in (path, tmp_path):
        res = _run(["resize", path, "--out", out, "--rank", "2", "--force", "--to", "hdf5"])
        assert res.exit_code == 2 and "input" in res.output, res.output
    with pytest.warns(Warning):
        ad = load_adapter(path)
    with pytest.raises(LoraScopeError, match="input"):
        save_adapter(ad, tmp_path, fmt="hdf5", force=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_cli_resize_sample_adapter(tmp_path):
    res = _run(
        ["resize", SAMPLE_R8, "--out", tmp_path / "r2", "--rank", "2", "--save-dtype", "float64"]
    )
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output
    small = load_adapter(tmp_path / "r2")
    ad = load_adapter(SAMPLE_R8)
    for m, s in zip(ad, small, strict=True):
        assert s.rank == 2 and s.A.dtype == torch.float64
        np.testing.assert_allclose(s.delta().numpy(), truncated(m, 2), atol=1e-10)


def test_cli_resize_refuses_dora(tmp_path, tiny_llama):
    pm = get_peft_model(
        tiny_llama,
        LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False),
    )
    pm.save_pretrained(tmp_path / "dora")
    res = _run(["resize", tmp_path / "dora", "--out", tmp_path / "o", "--rank", "2"])
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "DoRA" in errors[0]
    assert not (tmp_path / "o").exists()
