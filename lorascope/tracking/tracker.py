"""Watch the update learn: snapshot every LoRA module's factors during training.

Every ``every`` optimizer steps, :meth:`Tracker.step` reads each adapted layer's factors and
the scale the forward pass applies (:mod:`lorascope.tracking.live`), never ``ΔW``, and records
from the exact factored SVD ``ΔW = s·B A = U diag(σ) Vᵀ`` (:func:`lorascope.linalg.factored_svd`,
float64, ``O((d_out + d_in)·r²)`` per module):

- σ, k at 50/90/99 % of ``‖ΔW‖_F²``, the effective and stable rank, ``‖ΔW‖_F``
  (Hu et al. 2021 §7.2: is ΔW low-rank, and does it stay so);
- φ(i, i) (eq. 4) of the top-i right singular vectors to the previous snapshot's, i = 1..k, and
  the Grassmann distance of the top-k subspaces; the relative change
  ``‖ΔW_t − ΔW_prev‖_F / ‖ΔW_t‖_F`` (from the stacked factors ``[B_t, −B_p]``,
  ``[s_t A_t; s_p A_p]``: exact, no cancellation);
- every ``amplify_every`` steps, when the frozen weight is a float matrix, ``‖Uᵀ W V‖_F`` and
  the amplification factor ``‖ΔW‖_F / ‖Uᵀ W V‖_F`` (§7.3, Table 7);
- every ``factors_every`` steps, the factors themselves, so that anything else can be
  recomputed; at :meth:`Tracker.close`, φ of every stored snapshot to the final update (the
  settling curve), then the advice of :func:`lorascope.tracking.dynamics.dynamics`.

The file is :mod:`lorascope.tracking.store`'s appendable HDF5, readable while the run writes it
and after a kill. The tracker never touches the model's parameters, gradients or random state:
a tracked run trains exactly like an untracked one.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import lorascope
from lorascope.adapter import LoraModule
from lorascope.analysis.rank import ENERGY_LADDER, RankRule, select_rank
from lorascope.analysis.spectrum import spectrum_values
from lorascope.errors import LoraScopeError
from lorascope.linalg import (
    default_rcond,
    factored_svd,
    factored_svdvals,
    phi_from_cross,
    principal_angles,
    projection_norm,
)
from lorascope.tracking.dynamics import dynamics, settling_curve
from lorascope.tracking.live import LiveModule, live_modules
from lorascope.tracking.store import SCALARS, VECTORS, RunWriter, now, read_run

__all__ = ["Tracker"]

log = logging.getLogger("lorascope.tracking")


class _Prev:
    """What the next snapshot of one module compares with: its right singular vectors and its
    scaled factors (float64, on the factors' device)."""

    __slots__ = ("B", "V", "sA", "step")

    def __init__(self, V: torch.Tensor, sA: torch.Tensor, B: torch.Tensor, step: int) -> None:
        self.V, self.sA, self.B, self.step = V, sA, B, step


def _measure(
    mod: LoraModule, prev: _Prev | None, W: torch.Tensor | None, step: int, K: int
) -> tuple[dict[str, Any], _Prev | None]:
    """One module's metrics at one snapshot (see the module docstring); NaN / -1: not
    measured. Returns the row values and the state the next snapshot compares with."""
    row: dict[str, Any] = {k: (-1 if dt == "i4" else math.nan) for k, dt in SCALARS.items()}
    row["sigma"] = np.full(K, math.nan)
    row["phi_prev"] = np.full(K, math.nan)
    A = mod.A.to(torch.float64)  # (k, d_in)
    B = mod.B.to(torch.float64)  # (d_out, k)
    svd = factored_svd(A, B, mod.scale)  # U (d_out, k), S (k,), V (d_in, k)
    S = svd.S.cpu().numpy()
    k = S.size
    row["sigma"][:k] = S
    if not (np.isfinite(S).all() and S[0] > 0):  # an all-zero ΔW (B still 0): nothing to compare
        row["fro"] = 0.0 if np.isfinite(S).all() else math.nan
        return row, None
    rcond = default_rcond(mod.shape)
    spec = spectrum_values(S, rcond)
    row["fro"] = spec["frobenius_norm"]
    row["effective_rank"] = spec["effective_rank"]
    row["stable_rank"] = spec["stable_rank"]
    for e in ENERGY_LADDER:
        row[f"k{round(e * 100)}"] = select_rank(S, RankRule("energy", e), rcond=rcond)
    sA = A * mod.scale  # (k, d_in): ΔW = B @ sA
    if prev is not None and prev.V.shape == svd.V.shape:
        M = prev.V.mT @ svd.V  # (k, d_in) @ (d_in, k) -> (k, k)
        row["phi_prev"][:k] = phi_from_cross(M).diagonal().cpu().numpy()
        row["grassmann_prev"] = float(principal_angles(prev.V, svd.V).square().sum().sqrt())
        diff = factored_svdvals(
            torch.cat([sA, prev.sA], 0), torch.cat([B, -prev.B], 1)
        )  # σ of ΔW_t − ΔW_prev, width 2k
        row["change"] = float(torch.linalg.vector_norm(diff)) / row["fro"]
    if W is not None:
        proj = projection_norm(W, svd.U, svd.V)  # ‖Uᵀ W V‖_F over the top-k
        row["projection"] = proj
        row["amplification"] = row["fro"] / proj if proj > 0 else math.nan
    return row, _Prev(svd.V, sA, B, step)


class Tracker:
    """Record the spectra of a model's LoRA updates during training (see the module docstring).

    Parameters
    ----------
    path : path-like
        The tracking file to write (HDF5). It must not exist unless ``overwrite``.
    every : int
        Snapshot when ``step % every == 0``.
    amplify_every : int, optional
        Compute ``‖Uᵀ W V‖_F`` and the amplification every so many steps (a multiple of
        ``every``); default ``every``; 0: never. Costs ``O(d_out·d_in·k)`` per module.
    factors_every : int, optional
        Store the factors every so many steps (a multiple of ``every``); default ``every``.
        The settling curve uses these snapshots. Each costs ``4·Σ(d_out + d_in)·k`` bytes
        (float32 factors).
    config : mapping, optional
        The run's configuration, stored as JSON in the file.
    tensorboard : str, path or SummaryWriter, optional
        Also write scalars (``lorascope/<module>/sigma1``, ``k90``, ``phi_prev``, ``fro``,
        ``effective_rank``, ``amplification``) there; needs ``torch.utils.tensorboard``.
    overwrite : bool
        Replace an existing file at ``path``.
    stall_tol : float
        Warn when a module's relative change per step falls below this.
    use_rslora : bool
        How the rank advice turns a scale into an ``alpha_pattern`` (``|s|·k`` or ``|s|·√k``).

    Examples
    --------
    >>> tracker = Tracker("run/tracking.h5", every=10)      # doctest: +SKIP
    >>> for step in range(1, n_steps + 1):                  # doctest: +SKIP
    ...     train_one_step(model)
    ...     tracker.step(model, step)
    >>> tracker.close()                                     # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike,
        every: int = 10,
        *,
        amplify_every: int | None = None,
        factors_every: int | None = None,
        config: Mapping[str, Any] | None = None,
        tensorboard: Any = None,
        overwrite: bool = False,
        stall_tol: float = 1e-5,
        use_rslora: bool = False,
    ) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise LoraScopeError(f"{self.path}: exists; pass overwrite=True to replace it")
        amplify_every = every if amplify_every is None else amplify_every
        factors_every = every if factors_every is None else factors_every
        for name, v in (
            ("every", every),
            ("amplify_every", amplify_every),
            ("factors_every", factors_every),
        ):
            if (
                isinstance(v, bool)
                or not isinstance(v, int)
                or v < 0
                or (name == "every" and v < 1)
            ):
                raise LoraScopeError(f"tracking: {name} must be a positive integer, got {v!r}")
            if name != "every" and v % every:
                raise LoraScopeError(f"tracking: {name}={v} is not a multiple of every={every}")
        self.every, self.amplify_every, self.factors_every = every, amplify_every, factors_every
        self.config = dict(config or {})
        self.overwrite = overwrite
        self.stall_tol = float(stall_tol)
        self.use_rslora = bool(use_rslora)
        self._tb = _summary_writer(tensorboard)
        self._writer: RunWriter | None = None
        self._live: list[LiveModule] = []
        self._prev: list[_Prev | None] = []
        self._ranks: list[int] = []
        self._last_step = -1
        self._warned: set[tuple[str, str]] = set()
        self.closed = False
        self.seconds = 0.0  # total time spent in step() and close()

    # -------------------------------------------------------------------------------- setup

    def _start(self, model: nn.Module, mods: list[LoraModule]) -> None:
        metas, dtypes = [], []
        for lm, m in zip(self._live, mods, strict=True):
            W = lm.base_weight()
            metas.append(
                {
                    "name": m.key,
                    "layer": m.layer,
                    "kind": m.kind,
                    "family": m.family,
                    "update": m.update,
                    "d_out": m.d_out,
                    "d_in": m.d_in,
                    "rank": m.rank,
                    "nominal_rank": m.r,
                    "scale": float(m.scale),
                    "alpha": m.alpha,
                    "w_norm": None if W is None else float(torch.linalg.matrix_norm(W.double())),
                }
            )
            dtypes.append(np.float64 if m.A.dtype == torch.float64 else np.float32)
        attrs = {
            "config": self.config,
            "every": self.every,
            "amplify_every": self.amplify_every,
            "factors_every": self.factors_every,
            "use_rslora": self.use_rslora,
            "created": now(),
            "lorascope_version": lorascope.__version__,
            "model": type(model).__name__,
        }
        self._writer = RunWriter(self.path, metas, dtypes, attrs, overwrite=self.overwrite)
        self._prev = [None] * len(mods)
        self._ranks = [m.rank for m in mods]
        per = sum(
            (m.d_in + m.d_out) * m.rank * (8 if d == np.float64 else 4)
            for m, d in zip(mods, dtypes, strict=True)
        )
        log.info(
            "tracking %d LoRA modules every %d steps into %s (%s of factors per stored snapshot)",
            len(mods),
            self.every,
            self.path,
            _bytes(per),
        )

    # --------------------------------------------------------------------------------- step

    def step(
        self, model: nn.Module, step: int, *, loss: float | None = None, force: bool = False
    ) -> bool:
        """Snapshot ``model`` at optimizer step ``step`` if ``step % every == 0`` (or
        ``force``). Returns whether a snapshot was written. Steps must increase; a repeated
        or earlier step is ignored."""
        if self.closed:
            raise LoraScopeError(f"{self.path}: the tracker is closed")
        step = int(step)
        if step <= self._last_step or not (force or step % self.every == 0):
            return False
        store = self.factors_every > 0 and step % self.factors_every == 0
        return self._snapshot(model, step, loss, store)

    @torch.no_grad()
    def _snapshot(self, model: nn.Module, step: int, loss: float | None, store: bool) -> bool:
        t0 = time.perf_counter()
        if self._writer is None:
            self._live = live_modules(model)
        mods: list[LoraModule | None] = []
        for lm in self._live:
            try:
                mods.append(lm.module())
            except LoraScopeError as e:  # NaN factors: record nothing for it, keep training
                self._warn(lm.name, "read", f"step {step}: {lm.name} not measured: {e}")
                mods.append(None)
        if self._writer is None:
            if any(m is None for m in mods):
                return False  # wait for a snapshot that can size every module
            self._start(model, mods)  # type: ignore[arg-type]
        writer = self._writer
        assert writer is not None
        amplify = self.amplify_every > 0 and step % self.amplify_every == 0
        rows = []
        for i, (lm, m) in enumerate(zip(self._live, mods, strict=True)):
            if m is None:
                row, self._prev[i] = _unmeasured(writer.K), None
            else:
                W = lm.base_weight() if amplify else None
                if W is not None and W.shape != m.shape:
                    W = None
                row, self._prev[i] = _measure(m, self._prev[i], W, step, writer.K)
            rows.append(row)
        metrics = {k: np.array([r[k] for r in rows]) for k in (*SCALARS, *VECTORS)}
        stored = [_stored(m, writer, i) for i, m in enumerate(mods)] if store else None
        writer.append(step, metrics, stored, time.perf_counter() - t0, loss)
        t1 = time.perf_counter()
        self._advise(step, rows)
        if self._tb is not None:
            self._scalars(step, rows)
        writer.add_seconds(time.perf_counter() - t1)
        self.seconds += time.perf_counter() - t0
        self._last_step = step
        return True

    def log_loss(self, step: int, loss: float) -> None:
        """Record the training loss of step ``step`` when it is the last snapshot written (for
        callers that learn a step's loss only after snapshotting it); otherwise do nothing."""
        if self._writer is not None and not self.closed and int(step) == self._last_step:
            self._writer.set_loss(loss)

    def _warn(self, name: str, what: str, msg: str) -> None:
        if (name, what) not in self._warned:
            self._warned.add((name, what))
            log.warning(msg)

    def _advise(self, step: int, rows: list[dict]) -> None:
        """Warn once per module when ΔW collapses onto one direction or stops moving."""
        for lm, row, prev, r in zip(self._live, rows, self._prev, self._ranks, strict=True):
            if int(row["k99"]) == 1 and r > 1:
                self._warn(
                    lm.name,
                    "collapse",
                    f"step {step}: {lm.name}: ΔW has collapsed to rank one (99 % of "
                    "‖ΔW‖_F² in its top direction)",
                )
            change = row["change"]
            if prev is not None and math.isfinite(change):
                gap = max(1, step - self._last_step)
                if change / gap < self.stall_tol:
                    self._warn(
                        lm.name,
                        "stall",
                        f"step {step}: {lm.name}: ΔW has stopped moving (relative change "
                        f"{change / gap:.1e} per step < {self.stall_tol:g})",
                    )

    def _scalars(self, step: int, rows: list[dict]) -> None:
        tb = self._tb
        for lm, row, r in zip(self._live, rows, self._ranks, strict=True):
            tag = f"lorascope/{lm.name}"
            values = {
                "sigma1": row["sigma"][0],
                "k90": row["k90"],
                "fro": row["fro"],
                "effective_rank": row["effective_rank"],
                "phi_prev": row["phi_prev"][r - 1],
                "amplification": row["amplification"],
            }
            for key, v in values.items():
                v = float(v)
                if math.isfinite(v) and v >= 0:
                    tb.add_scalar(f"{tag}/{key}", v, step)
        tb.flush()

    # -------------------------------------------------------------------------------- close

    def close(self, model: nn.Module | None = None, step: int | None = None):
        """End the run: snapshot ``model`` at ``step`` if given and not yet recorded (with its
        factors), write the settling curve (φ of every stored snapshot to the last one), log
        the advice, close the file. Returns the per-module
        :class:`~lorascope.tracking.dynamics.ModuleDynamics` (``None`` when nothing was
        recorded). Safe to call twice."""
        if self.closed:
            return None
        t0 = time.perf_counter()
        if model is not None and step is not None and int(step) > self._last_step:
            self._snapshot(model, int(step), None, store=True)  # the final one keeps factors
        self.closed = True
        writer = self._writer
        if self._tb is not None:
            self._tb.close()
        if writer is None:
            return None
        try:
            writer.f.flush()
            run = read_run(self.path)
            if len(run.factor_steps):
                run.phi_final, run.grassmann_final = settling_curve(run)
                writer.write_settle(run.phi_final, run.grassmann_final)
        finally:
            writer.close()
        result = dynamics(run)
        for d in result:
            for line in d.advice():
                log.info(line)
        self.seconds += time.perf_counter() - t0
        return result

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unmeasured(K: int) -> dict[str, Any]:
    row: dict[str, Any] = {k: (-1 if dt == "i4" else math.nan) for k, dt in SCALARS.items()}
    row["sigma"] = np.full(K, math.nan)
    row["phi_prev"] = np.full(K, math.nan)
    return row


def _stored(m: LoraModule | None, writer: RunWriter, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Module ``i``'s factors as the file stores them (bf16/fp16 -> float32 is exact)."""
    dA, dB = writer.ds[f"factors/{i:03d}/A"], writer.ds[f"factors/{i:03d}/B"]
    dt = dA.dtype
    if m is None:  # a module that could not be read at this snapshot: NaN factors
        return np.full(dA.shape[1:], np.nan, dt), np.full(dB.shape[1:], np.nan, dt)
    to = torch.float64 if dt == np.float64 else torch.float32
    return m.A.to("cpu", to).numpy(), m.B.to("cpu", to).numpy()


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _summary_writer(tensorboard: Any):
    if tensorboard is None or tensorboard is False:
        return None
    if hasattr(tensorboard, "add_scalar"):
        return tensorboard
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise LoraScopeError(
            f"tracking: TensorBoard scalars need the tensorboard package ({e}); "
            "pip install tensorboard, or leave tensorboard unset"
        ) from None
    return SummaryWriter(str(tensorboard))
