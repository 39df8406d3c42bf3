"""The run report: report.json (machine-readable), report.md (people) and its plots, from the
rounds' records (``rounds.py``) and each site's and the coordinator's summaries."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privatune.common.generation import GenerationScores
from privatune.common.lengths import LengthFit
from privatune.common.plots import report_figure
from privatune.common.run_record import RECORD_KEY, SCHEMA_KEY, SCHEMA_VERSION, schema_problem
from privatune.server.overfitting import best_round, overfitting_flags, render_watch
from privatune.server.rounds import RoundRecord, RoundTraining, site_records


FAILURE_LOG = "failures.log"  # beside report.json: each failure's full text, by round
FAILURE_KEYS = ("failures", "evaluation_failures")  # of a round's JSON
REASON_CHARS = 300
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# how Flower wraps what a ClientApp raised: "<class 'ValueError'>:<'...'>" (a SuperNode), with
# Ray's whole chained traceback inside in a simulation
_RAISED = re.compile(r"<class '([^']+)'>:<'(.*)'>\s*$", re.DOTALL)
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)): "
                             r"(.*\S)", re.MULTILINE)
_NODE = re.compile(r"^node \d+: ")


def failure_reason(failure: str) -> str:
    """One line for a failure the report lists, where an error reply may carry hundreds: the
    exception a node raised (the first one a chained traceback names, the cause), after the
    ``node N:`` it came from.

    Flower's simulation passes a ClientApp's exception as Ray's whole chained traceback, and
    report.json is read by people and tools that need the reason, not the frames; the full
    text goes to ``FAILURE_LOG``.
    """
    text = _ANSI.sub("", failure).strip()
    wrapped = _RAISED.search(text)
    if wrapped or "\n" in text:
        node = _NODE.match(text)
        head = text[:wrapped.start()] if wrapped else node.group(0) if node else ""
        body = wrapped.group(2) if wrapped else text
        cause = next((m for m in _EXCEPTION_LINE.finditer(body)
                      if not m.group(1).endswith("ClientAppException")), None)
        last = ([line for line in body.splitlines() if line.strip()] or [""])[-1]
        if cause is not None:
            reason = f"{cause.group(1).rsplit('.', 1)[-1]}: {cause.group(2)}"
        elif "Message: " in body:
            reason = body.rsplit("Message: ", 1)[1]
        elif wrapped:
            reason = f"{wrapped.group(1).rsplit('.', 1)[-1]}: {last}"
        else:
            reason = last
        text = head + reason.strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= REASON_CHARS else line[:REASON_CHARS - 3] + "..."


def _failures(record: RoundRecord) -> list[tuple[str, str]]:
    """A round's failures, each with the exchange it failed in."""
    training = record.training.failures if record.training else []
    return ([("training", f) for f in training]
            + [("evaluation", f) for f in record.evaluation.evaluation_failures])


def failure_log(rounds: list[RoundRecord]) -> str:
    """The full text of every failure the report shortened, by round; empty when none was."""
    return "\n".join(f"round {record.round} ({phase}): {failure}\n" for record in rounds
                     for phase, failure in _failures(record) if failure_reason(failure) != failure)


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
    base_model_description: str = ""  # its name, size and source (common/base_model.py)
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
    if report.base_model_description:
        lines += [f"Base model: {report.base_model_description}.", ""]
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
    records = site_records(report.rounds)
    if records:
        lines += ["", "Ledger heads the sites reported (the last one; `privatune audit LEDGER --run "
                  "report.json` checks a site's ledger still holds every one, and lists every "
                  "update received):", "",
                  "| site | last head (entry, hash) | heads reported | updates received |",
                  "|---|---|---|---|"]
        for name, record in records.items():
            last = record.heads[-1] if record.heads else None
            shown = f"{last.seq}, {last.hash[:16]}..." if last else "none"
            lines.append(f"| {name} | {shown} | {len(record.heads)} | {len(record.received)} |")
    lines += ["", "## Rounds", "", "| round | global ppl | sites that took part | declined | failures |",
              "|---|---|---|---|---|"]
    for record in report.rounds:
        training = record.training or RoundTraining()
        declined = "; ".join([f"{s}: {r}" for s, r in training.declined.items()]
                             + [f"{s} (evaluation): {r}"
                                for s, r in record.evaluation.evaluation_declined.items()]) or "-"
        lines.append(f"| {record.round} | {_fmt(record.evaluation.global_perplexity)} | "
                     f"{', '.join(training.participants) or '-'} | {declined} | "
                     f"{len(training.failures)} |")
    lines += failure_lines(report)
    lines += [""] + traffic_lines(report)
    lines += render_watch(report.rounds)
    lines += ["What left each site: the clipped, noised LoRA adapter updates (covered by DP), "
              "and the non-private metrics its policy allows (example counts, losses, generation "
              "scores), all listed in the site's ledger (`sites/<site>/ledger.jsonl` in a "
              "simulation).", "",
              "![perplexity and epsilon per round](report.png)", ""]
    lines += generation_lines(report)
    return "\n".join(lines)


