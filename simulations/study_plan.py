"""What the privacy-utility study runs (``privatune study``): its settings (federated, secure
DP-SGD, local-only, central DP-SGD, pooled, nearest-note), its columns (each ε and
non-private), their seeds, and every run's job config, checked before anything runs."""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from privatune.common.config import ConfigError, load_job_config, parse_override

if TYPE_CHECKING:
    from privatune.common.config import JobConfig

FEDERATED, LOCAL_ONLY, POOLED, NEAREST_NOTE = "federated", "local-only", "pooled", "nearest-note"
SECURE, CENTRAL_DP, BASE = "secure", "central-dp", "base"
SETTINGS = (BASE, FEDERATED, SECURE, LOCAL_ONLY, CENTRAL_DP, POOLED, NEAREST_NOTE)
PRIVATE_ONLY = (SECURE, CENTRAL_DP)  # settings with no non-private column
NON_PRIVATE_ONLY = (BASE, POOLED, NEAREST_NOTE)  # settings with no ε column
SETTING_LABELS = {BASE: "base model, no training",
                  FEDERATED: "federated (DP FedAvg)",
                  SECURE: "secure DP-SGD (SecAgg+, aggregate guarantee)",
                  LOCAL_ONLY: "each site alone",
                  CENTRAL_DP: "all sites pooled, central DP-SGD (trusted curator)",
                  POOLED: "all sites pooled, no DP", NEAREST_NOTE: "nearest-note copy"}
DEFAULT_EPSILONS = (1.0, 3.0, 8.0)
# "Non-private" for a job that always runs DP-SGD: the highest epsilon a job accepts, calibrated
# with RDP (PRV at a huge epsilon costs minutes and about 10 GB) and no floor on the noise, so
# each site's noise multiplier is what epsilon 10,000 needs (about 0.06 in the demo)
NON_PRIVATE_EPSILON = 10_000
NON_PRIVATE_OVERRIDES = ("privacy.accountant=rdp", f"privacy.epsilon={NON_PRIVATE_EPSILON}",
                         "privacy.min_noise_multiplier=0")
# keys the study sets on every run itself; a --set of one would be silently overridden
STUDY_KEYS = ("seed", "privacy.epsilon", "simulation.local_only_baseline",
              "evaluation.every_k_rounds", "secure.sample_rate", "secure.calibrate")
# what makes a run the secure row's, on top of the column's job (its batch: ``SecureBatch``)
SECURE_OVERRIDES = ("federation.mode=secure_dpsgd", "secure.calibrate=aggregate",
                    "simulation.local_only_baseline=false")


@dataclass(frozen=True)
class Budget:
    """One column of the study: a per-site ε, or non-private (``epsilon`` None)."""

    epsilon: float | None

    @property
    def key(self) -> str:
        """The column's name in directories and study.json."""
        return "non-private" if self.epsilon is None else f"eps-{self.epsilon:g}"

    @property
    def label(self) -> str:
        return "non-private" if self.epsilon is None else f"ε = {self.epsilon:g}"

    @property
    def overrides(self) -> tuple[str, ...]:
        if self.epsilon is None:
            return NON_PRIVATE_OVERRIDES
        return (f"privacy.epsilon={self.epsilon:g}",)


NON_PRIVATE = Budget(None)


@dataclass(frozen=True)
class SecureBatch:
    """The secure row's sampling: each site's rate q and the expected union batch."""

    sample_rate: float
    batch_size: int

    @property
    def overrides(self) -> tuple[str, ...]:
        return (f"secure.sample_rate={self.sample_rate!r}",
                f"training.batch_size={self.batch_size}")


def secure_batch(batch_size: int, train_records: Sequence[int]) -> SecureBatch:
    """The secure row's q and union batch, matched to the federated row's per-site work.

    A DP FedAvg site samples ``batch_size`` of its N records a step; a typical site (the median
    N) does so at q = batch_size / median N, so every secure site samples at that q (at most 1)
    and the union batch the sum is divided by is round(q * total records). With the same rounds
    and local steps, each site processes about as many records per step as in DP FedAvg and the
    run has as many steps. Only training-split counts are used, never a held-out split.
    """
    if not train_records or min(train_records) < 1:
        raise ValueError(f"every site needs training records, got counts {list(train_records)}")
    rate = min(1.0, batch_size / statistics.median(train_records))
    return SecureBatch(rate, max(1, round(rate * sum(train_records))))


