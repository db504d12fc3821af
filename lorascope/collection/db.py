"""The collection database: one SQLite file holding what ``lorascope scan`` read.

Why SQLite (stdlib ``sqlite3``): no new dependency; one file that any language reads; WAL
journaling, so every committed adapter survives a killed scan and readers never block the
writer; each adapter's rows are written in one transaction, so nothing is ever half-written.
The scan has exactly one writer (the main process); workers only compute.

Schema (version :data:`SCHEMA_VERSION`)::

    meta(key TEXT PRIMARY KEY, value TEXT)
        application = "lorascope-collection", schema_version, top_k, read_options (JSON),
        directions ("right": V only, "both": V and U; a database without it has both)
    adapters(id INTEGER PRIMARY KEY, path TEXT UNIQUE, hash TEXT, bytes INTEGER, format TEXT,
             families TEXT, base TEXT, n_modules INTEGER, ranks TEXT, status TEXT, error TEXT,
             scanned_at TEXT, lorascope_version TEXT, stat TEXT)
    modules(adapter_id INTEGER REFERENCES adapters(id) ON DELETE CASCADE, module TEXT,
            layer INTEGER, kind TEXT, family TEXT, "update" TEXT, d_out INTEGER, d_in INTEGER,
            rank INTEGER, nominal_rank INTEGER, scale REAL, alpha REAL, fro REAL, spectral REAL,
            effective_rank REAL, stable_rank REAL, numerical_rank INTEGER,
            k50 INTEGER, k90 INTEGER, k99 INTEGER, sigma BLOB, k_dirs INTEGER, V BLOB, U BLOB,
            PRIMARY KEY (adapter_id, module))

``adapters``: ``path`` is the resolved absolute path; ``hash`` the sha256 of its files (see
:func:`lorascope.collection.scan.content_hash`); ``families`` and ``ranks`` JSON lists (distinct
update families, distinct configured ranks ``r``); ``base`` the ``base_model_name_or_path`` of
its config, else NULL; ``status`` ``ok`` or ``error`` (then ``error`` holds the one-line
message and there are no module rows); ``stat`` the size/mtime/ctime/inode of its files when it
was hashed (the rescan fast path: equal ``stat``, no hashing), NULL when a file was too fresh to
trust its time stamp.

``modules``: one row per module of an ``ok`` adapter, in file order (``rowid``): ``ΔW = s·B A``
of shape ``(d_out, d_in)``, width ``rank`` of the factored form and configured ``nominal_rank``;
``fro``/``spectral`` ``‖ΔW‖_F``/``‖ΔW‖_2``; ``effective_rank``, ``stable_rank``,
``numerical_rank`` as in :func:`lorascope.analysis.spectrum.spectrum_values`; ``k50``/``k90``/
``k99`` the energy ranks of :data:`lorascope.analysis.rank.ENERGY_LADDER`; ``sigma`` all ``k``
singular values (float64 little-endian); ``V`` (``d_in × k_dirs``) and ``U``
(``d_out × k_dirs``) the top ``k_dirs = min(k, top_k)`` right and left singular vectors (float32
little-endian, row-major; ``U`` NULL unless the database's ``directions`` is ``both``).
Non-finite numbers are never stored (NULL instead).
"""

from __future__ import annotations

import csv
import json
import math
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorascope.errors import LoraScopeError

__all__ = [
    "SCHEMA_VERSION",
    "APPLICATION",
    "ADAPTER_COLUMNS",
    "MODULE_COLUMNS",
    "Collection",
    "connect",
]

SCHEMA_VERSION = 1
APPLICATION = "lorascope-collection"
PAGE_SIZE = 65536  # bytes, fixed when the file is created
# SQLite's application_id header field ("LRSC"): `file` and sqlite3 show what the file is.
_APPLICATION_ID = 0x4C525343

# Columns as the library returns them (the internal `stat` is left out).
ADAPTER_COLUMNS = (
    "id",
    "path",
    "hash",
    "bytes",
    "format",
    "families",
    "base",
    "n_modules",
    "ranks",
    "status",
    "error",
    "scanned_at",
    "lorascope_version",
)
MODULE_COLUMNS = (
    "adapter_id",
    "module",
    "layer",
    "kind",
    "family",
    "update",
    "d_out",
    "d_in",
    "rank",
    "nominal_rank",
    "scale",
    "alpha",
    "fro",
    "spectral",
    "effective_rank",
    "stable_rank",
    "numerical_rank",
    "k50",
    "k90",
    "k99",
    "sigma",
    "k_dirs",
    "V",
    "U",
)
_JSON_COLUMNS = ("families", "ranks")

