"""Neighbours and outliers of a collection (lorascope.collection.neighbors) on synthetic
records, against scipy's principal angles and the definitions computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import subspace_angles

from lorascope.collection.neighbors import (
    MAD_FLOOR,
    MAD_FLOOR_REL,
    neighbors,
    outliers,
    robust_z,
)
from lorascope.errors import LoraScopeError


def _frame(d: int, k: int, rng) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((d, k)))[0]


def _rec(aid, module, V, **kw):
    d_in = V.shape[0]
    base = dict(adapter_id=aid, module=module, layer=int(module[1]), kind=module[0], d_out=8,
                d_in=d_in, V=V, fro=1.0, sigma=np.array([1.0]), effective_rank=2.0,
                stable_rank=1.5, k90=2)  # fmt: skip
    base.update(kw)
    return base


def test_neighbors_rank_by_mean_phi_equal_to_scipy():
    rng = np.random.default_rng(0)
    d, k = 30, 4
    mods = ["q0", "v0", "q1"]
    q = {m: _frame(d, k, rng) for m in mods}
    near = {m: np.linalg.qr(q[m] + 0.05 * rng.standard_normal((d, k)))[0] for m in mods}
    far = {m: _frame(d, k, rng) for m in mods}
    query = [_rec(0, m, q[m]) for m in mods]
    cands = {1: [_rec(1, m, far[m]) for m in mods], 2: [_rec(2, m, near[m]) for m in mods[:2]]}
    res = neighbors(query, cands, {1: "far", 2: "near"})
    assert [n.path for n in res] == ["near", "far"]
    for n, other in ((res[0], near), (res[1], far)):
        used = mods[:2] if n.path == "near" else mods
        phis = [np.mean(np.cos(subspace_angles(q[m], other[m])) ** 2) for m in used]
        dists = [np.sqrt(np.sum(subspace_angles(q[m], other[m]) ** 2)) for m in used]
        assert n.mean_phi == pytest.approx(np.mean(phis), rel=1e-10)
        assert n.mean_grassmann == pytest.approx(np.mean(dists), rel=1e-8)
        assert n.modules == len(used) and n.k == k and n.phi_random == pytest.approx(k / d)
    # k caps the directions compared; mismatched shapes are skipped
    assert neighbors(query, cands, {}, k=1)[0].k == 1
    odd = {3: [_rec(3, "q0", _frame(d + 1, k, rng))]}
    assert neighbors(query, odd, {}) == []
    with pytest.raises(LoraScopeError):
        neighbors([{**query[0], "V": None}], cands, {})


def test_robust_z_and_outliers_within_depth_cells():
    x = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    med, mad = 3.0, 1.0
    np.testing.assert_allclose(robust_z(x), 0.6745 * (x - med) / mad)
    assert np.isnan(robust_z(np.ones(4))).all()
    rng = np.random.default_rng(1)
    recs = []
    for aid in range(8):
        for layer in range(3):  # a strong depth trend: norms grow 10x per layer
            fro = 10.0**layer * (1 + 0.05 * rng.standard_normal())
            if aid == 5 and layer == 1:
                fro *= 20  # the planted outlier
            recs.append(_rec(aid, f"q{layer}", _frame(6, 2, rng), fro=fro,
                             sigma=np.array([fro * 0.9]),
                             effective_rank=2 + 0.1 * rng.standard_normal()))  # fmt: skip
    res = outliers(recs, {a: f"a{a}" for a in range(8)})
    assert res[0].adapter_id == 5 and res[0].outlier and res[0].module == "q1"
    assert res[0].feature in ("log_fro", "log_sigma1")
    assert res[0].max_abs_z > 20 and res[1].max_abs_z < 10  # the 100x depth trend scores ~0
    cell = [r for r in recs if r["module"] == "q1"]
    z = robust_z(np.log([r["fro"] for r in cell]), MAD_FLOOR["log_fro"], MAD_FLOOR_REL)
    assert res[0].z == pytest.approx(max(z, key=abs), rel=1e-12) or res[0].feature != "log_fro"


def test_a_cell_of_nearly_equal_updates_is_scored_against_the_mad_floor():
    """Stable ranks 1 ± 1e-5 (rank-one updates) and one at 1.02: the raw MAD (~1e-5) would give
    |z| ~ 1,000; the floor (1 % of the median) gives 0.6745 · 0.02 / 0.01 ≈ 1.35, no outlier.
    One at 1.3 stays an outlier (|z| ≈ 20)."""
    rng = np.random.default_rng(0)
    x = 1 + 1e-5 * rng.standard_normal(12)
    x[3], x[7] = 1.02, 1.3
    raw = robust_z(x)
    assert abs(raw[3]) > 500
    z = robust_z(x, MAD_FLOOR["stable_rank"], MAD_FLOOR_REL)
    med = np.median(x)
    np.testing.assert_allclose(z, 0.6745 * (x - med) / (MAD_FLOOR_REL * med), rtol=1e-12)
    recs = [
        _rec(a, "q0", _frame(6, 2, rng), fro=1.0, sigma=np.array([1.0]), effective_rank=1.0,
             stable_rank=float(x[a]))
        for a in range(12)
    ]  # fmt: skip
    res = {o.adapter_id: o for o in outliers(recs, {a: f"a{a}" for a in range(12)})}
    assert res[7].outlier and res[7].feature == "stable_rank"
    assert not res[3].outlier and res[3].max_abs_z == pytest.approx(abs(z[3]), rel=1e-9)
