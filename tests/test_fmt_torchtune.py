"""torchtune native adapters: lorascope's ΔW against torchtune's own merge.

The adapters are written by the real torchtune (tests/data/make_torchtune_fixtures.py: a tiny
``lora_llama3``, then what the LoRA recipe and ``FullModelTorchTuneCheckpointer`` save). When
torchtune imports (it needs torchao), they are made here in a temporary directory; otherwise the
committed copies in tests/data/torchtune/ (made by the same script) are read. The truth is
``get_merged_lora_ckpt`` in float64 minus the base weight.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lorascope.analysis import spectrum
from lorascope.cli import main
from lorascope.errors import FormatError, LoraScopeWarning, MissingModuleError, ShapeError
from lorascope.formats import load_adapter, load_base
from lorascope.formats._common import Probe
from lorascope.formats.layouts import detect
from lorascope.update import full_update_svdvals, merged_weight

DATA = Path(__file__).parent / "data"
SIGMA_RTOL = 1e-10
TUNE_NAMES = {
    "layers.0.attn.q_proj": ("q", (8, 8)),
    "layers.0.attn.k_proj": ("k", (4, 8)),
    "layers.0.attn.v_proj": ("v", (4, 8)),
    "layers.0.attn.output_proj": ("o", (8, 8)),
    "layers.0.mlp.w1": ("gate", (12, 8)),
    "layers.0.mlp.w2": ("down", (8, 12)),
    "layers.0.mlp.w3": ("up", (12, 8)),
    "output": ("other", (10, 8)),
}


def _have_torchtune() -> bool:
    try:
        import torchtune  # noqa: F401
    except Exception:  # not installed, or torchao missing (torchtune raises ImportError)
        return False
    return True


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    """The directory holding ``lora/`` and ``dora/``."""
    if not _have_torchtune():
        return DATA / "torchtune"
    spec = importlib.util.spec_from_file_location("make_tt", DATA / "make_torchtune_fixtures.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    out = tmp_path_factory.mktemp("torchtune")
    for kind in gen.KINDS:
        gen.make(kind, out / kind)
    return out


def _truth(kind_dir: Path) -> dict[str, np.ndarray]:
    with np.load(kind_dir / "truth.npz") as z:
        return {k: z[k] for k in z.files}


def _assert_deltas(adapter, truth: dict) -> None:
    for m in adapter:
        want = truth[f"{m.name}.delta"]
        got = m.delta().numpy()
        assert got.shape == want.shape, m.name
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())


def test_lora_matches_merge_alpha_from_recipe_config(fixtures):
    pytest.importorskip("yaml")
    d = fixtures / "lora" / "epoch_0"
    adapter = load_adapter(d)
    truth = _truth(fixtures / "lora")
    assert adapter.format == "torchtune"
    assert adapter.config["alpha"] == 3.0
    assert adapter.config["alpha_source"] == "torchtune_config.yaml"
    assert {m.name: (m.kind, m.shape) for m in adapter} == TUNE_NAMES
    for m in adapter:
        assert (m.family, m.alpha, m.scale, m.rank, m.r) == ("lora", 3.0, 1.5, 2, 2)
        assert m.layer == (None if m.name == "output" else 0)
    _assert_deltas(adapter, truth)
    for res in spectrum(adapter):
        want = np.linalg.svd(truth[f"{res.module}.delta"], compute_uv=False)
        got = np.asarray(res.singular_values)
        assert np.abs(got - want[: got.size]).max() / want[0] < SIGMA_RTOL, res.module
    q = adapter["layers.0.attn.q_proj"]  # square: a transposed product would be caught
    assert not np.allclose(q.delta().numpy().T, truth["layers.0.attn.q_proj.delta"], atol=1e-6)


def test_dora_merged_weight_matches_merge_alpha_from_peft_config(fixtures):
    d = fixtures / "dora" / "epoch_0"
    with pytest.warns(LoraScopeWarning, match="DoRA"):
        adapter = load_adapter(d / "adapter_model.pt")
    truth = _truth(fixtures / "dora")
    assert adapter.config["alpha_source"] == "adapter_config.json"
    assert {m.name for m in adapter} == {"layers.0.attn.q_proj", "layers.0.attn.v_proj", "output"}
    for m in adapter:
        assert (m.family, m.scale, m.update) == ("dora", 2.5, "dora-direction")
        assert m.magnitude.axis == "out" and m.magnitude.key == f"{m.name}.magnitude"
        assert m.params == m.A.numel() + m.B.numel() + m.d_out
        W = torch.from_numpy(truth[f"{m.name}.base"])
        merged = truth[f"{m.name}.base"] + truth[f"{m.name}.delta"]
        got = merged_weight(m, W).numpy()
        np.testing.assert_allclose(got, merged, rtol=0, atol=1e-12 * np.abs(merged).max())
        k = min(m.shape)
        sv, fro = full_update_svdvals(m, W, k)
        want = np.linalg.svd(truth[f"{m.name}.delta"], compute_uv=False)
        assert np.abs(sv - want[:k]).max() / want[0] < SIGMA_RTOL, m.name
        assert fro == pytest.approx(np.linalg.norm(want), rel=1e-12)


def test_alpha_from_the_caller_and_the_default(fixtures, tmp_path):
    src = fixtures / "lora" / "epoch_0" / "adapter_model.pt"
    assert {m.scale for m in load_adapter(src, alpha=8.0)} == {4.0}
    lone = tmp_path / "adapter_model.pt"  # no config anywhere near it
    shutil.copy(src, lone)
    with pytest.warns(LoraScopeWarning, match="alpha = r"):
        adapter = load_adapter(lone)
    assert {(m.alpha, m.scale) for m in adapter} == {(2.0, 1.0)}
    with pytest.raises(AssertionError):  # the wrong scale is seen against torchtune's merge
        _assert_deltas(adapter, _truth(fixtures / "lora"))


def test_recipe_config_is_skipped_without_pyyaml(fixtures, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` raises ImportError
    with pytest.warns(LoraScopeWarning, match="alpha = r"):
        adapter = load_adapter(fixtures / "lora" / "epoch_0")
    assert {m.scale for m in adapter} == {1.0}


def test_which_directories_are_torchtune(fixtures, tmp_path):
    tt = tmp_path / "epoch_3"
    shutil.copytree(fixtures / "dora" / "epoch_0", tt)
    assert detect(Probe.of(tt)).name == "torchtune"
    # the HF checkpointer's PEFT export beside it: the directory is read as PEFT
    (tt / "adapter_model.safetensors").write_bytes(b"")
    assert detect(Probe.of(tt)).name == "peft"
    # older torchtune: output_dir/adapter_<N>.pt
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(fixtures / "lora" / "epoch_0" / "adapter_model.pt", old / "adapter_0.pt")
    with pytest.warns(LoraScopeWarning, match="alpha"):
        assert load_adapter(old).format == "torchtune"
    shutil.copy(old / "adapter_0.pt", old / "adapter_1.pt")
    with pytest.raises(FormatError, match="several"):
        load_adapter(old)


def _write(tmp_path: Path, tensors: dict) -> Path:
    f = tmp_path / "adapter_model.pt"
    torch.save(tensors, f)
    return f


def test_lora_a_without_lora_b(fixtures, tmp_path, one_line_error):
    sd = torch.load(fixtures / "lora" / "epoch_0" / "adapter_model.pt", weights_only=True)
    del sd["layers.0.mlp.w2.lora_b.weight"]
    f = _write(tmp_path, sd)
    with pytest.raises(ShapeError) as e:
        load_adapter(f, alpha=3.0)
    msg = one_line_error(e, f)
    assert "layers.0.mlp.w2.lora_a.weight" in msg and "lora_b" in msg


def test_unknown_lora_key_rank_mismatch_and_whole_weights(fixtures, tmp_path, one_line_error):
    sd = torch.load(fixtures / "lora" / "epoch_0" / "adapter_model.pt", weights_only=True)
    f = _write(tmp_path, {**sd, "layers.0.attn.q_proj.lora_a.bias": torch.zeros(2)})
    with pytest.raises(FormatError, match=r"lora_a\.bias") as e:
        load_adapter(f, alpha=3.0)
    one_line_error(e, f)

    f = _write(tmp_path, sd)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    with pytest.raises(ShapeError, match="r=4") as e:
        load_adapter(f)
    one_line_error(e, f)
    (tmp_path / "adapter_config.json").unlink()

    f = _write(tmp_path, {**sd, "tok_embeddings.weight": torch.randn(10, 8)})
    with pytest.warns(LoraScopeWarning, match="tok_embeddings.weight"):
        adapter = load_adapter(f, alpha=3.0)
    assert adapter.full_weights == ("tok_embeddings.weight",)
    _assert_deltas(adapter, _truth(fixtures / "lora"))


def test_cli_spectrum_json(fixtures):
    f = fixtures / "lora" / "epoch_0" / "adapter_model.pt"
    args = ["spectrum", str(f), "--json", "--alpha", "3"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {r["module"] for r in rows} == set(TUNE_NAMES)
    truth = _truth(fixtures / "lora")
    for r in rows:
        want = np.linalg.svd(truth[f"{r['module']}.delta"], compute_uv=False)[:2]
        np.testing.assert_allclose(r["singular_values"], want, rtol=SIGMA_RTOL, atol=0)
    bad = fixtures / "dora" / "epoch_0" / "missing.pt"
    result = CliRunner().invoke(main, ["spectrum", str(bad), "--json"])
    assert result.exit_code == 2 and str(bad) in result.stderr


def test_an_hf_base_is_not_matched_by_name(fixtures, tmp_path):
    q = load_adapter(fixtures / "lora" / "epoch_0", alpha=3.0)["layers.0.attn.q_proj"]
    base = tmp_path / "model.safetensors"  # HF names, HF rows
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8)}, str(base))
    with pytest.raises(MissingModuleError, match=r"layers\.0\.attn\.q_proj"):
        load_base(base).weight_for(q)
    # a base in torchtune's own format (same names, same rows) is matched
    tune = tmp_path / "tune.safetensors"
    save_file({"layers.0.attn.q_proj.weight": torch.ones(8, 8)}, str(tune))
    assert torch.equal(load_base(tune).weight_for(q), torch.ones(8, 8))
