"""Empirical privacy audit: does the trained model remember one hospital's private records?

Epsilon is an upper bound proven on paper; this audit measures what an attacker actually gets,
so a privacy officer can see the bound at work. One hospital's training split gets *canaries*:
random secrets shaped like medical record numbers (``MRN 4829301-7``), each written into a
clinical-note line and repeated 1, 4, 16... times (each copy its own record). The federation
is trained twice from the same config, once with DP-SGD at the site's epsilon and once without
DP (no noise, no clipping: an audit-only counterfactual, never a node mode). Afterwards:

- **exposure** (Carlini et al. 2019, "The Secret Sharer"): how far up the model ranks the real
  secret among all secrets of the same format, by log-perplexity;
  ``exposure = log2|R| - log2(rank)``. The rank in the full space is estimated from a random
  sample of candidates, and extrapolated beyond the sample by fitting a skew-normal
  distribution to the candidates' log-perplexities, as the paper does. A secret the model never
  saw scores about 1.4 bits on average; ``log2|R|`` means it is the model's first guess.
- **membership inference AUC**: threshold attacks telling every site's training records from
  its held-out records (0.5 is chance): by loss, by loss calibrated against the base model, and
  by the loss of a record's hardest tokens (Min-K%), each with its standard error so a small
  AUC can be told from noise.

The federation runs in-process (each site runs ``train_dp_round`` from the global adapter, then
FedAvg weighted by example counts): the same training the Flower nodes do, without the engine.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from privatune.client.data import Record, load_records, split_records
from privatune.client.node import privacy_units
from privatune.client.trainer import DPTrainSettings, poisson_sample_rate, train_dp_round
from privatune.common.config import ConfigError, JobConfig, load_job_config, to_dict
from privatune.common.examples import IGNORE_INDEX, encode_pairs, next_token_losses
from privatune.common.lora import LoraSettings, initial_adapter, load_base_model, load_lora_state, lora_state
from privatune.common.plots import report_figure
from privatune.common.privacy import MechanismStep, calibrate_noise_multiplier, rdp_epsilon
from privatune.common.protocol import round_seed
from privatune.server.aggregation import fedavg
from privatune.simulations.empirical_audit_cli import (
    DEFAULT_CANARIES_PER_COUNT,
    DEFAULT_CANDIDATES,
    DEFAULT_REPETITIONS,
)

Progress = Callable[[str], None]
# Scores texts by log-perplexity (bits, summed over tokens): lower means "the model expects it".
Scorer = Callable[[Sequence[str]], list[float]]

MRN_DIGITS = 7
# The format space: 7 digits and a Luhn check digit that follows from them.
MRN_SPACE_SIZE = 10 ** MRN_DIGITS
CANARY_SOURCE = "canary:"  # Record.source prefix of planted copies
CANARY_TEMPLATE = "Registration desk: patient identity confirmed with MRN {secret}."
# Clipping bound of the non-DP run: large enough that no per-example gradient is ever clipped.
NO_CLIPPING = 1e6
# Min-K% Prob's default share of a record's tokens (Shi et al. 2024).
MIN_K_FRACTION = 0.2
RUN_LABELS = {"base": "base model (before training)", "dp": "DP-SGD",
              "non_dp": "no DP (audit only)"}


# --------------------------------------------------------------------------- canaries


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


# --------------------------------------------------------------------------- metrics


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


def roc_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """Area under the ROC curve of "higher score = member": the Mann-Whitney U statistic,
    P(member > non-member) with ties counting half. 0.5 is chance, 1.0 a perfect attack."""
    if not member_scores or not nonmember_scores:
        raise ValueError("AUC needs at least one member and one non-member score")
    pooled = sorted([(float(s), 1) for s in member_scores] + [(float(s), 0) for s in nonmember_scores])
    rank_sum, position = 0.0, 0
    while position < len(pooled):
        end = position
        while end < len(pooled) and pooled[end][0] == pooled[position][0]:
            end += 1
        average_rank = (position + 1 + end) / 2.0  # 1-based ranks position+1 .. end
        rank_sum += average_rank * sum(label for _, label in pooled[position:end])
        position = end
    members, nonmembers = len(member_scores), len(nonmember_scores)
    u_statistic = rank_sum - members * (members + 1) / 2.0
    return u_statistic / (members * nonmembers)


def auc_standard_error(auc: float, members: int, nonmembers: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC: how far from 0.5 is still noise."""
    if members < 1 or nonmembers < 1:
        raise ValueError("the standard error needs at least one member and one non-member")
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    variance = (auc * (1.0 - auc) + (members - 1) * (q1 - auc * auc)
                + (nonmembers - 1) * (q2 - auc * auc)) / (members * nonmembers)
    return math.sqrt(max(variance, 0.0))


