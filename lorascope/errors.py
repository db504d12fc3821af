"""One exception family for everything a user can get wrong.

Every error a bad input can cause is a :class:`LoraScopeError`: its message is one line that
names the file and, where there is one, the tensor. The CLI turns these into ``error: ...`` on
stderr and exit status 2; anything else that escapes is a bug in lorascope (exit status 1).
"""

from __future__ import annotations

__all__ = [
    "LoraScopeError",
    "FormatError",
    "UnsafeFileError",
    "ShapeError",
    "NonFiniteError",
    "ZeroUpdateError",
    "MissingModuleError",
    "LoraScopeWarning",
]


class LoraScopeError(Exception):
    """Base class of every error caused by bad input (files, tensors, options).

    The message is kept to one line whatever it quotes: a tensor name or path from a hostile
    file may hold newlines or other control characters, which are shown escapes (``\\n``)."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_printable(args[0]),)
        super().__init__(*args)


def _printable(text: str) -> str:
    """``text`` with control characters (newlines, tabs, escapes) written as escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class FormatError(LoraScopeError):
    """A file that cannot be read as an adapter or base checkpoint (truncated, empty, unknown)."""


class UnsafeFileError(FormatError):
    """A pickle that asks to run code or build objects other than tensors; it is never loaded."""


class ShapeError(LoraScopeError):
    """Tensors whose shapes disagree (A vs B, ΔW vs the base weight, a rank vs the config)."""


class NonFiniteError(LoraScopeError):
    """A factor or base weight holding NaN or Inf."""


class ZeroUpdateError(LoraScopeError):
    """An update ΔW = s·B A that is exactly zero (e.g. an untrained adapter with B = 0)."""


class MissingModuleError(LoraScopeError):
    """A layer, module kind or tensor that the input does not have."""


class LoraScopeWarning(UserWarning):
    """Something the user should know that does not stop the analysis (e.g. an assumed alpha)."""
