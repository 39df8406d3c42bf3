"""``privatune study``: what each site's privacy budget costs in utility, in one command.

The same job (same config, same seeds) in four settings, at each ε and without privacy:

- *federated*: the normal ``privatune simulate`` run, every site training with DP-SGD;
- *local-only*: each site training alone with the same rounds, steps and budget (the
  simulation's local-only baselines, from the same runs);
- *pooled*: every site's training records in one place, trained without DP for as many
  optimizer steps of the same batch size as one site takes in the whole run: the upper bound
  no hospital may run (non-private column only);
- *nearest-note*: no training; each prompt answered with the assessment of the training note
  whose prompt shares the most words with it (non-private column only: it copies a note).

Every federation is its own ``privatune simulate`` process (one run's memory and Flower engine
never leak into the next); the pooled training and the copy run in this process. Whatever finished under ``--out`` is reused, so an interrupted study
resumes; a run that fails is recorded with its reason and the study goes on. The job's
hyperparameters are used as the config gives them: nothing is tuned, on a site's held-out
split or anywhere else.

A seed is the job's ``seed``: it changes the base model (the builtin one is pretrained under
it), the simulated hospitals, their splits and the initial adapter. The DP noise and Poisson
sampling come from each site's own secret randomness whatever the seed. Seeds run one after
the other, all the runs of a seed together: the hospital cache holds one seed's hospitals at a
time.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import secrets
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privatune.common.config import ConfigError, load_job_config, parse_override
from privatune.simulations.loopback import privatune

if TYPE_CHECKING:
    from privatune.common.config import JobConfig
    from privatune.common.generation import GenerationScores
    from privatune.server.report import RunReport

FEDERATED, LOCAL_ONLY, POOLED, NEAREST_NOTE = "federated", "local-only", "pooled", "nearest-note"
SETTINGS = (FEDERATED, LOCAL_ONLY, POOLED, NEAREST_NOTE)
SETTING_LABELS = {FEDERATED: "federated (DP FedAvg)", LOCAL_ONLY: "each site alone",
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
              "evaluation.every_k_rounds")
ATTEMPTS = 2  # a simulation whose process dies (Ray's workers on a loaded machine) runs again


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
    plan = StudyPlan(config=config, out=out, epsilons=tuple(sorted(epsilons)),
                     seeds=tuple(base.seed + i for i in range(seeds)),
                     other_seeds=tuple(base.seed + i for i in range(other_seeds)),
                     extra=tuple(extra), rounds=base.federation.rounds)
    for budget in plan.budgets:
        for seed in plan.seeds_of(budget):
            plan.job(budget, seed)
    return plan


# --------------------------------------------------------------------------- measurements


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
    noise_multiplier: float | None = None  # mean over the sites; 0 when pooled

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Measurement:
        return cls(setting=str(data["setting"]), budget=str(data["budget"]), seed=int(data["seed"]),
                   central=Scores.from_json(data.get("central")),
                   sites=Scores.from_json(data.get("sites")),
                   sites_scored=tuple(data.get("sites_scored", ())),
                   noise_multiplier=data.get("noise_multiplier"))


@dataclass(frozen=True)
class RunRecord:
    """One run of the study: a simulation (federated and local-only), a pooled training or a
    nearest-note copy; its wall time, whether it was reused from an earlier study, or why it
    failed."""

    kind: str  # "simulate", POOLED or NEAREST_NOTE
    budget: str
    seed: int
    directory: str
    overrides: tuple[str, ...] = ()
    wall_s: float | None = None
    reused: bool = False
    failure: str | None = None


def federated_measurements(report: RunReport, budget: Budget, seed: int) -> list[Measurement]:
    """The federated and the local-only measurements of one finished simulation. A site counts
    in the sites' average where it released generation scores."""
    noise = _mean(site.noise_multiplier for site in report.sites.values())
    federated = {name: Scores.of(site.final_generation, site.final_perplexity)
                 for name, site in sorted(report.sites.items()) if site.final_generation}
    alone = {name: Scores.of(site.local_only_generation, site.local_only_perplexity)
             for name, site in sorted(report.sites.items()) if site.local_only_generation}
    central = Scores.of(report.central.final_generation, report.central.final_perplexity)
    return [Measurement(FEDERATED, budget.key, seed, central, Scores.mean(list(federated.values())),
                        tuple(federated), noise),
            Measurement(LOCAL_ONLY, budget.key, seed, None, Scores.mean(list(alone.values())),
                        tuple(alone), noise)]


