"""The registry of layouts: which reader claims a file, in a fixed order.

A :class:`Layout` is a name, a detector (``Probe -> bool``: does this file look like mine?) and
a reader (``(Probe, ReadOptions) -> Adapter``). :data:`LAYOUTS` lists them most specific first:
containers that say what they are (HDF5, GGUF), then directories and files a library names
(mlx-lm, torchtune, diffusers, PEFT), then key conventions (kohya/LyCORIS, loralib), and last
the generic ``plain`` reader. Adding a layout is one module with a ``LAYOUT`` and one line here.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorascope.errors import FormatError
from lorascope.formats import diffusers, gguf, hdf5, kohya, loralib, mlx, peft, plain, torchtune
from lorascope.formats._common import Detector, Probe, Reader

__all__ = ["Layout", "LAYOUTS", "detect"]


@dataclass(frozen=True)
class Layout:
    """One on-disk layout: ``name``, ``claims(probe)`` and ``read(probe, options)``."""

    name: str
    claims: Detector
    read: Reader
    description: str = ""


def _layout(module) -> Layout:
    name, claims, read, description = module.LAYOUT
    return Layout(name, claims, read, description)


LAYOUTS: tuple[Layout, ...] = tuple(
    _layout(m) for m in (hdf5, gguf, mlx, torchtune, diffusers, peft, kohya, loralib, plain)
)


def detect(probe: Probe, fmt: str | None = None) -> Layout:
    """The layout named ``fmt``, else the first in :data:`LAYOUTS` that claims ``probe``.

    Raises
    ------
    FormatError
        Nothing claims it: says what was expected and what the file holds.
    """
    if fmt is not None:
        return next(layout for layout in LAYOUTS if layout.name == fmt)
    for layout in LAYOUTS:
        if layout.claims(probe):
            return layout
    if probe.container == "dir":
        listed = ", ".join(sorted(p.name for p in probe.path.iterdir())[:5]) or "nothing"
        raise FormatError(
            f"{probe.path}: not an adapter directory (PEFT adapter_config.json + "
            f"adapter_model.*, mlx-lm adapters.safetensors, diffusers pytorch_lora_weights, "
            f"torchtune adapter_model.pt); it holds: {listed}"
        )
    if probe.container in ("hdf5", "gguf"):
        raise FormatError(f"{probe.path}: not a lorascope HDF5 or GGUF LoRA file")
    keys = probe.keys
    some = ", ".join(keys[:3]) or "none"
    raise FormatError(
        f"{probe.path}: no LoRA tensors found (expected lora_A/lora_B or lora_down/lora_up keys; "
        f"saw: {some})"
    )
