"""``scan``: read many adapters once each into a collection database, incrementally, in parallel.

**Discovery** (:func:`discover`). Each argument is a file (taken as it is), a directory, a glob
pattern (``**`` recurses), or ``@list.txt`` (one of those per line; blank lines and ``#``
comments skipped; relative paths are relative to the list file's folder). A directory is walked
recursively, hidden folders skipped, symbolic links to folders not followed: every *adapter
directory* in it is taken (one holding ``adapter_config.json``, or one that a directory layout
claims: mlx-lm ``adapters.safetensors``, diffusers ``pytorch_lora_weights.*``, torchtune
``adapter_model.pt``), its ``checkpoints/`` subfolders included, and every ``*.safetensors``,
``*.pt``, ``*.bin``, ``*.gguf`` or ``*.h5`` file that does not sit directly in an adapter
directory. The result is sorted and de-duplicated by resolved path.

**Content hash** (:func:`content_hash`): sha256 over the adapter's files in name order, each
file's name and size included: for a file, the file; for a directory, ``adapter_config.json``
and its weights files (the names the directory layouts read, ``adapter_model.*``,
``adapters.safetensors``, ``pytorch_lora_weights.*``, ``adapter_<N>.pt``; every weights-suffixed
file when none of those is there). Optimizer states and other files beside them do not count.

**Incremental.** An adapter whose files have the size, modification and change times and inode
recorded at its last scan is skipped without being read (``verify=True`` hashes it anyway;
time stamps younger than 2 s are never trusted); otherwise it is hashed, and skipped without
loading when the hash is the stored one. A new or changed adapter is read and its rows
replaced. A bad adapter (any :class:`~lorascope.errors.LoraScopeError` from reading it or from
a module's SVD) is stored with status ``error`` and its one-line message, and the scan goes on;
it is retried when its hash changes or with ``retry_errors=True``. Every adapter's rows are
committed in one transaction as its result arrives, so a killed scan keeps every adapter it
finished and resumes where it stopped.

**Engines.** :func:`scan_one` (one adapter's records; pure, picklable, never touches the
database) runs in-process (``workers=1``), in local worker processes
(``concurrent.futures.ProcessPoolExecutor``, spawn: a script must call :func:`scan` under
``if __name__ == "__main__":``; the default, one per CPU), or on a Dask
cluster (``scheduler=ADDRESS``, a ``distributed.Client``, or the environment variable
``LORASCOPE_DASK_SCHEDULER``; the workers must see the same paths). Each module's numbers come
from one-thread float64 kernels, so the database holds the same bytes whatever the engine
(``scanned_at`` aside); ids of new adapters are given in path order before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorascope import __version__
from lorascope.adapter import LoraModule
from lorascope.analysis._common import module_svd
from lorascope.analysis.rank import ENERGY_LADDER, RankRule, select_rank
from lorascope.analysis.spectrum import spectrum_values
from lorascope.collection import db as _db
from lorascope.errors import LoraScopeError
from lorascope.formats import load_adapter
from lorascope.formats._common import Probe
from lorascope.formats.layouts import LAYOUTS
from lorascope.linalg import default_rcond

__all__ = [
    "ENV_SCHEDULER",
    "SUFFIXES",
    "ScanOptions",
    "ScanSummary",
    "adapter_files",
    "content_hash",
    "discover",
    "is_adapter_dir",
    "scan",
    "scan_one",
]

log = logging.getLogger(__name__)

ENV_SCHEDULER = "LORASCOPE_DASK_SCHEDULER"
SUFFIXES = (".safetensors", ".pt", ".bin", ".gguf", ".h5")
CONFIG_FILE = "adapter_config.json"
# The weights files the directory layouts read (peft, mlx-lm, diffusers, torchtune).
_DIR_WEIGHTS = re.compile(
    r"^(adapter_model\.(safetensors|bin|pt)|adapter_\d+\.pt|adapters\.safetensors"
    r"|pytorch_lora_weights\.(safetensors|bin))$"
)
# A time stamp this young may not yet reflect a write in progress (coarse file-system clocks).
_RACY_SECONDS = 2.0
# The energy-rank columns of the modules table, from the shares every rank result lists.
_ENERGY_COLUMNS = {f"k{round(100 * e)}": e for e in ENERGY_LADDER}
_READ_OPTIONS = ("fmt", "alpha", "enable_lora", "fan_in_fan_out", "parts", "in_features")


# ----------------------------------------------------------------------------- discovery


def is_adapter_dir(path: Path) -> bool:
    """Whether ``path`` is one adapter: it holds ``adapter_config.json``, or a directory layout
    (mlx-lm, diffusers, torchtune) claims it."""
    if (path / CONFIG_FILE).is_file():
        return True
    probe = Probe(path, "dir")
    for layout in LAYOUTS:
        try:
            if layout.claims(probe):
                return True
        except (LoraScopeError, OSError):
            continue
    return False


def _walk(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        if is_adapter_dir(here):
            found.append(here)  # its files are its own; its subfolders are walked on
            continue
        found += [here / f for f in sorted(filenames) if Path(f).suffix.lower() in SUFFIXES]
    return found


def _expand(text: str, where: Path | None) -> list[Path]:
    path = Path(text).expanduser()
    if where is not None and not path.is_absolute():
        path = where / path
        text = str(path)
    if path.is_dir():
        return _walk(path)
    if path.exists():
        return [path]
    if any(c in text for c in "*?["):
        import glob

        matches = sorted(glob.glob(text, recursive=True))
        if not matches:
            raise LoraScopeError(f"{text}: the pattern matches nothing")
        return [p for m in matches for p in (_walk(Path(m)) if Path(m).is_dir() else [Path(m)])]
    raise LoraScopeError(f"{text}: no such file or directory")


def discover(paths: Iterable[str | Path]) -> list[str]:
    """The adapters named by ``paths`` (files, directories, globs, ``@list.txt``; see the module
    docstring): resolved absolute paths, sorted, without duplicates.

    Raises
    ------
    LoraScopeError
        A path that does not exist, a pattern that matches nothing, an unreadable list file,
        or no adapter at all.
    """
    found: dict[str, None] = {}
    given = [str(p) for p in paths]
    for text in given:
        if text.startswith("@"):
            listing = Path(text[1:]).expanduser()
            try:
                lines = listing.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise LoraScopeError(f"{listing}: cannot read the list: {e}") from None
            items = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
            where = listing.resolve().parent
            for item in items:
                for p in _expand(item, where):
                    found[str(p.resolve())] = None
        else:
            for p in _expand(text, None):
                found[str(p.resolve())] = None
    if not found:
        shown = ", ".join(given[:3]) + (", ..." if len(given) > 3 else "")
        raise LoraScopeError(f"no adapters found in {shown or 'no paths'}")
    return sorted(found)


# ----------------------------------------------------------------------------- content


def adapter_files(path: Path) -> list[Path]:
    """The files an adapter's content hash covers, in name order (see the module docstring)."""
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file())
    weights = [p for p in files if _DIR_WEIGHTS.match(p.name)]
    if not weights:
        weights = [p for p in files if p.suffix.lower() in SUFFIXES]
    return sorted([p for p in files if p.name == CONFIG_FILE] + weights, key=lambda p: p.name)