@torch.no_grad()
def record_token_losses(model: torch.nn.Module, dataset: TensorDataset,
                        batch_size: int) -> list[torch.Tensor]:
    """Every example's next-token losses (nats) at its labelled positions, one tensor each."""
    model.eval()
    losses: list[torch.Tensor] = []
    input_ids, labels, mask = dataset.tensors
    for start in range(0, len(input_ids), batch_size):
        stop = start + batch_size
        batch_labels = labels[start:stop]
        token_loss = next_token_losses(
            model(input_ids=input_ids[start:stop], attention_mask=mask[start:stop]).logits, batch_labels)
        labelled = batch_labels[:, 1:] != IGNORE_INDEX
        losses.extend(row[keep] for row, keep in zip(token_loss, labelled))
    return losses


def min_k_loss(token_losses: torch.Tensor, fraction: float = MIN_K_FRACTION) -> float:
    """Mean loss of a record's hardest ``fraction`` of tokens (Min-K% Prob, Shi et al. 2024).

    Notes share templates that any fine-tuned model predicts well, members or not; the tokens
    it still finds hard are the record's own details, where memorization shows.
    """
    if token_losses.numel() == 0:
        raise ValueError("a record with no labelled tokens cannot be scored")
    count = max(1, math.ceil(fraction * token_losses.numel()))
    return float(token_losses.topk(count).values.mean())


@dataclass(frozen=True)
class MembershipAttack:
    """A threshold attack: ``score`` (from a record's token losses under the audited model and
    under the base model) is high where it guesses "member"."""

    label: str
    score: Callable[[torch.Tensor, torch.Tensor], float]


# *loss* scores a record by its mean loss; *loss vs base model* by how much that fell from the
# base model's, which discounts records that are simply easy (Watson et al. 2022); *min_k* by
# the loss of its hardest tokens.
ATTACKS = {
    "loss": MembershipAttack("loss", lambda own, base: -float(own.mean())),
    "loss_vs_base": MembershipAttack("loss vs base model",
                                     lambda own, base: float(base.mean()) - float(own.mean())),
    "min_k": MembershipAttack(f"Min-K% ({MIN_K_FRACTION:.0%} hardest tokens)",
                              lambda own, base: -min_k_loss(own)),
}


def model_scorer(model: torch.nn.Module, tokenizer: Any, max_length: int, batch_size: int) -> Scorer:
    """A Scorer backed by a language model: log-perplexity of each text, in bits."""

    def score(texts: Sequence[str]) -> list[float]:
        dataset = encode_pairs(tokenizer, [("", t) for t in texts], max_length)
        return [float(losses.sum()) / math.log(2.0)
                for losses in record_token_losses(model, dataset, batch_size)]

    return score


# --------------------------------------------------------------------------- federation


@dataclass(frozen=True)
class AuditSite:
    """A hospital's records for the audit: a JSONL file or FHIR export, in the node's formats."""

    name: str
    data: Path
    format: str = "auto"


@dataclass
class SiteSplit:
    """One site's privacy units (training, held out, training minus canaries) and, once the
    tokenizer is known, their encoded tensors."""

    name: str
    train_units: list[tuple[str, str]]
    heldout_units: list[tuple[str, str]]
    member_units: list[tuple[str, str]]  # training units that are not canaries
    train: TensorDataset | None = None
    members: TensorDataset | None = None
    heldout: TensorDataset | None = None


@dataclass
class FederationOutcome:
    """The final global adapter, each site's privacy spend and the per-round training loss."""

    state: dict[str, torch.Tensor]
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)


def membership_records(records: Sequence[Record], unit: str) -> list[Record]:
    """A site's records as the membership game needs them.

    Under the record unit, membership is per record, so members and non-members must be
    exchangeable records: the split is keyed on the record, not the patient. (The node's
    patient-keyed split puts a handful of patients, often with many near-identical notes, on
    the held-out side; measured on the simulated hospitals, that alone moved the attack's AUC
    to 0.3 or 0.58 before any training.) Under the patient unit the patient split stays.
    """
    if unit == "record":
        return [replace(record, patient_id=None) for record in records]
    return list(records)


