"""Can a model copy from its context? Two probes of a base model (and, optionally, an adapter
trained on it), for the question behind measurement fidelity: a note's assessment restates the
blood pressure its prompt gives, so the model must look back and copy it.

- span copy: 32 windows of 48 tokens of the base's own held-out public text, each followed by
  40 tokens of other text and then the same window again. The mean loss (nats per token) on
  the second copy against the first: equal when the model cannot copy at all, far lower when
  it can (induction).
- value recall: the coordinator's held-out notes whose assessment writes "hypertension: BP";
  given the note up to there (its last `--context` tokens), how often greedy decoding writes
  the systolic value the note's Objective gives, token for token, and its mean probability.

A developer's probe, not part of the package; it reads the coordinator's set, never a site's.

    .venv/bin/python benchmarks/copy_probe.py --base .cache/privatune/models/<model dir> \
        [--adapter runs/demo/adapter]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from privatune.client.data import load_records
from privatune.common.base_model import collect_corpus, split_held_out
from privatune.common.lora import load_base_model

SPAN = 48
GAP = 40
WINDOWS = 32
RECALL_KEY = "hypertension: BP"


@torch.no_grad()
def span_copy_losses(model: torch.nn.Module, stream: torch.Tensor) -> tuple[float, float]:
    """Mean loss on a window's first copy and on its second copy, over WINDOWS windows."""
    generator = torch.Generator().manual_seed(0)
    first = second = 0.0
    for _ in range(WINDOWS):
        start = int(torch.randint(0, len(stream) - SPAN, (), generator=generator))
        window = stream[start:start + SPAN]
        other = int(torch.randint(0, len(stream) - GAP, (), generator=generator))
        ids = torch.cat([window, stream[other:other + GAP], window]).unsqueeze(0)
        losses = -torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(
            1, ids[0, 1:, None])[:, 0]
        first += losses[:SPAN - 1].mean().item()
        second += losses[SPAN + GAP:].mean().item()
    return first / WINDOWS, second / WINDOWS


@torch.no_grad()
def value_recall(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, notes: list[str],
                 context: int) -> tuple[int, float]:
    """How many of ``notes`` get their systolic BP written right after RECALL_KEY, greedily,
    and the value's mean probability."""
    right, probability = 0, 0.0
    for note in notes:
        cut = note.index(RECALL_KEY) + len(RECALL_KEY)
        value = re.search(r"BP (\d+)/", note[cut - 2:])[1]
        ids = tokenizer(note[:cut], return_tensors="pt").input_ids[:, -context:]
        target = tokenizer(" " + value, add_special_tokens=False).input_ids
        full = torch.cat([ids, torch.tensor([target])], 1)
        log_probs = torch.log_softmax(model(input_ids=full).logits[0, ids.shape[1] - 1:-1], -1)
        right += all(int(log_probs[i].argmax()) == token for i, token in enumerate(target))
        probability += float(log_probs[range(len(target)), target].sum().exp())
    return right, probability / max(1, len(notes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="a local Hugging Face model directory")
    parser.add_argument("--adapter", help="a PEFT adapter trained on --base (a run's adapter/)")
    parser.add_argument("--central", default=".cache/privatune/hospitals/coordinator-validation")
    parser.add_argument("--context", type=int, default=159)
    args = parser.parse_args()

    base, tokenizer = load_base_model(args.base)
    held_out = split_held_out(collect_corpus("python", 3_000_000))[1]
    stream = torch.tensor([token for text in held_out for token in tokenizer(text).input_ids])
    notes = [record.completion for record in load_records(Path(args.central))
             if RECALL_KEY in record.completion]
    models = {"base": base}
    if args.adapter:
        models["adapter"] = PeftModel.from_pretrained(load_base_model(args.base)[0], args.adapter)
    for name, model in models.items():
        model.eval()
        first, second = span_copy_losses(model, stream)
        right, probability = value_recall(model, tokenizer, notes, args.context)
        print(f"{name}: span copy loss {first:.3f} (first) -> {second:.3f} (second copy); "
              f"BP recalled {right} of {len(notes)} notes, mean probability {probability:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
