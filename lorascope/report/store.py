"""``results.h5``: every number the report plots or tabulates, with the resolved options.

Layout (``format = "lorascope-report"``, ``version = 1``)::

    /                              attrs: every resolved option (``options`` as JSON, and each
                                   set option alone), base, layers, lorascope_version
    /adapters/<label>              attrs: path, format, rank, seed, seed_from   (label r8_s0)
    /similarity/ranks/<kind>/layer_<n>   phi (i, j), random_phi, expected_random;
    /similarity/seeds/<kind>/layer_<n>   attrs: a, b (labels), module, module_b, layer, kind,
    /weight_similarity/<label>/<kind>    rank, rank_b, factor, dim
    /spectra/<label>/<module key>  singular_values (k,), energy (k,); attrs: the scalars
    /projections/<label>           one dataset per column (module, layer, kind, rank, k,
                                   norm_delta, norm_weight, proj_delta, proj_weight,
                                   proj_random, random_expected, amplification), one row a module
    /tables/<name>                 the CSV text of each table
    /figures/<name>                attrs: title, caption, datasets (JSON list of the paths plotted)

``phi[i-1, j-1]`` is φ(i, j) (Hu et al. 2021 eq. 4); a module without a layer has no ``layer``
attribute and lives under ``layer_none`` (its ``/projections`` layer is -1); ``/`` in a module key
is written ``%2F``. Grids are stored float64, gzip-compressed (lossless).
"""

from __future__ import annotations

import io
import json
from typing import Any

import h5py
import numpy as np

from lorascope import __version__
from lorascope.analysis import SimilarityResult
from lorascope.report.compute import ReportData
from lorascope.report.inputs import display_path

__all__ = ["write_h5", "sim_path", "wsim_path", "spec_path", "proj_path"]

H5_FORMAT = "lorascope-report"
H5_VERSION = 1
_PROJ_FIELDS = (
    "module",
    "layer",
    "kind",
    "rank",
    "k",
    "norm_delta",
    "norm_weight",
    "proj_delta",
    "proj_weight",
    "proj_random",
    "random_expected",
    "amplification",
)


_PACK = {"compression": "gzip", "compression_opts": 6, "shuffle": True}  # lossless, float64


def _name(x: Any) -> str:
    return str(x).replace("/", "%2F")


def sim_path(which: str, kind: str, layer: int | None) -> str:
    """Group of the φ grid between the two ranks (``which="ranks"``) or seeds (``"seeds"``)."""
    return f"similarity/{which}/{_name(kind)}/layer_{'none' if layer is None else layer}"


def wsim_path(label: str, kind: str) -> str:
    """Group of Figure 8's grid (W's top-i vs ΔW's top-j) for adapter ``label``."""
    return f"weight_similarity/{label}/{_name(kind)}"


def spec_path(label: str, key: str) -> str:
    return f"spectra/{label}/{_name(key)}"


def proj_path(label: str) -> str:
    return f"projections/{label}"


def _attrs(obj: h5py.Group, values: dict[str, Any]) -> None:
    for k, v in values.items():
        if v is None:
            continue
        obj.attrs[k] = list(v) if isinstance(v, tuple) else v


def _similarity(f: h5py.File, path: str, res: SimilarityResult, **extra: Any) -> None:
    g = f.create_group(path)
    g.create_dataset("phi", data=res.phi, **_PACK)
    if res.random_phi is not None:
        g.create_dataset("random_phi", data=res.random_phi, **_PACK)
    g.create_dataset("expected_random", data=res.expected_random, **_PACK)
    _attrs(
        g,
        {
            "module": res.module,
            "module_b": res.module_b,
            "layer": res.layer,
            "kind": res.kind,
            "rank": res.rank,
            "rank_b": res.rank_b,
            "factor": res.factor,
            "dim": res.dim,
            **extra,
        },
    )


def write_h5(data: ReportData, tables: dict[str, str], figures: dict[str, dict[str, Any]]) -> bytes:
    """The bytes of ``results.h5`` (built in memory so nothing is written before all succeeds).

    Parameters
    ----------
    data : ReportData
    tables : dict
        Table name -> CSV text.
    figures : dict
        Figure name -> ``{"title", "caption", "datasets"}``.
    """
    o = data.options
    buf = io.BytesIO()
    with h5py.File(buf, "w", track_order=True) as f:
        f.attrs["format"] = H5_FORMAT
        f.attrs["version"] = H5_VERSION
        f.attrs["lorascope_version"] = __version__
        f.attrs["options"] = json.dumps(o.to_dict())
        _attrs(f, o.to_dict())
        f.attrs["base"] = data.base or ""
        f.attrs["layers"] = json.dumps(data.layers)
        for m in data.members:
            g = f.create_group(f"adapters/{m.label}")
            _attrs(g, {"path": display_path(m.path), "format": m.adapter.format, "rank": m.rank})
            _attrs(g, {"seed": m.seed, "seed_from": m.seed_from})
        for which, results, pair in (
            ("ranks", data.rank_sim, data.rank_pair),
            ("seeds", data.seed_sim, data.seed_pair),
        ):
            for kind, rs in results.items():
                for r in rs:
                    ab = {"a": pair[0].label, "b": pair[1].label}
                    _similarity(f, sim_path(which, kind, r.layer), r, **ab)
        for label, by_kind in data.weight_sim.items():
            for kind, r in by_kind.items():
                _similarity(f, wsim_path(label, kind), r, a="W", b=label, side=o.side)
        for label, spectra in data.spectra.items():
            for s in spectra:
                g = f.create_group(spec_path(label, s.module))
                g.create_dataset("singular_values", data=np.asarray(s.singular_values))
                g.create_dataset("energy", data=np.asarray(s.energy))
                d = s.to_dict()
                for k in ("singular_values", "energy"):
                    d.pop(k)
                _attrs(g, d)
        for label, projs in data.projections.items():
            g = f.create_group(proj_path(label))
            for k in _PROJ_FIELDS:
                col = [getattr(p, k) for p in projs]
                if k == "layer":
                    col = [-1 if v is None else v for v in col]
                g.create_dataset(
                    k,
                    data=np.asarray(
                        col, dtype=h5py.string_dtype() if k in ("module", "kind") else None
                    ),
                )
        for name, text in tables.items():
            f.create_dataset(f"tables/{name}", data=text, dtype=h5py.string_dtype())
        for name, meta in figures.items():
            g = f.create_group(f"figures/{name}")
            _attrs(g, {"title": meta["title"], "caption": meta["caption"]})
            g.attrs["datasets"] = json.dumps(meta["datasets"])
    return buf.getvalue()
