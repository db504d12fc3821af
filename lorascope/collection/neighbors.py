"""Near-duplicates and outliers in a scanned collection (records of
:class:`lorascope.collection.Collection`).

**Neighbours.** For a query adapter and every other adapter, over the modules both have (same
name, same shape): φ (Hu et al. 2021 eq. 4) of the top-``k`` stored input-side singular
directions, ``φ = ‖V_qᵀ V_c‖_F² / k`` with ``k = min(k_q, k_c)`` (the stored widths, or a smaller
``k``), and the Grassmann distance ``sqrt(Σ θ²)`` over their principal angles; averaged over the
shared modules. Two independent random ``k``-dimensional subspaces of ``R^d`` have
``E[φ] = k/d`` (:func:`lorascope.linalg.expected_random_similarity`), reported beside.

**Outliers.** Spectral features per module (``log ‖ΔW‖_F``, ``log σ_1``, effective rank, stable
rank, k@90 %) vary with depth, so each is compared only within its own (layer, kind) cell across
the collection: the robust z-score ``z = 0.6745·(x − median)/MAD`` (Iglewicz & Hoaglin 1993;
``MAD`` the median absolute deviation, floored at ``MAD_FLOOR`` per feature and 1 % of the
median, so a cell whose updates are nearly all alike does not turn a few per cent into a huge
``z``).
Taking the cell median removes any depth trend without assuming its form. An adapter's score is
the largest ``|z|`` over its modules and features (reported with where it occurred) and its
median ``|z|``; ``|z| > 3.5`` is the conventional outlier threshold.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from lorascope.errors import LoraScopeError
from lorascope.linalg import principal_angles

__all__ = ["Neighbor", "Outlier", "FEATURES", "neighbors", "outliers", "robust_z"]

FEATURES = ("log_fro", "log_sigma1", "effective_rank", "stable_rank", "k90")


@dataclass
class Neighbor:
    """One candidate's similarity to the query, averaged over their shared modules."""

    adapter_id: int
    path: str
    mean_phi: float
    mean_grassmann: float
    modules: int
    k: int
    phi_random: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _phi_pair(Vq: np.ndarray, Vc: np.ndarray, k: int | None) -> tuple[float, float, int]:
    kk = min(Vq.shape[1], Vc.shape[1], k or 10**9)
    a = torch.from_numpy(np.ascontiguousarray(Vq[:, :kk], dtype=np.float64))
    b = torch.from_numpy(np.ascontiguousarray(Vc[:, :kk], dtype=np.float64))
    M = a.mT @ b  # (k, k)
    phi = float(M.square().sum()) / kk
    dist = float(principal_angles(a, b).square().sum().sqrt())
    return min(max(phi, 0.0), 1.0), dist, kk


def neighbors(
    query: Sequence[Mapping[str, Any]],
    candidates: Mapping[int, Sequence[Mapping[str, Any]]],
    paths: Mapping[int, str],
    *,
    k: int | None = None,
) -> list[Neighbor]:
    """Candidates ranked by mean φ to ``query`` (see the module docstring).

    Parameters
    ----------
    query : sequence of dict
        The query adapter's module records (``module``, ``d_out``, ``d_in``, ``V``).
    candidates : mapping
        ``{adapter_id: module records}`` of the other adapters.
    paths : mapping
        ``{adapter_id: path}`` for the output.
    k : int, optional
        Directions compared (capped by what each record stores).

    Returns
    -------
    list[Neighbor]
        Candidates that share at least one module with the query, most similar first (ties:
        smaller Grassmann distance, then id).
    """
    qmap = {r["module"]: r for r in query if r.get("V") is not None}
    if not qmap:
        raise LoraScopeError("the query adapter has no module with stored directions")
    out = []
    for cid, recs in candidates.items():
        phis, dists, ks, rand = [], [], [], []
        for r in recs:
            q = qmap.get(r["module"])
            if (
                q is None
                or r.get("V") is None
                or (q["d_out"], q["d_in"])
                != (
                    r["d_out"],
                    r["d_in"],
                )
            ):
                continue
            phi, dist, kk = _phi_pair(np.asarray(q["V"]), np.asarray(r["V"]), k)
            phis.append(phi)
            dists.append(dist)
            ks.append(kk)
            rand.append(kk / int(q["d_in"]))
        if phis:
            out.append(
                Neighbor(
                    adapter_id=int(cid),
                    path=str(paths.get(cid, cid)),
                    mean_phi=float(np.mean(phis)),
                    mean_grassmann=float(np.mean(dists)),
                    modules=len(phis),
                    k=int(min(ks)),
                    phi_random=float(np.mean(rand)),
                )
            )
    out.sort(key=lambda n: (-n.mean_phi, n.mean_grassmann, n.adapter_id))
    return out


