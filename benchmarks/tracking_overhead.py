"""Tracking overhead: what ``lorascope.tracking`` adds to a training step (issue 12).

Model: all-MiniLM-L6-v2 + a linear head (the sample-adapter setup), LoRA r on W_q and W_v of the
6 layers (12 modules), a batch of 32 real training descriptions at 48 tokens, AdamW. Two LoRA
implementations: lorascope's (``inject``) and peft's (``get_peft_model``, which the Trainer
callback tracks). Per implementation, three variants run round-robin in blocks of ``--steps``
training steps: no tracking, a :class:`~lorascope.tracking.Tracker` with ``every=10`` and one
with ``every=1`` (defaults otherwise: σ, k@50/90/99 %, ranks, φ and Grassmann distance to the
previous snapshot, relative change, amplification against the frozen W and the factors stored
at every snapshot, into a real HDF5 file). Reported:

- the median step time without tracking, and the median time of one snapshot (timed inside
  the same process, so both see the same machine state): the overhead of tracking every k steps
  is ``snapshot / (k · step)``;
- end to end, the median over rounds of the paired ratio of a block's wall time with tracking
  to the same round's block without it.

BLAS/OpenMP threads are pinned (default 1) before torch is imported. The Tracking section of
BENCHMARKS.md (between its markers) is rewritten unless ``--no-write``.

Usage::

    python benchmarks/tracking_overhead.py                   # r = 8, 3 rounds of 10 steps
    python benchmarks/tracking_overhead.py --rounds 5 --steps 20 --r 8 64
"""

from __future__ import annotations

import argparse
import os
import sys

_ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_ap.add_argument("--threads", type=int, default=1)
_ap.add_argument("--steps", type=int, default=10, help="training steps per timed block")
_ap.add_argument("--rounds", type=int, default=3)
_ap.add_argument("--r", type=int, nargs="+", default=[8])
_ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
ARGS = _ap.parse_args()
for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_v] = str(ARGS.threads)

import copy  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lorascope.tracking import Tracker  # noqa: E402
from lorascope.train import inject, load_classifier, mark_only_lora_as_trainable  # noqa: E402
from lorascope.train.data import load_text_data, load_tokenizer  # noqa: E402
from lorascope.train.model import minilm_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- tracking:start -->", "<!-- tracking:end -->"
ALPHA, BATCH, MAX_LEN = 8.0, 32, 48


def models(r: int, n_labels: int) -> dict[str, torch.nn.Module]:
    import peft

    torch.manual_seed(0)
    base = load_classifier(n_labels)
    ours = copy.deepcopy(base)
    inject(ours, ["query", "value"], r=r, alpha=ALPHA)
    mark_only_lora_as_trainable(ours, also=("classifier",))
    conf = dict(r=r, lora_alpha=ALPHA, target_modules=["query", "value"], lora_dropout=0.0)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(**conf, modules_to_save=["classifier"])
    )
    return {"lorascope": ours, "peft": theirs}


def train_steps(model, opt, batch, n: int, tracker: Tracker | None, start: int) -> tuple:
    """``n`` steps; returns (wall seconds, [step seconds], [snapshot seconds])."""
    ids, mask, y = batch
    steps, snaps = [], []
    t_all = time.perf_counter()
    for s in range(start, start + n):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(ids, mask), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        steps.append(t1 - t0)
        if tracker is not None and tracker.step(model, s + 1):
            snaps.append(time.perf_counter() - t1)
    return time.perf_counter() - t_all, steps, snaps


