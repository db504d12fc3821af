"""``python -m benchmarks.fuzz``: a seeded mutation fuzzer over every layout lorascope reads and
writes (issue 11), checking the README's contract on files from strangers.

The contract: bad input ends in a :class:`~lorascope.errors.LoraScopeError` with a one-line
message (CLI: one line ``error: ...`` on stderr, exit status 2); no number is ever NaN/Inf;
nothing hangs, nothing allocates what a file merely claims, no file runs code.

How a run works
---------------
1. A seed corpus is written into a temporary directory by this module itself, with plain
   torch/safetensors/h5py/json/gguf and ``lorascope.formats.save_h5``: PEFT (LoRA as
   safetensors and .bin, DoRA, AdaLoRA, VeRA, LoHa, LoKr), kohya (LoRA and LyCORIS LoHa), loralib,
   plain .safetensors/.pt, lorascope .h5, GGUF (when ``gguf`` imports), mlx-lm, torchtune,
   diffusers; and base checkpoints (single-tensor .pt, state-dict .safetensors and .bin, a
   sharded directory with ``model.safetensors.index.json``), each with a small matching adapter.
2. Case ``i`` of seed ``S`` is a (layout, mutation class) pair from a seeded round robin, and a
   mutation drawn with ``random.Random(f"{S}/{i}")``: byte, header, tensor, config, hdf5, path
   or pickle level (``none``: the clean seed, a control). Every case is reproducible from
   ``(S, i)``: ``python -m benchmarks.fuzz --seed S --case i --keep DIR``.
3. Each case runs in a ``fork()`` of this process (lorascope and torch are imported once), with
   ``RLIMIT_AS`` and a wall-clock timeout: load the adapter, then ``spectrum``,
   ``similarity(a, a)``, ``rank`` (energy 0.9), the numbers ``inspect`` prints, and sometimes
   ``save_adapter`` + reload; for a base: ``load_base``, ``amplify``, ``weight_similarity`` per
   module and sometimes ``merge_adapter``. Every number returned is checked finite.
4. Outcomes: ``ok``, ``lorascope_error`` (one-line message) are fine; ``bad_message`` (a
   lorascope error of several lines), ``other_exception``, ``non_finite``, ``coerced`` (a config
   value of the wrong type read as something it does not say), ``hang``, ``oom`` (MemoryError,
   an allocation failure, or the child killed), ``crash`` (any other signal) and ``code_ran``
   (a pickle payload's canary file exists) are failures.
5. A CLI sample runs ``lorascope.cli.main`` on mutated files in forked children with stdout and
   stderr on files: exit status must be 0 or 2; on 2, exactly one non-warning line on stderr,
   starting with ``error:``; on 0, no ``nan``/``inf`` in the output.

Usage::

    python -m benchmarks.fuzz --cases 10000 --cli 300 --seed 0 --out FUZZ.md
    python -m benchmarks.fuzz --seed 0 --case 1234 --keep /tmp/case1234   # one case, verbose
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import math
import os
import pickle
import platform
import random
import re
import resource
import select
import shlex
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import h5py
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorascope.analysis import RankRule, amplify, rank, similarity, spectrum, weight_similarity
from lorascope.cli.main import main as cli_main  # imported once: children share one version
from lorascope.errors import LoraScopeError
from lorascope.formats import FORMATS, load_adapter, load_base, save_adapter, save_h5
from lorascope.merge import merge_adapter

try:
    import gguf
except Exception:  # optional: the GGUF seed is left out without it
    gguf = None

D_IN, D_OUT, R, ALPHA = 16, 12, 4, 8.0
GOOD = ("ok", "lorascope_error")
OUTCOMES = (
    *GOOD,
    *"bad_message other_exception non_finite coerced hang oom crash code_ran".split(),
)
CLASSES = ("none", "byte", "header", "tensor", "config", "hdf5", "path", "pickle")
CANARY = "CANARY"
ROOT = Path(__file__).resolve().parent.parent


# ============================================================================ seed corpus


@dataclass(frozen=True)
class FileSpec:
    """One file of a seed that mutations may touch: its path in the seed and its container."""

    rel: str
    container: str  # safetensors, torch, json, hdf5, gguf


@dataclass(frozen=True)
class Seed:
    """A clean input: ``kind`` adapter or base; ``entry`` is what the API is given; ``files``
    the mutable files; ``adapter`` (bases only) the matching adapter, never mutated."""

    name: str
    kind: str
    entry: str
    files: tuple[FileSpec, ...]
    adapter: str | None = None
    sibling_config: bool = False  # a reader that looks for adapter_config.json beside the file

    def containers(self) -> set[str]:
        return {f.container for f in self.files}


def _modules(n: int) -> list[str]:
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    return names[:n]


def _gen(tag: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int.from_bytes(tag.encode()[:7].ljust(7, b"\0"), "little"))
    return g


def _randn(g: torch.Generator, *shape: int, std: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std


PEFT_LORA_CONFIG: dict[str, Any] = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": None,
    "r": R,
    "lora_alpha": ALPHA,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "v_proj"],
    "fan_in_fan_out": False,
    "bias": "none",
    "use_rslora": False,
    "use_dora": False,
    "init_lora_weights": True,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "layers_to_transform": None,
    "inference_mode": True,
}


def _peft_lora(d: Path, n: int = 4, fmt: str = "safetensors", dora: bool = False) -> None:
    d.mkdir(parents=True, exist_ok=True)
    g = _gen(f"peft{n}{dora}")
    tensors = {}
    for name in _modules(n):
        pre = f"base_model.model.{name}"
        tensors[f"{pre}.lora_A.weight"] = _randn(g, R, D_IN)
        tensors[f"{pre}.lora_B.weight"] = _randn(g, D_OUT, R)
        if dora:
            tensors[f"{pre}.lora_magnitude_vector"] = 1 + _randn(g, D_OUT).abs()
    cfg = dict(PEFT_LORA_CONFIG, use_dora=dora)
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    if fmt == "safetensors":
        save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(tensors, d / "adapter_model.bin")


def _peft_family(d: Path, family: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    g = _gen(family)
    tensors: dict[str, torch.Tensor] = {}
    base = {k: v for k, v in PEFT_LORA_CONFIG.items() if k not in ("use_dora", "use_rslora")}
    for name in _modules(4):
        pre = f"base_model.model.{name}"
        if family == "ADALORA":
            tensors[f"{pre}.lora_A"] = _randn(g, R, D_IN)
            tensors[f"{pre}.lora_B"] = _randn(g, D_OUT, R)
            tensors[f"{pre}.lora_E"] = _randn(g, R, 1)
        elif family == "VERA":
            tensors[f"{pre}.vera_lambda_b"] = _randn(g, D_OUT)
            tensors[f"{pre}.vera_lambda_d"] = _randn(g, R)
        elif family == "LOHA":
            for w in ("w1", "w2"):
                tensors[f"{pre}.hada_{w}_a"] = _randn(g, D_OUT, R)
                tensors[f"{pre}.hada_{w}_b"] = _randn(g, R, D_IN)
        elif family == "LOKR":  # out 12 = 3·4, in 16 = 4·4; r = 1: w1 full, w2 low rank
            tensors[f"{pre}.lokr_w1"] = _randn(g, 3, 4)
            tensors[f"{pre}.lokr_w2_a"] = _randn(g, 4, 1)
            tensors[f"{pre}.lokr_w2_b"] = _randn(g, 1, 4)
    if family == "ADALORA":
        cfg = dict(base, peft_type="ADALORA", r=8, init_r=R, target_r=2, rank_pattern=None)
        cfg.update(tinit=0, tfinal=0, deltaT=1, total_step=10)
    elif family == "VERA":
        cfg = dict(base, peft_type="VERA", projection_prng_key=0, save_projection=True)
        cfg.update(d_initial=0.1, vera_dropout=0.0)
        cfg.pop("lora_alpha")
        tensors["base_model.vera_A"] = _randn(g, R, D_IN)
        tensors["base_model.vera_B"] = _randn(g, D_OUT, R)
    elif family == "LOHA":
        cfg = dict(base, peft_type="LOHA", alpha=ALPHA, rank_dropout=0.0, module_dropout=0.0)
        cfg.update(use_effective_conv2d=False)
        cfg.pop("lora_alpha")
    else:
        cfg = dict(base, peft_type="LOKR", r=1, alpha=2.0, rank_dropout=0.0, module_dropout=0.0)
        cfg.update(use_effective_conv2d=False, decompose_both=False, decompose_factor=-1)
        cfg.pop("lora_alpha")
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})


GGUF_KV: tuple[tuple[str, str, Any], ...] = (
    ("general.type", "str", "adapter"),
    ("adapter.type", "str", "lora"),
    ("adapter.lora.alpha", "f32", ALPHA),
)


def write_gguf(path: Path, arrays: dict[str, np.ndarray], kv: Iterable[tuple[str, str, Any]]):
    """A GGUF LoRA file as llama.cpp's converter writes it (``arrays`` in torch orientation)."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    for key, kind, value in kv:
        if kind == "str":
            w.add_string(key, value)
        elif kind == "f32":
            w.add_float32(key, value)
        elif kind == "u64":
            w.add_uint64(key, value)
        elif kind == "i32":
            w.add_int32(key, value)
        elif kind == "arr":
            w.add_array(key, value)
        elif kind == "bool":
            w.add_bool(key, value)
    for name, a in arrays.items():
        w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_corpus(root: Path) -> dict[str, Seed]:
    """Write every seed under ``root`` (one directory per seed); return them by name."""
    seeds: list[Seed] = []

    def add(name: str, kind: str, entry: str, files: list[tuple[str, str]], **kw) -> None:
        seeds.append(Seed(name, kind, entry, tuple(FileSpec(*f) for f in files), **kw))

    js = "adapter_config.json"
    _peft_lora(root / "peft_st")
    add("peft_st", "adapter", ".", [("adapter_model.safetensors", "safetensors"), (js, "json")])
    _peft_lora(root / "peft_bin", fmt="bin")
    add("peft_bin", "adapter", ".", [("adapter_model.bin", "torch"), (js, "json")])
    _peft_lora(root / "peft_dora", dora=True)
    add("peft_dora", "adapter", ".", [("adapter_model.safetensors", "safetensors"), (js, "json")])
    for fam in ("ADALORA", "VERA", "LOHA", "LOKR"):
        name = f"peft_{fam.lower()}"
        _peft_family(root / name, fam)
        add(name, "adapter", ".", [("adapter_model.safetensors", "safetensors"), (js, "json")])

    g = _gen("kohya")
    kohya, loha = {}, {}
    for p in ("to_q", "to_v"):
        pre = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_{p}"
        kohya[f"{pre}.lora_down.weight"] = _randn(g, R, D_IN)
        kohya[f"{pre}.lora_up.weight"] = _randn(g, D_OUT, R)
        kohya[f"{pre}.alpha"] = torch.tensor(ALPHA)
        for w in ("w1", "w2"):
            loha[f"{pre}.hada_{w}_a"] = _randn(g, D_OUT, R)
            loha[f"{pre}.hada_{w}_b"] = _randn(g, R, D_IN)
        loha[f"{pre}.alpha"] = torch.tensor(ALPHA)
    meta = {"ss_network_dim": str(R), "ss_network_alpha": str(ALPHA)}
    (root / "kohya").mkdir()
    save_file(kohya, str(root / "kohya/lora.safetensors"), metadata=meta)
    add("kohya", "adapter", "lora.safetensors", [("lora.safetensors", "safetensors")])
    (root / "kohya_loha").mkdir()
    meta_loha = dict(meta, ss_network_module="lycoris.kohya", ss_network_args='{"algo": "loha"}')
    save_file(loha, str(root / "kohya_loha/loha.safetensors"), metadata=meta_loha)
    add("kohya_loha", "adapter", "loha.safetensors", [("loha.safetensors", "safetensors")])

    g = _gen("loralib")
    lib = {}
    for i in range(2):
        lib[f"transformer.h.{i}.attn.q_proj.lora_A"] = _randn(g, R, D_IN)
        lib[f"transformer.h.{i}.attn.q_proj.lora_B"] = _randn(g, D_OUT, R)
    (root / "loralib").mkdir()
    torch.save(lib, root / "loralib/lora.pt")
    add("loralib", "adapter", "lora.pt", [("lora.pt", "torch")], sibling_config=True)

    g = _gen("plain")
    plain = {}
    for name in _modules(2):
        plain[f"{name}.lora_A.weight"] = _randn(g, R, D_IN)
        plain[f"{name}.lora_B.weight"] = _randn(g, D_OUT, R)
    (root / "plain_st").mkdir()
    save_file(plain, str(root / "plain_st/plain.safetensors"))
    add(
        "plain_st",
        "adapter",
        "plain.safetensors",
        [("plain.safetensors", "safetensors")],
        sibling_config=True,
    )
    (root / "plain_pt").mkdir()
    torch.save(
        {"lora_A": _randn(g, R, D_IN), "lora_B": _randn(g, D_OUT, R)}, root / "plain_pt/w.pt"
    )
    add("plain_pt", "adapter", "w.pt", [("w.pt", "torch")], sibling_config=True)

    (root / "hdf5").mkdir()
    save_h5(load_adapter(root / "peft_st"), root / "hdf5/adapter.h5")
    add("hdf5", "adapter", "adapter.h5", [("adapter.h5", "hdf5")])

    if gguf is not None:
        g = _gen("gguf")
        arrays = {}
        for i in range(2):
            arrays[f"blk.{i}.attn_q.weight.lora_a"] = _randn(g, R, D_IN).numpy()
            arrays[f"blk.{i}.attn_q.weight.lora_b"] = _randn(g, D_OUT, R).numpy()
        (root / "gguf").mkdir()
        write_gguf(root / "gguf/adapter.gguf", arrays, GGUF_KV)
        add("gguf", "adapter", "adapter.gguf", [("adapter.gguf", "gguf")])

    g = _gen("mlx")
    mlx = {}
    for name in _modules(4):
        mlx[f"{name}.lora_a"] = _randn(g, D_IN, R)  # mlx orientation: (d_in, r)
        mlx[f"{name}.lora_b"] = _randn(g, R, D_OUT)  # (r, d_out)
    (root / "mlx").mkdir()
    save_file(mlx, str(root / "mlx/adapters.safetensors"))
    mlx_cfg = {
        "fine_tune_type": "lora",
        "num_layers": 2,
        "model": "tiny-llama",
        "lora_parameters": {
            "rank": R,
            "scale": 2.0,
            "dropout": 0.0,
            "keys": ["self_attn.q_proj", "self_attn.v_proj"],
        },
    }
    (root / "mlx" / js).write_text(json.dumps(mlx_cfg, indent=2))
    add("mlx", "adapter", ".", [("adapters.safetensors", "safetensors"), (js, "json")])

    g = _gen("torchtune")
    tt = {}
    for i in range(2):
        for p in ("q_proj", "v_proj"):
            tt[f"layers.{i}.attn.{p}.lora_a.weight"] = _randn(g, R, D_IN)
            tt[f"layers.{i}.attn.{p}.lora_b.weight"] = _randn(g, D_OUT, R)
    (root / "torchtune").mkdir()
    torch.save(tt, root / "torchtune/adapter_model.pt")
    add("torchtune", "adapter", ".", [("adapter_model.pt", "torch")], sibling_config=True)

    g = _gen("diffusers")
    dif = {}
    for p in ("to_q", "to_v"):
        pre = f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.{p}"
        dif[f"{pre}.lora_A.weight"] = _randn(g, R, D_IN)
        dif[f"{pre}.lora_B.weight"] = _randn(g, D_OUT, R)
    dif_meta = {
        "unet.r": R,
        "unet.lora_alpha": ALPHA,
        "unet.rank_pattern": {},
        "unet.alpha_pattern": {},
        "unet.use_rslora": False,
        "unet.use_dora": False,
        "unet.peft_type": "LORA",
        "unet.fan_in_fan_out": False,
        "unet.target_modules": ["to_q", "to_v"],
    }
    (root / "diffusers").mkdir()
    save_file(
        dif,
        str(root / "diffusers/pytorch_lora_weights.safetensors"),
        metadata={"format": "pt", "lora_adapter_metadata": json.dumps(dif_meta)},
    )
    name = "pytorch_lora_weights.safetensors"
    add("diffusers", "adapter", name, [(name, "safetensors")])

    # ---- base checkpoints, each with a matching (never mutated) PEFT adapter
    g = _gen("base")
    weights = {f"{n}.weight": _randn(g, D_OUT, D_IN, std=1.0) for n in _modules(4)}
    weights["model.embed_tokens.weight"] = _randn(g, 32, D_IN, std=1.0)
    (root / "base_st/base").mkdir(parents=True)
    save_file(weights, str(root / "base_st/base/model.safetensors"), metadata={"format": "pt"})
    _peft_lora(root / "base_st/adapter")
    add(
        "base_st",
        "base",
        "base/model.safetensors",
        [("base/model.safetensors", "safetensors")],
        adapter="adapter",
    )
    (root / "base_bin/base").mkdir(parents=True)
    torch.save(weights, root / "base_bin/base/pytorch_model.bin")
    _peft_lora(root / "base_bin/adapter")
    add(
        "base_bin",
        "base",
        "base/pytorch_model.bin",
        [("base/pytorch_model.bin", "torch")],
        adapter="adapter",
    )
    (root / "base_pt").mkdir()
    torch.save(weights[f"{_modules(1)[0]}.weight"].clone(), root / "base_pt/W.pt")
    _peft_lora(root / "base_pt/adapter", n=1)
    add("base_pt", "base", "W.pt", [("W.pt", "torch")], adapter="adapter")
    shard_dir = root / "base_sharded/base"
    shard_dir.mkdir(parents=True)
    keys = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: weights[k].half() for k in ks}, str(shard_dir / fname), {"format": "pt"})
        weight_map.update(dict.fromkeys(ks, fname))
    index = {"metadata": {"total_size": sum(weights[k].numel() * 2 for k in keys)}}
    index["weight_map"] = weight_map
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    _peft_lora(root / "base_sharded/adapter")
    add(
        "base_sharded",
        "base",
        "base",
        [
            ("base/model.safetensors.index.json", "json"),
            *((f"base/{f}", "safetensors") for f in shards),
        ],
        adapter="adapter",
    )
    return {s.name: s for s in seeds}