# --------------------------------------------------------------------------- one seed's notes


@dataclass(frozen=True)
class SeedData:
    """One seed's notes as the pooled training and the copy need them, written once under
    ``<out>/data/seed-N`` (so later seeds' hospitals in the cache cannot change them)."""

    train: Path  # every site's training split, pooled (JSONL)
    central: Path  # the coordinator's held-out notes (JSONL)
    heldout: dict[str, Path]  # site -> its held-out split (JSONL)


def seed_data(job: JobConfig, directory: Path) -> SeedData:
    """The seed's notes, split as the simulation's sites split them; reused when written."""
    from privatune.client.data import collapse_duplicates, load_records, split_records
    from privatune.common.config import to_dict
    from privatune.simulations.hospitals import generate_federation
    from privatune.simulations.runner import job_hospitals, write_central_eval

    done = directory / "complete.json"
    if done.is_file():
        names = json.loads(done.read_text(encoding="utf-8"))["sites"]
        return SeedData(directory / "train.jsonl", directory / "central_eval.jsonl",
                        {name: directory / "heldout" / f"{name}.jsonl" for name in names})
    sites, coordinator, cache = job_hospitals(job)  # as simulate() makes them
    exports = generate_federation([*sites, coordinator], cache)
    (directory / "heldout").mkdir(parents=True, exist_ok=True)
    central = write_central_eval(exports[coordinator.name], directory / "central_eval.jsonl")
    pooled, heldout = [], {}
    for spec in sites:
        records, _ = collapse_duplicates(load_records(exports[spec.name], "fhir"))
        # as the site's policy splits them (runner.write_site_policy, client.node.SiteNode)
        train, held = split_records(records, job.data.heldout_fraction, job.seed)
        pooled += train
        heldout[spec.name] = _write_records(held, directory / "heldout" / f"{spec.name}.jsonl")
    data = SeedData(_write_records(pooled, directory / "train.jsonl"), central, heldout)
    done.write_text(json.dumps({"sites": list(heldout), "config": to_dict(job)}), encoding="utf-8")
    return data


def _write_records(records: Sequence[Any], path: Path) -> Path:
    """Records as JSONL a node reads back the same (text or prompt + completion, patient)."""
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            row = ({"prompt": record.prompt, "completion": record.completion} if record.prompt
                   else {"text": record.completion})
            if record.patient_id is not None:
                row["patient_id"] = record.patient_id
            handle.write(json.dumps(row) + "\n")
    return path


def _min_records() -> int:
    """The fewest held-out records a simulated site releases a score over (its policy's
    default release.min_records): pooled and copy are averaged over the same sites."""
    from privatune.client.policy import ReleaseSection

    return ReleaseSection().min_records


# --------------------------------------------------------------------------- pooled, copy


