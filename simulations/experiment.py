"""``privatune experiment``: which accountant, aggregation and patient sampling give the best
model for the same epsilon, measured on the demo federation.

Every variant is the same job (same hospitals, same per-site budget, same rounds and steps)
with a few ``--set`` overrides; each run is a separate ``privatune simulate`` process, so one
run's memory and Flower engine never leak into the next. The DP noise and Poisson sampling
are drawn from each site's secret randomness, so repeating a variant measures its spread.
Runs already finished under ``--out`` are reused, so an interrupted experiment resumes.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from privatune.common.config import ConfigError
from privatune.simulations.loopback import privatune


@dataclass(frozen=True)
class Variant:
    """One arm of the experiment: a name and the job overrides that make it."""

    name: str
    overrides: tuple[str, ...]


VARIANTS = (
    # the sites' accountant times the LoRA aggregation (record unit)
    *(Variant(f"{accountant}-{aggregation}", (f"privacy.accountant={accountant}",
                                              f"federation.aggregation={aggregation}"))
      for aggregation in ("fedavg", "ffa") for accountant in ("rdp", "prv")),
    # the patient unit, each patient cut once or a fresh window per draw
    *(Variant(f"patient-{sampling}", ("privacy.unit=patient", f"privacy.patient_sampling={sampling}"))
      for sampling in ("truncate", "window")),
)


def experiment_overrides(rounds: int) -> tuple[str, ...]:
    """What every run of the experiment sets besides its variant: no local-only baselines
    (they do not depend on the aggregation) and generation scored on the final round only."""
    return ("simulation.local_only_baseline=false", f"evaluation.every_k_rounds={rounds}")


@dataclass(frozen=True)
class RunFigures:
    """What one finished run measured."""

    variant: str
    repetition: int
    global_perplexity: float | None
    federated_perplexity: float | None
    site_perplexity: dict[str, float | None]
    # per site, epsilon of its ledger's history by each accountant: prv, rdp and pld
    epsilon: dict[str, dict[str, float]]
    noise_multiplier: dict[str, float]
    bytes_per_site_round: float | None  # update bytes a site sent per round, mean over the run
    global_rouge_l: float | None
    elapsed_s: float | None


def run_dir(out: Path, variant: Variant, repetition: int) -> Path:
    return out / variant.name / f"rep{repetition}"


def run_variant(config: Path, out: Path, variant: Variant, repetition: int, rounds: int,
                extra: Sequence[str], attempts: int = 2) -> Path:
    """One ``privatune simulate`` run of a variant in its own process; its output in run.log.

    A run whose process dies (the simulation engine's workers can crash on a loaded machine)
    is started again from scratch, up to ``attempts`` times; each attempt's log is kept.
    """
    directory = run_dir(out, variant, repetition)
    directory.mkdir(parents=True, exist_ok=True)
    overrides = [*experiment_overrides(rounds), *variant.overrides, *extra]
    command = privatune("simulate", "--config", str(config), "--out", str(directory / "run"),
                        "--overwrite")
    for override in overrides:
        command += ["--set", override]
    for attempt in range(1, attempts + 1):
        log_path = directory / ("run.log" if attempt == 1 else f"run.attempt{attempt}.log")
        with open(log_path, "w", encoding="utf-8") as log:
            finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
        if finished.returncode == 0:
            return directory / "run"
    raise RuntimeError(f"variant {variant.name} repetition {repetition} failed {attempts} times "
                       f"(last exit {finished.returncode}); see the logs in {directory}")


def read_figures(run: Path, variant: str, repetition: int) -> RunFigures:
    """The figures of a finished run: its report, and each site's ledger by three accountants."""
    from privatune.common.ledger import SiteLedger
    from privatune.common.privacy import pld_epsilon, prv_epsilon, rdp_epsilon
    from privatune.server.report import RunReport

    report = RunReport.read(run / "report.json")
    last = report.rounds[-1].evaluation
    epsilon: dict[str, dict[str, float]] = {}
    for name, site in sorted(report.sites.items()):
        history = SiteLedger(run / "sites" / name / "ledger.jsonl").mechanism_history()
        delta = site.delta if site.delta is not None else float(report.config["privacy"]["delta"])
        epsilon[name] = {"prv": prv_epsilon(history, delta), "rdp": rdp_epsilon(history, delta),
                         "pld": pld_epsilon(history, delta)}
    sent = [(r.training.bytes_received, len(r.training.participants)) for r in report.rounds
            if r.training is not None and r.training.bytes_received and r.training.participants]
    per_site = (statistics.fmean(total / count for total, count in sent) if sent else None)
    rouge = last.global_generation.rouge_l if last.global_generation is not None else None
    return RunFigures(variant=variant, repetition=repetition,
                      global_perplexity=last.global_perplexity,
                      federated_perplexity=last.federated_perplexity,
                      site_perplexity=dict(sorted(last.site_perplexity.items())), epsilon=epsilon,
                      noise_multiplier={n: s.noise_multiplier for n, s in sorted(report.sites.items())
                                        if s.noise_multiplier is not None},
                      bytes_per_site_round=per_site, global_rouge_l=rouge,
                      elapsed_s=report.elapsed_s)


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation over repetitions (sd 0 for a single run)."""

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

    def text(self, digits: int = 1) -> str:
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}"


@dataclass(frozen=True)
class VariantSummary:
    """A variant over its repetitions."""

    variant: str
    runs: int
    global_perplexity: Spread | None
    federated_perplexity: Spread | None
    site_perplexity: dict[str, Spread | None]
    epsilon: dict[str, dict[str, Spread | None]]  # accountant -> site -> spread
    noise_multiplier: Spread | None  # mean over sites
    bytes_per_site_round: Spread | None
    global_rouge_l: Spread | None
    elapsed_s: Spread | None = None
    sites: tuple[str, ...] = field(default_factory=tuple)


def summarise(figures: Sequence[RunFigures]) -> list[VariantSummary]:
    """One summary per variant, in the order the variants first appear."""
    names = list(dict.fromkeys(f.variant for f in figures))
    summaries = []
    for name in names:
        runs = [f for f in figures if f.variant == name]
        sites = tuple(sorted({s for f in runs for s in f.site_perplexity}))
        summaries.append(VariantSummary(
            variant=name, runs=len(runs), sites=sites,
            global_perplexity=Spread.of([f.global_perplexity for f in runs]),
            federated_perplexity=Spread.of([f.federated_perplexity for f in runs]),
            site_perplexity={s: Spread.of([f.site_perplexity.get(s) for f in runs]) for s in sites},
            epsilon={a: {s: Spread.of([f.epsilon.get(s, {}).get(a) for f in runs]) for s in sites}
                     for a in ("prv", "rdp", "pld")},
            noise_multiplier=Spread.of([statistics.fmean(f.noise_multiplier.values())
                                        for f in runs if f.noise_multiplier]),
            bytes_per_site_round=Spread.of([f.bytes_per_site_round for f in runs]),
            global_rouge_l=Spread.of([f.global_rouge_l for f in runs]),
            elapsed_s=Spread.of([f.elapsed_s for f in runs])))
    return summaries


def _cell(spread: Spread | None, digits: int = 1) -> str:
    return spread.text(digits) if spread is not None else "–"


def _epsilon_cell(spreads: dict[str, Spread | None]) -> str:
    known = [s for s in spreads.values() if s is not None]
    if not known:
        return "–"
    return f"{min(s.mean for s in known):.2f}–{max(s.mean for s in known):.2f}"


def render_markdown(summaries: Sequence[VariantSummary], command: str) -> str:
    """The experiment's tables: utility, privacy by accountant, and bytes per round."""
    lines = [f"Command: `{command}`", "",
             "| variant | runs | global ppl | federated ppl | mean σ | ε PRV (sites) | "
             "ε RDP (sites) | ε PLD (sites) | KiB sent per site per round | global ROUGE-L |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        kib = (Spread(s.bytes_per_site_round.mean / 1024, s.bytes_per_site_round.sd / 1024,
                      s.bytes_per_site_round.runs) if s.bytes_per_site_round else None)
        lines.append(f"| {s.variant} | {s.runs} | {_cell(s.global_perplexity)} | "
                     f"{_cell(s.federated_perplexity)} | {_cell(s.noise_multiplier, 3)} | "
                     f"{_epsilon_cell(s.epsilon['prv'])} | {_epsilon_cell(s.epsilon['rdp'])} | "
                     f"{_epsilon_cell(s.epsilon['pld'])} | {_cell(kib, 0)} | "
                     f"{_cell(s.global_rouge_l, 3)} |")
    sites = sorted({site for s in summaries for site in s.sites})
    if sites:
        lines += ["", "Final perplexity on each site's own held-out split (mean ± sd):", "",
                  "| variant | " + " | ".join(sites) + " |",
                  "|---|" + "---|" * len(sites)]
        for s in summaries:
            lines.append(f"| {s.variant} | "
                         + " | ".join(_cell(s.site_perplexity.get(site)) for site in sites) + " |")
    return "\n".join(lines) + "\n"