def prepare_sites(job: JobConfig, sites: Sequence[AuditSite], canary_site: str,
                  canaries: Sequence[Canary]) -> list[SiteSplit]:
    """Every site's split as `membership_records` says; canaries go into ``canary_site``'s
    training side only."""
    names = [s.name for s in sites]
    if canary_site not in names:
        raise ValueError(f"canary site {canary_site!r} is not one of the sites ({', '.join(names)})")
    splits = []
    for site in sites:
        records = membership_records(load_records(site.data, site.format), job.privacy.unit)
        if site.name == canary_site:
            train, heldout = plant_canaries(records, canaries, job.data.heldout_fraction, job.seed)
        else:
            train, heldout = split_records(records, job.data.heldout_fraction, job.seed)
        clean_train = [r for r in train if not r.source.startswith(CANARY_SOURCE)]
        unit = job.privacy.unit
        splits.append(SiteSplit(site.name, privacy_units(train, unit), privacy_units(heldout, unit),
                                privacy_units(clean_train, unit)))
    return splits


def site_noise_multiplier(job: JobConfig, examples: int) -> float:
    """The noise the node would fix for this run: solved for the site's epsilon and delta over
    rounds x local steps at the Poisson rate of its loader, never below the policy minimum."""
    if job.privacy.delta >= 1.0 / examples:
        raise ConfigError(f"privacy.delta = {job.privacy.delta:g} is not below 1/{examples} "
                          f"(a site has {examples} {job.privacy.unit}s); the node would refuse it")
    sample_rate = poisson_sample_rate(examples, job.training.batch_size)
    calibrated = calibrate_noise_multiplier(job.privacy.epsilon, job.privacy.delta, sample_rate,
                                            job.federation.rounds * job.training.local_steps)
    return max(calibrated, job.privacy.min_noise_multiplier)


def train_federation(job: JobConfig, template: torch.nn.Module, sites: Sequence[SiteSplit],
                     private: bool, progress: Progress = print, label: str = "") -> FederationOutcome:
    """Rounds of: every site runs ``train_dp_round`` from the global adapter, then FedAvg.

    ``private=False`` is the audit's counterfactual (noise 0, clipping off); it exists only to
    show what DP prevents and is never offered as a node mode.
    """
    outcome = FederationOutcome(state=lora_state(template))
    history: dict[str, list[MechanismStep]] = {s.name: [] for s in sites}
    noise = {s.name: site_noise_multiplier(job, len(s.train_units)) if private else 0.0 for s in sites}
    clip = job.training.max_grad_norm if private else NO_CLIPPING
    for round_number in range(1, job.federation.rounds + 1):
        started = time.monotonic()
        updates, weights, losses = [], [], {}
        for site in sites:
            if site.train is None:
                raise ValueError(f"{site.name}: training records are not encoded yet")
            model = copy.deepcopy(template)
            load_lora_state(model, outcome.state)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # library deprecation notices
                result = train_dp_round(model, site.train, DPTrainSettings(
                    noise_multiplier=noise[site.name], max_grad_norm=clip,
                    expected_batch_size=job.training.batch_size, steps=job.training.local_steps,
                    learning_rate=job.training.learning_rate, seed=round_seed(job, round_number)))
            updates.append(lora_state(model))
            weights.append(float(result.examples))
            losses[site.name] = result.mean_loss
            history[site.name].append(MechanismStep(result.noise_multiplier, result.sample_rate,
                                                    result.steps))
        outcome.state = fedavg(updates, weights)
        outcome.rounds.append({"round": round_number, "train_loss": losses,
                               "seconds": round(time.monotonic() - started, 1)})
        progress(f"[{label}] round {round_number}/{job.federation.rounds}: train loss "
                 + ", ".join(f"{n} {v:.3f}" for n, v in losses.items())
                 + f" ({time.monotonic() - started:.0f} s)")
    for site in sites:
        outcome.sites[site.name] = {
            "examples": len(site.train_units), "noise_multiplier": noise[site.name],
            "sample_rate": poisson_sample_rate(len(site.train_units), job.training.batch_size),
            "steps": sum(h.steps for h in history[site.name]),
            "epsilon": rdp_epsilon(history[site.name], job.privacy.delta) if private else math.inf}
    return outcome


