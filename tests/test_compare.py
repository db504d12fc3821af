"""`lorascope compare`: N×N φ and Grassmann distance of N adapters, checked against dense SVDs
of ``s·B@A`` and ``scipy.linalg.subspace_angles``; settling of checkpoints; the CLI."""

from __future__ import annotations

import copy
import csv
import io
import json
import math

import matplotlib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from scipy.linalg import subspace_angles

from lorascope.adapter import Adapter, LoraModule
from lorascope.analysis.compare import (
    adapter_labels,
    checkpoint_step,
    cluster,
    compare,
    settle,
    settle_index,
)
from lorascope.cli import main
from lorascope.errors import LoraScopeError, LoraScopeWarning, MissingModuleError, ShapeError
from lorascope.formats import load_adapter
from lorascope.linalg import principal_angles, singular_basis, subspace_similarity

matplotlib.use("Agg")

D_OUT, D_IN = 24, 20
KINDS = ("q", "v")


def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _module(A, B, scale=1.0, layer=0, kind="q") -> LoraModule:
    name = f"model.layers.{layer}.self_attn.{kind}_proj"
    return LoraModule(
        name=name,
        A=A,
        B=B,
        scale=scale,
        layer=layer,
        kind=kind,
        source="mem",
        keys=(f"{name}.lora_A.weight", f"{name}.lora_B.weight"),
    )


def _adapter(modules, path) -> Adapter:
    return Adapter(modules=list(modules), path=str(path), format="plain")


def _random_adapter(r, seed, path=None, scale=0.5, layers=(0, 1)) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    mods = [
        _module(_rand(g, r, D_IN), _rand(g, D_OUT, r), scale, layer, kind)
        for layer in layers
        for kind in KINDS
    ]
    return _adapter(mods, path or f"runs/r{r}_seed{seed}")


def _dense_basis(m: LoraModule, side: str) -> np.ndarray:
    """Independent reference: numpy's SVD of the dense ΔW = s·B@A, singular vectors by σ."""
    delta = m.scale * (m.B.numpy() @ m.A.numpy())  # (d_out, r) @ (r, d_in)
    U, _, Vt = np.linalg.svd(delta, full_matrices=False)
    k = min(m.rank, *m.shape)
    return Vt[:k].T if side == "right" else U[:, :k]


def _reference(adapters, side, i=None, j=None):
    """Per module: directed φ and Grassmann matrices from scipy's principal angles, every entry
    computed, the diagonal too (a basis's top-i against its own top-j): nothing is assumed."""
    out = []
    for row in zip(*(ad.modules for ad in adapters), strict=True):
        bases = [_dense_basis(m, side) for m in row]
        k = min(b.shape[1] for b in bases)
        ii = k if i is None else i
        jj = ii if j is None else j
        n = len(bases)
        phi, dist = np.full((n, n), np.nan), np.full((n, n), np.nan)
        for a in range(n):
            for b in range(n):
                theta = subspace_angles(bases[a][:, :ii], bases[b][:, :jj])
                phi[a, b] = np.mean(np.cos(theta) ** 2)
                dist[a, b] = np.sqrt(np.sum(theta**2))
        out.append((phi, dist))
    return out


# ------------------------------------------------------------------------------ the kernels


def test_principal_angles_match_scipy_including_tiny_angles():
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(_rand(g, 30, 4))
    V, _ = torch.linalg.qr(_rand(g, 30, 6))
    np.testing.assert_allclose(
        principal_angles(U, V).numpy(), np.sort(subspace_angles(U.numpy(), V.numpy())), atol=1e-12
    )
    # nearly equal subspaces: arccos alone would give ~1e-8 noise instead of ~1e-9 angles
    W, _ = torch.linalg.qr(U + 1e-9 * _rand(g, 30, 4))
    ref = np.sort(subspace_angles(U.numpy(), W.numpy()))
    got = principal_angles(U, W).numpy()
    assert ref.max() < 1e-8
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-15)