def failure_lines(report: RunReport) -> list[str]:
    """Each round's failures in report.md, one line each (``failure_reason``)."""
    lines = [f"- round {record.round} ({phase}): {failure_reason(failure)}"
             for record in report.rounds for phase, failure in _failures(record)]
    if not lines:
        return []
    full = f"; the full error texts are in `{FAILURE_LOG}`" if failure_log(report.rounds) else ""
    return ["", f"Failures (no reply, an error reply, or a rejected update){full}:", "", *lines]


def traffic_lines(report: RunReport) -> list[str]:
    """The Traffic section of report.md: adapter bytes of each round's train exchange."""
    rounds = [r for r in report.rounds if r.training is not None and r.training.bytes_sent is not None]
    if not rounds:
        return []
    aggregation = report.config.get("federation", {}).get("aggregation", "fedavg")
    sent = ("B only (lora_A stays frozen at the run's seeded initialisation)"
            if aggregation == "ffa" else "both LoRA factors")
    lines = ["## Traffic", "",
             f"Aggregation `{aggregation}`: each site's update carries {sent}. Bytes of LoRA tensors "
             "(float32 on the wire) per round: the global adapter (A and B) to every node asked, "
             "and the updates back.", "",
             "| round | to nodes | from sites | per site update |", "|---|---|---|---|"]
    for record in rounds:
        training = record.training
        per_site = ", ".join(f"{s} {b}" for s, b in sorted(training.update_bytes.items())) or "-"
        lines.append(f"| {record.round} | {_fmt(training.bytes_sent)} | "
                     f"{_fmt(training.bytes_received)} | {per_site} |")
    return lines + [""]


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


GENERATION_PLOT = "report_generation.png"
SAMPLE_CHARS = 600  # of a prompt's end and a reference's start shown in report.md


def _scores(scores: GenerationScores | None) -> str:
    """ROUGE-L | BLEU | chrF cells of a table row."""
    if scores is None:
        return "n/a | n/a | n/a"
    return f"{scores.rouge_l:.3f} | {scores.bleu:.1f} | {scores.chrf:.1f}"


def _cut_off(scores: GenerationScores | None) -> str:
    """The completions max_new_tokens cut off, of all, e.g. "3 of 8"."""
    if scores is None or scores.cut_off is None:
        return "n/a"
    return f"{scores.cut_off} of {_fmt(scores.examples)}"


def _against(value: float | None, baseline: float | None, checked: int | None) -> str:
    """An accuracy against its trivial baseline, over ``checked`` checks where released."""
    if value is None:
        return "n/a"
    text = f"{value:.2f} vs {_fmt(baseline)}"
    return text if checked is None else f"{text} ({checked})"


def _clinical(scores: GenerationScores | None) -> str:
    """ROUGE-L | fidelity | status accuracy | derivable status accuracy | repeat-4gram cells."""
    rouge = "n/a" if scores is None else f"{scores.rouge_l:.3f}"
    clinical = None if scores is None else scores.clinical
    if clinical is None:
        return " | ".join([rouge] + ["n/a"] * 4)
    fidelity = _fmt(clinical.measurement_fidelity)
    if clinical.measurement_fidelity is not None and clinical.measurements_checked is not None:
        fidelity += f" ({clinical.measurements_checked})"
    return " | ".join([
        rouge, fidelity,
        _against(clinical.status_accuracy, clinical.status_majority_share,
                 clinical.statuses_checked),
        _against(clinical.derivable_status_accuracy, clinical.derivable_status_majority_share,
                 clinical.derivable_statuses_checked),
        _fmt(clinical.repeat_4gram)])


