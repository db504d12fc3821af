"""llama.cpp GGUF LoRA adapters: lorascope's ΔW against the PEFT adapter they were converted from.

The factors come from the real peft (``get_peft_model`` on a tiny Llama, perturbed with a fixed
seed; truth: peft's ``get_delta_weight`` in float64). They are written with ``gguf.GGUFWriter``
exactly as llama.cpp's ``convert_lora_to_gguf.py`` writes them: GGUF names from
``gguf.get_tensor_name_map``, ``attn_q``/``attn_k`` rows permuted by ``LlamaModel.permute``,
``token_embd.lora_a`` transposed, each factor quantized to the ``--outtype`` with the converter's
fallback to F16 on ``QuantError`` (so a Q8_0 file mixes Q8_0 and F16).
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lorascope.analysis import spectrum
from lorascope.cli import main
from lorascope.errors import FormatError, LoraScopeError, MissingModuleError, ShapeError
from lorascope.formats import load_adapter, load_base

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import QuantError, dequantize, quantize  # noqa: E402

peft = pytest.importorskip("peft")

N_HEAD, N_KV, N_LAYER = 4, 2, 2  # conftest's tiny_llama: hidden 32, head_dim 8, kv rows 16
ALPHA = 16.0
SIGMA_RTOL = 1e-10
OUTTYPES = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0}


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp ``conversion/llama.py`` ``LlamaModel.permute`` (HF rows -> llama.cpp rows)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _row_order(gguf_name: str, rows: np.ndarray) -> np.ndarray:
    if gguf_name.endswith("attn_q"):
        return permute(rows, N_HEAD, N_HEAD)
    if gguf_name.endswith("attn_k"):
        return permute(rows, N_HEAD, N_KV)
    return rows


@pytest.fixture(scope="module")
def peft_adapter():
    """``(saved peft state dict, {gguf name: (ΔW, scale, A, B)})`` of a tiny Llama.

    ``ΔW`` is peft's ``get_delta_weight`` in float64, in the base weight's layout (embedding:
    ``(vocab, dim)``) and HF row order; ``A``/``B`` are peft's factors (float64 of the float32
    values) in lorascope's orientation with ``B``'s rows in llama.cpp's order.
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYER,
        num_attention_heads=N_HEAD,
        num_key_value_heads=N_KV,
        tie_word_embeddings=False,
    )
    lcfg = LoraConfig(
        r=8,
        lora_alpha=ALPHA,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "lm_head",
            "embed_tokens",
        ],
        rank_pattern={"model.layers.1.self_attn.q_proj": 32},  # a lora_b that Q8_0 can hold
        init_lora_weights=False,
    )
    pm = get_peft_model(LlamaForCausalLM(cfg).eval(), lcfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    saved = get_peft_model_state_dict(pm, save_embedding_layers=False)  # no new tokens
    state = {k: v.detach().clone() for k, v in saved.items()}
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, N_LAYER)
    pm.double()
    truth = {}
    for name, layer in pm.base_model.model.named_modules():
        if isinstance(layer, LoraLayer) and layer.r:
            with torch.no_grad():
                delta = layer.get_delta_weight("default").double().numpy()
            gname = tmap.get_name(f"{name}.weight", try_suffixes=(".weight",))
            gname = gname.removesuffix(".weight")
            if gname == "token_embd":  # ΔE = s·(eB @ eA).T: A' = eB.T (r, dim), B' = eA.T
                A0 = layer.lora_embedding_B["default"].detach().numpy().T
                B0 = layer.lora_embedding_A["default"].detach().numpy().T
            else:
                A0 = layer.lora_A["default"].weight.detach().numpy()
                B0 = _row_order(gname, layer.lora_B["default"].weight.detach().numpy())
            truth[gname] = (delta, layer.scaling["default"], A0, B0)
    return state, truth


