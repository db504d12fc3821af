"""The training loop: AdamW, linear warmup/decay, accumulation, clipping, eval, checkpoints, DDP.

One function, :func:`train`, takes a :class:`TrainConfig` and returns the run's metrics. Under
``torchrun`` (``WORLD_SIZE`` > 1) it joins the process group (NCCL on CUDA, gloo on CPU) and
wraps the model in DDP: every process takes an equal slice of each global batch, gradients are
averaged, so the parameters after a step equal one process's on the whole batch.

What a run writes in ``out_dir`` (rank 0 only):

- LoRA: ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT), and every
  ``checkpoint_every`` steps the same under ``checkpoints/step-NNNNNN/``;
- ``head.safetensors``: the classifier head ``classifier.weight (C, d)``, ``classifier.bias
  (C,)``, with the label names in its metadata (not part of the PEFT adapter);
- ``train_config.json`` (the resolved config) and ``metrics.json`` (accuracy, parameters,
  throughput, the evaluation history);
- with ``track_every`` (LoRA only): ``tracking.h5``, the spectra of every module during
  training (:mod:`lorascope.tracking`; its time is excluded from ``train_seconds`` and reported
  as ``tracking_seconds``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorascope._files import save_safetensors
from lorascope.train.config import ConfigError, TrainConfig
from lorascope.train.data import TextData, load_text_data, load_tokenizer
from lorascope.train.inject import count_parameters, inject, mark_only_lora_as_trainable
from lorascope.train.model import TextClassifier, load_classifier, minilm_path
from lorascope.train.save import save_adapter

__all__ = ["train", "evaluate", "build_model"]

log = logging.getLogger(__name__)


def build_model(config: TrainConfig, num_labels: int) -> TextClassifier:
    """The pretrained classifier with the config's trainable parameters (LoRA, head or all)."""
    model = load_classifier(num_labels, config.base or None, seed=config.seed)
    if config.method == "lora":
        torch.manual_seed(config.seed)  # A's Kaiming init
        inject(
            model,
            config.target_modules,
            r=config.r,
            alpha=config.alpha,
            dropout=config.dropout,
            use_rslora=config.use_rslora,
            rank_pattern=config.rank_pattern,
            alpha_pattern=config.alpha_pattern,
        )
        mark_only_lora_as_trainable(model, also=("classifier",))
    elif config.method == "head":
        mark_only_lora_as_trainable(model, also=("classifier",))
    return model


@torch.no_grad()
def evaluate(model: nn.Module, data: TextData, batch_size: int = 128) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on ``data``, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, loss = 0, 0.0
    for i in range(0, len(data), batch_size):
        ids, mask, y = (
            t.to(device) for t in data.batch(torch.arange(i, min(i + batch_size, len(data))))
        )
        logits = model(ids, mask).float()  # (b, C)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(-1) == y).sum())
    model.train(was_training)
    return correct / len(data), loss / len(data)


def _lr_lambda(warmup: int, total: int):
    """Linear warmup over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def _setup(config: TrainConfig) -> tuple[int, int, torch.device, bool]:
    """``(rank, world, device, we_initialised_the_group)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available() if config.device == "auto" else config.device == "cuda"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    init = world > 1 and not dist.is_initialized()
    if init:
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return rank, world, device, init


def _save_head(model: TextClassifier, labels: list[str], path: Path) -> None:
    head = {k: v.detach().cpu().contiguous() for k, v in model.classifier.state_dict().items()}
    save_safetensors(  # atomically, and 0o644 (save_file alone writes 0o600)
        {f"classifier.{k}": v for k, v in head.items()},
        path,
        metadata={"labels": json.dumps(labels)},
    )