# ============================================================================ containers


def st_raw(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed, in order) and its data section."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def st_write_raw(path: Path, header: bytes | str | dict, data: bytes, n: int | None = None):
    """Write a safetensors file from a header (text or dict) and data, padding to 8 bytes."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode("utf-8", "surrogatepass")
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header) if n is None else n) + header + data)


def read_container(path: Path, container: str) -> tuple[dict[str, torch.Tensor], Any]:
    """The tensors of a seed file (and what is needed to write them back)."""
    if container == "safetensors":
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    if container == "torch":
        obj = torch.load(path, weights_only=True)
        return ({"": obj} if isinstance(obj, torch.Tensor) else dict(obj)), None
    if container == "hdf5":
        out: dict[str, torch.Tensor] = {}
        with h5py.File(path, "r") as f:
            f.visititems(
                lambda n, o: (
                    out.__setitem__(n, torch.from_numpy(np.asarray(o[()])))
                    if isinstance(o, h5py.Dataset)
                    else None
                )
            )
        return out, None
    if container == "gguf":
        reader = gguf.GGUFReader(str(path))
        return {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}, None
    raise ValueError(container)


def write_container(
    path: Path, container: str, tensors: dict[str, torch.Tensor], meta: Any = None
) -> None:
    """Write ``tensors`` back in ``container`` (torch: any tensor subclass or view as given)."""
    if container == "safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    elif container == "torch":
        obj = tensors[""] if list(tensors) == [""] else tensors
        torch.save(obj, path)
    elif container == "hdf5":
        with h5py.File(path, "r+") as f:
            old: dict[str, Any] = {}
            f.visititems(
                lambda n, o: old.__setitem__(n, o) if isinstance(o, h5py.Dataset) else None
            )
            for name in old:
                if name not in tensors:
                    del f[name]
            for name, t in tensors.items():
                attrs = dict(f[name].attrs) if name in f else {}
                if name in f:
                    del f[name]
                ds = f.create_dataset(name, data=t.detach().numpy())
                for k, v in attrs.items():
                    ds.attrs[k] = v
    elif container == "gguf":
        write_gguf(path, {k: v.detach().numpy() for k, v in tensors.items()}, meta or GGUF_KV)
    else:
        raise ValueError(container)


# ============================================================================ mutations


@dataclass
class Case:
    """One fuzz case: where its files are, what was done to them, what the child runs."""

    seed_value: int
    index: int
    seed: Seed
    cls: str
    dir: Path
    rng: random.Random
    entry: Path
    companion: Path | None
    mutation: str = ""
    desc: str = ""
    drop_dac: bool = False  # run as root without CAP_DAC_*: modes bind
    oracle: tuple | None = None  # ("bool", field, json value) / ("int", field, json value)
    do_write: bool = False
    do_merge: bool = False
    load_kwargs: dict = field(default_factory=dict)  # options given to load_adapter
    notes: list[str] = field(default_factory=list)

    @property
    def canary(self) -> Path:
        return self.dir / CANARY

    @property
    def out(self) -> Path:
        """Where the case writes (outside ``dir``, which a mutation may lock)."""
        return self.dir.with_name(self.dir.name + ".out")

    def pick_file(self, containers: Iterable[str] | None = None) -> tuple[Path, str]:
        files = [f for f in self.seed.files if containers is None or f.container in containers]
        f = self.rng.choice(files)
        return self.dir / f.rel, f.container

    def torch_gen(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.rng.getrandbits(62))
        return g


@dataclass(frozen=True)
class Mutator:
    name: str
    cls: str
    applies: Callable[[Seed], bool]
    fn: Callable[[Case], str]


MUTATORS: list[Mutator] = []


def mutator(cls: str, applies: Callable[[Seed], bool] = lambda s: True):
    def deco(fn: Callable[[Case], str]) -> Callable[[Case], str]:
        MUTATORS.append(Mutator(fn.__name__, cls, applies, fn))
        return fn

    return deco


def has(*containers: str) -> Callable[[Seed], bool]:
    return lambda s: bool(s.containers() & set(containers))


# ---------------------------------------------------------------------------- none


@mutator("none")
def clean(case: Case) -> str:
    return "unchanged seed"


# ---------------------------------------------------------------------------- byte level


def _biased_offset(rng: random.Random, size: int) -> int:
    """Offsets near the start (headers, magic, lengths) more often than uniform."""
    if size <= 1:
        return 0
    if rng.random() < 0.5:
        return rng.randrange(min(size, 256))
    return rng.randrange(size)


@mutator("byte")
def bit_flips(case: Case) -> str:
    path, _ = case.pick_file()
    data = bytearray(path.read_bytes())
    k = case.rng.choice((1, 1, 2, 4, 8, 32))
    offs = []
    for _ in range(k):
        o = _biased_offset(case.rng, len(data))
        data[o] ^= 1 << case.rng.randrange(8)
        offs.append(o)
    path.write_bytes(bytes(data))
    return f"{path.name}: {k} bit flip(s) at {offs[:4]}"


@mutator("byte")
def truncate(case: Case) -> str:
    path, _ = case.pick_file()
    size = path.stat().st_size
    at = case.rng.choice((0, 1, 7, 8, 9, _biased_offset(case.rng, size), size - 1, size // 2))
    at = max(0, min(at, size - 1))
    with open(path, "r+b") as f:
        f.truncate(at)
    return f"{path.name}: truncated to {at} of {size} bytes"


@mutator("byte")
def insert_bytes(case: Case) -> str:
    path, _ = case.pick_file()
    data = path.read_bytes()
    at = _biased_offset(case.rng, len(data))
    n = case.rng.choice((1, 3, 8, 64, 4096))
    blob = case.rng.randbytes(n)
    path.write_bytes(data[:at] + blob + data[at:])
    return f"{path.name}: {n} random bytes inserted at {at}"


@mutator("byte")
def overwrite_bytes(case: Case) -> str:
    path, _ = case.pick_file()
    data = bytearray(path.read_bytes())
    at = _biased_offset(case.rng, len(data))
    n = min(case.rng.choice((1, 4, 8, 16, 256)), len(data) - at)
    data[at : at + n] = case.rng.randbytes(n)
    path.write_bytes(bytes(data))
    return f"{path.name}: {n} bytes overwritten at {at}"


@mutator("byte")
def zero_fill(case: Case) -> str:
    path, _ = case.pick_file()
    data = bytearray(path.read_bytes())
    at = _biased_offset(case.rng, len(data))
    n = min(case.rng.choice((8, 64, 1024, len(data))), len(data) - at)
    data[at : at + n] = bytes(n)
    path.write_bytes(bytes(data))
    return f"{path.name}: {n} bytes zeroed at {at}"


@mutator("byte")
def append_garbage(case: Case) -> str:
    path, _ = case.pick_file()
    n = case.rng.choice((1, 7, 4096))
    with open(path, "ab") as f:
        f.write(case.rng.randbytes(n))
    return f"{path.name}: {n} random bytes appended"


# ---------------------------------------------------------------------------- header level

HUGE_INTS = (2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1, 2**64 - 1, 10**30)


def _st_pick(case: Case) -> tuple[Path, dict, bytes, str]:
    path, _ = case.pick_file(("safetensors",))
    header, data = st_raw(path)
    keys = [k for k in header if k != "__metadata__"]
    return path, header, data, case.rng.choice(keys)


@mutator("header", has("safetensors"))
def st_shape(case: Case) -> str:
    path, header, data, key = _st_pick(case)
    shape = list(header[key]["shape"])
    rng = case.rng
    how = rng.choice(("dim", "huge", "zero", "neg", "type", "extra", "drop", "scalar"))
    i = rng.randrange(len(shape)) if shape else 0
    if how == "dim" and shape:
        shape[i] += rng.choice((-1, 1))
    elif how == "huge" and shape:
        shape[i] = rng.choice(HUGE_INTS)
    elif how == "zero" and shape:
        shape[i] = 0
    elif how == "neg" and shape:
        shape[i] = -shape[i]
    elif how == "type":
        shape = rng.choice(([1.5, 2], ["4", 16], None, "x", [[4], 16], {"a": 1}, [True, 4]))
    elif how == "extra":
        shape = [*shape, 1]
    elif how == "drop":
        shape = shape[:-1]
    else:
        shape = []
    header[key]["shape"] = shape
    st_write_raw(path, header, data)
    return f"{path.name}: {key} shape -> {json.dumps(shape)[:60]} ({how})"


ST_DTYPES = ("F16", "F32", "F64", "BF16", "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")
ST_DTYPES += ("BOOL", "F8_E4M3", "F8_E5M2", "C64", "F4", "F6_E2M3", "E8M0", "XYZ", "")


@mutator("header", has("safetensors"))
def st_dtype(case: Case) -> str:
    path, header, data, key = _st_pick(case)
    rng = case.rng
    old = header[key]["dtype"]
    if rng.random() < 0.5 and old == "F32" and header[key]["shape"]:  # same bytes, reinterpreted
        new, factor = rng.choice((("I32", 1), ("U32", 1), ("F16", 2), ("BF16", 2), ("U8", 4)))
        header[key]["dtype"] = new
        header[key]["shape"] = [*header[key]["shape"][:-1], header[key]["shape"][-1] * factor]
    else:
        new = rng.choice((*ST_DTYPES, 5, None))
        header[key]["dtype"] = new
    st_write_raw(path, header, data)
    return f"{path.name}: {key} dtype {old} -> {new!r}"


@mutator("header", has("safetensors"))
def st_offsets(case: Case) -> str:
    path, header, data, key = _st_pick(case)
    b, e = header[key]["data_offsets"]
    rng = case.rng
    new = rng.choice(
        (
            [b, e + 4],
            [b, e - 4],
            [e, b],
            [b, b],
            [0, 2**64 - 1],
            [-1, e],
            [b + 1, e + 1],
            [b, len(data) + 8],
            [0, e - b],
            [b * 1.0, e],
            [b],
            [b, e, e],
            "x",
            None,
        )
    )
    header[key]["data_offsets"] = new
    st_write_raw(path, header, data)
    return f"{path.name}: {key} data_offsets {[b, e]} -> {new!r}"


@mutator("header", has("safetensors"))
def st_duplicate_key(case: Case) -> str:
    path, header, data, key = _st_pick(case)
    text = json.dumps(header, separators=(",", ":"))
    other = dict(header[key])
    other["shape"] = (
        [*other["shape"][:-1], max(1, other["shape"][-1] // 2)] if other["shape"] else []
    )
    dup = json.dumps({key: other}, separators=(",", ":"))[1:-1]
    text = text[:-1] + "," + dup + "}"
    st_write_raw(path, text, data)
    return f"{path.name}: duplicate header entry for {key}"


@mutator("header", has("safetensors"))
def st_not_a_dict(case: Case) -> str:
    path, _, data, _ = _st_pick(case)
    text = case.rng.choice(
        ("[]", "null", "1", '"x"', "{}", '{"__metadata__": 5}', '{"a": 5}', "[" * 10000, "{" * 2)
    )
    st_write_raw(path, text, data)
    return f"{path.name}: header {text[:20]!r}"


@mutator("header", has("safetensors"))
def st_length(case: Case) -> str:
    path, header, data, _ = _st_pick(case)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    n = case.rng.choice((0, 7, len(text) - 1, len(text) + 1, len(text) + len(data) + 8, 2**63))
    n = case.rng.choice((n, 2**64 - 1, 100_000_000))
    st_write_raw(path, text, data, n=n)
    return f"{path.name}: header length {len(text)} -> {n}"


@mutator("header", has("safetensors"))
def st_metadata(case: Case) -> str:
    path, header, data, _ = _st_pick(case)
    rng = case.rng
    value = rng.choice((5, None, {"a": "b"}, [], "x" * 1_000_000, True, 1e308))
    if rng.random() < 0.3:
        header["__metadata__"] = rng.choice(([], "x", 5, None))
        what = "__metadata__ not a dict"
    else:
        meta = dict(header.get("__metadata__") or {})
        meta[rng.choice(("format", "ss_network_alpha", "lora_adapter_metadata", "x"))] = value
        header["__metadata__"] = meta
        what = f"metadata value {json.dumps(value)[:30]}"
    st_write_raw(path, header, data)
    return f"{path.name}: {what}"


@mutator("header", has("safetensors"))
def st_rename(case: Case) -> str:
    path, header, data, key = _st_pick(case)
    rng = case.rng
    how = rng.choice(("role", "adapter", "junk", "long", "empty", "unicode", "meta"))
    if how == "role":
        new = key.replace("lora_A", "lora_B").replace("lora_down", "lora_up").replace("_a", "_b")
        new = new if new != key else key + ".lora_B.weight"
    elif how == "adapter":
        new = key.replace(".weight", ".default.weight") if ".weight" in key else key + ".other"
    elif how == "junk":
        new = rng.randbytes(12).hex()
    elif how == "long":
        new = key + "." + "a" * 100_000
    elif how == "empty":
        new = ""
    elif how == "unicode":
        new = key.replace(".", "\u2024") + "\u202e"
    else:
        new = "__metadata__"
    header = {(new if k == key else k): v for k, v in header.items()}
    st_write_raw(path, header, data)
    return f"{path.name}: rename {key} -> {new[:50]!r} ({how})"


@mutator("header", has("safetensors"))
def st_drop(case: Case) -> str:
    path, header, data, key = _st_pick(case)
    del header[key]
    st_write_raw(path, header, data)
    return f"{path.name}: header entry {key} removed"


@mutator("header", has("safetensors"))
def st_many_entries(case: Case) -> str:
    path, header, data, key = _st_pick(case)
    n = case.rng.choice((1000, 20000))
    prefix = case.rng.choice(("x", key.rsplit(".", 2)[0] + ".lora_A.weight."))
    for i in range(n):
        header[f"{prefix}{i}"] = header[key]
    st_write_raw(path, header, data)
    return f"{path.name}: {n} extra entries aliasing {key}"


@mutator("header", has("gguf"))
def gguf_header(case: Case) -> str:
    path, _ = case.pick_file(("gguf",))
    reader = gguf.GGUFReader(str(path))
    t = case.rng.choice(reader.tensors)
    parts = t.field.parts  # name length, name, n_dims, dims, type, offset
    off_ndims = t.field.offset + 8 + int(parts[0][0])
    off_dims = off_ndims + 4
    off_type = off_dims + 8 * int(parts[2][0])
    off_data = off_type + 4
    del reader
    rng = case.rng
    how = rng.choice(("tensor_count", "kv_count", "ndims", "dim", "type", "offset", "version"))
    if how == "tensor_count":
        edit = (8, "<Q", rng.choice((0, 3, 2**31, 2**63)))
    elif how == "kv_count":
        edit = (16, "<Q", rng.choice((0, 2**31, 2**63)))
    elif how == "ndims":
        edit = (off_ndims, "<I", rng.choice((0, 1, 3, 5, 2**31)))
    elif how == "dim":
        edit = (off_dims + 8 * rng.randrange(2), "<Q", rng.choice((0, 1, *HUGE_INTS[:6])))
    elif how == "type":
        edit = (off_type, "<I", rng.choice((1, 2, 8, 30, 99, 2**31)))
    elif how == "offset":
        edit = (off_data, "<Q", rng.choice((1, 2**20, 2**40, 2**64 - 32)))
    else:
        edit = (4, "<I", rng.choice((1, 2, 99)))
    with open(path, "r+b") as f:
        f.seek(edit[0])
        f.write(struct.pack(edit[1], edit[2]))
    return f"{path.name}: {t.name} {how} -> {edit[2]}"


# ---------------------------------------------------------------------------- tensor level


def _load_for_tensor(case: Case, containers=("safetensors", "torch", "hdf5", "gguf")):
    path, container = case.pick_file(containers)
    tensors, meta = read_container(path, container)
    floats = [k for k, t in tensors.items() if t.is_floating_point() and t.numel() > 1]
    key = case.rng.choice(floats or list(tensors))
    return path, container, tensors, meta, key


TENSOR_FILES = has("safetensors", "torch", "hdf5", "gguf")


@mutator("tensor", TENSOR_FILES)
def t_nonfinite(case: Case) -> str:
    path, container, tensors, meta, key = _load_for_tensor(case)
    t = tensors[key].clone()
    value = case.rng.choice((math.nan, math.inf, -math.inf))
    flat = t.reshape(-1)
    if case.rng.random() < 0.7:
        flat[case.rng.randrange(flat.numel())] = value
        how = "one element"
    else:
        flat[:] = value
        how = "all elements"
    tensors[key] = t
    write_container(path, container, tensors, meta)
    return f"{path.name}: {key} {how} = {value}"


@mutator("tensor", TENSOR_FILES)
def t_extreme(case: Case) -> str:
    path, container, tensors, meta, key = _load_for_tensor(case)
    rng = case.rng
    t = tensors[key]
    options = [
        ("x1e38 f32", lambda t: (t.float().sign() + 0.5).sign() * 1e38),
        ("3e38 f32 one", None),
        ("6e4 f16", lambda t: (t.float().sign() + 0.5).sign().half() * 60000),
        ("1e-40 f32 subnormal", lambda t: t.float() * 1e-39),
        ("1e-45 f32", lambda t: torch.full_like(t.float(), 1e-45)),
        ("x1e19 f32", lambda t: t.float() * 1e19),
    ]
    if container != "gguf":
        options += [
            ("1e300 f64", lambda t: t.double() * 1e301),
            ("1e-300 f64", lambda t: t.double() * 1e-299),
            ("1e-310 f64 subnormal", lambda t: t.double() * 1e-309),
            ("1e154 f64", lambda t: t.double() * 1e155),
        ]
    how, fn = rng.choice(options)
    if fn is None:
        new = t.float().clone()
        new.reshape(-1)[rng.randrange(new.numel())] = 3e38
    else:
        new = fn(t)
    tensors[key] = new
    if rng.random() < 0.4:  # the partner too, so the product is extreme
        other = rng.choice([k for k in tensors if k != key] or [key])
        if tensors[other].is_floating_point() and tensors[other].numel() > 1:
            tensors[other] = fn(tensors[other]) if fn is not None else tensors[other]
            how += " (two tensors)"
    write_container(path, container, tensors, meta)
    return f"{path.name}: {key} -> {how}"


@mutator("tensor", TENSOR_FILES)
def t_zero(case: Case) -> str:
    path, container, tensors, meta, key = _load_for_tensor(case)
    how = case.rng.choice(("one", "all", "row"))
    if how == "all":
        tensors = {
            k: torch.zeros_like(t) if t.is_floating_point() else t for k, t in tensors.items()
        }
    elif how == "one":
        tensors[key] = torch.zeros_like(tensors[key])
    else:
        t = tensors[key].clone()
        if t.ndim >= 1:
            t[0] = 0
        tensors[key] = t
    write_container(path, container, tensors, meta)
    return f"{path.name}: zeros ({how}) in {key}"


@mutator("tensor", TENSOR_FILES)
def t_shape(case: Case) -> str:
    path, container, tensors, meta, key = _load_for_tensor(case)
    t = tensors[key]
    rng = case.rng
    options = {
        "transpose": lambda t: t.T.contiguous() if t.ndim == 2 else t.reshape(-1, 1),
        "drop_row": lambda t: t[:-1].contiguous(),
        "drop_col": lambda t: t[..., :-1].contiguous(),
        "flatten": lambda t: t.reshape(-1).contiguous(),
        "add_dim": lambda t: t.unsqueeze(0).contiguous(),
        "3d": lambda t: t.reshape(1, *t.shape, 1).contiguous(),
        "empty": lambda t: t[:0].contiguous(),
        "scalar": lambda t: t.reshape(-1)[0].clone(),
        "big": lambda t: torch.randn(t.shape[0] if t.ndim else 1, 4097, generator=case.torch_gen()),
        "conv": lambda t: t.reshape(*t.shape, 1, 1).contiguous(),
        "conv_k": lambda t: t.reshape(*t.shape[:-1], -1, 1).repeat(1, 1, 3) if t.ndim == 2 else t,
    }
    how = rng.choice(sorted(options))
    tensors[key] = options[how](t)
    write_container(path, container, tensors, meta)
    return f"{path.name}: {key} {tuple(t.shape)} -> {tuple(tensors[key].shape)} ({how})"


@mutator("tensor", TENSOR_FILES)
def t_dtype(case: Case) -> str:
    path, container, tensors, meta, key = _load_for_tensor(case)
    choices = {
        "safetensors": ("int32", "int64", "int8", "uint8", "bool", "bfloat16", "float16"),
        "torch": ("int32", "int64", "int8", "bool", "bfloat16", "float16", "complex64"),
        "hdf5": ("int32", "int64", "int8", "bool", "float16", "complex64"),
        "gguf": ("int32", "int8", "float16"),
    }[container]
    extra = {
        "safetensors": ("float8_e4m3fn", "float8_e5m2", "complex64"),
        "torch": ("float8_e4m3fn",),
    }
    name = case.rng.choice(choices + extra.get(container, ()))
    dtype = getattr(torch, name)
    t = tensors[key]
    new = (t * 10).to(dtype) if not dtype.is_complex else t.to(dtype)
    tensors[key] = new
    write_container(path, container, tensors, meta)
    return f"{path.name}: {key} dtype {t.dtype} -> {name}"


@mutator("tensor", TENSOR_FILES)
def t_keys(case: Case) -> str:
    path, container, tensors, meta, key = _load_for_tensor(case)
    rng = case.rng
    how = rng.choice(("drop", "extra", "alias", "second_adapter", "only_one"))
    if how == "drop":
        del tensors[key]
    elif how == "extra":
        tensors[rng.choice(("lm_head.weight", "x", key + "_extra", "a.b.c"))] = torch.ones(3, 3)
    elif how == "alias":
        new = key.replace("A", "B").replace("down", "up").replace("_a", "_b") + "x"
        tensors[new] = tensors[key].clone()
    elif how == "second_adapter" and ".weight" in key:
        tensors[key.replace(".weight", ".other.weight")] = tensors[key].clone()
    else:
        tensors = {key: tensors[key]}
    if not tensors:
        tensors = {"x": torch.ones(1)}
    write_container(path, container, tensors, meta)
    return f"{path.name}: keys {how} ({key})"


@mutator("tensor", has("torch"))
def t_parameter(case: Case) -> str:
    path, container, tensors, meta, key = _load_for_tensor(case, ("torch",))
    every = case.rng.random() < 0.5
    for k in list(tensors) if every else [key]:
        if tensors[k].is_floating_point():
            tensors[k] = torch.nn.Parameter(tensors[k].clone(), requires_grad=True)
    write_container(path, container, tensors, meta)
    return f"{path.name}: nn.Parameter(requires_grad) for {'every tensor' if every else key}"


@mutator("tensor", has("torch"))
def t_zero_stride(case: Case) -> str:
    path, container, tensors, meta, key = _load_for_tensor(case, ("torch",))
    t = tensors[key]
    rng = case.rng
    how = rng.choice(("1d", "rows", "cols", "both"))
    if how == "1d":
        new = torch.zeros(1).expand(2**31)
    elif how == "rows" and t.ndim == 2:  # (2**29, d_in): claims 2**29·d_in elements
        new = torch.ones(1, t.shape[1]).expand(2**29, t.shape[1])
    elif how == "cols" and t.ndim == 2:
        new = torch.ones(t.shape[0], 1).expand(t.shape[0], 2**29)
    else:
        new = torch.full((1, 1), 0.5).expand(2**16, 2**15)
    tensors[key] = new
    write_container(path, container, tensors, meta)
    return f"{path.name}: {key} -> zero-stride view {tuple(new.shape)} ({how})"


@mutator("tensor", has("torch"))
def t_views(case: Case) -> str:
    path, container, tensors, meta, key = _load_for_tensor(case, ("torch",))
    t = tensors[key]
    rng = case.rng
    how = rng.choice(("transposed", "strided", "offset", "shared"))
    if how == "transposed" and t.ndim == 2:
        new = t.T.contiguous().T
    elif how == "strided":
        big = torch.zeros(*t.shape[:-1], t.shape[-1] * 2) if t.ndim else torch.zeros(2)
        big[..., ::2] = t
        new = big[..., ::2]
    elif how == "offset":
        flat = torch.cat([torch.full((7,), math.nan), t.reshape(-1)])
        new = flat[7:].view(t.shape)
    else:  # two keys share one storage
        other = rng.choice([k for k in tensors if k != key] or [key])
        store = torch.cat([tensors[key].reshape(-1), tensors[other].reshape(-1)])
        new = store[: t.numel()].view(t.shape)
        tensors[other] = store[t.numel() :].view(tensors[other].shape)
    tensors[key] = new
    write_container(path, container, tensors, meta)
    return f"{path.name}: {key} stored as a {how} view"


@mutator("tensor", TENSOR_FILES)
def t_scale(case: Case) -> str:
    """Factors at opposite or equal extremes of their dtype: each is finite, their product may
    not be (or underflows to zero)."""
    path, container, tensors, meta, _ = _load_for_tensor(case)
    rng = case.rng
    floats = [k for k, t in tensors.items() if t.is_floating_point() and t.numel() > 1]
    double = container != "gguf"
    k1, k2 = (1e150, 1e-150) if double else (1e30, 1e-30)
    how, a, b = rng.choice(
        (
            ("opposite", k1, k2),
            ("both huge", k1, k1),
            ("both tiny", k2, k2),
            ("f32 1e20 each", 1e20, 1e20),
            ("f32 1e-25 each", 1e-25, 1e-25),
        )
    )
    dtype = torch.float64 if double and not how.startswith("f32") else torch.float32
    for n, k in enumerate(floats):
        tensors[k] = tensors[k].to(dtype) * (a if n % 2 == 0 else b)
    write_container(path, container, tensors, meta)
    return f"{path.name}: factors scaled {how} ({dtype})"


_PREFIX_RE = re.compile(
    r"^(?P<prefix>.*?)\.(?:lora_|hada_|lokr_|vera_lambda|alpha$|weight$|lora\.)"
)


@mutator("tensor", TENSOR_FILES)
def t_rename(case: Case) -> str:
    """One module's name edited in every key it has: a huge or non-ASCII layer index, a slash,
    an empty or very long component, odd characters."""
    path, container, tensors, meta, key = _load_for_tensor(case)
    rng = case.rng
    m = _PREFIX_RE.match(key)
    prefix = m["prefix"] if m else key
    how = rng.choice(("huge_layer", "neg_layer", "arabic_digit", "slash", "empty", "long", "odd"))
    if how == "huge_layer":
        new = re.sub(r"\d+", "9" * 30, prefix, count=1)
    elif how == "neg_layer":
        new = re.sub(r"\d+", "-1", prefix, count=1)
    elif how == "arabic_digit":
        new = re.sub(r"\d+", "\u0663", prefix, count=1)
    elif how == "slash":
        new = prefix.replace(".", "/", 1)
    elif how == "empty":
        new = rng.choice(("", ".", prefix + ".", ".." + prefix))
    elif how == "long":
        new = prefix + "." + "k" * 5000
    else:
        new = prefix + rng.choice(("\u202e", " ", "\x00", "%2F", "[q]", "\n"))
    renamed = {}
    for k, t in tensors.items():
        renamed[new + k[len(prefix) :] if k.startswith(prefix) else k] = t
    if container == "hdf5":  # HDF5 names come from attributes, not dataset paths
        write_container(path, container, tensors, meta)
        with h5py.File(path, "r+") as f:
            g = _h5_module(f, rng)
            g.attrs["name"] = new.replace("\x00", "")
        return f"{path.name}: module name attribute -> {new[:40]!r} ({how})"
    write_container(path, container, renamed, meta)
    return f"{path.name}: {prefix} -> {new[:40]!r} ({how})"


# ---------------------------------------------------------------------------- config level

NUMBERS = (
    *"1e300 1e-300 -1 0 8.5 4.5 4.0 -0.0 1e309 -1e309 NaN Infinity -Infinity 5e-324".split(),
    *"1.7976931348623157e308 18446744073709551617 3.4e38 65504".split(),
    "1" + "0" * 400,  # an integer no float holds
    "9" * 5000,  # past Python's 4300-digit int parsing limit
)
OTHERS = (
    '"8"',
    '"4"',
    '"false"',
    '"true"',
    '"0"',
    '""',
    "true",
    "false",
    "null",
    "[]",
    "{}",
    "[4]",
    '{"a": 1}',
    '"\\ud800"',
    '"' + "x" * 100_000 + '"',
)
DEEP = "[" * 100_000 + "]" * 100_000
BOOLS = ('"false"', '"true"', '"False"', '"0"', '""', "0", "1", '"no"', "[]", "{}", "null")
CATASTROPHIC = (
    r"(.+)+Z",
    r"(.*a){25}",
    r"([a-z_.0-9]+)*#",
    r"(\w+\.?)+!",
    r"((.*)*)*X",
    r"(x+x+)+y",
    r"(a+)+$",
)
INVALID_RE = ("(", "[", "*", "a{2,1}", "(?P<x", "\\", "(?<=a+)b", "x" * 100_000)
PEFT_TYPES = (
    *"LORA lora ADALORA VERA LOHA LOKR IA3 OFT BOFT HRA DORA PROMPT_TUNING PREFIX_TUNING".split(),
    *"XLORA FOURIERFT VBLORA RANDLORA MISS SHIRA C3A".split(),
    "",
)
PLACEHOLDER = "@@FUZZ@@"


def json_value(rng: random.Random, depth: int = 0) -> str:
    """A random JSON value (text), the grammar's leaves biased towards trouble."""
    roll = rng.random()
    if roll < 0.4 or depth > 2:
        return rng.choice(NUMBERS + OTHERS)
    if roll < 0.6:
        return "[" + ",".join(json_value(rng, depth + 1) for _ in range(rng.randrange(3))) + "]"
    if roll < 0.8:
        items = [f'"{rng.choice(("r", "a", "q_proj", ""))}": {json_value(rng, depth + 1)}']
        return "{" + ",".join(items) + "}"
    return rng.choice((DEEP, '"' + rng.randbytes(8).hex() + '"'))


