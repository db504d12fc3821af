"""gguf adapters (reader not written yet: claims nothing)."""

from __future__ import annotations

from lorascope.errors import FormatError


def _claims(probe) -> bool:
    return False


def _read(probe, options):
    raise FormatError(f"{probe.path}: the gguf layout is not supported yet")


LAYOUT = ("gguf", _claims, _read, "")