def _save(model: TextClassifier, config: TrainConfig, labels: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if config.method == "lora":
        save_adapter(model, out, config.base_model_name_or_path)
    if config.method != "full":  # full fine-tuning: no 90 MB copy of the encoder
        _save_head(model, labels, out / "head.safetensors")
    (out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def train(config: TrainConfig) -> dict[str, Any]:
    """Train as ``config`` says; return the metrics (also written to ``metrics.json``).

    Returns
    -------
    dict
        ``accuracy`` (final, test set), ``trainable_params``, ``total_params``,
        ``examples_per_s`` (training throughput over all processes, evaluation excluded),
        ``train_seconds``, ``steps``, ``optimizer_state_bytes`` and ``history`` (one entry per
        evaluation: ``step``, ``accuracy``, ``loss``).
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    rank, world, device, own_group = _setup(config)
    per_step = world * config.grad_accum
    if config.batch_size % per_step:
        raise ConfigError(
            f"batch_size={config.batch_size} must divide into world size {world} x "
            f"grad_accum {config.grad_accum}"
        )
    micro = config.batch_size // per_step
    base = Path(config.base) if config.base else minilm_path()
    tok = load_tokenizer(base, config.max_len)
    train_data, labels = load_text_data(config.train_file, tok)
    test_data, _ = load_text_data(config.test_file, tok, labels)
    g = torch.Generator().manual_seed(config.seed)
    if config.train_subset and config.train_subset < len(train_data):
        keep = torch.randperm(len(train_data), generator=g)[: config.train_subset]
        train_data = TextData(
            *(t[keep] for t in (train_data.input_ids, train_data.attention_mask, train_data.labels))
        )
    steps_per_epoch = len(train_data) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size={config.batch_size} exceeds the {len(train_data)} rows")
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))

    model = build_model(config, len(labels)).to(device)
    n_train = count_parameters(model)
    n_total = count_parameters(model, trainable_only=False)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(int(config.warmup_frac * total), total)
    )
    net: nn.Module = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    out = Path(config.out_dir)

    tracker = None
    if rank == 0 and config.method == "lora" and config.track_every:
        from lorascope.tracking import Tracker

        out.mkdir(parents=True, exist_ok=True)
        tracker = Tracker(
            out / "tracking.h5",
            config.track_every,
            factors_every=config.track_factors_every or None,
            config=config.to_dict(),
            overwrite=True,
            use_rslora=config.use_rslora,
        )
    history: list[dict[str, float]] = []
    bar = tqdm(total=total, disable=rank != 0 or not config.progress, desc=config.method)
    train_time, order = 0.0, torch.empty(0, dtype=torch.long)
    model.train()
    for step in range(total):
        t0 = time.perf_counter()
        pos = (step % steps_per_epoch) * config.batch_size
        if pos == 0:  # a new epoch: the same seeded permutation on every process
            order = torch.randperm(len(train_data), generator=g)
        batch = order[pos : pos + config.batch_size]  # (batch_size,) global batch
        mine = batch[rank * config.grad_accum * micro : (rank + 1) * config.grad_accum * micro]
        for k in range(config.grad_accum):
            ids, mask, y = (
                t.to(device) for t in train_data.batch(mine[k * micro : (k + 1) * micro])
            )
            sync = k == config.grad_accum - 1 or world == 1
            with nullcontext() if sync else net.no_sync(), amp:
                loss = F.cross_entropy(net(ids, mask).float(), y) / config.grad_accum
                loss.backward()
        if config.clip:
            torch.nn.utils.clip_grad_norm_(params, config.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # time the work, not the kernel launches
        train_time += time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item() * config.grad_accum:.3f}")
        done = step + 1
        if tracker is not None:
            tracker.step(model, done, loss=loss.item() * config.grad_accum)
        if rank == 0 and config.eval_every and done % config.eval_every == 0 and done < total:
            acc, ev_loss = evaluate(model, test_data)
            history.append({"step": done, "accuracy": acc, "loss": ev_loss})
            log.info("step %d: test accuracy %.4f, loss %.4f", done, acc, ev_loss)
        if (
            rank == 0
            and config.method == "lora"
            and config.checkpoint_every
            and done % config.checkpoint_every == 0
            and done < total
        ):
            _save(model, config, labels, out / "checkpoints" / f"step-{done:06d}")
    bar.close()
    if tracker is not None:
        tracker.close(model, total)

    metrics: dict[str, Any] = {}
    if rank == 0:
        acc, ev_loss = evaluate(model, test_data)
        history.append({"step": total, "accuracy": acc, "loss": ev_loss})
        state = sum(
            t.numel() * t.element_size()
            for s in opt.state.values()
            for t in s.values()
            if torch.is_tensor(t) and t.ndim > 0
        )
        metrics = {
            "method": config.method,
            "r": config.r if config.method == "lora" else None,
            "seed": config.seed,
            "accuracy": acc,
            "loss": ev_loss,
            "trainable_params": n_train,
            "total_params": n_total,
            "examples_per_s": total * config.batch_size / train_time,
            "train_seconds": train_time,
            "steps": total,
            "world_size": world,
            "optimizer_state_bytes": state,
            "history": history,
        }
        if tracker is not None:
            metrics["tracking_seconds"] = tracker.seconds
        log.info("final test accuracy %.4f (%d trainable parameters)", acc, n_train)
        _save(model, config, labels, out)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if own_group:
        dist.barrier()
        dist.destroy_process_group()
    return metrics