# The smallest MAD a cell is scored with, per feature: ``max(absolute, 1 % of |median|)``.
# Without it a cell where nearly every update is alike (at the sample zoo's layer 5 W_q nearly
# every update is rank one, stable rank 1.00-1.02) turns a 2 % difference into |z| > 100. With
# it |z| = 3.5 needs at least ~5 % (of the value, or of ‖ΔW‖ and σ_1 for the log features) and,
# for k@90 % (an integer), 3 ranks.
MAD_FLOOR = {"log_fro": 0.01, "log_sigma1": 0.01, "effective_rank": 0.01, "stable_rank": 0.01,
             "k90": 0.5}  # fmt: skip
MAD_FLOOR_REL = 0.01


def robust_z(x: np.ndarray, floor: float = 0.0, rel_floor: float = 0.0) -> np.ndarray:
    """``0.6745·(x − median)/max(MAD, floor, rel_floor·|median|)`` (Iglewicz & Hoaglin 1993);
    NaN where ``x`` is NaN or that scale is 0."""
    x = np.asarray(x, dtype=np.float64)
    med = np.nanmedian(x)
    mad = max(float(np.nanmedian(np.abs(x - med))), floor, rel_floor * abs(float(med)))
    if not np.isfinite(mad) or mad == 0:
        return np.full_like(x, np.nan)
    return 0.6745 * (x - med) / mad


def _features(r: Mapping[str, Any]) -> dict[str, float]:
    def log(v):
        return math.log(v) if v is not None and v > 0 else math.nan

    sigma = r.get("sigma")
    s1 = float(sigma[0]) if sigma is not None and len(sigma) else r.get("spectral")
    return {
        "log_fro": log(r.get("fro")),
        "log_sigma1": log(s1),
        "effective_rank": float(r["effective_rank"])
        if r.get("effective_rank") is not None
        else math.nan,
        "stable_rank": float(r["stable_rank"]) if r.get("stable_rank") is not None else math.nan,
        "k90": float(r["k90"]) if r.get("k90") is not None else math.nan,
    }


@dataclass
class Outlier:
    """One adapter's robust outlier score."""

    adapter_id: int
    path: str
    max_abs_z: float
    median_abs_z: float
    module: str
    feature: str
    z: float
    modules: int
    outlier: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def outliers(
    records: Sequence[Mapping[str, Any]],
    paths: Mapping[int, str],
    *,
    threshold: float = 3.5,
) -> list[Outlier]:
    """Robust z-scores of spectral features within each (layer, kind) cell (module docstring).

    Parameters
    ----------
    records : sequence of dict
        Module records of every adapter (``adapter_id``, ``module``, ``layer``, ``kind``,
        ``fro``, ``sigma``, ``effective_rank``, ``stable_rank``, ``k90``).
    paths : mapping
        ``{adapter_id: path}``.
    threshold : float
        ``|z|`` above which an adapter is flagged.

    Returns
    -------
    list[Outlier]
        One per adapter with at least one scored module, largest ``max_abs_z`` first.
    """
    cells: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        cells[(r.get("layer"), r.get("kind"), r.get("d_out"), r.get("d_in"))].append(r)
    per: dict[int, list[tuple[float, str, str, float]]] = defaultdict(list)
    for rows in cells.values():
        if len(rows) < 3:
            continue  # a median and a MAD of fewer than three values say nothing
        feats = [_features(r) for r in rows]
        for f in FEATURES:
            z = robust_z(np.array([x[f] for x in feats]), MAD_FLOOR[f], MAD_FLOOR_REL)
            for r, zi in zip(rows, z, strict=True):
                if np.isfinite(zi):
                    per[int(r["adapter_id"])].append((abs(float(zi)), r["module"], f, float(zi)))
    out = []
    for aid, zs in per.items():
        top = max(zs)
        out.append(
            Outlier(
                adapter_id=aid,
                path=str(paths.get(aid, aid)),
                max_abs_z=top[0],
                median_abs_z=float(np.median([z[0] for z in zs])),
                module=top[1],
                feature=top[2],
                z=top[3],
                modules=len({z[1] for z in zs}),
                outlier=top[0] > threshold,
            )
        )
    out.sort(key=lambda o: (-o.max_abs_z, o.adapter_id))
    return out
