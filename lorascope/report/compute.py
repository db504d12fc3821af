"""Every number of the report, computed through the public analysis API (no new math).

=================  =====================================================================
what               how (Hu et al. 2021)
=================  =====================================================================
rank similarity    :func:`~lorascope.analysis.similarity` of the two compared ranks, every
                   layer (§7.2, Figures 3, 6, 7)
seed similarity    the same for two seeds at the highest rank that has two (Figure 4)
W vs ΔW            :func:`~lorascope.analysis.weight_similarity` for every rank at the chosen
                   layer (§7.3, Figure 8)
projections        :func:`~lorascope.analysis.module_amplification` for every module of every
                   adapter (§7.3, Table 7)
spectra            :func:`~lorascope.analysis.module_spectrum` for every module (§7.2)
=================  =====================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from lorascope.adapter import LoraModule
from lorascope.analysis import (
    ProjectionResult,
    SimilarityResult,
    SpectrumResult,
    module_amplification,
    module_spectrum,
    similarity,
    weight_similarity,
)
from lorascope.analysis._common import map_modules
from lorascope.cache import SpectralCache
from lorascope.errors import LoraScopeError, MissingModuleError
from lorascope.formats import BaseWeights, load_base
from lorascope.linalg import top_singular
from lorascope.report.inputs import Member, display_path

__all__ = ["ReportOptions", "ReportData", "compute_report", "KIND_ORDER"]

KIND_ORDER = ("q", "k", "v", "o", "qkv", "gate", "up", "down", "embed", "other")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class ReportOptions:
    """How the report is computed; ``None`` fields are resolved from the adapters.

    Attributes
    ----------
    layer : int, optional
        Block index of Figures 3, 4 and 8 and of the paper-style Table 7. Default: the middle
        layer, ``layers[(n - 1) // 2]`` (the paper uses the 48th of GPT-3's 96).
    kinds : tuple of str, optional
        Module kinds to analyse (``q``, ``v``, ...). Default: every kind all adapters share.
    ranks : (int, int), optional
        The low and high rank compared in Figure 3 (the paper's 8 and 64). Default: the two
        largest ranks given.
    zoom : int
        Size of the zoomed ``i, j <= zoom`` panel of Figure 3.
    weight_top : int
        How many of W's top singular directions Figure 8 compares (rows ``i``).
    side : {"right", "left"}
        Figure 8 compares input-side (right, default) or output-side singular directions.
    factor : {"A", "B", "right", "left"}
        Directions φ compares between adapters; ``"A"`` (A's right-singular vectors) is the paper's.
    seed : int
        Seeds every random baseline.
    method : {"auto", "exact", "iterative"}
        How W's top singular subspace is found (:func:`lorascope.linalg.top_singular`).
    dtype : {"float64", "float32"}
    device : str
    dpi : int
        Resolution of the PNG figures (PDFs are vector, heatmaps rasterized at this dpi).
    progress : bool
        Show a tqdm progress bar on stderr.
    cache : bool
        Keep W's top singular triplets in the user cache directory
        (:class:`lorascope.cache.SpectralCache`) for later runs on the same base. Within a
        run each W is decomposed once for all adapters either way.
    """

    layer: int | None = None
    kinds: tuple[str, ...] | None = None
    ranks: tuple[int, int] | None = None
    zoom: int = 8
    weight_top: int = 64
    side: Literal["right", "left"] = "right"
    factor: Literal["A", "B", "right", "left"] = "A"
    seed: int = 0
    method: Literal["auto", "exact", "iterative"] = "auto"
    dtype: Literal["float64", "float32"] = "float64"
    device: str = "cpu"
    dpi: int = 110
    progress: bool = True
    cache: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.zoom >= 1, f"zoom={self.zoom!r} must be >= 1"),
            (self.weight_top >= 1, f"weight_top={self.weight_top!r} must be >= 1"),
            (self.side in ("right", "left"), f"side={self.side!r} must be 'right' or 'left'"),
            (self.factor in ("A", "B", "right", "left"), f"factor={self.factor!r} is unknown"),
            (self.method in ("auto", "exact", "iterative"), f"method={self.method!r} is unknown"),
            (self.dtype in _DTYPES, f"dtype={self.dtype!r} must be one of {', '.join(_DTYPES)}"),
            (10 <= self.dpi <= 600, f"dpi={self.dpi!r} must be in [10, 600]"),
        ]
        if self.ranks is not None:
            lo, hi = self.ranks
            checks.append((lo < hi, f"ranks={self.ranks!r}: the first must be the lower"))
        for ok, message in checks:
            if not ok:
                raise LoraScopeError(message)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ReportData:
    """Everything the report shows; each result is the library's own dataclass.

    ``rank_sim[kind]`` and ``seed_sim[kind]`` hold one :class:`SimilarityResult` per layer
    (``phi`` of shape ``(r_lo, r_hi)`` and ``(r, r)``); ``weight_sim[label][kind]`` is Figure 8
    at the chosen layer (``(weight_top, r)``); ``projections[label]`` and ``spectra[label]``
    hold every module of the adapter ``label``.
    """

    members: list[Member]
    options: ReportOptions
    layers: list[int | None]
    base: str | None
    rank_pair: tuple[Member, Member] | None = None
    seed_pair: tuple[Member, Member] | None = None
    rank_sim: dict[str, list[SimilarityResult]] = field(default_factory=dict)
    seed_sim: dict[str, list[SimilarityResult]] = field(default_factory=dict)
    weight_sim: dict[str, dict[str, SimilarityResult]] = field(default_factory=dict)
    projections: dict[str, list[ProjectionResult]] = field(default_factory=dict)
    spectra: dict[str, list[SpectrumResult]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def primaries(self) -> list[Member]:
        """One adapter per rank (its smallest seed), by rank."""
        best: dict[int, Member] = {}
        for m in self.members:
            if m.rank not in best or m.seed < best[m.rank].seed:
                best[m.rank] = m
        return [best[r] for r in sorted(best)]

    def at_layer(self, results: list, layer: int | None = None) -> list:
        """The results at ``layer`` (default the chosen one)."""
        layer = self.options.layer if layer is None else layer
        return [r for r in results if r.layer == layer]


def _kinds(members: list[Member], wanted: tuple[str, ...] | None) -> tuple[str, ...]:
    if wanted is not None:
        for m in members:
            for kind in wanted:
                m.adapter.select(module=kind)  # raises MissingModuleError naming the adapter
        return tuple(wanted)
    shared = set.intersection(*({mod.kind for mod in m.adapter} for m in members))
    if not shared:
        raise MissingModuleError(
            "the adapters share no module kind: "
            + "; ".join(
                f"{m.path}: {', '.join(sorted({x.kind for x in m.adapter}))}" for m in members
            )
        )
    return tuple(sorted(shared, key=lambda k: (*KIND_ORDER, k).index(k)))


def _layers(members: list[Member], kinds: tuple[str, ...]) -> list[int | None]:
    per = [{mod.layer for k in kinds for mod in m.adapter.select(module=k)} for m in members]
    common = set.intersection(*per)
    numbered = sorted(x for x in common if x is not None)
    return numbered or ([None] if None in common else [])


def _modules(member: Member, kinds: tuple[str, ...]) -> list[LoraModule]:
    """The selected modules of one adapter, by layer, then kind in the order of ``kinds``."""
    mods = [(k, x) for k, kind in enumerate(kinds) for x in member.adapter.select(module=kind)]
    mods.sort(key=lambda kx: (-1 if kx[1].layer is None else kx[1].layer, kx[0]))
    return [x for _, x in mods]


def _pairs(members: list[Member], options: ReportOptions, notes: list[str]):
    by_rank: dict[int, list[Member]] = {}
    for m in members:
        by_rank.setdefault(m.rank, []).append(m)
    ranks = sorted(by_rank)
    rank_pair = None
    if options.ranks is not None:
        missing = [r for r in options.ranks if r not in by_rank]
        if missing:
            raise LoraScopeError(
                f"ranks={options.ranks}: no adapter of rank {missing[0]} "
                f"(ranks given: {', '.join(map(str, ranks))})"
            )
        rank_pair = (by_rank[options.ranks[0]][0], by_rank[options.ranks[1]][0])
    elif len(ranks) >= 2:
        rank_pair = (by_rank[ranks[-2]][0], by_rank[ranks[-1]][0])
    else:
        notes.append(f"Figures 3, 6, 7 skipped: they compare two ranks; only r = {ranks[0]} given.")
    two_seeds = [r for r in ranks if len(by_rank[r]) >= 2]
    seed_pair = tuple(by_rank[two_seeds[-1]][:2]) if two_seeds else None
    if seed_pair is None:
        notes.append("Figure 4 skipped: it compares two seeds of one rank; no rank has two.")
    return rank_pair, seed_pair


def compute_report(
    members: Sequence[Member],
    base: str | Path | BaseWeights | None = None,
    options: ReportOptions | None = None,
    cache: SpectralCache | None = None,
) -> ReportData:
    """Compute every analysis of the report (see the module docstring).

    Parameters
    ----------
    members : sequence of Member
        Adapters labelled by rank and seed (:func:`lorascope.report.group_adapters`).
    base : path or BaseWeights, optional
        Pre-trained weights; without them Figure 8 and Table 7 are skipped (noted).
    options : ReportOptions, optional
    cache : SpectralCache, optional
        Where ``W``'s top singular triplets are kept across runs (default: this run only; each
        ``W`` is decomposed once for all adapters either way).

    Returns
    -------
    ReportData
        With ``options`` resolved: ``layer``, ``kinds`` and ``ranks`` filled in.
    """
    options = options or ReportOptions()
    members = sorted(members, key=lambda m: (m.rank, m.seed))
    kinds = _kinds(members, options.kinds)
    layers = _layers(members, kinds)
    if not layers:
        raise MissingModuleError("the adapters share no layer with the modules " + ", ".join(kinds))
    layer = options.layer
    if layer is None:
        layer = layers[(len(layers) - 1) // 2]
    elif layer not in layers:
        shown = ", ".join(str(x) for x in layers)
        raise MissingModuleError(f"layer {layer} is not one all adapters have (layers: {shown})")
    notes: list[str] = []
    rank_pair, seed_pair = _pairs(members, options, notes)
    ranks = (rank_pair[0].rank, rank_pair[1].rank) if rank_pair else options.ranks
    options = replace(options, layer=layer, kinds=kinds, ranks=ranks)
    base_w = load_base(base) if isinstance(base, str | Path) else base
    data = ReportData(
        list(members),
        options,
        layers,
        None if base_w is None else display_path(base_w.path),
        notes=notes,
    )
    data.rank_pair, data.seed_pair = rank_pair, seed_pair
    dtype = _DTYPES[options.dtype]
    device = torch.device(options.device)
    common = {"factor": options.factor, "seed": options.seed, "dtype": dtype, "device": device}
    mods = {m.label: _modules(m, kinds) for m in members}
    n_mods = sum(map(len, mods.values()))
    n_sim = len(kinds) * (bool(rank_pair) + bool(seed_pair))
    n_base = 0 if base_w is None else n_mods + len(data.primaries) * len(kinds)
    bar = tqdm(total=n_sim + n_mods + n_base, desc="lorascope report", disable=not options.progress)
    with bar:
        for kind in kinds:
            for pair, out in ((rank_pair, data.rank_sim), (seed_pair, data.seed_sim)):
                if pair:
                    res = similarity(pair[0].adapter, pair[1].adapter, module=kind, **common)
                    out[kind] = [r for r in res if r.layer in layers]
                    bar.update()
        for m in members:
            data.spectra[m.label] = []
            for x in mods[m.label]:
                data.spectra[m.label].append(module_spectrum(x, dtype=dtype, device=device))
                bar.update()
        if base_w is None:
            notes.append("Figure 8 and Table 7 skipped: they need the base weights (--base).")
            return data
        cache = cache if cache is not None else SpectralCache(enabled=options.cache)
        with cache.active():
            _against_base(data, mods, base_w, bar, dtype, device, cache)
    return data


def _against_base(
    data: ReportData,
    mods: dict[str, list[LoraModule]],
    base_w: BaseWeights,
    bar: tqdm,
    dtype: torch.dtype,
    device: torch.device,
    cache: SpectralCache,
) -> None:
    """Table 7 for every module and Figure 8 at the chosen layer, reading each base weight
    once and decomposing it once for all adapters (its top singular triplets, through
    ``cache``). On the CPU the base weights are taken in parallel, one per core with one
    intra-op thread each (``analysis._common.map_modules``; memory: one ``W`` and its float32
    copy per core); results land in the order of the modules, as a sequential pass gives."""
    o = data.options
    primaries = {m.label for m in data.primaries}
    keys = list(dict.fromkeys(x.key for xs in mods.values() for x in xs))
    by_key = {label: {x.key: x for x in xs} for label, xs in mods.items()}
    for m in data.members:
        data.projections[m.label] = []
        if m.label in primaries:
            data.weight_sim[m.label] = {}
    # Figure 8: the first module of each kind at the chosen layer, per primary adapter
    figure8: dict[tuple[str, str], str] = {}
    for key in keys:
        for m in data.members:
            x = by_key[m.label].get(key)
            if x is not None and m.label in primaries and x.layer == o.layer:
                figure8.setdefault((m.label, x.kind), key)
    kw = {"seed": o.seed, "method": o.method, "dtype": dtype, "device": device}

    def one(key: str) -> tuple[list, list]:
        users = [(m, by_key[m.label][key]) for m in data.members if key in by_key[m.label]]
        x0 = users[0][1]
        source = getattr(base_w, "fingerprint", lambda m: None)(x0)  # cache identity
        W = cache.tag(base_w.weight_for(x0), source)  # (d_out, d_in)
        # W's top singular triplets once for every adapter, rank and seed: the most any of
        # them asks for (Table 7: its rank; Figure 8: weight_top), so each later request is
        # served from the cache (a top-k entry serves k' <= k)
        need = [y.rank for _, y in users]
        need += [o.weight_top for n, y in users if figure8.get((n.label, y.kind)) == key]
        top_singular(W, max(need), method=o.method, seed=o.seed, dtype=dtype)
        proj, sims = [], []
        for m, x in users:
            proj.append((m.label, module_amplification(x, W, **kw)))
            bar.update()
            if figure8.get((m.label, x.kind)) == key:
                sims.append(
                    (
                        m.label,
                        x.kind,
                        weight_similarity(x, W, side=o.side, max_i=o.weight_top, **kw),
                    )
                )
                bar.update()
        return proj, sims

    for proj, sims in map_modules(one, keys, device):
        for label, res in proj:
            data.projections[label].append(res)
        for label, kind, res in sims:
            data.weight_sim[label][kind] = res