def test_settle_index_rule():
    def brute(seq, tau):  # the definition, read literally
        return min(t for t in range(len(seq) + 1) if all(x >= tau for x in seq[t:]))

    cases = [
        [0.2, 0.95, 0.5, 0.92, 0.97],  # dips below after rising: settles after the dip
        [0.95, 0.96, 0.99],  # above from the start
        [0.95, 0.8],  # falls at the end: only the final itself
        [],
        [0.9, 0.9],  # the threshold itself counts as above
    ]
    for seq in cases:
        assert settle_index(seq, 0.9) == brute(seq, 0.9), seq
    assert settle_index([0.2, 0.95, 0.5, 0.92, 0.97], 0.9) == 3
    assert settle_index([0.95, 0.8], 0.9) == 2


def test_labels_and_steps():
    paths = [
        "out/run/checkpoints/step-000030",
        "out/run/checkpoint-500/adapter_model.safetensors",
        "out/run",
        "a/x/adapter_model.safetensors",
        "b/x",
        "seed3.safetensors",
    ]
    assert [checkpoint_step(p) for p in paths] == [30, 500, None, None, None, None]
    assert checkpoint_step("global_step12") == 12
    assert adapter_labels(paths) == ["step 30", "step 500", "run", "a/x", "b/x", "seed3"]
    assert adapter_labels(["x", "x"]) == ["x", "x#2"]


# ------------------------------------------------------------------------------ the matrices


def test_symmetric_unit_diagonal_and_order_independent():
    ads = [_random_adapter(3, 0), _random_adapter(5, 1), _random_adapter(8, 2)]
    res = compare(ads)
    assert len(res) == 4 and [r.dims_i for r in res] == [[3, 3, 3]] * 4
    for r in res:
        # i = j: the directed matrix is symmetric by itself (computed both ways)
        np.testing.assert_allclose(r.phi_directed, r.phi_directed.T, atol=1e-12)
        np.testing.assert_allclose(r.grassmann_directed, r.grassmann_directed.T, atol=1e-12)
        np.testing.assert_array_equal(np.diagonal(r.phi), 1.0)
        np.testing.assert_array_equal(np.diagonal(r.grassmann), 0.0)
        off = r.phi[~np.eye(3, dtype=bool)]
        assert (off > 0).all() and (off < 1).all()
    # the same adapters in another order: the same matrices, permuted
    perm = [2, 0, 1]
    again = compare([ads[p] for p in perm])
    for r, s in zip(res, again, strict=True):
        np.testing.assert_allclose(s.phi, r.phi[np.ix_(perm, perm)], atol=1e-12)
        np.testing.assert_allclose(s.grassmann, r.grassmann[np.ix_(perm, perm)], atol=1e-12)
    # i != j: directed entries differ, the reported entry is symmetric and order-independent
    (ab,) = compare(ads[1:], i=2, j=5, layer=0, module="q")
    (ba,) = compare(ads[1:][::-1], i=2, j=5, layer=0, module="q")
    assert abs(ab.phi_directed[0, 1] - ab.phi_directed[1, 0]) > 1e-3
    assert ab.phi[0, 1] == pytest.approx(ba.phi[0, 1], abs=1e-12)
    assert ab.grassmann[0, 1] == pytest.approx(ba.grassmann[0, 1], abs=1e-12)
    assert ab.dims_i == [2, 2] and ab.dims_j == [5, 5]


