"""kohya / LyCORIS files, lorascope's HDF5 round trip, and plain factor files."""

from __future__ import annotations

import json
import warnings

import h5py
import loralib as lora
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from lorascope.errors import FormatError, LoraScopeWarning, ShapeError
from lorascope.formats import load_adapter, save_h5

TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
UNET = "lora_unet_down_blocks_0_resnets_0_conv1"


def sd_scripts_delta(down, up, alpha, dim):
    """ΔW as sd-scripts' LoRAInfModule.get_weight computes it (networks/lora.py), multiplier 1."""
    alpha = dim if alpha is None or alpha == 0 else alpha
    scale = alpha / dim
    down, up = down.double(), up.double()
    if down.ndim == 2:
        return (up @ down) * scale
    if down.shape[2:4] == (1, 1):
        return (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(
            3
        ) * scale
    return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale


@pytest.mark.parametrize("alpha", [2.0, 0.0, None], ids=["alpha2", "alpha0", "no-alpha"])
def test_kohya_linear_and_conv(tmp_path, alpha):
    tensors = {
        f"{TE}.lora_down.weight": torch.randn(4, 32),
        f"{TE}.lora_up.weight": torch.randn(32, 4),
        f"{UNET}.lora_down.weight": torch.randn(2, 8, 3, 3),  # conv 3x3 down
        f"{UNET}.lora_up.weight": torch.randn(16, 2, 1, 1),
    }
    if alpha is not None:
        tensors[f"{TE}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
        tensors[f"{UNET}.alpha"] = torch.tensor(alpha)
    save_file(tensors, tmp_path / "k.safetensors", metadata={"ss_network_dim": "4"})
    adapter = load_adapter(tmp_path / "k.safetensors")
    assert adapter.format == "kohya" and adapter.config["ss_network_dim"] == "4"
    te, unet = adapter[TE], adapter[UNET]
    assert (te.kind, te.layer) == ("q", 0)
    exp_te = sd_scripts_delta(
        tensors[f"{TE}.lora_down.weight"], tensors[f"{TE}.lora_up.weight"], alpha, 4
    )
    torch.testing.assert_close(te.delta(), exp_te)
    down, up = tensors[f"{UNET}.lora_down.weight"], tensors[f"{UNET}.lora_up.weight"]
    exp_unet = sd_scripts_delta(down, up, alpha, 2)  # (16, 8, 3, 3)
    assert unet.shape == (16, 8 * 9)
    torch.testing.assert_close(unet.delta(), exp_unet.reshape(16, -1))


def test_kohya_reads_loha_and_dora(tmp_path, one_line_error):
    """LyCORIS LoHa is read (face-splitting × Khatri–Rao, width r²), not skipped, beside a
    DoRA LoRA whose dora_scale (1, in) is LyCORIS' wd_on_out=False; only DoRA warns."""
    base = {
        f"{TE}.lora_down.weight": torch.randn(2, 8),
        f"{TE}.lora_up.weight": torch.randn(8, 2),
        f"{TE}.dora_scale": torch.rand(1, 8) + 0.5,
    }
    loha = {
        f"{UNET}.hada_w1_a": torch.randn(8, 2),
        f"{UNET}.hada_w1_b": torch.randn(2, 8),
        f"{UNET}.hada_w2_a": torch.randn(8, 2),
        f"{UNET}.hada_w2_b": torch.randn(2, 8),
        f"{UNET}.alpha": torch.tensor(3.0),
    }
    save_file({**base, **loha}, tmp_path / "mix.safetensors")
    with pytest.warns(LoraScopeWarning) as rec:
        adapter = load_adapter(tmp_path / "mix.safetensors")
    text = [str(w.message) for w in rec]
    assert any("DoRA" in t for t in text) and not any("skip" in t for t in text)
    assert [m.name for m in adapter] == [TE, UNET]
    te = adapter[TE]
    assert te.family == "dora" and te.magnitude.axis == "in"
    torch.testing.assert_close(te.magnitude.m, base[f"{TE}.dora_scale"].reshape(-1))
    m = adapter[UNET]
    assert (m.family, m.r, m.rank, m.params) == ("loha", 2, 4, 4 * 16)
    w = {k.split(".")[1]: v.double() for k, v in loha.items()}
    expected = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) * 3.0 / 2
    torch.testing.assert_close(m.delta(), expected, rtol=1e-12, atol=1e-12)

    save_file(loha, tmp_path / "loha.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraScopeWarning)
        assert load_adapter(tmp_path / "loha.safetensors").families == ["loha"]
    del loha[f"{UNET}.hada_w2_b"]  # half a LoHa is refused, never skipped
    save_file(loha, tmp_path / "half.safetensors")
    with pytest.raises(ShapeError) as e:
        load_adapter(tmp_path / "half.safetensors")
    assert f"{UNET}.hada_w2_b" in one_line_error(e, tmp_path / "half.safetensors")


def test_h5_round_trip(tmp_path, tiny_gpt2):
    pm = get_peft_model(
        tiny_gpt2,
        LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False),
    )
    pm.save_pretrained(tmp_path / "p")
    peft_adapter = load_adapter(tmp_path / "p")
    net = torch.nn.Module()
    net.qkv = lora.MergedLinear(16, 48, r=2, enable_lora=[True, False, True])
    torch.nn.init.normal_(net.qkv.lora_B)
    torch.save(lora.lora_state_dict(net), tmp_path / "l.pt")
    parts = load_adapter(tmp_path / "l.pt", alpha=4, enable_lora=[True, False, True])
    bf16 = peft_adapter.modules[0].__class__(
        name="x.layers.3.fc1",
        A=torch.randn(2, 8, dtype=torch.bfloat16),
        B=torch.randn(8, 2, dtype=torch.bfloat16),
        scale=0.5,
    )
    modules = [*peft_adapter.modules, *parts.modules, bf16]

    save_h5(modules, tmp_path / "a.h5")
    back = load_adapter(tmp_path / "a.h5")
    assert back.format == "hdf5" and len(back) == len(modules)
    for m, b in zip(modules, back, strict=True):
        for field in (
            "name",
            "scale",
            "alpha",
            "part",
            "rows",
            "fan_in_fan_out",
            "layer",
            "kind",
            "key",
        ):
            assert getattr(b, field) == getattr(m, field), field
        assert b.A.dtype == m.A.dtype and torch.equal(b.A, m.A) and torch.equal(b.B, m.B)

    save_h5(peft_adapter, tmp_path / "b.h5")  # an Adapter keeps its config
    assert load_adapter(tmp_path / "b.h5", fmt="h5").config["r"] == 4


def test_h5_that_is_not_lorascope(tmp_path, one_line_error):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1, 2, 3]
    with pytest.raises(FormatError) as e:
        load_adapter(tmp_path / "other.h5")
    one_line_error(e, tmp_path / "other.h5")


