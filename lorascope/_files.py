"""Atomic output: write beside the target, make it durable, rename it into place.

Every file or folder lorascope writes (adapters, merged checkpoints, reports, tracking runs,
rank patterns) goes through here, so that a reader never sees half a file and a failed run
leaves the old output as it was and nothing behind:

1. write into a hidden sibling, ``.<name>.<pid>.<random>.tmp``, in the target's own folder (a
   rename is atomic only within one file system);
2. ``fsync`` it (every file of a folder, then the folder), so that a crash after step 3 cannot
   leave a renamed but empty file;
3. rename it onto the target (a folder target is swapped: the old one is renamed aside first,
   put back if the rename fails, and removed afterwards), then ``fsync`` the parent folder so
   that the rename itself is durable.

Modes: what is committed gets the modes ``open()`` and ``mkdir()`` give a new file or folder,
``0o666`` and ``0o777`` less the umask (``0o644``/``0o755`` under the usual ``022``). Writers
that create private files (``tempfile.mkstemp``, and ``safetensors``' ``save_file``, which
writes ``0o600``) would otherwise hand their mode on to the output; :func:`commit` sets it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["sibling", "staging_dir", "commit", "write_atomic", "save_safetensors"]


def sibling(target: Path, tag: str = "tmp") -> Path:
    """A fresh hidden name beside ``target``: ``.<name>.<pid>.<8 hex>.<tag>`` (not created)."""
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{tag}")


@contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A new folder beside ``target`` (mode ``0o777`` less the umask) to build the output in;
    whatever is still in it when the block ends, normally or not, is removed."""
    tmp = sibling(target)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc``); elsewhere
    set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _settle(path: Path, *, durable: bool, umask: int) -> None:
    """Give ``path`` (not a link) the mode a new file or folder gets, and ``fsync`` it."""
    if path.is_symlink():
        return
    is_dir = path.is_dir()
    os.chmod(path, (0o777 if is_dir else 0o666) & ~umask)
    if durable:
        _fsync(path)


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk; a no-op where the platform
    cannot open folders (Windows)."""
    is_dir = path.is_dir()
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0))
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:  # some file systems (a few FUSE mounts) do not support fsync on folders
        if not is_dir:
            raise
    finally:
        os.close(fd)


def commit(src: Path, target: Path, *, durable: bool = True) -> None:
    """Move the finished ``src`` (a file or folder beside ``target``) onto ``target``.

    Before the rename every file gets mode ``0o666`` and every folder ``0o777``, less the
    umask, and with ``durable`` (the default) is ``fsync``-ed. A file replaces ``target`` in
    one ``os.replace``. A folder replacing an existing folder is swapped in two renames (the
    old one aside, the new one in; the old one is put back if the second fails) and the old
    one is then removed. With ``durable`` the parent folder is ``fsync``-ed after the rename.
    """
    umask = _umask()
    if src.is_dir() and not src.is_symlink():
        for here, _, files in os.walk(src):
            for name in files:
                _settle(Path(here) / name, durable=durable, umask=umask)
            _settle(Path(here), durable=durable, umask=umask)
    else:
        _settle(src, durable=durable, umask=umask)
    if src.is_dir() and target.is_dir() and not target.is_symlink():
        old = sibling(target, "old")
        os.rename(target, old)
        try:
            os.rename(src, target)
        except OSError:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, target)
    if durable:
        _fsync(target.absolute().parent)


def write_atomic(target: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (``str`` as UTF-8) to ``target`` atomically: a sibling, ``fsync``, rename.

    On any failure ``target`` is left as it was and the sibling is removed.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = write_atomic(Path(d) / "x.json", "{}\\n")
    ...     p.read_text(), sorted(f.name for f in Path(d).iterdir())
    ('{}\\n', ['x.json'])
    """
    target = Path(target)
    tmp = sibling(target)
    try:
        with open(tmp, "wb") as f:  # 0o666 less the umask, as any new file
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        commit(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def save_safetensors(
    tensors: dict, target: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file(tensors, target, metadata)``, atomically and with the usual
    mode (``save_file`` alone creates ``0o600`` files, even where ``open()`` would not)."""
    from safetensors.torch import save_file

    target = Path(target)
    tmp = sibling(target)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        commit(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
