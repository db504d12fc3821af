"""How much the factored SVD's time moves between fresh processes on this machine.

``python benchmarks/kernel_spread.py [--runs 6] [--d 4096] [--r 16]`` times
``lorascope.linalg.factored_svd`` (median over repeats, as ``python -m benchmarks`` does) in
``--runs`` fresh interpreter processes, with torch's default threads and with one thread, and
prints one line per process. On a shared 2-core VM the per-process medians of this
2-millisecond kernel spread by 2-3x (placement, CPU steal), which no repeat count inside one
process removes: read the ratios in BENCHMARKS.md with that spread in mind.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

_CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
from benchmarks.analysis_common import median_time
from benchmarks.analysis_kernels import _factors
from lorascope.linalg import factored_svd
dev = torch.device("cpu")
A, B, s = _factors({d}, {r}, dev)
t_default = median_time(lambda: factored_svd(A, B, s), dev, 5)
n = torch.get_num_threads()
torch.set_num_threads(1)
t_one = median_time(lambda: factored_svd(A, B, s), dev, 5)
print(f"{{n}} threads {{t_default * 1e3:.2f}} ms, 1 thread {{t_one * 1e3:.2f}} ms")
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--r", type=int, default=16)
    args = p.parse_args(argv)
    root = str(Path(__file__).resolve().parents[1])
    code = _CHILD.format(root=root, d=args.d, r=args.r)
    print(f"factored_svd at (d, r) = ({args.d}, {args.r}), one fresh process per line:")
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
