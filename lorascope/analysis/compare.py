"""Compare N adapters of one base: per-module N×N subspace similarity and Grassmann distance.

Hu et al. 2021 §7.2 compare two adapters at a time (r = 8 vs r = 64, two seeds) by
φ(i, j) = ‖U_iᵀ V_j‖_F² / min(i, j) (eq. 4). For N adapters of the same base (seeds, tasks,
checkpoints of one run) this gives, for every module they share, an N×N matrix of φ and of the
Grassmann distance ``sqrt(Σ θ_t²)`` over the principal angles θ, and, for checkpoints, the
first checkpoint from which each module's top directions stay close to the final ones.

Conventions (the choices every function here shares):

- **Directions**: ``ΔW``'s own singular vectors from the factored SVD, input side (``"right"``,
  in ``R^{d_in}``, the space the paper's ``A`` spans) by default, output side (``"left"``) as an
  option. They depend on the product ``s·B A`` only, so the results do not change under
  ``B → B G, A → G⁻¹ A`` or when alpha moves between the factors (``A``'s own singular vectors
  would). Each adapter offers ``k_a = min(r_a, d_out, d_in)`` ordered directions.
- **(i, j)**: the top-``i`` directions of the row adapter against the top-``j`` of the column
  adapter, each capped by what the adapter has (``min(i, k_a)``). Default ``i = j = k``, the
  smallest ``k_a`` of the module, so every adapter contributes the same number of directions
  and an ``r = 4`` and an ``r = 16`` adapter whose top-4 spaces agree get φ = 1, distance 0.
- **Symmetry**: the *directed* entry ``[a, b]`` compares ``a``'s top-``i`` with ``b``'s top-
  ``j``; the reported matrices are ``(P + Pᵀ)/2``. With ``i = j`` the directed matrix is already
  symmetric (up to rounding); with ``i ≠ j`` the entry averages both containments.
- **Matching**: modules are matched across the N adapters by key, else by (layer, kind) when
  that is unique (as :func:`lorascope.analysis._common.pair_modules` does for two); modules
  not present in every adapter are skipped with a warning.
- **Clustering**: average linkage (``scipy.cluster.hierarchy``) on ``1 − φ`` (or on the
  Grassmann distance), leaves optimally ordered; heatmaps follow the leaf order.
- **Settling** (checkpoints in training order, the last one the reference): ``φ_t`` is φ of
  checkpoint ``t`` to the last; the module has settled at the first ``t`` from which
  ``φ_s >= threshold`` for every ``s`` from ``t`` on (see :func:`settle_index`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Literal

import numpy as np
import torch

from lorascope.adapter import Adapter, LoraModule
from lorascope.analysis._common import Device, map_modules, module_svd, pair_modules, update_fields
from lorascope.columns import (
    Column,
    Results,
    Tabular,
    ident,
    ident_columns,
    new_figure,
    png_bytes,
)
from lorascope.errors import LoraScopeError, LoraScopeWarning, MissingModuleError, ShapeError
from lorascope.linalg import average_linkage, compare_bases, default_rcond

__all__ = [
    "CompareResult",
    "SettleResult",
    "compare_bases",
    "compare",
    "settle",
    "settle_index",
    "cluster",
    "mean_matrix",
    "adapter_labels",
    "checkpoint_step",
]

Side = Literal["right", "left"]
Metric = Literal["phi", "grassmann"]


# ------------------------------------------------------------------------------------ kernels


def settle_index(phi_to_final: Sequence[float], threshold: float = 0.9) -> int:
    """First index from which every value stays at or above ``threshold``.

    Parameters
    ----------
    phi_to_final : sequence of float
        φ of each checkpoint *before* the final one to the final one, in training order.
    threshold : float
        In ``(0, 1]``.

    Returns
    -------
    int
        The smallest ``t`` with ``phi_to_final[s] >= threshold`` for every ``s >= t``;
        ``len(phi_to_final)`` (the final checkpoint itself) when the last value is below.

    Examples
    --------
    >>> settle_index([0.2, 0.95, 0.5, 0.92, 0.97], 0.9)   # dips at index 2, stays up from 3
    3
    >>> settle_index([0.95, 0.8], 0.9)                     # only the final itself
    2
    """
    t = len(phi_to_final)
    while t > 0 and phi_to_final[t - 1] >= threshold:
        t -= 1
    return t


# Average linkage on a distance matrix: the kernel lives in linalg, the name stays here.
cluster = average_linkage


# ------------------------------------------------------------------------------------ labels

_FILE_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".h5", ".hdf5"}
_GENERIC_STEMS = ("adapter_model", "pytorch_lora_weights", "adapter")
_STEP_RE = re.compile(r"(?:^|[-_.])(?:step|checkpoint|ckpt|iter|global[-_]?step)[-_]?(\d+)$", re.I)


def _display_parts(path: str) -> list[str]:
    """Path components, with a generic weights file (``adapter_model.safetensors``) dropped in
    favour of its directory and a specific file reduced to its stem."""
    p = PurePath(path)
    parts = [x for x in p.parts if x not in ("/", ".")] or [str(path)]
    if p.suffix.lower() in _FILE_SUFFIXES:
        stem = p.stem
        if stem.lower().startswith(_GENERIC_STEMS) and len(parts) > 1:
            parts = parts[:-1]
        else:
            parts[-1] = stem
    return parts


def checkpoint_step(path: str) -> int | None:
    """Training step in a checkpoint's name: ``step-000030`` -> 30, ``checkpoint-500`` -> 500,
    ``global_step12`` -> 12; ``None`` when the name carries none."""
    m = _STEP_RE.search(_display_parts(path)[-1])
    return int(m.group(1)) if m else None


def adapter_labels(paths: Sequence[str]) -> list[str]:
    """Short unique labels: ``step 30`` for a checkpoint, else the directory (or file stem) name;
    parent directories are prepended until the labels differ, then ``#2``, ``#3``."""
    parts = [_display_parts(p) for p in paths]

    def label(k: int, depth: int) -> str:
        step = checkpoint_step(paths[k])
        last = f"step {step}" if step is not None else parts[k][-1]
        return "/".join([*parts[k][-depth:-1], last]) if depth > 1 else last

    depth = [1] * len(paths)
    for _ in range(max(len(x) for x in parts)):
        labels = [label(k, d) for k, d in enumerate(depth)]
        dup = {x for x in labels if labels.count(x) > 1}
        if not dup:
            return labels
        depth = [
            d + 1 if labels[k] in dup and d < len(parts[k]) else d for k, d in enumerate(depth)
        ]
    labels = [label(k, d) for k, d in enumerate(depth)]
    seen: dict[str, int] = {}
    out = []
    for x in labels:
        seen[x] = seen.get(x, 0) + 1
        out.append(x if seen[x] == 1 else f"{x}#{seen[x]}")
    return out


