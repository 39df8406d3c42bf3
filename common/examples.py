"""Turning (prompt, completion) text pairs into fixed-length training tensors.

The loss is computed on the completion only; prompt and padding positions get label -100.
One pair is exactly one example (never split into chunks), so one record stays one DP unit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import TensorDataset
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]],
                 max_length: int) -> TensorDataset:
    """Tokenize pairs into a TensorDataset of (input_ids, labels, attention_mask)."""
    if not pairs:
        raise ValueError("no examples to encode")
    rows: list[tuple[list[int], list[int]]] = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    def token_ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, truncation=True,
                         max_length=max_length)["input_ids"] if text else []

    for prompt, completion in pairs:
        prompt_ids = bos + token_ids(prompt)
        completion_ids = token_ids(completion) + eos
        ids = (prompt_ids + completion_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
        rows.append((ids, labels))
    length = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        mask[i, : len(ids)] = 1
    return TensorDataset(input_ids, labels, mask)


def next_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of every next-token prediction (shape [batch, length - 1]); 0 where unlabelled."""
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none").view(shift_labels.shape)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each example over its labelled positions (shape [batch])."""
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return next_token_losses(logits, labels).sum(dim=1) / counts


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 32) -> tuple[float, int]:
    """Token-weighted mean next-token loss over the labelled positions, and the token count."""
    model.eval()
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    input_ids, labels, mask = dataset.tensors
    for start in range(0, len(input_ids), batch_size):
        ids = input_ids[start:start + batch_size].to(device)
        labs = labels[start:start + batch_size].to(device)
        batch_mask = mask[start:start + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=batch_mask).logits.float()
        shift_labels = labs[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1, :].reshape(-1, logits.size(-1)), shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(loss)
        tokens += int((shift_labels != IGNORE_INDEX).sum())
    if tokens == 0:
        raise ValueError("evaluation set has no labelled tokens")
    return total / tokens, tokens
