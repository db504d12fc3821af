"""Shared fixtures: tiny seeded models built from configs (no downloads), an error check."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


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
