"""PEFT's non-LoRA families (AdaLoRA, VeRA, LoHa, LoKr), DoRA and target_parameters, written by the
real peft on tiny models built from configs: lorascope's factored form against peft's own
``get_delta_weight`` (and ``merge_and_unload`` for DoRA) on the adapter reloaded with
``PeftModel.from_pretrained`` and cast to float64, so the truth is computed in float64 from the
same stored values; singular values against a dense ``numpy.linalg.svd`` of that truth."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftModel,
    VeraConfig,
    get_peft_model,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.peft_types import PeftType
from safetensors.torch import load_file, save_file

from lorascope.errors import FormatError, LoraScopeError, LoraScopeWarning, ShapeError
from lorascope.formats import load_adapter
from lorascope.formats.peft import read_peft
from lorascope.linalg import factored_svdvals
from lorascope.merge import merge_adapter
from lorascope.update import full_update_svdvals, merged_weight

transformers = pytest.importorskip("transformers")

SIGMA_TOL = 1e-10  # relative to σ1, float64 on both sides
WORST: dict[str, float] = {}  # largest σ error per family (printed with -s)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\nlargest relative σ error vs peft:", {k: f"{v:.1e}" for k, v in WORST.items()})


# ----------------------------------------------------------------------------- models


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


class ConvNet(torch.nn.Module):
    """Conv2d 3×3 and 1×1, Conv1d (k = 5), Linear and Embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = torch.nn.Conv2d(4, 8, 3)
        self.c1x1 = torch.nn.Conv2d(6, 4, 1)
        self.k1d = torch.nn.Conv1d(6, 4, 5)
        self.lin = torch.nn.Linear(6, 4)
        self.emb = torch.nn.Embedding(20, 8)

    def forward(self, x):  # pragma: no cover - never run
        return x


def convnet():
    torch.manual_seed(0)
    return ConvNet().eval()


def mixtral():
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    return transformers.MixtralForCausalLM(cfg).eval()


def gpt_oss():
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=8,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["full_attention"] * 2,
    )
    return transformers.GptOssForCausalLM(cfg).eval()


def perturb(model, seed: int) -> None:
    """Move every trainable (adapter) parameter away from its initial value, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def written(make, cfg, path, seed=1):
    """``make()`` adapted by peft with ``cfg``, perturbed, saved to ``path``; then reloaded on a
    fresh ``make()`` with ``PeftModel.from_pretrained`` and cast to float64."""
    pm = get_peft_model(make(), cfg)
    perturb(pm, seed)
    pm.save_pretrained(path)
    return PeftModel.from_pretrained(make(), path).double().eval()


def peft_layers(pm) -> dict[str, BaseTunerLayer]:
    """peft's adapted layers by module name (the name lorascope reports)."""
    model = pm.base_model.model
    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def as_matrix(delta: torch.Tensor, layer) -> torch.Tensor:
    """peft's ΔW in lorascope's orientation: (d_out, d_in), conv kernels flattened."""
    if getattr(layer, "fan_in_fan_out", False):
        delta = delta.T  # GPT-2 Conv1D: peft returns (d_in, d_out)
    return delta.reshape(delta.shape[0], -1)


def check(module, truth: torch.Tensor) -> float:
    """The module's ΔW equals the truth entrywise, and its singular values (factored, exact)
    equal a dense numpy SVD of the truth, to ``SIGMA_TOL`` relative; returns the σ error."""
    truth = truth.detach().double()
    assert module.shape == tuple(truth.shape), module.key
    top = float(truth.abs().max())
    assert top > 0, module.key
    err_delta = float((module.delta() - truth).abs().max()) / top
    assert err_delta < 1e-12, (module.key, err_delta)
    dense = np.linalg.svd(truth.numpy(), compute_uv=False)
    ours = factored_svdvals(module.A, module.B, module.scale).numpy()
    k = len(ours)
    err = max(
        float(np.abs(ours - dense[:k]).max()),
        float(dense[k:].max()) if len(dense) > k else 0.0,
    ) / float(dense[0])
    assert err < SIGMA_TOL, (module.key, err)
    WORST[module.family] = max(WORST.get(module.family, 0.0), err)
    return err


