"""Hostile and malformed files (issue 11): each class of the fuzzer's findings, fixed at its root,
gets a one-line LoraScopeError (or a finite answer), never another exception, a hang or a huge
allocation."""

from __future__ import annotations

import json
import math
import os
import time

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lorascope.adapter import Adapter, LoraModule
from lorascope.analysis import RankRule, amplify, rank, spectrum
from lorascope.errors import FormatError, LoraScopeError
from lorascope.formats import load_adapter, load_base, save_h5
from lorascope.formats._common import PatternMatcher, read_json


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text
    return text


def _pair(r=2, d_out=6, d_in=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(r, d_in, generator=g, dtype=dtype), torch.randn(
        d_out, r, generator=g, dtype=dtype
    )


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_and_devices_are_refused_without_reading(tmp_path):
    fifo = tmp_path / "base.safetensors"
    os.mkfifo(fifo)
    t = time.monotonic()
    for call in (lambda: load_base(fifo), lambda: load_adapter(fifo), lambda: read_json(fifo)):
        with pytest.raises(FormatError) as e:
            call()
        assert "not a regular file" in one_line(e.value)
    with pytest.raises(FormatError):
        load_base("/dev/zero")
    assert time.monotonic() - t < 5  # nothing blocked on the FIFO


def test_index_cannot_name_files_outside_its_directory(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../../etc/passwd"}})
    )
    with pytest.raises(FormatError, match="outside"):
        load_base(tmp_path)


@pytest.mark.parametrize(
    "text, match",
    [
        ("[" * 100_000 + "]" * 100_000, "nested"),
        ('{"r": ' + "9" * 5000 + "}", "not valid JSON"),
        ('{"a": ' + "[" * 70 + "]" * 70 + "}", "nested more than"),
    ],
)
def test_json_depth_and_digits_are_bounded(tmp_path, text, match):
    p = tmp_path / "adapter_config.json"
    p.write_text(text)
    with pytest.raises(FormatError, match=match):
        read_json(p)


def test_sparse_multi_gb_json_is_refused_without_reading(tmp_path):
    p = tmp_path / "adapter_config.json"
    with open(p, "wb") as f:
        f.truncate(3 << 30)  # 3 GiB of holes
    with pytest.raises(FormatError, match="larger than"):
        read_json(p)


def test_parameters_in_pt_files_are_data(tmp_path):
    A, B = _pair()
    sd = {"m.lora_A.weight": torch.nn.Parameter(A), "m.lora_B.weight": torch.nn.Parameter(B)}
    torch.save(sd, tmp_path / "a.pt")
    ad = load_adapter(tmp_path / "a.pt", alpha=2.0)
    (res,) = spectrum(ad)
    expect = np.linalg.svd((B @ A).double().numpy(), compute_uv=False)
    np.testing.assert_allclose(res.singular_values, expect[:2], rtol=1e-6)
    torch.save(torch.nn.Parameter(torch.randn(6, 5)), tmp_path / "w.pt")
    W = load_base(tmp_path / "w.pt").tensor("")
    assert not W.requires_grad


def test_zero_stride_view_claiming_two_billion_elements_is_refused(tmp_path):
    big = torch.zeros(1).expand(2**31)  # 4 bytes of storage "holding" 8 GB
    torch.save(
        {"m.lora_A.weight": big.view(2**15, 2**16), "m.lora_B.weight": torch.ones(3, 2**15)},
        tmp_path / "a.pt",
    )
    with pytest.raises(LoraScopeError, match="storage holds"):
        load_adapter(tmp_path / "a.pt", alpha=1.0)
    torch.save(big, tmp_path / "w.pt")
    with pytest.raises(LoraScopeError, match="storage holds"):
        load_base(tmp_path / "w.pt").tensor("")


def _h5(tmp_path, edit) -> str:
    A, B = _pair()
    path = tmp_path / "a.h5"
    save_h5([LoraModule("m", A, B, 0.5, layer=0, kind="q")], path)
    with h5py.File(path, "r+") as f:
        edit(f["modules/0"])
    return path


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda g: g.attrs.__setitem__("alpha", float("nan")), "not finite"),
        (lambda g: g.attrs.__setitem__("scale", np.ones(3)), "array"),
        (lambda g: g.attrs.__setitem__("layer", float("inf")), "not finite"),
        (lambda g: g.attrs.__setitem__("layer", 2.5), "not an integer"),
        (lambda g: g.attrs.__setitem__("rows", np.array([5.0, float("inf")])), "rows"),
        (lambda g: g.attrs.__setitem__("family", "ia3"), "unknown family"),
        (lambda g: g.file.attrs.__setitem__("config", "[" * 100_000), "nested too deeply"),
        (lambda g: g.file.attrs.__setitem__("config", "null"), "not a dict"),
        (
            lambda g: (g.__delitem__("A"), g.create_dataset("A", shape=(10**7, 10**6), dtype="f4")),
            "declares",
        ),
    ],
)
def test_hdf5_structure_is_checked(tmp_path, edit, match):
    path = _h5(tmp_path, edit)
    with pytest.raises(FormatError, match=match) as e:
        load_adapter(path)
    one_line(e.value)