_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE adapters (
    id INTEGER PRIMARY KEY,
    path TEXT UNIQUE NOT NULL,
    hash TEXT,
    bytes INTEGER,
    format TEXT,
    families TEXT,
    base TEXT,
    n_modules INTEGER,
    ranks TEXT,
    status TEXT NOT NULL CHECK (status IN ('ok', 'error')),
    error TEXT,
    scanned_at TEXT,
    lorascope_version TEXT,
    stat TEXT
);
CREATE TABLE modules (
    adapter_id INTEGER NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
    module TEXT NOT NULL,
    layer INTEGER,
    kind TEXT,
    family TEXT,
    "update" TEXT,
    d_out INTEGER,
    d_in INTEGER,
    rank INTEGER,
    nominal_rank INTEGER,
    scale REAL,
    alpha REAL,
    fro REAL,
    spectral REAL,
    effective_rank REAL,
    stable_rank REAL,
    numerical_rank INTEGER,
    k50 INTEGER,
    k90 INTEGER,
    k99 INTEGER,
    sigma BLOB,
    k_dirs INTEGER,
    V BLOB,
    U BLOB,
    PRIMARY KEY (adapter_id, module)
);
CREATE INDEX modules_layer_kind ON modules (layer, kind);
PRAGMA application_id = {_APPLICATION_ID};
"""


def db_error(path: object, e: BaseException) -> LoraScopeError:
    return LoraScopeError(f"{path}: {' '.join(str(e).split())}")


def connect(path: str | Path, *, create: bool = False) -> sqlite3.Connection:
    """Open the collection database at ``path`` (creating it when ``create``), checked.

    The connection is in autocommit mode (transactions are explicit ``BEGIN``/``COMMIT``), with
    WAL journaling and foreign keys on.

    Raises
    ------
    LoraScopeError
        ``path`` is a directory, cannot be opened or created, is not an SQLite file, is an
        SQLite file that is not a lorascope collection, or has another schema version.
    """
    path = Path(path)
    if path.is_dir():
        raise LoraScopeError(f"{path}: is a directory; give a database file such as x.db")
    if not create and not path.is_file():
        raise LoraScopeError(f"{path}: no such collection database (run lorascope scan first)")
    try:
        conn = sqlite3.connect(path, timeout=60.0, isolation_level=None)
    except sqlite3.Error as e:
        raise LoraScopeError(f"{path}: cannot open the database: {e}") from None
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            if not create:
                raise LoraScopeError(f"{path}: an empty database, not a lorascope collection")
            # 64 KiB pages (before the first table fixes the size): a module's direction blobs
            # (~0.3 MB at d = 4096) span 5 pages instead of 70, and an adapter's transaction
            # writes 3-4x faster than with the default 4 KiB
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            _create(conn)
        else:
            _check(conn, path, tables)
        if create:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":  # e.g. a file system without shared memory
                conn.execute("PRAGMA journal_mode = DELETE")
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable against a killed process
    except LoraScopeError:
        conn.close()
        raise
    except sqlite3.Error as e:  # "file is not a database", read-only, disk full, ...
        conn.close()
        raise LoraScopeError(f"{path}: not a usable lorascope collection: {e}") from None
    return conn


def _create(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [("application", APPLICATION), ("schema_version", str(SCHEMA_VERSION))],
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _check(conn: sqlite3.Connection, path: Path, tables: set[str]) -> None:
    if not {"meta", "adapters", "modules"} <= tables:
        raise LoraScopeError(
            f"{path}: an SQLite database that is not a lorascope collection "
            f"(tables: {', '.join(sorted(tables)[:5])})"
        )
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if meta.get("application") != APPLICATION:
        raise LoraScopeError(f"{path}: an SQLite database that is not a lorascope collection")
    if meta.get("schema_version") != str(SCHEMA_VERSION):
        raise LoraScopeError(
            f"{path}: collection schema version {meta.get('schema_version')}, this lorascope "
            f"reads version {SCHEMA_VERSION}; scan into a new database"
        )


def read_meta(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM meta").fetchall())


def settle_meta(conn: sqlite3.Connection, path: object, values: Mapping[str, str]) -> None:
    """Record the scan settings ``values`` in ``meta``; refuse ones that differ from what the
    database was scanned with (its rows would mix two settings)."""
    meta = read_meta(conn)
    for key, value in values.items():
        if key in meta and meta[key] != value:
            raise LoraScopeError(
                f"{path}: was scanned with {key}={meta[key]}, not {value}; use the same "
                "setting or a new database"
            )
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", list(values.items()))
    conn.execute("COMMIT")


def known_adapters(conn: sqlite3.Connection) -> dict[str, tuple[int, str | None, str, str | None]]:
    """``path -> (id, hash, status, stat)`` of every adapter in the database."""
    rows = conn.execute("SELECT path, id, hash, status, stat FROM adapters")
    return {path: (i, h, status, stat) for path, i, h, status, stat in rows}


def next_id(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM adapters").fetchone()[0])


def _finite(x: Any) -> Any:
    """NULL for NaN/Inf (never stored), the value otherwise."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