def check_all(adapter, pm, expected_family: str) -> None:
    layers = peft_layers(pm)
    assert sorted(m.name for m in adapter) == sorted(layers)
    for m in adapter:
        layer = layers[m.name]
        assert m.family == expected_family, m.key
        with torch.no_grad():
            truth = as_matrix(layer.get_delta_weight("default"), layer)
        check(m, truth)


def stored(path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- AdaLoRA


@pytest.mark.parametrize("alpha", [16, 0], ids=["alpha16", "alpha0"])
def test_adalora_after_budget_pruning_matches_reloaded_peft(tmp_path, alpha):
    """``lora_alpha <= 0`` means scaling = r, which peft's reload takes from the kept rank."""
    cfg = AdaLoraConfig(
        init_r=6,
        target_r=2,
        lora_alpha=alpha,
        tinit=2,
        tfinal=3,
        deltaT=1,
        total_step=10,
        target_modules=["q_proj", "v_proj", "down_proj"],
    )
    pm = get_peft_model(llama(), cfg)
    perturb(pm, 1)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    for step in range(cfg.total_step):
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.save_pretrained(tmp_path / "ada")
    reloaded = PeftModel.from_pretrained(llama(), tmp_path / "ada").double().eval()

    saved = json.loads((tmp_path / "ada" / "adapter_config.json").read_text())
    assert saved["rank_pattern"], "the budget did not prune: nothing to test"
    with pytest.warns(LoraScopeWarning, match="pruned to rank 0") as rec:
        adapter = load_adapter(tmp_path / "ada")
    assert sum("pruned" in str(w.message) for w in rec) == 1

    layers = peft_layers(reloaded)
    kept = {n: lay.r["default"] for n, lay in layers.items()}
    assert 0 in kept.values() and any(0 < r < 6 for r in kept.values())  # pruned and kept
    assert sorted(adapter.config["pruned_modules"]) == sorted(n for n, r in kept.items() if r == 0)
    assert sorted(m.name for m in adapter) == sorted(n for n, r in kept.items() if r > 0)
    sd = stored(tmp_path / "ada")
    for m in adapter:
        layer = layers[m.name]
        # peft's reload keeps ranknum = init_r, not the kept rank: that is the scale's divisor
        assert float(layer.ranknum["default"]) == 6.0
        scaling = alpha if alpha > 0 else float(kept[m.name])
        assert layer.scaling["default"] == scaling
        assert m.scale == pytest.approx(scaling / (6 + 1e-5), rel=1e-15)
        assert m.family == "adalora" and m.nominal_rank == m.rank == kept[m.name]
        key = f"base_model.model.{m.name}"
        assert m.params == sum(sd[f"{key}.lora_{x}"].numel() for x in "ABE")
        with torch.no_grad():
            check(m, layer.get_delta_weight("default"))
        assert m.delta().abs().max() > 0

    # a file left with only its rank-0 modules: refused, one line
    (tmp_path / "zero").mkdir()
    pruned = adapter.config["pruned_modules"]
    save_file(
        {k: v for k, v in sd.items() if any(f".{n}." in k for n in pruned)},
        tmp_path / "zero" / "adapter_model.safetensors",
    )
    (tmp_path / "zero" / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(FormatError) as e:
        load_adapter(tmp_path / "zero")
    assert "pruned to rank 0" in one_line(e)


def test_adalora_conv2d_and_gpt2_conv1d_unpruned(tmp_path):
    reloaded = written(
        convnet,
        AdaLoraConfig(init_r=4, lora_alpha=8, target_modules=["c3", "lin"], total_step=10),
        tmp_path / "conv",
    )
    adapter = load_adapter(tmp_path / "conv")
    check_all(adapter, reloaded, "adalora")
    assert adapter["c3"].shape == (8, 4 * 9) and adapter.config["pruned_modules"] == []

    cfg = AdaLoraConfig(
        init_r=3, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True, total_step=10
    )
    reloaded = written(gpt2, cfg, tmp_path / "gpt2")
    adapter = load_adapter(tmp_path / "gpt2")
    assert all(m.fan_in_fan_out is True for m in adapter)
    check_all(adapter, reloaded, "adalora")


# ----------------------------------------------------------------------------- VeRA


def test_vera_with_saved_projections(tmp_path):
    cfg = VeraConfig(
        r=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], projection_prng_key=7
    )
    reloaded = written(llama, cfg, tmp_path / "vera")
    sizes = {n: lay.in_features for n, lay in peft_layers(reloaded).items()}
    assert len(set(sizes.values())) == 2  # in_features differ: the slicing matters
    adapter = read_peft(tmp_path / "vera", in_features=sizes)
    check_all(adapter, reloaded, "vera")
    sd = stored(tmp_path / "vera")
    for m in adapter:
        assert m.scale == 1.0 and m.nominal_rank == 8 and m.rank == 8
        assert m.params == sum(
            sd[f"base_model.model.{m.name}.vera_lambda_{x}"].numel() for x in "bd"
        )

    with pytest.raises(FormatError) as e:  # the file alone does not say each layer's in
        load_adapter(tmp_path / "vera")
    assert "in_features" in one_line(e) and "base_model.vera_A" in one_line(e)
    short = {n: min(s, 32) for n, s in sizes.items()}  # underestimates down_proj's 64
    with pytest.raises(ShapeError) as e:
        read_peft(tmp_path / "vera", in_features=short)
    one_line(e)
    with pytest.raises(FormatError, match="no alpha"):
        read_peft(tmp_path / "vera", in_features=sizes, alpha=4.0)


def test_vera_sizes_from_a_base_checkpoint_and_the_cli(tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from lorascope.cli.main import main
    from lorascope.formats import load_base

    cfg = VeraConfig(r=8, target_modules=["q_proj", "down_proj"], projection_prng_key=3)
    reloaded = written(llama, cfg, tmp_path / "vera")
    base = reloaded.get_base_model()
    sd = {
        k.replace(".base_layer", ""): v.detach().clone().contiguous()
        for k, v in base.state_dict().items()
        if "vera_" not in k
    }
    save_file(sd, tmp_path / "base.safetensors")
    sizes = load_base(tmp_path / "base.safetensors").input_sizes()
    assert sizes.get("model.layers.0.mlp.down_proj") == 64
    assert sizes.get("model.layers.0.self_attn.q_proj") == 32
    check_all(load_adapter(tmp_path / "vera", in_features=sizes), reloaded, "vera")
    run = CliRunner().invoke(
        main,
        ["spectrum", str(tmp_path / "vera"), "--sizes-from", str(tmp_path / "base.safetensors")],
    )
    assert run.exit_code == 0, run.output
    run = CliRunner().invoke(
        main,
        [
            "amplify",
            "--base",
            str(tmp_path / "base.safetensors"),
            "--delta",
            str(tmp_path / "vera"),
            "--json",
        ],
    )
    assert run.exit_code == 0, run.output
    run = CliRunner().invoke(main, ["spectrum", str(tmp_path / "vera")])
    assert run.exit_code == 2 and "--sizes-from" in run.output


def test_vera_without_saved_projections_is_refused(tmp_path):
    cfg = VeraConfig(r=4, target_modules=["q_proj"], save_projection=False)
    get_peft_model(llama(), cfg).save_pretrained(tmp_path / "v")
    assert not any(k.startswith("base_model.vera_") for k in stored(tmp_path / "v"))
    with pytest.raises(FormatError) as e:
        read_peft(tmp_path / "v", in_features={"model.layers.0.self_attn.q_proj": 32})
    msg = one_line(e)
    assert "base_model.vera_A" in msg and "projection_prng_key" in msg


# ----------------------------------------------------------------------------- LoHa


@pytest.mark.parametrize(
    "make, cfg",
    [
        (
            llama,
            LoHaConfig(
                r=2,
                alpha=4,
                target_modules=["q_proj", "v_proj", "down_proj"],
                rank_pattern={"down_proj": 4},
                alpha_pattern={"v_proj": 3},
            ),
        ),
        (convnet, LoHaConfig(r=2, alpha=4, target_modules=["c3", "c1x1", "k1d", "lin"])),
        (
            convnet,
            LoHaConfig(
                r=3, alpha=6, target_modules=["c3", "c1x1", "k1d"], use_effective_conv2d=True
            ),
        ),
    ],
    ids=["linear-patterns", "conv-flat", "conv-tucker"],
)
def test_loha(tmp_path, make, cfg):
    # scales alpha/r are exact in float32: peft multiplies by torch.tensor(alpha / r) (float32)
    reloaded = written(make, cfg, tmp_path / "loha")
    adapter = load_adapter(tmp_path / "loha")
    check_all(adapter, reloaded, "loha")
    layers = peft_layers(reloaded)
    sd = stored(tmp_path / "loha")
    for m in adapter:
        r = layers[m.name].r["default"]
        assert m.nominal_rank == r and m.rank == r * r
        assert m.scale == layers[m.name].scaling["default"]
        assert m.params == sum(t.numel() for k, t in sd.items() if f".{m.name}.hada_" in k)
    if cfg.rank_pattern:
        assert {m.scale for m in adapter} == {2.0, 1.5, 1.0}
    if cfg.use_effective_conv2d:  # the Tucker layout was exercised (1×1 stays flat)
        assert any(k.endswith("c3.hada_t1") for k in sd) and any(
            k.endswith("k1d.hada_t1") for k in sd
        )


# ----------------------------------------------------------------------------- LoKr


@pytest.mark.parametrize(
    "make, cfg, layout",
    [
        (llama, LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]), None),
        (
            llama,
            LoKrConfig(
                r=1,
                alpha=4,
                target_modules=["q_proj", "v_proj", "down_proj"],
                decompose_both=True,
                rank_pattern={"down_proj": 8},
                alpha_pattern={"v_proj": 3},
            ),
            ("layers.0.mlp.down_proj.lokr_w1", "layers.0.mlp.down_proj.lokr_w2"),
        ),
        (
            llama,
            LoKrConfig(r=2, alpha=3, target_modules=["down_proj"], decompose_factor=4),
            None,
        ),
        (convnet, LoKrConfig(r=1, alpha=2, target_modules=["c3", "c1x1", "k1d", "lin"]), None),
        (
            convnet,
            LoKrConfig(r=1, alpha=2, target_modules=["c3", "c1x1"], use_effective_conv2d=True),
            ("c3.lokr_t2",),
        ),
        (
            convnet,
            LoKrConfig(r=2, alpha=3, target_modules=["c3", "c1x1", "k1d"]),
            ("c3.lokr_w2", "k1d.lokr_w2"),
        ),
    ],
    ids=["linear", "both-full-patterns", "factor4", "conv-flat", "conv-tucker", "conv-full-w2"],
)
def test_lokr(tmp_path, make, cfg, layout):
    reloaded = written(make, cfg, tmp_path / "lokr")
    sd = stored(tmp_path / "lokr")
    for suffix in layout or ():  # the layout this case is about is in the file
        assert any(k.endswith(suffix) for k in sd), suffix
    if layout and "k1d.lokr_w2" in layout:  # Conv1d full w2: peft's interleaved kron layout
        assert next(t for k, t in sd.items() if k.endswith("k1d.lokr_w2")).ndim == 3
    adapter = load_adapter(tmp_path / "lokr")
    check_all(adapter, reloaded, "lokr")
    layers = peft_layers(reloaded)
    for m in adapter:
        assert m.nominal_rank == layers[m.name].r["default"]
        assert m.scale == pytest.approx(layers[m.name].scaling["default"], rel=1e-15)
        assert m.params == sum(t.numel() for k, t in sd.items() if f".{m.name}.lokr_" in k)


