"""The run report: its typed records, report.json (machine-readable), report.md (people) and a plot.

The coordinator builds the records round by round; ``to_json`` / ``from_json`` give the JSON
that report.json and the checkpoints' state.json hold (the same shape as before the records were
typed: a key that is absent there, such as the training keys of round 0, is left out here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privatune.common.plots import report_figure


@dataclass
class RoundTraining:
    """What happened to the train requests of one round."""

    participants: list[str] = field(default_factory=list)  # sites whose update was averaged
    declined: dict[str, str] = field(default_factory=dict)  # site -> its reason
    failures: list[str] = field(default_factory=list)  # no reply, error replies, rejected updates
    aggregated: bool = False  # False: too few usable updates, the global adapter was kept

    def to_json(self) -> dict[str, Any]:
        return {"participants": list(self.participants), "declined": dict(self.declined),
                "failures": list(self.failures), "aggregated": self.aggregated}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundTraining:
        return cls(participants=list(data.get("participants", [])),
                   declined=dict(data.get("declined", {})), failures=list(data.get("failures", [])),
                   aggregated=bool(data.get("aggregated", False)))


@dataclass
class RoundEvaluation:
    """Perplexity of the global adapter after a round: central, pooled over sites, per site."""

    global_perplexity: float | None = None  # on the coordinator's own held-out set
    federated_perplexity: float | None = None  # example-weighted over the sites that told
    site_perplexity: dict[str, float | None] = field(default_factory=dict)
    evaluation_failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"global_perplexity": self.global_perplexity,
                "federated_perplexity": self.federated_perplexity,
                "site_perplexity": dict(self.site_perplexity),
                "evaluation_failures": list(self.evaluation_failures)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundEvaluation:
        return cls(global_perplexity=data.get("global_perplexity"),
                   federated_perplexity=data.get("federated_perplexity"),
                   site_perplexity=dict(data.get("site_perplexity", {})),
                   evaluation_failures=list(data.get("evaluation_failures", [])))


@dataclass
class RoundRecord:
    """One round of the run; round 0 is the base model, evaluated before any training."""

    round: int
    evaluation: RoundEvaluation = field(default_factory=RoundEvaluation)
    training: RoundTraining | None = None  # None for round 0
    epsilon: dict[str, float] | None = None  # cumulative epsilon per site after the round

    @property
    def participants(self) -> list[str]:
        return self.training.participants if self.training else []

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"round": self.round}
        data.update(self.training.to_json() if self.training else {"participants": []})
        data.update(self.evaluation.to_json())
        if self.epsilon is not None:
            data["epsilon"] = dict(self.epsilon)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundRecord:
        return cls(round=int(data["round"]), evaluation=RoundEvaluation.from_json(data),
                   training=RoundTraining.from_json(data) if "aggregated" in data else None,
                   epsilon=dict(data["epsilon"]) if data.get("epsilon") is not None else None)


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

    @property
    def within_budget(self) -> bool | None:
        return None if self.epsilon_budget is None else self.epsilon <= self.epsilon_budget

    def to_json(self) -> dict[str, Any]:
        data = {"base_perplexity": self.base_perplexity, "final_perplexity": self.final_perplexity,
                "epsilon": self.epsilon, "delta": self.delta, "epsilon_budget": self.epsilon_budget,
                "noise_multiplier": self.noise_multiplier,
                "rounds_participated": list(self.rounds_participated)}
        if self.local_only_perplexity is not None:
            data["local_only_perplexity"] = self.local_only_perplexity
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SiteSummary:
        return cls(base_perplexity=data.get("base_perplexity"),
                   final_perplexity=data.get("final_perplexity"),
                   epsilon=float(data.get("epsilon", 0.0)), delta=data.get("delta"),
                   epsilon_budget=data.get("epsilon_budget"),
                   noise_multiplier=data.get("noise_multiplier"),
                   rounds_participated=[int(r) for r in data.get("rounds_participated", [])],
                   local_only_perplexity=data.get("local_only_perplexity"))


@dataclass
class CentralSummary:
    """The global model on the coordinator's held-out set, before and after the run."""

    base_perplexity: float | None = None
    final_perplexity: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"base_perplexity": self.base_perplexity, "final_perplexity": self.final_perplexity}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CentralSummary:
        return cls(base_perplexity=data.get("base_perplexity"),
                   final_perplexity=data.get("final_perplexity"))