_ADAPTER_INSERT = (
    "INSERT INTO adapters (id, path, hash, bytes, format, families, base, n_modules, ranks, "
    "status, error, scanned_at, lorascope_version, stat) "
    "VALUES (:id, :path, :hash, :bytes, :format, :families, :base, :n_modules, :ranks, "
    ":status, :error, :scanned_at, :lorascope_version, :stat)"
)
_MODULE_INSERT = "INSERT INTO modules ({}) VALUES ({})".format(
    ", ".join(f'"{c}"' for c in MODULE_COLUMNS), ", ".join(f":{c}" for c in MODULE_COLUMNS)
)


def write_record(
    conn: sqlite3.Connection, adapter_id: int, record: Mapping[str, Any], scanned_at: str
) -> None:
    """Replace adapter ``adapter_id`` and its modules by ``record`` (a result of
    :func:`lorascope.collection.scan.scan_one`), in one transaction."""
    row = {k: _finite(v) for k, v in record["adapter"].items()}
    row.update(id=adapter_id, scanned_at=scanned_at)
    for key in _JSON_COLUMNS:
        if row.get(key) is not None and not isinstance(row[key], str):
            row[key] = json.dumps(row[key])
    modules = [
        {**{k: _finite(v) for k, v in m.items()}, "adapter_id": adapter_id}
        for m in record["modules"]
    ]
    conn.execute("BEGIN IMMEDIATE")
    try:
        taken = conn.execute("SELECT path FROM adapters WHERE id = ?", (adapter_id,)).fetchone()
        if taken is not None and taken[0] != row["path"]:
            raise LoraScopeError(
                f"adapter id {adapter_id} was given to {taken[0]} by another scan of this "
                "database; run one scan of a database at a time"
            )
        conn.execute("DELETE FROM modules WHERE adapter_id = ?", (adapter_id,))
        conn.execute("DELETE FROM adapters WHERE id = ? OR path = ?", (adapter_id, row["path"]))
        conn.execute(_ADAPTER_INSERT, row)
        _insert_modules(conn, modules)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _insert_modules(conn: sqlite3.Connection, modules: list[dict]) -> None:
    conn.executemany(_MODULE_INSERT, modules)


def update_stat(conn: sqlite3.Connection, adapter_id: int, stat: str | None) -> None:
    """Store the files' new ``stat`` of an adapter whose content hash did not change."""
    conn.execute("UPDATE adapters SET stat = ? WHERE id = ?", (stat, adapter_id))


# ----------------------------------------------------------------------------- reading


def _decode(blob: bytes | None, dtype: str, shape: tuple[int, ...]) -> np.ndarray | None:
    if blob is None:
        return None
    return np.frombuffer(blob, dtype=dtype).reshape(shape).copy()


