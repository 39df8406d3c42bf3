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
never leak into the next); the pooled training and the copy run in this process. Whatever
finished under ``--out`` is reused, so an interrupted study resumes; a run that fails is
recorded with its reason and the study goes on. The job's hyperparameters are used as the
config gives them: nothing is tuned, on a site's held-out split or anywhere else.

A seed is the job's ``seed``: it changes the base model (the builtin one is pretrained under
it), the simulated hospitals, their splits and the initial adapter. The DP noise and Poisson
sampling come from each site's own secret randomness whatever the seed. Seeds run one after
the other, all the runs of a seed together: the hospital cache holds one seed's hospitals at a
time.

This module runs the study, a seed at a time; what it runs is ``study_plan``, what it measures
``study_measurements``, the pooled training and the copy ``study_baselines``, and its tables and
plot ``study_report``.
"""

from __future__ import annotations

import functools
import json
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privatune.common.config import ConfigError
from privatune.simulations.loopback import privatune
from privatune.simulations.study_baselines import (SeedData, nearest_note_measurement,
                                                   pooled_measurement, seed_data)
from privatune.simulations.study_measurements import Measurement, RunRecord, federated_measurements
from privatune.simulations.study_plan import (FEDERATED, NEAREST_NOTE, NON_PRIVATE, POOLED,
                                              SETTING_LABELS, Budget, StudyPlan)
from privatune.simulations.study_report import Study, notes, write_outputs

if TYPE_CHECKING:
    from privatune.common.config import JobConfig

ATTEMPTS = 2  # a simulation whose process dies (Ray's workers on a loaded machine) runs again


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
