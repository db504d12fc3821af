"""What a tracking file says: σ trajectories, rank use, settling, and advice, per module.

From a :class:`~lorascope.tracking.store.Run` (a file the tracker wrote, complete or cut off by
a kill), :func:`dynamics` gives one :class:`ModuleDynamics` per module:

- the recorded trajectories (σ, k@50/90/99 %, effective and stable rank, ``‖ΔW‖_F``, φ and the
  Grassmann distance to the previous snapshot, the relative change, the amplification);
- the **settling curve**: φ(i, i) (Hu et al. 2021 eq. 4) of each stored snapshot's top-i right
  singular vectors to the final update's, and the settling step: the first stored snapshot from
  which φ stays ``>= threshold`` (:func:`lorascope.analysis.compare.settle_index`, the rule of
  ``lorascope compare --settle``; by default ``i = k``, the module's width, as there);
- **rank advice**: with ``k`` the k@90 % of the last snapshot, the step since which k@90 % has
  stayed ``<= k``; when ``k < r`` a ``rank_pattern`` entry ``k`` and the ``alpha_pattern`` entry
  that keeps the module's scale (``|s|·k``, rsLoRA ``|s|·√k``);
- **warnings**: the step from which ΔW stays collapsed onto one direction (k@99 % = 1 while
  ``r > 1``), and the step from which it stays still (relative change per step below
  ``stall_tol``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lorascope.adapter import alpha_from_scale
from lorascope.analysis.compare import settle_index
from lorascope.errors import LoraScopeError
from lorascope.linalg import factored_svd, phi_from_cross, principal_angles
from lorascope.tracking.store import Run

__all__ = ["ModuleDynamics", "dynamics", "settling_curve", "rank_patterns"]


def _bases(run: Run, i: int) -> list[torch.Tensor | None]:
    """Right singular vectors ``V (d_in, k)`` of module ``i`` at every stored snapshot."""
    scale = float(run.modules[i]["scale"])
    out: list[torch.Tensor | None] = []
    for t in range(len(run.factor_steps)):
        A, B = run.factors(i, t)
        if not (np.isfinite(A).all() and np.isfinite(B).all()):
            out.append(None)
            continue
        svd = factored_svd(torch.from_numpy(A), torch.from_numpy(B), scale)
        out.append(svd.V if float(svd.S[0]) > 0 else None)
    return out


def settling_curve(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """φ(i, i), i = 1..k, and the Grassmann distance of the top-k subspaces, of every stored
    snapshot of every module to the last stored one.

    Returns
    -------
    phi : np.ndarray
        ``(f, M, K)``; ``phi[t, m, i-1]`` = φ(i, i) of snapshot ``t`` of module ``m`` to the
        final one (NaN past a module's width, or where ΔW is zero or non-finite).
    grassmann : np.ndarray
        ``(f, M)``.
    """
    f, M = len(run.factor_steps), len(run.modules)
    K = run.metrics["sigma"].shape[2]
    phi = np.full((f, M, K), np.nan)
    dist = np.full((f, M), np.nan)
    for i in range(M):
        V = _bases(run, i)
        if not V or V[-1] is None:
            continue
        for t, Vt in enumerate(V):
            if Vt is None:
                continue
            k = Vt.shape[1]
            phi[t, i, :k] = phi_from_cross(Vt.mT @ V[-1]).diagonal().numpy()
            dist[t, i] = float(principal_angles(Vt, V[-1]).square().sum().sqrt())
    return phi, dist


def _opt(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _opt_int(x: int) -> int | None:
    return int(x) if x >= 0 else None


def _stays(values: np.ndarray, ok) -> int | None:
    """First index from which ``ok(v)`` holds for every later measured value (``None`` when
    the last measured value fails it, or nothing was measured)."""
    idx = [t for t, v in enumerate(values) if v is not None]
    if not idx or not ok(values[idx[-1]]):
        return None
    first = idx[-1]
    for t in reversed(idx):
        if not ok(values[t]):
            break
        first = t
    return first


@dataclass
class ModuleDynamics:
    """One module's trajectory over a tracked run (see the module docstring).

    Lists run over ``steps`` (every snapshot) or ``factor_steps`` (the stored ones, for
    ``phi_to_final``/``grassmann_to_final``); ``None`` marks a value not measured.
    ``i`` is the number of top directions φ is taken over; the Grassmann distances
    (``grassmann_prev``, ``grassmann_to_final``) are always over the module's full width ``k``
    (as the tracker records them), so with ``i < k`` they differ from ``compare(k=i)``'s.
    """

    module: str
    layer: int | None
    kind: str
    family: str
    update: str
    rank: int
    nominal_rank: int
    shape: tuple[int, int]
    scale: float
    i: int
    threshold: float
    steps: list[int]
    singular_values: list[list[float | None]]
    fro: list[float | None]
    effective_rank: list[float | None]
    stable_rank: list[float | None]
    k50: list[int | None]
    k90: list[int | None]
    k99: list[int | None]
    phi_prev: list[float | None]
    grassmann_prev: list[float | None]
    change: list[float | None]
    amplification: list[float | None]
    factor_steps: list[int]
    phi_to_final: list[float | None]
    grassmann_to_final: list[float | None]
    settled_step: int | None
    k90_final: int | None
    k90_since: int | None
    suggested_rank: int | None
    suggested_alpha: float | None
    collapsed_since: int | None
    stalled_since: int | None
    notes: list[str] = field(default_factory=list)

    def advice(self) -> list[str]:
        """The log lines for this module: a rank suggestion (when k@90 % < r), collapse, stall."""
        out = []
        if self.suggested_rank is not None and self.k90_since is not None:
            line = (
                f"{self.module}: k@90 % has stayed <= {self.k90_final} since step "
                f"{self.k90_since} (r = {self.nominal_rank}); rank_pattern "
                f"{{{self.module!r}: {self.suggested_rank}}}"
            )
            if self.suggested_alpha is not None:
                line += f", alpha_pattern {{{self.module!r}: {self.suggested_alpha:.4g}}}"
            out.append(line)
        if self.collapsed_since is not None:
            out.append(
                f"{self.module}: warning: ΔW collapsed to rank one from step "
                f"{self.collapsed_since} (k@99 % = 1, r = {self.nominal_rank})"
            )
        if self.stalled_since is not None:
            out.append(f"{self.module}: warning: ΔW stopped moving from step {self.stalled_since}")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["shape"] = list(self.shape)
        d["advice"] = self.advice()
        return d


def dynamics(
    run: Run,
    *,
    k: int | None = None,
    threshold: float = 0.9,
    stall_tol: float = 1e-5,
) -> list[ModuleDynamics]:
    """Per-module trajectories, settling step, rank advice and warnings of a tracked run.

    Parameters
    ----------
    run : Run
        From :func:`lorascope.tracking.read_run`.
    k : int, optional
        φ over the top-k directions (capped by each module's width); default the width, as
        ``lorascope compare`` does.
    threshold : float
        φ to the final update from which a module counts as settled, in ``(0, 1]``.
    stall_tol : float
        A relative change per step below this counts as "stopped moving".

    Returns
    -------
    list[ModuleDynamics]
        One per module, in the file's order.
    """
    if not 0.0 < threshold <= 1.0:
        raise LoraScopeError(f"threshold must be in (0, 1], got {threshold}")
    if k is not None and k < 1:
        raise LoraScopeError(f"k must be at least 1, got {k}")
    if len(run) == 0:
        raise LoraScopeError(f"{run.path}: no snapshot recorded yet")
    if run.phi_final is not None:
        phi_f, dist_f = run.phi_final, run.grassmann_final
    elif len(run.factor_steps):
        phi_f, dist_f = settling_curve(run)
    else:
        phi_f = np.full((0, len(run.modules), run.metrics["sigma"].shape[2]), np.nan)
        dist_f = np.full((0, len(run.modules)), np.nan)
    steps = [int(s) for s in run.steps]
    fsteps = [int(s) for s in run.factor_steps]
    gaps = np.diff(np.concatenate([[0], run.steps])).clip(min=1)  # steps since the previous
    rslora = bool(run.attrs.get("use_rslora", False))
    out = []
    met = run.metrics
    for m, meta in enumerate(run.modules):
        width = int(meta["rank"])
        r = int(meta.get("nominal_rank") or width)
        i = width if k is None else min(k, width)

        def col(name: str, m: int = m) -> list:
            v = met[name][:, m]
            if v.dtype.kind == "i":
                return [_opt_int(int(x)) for x in v]
            return [_opt(float(x)) for x in v]

        k90 = col("k90")
        k99 = col("k99")
        phi_final = [_opt(float(x)) for x in phi_f[:, m, i - 1]]
        measured = [x for x in phi_final[:-1]]
        settled = None
        if phi_final and phi_final[-1] is not None:
            vals = [x if x is not None else -1.0 for x in measured]
            settled = fsteps[settle_index(vals, threshold)]
        k90_final = next((x for x in reversed(k90) if x is not None), None)
        since = _stays(np.array(k90, dtype=object), lambda v, c=k90_final: v <= c)
        suggested = alpha = None
        if k90_final is not None and k90_final < r and meta.get("family") in ("lora", "dora"):
            suggested = k90_final
            s = abs(float(meta["scale"]))
            alpha = alpha_from_scale(s, suggested, rslora)
        collapsed = _stays(np.array(k99, dtype=object), lambda v: v == 1) if r > 1 else None
        per_step = [
            None if c is None else c / float(g) for c, g in zip(col("change"), gaps, strict=True)
        ]
        stalled = _stays(np.array(per_step, dtype=object), lambda v: v < stall_tol)
        out.append(
            ModuleDynamics(
                module=meta["name"],
                layer=meta.get("layer"),
                kind=meta.get("kind", "other"),
                family=meta.get("family", "lora"),
                update=meta.get("update", "full"),
                rank=width,
                nominal_rank=r,
                shape=(int(meta["d_out"]), int(meta["d_in"])),
                scale=float(meta["scale"]),
                i=i,
                threshold=float(threshold),
                steps=steps,
                singular_values=[
                    [_opt(float(x)) for x in row[:width]] for row in met["sigma"][:, m]
                ],
                fro=col("fro"),
                effective_rank=col("effective_rank"),
                stable_rank=col("stable_rank"),
                k50=col("k50"),
                k90=k90,
                k99=k99,
                phi_prev=[_opt(float(x)) for x in met["phi_prev"][:, m, i - 1]],
                grassmann_prev=col("grassmann_prev"),
                change=col("change"),
                amplification=col("amplification"),
                factor_steps=fsteps,
                phi_to_final=phi_final,
                grassmann_to_final=[_opt(float(x)) for x in dist_f[:, m]],
                settled_step=settled,
                k90_final=k90_final,
                k90_since=None if since is None else steps[since],
                suggested_rank=suggested,
                suggested_alpha=alpha,
                collapsed_since=None if collapsed is None else steps[collapsed],
                stalled_since=None if stalled is None else steps[stalled],
            )
        )
    return out


def rank_patterns(results: list[ModuleDynamics]) -> tuple[dict[str, int], dict[str, float]]:
    """PEFT ``rank_pattern`` and ``alpha_pattern`` from the rank advice of :func:`dynamics`
    (modules with a suggestion only)."""
    ranks = {d.module: d.suggested_rank for d in results if d.suggested_rank is not None}
    alphas = {
        d.module: d.suggested_alpha
        for d in results
        if d.suggested_rank is not None and d.suggested_alpha is not None
    }
    return ranks, alphas  # type: ignore[return-value]