def clinical_lines(report: RunReport) -> list[str]:
    """The clinical accuracy table of report.md: what the completions assert, beside ROUGE-L,
    each accuracy against the share a constant answer gets (the baseline it has to beat)."""
    central = report.central
    rows: list[tuple[str, str, GenerationScores | None]] = []
    if central.base_generation is not None or central.final_generation is not None:
        rows += [("coordinator", "base", central.base_generation),
                 ("coordinator", "final global", central.final_generation)]
    for name, site in report.sites.items():
        rows += [(name, "base", site.base_generation), (name, "final global", site.final_generation)]
        if site.local_only_generation is not None:
            rows.append((name, "local only", site.local_only_generation))
    if not any(scores is not None and scores.clinical is not None for _, _, scores in rows):
        return []
    return ["", "Clinical accuracy of the same completions: *fidelity* is the share of the "
            "measurements a completion restates from its prompt that carry the prompt's value; "
            "*status* the share of the reference's control statuses (by problem) it states the "
            "same, *vs* the majority share (always answering the most common status); "
            "*derivable* only the statuses that follow from the prompt (hypertension from its "
            "BP); *repeat-4gram* the share of repeated 4-grams of words and punctuation marks "
            "(clinosim's own references score about 0.24; near 1 is a loop). In brackets: the "
            "checks pooled, where released.",
            "", "| set | model | ROUGE-L | fidelity | status vs majority | derivable vs majority "
            "| repeat-4gram |", "|---|---|---|---|---|---|---|",
            *[f"| {name} | {label} | {_clinical(scores)} |" for name, label, scores in rows]]


def _fenced(text: str) -> list[str]:
    """``text`` as a fenced block whatever backticks it holds (the fence is longer than any run)."""
    if not text.strip():
        return ["*(no text: the model stopped at once or wrote only whitespace)*"]
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", text, fence]


