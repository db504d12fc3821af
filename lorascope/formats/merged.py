"""Write a base checkpoint again with some of its tensors replaced: the writer of
``lorascope merge`` (the arithmetic lives in :mod:`lorascope.update`, the glue in
:mod:`lorascope.merge`).

The output mirrors the input: a single file gives a single file; a sharded checkpoint gives the
same shards with the same tensors in each and a new ``*.index.json``; a Hugging Face model
directory gives a directory with the same file names and its other files (``config.json``,
tokenizer files, ...) copied, so ``transformers`` loads it as it loaded the base. Torch inputs
(``.bin``/``.pt``) come out as ``.safetensors`` (``pytorch_model*.bin`` -> ``model*.safetensors``).

Tensors that no caller replaces are copied through byte for byte (cast when a ``dtype`` is
given). Memory: one tensor in flight (:func:`~lorascope.formats.base.write_safetensors`), never
the model.

Safety: the output is written into a hidden sibling directory and renamed into place at the end
(:mod:`lorascope._files`: usual file modes, fsync-ed), so a failure leaves nothing behind; an
existing ``out`` is never overwritten unless asked (``force``), and the inputs never are.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorascope._files import commit, staging_dir
from lorascope.errors import FormatError, LoraScopeError, NonFiniteError
from lorascope.formats._common import TORCH_SUFFIXES, one_line, read_json
from lorascope.formats.base import BaseWeights, write_safetensors
from lorascope.hub import resolve_path

__all__ = ["WrittenCheckpoint", "write_checkpoint", "check_writable", "out_name"]

log = logging.getLogger(__name__)

# Files that hold a model's weights (in some format): never copied from a base directory's top
# level, where they are the base itself, or the same unmerged model in another format.
_WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES, ".h5", ".msgpack", ".gguf", ".onnx")
# Sub-folders that hold exports of the unmerged model.
_EXPORT_DIRS = ("onnx", "openvino")
_INDEX = ".index.json"


@dataclass
class WrittenCheckpoint:
    """What :func:`write_checkpoint` wrote.

    Attributes
    ----------
    files : list of str
        Weight files written (relative to ``out`` for a directory; the index last, if any).
    names : dict of str to str
        Tensor key -> the output file (as in ``files``) now holding it.
    copied_tensors : int
        Tensors not replaced, written unchanged (cast only when ``dtype`` was given).
    copied_files, skipped_files : list of str
        Other files of a base directory copied along, and weight files of other formats left out.
    converted : bool
        The base was a torch file (``.bin``/``.pt``) and is now safetensors.
    bytes_written : int
        Tensor data written.
    """

    files: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    copied_tensors: int = 0
    copied_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    converted: bool = False
    bytes_written: int = 0


def write_checkpoint(
    base: BaseWeights,
    out: str | Path,
    replace: Callable[[str, torch.Tensor, str, str], torch.Tensor],
    targets: Collection[str],
    *,
    dtype: torch.dtype | None = None,
    force: bool = False,
    inputs: Collection[str | Path] = (),
) -> WrittenCheckpoint:
    """Write ``base`` to ``out`` with the tensors in ``targets`` replaced, atomically.

    Parameters
    ----------
    base : BaseWeights
        The checkpoint read (:func:`~lorascope.formats.load_base`): a model directory, an index,
        or one ``.safetensors`` / torch state dict.
    out : str or Path
        Ends in ``.safetensors``: one file (the base must be a single file). Otherwise a
        directory: the base's weight files under the same names (torch ones renamed to
        ``.safetensors``), a new index for a sharded base, and, when the base is a directory,
        its other files (config, tokenizer, ...; weight files of other formats are left out).
    replace : callable
        ``replace(key, W, where, name)`` returns the new tensor for a key in ``targets``, given
        the stored tensor ``W`` (read with NaN/Inf refused; never write into it), ``"file: key"``
        for messages and the output file's name; its shape must be ``W``'s and its dtype
        ``dtype or W.dtype``.
    targets : collection of str
        Keys to replace; every other tensor is copied as stored.
    dtype : torch.dtype, optional
        Cast every floating tensor to it; ``config.json``'s ``torch_dtype``/``dtype`` follow.
    force : bool
        Replace an existing ``out`` (a ``.safetensors`` file or a model directory; never an
        input, never a directory that contains one).
    inputs : collection of path
        Other files ``out`` must not be or contain (the adapter).

    Raises
    ------
    FormatError
        A bare-tensor ``.pt``, shards outside the index's folder, unwritable output.
    NonFiniteError
        A copied tensor that overflows ``dtype`` when cast.
    LoraScopeError
        ``out`` exists (without ``force``), is an input, or lies inside the base directory.
    """
    base_path, out = resolve_path(base.path), Path(out)  # org/name: its cached snapshot
    check_writable(base)
    entry, files = base.entry, base.files()
    sharded = entry.name.endswith(_INDEX)
    single = out.suffix == ".safetensors"
    if single and (sharded or len(files) > 1):
        raise LoraScopeError(
            f"{out}: the base {base.path} is sharded ({len(files)} files); give a directory"
        )
    root = entry.parent
    names: dict[Path, str] = {}
    for f in files:
        try:
            rel = f.relative_to(root).as_posix()
        except ValueError:
            raise FormatError(f"{entry}: shard {f} lies outside {root}") from None
        if ".." in Path(rel).parts:
            raise FormatError(f"{entry}: shard {rel} lies outside {root}")
        names[f] = out.name if single else out_name(rel)
    if len(set(names.values())) != len(names):
        raise FormatError(f"{entry}: two weight files would both be written as the same name")
    base_dir = base_path if base_path.is_dir() else None
    _check_out(out, [*files, entry, *map(Path, inputs)], base_dir, single, force)

    written = WrittenCheckpoint(
        converted=any(f.suffix.lower() in TORCH_SUFFIXES for f in files),
        names={key: names[base.file_of(key)] for key in base.keys()},
    )
    parent = out.absolute().parent
    created = [p for p in (parent, *parent.parents) if not p.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    try:
        with staging_dir(out.absolute()) as tmp:  # removed on the way out, whatever happens
            _write(base, set(targets), replace, files, names, tmp, dtype, written)
            if sharded:
                written.files.append(_write_index(base, entry, names, tmp, written))
            if base_dir is not None and not single:
                _copy_others(base_dir, tmp, set(written.files), dtype, written)
            # a file replaces out in one rename; a folder is swapped in (the old one removed)
            commit(tmp / out.name if single else tmp, out)
    except BaseException:
        for p in created:  # the folders made for out, deepest first, if still empty
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return written


def check_writable(base: BaseWeights) -> None:
    """Refuse a base that is one bare tensor (a ``.pt`` of a single weight): no state dict to
    write. Callers check before planning anything, so this is the first error."""
    if base.keys() == [""]:
        raise FormatError(
            f"{base.entry}: holds one bare tensor, not a state dict; "
            "there is no checkpoint to write"
        )


def out_name(name: str) -> str:
    """The safetensors name of a weight file: ``pytorch_model-00001-of-00002.bin`` ->
    ``model-00001-of-00002.safetensors``; ``adapter.pt`` -> ``adapter.safetensors``."""
    if name.endswith(_INDEX):
        inner = out_name(name[: -len(_INDEX)])
        return inner + _INDEX
    stem, suffix = os.path.splitext(name)
    if suffix.lower() not in TORCH_SUFFIXES:
        return name
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model") :]
    return stem + ".safetensors"


# ----------------------------------------------------------------------------- the target


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_out(
    out: Path, inputs: list[Path], base_dir: Path | None, single: bool, force: bool
) -> bool:
    """Refuse an ``out`` that is, contains or sits inside an input, or that exists and may not
    be replaced; return whether it exists."""
    target = out.resolve()
    for p in inputs:
        if _is_within(p.resolve(), target):
            raise LoraScopeError(f"{out}: is (or contains) the input {p}; choose another --out")
    if base_dir is not None and _is_within(target, base_dir.resolve()):
        raise LoraScopeError(f"{out}: lies inside the base model directory {base_dir}")
    if not (out.exists() or out.is_symlink()):
        return False
    if not force:
        raise LoraScopeError(f"{out}: already exists; choose another --out (or --force)")
    if single:
        looks_like = out.is_file()
    else:
        looks_like = out.is_dir() and (
            any(out.glob("*.safetensors")) or any(out.glob(f"*{_INDEX}"))
        )
    if out.is_symlink() or not looks_like:
        what = "a .safetensors file" if single else "a model directory (*.safetensors)"
        raise LoraScopeError(f"{out}: exists and is not {what}; not replacing it")
    return True


# ----------------------------------------------------------------------------- writing


def _write(
    bw: BaseWeights,
    targets: set[str],
    replace: Callable[[str, torch.Tensor, str, str], torch.Tensor],
    files: list[Path],
    names: dict[Path, str],
    tmp: Path,
    dtype: torch.dtype | None,
    written: WrittenCheckpoint,
) -> None:
    """Every weight file, one tensor in flight: replaced where asked, else copied."""
    by_file: dict[Path, list[str]] = {f: [] for f in files}
    for key in bw.keys():
        by_file[bw.file_of(key)].append(key)
    for f in files:
        name = names[f]
        specs = []
        for key in by_file[f]:
            shape, stored = bw.info(key)
            cast = dtype is not None and stored.is_floating_point
            specs.append((key, shape, dtype if cast else stored))

        def produce(key: str, f: Path = f, name: str = name) -> torch.Tensor:
            where = f"{f}: {key}"
            if key in targets:
                return replace(key, bw.tensor(key), where, name)  # NaN/Inf in W is an error
            t = bw.tensor(key, check=False)  # not ours to judge: copied as stored
            written.copied_tensors += 1
            if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)
                if not bool(torch.isfinite(t).all()):
                    raise NonFiniteError(f"{where}: overflows {dtype} when cast")
            return t

        meta = {**bw.metadata(f), "format": "pt"}
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("writing %s", target.name)
        try:
            written.bytes_written += write_safetensors(target, specs, produce, meta)
        except OSError as e:
            raise FormatError(f"{target}: cannot write: {one_line(e)}") from None
        written.files.append(name)


def _write_index(
    bw: BaseWeights,
    entry: Path,
    names: dict[Path, str],
    tmp: Path,
    written: WrittenCheckpoint,
) -> str:
    """A new ``*.index.json``: the same keys, mapped to the output file names."""
    index = read_json(entry)
    metadata = index.get("metadata")
    metadata = dict(metadata) if isinstance(metadata, dict) else {}  # informational only
    metadata["total_size"] = written.bytes_written
    index = {
        **index,
        "metadata": metadata,
        "weight_map": {key: names[bw.file_of(key)] for key in bw.keys()},
    }
    name = out_name(entry.name)
    (tmp / name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return name


def _copy_others(
    base_dir: Path,
    tmp: Path,
    written_files: set[str],
    dtype: torch.dtype | None,
    written: WrittenCheckpoint,
) -> None:
    """The base directory's other files (config, tokenizer, sub-folders), without weights."""
    for dirpath, dirnames, filenames in os.walk(base_dir):
        here = Path(dirpath)
        rel = here.relative_to(base_dir)
        top = rel == Path(".")
        keep = []
        for d in sorted(dirnames):
            if d.startswith(".") or (top and d in _EXPORT_DIRS):
                written.skipped_files.append((rel / d).as_posix() + "/")
            else:
                keep.append(d)
        dirnames[:] = keep
        for fname in sorted(filenames):
            src, relname = here / fname, (rel / fname).as_posix()
            if relname in written_files:
                continue
            if top and (fname.endswith(_INDEX) or fname.lower().endswith(_WEIGHT_SUFFIXES)):
                written.skipped_files.append(relname)
                continue
            dst = tmp / relname
            dst.parent.mkdir(parents=True, exist_ok=True)
            if top and fname == "config.json" and dtype is not None:
                _copy_config(src, dst, dtype)
            else:
                shutil.copyfile(src, dst)
            written.copied_files.append(relname)


def _copy_config(src: Path, dst: Path, dtype: torch.dtype) -> None:
    """``config.json`` with its ``torch_dtype``/``dtype`` set to the new dtype."""
    try:
        cfg = json.loads(src.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        shutil.copyfile(src, dst)
        return
    name = str(dtype).removeprefix("torch.")
    if isinstance(cfg, dict):
        for k in ("torch_dtype", "dtype"):
            if k in cfg:
                cfg[k] = name
    dst.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