def content_hash(path: str | Path) -> tuple[str, int]:
    """``(sha256 hex digest, total bytes)`` of the adapter at ``path``: for each of
    :func:`adapter_files`, its name, a NUL, its size (8 bytes, little-endian), its bytes.

    Raises ``OSError`` when a file cannot be read."""
    h = hashlib.sha256()
    total = 0
    for p in adapter_files(Path(path)):
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h.update(p.name.encode("utf-8", "surrogateescape") + b"\0")
            h.update(size.to_bytes(8, "little"))
            while chunk := f.read(1 << 20):
                h.update(chunk)
                total += len(chunk)
    return h.hexdigest(), total


def file_stat(path: str | Path) -> str | None:
    """JSON ``[[name, size, mtime_ns, ctime_ns, inode], ...]`` of :func:`adapter_files`, or
    None when one cannot be read or was modified less than 2 s ago."""
    try:
        stats = [(p.name, p.stat()) for p in adapter_files(Path(path))]
    except OSError:
        return None
    now = time.time_ns()
    if any(now - s.st_mtime_ns < _RACY_SECONDS * 1e9 for _, s in stats):
        return None
    return json.dumps([[n, s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino] for n, s in stats])


# ----------------------------------------------------------------------------- one adapter


@dataclass(frozen=True)
class ScanOptions:
    """What :func:`scan_one` needs besides the path: ``top_k`` singular directions to keep per
    module (right ones, or ``directions="both"`` right and left), and the keyword options of
    :func:`lorascope.formats.load_adapter`."""

    top_k: int = 8
    read: dict[str, Any] = field(default_factory=dict)
    directions: str = "right"  # "right": V only; "both": V and U


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 1


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one intra-op thread inside the block (restored when the last user leaves):
    the same kernels, so the same bits, in every engine."""
    global _threads_users, _threads_saved
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)


def _module_record(m: LoraModule, top_k: int, directions: str = "right") -> dict[str, Any]:
    svd = module_svd(m)  # float64; (d_out, k), (k,), (d_in, k)
    S = svd.S.numpy()  # (k,)
    rcond = default_rcond(m.shape)
    v = spectrum_values(S, rcond)
    kd = min(top_k, int(S.size))
    return {
        "module": m.key,
        "layer": m.layer,
        "kind": m.kind,
        "family": m.family,
        "update": m.update,
        "d_out": m.d_out,
        "d_in": m.d_in,
        "rank": m.rank,
        "nominal_rank": m.r,
        "scale": float(m.scale),
        "alpha": None if m.alpha is None else float(m.alpha),
        "fro": v["frobenius_norm"],
        "spectral": v["spectral_norm"],
        "effective_rank": v["effective_rank"],
        "stable_rank": v["stable_rank"],
        "numerical_rank": v["numerical_rank"],
        **{
            c: select_rank(S, RankRule("energy", e), rcond=rcond)
            for c, e in _ENERGY_COLUMNS.items()
        },
        "sigma": np.asarray(S, dtype="<f8").tobytes(),
        "k_dirs": kd,
        "V": np.ascontiguousarray(svd.V[:, :kd].numpy(), dtype="<f4").tobytes(),  # (d_in, kd)
        "U": np.ascontiguousarray(svd.U[:, :kd].numpy(), dtype="<f4").tobytes()  # (d_out, kd)
        if directions == "both"
        else None,
    }


def _adapter_row(path: str, digest: str | None, nbytes: int | None, stat: str | None) -> dict:
    return {
        "path": path,
        "hash": digest,
        "bytes": nbytes,
        "format": None,
        "families": None,
        "base": None,
        "n_modules": None,
        "ranks": None,
        "status": "error",
        "error": None,
        "lorascope_version": __version__,
        "stat": stat,
    }


def _error(path: str, row: dict, message: str) -> dict[str, Any]:
    message = " ".join(message.split())
    if path not in message:
        message = f"{path}: {message}"
    row.update(status="error", error=message)
    return {"path": path, "unchanged": False, "adapter": row, "modules": []}


def scan_one(
    path: str, options: ScanOptions = ScanOptions(), known_hash: str | None = None
) -> dict[str, Any]:
    """Read one adapter and compute its records; never touches the database.

    Returns ``{"path", "unchanged": True, "hash", "stat"}`` when its content hash equals
    ``known_hash``, else ``{"path", "unchanged": False, "adapter": row, "modules": [rows]}``
    with the column values of the ``adapters`` and ``modules`` tables (blobs as bytes; see
    :mod:`lorascope.collection.db`). A :class:`~lorascope.errors.LoraScopeError` while reading
    or analysing becomes an ``error`` row with its one-line message; other exceptions propagate.
    """
    stat = file_stat(path)  # before reading: a write after this point changes it
    row = _adapter_row(path, None, None, stat)
    try:
        digest, nbytes = content_hash(path)
    except OSError as e:
        return _error(path, row, f"{e.filename or path}: cannot read: {e.strerror or e}")
    if known_hash is not None and digest == known_hash:
        return {"path": path, "unchanged": True, "hash": digest, "stat": stat}
    row.update(hash=digest, bytes=nbytes)
    try:
        with _one_thread():
            adapter = load_adapter(path, **options.read)
            modules = [
                _module_record(m, options.top_k, options.directions) for m in adapter.modules
            ]
    except LoraScopeError as e:
        return _error(path, row, str(e))
    base = adapter.config.get("base_model_name_or_path") if adapter.config else None
    row.update(
        format=adapter.format,
        families=adapter.families,
        base=base if isinstance(base, str) and base else None,
        n_modules=len(modules),
        ranks=sorted({m.r for m in adapter.modules}),
        status="ok",
    )
    return {"path": path, "unchanged": False, "adapter": row, "modules": modules}


# ----------------------------------------------------------------------------- engines


def _init_worker() -> None:
    torch.set_num_threads(1)


def _serial(tasks: Sequence[tuple[str, str | None]], options: ScanOptions) -> Iterator[dict]:
    for path, known in tasks:
        yield scan_one(path, options, known)


def _processes(
    tasks: Sequence[tuple[str, str | None]], options: ScanOptions, workers: int
) -> Iterator[dict]:
    import multiprocessing

    pending = iter(tasks)
    window = 4 * workers  # results in flight: memory stays bounded on any collection size
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
    ) as pool:
        running = {pool.submit(scan_one, p, options, k) for p, k in islice(pending, window)}
        try:
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        result = fut.result()
                    except BrokenProcessPool:
                        raise LoraScopeError(
                            "a scan worker process died (out of memory? or a script that calls "
                            "scan() outside `if __name__ == '__main__':`); the adapters finished "
                            "so far are saved, scan again to resume"
                        ) from None
                    nxt = next(pending, None)
                    if nxt is not None:
                        running.add(pool.submit(scan_one, nxt[0], options, nxt[1]))
                    yield result
        finally:
            for fut in running:
                fut.cancel()


def _dask(
    tasks: Sequence[tuple[str, str | None]], options: ScanOptions, scheduler: Any
) -> Iterator[dict]:
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise LoraScopeError(
            "the Dask engine needs dask.distributed: pip install 'lorascope[collection]'"
        ) from None
    own = not isinstance(scheduler, Client)
    if own:
        try:
            client = Client(scheduler)
        except (OSError, TimeoutError, ValueError) as e:
            raise LoraScopeError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from None
    else:
        client = scheduler
    try:
        pending = iter(tasks)
        window = max(8, 4 * sum(client.nthreads().values()))
        queue = as_completed()
        for p, k in islice(pending, window):
            queue.add(client.submit(scan_one, p, options, k, pure=False))
        for fut in queue:
            result = fut.result()
            fut.release()
            nxt = next(pending, None)
            if nxt is not None:
                queue.add(client.submit(scan_one, nxt[0], options, nxt[1], pure=False))
            yield result
    finally:
        if own:
            client.close()


# ----------------------------------------------------------------------------- the scan


@dataclass
class ScanSummary:
    """What a scan did.

    Attributes
    ----------
    adapters : int
        Adapters found in the paths.
    scanned : int
        Read this time (new, changed, or retried): ``ok`` or ``error``.
    skipped_unchanged : int
        Not read: the same files as at their last scan.
    errors : int
        Of the adapters found, those whose status is now ``error``.
    seconds : float
    engine : str
        ``serial``, ``N processes`` or ``dask <address>``.
    db : str
    new_errors : list of str
        The messages of the errors recorded by this scan.
    removed : int
        Adapters deleted from the database because their paths are gone (``prune``).
    """

    adapters: int
    scanned: int
    skipped_unchanged: int
    errors: int
    seconds: float
    engine: str
    db: str
    new_errors: list[str] = field(default_factory=list)
    removed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        return (
            f"{self.adapters} adapters: {self.scanned} scanned, {self.skipped_unchanged} "
            f"unchanged, {self.errors} errors"
            + (f", {self.removed} removed" if self.removed else "")
            + f"; {self.seconds:.1f} s ({self.engine}) -> {self.db}"
        )


def _read_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(_READ_OPTIONS))
    if unknown:
        raise TypeError(f"scan() got unexpected keyword arguments {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if key in ("enable_lora", "parts"):
            value = [bool(v) if key == "enable_lora" else str(v) for v in value]
        elif key == "in_features":
            value = {str(k): int(v) for k, v in dict(value).items()}
        out[key] = value
    return out


def _engine(workers: int | None, scheduler: Any) -> tuple[str, Any]:
    """``("serial", 1)``, ``("processes", N)`` or ``("dask", scheduler)``."""
    if workers is not None and scheduler is not None:
        raise LoraScopeError("give workers or a Dask scheduler, not both")
    if workers is not None and (isinstance(workers, bool) or int(workers) < 1):
        raise LoraScopeError(f"workers={workers!r} must be a positive integer")
    if workers is None and scheduler is None:
        scheduler = os.environ.get(ENV_SCHEDULER) or None
    if scheduler is not None:
        return "dask", scheduler
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        workers = workers or os.cpu_count() or 1
    workers = int(workers)
    return ("serial", 1) if workers <= 1 else ("processes", workers)


def scan(
    paths: Iterable[str | Path],
    db: str | Path,
    *,
    workers: int | None = None,
    scheduler: Any = None,
    top_k: int = 8,
    directions: str | None = None,
    retry_errors: bool = False,
    verify: bool = False,
    prune: bool = False,
    progress: bool = False,
    **read_options: Any,
) -> ScanSummary:
    """Scan the adapters under ``paths`` into the collection database ``db``.

    Parameters
    ----------
    paths : iterable of str or Path
        Files, directories, glob patterns, ``@list.txt`` (see :func:`discover`).
    db : str or Path
        The SQLite file; created when missing.
    workers : int, optional
        Local worker processes (1: in this process). Default: one per CPU, unless a Dask
        scheduler is given or set in ``LORASCOPE_DASK_SCHEDULER``.
    scheduler : str or distributed.Client, optional
        Run on this Dask cluster (an address such as ``tcp://host:8786``, or a client).
    top_k : int
        Singular directions kept per module; fixed per database.
    directions : {"right", "both"}, optional
        Store the top right singular vectors ``V`` (input side; what ``neighbors`` compares),
        or ``V`` and ``U``; fixed per database. Default: the database's setting, else
        ``"right"`` (``"both"`` doubles the database: 21 MiB per Llama-8B adapter with r = 16
        on q, v, o at ``top_k = 8``).
    retry_errors : bool
        Read again the adapters recorded as errors even when their files did not change.
    verify : bool
        Hash every adapter, even those whose files' size and times did not change.
    prune : bool
        Delete from the database the adapters (and their modules) whose paths no longer exist,
        wherever they were scanned from (by default they stay).
    progress : bool
        A progress bar on stderr.
    **read_options
        ``fmt``, ``alpha``, ``enable_lora``, ``fan_in_fan_out``, ``parts``, ``in_features`` of
        :func:`lorascope.formats.load_adapter`; fixed per database.

    Returns
    -------
    ScanSummary

    Raises
    ------
    LoraScopeError
        No adapters found, a database that cannot be written or is not a collection, settings
        that differ from the database's, an unreachable scheduler. Bad adapter files are not
        errors of the scan: they are recorded with status ``error``.
    """
    t0 = time.perf_counter()
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise LoraScopeError(f"top_k={top_k!r} must be a positive integer")
    if directions not in (None, "right", "both"):
        raise LoraScopeError(f"directions={directions!r}: choose right or both")
    read = _read_options(read_options)
    kind, how = _engine(workers, scheduler)
    found = discover(paths)
    conn = _db.connect(db, create=True)
    try:
        try:
            if directions is None:  # a database from before this setting stored both
                meta = _db.read_meta(conn)
                old = "both" if _db.next_id(conn) > 1 else "right"
                directions = meta.get("directions", old)
            settings = {"top_k": str(top_k), "read_options": json.dumps(read, sort_keys=True),
                        "directions": directions}  # fmt: skip
            _db.settle_meta(conn, db, settings)
            tasks, ids, skipped = _plan(conn, found, retry_errors=retry_errors, verify=verify)
        except sqlite3.Error as e:
            raise _db.db_error(db, e) from None
        options = ScanOptions(top_k=top_k, read=read, directions=directions)
        results, engine = _results(kind, how, tasks, options)
        scanned, new_errors = 0, []
        bar = _progress(len(tasks), progress)
        try:
            for result in results:
                path = result["path"]
                try:
                    if result["unchanged"]:
                        _db.update_stat(conn, ids[path], result["stat"])
                        skipped += 1
                    else:
                        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
                        _db.write_record(conn, ids[path], result, now)
                        scanned += 1
                        if result["adapter"]["status"] == "error":
                            new_errors.append(result["adapter"]["error"])
                except sqlite3.Error as e:
                    raise _db.db_error(db, e) from None
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            close = getattr(results, "close", None)
            if close is not None:
                close()
        removed = _prune(conn, db) if prune else 0
        bad = {p for (p,) in conn.execute("SELECT path FROM adapters WHERE status = 'error'")}
    finally:
        conn.close()
    return ScanSummary(
        adapters=len(found),
        scanned=scanned,
        skipped_unchanged=skipped,
        errors=len(bad.intersection(found)),
        seconds=time.perf_counter() - t0,
        engine=engine,
        db=str(db),
        new_errors=new_errors,
        removed=removed,
    )


def _prune(conn: sqlite3.Connection, db: str | Path) -> int:
    """Delete the adapters whose paths are gone, with their modules, in one transaction."""
    try:
        gone = [(i,) for i, p in conn.execute("SELECT id, path FROM adapters")
                if not os.path.lexists(p)]  # fmt: skip
        if gone:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("DELETE FROM modules WHERE adapter_id = ?", gone)
                conn.executemany("DELETE FROM adapters WHERE id = ?", gone)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
    except sqlite3.Error as e:
        raise _db.db_error(db, e) from None
    return len(gone)


def _plan(
    conn: sqlite3.Connection, found: Sequence[str], *, retry_errors: bool, verify: bool
) -> tuple[list[tuple[str, str | None]], dict[str, int], int]:
    """What to read: ``(path, known hash)`` tasks, every task's adapter id (new adapters get
    the next ids in path order), and the count skipped on their unchanged ``stat``."""
    known = _db.known_adapters(conn)
    tasks, ids, skipped = [], {}, 0
    next_id = _db.next_id(conn)
    for path in found:
        row = known.get(path)
        if row is None:
            tasks.append((path, None))
            ids[path], next_id = next_id, next_id + 1
            continue
        adapter_id, digest, status, stat = row
        retry = retry_errors and status == "error"
        if not retry and not verify and stat is not None and stat == file_stat(path):
            skipped += 1
            continue
        tasks.append((path, None if retry else digest))
        ids[path] = adapter_id
    return tasks, ids, skipped


def _results(
    kind: str, how: Any, tasks: Sequence[tuple[str, str | None]], options: ScanOptions
) -> tuple[Iterator[dict], str]:
    """The engine's stream of :func:`scan_one` results (completion order), and its name."""
    if kind == "processes":
        how = min(how, len(tasks))
    if not tasks or (kind == "processes" and how <= 1):
        kind = "serial"
    if kind == "serial":
        return _serial(tasks, options), "serial"
    if kind == "processes":
        return _processes(tasks, options, how), f"{how} processes"
    address = how if isinstance(how, str) else getattr(how.scheduler, "address", "client")
    return _dask(tasks, options, how), f"dask {address}"


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="adapter", file=sys.stderr, leave=False)
