"""Training-time tracking of LoRA updates: snapshots of factors -> file -> dynamics.

- :class:`Tracker`: ``tracker.step(model, step)`` in any training loop;
- :class:`LoraScopeCallback`: the same as a ``transformers.TrainerCallback`` (imported lazily,
  so lorascope does not need transformers);
- :func:`read_run` / :class:`Run`: a tracking file read back (also mid-run, or after a kill);
- :func:`dynamics`: per-module trajectories, settling step, rank advice and warnings.
"""

from __future__ import annotations

from typing import Any

from lorascope.tracking.dynamics import ModuleDynamics, dynamics, rank_patterns, settling_curve
from lorascope.tracking.live import LiveModule, live_modules
from lorascope.tracking.store import Run, read_run
from lorascope.tracking.tracker import Tracker

__all__ = [
    "Tracker",
    "LoraScopeCallback",
    "Run",
    "read_run",
    "ModuleDynamics",
    "dynamics",
    "settling_curve",
    "rank_patterns",
    "LiveModule",
    "live_modules",
]


def __getattr__(name: str) -> Any:
    if name == "LoraScopeCallback":
        from lorascope.tracking.callback import LoraScopeCallback

        return LoraScopeCallback
    raise AttributeError(f"module 'lorascope.tracking' has no attribute {name!r}")