def _fragment(rng: random.Random, kind: str) -> str:
    if kind == "bool":
        return rng.choice((*BOOLS, "true", "false"))
    if kind == "number":
        return rng.choice(NUMBERS + OTHERS[:8] + (DEEP,))
    if kind == "pattern":
        how = rng.choice(("catastrophic", "invalid", "values", "type", "deep"))
        if how == "catastrophic":
            return json.dumps({rng.choice(CATASTROPHIC): R})
        if how == "invalid":
            return json.dumps({rng.choice(INVALID_RE): R})
        if how == "values":
            return '{"q_proj": ' + rng.choice(NUMBERS + OTHERS) + "}"
        if how == "type":
            return rng.choice(('"q_proj"', "[1, 2]", "5", "true"))
        return '{"q_proj": ' + DEEP + "}"
    if kind == "peft_type":
        return json.dumps(rng.choice(PEFT_TYPES)) if rng.random() < 0.8 else json_value(rng)
    return json_value(rng)


# Per seed: the config fields mutations target, and their kind.
PEFT_FIELDS = {
    "r": "number",
    "lora_alpha": "number",
    "use_rslora": "bool",
    "fan_in_fan_out": "bool",
    "use_dora": "bool",
    "rank_pattern": "pattern",
    "alpha_pattern": "pattern",
    "peft_type": "peft_type",
    "init_lora_weights": "any",
    "target_modules": "any",
    "layers_to_transform": "any",
    "modules_to_save": "any",
}
FAMILY_FIELDS = {
    "peft_adalora": {"init_r": "number", "target_r": "number", "rank_pattern": "any"},
    "peft_vera": {"projection_prng_key": "number", "save_projection": "bool", "d_initial": "any"},
    "peft_loha": {"alpha": "number", "use_effective_conv2d": "bool"},
    "peft_lokr": {"alpha": "number", "decompose_factor": "number", "decompose_both": "bool"},
}
MLX_FIELDS = {
    "fine_tune_type": "any",
    "num_layers": "number",
    "lora_parameters": "any",
    "lora_parameters.rank": "number",
    "lora_parameters.scale": "number",
    "lora_parameters.keys": "any",
    "lora_parameters.dropout": "number",
}
INDEX_FIELDS = {"weight_map": "any", "metadata": "any", "metadata.total_size": "number"}
DIFFUSERS_FIELDS = {
    "unet.r": "number",
    "unet.lora_alpha": "number",
    "unet.use_rslora": "bool",
    "unet.fan_in_fan_out": "bool",
    "unet.rank_pattern": "pattern",
    "unet.alpha_pattern": "pattern",
    "unet.peft_type": "peft_type",
    "unet.use_dora": "bool",
}
SIBLING_FIELDS = {
    "lora_alpha": "number",
    "r": "number",
    "use_rslora": "bool",
    "alpha_pattern": "pattern",
    "peft_type": "peft_type",
}


