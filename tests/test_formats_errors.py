"""Bad input: each case raises the right LoraScopeError with one line naming the file."""

from __future__ import annotations

import builtins
import os
import pickle

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from lorascope.errors import (
    FormatError,
    LoraScopeError,
    NonFiniteError,
    ShapeError,
    UnsafeFileError,
)
from lorascope.formats import load_adapter, load_base


@pytest.fixture
def peft_dir(tmp_path, tiny_llama):
    pm = get_peft_model(
        tiny_llama, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    pm.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft"


def garbage(n: int) -> bytes:
    return bytes((i * 37 + 11) % 251 for i in range(n))  # deterministic, not a pickle or header


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def pair(r=2, d_in=8, d_out=6):
    return {"fc.lora_A.weight": torch.randn(r, d_in), "fc.lora_B.weight": torch.randn(d_out, r)}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_files(tmp_path, one_line_error, suffix, damage):
    path = tmp_path / f"a{suffix}"
    (save_file if suffix == ".safetensors" else torch.save)(pair(), path)
    if damage == "truncated":
        truncate(path)
    else:
        path.write_bytes(b"" if damage == "empty" else garbage(300))
    with pytest.raises(FormatError) as e:
        load_adapter(path)
    assert not isinstance(e.value, UnsafeFileError)
    one_line_error(e, path)
    with pytest.raises(FormatError) as e:
        load_base(path)
    one_line_error(e, path)


def test_truncated_peft_adapter(peft_dir, one_line_error):
    truncate(peft_dir / "adapter_model.safetensors", 0.9)
    with pytest.raises(FormatError) as e:
        load_adapter(peft_dir)
    one_line_error(e, peft_dir / "adapter_model.safetensors")


def test_broken_peft_config(peft_dir, one_line_error):
    (peft_dir / "adapter_config.json").write_text('{"r": 2, "lora_alpha":')
    with pytest.raises(FormatError) as e:
        load_adapter(peft_dir)
    one_line_error(e, peft_dir / "adapter_config.json")


def test_directory_without_adapter(tmp_path, one_line_error):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FormatError) as e:
        load_adapter(tmp_path)
    one_line_error(e, tmp_path)
    with pytest.raises(FormatError) as e:
        load_adapter(tmp_path / "missing.safetensors")
    one_line_error(e, tmp_path / "missing.safetensors")


def test_unknown_key_layout(tmp_path, one_line_error):
    save_file(
        {"encoder.weight": torch.randn(3, 3), "encoder.bias": torch.randn(3)},
        tmp_path / "u.safetensors",
    )
    with pytest.raises(FormatError) as e:
        load_adapter(tmp_path / "u.safetensors")
    one_line_error(e, tmp_path / "u.safetensors")


@pytest.mark.parametrize("where", ["A", "B"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_factor(tmp_path, one_line_error, where, bad):
    tensors = pair()
    key = f"fc.lora_{where}.weight"
    tensors[key][0, 1] = bad
    save_file(tensors, tmp_path / "n.safetensors")
    with pytest.raises(NonFiniteError) as e:
        load_adapter(tmp_path / "n.safetensors", alpha=2)
    assert key in one_line_error(e, tmp_path / "n.safetensors")


def test_non_finite_in_peft_adapter(peft_dir, one_line_error):
    from safetensors.torch import load_file

    path = peft_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][-1, -1] = float("-inf")
    save_file(tensors, path)
    with pytest.raises(NonFiniteError) as e:
        load_adapter(peft_dir)
    assert key in one_line_error(e, path)


def test_mismatched_shapes_and_missing_partner(tmp_path, one_line_error):
    save_file(
        {"fc.lora_A.weight": torch.randn(4, 8), "fc.lora_B.weight": torch.randn(6, 3)},
        tmp_path / "s.safetensors",
    )
    with pytest.raises(ShapeError) as e:
        load_adapter(tmp_path / "s.safetensors", alpha=1)
    msg = one_line_error(e, tmp_path / "s.safetensors")
    assert "fc.lora_A.weight" in msg and "fc.lora_B.weight" in msg

    save_file({"fc.lora_A.weight": torch.randn(4, 8)}, tmp_path / "half.safetensors")
    with pytest.raises(ShapeError) as e:
        load_adapter(tmp_path / "half.safetensors", alpha=1)
    msg = one_line_error(e, tmp_path / "half.safetensors")
    assert "fc.lora_A.weight" in msg and "fc.lora_B" in msg

    down = "lora_unet_mid_block_attentions_0_proj_in"
    save_file(
        {f"{down}.lora_down.weight": torch.randn(2, 8), f"{down}.alpha": torch.tensor(1.0)},
        tmp_path / "k.safetensors",
    )
    with pytest.raises(ShapeError) as e:
        load_adapter(tmp_path / "k.safetensors")
    assert f"{down}.lora_up.weight" in one_line_error(e, tmp_path / "k.safetensors")


def test_two_adapters_in_one_state_dict(tmp_path, peft_dir, one_line_error):
    from safetensors.torch import load_file

    path = peft_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    both = {
        k.replace(".weight", f".{name}.weight"): v.clone()
        for name in ("a", "b")
        for k, v in tensors.items()
    }
    save_file(both, path)
    with pytest.raises(FormatError) as e:
        load_adapter(peft_dir)
    one_line_error(e, path)


class _Marker:
    """Unpickling this would create ``path`` (via os.system or builtins.open)."""

    def __init__(self, path, how):
        self.path, self.how = str(path), how

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch {self.path}",))
        return (builtins.open, (self.path, "w"))


@pytest.mark.parametrize("how", ["system", "open"])
@pytest.mark.parametrize("writer", ["torch", "torch-legacy", "pickle"])
def test_code_running_pickle_is_refused(tmp_path, one_line_error, how, writer):
    marker = tmp_path / "PWNED"
    (tmp_path / "x").mkdir()
    path = tmp_path / "x" / "adapter_model.bin"
    payload = {"base_model.model.fc.lora_A.weight": torch.randn(2, 4), "evil": _Marker(marker, how)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=writer == "torch")
    (tmp_path / "x" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    for call in (
        lambda: load_adapter(path),
        lambda: load_adapter(tmp_path / "x"),
        lambda: load_base(path),
    ):
        with pytest.raises(UnsafeFileError) as e:
            call()
        assert "refusing to unpickle" in one_line_error(e, path)
    assert not marker.exists()


def test_every_error_is_a_lorascope_error(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(garbage(64))
    with pytest.raises(LoraScopeError):
        load_adapter(path, fmt="loralib")
    with pytest.raises(LoraScopeError):
        load_adapter(tmp_path, fmt="kohya")
    with pytest.raises(LoraScopeError):
        load_adapter(path, fmt="nope")


def test_base_checkpoint_with_missing_or_truncated_shard(tmp_path, tiny_gpt2, one_line_error):
    tiny_gpt2.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    index = load_base(tmp_path / "base")
    key = "transformer.h.0.attn.c_attn.weight"
    shard = tmp_path / "base" / index._key_file[key].name
    truncate(shard)
    from lorascope.adapter import LoraModule

    m = LoraModule(
        name="transformer.h.0.attn.c_attn",
        A=torch.randn(2, 32),
        B=torch.randn(96, 2),
        scale=1.0,
        fan_in_fan_out=True,
    )
    with pytest.raises(FormatError) as e:
        load_base(tmp_path / "base").weight_for(m)
    one_line_error(e, shard)
    shard.unlink()
    with pytest.raises(FormatError) as e:
        load_base(tmp_path / "base").weight_for(m)
    one_line_error(e, shard)
