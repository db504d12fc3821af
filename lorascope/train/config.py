"""The training configuration: one typed dataclass, read from TOML, overridden by ``key=value``.

Every field's help text lives here, once. The resolved configuration (after overrides) is saved
as ``train_config.json`` beside every adapter the trainer writes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from lorascope.errors import LoraScopeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["TrainConfig", "ConfigError", "load_config", "parse_override"]

Method = Literal["lora", "head", "full"]


class ConfigError(LoraScopeError):
    """A training configuration that is malformed or out of range."""


@dataclass
class TrainConfig:
    """What to train, on what, for how long.

    Attributes
    ----------
    train_file, test_file : str
        JSONL (or ``.jsonl.gz``) of ``{"text", "label"}``; relative paths are taken from the
        directory of the TOML file.
    out_dir : str
        Where the adapter, ``train_config.json``, ``metrics.json`` and checkpoints go.
    base : str
        Base model directory (``config.json``, ``model.safetensors``, ``tokenizer.json``);
        empty: the installed all-MiniLM-L6-v2.
    base_model_name_or_path : str
        Written into ``adapter_config.json``.
    method : {"lora", "head", "full"}
        LoRA (+ head), head only (linear probe), or full fine-tuning.
    target_modules : list of str
        Module names or suffixes for LoRA (peft semantics).
    r, alpha, dropout, use_rslora, rank_pattern, alpha_pattern :
        LoRA rank, scale numerator (``s = alpha / r``), dropout, rsLoRA, per-module overrides.
    max_len : int
        Tokens per text (truncation).
    train_subset : int
        Use a seeded random subset of this many training rows (0 = all).
    batch_size : int
        Global batch per optimizer step (split over processes and accumulation steps).
    grad_accum : int
        Micro-batches per optimizer step.
    epochs : float
        Passes over the (subset of the) training data; ``max_steps`` > 0 overrides it.
    lr, weight_decay, warmup_frac, clip :
        AdamW learning rate, decoupled weight decay (matrices only), linear-warmup fraction of
        the steps (then linear decay to 0), gradient-norm clip (0 = off).
    seed : int
        Seeds the head's init, LoRA's ``A`` init, the data order and dropout.
    eval_every, checkpoint_every : int
        Evaluate / save an adapter checkpoint every so many optimizer steps (0 = off).
    device : str
        ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    track_every : int
        Snapshot every LoRA module's spectrum every so many optimizer steps into
        ``<out_dir>/tracking.h5`` (:class:`lorascope.tracking.Tracker`; 0 = off).
    track_factors_every : int
        Store the factors in the tracking file every so many steps (a multiple of
        ``track_every``; 0 = at every snapshot). The final step always keeps them.
    threads : int
        ``torch.set_num_threads`` per process (0 = leave as is).
    progress : bool
        Show a progress bar (rank 0 only).
    """

    train_file: str = "data/debian_sections/train.jsonl.gz"
    test_file: str = "data/debian_sections/test.jsonl.gz"
    out_dir: str = "runs/lora"
    base: str = ""
    base_model_name_or_path: str = "sentence-transformers/all-MiniLM-L6-v2"
    method: Method = "lora"
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    max_len: int = 64
    train_subset: int = 0
    batch_size: int = 32
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = 0
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_frac: float = 0.06
    clip: float = 1.0
    seed: int = 0
    eval_every: int = 0
    checkpoint_every: int = 0
    device: str = "auto"
    track_every: int = 0
    track_factors_every: int = 0
    threads: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):  # types first, so the range checks below compare like with like
            default = f.default if f.default is not MISSING else f.default_factory()
            want, value = type(default), getattr(self, f.name)
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
            elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ConfigError(f"{f.name} must be of type {want.__name__}, got {value!r}")
        checks = [
            (self.method in ("lora", "head", "full"), "method must be lora, head or full"),
            (self.r >= 1, "r must be >= 1"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.max_len >= 2, "max_len must be >= 2"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size, grad_accum must be >= 1"),
            (self.epochs > 0 or self.max_steps > 0, "epochs or max_steps must be > 0"),
            (self.lr > 0, "lr must be > 0"),
            (0.0 <= self.warmup_frac < 1.0, "warmup_frac must be in [0, 1)"),
            (self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
            (bool(self.target_modules), "target_modules must not be empty"),
            (self.track_every >= 0, "track_every must be >= 0"),
            (
                self.track_factors_every >= 0
                and (self.track_every == 0 or self.track_factors_every % self.track_every == 0),
                "track_factors_every must be 0 or a multiple of track_every",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"{msg} (got {self._field_of(msg)})")

    def _field_of(self, msg: str) -> str:
        name = msg.split()[0].rstrip(",")
        return f"{name}={getattr(self, name, '?')!r}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_override(item: str) -> tuple[str, Any]:
    """``"r=8"`` -> ``("r", 8)``; the value is read as TOML (``[...]``, numbers, booleans),
    falling back to a plain string (``out_dir=runs/x``)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.strip(), parsed


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """A :class:`TrainConfig` from a TOML file (flat keys, or under ``[train]``) and overrides.

    Unknown keys are an error that names them; relative data/output paths are resolved against
    the TOML file's directory.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: {e}") from e
        raw = raw.get("train", raw)
        for k in ("train_file", "test_file", "out_dir", "base"):  # relative to the TOML file
            if raw.get(k) and not Path(raw[k]).is_absolute():
                raw[k] = os.path.normpath(path.parent / raw[k])
    for item in overrides:  # relative paths here are relative to the working directory
        k, v = parse_override(item)
        raw[k] = v
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path or '--set'}: unknown keys {unknown} (known: {sorted(known)})")
    try:
        return TrainConfig(**raw)
    except (TypeError, ConfigError) as e:
        raise ConfigError(f"{path or '--set'}: {e}") from e