def pooled_measurement(job: JobConfig, data: SeedData) -> Measurement:
    """All sites' training records in one place, trained without DP noise: ``rounds`` times
    ``local_steps`` DP-SGD steps of the job's batch size at noise multiplier 0 (per-sample
    clipping stays, as at every site), restarting Adam every ``local_steps`` as a site's rounds
    do; then scored like the global model, centrally and on every site's held-out split."""
    from privatune.client.data import load_records
    from privatune.client.node import privacy_units
    from privatune.client.trainer import DPTrainSettings, train_dp_round
    from privatune.common.model_source import resolve_base_model
    from privatune.common.examples import encode_pairs
    from privatune.common.hardware import resolve_hardware
    from privatune.common.lora import attach_seeded_lora, load_base_model, lora_state, train_factors
    from privatune.server.evaluation import CentralEvaluator

    model_dir = resolve_base_model(job.model, job.seed)
    hardware = resolve_hardware(job.model.device, job.model.dtype, where="model")
    base, tokenizer = load_base_model(model_dir, hardware.device, hardware.dtype)
    model = attach_seeded_lora(base, job.lora, job.seed)
    train_factors(model, job.federation.aggregation)
    units = privacy_units(load_records(data.train, "jsonl"), job.privacy.unit, job.loss_marker)
    dataset = encode_pairs(tokenizer, units, job.model.max_length)
    training = job.training
    for _ in range(job.federation.rounds):
        train_dp_round(model, dataset, DPTrainSettings(
            noise_multiplier=0.0, max_grad_norm=training.max_grad_norm,
            expected_batch_size=training.batch_size, steps=training.local_steps,
            learning_rate=training.learning_rate, seed=secrets.randbits(63),
            max_physical_batch_size=training.max_physical_batch_size,
            gradient_checkpointing=training.gradient_checkpointing))
    state = lora_state(model)

    def scored(path: Path, minimum: int = 0) -> Scores | None:
        evaluator = CentralEvaluator(model, tokenizer, path, job.model.max_length,
                                     training.eval_batch_size, job.evaluation.marker,
                                     job.loss_marker)
        tasks = evaluator.tasks.tasks[:job.evaluation.max_examples]
        if len(tasks) < minimum or evaluator.tasks.records < minimum:
            return None  # a site would release no score over so few notes
        generation = evaluator.generation(state, job.evaluation.max_new_tokens,
                                          job.evaluation.max_examples)
        return Scores.of(generation[0] if generation else None, evaluator.perplexity(state))

    return _measured_on_every_set(POOLED, job, data, scored, noise_multiplier=0.0)


def nearest_note_measurement(job: JobConfig, data: SeedData) -> Measurement:
    """The nearest-note copy scored like a model: each copy cut to ``max_new_tokens`` tokens
    of the base model's tokenizer, the length a model's completion may have."""
    from transformers import AutoTokenizer

    from privatune.common.model_source import resolve_base_model
    from privatune.common.generation import generation_tasks, score_completions
    from privatune.server.evaluation import read_eval_pairs
    from privatune.simulations.nearest_note import nearest_references

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_base_model(job.model, job.seed)),
                                              local_files_only=True)
    marker, limit = job.evaluation.marker, job.evaluation.max_new_tokens
    train = [(t.prompt, t.reference)
             for t in generation_tasks(read_eval_pairs(data.train), marker).tasks]

    def cut(text: str) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:limit]
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    def scored(path: Path, minimum: int = 0) -> Scores | None:
        pairs = read_eval_pairs(path)
        tasks = generation_tasks(pairs, marker).tasks[:job.evaluation.max_examples]
        if not tasks or len(tasks) < minimum or len(pairs) < minimum:
            return None
        prompts = [t.prompt for t in tasks]
        copies = [cut(text) for text in nearest_references(train, prompts)]
        return Scores.of(score_completions(copies, [t.reference for t in tasks], prompts))

    return _measured_on_every_set(NEAREST_NOTE, job, data, scored, noise_multiplier=None)


def _measured_on_every_set(setting: str, job: JobConfig, data: SeedData,
                           scored: Callable[[Path, int], Scores | None],
                           noise_multiplier: float | None) -> Measurement:
    """A setting scored on the coordinator's notes and on each site's held-out split, the
    sites averaged over those with enough notes for a site to release a score."""
    sites = {name: scored(path, _min_records()) for name, path in data.heldout.items()}
    kept = {name: s for name, s in sites.items() if s is not None}
    return Measurement(setting, NON_PRIVATE.key, job.seed, scored(data.central, 0),
                       Scores.mean(list(kept.values())), tuple(kept), noise_multiplier)


