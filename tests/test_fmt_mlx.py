"""mlx-lm adapters: lorascope's ΔW against mlx-lm's own ``fuse()``.

The adapters are written by the real mlx-lm (tests/data/make_mlx_fixtures.py: a tiny model, then
what ``mlx_lm.lora.train_model`` and the trainer save). When mlx and mlx-lm import, they are made
here in a temporary directory; otherwise the committed copies in tests/data/mlx/ (made by the same
script) are read. The truth is mlx-lm's ``fuse()`` in float64 minus the base weight.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lorascope.analysis import spectrum
from lorascope.cli import main
from lorascope.errors import FormatError, LoraScopeError, LoraScopeWarning, ShapeError
from lorascope.formats import load_adapter
from lorascope.update import full_update_svdvals, merged_weight

DATA = Path(__file__).parent / "data"
SIGMA_RTOL = 1e-10


def _have_mlx() -> bool:
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except Exception:  # not installed, or no wheel for this platform
        return False
    return True


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    """The directory holding ``lora/``, ``dora/``, ``moe/`` and ``full/``."""
    if not _have_mlx():
        return DATA / "mlx"
    spec = importlib.util.spec_from_file_location("make_mlx", DATA / "make_mlx_fixtures.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    out = tmp_path_factory.mktemp("mlx")
    for kind in gen.KINDS:
        gen.make(kind, out / kind)
    return out


def _copy(fixtures: Path, kind: str, tmp_path: Path) -> Path:
    dst = tmp_path / kind
    shutil.copytree(fixtures / kind, dst)
    return dst


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _truth(d: Path) -> dict[str, np.ndarray]:
    with np.load(d / "truth.npz") as z:
        return {k: z[k] for k in z.files}


def _delta_of(truth: dict, name: str) -> np.ndarray:
    """mlx's fused − base for a module (one expert's slice for ``<name>.experts.<e>``)."""
    if ".experts." in name:
        base, e = name.rsplit(".experts.", 1)
        return truth[f"{base}.delta"][int(e)]
    return truth[f"{name}.delta"]


def _assert_deltas(adapter, truth: dict) -> None:
    for m in adapter:
        want = _delta_of(truth, m.name)
        got = m.delta().numpy()  # float64 product of the stored float32 factors
        assert got.shape == want.shape, m.name
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())


def _assert_sigma(adapter, truth: dict) -> float:
    worst = 0.0
    for res in spectrum(adapter):
        want = np.linalg.svd(_delta_of(truth, res.module), compute_uv=False)[: res.rank]
        got = np.asarray(res.singular_values)
        err = np.abs(got - want[: got.size]).max() / want[0]
        assert err < SIGMA_RTOL, (res.module, err)
        worst = max(worst, err)
    return worst


def test_lora_matches_fuse(fixtures):
    d = fixtures / "lora"
    adapter = load_adapter(d)
    truth = _truth(d)
    assert adapter.format == "mlx"
    names = {k.removesuffix(".delta") for k in truth}
    assert {m.name for m in adapter} == names
    assert len(names) == 9  # the 7 linears of layer 1, embed_tokens and lm_head
    for m in adapter:
        assert (m.family, m.scale, m.alpha, m.rank, m.r) == ("lora", 2.0, None, 2, 2)
        assert m.magnitude is None and m.update == "full"
    emb = adapter["model.embed_tokens"]
    assert emb.kind == "embed" and emb.shape == (10, 8)  # (vocab, dims), as the embedding
    q = adapter["model.layers.1.self_attn.q_proj"]
    assert (q.kind, q.layer, q.shape) == ("q", 1, (8, 8))
    assert adapter["model.layers.1.mlp.down_proj"].shape == (8, 12)
    _assert_deltas(adapter, truth)
    _assert_sigma(adapter, truth)
    # the check sees a transposed square factor product and a wrong scale
    assert not np.allclose(q.delta().numpy().T, truth[f"{q.name}.delta"], atol=1e-6)
    assert not np.allclose(0.5 * q.delta().numpy(), truth[f"{q.name}.delta"], atol=1e-6)


def test_scale_comes_from_the_config(fixtures, tmp_path):
    d = _copy(fixtures, "lora", tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["lora_parameters"]["scale"] = 1.0
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    adapter = load_adapter(d)
    assert {m.scale for m in adapter} == {1.0}
    with pytest.raises(AssertionError):
        _assert_deltas(adapter, _truth(d))
    # an alpha from the caller replaces mlx-lm's scale by alpha / r
    assert {m.scale for m in load_adapter(d, alpha=4.0)} == {2.0}


def test_dora_merged_weight_matches_fuse(fixtures):
    d = fixtures / "dora"
    with pytest.warns(LoraScopeWarning, match="DoRA"):
        adapter = load_adapter(d)
    truth = _truth(d)
    assert {m.name for m in adapter} == {k.removesuffix(".delta") for k in truth if "delta" in k}
    assert len(adapter) == 4  # q, v, down of layer 1 and embed_tokens
    for m in adapter:
        assert m.family == "dora" and m.update == "dora-direction"
        assert m.magnitude.axis == "out" and m.magnitude.key == f"{m.name}.m"
        assert m.params == m.A.numel() + m.B.numel() + m.d_out
        W = torch.from_numpy(truth[f"{m.name}.base"])  # float64, layout of the base weight
        fused = truth[f"{m.name}.base"] + truth[f"{m.name}.delta"]
        got = merged_weight(m, W).numpy()  # float64: W is float64
        np.testing.assert_allclose(got, fused, rtol=0, atol=1e-12 * np.abs(fused).max())
        # the whole update's spectrum (DoRA's ΔW = W' − W is not low-rank)
        k = min(m.shape)
        sv, fro = full_update_svdvals(m, W, k)
        want = np.linalg.svd(truth[f"{m.name}.delta"], compute_uv=False)
        assert np.abs(sv - want[:k]).max() / want[0] < SIGMA_RTOL, m.name
        assert fro == pytest.approx(np.linalg.norm(want), rel=1e-12)
    emb = adapter["model.embed_tokens"]
    assert emb.shape == (10, 8) and emb.magnitude.m.shape == (10,)  # one norm per vocab row


def test_moe_switch_linear_one_module_per_expert(fixtures):
    d = fixtures / "moe"
    adapter = load_adapter(d)
    truth = _truth(d)
    switch = "model.layers.1.block_sparse_moe.switch_mlp"
    experts = [m for m in adapter if ".experts." in m.name]
    assert sorted(m.name for m in experts) == sorted(
        f"{switch}.{p}.experts.{e}" for p in ("gate_proj", "up_proj", "down_proj") for e in range(3)
    )
    for m in experts:
        assert m.layer == 1 and m.kind == m.name.split(".")[-3].removesuffix("_proj")
        assert m.keys[0].endswith(".lora_a[" + m.name[-1] + "]")
    assert adapter[f"{switch}.down_proj.experts.2"].shape == (8, 6)
    assert "model.layers.1.block_sparse_moe.gate" in {m.name for m in adapter}  # the router
    assert {m.scale for m in adapter} == {3.0}
    _assert_deltas(adapter, truth)
    _assert_sigma(adapter, truth)
    # experts are not interchangeable: each module is its own expert's update
    e0, e1 = (adapter[f"{switch}.up_proj.experts.{e}"] for e in (0, 1))
    assert not np.allclose(e0.delta().numpy(), truth[f"{switch}.up_proj.delta"][1])
    assert not np.allclose(e1.delta().numpy(), truth[f"{switch}.up_proj.delta"][0])


def test_a_file_or_checkpoint_beside_its_config(fixtures, tmp_path):
    d = _copy(fixtures, "lora", tmp_path)
    assert load_adapter(d / "adapters.safetensors").format == "mlx"
    ckpt = d / "0000100_adapters.safetensors"
    shutil.copy(d / "adapters.safetensors", ckpt)
    adapter = load_adapter(ckpt)
    assert adapter.format == "mlx" and len(adapter) == 9
    _assert_deltas(adapter, _truth(d))


def test_full_fine_tune_is_refused(fixtures, one_line_error):
    d = fixtures / "full"
    with pytest.raises(FormatError) as e:
        load_adapter(d)
    assert "full" in one_line_error(e, d / "adapters.safetensors")
    with pytest.raises(FormatError) as e:
        load_adapter(d / "adapters.safetensors")
    one_line_error(e, d / "adapters.safetensors")


@pytest.mark.parametrize(
    "kind, edit, error, match",
    [
        ("lora", {"fine_tune_type": "dora"}, FormatError, "no magnitude"),
        ("dora", {"fine_tune_type": "lora"}, FormatError, "DoRA magnitude"),
        ("lora", {"adapter_quantization": {"bits": 4}}, FormatError, "quantized"),
        ("lora", {"lora_parameters": {"rank": 3, "scale": 2.0}}, ShapeError, "rank 2"),
        ("lora", {"lora_parameters": {"rank": 2}}, FormatError, "scale"),
    ],
)
def test_config_disagreements_are_refused(
    fixtures, tmp_path, one_line_error, kind, edit, error, match
):
    d = _copy(fixtures, kind, tmp_path)
    _edit_config(d, **edit)
    with pytest.raises(error, match=match) as e:
        load_adapter(d)
    one_line_error(e, d)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ("drop_b", ShapeError, "no partner"),
        ("fused_key", FormatError, "not an mlx-lm adapter parameter"),
        ("nan", LoraScopeError, "NaN"),
    ],
)
def test_bad_tensors_are_refused(fixtures, tmp_path, one_line_error, change, error, match):
    d = _copy(fixtures, "lora", tmp_path)
    f = d / "adapters.safetensors"
    tensors = load_file(f)
    key_b = "model.layers.1.self_attn.v_proj.lora_b"
    if change == "drop_b":
        del tensors[key_b]
    elif change == "fused_key":  # afm7's FusedLoRALinear saves lists: <name>.lora_a.0
        tensors["model.layers.1.self_attn.qkv_proj.lora_a.0"] = torch.zeros(8, 2)
    else:
        tensors[key_b][0, 0] = float("nan")
    save_file(tensors, str(f))
    with pytest.raises(error, match=match) as e:
        load_adapter(d)
    one_line_error(e, f)


def test_no_config_beside_the_file(fixtures, tmp_path, one_line_error):
    f = tmp_path / "adapters.safetensors"
    shutil.copy(fixtures / "lora" / "adapters.safetensors", f)
    with pytest.raises(LoraScopeError) as e:
        load_adapter(f, fmt="mlx")
    assert "adapter_config.json" in one_line_error(e, f)


def test_cli_spectrum_json(fixtures):
    d = fixtures / "moe"
    result = CliRunner().invoke(main, ["spectrum", str(d), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = {r["module"]: r for r in json.loads(result.stdout)}
    truth = _truth(d)
    assert len(rows) == 10
    for name, row in rows.items():
        want = np.linalg.svd(_delta_of(truth, name), compute_uv=False)[:2]
        np.testing.assert_allclose(row["singular_values"], want, rtol=SIGMA_RTOL, atol=0)
    bad = CliRunner().invoke(main, ["spectrum", str(fixtures / "full"), "--json"])
    assert bad.exit_code == 2 and "full" in bad.stderr
