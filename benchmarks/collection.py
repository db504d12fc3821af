"""Collection benchmarks (issue 13): ``scan`` throughput against the read floor, and ``shared``
at scale.

1. **scan**: ``--n`` synthetic Llama-3-8B-shaped PEFT adapters (32 layers; r = 16 on q_proj
   4096→4096, v_proj 4096→1024 and o_proj 4096→4096; fp16 safetensors; decaying spectra,
   σ_i ∝ 0.7^i) are written to a temporary folder. Timed, on files already in the page cache:
   the read floor (``safetensors`` loading every tensor of every file, one process); ``scan``
   with 1 and 2 local worker processes and on a ``dask.distributed.LocalCluster`` of 2
   single-threaded worker processes, each into a fresh database; and a rescan of the unchanged
   collection.
2. **shared**: ``--n-shared`` updates of one weight (d = 4096, r = 16, decaying spectra, plus a
   planted shared direction), built in memory: the wall time and peak RSS of
   :func:`lorascope.collection.shared.shared_subspace` (``16·N > 4096``: the Gram matrix of the
   stacked ``V_i S_i`` and its top eigenpairs), with ``draws`` null draws; leave-one-out off
   above 256 adapters; in a child process with every core for BLAS.

The Collection section of BENCHMARKS.md (between its markers) is rewritten unless ``--no-write``.

Usage::

    python benchmarks/collection.py                 # 100 adapters for scan, 1,000 for shared
    python benchmarks/collection.py --n 1000 --n-shared 1000
"""

from __future__ import annotations

import argparse
import os
import sys

_ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_ap.add_argument("--n", type=int, default=100, help="adapters for the scan benchmark")
_ap.add_argument("--n-shared", type=int, default=1000, help="updates for the shared benchmark")
_ap.add_argument("--draws", type=int, default=1, help="null draws in the shared benchmark")
_ap.add_argument("--skip-scan", action="store_true")
_ap.add_argument("--skip-shared", action="store_true")
_ap.add_argument("--workdir", help="keep the synthetic adapters here (else a temp dir)")
_ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
_ap.add_argument("--shared-child", help=argparse.SUPPRESS)  # internal: run `shared`, write JSON
ARGS = _ap.parse_args()
for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    # the scan: one BLAS thread per worker process; `shared` runs in a child process that
    # uses every core (its Gram matrices and eigensolvers are numpy/LAPACK, set at import)
    os.environ.setdefault(_v, str(os.cpu_count() or 1) if ARGS.shared_child else "1")