# --------------------------------------------------------------------------- summaries


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


@dataclass(frozen=True)
class ScoreSpreads:
    """``Scores`` over seeds, figure by figure."""

    rouge_l: Spread | None = None
    status_accuracy: Spread | None = None
    status_majority_share: Spread | None = None
    derivable_status_accuracy: Spread | None = None
    measurement_fidelity: Spread | None = None
    repeat_4gram: Spread | None = None
    perplexity: Spread | None = None

    @classmethod
    def of(cls, scores: Sequence[Scores | None]) -> ScoreSpreads | None:
        known = [s for s in scores if s is not None]
        if not known:
            return None
        return cls(**{f.name: Spread.of([getattr(s, f.name) for s in known])
                      for f in fields(Scores)})


@dataclass(frozen=True)
class Cell:
    """One setting in one column, over its seeds; the failures of its runs, one line each."""

    setting: str
    budget: str
    seeds: tuple[int, ...]  # seeds measured
    central: ScoreSpreads | None
    sites: ScoreSpreads | None
    noise_multiplier: Spread | None
    failures: tuple[str, ...] = ()


def summarise(plan: StudyPlan, measurements: Sequence[Measurement],
              runs: Sequence[RunRecord]) -> list[Cell]:
    """One cell per setting and column it runs in, in table order."""
    cells = []
    for setting in SETTINGS:
        for budget in plan.budgets:
            if setting in (POOLED, NEAREST_NOTE) and budget != NON_PRIVATE:
                continue
            found = [m for m in measurements if m.setting == setting and m.budget == budget.key]
            kinds = {"simulate"} if setting in (FEDERATED, LOCAL_ONLY) else {setting}
            failures = tuple(f"seed {r.seed}: {r.failure}" for r in runs
                             if r.failure and r.budget == budget.key and r.kind in kinds)
            cells.append(Cell(setting, budget.key, tuple(m.seed for m in found),
                              ScoreSpreads.of([m.central for m in found]),
                              ScoreSpreads.of([m.sites for m in found]),
                              Spread.of([m.noise_multiplier for m in found]), failures))
    return cells


def _cell(cell: Cell, pick: Callable[[Cell], Spread | None], digits: int) -> str:
    """A table cell: the figure over the seeds measured, and how many runs failed."""
    spread = pick(cell)
    if spread is None:
        return "failed" if cell.failures and not cell.seeds else "n/a"
    failed = f" ({len(cell.failures)} failed)" if cell.failures else ""
    return spread.text(digits) + failed


def _spread(scores: str, name: str) -> Callable[[Cell], Spread | None]:
    """Picks one figure (``name``) of a cell's ``central`` or ``sites`` spreads."""
    def pick(cell: Cell) -> Spread | None:
        spreads = getattr(cell, scores)
        return getattr(spreads, name) if spreads is not None else None
    return pick


def _grid(plan: StudyPlan, cells: Sequence[Cell], pick: Callable[[Cell], Spread | None],
          digits: int) -> list[str]:
    """Rows: settings; columns: the ε, then non-private."""
    by_key = {(c.setting, c.budget): c for c in cells}
    lines = ["| setting | " + " | ".join(b.label for b in plan.budgets) + " |",
             "|---|" + "---|" * len(plan.budgets)]
    for setting in SETTINGS:
        lines.append(f"| {SETTING_LABELS[setting]} | " + " | ".join(
            _cell(by_key[(setting, b.key)], pick, digits) if (setting, b.key) in by_key else "–"
            for b in plan.budgets) + " |")
    return lines


def majority_share(cells: Sequence[Cell]) -> Spread | None:
    """The accuracy of always answering the most common status, over every cell (the
    references, so the share, are the same whatever the setting)."""
    return Spread.of([c.sites.status_majority_share.mean for c in cells
                      if c.sites is not None and c.sites.status_majority_share is not None])


