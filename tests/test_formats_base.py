"""BaseWeights: the right tensor, in Linear orientation, read alone."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from lorascope.adapter import LoraModule
from lorascope.errors import MissingModuleError, NonFiniteError, ShapeError
from lorascope.formats import load_adapter, load_base


def module(name, d_out, d_in, r=2, **kw) -> LoraModule:
    return LoraModule(name=name, A=torch.randn(r, d_in), B=torch.randn(d_out, r), scale=1.0, **kw)


@pytest.fixture
def gpt2_dirs(tmp_path, tiny_gpt2):
    """A sharded GPT-2 base checkpoint and a PEFT adapter (c_attn, Conv1D) on it."""
    tiny_gpt2.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    pm = get_peft_model(
        tiny_gpt2,
        LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False),
    )
    pm.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter", pm.base_model.model


def test_sharded_gpt2_reads_one_tensor_transposed(gpt2_dirs):
    base_dir, adapter_dir, model = gpt2_dirs
    assert (base_dir / "model.safetensors.index.json").is_file()
    assert len(list(base_dir.glob("model-*.safetensors"))) > 1
    adapter = load_adapter(adapter_dir)
    for where in (base_dir, base_dir / "model.safetensors.index.json"):
        base = load_base(where)
        assert base.bytes_read == 0 and "transformer.h.1.attn.c_attn.weight" in base.keys()
        m = adapter["transformer.h.1.attn.c_attn"]
        conv1d = model.transformer.h[1].attn.c_attn.base_layer.weight  # (d_in, d_out)
        W = base.weight_for(m)
        assert W.shape == m.shape == (96, 32) and W.dtype == conv1d.dtype
        torch.testing.assert_close(W, conv1d.detach().T, atol=0, rtol=0)
        assert base.bytes_read == conv1d.numel() * conv1d.element_size()

        before = base.bytes_read
        v = adapter.select(layer=1, module="v")[0]
        Wv = base.weight_for(v)
        torch.testing.assert_close(Wv, conv1d.detach().T[64:96], atol=0, rtol=0)
        assert base.bytes_read - before == Wv.numel() * Wv.element_size()  # only the v columns


def test_hub_style_keys_without_prefix(tmp_path, tiny_gpt2):
    sd = {
        k.removeprefix("transformer."): v
        for k, v in tiny_gpt2.state_dict().items()
        if k.startswith("transformer.")
    }
    save_file(sd, tmp_path / "model.safetensors")
    base = load_base(tmp_path / "model.safetensors")
    W = base.weight_for(module("transformer.h.0.mlp.c_fc", 128, 32, fan_in_fan_out=True))
    torch.testing.assert_close(W, sd["h.0.mlp.c_fc.weight"].T, atol=0, rtol=0)


def test_llama_bin_and_orientation_from_shape(tmp_path, tiny_llama):
    (tmp_path / "llama").mkdir()  # an HF dir in the older torch format (mmap'ed, weights_only)
    torch.save(tiny_llama.state_dict(), tmp_path / "llama" / "pytorch_model.bin")
    base = load_base(tmp_path / "llama")
    assert base.keys() == list(tiny_llama.state_dict())
    k_proj = tiny_llama.model.layers[1].self_attn.k_proj.weight  # (16, 32)
    W = base.weight_for(module("base_model.model.model.layers.1.self_attn.k_proj", 16, 32))
    torch.testing.assert_close(W, k_proj.detach(), atol=0, rtol=0)
    assert base.bytes_read == k_proj.numel() * k_proj.element_size()
    # fan_in_fan_out unknown: the shape decides; declared wrong: a one-line ShapeError
    flipped = module("model.layers.1.self_attn.k_proj", 32, 16)
    torch.testing.assert_close(base.weight_for(flipped), k_proj.detach().T, atol=0, rtol=0)
    with pytest.raises(ShapeError) as e:
        base.weight_for(module("model.layers.1.self_attn.k_proj", 16, 32, fan_in_fan_out=True))
    assert "\n" not in str(e.value) and "self_attn.k_proj.weight" in str(e.value)
    with pytest.raises(ShapeError):
        base.weight_for(module("model.layers.1.self_attn.k_proj", 16, 31))


def test_kohya_underscored_names_match_dotted_keys(tmp_path):
    sd = {
        f"text_model.encoder.layers.{i}.self_attn.q_proj.weight": torch.randn(32, 32)
        for i in (0, 1, 10)
    }
    torch.save(sd, tmp_path / "clip.bin")
    base = load_base(tmp_path / "clip.bin")
    for i in (0, 1, 10):
        name = f"lora_te_text_model_encoder_layers_{i}_self_attn_q_proj"
        W = base.weight_for(module(name, 32, 32, fan_in_fan_out=False))
        torch.testing.assert_close(W, sd[f"text_model.encoder.layers.{i}.self_attn.q_proj.weight"])


def test_single_tensor_and_missing_and_nonfinite(tmp_path, one_line_error):
    W = torch.randn(6, 4)
    torch.save(W, tmp_path / "w.pt")
    base = load_base(tmp_path / "w.pt")
    torch.testing.assert_close(base.weight_for(module("anything", 6, 4)), W)

    save_file(
        {"a.weight": torch.randn(6, 4), "b.weight": torch.full((6, 4), float("nan"))},
        tmp_path / "m.safetensors",
    )
    base = load_base(tmp_path / "m.safetensors")
    with pytest.raises(MissingModuleError) as e:
        base.weight_for(module("zzz", 6, 4))
    one_line_error(e, tmp_path / "m.safetensors")
    with pytest.raises(NonFiniteError) as e:
        base.weight_for(module("b", 6, 4))
    assert "b.weight" in one_line_error(e, tmp_path / "m.safetensors")


def test_safetensors_base_weights_are_read_alone_and_counted(tmp_path):
    """Issue 15: a base weight is read into memory of its own (os.preadv), nothing of the shard
    stays mapped, so dropping it frees it; rows of a fused part are read alone; bytes_read
    counts exactly what was read; the values equal safe_open's."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "layers.0.q.weight": torch.randn(12, 8, generator=g).half(),
        "layers.0.v.weight": torch.randn(12, 8, generator=g).bfloat16(),
        "layers.0.qkv.weight": torch.randn(18, 8, generator=g).float(),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    base = load_base(path)
    mods = [LoraModule(f"layers.0.{p}", torch.zeros(1, 8), torch.zeros(12, 1), 1.0) for p in "qv"]
    got = [base.weight_for(m) for m in mods]
    with safe_open(str(path), "pt") as f:
        for k, t in zip(tensors, got, strict=False):
            torch.testing.assert_close(t, f.get_tensor(k), rtol=0, atol=0)
            assert t.dtype == f.get_tensor(k).dtype
        fused = f.get_tensor("layers.0.qkv.weight")
    assert got[0].untyped_storage().nbytes() == 12 * 8 * 2  # its own storage, not a map
    assert not hasattr(base, "_mapped")
    assert base.bytes_read == 2 * 12 * 8 * 2
    part = base._read("layers.0.qkv.weight", (slice(6, 12),))  # the rows of one fused part
    torch.testing.assert_close(part, fused[6:12], rtol=0, atol=0)
    assert part.untyped_storage().nbytes() == 6 * 8 * 4
    cols = base._read("layers.0.qkv.weight", (slice(None), slice(2, 5)))  # Conv1D-style part
    torch.testing.assert_close(cols, fused[:, 2:5], rtol=0, atol=0)
    assert base.bytes_read == 2 * 12 * 8 * 2 + 6 * 8 * 4 + 18 * 3 * 4


