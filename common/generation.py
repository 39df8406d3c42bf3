"""The model as a generative model: a generation task made from held-out notes, greedy
decoding, and scores from the field's own libraries.

The task: a record with a prompt and a completion is used as given. A note without a prompt
(FHIR notes, JSONL ``text``; a ``Record`` with prompt "") is split at a section marker, by
default the SOAP ``Assessment:`` heading: the prompt is the history and findings up to and
including the marker's first occurrence, the reference is the assessment and plan after it. A
note without the marker, with nothing before it, or with nothing after it is skipped and
counted.

The scores: ROUGE-L F1 (Google's ``rouge-score``, with its stemmer), averaged over examples,
on 0..1; corpus BLEU and chrF (``sacrebleu``, its default settings) on 0..100; and, since those
barely notice a wrong number or a wrong verdict, the clinical scores of
``privatune.common.clinical_metrics`` (the prompt's measurements stated right, the reference's
control statuses matched, repeated 4-grams). Nothing here computes a metric itself.

Decoding is greedy, at most ``max_new_tokens`` new tokens, on the model's own device, in eval
mode and without gradients. A prompt is cut from its start (the end, nearest the marker, is
kept) to ``max_length - max_new_tokens`` tokens, so prompt and completion fit the length the
model was trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from privatune.common.clinical_metrics import ClinicalScores, score_clinical
from privatune.common.examples import head_ids
from privatune.common.progress import progress_bar

DEFAULT_MARKER = "Assessment:"
# why a record gives no task (the counts are reported by these names)
NO_MARKER = "without the marker"
NOTHING_BEFORE = "with nothing before the marker"
NOTHING_AFTER = "with nothing after the marker"


@dataclass(frozen=True)
class GenerationTask:
    prompt: str
    reference: str


@dataclass(frozen=True)
class Split:
    """A record as a task, or why it is none (``skipped`` is one of the reasons above)."""

    task: GenerationTask | None
    skipped: str = ""


def split_at_marker(text: str, marker: str = DEFAULT_MARKER) -> Split:
    """Split a note at the first ``marker``: the prompt keeps the marker, the reference is
    what follows it (stripped). No marker, or only whitespace before or after it: skipped."""
    if not marker:
        raise ValueError("the section marker must not be empty")
    at = text.find(marker)
    if at < 0:
        return Split(None, NO_MARKER)
    if not text[:at].strip():
        return Split(None, NOTHING_BEFORE)
    end = at + len(marker)
    reference = text[end:].strip()
    if not reference:
        return Split(None, NOTHING_AFTER)
    return Split(GenerationTask(prompt=text[:end], reference=reference))


def task_from_pair(prompt: str, completion: str, marker: str = DEFAULT_MARKER) -> Split:
    """A (prompt, completion) record as a task: as given when it has a prompt, else the note
    (its completion) split at the marker."""
    if prompt.strip():
        reference = completion.strip()
        return Split(GenerationTask(prompt, reference)) if reference else Split(None, NOTHING_AFTER)
    return split_at_marker(completion, marker)


@dataclass
class GenerationTasks:
    """The tasks made from a set of records, in the records' order, and what was skipped."""

    tasks: list[GenerationTask] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> records

    @property
    def records(self) -> int:
        return len(self.tasks) + sum(self.skipped.values())

    def describe(self) -> str:
        """E.g. "12 of 15 records; skipped 3 without the marker"."""
        text = f"{len(self.tasks)} of {self.records} records"
        skipped = [f"{n} {reason}" for reason, n in self.skipped.items() if n]
        return text + (f"; skipped {', '.join(skipped)}" if skipped else "")


def judged_pairs(pairs: Iterable[tuple[str, str]], marker: str,
                 only_judged: bool = False) -> list[tuple[str, str]]:
    """Pairs as the model is judged on them, for the loss: a note without a prompt split at
    ``marker`` like a generation task (the loss on what follows it); a pair with a prompt, or a
    note the marker does not split, as given. An empty ``marker`` leaves every pair as given.
    ``only_judged``: the notes the marker does not split (never judged) are left out."""
    judged = []
    for prompt, completion in pairs:
        task = split_at_marker(completion, marker).task if marker and not prompt.strip() else None
        if task is not None:
            judged.append((task.prompt, task.reference))
        elif prompt.strip() or not only_judged:
            judged.append((prompt, completion))
    return judged


def generation_tasks(pairs: Iterable[tuple[str, str]], marker: str = DEFAULT_MARKER) -> GenerationTasks:
    """Every (prompt, completion) pair as a task where it makes one; the rest counted by reason."""
    result = GenerationTasks()
    for prompt, completion in pairs:
        split = task_from_pair(prompt, completion, marker)
        if split.task is None:
            result.skipped[split.skipped] = result.skipped.get(split.skipped, 0) + 1
        else:
            result.tasks.append(split.task)
    return result