def render_markdown(plan: StudyPlan, cells: Sequence[Cell], runs: Sequence[RunRecord],
                    command: str, wall_s: float) -> str:
    """study.md: ROUGE-L and status accuracy by setting and ε, the other figures, the notes
    and every failed run."""
    seed_text = "; ".join(f"{b.label}: {', '.join(map(str, plan.seeds_of(b)))}"
                          for b in plan.budgets)
    reused = sum(r.reused for r in runs)
    run_time = sum(r.wall_s or 0.0 for r in runs)
    overrides = f", with `--set {' '.join(plan.extra)}`" if plan.extra else ""
    header = (f"Command: `{command}`: {wall_s:.0f} s wall clock ({len(runs)} runs, "
              f"{run_time:.0f} s between them; {reused} of them reused from an earlier "
              f"invocation). Config: `{plan.config}`{overrides}.")
    scope = (f"Seeds: {seed_text}. A cell is the mean over its seeds, ± the sample standard "
             "deviation where there are several. Scored on each site's own held-out notes (the "
             "first `evaluation.max_examples` of them), averaged over the sites: the one set "
             "every setting is scored on (a site scores its local-only model on its own split "
             "only).")
    lines = ["# Privacy–utility study", "", header, "", scope, "",
             "## ROUGE-L", "", *_grid(plan, cells, _spread("sites", "rouge_l"), 3), "",
             "## Status accuracy", "",
             *_grid(plan, cells, _spread("sites", "status_accuracy"), 2)]
    majority = majority_share(cells)
    if majority is not None:
        lines += ["", (f"Always answering the most common status scores {majority.mean:.2f}: "
                       "the bar an accuracy has to beat.")]
    columns = ("setting", "column", "seeds", "ROUGE-L central", "status accuracy central",
               "derivable status accuracy", "measurement fidelity", "repeat-4gram",
               "perplexity central", "perplexity sites", "noise multiplier")
    lines += ["", "## Other figures", "",
              ("Central: the coordinator's own held-out notes (the local-only models are not "
               "scored there); the rest on the sites' held-out notes as above."), "",
              "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    labels = {b.key: b.label for b in plan.budgets}
    for cell in cells:
        figures = [_cell(cell, _spread("central", "rouge_l"), 3),
                   _cell(cell, _spread("central", "status_accuracy"), 2),
                   _cell(cell, _spread("sites", "derivable_status_accuracy"), 2),
                   _cell(cell, _spread("sites", "measurement_fidelity"), 2),
                   _cell(cell, _spread("sites", "repeat_4gram"), 2),
                   _cell(cell, _spread("central", "perplexity"), 1),
                   _cell(cell, _spread("sites", "perplexity"), 1),
                   _cell(cell, lambda c: c.noise_multiplier, 3)]
        lines.append(f"| {SETTING_LABELS[cell.setting]} | {labels[cell.budget]} | "
                     f"{len(cell.seeds)} | " + " | ".join(figures) + " |")
    lines += ["", "## What the rows are", "", *notes(plan)]
    failed = [(c, f) for c in cells for f in c.failures]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {SETTING_LABELS[c.setting]}, {labels[c.budget]}, {f}" for c, f in failed]
    return "\n".join(lines) + "\n"


def notes(plan: StudyPlan) -> list[str]:
    """What each row and column means, for study.md and study.json."""
    non_private = " --set ".join(NON_PRIVATE_OVERRIDES)
    return [
        (f"- **{SETTING_LABELS[FEDERATED]}**: `privatune simulate` with the config as it is, "
         f"every site training with DP-SGD under its ε over {plan.rounds} rounds; the final "
         "global model."),
        (f"- **{SETTING_LABELS[LOCAL_ONLY]}**: each site's local-only baseline from the same "
         "simulation (the same rounds, steps and budget, never averaged), scored on its own "
         "held-out notes."),
        (f"- **{SETTING_LABELS[POOLED]}**: every site's training split in one place (the upper "
         "bound no hospital may run), trained for as many steps of the same expected batch size "
         "as one site takes in the whole run (rounds × local steps, Adam restarted each round as "
         "at a site) with noise multiplier 0; per-sample clipping at `training.max_grad_norm` "
         "stays."),
        (f"- **{SETTING_LABELS[NEAREST_NOTE]}**: no training; each prompt answered with the "
         "assessment of the pooled training note whose prompt has the most words in common "
         "(Jaccard of lowercase word sets), cut to `evaluation.max_new_tokens` tokens as a "
         "model's completion is. It copies a note, so it stands in the non-private column."),
        (f"- **non-private**: the same job with `--set {non_private}`: a site's DP-SGD cannot "
         "be switched off, so its noise is calibrated to the highest ε a job accepts, without "
         "a floor (see the noise multiplier column)."),
        ("- Hyperparameters are the config's, the same in every cell; none is tuned, on a "
         "site's held-out split or elsewhere. A seed changes the base model, the hospitals, "
         "their splits and the initial adapter; the DP noise and sampling are each site's own "
         "randomness."),
    ]


def draw_plot(plan: StudyPlan, cells: Sequence[Cell], path: Path) -> None:
    """study.png: ROUGE-L and status accuracy (sites' held-out notes) against ε, one line per
    setting (± sd as error bars), non-private at the right, the copy as a dashed line."""
    from privatune.common.plots import report_figure

    budgets = plan.budgets
    by_key = {(c.setting, c.budget): c for c in cells}
    panels = (("rouge_l", "ROUGE-L"), ("status_accuracy", "status accuracy"))
    with report_figure(path, columns=2, size=(11, 4.5)) as axes:
        for axis, (name, title) in zip(axes, panels):
            pick = _spread("sites", name)
            # each line a little to the side, so equal figures and their error bars stay visible
            for setting, marker, shift in ((FEDERATED, "o", -0.04), (LOCAL_ONLY, "s", 0.0),
                                           (POOLED, "D", 0.04)):
                points = [(x + shift, pick(by_key[(setting, b.key)]))
                          for x, b in enumerate(budgets) if (setting, b.key) in by_key]
                points = [(x, s) for x, s in points if s is not None]
                if points:
                    axis.errorbar([x for x, _ in points], [s.mean for _, s in points],
                                  yerr=[s.sd for _, s in points], marker=marker, capsize=3,
                                  label=SETTING_LABELS[setting])
            copy = by_key.get((NEAREST_NOTE, NON_PRIVATE.key))
            if copy is not None and pick(copy) is not None:
                axis.axhline(pick(copy).mean, linestyle="--", color="grey",
                             label=SETTING_LABELS[NEAREST_NOTE])
            majority = majority_share(cells)
            if name == "status_accuracy" and majority is not None:
                axis.axhline(majority.mean, linestyle=":", color="black",
                             label="always the most common status")
            top = axis.get_ylim()[1]
            if top > 0:  # the scores start at 0; a figure of 0 is drawn whole, not cut in half
                axis.set_ylim(-0.04 * top, top)
            axis.set_xticks(range(len(budgets)), [b.label for b in budgets])
            axis.set_xlabel("each site's privacy budget")
            axis.set_title(f"{title} (sites' held-out notes)", fontsize=9)


# --------------------------------------------------------------------------- the runs


@dataclass
class Study:
    """Everything study.json holds."""

    command: str
    config: str
    overrides: tuple[str, ...]
    epsilons: tuple[float, ...]
    seeds: dict[str, tuple[int, ...]]  # column -> its seeds
    runs: list[RunRecord] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def write_outputs(plan: StudyPlan, study: Study) -> None:
    """study.json, study.md and study.png under --out (rewritten after every run)."""
    study.cells = summarise(plan, study.measurements, study.runs)
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "study.json").write_text(json.dumps(asdict(study), indent=2, ensure_ascii=False),
                                         encoding="utf-8")
    (plan.out / "study.md").write_text(render_markdown(plan, study.cells, study.runs,
                                                       study.command, study.wall_s),
                                       encoding="utf-8")
    draw_plot(plan, study.cells, plan.out / "study.png")