@dataclass
class MembershipLosses:
    """Token losses of every site's training records (canaries excluded) and held-out records."""

    members: list[torch.Tensor]
    heldout: list[torch.Tensor]


def membership_losses(model: torch.nn.Module, splits: Sequence[SiteSplit],
                      batch_size: int) -> MembershipLosses:
    """The membership game's records, pooled over the sites in ``splits`` order."""
    losses = MembershipLosses([], [])
    for split in splits:
        if split.members is None or split.heldout is None:
            raise ValueError(f"{split.name}: records are not encoded yet")
        losses.members += record_token_losses(model, split.members, batch_size)
        losses.heldout += record_token_losses(model, split.heldout, batch_size)
    return losses


def membership_attacks(losses: MembershipLosses, reference: MembershipLosses) -> dict[str, Any]:
    """AUC and standard error of each attack in ATTACKS on the pooled records; ``reference``
    holds the same records' losses under the base model."""
    members, nonmembers = len(losses.members), len(losses.heldout)
    attacks = {}
    for key, attack in ATTACKS.items():
        auc = roc_auc([attack.score(o, b) for o, b in zip(losses.members, reference.members)],
                      [attack.score(o, b) for o, b in zip(losses.heldout, reference.heldout)])
        attacks[key] = {"auc": auc, "standard_error": auc_standard_error(auc, members, nonmembers)}
    return attacks


def evaluate_run(model: torch.nn.Module, tokenizer: Any, job: JobConfig, splits: Sequence[SiteSplit],
                 canaries: Sequence[Canary], candidates: Sequence[str],
                 reference: MembershipLosses | None = None) -> tuple[dict[str, Any], MembershipLosses]:
    """Exposure of every canary, and the membership attacks on every site's records.

    ``reference`` is the base model's `MembershipLosses` (None when evaluating the base model
    itself). Returns the report fields of one run and this model's losses.
    """
    batch = job.training.eval_batch_size
    exposures = measure_exposures(model_scorer(model, tokenizer, job.model.max_length, max(batch, 256)),
                                  canaries, candidates)
    by_count: dict[str, dict[str, Any]] = {}
    for count in sorted({c.repetitions for c in canaries}):
        chosen = [e for e in exposures if e.repetitions == count]
        by_count[str(count)] = {
            "mean": sum(e.exposure for e in chosen) / len(chosen),
            "mean_sampled": sum(e.exposure_sampled for e in chosen) / len(chosen),
            "canaries": [asdict(e) for e in chosen]}
    losses = membership_losses(model, splits, batch)

    def average(records: list[torch.Tensor]) -> float:
        return sum(float(r.mean()) for r in records) / len(records)

    mia = {"sites": [s.name for s in splits], "members": len(losses.members),
           "nonmembers": len(losses.heldout),
           "attacks": membership_attacks(losses, reference if reference is not None else losses),
           "member_loss": average(losses.members), "heldout_loss": average(losses.heldout)}
    return {"exposure": by_count, "mia": mia}, losses


def strongest_attack(run: dict[str, Any]) -> float:
    """The highest membership AUC of a run's attacks: what the best of them achieved."""
    return max(attack["auc"] for attack in run["mia"]["attacks"].values())


# --------------------------------------------------------------------------- the audit