def test_plain_named_keys_alpha_option_and_default(tmp_path):
    A, B = torch.randn(3, 10), torch.randn(12, 3)
    save_file({"enc.fc.lora_A.weight": A, "enc.fc.lora_B.weight": B}, tmp_path / "p.safetensors")
    with pytest.warns(LoraScopeWarning, match="alpha") as rec:
        m = load_adapter(tmp_path / "p.safetensors")["enc.fc"]
    assert str(tmp_path / "p.safetensors") in str(rec[0].message)
    assert (m.scale, m.alpha, m.rank) == (1.0, 3.0, 3)
    torch.testing.assert_close(m.delta(), B.double() @ A.double())
    m = load_adapter(tmp_path / "p.safetensors", alpha=6)["enc.fc"]
    torch.testing.assert_close(m.delta(), 2.0 * B.double() @ A.double())


def test_plain_bare_keys_take_alpha_from_sibling_config(tmp_path):
    A, B = torch.randn(2, 5), torch.randn(7, 2)
    (tmp_path / "cfg").mkdir()
    torch.save({"lora_A": A, "lora_B": B}, tmp_path / "cfg" / "delta.pt")
    (tmp_path / "cfg" / "adapter_config.json").write_text(json.dumps({"lora_alpha": 8, "r": 2}))
    adapter = load_adapter(tmp_path / "cfg" / "delta.pt")
    assert adapter.format == "plain"
    (m,) = adapter.modules
    assert (m.name, m.scale) == ("delta", 4.0)
    torch.testing.assert_close(m.delta(), 4.0 * B.double() @ A.double())


def test_safetensors_adapters_are_read_as_views_of_the_file(tmp_path):
    """Zero-copy reading (issue 5): the float tensors of a safetensors adapter are views of one
    private memory map of the file, so consecutive tensors sit exactly as far apart in memory
    as in the file, and their values equal safe_open's copies."""
    import json as _json
    import struct

    from safetensors import safe_open
    from safetensors.torch import save_file

    from lorascope.formats._common import read_tensors

    g = torch.Generator().manual_seed(0)
    tensors = {
        "m.lora_A.weight": torch.randn(4, 32, generator=g).half(),
        "m.lora_B.weight": torch.randn(16, 4, generator=g).half(),
        "n.lora_A.weight": torch.randn(2, 8, generator=g),
        "steps": torch.arange(3),  # an int tensor: copied by safe_open, not mapped
    }
    path = tmp_path / "a.safetensors"
    save_file(tensors, path)
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = _json.loads(fh.read(n))
    got, _ = read_tensors(path)
    with safe_open(str(path), "pt") as f:
        for k in tensors:
            torch.testing.assert_close(got[k], f.get_tensor(k), rtol=0, atol=0)
    floats = [k for k in tensors if tensors[k].is_floating_point()]
    base = got[floats[0]].data_ptr() - header[floats[0]]["data_offsets"][0]
    for k in floats:
        assert got[k].data_ptr() - base == header[k]["data_offsets"][0], k
