"""Training-step benchmark: lorascope LoRA vs the same LoRA through peft vs full fine-tuning.

Model: all-MiniLM-L6-v2 + a linear head on mean-pooled tokens (the sample-adapter setup), a
batch of 32 real training descriptions at 48 tokens, AdamW. One step = forward, backward,
optimizer step. Variants:

- ``lorascope``: lorascope's encoder, ``inject(..., ["query", "value"], r)``, head trainable;
- ``peft``: the same encoder and head, LoRA by ``peft.get_peft_model`` (same r, alpha, targets;
  the head through ``modules_to_save``): only the LoRA implementation differs;
- ``peft+hf``: ``transformers.BertModel`` (same weights, SDPA attention) under peft, with the
  same mean pooling and head: the whole Hugging Face stack;
- ``full``: lorascope's encoder, every parameter trainable.

BLAS/OpenMP threads are pinned (default 1) before torch is imported; variants run round-robin
in an order that rotates every round, so background load and position hit all alike; the median
step time and the median paired ratio are reported. The Training section of BENCHMARKS.md
(between its markers) is rewritten with the results.

Usage::

    python benchmarks/train_step.py                # r = 8, 20 timed steps per variant
    python benchmarks/train_step.py --steps 30 --r 8 64 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys

_ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_ap.add_argument("--threads", type=int, default=1)
_ap.add_argument("--steps", type=int, default=20, help="timed steps per variant")
_ap.add_argument("--warmup", type=int, default=3)
_ap.add_argument("--r", type=int, nargs="+", default=[8])
_ap.add_argument("--batch", type=int, default=32)
_ap.add_argument("--max-len", type=int, default=48)
_ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
ARGS = _ap.parse_args()
for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_v] = str(ARGS.threads)

import copy  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lorascope.train import inject, load_classifier, mark_only_lora_as_trainable  # noqa: E402
from lorascope.train.data import load_text_data, load_tokenizer  # noqa: E402
from lorascope.train.model import minilm_path  # noqa: E402

torch.set_num_threads(ARGS.threads)
ROOT = Path(__file__).resolve().parents[1]
ALPHA = 8.0


class HFClassifier(nn.Module):
    """transformers.BertModel + the same mean pooling and head as lorascope's TextClassifier."""

    def __init__(self, bert: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.bert, self.classifier = bert, head

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, d)
        m = mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        return self.classifier((h * m).sum(1) / m.sum(1))  # (B, C)


def variants(r: int, n_labels: int) -> dict[str, nn.Module]:
    import peft
    import transformers

    base = load_classifier(n_labels)
    out: dict[str, nn.Module] = {}
    m = copy.deepcopy(base)
    torch.manual_seed(0)
    inject(m, ["query", "value"], r=r, alpha=ALPHA)
    mark_only_lora_as_trainable(m, also=("classifier",))
    out["lorascope"] = m
    conf = dict(r=r, lora_alpha=ALPHA, target_modules=["query", "value"], lora_dropout=0.0)
    out["peft"] = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(**conf, modules_to_save=["classifier"])
    )
    bert = transformers.BertModel.from_pretrained(minilm_path(), add_pooling_layer=False)
    hf = HFClassifier(bert, copy.deepcopy(base.classifier))
    out["peft+hf"] = peft.get_peft_model(
        hf, peft.LoraConfig(**conf, modules_to_save=["classifier"])
    )
    out["full"] = copy.deepcopy(base)
    for mod in out.values():
        mod.train()
        for sub in mod.modules():  # dropout off: time the arithmetic, not the RNG
            if isinstance(sub, nn.Dropout):
                sub.p = 0.0
    return out


def adam_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t) and t.ndim > 0)  # fmt: skip


def bench(r: int, batch: tuple[torch.Tensor, ...], n_labels: int) -> list[dict]:
    ids, mask, y = batch
    models = variants(r, n_labels)
    opts, times = {}, {k: [] for k in models}
    for name, m in models.items():
        params = [p for p in m.parameters() if p.requires_grad]
        opts[name] = torch.optim.AdamW(params, lr=1e-4)
    names = list(models)
    for i in range(ARGS.warmup + ARGS.steps):
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotating round-robin
            m = models[name]
            t0 = time.perf_counter()
            loss = F.cross_entropy(m(ids, mask), y)
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if i >= ARGS.warmup:
                times[name].append(time.perf_counter() - t0)
    d, L = 384, 6
    rows = []
    ref = times["lorascope"]
    for name, m in models.items():
        paired = [t / t0 for t, t0 in zip(times[name], ref, strict=True)]  # same round
        lora = sum(p.numel() for n, p in m.named_parameters() if p.requires_grad and "lora_" in n)
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        rows.append(dict(
            r=r, variant=name, median_s=statistics.median(times[name]),
            paired=statistics.median(paired),
            p10=sorted(times[name])[len(times[name]) // 10], trainable=trainable, lora=lora,
            formula=2 * (2 * L) * d * r if name != "full" else None,
            adam_mib=adam_state_bytes(opts[name]) / 2**20,
        ))  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"torch {torch.__version__}; threads pinned to {ARGS.threads}; batch {ARGS.batch} x "
        f"{ARGS.max_len} tokens; {ARGS.steps} timed steps per variant (after {ARGS.warmup} "
        "warm-up), round-robin; median. Command: `python benchmarks/train_step.py "
        f"--threads {ARGS.threads} --steps {ARGS.steps} --r {' '.join(map(str, ARGS.r))}`.",
        "",
        "| r | variant | step (s, median) | vs lorascope | trainable params | LoRA params | "
        "2·L̂·d·r | Adam state (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['r']} | {row['variant']} | {row['median_s']:.3f} | "
            f"{row['paired']:.2f}× | {row['trainable']:,} | {row['lora']:,} | "
            f"{row['formula'] or '—':,} | {row['adam_mib']:.2f} |"
            if row["formula"]
            else f"| {row['r']} | {row['variant']} | {row['median_s']:.3f} | "
            f"{row['paired']:.2f}× | {row['trainable']:,} | — | — | "
            f"{row['adam_mib']:.2f} |"
        )
    return "\n".join(lines)


def write_section(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    start, end = "<!-- training:start -->", "<!-- training:end -->"
    body = (
        "## Training\n\n"
        "One AdamW training step of all-MiniLM-L6-v2 + classifier head "
        "(`benchmarks/train_step.py`). Lower is better. `vs lorascope` is the step time relative "
        "to lorascope's LoRA at the same r: the median over rounds of the ratio of the two steps "
        "timed in the same round (paired, so background load cancels). Dropout is off in every "
        "variant. L̂ = 12 adapted matrices (W_q, W_v of 6 layers), d = 384; LoRA params exclude "
        "the head (2,310 parameters).\n\n" + text + "\n"
    )
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in old:
        before, _, rest = old.partition(start)
        after = rest.partition(end)[2]
    else:
        before, after = old.rstrip("\n") + "\n\n", "\n"
    path.write_text(f"{before}{start}\n{body}{end}{after}")


def main() -> None:
    tok = load_tokenizer(minilm_path(), ARGS.max_len)
    data, labels = load_text_data(ROOT / "data/debian_sections/train.jsonl.gz", tok)
    batch = data.batch(torch.arange(ARGS.batch))
    rows = [row for r in ARGS.r for row in bench(r, batch, len(labels))]
    text = markdown(rows)
    print(text)
    if not ARGS.no_write:
        write_section(text)
        print(f"wrote the Training section of {ROOT / 'BENCHMARKS.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
