"""Whole-model benchmarks on synthetic GPT-3-shaped files (generated into a temp dir).

- two PEFT adapters (``model.layers.{l}.self_attn.{q,v}_proj``, fp16 safetensors), r = 8 and 64;
- a sharded fp16 base checkpoint (``model.safetensors.index.json``, one shard per layer) holding
  W_q, W_v and a layer-norm vector of a few layers.

Every command runs as a subprocess (``python -m lorascope ...``), end to end from the files, with
the page cache warm (one untimed run first); peak RSS from ``getrusage`` in a small wrapper. The
read floor is a subprocess that imports torch and safetensors and reads every tensor of the same
files.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.analysis_common import fmt_s, table

NAME = "model.layers.{l}.self_attn.{p}_proj"


def write_adapters(root: Path, n_layers: int, d: int, ranks=(8, 64), seed: int = 0) -> dict:
    """PEFT adapters sharing their top directions (so φ has structure), fp16 on disk."""
    g = torch.Generator().manual_seed(seed)
    r_max = max(ranks)
    tensors: dict[int, dict[str, torch.Tensor]] = {r: {} for r in ranks}
    for layer in range(n_layers):
        for p in ("q", "v"):
            A = torch.randn(r_max, d, generator=g) / d**0.5  # (r, d_in)
            B = torch.randn(d, r_max, generator=g) * 0.01  # (d_out, r)
            key = "base_model.model." + NAME.format(l=layer, p=p)
            for r in ranks:
                noise = 0.3 * torch.randn(r, d, generator=g) / d**0.5
                tensors[r][f"{key}.lora_A.weight"] = (A[:r] + noise).half()
                tensors[r][f"{key}.lora_B.weight"] = B[:, :r].contiguous().half()
    paths = {}
    for r in ranks:
        out = root / f"adapter_r{r}"
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors[r], str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "v_proj"],
            "fan_in_fan_out": False,
        }
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
        paths[r] = out
        del tensors[r]
    return paths


def spiked_weight(d: int, n_spikes: int, g: torch.Generator) -> torch.Tensor:
    """A GPT-like W: a Gaussian bulk plus ``n_spikes`` outlier directions with decaying, separated
    singular values (so its top-r subspace is well defined). Returned in fp16."""
    W = torch.randn(d, d, generator=g) * 0.02  # bulk edge ≈ 0.04·sqrt(d)
    edge = 0.04 * d**0.5
    U = torch.linalg.qr(torch.randn(d, n_spikes, generator=g))[0]
    V = torch.linalg.qr(torch.randn(d, n_spikes, generator=g))[0]
    s = edge * (1.5 + 8.0 * 0.93 ** torch.arange(n_spikes, dtype=torch.float32))
    W.addmm_(U * s, V.mT)  # (d, k) @ (k, d)
    return W.half()


def write_base(root: Path, layers: list[int], d: int, seed: int = 1) -> Path:
    """Sharded fp16 checkpoint: one shard per layer with W_q, W_v and a layer norm."""
    g = torch.Generator().manual_seed(seed)
    out = root / "base"
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for k, layer in enumerate(layers):
        shard = f"model-{k + 1:05d}-of-{len(layers):05d}.safetensors"
        t = {NAME.format(l=layer, p=p) + ".weight": spiked_weight(d, 96, g) for p in ("q", "v")}
        t[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(d, dtype=torch.float16)
        save_file(t, str(out / shard), metadata={"format": "pt"})
        total += sum(x.numel() * x.element_size() for x in t.values())
        weight_map.update(dict.fromkeys(t, shard))
        del t
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out / "model.safetensors.index.json"


# Peak RSS is read by a small wrapper process: a child forked straight from this (large)
# process would inherit its RSS high-water mark, which Linux keeps across exec. The wrapper also
# samples the child's anonymous RSS (/proc/PID/status RssAnon, every 5 ms): the memory the
# process owns, as opposed to file pages it maps (clean page cache the kernel can drop).
_WRAP = (
    "import resource, subprocess, sys, time\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "anon = 0\n"
    "while p.poll() is None:\n"
    "    try:\n"
    "        for line in open(f'/proc/{p.pid}/status'):\n"
    "            if line.startswith('RssAnon:'):\n"
    "                anon = max(anon, int(line.split()[1]))\n"
    "    except OSError:\n"
    "        pass\n"
    "    time.sleep(0.005)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, anon)\n"
    "sys.exit(p.returncode)\n"
)


def run(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """Wall seconds, peak RSS and peak anonymous RSS (GiB, sampled) of one subprocess."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _WRAP, *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]}")
    rss, anon = (int(x) / 2**20 for x in p.stdout.strip().splitlines()[-1].split())  # KiB -> GiB
    return wall, rss, anon


