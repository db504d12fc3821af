"""Options shared by the analysis commands: how to read, what to select, how to compute, what
to print."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import click
import torch

from lorascope.adapter import FUSED_PARTS
from lorascope.formats import FORMATS, load_adapter, load_base
from lorascope.hub import resolve_path

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _parse_enable_lora(value: str | None) -> list[bool] | None:
    """``q,v`` or ``1,0,1`` -> ``[True, False, True]`` (loralib ``MergedLinear.enable_lora``)."""
    if value is None:
        return None
    items = [v.strip().lower() for v in value.split(",") if v.strip()]
    if all(v in FUSED_PARTS for v in items):
        return [p in items for p in FUSED_PARTS]
    if all(v in ("0", "1", "true", "false") for v in items):
        return [v in ("1", "true") for v in items]
    raise click.BadParameter("expected parts like 'q,v' or flags like '1,0,1'")


def reading_options(f: Callable) -> Callable:
    """Options that say how to read an adapter when the file does not.

    An adapter argument may be a Hub name ``org/name[/sub][@rev]`` already in the local
    Hugging Face cache (:func:`~lorascope.formats.load_adapter` resolves it).

    The command gets ``read(path, sizes_from=None)``: ``sizes_from`` (a base checkpoint; the
    commands that take ``--base`` pass theirs) supplies layer sizes the file does not record
    (PEFT VeRA), unless ``--sizes-from`` names one.
    """

    @click.option("--alpha", type=float, help="LoRA alpha when the file does not store it.")
    @click.option(
        "--enable-lora",
        metavar="PARTS",
        help="Fused (MergedLinear) parts that carry LoRA, e.g. 'q,v' (loralib files).",
    )
    @click.option(
        "--format",
        "fmt",
        type=click.Choice(list(FORMATS)),
        help="Skip format detection.",
    )
    @click.option(
        "--sizes-from",
        "sizes_from",
        type=click.Path(path_type=Path),
        help="Base checkpoint giving layer sizes the adapter does not record (PEFT VeRA).",
    )
    @functools.wraps(f)
    def wrapper(*args, alpha, enable_lora, fmt, sizes_from, **kwargs):
        flags = _parse_enable_lora(enable_lora)

        def read(path: Path, sizes_from_base: Path | None = None):
            src = sizes_from or sizes_from_base
            return load_adapter(
                path,
                fmt=fmt,
                alpha=alpha,
                enable_lora=flags,
                in_features=None if src is None else load_base(src).input_sizes(),
            )

        return f(*args, read=read, **kwargs)

    return wrapper


def selection_options(f: Callable) -> Callable:
    f = click.option(
        "--module",
        "module",
        help="Only this kind (q, k, v, o, up, down, gate; q/k/v split fused c_attn) or name.",
    )(f)
    return click.option("--layer", type=int, help="Only this block index (e.g. 48).")(f)


def precision_options(f: Callable) -> Callable:
    """``--dtype`` and ``--device`` of the linear algebra, passed on as torch objects."""

    @click.option(
        "--dtype",
        type=click.Choice(list(_DTYPES)),
        default="float64",
        show_default=True,
        help="Analysis precision (factors are upcast).",
    )
    @click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
    @functools.wraps(f)
    def wrapper(*args, dtype, device, **kwargs):
        return f(*args, dtype=_DTYPES[dtype], device=torch.device(device), **kwargs)

    return wrapper


def compute_options(f: Callable) -> Callable:
    """:func:`precision_options` and the ``--seed`` of the random baselines / start vectors."""
    f = click.option(
        "--seed",
        type=click.IntRange(0, 2**63 - 1),  # what torch.Generator.manual_seed accepts
        default=0,
        show_default=True,
        help="Random baselines.",
    )(f)
    return precision_options(f)


def output_options(f: Callable) -> Callable:
    @click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="JSON instead of a table (analyses: one object per module; see README, JSON output).",
    )
    @click.option("--csv", "as_csv", is_flag=True, help="Tidy CSV.")
    @functools.wraps(f)
    def wrapper(*args, as_json, as_csv, **kwargs):
        if as_json and as_csv:
            raise click.UsageError("--json and --csv are exclusive")
        return f(*args, out="json" if as_json else "csv" if as_csv else "table", **kwargs)

    return wrapper


def base_delta_options(f: Callable) -> Callable:
    """``--base W --delta ADAPTER`` of the commands that relate ΔW to the pre-trained W."""
    f = click.option(
        "--delta",
        "delta_path",
        required=True,
        type=click.Path(path_type=Path),
        help="The adapter.",
    )(f)
    return click.option(
        "--base",
        "base_path",
        required=True,
        type=click.Path(path_type=Path),
        callback=local_path,
        help="Pre-trained weights: a tensor .pt, a state dict, a HF dir or index.json, or a "
        "cached Hub model org/name[@rev].",
    )(f)


def local_path(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """Click callback: a Hub name ``org/name[/sub][@rev]`` becomes the folder the local Hugging
    Face cache holds for it (:func:`lorascope.hub.resolve_path`, never a download), so that
    every later step (a merge copying the base's config files) sees a real path."""
    return None if value is None else resolve_path(value)


method_option = click.option(
    "--method",
    type=click.Choice(["auto", "exact", "iterative"]),
    default="auto",
    show_default=True,
    help="How W's top singular subspace is found: exact SVD, or ARPACK (iterative) for large W.",
)


def side_option(default: str, help: str) -> Callable:
    """``--side right|left``: input-side (right, ``V``, in R^d_in) or output-side (left, ``U``)
    singular directions; each command states what it compares and its default."""
    return click.option(
        "--side",
        type=click.Choice(["right", "left"]),
        default=default,
        show_default=True,
        help=help,
    )
