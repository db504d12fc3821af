"""Shared fixtures: tiny seeded models built from configs (no downloads), an error check."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runslow",
        action="store_true",
        help="also run the tests marked slow (set when the environment has CI=true)",
    )


def _run_slow(config: pytest.Config) -> bool:
    """``--runslow``, or a CI environment (``CI`` set to anything but empty/0/false/no)."""
    ci = os.environ.get("CI", "").strip().lower()
    return bool(config.getoption("--runslow")) or ci not in ("", "0", "false", "no")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everyday runs skip ``@pytest.mark.slow`` (multi-process, Dask cluster, notebook kernel,
    training runs, report building); CI and ``--runslow`` run everything."""
    if _run_slow(config):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (CI=true runs it)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch) -> None:
    """The spectral cache (lorascope.cache) of every test in a fresh directory of its own: the
    CLI uses it by default, and tests write only under tmp."""
    monkeypatch.setenv("LORASCOPE_CACHE_DIR", str(tmp_path_factory.mktemp("lorascope-cache")))


def build_tiny_gpt2():
    """A 2-layer GPT-2 (``Conv1D`` projections, n_embd 32) built from a config (also for
    module-scoped fixtures, which cannot use the function-scoped ones below)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def build_tiny_llama():
    """A 2-layer Llama (hidden 32, 4 heads, 2 KV heads: k/v project 32 -> 16), from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_gpt2():
    return build_tiny_gpt2()


@pytest.fixture
def tiny_llama():
    return build_tiny_llama()


@pytest.fixture
def one_line_error():
    """``check(excinfo, path)``: the error message is one line and names ``path``; returns it."""

    def check(excinfo: pytest.ExceptionInfo, path: object) -> str:
        msg = str(excinfo.value)
        assert "\n" not in msg, msg
        assert str(path) in msg, msg
        return msg

    return check
