"""`lorascope shared`, `neighbors`, `outliers`: questions asked of a collection of adapters."""

from __future__ import annotations

from pathlib import Path

import click

from lorascope.cli.options import output_options, reading_options
from lorascope.cli.output import print_csv, print_json, print_table
from lorascope.errors import LoraScopeError

# E(k) is shown at these k (and at the reported k)
_LADDER = (1, 2, 4, 8, 16, 32, 64, 128)


def _collection(db: Path):
    from lorascope.collection.db import Collection

    return Collection(db)


@click.command(short_help="The shared subspace of N adapters at one layer, against nulls.")
@click.argument("adapters", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--db", type=click.Path(path_type=Path), help="A scanned collection (lorascope scan)."
)
@click.option("--layer", type=int, required=True, help="Block index.")
@click.option("--module", required=True, help="Module kind (q, v, ...) or full name.")
@click.option(
    "--side",
    type=click.Choice(["right", "left"]),
    default="right",
    show_default=True,
    help="Input-side (Σ ΔWᵀΔW) or output-side (Σ ΔW ΔWᵀ) directions.",
)
@click.option("--k", "k", type=click.IntRange(min=1), help="k of φ and LOO (default: median r).")
@click.option("--max-k", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--draws", type=click.IntRange(min=1), default=5, show_default=True,
              help="Random draws of the spectra and layers nulls.")  # fmt: skip
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--no-normalize", is_flag=True, help="Weigh adapters by ‖ΔW‖_F (default: equally).")
@click.option("--plot", type=click.Path(path_type=Path), help="Save the figure (PNG/PDF).")
@click.option(
    "--scheduler",
    envvar="LORASCOPE_DASK_SCHEDULER",
    help="A dask.distributed scheduler address: the collection's QR runs there (dask.array).",
)
@reading_options
@output_options
def shared(adapters, db, layer, module, side, k, max_k, draws, seed, no_normalize, plot,
           scheduler, read, out) -> None:  # fmt: skip
    """The shared subspace of N adapters (ADAPTER... or every readable adapter of --db) at one
    layer and module kind: the top eigenvectors of Σ_i ΔW_iᵀ ΔW_i from the exact factors, the
    share E(k) of the collection's energy they hold, and the same for null collections (each
    adapter's own σ with random directions; layers shuffled; the mean update's directions);
    per adapter φ to the shared top-k and the leave-one-out error, with random expectations."""
    from lorascope.collection.shared import shared_from_adapters

    paths = list(adapters)
    if db is not None:
        paths += [Path(a["path"]) for a in _collection(db).adapters(status="ok")]
    if len(paths) < 2:
        raise LoraScopeError("shared needs at least two adapters (ADAPTER... or --db)")
    loaded = [read(p) for p in paths]
    options = dict(layer=layer, module=module, k=k, max_k=max_k, normalize=not no_normalize,
                   draws=draws, seed=seed, side=side, labels=[str(p) for p in paths])  # fmt: skip
    if scheduler:
        try:
            from distributed import Client
        except ImportError:
            raise LoraScopeError(
                "--scheduler needs dask.distributed: pip install 'lorascope[collection]'"
            ) from None
        try:
            client = Client(scheduler, timeout=30)
        except (OSError, TimeoutError, ValueError) as e:
            raise LoraScopeError(f"--scheduler {scheduler}: cannot connect ({e})") from None
        with client:
            res = shared_from_adapters(loaded, dask=True, **options)
    else:
        res = shared_from_adapters(loaded, **options)
    if plot is not None:
        from lorascope.cli.output import save_plot
        from lorascope.collection.plots import shared_figure

        save_plot(lambda plt: shared_figure(res), plot)
    if out == "json":
        print_json([res.to_dict()])
        return
    ks = sorted({j for j in _LADDER if j <= len(res.energy)} | {min(res.k, len(res.energy))})
    n = res.nulls
    rows = [
        [j, res.energy[j - 1], n["spectra"][j - 1],
         None if n["layers"] is None else n["layers"][j - 1], n["mean"][j - 1],
         res.random_fixed[j - 1]]
        for j in ks
    ]  # fmt: skip
    cols = ["k", "E(k)", "null: own σ", "null: layers", "mean update", "random k/d"]
    if out == "csv":
        print_csv(cols, rows)
        return
    click.echo(
        f"{res.n} adapters, layer {res.layer} {res.kind}, {res.side} side (d = {res.dim}), "
        f"{'each scaled to ‖ΔW‖_F = 1' if res.normalize else 'weighted by ‖ΔW‖_F'}; nulls "
        f"averaged over {res.draws} draws"
    )
    print_table("share of energy in top-k", cols, rows)
    per = [
        [label, r, phi, pr, None if res.loo_error is None else res.loo_error[i], res.loo_random]
        for i, (label, r, phi, pr) in enumerate(
            zip(res.labels, res.ranks, res.phi, res.phi_random, strict=True)
        )
    ]
    cols = ["adapter", "r", f"φ to shared top-{res.k}", "φ random", "LOO error", "LOO random"]
    print_table("per adapter", cols, per)