# ------------------------------------------------------------------------------------ results


def _pair_values(r: CompareResult, metric: Metric) -> list[float]:
    n = len(r.labels)
    M = r.matrix(metric)
    return [float(M[a, b]) for a in range(n) for b in range(a + 1, n)]


_RANDOM_DOC = "E[φ] = max(i, j)/n of random subspaces"
_COMPARE_COLUMNS = (
    *ident_columns(rank=False),
    Column("i"),
    Column("j"),
    Column("mean_phi", "mean φ", get=lambda r: float(np.mean(_pair_values(r, "phi")))),
    Column("min_phi", "min φ", get=lambda r: min(_pair_values(r, "phi"))),
    Column("max_phi", "max φ", get=lambda r: max(_pair_values(r, "phi"))),
    Column(
        "mean_grassmann",
        "mean dist",
        get=lambda r: float(np.mean(_pair_values(r, "grassmann"))),
        unit="rad",
        doc="mean Grassmann distance over pairs",
    ),
    Column("expected_random", "random φ", doc=_RANDOM_DOC),
)
_COMPARE_TIDY = (
    *ident_columns(rank=False),
    Column("factor", doc="ΔW's right (input) or left (output) singular vectors"),
    Column("a", doc="row adapter, from 1"),
    Column("b", doc="column adapter, from 1"),
    Column("label_a"),
    Column("label_b"),
    Column("rank_a"),
    Column("rank_b"),
    Column("i"),
    Column("j"),
    Column("phi", "φ", doc="symmetric φ(top-i, top-j), Hu et al. 2021 eq. 4"),
    Column("grassmann", "distance", unit="rad", doc="sqrt(Σ θ²) over the principal angles"),
    Column("expected_random", "random φ", doc=_RANDOM_DOC),
)
_SETTLE_COLUMNS = (
    *ident_columns(rank=False),
    Column("i"),
    Column("j"),
    Column("threshold"),
    Column("settled_label", "settled at", doc="first checkpoint from which φ stays up"),
    Column("settled_step", "step"),
    Column("settled_before_final", "before final"),
)
_SETTLE_TIDY = (
    *ident_columns(rank=False),
    Column("factor"),
    Column("index", doc="checkpoint, from 0"),
    Column("label"),
    Column("step"),
    Column("i"),
    Column("j"),
    Column("phi_to_final", "φ to final"),
    Column("grassmann_to_final", "distance to final", unit="rad"),
    Column("settled", doc="at or after the settling checkpoint"),
)