def run_empirical_audit(job: JobConfig, model_dir: Path, sites: Sequence[AuditSite], out: Path,
                        repetitions: Sequence[int] = DEFAULT_REPETITIONS,
                        canary_site: str | None = None,
                        canaries_per_count: int = DEFAULT_CANARIES_PER_COUNT,
                        candidates: int = DEFAULT_CANDIDATES,
                        progress: Progress = print) -> dict[str, Any]:
    """Plant canaries, train the federation with and without DP, attack both, write the report.

    The canary site defaults to the one with the most held-out records (the membership attack
    needs non-members). Returns the report that is also written to ``out/report.json``.
    """
    started = time.monotonic()
    if not sites:
        raise ValueError("the audit needs at least one site")
    canaries = make_canaries(list(repetitions), canaries_per_count, job.seed)
    if canary_site is None:
        canary_site = _site_with_most_heldout(job, sites)
    splits = prepare_sites(job, sites, canary_site, canaries)
    _, tokenizer = load_base_model(model_dir)
    longest = max(len(tokenizer.encode(c.text, add_special_tokens=False)) + 2 for c in canaries)
    if longest > job.model.max_length:
        raise ConfigError(f"model.max_length = {job.model.max_length} would cut the canary line "
                          f"({longest} tokens with bos/eos) and its secret; raise it to at least {longest}")
    for split in splits:
        split.train = encode_pairs(tokenizer, split.train_units, job.model.max_length)
        split.heldout = encode_pairs(tokenizer, split.heldout_units, job.model.max_length)
        split.members = encode_pairs(tokenizer, split.member_units, job.model.max_length)
        progress(f"{split.name}: {len(split.train_units)} training {job.privacy.unit}s"
                 + (f" ({len(split.train_units) - len(split.member_units)} canary copies)"
                    if split.name == canary_site else "")
                 + f", {len(split.heldout_units)} held out")
    candidate_secrets = sample_candidates(candidates, [c.secret for c in canaries], job.seed)
    with warnings.catch_warnings():  # PEFT asks transformers a deprecated question
        warnings.simplefilter("ignore", FutureWarning)
        template = initial_adapter(model_dir, LoraSettings(r=job.lora.r, alpha=job.lora.alpha,
                                                           target_modules=job.lora.target_modules),
                                   job.seed)

    runs: dict[str, dict[str, Any]] = {}
    run_started = time.monotonic()
    base, reference = evaluate_run(template, tokenizer, job, splits, canaries, candidate_secrets)
    runs["base"] = {"label": RUN_LABELS["base"], "epsilon": 0.0, "noise_multiplier": None, **base,
                    "wall_s": round(time.monotonic() - run_started, 1)}
    progress(f"[base] {_attack_summary(runs['base'])}, exposure by repetitions "
             + ", ".join(f"{k}: {v['mean']:.1f}" for k, v in runs["base"]["exposure"].items()))
    for key, private in (("dp", True), ("non_dp", False)):
        run_started = time.monotonic()
        outcome = train_federation(job, template, splits, private, progress, key)
        model = copy.deepcopy(template)
        load_lora_state(model, outcome.state)
        train_s = time.monotonic() - run_started
        evaluation, _ = evaluate_run(model, tokenizer, job, splits, canaries, candidate_secrets,
                                     reference)
        site = outcome.sites[canary_site]
        runs[key] = {"label": RUN_LABELS[key],
                     "epsilon": site["epsilon"] if private else "inf",
                     "delta": job.privacy.delta if private else None,
                     "noise_multiplier": site["noise_multiplier"],
                     "max_grad_norm": job.training.max_grad_norm if private else NO_CLIPPING,
                     **evaluation, "sites": _json_sites(outcome.sites), "rounds": outcome.rounds,
                     "train_s": round(train_s, 1),
                     "wall_s": round(time.monotonic() - run_started, 1)}
        progress(f"[{key}] epsilon {epsilon_text(runs[key]['epsilon'])}, {_attack_summary(runs[key])}, "
                 "exposure by repetitions "
                 + ", ".join(f"{k}: {v['mean']:.1f}" for k, v in runs[key]["exposure"].items()))

    report = {
        "kind": "empirical-privacy-audit",
        "canary_site": canary_site,
        "sites": {s.name: {"train": len(s.train_units), "heldout": len(s.heldout_units)} for s in splits},
        "secret_format": {"template": CANARY_TEMPLATE, "secret": "7 digits + Luhn check digit",
                          "space_size": MRN_SPACE_SIZE, "max_exposure": math.log2(MRN_SPACE_SIZE)},
        "repetitions": sorted(set(repetitions)),
        "canaries_per_count": canaries_per_count,
        "candidates": len(candidate_secrets),
        "sampled_exposure_limit": math.log2(len(candidate_secrets) + 1),
        "canaries": [asdict(c) for c in canaries],
        "runs": runs,
        "config": to_dict(job),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    write_audit_report(report, out)
    return report


def _attack_summary(run: dict[str, Any]) -> str:
    return "MIA AUC " + ", ".join(f"{ATTACKS[k].label} {a['auc']:.3f}" for k, a in run["mia"]["attacks"].items())


def _site_with_most_heldout(job: JobConfig, sites: Sequence[AuditSite]) -> str:
    sizes = {}
    for site in sites:
        records = membership_records(load_records(site.data, site.format), job.privacy.unit)
        _, heldout = split_records(records, job.data.heldout_fraction, job.seed)
        sizes[site.name] = len(privacy_units(heldout, job.privacy.unit))
    return max(sizes, key=lambda name: sizes[name])


def _json_sites(sites: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in info.items()}
            for name, info in sites.items()}