def generation_lines(report: RunReport) -> list[str]:
    """The generation section of report.md: per-site scores beside perplexity, the central
    scores per round, and sample completions from the coordinator's own held-out set."""
    central = report.central
    rounds = [r for r in report.rounds if r.evaluation.global_generation is not None
              or r.evaluation.site_generation]
    sites_scored = any(getattr(site, name) is not None for site in report.sites.values()
                       for name in GENERATION_FIELDS)
    if not rounds and not sites_scored:
        return []
    settings = report.config.get("evaluation", {})
    marker = settings.get("marker", "Assessment:")
    lines = ["## Generation", "",
             f"The model as a writer of notes: each held-out note is split at `{marker}` (the "
             "prompt is the history and findings up to and including it, the reference is what "
             "follows); a record with its own prompt and completion is used as it is. The model "
             f"completes the first {settings.get('max_examples', 'n/a')} prompts of each held-out "
             f"set by greedy decoding (at most {settings.get('max_new_tokens', 'n/a')} new tokens), "
             "and its text is scored against the reference: ROUGE-L F1 (0 to 1, `rouge-score`), "
             "BLEU and chrF (0 to 100, `sacrebleu`). Higher is better.", ""]
    if central.generation_tasks is not None:
        skipped = ", ".join(f"{n} {reason}" for reason, n in central.generation_skipped.items() if n)
        lines += [f"Coordinator's held-out set: {central.generation_tasks} notes make a task"
                  + (f" (skipped: {skipped})" if skipped else "") + "."]
    if central.lengths is not None:
        lines += ["", f"Lengths on the coordinator's set: {central.lengths.summary()}"]
    if central.base_generation is not None or central.final_generation is not None:
        lines += ["", "| coordinator's held-out set | ppl | ROUGE-L | BLEU | chrF | cut off |",
                  "|---|---|---|---|---|---|",
                  f"| base model | {_fmt(central.base_perplexity)} | {_scores(central.base_generation)} "
                  f"| {_cut_off(central.base_generation)} |",
                  f"| final global model | {_fmt(central.final_perplexity)} | "
                  f"{_scores(central.final_generation)} | {_cut_off(central.final_generation)} |",
                  "", "*Cut off*: completions that used all max_new_tokens without ending."]
    if report.sites:
        lines += ["", "Per site, on its own held-out notes (aggregates the site released; *n/a*: "
                  "withheld by its policy, `release.generation_scores: false`, or no held-out note "
                  "with the marker):", "",
                  "| site | model | ppl | ROUGE-L | BLEU | chrF |", "|---|---|---|---|---|---|"]
        for name, site in report.sites.items():
            for label, ppl, scores in (
                    ("base", site.base_perplexity, site.base_generation),
                    ("final global", site.final_perplexity, site.final_generation),
                    ("local only", site.local_only_perplexity, site.local_only_generation)):
                if label != "local only" or ppl is not None or scores is not None:
                    lines.append(f"| {name} | {label} | {_fmt(ppl)} | {_scores(scores)} |")
    lines += clinical_lines(report)
    if rounds:
        lines += ["", "Central scores per round:", "", "| round | ROUGE-L | BLEU | chrF |",
                  "|---|---|---|---|"]
        for record in rounds:
            lines.append(f"| {record.round} | {_scores(record.evaluation.global_generation)} |")
        lines += ["", f"![generation scores per round]({GENERATION_PLOT})"]
    if central.samples:
        lines += ["", "### Sample completions (the coordinator's own held-out set)", ""]
        for number, sample in enumerate(central.samples, start=1):
            prompt = sample.prompt if len(sample.prompt) <= SAMPLE_CHARS else \
                "..." + sample.prompt[-SAMPLE_CHARS:]
            reference = sample.reference if len(sample.reference) <= SAMPLE_CHARS else \
                sample.reference[:SAMPLE_CHARS] + "..."
            lines += [f"**Sample {number}.** Prompt:", "", *_fenced(prompt), "", "Reference:", "",
                      *_fenced(reference), "", "Base model:", "", *_fenced(sample.base), "",
                      "Final global model:", "", *_fenced(sample.final), ""]
    return lines + [""]


def plot_generation(report: RunReport, path: Path) -> None:
    """The central ROUGE-L, BLEU and chrF per generation round (sites' ROUGE-L dashed)."""
    rounds = [r for r in report.rounds if r.evaluation.global_generation is not None
              or r.evaluation.site_generation]
    xs = [r.round for r in rounds]
    with report_figure(path, columns=2, size=(11, 4)) as (ax_rouge, ax_bleu):
        central = [r.evaluation.global_generation for r in rounds]
        if any(c is not None for c in central):
            ax_rouge.plot(xs, [c.rouge_l if c else None for c in central], "k-o",
                          label="global (central)")
            ax_bleu.plot(xs, [c.bleu if c else None for c in central], "-o", label="BLEU (central)")
            ax_bleu.plot(xs, [c.chrf if c else None for c in central], "-s", label="chrF (central)")
        for name in report.sites:
            values = [r.evaluation.site_generation.get(name) for r in rounds]
            if any(v is not None for v in values):
                ax_rouge.plot(xs, [v.rouge_l if v else None for v in values], "--.", label=name)
        ax_rouge.set(title="ROUGE-L F1 of greedy completions", xlabel="round", ylabel="ROUGE-L")
        ax_bleu.set(title="BLEU and chrF, coordinator's held-out set", xlabel="round",
                    ylabel="score (0-100)")
        for axis in (ax_rouge, ax_bleu):
            axis.set_xticks(xs)


def write_report(report: RunReport, out_dir: Path) -> None:
    """Write report.json, report.md, report.png and, when a failure was shortened,
    ``FAILURE_LOG`` into ``out_dir`` (each replaced atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [("report.json", json.dumps(report.to_json(), indent=2, default=str)),
             ("report.md", render_markdown(report))]
    if log := failure_log(report.rounds):
        files.append((FAILURE_LOG, log))
    for name, text in files:
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out_dir / name)
    plot_report(report, out_dir / "report.png")
    if any(r.evaluation.global_generation or r.evaluation.site_generation for r in report.rounds):
        plot_generation(report, out_dir / GENERATION_PLOT)
