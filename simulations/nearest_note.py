"""The nearest-note copy: the study's reference row that trains nothing.

For each prompt it answers with the reference (the assessment and plan) of the training note
whose prompt shares the most words with it: what copying the closest note already written
scores. A model that does not beat it has learnt less than a lookup of the training notes.
Plain Python, so it is tested on hand-written notes without a model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_WORD = re.compile(r"\w+")


def word_set(text: str) -> frozenset[str]:
    """The distinct lowercase words of ``text`` (runs of letters, digits and underscores)."""
    return frozenset(_WORD.findall(text.lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a ∩ b| / |a ∪ b|; 0 for two empty sets."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def nearest_references(train: Sequence[tuple[str, str]], prompts: Sequence[str]) -> list[str]:
    """For each prompt, the reference of the (prompt, reference) training pair whose prompt
    has the highest Jaccard similarity of word sets with it; a tie goes to the earliest pair,
    so the answer does not depend on anything but the order of ``train``."""
    if not train:
        raise ValueError("the nearest-note copy needs at least one training note")
    keys = [word_set(prompt) for prompt, _ in train]
    copies = []
    for prompt in prompts:
        words = word_set(prompt)
        best = max(range(len(keys)), key=lambda i: (jaccard(words, keys[i]), -i))
        copies.append(train[best][1])
    return copies
