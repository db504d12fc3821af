"""LyCORIS files (kohya layout) read exactly: every family and variant, written in the test by
the real LyCORIS (``create_lycoris`` on a tiny float64 model with SD-style module names).

Truth is LyCORIS' forward pass, read out with one-hot inputs: ``W' − W0`` of every wrapped layer
(alpha/r applied once; LyCORIS 4.1.3's own ``get_diff_weight``/``merge_to`` apply it twice for
LoHa/LoKr, so they are compared only where alpha == dim). Everything is float64: σ agree with a
dense ``numpy.linalg.svd`` of the truth to 1e-10 relative to σ₁.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn

from lorascope.cli import main
from lorascope.errors import FormatError, LoraScopeWarning, ShapeError
from lorascope.formats import load_adapter
from lorascope.linalg import factored_svdvals
from lorascope.merge import merge_adapter
from lorascope.update import delta_weight, full_update_svdvals, merged_weight, with_base

lycoris = pytest.importorskip("lycoris")
from lycoris import LycorisNetwork, create_lycoris  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.ERROR)  # after importing lycoris (it sets it)

TOL = 1e-10
PREFIX = "lora_unet"


# Class names are the ones LyCORIS' kohya presets target (sd-scripts' SD1.5 "full" preset).
class Transformer2DModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(48, 48, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(48, 40)])
        self.ff = nn.Linear(40, 96)


class ResnetBlock2D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(32, 24, 1)
        self.conv_odd = nn.Conv2d(12, 20, (3, 1), padding=(1, 0))


class Downsample2D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, stride=2, padding=1)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([Transformer2DModel()])
        self.resnets = nn.ModuleList([ResnetBlock2D()])
        self.downsamplers = nn.ModuleList([Downsample2D()])


class Tiny(nn.Module):
    """Linear (with and without bias), Conv2d 3x3 / 1x1 / 3x1 / 3x3 stride 2, named like a
    diffusers UNet (``down_blocks.0.attentions.0.to_q``, ``down_blocks.0.resnets.0.conv1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList([_Block()])


class CLIPAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(32, 32)
        self.out_proj = nn.Linear(32, 32)


class CLIPMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 36)
        self.fc2 = nn.Linear(36, 32)


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = CLIPAttention()
        self.mlp = CLIPMLP()


class TinyCLIP(nn.Module):
    """``text_model.encoder.layers.0.self_attn.q_proj`` ...: SD1.5's text-encoder paths."""

    def __init__(self) -> None:
        super().__init__()
        self.text_model = nn.Module()
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList([_Layer()])


@pytest.fixture
def lyco(monkeypatch):
    """LyCORIS' presets live in class attributes: set the kohya prefix, restore all after."""
    for attr in (
        "LORA_PREFIX",
        "MODULE_ALGO_MAP",
        "NAME_ALGO_MAP",
        "TARGET_REPLACE_MODULE",
        "TARGET_REPLACE_NAME",
        "ENABLE_CONV",
        "USE_FNMATCH",
        "TARGET_EXCLUDE_NAME",
    ):
        if hasattr(LycorisNetwork, attr):
            monkeypatch.setattr(LycorisNetwork, attr, copy.copy(getattr(LycorisNetwork, attr)))
    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", PREFIX)
    return LycorisNetwork


