"""loralib state dicts: lorascope's ΔW must equal loralib's own merge (after .eval() - before)."""

from __future__ import annotations

import loralib as lora
import pytest
import torch

from lorascope.errors import LoraScopeWarning, ShapeError
from lorascope.formats import load_adapter

ENABLE = [True, False, True]


class Block(torch.nn.Module):
    """A GPT-2-like block: fused qkv (MergedLinear), an output Linear and a token embedding."""

    def __init__(self, fan_in_fan_out: bool, r: int = 4, alpha: int = 8) -> None:
        super().__init__()
        self.wte = lora.Embedding(64, 32, r=r, lora_alpha=alpha)
        self.c_attn = lora.MergedLinear(
            32, 96, r=r, lora_alpha=alpha, enable_lora=ENABLE, fan_in_fan_out=fan_in_fan_out
        )
        self.c_proj = lora.Linear(32, 48, r=r, lora_alpha=alpha, fan_in_fan_out=fan_in_fan_out)
        for p in (self.c_attn.lora_B, self.c_proj.lora_B, self.wte.lora_A):  # zero at init
            torch.nn.init.normal_(p)
        self.double()  # so that merged - before is exact, not float32 cancellation


def loralib_deltas(model: Block, fan_in_fan_out: bool) -> dict[str, torch.Tensor]:
    """ΔW of each module from loralib's own merge, in (d_out, d_in) orientation."""
    model.train()
    before = {k: v.detach().clone().double() for k, v in model.state_dict().items()}
    model.eval()  # loralib merges B @ A into the weights here
    after = {k: v.detach().double() for k, v in model.state_dict().items()}
    out = {}
    for name in ("c_attn", "c_proj"):
        d = after[f"{name}.weight"] - before[f"{name}.weight"]
        out[name] = d.T if fan_in_fan_out else d
    out["wte"] = after["wte.weight"] - before["wte.weight"]  # (num_embeddings, embedding_dim)
    return out


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merged_linear_parts_match_loralib_merge(tmp_path, fan_in_fan_out):
    model = Block(fan_in_fan_out)
    torch.save(lora.lora_state_dict(model), tmp_path / "lora.pt")
    expected = loralib_deltas(model, fan_in_fan_out)

    adapter = load_adapter(tmp_path / "lora.pt", alpha=8, enable_lora=ENABLE)
    assert adapter.format == "loralib"
    parts = [m for m in adapter if m.name == "c_attn"]
    assert [(m.part, m.kind, m.rows) for m in parts] == [("q", "q", (0, 32)), ("v", "v", (64, 96))]
    for m in parts:
        assert m.scale == 8 / 4
        torch.testing.assert_close(m.delta(), expected["c_attn"][m.rows[0] : m.rows[1]])
    torch.testing.assert_close(expected["c_attn"][32:64], torch.zeros(32, 32, dtype=torch.float64))
    torch.testing.assert_close(adapter["c_proj"].delta(), expected["c_proj"])
    torch.testing.assert_close(adapter["wte"].delta(), expected["wte"])
    assert adapter.select(module="v")[0].part == "v"


def test_full_state_dict_gives_orientation(tmp_path):
    model = Block(fan_in_fan_out=True)
    torch.save(model.state_dict(), tmp_path / "full.pt")  # lora tensors beside the full weights
    adapter = load_adapter(tmp_path / "full.pt", alpha=8, enable_lora=ENABLE)
    assert adapter.format == "loralib"
    assert adapter["c_proj"].fan_in_fan_out is True
    assert all(m.fan_in_fan_out is True for m in adapter.select(module="q"))
    expected = loralib_deltas(model, True)
    torch.testing.assert_close(adapter["c_proj"].delta(), expected["c_proj"])


def test_default_alpha_is_loralibs_with_a_warning(tmp_path):
    model = Block(fan_in_fan_out=False, alpha=1)  # loralib's default lora_alpha
    torch.save(lora.lora_state_dict(model), tmp_path / "a.pt")
    with pytest.warns(LoraScopeWarning, match="lora_alpha") as rec:
        adapter = load_adapter(tmp_path / "a.pt", enable_lora=ENABLE)
    assert str(tmp_path / "a.pt") in str(rec[0].message)
    expected = loralib_deltas(model, False)
    torch.testing.assert_close(adapter["c_proj"].delta(), expected["c_proj"])


def test_merged_linear_needs_enable_lora(tmp_path, one_line_error):
    torch.save(lora.lora_state_dict(Block(False)), tmp_path / "m.pt")
    with pytest.raises(ShapeError, match="enable_lora") as e:
        load_adapter(tmp_path / "m.pt", alpha=8)
    one_line_error(e, tmp_path / "m.pt")


def test_microsoft_lora_nlg_checkpoint_wrapper(tmp_path):
    # microsoft/LoRA examples/NLG/src/gpt2_ft.py: torch.save({'model_state_dict': lora_state_dict})
    model = Block(fan_in_fan_out=True)
    torch.save({"model_state_dict": lora.lora_state_dict(model)}, tmp_path / "model.2000.pt")
    adapter = load_adapter(tmp_path / "model.2000.pt", alpha=8, enable_lora=ENABLE)
    expected = loralib_deltas(model, True)
    torch.testing.assert_close(adapter["c_proj"].delta(), expected["c_proj"])
    assert [m.key for m in adapter.select(module="q")] == ["c_attn[q]"]
