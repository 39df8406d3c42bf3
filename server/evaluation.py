"""Central evaluation of the merged global adapter at the coordinator.

The coordinator holds its own held-out set (never a site's private data): a JSONL file with
``text`` or ``prompt`` + ``completion`` per line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from privatune.common.examples import encode_pairs, evaluate_loss
from privatune.common.generation import (DEFAULT_MARKER, GenerationSample, GenerationScores,
                                         GenerationTasks, evaluate_generation, generation_tasks,
                                         judged_pairs)
from privatune.common.lengths import LengthFit, length_fit
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from privatune.common.lora import load_lora_state


def read_eval_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Read the coordinator's evaluation JSONL; errors name the file and line."""
    path = Path(path)
    pairs: list[tuple[str, str]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ValueError(f"{path}: cannot read evaluation set ({err.strerror or err})") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from err
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            pairs.append(("", row["text"]))
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str) \
                and isinstance(row.get("completion"), str):
            pairs.append((row["prompt"], row["completion"]))
        else:
            raise ValueError(f"{path}, line {number}: expected 'text' or 'prompt' + 'completion'")
    if not pairs:
        raise ValueError(f"{path}: evaluation set is empty")
    return pairs


class CentralEvaluator:
    """Perplexity and generation scores of a global adapter state on the coordinator's
    held-out set."""

    def __init__(self, model: Callable[[], PeftModel], tokenizer: PreTrainedTokenizerBase,
                 eval_path: Path, max_length: int, batch_size: int,
                 marker: str = DEFAULT_MARKER, loss_marker: str = "", judged_only: bool = False):
        # the coordinator's model, asked for at each use: it may be the process's shared one
        # (common.shared_model), whose PeftModel another LoRA setting replaces
        self.model = model
        self.tokenizer, self.max_length = tokenizer, max_length
        pairs = read_eval_pairs(eval_path)
        # the loss on what the sites train on (notes split at loss_marker: the completion;
        # judged_only: the notes it splits, only)
        self.judged = judged_pairs(pairs, loss_marker, judged_only)
        self.dataset = encode_pairs(tokenizer, self.judged, max_length)
        self.batch_size = batch_size
        self.tasks: GenerationTasks = generation_tasks(pairs, marker)

    def length_fit(self, max_new_tokens: int) -> LengthFit:
        """How the job's lengths fit this set: measured on request, by the one caller that
        reports it (the coordinator), not by every evaluator."""
        return length_fit(self.tokenizer, self.judged, self.tasks.tasks, self.max_length,
                          max_new_tokens)

    def perplexity(self, state: Mapping[str, torch.Tensor]) -> float:
        model = self.model()
        load_lora_state(model, state)
        loss, _ = evaluate_loss(model, self.dataset, self.batch_size)
        return math.exp(loss)

    def generation(self, state: Mapping[str, torch.Tensor], max_new_tokens: int,
                   max_examples: int) -> tuple[GenerationScores, list[GenerationSample]] | None:
        """Greedy completions of the first ``max_examples`` tasks, scored; None without tasks."""
        tasks = self.tasks.tasks[:max_examples]
        if not tasks:
            return None
        model = self.model()
        load_lora_state(model, state)
        return evaluate_generation(model, self.tokenizer, tasks, self.max_length,
                                   max_new_tokens, self.batch_size)