def median_run(cmd: list[str], env: dict, repeats: int) -> tuple[float, float, float]:
    """Median wall time, largest peak RSS and largest peak anonymous RSS over ``repeats``."""
    run(cmd, env)  # warm the page cache and the import caches
    res = [run(cmd, env) for _ in range(repeats)]
    return (
        statistics.median(w for w, _, _ in res),
        max(m for _, m, _ in res),
        max(a for _, _, a in res),
    )


_FLOOR = (
    "import sys, torch\n"
    "from safetensors import safe_open\n"
    "for p in sys.argv[1:]:\n"
    "    with safe_open(p, framework='pt') as f:\n"
    "        t = {k: f.get_tensor(k) for k in f.keys()}\n"
)
_IMPORT = "import lorascope.cli.main"


def model_rows(paths: dict, device: str, repeats: int, log) -> tuple[str, list[dict]]:
    """Item 3: similarity over every module pair and spectrum, end to end from files."""
    env = {**os.environ}
    py = [sys.executable]
    files = {r: str(p / "adapter_model.safetensors") for r, p in paths.items()}
    startup = median_run([*py, "-c", _IMPORT], env, repeats)[0]
    floor_both, rss_floor, anon_floor = median_run(
        [*py, "-c", _FLOOR, files[8], files[64]], env, repeats
    )
    floor_64 = median_run([*py, "-c", _FLOOR, files[64]], env, repeats)[0]
    dev = ["--device", device]
    cli = [*py, "-m", "lorascope"]
    cases = [
        (
            "similarity r8 vs r64 (table)",
            [*cli, "similarity", str(paths[8]), str(paths[64]), *dev],
            floor_both,
        ),
        (
            "similarity r8 vs r64 (--json)",
            [*cli, "similarity", str(paths[8]), str(paths[64]), "--json", *dev],
            floor_both,
        ),
        ("spectrum r64 (table)", [*cli, "spectrum", str(paths[64]), *dev], floor_64),
    ]
    rows, recs = [], []
    for label, cmd, floor in cases:
        wall, rss, anon = median_run(cmd, env, repeats)
        rec = {"case": label, "wall": wall, "rss": rss, "anon": anon, "floor": floor}
        rec["startup"] = startup
        log(f"model: {rec}")
        recs.append(rec)
        rows.append(
            [
                label,
                fmt_s(wall),
                f"{rss:.2f} GiB",
                f"{anon:.2f} GiB",
                fmt_s(floor),
                f"{wall / floor:.2f}×",
                f"{100 * floor / wall:.0f} %",
                fmt_s(wall - floor),
            ]
        )
    rows.append(
        [
            "read floor alone (both files)",
            fmt_s(floor_both),
            f"{rss_floor:.2f} GiB",
            f"{anon_floor:.2f} GiB",
            *[""] * 4,
        ]
    )
    rows.append(["`import lorascope.cli.main` alone", fmt_s(startup), *[""] * 6])
    md = table(
        [
            "command (all modules)",
            "wall (median)",
            "peak RSS",
            "peak anon. RSS",
            "read floor",
            "wall / floor",
            "floor share",
            "beyond floor",
        ],
        rows,
    )
    return md, recs


