"""The training loop, config, CLI and DDP (lorascope.train.trainer / config, cli/train.py).

Everything runs on a tiny random BERT with a tiny WordPiece tokenizer built here, so these tests
need neither the MiniLM package nor more than a few seconds each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorascope.train import ConfigError, TrainConfig, load_config, train
from lorascope.train.config import parse_override
from lorascope.train.data import read_jsonl
from lorascope.train.model import BertConfig, TextClassifier

torch.set_num_threads(1)
tokenizers = pytest.importorskip("tokenizers")

WORDS = {
    "games": "puzzle arcade player level board chess",
    "mail": "email smtp inbox imap mailbox spam",
    "sound": "audio music mixer synth midi speaker",
}


def _write_tiny_task(root: Path) -> tuple[Path, Path, Path]:
    """A 3-label JSONL task, a tokenizer trained on it, and a random tiny BERT base."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(96):
        label = list(WORDS)[i % 3]
        words = WORDS[label].split()
        pick = torch.randint(0, len(words), (5,), generator=g).tolist()
        rows.append({"text": " ".join(words[j] for j in pick) + " tool", "label": label})
    train_f, test_f = root / "train.jsonl", root / "test.jsonl"
    train_f.write_text("".join(json.dumps(r) + "\n" for r in rows[:64]))
    test_f.write_text("".join(json.dumps(r) + "\n" for r in rows[64:]))

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    # a fixed vocabulary (every word of the task, sorted): WordPieceTrainer breaks ties in a
    # hash map's order, which differs between processes, so a trained vocabulary gave each
    # process other token ids, another training run, and a flaky test
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for r in rows for w in r["text"].split()})
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate([*specials, *words])},
                                     unk_token="[UNK]"))  # fmt: skip
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    base = root / "base"
    base.mkdir()
    tok.save(str(base / "tokenizer.json"))
    cfg = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=16, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=24, max_position_embeddings=16,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(0)
    enc = TextClassifier(cfg, 2)
    sd = {k: v for k, v in enc.state_dict().items() if not k.startswith("classifier.")}
    save_file(sd, base / "model.safetensors")
    (base / "config.json").write_text(json.dumps(cfg.__dict__))
    return train_f, test_f, base


@pytest.fixture
def task(tmp_path):
    return _write_tiny_task(tmp_path)


def _config(task, out: Path, **kw) -> TrainConfig:
    train_f, test_f, base = task
    args = dict(train_file=str(train_f), test_file=str(test_f), base=str(base), out_dir=str(out),
                max_len=12, batch_size=8, max_steps=6, lr=1e-2, r=2, alpha=4, threads=1,
                progress=False, base_model_name_or_path="tiny")  # fmt: skip
    args.update(kw)
    return TrainConfig(**args)


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    t = (
        load_file(out / "adapter_model.safetensors")
        if (out / "adapter_model.safetensors").exists()
        else {}
    )
    return {**t, **load_file(out / "head.safetensors")}


def _assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=atol, msg=lambda m, k=k: f"{k}: {m}")


def test_lora_run_writes_adapter_config_metrics_checkpoints(task, tmp_path):
    out = tmp_path / "run"
    m = train(_config(task, out, checkpoint_every=2, eval_every=3))
    files = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "head.safetensors",
            "train_config.json", "metrics.json", "checkpoints"} <= files  # fmt: skip
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert (out / "checkpoints" / "step-000002" / "adapter_model.safetensors").exists()
    resolved = json.loads((out / "train_config.json").read_text())
    assert resolved["r"] == 2 and resolved["max_steps"] == 6
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["query", "value"] and cfg["base_model_name_or_path"] == "tiny"
    # |Θ| = 2 · L̂ · d_model · r for square W_q, W_v (L̂ = 2 layers × 2 matrices), + the head
    assert m["trainable_params"] == 2 * 4 * 16 * 2 + (16 * 3 + 3)
    assert [h["step"] for h in m["history"]] == [3, 6]
    assert 0.0 <= m["accuracy"] <= 1.0 and m["examples_per_s"] > 0
    state = m["optimizer_state_bytes"]
    assert state == 2 * 4 * m["trainable_params"]  # Adam: exp_avg + exp_avg_sq, fp32
    head = load_file(out / "head.safetensors")
    assert head["classifier.weight"].shape == (3, 16)


def test_training_learns_the_tiny_task(task, tmp_path):
    m = train(_config(task, tmp_path / "learn", max_steps=48, r=4, lr=3e-2, eval_every=4))
    first, last = m["history"][0], m["history"][-1]
    assert last["loss"] < 0.5 * first["loss"] and m["accuracy"] >= 0.75, m["history"]


