"""Update families as exact factored forms: every additive update written as ``B' @ A'``.

The readers (``lorascope.formats``) find a family's tensors by name; these kernels turn them into
the one form the analyses use, ``ΔW = s · B' @ A'`` with ``B'`` ``(d_out, k)`` and ``A'``
``(k, d_in)``, exactly (no truncation, no dense ``ΔW``). Tensors in, tensors out: no file names.

==========  ===========================================  ========================  ===========
family      update as the library defines it             factored form             width k
==========  ===========================================  ========================  ===========
lora        ``s · B A``                                  ``B, A``                  ``r``
adalora     ``B (E ⊙ A) · s``  (E: (r, 1) "singular      ``B, E ⊙ A``              ``r``
            values"; PEFT ``s = alpha / (ranknum+1e-5)``)
vera        ``diag(λ_b) B_s diag(λ_d) A_s``              ``λ_b ⊙ B_s, λ_d ⊙ A_s``   ``r``
loha        ``(W1a W1b) ⊙ (W2a W2b) · s``                face-splitting ×          ``r1 · r2``
                                                         Khatri–Rao
lokr        ``kron(W1, W2) · s``, each factor full or    ``kron(P1, P2),           ``k1 · k2``
            low-rank ``P Q``                             kron(Q1, Q2)``
==========  ===========================================  ========================  ===========

Identities used (checked in ``tests/test_families.py`` against dense products):

- Hadamard product of two low-rank matrices: ``(P1 Q1) ⊙ (P2 Q2) = (P1 • P2)(Q1 ∗ Q2)`` where
  ``P1 • P2`` is the row-wise Kronecker (face-splitting) product, row ``i`` = ``P1[i] ⊗ P2[i]``,
  and ``Q1 ∗ Q2`` the column-wise Khatri–Rao product, column ``j`` = ``Q1[:, j] ⊗ Q2[:, j]``.
- Mixed product: ``kron(P1 Q1, P2 Q2) = kron(P1, P2) · kron(Q1, Q2)``; the singular values of
  ``kron(X, Y)`` are the products of those of ``X`` and ``Y``.
- A Tucker-decomposed conv factor (LyCORIS/PEFT ``hada_t*``, ``lokr_t2``, ``lora_mid``) is
  ``P Q`` with ``P`` ``(out, r)`` and ``Q = core ×₁ A`` ``(r, in·kh·kw)``.
"""

from __future__ import annotations

import torch

__all__ = [
    "face_split",
    "khatri_rao",
    "hadamard_factors",
    "kron_factors",
    "full_as_factors",
    "tucker_factors",
    "row_scale",
]


