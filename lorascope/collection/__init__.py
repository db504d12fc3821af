"""Many adapters at once: scan a collection into a database (:mod:`~lorascope.collection.scan`,
:mod:`~lorascope.collection.db`), then analyse it from the stored factors.

``scan(paths, db)`` reads every adapter once (incrementally, in local processes or on Dask) into
an SQLite file; :class:`Collection` reads it back as plain records or data frames.
:func:`shared_subspace` (:mod:`~lorascope.collection.shared`) finds the subspace N updates of one
weight share, against null collections; :func:`neighbors` and :func:`outliers`
(:mod:`~lorascope.collection.neighbors`) find near-duplicates and adapters that stand out.

Why SQLite: the standard library has it (no new dependency), one file holds the collection,
and each adapter's rows go in one transaction, so a killed scan keeps every finished adapter
and nothing half-written; the analyses read whole columns or one layer's rows, which a
row store with an index on (layer, kind) serves without an analytical engine.
"""

from __future__ import annotations

from lorascope.collection.db import SCHEMA_VERSION, Collection
from lorascope.collection.neighbors import Neighbor, Outlier, neighbors, outliers
from lorascope.collection.scan import ScanOptions, ScanSummary, discover, scan, scan_one
from lorascope.collection.shared import SharedResult, shared_from_adapters, shared_subspace

__all__ = [
    "SCHEMA_VERSION",
    "Collection",
    "ScanOptions",
    "ScanSummary",
    "discover",
    "scan",
    "scan_one",
    "SharedResult",
    "shared_subspace",
    "shared_from_adapters",
    "Neighbor",
    "Outlier",
    "neighbors",
    "outliers",
]
