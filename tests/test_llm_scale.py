"""benchmarks/llm_scale.py at toy size (the files it writes, the cases it times, the section it
writes), and the bounded memory of reading a base checkpoint tensor by tensor (issue 15)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds benchmarks/

from benchmarks import llm_scale
from lorascope.cache import SpectralCache
from lorascope.cli import main
from lorascope.formats import load_adapter, load_base


def test_quick_files_have_llama_shapes_and_a_decaying_spectrum(tmp_path):
    dims = llm_scale.QUICK
    index = llm_scale.write_base(tmp_path, 2, 2, dims)
    adapter = llm_scale.write_adapter(tmp_path, 2, dims, seed=0)
    wm = json.loads(index.read_text())["weight_map"]
    assert len(wm) == 14 and len(set(wm.values())) == 2
    base, ad = load_base(index), load_adapter(adapter)
    assert len(ad.modules) == 14 and {m.rank for m in ad.modules} == {16}
    shapes = {m.kind: base.weight_for(m).shape for m in ad.modules}
    h, kv, mlp = dims["h"], dims["kv"], dims["mlp"]
    assert shapes == {
        "q": (h, h),
        "k": (kv, h),
        "v": (kv, h),
        "o": (h, h),
        "gate": (mlp, h),
        "up": (mlp, h),
        "down": (h, mlp),
    }
    W = base.weight_for(next(m for m in ad.modules if m.kind == "gate"))
    assert W.dtype == torch.bfloat16
    s = torch.linalg.svdvals(W.double())
    edge = 0.02 * (mlp**0.5 + h**0.5)  # the Gaussian bulk's edge
    assert s[0] > 2.5 * edge and s[40] < 1.3 * edge  # outliers, then down into the bulk
    assert bool((s[:16].diff() < 0).all())


def test_amplify_on_the_quick_checkpoint_cold_then_warm(tmp_path, monkeypatch):
    dims = llm_scale.QUICK
    index = llm_scale.write_base(tmp_path, 1, 1, dims)
    adapter = llm_scale.write_adapter(tmp_path, 1, dims, seed=0)
    monkeypatch.setenv("LORASCOPE_CACHE_DIR", str(tmp_path / "cache"))
    args = ["amplify", "--base", str(index), "--delta", str(adapter), "--json"]
    args += ["--method", "iterative"]
    cold = CliRunner().invoke(main, args)
    assert cold.exit_code == 0, cold.output
    assert len(SpectralCache(tmp_path / "cache").entries()) == 7
    warm = CliRunner().invoke(main, args)
    assert json.loads(warm.output) == json.loads(cold.output)
    rows = json.loads(cold.output)
    assert all(r["proj_weight_bound"] is not None and r["proj_weight_bound"] < 1e-8 for r in rows)


def test_krylov_row_and_section_writing(tmp_path):
    index = llm_scale.write_base(tmp_path, 1, 1, llm_scale.QUICK)
    (row,) = llm_scale.krylov_vs_arpack(index, 0, lambda msg: None)
    assert row[0].startswith("W top-16, gate_proj") and float(row[4]) < 1e-8
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# B\n\nkeep me\n")
    llm_scale.write_section(md, "first")
    llm_scale.write_section(md, "second")
    text = md.read_text()
    assert "keep me" in text and "second" in text and "first" not in text
    assert text.count(llm_scale.START) == 1 and text.count(llm_scale.END) == 1


def test_args():
    a = llm_scale.parse_args(["--quick"])
    assert (a.layers, a.shards, a.layer) == (2, 2, 1)
    b = llm_scale.parse_args(["--layers", "3"])
    assert (b.layers, b.shards, b.layer) == (3, 3, 2)


_READER = textwrap.dedent(
    """
    import resource, sys
    import torch
    from lorascope.formats import load_base

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    base = load_base(sys.argv[1])
    before = rss_mib()
    peak = before
    for key in base.keys():
        t = base.tensor(key)
        float(t.float().abs().amax())  # touch every page
        peak = max(peak, rss_mib())
        del t
    print(before, peak, rss_mib())
    """
)


def test_reading_a_checkpoint_holds_the_tensor_in_flight_not_the_file(tmp_path):
    """Issue 15: the pages of every tensor read stay resident when the shards are kept mapped;
    read one at a time they go when dropped. 8 tensors of 32 MiB (256 MiB): the peak RSS above
    the start stays within a few tensors, and it falls back after each."""
    from safetensors.torch import save_file

    n = 8
    tensors = {f"layers.{i}.w.weight": torch.full((2048, 4096), float(i + 1)) for i in range(n)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)  # 8 × 32 MiB float32
    del tensors
    out = subprocess.run(
        [sys.executable, "-c", _READER, str(path)], capture_output=True, text=True, check=True
    )
    before, peak, after = (float(x) for x in out.stdout.split())
    per = 32.0
    assert peak - before < 4 * per, (before, peak, after)  # a mapped file would reach 8 ×
    assert after - before < 2 * per


def test_gpu_check_runs_its_cuda_route_on_the_cpu():
    """`python -m benchmarks --device cuda --quick` runs benchmarks/gpu_check.py; on the CPU the
    'device' side takes the batched (CUDA) route of amplify, and both sides must agree."""
    from benchmarks.__main__ import parse_args
    from benchmarks.gpu_check import gpu_rows

    assert "gpu" in parse_args(["--only", "gpu"]).only
    md = gpu_rows(torch.device("cpu"), lambda msg: None)
    assert "training core" in md and "amplify, 14 modules" in md