def run_experiment(config: Path, out: Path, variants: Sequence[Variant], repetitions: int,
                   extra: Sequence[str] = (), command: str = "",
                   progress: Callable[[str], None] = print) -> list[VariantSummary]:
    """Run every variant ``repetitions`` times (interleaved, so slow drift of the machine
    hits all variants alike); the tables are rewritten after every run."""
    from privatune.common.config import load_job_config

    if repetitions < 1:
        raise ConfigError(f"--repetitions must be at least 1, got {repetitions}")
    rounds = {}
    for variant in variants:  # a bad override fails here, before hours of runs
        job = load_job_config(config, [*experiment_overrides(1), *variant.overrides, *extra])
        rounds[variant.name] = job.federation.rounds
    out.mkdir(parents=True, exist_ok=True)
    figures: list[RunFigures] = []
    summaries: list[VariantSummary] = []
    for repetition in range(1, repetitions + 1):
        for variant in variants:
            run = run_dir(out, variant, repetition) / "run"
            if not (run / "report.json").is_file():
                started = time.monotonic()
                progress(f"{variant.name} repetition {repetition}/{repetitions}: running")
                run_variant(config, out, variant, repetition, rounds[variant.name], extra)
                progress(f"{variant.name} repetition {repetition}: "
                         f"{time.monotonic() - started:.0f} s")
            figures.append(read_figures(run, variant.name, repetition))
            summaries = summarise(figures)
            write_tables(out, figures, summaries, command)  # partial tables while it runs
    return summaries


def write_tables(out: Path, figures: Sequence[RunFigures], summaries: Sequence[VariantSummary],
                 command: str) -> None:
    """``experiment.json`` (every run and the summaries) and ``experiment.md`` (the tables)."""
    (out / "experiment.json").write_text(json.dumps(
        {"command": command, "runs": [asdict(f) for f in figures],
         "variants": [asdict(s) for s in summaries]}, indent=2), encoding="utf-8")
    (out / "experiment.md").write_text(render_markdown(summaries, command), encoding="utf-8")


def parse_variants(text: str) -> tuple[Variant, ...]:
    """``prv-fedavg,prv-ffa`` -> those variants; argparse type for --variants."""
    import argparse

    known = {v.name: v for v in VARIANTS}
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(unknown) or text!r}; "
                                         f"known: {', '.join(known)}")
    return tuple(known[n] for n in names)
