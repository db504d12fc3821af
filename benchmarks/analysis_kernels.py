"""Kernel benchmarks: the factored SVD of ΔW = s·B A against dense SVDs (the peers' route), and
the whole φ grid from one product against a per-(i, j) loop."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.analysis_common import fmt_s, fmt_x, median_time, table, time_once
from lorascope.linalg import factored_svd, subspace_similarity

# Dense SVDs of d x d cost O(d³): beyond this size the dense columns are extrapolated (d³) from
# the largest size measured, never run (12288² in float64 is ~8 minutes single-threaded).
DENSE_MAX = 4096


def _svd(M: torch.Tensor):
    return torch.linalg.svd(M, full_matrices=False)


def _factors(d: int, r: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(r, d, generator=g) / d**0.5).to(torch.float16)  # stored like a real adapter
    B = (torch.randn(d, r, generator=g) / r**0.5).to(torch.float16)
    return A.to(device), B.to(device), 16.0 / r  # lora_alpha = 16


def svd_rows(sizes, device: torch.device, repeats: int, log) -> tuple[str, list[dict]]:
    """Item 1: lorascope's factored SVD vs dense ``torch.linalg.svd`` and ``numpy.linalg.svd``."""
    rows, recs = [], []
    measured: dict[int, tuple[float, float]] = {}  # d -> (torch s, numpy s) of a real dense run
    for d, r in sizes:
        A, B, s = _factors(d, r, device)
        t_fact = median_time(lambda A=A, B=B, s=s: factored_svd(A, B, s), device, repeats)
        S_fact = factored_svd(A, B, s).S.cpu().numpy()
        rec = {"d": d, "r": r, "factored": t_fact}
        if d <= DENSE_MAX:
            # the peers' route: form ΔW densely (float64, as an accuracy reference) and SVD it.
            # Multi-second dense SVDs run once; the cost does not depend on r, only on d.
            dense = s * (B.double() @ A.double())  # (d, r) @ (r, d) -> (d, d)
            if d <= 1024:
                t_torch = median_time(lambda M=dense: _svd(M), device, repeats, 0.0)
                _, S_t, _ = _svd(dense)
            else:  # one timed run, its output reused for the accuracy column
                t_torch, (_, S_t, _) = time_once(lambda M=dense: _svd(M), device)
            dense_np = dense.cpu().numpy()
            t_np, (_, S_n, _) = time_once(
                lambda M=dense_np: np.linalg.svd(M, full_matrices=False), torch.device("cpu")
            )
            S_t = S_t[:r].cpu().numpy()
            S_n = S_n[:r]
            measured[d] = (t_torch, t_np)
            rec.update(
                torch=t_torch,
                numpy=t_np,
                err_torch=float(np.max(np.abs(S_fact - S_t) / S_t)),
                err_numpy=float(np.max(np.abs(S_fact - S_n) / S_n)),
                note="measured",
            )
            del dense, dense_np
        else:
            d0 = max(measured)
            f = (d / d0) ** 3
            rec.update(
                torch=measured[d0][0] * f,
                numpy=measured[d0][1] * f,
                err_torch=None,
                err_numpy=None,
                note=f"extrapolated (d³) from the d = {d0} run; not run",
            )
        log(f"svd d={d} r={r}: {rec}")
        recs.append(rec)
        est = "≈ " if rec["note"] != "measured" else ""
        rows.append(
            [
                f"({d}, {r})",
                fmt_s(t_fact),
                est + fmt_s(rec["torch"]),
                est + fmt_s(rec["numpy"]),
                est + fmt_x(rec["torch"] / t_fact),
                est + fmt_x(rec["numpy"] / t_fact),
                "—" if rec["err_torch"] is None else f"{rec['err_torch']:.1e}",
                "—" if rec["err_numpy"] is None else f"{rec['err_numpy']:.1e}",
                rec["note"],
            ]
        )
    md = table(
        [
            "(d, r)",
            "lorascope factored",
            "dense torch.linalg.svd",
            "numpy.linalg.svd",
            "vs torch",
            "vs numpy",
            "max rel. σ diff (torch)",
            "max rel. σ diff (numpy)",
            "dense runs",
        ],
        rows,
    )
    return md, recs


def _naive_grid(U: torch.Tensor, V: torch.Tensor, max_i: int, max_j: int) -> torch.Tensor:
    """The per-(i, j) route: one product and one norm for each cell (what eq. 4 reads like)."""
    out = torch.empty(max_i, max_j, dtype=U.dtype)
    for i in range(1, max_i + 1):
        for j in range(1, max_j + 1):
            M = U[:, :i].mT @ V[:, :j]  # (i, n) @ (n, j)
            out[i - 1, j - 1] = float(torch.linalg.matrix_norm(M)) ** 2 / min(i, j)
    return out


def grid_row(d: int, max_i: int, max_j: int, device: torch.device, repeats: int, log):
    """Item 2: the whole φ grid from M = UᵀV and a 2-D cumsum vs the naive double loop."""
    g = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(d, max_i, generator=g, dtype=torch.float64))[0].to(device)
    V = torch.linalg.qr(torch.randn(d, max_j, generator=g, dtype=torch.float64))[0].to(device)
    t_grid = median_time(lambda: subspace_similarity(U, V, max_i, max_j), device, repeats)
    t_naive = median_time(lambda: _naive_grid(U, V, max_i, max_j), device, repeats, 0.0)
    diff = float((subspace_similarity(U, V).cpu() - _naive_grid(U, V, max_i, max_j)).abs().max())
    rec = {"d": d, "grid": t_grid, "naive": t_naive, "diff": diff}
    log(f"grid: {rec}")
    md = table(
        ["grid", "lorascope (one product + cumsum)", "naive per-(i, j)", "ratio", "max abs Δφ"],
        [
            [
                f"i ≤ {max_i}, j ≤ {max_j}, d = {d}",
                fmt_s(t_grid),
                fmt_s(t_naive),
                fmt_x(t_naive / t_grid),
                f"{diff:.1e}",
            ]
        ],
    )
    return md, rec