def bench(r: int, batch, n_labels: int, tmp: Path) -> list[dict]:
    rows = []
    for impl, model in models(r, n_labels).items():
        variants = {"none": None, "every 10": 10, "every 1": 1}
        trackers = {
            v: Tracker(tmp / f"{impl}_r{r}_{k}.h5", k) if k else None for v, k in variants.items()
        }
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)  # small lr: the model stays sane for all rounds
        train_steps(model, opt, batch, 3, None, 0)  # warm-up
        walls = {v: [] for v in variants}
        step_t, snap_t = [], {v: [] for v in variants}
        pos = 3
        for rnd in range(ARGS.rounds):
            order = list(variants)[rnd % 3 :] + list(variants)[: rnd % 3]
            for v in order:
                wall, st, sn = train_steps(model, opt, batch, ARGS.steps, trackers[v], pos)
                pos += ARGS.steps
                walls[v].append(wall)
                step_t += st
                snap_t[v] += sn
        for t in trackers.values():
            if t is not None:
                t.close()
        step = statistics.median(step_t)
        snap = statistics.median(snap_t["every 1"] + snap_t["every 10"])
        for v, k in variants.items():
            ratios = [w / b for w, b in zip(walls[v], walls["none"], strict=True)]
            rows.append({
                "r": r, "impl": impl, "variant": v, "step": step, "snapshot": snap,
                "predicted": 0.0 if not k else snap / (k * step),
                "e2e": statistics.median(ratios) - 1.0, "n_snap": len(snap_t[v]),
            })  # fmt: skip
            log(f"r={r} {impl} {v}: step {step:.3f} s, snapshot {snap * 1e3:.1f} ms, "
                f"e2e {rows[-1]['e2e']:+.1%}")  # fmt: skip
    return rows


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def markdown(rows: list[dict]) -> str:
    cmd = " ".join(["python benchmarks/tracking_overhead.py", *sys.argv[1:]])
    lines = [
        "## Tracking (issue 12)",
        "",
        "What `lorascope.tracking` adds to a training step of all-MiniLM-L6-v2 + head "
        "(`benchmarks/tracking_overhead.py`): LoRA on W_q, W_v of 6 layers (12 modules), batch "
        f"{BATCH} x {MAX_LEN} tokens, AdamW. A snapshot records σ, k@50/90/99 %, effective and "
        "stable rank, ‖ΔW‖_F, φ and Grassmann distance to the previous snapshot, the relative "
        "change, the amplification against the frozen W, and stores the factors in the HDF5 "
        "file. `snapshot / (k·step)` is the overhead of tracking every k steps from the medians "
        "of the two timings in one process; `end to end` is the median over rounds of the "
        "paired ratio of a block's wall time with tracking to the same round's block without "
        "(noisier: it includes the machine's drift between blocks).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
        f"threads pinned to {ARGS.threads}; {ARGS.rounds} rounds of {ARGS.steps} steps per "
        f"variant, round-robin. Command: `{cmd}`.",
        "",
        "| r | LoRA | tracking | step (s, median) | snapshot (ms, median) | snapshot / (k·step) "
        "| end to end | snapshots |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        pred = "—" if x["variant"] == "none" else f"{x['predicted']:.2%}"
        e2e = "—" if x["variant"] == "none" else f"{x['e2e']:+.1%}"
        lines.append(
            f"| {x['r']} | {x['impl']} | {x['variant']} | {x['step']:.3f} | "
            f"{x['snapshot'] * 1e3:.1f} | {pred} | {e2e} | {x['n_snap']} |"
        )
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text()
    block = f"{START}\n{text}{END}"
    if START in doc:
        before, _, rest = doc.partition(START)
        _, _, after = rest.partition(END)
        doc = before + block + after
    else:
        marker = "<!-- analysis:start -->"
        doc = doc.replace(marker, block + "\n\n" + marker, 1)
    path.write_text(doc)


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    base = minilm_path()
    tok = load_tokenizer(base, MAX_LEN)
    data, labels = load_text_data(ROOT / "data/debian_sections/train.jsonl.gz", tok)
    batch = data.batch(torch.arange(BATCH))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in ARGS.r:
            rows += bench(r, batch, len(labels), Path(tmp))
    text = markdown(rows)
    print(text)
    if not ARGS.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