def _set_json(obj: dict, edits: dict[str, str]) -> str:
    """``obj`` as JSON text with each dotted field of ``edits`` replaced by its raw text (which
    need not be valid JSON for Python: ``1e309``, 5000 digits, 100,000 brackets)."""
    obj = json.loads(json.dumps(obj))
    for n, dotted in enumerate(edits):
        parts = dotted.split(".") if not dotted.startswith("unet.") else [dotted]
        cur = obj
        for p in parts[:-1]:
            if not isinstance(cur.get(p), dict):
                cur[p] = {}
            cur = cur[p]
        cur[parts[-1]] = f"{PLACEHOLDER}{n}"
    text = json.dumps(obj, indent=1)
    for n, fragment in enumerate(edits.values()):
        text = text.replace(json.dumps(f"{PLACEHOLDER}{n}"), fragment, 1)
    return text


def _oracle(case: Case, field_name: str, kind: str, fragment: str, ranks: bool = True) -> None:
    """What a wrong-typed value must not silently become (checked after a successful load)."""
    base = field_name.removeprefix("unet.")
    if kind == "bool" and base in ("use_rslora", "fan_in_fan_out"):
        case.oracle = ("bool", base, fragment)
    elif base in ("r", "init_r") and ranks:
        if (base == "r") != (case.seed.name == "peft_adalora"):  # AdaLoRA reads init_r, not r
            case.oracle = ("int", base, fragment)


@dataclass
class Surface:
    """Where a seed keeps its configuration: the parsed object, how to write new JSON text in
    its place, its fields (dotted name -> kind), and the file, when it is one."""

    obj: dict
    write: Callable[[str], None]
    fields: dict[str, str]
    file: Path | None = None
    label: str = ""
    ranks: bool = True  # the reader takes ranks from here (r: 4.5 must not pass as 4)


def _json_file(path: Path, fields: dict[str, str], label: str = "") -> Surface:
    obj = json.loads(path.read_text()) if path.is_file() else {}
    return Surface(obj, path.write_text, fields, path, label or path.name)


def surface(case: Case) -> Surface:
    """The configuration of ``case``'s seed that config mutations edit."""
    s = case.seed
    if s.name == "diffusers":
        path = case.dir / s.entry
        tensors, meta = read_container(path, "safetensors")

        def write(text: str) -> None:
            write_container(path, "safetensors", tensors, dict(meta, lora_adapter_metadata=text))

        obj = json.loads(meta["lora_adapter_metadata"])
        return Surface(obj, write, DIFFUSERS_FIELDS, None, "lora_adapter_metadata")
    if s.name == "hdf5":
        path = case.dir / s.entry
        with h5py.File(path, "r") as f:
            obj = json.loads(f.attrs["config"])

        def write_h5(text: str) -> None:
            with h5py.File(path, "r+") as f:
                f.attrs["config"] = text

        return Surface(obj, write_h5, PEFT_FIELDS, None, "HDF5 config attribute", ranks=False)
    if s.name == "mlx":
        return _json_file(case.dir / "adapter_config.json", MLX_FIELDS)
    if s.name == "base_sharded":
        return _json_file(case.dir / "base/model.safetensors.index.json", INDEX_FIELDS)
    if s.sibling_config:  # write the config a plain file may have beside it, then edit it
        path = (case.entry if case.entry.is_dir() else case.entry.parent) / "adapter_config.json"
        path.write_text(json.dumps({"r": R, "lora_alpha": ALPHA, "peft_type": "LORA"}))
        sf = _json_file(path, SIBLING_FIELDS, "sibling adapter_config.json")
        sf.ranks = False
        return sf
    return _json_file(
        case.dir / "adapter_config.json", dict(PEFT_FIELDS, **FAMILY_FIELDS.get(s.name, {}))
    )


def _has_surface(s: Seed) -> bool:
    return s.name != "gguf" and bool(
        s.containers() & {"json", "hdf5"} or s.sibling_config or s.name == "diffusers"
    )


