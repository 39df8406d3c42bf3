"""report.json: the run report's typed schema, from the rounds' records (``rounds.py``) and
each site's and the coordinator's summaries. report.md is ``report_markdown``, the plots
``report_plots``, and ``report_files.write_report`` writes them all."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privatune.common.generation import GenerationScores
from privatune.common.lengths import LengthFit
from privatune.common.run_record import RECORD_KEY, SCHEMA_KEY, SCHEMA_VERSION, schema_problem
from privatune.server.failure_reasons import FAILURE_KEYS, failure_reason
from privatune.server.overfitting import best_round, overfitting_flags
from privatune.server.rounds import RoundRecord, site_records

GENERATION_FIELDS = ("base_generation", "final_generation", "local_only_generation")


@dataclass
class SiteSummary:
    """One site's outcome: perplexity on its own held-out split and its privacy spend."""

    base_perplexity: float | None = None
    final_perplexity: float | None = None
    epsilon: float = 0.0
    delta: float | None = None
    epsilon_budget: float | None = None
    noise_multiplier: float | None = None
    rounds_participated: list[int] = field(default_factory=list)
    local_only_perplexity: float | None = None  # the site training alone (simulations only)
    # generation scores the site released on its held-out notes (None: not released / no task)
    base_generation: GenerationScores | None = None
    final_generation: GenerationScores | None = None
    local_only_generation: GenerationScores | None = None

    @property
    def within_budget(self) -> bool | None:
        return None if self.epsilon_budget is None else self.epsilon <= self.epsilon_budget

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "base_perplexity": self.base_perplexity, "final_perplexity": self.final_perplexity,
            "epsilon": self.epsilon, "delta": self.delta, "epsilon_budget": self.epsilon_budget,
            "noise_multiplier": self.noise_multiplier,
            "rounds_participated": list(self.rounds_participated)}
        if self.local_only_perplexity is not None:
            data["local_only_perplexity"] = self.local_only_perplexity
        for name in GENERATION_FIELDS:  # absent where the site released none
            if getattr(self, name) is not None:
                data[name] = getattr(self, name).to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SiteSummary:
        return cls(base_perplexity=data.get("base_perplexity"),
                   final_perplexity=data.get("final_perplexity"),
                   epsilon=float(data.get("epsilon", 0.0)), delta=data.get("delta"),
                   epsilon_budget=data.get("epsilon_budget"),
                   noise_multiplier=data.get("noise_multiplier"),
                   rounds_participated=[int(r) for r in data.get("rounds_participated", [])],
                   local_only_perplexity=data.get("local_only_perplexity"),
                   **{name: GenerationScores.from_json(data[name])
                      for name in GENERATION_FIELDS if data.get(name)})


@dataclass
class CentralSummary:
    """The global model on the coordinator's held-out set, before and after the run."""

    base_perplexity: float | None = None
    final_perplexity: float | None = None
    base_generation: GenerationScores | None = None
    final_generation: GenerationScores | None = None
    # the generation task made from the held-out set: notes used, and skipped by reason
    generation_tasks: int | None = None
    generation_skipped: dict[str, int] = field(default_factory=dict)
    samples: list[SampleCompletions] = field(default_factory=list)
    lengths: LengthFit | None = None  # how model.max_length and max_new_tokens fit the set

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"base_perplexity": self.base_perplexity,
                                "final_perplexity": self.final_perplexity}
        for name in ("base_generation", "final_generation"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name).to_json()
        if self.generation_tasks is not None:
            data["generation_tasks"] = self.generation_tasks
            data["generation_skipped"] = dict(self.generation_skipped)
        if self.samples:
            data["samples"] = [sample.to_json() for sample in self.samples]
        if self.lengths is not None:
            data["lengths"] = self.lengths.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CentralSummary:
        return cls(base_perplexity=data.get("base_perplexity"),
                   final_perplexity=data.get("final_perplexity"),
                   **{name: GenerationScores.from_json(data[name])
                      for name in ("base_generation", "final_generation") if data.get(name)},
                   generation_tasks=data.get("generation_tasks"),
                   generation_skipped=dict(data.get("generation_skipped", {})),
                   samples=[SampleCompletions.from_json(x) for x in data.get("samples", [])],
                   lengths=LengthFit.from_json(data["lengths"]) if data.get("lengths") else None)


@dataclass(frozen=True)
class SampleCompletions:
    """One task of the coordinator's own held-out set with the base and final models' text."""

    prompt: str
    reference: str
    base: str
    final: str

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "reference": self.reference, "base": self.base,
                "final": self.final}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SampleCompletions:
        return cls(prompt=str(data["prompt"]), reference=str(data["reference"]),
                   base=str(data["base"]), final=str(data["final"]))


@dataclass
class RunReport:
    """Everything report.json holds: the job, per-round records and per-site outcomes."""

    run_id: str
    config: dict[str, Any]
    base_model: str
    base_model_description: str = ""  # its name, size and source (model_source.describe_base_model)
    central: CentralSummary = field(default_factory=CentralSummary)
    rounds: list[RoundRecord] = field(default_factory=list)
    sites: dict[str, SiteSummary] = field(default_factory=dict)
    elapsed_s: float | None = None  # wall time of a simulation

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            SCHEMA_KEY: SCHEMA_VERSION,
            "run_id": self.run_id, "config": self.config, "base_model": self.base_model,
            "base_model_description": self.base_model_description,
            "central": self.central.to_json(), "rounds": [r.to_json() for r in self.rounds],
            "sites": {name: site.to_json() for name, site in self.sites.items()}}
        for record in data["rounds"]:  # one line each; the full texts are in FAILURE_LOG
            for key in FAILURE_KEYS:
                if key in record:
                    record[key] = [failure_reason(failure) for failure in record[key]]
        if self.elapsed_s is not None:
            data["elapsed_s"] = self.elapsed_s
        # derived from the rounds (recomputed on reading, never read back)
        data[RECORD_KEY] = {site: r.to_json() for site, r in site_records(self.rounds).items()}
        best = best_round(self.rounds)
        data["best_round"] = best.to_json() if best is not None else None
        data["overfitting"] = [flag.to_json() for flag in overfitting_flags(self.rounds)]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunReport:
        if problem := schema_problem(data):
            raise ValueError(f"report.json: {problem}")
        return cls(run_id=str(data["run_id"]), config=dict(data.get("config", {})),
                   base_model=str(data.get("base_model", "")),
                   base_model_description=str(data.get("base_model_description", "")),
                   central=CentralSummary.from_json(data.get("central", {})),
                   rounds=[RoundRecord.from_json(r) for r in data.get("rounds", [])],
                   sites={name: SiteSummary.from_json(site)
                          for name, site in data.get("sites", {}).items()},
                   elapsed_s=data.get("elapsed_s"))

    @classmethod
    def read(cls, path: Path) -> RunReport:
        """Load a report.json written by ``report_files.write_report``."""
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
