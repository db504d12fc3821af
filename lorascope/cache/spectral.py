"""A persistent cache of base weights' spectral data, keyed by content.

Table 7's W-top-r column, Figure 8's top-64 directions of ``W`` and the full SVD the intruder
definition needs depend on the base weight alone, yet each adapter analysed against a base paid
for them again (issue 15). Entries live in the user cache directory:

- ``$LORASCOPE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/lorascope``, else
  ``~/.cache/lorascope``; below it ``spectral-v1/<2 hex>/<key>.<kind>.safetensors``, the kind
  ``top`` (iterative top-k), ``exact`` (exact top-k) or ``full`` (every triplet);
- one safetensors file per entry: ``U`` ``(m, k)``, ``S`` ``(k,)``, ``V`` ``(n, k)`` in float64,
  and in its metadata how they were computed (exact, or the tolerances and the achieved
  bounds of :class:`lorascope.linalg.TopSVDInfo`);
- the key is a BLAKE2 digest of the tensor's shape and dtype, a sample of its rows (32 evenly
  spaced rows, read from the tensor itself), and its *source* when the reader knows one
  (:meth:`lorascope.formats.BaseWeights.fingerprint`: the safetensors header digest, the tensor
  name, dtype and shape); a tensor of unknown source is hashed whole. Two adapters of one base
  share every entry; a different weight (another checkpoint, a merged model) never hits;
- a top-``k`` entry serves any request for ``k' <= k`` triplets at the same or a looser
  tolerance; a full SVD serves every request; anything else is computed (and stored);
- writers write a temporary file beside the entry and rename it into place (atomic on POSIX),
  so concurrent processes never see half an entry; a reader that meets a corrupt or truncated
  file anyway deletes it and recomputes;
- a size cap (``max_bytes``, default ``$LORASCOPE_CACHE_MAX_BYTES`` or 20 GB): after a write
  the least recently used entries (by modification time, bumped on every hit) are removed
  until the cache fits.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from lorascope._files import save_safetensors
from lorascope.linalg import SVD, TOP_PROVIDER, WEIGHT_MEMO, TopSVDInfo, top_singular

__all__ = ["SpectralCache", "default_cache_dir", "DEFAULT_MAX_BYTES"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 20 << 30
_VERSION = "spectral-v1"
_SAMPLE_ROWS = 32
_MEMORY_BYTES = 256 << 20  # this run's entries kept in memory (the latest one always)


def default_cache_dir() -> Path:
    """``$LORASCOPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/lorascope``, else ``~/.cache/lorascope``."""
    explicit = os.environ.get("LORASCOPE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lorascope"


def _default_max_bytes() -> int:
    raw = os.environ.get("LORASCOPE_CACHE_MAX_BYTES")
    try:
        return int(float(raw)) if raw else DEFAULT_MAX_BYTES
    except ValueError:
        log.warning("LORASCOPE_CACHE_MAX_BYTES=%r is not a number; using the default", raw)
        return DEFAULT_MAX_BYTES


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` as stored (row-major), for hashing."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _spread(n: int) -> list[int]:
    """Up to ``_SAMPLE_ROWS`` evenly spaced indices of ``range(n)``, first and last included."""
    return sorted({round(i * (n - 1) / (_SAMPLE_ROWS - 1)) for i in range(_SAMPLE_ROWS)})


class SpectralCache:
    """Top singular triplets and full SVDs of base weights, on disk, keyed by content.

    Parameters
    ----------
    directory : path, optional
        Where entries live (default :func:`default_cache_dir`).
    max_bytes : int, optional
        Size cap of the entries (default ``$LORASCOPE_CACHE_MAX_BYTES`` or 20 GB); the least
        recently used go first.
    enabled : bool
        False: nothing is read or written (``--no-cache``), but :meth:`active` still shares
        the triplets of one weight within the run (a report's adapters of one base).

    Attributes
    ----------
    hits, misses, writes : int
        Lookups served from disk (or from this run's memory), computed, and entries written.

    Examples
    --------
    >>> import torch
    >>> from lorascope.linalg import top_singular
    >>> cache = SpectralCache(enabled=False)  # this run only; the default also keeps them on disk
    >>> W = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    >>> with cache.active():
    ...     first = top_singular(W, 2).S      # computed and stored
    ...     again = top_singular(W, 1).S      # served from the top-2 entry
    >>> (cache.misses, cache.hits, again.tolist())
    (1, 1, [3.0])
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        max_bytes: int | None = None,
        enabled: bool = True,
    ) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.max_bytes = _default_max_bytes() if max_bytes is None else int(max_bytes)
        self.enabled = enabled
        self.hits = self.misses = self.writes = 0
        self._sources: dict[int, tuple[weakref.ref, str]] = {}
        # the last few entries of this run, so the adapters of a report share them
        self._memory: OrderedDict[tuple[str, str], tuple[SVD, dict]] = OrderedDict()
        # modules may run in threads (lorascope.analysis._common.map_modules): the counters and
        # the in-memory entries change under this lock (files are written atomically anyway)
        self._lock = threading.RLock()
        self._small: dict[tuple[str, str], object] = {}  # WEIGHT_MEMO's values, this run only

    def __repr__(self) -> str:
        state = "" if self.enabled else ", disabled"
        return (
            f"SpectralCache({str(self.directory)!r}{state}, hits={self.hits}, misses={self.misses})"
        )

    # ------------------------------------------------------------------ keys

    def tag(self, W: torch.Tensor, source: str | None) -> torch.Tensor:
        """Record where ``W`` came from (:meth:`lorascope.formats.BaseWeights.fingerprint`), so
        its key needs a sample of its rows instead of all its bytes; returns ``W``."""
        if source is not None:
            self._sources[id(W)] = (weakref.ref(W), source)
        return W

    def key(self, W: torch.Tensor) -> str:
        """The content key of ``W``: shape, dtype, a sample of rows, and its source if tagged
        (else all of its bytes)."""
        h = hashlib.blake2b(digest_size=20)
        h.update(f"{tuple(W.shape)}|{W.dtype}|".encode())
        ref = self._sources.get(id(W))
        source = ref[1] if ref is not None and ref[0]() is W else None
        if source is None or W.ndim != 2:
            h.update(b"all|")
            h.update(_raw(W))
        else:
            h.update(f"source={source}|".encode())
            rows = _spread(W.shape[0])
            h.update(_raw(W[rows]))  # (32, n): a different weight of the same layout differs
            # and (m, 32): every row enters the key, so an edit of a few rows (a model edit, new
            # token rows) in a file with the same header is a different entry too
            h.update(_raw(W[:, _spread(W.shape[1])]))
        return h.hexdigest()

    # ------------------------------------------------------------------ files

    def _path(self, key: str, kind: str) -> Path:
        return self.directory / _VERSION / key[:2] / f"{key}.{kind}.safetensors"

    def _load(self, path: Path) -> tuple[SVD, dict] | None:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                svd = SVD(f.get_tensor("U"), f.get_tensor("S"), f.get_tensor("V"))
        except FileNotFoundError:
            return None
        except Exception as e:  # truncated, corrupt, or not ours: recompute, and drop it
            log.warning("spectral cache: dropping unreadable entry %s (%s)", path, e)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used
        return svd, meta

    def _store(self, path: Path, svd: SVD, meta: dict) -> None:
        tensors = {
            "U": svd.U.detach().to("cpu", torch.float64).contiguous(),
            "S": svd.S.detach().to("cpu", torch.float64).contiguous(),
            "V": svd.V.detach().to("cpu", torch.float64).contiguous(),
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # atomic: readers see the old entry or the new one, never a part
            save_safetensors(tensors, path, metadata={k: str(v) for k, v in meta.items()})
        except OSError as e:  # a read-only or full disk costs the reuse, never the result
            log.warning("spectral cache: cannot write %s (%s)", path, e)
            return
        with self._lock:
            self.writes += 1
            self.evict()

    def entries(self) -> list[Path]:
        """Entry files, least recently used first."""
        root = self.directory / _VERSION
        if not root.is_dir():
            return []
        found = []
        for p in root.glob("*/*.safetensors"):
            with contextlib.suppress(OSError):
                st = p.stat()
                found.append((st.st_mtime_ns, p.name, p, st.st_size))
        return [p for *_, p, _ in sorted(found)]

    def size(self) -> int:
        """Bytes held by the entries."""
        total = 0
        for p in self.entries():
            with contextlib.suppress(OSError):
                total += p.stat().st_size
        return total

    def evict(self) -> int:
        """Remove least recently used entries until the cache fits ``max_bytes``; returns the
        number removed."""
        sized = []
        for p in self.entries():
            with contextlib.suppress(OSError):
                sized.append((p, p.stat().st_size))
        total = sum(s for _, s in sized)
        removed = 0
        for p, s in sized:
            if total <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
            total -= s
        return removed

    def clear(self) -> None:
        """Remove every entry."""
        for p in self.entries():
            with contextlib.suppress(OSError):
                p.unlink()

    # ------------------------------------------------------------------ lookups

    def _remember(self, key: tuple[str, str], entry: tuple[SVD, dict]) -> None:
        with self._lock:
            self._remember_locked(key, entry)

    def _remember_locked(self, key: tuple[str, str], entry: tuple[SVD, dict]) -> None:
        self._memory[key] = entry
        self._memory.move_to_end(key)
        size = sum(_nbytes(svd) for svd, _ in self._memory.values())
        while len(self._memory) > 1 and size > _MEMORY_BYTES:
            _, (old, _) = self._memory.popitem(last=False)
            size -= _nbytes(old)

    @staticmethod
    def _serves(meta: dict, k: int, exact: bool, tol: float, angle_tol: float | None) -> bool:
        if int(meta.get("k", 0)) < k:
            return False
        if meta.get("exact") == "1":
            return True
        if exact:
            return False
        if float(meta.get("tol", "inf")) > tol:
            return False
        stored = meta.get("angle_tol", "none")
        return angle_tol is None or (stored != "none" and float(stored) <= angle_tol)

    def _lookup(self, key: str, k: int, exact: bool, tol: float, angle_tol: float | None):
        for kind in ("full", "exact", "top"):
            hit = self._memory.get((key, kind))
            if hit is None and self.enabled:
                hit = self._load(self._path(key, kind))
                if hit is not None:
                    self._remember((key, kind), hit)
            if hit is not None and self._serves(hit[1], k, exact, tol, angle_tol):
                return hit
        return None

    def top(
        self,
        W: torch.Tensor,
        k: int,
        *,
        exact: bool,
        tol: float,
        angle_tol: float | None,
        dtype: torch.dtype,
        compute: Callable[[], tuple[SVD, TopSVDInfo | None]],
    ) -> tuple[SVD, TopSVDInfo | None]:
        """``compute()``'s top-``k`` triplets of ``W``, from the cache when an entry serves
        (see the module docstring); the signature of :data:`lorascope.linalg.TOP_PROVIDER`."""
        key = self.key(W)
        hit = self._lookup(key, k, exact, tol, angle_tol)
        with self._lock:
            if hit is not None:
                self.hits += 1
            else:
                self.misses += 1
        if hit is not None:
            svd, meta = hit
            return _take(svd, k, W.device, dtype), _info(meta)
        svd, info = compute()
        meta = {"k": k, "exact": "1" if exact else "0", "tol": tol}
        meta["angle_tol"] = "none" if angle_tol is None else angle_tol
        meta["shape"] = "x".join(map(str, W.shape))
        if info is not None:
            meta.update(info._asdict())
        kind = "exact" if exact else "top"  # one of each: an exact top-k never clobbers a top-64
        self._remember((key, kind), (svd, meta))
        if self.enabled:
            self._store(self._path(key, kind), svd, meta)
        return svd, info

    def full(
        self, W: torch.Tensor, compute: Callable[[], SVD], *, dtype: torch.dtype = torch.float64
    ) -> SVD:
        """``compute()``: the full thin SVD of ``W`` (all ``min(m, n)`` triplets), from the cache
        when it holds one."""
        key = self.key(W)
        p = min(W.shape)
        hit = self._lookup(key, p, True, 0.0, None)
        if hit is not None and hit[0].S.shape[0] >= p:
            with self._lock:
                self.hits += 1
            return _take(hit[0], p, W.device, dtype)
        with self._lock:
            self.misses += 1
        svd = compute()
        meta = {"k": p, "exact": "1", "tol": 0.0, "angle_tol": 0.0}
        meta["shape"] = "x".join(map(str, W.shape))
        self._remember((key, "full"), (svd, meta))
        if self.enabled:
            self._store(self._path(key, "full"), svd, meta)
        return svd

    def get(self, W: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> SVD:
        """The full thin SVD of ``W`` (all ``p = min(m, n)`` triplets, an exact
        ``torch.linalg.svd`` in ``dtype``, deterministic signs), from the cache when it holds it:
        the interface of :class:`lorascope.analysis.SVDCache`, for the intruder analysis."""

        def compute() -> SVD:
            token = TOP_PROVIDER.set(None)  # the exact route itself, not a lookup
            try:
                return top_singular(W, min(W.shape), method="exact", dtype=dtype)
            finally:
                TOP_PROVIDER.reset(token)

        return self.full(W, compute, dtype=dtype)

    def recall(self, W: torch.Tensor, name: str):
        """This run's value ``name`` of weight ``W`` (:data:`lorascope.linalg.WEIGHT_MEMO`), or
        None."""
        return self._small.get((self.key(W), name))

    def keep(self, W: torch.Tensor, name: str, value) -> None:
        """Remember ``value`` as ``name`` of ``W`` until :meth:`active` ends."""
        with self._lock:
            self._small[(self.key(W), name)] = value

    @contextlib.contextmanager
    def active(self) -> Iterator[SpectralCache]:
        """Within the block, :func:`lorascope.linalg.top_singular` (and so every analysis that
        needs ``W``'s top singular triplets) asks this cache first. Entries kept in memory for
        the block are dropped when it ends."""
        token = TOP_PROVIDER.set(self.top)
        memo = WEIGHT_MEMO.set(self)
        try:
            yield self
        finally:
            WEIGHT_MEMO.reset(memo)
            TOP_PROVIDER.reset(token)
            self._memory.clear()
            self._small.clear()
            self._sources.clear()

    def forget(self) -> None:
        """Drop this run's in-memory entries (the files stay)."""
        self._memory.clear()


def _nbytes(svd: SVD) -> int:
    return sum(t.numel() * t.element_size() for t in svd)


def _take(svd: SVD, k: int, device: torch.device, dtype: torch.dtype) -> SVD:
    return SVD(
        svd.U[:, :k].to(device=device, dtype=dtype),
        svd.S[:k].to(device=device, dtype=dtype),
        svd.V[:, :k].to(device=device, dtype=dtype),
    )


def _info(meta: dict) -> TopSVDInfo | None:
    if meta.get("exact") == "1" or "residual" not in meta:
        return None
    return TopSVDInfo(
        float(meta["residual"]),
        float(meta["sigma_bound"]),
        float(meta["angle_bound"]),
        float(meta["gap"]),
        int(meta["passes"]),
        meta["converged"] == "True",
    )