def _edit(case: Case, kinds: tuple[str, ...] | None, fragment_for=None) -> str:
    """Set one field of a kind in ``kinds`` (any, if None) to a hostile value."""
    sf = surface(case)
    rng = case.rng
    names = sorted(n for n, k in sf.fields.items() if kinds is None or k in kinds)
    if not names:
        names = sorted(sf.fields)
    name = rng.choice(names)
    kind = sf.fields[name]
    fragment = fragment_for(rng, kind) if fragment_for else _fragment(rng, kind)
    edits = {name: fragment}
    if rng.random() < 0.15:  # a second field wrong at the same time
        other = rng.choice(sorted(sf.fields))
        edits.setdefault(other, _fragment(rng, sf.fields[other]))
    sf.write(_set_json(sf.obj, edits))
    if len(edits) == 1:
        _oracle(case, name, kind, fragment, sf.ranks)
    shown = fragment[:40] + ("..." if len(fragment) > 40 else "")
    more = f" (and {list(edits)[1]})" if len(edits) > 1 else ""
    return f"{sf.label}: {name} = {shown}{more}"


@mutator("config", _has_surface)
def c_field(case: Case) -> str:
    return _edit(case, None)


@mutator("config", _has_surface)
def c_number(case: Case) -> str:
    return _edit(case, ("number",), lambda rng, _k: rng.choice(NUMBERS))


@mutator("config", _has_surface)
def c_type(case: Case) -> str:
    """A number or boolean field given a value of another type (strings, null, containers)."""
    return _edit(case, ("number", "bool"), lambda rng, _k: rng.choice(OTHERS + BOOLS))


@mutator("config", lambda s: _has_surface(s) and s.name not in ("mlx", "base_sharded"))
def c_pattern(case: Case) -> str:
    """rank_pattern / alpha_pattern (PEFT treats keys as regexes): catastrophic, invalid."""
    return _edit(case, ("pattern",), lambda rng, _k: _fragment(rng, "pattern"))


@mutator("config", _has_surface)
def c_file(case: Case) -> str:
    """The whole configuration replaced: not an object, nested 100,000 deep, duplicate keys;
    for a file, also a multi-GB sparse file that starts like JSON."""
    sf = surface(case)
    rng = case.rng
    if sf.file is not None and rng.random() < 0.3:
        with open(sf.file, "r+b" if sf.file.exists() else "wb") as f:
            f.seek(0)
            f.write(b'{"r": 4, "pad": "')
            f.truncate(rng.choice((3, 5, 8)) * 2**30)
        return f"{sf.label}: a sparse {sf.file.stat().st_size // 2**30} GiB file"
    if rng.random() < 0.3:
        sf.obj.pop(rng.choice(sorted(sf.fields)).split(".")[0], None)
        sf.write(json.dumps(sf.obj))
        return f"{sf.label}: a field removed"
    text = rng.choice(
        ("[]", '"x"', "5", "null", "", DEEP, "{" * 50_000, '{"r": 4, "r": 8.5}', "\ufeff{}", "{}")
    )
    sf.write(text)
    return f"{sf.label}: whole text {text[:16]!r}"


@mutator("config", lambda s: s.containers() & {"json"} or s.name == "diffusers")
def c_peft_type(case: Case) -> str:
    return _edit(case, ("peft_type", "any"), lambda rng, _k: _fragment(rng, "peft_type"))


@mutator("config", lambda s: s.name in ("kohya", "kohya_loha"))
def kohya_alpha(case: Case) -> str:
    path = case.dir / case.seed.entry
    tensors, meta = read_container(path, "safetensors")
    rng = case.rng
    if rng.random() < 0.3:
        meta = dict(meta or {})
        k = rng.choice(("ss_network_alpha", "ss_network_dim", "ss_network_args"))
        meta[k] = rng.choice(("nan", "1e309", "-1", "x", "", "{", DEEP, '{"algo": 5}', "8.5"))
        write_container(path, "safetensors", tensors, meta)
        return f"{path.name}: metadata {k} = {meta[k][:20]!r}"
    key = rng.choice([k for k in tensors if k.endswith(".alpha")])
    value = rng.choice(
        (
            torch.tensor(1e300, dtype=torch.float64),
            torch.tensor(1e-300, dtype=torch.float64),
            torch.tensor(math.nan),
            torch.tensor(math.inf),
            torch.tensor(0.0),
            torch.tensor(-1.0),
            torch.tensor(1e-45),
            torch.tensor(3e38),
            torch.tensor(65504.0, dtype=torch.float16),
            torch.tensor(10**18, dtype=torch.int64),
            torch.tensor(True),
            torch.tensor([8.0, 8.0]),
            torch.zeros(0),
        )
    )
    tensors[key] = value
    write_container(path, "safetensors", tensors, meta)
    return f"{path.name}: {key} = {value.tolist()!r} {value.dtype}"


@mutator("config", has("gguf"))
def gguf_kv(case: Case) -> str:
    path = case.dir / case.seed.entry
    tensors, _ = read_container(path, "gguf")
    rng = case.rng
    kv = [list(x) for x in GGUF_KV]
    how = rng.choice(("alpha", "alpha", "alpha_type", "type", "adapter_type", "drop"))
    if how == "alpha":
        kv[2][2] = rng.choice((math.nan, math.inf, -math.inf, -1.0, 0.0, 3.4e38, 1e-45, 1e30))
    elif how == "alpha_type":
        kv[2][1:] = rng.choice((("str", "8"), ("u64", 2**64 - 1), ("i32", -8), ("arr", [8.0, 1.0])))
    elif how == "type":
        kv[0][2] = rng.choice(("model", "", "ADAPTER", "x" * 10000))
    elif how == "adapter_type":
        kv[1][2] = rng.choice(("ia3", "LORA", "", "lora\x00"))
    else:
        kv.pop(rng.randrange(3))
    write_container(path, "gguf", tensors, [tuple(x) for x in kv])
    return f"{path.name}: kv {how}: {[x[2] for x in kv][:3]!r}"[:120]


# ---------------------------------------------------------------------------- hdf5 level

H5_ATTRS = ("scale", "alpha", "layer", "rows", "nominal_rank", "n_params", "fan_in_fan_out")
H5_STR_ATTRS = ("name", "kind", "family", "update", "part", "origin_keys")
H5_ROOT_ATTRS = ("format", "version", "config", "adapter_format")


def _h5_path(case: Case) -> Path:
    return case.dir / case.seed.entry


def _h5_module(f: h5py.File, rng: random.Random) -> h5py.Group:
    return f["modules"][rng.choice(sorted(f["modules"]))]


@mutator("hdf5", has("hdf5"))
def h5_attr_value(case: Case) -> str:
    rng = case.rng
    with h5py.File(_h5_path(case), "r+") as f:
        g = _h5_module(f, rng)
        where = g.name
        key = rng.choice(H5_ATTRS)
        value = rng.choice(
            (
                np.nan,
                np.inf,
                -np.inf,
                1e308,
                -1,
                0,
                np.int64(2**63 - 1),
                np.uint64(2**64 - 1),
                np.float16(65504),
                "8",
                b"\xff\xfe",
                True,
                1 + 2j,
                np.array([1.0, np.nan]),
                np.array([np.inf, 3]),
            )
        )
        g.attrs[key] = value
    return f"{where}.attrs[{key}] = {value!r}"[:120]


@mutator("hdf5", has("hdf5"))
def h5_attr_array(case: Case) -> str:
    rng = case.rng
    with h5py.File(_h5_path(case), "r+") as f:
        target = f if rng.random() < 0.3 else _h5_module(f, rng)
        where = target.name
        keys = H5_ROOT_ATTRS if target is f else H5_ATTRS + H5_STR_ATTRS
        key = rng.choice(keys)
        value = rng.choice(
            (
                np.array([1.0, 2.0]),
                np.zeros((2, 2)),
                np.array([], dtype=np.float64),
                np.array(["a", "b"], dtype=h5py.string_dtype()),
                np.array([1, 2], dtype=np.int64),
                np.array([True]),
            )
        )
        target.attrs[key] = value
    return f"{where}.attrs[{key}] = array {value.shape} {value.dtype}"


@mutator("hdf5", has("hdf5"))
def h5_config_attr(case: Case) -> str:
    rng = case.rng
    with h5py.File(_h5_path(case), "r+") as f:
        value = rng.choice(
            (DEEP, "null", "[1, 2]", '"x"', "9" * 5000, "{" * 10, "NaN", '{"use_rslora": "false"}')
        )
        if rng.random() < 0.2:
            f.attrs["config"] = np.array([value[:10], "b"], dtype=h5py.string_dtype())
            return "/.attrs[config] = array of strings"
        if rng.random() < 0.1:
            f.attrs["config"] = np.void(b"\xff\x00")
            return "/.attrs[config] = opaque bytes"
        f.attrs["config"] = value
    return f"/.attrs[config] = {value[:20]!r}"


@mutator("hdf5", has("hdf5"))
def h5_root_attr(case: Case) -> str:
    rng = case.rng
    with h5py.File(_h5_path(case), "r+") as f:
        key = rng.choice(("format", "version"))
        value = rng.choice(("lorascope", "x", b"lorascope", 2, 3, 2.0, -1, np.inf, 2**63 - 1, True))
        f.attrs[key] = value
    return f"/.attrs[{key}] = {value!r}"


@mutator("hdf5", has("hdf5"))
def h5_structure(case: Case) -> str:
    rng = case.rng
    with h5py.File(_h5_path(case), "r+") as f:
        g = _h5_module(f, rng)
        where = g.name
        how = rng.choice(("drop_A", "drop_modules", "modules_dataset", "A_group", "empty_modules"))
        how = rng.choice((how, "soft_loop", "external_dev_zero", "external_missing", "hard_cycle"))
        if how == "drop_A":
            del g[rng.choice(("A", "B"))]
        elif how == "drop_modules":
            del f["modules"]
        elif how == "modules_dataset":
            del f["modules"]
            f["modules"] = np.zeros(3)
        elif how == "A_group":
            del g["A"]
            g.create_group("A")
        elif how == "empty_modules":
            for k in list(f["modules"]):
                del f["modules"][k]
        elif how == "soft_loop":
            del g["A"]
            g["A"] = h5py.SoftLink(f"{g.name}/A")
        elif how == "external_dev_zero":
            del g["A"]
            g["A"] = h5py.ExternalLink("/dev/zero", "/x")
        elif how == "external_missing":
            del g["B"]
            g["B"] = h5py.ExternalLink(str(case.dir / "missing.h5"), "/B")
        else:
            g["self"] = g
            f["modules"]["loop"] = f["modules"]
    return f"{where}: {how}"


@mutator("hdf5", has("hdf5"))
def h5_dataset(case: Case) -> str:
    rng = case.rng
    with h5py.File(_h5_path(case), "r+") as f:
        g = _h5_module(f, rng)
        where = g.name
        which = rng.choice(("A", "B", "m"))
        if which in g:
            del g[which]
        how = rng.choice(
            tuple(
                "huge_contiguous huge_chunked huge_rows strings ints compound scalar 1d 3d empty "
                "vlen f16 complex nan_fill".split()
            )
        )
        if how == "huge_contiguous":
            g.create_dataset(which, shape=(10**7, 10**6), dtype="f4")
        elif how == "huge_chunked":
            g.create_dataset(which, shape=(10**7, 10**6), dtype="f4", chunks=(64, 64))
        elif how == "huge_rows":
            g.create_dataset(which, shape=(R, 2**40), dtype="f8", chunks=(1, 1024))
        elif how == "strings":
            g.create_dataset(which, data=np.array(["a", "b"], dtype=h5py.string_dtype()))
        elif how == "ints":
            g.create_dataset(which, data=np.ones((R, D_IN), dtype=np.int32))
        elif how == "compound":
            g.create_dataset(which, data=np.zeros((R, D_IN), dtype=[("a", "f4"), ("b", "i4")]))
        elif how == "scalar":
            g.create_dataset(which, data=1.0)
        elif how == "1d":
            g.create_dataset(which, data=np.ones(D_IN))
        elif how == "3d":
            g.create_dataset(which, data=np.ones((R, D_IN, 2)))
        elif how == "empty":
            g.create_dataset(which, shape=(0, D_IN), dtype="f4")
        elif how == "vlen":
            g.create_dataset(which, (R,), dtype=h5py.vlen_dtype(np.float32))
        elif how == "f16":
            g.create_dataset(which, data=np.full((R, D_IN), 60000, dtype=np.float16))
        elif how == "complex":
            g.create_dataset(which, data=np.ones((R, D_IN), dtype=np.complex64))
        else:
            g.create_dataset(which, shape=(R, D_IN), dtype="f4", fillvalue=np.nan)
    return f"{where}/{which}: {how}"


@mutator("hdf5", has("hdf5"))
def h5_metadata_flip(case: Case) -> str:
    """Bit flips in the superblock and object headers (below the first dataset's data)."""
    path = _h5_path(case)
    with h5py.File(path, "r") as f:
        offsets = []
        f.visititems(
            lambda n, o: (
                offsets.append(o.id.get_offset())
                if isinstance(o, h5py.Dataset) and o.id.get_offset() is not None
                else None
            )
        )
    end = min(offsets) if offsets else 2048
    data = bytearray(path.read_bytes())
    rng = case.rng
    k = rng.choice((1, 1, 2, 3, 8))
    at = []
    for _ in range(k):
        o = rng.randrange(min(end, len(data)))
        data[o] ^= 1 << rng.randrange(8)
        at.append(o)
    path.write_bytes(bytes(data))
    return f"{path.name}: {k} metadata bit flip(s) at {at[:4]}"


# ---------------------------------------------------------------------------- path level


def _target(case: Case) -> Path:
    path, _ = case.pick_file()
    return path