class Collection:
    """Read a scanned collection: plain records (lists of dicts), data frames on request.

    Parameters
    ----------
    db_path : str or Path
        A database written by :func:`lorascope.collection.scan`.

    Examples
    --------
    >>> with Collection("zoo.db") as c:  # doctest: +SKIP
    ...     for m in c.modules(layer=3, kind="q"):
    ...         m["V"].shape  # (d_in, k_dirs)
    """

    def __init__(self, db_path: str | Path) -> None:
        self.path = Path(db_path)
        self._conn = connect(self.path, create=False)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def meta(self) -> dict[str, Any]:
        """The scan settings: ``application``, ``schema_version``, ``top_k``, ``directions``,
        ``read_options`` (decoded)."""
        meta: dict[str, Any] = read_meta(self._conn)
        for key in ("schema_version", "top_k"):
            if key in meta:
                meta[key] = int(meta[key])
        if "read_options" in meta:
            meta["read_options"] = json.loads(meta["read_options"])
        return meta

    def adapters(self, status: str | None = None) -> list[dict[str, Any]]:
        """One dict per adapter (:data:`ADAPTER_COLUMNS`; ``families`` and ``ranks`` as lists),
        ordered by path; ``status`` ``"ok"``/``"error"`` selects."""
        return list(self._adapter_rows(status))

    def _adapter_rows(self, status: str | None = None) -> Iterator[dict[str, Any]]:
        if status not in (None, "ok", "error"):
            raise LoraScopeError(f"status {status!r}: choose ok or error")
        sql = f"SELECT {', '.join(ADAPTER_COLUMNS)} FROM adapters"
        args: tuple = ()
        if status is not None:
            sql, args = sql + " WHERE status = ?", (status,)
        for row in self._conn.execute(sql + " ORDER BY path", args):
            d = dict(zip(ADAPTER_COLUMNS, row, strict=True))
            for key in _JSON_COLUMNS:
                d[key] = None if d[key] is None else json.loads(d[key])
            yield d

    def modules(
        self,
        layer: int | None = None,
        kind: str | None = None,
        adapter: int | str | None = None,
        *,
        directions: bool = True,
    ) -> list[dict[str, Any]]:
        """One dict per module (:data:`MODULE_COLUMNS` plus the adapter's ``path``), ordered by
        adapter path then file order; ``layer``/``kind``/``adapter`` (an id or a path) select.

        ``sigma`` is a float64 array ``(k,)``; ``V`` ``(d_in, k_dirs)`` and ``U``
        ``(d_out, k_dirs)`` float32 arrays (``U`` None unless the scan stored it; both left
        out with ``directions=False``)."""
        return list(self._module_rows(layer, kind, adapter, directions=directions))

    def _module_rows(
        self,
        layer: int | None = None,
        kind: str | None = None,
        adapter: int | str | None = None,
        *,
        directions: bool = True,
        decode: bool = True,
    ) -> Iterator[dict[str, Any]]:
        cols = [c for c in MODULE_COLUMNS if directions or c not in ("V", "U")]
        where, args = [], []
        if layer is not None:
            where.append("m.layer = ?")
            args.append(int(layer))
        if kind is not None:
            where.append("m.kind = ?")
            args.append(kind)
        if adapter is not None:
            where.append("m.adapter_id = ?")
            args.append(self._adapter_id(adapter))
        sql = "SELECT " + ", ".join(f'm."{c}"' for c in cols)
        sql += ", a.path FROM modules m JOIN adapters a ON a.id = m.adapter_id"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY a.path, m.rowid"
        for row in self._conn.execute(sql, args):
            d = dict(zip([*cols, "path"], row, strict=True))
            if decode:
                d["sigma"] = _decode(d["sigma"], "<f8", (-1,))
                if directions:
                    d["V"] = _decode(d["V"], "<f4", (d["d_in"], d["k_dirs"]))
                    d["U"] = _decode(d["U"], "<f4", (d["d_out"], d["k_dirs"]))
            yield d

    def _adapter_id(self, adapter: int | str) -> int:
        if isinstance(adapter, int) and not isinstance(adapter, bool):
            return adapter
        text = str(adapter)
        row = self._conn.execute("SELECT id FROM adapters WHERE path = ?", (text,)).fetchone()
        if row is None:
            resolved = str(Path(text).expanduser().resolve())
            row = self._conn.execute(
                "SELECT id FROM adapters WHERE path = ?", (resolved,)
            ).fetchone()
        if row is None:
            raise LoraScopeError(f"{self.path}: no adapter {text!r} in the collection")
        return int(row[0])

    def to_pandas(self, table: str = "adapters", **select: Any):
        """The table as a ``pandas.DataFrame`` (needs pandas); ``select`` as in
        :meth:`adapters` / :meth:`modules`."""
        try:
            import pandas as pd
        except ImportError:
            raise LoraScopeError("data frames need pandas: pip install pandas") from None
        return pd.DataFrame(self._records(table, **select), columns=self._columns(table, select))

    def _records(self, table: str, **select: Any) -> list[dict[str, Any]]:
        if table == "adapters":
            return self.adapters(**select)
        if table == "modules":
            return self.modules(**select)
        raise LoraScopeError(f"table {table!r}: choose adapters or modules")

    @staticmethod
    def _columns(table: str, select: Mapping[str, Any]) -> list[str]:
        if table == "adapters":
            return list(ADAPTER_COLUMNS)
        keep = select.get("directions", True)
        cols = [c for c in MODULE_COLUMNS if keep or c not in ("V", "U")]
        return [*cols, "path"]

    def export(self, table: str, path: str | Path) -> int:
        """Write ``table`` (``adapters`` or ``modules``) to ``path``: ``.csv`` always,
        ``.parquet`` with pyarrow. Returns the number of rows.

        Every column but the singular vectors ``V``/``U`` (they stay in the database): lists
        (``families``, ``ranks``, ``sigma``) as JSON text in CSV and as list columns in
        Parquet; NULL as an empty CSV field; floats written to round-trip exactly."""
        path = Path(path)
        if table not in ("adapters", "modules"):
            raise LoraScopeError(f"table {table!r}: choose adapters or modules")
        suffix = path.suffix.lower()
        if suffix not in (".csv", ".parquet"):
            raise LoraScopeError(f"{path}: export to .csv or .parquet")
        if suffix == ".parquet":
            return self._export_parquet(table, path)
        columns = list(export_columns(table))
        n = 0
        try:
            with open(path, "w", newline="", encoding="utf-8") as f:
                out = csv.writer(f, lineterminator="\n")
                out.writerow(columns)
                for row in self._export_rows(table):
                    out.writerow([_csv_value(row[c]) for c in columns])
                    n += 1
        except OSError as e:
            raise LoraScopeError(f"{path}: cannot write: {e.strerror or e}") from None
        return n

    def _export_rows(self, table: str) -> Iterator[dict[str, Any]]:
        if table == "adapters":
            return self._adapter_rows()
        return self._module_rows(directions=False)

    def _export_parquet(self, table: str, path: Path) -> int:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise LoraScopeError(
                f"{path}: writing Parquet needs pyarrow (pip install pyarrow); or export .csv"
            ) from None
        columns = list(export_columns(table))
        schema = pa.schema([(c, _ARROW_TYPES[c](pa)) for c in columns])
        n, batch = 0, []
        try:
            with pq.ParquetWriter(str(path), schema) as writer:
                for row in self._export_rows(table):
                    if table == "modules":
                        row["sigma"] = None if row["sigma"] is None else row["sigma"].tolist()
                    batch.append({c: row[c] for c in columns})
                    if len(batch) == 10_000:
                        writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                        n, batch = n + len(batch), []
                if batch or n == 0:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    n += len(batch)
        except OSError as e:
            raise LoraScopeError(f"{path}: cannot write: {e}") from None
        return n