@dataclass
class CompareResult(Tabular):
    """N×N comparison of one module across N adapters.

    Attributes
    ----------
    module, layer, kind : str, int | None, str
        The module (key in the first adapter), its block index and projection kind.
    factor : {"right", "left"}
        Which singular vectors of ``ΔW`` were compared (``right``: input side, ``R^{d_in}``).
    dim : int
        ``n``, the dimension of the space the directions live in.
    labels : list[str]
        One per adapter, in the order given.
    steps : list[int | None]
        Training step parsed from each adapter's name (checkpoints), else ``None``.
    ranks : list[int]
        LoRA rank ``r`` of the module in each adapter.
    numerical_ranks : list[int]
        Count of ``σ > eps·max(d_out, d_in)·σ_1`` of each ``ΔW``.
    i, j : int
        Directions requested from the row / column adapter (default: the smallest rank).
    dims_i, dims_j : list[int]
        Directions each adapter actually contributes as row / column: ``min(i, k_a)``.
    phi_directed, grassmann_directed : np.ndarray
        ``(N, N)``: entry ``[a, b]`` compares ``a``'s top-``dims_i[a]`` with ``b``'s
        top-``dims_j[b]``.
    modules : list[str]
        The module's key in each adapter.
    """

    module: str
    layer: int | None
    kind: str
    factor: str
    dim: int
    labels: list[str]
    steps: list[int | None]
    ranks: list[int]
    numerical_ranks: list[int]
    i: int
    j: int
    dims_i: list[int]
    dims_j: list[int]
    phi_directed: np.ndarray
    grassmann_directed: np.ndarray
    modules: list[str]
    family: str = "lora"
    update: str = "full"

    COLUMNS = _COMPARE_COLUMNS
    TIDY = _COMPARE_TIDY

    def tidy(self) -> Iterator[dict]:
        base = {**ident(self, rank=False), "factor": self.factor, "i": self.i, "j": self.j}
        phi, dist, n = self.phi, self.grassmann, len(self.labels)
        for a in range(n):
            for b in range(n):
                yield {
                    **base,
                    "a": a + 1,
                    "b": b + 1,
                    "label_a": self.labels[a],
                    "label_b": self.labels[b],
                    "rank_a": self.ranks[a],
                    "rank_b": self.ranks[b],
                    "phi": float(phi[a, b]),
                    "grassmann": float(dist[a, b]),
                    "expected_random": self.expected_random,
                }

    def caption(self) -> str:
        return (
            f"compare · {self.module} · {self.family} · {len(self.labels)} adapters, ranks "
            f"{', '.join(map(str, self.ranks))} · φ({self.i},{self.j}) on {self.factor}"
        )

    def png(self) -> bytes:
        """The clustered φ matrix (:func:`lorascope.plot.plot_compare_matrix`), PNG bytes."""
        from lorascope.plot import plot_compare_matrix

        n = len(self.labels)
        fig = new_figure(0.45 * n + 2.6, 0.45 * n + 1.8)
        ax = fig.add_subplot()
        plot_compare_matrix(self.phi, self.labels, ax, order=self.order(), title=self.module)
        return png_bytes(fig)

    @staticmethod
    def group_png(results: list[CompareResult]) -> bytes:
        """Dendrogram and module-mean φ matrix (:func:`lorascope.plot.plot_compare`), PNG."""
        from lorascope.plot import plot_compare

        n = len(results[0].labels)
        return png_bytes(plot_compare(results, new_figure(0.45 * n + 3.0, 0.45 * n + 2.6)))

    @property
    def phi(self) -> np.ndarray:
        """``(N, N)`` symmetric φ, ``(P + Pᵀ)/2`` of the directed matrix; 1 on the diagonal."""
        return (self.phi_directed + self.phi_directed.T) / 2

    @property
    def grassmann(self) -> np.ndarray:
        """``(N, N)`` symmetric Grassmann distance (radians), 0 on the diagonal."""
        return (self.grassmann_directed + self.grassmann_directed.T) / 2

    @property
    def expected_random(self) -> float:
        """``E[φ] = max(i, j)/n`` for independent random subspaces of ``R^n`` (the baseline)."""
        return max(max(self.dims_i), max(self.dims_j)) / self.dim

    def matrix(self, metric: Metric = "phi") -> np.ndarray:
        """The symmetric φ (``"phi"``) or Grassmann (``"grassmann"``) matrix."""
        if metric == "phi":
            return self.phi
        if metric == "grassmann":
            return self.grassmann
        raise ValueError(f"metric must be 'phi' or 'grassmann', got {metric!r}")

    def order(self, metric: Metric = "phi") -> list[int]:
        """Leaf order of :func:`cluster` on ``1 − φ`` or on the Grassmann distance."""
        M = self.matrix(metric)
        return cluster(1.0 - M if metric == "phi" else M)[1]

    def to_dict(self) -> dict:
        return {
            "module": self.module,
            "layer": self.layer,
            "kind": self.kind,
            "factor": self.factor,
            "dim": self.dim,
            "labels": list(self.labels),
            "steps": list(self.steps),
            "ranks": list(self.ranks),
            "numerical_ranks": list(self.numerical_ranks),
            "i": self.i,
            "j": self.j,
            "dims_i": list(self.dims_i),
            "dims_j": list(self.dims_j),
            "phi": self.phi.tolist(),
            "grassmann": self.grassmann.tolist(),
            "phi_directed": self.phi_directed.tolist(),
            "grassmann_directed": self.grassmann_directed.tolist(),
            "expected_random": self.expected_random,
            "order": self.order("phi"),
            "modules": list(self.modules),
            "family": self.family,
            "update": self.update,
        }