def _replace(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@mutator("path")
def p_special(case: Case) -> str:
    rng = case.rng
    how = rng.choice(
        ("fifo", "dev_zero", "dev_urandom", "dev_null", "entry_dev_zero", "entry_fifo")
    )
    if how.startswith("entry_") and case.seed.entry != ".":
        target = case.dir / case.seed.entry
    else:
        target = _target(case) if not how.startswith("entry_") else case.dir / "x.safetensors"
    _replace(target)
    if how in ("fifo", "entry_fifo"):
        os.mkfifo(target)
    else:
        os.symlink("/dev/" + how.rsplit("_", 1)[-1], target)
    if how.startswith("entry_"):
        case.entry = target if rng.random() < 0.7 else Path("/dev/zero")
    return f"{target.name} -> {how}" + (f" (entry {case.entry})" if how.startswith("entry") else "")


@mutator("path")
def p_wrong_kind(case: Case) -> str:
    rng = case.rng
    target = _target(case)
    how = rng.choice(("dir", "symlink_loop", "dangling", "missing", "empty", "self_dir_link"))
    _replace(target)
    if how == "dir":
        target.mkdir()
        (target / "x").write_text("{}")
    elif how == "symlink_loop":
        os.symlink(target.name + ".b", target)
        os.symlink(target.name, str(target) + ".b")
    elif how == "dangling":
        os.symlink(str(case.dir / "nowhere"), target)
    elif how == "empty":
        target.write_bytes(b"")
    elif how == "self_dir_link":
        os.symlink(".", target)
    return f"{target.name}: {how}"


@mutator("path")
def p_entry(case: Case) -> str:
    rng = case.rng
    how = rng.choice(("long_component", "long_parent", "nul", "missing", "surrogate", "deep"))
    if how == "long_component":
        case.entry = case.entry / ("x" * 300)
    elif how == "long_parent":
        case.entry = case.dir / ("y" * 300) / case.seed.entry
    elif how == "nul":
        case.entry = Path(str(case.entry) + "\0x")
    elif how == "missing":
        case.entry = case.dir / "does-not-exist.safetensors"
    elif how == "surrogate":
        case.entry = case.dir / "bad\udcffname.pt"
    else:
        case.entry = case.dir / "/".join(["d"] * 2000)
    return f"entry path: {how}"


@mutator("path")
def p_unreadable(case: Case) -> str:
    rng = case.rng
    if rng.random() < 0.5:
        target = _target(case)
    elif case.seed.entry == "." or case.seed.kind == "base":
        target = case.entry if case.entry.is_dir() else case.entry.parent
    else:
        target = case.entry
    modes = (0o000, 0o100, 0o600) if target.is_dir() else (0o000, 0o200)
    mode = rng.choice(modes)
    os.chmod(target, mode)
    case.drop_dac = os.geteuid() == 0
    who = " (root without CAP_DAC_OVERRIDE/READ_SEARCH)" if case.drop_dac else ""
    return f"{target.name}: chmod {mode:03o}{who}"


def _index_case(case: Case) -> tuple[Path, dict]:
    path = case.dir / "base/model.safetensors.index.json"
    return path, json.loads(path.read_text())


@mutator("path", lambda s: s.name == "base_sharded")
def p_index(case: Case) -> str:
    rng = case.rng
    path, index = _index_case(case)
    wm = index["weight_map"]
    key = rng.choice(sorted(wm))
    how = rng.choice(
        tuple("missing_shard outside absolute dev_zero itself dir long nul fifo_shard".split())
    )
    if how == "missing_shard":
        (path.parent / wm[key]).unlink()
    elif how == "outside":
        wm[key] = "../../../../../../etc/hostname"
    elif how == "absolute":
        wm[key] = "/etc/passwd"
    elif how == "dev_zero":
        wm[key] = "/dev/zero"
    elif how == "itself":
        wm[key] = path.name
    elif how == "dir":
        wm[key] = "."
    elif how == "long":
        wm[key] = "z" * 300 + ".safetensors"
    elif how == "nul":
        wm[key] = "model\u0000.safetensors"
    else:
        shard = path.parent / wm[key]
        shard.unlink()
        os.mkfifo(shard)
    path.write_text(json.dumps(index))
    return f"index: {key} -> {how}"


# ---------------------------------------------------------------------------- pickle payloads


class _Reduce:
    """An object that pickles as ``fn(*args)``: the payload of a malicious checkpoint."""

    def __init__(self, fn: Callable, args: tuple) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payload(kind: str, canary: Path) -> bytes:
    cmd = f"touch {shlex.quote(str(canary))}"
    code = f"open({str(canary)!r}, 'w').close()"
    if kind == "os.system":
        return b"cos\nsystem\n(V" + cmd.encode() + b"\ntR."
    if kind == "posix.system":
        return b"cposix\nsystem\n(V" + cmd.encode() + b"\ntR."
    if kind == "builtins.eval":
        return b"cbuiltins\neval\n(V" + code.encode() + b"\ntR."
    if kind == "builtins.exec":
        return b"c__builtin__\nexec\n(V" + code.encode() + b"\ntR."
    if kind == "getattr-chain":  # getattr(__import__('os'), 'system')(cmd)
        return (
            b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V"
            + cmd.encode()
            + b"\ntR."
        )
    if kind == "subprocess.call":
        import subprocess

        return pickle.dumps(_Reduce(subprocess.call, (["touch", str(canary)],)), protocol=4)
    if kind == "torch-load-bytes":  # a torch global that unpickles a nested, unsafe pickle
        inner = io.BytesIO()
        torch.save(_Reduce(os.system, (cmd,)), inner)
        return (
            b"ctorch.storage\n_load_from_bytes\n(" + pickle.dumps(inner.getvalue())[2:-1] + b"tR."
        )
    raise ValueError(kind)


PAYLOADS = tuple(
    "os.system posix.system builtins.eval builtins.exec getattr-chain subprocess.call "
    "torch-load-bytes".split()
)


def _pickle_payload(case: Case, how: str) -> str:
    path, _ = case.pick_file(("torch",))
    kind = case.rng.choice(PAYLOADS)
    cmd = f"touch {shlex.quote(str(case.canary))}"
    if how == "raw":
        path.write_bytes(_payload(kind, case.canary))
    elif how == "zip_data_pkl":
        path.write_bytes(_zip_with_data_pkl(path.read_bytes(), _payload(kind, case.canary)))
    elif how == "in_dict":
        tensors, _ = read_container(path, "torch")
        tensors["evil"] = _Reduce(os.system, (cmd,))
        torch.save(tensors, path)
        kind = "os.system"
    else:
        tensors, _ = read_container(path, "torch")
        obj = tensors[""] if list(tensors) == [""] else tensors
        payload = _Reduce(os.system, (cmd,))
        torch.save({"w": obj, "evil": payload}, path, _use_new_zipfile_serialization=False)
        kind = "os.system"
    return f"{path.name}: {kind} payload ({how})"


@mutator("pickle", has("torch"))
def pickle_raw(case: Case) -> str:
    """The whole file is a pickle that calls os.system / eval / exec / subprocess."""
    return _pickle_payload(case, "raw")


@mutator("pickle", has("torch"))
def pickle_zip(case: Case) -> str:
    """A torch zip checkpoint whose data.pkl asks for an unsafe global."""
    return _pickle_payload(case, "zip_data_pkl")


@mutator("pickle", has("torch"))
def pickle_in_dict(case: Case) -> str:
    """The real tensors, plus one value whose unpickling runs a command."""
    return _pickle_payload(case, "in_dict")


@mutator("pickle", has("torch"))
def pickle_legacy(case: Case) -> str:
    """The same in torch's legacy (non-zip) format."""
    return _pickle_payload(case, "legacy")


def _zip_with_data_pkl(src: bytes, data_pkl: bytes) -> bytes:
    """A torch zip checkpoint (``src``, or a fresh one) whose ``data.pkl`` is ``data_pkl``."""
    if not zipfile.is_zipfile(io.BytesIO(src)):
        buf = io.BytesIO()
        torch.save({"x": torch.ones(2)}, buf)
        src = buf.getvalue()
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, data_pkl if info.filename.endswith("data.pkl") else data)
    return out.getvalue()


@mutator("pickle", has("torch"))
def pickle_weird(case: Case) -> str:
    """Pickles that ask for nothing unsafe but are odd: deep nesting, non-tensor values,
    a non-torch global."""
    path, _ = case.pick_file(("torch",))
    rng = case.rng
    how = rng.choice(("deep", "strings", "ordered", "counter", "int_keys", "list", "none"))
    if how == "deep":  # {"state_dict": {"state_dict": ...}}, n levels, built by SETITEM
        n = rng.choice((1000, 100_000))
        key = b"X\x0a\x00\x00\x00state_dict"
        pkl = b"\x80\x02" + (b"}" + key) * n + b"}" + b"s" * n + b"."
        path.write_bytes(_zip_with_data_pkl(path.read_bytes(), pkl))
        how += f" {n}"
    elif how == "strings":
        torch.save({"a.lora_A": "x" * 1000, "a.lora_B": [1, 2]}, path)
    elif how == "ordered":
        from collections import OrderedDict

        torch.save(OrderedDict(model_state_dict=OrderedDict(x=torch.ones(2))), path)
    elif how == "counter":
        path.write_bytes(_zip_with_data_pkl(path.read_bytes(), b"ccollections\nCounter\n)R."))
    elif how == "int_keys":
        torch.save({1: torch.ones(R, D_IN), None: torch.ones(D_OUT, R)}, path)
    elif how == "list":
        torch.save([torch.ones(R, D_IN), torch.ones(D_OUT, R)], path)
    else:
        torch.save(None, path)
    return f"{path.name}: odd pickle ({how})"


# ============================================================================ planning


def schedule(seeds: dict[str, Seed], seed_value: int, epoch: int) -> list[tuple[Seed, Mutator]]:
    """Every (layout, mutator) pair once, in a seeded order that reaches every (layout, mutation
    class) pair first, so that a short run still covers each class of each layout."""
    pairs = [(s, m) for s in seeds.values() for m in MUTATORS if m.applies(s)]
    random.Random(f"{seed_value}/order/{epoch}").shuffle(pairs)
    first, rest, seen = [], [], set()
    for s, m in pairs:
        (rest if (s.name, m.cls) in seen else first).append((s, m))
        seen.add((s.name, m.cls))
    return first + rest


_SCHEDULES: dict[tuple, list[tuple[Seed, Mutator]]] = {}


def plan(seeds: dict[str, Seed], seed_value: int, index: int) -> tuple[Seed, str, Mutator]:
    """The (layout, class, mutator) of case ``index``: epoch ``index // n`` of :func:`schedule`
    (``n`` pairs per epoch)."""
    n = sum(1 for s in seeds.values() for m in MUTATORS if m.applies(s))
    epoch, k = divmod(index, n)
    key = (id(seeds), seed_value, epoch)
    if key not in _SCHEDULES:
        _SCHEDULES.clear()
        _SCHEDULES[key] = schedule(seeds, seed_value, epoch)
    s, m = _SCHEDULES[key][k]
    return s, m.cls, m


def prepare(seeds: dict[str, Seed], corpus: Path, work: Path, seed_value: int, index: int) -> Case:
    """Copy the seed into a fresh case directory and apply the case's mutation (in this
    process: mutations are the harness's own code)."""
    s, c, m = plan(seeds, seed_value, index)
    d = work / f"case{index:06d}"
    for old in (d, d.with_name(d.name + ".out")):
        if old.exists():
            _rmtree(old)
    d.with_name(d.name + ".out").mkdir()
    shutil.copytree(corpus / s.name, d, symlinks=True)
    entry = d / s.entry if s.entry != "." else d
    rng = random.Random(f"{seed_value}/{index}")
    case = Case(
        seed_value,
        index,
        s,
        c,
        d,
        rng,
        entry,
        d / s.adapter if s.adapter else None,
        mutation=m.name,
    )
    case.do_write = rng.random() < 0.3
    roll = rng.random()
    if roll < 0.1:  # the caller's options: a forced layout, an alpha, fused parts
        case.load_kwargs["fmt"] = rng.choice(FORMATS)
    elif roll < 0.18:
        case.load_kwargs["alpha"] = rng.choice((math.nan, 1e300, 1e-300, -1.0, 8.0, 5e-324))
    elif roll < 0.21:
        case.load_kwargs["enable_lora"] = rng.choice(([True, False, True], [False], []))
    case.do_merge = rng.random() < 0.3
    try:
        case.desc = m.fn(case)
    except Exception as e:  # a mutation that does not fit this seed: still run the case
        case.desc = f"(mutation failed: {type(e).__name__}: {str(e)[:80]})"
    if case.load_kwargs and s.kind == "adapter":
        case.desc += " " + " ".join(f"[{k}={v!r}]" for k, v in case.load_kwargs.items())
    return case


def _rmtree(path: Path) -> None:
    def fix(func, p, _exc):
        with contextlib.suppress(OSError):
            os.chmod(p, 0o700)
            os.chmod(os.path.dirname(p), 0o700)
        with contextlib.suppress(OSError):
            func(p)

    shutil.rmtree(path, onerror=fix)


# ============================================================================ running a case


