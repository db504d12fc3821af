"""Write an :class:`~lorascope.adapter.Adapter` back to disk: PEFT, kohya or lorascope ``.h5``.

:func:`save_adapter` is the one entry point (``lorascope resize`` uses it). It writes into a
hidden temporary sibling of ``out``, reads the result back with lorascope's own reader and
checks every module's factors and scale, and only then renames it into place: a failure leaves
``out`` as it was and nothing behind. It never writes over, into or around the adapter it read.

=========  ===================================================================================
format     what is written
=========  ===================================================================================
peft       a ``save_pretrained`` directory. From a PEFT source: its config (``r``,
           ``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` rewritten), its non-LoRA tensors
           (``modules_to_save``, LoRA biases) copied, conv/embedding factors in its stored
           shapes. From other sources: a minimal LoraConfig whose ``target_modules`` are the
           exact module names.
kohya      one sd-scripts ``.safetensors`` file (:func:`lorascope.formats.kohya.write_kohya`),
           key spellings, conv kernel shapes, other tensors and metadata from the source file.
hdf5       lorascope's normalized ``.h5`` (:func:`lorascope.formats.hdf5.save_h5`), any source and
           family (DoRA magnitudes included).
=========  ===================================================================================

PEFT's ``rank_pattern``/``alpha_pattern`` keys are regular expressions that peft (0.21,
``utils/other.py``, ``get_pattern_key``) matches as ``re.match(rf"(.*\\.)?({key})$", name)``
against module names without ``base_model.model.``, first match in dict order.
:func:`rank_pattern_config` writes plain module names (what peft itself writes), except for a
name that would also match another module, which gets the exact ``^``-anchored, escaped form;
so every key matches exactly its own module and the result does not depend on key order.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lorascope._files import commit, staging_dir, write_atomic
from lorascope.adapter import Adapter, LoraModule, alpha_from_scale
from lorascope.errors import FormatError, LoraScopeError
from lorascope.formats._common import (
    HDF5_SUFFIXES,
    check_finite,
    one_line,
    parse_lora_key,
    read_json,
    read_tensors,
)
from lorascope.formats.hdf5 import read_h5, save_h5
from lorascope.formats.kohya import read_kohya, write_kohya
from lorascope.formats.peft import (
    ADAPTER_FILES,
    CONFIG_FILE,
    pattern_key,
    read_peft,
    write_peft_adapter,
)

__all__ = [
    "OUT_FORMATS",
    "save_adapter",
    "check_out",
    "rank_pattern_config",
    "save_rank_pattern",
]

OUT_FORMATS = ("peft", "kohya", "hdf5")
# Module names peft patterns can hold as they are (anything else is written re.escape'd).
_PLAIN_NAME = re.compile(r"[\w.\-]+")


# ----------------------------------------------------------------------------- target checks


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _refuse_input(out: Path, inputs: Iterable[str | Path | None]) -> None:
    """``out`` must not be an input, hold one, or lie inside one (a PEFT directory)."""
    target = out.resolve()
    for src in inputs:
        if not src:
            continue
        p = Path(src).resolve()
        if _within(p, target) or _within(target, p):
            raise LoraScopeError(f"{out}: is, holds or lies inside the input {src}; choose another")


def _resolve_format(adapter: Adapter, out: Path, fmt: str | None) -> str:
    if fmt is not None:
        fmt = "hdf5" if fmt.lower() in ("h5", "hdf5") else fmt.lower()
        if fmt not in OUT_FORMATS:
            raise FormatError(
                f"{out}: cannot write format {fmt!r} (choose {', '.join(OUT_FORMATS)})"
            )
        return fmt
    if out.suffix.lower() in HDF5_SUFFIXES:
        return "hdf5"
    if adapter.format == "kohya":
        return "kohya"
    if out.suffix.lower() == ".safetensors":
        raise FormatError(
            f"{out}: a PEFT adapter is a directory; name one without .safetensors, or write NAME.h5"
        )
    return "peft"


def check_out(
    adapter: Adapter,
    out: str | Path,
    *,
    fmt: str | None = None,
    template: str | Path | None = None,
    force: bool = False,
) -> str:
    """The format :func:`save_adapter` would write ``adapter`` to ``out`` in, after the checks
    it makes before writing (call it first to fail before a long computation).

    ``fmt`` by default: ``hdf5`` for a ``.h5``/``.hdf5`` path, ``kohya`` for a kohya adapter,
    else ``peft``.

    Raises
    ------
    LoraScopeError
        ``out`` is, holds or lies inside the adapter's path or ``template``; ``out`` exists
        (without ``force``) or is of the wrong kind (a file where a PEFT directory goes, a
        directory where a file goes). ``FormatError`` for an unknown ``fmt``.
    """
    out = Path(out)
    fmt = _resolve_format(adapter, out, fmt)
    _refuse_input(out, (adapter.path, template))
    if not (out.exists() or out.is_symlink()):
        return fmt
    if out.is_symlink():
        raise LoraScopeError(f"{out}: is a symbolic link; not replacing it")
    if fmt == "peft":
        if not out.is_dir():
            raise LoraScopeError(f"{out}: exists and is not a directory (a PEFT adapter is one)")
        if not force and any(out.iterdir()):
            raise LoraScopeError(f"{out}: exists (pass --force to replace it)")
    else:
        if out.is_dir():
            raise LoraScopeError(f"{out}: is a directory, expected a file path for {fmt}")
        if not force:
            raise LoraScopeError(f"{out}: exists (pass --force to replace it)")
    return fmt


# ----------------------------------------------------------------------------- API


def save_adapter(
    adapter: Adapter,
    out: str | Path,
    *,
    fmt: str | None = None,
    template: str | Path | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
) -> str:
    """Write ``adapter`` to ``out`` as a PEFT directory, a kohya file or a lorascope ``.h5``.

    Every module's ``ΔW = scale · B @ A`` (``A`` ``(r, d_in)``, ``B`` ``(d_out, r)``) is what
    the written file gives back: PEFT with per-module ``rank_pattern``/``alpha_pattern`` (alpha
    ``= scale·r``, rsLoRA ``scale·sqrt(r)``), kohya with an ``alpha`` tensor ``= scale·r``.

    Parameters
    ----------
    adapter : Adapter
        E.g. the output of :func:`lorascope.analysis.rank.resize` (same ``path``/``format``).
    out : str or Path
        A directory (PEFT) or a file (kohya ``.safetensors``, ``.h5``).
    fmt : {"peft", "kohya", "hdf5"}, optional
        Default: ``hdf5`` for a ``.h5``/``.hdf5`` ``out``, ``kohya`` for a kohya adapter, else
        ``peft``.
    template : str or Path, optional
        The adapter the modules came from, for what lorascope does not model (PEFT config and
        non-LoRA tensors; kohya key spellings, metadata, LyCORIS modules; conv kernel shapes).
        Default: ``adapter.path`` when ``adapter.format`` is the output format.
    dtype : torch.dtype, optional
        dtype of the written factors (default: as in memory).
    force : bool
        Replace an existing ``out`` (a PEFT directory keeps its other files). Never an input.

    Returns
    -------
    str
        The format written.

    Raises
    ------
    LoraScopeError
        See :func:`check_out`. ``FormatError``: a kohya adapter to PEFT (its names are not the
        model's module paths), a fused part to PEFT or kohya, DoRA (its magnitude vectors would
        be lost), an unwritable path. ``NonFiniteError`` when ``dtype`` overflows.
    """
    out = Path(out)
    fmt = check_out(adapter, out, fmt=fmt, template=template, force=force)
    if template is None and adapter.format == fmt and fmt in ("peft", "kohya") and adapter.path:
        template = adapter.path if Path(adapter.path).exists() else None
    dora = next((m for m in adapter if m.is_dora), None)
    if dora is not None and fmt != "hdf5":
        raise _dora(dora.source)
    other = next((m for m in adapter if m.family != "lora"), None)
    if other is not None and fmt != "hdf5":
        raise FormatError(
            f"{other.tensor_name()}: a {other.family} module; write a plain-LoRA extraction "
            "(lorascope.analysis.resize) or a .h5 file"
        )
    if dtype is not None:
        modules = [replace(m, A=m.A.to(dtype), B=m.B.to(dtype)) for m in adapter]
        for m in modules:
            check_finite(m.A, m.source, f"{m.key} A (as {dtype})")
            check_finite(m.B, m.source, f"{m.key} B (as {dtype})")
        adapter = replace(adapter, modules=modules)

    write: Callable[[Path], None]
    if fmt == "hdf5":

        def write(tmp: Path) -> None:
            save_h5(adapter, tmp)

    elif fmt == "kohya":
        tensors, metadata = read_tensors(Path(template)) if template is not None else ({}, {})
        if any(k.endswith(".dora_scale") for k in tensors):
            raise _dora(template)

        def write(tmp: Path) -> None:
            write_kohya(adapter.modules, tmp, template=tensors, metadata=metadata)

    else:
        files, config = _peft_files(adapter, template)

        def write(tmp: Path) -> None:
            write_peft_adapter(files, config, tmp)

    _write_atomic(out, fmt, force, write, adapter)
    return fmt


def _dora(source: object) -> FormatError:
    return FormatError(
        f"{source}: DoRA adapter: its magnitude vectors cannot be carried over, so the written "
        "adapter would not be the same update"
    )


# ----------------------------------------------------------------------------- PEFT


def _number(v: float) -> int | float:
    """``16.0`` -> ``16`` (peft configs hold ints where they can), other floats as they are."""
    return int(v) if float(v).is_integer() else float(v)


def _most_common(values: Iterable[Any]) -> Any:
    """The most frequent value; ties go to the largest."""
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def _pattern(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
    """The ``rank_pattern``/``alpha_pattern`` giving each module ``values[name]`` under peft's
    matching, with ``default`` for the rest; every key matches exactly one module."""
    names = list(values)
    pattern: dict[str, Any] = {}
    for name in sorted(n for n in names if values[n] != default):
        key = name
        if not _PLAIN_NAME.fullmatch(name) or any(
            other != name and re.match(rf"(.*\.)?({name})$", other) for other in names
        ):
            key = "^" + re.escape(name)  # only `name` itself: no prefix, no wildcard dots
        pattern[key] = values[name]
    for name in names:  # the contract, checked under peft's own rule
        key = pattern_key(pattern, name)
        if (pattern[key] if key is not None else default) != values[name]:
            raise RuntimeError(f"pattern key {key!r} resolves {name} wrongly (a lorascope bug)")
    return pattern


def rank_pattern_config(ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict[str, Any]:
    """``r``, ``lora_alpha``, ``rank_pattern`` and ``alpha_pattern`` of a PEFT LoraConfig that
    gives module ``name`` rank ``ranks[name]`` and alpha ``alphas[name]``.

    ``r`` is the most common rank (ties: the larger), ``lora_alpha`` the most common alpha among
    the modules of rank ``r``; the patterns list the other modules under their names (see the
    module docstring for the keys), sorted.

    Examples
    --------
    >>> rank_pattern_config({"a.q": 4, "a.v": 2, "b.q": 4}, {"a.q": 8.0, "a.v": 4.0, "b.q": 8.0})
    {'r': 4, 'lora_alpha': 8, 'rank_pattern': {'a.v': 2}, 'alpha_pattern': {'a.v': 4}}
    """
    if not ranks:
        raise FormatError("no modules to write a rank_pattern for")
    r = _most_common(ranks.values())
    lora_alpha = _number(_most_common(alphas[n] for n in ranks if ranks[n] == r))
    return {
        "r": int(r),
        "lora_alpha": lora_alpha,
        "rank_pattern": _pattern({n: int(k) for n, k in ranks.items()}, r),
        "alpha_pattern": _pattern({n: _number(alphas[n]) for n in ranks}, lora_alpha),
    }


def save_rank_pattern(
    adapter: Adapter, suggestions: Mapping[str, tuple[int, float]], path: str | Path
) -> dict[str, Any]:
    """Write a suggested partial PEFT LoraConfig as JSON (replacing ``path``) and return it.

    ``{"r", "lora_alpha", "rank_pattern", "alpha_pattern"}`` from :func:`rank_pattern_config`,
    plus ``target_modules`` (the exact module names) and ``use_rslora`` (the adapter's), so
    that ``LoraConfig(**json.load(f))`` builds modules of exactly the suggested ranks and
    alphas; merge it into a training config to use other targets.

    Parameters
    ----------
    adapter : Adapter
        Where the suggestions come from (a kohya adapter is refused: its names are not the
        model's module paths).
    suggestions : mapping of str to (int, float)
        ``{module name: (k, alpha_k)}``, e.g. :func:`lorascope.analysis.rank.suggest_ranks`.
    path : str or Path
        A ``.json`` file; never the adapter or a file inside it.
    """
    path = Path(path)
    if adapter.format == "kohya":
        raise FormatError(
            f"{adapter.path}: kohya module names are not the model's module paths, which a PEFT "
            "rank_pattern needs"
        )
    _refuse_input(path, (adapter.path,))
    if path.is_dir():
        raise LoraScopeError(f"{path}: is a directory, expected a .json file path")
    config = rank_pattern_config(
        {n: k for n, (k, _) in suggestions.items()}, {n: a for n, (_, a) in suggestions.items()}
    )
    config["target_modules"] = sorted(suggestions)
    config["use_rslora"] = bool(adapter.config.get("use_rslora", False))
    try:
        write_atomic(path, json.dumps(config, indent=2) + "\n")
    except OSError as e:
        raise FormatError(f"{path}: cannot write: {one_line(e)}") from None
    return config


def _peft_alpha(m: LoraModule, rslora: bool) -> float:
    """The alpha that gives ``m.scale`` at ``m.rank`` (``m.alpha`` when it does)."""
    alpha = alpha_from_scale(m.scale, m.rank, rslora)
    if m.alpha is not None and abs(m.alpha - alpha) <= 1e-12 * abs(alpha):
        return float(m.alpha)
    return alpha


def _peft_files(adapter: Adapter, template: str | Path | None) -> tuple[dict, dict]:
    """The tensors and ``adapter_config.json`` of ``adapter`` as a PEFT adapter."""
    if adapter.format == "kohya":
        raise FormatError(
            f"{adapter.path}: kohya module names do not map to a PEFT model; write kohya or "
            "a .h5 file instead"
        )
    stored: dict[str, torch.Tensor] = {}
    if template is not None:
        folder = Path(template) if Path(template).is_dir() else Path(template).parent
        weights = next((folder / f for f in ADAPTER_FILES if (folder / f).is_file()), None)
        if weights is None:
            raise FormatError(f"{template}: no {' or '.join(ADAPTER_FILES)} (not a PEFT adapter)")
        config = read_json(folder / CONFIG_FILE)
        if str(config.get("peft_type", "LORA")).upper() != "LORA":  # an extraction from LoHa, ...
            return _peft_files(adapter, None)
        stored = read_tensors(weights)[0]
        if config.get("use_dora") or any(".lora_magnitude_vector" in k for k in stored):
            raise _dora(template)
        rslora = bool(config.get("use_rslora", False))
    else:
        rslora = bool(adapter.config.get("use_rslora", False))
        config = {
            "fan_in_fan_out": all(bool(m.fan_in_fan_out) for m in adapter),
            "use_rslora": rslora,
        }
    tensors: dict[str, torch.Tensor] = {}
    for key, t in stored.items():  # modules_to_save, LoRA biases: copied
        parsed = parse_lora_key(key)
        if parsed is None or parsed[3] == "bias":
            tensors[key] = t
    for m in adapter:
        tensors.update(_module_tensors(m, stored))
    config.update(
        rank_pattern_config(
            {m.name: m.rank for m in adapter}, {m.name: _peft_alpha(m, rslora) for m in adapter}
        )
    )
    return tensors, config


def _module_tensors(m: LoraModule, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``m``'s factors under PEFT keys, in the shapes the original file stored them in."""
    if m.part is not None:
        raise FormatError(
            f"{m.tensor_name()}: a part of a fused (MergedLinear) module has no PEFT layout; "
            "write a .h5 file instead (--out NAME.h5)"
        )
    if any(".lora_embedding_" in k for k in m.keys):
        # the reader turned lora_embedding_B (dim, r) into A and lora_embedding_A (r, n) into B
        return {f"{m.name}.lora_embedding_A": m.B.T, f"{m.name}.lora_embedding_B": m.A.T}
    A, B = m.A, m.B  # (k, d_in), (d_out, k)
    if len(m.keys) == 2 and m.keys[0] in stored and m.keys[1] in stored:
        A = A.reshape(m.rank, *stored[m.keys[0]].shape[1:])  # conv: (k, in, kh, kw)
        B = B.reshape(m.d_out, m.rank, *stored[m.keys[1]].shape[2:])  # conv: (out, k, 1, 1)
    return {f"{m.name}.lora_A.weight": A, f"{m.name}.lora_B.weight": B}


# ----------------------------------------------------------------------------- atomic write


def _write_atomic(
    path: Path, fmt: str, force: bool, write: Callable[[Path], None], expected: Adapter
) -> None:
    """Write into a temporary sibling, read it back and check it, then move it into place, so a
    failed run leaves ``path`` as it was and nothing behind."""
    is_dir = fmt == "peft"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with staging_dir(path) as tmp_dir:  # a fresh sibling with the usual (umask) mode
            tmp = tmp_dir if is_dir else tmp_dir / path.name
            write(tmp)
            _verify(tmp, fmt, expected)
            if not is_dir:
                commit(tmp, path)
            elif not path.exists() or not any(path.iterdir()):
                commit(tmp_dir, path)
            else:  # force into an existing adapter directory: replace its adapter files
                for stale in ADAPTER_FILES:
                    (path / stale).unlink(missing_ok=True)
                for f in list(tmp_dir.iterdir()):
                    commit(f, path / f.name)
    except OSError as e:
        raise FormatError(f"{path}: cannot write: {one_line(e)}") from None


def _verify(path: Path, fmt: str, expected: Adapter) -> None:
    """The written adapter must read back as exactly the modules given (same factors and
    scales): a mismatch is a bug in lorascope, not bad input."""
    reader = {"peft": read_peft, "kohya": read_kohya, "hdf5": read_h5}[fmt]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = {m.key: m for m in reader(path)}
    for m in expected:
        got = back.get(m.key)
        if (
            got is None
            or got.A.shape != m.A.shape
            or not torch.equal(got.A.to(m.A.dtype), m.A)
            or not torch.equal(got.B.to(m.B.dtype), m.B)
            or abs(got.scale - m.scale) > 1e-9 * abs(m.scale)
        ):
            raise RuntimeError(f"{path}: {m.key} did not read back as written (a lorascope bug)")