def simulation_dir(plan: StudyPlan, budget: Budget, seed: int) -> Path:
    return plan.out / FEDERATED / budget.key / f"seed-{seed}"


def in_process_dir(plan: StudyPlan, kind: str, seed: int) -> Path:
    return plan.out / kind / f"seed-{seed}"


def data_dir(plan: StudyPlan, seed: int) -> Path:
    return plan.out / "data" / f"seed-{seed}"


def _dotted(config: dict[str, Any]) -> dict[str, str]:
    """A nested config as dotted key -> its value's JSON text (comparable in sets)."""
    from privatune.common.run_record import flat_config  # loads torch: not at `--help`

    return {key: json.dumps(value) for key, value in flat_config(config).items()}


def check_reuse(plan: StudyPlan) -> None:
    """Refuse an --out whose finished runs another job made (another --set, an edited config):
    reused, they would put two studies in one table."""
    from privatune.common.config import to_dict

    saved = [(simulation_dir(plan, budget, seed) / "run" / "report.json", budget, seed)
             for budget in plan.budgets for seed in plan.seeds_of(budget)]
    for seed in plan.seeds_of(NON_PRIVATE):
        saved += [(in_process_dir(plan, POOLED, seed) / "result.json", NON_PRIVATE, seed),
                  (in_process_dir(plan, NEAREST_NOTE, seed) / "result.json", NON_PRIVATE, seed),
                  (data_dir(plan, seed) / "complete.json", NON_PRIVATE, seed)]
    for path, budget, seed in saved:
        if not path.is_file():
            continue
        made = json.loads(path.read_text(encoding="utf-8")).get("config", {})
        expected = json.loads(json.dumps(to_dict(plan.job(budget, seed))))
        differing = sorted(set(_dotted(made).items()) ^ set(_dotted(expected).items()))
        if differing:
            keys = ", ".join(dict.fromkeys(key for key, _ in differing))
            raise ConfigError(f"{path} was made by another job (it differs at {keys}); give the "
                              "study another --out, or delete that run to have it run again")