@dataclass
class SettleResult(Tabular):
    """When one module's top directions settle over the checkpoints of a run.

    ``phi_to_final[t]`` and ``grassmann_to_final[t]`` compare checkpoint ``t`` with the last one
    (``1`` and ``0`` at the end). ``settled_index`` is :func:`settle_index` of the values before
    the last: the first checkpoint from which φ stays ``>= threshold``; ``N − 1`` (the final
    itself) when the one before it is still below.
    """

    module: str
    layer: int | None
    kind: str
    factor: str
    i: int
    j: int
    threshold: float
    labels: list[str]
    steps: list[int | None]
    phi_to_final: list[float]
    grassmann_to_final: list[float]
    settled_index: int

    COLUMNS = _SETTLE_COLUMNS
    TIDY = _SETTLE_TIDY

    def tidy(self) -> Iterator[dict]:
        base = {**ident(self, rank=False), "factor": self.factor, "i": self.i, "j": self.j}
        for t, label in enumerate(self.labels):
            yield {
                **base,
                "index": t,
                "label": label,
                "step": self.steps[t],
                "phi_to_final": self.phi_to_final[t],
                "grassmann_to_final": self.grassmann_to_final[t],
                "settled": t >= self.settled_index,
            }

    @property
    def settled_label(self) -> str:
        return self.labels[self.settled_index]

    @property
    def settled_step(self) -> int | None:
        return self.steps[self.settled_index]

    @property
    def settled_before_final(self) -> bool:
        return self.settled_index < len(self.labels) - 1

    def to_dict(self) -> dict:
        return {
            "module": self.module,
            "layer": self.layer,
            "kind": self.kind,
            "factor": self.factor,
            "i": self.i,
            "j": self.j,
            "threshold": self.threshold,
            "labels": list(self.labels),
            "steps": list(self.steps),
            "phi_to_final": list(self.phi_to_final),
            "grassmann_to_final": list(self.grassmann_to_final),
            "settled_index": self.settled_index,
            "settled_label": self.settled_label,
            "settled_step": self.settled_step,
            "settled_before_final": self.settled_before_final,
        }


# ------------------------------------------------------------------------------------ adapters


