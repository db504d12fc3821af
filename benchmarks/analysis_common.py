"""Timing, machine description and Markdown helpers shared by the analysis benchmarks."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    fn: Callable[[], object], device: torch.device, repeats: int, min_time: float = 0.05
) -> float:
    """Median seconds per call over ``repeats`` timed runs (after one warm-up call).

    Fast calls are looped inside one timed run until it lasts ``min_time`` so that timer
    resolution and Python overhead of the harness do not dominate.
    """
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    once = time.perf_counter() - t0
    inner = max(1, int(min_time / max(once, 1e-9)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def time_once(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def blas_info() -> str:
    """The BLAS/LAPACK torch and numpy use (threadpoolctl if installed, else build configs)."""
    try:
        from threadpoolctl import threadpool_info

        libs = {
            f"{i.get('internal_api')} {i.get('version') or ''} ({i.get('num_threads')} threads)"
            for i in threadpool_info()
        }
        if libs:
            return "; ".join(sorted(libs))
    except ImportError:
        pass
    cfg = torch.__config__.show()
    torch_blas = next(
        (ln.split("BLAS_INFO=")[1].split(",")[0] for ln in cfg.splitlines() if "BLAS_INFO=" in ln),
        "unknown",
    )
    torch_blas += ", LAPACK " + next(
        (
            ln.split("LAPACK_INFO=")[1].split(",")[0]
            for ln in cfg.splitlines()
            if "LAPACK_INFO=" in ln
        ),
        "?",
    )
    try:
        import numpy as np

        np_cfg = np.show_config(mode="dicts")
        np_blas = np_cfg["Build Dependencies"]["blas"]["name"]
    except Exception:  # numpy < 1.26 has no dict mode
        np_blas = "unknown"
    return f"torch: {torch_blas}; numpy: {np_blas}"


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = ""
    if device.type == "cuda":
        dev = f"; device {torch.cuda.get_device_name(device)}"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads); BLAS {blas_info()}{dev}"
    )


def fmt_s(t: float | None) -> str:
    if t is None:
        return "—"
    if t >= 100:
        return f"{t:.0f} s"
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.0f} µs"


def fmt_x(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:,.0f}×" if x >= 100 else f"{x:.1f}×"


def table(cols: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
