"""`lorascope dynamics`: what a tracking file says about each module (σ trajectories, k@90 %,
settling, advice), as a table, JSON, tidy CSV, and figures."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import click

from lorascope.adapter import _ranges
from lorascope.cli.options import output_options, selection_options
from lorascope.cli.output import fmt, print_csv, print_json, print_table
from lorascope.errors import MissingModuleError
from lorascope.tracking import ModuleDynamics, Run, dynamics, rank_patterns, read_run

log = logging.getLogger("lorascope.cli")

# The k@90 % trajectory in the table keeps at most this many values (first two, last three).
_MAX_K_VALUES = 6


@click.command("dynamics")
@click.argument("run_path", metavar="RUN.h5", type=click.Path(path_type=Path))
@selection_options
@output_options
@click.option(
    "--k",
    "k",
    type=click.IntRange(min=1),
    help="φ to the final update over the top-k directions. Default: each module's width.",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=0.9,
    show_default=True,
    help="φ to the final update from which a module counts as settled.",
)
@click.option(
    "--stall-tol",
    "stall_tol",
    type=click.FloatRange(min=0.0),
    default=1e-5,
    show_default=True,
    help="A relative change of ΔW per step below this counts as 'stopped moving'.",
)
@click.option(
    "--plot",
    type=click.Path(path_type=Path),
    help="Folder for the figures (dynamics_sigma, _k90, _settling_heatmap, _settling; png, pdf).",
)
def dynamics_cmd(
    run_path: Path,
    layer: int | None,
    module: str | None,
    out: str,
    k: int | None,
    threshold: float,
    stall_tol: float,
    plot: Path | None,
) -> None:
    """What a tracking file (lorascope.tracking.Tracker, LoraScopeCallback, lorascope train
    with track_every) says about each module: σ of ΔW over the steps, k@90 % of ‖ΔW‖_F², the step
    from which φ of the top directions to the final update stays >= --threshold (as compare
    --settle), and advice: a smaller rank (rank_pattern, alpha_pattern), collapse to rank one,
    a module that stopped moving. Reads runs that are still training or were killed."""
    run = read_run(run_path)
    results = _select(
        run, dynamics(run, k=k, threshold=threshold, stall_tol=stall_tol), layer, module
    )
    paths: list[Path] = []
    if plot is not None:
        from lorascope.tracking.plots import save_dynamics_figures

        paths = save_dynamics_figures(results, plot)
        log.info("wrote %s", ", ".join(str(p) for p in paths))
    if out == "json":
        print_json([d.to_dict() for d in results])
    elif out == "csv":
        _print_csv(run, results)
    else:
        _print_table(run, results, paths)


def _select(
    run: Run, results: list[ModuleDynamics], layer: int | None, module: str | None
) -> list[ModuleDynamics]:
    """``--layer`` and ``--module`` as the other commands read them: a block index; a kind
    (q, v, ...), an exact name, or a part of a name."""
    out = results
    if layer is not None:
        out = [d for d in out if d.layer == layer]
        if not out:
            layers = sorted({d.layer for d in results if d.layer is not None})
            raise MissingModuleError(
                f"{run.path}: no module at layer {layer} (layers: {_ranges(layers)})"
            )
    if module is not None:
        out = [d for d in out if module in (d.kind, d.module)] or [
            d for d in out if module in d.module
        ]
        if not out:
            kinds = sorted({d.kind for d in results})
            raise MissingModuleError(
                f"{run.path}: no module {module!r}"
                + (f" at layer {layer}" if layer is not None else "")
                + f" (kinds: {', '.join(kinds)})"
            )
    return out


# ----------------------------------------------------------------------------- table


def _measured(values: list) -> list:
    return [v for v in values if v is not None]


def _arrow(values: list, digits: int = 3) -> str | None:
    """First and last measured value, ``a→b`` (one value when they are the same snapshot)."""
    vals = _measured(values)
    if not vals:
        return None
    if len(vals) == 1:
        return fmt(vals[0], digits)
    return f"{fmt(vals[0], digits)}→{fmt(vals[-1], digits)}"


def _k_path(values: list) -> str | None:
    """The k@90 % trajectory with repeats merged: ``7→5→3`` (``7→6→…→3→2→3`` when long)."""
    vals = _measured(values)
    if not vals:
        return None
    runs = [v for t, v in enumerate(vals) if t == 0 or v != vals[t - 1]]
    if len(runs) > _MAX_K_VALUES:
        runs = [*runs[:2], "…", *runs[-3:]]
    return "→".join(str(v) for v in runs)


def _last(values: list):
    vals = _measured(values)
    return vals[-1] if vals else None


def _mean(values: list) -> float | None:
    vals = [v for v in _measured(values) if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _settled(d: ModuleDynamics) -> str | None:
    if d.settled_step is None:
        return None
    if d.factor_steps and d.settled_step == d.factor_steps[-1]:
        return f"{d.settled_step} (final)"
    return str(d.settled_step)


def _steps(steps: list[int]) -> str:
    if len(steps) <= 6:
        return ", ".join(str(s) for s in steps)
    return f"{steps[0]}, {steps[1]}, …, {steps[-1]}"


def _header(run: Run, results: list[ModuleDynamics]) -> list[str]:
    steps = [int(s) for s in run.steps]
    fsteps = [int(s) for s in run.factor_steps]
    every = run.attrs.get("every")
    total = len(run.modules)
    mods = f"{len(results)} of {total} modules" if len(results) < total else f"{total} modules"
    lines = [
        f"{run.path}: {mods}, {len(steps)} snapshot{'s' if len(steps) != 1 else ''} at steps "
        f"{steps[0]}–{steps[-1]}" + (f" (every {every})" if every else "") + ", factors stored at "
        f"{len(fsteps)} step{'s' if len(fsteps) != 1 else ''}"
        + (f" ({_steps(fsteps)})" if fsteps else "")
    ]
    if run.phi_final is not None:
        lines.append("run completed: the settling curve was written at its end")
    elif fsteps:
        lines.append(
            f"run cut off (or still running) after step {steps[-1]}: settling is measured "
            f"against the last stored factors (step {fsteps[-1]})"
        )
    else:
        lines.append(
            f"run cut off (or still running) after step {steps[-1]}: no factors stored yet, "
            "so no settling step"
        )
    i_s = sorted({d.i for d in results})
    what = f"φ({i_s[0]},{i_s[0]})" if len(i_s) == 1 else "φ(i,i), i = min(--k, r)"
    lines.append(
        f"settled at = the first stored step from which {what} of ΔW's top right singular "
        f"vectors to the final update's stays >= {fmt(results[0].threshold)}; change = "
        "‖ΔW_t − ΔW_prev‖_F / ‖ΔW_t‖_F per snapshot"
    )
    return lines


def _print_table(run: Run, results: list[ModuleDynamics], paths: list[Path]) -> None:
    for line in _header(run, results):
        click.echo(line)
    cols = [
        "module",
        "layer",
        "kind",
        "r",
        "σ1 first→last",
        "‖ΔW‖_F",
        "k@90 %",
        "settled at",
        "mean change",
        "amplif.",
    ]
    rows = [
        [
            d.module,
            d.layer,
            d.kind,
            d.nominal_rank if d.nominal_rank == d.rank else f"{d.nominal_rank} ({d.rank})",
            _arrow([None if s is None or not s else s[0] for s in d.singular_values]),
            _last(d.fro),
            _k_path(d.k90),
            _settled(d),
            _mean(d.change),
            _last(d.amplification),
        ]
        for d in results
    ]
    print_table("per module (last measured values unless stated)", cols, rows)
    advice = [line for d in results for line in d.advice()]
    if advice:
        click.echo("advice:")
        for line in advice:
            click.echo(f"  {line}")
    else:
        click.echo("advice: none (every module uses its rank; none collapsed or stopped moving)")
    ranks, alphas = rank_patterns(results)
    if len(ranks) > 1:
        click.echo(f"rank_pattern: {json.dumps(ranks)}")
        if alphas:
            click.echo(
                f"alpha_pattern: {json.dumps({k: float(f'{v:.4g}') for k, v in alphas.items()})}"
            )
    if paths:
        click.echo(f"figures: {', '.join(str(p) for p in paths)}")


# ----------------------------------------------------------------------------- csv


def _print_csv(run: Run, results: list[ModuleDynamics]) -> None:
    """One row per (module, snapshot); ``sigma_1`` .. ``sigma_K`` up to the widest module
    (empty past a module's width), ``phi_to_final`` / ``grassmann_to_final`` on the steps
    whose factors are stored."""
    K = max(d.rank for d in results)
    loss = {int(s): float(x) for s, x in zip(run.steps, run.loss, strict=True)}
    cols = [
        "module",
        "layer",
        "kind",
        "rank",
        "i",
        "step",
        "loss",
        "fro",
        *(f"sigma_{t}" for t in range(1, K + 1)),
        "effective_rank",
        "stable_rank",
        "k50",
        "k90",
        "k99",
        "phi_prev",
        "grassmann_prev",
        "change",
        "amplification",
        "factors_stored",
        "phi_to_final",
        "grassmann_to_final",
        "settled",
    ]

    def rows():
        for d in results:
            ft = {s: t for t, s in enumerate(d.factor_steps)}
            for n, step in enumerate(d.steps):
                t = ft.get(step)
                sig = list(d.singular_values[n])
                yield [
                    d.module,
                    d.layer,
                    d.kind,
                    d.rank,
                    d.i,
                    step,
                    loss[step] if math.isfinite(loss[step]) else None,
                    d.fro[n],
                    *sig,
                    *([None] * (K - len(sig))),
                    d.effective_rank[n],
                    d.stable_rank[n],
                    d.k50[n],
                    d.k90[n],
                    d.k99[n],
                    d.phi_prev[n],
                    d.grassmann_prev[n],
                    d.change[n],
                    d.amplification[n],
                    t is not None,
                    None if t is None else d.phi_to_final[t],
                    None if t is None else d.grassmann_to_final[t],
                    None if d.settled_step is None else step >= d.settled_step,
                ]

    print_csv(cols, rows())