def _match(
    adapters: Sequence[Adapter], layer: int | None, module: str | None
) -> list[list[LoraModule]]:
    """Rows of modules present in every adapter (first adapter's order), one column each."""
    selected = [ad.select(layer=layer, module=module) for ad in adapters]
    first = selected[0]
    maps = [
        {a.key: b for a, b in pair_modules(first, mods, adapters[0].path, ad.path)}
        for ad, mods in zip(adapters[1:], selected[1:], strict=True)
    ]
    common = [m for m in first if all(m.key in mp for mp in maps)]
    if not common:
        names = ", ".join(str(ad.path) for ad in adapters)
        raise MissingModuleError(
            f"{names}: no module is in every adapter (by name, or by layer and kind)"
        )
    rows = [[m, *(mp[m.key] for mp in maps)] for m in common]
    used = [{id(row[c]) for row in rows} for c in range(len(adapters))]
    left = [(ad, m) for c, ad in enumerate(adapters) for m in selected[c] if id(m) not in used[c]]
    if left:
        ad, m = left[0]
        warnings.warn(
            f"{len(left)} module(s) not in every adapter are skipped (e.g. {ad.path}: {m.key})",
            LoraScopeWarning,
            stacklevel=3,
        )
    return rows


def _compare_row(
    mods: list[LoraModule],
    labels: list[str],
    steps: list[int | None],
    i: int | None,
    j: int | None,
    factor: Side,
    dtype: torch.dtype,
    device: Device,
) -> CompareResult:
    m0 = mods[0]
    for m in mods[1:]:
        if m.shape != m0.shape:
            raise ShapeError(
                f"cannot compare {m0.tensor_name()} ΔW {m0.shape} with {m.tensor_name()} "
                f"ΔW {m.shape}: not updates of the same weight"
            )
    svds = [module_svd(m, dtype=dtype, device=device) for m in mods]
    bases = [s.V if factor == "right" else s.U for s in svds]  # (n, k_a) each
    ks = [int(b.shape[-1]) for b in bases]
    ii = min(ks) if i is None else i
    jj = ii if j is None else j
    rcond = default_rcond(m0.shape, dtype)
    nranks = [int((s.S > rcond * s.S[0]).sum()) for s in svds]
    phi, dist = compare_bases([b.cpu() for b in bases], ii, jj)
    return CompareResult(
        **update_fields(*mods),
        module=m0.key,
        layer=m0.layer,
        kind=m0.kind,
        factor=factor,
        dim=int(bases[0].shape[0]),
        labels=list(labels),
        steps=list(steps),
        ranks=[m.rank for m in mods],
        numerical_ranks=nranks,
        i=ii,
        j=jj,
        dims_i=[min(ii, k) for k in ks],
        dims_j=[min(jj, k) for k in ks],
        phi_directed=phi.numpy(),
        grassmann_directed=dist.numpy(),
        modules=[m.key for m in mods],
    )


