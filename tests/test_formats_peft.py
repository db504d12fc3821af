"""PEFT adapters written by the real peft on tiny models: lorascope's ΔW must equal peft's own."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Embedding as PeftEmbedding
from safetensors.torch import save_file

from lorascope.errors import LoraScopeWarning, ShapeError
from lorascope.formats import load_adapter, write_peft_adapter

TOL = dict(atol=1e-6, rtol=1e-6)


def peft_layers(peft_model) -> dict[str, LoraLayer]:
    """peft's LoRA layers by module name (the name lorascope reports)."""
    model = peft_model.base_model.model
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and m.r}


def peft_delta(layer: LoraLayer) -> torch.Tensor:
    """peft's own ΔW, brought to lorascope's orientation: (d_out, d_in), conv flattened."""
    with torch.no_grad():
        d = layer.get_delta_weight("default").double()
    if isinstance(layer, PeftEmbedding):
        return d  # already (num_embeddings, embedding_dim), the embedding weight's orientation
    if getattr(layer, "fan_in_fan_out", False):
        d = d.T  # Conv1D: peft returns (d_in, d_out)
    return d.reshape(d.shape[0], -1)


def assert_matches_peft(adapter, peft_model) -> None:
    layers = peft_layers(peft_model)
    assert sorted(m.name for m in adapter) == sorted(layers)
    for m in adapter:
        layer = layers[m.name]
        assert m.rank == layer.r["default"]
        assert m.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        torch.testing.assert_close(m.delta(), peft_delta(layer), **TOL)


def test_gpt2_conv1d_matches_peft_delta_and_merge(tmp_path, tiny_gpt2):
    before = copy.deepcopy(tiny_gpt2.state_dict())
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj"],
        fan_in_fan_out=True,
        init_lora_weights=False,
    )
    pm = get_peft_model(tiny_gpt2, cfg)
    pm.save_pretrained(tmp_path / "gpt2")
    adapter = load_adapter(tmp_path / "gpt2")
    assert adapter.format == "peft"
    assert all(m.fan_in_fan_out is True for m in adapter)
    assert_matches_peft(adapter, pm)

    merged = pm.merge_and_unload().state_dict()
    for m in adapter:
        key = f"{m.name}.weight"
        diff = (merged[key].double() - before[key].double()).T  # Conv1D stores (d_in, d_out)
        torch.testing.assert_close(m.delta(), diff, atol=1e-6, rtol=1e-5)

    c_attn = adapter["transformer.h.0.attn.c_attn"]
    assert c_attn.kind == "qkv" and c_attn.layer == 0
    qs = adapter.select(layer=0, module="q")
    assert [q.part for q in qs] == ["q"] and qs[0].rows == (0, 32)
    torch.testing.assert_close(qs[0].delta(), c_attn.delta()[:32])
    v = adapter.select(layer=1, module="v")[0]
    torch.testing.assert_close(v.delta(), adapter["transformer.h.1.attn.c_attn"].delta()[64:])


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_llama_rank_and_alpha_patterns(tmp_path, tiny_llama, safe):
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        rank_pattern={"v_proj": 2, "model.layers.1.self_attn.q_proj": 6},
        # "proj" matches no module for peft (keys match whole dotted components): a decoy
        alpha_pattern={"proj": 100, "o_proj": 32, "layers.0.self_attn.k_proj": 3},
        init_lora_weights=False,
    )
    pm = get_peft_model(tiny_llama, cfg)
    pm.save_pretrained(tmp_path / "llama", safe_serialization=safe)
    suffix = "safetensors" if safe else "bin"
    assert (tmp_path / "llama" / f"adapter_model.{suffix}").is_file()
    adapter = load_adapter(tmp_path / "llama")
    assert_matches_peft(adapter, pm)
    # the patterns did take effect, so the test would catch a reader that ignored them
    assert {m.rank for m in adapter} == {2, 4, 6}
    assert len({m.scale for m in adapter}) >= 4
    # the weights file itself works too (config read from beside it)
    again = load_adapter(tmp_path / "llama" / f"adapter_model.{suffix}")
    assert [m.scale for m in again] == [m.scale for m in adapter]


def test_llama_rslora(tmp_path, tiny_llama):
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        init_lora_weights=False,
    )
    pm = get_peft_model(tiny_llama, cfg)
    pm.save_pretrained(tmp_path / "rs")
    adapter = load_adapter(tmp_path / "rs")
    assert_matches_peft(adapter, pm)
    assert {m.scale for m in adapter} == {16 / 8**0.5, 16 / 2**0.5}


def test_embedding_lora(tmp_path, tiny_llama):
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False
    )
    pm = get_peft_model(tiny_llama, cfg)
    pm.save_pretrained(tmp_path / "emb")
    with pytest.warns(LoraScopeWarning, match="non-LoRA"):  # peft saves the embedding base weight
        adapter = load_adapter(tmp_path / "emb")
    assert_matches_peft(adapter, pm)
    emb = adapter["model.embed_tokens"]
    assert emb.shape == tuple(tiny_llama.model.embed_tokens.weight.shape) == (64, 32)
    assert emb.kind == "embed"


def test_conv2d_lora(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    pm = get_peft_model(
        net, LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False)
    )
    pm.save_pretrained(tmp_path / "conv")
    adapter = load_adapter(tmp_path / "conv")
    assert_matches_peft(adapter, pm)
    assert adapter["0"].shape == (8, 3 * 3 * 3)