@pytest.mark.parametrize("big", [1e300, 1e-300])
def test_huge_and_tiny_float64_factors_give_finite_spectra_or_an_error(big):
    A, B = _pair(dtype=torch.float64)
    mod = LoraModule("m", A * big, B, 1.0)
    ad = Adapter([mod], "x", "plain")
    (sp,) = spectrum(ad)
    expect = np.linalg.svd((B @ A).numpy(), compute_uv=False)
    np.testing.assert_allclose(np.asarray(sp.singular_values) / big, expect[:2], rtol=1e-12)
    assert all(math.isfinite(x) for x in [*sp.energy, sp.frobenius_norm, sp.stable_rank])
    (rk,) = rank(ad, RankRule("energy", 0.9))
    assert math.isfinite(rk.energy_kept) and math.isfinite(rk.frobenius_error)
    huge = Adapter([LoraModule("m", A * 1e300, B * 1e300, 1.0)], "x", "plain")
    with pytest.raises(LoraScopeError, match="overflow"):
        spectrum(huge)


def test_huge_base_weight_is_a_clear_error():
    A, B = _pair(dtype=torch.float64)
    ad = Adapter([LoraModule("m", A, B, 1.0)], "x", "plain")

    class Base:
        def weight_for(self, m):
            return torch.full(m.shape, 1e300, dtype=torch.float64)

    with pytest.raises(LoraScopeError, match="too large") as e:
        amplify(ad, Base())
    one_line(e.value)


def test_catastrophic_patterns_end_in_bounded_time():
    t = time.monotonic()
    m = PatternMatcher("cfg", budget=0.5)
    try:
        for _ in range(50):
            m.first([r"(a|aa)+$", r"((a+)+)+b"], "a" * 5000 + "!")
    except FormatError as e:
        assert "too long" in one_line(e)
    assert time.monotonic() - t < 3
    assert (
        PatternMatcher("cfg").first(["q_proj", "v"], "model.layers.0.self_attn.q_proj") == "q_proj"
    )
    with pytest.raises(FormatError, match="not a valid regex"):
        PatternMatcher("cfg").first(["(unclosed"], "x")


def test_safetensors_claims_are_checked_by_the_reader(tmp_path):
    A, B = _pair()
    save_file({"m.lora_A.weight": A, "m.lora_B.weight": B}, tmp_path / "a.safetensors")
    raw = (tmp_path / "a.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["m.lora_A.weight"]["shape"] = [2**20, 2**20]  # 4 TiB claimed, 40 bytes stored
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    bad = tmp_path / "b.safetensors"
    bad.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    with pytest.raises(FormatError) as e:
        load_adapter(bad, alpha=1.0)
    one_line(e.value)


@pytest.fixture
def peft_dir(tmp_path):
    A, B = _pair()
    d = tmp_path / "peft"
    d.mkdir()
    save_file(
        {
            "base_model.model.layers.0.q_proj.lora_A.weight": A,
            "base_model.model.layers.0.q_proj.lora_B.weight": B,
        },
        d / "adapter_model.safetensors",
    )
    return d


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"use_rslora": "false"}, "use_rslora='false' is not true or false"),
        ({"fan_in_fan_out": "false"}, "fan_in_fan_out='false' is not true or false"),
        ({"use_dora": 0}, "use_dora=0 is not true or false"),
        ({"r": 2.5}, "r=2.5 is not a positive integer"),
        ({"r": "2"}, "is not a positive integer"),
        ({"r": 10**400}, "is not a positive integer"),
        ({"lora_alpha": 10**400}, "is not a positive finite number"),
        ({"lora_alpha": float("inf")}, "is not a positive finite number"),
        ({"alpha_pattern": {"q_proj": 10**400}}, "is not a positive finite number"),
        ({"rank_pattern": {"q_proj": 2.0}}, "is not a positive integer"),
    ],
)
def test_config_values_are_validated_not_coerced(peft_dir, edit, match):
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, **edit}
    (peft_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=match) as e:
        load_adapter(peft_dir)
    assert len(one_line(e.value)) < 400


def test_extreme_but_valid_alpha_gives_finite_numbers_or_a_clear_error(peft_dir):
    for alpha in (1e-300, 1e300):
        cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": alpha}
        (peft_dir / "adapter_config.json").write_text(json.dumps(cfg))
        try:
            ad = load_adapter(peft_dir)
            (sp,) = spectrum(ad)
            (rk,) = rank(ad, RankRule("energy", 0.9))
        except LoraScopeError as e:
            assert "outside" in one_line(e)  # the scale's range is checked where it is read
            continue
        values = [*sp.singular_values, *sp.energy, sp.frobenius_norm, rk.energy_kept]
        assert all(math.isfinite(v) for v in values)