import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from lorascope.adapter import LoraModule  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- collection:start -->", "<!-- collection:end -->"
R, LAYERS = 16, 32
SHAPES = {"q_proj": (4096, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _factors(d_out: int, d_in: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    decay = 0.7 ** torch.arange(R, dtype=torch.float32)  # σ_i ∝ 0.7^i
    A = torch.linalg.qr(torch.randn(d_in, R, generator=g))[0].T * decay[:, None]  # (r, d_in)
    B = torch.linalg.qr(torch.randn(d_out, R, generator=g))[0]  # (d_out, r)
    return A, B


def write_adapters(root: Path, n: int) -> list[Path]:
    from lorascope.formats import write_peft_adapter

    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(LAYERS):
            for name, (d_out, d_in) in SHAPES.items():
                A, B = _factors(d_out, d_in, g)
                key = f"model.layers.{layer}.self_attn.{name}"
                tensors[f"{key}.lora_A.weight"] = A.half()
                tensors[f"{key}.lora_B.weight"] = B.half()
        p = root / f"adapter_{i:04d}"
        write_peft_adapter(tensors, {"r": R, "lora_alpha": 2 * R,
                                     "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B"},
                           p)  # fmt: skip
        paths.append(p)
    return paths


def read_floor(paths: list[Path]) -> float:
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    for p in paths:
        for t in load_file(p / "adapter_model.safetensors").values():
            t.sum()  # touch every byte
    return time.perf_counter() - t0


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (``posix_fadvise(DONTNEED)`` after a sync):
    the next read comes from the disk."""
    os.sync()
    for p in paths:
        for f in p.iterdir():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def kernel_floor(paths: list[Path], sample: int = 10) -> float:
    """Seconds per adapter of the float64 factored SVDs alone (one process, one thread): what
    any exact scan must compute, over the first ``sample`` adapters."""
    from lorascope.formats import load_adapter
    from lorascope.linalg import factored_svd

    total = 0.0
    for p in paths[:sample]:
        mods = load_adapter(p).modules
        t0 = time.perf_counter()
        for m in mods:
            factored_svd(m.A, m.B, m.scale)
        total += time.perf_counter() - t0
    return total / min(sample, len(paths))


def bench_scan(root: Path) -> dict:
    from lorascope.collection.scan import scan

    log(f"writing {ARGS.n} Llama-8B-shaped adapters to {root}")
    paths = write_adapters(root, ARGS.n)
    size = sum(f.stat().st_size for p in paths for f in p.iterdir())
    evict(paths)
    cold = read_floor(paths)  # from the disk (and now in the page cache)
    floor = read_floor(paths)
    kernel = kernel_floor(paths) * len(paths)
    log(f"read floor {floor:.1f} s hot, {cold:.1f} s cold, for {size / 2**30:.2f} GiB; "
        f"factored SVDs alone {kernel:.1f} s")  # fmt: skip
    out = {"n": ARGS.n, "bytes": size, "floor": floor, "cold": cold, "kernel": kernel, "runs": {}}
    dbs = root / "dbs"
    dbs.mkdir()
    for label, kw in (("1 worker", {"workers": 1}), ("2 workers", {"workers": 2})):
        t0 = time.perf_counter()
        s = scan([root], dbs / f"{label.replace(' ', '_')}.db", **kw)
        out["runs"][label] = time.perf_counter() - t0
        log(f"scan, {label}: {out['runs'][label]:.1f} s ({s.line() if hasattr(s, 'line') else s})")
        if label == "1 worker":  # 13 MB per adapter: keep one database on the disk at a time
            (dbs / "1_worker.db").unlink()
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        log("dask.distributed not installed: no Dask row")
    else:
        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        )
        with cluster, Client(cluster) as client:
            t0 = time.perf_counter()
            scan([root], dbs / "dask.db", scheduler=client)
            out["runs"]["Dask LocalCluster, 2 workers"] = time.perf_counter() - t0
        (dbs / "dask.db").unlink()
    out["db_bytes"] = (dbs / "2_workers.db").stat().st_size
    t0 = time.perf_counter()
    scan([root], dbs / "2_workers.db", workers=2)
    out["rescan"] = time.perf_counter() - t0
    log(f"rescan {out['rescan']:.2f} s")
    return out


def bench_shared() -> dict:
    """Run :func:`_shared_child` in a fresh process with every core for BLAS: its peak RSS is
    the `shared` computation's alone."""
    import json
    import subprocess

    env = dict(os.environ)
    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.pop(v, None)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shared.json"
        cmd = [sys.executable, __file__, "--n-shared", str(ARGS.n_shared), "--draws",
               str(ARGS.draws), "--shared-child", str(out)]  # fmt: skip
        subprocess.run(cmd, env=env, check=True)
        return json.loads(out.read_text())


def _shared_child() -> dict:
    from lorascope.collection.shared import shared_subspace

    d, n = 4096, ARGS.n_shared
    g = torch.Generator().manual_seed(0)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    mods = []
    for i in range(n):
        A, B = _factors(d, d, g)
        A[0] += 0.5 * u  # a weak planted shared input direction
        mods.append(LoraModule(name=f"a{i}", A=A.half(), B=B.half(), scale=2.0, layer=16,
                               kind="q", source=f"a{i}"))  # fmt: skip
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.set_num_threads(os.cpu_count() or 1)  # use the machine
    t0 = time.perf_counter()
    res = shared_subspace(mods, draws=ARGS.draws, max_k=64)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stack = d * R * n * 8
    log(f"shared over {n}: {secs:.1f} s, peak RSS {peak / 2**20:.2f} GiB, E(1) {res.energy[0]:.3f}")
    return {"n": n, "d": d, "seconds": secs, "peak_gib": peak / 2**20,
            "rss_before_gib": rss0 / 2**20, "stack_gib": stack / 2**30, "draws": ARGS.draws,
            "threads": torch.get_num_threads(),
            "e1": res.energy[0], "null1": res.nulls["spectra"][0],
            "mean1": res.nulls["mean"][0]}  # fmt: skip


def markdown(scan_res: dict | None, shared_res: dict | None) -> str:
    cmd = " ".join(["python benchmarks/collection.py", *sys.argv[1:]])
    lines = [
        "## Collections (issue 13)",
        "",
        f"`benchmarks/collection.py`. Machine: {platform.machine()}, {os.cpu_count()} cores; "
        f"torch {torch.__version__}; one BLAS thread per scan process, all cores for `shared`. "
        f"Command: `{cmd}`.",
        "",
    ]
    if scan_res:
        s = scan_res
        lines += [
            f"**scan**: {s['n']} synthetic Llama-3-8B-shaped PEFT adapters (32 layers, r = 16 on "
            f"q, v, o; fp16; {s['bytes'] / 2**30:.2f} GiB), files in the page cache. Read floor: "
            f"loading every tensor of every file in one process, {s['floor']:.1f} s from the "
            f"page cache, {s['cold']:.1f} s from the disk (evicted first). Kernel floor: the "
            f"factored SVDs alone (96 per adapter, float64, one thread), {s['kernel']:.1f} s. "
            f"Database: {s['db_bytes'] / s['n'] / 2**20:.1f} MiB per adapter (the default: top-8 V "
            "only).",
            "",
            "| engine | seconds | adapters/s | vs read (cache) | vs read (disk) | vs kernel | "
            "vs 1 worker |",
            "|---|---|---|---|---|---|---|",
        ]
        one = s["runs"].get("1 worker")
        for label, t in s["runs"].items():
            lines.append(f"| {label} | {t:.1f} | {s['n'] / t:.1f} | {t / s['floor']:.1f}× | "
                         f"{t / s['cold']:.1f}× | {t / s['kernel']:.2f}× | "
                         f"{(one / t if one else float('nan')):.2f}× |")  # fmt: skip
        lines += [
            "",
            f"Rescanning the unchanged collection: {s['rescan']:.2f} s "
            f"({s['rescan'] / s['runs']['2 workers']:.1%} of the first 2-worker scan).",
            "",
        ]
    if shared_res:
        r = shared_res
        lines += [
            f"**shared**: {r['n']} updates of one weight (d = {r['d']}, r = 16, fp16 factors, "
            f"in memory), {r['draws']} null draw(s), no leave-one-out, one process with "
            f"{r['threads']} BLAS threads: {r['seconds']:.1f} s, "
            f"peak RSS {r['peak_gib']:.2f} GiB (before: {r['rss_before_gib']:.2f} GiB; the "
            f"float64 stack of V_i S_i alone is {r['stack_gib']:.2f} GiB). E(1) = {r['e1']:.3f} "
            f"against {r['null1']:.3f} for the own-σ null and {r['mean1']:.3f} for the mean "
            "update's top direction (a weak planted shared direction).",
            "",
        ]
    return "\n".join(lines)


def write_section(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text()
    block = f"{START}\n{text}{END}"
    if START in doc:
        before, _, rest = doc.partition(START)
        _, _, after = rest.partition(END)
        doc = before + block + after
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(doc)


def main() -> None:
    if ARGS.shared_child:
        import json

        Path(ARGS.shared_child).write_text(json.dumps(_shared_child()))
        return
    torch.set_num_threads(1)
    scan_res = shared_res = None
    root = Path(ARGS.workdir) if ARGS.workdir else Path(tempfile.mkdtemp(prefix="lorascope_col_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if not ARGS.skip_shared:
            shared_res = bench_shared()
        if not ARGS.skip_scan:
            scan_res = bench_scan(root)
    finally:
        if not ARGS.workdir:
            shutil.rmtree(root, ignore_errors=True)
    text = markdown(scan_res, shared_res)
    print(text)
    if not ARGS.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
