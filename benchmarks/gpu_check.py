"""A short check of lorascope on an accelerator: the training core and the batched amplify.

``python -m benchmarks --device cuda --quick`` runs it (a few seconds of device time, under 5
minutes in all with the analysis smoke test); ``--device cpu`` runs the same code on the CPU, as
the test does. Each part runs the same computation on the device and on the CPU and reports the
largest difference and the time per call:

1. training core: a small MLP with :func:`lorascope.train.inject` LoRA (r = 8) on two layers,
   20 AdamW steps on fixed random data, float32, the same initial weights on both; the LoRA
   factors after training agree to float32 rounding amplified by 20 steps (TF32 is off);
2. amplify: the quick Llama-shaped checkpoint of :mod:`benchmarks.llm_scale` (2 layers × 7
   projections, bf16, sharded) with an r = 16 adapter; ``amplify(..., device=...)`` batches the
   factored SVDs of ΔW on CUDA (:func:`lorascope.analysis._common.batched_svds`) and runs the
   blocked products and W's top-r on the device; every Table 7 column agrees with the CPU run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.analysis_common import fmt_s, sync, table

__all__ = ["train_check", "amplify_check", "gpu_rows"]


def _train(device: torch.device, steps: int = 20) -> tuple[dict[str, torch.Tensor], float]:
    from lorascope.train import inject, lora_state_dict, mark_only_lora_as_trainable

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU())
    model.append(nn.Linear(256, 8))
    inject(model, ["0", "2"], r=8, alpha=16)
    for name, p in model.named_parameters():  # B = 0 at init: start from a non-zero update
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
    mark_only_lora_as_trainable(model)
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(512, 64, generator=g), torch.randn(512, 8, generator=g)
    model, X, Y = model.to(device), X.to(device), Y.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        sl = slice(64 * (i % 8), 64 * (i % 8 + 1))
        loss = nn.functional.mse_loss(model(X[sl]), Y[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync(device)
    per = (time.perf_counter() - t0) / steps
    return {k: v.detach().cpu() for k, v in lora_state_dict(model).items()}, per


def train_check(device: torch.device) -> tuple[float, float, float]:
    """``(largest relative difference of the LoRA factors, s/step on device, s/step on CPU)``."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        dev, t_dev = _train(device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    cpu, t_cpu = _train(torch.device("cpu"))
    diff = max(float((dev[k] - cpu[k]).norm() / cpu[k].norm()) for k in cpu)
    return diff, t_dev, t_cpu


def amplify_check(device: torch.device, work: Path) -> tuple[float, float, float, int]:
    """``(largest relative difference over every Table 7 column, s on device, s on CPU,
    modules)`` for the quick llm_scale checkpoint."""
    from benchmarks import llm_scale
    from lorascope.analysis import amplify
    from lorascope.formats import load_adapter, load_base

    index = llm_scale.write_base(work, 2, 2, llm_scale.QUICK)
    adapter = load_adapter(llm_scale.write_adapter(work, 2, llm_scale.QUICK, seed=0))
    base = load_base(index)
    cols = ("norm_delta", "norm_weight", "proj_delta", "proj_weight", "proj_random")
    runs = {}
    for label, d, batch in (("device", device, True), ("cpu", torch.device("cpu"), False)):
        # the device run batches ΔW's SVDs even on the CPU (the CUDA route, testable anywhere)
        kw = {"device": d, "method": "iterative", "batch": batch}
        amplify(adapter, base, **kw)  # warm-up (CUDA context, kernels)
        sync(d)
        t0 = time.perf_counter()
        res = amplify(adapter, base, **kw)
        sync(d)
        runs[label] = (res, time.perf_counter() - t0)
    (on_dev, t_dev), (on_cpu, t_cpu) = runs["device"], runs["cpu"]
    diff = max(
        abs(getattr(a, c) - getattr(b, c)) / abs(getattr(b, c))
        for a, b in zip(on_dev, on_cpu, strict=True)
        for c in cols
    )
    return diff, t_dev, t_cpu, len(on_cpu)


def gpu_rows(device: torch.device, log) -> str:
    """Both checks as a Markdown table; raises AssertionError when a difference is too large."""
    diff_t, dev_t, cpu_t = train_check(device)
    log(f"train: max rel. diff {diff_t:.1e}, {fmt_s(dev_t)}/step vs CPU {fmt_s(cpu_t)}")
    with tempfile.TemporaryDirectory(prefix="lorascope-gpu-") as tmp:
        diff_a, dev_a, cpu_a, n = amplify_check(device, Path(tmp))
    log(f"amplify: max rel. diff {diff_a:.1e}, {fmt_s(dev_a)} vs CPU {fmt_s(cpu_a)}")
    rows = [
        ["training core, 20 AdamW steps (per step)", fmt_s(dev_t), fmt_s(cpu_t), f"{diff_t:.1e}"],
        [f"amplify, {n} modules (batched on CUDA)", fmt_s(dev_a), fmt_s(cpu_a), f"{diff_a:.1e}"],
    ]
    assert diff_t < 1e-3, f"training on {device} differs from the CPU by {diff_t:.1e}"
    assert diff_a < 1e-8, f"amplify on {device} differs from the CPU by {diff_a:.1e}"
    return table(["check", str(device), "cpu", "max rel. diff"], rows)