def amplify_rows(
    paths: dict, index: Path, layer: int, device: str, repeats: int, log
) -> tuple[str, dict]:
    """Item 4: amplify against the sharded base, from the CLI (time, RSS) and in-process (bytes)."""
    from lorascope.analysis import amplify
    from lorascope.formats import load_adapter, load_base

    ad = load_adapter(paths[8])
    base = load_base(index)
    t0 = time.perf_counter()  # in-process first: it also warms the page cache for the CLI run
    res = amplify(ad, base, layer=layer, device=device)
    t_api = time.perf_counter() - t0
    cmd = [sys.executable, "-m", "lorascope", "amplify", "--base", str(index), "--delta"]
    cmd += [str(paths[8]), "--layer", str(layer), "--device", device]
    # multi-second runs: ``repeats`` CLI runs without a further warm-up
    res_cli = [run(cmd, {**os.environ}) for _ in range(max(1, min(repeats, 2)))]
    wall = statistics.median(w for w, _, _ in res_cli)
    rss = max(m for _, m, _ in res_cli)
    anon = max(a for _, _, a in res_cli)
    needed = sum(m.d_out * m.d_in * 2 for m in ad.select(layer=layer))  # fp16 W_q, W_v
    on_disk = sum(p.stat().st_size for p in index.parent.glob("*.safetensors"))
    rec = {
        "wall": wall,
        "rss": rss,
        "anon": anon,
        "api": t_api,
        "bytes_read": base.bytes_read,
        "needed": needed,
        "on_disk": on_disk,
        "amplification": [r.amplification for r in res],
    }
    log(f"amplify: {rec}")
    md = table(
        [
            "amplify (r = 8, W_q and W_v of one layer)",
            "CLI wall (median)",
            "peak RSS",
            "peak anon. RSS",
            "in-process",
            "bytes read",
            "bytes of needed tensors",
            "checkpoint on disk",
        ],
        [
            [
                f"layer {layer}, d = {res[0].shape[0]}",
                fmt_s(wall),
                f"{rss:.2f} GiB",
                f"{anon:.2f} GiB",
                fmt_s(t_api),
                f"{base.bytes_read:,}",
                f"{needed:,}",
                f"{on_disk:,}",
            ]
        ],
    )
    return md, rec


def topr_accuracy(d: int, ranks, device: str, log) -> tuple[str, list[dict]]:
    """W's top-r subspace by the default (iterative, d > 2048) method vs an exact dense SVD."""
    from lorascope.linalg import subspace_similarity, top_singular

    g = torch.Generator().manual_seed(2)
    W = spiked_weight(d, 96, g).to(device)
    t_exact = time.perf_counter()
    exact = top_singular(W, max(ranks), method="exact")
    t_exact = time.perf_counter() - t_exact
    gd = torch.Generator().manual_seed(3)
    rows, recs = [], []
    for r in ranks:
        t0 = time.perf_counter()
        it = top_singular(W, r, method="auto")
        t_it = time.perf_counter() - t0
        D = torch.linalg.qr(torch.randn(d, r, generator=gd, dtype=torch.float64))[0].to(device)
        # φ against an update's directions, as weight-similarity uses them, and the subspaces
        phi_it = subspace_similarity(it.V, D)
        phi_ex = subspace_similarity(exact.V[:, :r], D)
        dphi = float((phi_it - phi_ex).abs().max())
        self_phi = float(subspace_similarity(it.V, exact.V[:, :r])[-1, -1])
        dS = float(((it.S - exact.S[:r]).abs() / exact.S[:r]).max())
        rec = {
            "d": d,
            "r": r,
            "t_iter": t_it,
            "t_exact": t_exact,
            "dphi": dphi,
            "subspace": 1 - self_phi,
            "dS": dS,
        }
        log(f"topr: {rec}")
        recs.append(rec)
        rows.append(
            [
                f"({d}, {r})",
                fmt_s(t_it),
                fmt_s(t_exact),
                f"{dphi:.1e}",
                f"{1 - self_phi:.1e}",
                f"{dS:.1e}",
            ]
        )
    md = table(
        [
            "(d, r)",
            "top-r (default method)",
            "exact SVD (once, all r)",
            "max abs Δφ vs exact",
            "1 − φ(r, r) iterative vs exact",
            "max rel. σ diff",
        ],
        rows,
    )
    return md, recs


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def isclose(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)