def perturb(net: nn.Module, seed: int = 1) -> None:
    """Every factor non-zero (LyCORIS zero-inits one side); dora_scale moved off ‖W0‖."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name.endswith("dora_scale"):
                p.mul_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def forward_delta(layer: nn.Module, W0: torch.Tensor, b0: torch.Tensor | None) -> torch.Tensor:
    """``W' − W0`` of a wrapped layer from its forward pass, flattened to ``(out, in·kh·kw)``.

    One-hot inputs; the response to x = 0 is subtracted. A conv with stride ``s`` and padding
    ``p`` reads output pixel ``o = ceil(p/s)``, which sees input ``s·o − p + k`` at kernel
    offset ``k``: the one-hot sits there."""
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            x = torch.eye(W0.shape[1], dtype=W0.dtype)
            y = layer(x) - F.linear(x, W0, b0)
            z = torch.zeros_like(x[:1])
            return (y - (layer(z) - F.linear(z, W0, b0))).T.contiguous()
        out, cin, kh, kw = W0.shape
        o = [-(-p // s) for p, s in zip(layer.padding, layer.stride, strict=True)]
        off = [s * oi - p for oi, p, s in zip(o, layer.padding, layer.stride, strict=True)]
        n = cin * kh * kw
        x = torch.zeros(n, cin, off[0] + kh, off[1] + kw, dtype=W0.dtype)
        x[:, :, off[0] :, off[1] :] = torch.eye(n, dtype=W0.dtype).reshape(n, cin, kh, kw)
        kw_ = dict(stride=layer.stride, padding=layer.padding)
        y = layer(x) - F.conv2d(x, W0, b0, **kw_)
        z = torch.zeros_like(x[:1])
        y = y - (layer(z) - F.conv2d(z, W0, b0, **kw_))
        return y[:, :, o[0], o[1]].T.reshape(out, n).contiguous()


def build(tmp_path, tag: str, *, dim: int = 4, alpha: float = 2, seed: int = 1, **kw):
    """A LyCORIS network on a fresh Tiny, perturbed, saved as float64; the base checkpoint too.

    Returns ``(file, base_file, net, truth)`` with ``truth[name] = (W0 (out, in·K), W' − W0)``.
    """
    torch.manual_seed(0)
    model = Tiny().double()
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    net = create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=alpha, **kw)
    net.apply_to()
    return save(tmp_path, tag, net, base, seed)


def save(tmp_path, tag: str, net, base: dict, seed: int = 1):
    """Perturb ``net`` (applied), save it as float64 and ``base`` beside it; read the truth."""
    save_file(base, tmp_path / f"{tag}_base.safetensors")
    net.double()
    perturb(net, seed)
    net.eval()
    path = tmp_path / f"{tag}.safetensors"
    net.save_weights(str(path), None, {"ss_network_module": "lycoris.kohya"})
    truth = {}
    for lora in net.loras:
        layer = lora.org_module[0]
        W0, b0 = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
        truth[lora.lora_name] = (W0.reshape(W0.shape[0], -1), forward_delta(layer, W0, b0))
    return path, tmp_path / f"{tag}_base.safetensors", net, truth


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def sigma_error(S: np.ndarray, dense: np.ndarray) -> float:
    """Largest σ error relative to σ₁ (σ beyond the factored width must be ~0 in the dense)."""
    ref = np.linalg.svd(dense, compute_uv=False)
    k = min(len(S), len(ref))
    err = np.abs(np.asarray(S[:k]) - ref[:k]).max()
    return float(max(err, ref[k:].max(initial=0.0)) / ref[0])


def stored(path, name: str) -> dict[str, torch.Tensor]:
    sd = load_file(path)
    return {k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".", 1)[0] == name}


def expected_meta(lora, tensors: dict[str, torch.Tensor]) -> tuple[str, int | None, int]:
    """(family, nominal rank, stored elements) as LyCORIS' module says."""
    kind = type(lora).__name__
    family = {"LoConModule": "lora", "LohaModule": "loha", "LokrModule": "lokr"}[kind]
    if family == "lora" and lora.wd:
        family = "dora"
    r = None if kind == "LokrModule" and lora.use_w1 and lora.use_w2 else lora.lora_dim
    return family, r, sum(t.numel() for k, t in tensors.items() if k != "alpha")


def check_file(path, base, net, truth) -> dict[str, float]:
    """Every module against the forward: family/r/params, ΔW, σ, DoRA merge; then a merge."""
    with warns_if_dora(net):
        adapter = load_adapter(path)
    assert adapter.format == "kohya"
    assert sorted(m.name for m in adapter) == sorted(lo.lora_name for lo in net.loras)
    errors = {}
    for lora in net.loras:
        m = adapter[lora.lora_name]
        W0, dW = truth[lora.lora_name]
        family, r, n = expected_meta(lora, stored(path, lora.lora_name))
        assert (m.family, m.nominal_rank, m.params) == (family, r, n), lora.lora_name
        assert m.shape == tuple(W0.shape)
        if m.magnitude is None:
            S = factored_svdvals(m.A, m.B, m.scale).numpy()
            errors[m.name] = sigma_error(S, dW.numpy())
            assert rel(delta_weight(m), dW) < TOL, m.name
        else:
            assert m.magnitude.axis == ("out" if lora.wd_on_out else "in")
            assert rel(merged_weight(m, W0), W0 + dW) < TOL, m.name
            k = min(m.shape)
            S, fro = full_update_svdvals(m, W0, k)
            errors[m.name] = sigma_error(S, dW.numpy())
            assert fro == pytest.approx(float(dW.norm()), rel=TOL)
            _check_rank_r(m, lora, W0, dW)
        assert errors[m.name] < TOL, (m.name, errors[m.name])
    out = path.parent / (path.stem + "_merged.safetensors")
    with warns_if_dora(net):
        merge_adapter(base, path, out)
    merged, before = load_file(out), load_file(base)
    for lora in net.loras:
        W0, dW = truth[lora.lora_name]
        key = next(k for k in before if k.endswith(".weight") and _names(k, lora.lora_name))
        assert merged[key].shape == before[key].shape
        assert rel(merged[key].reshape(W0.shape), W0 + dW) < TOL, key
    return errors


def _names(key: str, lora_name: str) -> bool:
    """Whether base tensor ``key`` is the weight kohya module ``lora_name`` adapts."""
    return lora_name.split("_", 2)[2] == key.removesuffix(".weight").replace(".", "_")


@contextlib.contextmanager
def warns_if_dora(net):
    """Reading warns about DoRA (only the direction part without a base), about nothing else."""
    if any(lo.wd for lo in net.loras):
        with pytest.warns(LoraScopeWarning, match="DoRA"):
            yield
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", LoraScopeWarning)
            yield


def _check_rank_r(m, lora, W0: torch.Tensor, dW: torch.Tensor) -> None:
    """``with_base``'s rank-r part ``diag(g)·ΔW_lr`` (axis out; ``ΔW_lr·diag(g)`` axis in)
    against the dense one from the forward: ``g`` = ‖W' ‖/‖W0 + ΔW_lr‖ per row (per input
    channel), ``ΔW_lr`` LyCORIS' own additive part (scale once)."""
    with torch.no_grad():
        if type(lora).__name__ == "LoConModule":
            lr = lora.make_weight() * lora.scale
        else:
            lr = lora.get_weight(lora.shape) * lora.scalar
    lr = lr.reshape(W0.shape)
    V, Wp = W0 + lr, W0 + dW
    if m.magnitude.axis == "out":
        g = Wp.norm(dim=1) / V.norm(dim=1)
        dense = g[:, None] * lr
    else:
        group = W0.shape[1] // m.magnitude.m.numel()

        def cols(X: torch.Tensor) -> torch.Tensor:  # one norm per input channel
            return X.square().sum(0).reshape(-1, group).sum(1).sqrt()

        g = (cols(Wp) / cols(V)).repeat_interleave(group)
        dense = lr * g[None, :]
    resolved = with_base(m, W0)
    assert resolved.update == "dora-rank-r"
    err = sigma_error(factored_svdvals(resolved.A, resolved.B, resolved.scale).numpy(), dense)
    assert err < 1e-9, (m.name, err)  # g from norms of the forward's W': a few ulps more


# ----------------------------------------------------------------------------- families

CASES = {
    "lora": dict(algo="lora"),
    "locon_tucker": dict(algo="locon", use_tucker=True),
    "loha": dict(algo="loha"),
    "loha_tucker": dict(algo="loha", use_tucker=True, conv_dim=3, conv_alpha=1),
    "lokr": dict(algo="lokr"),  # 48x48: both halves full (s = 1); ff and convs: w2 low-rank
    "lokr_factor4": dict(algo="lokr", factor=4),
    "lokr_decompose_both": dict(algo="lokr", factor=8, decompose_both=True, dim=2, alpha=1),
    "lokr_full_matrix": dict(algo="lokr", full_matrix=True),
    "lokr_tucker": dict(algo="lokr", use_tucker=True, dim=2, alpha=1.5),
    "lokr_unbalanced": dict(algo="lokr", factor=4, unbalanced_factorization=True),
    # unbalanced puts the large out factor in w1, so decompose_both factorizes it: at factor 4,
    # dim 2 the 3x3 conv's w2 is forced full (4-D lokr_w2), at factor 2 it is a Tucker lokr_t2
    # (at dim 1 LyCORIS' own forward fails in torch.kron on the 3x1 conv)
    "lokr_w1ab_w2full": dict(
        algo="lokr", factor=4, unbalanced_factorization=True, decompose_both=True, dim=2
    ),
    "lokr_w1ab_tucker": dict(
        algo="lokr",
        factor=2,
        unbalanced_factorization=True,
        decompose_both=True,
        use_tucker=True,
        dim=2,
        alpha=3,
    ),
}
DORA = {
    f"{algo}_dora_{'out' if on_out else 'in'}": dict(
        algo=algo, dora_wd=True, wd_on_output=on_out, **extra
    )
    for algo, extra in (("lora", {}), ("loha", {}), ("lokr", {"factor": 4}))
    for on_out in (True, False)
}
# tensor sets some module of each configuration must hold (so it tests what it is named for)
EXPECT = {
    "locon_tucker": [{"lora_mid.weight"}],
    "loha_tucker": [{"hada_t1", "hada_t2"}],
    "lokr": [{"lokr_w1", "lokr_w2"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}],
    "lokr_decompose_both": [{"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}],
    "lokr_full_matrix": [{"lokr_w1", "lokr_w2"}],
    "lokr_tucker": [{"lokr_w1", "lokr_t2"}],
    "lokr_w1ab_w2full": [{"lokr_w1_a", "lokr_w2"}],
    "lokr_w1ab_tucker": [{"lokr_w1_a", "lokr_t2"}],
    **{tag: [{"dora_scale"}] for tag in DORA},
}


@pytest.mark.parametrize("tag", [*CASES, *DORA])
def test_family_matches_lycoris_forward(tmp_path, lyco, tag):
    kw = dict({**CASES, **DORA}[tag])
    path, base, net, truth = build(tmp_path, tag, **kw)
    held = [set(stored(path, lo.lora_name)) for lo in net.loras]
    for want in EXPECT.get(tag, []):
        assert any(want <= h for h in held), (tag, want, held)
    if tag == "lokr_full_matrix":
        assert not any("lokr_w2_a" in h for h in held)
    errors = check_file(path, base, net, truth)
    print(f"{tag}: largest σ error / σ₁ = {max(errors.values()):.1e}")


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_alpha_equal_dim_every_lycoris_path_agrees(tmp_path, lyco, algo):
    """With alpha == dim (scale 1) LyCORIS' get_diff_weight and merge_to agree with the forward,
    and so does the reader: three routes to the same ΔW."""
    path, base, net, truth = build(tmp_path, f"{algo}_eq", dim=4, alpha=4, algo=algo, factor=4)
    check_file(path, base, net, truth)
    adapter = load_adapter(path)
    n2 = copy.deepcopy(net)
    n2.restore()
    n2.merge_to(1.0)
    for lora, lora2 in zip(net.loras, n2.loras, strict=True):
        W0, dW = truth[lora.lora_name]
        with torch.no_grad():
            gdw = lora.get_diff_weight(multiplier=1.0)[0].reshape(W0.shape)
        merged = lora2.org_module[0].weight.detach().reshape(W0.shape) - W0
        got = delta_weight(adapter[lora.lora_name])
        assert rel(got, gdw) < TOL and rel(got, merged) < TOL and rel(got, dW) < TOL


def test_alpha_zero_or_absent_means_rank(tmp_path, lyco):
    """LyCORIS: "if alpha == 0 or None, alpha is rank". A file with alpha == dim (scale 1) reads
    the same with its alphas set to 0 or removed, and differently with them halved."""
    for algo in ("lora", "loha", "lokr"):
        path, _, net, truth = build(tmp_path, algo, dim=4, alpha=4, algo=algo, factor=4)
        sd = load_file(path)
        for variant, change in (("zero", 0.0), ("absent", None), ("half", 2.0)):
            new = {
                k: (torch.tensor(change, dtype=v.dtype) if k.endswith(".alpha") else v)
                for k, v in sd.items()
                if not (change is None and k.endswith(".alpha"))
            }
            save_file(new, tmp_path / f"{algo}_{variant}.safetensors")
            adapter = load_adapter(tmp_path / f"{algo}_{variant}.safetensors")
            for lora in net.loras:
                full = type(lora).__name__ == "LokrModule" and lora.use_w1 and lora.use_w2
                want = truth[lora.lora_name][1] * (0.5 if variant == "half" and not full else 1)
                assert rel(delta_weight(adapter[lora.lora_name]), want) < TOL, (algo, variant)


def test_rs_lora_alpha_is_stored_rewritten(tmp_path, lyco):
    """rs_lora: scale alpha/sqrt(r), and LyCORIS saves alpha·sqrt(r), so alpha_saved / r holds."""
    for algo in ("lora", "loha", "lokr"):
        torch.manual_seed(0)
        model = Tiny().double()
        layer = model.down_blocks[0].attentions[0].ff
        W0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
        cls = {"lora": "LoConModule", "loha": "LohaModule", "lokr": "LokrModule"}[algo]
        mod = getattr(lycoris.modules, cls)(
            f"{PREFIX}_ff", layer, 1.0, 4, 2.0, rs_lora=True, factor=4
        )
        mod.apply_to()
        mod.double()
        perturb(mod)
        mod.eval()
        tensors = {f"{PREFIX}_ff.{k}": v.detach() for k, v in mod.custom_state_dict().items()}
        assert float(tensors[f"{PREFIX}_ff.alpha"]) == pytest.approx(4.0)
        save_file(tensors, tmp_path / f"rs_{algo}.safetensors")
        got = delta_weight(load_adapter(tmp_path / f"rs_{algo}.safetensors")[f"{PREFIX}_ff"])
        assert rel(got, forward_delta(layer, W0, b0)) < TOL, algo


def test_mixed_lora_and_lokr_file_reads_every_module(tmp_path, lyco):
    """A preset that puts LoKr on convs and LoRA on Linears: one file, both families read."""
    lyco.MODULE_ALGO_MAP = {"Conv2d": {"algo": "lokr", "factor": 4}}
    path, base, net, truth = build(tmp_path, "mixed", algo="lora")
    kinds = {type(lo).__name__ for lo in net.loras}
    assert kinds == {"LoConModule", "LokrModule"}
    check_file(path, base, net, truth)
    assert load_adapter(path).families == ["lora", "lokr"]


def test_cli_inspect_json_shows_family_r_params(tmp_path, lyco):
    lyco.MODULE_ALGO_MAP = {"Conv2d": {"algo": "loha", "use_tucker": True}}
    path, _, net, _ = build(tmp_path, "cli", algo="lokr", factor=4)
    res = CliRunner().invoke(main, ["inspect", str(path), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = {r["module"]: r for r in json.loads(res.stdout)}
    assert sorted(rows) == sorted(lo.lora_name for lo in net.loras)
    for lora in net.loras:
        family, r, n = expected_meta(lora, stored(path, lora.lora_name))
        row = rows[lora.lora_name]
        assert (row["family"], row["params"]) == (family, n)
        assert row["r"] == (r if r is not None else row["rank"])
    conv1 = rows[f"{PREFIX}_down_blocks_0_resnets_0_conv1"]
    assert (conv1["family"], conv1["r"], conv1["rank"], conv1["shape"]) == (
        "loha",
        4,
        16,
        [32, 144],
    )


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "algo, what",
    [
        ("ia3", "(IA)³"),
        ("full", "full weight difference"),
        ("diag-oft", "OFT"),
        ("boft", "OFT/BOFT"),
        ("glora", "GLoRA"),
    ],
)
def test_refused_families_one_line(tmp_path, lyco, one_line_error, algo, what):
    torch.manual_seed(0)
    model = Tiny()  # float32: LyCORIS' OFT/BOFT Cayley transform runs in float32
    if algo == "boft":  # BOFT needs out = b·2^k: keep the layers that have it
        model = nn.ModuleDict({"conv1": nn.Conv2d(16, 32, 3, padding=1)})
    net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo=algo)
    net.apply_to()
    perturb(net)
    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(str(path), None, {})
    with pytest.raises(FormatError) as e:
        load_adapter(path)
    msg = one_line_error(e, path)
    assert what in msg and any(lo.lora_name in msg for lo in net.loras), msg


def test_unknown_key_mixed_module_and_missing_partner_are_refused(tmp_path, lyco, one_line_error):
    path, *_ = build(tmp_path, "loha", algo="loha")
    sd = load_file(path)
    name = f"{PREFIX}_down_blocks_0_attentions_0_ff"
    for extra, err, words in (
        ({f"{name}.lora_te_scale": torch.ones(1)}, FormatError, "not a kohya/LyCORIS"),
        ({"bundle_emb.x.string_to_param.*": torch.ones(2, 8)}, FormatError, "bundle_emb"),
        ({f"{name}.lokr_w1": torch.ones(2, 2)}, FormatError, "mixes LoHa and LoKr"),
        ({f"{name}.lokr_t1": torch.ones(2, 2, 3, 3)}, FormatError, "lokr_t1"),
    ):
        save_file({**sd, **extra}, tmp_path / "bad.safetensors")
        with pytest.raises(err) as e:
            load_adapter(tmp_path / "bad.safetensors")
        assert words in one_line_error(e, tmp_path / "bad.safetensors")
    del sd[f"{name}.hada_w2_b"]
    save_file(sd, tmp_path / "half.safetensors")
    with pytest.raises(ShapeError) as e:
        load_adapter(tmp_path / "half.safetensors")
    assert f"{name}.hada_w2_b" in one_line_error(e, tmp_path / "half.safetensors")


def test_resize_extracts_plain_lora_with_kernel_shapes(tmp_path, lyco):
    """resize writes every LyCORIS module as a lora_down/lora_up pair, its ΔW the best rank-k
    one. A conv whose file tensors show the kernel (LoHa Tucker here) gets it back; LyCORIS'
    flattened conv factors (a 1x1 LoHa's hada_w1_b (r, in)) do not show one: a matrix then."""
    from lorascope.analysis.rank import RankRule, resize
    from lorascope.formats import save_adapter

    lyco.MODULE_ALGO_MAP = {"Conv2d": {"algo": "loha", "use_tucker": True}}
    path, _, net, truth = build(tmp_path, "rs", algo="lokr", factor=4)
    small, _ = resize(load_adapter(path), RankRule("rank", 3))
    save_adapter(small, tmp_path / "small.safetensors")
    out = load_file(tmp_path / "small.safetensors")
    assert all(k.split(".", 1)[1] in ("lora_down.weight", "lora_up.weight", "alpha") for k in out)
    back = load_adapter(tmp_path / "small.safetensors")
    for lora in net.loras:
        W0, dW = truth[lora.lora_name]
        down = out[f"{lora.lora_name}.lora_down.weight"]
        up = out[f"{lora.lora_name}.lora_up.weight"]
        if getattr(lora, "tucker", False):
            kernel = lora.org_module[0].weight.shape[1:]
            assert down.shape == (3, *kernel) and up.shape == (W0.shape[0], 3, 1, 1)
        else:
            assert down.shape == (3, W0.shape[1]) and up.shape == (W0.shape[0], 3)
        U, S, Vt = np.linalg.svd(dW.numpy())
        best = (U[:, :3] * S[:3]) @ Vt[:3]
        assert rel(back[lora.lora_name].delta(), best) < 1e-9, lora.lora_name


def test_dora_eps_is_float32_for_float32_and_half_files(tmp_path, lyco):
    """LyCORIS adds ``finfo(dora_scale.dtype).eps`` to the norm; it computes in float32 for a
    float32 network, and loads a bf16 file into float32 parameters. Rows with a tiny norm make
    that eps visible (eps/‖V‖ ~ 1e-3), far above float32 rounding."""
    from lycoris import create_lycoris_from_weights

    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e-4)
    base = copy.deepcopy(model)
    net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo="lora", dora_wd=True)
    net.apply_to()
    perturb(net)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not name.endswith("dora_scale"):
                p.mul_(1e-2)
    net.eval()
    for dtype in (None, torch.bfloat16):
        path = tmp_path / f"eps_{dtype}.safetensors"
        net.save_weights(str(path), dtype, {})
        if dtype is None:
            wrapped = net
        else:  # LyCORIS' own reload: float32 parameters, the file's bf16 values
            wrapped, _ = create_lycoris_from_weights(1.0, str(path), copy.deepcopy(base))
            wrapped.apply_to()
            wrapped.eval()
            assert {lo.dora_scale.dtype for lo in wrapped.loras} == {torch.float32}
        with pytest.warns(LoraScopeWarning):
            adapter = load_adapter(path)
        for lora in wrapped.loras:
            layer = lora.org_module[0]
            W0 = layer.weight.detach()
            b0 = None if layer.bias is None else layer.bias.detach()
            want = W0.reshape(W0.shape[0], -1).double() + forward_delta(layer, W0, b0).double()
            m = adapter[lora.lora_name]
            assert m.magnitude.eps == torch.finfo(torch.float32).eps
            got = merged_weight(m, W0.reshape(W0.shape[0], -1).double())
            assert rel(got, want) < 2e-6, (lora.lora_name, rel(got, want))
            no_eps = merged_weight(
                dataclasses.replace(m, magnitude=dataclasses.replace(m.magnitude, eps=0.0)),
                W0.reshape(W0.shape[0], -1).double(),
            )
            assert rel(no_eps, want) > 1e-4
            print(
                f"{dtype} {lora.lora_name}: {rel(got, want):.1e} (eps 0: {rel(no_eps, want):.1e})"
            )


def test_kohya_create_network_on_unet_and_text_encoder(tmp_path, monkeypatch):
    """``lycoris.kohya.create_network`` (what sd-scripts runs with ``--network_module
    lycoris.kohya``) on the tiny UNet and a CLIP-like text encoder, with LyCORIS' built-in "full"
    preset: ``lora_unet_``/``lora_te_`` names, LoKr (Tucker convs, a stride-2 conv) with DoRA."""
    from lycoris.kohya import LycorisNetworkKohya, create_network

    for attr in dir(LycorisNetworkKohya):  # its presets set class attributes: restore them
        if attr.isupper():
            monkeypatch.setattr(LycorisNetworkKohya, attr, getattr(LycorisNetworkKohya, attr))
    torch.manual_seed(0)
    unet, te = Tiny().double(), TinyCLIP().double()
    base = {**unet.state_dict(), **te.state_dict()}
    base = {k: v.detach().clone().contiguous() for k, v in base.items()}
    net = create_network(
        1.0,
        4,
        2,
        None,
        te,
        unet,
        algo="lokr",
        factor=4,
        use_tucker=True,
        conv_dim=2,
        conv_alpha=1,
        dora_wd=True,
    )
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    path, base_path, net, truth = save(tmp_path, "sd", net, base)
    names = {lo.lora_name for lo in net.loras}
    assert f"{PREFIX}_down_blocks_0_downsamplers_0_conv" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert any(getattr(lo, "tucker", False) for lo in net.loras)
    errors = check_file(path, base_path, net, truth)
    print(f"kohya create_network: largest σ error / σ₁ = {max(errors.values()):.1e}")
