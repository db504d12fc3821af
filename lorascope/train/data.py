"""Text-classification data: JSONL of ``{"text", "label"}`` -> padded token-id tensors.

Any JSONL (optionally gzipped, ``.gz``) with a ``text`` and a ``label`` per line works; other
keys are ignored. Tokenization uses the base model's own ``tokenizer.json`` through the
``tokenizers`` package (WordPiece, lower-casing, ``[CLS] ... [SEP]``), truncated to ``max_len``.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lorascope.errors import FormatError

__all__ = ["TextData", "read_jsonl", "load_text_data", "load_tokenizer"]


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file (``.gz`` is decompressed); each must have ``text`` and ``label``."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or "text" not in row or "label" not in row:
                    raise FormatError(f"{path}: line {i} has no 'text' and 'label'")
                rows.append(row)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not readable as JSONL ({e})") from e
    if not rows:
        raise FormatError(f"{path}: no rows")
    return rows


def load_tokenizer(base: str | Path, max_len: int):
    """The ``tokenizers.Tokenizer`` of ``base/tokenizer.json``, truncating to ``max_len``."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise FormatError("training needs the tokenizers package: pip install tokenizers") from e
    path = Path(base) / "tokenizer.json"
    if not path.exists():
        raise FormatError(f"{path}: no tokenizer.json beside the base model")
    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length=max_len)
    tok.no_padding()
    return tok


@dataclass
class TextData:
    """Token ids ``(N, T)``, attention mask ``(N, T)`` and integer labels ``(N,)``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``idx``, trimmed to their longest sequence: ``(b, t)``, ``(b, t)``, ``(b,)``."""
        mask = self.attention_mask[idx]  # (b, T)
        t = max(int(mask.sum(1).max()), 1)
        return self.input_ids[idx, :t], mask[:, :t], self.labels[idx]


def load_text_data(
    path: str | Path,
    tokenizer,
    label_names: list[str] | None = None,
    limit: int | None = None,
) -> tuple[TextData, list[str]]:
    """Read and tokenize a JSONL file.

    Parameters
    ----------
    path : path
    tokenizer : tokenizers.Tokenizer
        With truncation enabled (see :func:`load_tokenizer`).
    label_names : list of str, optional
        The label order (pass the training set's to a test set); default: sorted labels found.
    limit : int, optional
        Keep only the first ``limit`` rows (for a random subset, see ``TrainConfig.train_subset``).

    Returns
    -------
    data : TextData
    label_names : list of str
    """
    rows = read_jsonl(path)[:limit]
    labels = [str(r["label"]) for r in rows]
    names = label_names if label_names is not None else sorted(set(labels))
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(labels) - index.keys())
    if unknown:
        raise FormatError(f"{path}: labels {unknown[:5]} are not in the training labels")
    enc = tokenizer.encode_batch([str(r["text"]) for r in rows])
    T = max(len(e.ids) for e in enc)
    ids = torch.zeros(len(rows), T, dtype=torch.long)  # (N, T), 0 = [PAD]
    mask = torch.zeros(len(rows), T, dtype=torch.long)  # (N, T)
    for i, e in enumerate(enc):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
    y = torch.tensor([index[s] for s in labels], dtype=torch.long)  # (N,)
    return TextData(ids, mask, y), names