def test_lokr_conv1d_full_w2_is_not_a_plain_kron(tmp_path):
    """The interleaved layout matters: the plain Kronecker product of the same factors is a
    different matrix with the same singular values, so this compares entries."""
    from lorascope.families import full_as_factors, kron_factors

    reloaded = written(convnet, LoKrConfig(r=2, alpha=3, target_modules=["k1d"]), tmp_path / "k")
    sd = stored(tmp_path / "k")
    w1 = sd["base_model.model.k1d.lokr_w1"].double()
    w2 = sd["base_model.model.k1d.lokr_w2"].double()
    B, A = kron_factors(*full_as_factors(w1), *full_as_factors(w2.reshape(w2.shape[0], -1)))
    layer = peft_layers(reloaded)["k1d"]
    with torch.no_grad():
        truth = as_matrix(layer.get_delta_weight("default"), layer)
    assert not torch.allclose(1.5 * B @ A, truth)
    check(load_adapter(tmp_path / "k")["k1d"], truth)


def test_tucker_factors_match_peft_make_weight_cp():
    """families.tucker_factors is peft's CP rebuild, LoKr's and LoHa's (einsum orders differ)."""
    from peft.tuners.loha.layer import make_weight_cp as loha_cp
    from peft.tuners.lokr.layer import make_weight_cp as lokr_cp

    from lorascope.families import tucker_factors

    g = torch.Generator().manual_seed(0)
    t, t2 = (torch.randn(3, 3, 5, 2, generator=g, dtype=torch.float64) for _ in range(2))
    wa, wb, wa2, wb2 = (torch.randn(3, n, generator=g, dtype=torch.float64) for n in (7, 4, 7, 4))
    P, Q = tucker_factors(t, wb, wa)
    assert torch.allclose(P @ Q, lokr_cp(t, wa, wb).reshape(7, -1), rtol=1e-13, atol=1e-13)
    P2, Q2 = tucker_factors(t2, wb2, wa2)
    ref = loha_cp(t, wa, wb, t2, wa2, wb2, scale=torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose((P @ Q) * (P2 @ Q2), ref.reshape(7, -1), rtol=1e-13, atol=1e-13)


def test_lokr_conv1d_tucker_read_although_peft_cannot_compute_it(tmp_path):
    """peft 0.21 with torch 2.13 raises inside torch.kron for a Conv1d Tucker ``lokr_t2``
    (r, r, k, 1): its einsum output has an odd stride. Such files are still written; checked
    against peft's own make_weight_cp / make_kron with that stride repaired."""
    from peft.tuners.lokr.layer import make_kron, make_weight_cp

    cfg = LoKrConfig(r=1, alpha=3, target_modules=["k1d"], use_effective_conv2d=True)
    reloaded = written(convnet, cfg, tmp_path / "k")
    with pytest.raises(RuntimeError, match="view size"), torch.no_grad():
        peft_layers(reloaded)["k1d"].get_delta_weight("default")
    sd = {k.rpartition(".")[2]: v.double() for k, v in stored(tmp_path / "k").items()}
    assert sd["lokr_t2"].shape == (1, 1, 5, 1)
    w2 = make_weight_cp(sd["lokr_t2"], sd["lokr_w2_a"], sd["lokr_w2_b"])  # (b, d, k, 1)
    truth = make_kron(sd["lokr_w1"], w2.clone(memory_format=torch.contiguous_format), 3.0)
    check(load_adapter(tmp_path / "k")["k1d"], truth.reshape(4, -1))


# ----------------------------------------------------------------------------- DoRA


def dora_case(tmp_path, make, cfg):
    """(base model, peft model in float64, adapter): the adapter saved from float32 peft."""
    base = make()
    pm = get_peft_model(copy.deepcopy(base), cfg)
    perturb(pm, 5)
    pm.save_pretrained(tmp_path)
    with pytest.warns(LoraScopeWarning, match="DoRA"):
        adapter = load_adapter(tmp_path)
    reloaded = PeftModel.from_pretrained(make(), tmp_path).double().eval()
    return base.double(), reloaded, adapter


def base_matrix(base, name: str, module) -> torch.Tensor:
    W = base.get_submodule(name).weight.detach().double()
    return W.T if module.fan_in_fan_out else W.reshape(W.shape[0], -1)


@pytest.mark.parametrize(
    "make, cfg, axis",
    [
        (
            llama,
            LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"]),
            "out",
        ),
        (
            llama,
            LoraConfig(
                r=4,
                lora_alpha=8,
                use_dora=True,
                use_rslora=True,
                target_modules=["v_proj"],
                rank_pattern={"v_proj": 2},
            ),
            "out",
        ),
        (
            convnet,
            LoraConfig(r=2, lora_alpha=6, use_dora=True, target_modules=["c3", "k1d"]),
            "out",
        ),
        (convnet, LoraConfig(r=2, lora_alpha=6, use_dora=True, target_modules=["emb"]), "in"),
        (
            gpt2,
            LoraConfig(
                r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn"], fan_in_fan_out=True
            ),
            "out",
        ),
    ],
    ids=["linear", "rslora-pattern", "conv", "embedding", "gpt2-conv1d"],
)
def test_dora_direction_and_merged_weight_match_peft(tmp_path, make, cfg, axis):
    base, reloaded, adapter = dora_case(tmp_path, make, cfg)
    check_all(adapter, reloaded, "dora")  # peft's get_delta_weight is the direction part s·B A
    sd = stored(tmp_path)
    W = {m.name: base_matrix(base, m.name, m) for m in adapter}
    for m in adapter:
        assert m.update == "dora-direction" and m.magnitude.axis == axis
        assert m.magnitude.key == f"base_model.model.{m.name}.lora_magnitude_vector"
        assert m.params == sum(t.numel() for k, t in sd.items() if f".{m.name}.lora_" in k)
    with torch.no_grad():
        merged = {
            n: p.detach().clone() for n, p in reloaded.merge_and_unload().state_dict().items()
        }
    for m in adapter:
        ours = merged_weight(m, W[m.name], dtype=torch.float64)
        theirs = merged[f"{m.name}.weight"]
        theirs = theirs.T if m.fan_in_fan_out else theirs.reshape(theirs.shape[0], -1)
        err = float((ours - theirs).abs().max() / theirs.abs().max())
        assert err < 1e-12, (m.key, err)  # float64 on both sides
        # the whole update W' − W: its spectrum through lorascope's operator vs dense
        dense = np.linalg.svd((theirs - W[m.name]).numpy(), compute_uv=False)
        S, fro = full_update_svdvals(m, W[m.name], 3)
        assert np.abs(S - dense[:3]).max() < 1e-9 * dense[0]
        assert fro == pytest.approx(float(np.sqrt((dense**2).sum())), rel=1e-12)


def test_dora_merge_adapter_matches_peft_merge(tmp_path):
    """lorascope merge of a DoRA GPT-2 (Conv1D, fan_in_fan_out) into its single-file base, in
    float64 so that it equals peft's own float64 merge_and_unload to rounding."""
    base = gpt2()
    base.save_pretrained(tmp_path / "base")
    cfg = LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
    )
    pm = get_peft_model(base, cfg)
    perturb(pm, 9)
    pm.save_pretrained(tmp_path / "dora")
    with torch.no_grad():
        expected = pm.double().merge_and_unload().state_dict()
    with pytest.warns(LoraScopeWarning, match="DoRA"):
        report = merge_adapter(
            tmp_path / "base", tmp_path / "dora", tmp_path / "out", dtype=torch.float64
        )
    assert len(report.modules) == 4
    got = load_file(tmp_path / "out" / "model.safetensors")
    before = load_file(tmp_path / "base" / "model.safetensors")
    for key, t in got.items():
        ref = expected[key].double()
        assert torch.allclose(t, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max())), key
    moved = [k for k in got if not torch.equal(got[k], before[k].double())]
    assert sorted(moved) == sorted(f"{m.tensor}" for m in report.modules)