def epsilon_text(epsilon: Any) -> str:
    """ε as the report prints it: ∞ for the run without DP."""
    return "∞" if epsilon == "inf" else f"{float(epsilon):.3g}"


# --------------------------------------------------------------------------- report


def render_audit_markdown(report: dict[str, Any]) -> str:
    """The side-by-side table a privacy officer reads: exposure per repetition count, MIA AUC."""
    runs = report["runs"]
    keys = [k for k in ("base", "dp", "non_dp") if k in runs]
    fmt = report["secret_format"]
    lines = [
        "# Empirical privacy audit", "",
        f"Canaries: {len(report['canaries'])} random secrets like `MRN {report['canaries'][0]['secret']}` "
        f"(format space |R| = {fmt['space_size']:,}, so exposure is at most "
        f"{fmt['max_exposure']:.1f} bits) planted in **{report['canary_site']}**'s training split "
        f"only, {report['canaries_per_count']} per repetition count, each copy its own record, in "
        f"the line \"{fmt['template']}\". Ranked against {report['candidates']:,} random secrets of "
        f"the same format.", "",
        "| | " + " | ".join(runs[k]["label"] for k in keys) + " |",
        "|---|" + "---|" * len(keys),
        "| epsilon | " + " | ".join(epsilon_text(runs[k]["epsilon"]) for k in keys) + " |",
        "| noise multiplier | " + " | ".join(_fmt_number(runs[k].get("noise_multiplier"))
                                             for k in keys) + " |",
    ]
    for count in report["repetitions"]:
        lines.append(f"| exposure, {count} cop{'y' if count == 1 else 'ies'} (bits) | " + " | ".join(
            f"{runs[k]['exposure'][str(count)]['mean']:.1f} "
            f"(sampled {runs[k]['exposure'][str(count)]['mean_sampled']:.1f})" for k in keys) + " |")
    for key, attack in ATTACKS.items():
        lines.append(f"| membership inference AUC, {attack.label} (± s.e.) | " + " | ".join(
            f"{runs[k]['mia']['attacks'][key]['auc']:.3f} ± "
            f"{runs[k]['mia']['attacks'][key]['standard_error']:.3f}" for k in keys) + " |")
    lines += [
        "| member / held-out loss | " + " | ".join(
            f"{runs[k]['mia']['member_loss']:.3f} / {runs[k]['mia']['heldout_loss']:.3f}"
            for k in keys) + " |",
        "| best attack's AUC above chance | " + " | ".join(
            f"{strongest_attack(runs[k]) - 0.5:+.3f}" for k in keys) + " |",
        "| wall time (s) | " + " | ".join(f"{runs[k]['wall_s']:.0f}" for k in keys) + " |",
        "",
        "How to read it:",
        "",
        f"- **Exposure** (Carlini et al. 2019) = log2|R| - log2(rank of the secret among all "
        f"secrets of its format, by the model's log-perplexity). A secret the model never saw "
        f"scores about 1.4 bits on average; {fmt['max_exposure']:.1f} bits means the model "
        f"would guess it first. The main figure extrapolates the rank beyond the sample with a "
        f"skew-normal fit to the candidates' log-perplexities, as in the paper; *sampled* is the "
        f"rank among the candidates themselves and cannot exceed "
        f"{report['sampled_exposure_limit']:.1f} bits.",
        f"- **Membership inference AUC**: three threshold attacks telling the training records "
        f"of {', '.join(runs[keys[0]]['mia']['sites'])} ({runs[keys[0]]['mia']['members']}, "
        f"canaries excluded) from their held-out records ({runs[keys[0]]['mia']['nonmembers']}); "
        "0.5 is chance, ± is the Hanley-McNeil standard error. Under the record privacy unit each "
        "site's split is keyed on the record, so members and non-members are exchangeable. "
        "*Loss* guesses \"member\" for a low mean loss; the base model's figure shows how far "
        "that is off 0.5 before any training (the two splits differ a little by chance). *Loss "
        "vs base model* guesses \"member\" for a large drop in loss from the base model, which "
        "discounts records that are simply easy; it is 0.5 by construction for the base model. "
        f"*Min-K%* (Shi et al. 2024) looks only at the {MIN_K_FRACTION:.0%} of a record's tokens "
        "the model finds hardest: its own details rather than the template every note shares. "
        "A privacy officer reads the highest of the three: an attacker would pick the best.",
        "- DP bounds each *record*; a secret repeated k times is a group of k records, whose "
        "guarantee is about k times weaker, so some exposure at high repetition counts is "
        "expected even under DP.",
        "- The no-DP run (no noise, no clipping) exists only for this comparison; no node can be "
        "run that way.",
        "", f"Total time {report['elapsed_s']:.0f} s.", "",
        "![exposure by repetitions](report.png)", "",
    ]
    return "\n".join(lines)