def test_check_finite_finds_a_nan_past_the_first_chunk():
    from lorascope.errors import NonFiniteError
    from lorascope.formats._common import check_finite

    t = torch.zeros((1 << 22) + 7, dtype=torch.float16)
    check_finite(t, "f", "w")
    t[-1] = float("nan")
    with pytest.raises(NonFiniteError, match="1 NaN and 0 Inf"):
        check_finite(t, "f", "w")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_check_finite_fast_sum_neither_misses_nor_invents(dtype):
    """The float32-sum shortcut: one bad value anywhere is found; finite values whose sum
    overflows (or cancels to 0 after overflowing) are not reported."""
    from lorascope.errors import NonFiniteError
    from lorascope.formats._common import check_finite

    top = torch.finfo(dtype).max
    check_finite(torch.full((64,), top, dtype=dtype), "f", "w")
    check_finite(torch.tensor([top, -top] * 8, dtype=dtype), "f", "w")
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(1000, dtype=torch.float32).to(dtype)
        t[517] = bad
        with pytest.raises(NonFiniteError):
            check_finite(t, "f", "w")
        t[518] = -t[517]  # +Inf and -Inf: their sum is NaN, still found
        with pytest.raises(NonFiniteError):
            check_finite(t, "f", "w")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_base_reads_find_every_bad_value_and_pass_extreme_finite_ones(tmp_path, dtype):
    """BaseWeights checks a tensor by min/max first (NaN propagates, ±Inf is an extreme): a NaN
    or an Inf anywhere is still refused with the file and tensor named; the largest finite
    values pass."""
    from safetensors.torch import save_file

    from lorascope.errors import NonFiniteError

    top = torch.finfo(dtype).max
    good = torch.randn(40, 30).to(dtype)
    good[3, 4], good[5, 6] = top, -top
    tensors = {"ok.weight": good}
    for i, bad in enumerate((float("nan"), float("inf"), -float("inf"))):
        t = torch.randn(40, 30).to(dtype)
        t[17, 29] = bad
        tensors[f"bad{i}.weight"] = t
    save_file(tensors, tmp_path / "m.safetensors")
    base = load_base(tmp_path / "m.safetensors")
    torch.testing.assert_close(base.tensor("ok.weight"), good, rtol=0, atol=0)
    for i in range(3):
        with pytest.raises(NonFiniteError, match=f"bad{i}.weight"):
            base.tensor(f"bad{i}.weight")
        assert base.tensor(f"bad{i}.weight", check=False).shape == (40, 30)