def export_columns(table: str) -> Sequence[str]:
    """The columns :meth:`Collection.export` writes for ``table``, in order."""
    if table == "adapters":
        return ADAPTER_COLUMNS
    return (*(c for c in MODULE_COLUMNS if c not in ("V", "U")), "path")


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, np.ndarray):
        return json.dumps(v.tolist())
    if isinstance(v, list):
        return json.dumps(v)
    if isinstance(v, float):
        return repr(v)
    return v


_INT = ("id", "bytes", "n_modules", "adapter_id", "layer", "d_out", "d_in", "rank")
_INT += ("nominal_rank", "numerical_rank", "k50", "k90", "k99", "k_dirs")
_FLOAT = ("scale", "alpha", "fro", "spectral", "effective_rank", "stable_rank")
_ARROW_TYPES: dict[str, Any] = {
    **{c: (lambda pa: pa.int64()) for c in _INT},
    **{c: (lambda pa: pa.float64()) for c in _FLOAT},
    "families": lambda pa: pa.list_(pa.string()),
    "ranks": lambda pa: pa.list_(pa.int64()),
    "sigma": lambda pa: pa.list_(pa.float64()),
}
for _c in (*ADAPTER_COLUMNS, *MODULE_COLUMNS, "path"):
    _ARROW_TYPES.setdefault(_c, lambda pa: pa.string())