def test_seeded_runs_are_identical_and_seeds_differ(task, tmp_path):
    train(_config(task, tmp_path / "a", dropout=0.1))
    train(_config(task, tmp_path / "b", dropout=0.1))
    train(_config(task, tmp_path / "c", dropout=0.1, seed=1))
    a, b, c = (_tensors(tmp_path / x) for x in "abc")
    _assert_same(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_gradient_accumulation_matches_full_batch(task, tmp_path):
    train(_config(task, tmp_path / "one"))
    train(_config(task, tmp_path / "acc", grad_accum=4))
    _assert_same(_tensors(tmp_path / "one"), _tensors(tmp_path / "acc"), atol=1e-5)


@pytest.mark.parametrize("method, n", [("head", 3 * 16 + 3), ("full", None)])
def test_head_only_and_full(task, tmp_path, method, n):
    m = train(_config(task, tmp_path / method, method=method))
    if n is not None:
        assert m["trainable_params"] == n
    else:
        assert m["trainable_params"] == m["total_params"]
    assert not (tmp_path / method / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_ddp_two_processes_equals_one_process(task, tmp_path):
    """torchrun, gloo, 2 CPU processes, 4 rows each == 1 process on the 8-row batch."""
    single = _config(task, tmp_path / "single")
    train(single)
    toml = tmp_path / "ddp.toml"
    cfg = {k: v for k, v in single.to_dict().items() if k not in ("rank_pattern", "alpha_pattern")}
    cfg["out_dir"] = str(tmp_path / "ddp")
    toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.items()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lorascope.train", str(toml)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    a, b = _tensors(tmp_path / "single"), _tensors(tmp_path / "ddp")
    assert a.keys() == b.keys()
    # The gradients agree to float32 rounding (the 8 rows are summed in another order), but
    # Adam divides each gradient by its own magnitude: an element whose gradient is at the
    # rounding level may step the other way, by at most ~2·lr per step. So: all but a few
    # elements equal to 1e-6, and none off by more than Adam can move it. A broken DDP (no
    # gradient averaging, both ranks on the same rows) changes most elements.
    bound = 2 * single.lr * single.max_steps
    for k in a:
        diff = (a[k].double() - b[k].double()).abs()
        assert float(diff.max()) <= bound, k
        n_off = int((diff > 1e-6).sum())  # a few, counted: 1 of a 32-element B is 3 %
        assert n_off <= max(2, 0.01 * diff.numel()), (k, n_off, float(diff.max()))


def test_config_toml_overrides_and_errors(tmp_path):
    (tmp_path / "c.toml").write_text('[train]\nr = 4\ntrain_file = "d/train.jsonl"\n')
    c = load_config(tmp_path / "c.toml", ["r=16", "target_modules=['query']", "out_dir=runs/x"])
    assert c.r == 16 and c.target_modules == ["query"] and c.out_dir == "runs/x"
    assert c.train_file == str(tmp_path / "d" / "train.jsonl")  # relative to the TOML file
    assert parse_override("lr=1e-3") == ("lr", 1e-3)
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config(tmp_path / "c.toml", ["rank=3"])
    with pytest.raises(ConfigError, match="method"):
        load_config(None, ["method=lorax"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("r")
    with pytest.raises(ConfigError, match="batch_size"):
        train(TrainConfig(batch_size=6, grad_accum=4, base=str(tmp_path)))


def test_jsonl_reader_errors(tmp_path):
    from lorascope.errors import FormatError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(FormatError, match="line 1"):
        read_jsonl(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(FormatError, match="no rows"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_cli_train_command(task, tmp_path):
    from click.testing import CliRunner

    from lorascope.cli.train import train as train_cmd

    train_f, test_f, base = task
    toml = tmp_path / "cli.toml"
    toml.write_text(
        f'train_file = "{train_f}"\ntest_file = "{test_f}"\nbase = "{base}"\n'
        f'out_dir = "{tmp_path / "cli"}"\nmax_len = 12\nbatch_size = 8\nthreads = 1\n'
        "progress = false\n"
    )
    res = CliRunner().invoke(train_cmd, [str(toml), "--set", "max_steps=2", "--set", "r=3"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{") :])["steps"] == 2
    assert json.loads((tmp_path / "cli" / "adapter_config.json").read_text())["r"] == 3


def test_config_types_are_checked_with_one_line_errors(tmp_path):
    from lorascope.train import ConfigError, load_config

    path = tmp_path / "c.toml"
    path.write_text('[train]\nr = "x"\n')
    with pytest.raises(ConfigError, match=r"c\.toml: r must be of type int, got 'x'"):
        load_config(path)
    path.write_text("[train]\nalpha = 16\nuse_rslora = 1\n")
    with pytest.raises(ConfigError, match="use_rslora must be of type bool"):
        load_config(path)
    assert load_config(path, ["use_rslora=true"]).alpha == 16.0
