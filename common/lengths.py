"""Do the job's lengths fit the notes? Measured on the coordinator's own held-out set.

A model trained on notes cut at ``model.max_length`` never sees what lies past the cut, and a
completion stopped at ``evaluation.max_new_tokens`` is scored against the whole reference: both
limits must be chosen from the data, not guessed. The coordinator measures them on its own set
(never on a site's), reports how many notes and references fit, and the lengths that would make
``coverage`` of them fit, so the next job can be sized by that rule. ROUGE-L is an F-measure
against the whole reference, so a completion cut at ``max_new_tokens`` has a ceiling however
good it is: the score of each reference's own first ``max_new_tokens`` tokens, reported too.
Status accuracy counts every status the whole reference states, so it has a ceiling of the
same kind: the statuses those first tokens state. Where that ceiling is below always answering
the most common status, no completion of that length can beat the majority answer.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from privatune.common.clinical_metrics import score_clinical
from privatune.common.generation import GenerationTask, rouge_l

# the share of notes (and of references) a length chosen by the rule lets through whole
DEFAULT_COVERAGE = 0.95


@dataclass(frozen=True)
class LengthFit:
    """How the job's token limits fit the coordinator's held-out notes."""

    coverage: float  # the share the *_covering lengths let through whole
    examples: int  # notes as trained on (split at the loss marker where it is set)
    max_length: int
    cut_examples: int  # whose prompt lost its start or whose completion lost its end
    max_length_covering: int  # tokens (with bos and eos) that fit `coverage` of the examples
    references: int  # generation tasks' references
    max_new_tokens: int
    cut_references: int  # longer than max_new_tokens (with eos): a completion cannot match them
    max_new_tokens_covering: int
    # ROUGE-L of each reference's own first max_new_tokens tokens against the whole of it, on
    # average: the most a completion of that length can score (None: no references, or a
    # report written before it was measured)
    rouge_l_ceiling: float | None = None
    # the same first tokens' status accuracy and derivable status accuracy, and always
    # answering the most common status (None: no status to check, or an older report)
    status_accuracy_ceiling: float | None = None
    derivable_status_accuracy_ceiling: float | None = None
    status_majority_share: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LengthFit:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})

    def summary(self) -> str:
        """One sentence for report.md."""
        share = f"{self.coverage:.0%}"
        text = (f"`model.max_length` {self.max_length} cuts {self.cut_examples} of {self.examples} "
                f"notes as trained ({share} fit within {self.max_length_covering} tokens)")
        if self.references:
            text += (f"; `evaluation.max_new_tokens` {self.max_new_tokens} is shorter than "
                     f"{self.cut_references} of {self.references} references ({share} fit within "
                     f"{self.max_new_tokens_covering})")
        if self.rouge_l_ceiling is not None:
            text += (f"; a completion of {self.max_new_tokens} tokens scores at most ROUGE-L "
                     f"{self.rouge_l_ceiling:.3f} (the references' own first {self.max_new_tokens})")
        if self.status_accuracy_ceiling is not None and self.status_majority_share is not None:
            text += (f", status accuracy at most {self.status_accuracy_ceiling:.2f} against "
                     f"{self.status_majority_share:.2f} for always the most common status")
            if self.derivable_status_accuracy_ceiling is not None:
                text += (", derivable status accuracy at most "
                         f"{self.derivable_status_accuracy_ceiling:.2f}")
            if self.status_accuracy_ceiling <= self.status_majority_share:
                text += (f": no completion of {self.max_new_tokens} tokens can beat the majority "
                         "answer")
        return text + "."


def quantile_length(lengths: Sequence[int], coverage: float) -> int:
    """The smallest length that at least ``coverage`` of ``lengths`` fit within."""
    if not lengths:
        raise ValueError("no lengths to cover")
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    ordered = sorted(lengths)
    return ordered[max(math.ceil(coverage * len(ordered)) - 1, 0)]


def length_fit(tokenizer: PreTrainedTokenizerBase, examples: Sequence[tuple[str, str]],
               tasks: Sequence[GenerationTask], max_length: int, max_new_tokens: int,
               coverage: float = DEFAULT_COVERAGE) -> LengthFit:
    """Measure ``max_length`` against the (prompt, completion) examples as trained on and
    ``max_new_tokens`` against the generation tasks' references."""
    specials = sum(token is not None for token in (tokenizer.bos_token_id, tokenizer.eos_token_id))
    eos = int(tokenizer.eos_token_id is not None)
    whole = [len(_tokens(tokenizer, prompt)) + len(_tokens(tokenizer, completion)) + specials
             for prompt, completion in examples]
    references = [task.reference for task in tasks]
    reference_tokens = [_tokens(tokenizer, reference) for reference in references]
    reference_lengths = [len(tokens) + eos for tokens in reference_tokens]
    # a perfect completion of max_new_tokens: the reference's own first tokens
    firsts = [tokenizer.decode(tokens[:max_new_tokens], skip_special_tokens=True)
              for tokens in reference_tokens]
    clinical = score_clinical([task.prompt for task in tasks], references, firsts)
    return LengthFit(
        coverage=coverage, examples=len(examples), max_length=max_length,
        cut_examples=sum(length > max_length for length in whole),
        max_length_covering=quantile_length(whole, coverage),
        references=len(references), max_new_tokens=max_new_tokens,
        cut_references=sum(length > max_new_tokens for length in reference_lengths),
        max_new_tokens_covering=quantile_length(reference_lengths, coverage) if references else 0,
        rouge_l_ceiling=statistics.fmean(rouge_l(firsts, references)) if references else None,
        status_accuracy_ceiling=clinical.status_accuracy,
        derivable_status_accuracy_ceiling=clinical.derivable_status_accuracy,
        status_majority_share=clinical.status_majority_share,
    )


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """All of ``text``'s tokens, uncut: the point is to see how long it is."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] if text else []