def test_dora_inconsistent_with_its_config_is_refused(tmp_path):
    pm = get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    pm.save_pretrained(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    (tmp_path / "d" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False}))
    with pytest.raises(FormatError) as e:
        load_adapter(tmp_path / "d")
    assert "lora_magnitude_vector" in one_line(e) and "use_dora=false" in one_line(e)


# ----------------------------------------------------------------------------- target_parameters


def expert_truth(layer) -> torch.Tensor:
    """ParamWrapper's ΔW as (E, out, in), whatever orientation its parameter has."""
    with torch.no_grad():
        d = layer.get_delta_weight("default").double()
    return (
        d if layer._did_swap_in_out_features else d.transpose(1, 2)
    )  # (E, in, out) -> (E, out, in)


@pytest.mark.parametrize(
    "make, cfg, n_experts",
    [
        (
            mixtral,
            LoraConfig(
                r=2,
                lora_alpha=6,
                target_modules=[],
                target_parameters=["mlp.experts.down_proj"],
                rank_pattern={r"layers\.1\.mlp\.experts\.down_proj": 3},
                alpha_pattern={"down_proj": 5},
            ),
            4,
        ),
        (
            gpt_oss,
            LoraConfig(
                r=2,
                lora_alpha=6,
                use_rslora=True,
                target_modules=["q_proj"],
                target_parameters=["mlp.experts.down_proj"],
            ),
            4,
        ),
    ],
    ids=["mixtral-(E,out,in)", "gpt-oss-(E,in,out)"],
)
def test_target_parameters_one_module_per_expert(tmp_path, make, cfg, n_experts):
    from peft.tuners.lora.layer import ParamWrapper

    reloaded = written(make, cfg, tmp_path / "moe")
    adapter = load_adapter(tmp_path / "moe")
    layers = peft_layers(reloaded)
    wrappers = {n: lay for n, lay in layers.items() if isinstance(lay, ParamWrapper)}
    assert len(wrappers) == 2
    for name, lay in wrappers.items():
        truth = expert_truth(lay)
        assert truth.shape[0] == n_experts
        for e in range(n_experts):
            m = adapter[f"{name}.down_proj.{e}"]
            assert (m.layer, m.kind, m.family) == (int(name.split(".")[2]), "down", "lora")
            assert m.fan_in_fan_out is None and m.nominal_rank == m.rank == lay.r["default"]
            assert m.scale == pytest.approx(lay.scaling["default"], rel=1e-15)
            check(m, truth[e])
    for name, lay in layers.items():  # ordinary modules next to them (GPT-OSS q_proj)
        if name not in wrappers:
            with torch.no_grad():
                check(adapter[name], as_matrix(lay.get_delta_weight("default"), lay))
    assert len(adapter) == n_experts * len(wrappers) + len(layers) - len(wrappers)
    if cfg.rank_pattern:
        assert {m.rank for m in adapter} == {2, 3}


