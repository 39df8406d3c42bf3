"""The length rule: how the job's token limits fit the coordinator's notes."""

from __future__ import annotations

import pytest

from privatune.common.generation import GenerationTask
from privatune.common.lengths import LengthFit, length_fit, quantile_length


class WordTokenizer:
    """One token per word, with bos and eos ids, like the tokenizers the project uses."""

    bos_token_id, eos_token_id = 1, 2

    def __init__(self) -> None:
        self.words: list[str] = []

    def __call__(self, text: str, add_special_tokens: bool = False, verbose: bool = False) -> dict:
        for word in text.split():
            if word not in self.words:
                self.words.append(word)
        return {"input_ids": [3 + self.words.index(word) for word in text.split()]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(self.words[i - 3] for i in ids)


def test_quantile_length_is_the_smallest_length_that_covers_the_share():
    lengths = list(range(1, 101))  # 1..100
    assert quantile_length(lengths, 0.95) == 95
    assert quantile_length(lengths, 1.0) == 100
    assert quantile_length([7], 0.5) == 7
    with pytest.raises(ValueError):
        quantile_length([], 0.95)
    with pytest.raises(ValueError):
        quantile_length([1], 0.0)


def test_length_fit_counts_the_notes_and_references_the_limits_cut():
    # whole examples: words + bos + eos = 4, 6, 12 tokens; references + eos = 3, 5, 11 tokens
    examples = [("a", "b c"), ("a b", "c d"), ("a b c d", "e f g h i j")]
    references = ["x y", "x y z w", "x " * 10]
    fit = length_fit(WordTokenizer(), examples, [GenerationTask("p", r) for r in references],
                     max_length=6, max_new_tokens=5, coverage=2 / 3)
    assert (fit.examples, fit.cut_examples) == (3, 1)
    assert fit.max_length_covering == 6
    assert (fit.references, fit.cut_references) == (3, 1)
    assert fit.max_new_tokens_covering == 5
    assert "cuts 1 of 3 notes" in fit.summary() and "1 of 3 references" in fit.summary()
    # the first two references fit whole (ROUGE-L 1); the third's first 5 of its 10 words
    # score precision 1, recall 0.5, F 2/3: no completion of 5 tokens can do better on average
    assert fit.rouge_l_ceiling == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert "at most ROUGE-L 0.889" in fit.summary()
    assert LengthFit.from_json(fit.to_json()) == fit
    older = {k: v for k, v in fit.to_json().items() if k != "rouge_l_ceiling"}
    assert LengthFit.from_json(older).rouge_l_ceiling is None  # a report from before it existed
    assert fit.status_accuracy_ceiling is None and "status" not in fit.summary()  # none stated


PROMPT = "Objective: BP 150/95 mmHg. Assessment:"
TWO_PROBLEMS = ("1. Hypertension: BP 150/95 mmHg, poorly controlled. "
                "2. Type 2 diabetes: HbA1c 6.8 %, at goal.")  # 16 words
ONE_PROBLEM = "1. Hypertension: BP 150/95 mmHg, poorly controlled."  # 7 words


@pytest.mark.parametrize("new_tokens, status, derivable, beatable", [
    (5, 0.0, 0.0, False),  # no status reached
    (8, 2 / 3, 1.0, False),  # hypertension's twice, the diabetes' never: the majority's 2/3
    (16, 1.0, 1.0, True)])
def test_status_ceilings_are_what_the_references_own_first_tokens_state(new_tokens, status,
                                                                        derivable, beatable):
    tasks = [GenerationTask(PROMPT, TWO_PROBLEMS), GenerationTask(PROMPT, ONE_PROBLEM)]
    fit = length_fit(WordTokenizer(), [("a", "b")], tasks, max_length=8,
                     max_new_tokens=new_tokens)
    assert fit.status_accuracy_ceiling == pytest.approx(status)
    assert fit.derivable_status_accuracy_ceiling == pytest.approx(derivable)  # BP: in the prompt
    assert fit.status_majority_share == pytest.approx(2 / 3)  # "poorly controlled" 2 of 3
    assert f"status accuracy at most {status:.2f} against 0.67" in fit.summary()
    assert ("can beat the majority answer" in fit.summary()) is not beatable
    assert LengthFit.from_json(fit.to_json()) == fit


def test_without_generation_tasks_the_summary_speaks_of_notes_only():
    fit = length_fit(WordTokenizer(), [("a", "b")], [], max_length=8, max_new_tokens=4)
    assert fit.references == 0 and "references" not in fit.summary()
    assert fit.rouge_l_ceiling is None and "ROUGE-L" not in fit.summary()
