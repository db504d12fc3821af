"""The tracking file: an appendable HDF5 file, readable at every instant of its writing.

Why HDF5, and how a killed run stays readable
---------------------------------------------
A run's snapshots are arrays (singular values, factors) that grow by one row per snapshot, and
the project already reads and writes HDF5 (``results.h5``, adapter files). The writer uses
HDF5's single-writer/multiple-reader mode (SWMR, ``libver="latest"``): every dataset is created
before the first row is written, rows are only appended, and the library orders its metadata
writes so that a reader opened with ``swmr=True`` sees a consistent file *at every instant* of
the writing. A process killed mid-write (SIGKILL, OOM, preemption) leaves exactly such an
instant behind, so the file opens and holds every snapshot completed before it (the datasets may
differ in length by the snapshot being written; readers keep the common prefix). The same mode
lets ``lorascope dynamics`` read a file while its run is still training. The file appears under
its name only once its layout is complete (written beside it, then renamed).

Layout (``format = "lorascope-tracking"``, ``version = 1``)
------------------------------------------------------------
Root attributes: ``config`` (JSON: the run's configuration as the caller gave it), ``modules``
(JSON list: ``name, layer, kind, family, update, d_out, d_in, rank, nominal_rank, scale, alpha,
w_norm``), ``every``, ``amplify_every``, ``factors_every``, ``created``, ``lorascope_version``.
With ``n`` snapshots, ``M`` modules, ``K`` the largest width ``k`` (rows past a module's own
``k`` are NaN):

========================  ===============  ==================================================
``steps``                 ``(n,)`` int64   optimizer step of each snapshot (written last)
``seconds``               ``(n,)``         time the tracker spent on the snapshot
``loss``                  ``(n,)``         training loss the caller passed (NaN: none)
``metrics/sigma``         ``(n, M, K)``    σ of ``ΔW = s·B A`` (DoRA: the direction part)
``metrics/fro``           ``(n, M)``       ``‖ΔW‖_F``
``metrics/effective_rank``  ``(n, M)``     ``exp(entropy of σ/Σσ)``
``metrics/stable_rank``   ``(n, M)``       ``‖ΔW‖_F² / σ_1²``
``metrics/k50|k90|k99``   ``(n, M)`` int   smallest k holding 50/90/99 % of ``‖ΔW‖_F²`` (-1: none)
``metrics/phi_prev``      ``(n, M, K)``    φ(i, i) of ΔW's top-i right singular vectors to the
                                           previous snapshot's, i = 1..k (NaN at the first)
``metrics/grassmann_prev``  ``(n, M)``     Grassmann distance of the top-k subspaces to the
                                           previous snapshot's
``metrics/change``        ``(n, M)``       ``‖ΔW_t − ΔW_prev‖_F / ‖ΔW_t‖_F``
``metrics/projection``    ``(n, M)``       ``‖Uᵀ W V‖_F`` (top-k of ΔW; NaN when not computed)
``metrics/amplification`` ``(n, M)``       ``‖ΔW‖_F / ‖Uᵀ W V‖_F`` (Hu et al. 2021 §7.3)
``factor_steps``          ``(f,)`` int64   the steps whose factors are stored
``factors/NNN/A``, ``B``  ``(f, k, d_in)``, ``(f, d_out, k)``: module NNN's factors as trained
                          (float32, or float64 when trained in float64), scale in ``modules``
``settle/phi_final``      ``(f, M, K)``    φ(i, i) of each factor snapshot to the last one
``settle/grassmann_final`` ``(f, M)``      written when the run ends, then ``settle/done``
                                           ``(1,)`` = f (absent: the run was killed)
========================  ===============  ==================================================

NaN in a metric means "not measured" (an all-zero ΔW, the first snapshot, a step without
amplification); readers turn it into ``None``, never into a number in a table.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorascope._files import commit, sibling
from lorascope.errors import FormatError

__all__ = ["FORMAT", "VERSION", "RunWriter", "Run", "read_run", "SCALARS"]

FORMAT = "lorascope-tracking"
VERSION = 1
# per-(snapshot, module) scalar metrics and their dtypes
SCALARS: dict[str, str] = {
    "fro": "f8",
    "effective_rank": "f8",
    "stable_rank": "f8",
    "k50": "i4",
    "k90": "i4",
    "k99": "i4",
    "grassmann_prev": "f8",
    "change": "f8",
    "projection": "f8",
    "amplification": "f8",
}
VECTORS = ("sigma", "phi_prev")  # (n, M, K)


def _h5py():
    import h5py

    return h5py


class RunWriter:
    """Appends snapshots to a tracking file (see the module docstring for the layout).

    Parameters
    ----------
    path : path-like
        The file to create. It must not exist unless ``overwrite``.
    modules : list of dict
        One entry per module (keys of the ``modules`` attribute); ``rank`` sizes the rows.
    factor_dtypes : list of numpy dtypes
        The dtype each module's factors are stored in.
    attrs : dict
        Root attributes (``config`` as a dict, ``every``, ...).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        modules: list[dict],
        factor_dtypes: list[np.dtype],
        attrs: dict[str, Any],
        *,
        overwrite: bool = False,
    ) -> None:
        h5py = _h5py()
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FormatError(f"{self.path}: exists; tracking will not overwrite it")
        self.M = len(modules)
        self.K = max(int(m["rank"]) for m in modules)
        tmp = sibling(self.path)  # the file is laid out here, then renamed into place
        f = h5py.File(tmp, "w", libver="latest")
        try:
            f.attrs["format"] = FORMAT
            f.attrs["version"] = VERSION
            for k, v in attrs.items():
                f.attrs[k] = json.dumps(v) if isinstance(v, dict | list) else v
            f.attrs["modules"] = json.dumps(modules)
            M, K = self.M, self.K
            grow = dict(maxshape=(None,), chunks=(256,))
            f.create_dataset("steps", (0,), dtype="i8", **grow)
            f.create_dataset("seconds", (0,), dtype="f8", **grow)
            f.create_dataset("loss", (0,), dtype="f8", **grow)
            f.create_dataset("factor_steps", (0,), dtype="i8", **grow)
            g = f.create_group("metrics")
            for name, dt in SCALARS.items():
                g.create_dataset(name, (0, M), dtype=dt, maxshape=(None, M), chunks=(64, M))
            for name in VECTORS:
                g.create_dataset(
                    name, (0, M, K), dtype="f8", maxshape=(None, M, K), chunks=(16, M, K)
                )
            fac = f.create_group("factors")
            for i, (m, dt) in enumerate(zip(modules, factor_dtypes, strict=True)):
                k, d_in, d_out = int(m["rank"]), int(m["d_in"]), int(m["d_out"])
                sub = fac.create_group(f"{i:03d}")
                sub.create_dataset(
                    "A", (0, k, d_in), dtype=dt, maxshape=(None, k, d_in), chunks=(1, k, d_in)
                )
                sub.create_dataset(
                    "B", (0, d_out, k), dtype=dt, maxshape=(None, d_out, k), chunks=(1, d_out, k)
                )
            s = f.create_group("settle")
            s.create_dataset(
                "phi_final", (0, M, K), dtype="f8", maxshape=(None, M, K), chunks=(16, M, K)
            )
            s.create_dataset(
                "grassmann_final", (0, M), dtype="f8", maxshape=(None, M), chunks=(64, M)
            )
            s.create_dataset("done", (0,), dtype="i8", maxshape=(None,), chunks=(16,))
            f.flush()
            f.swmr_mode = True  # from here on, readers see a consistent file at every instant
            commit(tmp, self.path)  # still open: the writer goes on appending to it
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise
        self.f = f
        self.n = 0
        self.n_factors = 0
        # open dataset handles once: a lookup by path costs more than the append itself
        self.ds: dict[str, Any] = {}

        def keep(name: str, obj: Any) -> None:  # visititems stops at a non-None return
            if hasattr(obj, "shape"):
                self.ds[name] = obj

        f.visititems(keep)

    @staticmethod
    def _append(ds, value) -> None:
        n = ds.shape[0]
        ds.resize(n + 1, axis=0)
        ds[n] = value

    def append(
        self,
        step: int,
        metrics: dict[str, np.ndarray],
        factors: list[tuple[np.ndarray, np.ndarray]] | None,
        seconds: float,
        loss: float | None,
    ) -> None:
        """One snapshot: ``metrics[name]`` is ``(M,)`` for :data:`SCALARS`, ``(M, K)`` for
        ``sigma``/``phi_prev``; ``factors`` one ``(A, B)`` per module, or ``None``.
        The metrics and factors are flushed first, then ``steps`` is written last and flushed
        again: HDF5 may write dirty metadata (a dataset's new extent) in any order between two
        flushes, so without the first one a run killed mid-append could leave ``steps`` one
        snapshot ahead of ``factor_steps`` (seen once in CI)."""
        ds = self.ds
        for name in (*SCALARS, *VECTORS):
            self._append(ds[f"metrics/{name}"], metrics[name])
        if factors is not None:
            for i, (A, B) in enumerate(factors):
                self._append(ds[f"factors/{i:03d}/A"], A)
                self._append(ds[f"factors/{i:03d}/B"], B)
            self._append(ds["factor_steps"], step)
            self.n_factors += 1
        self.f.flush()
        self._append(ds["seconds"], seconds)
        self._append(ds["loss"], np.nan if loss is None else float(loss))
        self._append(ds["steps"], step)
        self.f.flush()
        self.n += 1

    def add_seconds(self, seconds: float) -> None:
        """Add time spent after the snapshot was written (its TensorBoard scalars, its log)."""
        if self.n:
            ds = self.f["seconds"]
            ds[self.n - 1] = ds[self.n - 1] + seconds

    def set_loss(self, loss: float) -> None:
        """Set the last snapshot's training loss (known only after the snapshot, e.g. when a
        ``Trainer`` logs it after the step's callbacks)."""
        if self.n:
            self.f["loss"][self.n - 1] = float(loss)
            self.f.flush()

    def write_settle(self, phi_final: np.ndarray, grassmann_final: np.ndarray) -> None:
        """The settling curve, ``(f, M, K)`` and ``(f, M)``, when the run ends."""
        s = self.f["settle"]
        s["phi_final"].resize(phi_final.shape[0], axis=0)
        s["phi_final"][:] = phi_final
        s["grassmann_final"].resize(grassmann_final.shape[0], axis=0)
        s["grassmann_final"][:] = grassmann_final
        self.f.flush()  # the values first, then the marker that they are complete
        self._append(s["done"], phi_final.shape[0])
        self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