def parse_epsilons(text: str) -> tuple[float, ...]:
    """``1,3,8`` -> (1.0, 3.0, 8.0), ascending; argparse type for --epsilons."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part!r} is not a number (expected e.g. 1,3,8)") from None
        if not (math.isfinite(value) and 0 < value < NON_PRIVATE_EPSILON):
            raise argparse.ArgumentTypeError(f"{part}: each ε must be above 0 and below "
                                             f"{NON_PRIVATE_EPSILON} (the non-private column)")
        values.append(value)
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: an ε is listed twice")
    return tuple(sorted(values))


@dataclass(frozen=True)
class StudyPlan:
    """What to run: the config, its user overrides, the columns and each column's seeds."""

    config: Path
    out: Path
    epsilons: tuple[float, ...]
    seeds: tuple[int, ...]  # the non-private column and the highest ε
    other_seeds: tuple[int, ...]  # every other ε
    extra: tuple[str, ...] = ()  # the user's --set, applied to every run first
    rounds: int = 1

    @property
    def budgets(self) -> tuple[Budget, ...]:
        return (*(Budget(e) for e in self.epsilons), NON_PRIVATE)

    def seeds_of(self, budget: Budget) -> tuple[int, ...]:
        full = budget.epsilon is None or budget.epsilon == max(self.epsilons)
        return self.seeds if full else self.other_seeds

    def job_overrides(self, budget: Budget, seed: int) -> tuple[str, ...]:
        """Every --set of one run: the user's, then the study's (generation scored at round 0
        and the last round only, the local-only baselines on), then the column's."""
        return (*self.extra, f"seed={seed}", "simulation.local_only_baseline=true",
                f"evaluation.every_k_rounds={self.rounds}", *budget.overrides)

    def job(self, budget: Budget, seed: int) -> JobConfig:
        return load_job_config(self.config, self.job_overrides(budget, seed))

    def secure_overrides(self, budget: Budget, seed: int,
                         batch: SecureBatch) -> tuple[str, ...]:
        """Every --set of a secure run (and of the central DP-SGD row, which takes its batch):
        the column's job, in secure mode for sites that trust secure aggregation, no local-only
        baselines, at the seed's ``secure_batch``."""
        return (*self.job_overrides(budget, seed), *SECURE_OVERRIDES, *batch.overrides)

    def secure_job(self, budget: Budget, seed: int, batch: SecureBatch) -> JobConfig:
        return load_job_config(self.config, self.secure_overrides(budget, seed, batch))


def plan_study(config: Path, out: Path, epsilons: Sequence[float] = DEFAULT_EPSILONS,
               seeds: int = 3, other_seeds: int = 1, extra: Sequence[str] = ()) -> StudyPlan:
    """Check the arguments and every run's job config before anything runs: a bad value
    stops here, not hours into the study."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if other_seeds < 1:
        raise ConfigError(f"--seeds-other must be at least 1, got {other_seeds}")
    if not epsilons:
        raise ConfigError("--epsilons must name at least one ε")
    for text in extra:
        key, _ = parse_override(text)
        if key in STUDY_KEYS:
            raise ConfigError(f"--set {text!r}: the study sets {key} itself on every run "
                              f"(seeds: --seeds, --seeds-other; ε: --epsilons)")
    base = load_job_config(config, extra)
    if base.federation.mode != "local_dp":
        # its rows are DP FedAvg's job and that job in secure mode: training.batch_size is a
        # site's batch in the one and the union's in the other
        raise ConfigError(f"{config}: federation.mode is {base.federation.mode}; the study starts "
                          f"from a DP FedAvg job (federation.mode: local_dp, a site's batch in "
                          f"training.batch_size), e.g. configs/dpfedavg.yaml, and runs its secure "
                          f"row itself")
    plan = StudyPlan(config=config, out=out, epsilons=tuple(sorted(epsilons)),
                     seeds=tuple(base.seed + i for i in range(seeds)),
                     other_seeds=tuple(base.seed + i for i in range(other_seeds)),
                     extra=tuple(extra), rounds=base.federation.rounds)
    # the secure runs' batch is known once the seed's hospitals exist: checked here at the job's
    nominal = SecureBatch(base.secure.sample_rate, base.training.batch_size)
    for budget in plan.budgets:
        for seed in plan.seeds_of(budget):
            plan.job(budget, seed)
            if budget != NON_PRIVATE:
                plan.secure_job(budget, seed, nominal)
    return plan