def face_split(P1: torch.Tensor, P2: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product: ``out[i] = P1[i] ⊗ P2[i]``.

    ``P1`` ``(n, r1)``, ``P2`` ``(n, r2)`` -> ``(n, r1·r2)``, column ``p·r2 + q`` =
    ``P1[:, p] · P2[:, q]``.
    """
    n, r1 = P1.shape
    r2 = P2.shape[1]
    return (P1[:, :, None] * P2[:, None, :]).reshape(n, r1 * r2)  # (n, r1, r2) -> (n, r1·r2)


def khatri_rao(Q1: torch.Tensor, Q2: torch.Tensor) -> torch.Tensor:
    """Column-wise Kronecker product: ``out[:, j] = Q1[:, j] ⊗ Q2[:, j]``.

    ``Q1`` ``(r1, m)``, ``Q2`` ``(r2, m)`` -> ``(r1·r2, m)``, row ``p·r2 + q`` =
    ``Q1[p] · Q2[q]``.
    """
    r1, m = Q1.shape
    r2 = Q2.shape[0]
    return (Q1[:, None, :] * Q2[None, :, :]).reshape(r1 * r2, m)  # (r1, r2, m) -> (r1·r2, m)


def hadamard_factors(
    P1: torch.Tensor, Q1: torch.Tensor, P2: torch.Tensor, Q2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of ``(P1 @ Q1) ⊙ (P2 @ Q2)`` (LoHa, Hyeon-Woo et al. 2022).

    Parameters
    ----------
    P1, P2 : torch.Tensor
        ``(d_out, r1)``, ``(d_out, r2)``.
    Q1, Q2 : torch.Tensor
        ``(r1, d_in)``, ``(r2, d_in)``.

    Returns
    -------
    B', A' : torch.Tensor
        ``(d_out, r1·r2)`` and ``(r1·r2, d_in)`` with ``B' @ A' = (P1 Q1) ⊙ (P2 Q2)``:
        entry ``(i, j)`` is ``Σ_{p,q} P1[i,p] P2[i,q] Q1[p,j] Q2[q,j]``.
    """
    return face_split(P1, P2), khatri_rao(Q1, Q2)


def full_as_factors(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full matrix ``W`` ``(a, b)`` as ``P @ Q`` of width ``min(a, b)``: ``(I, W)`` or
    ``(W, I)``. Exact; used for LoKr's full (not low-rank) Kronecker factors."""
    a, b = W.shape
    if a <= b:
        return torch.eye(a, dtype=W.dtype, device=W.device), W
    return W, torch.eye(b, dtype=W.dtype, device=W.device)


def kron_factors(
    P1: torch.Tensor, Q1: torch.Tensor, P2: torch.Tensor, Q2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of ``kron(P1 @ Q1, P2 @ Q2)`` (LoKr, Yeh et al. 2023).

    Parameters
    ----------
    P1, Q1 : torch.Tensor
        ``(a, k1)``, ``(k1, b)``: the left Kronecker factor ``W1 = P1 Q1`` ``(a, b)``.
    P2, Q2 : torch.Tensor
        ``(c, k2)``, ``(k2, d)``: the right one, ``W2 = P2 Q2`` ``(c, d)``; a conv ``W2``
        ``(c, d, kh, kw)`` is passed flattened to ``(c, d·kh·kw)``, which is how ``torch.kron``
        of ``W1[..., None, None]`` with the kernel lays out its columns.

    Returns
    -------
    B', A' : torch.Tensor
        ``kron(P1, P2)`` ``(a·c, k1·k2)`` and ``kron(Q1, Q2)`` ``(k1·k2, b·d)`` (mixed-product
        property).
    """
    # torch.kron needs packed row-major inputs (.contiguous() keeps odd strides of (n, 1) views)
    P1, Q1, P2, Q2 = (t.clone(memory_format=torch.contiguous_format) for t in (P1, Q1, P2, Q2))
    return torch.kron(P1, P2), torch.kron(Q1, Q2)


def tucker_factors(
    core: torch.Tensor, down: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of a Tucker-decomposed conv weight ``einsum("i j ..., j r, i p -> p r ...")``.

    This is LyCORIS' ``rebuild_tucker(t, wa, wb)`` (and PEFT LoHa/LoKr's ``make_weight_cp``):
    ``W[p, c, *k] = Σ_{i,j} core[i, j, *k] · down[j, c] · up[i, p]``.

    Parameters
    ----------
    core : torch.Tensor
        ``(r_up, r_down, kh, kw)``.
    down : torch.Tensor
        ``(r_down, in)``.
    up : torch.Tensor
        ``(r_up, out)``.

    Returns
    -------
    P, Q : torch.Tensor
        ``upᵀ`` ``(out, r_up)`` and ``Q[i, (c, k)] = Σ_j core[i, j, k] down[j, c]``
        ``(r_up, in·kh·kw)``, so that ``P @ Q`` is ``W`` flattened to ``(out, in·kh·kw)``.
    """
    Q = torch.einsum("ij...,jc->ic...", core, down)  # (r_up, in, kh, kw)
    return up.T, Q.reshape(Q.shape[0], -1)  # (out, r_up), (r_up, in·kh·kw)


def row_scale(v: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``diag(v) @ M`` without forming ``diag(v)``: ``v`` ``(n,)``, ``M`` ``(n, m)``."""
    return v.reshape(-1, 1) * M
