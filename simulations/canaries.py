"""Canaries and their exposure (Carlini et al. 2019, "The Secret Sharer").

A canary is a random secret shaped like a medical record number (``MRN 4829301-7``), written
into a clinical-note line and planted 1, 4, 16... times in one hospital's training split (each
copy its own record). Its *exposure* says how far up the trained model ranks the real secret
among all secrets of the same format, by log-perplexity: ``exposure = log2|R| - log2(rank)``.
The rank in the full space is estimated from a random sample of candidates, and extrapolated
beyond the sample by fitting a skew-normal distribution to the candidates' log-perplexities, as
the paper does. A secret the model never saw scores about 1.4 bits on average; ``log2|R|``
means it is the model's first guess.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from privatune.client.data import Record, split_records

# Scores texts by log-perplexity (bits, summed over tokens): lower means "the model expects it".
Scorer = Callable[[Sequence[str]], list[float]]

MRN_DIGITS = 7
# The format space: 7 digits and a Luhn check digit that follows from them.
MRN_SPACE_SIZE = 10 ** MRN_DIGITS
CANARY_SOURCE = "canary:"  # Record.source prefix of planted copies
CANARY_TEMPLATE = "Registration desk: patient identity confirmed with MRN {secret}."
# The audit's default design: each canary planted 1, 4 or 16 times, two distinct secrets per
# count, each ranked against 4,000 random secrets of the same format.
DEFAULT_REPETITIONS = (1, 4, 16)
DEFAULT_CANARIES_PER_COUNT = 2
DEFAULT_CANDIDATES = 4000


def mrn_check_digit(number: int) -> int:
    """Luhn check digit of the 7-digit body, so canaries look like real MRNs."""
    total = 0
    for position, digit in enumerate(reversed(f"{number:0{MRN_DIGITS}d}")):
        value = int(digit) * (2 if position % 2 == 0 else 1)
        total += value - 9 if value > 9 else value
    return (10 - total % 10) % 10


def format_mrn(number: int) -> str:
    """The secret for body ``number`` (0 <= number < MRN_SPACE_SIZE), e.g. ``4829301-7``."""
    if not 0 <= number < MRN_SPACE_SIZE:
        raise ValueError(f"MRN body {number} is outside 0..{MRN_SPACE_SIZE - 1}")
    return f"{number:0{MRN_DIGITS}d}-{mrn_check_digit(number)}"


def canary_text(secret: str) -> str:
    """The clinical-note line that carries a secret; candidates use the very same line."""
    return CANARY_TEMPLATE.format(secret=secret)


@dataclass(frozen=True)
class Canary:
    """A secret planted ``repetitions`` times in the canary hospital's training split."""

    secret: str
    repetitions: int

    @property
    def text(self) -> str:
        return canary_text(self.secret)


def make_canaries(repetitions: Sequence[int], per_count: int, seed: int) -> list[Canary]:
    """``per_count`` distinct random secrets for every repetition count (several per count,
    because one canary's exposure is a noisy figure)."""
    if not repetitions or any(r < 1 for r in repetitions):
        raise ValueError(f"repetition counts must be positive whole numbers, got {list(repetitions)}")
    if len(set(repetitions)) != len(repetitions):
        raise ValueError(f"repetition counts must be distinct, got {list(repetitions)}")
    if per_count < 1:
        raise ValueError(f"canaries per repetition count must be at least 1, got {per_count}")
    bodies = random.Random(f"canaries-{seed}").sample(range(MRN_SPACE_SIZE), per_count * len(repetitions))
    return [Canary(format_mrn(body), count)
            for i, count in enumerate(repetitions)
            for body in bodies[i * per_count:(i + 1) * per_count]]


def sample_candidates(count: int, exclude: Sequence[str], seed: int) -> list[str]:
    """``count`` distinct random secrets from the format space, none of them a planted canary:
    the reference population the canaries are ranked against."""
    available = MRN_SPACE_SIZE - len(set(exclude))
    if not 1 <= count <= available:
        raise ValueError(f"candidates must be between 1 and {available}, got {count}")
    excluded = set(exclude)
    rng = random.Random(f"candidates-{seed}")
    chosen: dict[str, None] = {}
    while len(chosen) < count:
        secret = format_mrn(rng.randrange(MRN_SPACE_SIZE))
        if secret not in excluded:
            chosen[secret] = None
    return list(chosen)


def canary_records(canaries: Sequence[Canary]) -> list[Record]:
    """One record per copy; each copy has its own pseudo patient, so it is its own privacy unit
    under both the record and the patient unit (repetition = a group of that size)."""
    return [Record(prompt="", completion=canary.text, patient_id=f"canary-{index}-{copy_index}",
                   source=f"{CANARY_SOURCE}{index}:{copy_index}")
            for index, canary in enumerate(canaries) for copy_index in range(canary.repetitions)]


