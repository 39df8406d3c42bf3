"""What the study measures: a model's (or the copy's) scores on one set of held-out notes, one
setting's measurement for one seed, one run's record, and their mean and spread over seeds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from privatune.simulations.study_plan import BASE, FEDERATED, LOCAL_ONLY, NON_PRIVATE, Budget

if TYPE_CHECKING:
    from privatune.common.generation import GenerationScores
    from privatune.server.report import RunReport


@dataclass(frozen=True)
class Scores:
    """One model (or the copy) on one set of held-out notes; None where not measured."""

    rouge_l: float | None = None
    status_accuracy: float | None = None
    status_majority_share: float | None = None  # always answering the most common status
    derivable_status_accuracy: float | None = None
    measurement_fidelity: float | None = None
    repeat_4gram: float | None = None
    perplexity: float | None = None

    @classmethod
    def of(cls, generation: GenerationScores | None, perplexity: float | None = None) -> Scores:
        clinical = generation.clinical if generation is not None else None
        return cls(rouge_l=generation.rouge_l if generation is not None else None,
                   status_accuracy=clinical.status_accuracy if clinical else None,
                   status_majority_share=clinical.status_majority_share if clinical else None,
                   derivable_status_accuracy=(clinical.derivable_status_accuracy if clinical
                                              else None),
                   measurement_fidelity=clinical.measurement_fidelity if clinical else None,
                   repeat_4gram=clinical.repeat_4gram if clinical else None,
                   perplexity=perplexity)

    @classmethod
    def mean(cls, scores: Sequence[Scores]) -> Scores | None:
        """Each figure averaged over the scores that have it (sites weigh alike); None for none."""
        if not scores:
            return None
        return cls(**{f.name: _mean([getattr(s, f.name) for s in scores]) for f in fields(cls)})

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Scores | None:
        return None if data is None else cls(**{f.name: data.get(f.name) for f in fields(cls)})


def _mean(values: Iterable[float | None]) -> float | None:
    spread = Spread.of(list(values))
    return spread.mean if spread is not None else None


@dataclass(frozen=True)
class Measurement:
    """One setting in one column for one seed: its scores on the coordinator's held-out notes
    and on the sites' held-out splits (each site's scores, averaged over the sites)."""

    setting: str
    budget: str  # Budget.key
    seed: int
    central: Scores | None
    sites: Scores | None
    sites_scored: tuple[str, ...] = ()  # the sites in that average
    noise_multiplier: float | None = None  # mean over the sites; the curator's when pooled

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Measurement:
        return cls(setting=str(data["setting"]), budget=str(data["budget"]), seed=int(data["seed"]),
                   central=Scores.from_json(data.get("central")),
                   sites=Scores.from_json(data.get("sites")),
                   sites_scored=tuple(data.get("sites_scored", ())),
                   noise_multiplier=data.get("noise_multiplier"))


@dataclass(frozen=True)
class RunRecord:
    """One run of the study: a simulation (federated and local-only, or secure), a pooled
    training (with or without DP) or a nearest-note copy; its wall time, whether it was reused
    from an earlier study, or why it failed."""

    kind: str  # "simulate", SECURE, CENTRAL_DP, POOLED or NEAREST_NOTE
    budget: str
    seed: int
    directory: str
    overrides: tuple[str, ...] = ()
    wall_s: float | None = None
    reused: bool = False
    failure: str | None = None


def federated_measurements(report: RunReport, budget: Budget, seed: int) -> list[Measurement]:
    """The federated and the local-only measurements of one finished simulation, and in the
    non-private column the base model's (its round 0: the same untrained model in every
    column, so measured once a seed). A site counts in the sites' average where it released
    generation scores."""
    alone = {name: Scores.of(site.local_only_generation, site.local_only_perplexity)
             for name, site in sorted(report.sites.items()) if site.local_only_generation}
    measurements = [global_model_measurement(report, FEDERATED, budget, seed),
                    Measurement(LOCAL_ONLY, budget.key, seed, None,
                                Scores.mean(list(alone.values())), tuple(alone),
                                _site_noise(report))]
    if budget == NON_PRIVATE:
        measurements.append(base_model_measurement(report, seed))
    return measurements


def base_model_measurement(report: RunReport, seed: int) -> Measurement:
    """The untrained base model, from a simulation's round-0 scores on the same held-out notes
    as every other row: what training of any kind has to beat."""
    base = {name: Scores.of(site.base_generation, site.base_perplexity)
            for name, site in sorted(report.sites.items()) if site.base_generation}
    central = Scores.of(report.central.base_generation, report.central.base_perplexity)
    return Measurement(BASE, NON_PRIVATE.key, seed, central, Scores.mean(list(base.values())),
                       tuple(base))


def global_model_measurement(report: RunReport, setting: str, budget: Budget,
                             seed: int) -> Measurement:
    """A simulation's final global model (DP FedAvg's or secure DP-SGD's), read the same way
    from its report: each site's held-out split and the coordinator's set."""
    final = {name: Scores.of(site.final_generation, site.final_perplexity)
             for name, site in sorted(report.sites.items()) if site.final_generation}
    central = Scores.of(report.central.final_generation, report.central.final_perplexity)
    return Measurement(setting, budget.key, seed, central, Scores.mean(list(final.values())),
                       tuple(final), _site_noise(report))


def _site_noise(report: RunReport) -> float | None:
    return _mean(site.noise_multiplier for site in report.sites.values())


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation over seeds (sd 0 for a single seed)."""

    mean: float
    sd: float
    runs: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread | None:
        known = [v for v in values if v is not None and math.isfinite(v)]
        if not known:
            return None
        return cls(statistics.fmean(known), statistics.stdev(known) if len(known) > 1 else 0.0,
                   len(known))

    def text(self, digits: int) -> str:
        """"0.042" for one seed, "0.042 ± 0.010" for several."""
        if self.runs == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}"