@dataclass
class RunReport:
    """Everything report.json holds: the job, per-round records and per-site outcomes."""

    run_id: str
    config: dict[str, Any]
    base_model: str
    central: CentralSummary = field(default_factory=CentralSummary)
    rounds: list[RoundRecord] = field(default_factory=list)
    sites: dict[str, SiteSummary] = field(default_factory=dict)
    elapsed_s: float | None = None  # wall time of a simulation

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "run_id": self.run_id, "config": self.config, "base_model": self.base_model,
            "central": self.central.to_json(), "rounds": [r.to_json() for r in self.rounds],
            "sites": {name: site.to_json() for name, site in self.sites.items()}}
        if self.elapsed_s is not None:
            data["elapsed_s"] = self.elapsed_s
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunReport:
        return cls(run_id=str(data["run_id"]), config=dict(data.get("config", {})),
                   base_model=str(data.get("base_model", "")),
                   central=CentralSummary.from_json(data.get("central", {})),
                   rounds=[RoundRecord.from_json(r) for r in data.get("rounds", [])],
                   sites={name: SiteSummary.from_json(site)
                          for name, site in data.get("sites", {}).items()},
                   elapsed_s=data.get("elapsed_s"))

    @classmethod
    def read(cls, path: Path) -> RunReport:
        """Load a report.json written by ``write_report``."""
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _change(base: float | None, final: float | None) -> str:
    if not base or final is None:
        return "n/a"
    return f"{100.0 * (final - base) / base:+.1f}%"


def render_markdown(report: RunReport) -> str:
    """A human-readable summary: per-site perplexity and privacy, then round by round."""
    lines = [f"# privatune run {report.run_id}", ""]
    central = report.central
    if central.base_perplexity is not None:
        lines += [f"Global model on the coordinator's held-out set: perplexity "
                  f"{_fmt(central.base_perplexity)} (base) -> "
                  f"{_fmt(central.final_perplexity)} (final), "
                  f"{_change(central.base_perplexity, central.final_perplexity)}.", ""]
    lines += ["## Sites", "",
              "Perplexity is on each site's own held-out split. *Local only* is the same site "
              "training alone with the same privacy budget.", "",
              "| site | base ppl | final global ppl | change | local-only ppl | epsilon | budget | "
              "delta | within budget |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, site in report.sites.items():
        within = site.within_budget
        lines.append(
            f"| {name} | {_fmt(site.base_perplexity)} | {_fmt(site.final_perplexity)} | "
            f"{_change(site.base_perplexity, site.final_perplexity)} | "
            f"{_fmt(site.local_only_perplexity)} | {_fmt(site.epsilon, 3)} | "
            f"{_fmt(site.epsilon_budget)} | {_fmt(site.delta, 8)} | "
            f"{'yes' if within else 'NO' if within is False else 'n/a'} |")
    lines += ["", "## Rounds", "", "| round | global ppl | sites that took part | declined | failures |",
              "|---|---|---|---|---|"]
    for record in report.rounds:
        training = record.training or RoundTraining()
        declined = "; ".join(f"{s}: {r}" for s, r in training.declined.items()) or "-"
        lines.append(f"| {record.round} | {_fmt(record.evaluation.global_perplexity)} | "
                     f"{', '.join(training.participants) or '-'} | {declined} | "
                     f"{len(training.failures)} |")
    lines += ["", "What left each site: the clipped, noised LoRA adapter updates (covered by DP), "
              "and the non-private metrics its policy allows (example counts, losses), all listed "
              "in the site's ledger (`sites/<site>/ledger.jsonl` in a simulation).", "",
              "![perplexity and epsilon per round](report.png)", ""]
    return "\n".join(lines)


def plot_report(report: RunReport, path: Path) -> None:
    """Perplexity (global and per site) and epsilon per site, against the round."""
    rounds = report.rounds
    xs = [r.round for r in rounds]
    with report_figure(path, columns=2, size=(11, 4)) as (ax_ppl, ax_eps):
        if any(r.evaluation.global_perplexity is not None for r in rounds):
            ax_ppl.plot(xs, [r.evaluation.global_perplexity for r in rounds], "k-o",
                        label="global (central)")
        for name in report.sites:
            ax_ppl.plot(xs, [r.evaluation.site_perplexity.get(name) for r in rounds], "--.",
                        label=name)
            eps = [0.0] + [(r.epsilon or {}).get(name) for r in rounds[1:]]
            ax_eps.plot(xs, eps, "-o", label=name)
        budgets = {s.epsilon_budget for s in report.sites.values()} - {None}
        for budget in budgets:
            ax_eps.axhline(budget, color="red", linestyle=":", label=f"budget {budget:g}")
        ax_ppl.set(title="held-out perplexity", xlabel="round", ylabel="perplexity", yscale="log")
        ax_eps.set(title="cumulative epsilon per site", xlabel="round", ylabel="epsilon")
        for axis in (ax_ppl, ax_eps):
            axis.set_xticks(xs)


def write_report(report: RunReport, out_dir: Path) -> None:
    """Write report.json, report.md and report.png into ``out_dir`` (each replaced atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.json", json.dumps(report.to_json(), indent=2, default=str)),
                       ("report.md", render_markdown(report))):
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out_dir / name)
    plot_report(report, out_dir / "report.png")