def simulation(plan: StudyPlan, budget: Budget, seed: int,
               progress: Callable[[str], None]) -> tuple[RunRecord, list[Measurement]]:
    """One federation (and its local-only baselines) in its own ``privatune simulate``
    process, its output in run.log; reused when its report is there."""
    from privatune.server.report import RunReport

    directory = simulation_dir(plan, budget, seed)
    run = directory / "run"
    overrides = plan.job_overrides(budget, seed)
    record = RunRecord("simulate", budget.key, seed, str(run), overrides)
    if not (run / "report.json").is_file():
        progress(f"{budget.label}, seed {seed}: simulating")
        started = time.monotonic()
        failure = _simulate(plan.config, run, overrides, directory)
        record = replace(record, wall_s=round(time.monotonic() - started, 1), failure=failure)
        if failure:
            progress(f"{budget.label}, seed {seed}: failed ({failure})")
            return record, []
    else:
        record = replace(record, reused=True)
    report = RunReport.read(run / "report.json")
    record = replace(record, wall_s=report.elapsed_s)  # the same measure, reused or not
    if not any(r.participants for r in report.rounds):
        return replace(record, failure="no site took part in any round (see report.md)"), []
    progress(f"{budget.label}, seed {seed}: {'reused' if record.reused else 'done'} "
             f"({record.wall_s or 0:.0f} s)")
    return record, federated_measurements(report, budget, seed)