def walk_nonfinite(obj: Any, where: str = "") -> str | None:
    """Where the first NaN/Inf number in ``obj`` (dicts, lists, arrays, tensors) is, or None."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return None
    if isinstance(obj, (float, np.floating)):
        return None if math.isfinite(obj) else f"{where} = {obj}"
    if isinstance(obj, int):
        return None
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().double().numpy() if obj.is_floating_point() else None
        if obj is None:
            return None
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "fc" and not np.isfinite(obj).all():
            return f"{where} holds NaN/Inf"
        return None
    if isinstance(obj, dict):
        items: Iterable = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif hasattr(obj, "to_dict"):
        return walk_nonfinite(obj.to_dict(), where)
    else:
        return None
    for k, v in items:
        found = walk_nonfinite(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


def inspect_cli(path: Path, load_kwargs: dict) -> str:
    """``lorascope inspect PATH --csv`` run in this process (what a user would see); returns
    its output, raises :class:`CliError` for exit status 2 and whatever else escapes."""
    argv = ["inspect", str(path), "--csv"]
    if "fmt" in load_kwargs:
        argv += ["--format", load_kwargs["fmt"]]
    if "alpha" in load_kwargs:
        argv += ["--alpha", repr(load_kwargs["alpha"])]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main.main(args=argv, prog_name="lorascope", standalone_mode=False)
    if code not in (None, 0):
        lines = [ln for ln in err.getvalue().splitlines() if not ln.startswith("warning:")]
        if len(lines) == 1 and lines[0].startswith("error:") and code == 2:
            raise CliError(lines[0])
        raise CliError("\n".join([f"exit status {code}", *lines]))  # -> bad_message
    return out.getvalue()


class CliError(LoraScopeError):
    """``lorascope inspect`` ended with exit status 2 (its stderr, as one line)."""


class NonFinite(Exception):
    pass


class Coerced(Exception):
    pass


def _natural_bool(fragment: str) -> bool | None:
    """What a JSON value plainly says as a boolean; None when it says nothing."""
    try:
        v = json.loads(fragment)
    except (ValueError, RecursionError):
        return None
    if v is None or v is False:
        return False
    if v is True:
        return True
    if isinstance(v, str) and v.strip().lower() in ("false", "0", "true", "1"):
        return v.strip().lower() in ("true", "1")
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    return None


def check_oracle(case: Case, adapter) -> None:
    """A wrong-typed config value must be refused, or read as what it plainly says."""
    if case.oracle is None:
        return
    kind, name, fragment = case.oracle
    if kind == "int":
        try:
            v = json.loads(fragment)
        except ValueError:
            return
        if isinstance(v, float) and math.isfinite(v) and v != int(v):
            raise Coerced(f"{name}={fragment} accepted (read as {adapter.modules[0].r})")
        if isinstance(v, str):
            raise Coerced(f"{name}={fragment} (a string) accepted")
        return
    natural = _natural_bool(fragment)
    m = adapter.modules[0]
    if name == "use_rslora":  # read as rsLoRA: by the scales, or by what rank() assumes
        alpha = m.alpha if m.alpha is not None else ALPHA
        r = m.r  # the configured rank (a LoHa's factored width is r², its scale alpha / r)
        plain = m.family in ("lora", "dora") and r > 1
        rs, lin = alpha / math.sqrt(r), alpha / r  # rsLoRA's scale, plain LoRA's
        effective = plain and math.isclose(m.scale, rs) and not math.isclose(m.scale, lin)
        with contextlib.suppress(LoraScopeError):
            rule = RankRule("rank", 1)
            as_read = [r.to_dict() for r in rank(adapter, rule)]
            effective |= as_read != [r.to_dict() for r in rank(adapter, rule, rslora=False)]
    else:
        effective = bool(m.fan_in_fan_out)
    # The default is False, so True can only come from reading the value: flag a value that
    # does not plainly say true but was read as true ("false" -> bool("false") == True).
    if effective and natural is not True:
        raise Coerced(f"{name}={fragment[:20]} read as True")


def api_actions(case: Case) -> dict:
    """What the child runs for an API case; returns the outcome record."""
    steps: list[str] = []
    first_error: str | None = None

    def step(label: str, fn: Callable[[], Any]) -> Any:
        nonlocal first_error
        steps.append(label)
        try:
            out = fn()
        except LoraScopeError as e:
            msg = str(e)
            if "\n" in msg.strip() or "\r" in msg.strip():
                raise
            first_error = first_error or f"{label}: {type(e).__name__}: {msg}"
            return None
        where = walk_nonfinite(out)
        if where:
            raise NonFinite(f"{label}: {where}")
        return out

    if case.seed.kind == "adapter":
        a = load_adapter(case.entry, **case.load_kwargs)
        check_oracle(case, a)
        text = step("inspect", lambda: inspect_cli(case.entry, case.load_kwargs))
        if text and _NONFINITE_TEXT.search(text):
            raise NonFinite(f"inspect: {_NONFINITE_TEXT.search(text).group(0)} in its CSV")
        step("spectrum", lambda: spectrum(a))
        step("similarity", lambda: similarity(a, a))
        step("rank", lambda: rank(a, RankRule("energy", 0.9)))
        if case.do_write:
            fmt = case.rng.choice(("hdf5", "peft", "kohya"))
            name = {"hdf5": "out.h5", "peft": "out_peft", "kohya": "out.safetensors"}[fmt]
            out = case.out / name
            if step(f"save_adapter[{fmt}]", lambda: save_adapter(a, out, fmt=fmt)) is not None:
                step("reload", lambda: inspect_cli(out, {}))
    else:
        b = load_base(case.entry)
        a = load_adapter(case.companion)
        step("amplify", lambda: amplify(a, b))
        for m in a:
            w = step(f"weight_for[{m.key}]", lambda m=m: b.weight_for(m))
            if w is not None:
                step(f"weight_similarity[{m.key}]", lambda m=m, w=w: weight_similarity(m, w))
        if case.do_merge:
            step("merge", lambda: merge_adapter(case.entry, a, case.out / "merged").modules)
    if first_error:
        return {"outcome": "lorascope_error", "message": first_error, "steps": steps}
    return {"outcome": "ok", "message": "", "steps": steps}


def _top_frame(tb) -> str:
    frames = traceback.extract_tb(tb)
    own = [f for f in frames if "lorascope" in f.filename or "/cli/" in f.filename]
    f = (own or frames)[-1] if frames else None
    if f is None:
        return ""
    return f"{_short(f.filename)}:{f.lineno} {f.name}"


def _short(filename: str) -> str:
    """A source path relative to the repository (or to site-packages)."""
    return filename.split("site-packages/")[-1].removeprefix(str(ROOT) + "/")


_ALLOC = re.compile(
    r"can't allocate memory|not enough memory|bad_alloc|Cannot allocate memory|out of memory|"
    r"Unable to allocate|MemoryError",
    re.I,
)


def classify_exception(e: BaseException) -> dict:
    msg = " ".join(str(e).split())[:300]
    where = _top_frame(e.__traceback__)
    if isinstance(e, LoraScopeError):
        if "\n" in str(e).strip() or "\r" in str(e).strip():
            return {"outcome": "bad_message", "message": f"{type(e).__name__}: {str(e)[:300]!r}"}
        return {"outcome": "lorascope_error", "message": f"{type(e).__name__}: {msg}"}
    if isinstance(e, NonFinite):
        return {"outcome": "non_finite", "message": msg}
    if isinstance(e, Coerced):
        return {"outcome": "coerced", "message": msg}
    if isinstance(e, MemoryError) or (
        isinstance(e, (RuntimeError, OSError, ValueError)) and _ALLOC.search(str(e))
    ):
        return {"outcome": "oom", "message": f"{type(e).__name__}: {msg}", "where": where}
    if isinstance(e, OSError) and e.errno == errno.ENOMEM:
        return {"outcome": "oom", "message": f"{type(e).__name__}: {msg}", "where": where}
    return {"outcome": "other_exception", "message": f"{type(e).__name__}: {msg}", "where": where}


def _drop_dac() -> None:
    """Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (the uid stays 0), so that file modes
    bind root too: an unreadable file stays unreadable when the fuzz runs as root."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))

    class Data(ctypes.Structure):
        _fields_ = (
            ("effective", ctypes.c_uint32),
            ("permitted", ctypes.c_uint32),
            ("inheritable", ctypes.c_uint32),
        )

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    keep = ~((1 << 1) | (1 << 2)) & 0xFFFFFFFF
    data[0].effective &= keep
    data[0].permitted &= keep
    data[0].inheritable &= keep
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def run_forked(
    target: Callable[[], dict],
    *,
    timeout: float,
    mem_bytes: int,
    drop_dac: bool = False,
    quiet: bool = True,
) -> dict:
    """Run ``target()`` in a forked child under ``RLIMIT_AS = mem_bytes`` and a wall-clock
    timeout; the child sends its JSON record through a pipe and leaves with ``os._exit``."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # ---- child
        status = 0
        try:
            os.close(rfd)
            os.setpgid(0, 0)
            if quiet:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.dup2(null, 2)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
            if drop_dac:
                _drop_dac()
            warnings.simplefilter("ignore")
            try:
                record = target()
            except BaseException as e:  # the child's verdict on everything the case raised
                record = classify_exception(e)
            data = json.dumps(record, default=str).encode()
        except BaseException as e:  # the harness itself failed in the child
            data = json.dumps({"outcome": "crash", "message": f"harness: {e!r}"[:300]}).encode()
            status = 3
        try:
            view = memoryview(data)
            while view:
                n = os.write(wfd, view)
                view = view[n:]
        finally:
            os._exit(status)
    # ---- parent
    os.close(wfd)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    timed_out = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([rfd], [], [], left)
            if ready:
                chunk = os.read(rfd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(rfd)
    if timed_out:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    with contextlib.suppress(OSError):  # anything the case started and left behind
        os.killpg(pid, signal.SIGKILL)
    if timed_out:
        return {"outcome": "hang", "message": f"no result after {timeout:g} s (killed)"}
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        outcome = "oom" if sig == signal.SIGKILL else "crash"
        return {"outcome": outcome, "message": f"child killed by {signal.Signals(sig).name}"}
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        return {"outcome": "crash", "message": f"no record (exit status {status >> 8})"}


@dataclass
class Result:
    seed: int
    index: int
    layout: str
    cls: str
    mutation: str
    desc: str
    outcome: str
    message: str
    where: str = ""
    seconds: float = 0.0
    command: str = ""

    @property
    def bad(self) -> bool:
        return self.outcome not in GOOD


def _scrub(text: str, case: Case) -> str:
    """Case paths shortened; printable as UTF-8 (lone surrogates escaped); one line."""
    text = text.replace(str(case.out), "<out>").replace(str(case.dir), "<case>")
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text)


def run_case(case: Case, *, timeout: float, mem_bytes: int, cli: list[str] | None = None) -> Result:
    t0 = time.perf_counter()
    if cli is None:
        rec = run_forked(
            lambda: api_actions(case), timeout=timeout, mem_bytes=mem_bytes, drop_dac=case.drop_dac
        )
    else:
        rec = run_cli(case, cli, timeout=timeout, mem_bytes=mem_bytes)
    if case.canary.exists():
        rec = {"outcome": "code_ran", "message": f"canary file written ({rec.get('outcome')})"}
    return Result(
        case.seed_value,
        case.index,
        case.seed.name,
        case.cls,
        case.mutation,
        _scrub(case.desc, case),
        rec.get("outcome", "crash"),
        _scrub(str(rec.get("message", "")), case),
        rec.get("where", ""),
        time.perf_counter() - t0,
        " ".join(_scrub(a, case) for a in cli) if cli else "",
    )


# ============================================================================ CLI sample


HOSTILE_OPTIONS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "read": (
        ("--alpha", ("nan", "inf", "-1", "0", "1e-320", "1e308", "-inf")),
        ("--layer", ("99999999999999999999", "-1", "0")),
        ("--module", ("(.+)+Z", "", "q" * 10000, "[", "q")),
        ("--format", ("peft", "hdf5", "kohya", "plain", "gguf")),
    ),
    "compute": (("--dtype", ("float32",)), ("--seed", ("-1", str(2**70)))),
    "spectrum": (("--rcond", ("nan", "inf", "-1", "1e308")),),
    "similarity": (("--max-i", ("1000000000",)), ("--max-j", ("1",)), ("--factor", ("B", "left"))),
    "rank": (
        ("--energy", ("nan", "1e-320", "1")),
        ("--ratio", ("nan", "1e-320")),
        ("--rank", ("1000000000", "1")),
    ),
    "base": (
        ("--method", ("exact", "iterative")),
        ("--max-i", ("1000000000", "1")),
        ("--side", ("left",)),
    ),
}


def _hostile(rng: random.Random, groups: tuple[str, ...]) -> list[str]:
    """Zero to two hostile options from ``groups`` (the CLI's own input validation)."""
    out: list[str] = []
    for _ in range(rng.choice((0, 0, 1, 2))):
        name, values = rng.choice([o for g in groups for o in HOSTILE_OPTIONS[g]])
        out += [name, rng.choice(values)]
    return out


def cli_argv(case: Case) -> list[str]:
    rng = case.rng
    e, out = str(case.entry), str(case.out / "cli_out")
    fmt = rng.choice(([], ["--csv"], ["--json"]))
    if case.seed.kind == "adapter":
        argv, groups = rng.choice(
            (
                (["inspect", e, *fmt], ("read",)),
                (["spectrum", e, *fmt], ("read", "compute", "spectrum")),
                (["rank", e, "--energy", "0.9", *fmt], ("read", "rank")),
                (["similarity", e, e, *fmt], ("read", "compute", "similarity")),
                (["resize", e, "--energy", "0.9", "--out", out + ".h5"], ("read", "rank")),
            )
        )
    else:
        base = ["--base", e, "--delta", str(case.companion)]
        argv, groups = rng.choice(
            (
                (["amplify", *base, *fmt], ("read", "compute", "base")),
                (["weight-similarity", *base, *fmt], ("read", "compute", "base")),
                (["merge", *base, "--out", out], ("read",)),
            )
        )
    if rng.random() < 0.4:
        argv += _hostile(rng, groups)
    return [a.replace("\0", "") for a in argv]  # argv cannot hold NUL


_NONFINITE_TEXT = re.compile(r"(?<![\w.])-?(nan|inf|infinity)(?![\w])", re.I)


def run_cli(case: Case, argv: list[str], *, timeout: float, mem_bytes: int) -> dict:
    """``lorascope ARGV`` in a forked child with stdout/stderr on files; the contract: exit 0
    (no nan/inf printed) or 2 with exactly one non-warning stderr line starting ``error:``."""
    out_path, err_path = case.out / "cli.stdout", case.out / "cli.stderr"

    def target() -> dict:
        fo = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        fe = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        os.dup2(fo, 1)
        os.dup2(fe, 2)
        # As Python sets them up under a UTF-8 locale: stderr escapes what it cannot encode.
        out = os.fdopen(1, "wb", closefd=False)
        err = os.fdopen(2, "wb", closefd=False)
        sys.stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
        sys.stderr = io.TextIOWrapper(
            err, encoding="utf-8", errors="backslashreplace", write_through=True
        )
        warnings.resetwarnings()
        code: Any = 0
        try:
            cli_main.main(args=argv, prog_name="lorascope", standalone_mode=True)
        except SystemExit as e:
            code = e.code
        except BaseException as e:  # what Python would print as a traceback, exit status 1
            traceback.print_exc()
            rec = classify_exception(e)
            code = 1 if rec["outcome"] != "oom" else "oom"
            if code == "oom":
                return rec
        sys.stdout.flush()
        sys.stderr.flush()
        return {"code": code if isinstance(code, int) else (0 if code is None else 1)}

    rec = run_forked(
        target, timeout=timeout, mem_bytes=mem_bytes, drop_dac=case.drop_dac, quiet=False
    )
    if "code" not in rec:
        return rec
    code = rec["code"]
    stdout = out_path.read_text(errors="replace") if out_path.exists() else ""
    stderr = err_path.read_text(errors="replace") if err_path.exists() else ""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    if code == 0:
        m = _NONFINITE_TEXT.search(stdout)
        if m:
            line = next(ln for ln in stdout.splitlines() if m.group(0) in ln)
            return {"outcome": "non_finite", "message": f"stdout: {line.strip()[:200]}"}
        return {"outcome": "ok", "message": ""}
    if code == 2:
        if len(lines) == 1 and lines[0].startswith("error:"):
            return {"outcome": "lorascope_error", "message": lines[0][:300]}
        return {"outcome": "bad_message", "message": f"exit 2, stderr: {' | '.join(lines)[:300]}"}
    last = lines[-1] if lines else ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', stderr)
    own = [f for f in frames if "lorascope" in f[0] or "/cli/" in f[0]] or frames
    where = ""
    if own:
        where = f"{_short(own[-1][0])}:{own[-1][1]} {own[-1][2]}"
    return {"outcome": "other_exception", "message": f"{last[:300]} (exit {code})", "where": where}


# ============================================================================ driver


def _vm_size() -> int:
    """This process's virtual size (bytes): what a child inherits before it allocates."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


class Fuzzer:
    """Builds the corpus once; runs API cases and CLI cases by index."""

    def __init__(
        self,
        seed: int = 0,
        *,
        workdir: Path | None = None,
        timeout: float = 20.0,
        mem_gib: float = 3.0,
        keep: bool = False,
    ) -> None:
        torch.set_num_threads(1)
        self.seed = seed
        self.timeout = timeout
        self.mem_gib = mem_gib
        self.mem_bytes = _vm_size() + int(mem_gib * 2**30)  # on top of what is mapped now
        self.keep = keep
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lorascope-fuzz-")
            workdir = Path(self._tmp.name)
        self.root = Path(workdir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.corpus = self.root / "corpus"
        if self.corpus.exists():
            _rmtree(self.corpus)
        self.corpus.mkdir()
        self.cases = self.root / "cases"
        self.cases.mkdir(exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.seeds = build_corpus(self.corpus)
            self._warm_up()

    def _warm_up(self) -> None:
        """Run every clean seed once in this process, so that what the library imports lazily
        is imported here, once, and every child runs the same code."""
        for s in self.seeds.values():
            entry = self.corpus / s.name / s.entry
            with contextlib.suppress(Exception):
                if s.kind == "adapter":
                    a = load_adapter(entry)
                    spectrum(a), similarity(a, a), rank(a, RankRule("energy", 0.9))
                else:
                    b = load_base(entry)
                    a = load_adapter(self.corpus / s.name / s.adapter)
                    amplify(a, b)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def case(self, index: int, *, cli: bool = False) -> Case:
        seed_value = self.seed if not cli else self.seed + 1_000_003
        return prepare(self.seeds, self.corpus, self.cases, seed_value, index)

    def run(self, index: int, *, cli: bool = False) -> Result:
        case = self.case(index, cli=cli)
        try:
            argv = cli_argv(case) if cli else None
            r = run_case(case, timeout=self.timeout, mem_bytes=self.mem_bytes, cli=argv)
            r.seed = self.seed
            return r
        finally:
            if not self.keep:
                _rmtree(case.dir)
                _rmtree(case.out)

    def run_many(
        self,
        indices: Iterable[int],
        *,
        cli: bool = False,
        progress: Callable[[int, Result], None] | None = None,
    ) -> list[Result]:
        out = []
        for n, i in enumerate(indices):
            r = self.run(i, cli=cli)
            out.append(r)
            if progress:
                progress(n, r)
        return out


# ============================================================================ report


def _table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def outcome_table(results: list[Result], key: Callable[[Result], tuple[str, ...]], names) -> str:
    groups: dict[tuple[str, ...], Counter] = {}
    for r in results:
        groups.setdefault(key(r), Counter())[r.outcome] += 1
    cols = [o for o in OUTCOMES if any(c[o] for c in groups.values())] or ["ok"]
    rows = []
    for k in sorted(groups):
        c = groups[k]
        rows.append([*k, str(sum(c.values())), *(str(c[o]) if c[o] else "" for o in cols)])
    total = Counter()
    for c in groups.values():
        total.update(c)
    rows.append(
        ["**all**", *([""] * (len(names) - 1)), f"**{sum(total.values())}**"]
        + [f"**{total[o]}**" if total[o] else "" for o in cols]
    )
    return _table(rows, [*names, "n", *cols])


def failure_lines(results: list[Result], limit: int | None = None) -> list[str]:
    bad = [r for r in results if r.bad]
    lines = []
    for r in bad[:limit]:
        what = f" `{r.command}`" if r.command else ""
        where = f" [{r.where}]" if r.where else ""
        msg = r.message.replace("|", "\\|")
        desc = r.desc.replace("|", "\\|")
        lines.append(
            f"| {r.seed} | {r.index} | {r.layout} | {r.mutation}: {desc}{what} | {r.outcome} | "
            f"{msg}{where} |"
        )
    return lines


def failure_class(r: Result) -> str:
    """A key that groups failures with one cause: the outcome, the exception type and the
    frame it came from (or the step / mutation, for results without a traceback)."""
    exc = r.message.split(":", 1)[0] if r.outcome in ("other_exception", "oom") else ""
    if r.outcome in ("other_exception", "oom", "bad_message") and (r.where or exc):
        return f"{r.outcome}: {exc} at {r.where or '?'}"
    if r.outcome == "non_finite":
        return f"non_finite: {r.message.split(':', 1)[0]} ({r.mutation})"
    if r.outcome == "coerced":
        return f"coerced: {r.message.split('=', 1)[0]}"
    return f"{r.outcome}: {r.mutation}"


def class_table(results: list[Result]) -> str:
    groups: dict[str, list[Result]] = {}
    for r in results:
        if r.bad:
            groups.setdefault(failure_class(r), []).append(r)
    rows = []
    for key, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        layouts = ", ".join(sorted({r.layout for r in rs}))
        ex = rs[0]
        what = f"#{ex.index} {ex.mutation}: {ex.desc}"[:160].replace("|", "\\|")
        rows.append([key.replace("|", "\\|"), str(len(rs)), layouts, what])
    return _table(rows, ["failure class", "cases", "layouts", "example"])


def summary(results: list[Result], cli: list[Result]) -> str:
    c = Counter(r.outcome for r in results)
    cc = Counter(r.outcome for r in cli)
    bad = sum(v for k, v in c.items() if k not in GOOD)
    cbad = sum(v for k, v in cc.items() if k not in GOOD)
    parts = ", ".join(f"{k} {c[k]}" for k in OUTCOMES if c[k])
    cparts = ", ".join(f"{k} {cc[k]}" for k in OUTCOMES if cc[k])
    return (
        f"{len(results)} API cases: {bad} bad ({parts}); "
        f"{len(cli)} CLI runs: {cbad} bad ({cparts or 'none'})"
    )


def report(
    results: list[Result],
    cli: list[Result],
    *,
    command: str,
    t_api: float,
    t_cli: float,
    fz: Fuzzer,
) -> str:
    rate = len(results) / max(t_api, 1e-9)
    root = "root (unreadable-file cases drop CAP_DAC_OVERRIDE/READ_SEARCH)"
    n_failed = sum(r.desc.startswith("(mutation failed") for r in results + cli)
    by_outcome: dict[str, float] = {}
    for r in results:
        by_outcome[r.outcome] = by_outcome.get(r.outcome, 0.0) + r.seconds
    lines = [
        "# Fuzz run (issue 11)",
        "",
        f"Command: `{command}`. Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}, h5py {h5py.__version__}"
        f"{', gguf ' + getattr(gguf, '__version__', 'yes') if gguf else ', no gguf'}; "
        f"load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        f"Seed {fz.seed}; {len(results)} API cases in {t_api:.0f} s ({rate:.1f} cases/s) and "
        f"{len(cli)} CLI runs in {t_cli:.0f} s ({len(cli) / max(t_cli, 1e-9):.1f}/s). Per case: "
        f"a fork of one process that imported lorascope and torch, RLIMIT_AS = its "
        f"{(fz.mem_bytes / 2**30 - fz.mem_gib):.1f} GiB + {fz.mem_gib:g} GiB, a "
        f"{fz.timeout:g} s timeout. Run as {root if os.geteuid() == 0 else 'non-root'}; "
        f"{n_failed} mutation(s) did not apply (those cases ran on the clean seed).",
        "Time by outcome: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in sorted(by_outcome.items(), key=lambda x: -x[1]))
        + ".",
        "",
        f"Summary: {summary(results, cli)}.",
        "",
        "## API cases: outcomes by layout × mutation class",
        "",
        outcome_table(results, lambda r: (r.layout, r.cls), ["layout", "class"]),
        "",
        "## API cases: outcomes by mutation class",
        "",
        outcome_table(results, lambda r: (r.cls,), ["class"]),
        "",
    ]
    if cli:
        lines += [
            "## CLI sample: outcomes by command",
            "",
            "Exit status must be 0 (no nan/inf printed) or 2 with one `error:` line on stderr.",
            "",
            outcome_table(cli, lambda r: (r.command.split()[0],), ["command"]),
            "",
        ]
    lines += [
        "## API cases: outcomes by mutator",
        "",
        outcome_table(results, lambda r: (r.cls, r.mutation), ["class", "mutator"]),
        "",
        "## Failure classes (API and CLI), most cases first",
        "",
        class_table(results + cli),
        "",
    ]
    bad = failure_lines(results) + failure_lines(cli)
    lines += [
        f"## Failing cases ({len(bad)})",
        "",
        "Reproduce one with `python -m benchmarks.fuzz --seed SEED --case INDEX --keep DIR` "
        "(a CLI run: add `--as-cli`).",
        "",
        "| seed | index | layout | mutation | outcome | message [top frame] |",
        "|---|---|---|---|---|---|",
        *bad,
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.fuzz", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--cases", type=int, default=2000, help="API cases to run")
    ap.add_argument("--cli", type=int, default=300, help="CLI runs to sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first case index")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per case")
    ap.add_argument("--mem", type=float, default=3.0, help="RLIMIT_AS per case, GiB")
    ap.add_argument("--out", type=Path, help="write the Markdown report here")
    ap.add_argument("--case", type=int, help="run only this case, verbosely")
    ap.add_argument("--as-cli", action="store_true", help="with --case: that CLI run")
    ap.add_argument("--keep", type=Path, help="work here and keep the case files")
    ap.add_argument("--list", action="store_true", help="list the seeds and mutators")
    return ap.parse_args(argv)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.fuzz " + shlex.join(sys.argv[1:] if argv is None else argv)
    fz = Fuzzer(
        args.seed,
        workdir=args.keep,
        timeout=args.timeout,
        mem_gib=args.mem,
        keep=args.keep is not None or args.case is not None,
    )
    try:
        if args.list:
            for s in fz.seeds.values():
                ms = [m.name for m in MUTATORS if m.applies(s)]
                print(f"{s.name:14s} {s.kind:8s} {s.entry:28s} {', '.join(ms)}")
            return 0
        if args.case is not None:
            r = fz.run(args.case, cli=args.as_cli)
            print(json.dumps(r.__dict__, indent=2))
            print(f"files: {fz.cases / f'case{args.case:06d}'}")
            return 0 if not r.bad else 1

        def progress_for(what: str) -> Callable[[int, Result], None]:
            t0, bad = time.perf_counter(), [0]

            def progress(n: int, r: Result) -> None:
                if r.bad:
                    bad[0] += 1
                    _log(
                        f"{what} #{r.index} {r.layout}/{r.mutation}: {r.outcome}: {r.message[:120]}"
                    )
                if (n + 1) % 250 == 0:
                    rate = (n + 1) / (time.perf_counter() - t0)
                    _log(f"{what}: {n + 1} cases, {bad[0]} bad, {rate:.1f} cases/s")

            return progress

        t0 = time.perf_counter()
        cases = range(args.start, args.start + args.cases)
        results = fz.run_many(cases, progress=progress_for("API"))
        t_api = time.perf_counter() - t0
        _log(f"API: {len(results)} cases in {t_api:.0f} s ({len(results) / t_api:.1f}/s)")
        t1 = time.perf_counter()
        cli = fz.run_many(range(args.cli), cli=True, progress=progress_for("CLI"))
        t_cli = time.perf_counter() - t1
        text = report(results, cli, command=command, t_api=t_api, t_cli=t_cli, fz=fz)
        if args.out:
            args.out.write_text(text, encoding="utf-8", errors="backslashreplace")
            _log(f"wrote {args.out}")
        print(summary(results, cli) + f"; {len(results) / t_api:.1f} API cases/s")
        return 0
    finally:
        fz.close()


if __name__ == "__main__":
    sys.exit(main())