def test_target_parameters_limits(tmp_path):
    # two parameters of one module: peft nests the wrappers in registration order, unrecorded
    cfg = LoraConfig(
        r=2, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]
    )
    get_peft_model(mixtral(), cfg).save_pretrained(tmp_path / "two")
    assert any(".base_layer.lora_A" in k for k in stored(tmp_path / "two"))
    with pytest.raises(FormatError) as e:
        load_adapter(tmp_path / "two")
    assert "registration order" in one_line(e)

    # analyses without a base work; a command with the base fails in one line (an expert's
    # slice of a 3-D parameter has no Placement yet)
    base = mixtral()
    base.save_pretrained(tmp_path / "base")
    cfg = LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.down_proj"])
    pm = get_peft_model(base, cfg)
    perturb(pm, 2)
    pm.save_pretrained(tmp_path / "one")
    adapter = load_adapter(tmp_path / "one")
    assert len(adapter) == 8
    with pytest.raises(LoraScopeError) as e:
        merge_adapter(tmp_path / "base", adapter, tmp_path / "out")
    assert "experts.down_proj.0" in one_line(e)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "cfg, words",
    [
        (
            IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
            "IA3",
        ),
        (OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj"]), "OFT"),
    ],
    ids=["ia3", "oft"],
)
def test_multiplicative_types_are_refused_in_one_line(tmp_path, cfg, words):
    get_peft_model(llama(), cfg).save_pretrained(tmp_path / "m")
    with pytest.raises(FormatError) as e:
        load_adapter(tmp_path / "m")
    msg = one_line(e)
    assert f"peft_type {words}" in msg
    assert "multiplicative, not an additive low-rank update" in msg