@dataclass(frozen=True)
class GenerationScores:
    """How close generated completions are to the references, over ``examples`` tasks."""

    rouge_l: float  # mean ROUGE-L F1 over examples (rouge-score), 0..1
    bleu: float  # corpus BLEU (sacrebleu), 0..100
    chrf: float  # corpus chrF (sacrebleu), 0..100
    examples: int | None = None  # None where a site withholds its example count
    clinical: ClinicalScores | None = None  # None where not scored (no prompts, not released)
    # completions that used every one of max_new_tokens without an end of text: their scores
    # judge a text cut short. None where not generated here (a site's scores, given text)
    cut_off: int | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"rouge_l": self.rouge_l, "bleu": self.bleu, "chrf": self.chrf}
        if self.examples is not None:
            data["examples"] = self.examples
        if self.clinical is not None:  # keyed next to rouge_l, as issue 24 asks of report.json
            data.update(self.clinical.to_json())
        if self.cut_off is not None:
            data["cut_off"] = self.cut_off
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerationScores:
        examples, cut_off = data.get("examples"), data.get("cut_off")
        # reports written before 2026-12-08 nest the clinical scores under "clinical"
        clinical = data.get("clinical") or (data if "completions" in data else None)
        return cls(rouge_l=float(data["rouge_l"]), bleu=float(data["bleu"]),
                   chrf=float(data["chrf"]), examples=None if examples is None else int(examples),
                   clinical=None if clinical is None else ClinicalScores.from_json(clinical),
                   cut_off=None if cut_off is None else int(cut_off))


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 (rouge-score, stemmed) of each prediction against its reference."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def score_completions(predictions: Sequence[str], references: Sequence[str],
                      prompts: Sequence[str] | None = None) -> GenerationScores:
    """ROUGE-L (rouge-score) and BLEU and chrF (sacrebleu) of predictions against references;
    given the tasks' ``prompts`` (in the same order), also the clinical scores."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if prompts is not None and len(prompts) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(prompts)} prompts")
    if not predictions:
        raise ValueError("no completions to score")
    import sacrebleu  # imported when scoring: nodes that never generate do not pay for it

    rouge = rouge_l(predictions, references)
    return GenerationScores(rouge_l=sum(rouge) / len(rouge),
                            bleu=float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score),
                            chrf=float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score),
                            examples=len(predictions),
                            clinical=None if prompts is None else score_clinical(prompts, references,
                                                                                 predictions))


def _greedy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
            max_new_tokens: int) -> GenerationConfig:
    """Greedy decoding only: the model's own sampling defaults (temperature, top-p) never apply."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                            bos_token_id=tokenizer.bos_token_id)


@dataclass(frozen=True)
class Completions:
    """Greedy completions, in the prompts' order, and how many of them ``max_new_tokens`` cut off."""

    texts: list[str]
    cut_off: int


@torch.no_grad()
def generate_completions(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                         prompts: Sequence[str], max_length: int, max_new_tokens: int,
                         batch_size: int = 16) -> Completions:
    """Greedy completions of ``prompts`` (each cut from its start to fit), decoded as text.

    Runs on the model's device, in eval mode (restored afterwards) and without gradients;
    batches are padded on the left so every prompt ends where its completion starts.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    room = max_length - max_new_tokens - len(bos)
    if max_new_tokens < 1 or room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt within "
                         f"max_length={max_length} tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    config = _greedy(model, tokenizer, max_new_tokens)
    eos = config.eos_token_id
    eos_ids = torch.tensor([] if eos is None else eos if isinstance(eos, list) else [eos],
                           dtype=torch.long)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    completions: list[str] = []
    cut_off = 0
    try:
        for start in progress_bar(range(0, len(prompts), batch_size), "generating completions"):
            rows = [bos + head_ids(tokenizer, prompt, room, from_end=True)[0]
                    for prompt in prompts[start:start + batch_size]]
            width = max(max(len(row) for row in rows), 1)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                if row:
                    input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
                    mask[i, width - len(row):] = 1
            output = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                    generation_config=config)
            new = output[:, width:].cpu()
            if new.shape[1] == max_new_tokens:  # shorter: every row of the batch ended
                cut_off += int((~torch.isin(new, eos_ids).any(dim=1)).sum())
            completions += [text.strip() for text in
                            tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return Completions(completions, cut_off)


@dataclass(frozen=True)
class GenerationSample:
    """One task and what the model wrote for it."""

    prompt: str
    reference: str
    completion: str

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "reference": self.reference, "completion": self.completion}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerationSample:
        return cls(prompt=str(data["prompt"]), reference=str(data["reference"]),
                   completion=str(data["completion"]))


def evaluate_generation(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                        tasks: Sequence[GenerationTask], max_length: int, max_new_tokens: int,
                        batch_size: int = 16) -> tuple[GenerationScores, list[GenerationSample]]:
    """Generate a completion for every task and score them against the references (and, for
    the clinical scores, the prompts), counting the completions ``max_new_tokens`` cut off."""
    prompts = [t.prompt for t in tasks]
    completions = generate_completions(model, tokenizer, prompts, max_length, max_new_tokens,
                                       batch_size)
    scores = score_completions(completions.texts, [t.reference for t in tasks], prompts)
    return (dataclasses.replace(scores, cut_off=completions.cut_off),
            [GenerationSample(t.prompt, t.reference, c) for t, c in zip(tasks, completions.texts)])


def is_generation_round(round_number: int, rounds: int, every_k_rounds: int) -> bool:
    """Round 0 (the base model), every k-th round and the final round; never when k is 0."""
    if every_k_rounds <= 0:
        return False
    return round_number == 0 or round_number % every_k_rounds == 0 or round_number >= rounds
