"""Kernels the analyses moved into linalg: Brand's SVD update (intruders) and the clustering of
``compare``, checked against dense numpy/scipy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorascope.linalg import (
    SVD,
    average_linkage,
    brand_update_factors,
    orthonormal_complement,
)


def _thin_svd(W: torch.Tensor) -> SVD:
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return SVD(U, S, Vh.mT)


@pytest.mark.parametrize("shape", [(9, 5), (5, 9), (7, 7)], ids=["tall", "wide", "square"])
def test_brand_update_has_the_singular_values_of_the_dense_sum(shape):
    g = torch.Generator().manual_seed(0)
    m, n = shape
    r, s = 2, 0.7
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    B = torch.randn(m, r, generator=g, dtype=torch.float64)
    svd = _thin_svd(W)
    X, Yt = brand_update_factors(svd, A, B)
    p = min(m, n)
    assert X.shape == (p + (min(r, m - p) if m > p else 0), r)
    assert Yt.shape == (r, p + (min(r, n - p) if n > p else 0))
    K = s * X @ Yt
    K[:p, :p] += torch.diag(svd.S)  # K = [[diag(S), 0], [0, 0]] + s·X Yt
    dense = np.linalg.svd((W + s * B @ A).numpy(), compute_uv=False)  # the definition
    got = torch.linalg.svdvals(K).numpy()[: dense.size]
    np.testing.assert_allclose(got, dense, rtol=1e-12, atol=1e-12)


def test_orthonormal_complement_spans_what_q_misses():
    g = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(torch.randn(10, 4, generator=g, dtype=torch.float64)).Q  # (10, 4)
    M = torch.randn(10, 3, generator=g, dtype=torch.float64)
    P = orthonormal_complement(Q, M, 3)  # (10, 3)
    np.testing.assert_allclose((P.mT @ P).numpy(), np.eye(3), atol=1e-13)
    assert float((Q.mT @ P).abs().max()) <= 16 * torch.finfo(torch.float64).eps
    rest = M - Q @ (Q.mT @ M) - P @ (P.mT @ M)  # nothing of M is left outside [Q P]
    assert float(rest.abs().max()) < 1e-12
    # M inside range(Q): the complement is still orthogonal to Q, to working precision
    P = orthonormal_complement(Q, Q @ torch.randn(4, 2, generator=g, dtype=torch.float64), 2)
    assert float((Q.mT @ P).abs().max()) <= 16 * torch.finfo(torch.float64).eps


def test_average_linkage_on_planted_groups():
    # two tight groups {0, 2, 4} and {1, 3}, far apart
    pts = np.array([0.0, 10.0, 0.1, 10.2, 0.3])
    D = np.abs(pts[:, None] - pts[None, :])
    Z, order = average_linkage(D)
    assert Z.shape == (4, 4)
    first = {0, 2, 4} if order[0] in (0, 2, 4) else {1, 3}
    assert set(order[: len(first)]) == first  # a group's leaves are adjacent
    # the last merge joins the groups at their average distance (scipy's "average" linkage)
    between = [abs(a - b) for a in pts[[0, 2, 4]] for b in pts[[1, 3]]]
    assert Z[-1, 2] == pytest.approx(np.mean(between))
    # an asymmetric input is symmetrized first
    _, order2 = average_linkage(D + np.triu(np.full_like(D, 0.01), 1))
    assert set(order2[: len(first)]) == first