def test_every_other_peft_type_is_refused_in_one_line(tmp_path):
    read = {"LORA", "ADALORA", "VERA", "LOHA", "LOKR"}
    save_file(
        {"base_model.model.x.weight": torch.ones(2, 2)}, tmp_path / "adapter_model.safetensors"
    )
    kinds = set()
    for peft_type in PeftType:
        if peft_type.value in read:
            continue
        cfg = {"peft_type": peft_type.value}
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(FormatError) as e:
            load_adapter(tmp_path)
        msg = one_line(e)
        assert f"peft_type {peft_type.value} " in msg
        kinds.add(
            next(k for k in ("multiplicative", "no weight update", "not supported") if k in msg)
        )
    assert kinds == {"multiplicative", "no weight update", "not supported"}


def test_unknown_keys_and_variants_are_refused(tmp_path):
    pm = get_peft_model(llama(), LoHaConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "h")
    sd = stored(tmp_path / "h")
    extra = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({**sd, extra: torch.ones(2, 32)}, tmp_path / "h" / "adapter_model.safetensors")
    with pytest.raises(FormatError) as e:
        load_adapter(tmp_path / "h")
    assert extra in one_line(e)

    cfg = LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 2])
    get_peft_model(llama(), cfg).save_pretrained(tmp_path / "tt")
    with pytest.raises(FormatError) as e:
        load_adapter(tmp_path / "tt")
    assert "trainable_token_indices" in one_line(e)
    cfg_path = tmp_path / "tt" / "adapter_config.json"
    cfg_path.write_text(
        json.dumps({**json.loads(cfg_path.read_text()), "trainable_token_indices": None})
    )
    with pytest.raises(FormatError) as e:  # its tensor, even when the config hides it
        load_adapter(tmp_path / "tt")
    assert "trainable_tokens_delta" in one_line(e)
