"""A user's labelled text as the (ids, labels) tensors a transformer task trains on:
``hosfl.text_data(data, tokenizer)``, tokenized by the model's own tokenizer and right-padded
(``tasks.transformer`` reads the padding mask from the pad token).

``data``: a list of (text, label) pairs, a map-style Dataset of pairs or of dicts, a
``datasets`` Dataset (rows as dicts), or the path of a CSV (a header row) or JSONL file;
the text and label fields are named by ``text=`` and ``label=``. Labels are integers, or
strings numbered in sorted order. ``labels=None`` for next-token training: the targets are
the ids themselves (``next_token_loss``).
"""

from __future__ import annotations

import csv
import json
import numbers
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def _rows(data: Any, text: str, label: str | None) -> list[tuple[str, Any]]:
    if isinstance(data, str | Path):
        path = Path(data)
        with open(path, newline="", encoding="utf-8") as f:
            if path.suffix == ".csv":
                records = list(csv.DictReader(f))
            elif path.suffix in (".jsonl", ".json"):
                records = [json.loads(line) for line in f if line.strip()]
            else:
                raise ValueError(f"{path}: text data is a .csv or a .jsonl file")
        data = records
    rows = []
    for i in range(len(data)):
        row = data[i]
        if isinstance(row, dict):
            if text not in row or (label is not None and label not in row):
                raise ValueError(f"row {i} has no {text!r}/{label!r} field (it has {list(row)})")
            rows.append((row[text], row[label] if label is not None else None))
        else:
            rows.append((row[0], row[1] if label is not None else None))
    return rows


def text_data(
    data: Any, tokenizer: Any, seq_len: int = 64, text: str = "text", label: str | None = "label"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels): ``data``'s texts as token ids (N, ``seq_len``), right-padded, and its
    labels (N,) as integers; with ``label=None``, the ids twice (next-token training)."""
    rows = _rows(data, text, label)
    if not rows:
        raise ValueError("text_data: no rows")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token: set tokenizer.pad_token = tokenizer.eos_token and "
            "model.config.pad_token_id = tokenizer.pad_token_id (right padding marks the mask)"
        )
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        ids = tokenizer([str(t) for t, _ in rows], padding="max_length", truncation=True,
                        max_length=seq_len, return_tensors="pt")["input_ids"]  # fmt: skip
    finally:
        tokenizer.padding_side = side
    if label is None:
        return ids, ids.clone()
    values = [y for _, y in rows]
    if all(isinstance(y, numbers.Integral) or (isinstance(y, str) and y.lstrip("-").isdigit())
           for y in values):  # fmt: skip
        labels = torch.tensor([int(y) for y in values], dtype=torch.int64)
    else:
        names = sorted({str(y) for y in values})
        labels = torch.tensor([names.index(str(y)) for y in values], dtype=torch.int64)
    return ids, labels


def next_token_loss(pad_id: int):
    """Cross-entropy of each real token's prediction of the next one (padding ignored): the
    ``loss=`` of a causal-LM head, whose targets are the ids."""

    def loss(output: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        target = ids[:, 1:].masked_fill(ids[:, 1:] == pad_id, -100)
        return F.cross_entropy(output[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100)

    return loss


def next_token_accuracy(pad_id: int):
    """The share of real tokens whose next one is the most likely: the ``metric=`` of a
    causal-LM head."""

    def next_token_acc(output: torch.Tensor, ids: torch.Tensor) -> float:
        real = ids[:, 1:] != pad_id
        hit = (output[:, :-1].argmax(-1) == ids[:, 1:]) & real
        return float(hit.sum() / real.sum().clamp(min=1))

    return next_token_acc
