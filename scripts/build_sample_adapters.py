"""Regenerate everything in sample_adapters/: one command, well under an hour on 2 CPU cores.

Trains all-MiniLM-L6-v2 on the Debian-sections task (data/debian_sections) with the project's
own training core: head only, LoRA on W_q and W_v of every layer at r in {1, 2, 4, 8, 64}
(two seeds at r = 8 and r = 64, checkpoints of the r = 8 seed-0 run), and full fine-tuning,
all with the same data, steps and batch. Each run is ``lorascope train
sample_adapters/configs/base.toml --set ...`` with the overrides listed in ``RUNS``; runs go to
``--jobs`` single-threaded worker processes (on 2 cores two single-threaded processes beat one
two-threaded one). Afterwards the results table in sample_adapters/README.md is rewritten from
the runs' metrics.json files.

Usage (from the repository root)::

    nice -n 19 python scripts/build_sample_adapters.py            # all runs, then the table
    python scripts/build_sample_adapters.py --only lora_r1 --jobs 1
    python scripts/build_sample_adapters.py --table-only          # rewrite the README table
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("sample_adapters")
BASE_TOML = OUT / "configs" / "base.toml"

# name -> overrides of base.toml; ordered longest first so two workers finish together
RUNS: dict[str, list[str]] = {
    "full": ["method='full'", "lr=1e-4"],
    "lora_r64": ["r=64"],
    "lora_r64_seed1": ["r=64", "seed=1"],
    "lora_r8": [
        "r=8",
        "eval_every=30",
        "checkpoint_every=30",
        "track_every=1",
        "track_factors_every=10",
    ],
    "lora_r8_seed1": ["r=8", "seed=1"],
    "lora_r4": ["r=4"],
    "lora_r2": ["r=2"],
    "lora_r1": ["r=1"],
    "head": ["method='head'", "lr=5e-3"],
}


def run_one(name: str, log_dir: str) -> tuple[str, float]:
    """Train one run in this (worker) process, logging to ``log_dir/name.log``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from lorascope.train import load_config, train

    log_path = Path(log_dir) / f"{name}.log"
    handler = logging.FileHandler(log_path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    overrides = [*RUNS[name], f"out_dir='{OUT / name}'", "threads=1", "progress=false"]
    t0 = time.perf_counter()
    try:
        config = load_config(BASE_TOML, overrides)
        logging.info("%s: %s", name, json.dumps(config.to_dict()))
        train(config)
    finally:  # a worker runs several trainings: one log file each
        logging.getLogger().removeHandler(handler)
        handler.close()
    return name, time.perf_counter() - t0


def table() -> str:
    """The Table-2-in-miniature, in Markdown, from the runs' metrics.json."""
    rows = []
    for name in ["head", *sorted((n for n in RUNS if n.startswith("lora")), key=_lora_key), "full"]:
        f = OUT / name / "metrics.json"
        if not f.exists():
            continue
        m = json.loads(f.read_text())
        method = {"head": "head only", "full": "full fine-tuning"}.get(
            m["method"], f"LoRA r={m['r']}"
        )
        rows.append(
            f"| {name} | {method} | {m['seed']} | {100 * m['accuracy']:.1f} | "
            f"{m['trainable_params']:,} | {100 * m['trainable_params'] / m['total_params']:.2f} | "
            f"{m['optimizer_state_bytes'] / 2**20:.2f} | {m['examples_per_s']:.1f} | "
            f"{m['train_seconds'] / 60:.1f} |"
        )
    head = (
        "| run | method | seed | test acc. (%) | trainable params | % of all params | "
        "Adam state (MiB) | train ex/s | train min |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    return head + "\n" + "\n".join(rows)


def _lora_key(name: str) -> tuple[int, str]:
    return int(name.split("_r")[1].split("_")[0]), name


def write_table() -> None:
    readme = OUT / "README.md"
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    text = readme.read_text() if readme.exists() else f"{start}\n{end}\n"
    before, _, rest = text.partition(start)
    _, _, after = rest.partition(end)
    readme.write_text(f"{before}{start}\n{table()}\n{end}{after}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2, help="parallel single-threaded runs")
    ap.add_argument("--only", nargs="*", choices=list(RUNS), help="a subset of the runs")
    ap.add_argument("--log-dir", default="build/sample_adapters_logs")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    os.chdir(ROOT)
    if not args.table_only:
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
        names = args.only or list(RUNS)
        t0 = time.perf_counter()
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            futures = [pool.submit(run_one, n, args.log_dir) for n in names]
            for fut in as_completed(futures):
                name, secs = fut.result()
                print(f"{name}: done in {secs / 60:.1f} min", flush=True)
        print(f"all runs: {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    write_table()
    print(table())


if __name__ == "__main__":
    main()