def compare(
    adapters: Sequence[Adapter],
    *,
    k: int | None = None,
    i: int | None = None,
    j: int | None = None,
    factor: Side = "right",
    layer: int | None = None,
    module: str | None = None,
    labels: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
) -> Results[CompareResult]:
    """N×N subspace similarity φ and Grassmann distance of N adapters, per shared module.

    Parameters
    ----------
    adapters : sequence of Adapter
        ``N >= 2`` adapters of the same base (seeds, tasks, checkpoints of one run, in order).
    k : int, optional
        Shorthand for ``i = j = k``.
    i, j : int, optional
        Top directions from the row / column adapter of each entry, each capped by what the
        adapter has (``min(r, d_out, d_in)``). Default ``i = j =`` the smallest rank among the
        adapters (per module); ``j`` defaults to ``i``.
    factor : {"right", "left"}
        ``ΔW``'s right (input side, ``R^{d_in}``; the paper's ``A`` side) or left singular
        vectors, from the factored SVD (never a dense ``ΔW``).
    layer, module : optional
        Selection, as :meth:`~lorascope.adapter.Adapter.select`.
    labels : sequence of str, optional
        One per adapter; default :func:`adapter_labels` of the adapters' paths.

    Returns
    -------
    list[CompareResult]
        One per module present in every adapter, in the first adapter's order. ``phi`` and
        ``grassmann`` are ``(N, N)`` and symmetric:
        ``φ_ab = ½[φ(a top-i, b top-j) + φ(b top-i, a top-j)]`` with
        ``φ(U, V) = ‖UᵀV‖_F² / min(dim U, dim V) = mean cos² θ`` (Hu et al. 2021 §7.2, eq. 4)
        and the same average of ``sqrt(Σ θ²)`` over the principal angles θ.

    Raises
    ------
    LoraScopeError
        Fewer than two adapters, conflicting or non-positive ``k``/``i``/``j``.
    MissingModuleError
        A layer or module kind some adapter lacks, or no module shared by all.
    ShapeError
        A matched module whose ``ΔW`` shape differs between adapters.
    ZeroUpdateError, NonFiniteError
        An all-zero or non-finite update.
    """
    if len(adapters) < 2:
        names = ", ".join(str(ad.path) for ad in adapters) or "none given"
        raise LoraScopeError(f"compare needs at least two adapters ({names})")
    if k is not None and (i is not None or j is not None):
        raise LoraScopeError("give either k or i/j, not both")
    if k is not None:
        i = j = k
    for name, v in (("i", i), ("j", j)):
        if v is not None and v < 1:
            raise LoraScopeError(f"{name} must be at least 1, got {v}")
    if factor not in ("right", "left"):
        raise LoraScopeError(f"factor must be 'right' or 'left', got {factor!r}")
    paths = [str(ad.path) for ad in adapters]
    labels = adapter_labels(paths) if labels is None else [str(x) for x in labels]
    if len(labels) != len(adapters):
        raise LoraScopeError(f"{len(labels)} labels for {len(adapters)} adapters")
    steps = [checkpoint_step(p) for p in paths]
    rows = _match(adapters, layer, module)
    results = Results(
        map_modules(
            lambda mods: _compare_row(mods, labels, steps, i, j, factor, dtype, device),
            rows,
            device,
        )
    )
    short = [
        (r, a)
        for r in results
        for a in range(len(labels))
        if max(r.dims_i[a], r.dims_j[a]) > r.numerical_ranks[a]
    ]
    if short:
        r, a = short[0]
        warnings.warn(
            f"{len(short)} module(s) have fewer numerically non-zero singular values than the "
            f"directions compared; the extra directions are arbitrary (e.g. {paths[a]}: "
            f"{r.modules[a]}, numerical rank {r.numerical_ranks[a]} < "
            f"{max(r.dims_i[a], r.dims_j[a])})",
            LoraScopeWarning,
            stacklevel=2,
        )
    return results


def settle(results: Sequence[CompareResult], threshold: float = 0.9) -> Results[SettleResult]:
    """When each module's top directions settle, from :func:`compare` of checkpoints in order.

    Parameters
    ----------
    results : sequence of CompareResult
        From :func:`compare` on checkpoints of one run in training order, the final adapter
        last (the reference).
    threshold : float
        In ``(0, 1]``.

    Returns
    -------
    list[SettleResult]
        Per module: ``φ_t`` (and the Grassmann distance) of checkpoint ``t`` to the final one,
        and the first checkpoint from which ``φ_s >= threshold`` for every later ``s`` (the final
        one itself counts as settled: index ``N − 1`` means "not before the end").
    """
    if not 0.0 < threshold <= 1.0:
        raise LoraScopeError(f"threshold must be in (0, 1], got {threshold}")
    out = Results()
    for r in results:
        phi = r.phi[:, -1].tolist()
        out.append(
            SettleResult(
                module=r.module,
                layer=r.layer,
                kind=r.kind,
                factor=r.factor,
                i=r.i,
                j=r.j,
                threshold=float(threshold),
                labels=list(r.labels),
                steps=list(r.steps),
                phi_to_final=phi,
                grassmann_to_final=r.grassmann[:, -1].tolist(),
                settled_index=settle_index(phi[:-1], threshold),
            )
        )
    return out


def mean_matrix(results: Sequence[CompareResult], metric: Metric = "phi") -> np.ndarray:
    """Mean over modules of the ``(N, N)`` φ or Grassmann matrices (all from one
    :func:`compare` call, or filtered from one, e.g. one kind)."""
    if not results:
        raise LoraScopeError("no modules to average")
    return np.mean([r.matrix(metric) for r in results], axis=0)