def test_state_dict_with_adapter_name_segment(tmp_path, tiny_llama):
    pm = get_peft_model(
        tiny_llama, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    pm.save_pretrained(tmp_path / "ref")
    raw = {k: v.detach().clone() for k, v in pm.state_dict().items() if "lora_" in k}
    assert any(".lora_A.default.weight" in k for k in raw)
    (tmp_path / "raw").mkdir()
    save_file(raw, tmp_path / "raw" / "adapter_model.safetensors")
    (tmp_path / "raw" / "adapter_config.json").write_text(
        (tmp_path / "ref" / "adapter_config.json").read_text()
    )
    assert_matches_peft(load_adapter(tmp_path / "raw"), pm)


def test_dora_and_pissa_warn(tmp_path, tiny_llama):
    """DoRA is read (its magnitude kept; load_adapter says once that without the base only the
    direction part is analysed); PiSSA-style inits still warn that the factors are not all."""
    dora = get_peft_model(
        copy.deepcopy(tiny_llama), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    )
    dora.save_pretrained(tmp_path / "dora")
    with pytest.warns(LoraScopeWarning, match="DoRA") as rec:
        adapter = load_adapter(tmp_path / "dora")
    ours = [w for w in rec if issubclass(w.category, LoraScopeWarning)]
    assert len(ours) == 1  # one line for the adapter, none per module
    assert all(
        "\n" not in str(w.message) and str(tmp_path / "dora") in str(w.message) for w in ours
    )
    assert len(adapter) == 2 and {m.family for m in adapter} == {"dora"}
    state = dora.state_dict()
    for m in adapter:
        assert m.update == "dora-direction" and m.magnitude.axis == "out"
        stored = state[f"base_model.model.{m.name}.lora_magnitude_vector.default.weight"]
        torch.testing.assert_close(m.magnitude.m, stored, rtol=0, atol=0)
        assert m.params == m.A.numel() + m.B.numel() + stored.numel()

    pissa = get_peft_model(
        tiny_llama, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa_niter_4")
    )
    pissa.save_pretrained(tmp_path / "pissa")
    with pytest.warns(LoraScopeWarning, match="pissa_niter_4"):
        load_adapter(tmp_path / "pissa")


def test_bias_and_modules_to_save_are_ignored_with_warnings(tmp_path, tiny_gpt2):
    cfg = LoraConfig(
        r=2,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
        lora_bias=True,
        modules_to_save=["ln_f"],
        init_lora_weights=False,
    )
    pm = get_peft_model(tiny_gpt2, cfg)
    pm.save_pretrained(tmp_path / "b")
    with pytest.warns(LoraScopeWarning) as rec:
        adapter = load_adapter(tmp_path / "b")
    text = " ".join(str(w.message) for w in rec)
    assert "bias" in text and "modules_to_save" in text
    assert [m.name for m in adapter] == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.1.attn.c_attn",
    ]


def test_rank_that_disagrees_with_config_is_a_shape_error(tmp_path, tiny_llama, one_line_error):
    pm = get_peft_model(
        tiny_llama, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    pm.save_pretrained(tmp_path / "bad")
    cfg_path = tmp_path / "bad" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rank_pattern"] = {"layers.1.self_attn.q_proj": 2}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ShapeError) as e:
        load_adapter(tmp_path / "bad")
    assert "layers.1.self_attn.q_proj" in one_line_error(e, tmp_path / "bad")


# ----------------------------------------------------------------------------- writer


def test_write_peft_adapter_loads_in_peft(tmp_path, tiny_llama):
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    tensors = {}
    for n in names:
        mod = tiny_llama.get_submodule(n)
        r = 2 if n.endswith("v_proj") else 4
        tensors[f"base_model.model.{n}.lora_A.weight"] = torch.randn(r, mod.in_features)
        tensors[f"{n}.lora_B.weight"] = torch.randn(mod.out_features, r)  # prefix added by writer
    write_peft_adapter(tensors, {"lora_alpha": 16, "task_type": "CAUSAL_LM"}, tmp_path / "out")

    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["rank_pattern"] == {n: 2 for n in names if n.endswith("v_proj")}
    pm = PeftModel.from_pretrained(tiny_llama, tmp_path / "out")
    adapter = load_adapter(tmp_path / "out")
    assert_matches_peft(adapter, pm)
    for m in adapter:  # and peft holds exactly the tensors we wrote
        torch.testing.assert_close(m.A, tensors[f"base_model.model.{m.name}.lora_A.weight"])
        assert m.scale == 16 / m.rank


def test_write_peft_adapter_refuses_what_peft_cannot_load(tmp_path, one_line_error):
    A, B = torch.randn(2, 8), torch.randn(8, 2)
    with pytest.raises(ShapeError) as e:
        write_peft_adapter(
            {"fc.lora_A.weight": A, "fc.lora_B.weight": B},
            {"r": 4, "rank_pattern": {}},
            tmp_path / "w",
        )
    one_line_error(e, tmp_path / "w")
    with pytest.raises(ShapeError) as e:
        write_peft_adapter({"fc.lora_A.weight": A}, {}, tmp_path / "w")
    one_line_error(e, tmp_path / "w")
    assert not (tmp_path / "w").exists()