def plant_canaries(records: Sequence[Record], canaries: Sequence[Canary], heldout_fraction: float,
                   seed: int) -> tuple[list[Record], list[Record]]:
    """The site's (train, held-out) split with the canaries added to the training side only.

    The split is the node's own (`split_records`); canaries are appended after it, so a planted
    secret can never land in the held-out records the attacks compare against.
    """
    train, heldout = split_records(records, heldout_fraction, seed)
    clashes = [c.secret for c in canaries
               if any(c.secret in r.prompt or c.secret in r.completion for r in records)]
    if clashes:
        raise ValueError(f"the site's own records already contain canary secrets {clashes[:3]}; "
                         "choose another seed")
    return [*train, *canary_records(canaries)], heldout


@dataclass(frozen=True)
class Exposure:
    """One canary's exposure, by sampled rank and by the paper's distribution extrapolation."""

    secret: str
    repetitions: int
    log_perplexity: float  # bits, summed over the canary line's tokens
    sampled_rank: int  # 1 + candidates the model prefers (ties count half, rounded down)
    exposure_sampled: float  # log2 of the sample size + 1 at most: the sample's resolution
    exposure: float  # skew-normal extrapolation to the whole space, in [0, log2|R|]


def exposure_from_scores(canary_score: float, candidate_scores: Sequence[float],
                         space_size: int, fit: tuple[float, float, float] | None = None
                         ) -> tuple[float, float, int]:
    """(extrapolated exposure, sampled exposure, sampled rank) of one canary.

    The canary's rank in the full space is |R| times the share of the space it beats; the
    sampled share is (candidates scoring lower + 1) / (n + 1), the extrapolated one is the
    skew-normal CDF fitted to the candidates (needed once the canary beats every sample).
    """
    scores = [float(s) for s in candidate_scores]
    if not scores:
        raise ValueError("exposure needs at least one candidate score")
    if space_size < 2:
        raise ValueError(f"the format space must hold at least 2 secrets, got {space_size}")
    lower = sum(1 for s in scores if s < canary_score) + 0.5 * sum(1 for s in scores if s == canary_score)
    sampled_share = (lower + 1.0) / (len(scores) + 1.0)
    log2_space = math.log2(space_size)
    exposure_sampled = min(log2_space, max(0.0, -math.log2(sampled_share)))
    a, loc, scale = fit if fit is not None else fit_skew_normal(scores)
    log2_share = _skewnorm_log2_cdf(canary_score, a, loc, scale)
    exposure = min(log2_space, max(0.0, -log2_share))
    return exposure, exposure_sampled, int(lower) + 1


def fit_skew_normal(scores: Sequence[float]) -> tuple[float, float, float]:
    """Skew-normal (shape, location, scale) of the candidates' log-perplexities (the paper's
    model of that distribution); a normal fit when the sample is too flat to fit skew."""
    from scipy import stats

    values = [float(s) for s in scores]
    spread = max(values) - min(values) if values else 0.0
    if len(values) < 3 or spread == 0.0:
        return 0.0, (values[0] if values else 0.0), max(spread, 1e-9)
    try:
        a, loc, scale = stats.skewnorm.fit(values)
    except (ValueError, RuntimeError, FloatingPointError):
        a, (loc, scale) = 0.0, stats.norm.fit(values)
    if not all(math.isfinite(v) for v in (a, loc, scale)) or scale <= 0:
        a, (loc, scale) = 0.0, stats.norm.fit(values)
    return float(a), float(loc), float(max(scale, 1e-9))


def _skewnorm_log2_cdf(x: float, a: float, loc: float, scale: float) -> float:
    from scipy import stats

    log_cdf = float(stats.skewnorm.logcdf(x, a, loc=loc, scale=scale))
    if math.isnan(log_cdf):
        return 0.0
    return log_cdf / math.log(2.0) if math.isfinite(log_cdf) else -math.inf


def measure_exposures(scorer: Scorer, canaries: Sequence[Canary], candidates: Sequence[str],
                      space_size: int = MRN_SPACE_SIZE) -> list[Exposure]:
    """Exposure of every canary against the same candidate secrets, scored by ``scorer``."""
    if not candidates:
        raise ValueError("exposure needs candidate secrets to rank the canaries against")
    candidate_scores = scorer([canary_text(s) for s in candidates])
    canary_scores = scorer([c.text for c in canaries])
    if len(candidate_scores) != len(candidates) or len(canary_scores) != len(canaries):
        raise ValueError("the scorer must return one score per text")
    fit = fit_skew_normal(candidate_scores)
    results = []
    for canary, score in zip(canaries, canary_scores):
        exposure, sampled, rank = exposure_from_scores(score, candidate_scores, space_size, fit)
        results.append(Exposure(canary.secret, canary.repetitions, float(score), rank, sampled, exposure))
    return results
