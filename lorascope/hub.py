"""Hugging Face Hub names, offline: ``org/name[/sub/folder][@rev]`` → a folder in the local cache.

Wherever lorascope takes an adapter or a base checkpoint it also takes a Hub repository id that
is already in the local Hugging Face cache (``hf download org/name`` put it there). The name is
resolved with ``huggingface_hub``'s own cache lookup, ``snapshot_download(...,
local_files_only=True)``, which reads ``refs/`` and ``snapshots/`` and never opens a connection:
lorascope never downloads anything.

=========================  =====================================================================
argument                   resolves to
=========================  =====================================================================
``org/name``               ``snapshots/<sha>`` of the commit ``refs/main`` names
``org/name@v1.0``          the commit the branch or tag ``v1.0`` named when it was downloaded
``org/name@<40-hex sha>``  that commit's snapshot, if it is cached
``org/name/sub[@rev]``     ``sub`` inside the snapshot: PEFT adapters that share one repository
                           sit in subfolders (``save_pretrained`` of several adapters), and a
                           single file (``org/name/adapter_model.safetensors``) works the same
=========================  =====================================================================

A path that exists on disk always wins over a Hub name, so ``out/adapter`` is the local
folder whenever there is one. Names without an organization (``gpt2``) are not looked up: they
would shadow every missing local file name.

The cache folder is found as ``huggingface_hub`` finds it, but when the call is made, not when
``huggingface_hub`` was imported: ``HF_HUB_CACHE`` (or the legacy ``HUGGINGFACE_HUB_CACHE``),
else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
``~/.cache/huggingface/hub``.

``huggingface_hub`` is the optional extra ``hub`` (``transformers`` and ``peft`` already depend
on it); without it a Hub name is refused with a one-line message saying what to install.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lorascope.errors import FormatError

__all__ = ["HubName", "parse_hub_name", "hub_cache_dir", "resolve_path"]

log = logging.getLogger(__name__)

# One component of a repository id as the Hub allows it (huggingface_hub's REPO_ID_REGEX): word
# characters, '-', '.'; not starting or ending with '-' or '.'; at most 96 characters.
_PART = r"(?![.-])[\w.-]{1,96}(?<![.-])"
_REPO = re.compile(rf"{_PART}/{_PART}")
_SUB = re.compile(r"[\w.-]+")


@dataclass(frozen=True)
class HubName:
    """A parsed Hub argument: ``repo_id`` (``org/name``), ``revision`` (None: ``main``) and
    ``subfolder`` (``""``: the snapshot itself)."""

    repo_id: str
    revision: str | None = None
    subfolder: str = ""

    def __str__(self) -> str:
        name = self.repo_id + (f"/{self.subfolder}" if self.subfolder else "")
        return name + (f"@{self.revision}" if self.revision else "")


def parse_hub_name(text: str) -> HubName | None:
    """``org/name[/sub/folder][@rev]`` as a :class:`HubName`; None when ``text`` cannot be one.

    The revision follows the first ``@`` and may hold ``/`` (``@refs/pr/1``). Absolute paths,
    paths starting with ``.`` or ``~``, names with fewer than two components and components
    the Hub does not allow are not Hub names.

    >>> parse_hub_name("org/name/sub@refs/pr/1")
    HubName(repo_id='org/name', revision='refs/pr/1', subfolder='sub')
    >>> str(parse_hub_name("org/name")), parse_hub_name("/abs/path"), parse_hub_name("a.h5")
    ('org/name', None, None)
    """
    if not text or text[0] in "/.~\\" or "\\" in text or "\x00" in text:
        return None
    name, at, revision = text.partition("@")
    if at and (not revision or revision.startswith("/") or ".." in revision.split("/")):
        return None
    parts = name.split("/")
    if len(parts) < 2 or not _REPO.fullmatch("/".join(parts[:2])):
        return None
    sub = parts[2:]
    if any(p in ("", ".", "..") or not _SUB.fullmatch(p) for p in sub):
        return None
    return HubName("/".join(parts[:2]), revision or None, "/".join(sub))


def hub_cache_dir() -> tuple[Path, str]:
    """The Hugging Face cache folder in use now, and how it was chosen (for messages).

    Read from the environment at each call, in ``huggingface_hub.constants``' order:
    ``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``$HF_HOME/hub``,
    ``$XDG_CACHE_HOME/huggingface/hub``, ``~/.cache/huggingface/hub``.
    """
    env = os.environ

    def expand(p: str) -> Path:
        return Path(os.path.expandvars(os.path.expanduser(p)))

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return expand(env[var]), f"{var}={env[var]}"
    if env.get("HF_HOME"):
        return expand(env["HF_HOME"]) / "hub", f"HF_HOME={env['HF_HOME']}"
    home = os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    cache = expand(home) / "hub"
    return cache, str(cache)


def resolve_path(path: str | Path) -> Path:
    """``path`` itself when it exists (or is not a Hub name), else the cached Hub folder it names.

    Parameters
    ----------
    path : str or Path
        A local file or folder, or ``org/name[/sub/folder][@rev]`` (see :func:`parse_hub_name`).

    Returns
    -------
    Path
        The local path unchanged, or ``<cache>/models--org--name/snapshots/<sha>[/sub]``
        (whose files are links into ``blobs/``).

    Raises
    ------
    FormatError
        A Hub name whose repository or revision is not in the local cache, a subfolder the
        cached snapshot lacks, or ``huggingface_hub`` not installed. Nothing is downloaded.
    """
    p = Path(path)
    try:
        if p.exists() or p.is_symlink():
            return p
    except (OSError, ValueError):  # a name too long or with a NUL byte: the reader says so
        return p
    name = parse_hub_name(str(path))
    if name is None:
        return p
    cache, where = hub_cache_dir()
    get = f"hf download {name.repo_id}" + (f" --revision {name.revision}" if name.revision else "")
    missing = f"{path}: no such file, and not in the local Hugging Face cache ({where})"
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        raise FormatError(
            f"{missing}; reading Hub names needs huggingface_hub: pip install 'lorascope[hub]'"
        ) from None
    try:
        folder = snapshot_download(
            name.repo_id,
            revision=name.revision,
            cache_dir=cache,
            local_files_only=True,  # never the network: only refs/ and snapshots/ are read
        )
    except LocalEntryNotFoundError as e:  # also an incomplete snapshot (IncompleteSnapshotError)
        detail = "" if type(e) is LocalEntryNotFoundError else f" ({' '.join(str(e).split())})"
        raise FormatError(f"{missing}{detail}: {get}") from None
    except (HFValidationError, OSError) as e:
        raise FormatError(f"{missing}: {' '.join(str(e).split())}") from None
    out = Path(folder) / name.subfolder if name.subfolder else Path(folder)
    if not out.exists():
        raise FormatError(
            f"{path}: the cached snapshot {Path(folder).name[:12]} of {name.repo_id} has no "
            f"{name.subfolder}: {get}"
        )
    log.info("%s -> %s", path, out)
    return out