def write_gguf(path, state: dict, outtype: str, *, alpha: float | None = ALPHA, edit=None):
    """``convert_lora_to_gguf.py`` on a peft state dict, ``--outtype outtype``.

    ``edit(name, lora_a, lora_b) -> (lora_a, lora_b)`` tampers with a pair before writing."""
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, N_LAYER)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, t in state.items():  # == LoraModel.get_tensors / get_base_tensor_name
        base = key.replace("base_model.model.", "")
        for part in (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"):
            base = base.replace(part, ".weight")
        role = "A" if (".lora_A." in key or "lora_embedding_A" in key) else "B"
        pairs.setdefault(base, {})[role] = t.float().numpy()
    w = gguf.GGUFWriter(str(path), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    if alpha is not None:
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    types = {}
    for hf, ab in pairs.items():
        dest = tmap.get_name(hf, try_suffixes=(".weight",))
        A, B = ab["A"], ab["B"]
        if hf.endswith("q_proj.weight"):  # == LlamaModel.modify_tensors -> LoraTorchTensor
            B = permute(B, N_HEAD, N_HEAD)
        elif hf.endswith("k_proj.weight"):
            B = permute(B, N_HEAD, N_KV)
        if "token_embd.weight" in dest:
            A = A.T  # "here we only need to transpose token_embd.lora_a"
        if edit is not None:
            A, B = edit(dest, A, B)
        for suffix, t in ((".lora_a", A), (".lora_b", B)):
            qt = OUTTYPES[outtype]
            try:  # == ModelBase.prepare_tensors
                data = quantize(np.ascontiguousarray(t), qt)
            except QuantError:
                qt = QT.F16
                data = quantize(np.ascontiguousarray(t), qt)
            w.add_tensor(dest + suffix, data, raw_dtype=qt)
            types[dest + suffix] = qt.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def _dequantized(path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(str(path))
    return {
        t.name: np.array(dequantize(t.data, t.tensor_type), dtype=np.float64)
        for t in reader.tensors
    }


def _weyl_bound(m, A0: np.ndarray, B0: np.ndarray) -> float:
    """``‖ΔW_file − ΔW_peft‖₂ ≤ s(‖B'−B‖‖A'‖ + ‖B‖‖A'−A‖)``: by Weyl's inequality a bound on
    how far each σ of the file's update can be from peft's. ``A0``/``B0``: peft's factors in
    the module's orientation and row order."""
    A, B = m.A.double().numpy(), m.B.double().numpy()
    norm = np.linalg.norm
    return m.scale * (norm(B - B0, 2) * norm(A, 2) + norm(B0, 2) * norm(A - A0, 2))


def _check_deltas(adapter, truth: dict, rtol: float) -> float:
    """Elementwise ΔW against peft's (rows permuted to llama.cpp's order); worst relative."""
    worst = 0.0
    for m in adapter:
        want, scale = truth[m.name][:2]
        want = _row_order(m.name, want)
        assert m.scale == pytest.approx(scale, rel=1e-15), m.name
        got = m.delta().numpy()
        assert got.shape == want.shape, m.name
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= rtol, (m.name, err)
        worst = max(worst, err)
    return worst


def test_f32_matches_peft_exactly(tmp_path, peft_adapter):
    state, truth = peft_adapter
    f = tmp_path / "adapter-f32.gguf"
    write_gguf(f, state, "f32")
    adapter = load_adapter(f)
    assert adapter.format == "gguf" and len(adapter) == len(truth) == 16
    assert {m.name for m in adapter} == set(truth)
    assert adapter.config["general.architecture"] == "llama"
    assert adapter.config["adapter.lora.alpha"] == ALPHA
    q0, q1 = adapter["blk.0.attn_q"], adapter["blk.1.attn_q"]
    assert (q0.kind, q0.layer, q0.rank, q0.scale) == ("q", 0, 8, 2.0)
    assert (q1.rank, q1.scale, q1.alpha) == (32, 0.5, ALPHA)
    kinds = {m.name.split(".")[-1]: m.kind for m in adapter}
    assert kinds == {
        "attn_q": "q",
        "attn_k": "k",
        "attn_v": "v",
        "attn_output": "o",
        "ffn_gate": "gate",
        "ffn_up": "up",
        "ffn_down": "down",
        "output": "other",
        "token_embd": "embed",
    }
    assert adapter["token_embd"].shape == (64, 32)  # (vocab, dim), as the embedding
    assert adapter["blk.1.ffn_down"].shape == (32, 64)
    _check_deltas(adapter, truth, rtol=1e-12)
    for res in spectrum(adapter):  # σ are blind to llama.cpp's row order
        want = np.linalg.svd(truth[res.module][0], compute_uv=False)
        got = np.asarray(res.singular_values)
        assert np.abs(got - want[: got.size]).max() / want[0] < SIGMA_RTOL, res.module
    # the checks see a transposed square product, HF rows, and a wrong scale
    want_q = _row_order("blk.0.attn_q", truth["blk.0.attn_q"][0])
    assert not np.allclose(q0.delta().numpy().T, want_q, atol=1e-6)
    assert not np.allclose(q0.delta().numpy(), truth["blk.0.attn_q"][0], atol=1e-6)
    assert not np.allclose(0.5 * q0.delta().numpy(), want_q, atol=1e-6)


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_quantized_factors(tmp_path, peft_adapter, outtype):
    state, truth = peft_adapter
    f = tmp_path / f"adapter-{outtype}.gguf"
    types = write_gguf(f, state, outtype)
    adapter = load_adapter(f)
    assert adapter.config["tensor_types"] == dict(sorted(Counter(types.values()).items()))
    if outtype == "q8_0":  # the converter's F16 fallback: B is Q8_0 only when r % 32 == 0
        assert types["blk.0.attn_q.weight.lora_a"] == "Q8_0"
        assert types["blk.0.attn_q.weight.lora_b"] == "F16"
        assert types["blk.1.attn_q.weight.lora_b"] == "Q8_0"
        assert types["token_embd.weight.lora_a"] == "F16"
    stored = _dequantized(f)
    for m in adapter:
        a, b = stored[f"{m.name}.weight.lora_a"], stored[f"{m.name}.weight.lora_b"]
        A, B = (b.T, a) if m.name == "token_embd" else (a, b)
        # the factors are exactly the file's, dequantized
        np.testing.assert_array_equal(m.A.double().numpy(), A)
        np.testing.assert_array_equal(m.B.double().numpy(), B)
        exact = np.linalg.svd(m.scale * B @ A, compute_uv=False)[: m.rank]
        (res,) = spectrum(adapter, module=m.name)
        got = np.asarray(res.singular_values)
        assert np.abs(got - exact[: got.size]).max() / exact[0] < SIGMA_RTOL, m.name
        # and within the quantization error of peft's update (Weyl's inequality)
        want = np.linalg.svd(truth[m.name][0], compute_uv=False)[: got.size]
        bound = _weyl_bound(m, *truth[m.name][2:])
        assert np.abs(got - want).max() <= bound * (1 + 1e-9) + 1e-12, m.name
        assert bound / want[0] < {"f16": 2e-3, "bf16": 2e-2, "q8_0": 2e-2}[outtype], m.name


@pytest.mark.parametrize("alpha", [None, 0.0])
def test_no_alpha_means_scale_one(tmp_path, peft_adapter, alpha):
    state, truth = peft_adapter
    f = tmp_path / "no-alpha.gguf"
    write_gguf(f, state, "f32", alpha=alpha)
    adapter = load_adapter(f)
    assert {(m.scale, m.alpha) for m in adapter} == {(1.0, None)}
    assert "s = 1" in adapter.config["scale_rule"]
    with pytest.raises(AssertionError):
        _check_deltas(adapter, truth, rtol=1e-12)
    # an alpha from the caller overrides the file's
    assert load_adapter(f, alpha=ALPHA)["blk.1.attn_q"].scale == 0.5


def test_cli_spectrum_json(tmp_path, peft_adapter):
    state, truth = peft_adapter
    f = tmp_path / "adapter.gguf"
    write_gguf(f, state, "f32")
    result = CliRunner().invoke(main, ["spectrum", str(f), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {r["module"] for r in rows} == set(truth)
    for r in rows:
        want = np.linalg.svd(truth[r["module"]][0], compute_uv=False)[: r["rank"]]
        np.testing.assert_allclose(r["singular_values"], want, rtol=SIGMA_RTOL, atol=0)
    bad = tmp_path / "model.gguf"
    _write_model(bad)
    result = CliRunner().invoke(main, ["spectrum", str(bad), "--json"])
    assert result.exit_code == 2 and str(bad) in result.stderr


def _write_model(path) -> None:
    """A (tiny) GGUF model file, as convert_hf_to_gguf.py writes one: general.type = model."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_model_file_is_refused(tmp_path, one_line_error):
    f = tmp_path / "model.gguf"
    _write_model(f)
    with pytest.raises(FormatError) as e:
        load_adapter(f)
    msg = one_line_error(e, f)
    assert "model" in msg and "not a LoRA adapter" in msg


def test_truncated_file_is_refused(tmp_path, peft_adapter, one_line_error):
    f = tmp_path / "adapter.gguf"
    write_gguf(f, peft_adapter[0], "f16")
    data = f.read_bytes()
    for cut in (len(data) - 100, 200, 20):
        g = tmp_path / f"cut{cut}.gguf"
        g.write_bytes(data[:cut])
        with pytest.raises(FormatError) as e:
            load_adapter(g)
        one_line_error(e, g)


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("norm", FormatError, "blk.0.attn_norm.weight is not a LoRA factor"),
        ("unpaired", ShapeError, "no partner"),
        ("f64", FormatError, "F64, which gguf cannot dequantize"),
        ("3d", ShapeError, "3-D"),
        ("embd_not_transposed", ShapeError, "token_embd.weight.lora"),
        ("control_vector", FormatError, "not LoRA"),
        ("nan", LoraScopeError, "NaN"),
    ],
)
def test_bad_files_are_refused(tmp_path, peft_adapter, one_line_error, case, error, match):
    state = peft_adapter[0]
    f = tmp_path / f"{case}.gguf"
    if case in ("embd_not_transposed", "nan"):

        def edit(dest, A, B):
            if case == "nan" and dest == "blk.1.ffn_up.weight":
                B = B.copy()
                B[3, 1] = np.nan
            if case == "embd_not_transposed" and dest == "token_embd.weight":
                A = A.T  # lora_a left (r, vocab), as for a linear: llama.cpp refuses it too
            return A, B

        write_gguf(f, state, "f32", edit=edit)
    else:
        w = gguf.GGUFWriter(str(f), arch="llama")
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(
            gguf.Keys.Adapter.TYPE, "control_vector" if case == "control_vector" else "lora"
        )
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, ALPHA)
        a, b = np.ones((4, 32), np.float32), np.ones((32, 4), np.float32)
        w.add_tensor("blk.0.attn_v.weight.lora_a", a)
        if case != "unpaired":
            w.add_tensor("blk.0.attn_v.weight.lora_b", b)
        if case == "norm":  # mergekit-extract-lora's full norm vector
            w.add_tensor("blk.0.attn_norm.weight", np.ones(32, np.float32))
        if case == "f64":
            w.add_tensor("blk.0.attn_k.weight.lora_a", a.astype(np.float64))
            w.add_tensor("blk.0.attn_k.weight.lora_b", b)
        if case == "3d":  # per-expert factors of ffn_up_exps
            w.add_tensor("blk.0.ffn_up_exps.weight.lora_a", np.ones((3, 4, 32), np.float32))
            w.add_tensor("blk.0.ffn_up_exps.weight.lora_b", np.ones((3, 16, 4), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    with pytest.raises(error, match=match) as e:
        load_adapter(f)
    one_line_error(e, f)


def test_missing_gguf_package(tmp_path, peft_adapter, monkeypatch, one_line_error):
    f = tmp_path / "adapter.gguf"
    write_gguf(f, peft_adapter[0], "f32")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(FormatError) as e:
        load_adapter(f)
    assert "pip install 'lorascope[gguf]'" in one_line_error(e, f)


def test_an_hf_base_is_not_matched_by_name(tmp_path, peft_adapter):
    f = tmp_path / "adapter.gguf"
    write_gguf(f, peft_adapter[0], "f32")
    q = load_adapter(f)["blk.0.attn_q"]
    base = tmp_path / "model.safetensors"  # HF names: q's rows would be in the other order
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32)}, str(base))
    with pytest.raises(MissingModuleError, match=r"blk\.0\.attn_q"):
        load_base(base).weight_for(q)