def _simulate(config: Path, run: Path, overrides: Sequence[str], directory: Path) -> str | None:
    """Run ``privatune simulate`` up to ``ATTEMPTS`` times; None, or why it failed."""
    directory.mkdir(parents=True, exist_ok=True)
    command = privatune("simulate", "--config", str(config), "--out", str(run), "--overwrite")
    for override in overrides:
        command += ["--set", override]
    for attempt in range(1, ATTEMPTS + 1):
        log_path = directory / ("run.log" if attempt == 1 else f"run.attempt{attempt}.log")
        with open(log_path, "w", encoding="utf-8") as log:
            finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
        if finished.returncode == 0:
            return None
    lines = [line for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines()
             if line.strip()]
    last = lines[-1].strip()[:300] if lines else "no output"
    return f"exit {finished.returncode} in each of {ATTEMPTS} attempts: {last} (log: {log_path})"


def in_process_run(kind: str, plan: StudyPlan, seed: int, data: Callable[[], SeedData],
                   measure: Callable[[JobConfig, SeedData], Measurement],
                   progress: Callable[[str], None]) -> tuple[RunRecord, Measurement | None]:
    """The pooled training or the copy for one seed, in this process; its result.json reused."""
    from privatune.common.config import to_dict

    directory = in_process_dir(plan, kind, seed)
    result = directory / "result.json"
    overrides = plan.job_overrides(NON_PRIVATE, seed)
    record = RunRecord(kind, NON_PRIVATE.key, seed, str(directory), overrides)
    if result.is_file():
        saved = json.loads(result.read_text(encoding="utf-8"))
        return (replace(record, wall_s=saved["wall_s"], reused=True),
                Measurement.from_json(saved["measurement"]))
    progress(f"{SETTING_LABELS[kind]}, seed {seed}: running")
    started = time.monotonic()
    job = plan.job(NON_PRIVATE, seed)
    try:
        measurement = measure(job, data())
    except ConfigError:
        raise  # the job cannot run here (a device it names): no other run can either
    except Exception as err:  # noqa: BLE001 - recorded, and the study goes on
        progress(f"{SETTING_LABELS[kind]}, seed {seed}: failed ({type(err).__name__}: {err})")
        return replace(record, wall_s=round(time.monotonic() - started, 1),
                       failure=f"{type(err).__name__}: {err}"), None
    wall = round(time.monotonic() - started, 1)
    directory.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps({"wall_s": wall, "measurement": asdict(measurement),
                                  "config": to_dict(job)}, indent=2), encoding="utf-8")
    progress(f"{SETTING_LABELS[kind]}, seed {seed}: done ({wall:.0f} s)")
    return replace(record, wall_s=wall), measurement


def run_study(plan: StudyPlan, command: str = "",
              progress: Callable[[str], None] = print) -> Study:
    """Every run of the study, a seed at a time; the outputs are rewritten after each run."""
    started = time.monotonic()
    check_reuse(plan)
    study = Study(command=command, config=str(plan.config), overrides=plan.extra,
                  epsilons=plan.epsilons, seeds={b.key: plan.seeds_of(b) for b in plan.budgets},
                  notes=notes(plan))

    def done(record: RunRecord, measurements: Sequence[Measurement]) -> None:
        study.runs.append(record)
        study.measurements.extend(measurements)
        study.wall_s = round(time.monotonic() - started, 1)
        write_outputs(plan, study)

    for seed in sorted({s for b in plan.budgets for s in plan.seeds_of(b)}):
        for budget in plan.budgets:
            if seed in plan.seeds_of(budget):
                done(*simulation(plan, budget, seed, progress))
        if seed not in plan.seeds_of(NON_PRIVATE):
            continue
        # written once, on first use: a seed whose pooled and copy results are there needs none
        data = functools.cache(functools.partial(seed_data, plan.job(NON_PRIVATE, seed),
                                                 data_dir(plan, seed)))
        for kind, measure in ((POOLED, pooled_measurement),
                              (NEAREST_NOTE, nearest_note_measurement)):
            record, measurement = in_process_run(kind, plan, seed, data, measure, progress)
            done(record, [measurement] if measurement is not None else [])
    return study