def _fmt_number(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3g}"


def plot_exposure(report: dict[str, Any], path: Path) -> None:
    """Exposure against repetition count, one line per run, with the format's maximum."""
    counts = report["repetitions"]
    styles = {"base": ("grey", ":"), "dp": ("tab:blue", "-"), "non_dp": ("tab:red", "-")}
    with report_figure(path, size=(6.4, 4.2), legend_location="center right") as (axis,):
        for key, run in report["runs"].items():
            color, line = styles.get(key, ("black", "-"))
            means = [run["exposure"][str(c)]["mean"] for c in counts]
            label = (f"{run['label']} (eps {epsilon_text(run['epsilon'])}, "
                     f"best MIA AUC {strongest_attack(run):.2f})")
            axis.plot(counts, means, marker="o", color=color, linestyle=line, label=label)
            for count in counts:
                points = [c["exposure"] for c in run["exposure"][str(count)]["canaries"]]
                axis.scatter([count] * len(points), points, color=color, alpha=0.35, s=14)
        maximum = report["secret_format"]["max_exposure"]
        axis.axhline(maximum, color="black", linestyle="--", linewidth=0.8,
                     label=f"max {maximum:.1f} bits")
        axis.axhline(1 / math.log(2), color="grey", linestyle="-.", linewidth=0.8,
                     label="expected for an unseen secret")
        axis.set_xscale("log", base=2)
        axis.set_xticks(counts, [str(c) for c in counts])
        axis.set(title=f"Canary exposure at {report['canary_site']}",
                 xlabel="copies in the training data", ylabel="exposure (bits)",
                 ylim=(0, maximum + 1.5))


def write_audit_report(report: dict[str, Any], out: Path) -> None:
    """report.json, report.md and report.png in ``out`` (the text files replaced atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.json", json.dumps(report, indent=2)),
                       ("report.md", render_audit_markdown(report))):
        partial = out / f"{name}.tmp"
        partial.write_text(text, encoding="utf-8")
        partial.replace(out / name)
    plot_exposure(report, out / "report.png")


# --------------------------------------------------------------------------- command


def empirical_audit(config: Path, out: Path, overrides: Sequence[str] = (),
                    repetitions: Sequence[int] = DEFAULT_REPETITIONS, hospitals: int | None = None,
                    canaries_per_count: int = DEFAULT_CANARIES_PER_COUNT,
                    candidates: int = DEFAULT_CANDIDATES, progress: Progress = print) -> dict[str, Any]:
    """The audit on the simulated hospitals of a job config (the cached clinosim exports of
    ``privatune simulate``; ``hospitals`` takes the first N of the config's federation)."""
    from privatune.simulations.hospitals import default_hospitals, generate_federation
    from privatune.simulations.runner import resolve_base_model

    job = load_job_config(config, overrides)
    count = job.data.hospitals if hospitals is None else hospitals
    if count < 1:
        raise ConfigError(f"--hospitals must be at least 1, got {count}")
    # The first N of the config's own federation, so `privatune simulate`'s cache is reused.
    specs = default_hospitals(max(count, job.data.hospitals) + 1, job.seed, job.data.patients)[:count]
    model_dir = resolve_base_model(job, progress)
    exports = generate_federation(specs, Path(job.model.cache_dir) / "hospitals")
    sites = [AuditSite(spec.name, exports[spec.name], "fhir") for spec in specs]
    return run_empirical_audit(job, model_dir, sites, out, repetitions,
                               canaries_per_count=canaries_per_count, candidates=candidates,
                               progress=progress)