@pytest.mark.parametrize("side", ["right", "left"])
def test_invariant_to_how_the_product_is_split(side):
    g = torch.Generator().manual_seed(3)
    r = 6
    A, B = _rand(g, r, D_IN), _rand(g, D_OUT, r)
    G = torch.eye(r, dtype=torch.float64) + 0.7 * _rand(g, r, r)  # invertible, not orthogonal
    c = 5.0  # moves alpha into B: s·B·A = (s/c)·(c·B G)(G⁻¹ A)
    a = _adapter([_module(A, B, 2.0)], "a")
    a_g = _adapter([_module(torch.linalg.solve(G, A), c * B @ G, 2.0 / c)], "a_g")
    b = _random_adapter(4, 9, "b", layers=(0,))
    b = _adapter(b.modules[:1], "b")
    (res,) = compare([a, a_g, b], k=3, factor=side)
    assert res.phi[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert res.grassmann[0, 1] == pytest.approx(0.0, abs=1e-7)
    np.testing.assert_allclose(res.phi[0], res.phi[1], atol=1e-12)
    np.testing.assert_allclose(res.grassmann[0, 2], res.grassmann[1, 2], atol=1e-9)
    # the test has teeth: A's own top-3 singular directions do move under A -> G⁻¹A
    VA = singular_basis(A, "right")[:, :3]
    VAg = singular_basis(torch.linalg.solve(G, A), "right")[:, :3]
    assert float(subspace_similarity(VA, VAg)[-1, -1]) < 0.99


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("ij", [(None, None), (2, 5), (7, 7)], ids=["default", "i2j5", "k7"])
def test_equals_dense_svd_and_scipy_angles(side, ij):
    ads = [_random_adapter(4, 10), _random_adapter(6, 11), _random_adapter(9, 12)]
    i, j = ij
    res = compare(ads, i=i, j=j, factor=side)
    ref = _reference(ads, side, i, j)
    for r, (phi, dist) in zip(res, ref, strict=True):
        np.testing.assert_allclose(r.phi_directed, phi, atol=1e-10)
        np.testing.assert_allclose(r.grassmann_directed, dist, atol=1e-9)
        np.testing.assert_allclose(r.phi, (phi + phi.T) / 2, atol=1e-10)
        np.testing.assert_allclose(r.grassmann, (dist + dist.T) / 2, atol=1e-9)
        assert r.dim == (D_IN if side == "right" else D_OUT)
    if ij == (7, 7):  # capped by what each adapter has
        assert res[0].dims_i == [4, 6, 7] and res[0].dims_j == [4, 6, 7]


@pytest.mark.parametrize("side", ["right", "left"])
def test_rank_independent(side):
    g = torch.Generator().manual_seed(4)
    P, _ = torch.linalg.qr(_rand(g, D_OUT, 16))  # (d_out, 16)
    Q, _ = torch.linalg.qr(_rand(g, D_IN, 16))  # (d_in, 16)
    rot = torch.linalg.qr(_rand(g, 4, 4))[0]
    # r = 4: ΔW = P4 diag(4, 3, 2, 1.5) Q4ᵀ
    s4 = torch.tensor([4.0, 3, 2, 1.5], dtype=torch.float64)
    a4 = _adapter([_module(torch.diag(s4) @ Q[:, :4].T, P[:, :4])], "r4")

    def r16(top, low):  # r = 16: the span of P4/Q4 (rotated bases) plus 12 other directions
        s = torch.tensor([*top, *low], dtype=torch.float64)
        Bm = torch.cat([P[:, :4] @ rot, P[:, 4:]], dim=1)  # (d_out, 16)
        Am = torch.diag(s) @ torch.cat([Q[:, :4] @ rot, Q[:, 4:]], dim=1).T  # (16, d_in)
        return _module(Am, Bm, 0.25)

    big = [10.0, 9, 8, 7]
    small = [1.0 - 0.05 * t for t in range(12)]
    a16 = _adapter([r16(big, small)], "r16")
    (res,) = compare([a4, a16], factor=side)
    assert res.dims_i == [4, 4] and res.ranks == [4, 16]
    assert res.phi[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert res.grassmann[0, 1] == pytest.approx(0.0, abs=1e-7)
    # the same 4 directions at the bottom of the r = 16 spectrum: its top-4 are orthogonal to them
    low16 = _adapter([r16([0.1, 0.09, 0.08, 0.07], [10.0 - 0.5 * t for t in range(12)])], "lo")
    (res,) = compare([a4, low16], factor=side)
    assert res.phi[0, 1] == pytest.approx(0.0, abs=1e-12)


def test_orthogonal_planted_subspaces():
    g = torch.Generator().manual_seed(5)
    k = 3
    Q, _ = torch.linalg.qr(_rand(g, D_IN, 2 * k))  # (d_in, 2k)
    mods = [
        _module(_rand(g, k, k) @ Q[:, :k].T, _rand(g, D_OUT, k)),  # row space Q[:, :k]
        _module(_rand(g, k, k) @ Q[:, k:].T, _rand(g, D_OUT, k)),  # row space Q[:, k:]
    ]
    (res,) = compare([_adapter([mods[0]], "a"), _adapter([mods[1]], "b")])
    assert res.phi[0, 1] == pytest.approx(0.0, abs=1e-12)
    assert res.grassmann[0, 1] == pytest.approx(math.pi / 2 * math.sqrt(k), abs=1e-9)
    assert res.expected_random == pytest.approx(k / D_IN)


def _checkpoints(phis, k=2, seed=6):
    """Checkpoints whose k-dim row space sits at angle arccos(sqrt(φ_t)) from the final one's:
    every principal angle is θ_t, so φ_t = cos²θ_t and the distance is sqrt(k)·θ_t."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(_rand(g, D_IN, 2 * k))
    B = _rand(g, D_OUT, k)
    ads = []
    for t, phi in enumerate([*phis, 1.0]):
        theta = math.acos(math.sqrt(phi))
        rows = math.cos(theta) * Q[:, :k] + math.sin(theta) * Q[:, k:]  # (d_in, k)
        path = f"run/checkpoints/step-{10 * (t + 1):06d}" if t < len(phis) else "run"
        ads.append(_adapter([_module(rows.T.contiguous(), B)], path))
    return ads


def test_settle_on_planted_checkpoints():
    phis = [0.5, 0.95, 0.8, 0.93, 0.97]
    ads = _checkpoints(phis)
    (s,) = settle(compare(ads), threshold=0.9)
    np.testing.assert_allclose(s.phi_to_final, [*phis, 1.0], atol=1e-12)
    thetas = [math.acos(math.sqrt(p)) for p in phis]
    np.testing.assert_allclose(
        s.grassmann_to_final, [math.sqrt(2) * t for t in thetas] + [0.0], atol=1e-9
    )
    assert s.settled_index == settle_index(phis, 0.9) == 3
    assert (s.settled_label, s.settled_step, s.settled_before_final) == ("step 40", 40, True)
    assert s.labels[-1] == "run" and s.steps[-1] is None
    (s,) = settle(compare(ads), threshold=0.99)
    assert s.settled_index == len(ads) - 1 and not s.settled_before_final
    with pytest.raises(LoraScopeError, match="threshold"):
        settle(compare(ads), threshold=0.0)


def test_cluster_follows_planted_groups():
    g = torch.Generator().manual_seed(7)
    base = [_rand(g, 4, D_IN) for _ in range(2)]
    B = _rand(g, D_OUT, 4)

    def near(A, eps):
        return _adapter([_module(A + eps * _rand(g, 4, D_IN), B)], f"x{eps}")

    # given as a, b, a', b': the order must put each pair side by side
    ads = [near(base[0], 0.0), near(base[1], 0.0), near(base[0], 0.05), near(base[1], 0.05)]
    (res,) = compare(ads)
    for metric in ("phi", "grassmann"):
        order = res.order(metric)
        assert sorted(order) == [0, 1, 2, 3]
        pos = {a: order.index(a) for a in range(4)}
        assert abs(pos[0] - pos[2]) == 1 and abs(pos[1] - pos[3]) == 1, order
    Z, order = cluster(1 - res.phi)
    assert Z.shape == (3, 4)


def test_skips_and_warns_on_modules_not_everywhere_and_low_numerical_rank():
    a = _random_adapter(4, 20, "a")
    b = _random_adapter(4, 21, "b")
    b = _adapter(b.modules[:-1], "b")
    with pytest.warns(LoraScopeWarning, match="not in every adapter"):
        res = compare([a, b])
    assert [r.module for r in res] == [m.key for m in a.modules[:-1]]
    # ΔW of rank 2 stored with r = 4: directions 3 and 4 are arbitrary, say so
    g = torch.Generator().manual_seed(22)
    A2 = _rand(g, 2, D_IN)
    low = _adapter([_module(torch.cat([A2, A2]), _rand(g, D_OUT, 4))], "low")
    with pytest.warns(LoraScopeWarning, match="numerical rank 2 < 4"):
        (r,) = compare([_adapter(a.modules[:1], "a"), low])
    assert r.numerical_ranks == [4, 2]


def test_library_errors():
    a, b = _random_adapter(4, 30, "a"), _random_adapter(4, 31, "b")
    with pytest.raises(LoraScopeError, match="at least two"):
        compare([a])
    with pytest.raises(LoraScopeError, match="either k or i/j"):
        compare([a, b], k=2, i=3)
    with pytest.raises(MissingModuleError, match="layer 5"):
        compare([a, b], layer=5)
    g = torch.Generator().manual_seed(32)
    wide = _adapter([_module(_rand(g, 4, D_IN + 1), _rand(g, D_OUT, 4))], "wide")
    with pytest.raises(ShapeError, match="cannot compare"):
        compare([_adapter(a.modules[:1], "a"), wide])


def test_plots_follow_the_dendrogram():
    import matplotlib.pyplot as plt

    from lorascope.plot import plot_compare, plot_compare_matrix, plot_settle

    ads = [_random_adapter(3, 40), _random_adapter(5, 41), _random_adapter(8, 42)]
    res = compare(ads)
    fig = plot_compare(res)
    heat = next(ax for ax in fig.axes if ax.images and ax.get_yticklabels())
    M = np.mean([r.phi for r in res], axis=0)
    order = cluster(1 - M)[1]
    np.testing.assert_allclose(heat.images[0].get_array(), M[np.ix_(order, order)])
    assert [t.get_text() for t in heat.get_yticklabels()] == [res[0].labels[o] for o in order]
    plt.close(fig)
    fig, ax = plt.subplots()
    assert plot_compare_matrix(res[0].grassmann, res[0].labels, ax, metric="grassmann") is ax
    ax2 = plot_settle(settle(res), None)
    assert len(ax2.lines) == len(res) + 1  # one per module and the threshold
    plt.close("all")


# ------------------------------------------------------------------------------ the CLI


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _one_line_error(res, *fragments):
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    err = [x for x in lines if not x.startswith("warning: ")]
    assert len(err) == 1 and err[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    for f in fragments:
        assert f in err[0], err[0]


@pytest.fixture
def peft_seeds(tmp_path, tiny_llama):
    """Two seeds at r = 4 and one at r = 8 of q/v LoRA on a tiny Llama, written by real peft."""
    from peft import LoraConfig, get_peft_model

    paths = []
    for name, r, seed in (("seed0", 4, 0), ("seed1", 4, 1), ("r8", 8, 2)):
        torch.manual_seed(seed)
        cfg = LoraConfig(
            r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
        pm = get_peft_model(copy.deepcopy(tiny_llama), cfg)
        pm.save_pretrained(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def test_cli_on_peft_adapters(peft_seeds, tmp_path):
    res = _run(["compare", *peft_seeds, "--json"])
    assert res.exit_code == 0, res.output
    objs = json.loads(res.stdout)
    assert list(objs[0])[:3] == ["module", "layer", "kind"]
    ref = compare([load_adapter(p) for p in peft_seeds])
    assert len(objs) == len(ref) == 4  # 2 layers × q, v
    for o, r in zip(objs, ref, strict=True):
        assert o["module"] == r.module and o["labels"] == ["seed0", "seed1", "r8"]
        assert o["dims_i"] == [4, 4, 4] and o["ranks"] == [4, 4, 8]
        np.testing.assert_allclose(o["phi"], r.phi, atol=1e-12)
        np.testing.assert_allclose(o["grassmann"], r.grassmann, atol=1e-12)
    # independent check of one entry on the dense ΔW
    (phi, _) = _reference([load_adapter(p) for p in peft_seeds[:2]], "right")[0]
    np.testing.assert_allclose(objs[0]["phi"][0][1], phi[0, 1], atol=1e-6)

    res = _run(["compare", *peft_seeds, "--module", "v", "--factor", "left", "--csv"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert len(rows) == 2 * 9 and {r["kind"] for r in rows} == {"v"}
    ref = compare([load_adapter(p) for p in peft_seeds], module="v", factor="left")
    got = np.array([float(r["phi"]) for r in rows[:9]]).reshape(3, 3)
    np.testing.assert_allclose(got, ref[0].phi, atol=1e-12)

    png = tmp_path / "cmp.png"
    res = _run(["compare", *peft_seeds, "--layer", "1", "--k", "2", "--plot", png])
    assert res.exit_code == 0, res.output
    assert "seed0" in res.stdout and "φ(2,2)" in res.stdout and "mean (all)" in res.stdout
    assert "nan" not in res.stdout.lower()
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_settle(tmp_path):
    phis = [0.5, 0.95, 0.8, 0.93, 0.97]
    paths = []
    for ad in _checkpoints(phis):
        path = tmp_path / ad.path
        m = ad.modules[0]
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                f"{m.name}.lora_A.weight": m.A.float().contiguous(),
                f"{m.name}.lora_B.weight": m.B.float().contiguous(),
            },
            str(path / "adapter.safetensors"),
        )
        paths.append(path / "adapter.safetensors")
    res = _run(["compare", *paths, "--settle", "--json", "--alpha", "2"])
    assert res.exit_code == 0, res.output
    (obj,) = json.loads(res.stdout)
    assert obj["settled_index"] == settle_index(phis, 0.9) == 3
    assert obj["settled_label"] == "step 40" and obj["settled_step"] == 40
    np.testing.assert_allclose(obj["phi_to_final"], [*phis, 1.0], atol=1e-6)  # float32 on disk
    png = tmp_path / "settle.png"
    args = ["compare", *paths, "--settle", "--alpha", "2"]
    res = _run([*args, "--threshold", "0.96", "--plot", png])
    assert res.exit_code == 0, res.output
    assert "step 50" in res.stdout and "settled at" in res.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"
    res = _run(["compare", *paths, "--settle", "--csv", "--alpha", "2"])
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [r["settled"] for r in rows] == ["False"] * 3 + ["True"] * 3


def test_cli_bad_inputs_exit_2_with_one_line(peft_seeds, tmp_path):
    a, b, _ = peft_seeds
    _one_line_error(_run(["compare", a]), "at least two", "seed0")
    _one_line_error(_run(["compare"]), "at least two")
    _one_line_error(_run(["compare", a, b, "--layer", "7"]), "layer 7", "seed0")
    _one_line_error(_run(["compare", a, b, "--k", "2", "-i", "3"]), "either k or i/j")
    # mismatched modules: q/v on one side, o only on the other
    other = tmp_path / "o_only.safetensors"
    g = torch.Generator().manual_seed(50)
    save_file(
        {
            "model.layers.0.self_attn.o_proj.lora_A.weight": torch.randn(4, 32, generator=g),
            "model.layers.0.self_attn.o_proj.lora_B.weight": torch.randn(32, 4, generator=g),
        },
        str(other),
    )
    _one_line_error(_run(["compare", a, other, "--alpha", "8"]), "share no module", "o_only")
    # the same module names, another width: not updates of one weight
    wide = tmp_path / "wide.safetensors"
    save_file(
        {
            "model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 48, generator=g),
            "model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 4, generator=g),
        },
        str(wide),
    )
    _one_line_error(_run(["compare", a, wide, "--alpha", "8"]), "cannot compare", "wide")
