"""``python -m benchmarks``: the analysis benchmarks of issue 5, written into BENCHMARKS.md.

1. SVD of ΔW = s·B A: lorascope's factored route vs dense ``torch.linalg.svd`` (the peers' route)
   and ``numpy.linalg.svd``; speed ratios and the largest relative singular-value difference.
2. The whole φ grid (i ≤ 8, j ≤ 64, d = 4096) vs a naive per-(i, j) computation.
3. A synthetic GPT-3-shaped pair of adapters (96 layers, q and v, d = 12288, r = 8 and 64, fp16
   PEFT safetensors): ``lorascope similarity`` and ``spectrum`` end to end from the files: wall
   time, peak RSS, and the read floor.
4. ``lorascope amplify`` against a sharded fp16 base checkpoint: time, bytes read vs bytes needed,
   and the W-top-r baseline's accuracy vs an exact SVD.
5. With ``--device cuda`` (or ``--only gpu``): the accelerator check of :mod:`benchmarks.gpu_check`,
   the training core and the batched amplify on the device against the CPU.

The LLM-scale benchmark of issue 15 (a Llama-3-8B-shaped checkpoint) is separate:
``python benchmarks/llm_scale.py``.

Only the section between ``<!-- analysis:start -->`` and ``<!-- analysis:end -->`` of
BENCHMARKS.md is rewritten; everything else in the file is kept.

Usage::

    python -m benchmarks                    # full run (~10 minutes on 2 cores; ~4 GB temp files)
    python -m benchmarks --quick            # small shapes, a smoke test (~1 minute)
    python -m benchmarks --device cuda --repeats 5
    python -m benchmarks --device cuda --quick        # the GPU check (< 5 minutes)
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import analysis_kernels, analysis_model
from benchmarks.analysis_common import machine

START, END = "<!-- analysis:start -->", "<!-- analysis:end -->"
ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="torch device for lorascope (e.g. cuda)")
    ap.add_argument("--quick", action="store_true", help="small shapes: a smoke test")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    ap.add_argument("--workdir", type=Path, help="keep the synthetic files here (else a temp dir)")
    ap.add_argument(
        "--only",
        nargs="+",
        choices=["svd", "grid", "model", "amplify", "gpu"],
        help="run only these parts (the section is written only for a full run)",
    )
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    return ap.parse_args(argv)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_section(path: Path, text: str, start: str = START, end: str = END) -> None:
    """Replace the section of ``path`` between the markers ``start`` and ``end`` (the analysis
    section by default; append it if absent), keeping the rest."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in old and end in old:
        head, rest = old.split(start, 1)
        tail = rest.split(end, 1)[1]
        new = head + block + tail
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    parts = set(args.only or ["svd", "grid", "model", "amplify"])
    if args.only is None and device.type != "cpu":
        parts.add("gpu")
    q = args.quick
    t_start = time.perf_counter()
    out = []
    cmd = "python -m benchmarks " + shlex.join(sys.argv[1:] if argv is None else argv)
    out.append("## Analysis (issue 5)\n")
    out.append(f"Command: `{cmd.strip()}`. Machine: {machine(device)}.\n")
    out.append(
        f"Medians over {args.repeats} repeats (after a warm-up run); ratios are from the same "
        "run. Synthetic inputs, fp16 on disk like real adapters; analysis in float64 (the "
        "default `--dtype`).\n"
    )

    if "svd" in parts:
        sizes = [(768, 8), (1024, 16)] if q else [(768, 8), (4096, 16), (4096, 64), (12288, 8)]
        md, _ = analysis_kernels.svd_rows(sizes, device, args.repeats, log)
        out.append("### 1. SVD of ΔW = s·B A\n")
        out.append(
            "lorascope: thin QR of both factors and an r×r SVD, from the fp16 factors upcast to "
            "float64 (`lorascope.linalg.factored_svd`). Dense: ΔW formed in float64 and fully "
            "decomposed (`full_matrices=False`), the peers' route; multi-second dense SVDs run "
            "once (their cost depends on d only). At d = 12288 the dense SVD (≈ 8 min) is not "
            "run: its time is extrapolated by d³ from the largest measured d, and no σ "
            "difference is reported.\n"
        )
        out.append(md + "\n")
    if "grid" in parts:
        d = 1024 if q else 4096
        md, _ = analysis_kernels.grid_row(d, 8, 64, device, args.repeats, log)
        out.append("### 2. The φ grid\n")
        out.append(
            "All 8 × 64 values of φ(i, j) = ‖U_iᵀ V_j‖_F² / min(i, j) for orthonormal U "
            "(d × 8), V (d × 64): one product M = UᵀV and a 2-D cumulative sum of M² "
            "(`lorascope.linalg.subspace_similarity`) vs one product and one norm per (i, j).\n"
        )
        out.append(md + "\n")

    if parts & {"model", "amplify"}:
        n_layers, d = (8, 2048) if q else (96, 12288)
        tmp = None
        if args.workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="lorascope-bench-")
            work = Path(tmp.name)
        else:
            work = args.workdir
            work.mkdir(parents=True, exist_ok=True)
        try:
            paths = {r: work / f"adapter_r{r}" for r in (8, 64)}
            shape_file = work / "shape.txt"
            if not (shape_file.is_file() and shape_file.read_text() == f"{n_layers} {d}"):
                log(f"writing adapters ({n_layers} layers, d = {d}) to {work}")
                paths = analysis_model.write_adapters(work, n_layers, d)
                shape_file.write_text(f"{n_layers} {d}")
            size = sum((p / "adapter_model.safetensors").stat().st_size for p in paths.values())
            if "model" in parts:
                md, _ = analysis_model.model_rows(paths, args.device, args.repeats, log)
                out.append("### 3. Whole model, end to end from files\n")
                out.append(
                    f"Two PEFT adapters, {n_layers} layers × (W_q, W_v) = {2 * n_layers} "
                    f"modules each, d = {d}, r = 8 and r = 64, fp16 safetensors "
                    f"({size / 2**20:,.0f} MiB together). Each command is a fresh "
                    "`python -m lorascope …` subprocess (interpreter start and imports "
                    "included), page cache warm; peak RSS is the command's own high-water mark "
                    "(`getrusage` in a small wrapper process, whose start is in every wall "
                    "time, the floor's included); peak anon. RSS is the largest anonymous "
                    "RSS sampled every 5 ms (`RssAnon`: memory the process owns, as opposed to "
                    "the file pages it maps; lorascope reads safetensors adapters as zero-copy "
                    "views of a private memory map). The read floor is a "
                    "subprocess that imports torch and reads every tensor of the same files "
                    "with `safe_open`; `wall / floor` is the target's ratio (≤ 3×).\n"
                )
                out.append(md + "\n")
            if "amplify" in parts:
                layers = [0, 1, 2]
                index = work / "base" / "model.safetensors.index.json"
                base_tag = work / "base.txt"
                if not (base_tag.is_file() and base_tag.read_text() == f"{layers} {d}"):
                    log("writing the sharded base checkpoint")
                    index = analysis_model.write_base(work, layers, d)
                    base_tag.write_text(f"{layers} {d}")
                md, _ = analysis_model.amplify_rows(paths, index, 1, args.device, args.repeats, log)
                d_acc = 1024 if q else 4096
                md2, _ = analysis_model.topr_accuracy(d_acc, (8, 64), args.device, log)
                out.append("### 4. amplify against a sharded base checkpoint\n")
                out.append(
                    f"A {len(layers)}-shard fp16 checkpoint (`model.safetensors.index.json`; "
                    "each shard: W_q, W_v and a layer norm of one layer, d × d = "
                    f"{d} × {d}); `lorascope amplify --layer 1` reads W_q and W_v of layer 1 "
                    "only. Bytes read are `BaseWeights.bytes_read` from the same call made "
                    "in-process. The synthetic W is a Gaussian bulk plus 96 separated outlier "
                    "directions. W stays fp16 as stored: ‖W‖_F, ‖UᵀWV‖_F and the products of the "
                    "iterative top-r are computed block by block (float32 products for ARPACK, "
                    "then one float64 Rayleigh–Ritz step), never a float64 copy of W.\n"
                )
                out.append(md + "\n")
                out.append(
                    f"W's top-r subspace by the default method (ARPACK above d = 2048) vs an "
                    f"exact dense SVD, at d = {d_acc} where the exact SVD is affordable; Δφ is "
                    "the largest difference of the φ grid against a random r-dim update, as "
                    "`weight-similarity` and `amplify` use it.\n"
                )
                out.append(md2 + "\n")
        finally:
            if tmp is not None:
                tmp.cleanup()
    if "gpu" in parts:
        from benchmarks.gpu_check import gpu_rows

        out.append(f"### 5. Accelerator check ({device})\n")
        out.append(
            "The same computation on the device and on the CPU (`benchmarks/gpu_check.py`): 20 "
            "AdamW steps of a LoRA-injected MLP (float32, TF32 off), and `amplify` over the "
            "quick Llama-shaped checkpoint of `benchmarks/llm_scale.py` (ΔW's SVDs batched on "
            "CUDA, W's top-r and the blocked products on the device).\n"
        )
        out.append(gpu_rows(device, log) + "\n")
    out.append(f"Total benchmark time: {time.perf_counter() - t_start:.0f} s.\n")
    text = "\n".join(out)
    print(text)
    if not args.no_write and args.only is None:
        write_section(args.output, text)
        log(f"wrote the analysis section of {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