@dataclass
class Run:
    """A tracking file read back: every array cut to the snapshots all datasets hold.

    Attributes
    ----------
    path : Path
    config : dict
        The run's configuration as its writer gave it.
    modules : list of dict
        ``name, layer, kind, family, update, d_out, d_in, rank, nominal_rank, scale, alpha,
        w_norm`` per module (``layer`` None for no block index).
    steps, seconds, loss : np.ndarray
        ``(n,)``.
    metrics : dict of np.ndarray
        ``(n, M)`` / ``(n, M, K)`` as in the layout table (NaN: not measured).
    factor_steps : np.ndarray
        ``(f,)`` steps with stored factors.
    phi_final, grassmann_final : np.ndarray or None
        ``(f, M, K)`` and ``(f, M)`` when the run ended normally; ``None`` for a run killed
        before its end (:func:`lorascope.tracking.dynamics` then computes them).
    attrs : dict
        The other root attributes (``every``, ``amplify_every``, ...).
    """

    path: Path
    config: dict
    modules: list[dict]
    steps: np.ndarray
    seconds: np.ndarray
    loss: np.ndarray
    metrics: dict[str, np.ndarray]
    factor_steps: np.ndarray
    phi_final: np.ndarray | None
    grassmann_final: np.ndarray | None
    attrs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.steps.shape[0])

    @property
    def names(self) -> list[str]:
        return [m["name"] for m in self.modules]

    def factors(self, module: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """``(A (k, d_in), B (d_out, k))`` of module index ``module`` at factor snapshot ``t``
        (``factor_steps[t]``), as stored; ``ΔW = modules[module]["scale"] · B @ A``."""
        if not 0 <= t < len(self.factor_steps):
            raise IndexError(f"{self.path}: factor snapshot {t} of {len(self.factor_steps)}")
        with _open(self.path) as f:
            g = f["factors"][f"{module:03d}"]
            return np.asarray(g["A"][t]), np.asarray(g["B"][t])


def _check_length(path: Path) -> None:
    """A file shorter than the end-of-file address its superblock records was cut off (a
    partial copy or download). HDF5's SWMR reader does not check this and retries every
    metadata read that fails its checksum, backing off for up to an hour, so it is checked
    here: superblock version >= 2 at offset 0 (the tracker's files), 8-byte addresses."""
    with open(path, "rb") as fh:
        head = fh.read(36)
    if len(head) == 36 and head[:8] == b"\x89HDF\r\n\x1a\n" and head[8] >= 2 and head[9] == 8:
        stored = int.from_bytes(head[28:36], "little")
        size = path.stat().st_size
        if stored > size:
            raise FormatError(f"{path}: truncated tracking file ({size} of {stored} bytes)")


def _open(path: Path):
    h5py = _h5py()
    _check_length(path)
    try:
        return h5py.File(path, "r", libver="latest", swmr=True)
    except (OSError, ValueError, RuntimeError) as e:  # h5py: RuntimeError for some cut files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"{path}: not a readable tracking file ({msg})") from None


def read_run(path: str | os.PathLike) -> Run:
    """Read a tracking file written by :class:`lorascope.tracking.Tracker` (also while its
    run is still writing it, or after the run was killed: see the module docstring).

    Raises
    ------
    FormatError
        Not an HDF5 file, not a lorascope tracking file, a newer version, or a malformed layout.
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such tracking file")
    with _open(path) as f:
        try:
            if f.attrs.get("format") != FORMAT:
                raise FormatError(f"{path}: not a lorascope tracking file (no format={FORMAT})")
            version = int(f.attrs.get("version", -1))
            if version != VERSION:
                raise FormatError(
                    f"{path}: tracking file version {version}; this lorascope reads {VERSION}"
                )
            modules = json.loads(f.attrs["modules"])
            config = json.loads(f.attrs.get("config", "{}"))
            attrs = {
                k: (v.item() if hasattr(v, "item") else v)
                for k, v in f.attrs.items()
                if k not in ("modules", "config", "format", "version")
            }
            names = [f"metrics/{k}" for k in (*SCALARS, *VECTORS)] + ["seconds", "loss"]
            n = min(f["steps"].shape[0], *(f[k].shape[0] for k in names))
            fac = f["factors"]
            nf = min(
                [f["factor_steps"].shape[0]] + [fac[g][x].shape[0] for g in fac for x in ("A", "B")]
            )
            factor_steps = np.asarray(f["factor_steps"][:nf], dtype=np.int64)
            steps = np.asarray(f["steps"][:n], dtype=np.int64)
            factor_steps = factor_steps[np.isin(factor_steps, steps)]
            nf = len(factor_steps)
            metrics = {k: np.asarray(f["metrics"][k][:n]) for k in (*SCALARS, *VECTORS)}
            pf, gf = f["settle"]["phi_final"], f["settle"]["grassmann_final"]
            done = f["settle"]["done"]
            complete = (
                nf > 0 and done.shape[0] > 0 and int(done[-1]) == nf == pf.shape[0] == gf.shape[0]
            )
            run = Run(
                path=path,
                config=config,
                modules=modules,
                steps=steps,
                seconds=np.asarray(f["seconds"][:n]),
                loss=np.asarray(f["loss"][:n]),
                metrics=metrics,
                factor_steps=factor_steps,
                phi_final=np.asarray(pf[:nf]) if complete else None,
                grassmann_final=np.asarray(gf[:nf]) if complete else None,
                attrs=attrs,
            )
        except FormatError:
            raise
        except (KeyError, ValueError, TypeError, OSError, RuntimeError) as e:
            raise FormatError(f"{path}: malformed tracking file ({e})") from None
    if len(modules) != run.metrics["fro"].shape[1]:
        raise FormatError(f"{path}: malformed tracking file (modules do not match metrics)")
    return run


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
