"""Table 7, Figure 8 and intruders at LLM scale (issue 15), on a Llama-3-8B-shaped checkpoint.

The benchmark writes, into a work directory (no download):

- a base checkpoint shaped like Llama-3-8B's projections: ``--layers`` (32) layers of q, k, v, o
  (GQA: k and v are 1024 × 4096), gate, up (14336 × 4096) and down (4096 × 14336), bf16, in
  ``--shards`` (8) safetensors shards with a ``model.safetensors.index.json``; each weight a
  decaying power-law low-rank part plus a Gaussian bulk, ``W = G₁ diag(c) G₂ + E`` (Gaussian
  factors of width 64, ``c_k ∝ (1 + k)^-½`` from 4× the bulk's edge down into it): a spectrum
  like real LLM weights', generated without any SVD;
- two PEFT adapters, r = 16 on all 7 projections (seeds 0 and 1).

Then it times, each case a fresh ``python -m lorascope …`` subprocess (peak RSS from
``getrusage`` of the child), cold (an empty spectral cache) and warm (the cache the cold run
filled), each against the time a fresh process needs to read (and upcast to float32) the same
tensors once: amplify of one layer (7 modules) with and without the W baseline, amplify of every
module, ``report --base`` with one and with two adapters, intruders of one layer. It also times
W's top-16 by the randomized block Krylov route against the ARPACK route it replaced, on one MLP
weight of the checkpoint.

Usage::

    python benchmarks/llm_scale.py                      # full: ~20 GB in the work dir, an hour
    python benchmarks/llm_scale.py --quick --no-write   # small shapes, seconds (the test)
    python benchmarks/llm_scale.py --layers 1           # one layer of the real shapes

Writes BENCHMARKS.md between ``<!-- llm-scale:start -->`` and ``<!-- llm-scale:end -->`` unless
``--no-write`` (or ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/llm_scale.py` from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.analysis_common import fmt_s, machine, table  # noqa: E402
from benchmarks.analysis_model import run  # noqa: E402

START, END = "<!-- llm-scale:start -->", "<!-- llm-scale:end -->"
PROJ = {  # name -> (part of the layer, d_out, d_in) as multiples of (hidden, kv, mlp)
    "q": ("self_attn", "h", "h"),
    "k": ("self_attn", "kv", "h"),
    "v": ("self_attn", "kv", "h"),
    "o": ("self_attn", "h", "h"),
    "gate": ("mlp", "mlp", "h"),
    "up": ("mlp", "mlp", "h"),
    "down": ("mlp", "h", "mlp"),
}
FULL = {"h": 4096, "kv": 1024, "mlp": 14336}
QUICK = {"h": 256, "kv": 64, "mlp": 896}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (seconds); implies no write")
    ap.add_argument("--layers", type=int, help="layers (default 32; --quick: 2)")
    ap.add_argument("--shards", type=int, help="safetensors shards (default 8; --quick: 2)")
    ap.add_argument("--layer", type=int, help="the layer of the one-layer cases (default: 5)")
    ap.add_argument("--workdir", type=Path, help="keep the generated files here (else a temp dir)")
    ap.add_argument("--device", default="cpu", help="--device of the lorascope commands")
    ap.add_argument("--skip", nargs="*", default=[], help="case groups to skip", choices=CASES)
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs of each short case; the median is kept"
    )
    args = ap.parse_args(argv)
    args.layers = args.layers or (2 if args.quick else 32)
    args.shards = min(args.shards or (2 if args.quick else 8), args.layers)
    if args.layer is None:
        args.layer = min(5, args.layers - 1)
    if not 0 <= args.layer < args.layers:
        ap.error(f"--layer {args.layer} is not in [0, {args.layers})")
    return args


CASES = ("amplify-layer", "amplify-all", "report", "intruders", "krylov")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _name(layer: int, p: str) -> str:
    return f"model.layers.{layer}.{PROJ[p][0]}.{p}_proj"


def _shape(p: str, dims: dict) -> tuple[int, int]:
    return dims[PROJ[p][1]], dims[PROJ[p][2]]


def synthetic_weight(m: int, n: int, seed: int, width: int = 64) -> torch.Tensor:
    """``(m, n)`` bf16: ``G₁ diag(c) G₂ + E`` with Gaussian ``G₁ (m, width)``, ``G₂ (width, n)``,
    ``E`` of std 0.02 (its spectrum's edge at ``0.02·(√m + √n)``) and ``c_k`` decaying as
    ``(1 + k)^-½`` from 4× that edge: a few outliers, then values down into the bulk."""
    g = torch.Generator().manual_seed(seed)
    std = 0.02
    edge = std * (math.sqrt(m) + math.sqrt(n))
    c = 4 * edge / math.sqrt(m * n) / torch.sqrt(1 + torch.arange(width, dtype=torch.float32))
    G1 = torch.randn(m, width, generator=g) * c  # (m, w)
    W = torch.randn(m, n, generator=g).mul_(std)  # (m, n) the bulk
    W.addmm_(G1, torch.randn(width, n, generator=g))  # + (m, w) @ (w, n)
    return W.to(torch.bfloat16)


def write_base(root: Path, layers: int, shards: int, dims: dict) -> Path:
    """The sharded bf16 base checkpoint and its index; returns the index path."""
    from lorascope.formats.base import write_safetensors

    out = root / "base"
    out.mkdir(parents=True, exist_ok=True)
    per = math.ceil(layers / shards)
    weight_map = {}
    for s in range(shards):
        tensors = [(la, p) for la in range(s * per, min(layers, (s + 1) * per)) for p in PROJ]
        if not tensors:
            continue
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        seeds = {
            f"{_name(la, p)}.weight": (p, 1000 * la + list(PROJ).index(p)) for la, p in tensors
        }
        specs = [(key, _shape(p, dims), torch.bfloat16) for key, (p, _) in seeds.items()]
        write_safetensors(
            out / file,
            specs,
            lambda key: synthetic_weight(*_shape(seeds[key][0], dims), seeds[key][1]),  # noqa: B023
            metadata={"format": "pt"},
        )
        weight_map.update(dict.fromkeys(seeds, file))
        log(f"wrote {file} ({len(seeds)} tensors)")
    index = out / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return index


def write_adapter(root: Path, layers: int, dims: dict, seed: int, r: int = 16) -> Path:
    """A PEFT adapter, rank ``r`` on all 7 projections of every layer, bf16."""
    from lorascope.formats.peft import write_peft_adapter

    g = torch.Generator().manual_seed(10_000 + seed)
    tensors = {}
    for la in range(layers):
        for p in PROJ:
            d_out, d_in = _shape(p, dims)
            key = _name(la, p)
            tensors[f"{key}.lora_A.weight"] = (torch.randn(r, d_in, generator=g) / d_in**0.5).to(
                torch.bfloat16
            )
            tensors[f"{key}.lora_B.weight"] = (torch.randn(d_out, r, generator=g) * 0.01).to(
                torch.bfloat16
            )
    out = root / f"adapter_seed{seed}"
    write_peft_adapter(
        tensors,
        {"r": r, "lora_alpha": 2 * r, "target_modules": [f"{p}_proj" for p in PROJ]},
        out,
    )
    (out / "train_config.json").write_text(json.dumps({"r": r, "seed": seed}))
    return out


_FLOOR = (
    "import json, sys, torch\n"
    "from pathlib import Path\n"
    "from safetensors import safe_open\n"
    "index = Path(sys.argv[1]); keys = sys.argv[2:]\n"
    "wm = json.loads(index.read_text())['weight_map']\n"
    "for key in keys:\n"
    "    with safe_open(str(index.parent / wm[key]), framework='pt') as f:\n"
    "        t = f.get_tensor(key).float()\n"
    "    del t\n"
)


def _keys(layers: list[int]) -> list[str]:
    return [f"{_name(la, p)}.weight" for la in layers for p in PROJ]


def _bench(cmd: list[str], env: dict, repeat: int = 1, before=None) -> tuple[float, float]:
    """Median wall time of ``repeat`` fresh processes (``before()`` ahead of each) and the
    largest peak RSS."""
    walls, peak = [], 0.0
    for _ in range(repeat):
        if before is not None:
            before()
        wall, rss, _ = run(cmd, env)
        walls.append(wall)
        peak = max(peak, rss)
    return statistics.median(walls), peak


_IN_PROCESS = (
    "import sys, time\n"
    "from lorascope.formats import load_adapter\n"
    "from lorascope.analysis import amplify, intruders\n"
    "from lorascope.cache import SpectralCache\n"
    "from lorascope.formats import load_base\n"
    "what, index, adapter, layer, module = sys.argv[1:6]\n"
    "ad, base, cache = load_adapter(adapter), load_base(index), SpectralCache()\n"
    "fn = amplify if what == 'amplify' else intruders\n"
    "t0 = time.perf_counter()\n"
    "fn(ad, base, layer=int(layer), module=module or None, cache=cache)\n"
    "print(time.perf_counter() - t0)\n"
)


def in_process(
    what: str, index: Path, adapter: Path, layer: int, module: str, env: dict, repeat: int
) -> float:
    """Median seconds of the analysis call alone (``amplify`` or ``intruders``, warm cache),
    in fresh processes: interpreter start, imports, and reading the adapter excluded."""
    import subprocess

    cmd = [sys.executable, "-c", _IN_PROCESS, what, str(index), str(adapter), str(layer), module]
    times = []
    for _ in range(repeat):
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        times.append(float(out.split()[-1]))
    return statistics.median(times)


def krylov_vs_arpack(index: Path, layer: int, log) -> list[list[str]]:
    """W's top-16 of the layer's gate projection: the randomized block Krylov route vs the
    ARPACK route it replaced (float32 products, one float64 Rayleigh–Ritz step), in-process."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, svds

    from lorascope.formats import load_base
    from lorascope.linalg import blocked_matmul, top_singular_krylov

    base = load_base(index)
    W = base.tensor(f"{_name(layer, 'gate')}.weight")
    m, n = W.shape
    k = 16

    def arpack() -> torch.Tensor:
        def apply(x: np.ndarray, transpose: bool) -> np.ndarray:
            X = torch.from_numpy(np.ascontiguousarray(x)).reshape(x.shape[0], -1)
            return blocked_matmul(W, X, transpose=transpose, dtype=torch.float32).double().numpy()

        op = LinearOperator(
            (m, n),
            matvec=lambda x: apply(x, False),
            rmatvec=lambda y: apply(y, True),
            matmat=lambda X: apply(X, False),
            rmatmat=lambda Y: apply(Y, True),
            dtype=np.float64,
        )
        v0 = np.random.default_rng(0).standard_normal(min(m, n))
        _, _, vh = svds(op, k=k, tol=1e-6, v0=v0, solver="arpack")
        Q = torch.linalg.qr(torch.from_numpy(vh.T.copy())).Q
        return torch.linalg.svdvals(blocked_matmul(W, Q, dtype=torch.float64))

    t0 = time.perf_counter()
    svd, info = top_singular_krylov(W, k)
    t_new = time.perf_counter() - t0
    t0 = time.perf_counter()
    s_old = arpack()
    t_old = time.perf_counter() - t0
    diff = abs(float(svd.S.norm()) - float(s_old.norm())) / float(s_old.norm())
    log(f"krylov {t_new:.2f} s vs arpack {t_old:.2f} s; ‖σ‖ rel. diff {diff:.1e}; {info}")
    return [
        [
            f"W top-16, gate_proj {m}×{n} bf16",
            fmt_s(t_new),
            fmt_s(t_old),
            f"{t_old / t_new:.1f}×",
            f"{diff:.1e}",
            f"{info.sigma_bound:.1e}",
            f"{info.angle_bound:.1e}",
            str(info.passes),
        ]
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dims = QUICK if args.quick else FULL
    t_start = time.perf_counter()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lorascope-llm-")
        work = Path(tmp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    try:
        text = _run(args, dims, work)
    finally:
        if tmp is not None:
            tmp.cleanup()
    text += f"\nTotal benchmark time: {time.perf_counter() - t_start:.0f} s.\n"
    print(text)
    if not (args.no_write or args.quick):
        write_section(args.output, text)
        log(f"wrote the llm-scale section of {args.output}")
    return 0


def _run(args: argparse.Namespace, dims: dict, work: Path) -> str:
    tag = work / "shape.json"
    want = json.dumps({"dims": dims, "layers": args.layers, "shards": args.shards})
    index = work / "base" / "model.safetensors.index.json"
    adapters = [work / "adapter_seed0", work / "adapter_seed1"]
    if not (tag.is_file() and tag.read_text() == want and index.is_file()):
        log(f"writing the base ({args.layers} layers, {dims}) and two adapters to {work}")
        index = write_base(work, args.layers, args.shards, dims)
        adapters = [write_adapter(work, args.layers, dims, s) for s in (0, 1)]
        tag.write_text(want)
    size = sum(f.stat().st_size for f in index.parent.glob("*.safetensors"))
    env = {**os.environ}
    py = sys.executable
    cli = [py, "-m", "lorascope"]
    dev = ["--device", args.device]
    base = ["--base", str(index)]
    L = args.layer
    R = args.repeat
    _bench([py, "-c", _FLOOR, str(index), *_keys([L])], env)  # page cache and disk warm
    floor_layer, rss_floor_layer = _bench([py, "-c", _FLOOR, str(index), *_keys([L])], env, R)
    all_layers = list(range(args.layers))
    floor_all, rss_floor_all = _bench([py, "-c", _FLOOR, str(index), *_keys(all_layers)], env, R)
    log(f"read floor: layer {fmt_s(floor_layer)}, all {fmt_s(floor_all)}")

    rows = []

    def case(
        label: str,
        cmd: list[str],
        floor: float,
        cache: Path,
        target: str,
        repeat: int = 1,
        cold: bool = False,
        floor_keys: list[str] | None = None,
    ) -> None:
        """``repeat`` runs, median; ``cold``: the cache emptied before each. ``floor_keys``:
        each run paired with a floor run reading those tensors just before it, and the ratio
        the median of the pairs' ratios (this machine drifts by 20–30 % over minutes)."""
        walls, floors, peak = [], [], 0.0
        for _ in range(repeat):
            if cold:
                shutil.rmtree(cache, ignore_errors=True)
            if floor_keys is not None:
                floors.append(_bench([py, "-c", _FLOOR, str(index), *floor_keys], env)[0])
            wall, rss = _bench(cmd, {**env, "LORASCOPE_CACHE_DIR": str(cache)})
            walls.append(wall)
            peak = max(peak, rss)
        wall = statistics.median(walls)
        if floors:
            floor = statistics.median(floors)
            ratio = statistics.median(w / f for w, f in zip(walls, floors, strict=True))
        else:
            ratio = wall / floor
        log(f"{label}: {fmt_s(wall)}, {peak:.2f} GiB, floor {fmt_s(floor)}, {ratio:.2f}×")
        rows.append(
            [label, fmt_s(wall), f"{peak * 1024:,.0f} MiB", fmt_s(floor), f"{ratio:.1f}×", target]
        )

    def fresh(name: str) -> Path:
        d = work / "cache" / name
        shutil.rmtree(d, ignore_errors=True)
        return d

    delta = ["--delta", str(adapters[0])]
    if "amplify-layer" not in args.skip:
        c = fresh("amplify-layer")
        amp = [*cli, "amplify", *base, *delta, "--layer", str(L), *dev]
        lk = _keys([L])
        case(f"amplify --layer {L}, cold", amp, floor_layer, c, "≤ 3× floor", R, True, lk)
        case(f"amplify --layer {L}, warm", amp, floor_layer, c, "≤ 1.5× floor", R, False, lk)
        case(
            f"amplify --layer {L} --no-w-baseline",
            [*amp, "--no-w-baseline"],
            floor_layer,
            fresh("none"),
            "≤ 1.5× floor",
            R,
            cold=True,
            floor_keys=lk,
        )
    if "amplify-all" not in args.skip:
        c = fresh("amplify-all")
        amp = [*cli, "amplify", *base, *delta, *dev]
        n = 7 * args.layers
        case(f"amplify, all {n} modules, cold", amp, floor_all, c, "≤ 3 min (8B)")
        case(f"amplify, all {n} modules, warm", amp, floor_all, c, "≤ 40 s (8B)")
    if "report" not in args.skip:
        rep = [*cli, "report", *base, "--no-progress", "--layer", str(L), *dev]
        one = [*rep, str(adapters[0]), "--out", str(work / "report1")]
        two = [*rep, str(adapters[0]), str(adapters[1]), "--out", str(work / "report2")]
        case("report --base, one adapter, cold", one, floor_all, fresh("r1"), "")
        case("report --base, two adapters, cold", two, floor_all, fresh("r2"), "≤ 1.2× one")
    if "intruders" not in args.skip:
        c = fresh("intruders")
        intr = [*cli, "intruders", *base, *delta, "--layer", str(L), *dev]
        case(f"intruders --layer {L}, cold", intr, floor_layer, c, "")
        case(f"intruders --layer {L}, warm", intr, floor_layer, c, "", R, False, _keys([L]))
        q = [*cli, "intruders", *base, *delta, "--layer", str(L), "--module", "q", *dev]
        qk = [f"{_name(L, 'q')}.weight"]
        floor_q = _bench([py, "-c", _FLOOR, str(index), *qk], env, R)[0]
        case(f"intruders --layer {L} --module q, warm", q, floor_q, c, "≤ 2 s", R, False, qk)
        env_c = {**env, "LORASCOPE_CACHE_DIR": str(c)}
        t = in_process("intruders", index, adapters[0], L, "q", env_c, R)
        log(f"intruders q, warm, in-process: {fmt_s(t)}")
        rows.append(
            [
                f"intruders --layer {L} --module q, warm: the analysis alone (in-process)",
                fmt_s(t),
                "",
                fmt_s(floor_q),
                f"{t / floor_q:.1f}×",
                "≤ 2 s",
            ]
        )
    torch_s, _ = _bench([py, "-c", "import torch"], env, R)
    log(f"python -c 'import torch': {fmt_s(torch_s)}")
    krylov = [] if "krylov" in args.skip else krylov_vs_arpack(index, L, log)

    shape = f"{dims['h']}/{dims['kv']}/{dims['mlp']}"
    cmd = "python benchmarks/llm_scale.py " + shlex.join(sys.argv[1:])
    out = ["## Table 7, Figure 8 and intruders at LLM scale (issue 15)\n"]
    out.append(f"Command: `{cmd.strip()}`. Machine: {machine(torch.device(args.device))}.\n")
    out.append(
        f"A Llama-3-8B-shaped base (hidden/kv/mlp = {shape}, {args.layers} layers × q, k, v, o, "
        f"gate, up, down, bf16, {args.shards} shards + index, {size / 2**30:.1f} GiB; synthetic "
        "weights with a decaying spectrum) and r = 16 PEFT adapters on all 7 projections. Each "
        "case is a fresh `python -m lorascope …` process (interpreter start and imports "
        f"included), page cache warm; peak RSS is the largest `getrusage` high-water mark. "
        "*Cold*: an empty spectral cache (`LORASCOPE_CACHE_DIR`), emptied before each run; "
        "*warm*: the cache the cold run filled. The floor is a fresh process that reads the "
        "same tensors once with `safe_open` and upcasts them to float32 (layer "
        f"{L}: {fmt_s(floor_layer)}, {rss_floor_layer * 1024:,.0f} MiB; all layers: "
        f"{fmt_s(floor_all)}, {rss_floor_all * 1024:,.0f} MiB; medians of {args.repeat}). "
        f"One-layer and one-module cases: {args.repeat} runs, each just after a run of its own "
        "floor; wall and floor are medians, the ratio the median of the pairs' ratios (this "
        "machine's timings drift by 20–30 % over minutes). The report's floor is the all-layer "
        f"one. A process that only imports torch takes {fmt_s(torch_s)} here; the row marked "
        "in-process times the analysis call alone in such a process (imports and reading the "
        "adapter excluded).\n"
    )
    out.append(
        table(["case", "wall", "peak RSS", "read floor", "wall / floor", "target"], rows) + "\n"
    )
    if krylov:
        out.append(
            "W's top-16 singular values (Table 7's W column) by the randomized block Krylov route "
            "(float32 GEMMs, float64 Rayleigh–Ritz with residual bounds) vs the ARPACK route it "
            "replaced (float32 products, one float64 Rayleigh–Ritz step), in-process:\n"
        )
        out.append(
            table(
                [
                    "matrix",
                    "Krylov",
                    "ARPACK",
                    "speed-up",
                    "‖σ‖ rel. diff",
                    "σ bound",
                    "angle bound",
                    "passes",
                ],
                krylov,
            )
            + "\n"
        )
    return "\n".join(out)


def write_section(path: Path, text: str) -> None:
    """Replace the llm-scale section of ``path`` (append it if absent), keeping the rest."""
    from benchmarks.__main__ import write_section as write

    write(path, text, START, END)


if __name__ == "__main__":
    sys.exit(main())