@click.command(short_help="The adapters of a collection nearest to one, by φ per module.")
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--db", required=True, type=click.Path(path_type=Path), help="The collection.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--k", "k", type=click.IntRange(min=1), help="Directions compared (default: all stored)."
)
@output_options
def neighbors(adapter, db, top, k, out) -> None:
    """The adapters of --db nearest to ADAPTER (scanned into it): mean over shared modules of φ
    of the stored top-k input directions and of the Grassmann distance, next to the random
    expectation k/d."""
    from lorascope.collection.neighbors import neighbors as nearest

    col = _collection(db)
    ads = {a["id"]: a["path"] for a in col.adapters(status="ok")}
    want = Path(adapter).resolve()
    qid = next((i for i, p in ads.items() if Path(p).resolve() == want), None)
    if qid is None:
        raise LoraScopeError(
            f"{adapter}: not in {db} (scan it first: lorascope scan {adapter} --db {db})"
        )
    recs = col.modules()
    by: dict[int, list] = {}
    for r in recs:
        by.setdefault(r["adapter_id"], []).append(r)
    query = by.pop(qid, [])
    res = nearest(query, by, ads, k=k)[:top]
    if out == "json":
        print_json([n.to_dict() for n in res])
        return
    cols = ["adapter", "mean φ", "mean Grassmann", "modules", "k", "φ random"]
    rows = [[n.path, n.mean_phi, n.mean_grassmann, n.modules, n.k, n.phi_random] for n in res]
    if out == "csv":
        print_csv(cols, rows)
        return
    print_table(f"nearest to {adapter}", cols, rows)


@click.command(short_help="Adapters whose spectra stand out, by robust z within each layer.")
@click.option("--db", required=True, type=click.Path(path_type=Path), help="The collection.")
@click.option("--threshold", type=click.FloatRange(min=0.0), default=3.5, show_default=True,
              help="|z| above which an adapter is an outlier.")  # fmt: skip
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True)
@output_options
def outliers(db, threshold, top, out) -> None:
    """Robust z-scores (median/MAD) of spectral features (log ‖ΔW‖_F, log σ1, effective and
    stable rank, k@90 %) within each (layer, kind) cell of --db, so depth trends cancel; each
    adapter's largest |z| and where it occurs."""
    from lorascope.collection.neighbors import outliers as score

    col = _collection(db)
    ads = {a["id"]: a["path"] for a in col.adapters(status="ok")}
    res = score(col.modules(directions=False), ads, threshold=threshold)[:top]
    if out == "json":
        print_json([o.to_dict() for o in res])
        return
    cols = ["adapter", "max |z|", "module", "feature", "z", "median |z|", "outlier"]
    rows = [[o.path, o.max_abs_z, o.module, o.feature, o.z, o.median_abs_z,
             "yes" if o.outlier else ""] for o in res]  # fmt: skip
    if out == "csv":
        print_csv(cols, rows)
        return
    print_table(f"outliers (|z| > {threshold:g})", cols, rows)
