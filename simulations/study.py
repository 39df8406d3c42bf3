"""``privatune study``: what each site's privacy budget costs in utility, in one command.

The same job (same config, same seeds) in six settings, at each ε and without privacy, beside
the untrained base model (read from round 0 of the non-private federated run):

- *federated*: the normal ``privatune simulate`` run, every site training with DP-SGD;
- *secure*: the same job as a ``privatune simulate`` run in secure DP-SGD mode (SecAgg+, noise
  calibrated for the aggregate guarantee, sites that trust secure aggregation), each site
  sampling at the rate a typical site samples at in the federated run (``secure_batch``);
- *local-only*: each site training alone with the same rounds, steps and budget (the
  simulation's local-only baselines, from the same runs);
- *central DP-SGD*: every site's training records in one place, trained with DP-SGD by a
  trusted curator (simulated only) at the column's ε, with the secure run's union batch, rate
  and steps (ε columns only);
- *pooled*: every site's training records in one place, trained without DP for as many
  optimizer steps of the same batch size as one site takes in the whole run: the upper bound
  no hospital may run (non-private column only);
- *nearest-note*: no training; each prompt answered with the assessment of the training note
  whose prompt shares the most words with it (non-private column only: it copies a note).

Every federation is its own ``privatune simulate`` process (one run's memory and Flower engine
never leak into the next); the pooled trainings and the copy run in this process. Whatever
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privatune.common.config import ConfigError, load_job_config
from privatune.simulations.loopback import privatune
from privatune.simulations.study_baselines import (SeedData, central_dp_measurement,
                                                   nearest_note_measurement, pooled_measurement,
                                                   saved_train_records, seed_data)
from privatune.simulations.study_measurements import (Measurement, RunRecord,
                                                      federated_measurements,
                                                      global_model_measurement)
from privatune.simulations.study_plan import (CENTRAL_DP, FEDERATED, NEAREST_NOTE, NON_PRIVATE,
                                              POOLED, SECURE, SETTING_LABELS, Budget, SecureBatch,
                                              StudyPlan, secure_batch)
from privatune.simulations.study_report import Study, notes, write_outputs

if TYPE_CHECKING:
    from privatune.common.config import JobConfig
    from privatune.server.report import RunReport

ATTEMPTS = 2  # a simulation whose process dies (Ray's workers on a loaded machine) runs again


def simulation_dir(plan: StudyPlan, budget: Budget, seed: int) -> Path:
    return plan.out / FEDERATED / budget.key / f"seed-{seed}"


def secure_dir(plan: StudyPlan, budget: Budget, seed: int) -> Path:
    return plan.out / SECURE / budget.key / f"seed-{seed}"


def in_process_dir(plan: StudyPlan, kind: str, budget: Budget, seed: int) -> Path:
    """``<out>/<kind>/seed-N`` in the non-private column (where earlier studies left them),
    ``<out>/<kind>/<column>/seed-N`` in an ε column."""
    column = () if budget == NON_PRIVATE else (budget.key,)
    return plan.out.joinpath(kind, *column, f"seed-{seed}")


def data_dir(plan: StudyPlan, seed: int) -> Path:
    return plan.out / "data" / f"seed-{seed}"


def _dotted(config: dict[str, Any]) -> dict[str, str]:
    """A nested config as dotted key -> its value's JSON text (comparable in sets)."""
    from privatune.common.run_record import flat_config  # loads torch: not at `--help`

    return {key: json.dumps(value) for key, value in flat_config(config).items()}


def seed_batch(plan: StudyPlan, seed: int, train_records: Mapping[str, int]) -> SecureBatch:
    """The secure row's batch for one seed, from its sites' training-record counts."""
    return secure_batch(plan.job(NON_PRIVATE, seed).training.batch_size,
                        list(train_records.values()))


def check_reuse(plan: StudyPlan) -> None:
    """Refuse an --out whose finished runs another job made (another --set, an edited config):
    reused, they would put two studies in one table."""
    from privatune.common.config import to_dict

    def secure_job(budget: Budget, seed: int) -> Callable[[], JobConfig]:
        def job() -> JobConfig:
            counts = saved_train_records(data_dir(plan, seed))
            if counts is None:
                raise ConfigError(f"seed {seed}'s data under {data_dir(plan, seed)} is gone, so "
                                  f"its secure runs cannot be checked; delete {plan.out / SECURE} "
                                  f"and {plan.out / CENTRAL_DP} to have them run again")
            return plan.secure_job(budget, seed, seed_batch(plan, seed, counts))
        return job

    saved: list[tuple[Path, Callable[[], JobConfig]]] = []
    for budget in plan.budgets:
        for seed in plan.seeds_of(budget):
            saved.append((simulation_dir(plan, budget, seed) / "run" / "report.json",
                          functools.partial(plan.job, budget, seed)))
            if budget != NON_PRIVATE:
                saved += [(secure_dir(plan, budget, seed) / "run" / "report.json",
                           secure_job(budget, seed)),
                          (in_process_dir(plan, CENTRAL_DP, budget, seed) / "result.json",
                           secure_job(budget, seed))]
    for seed in sorted({s for b in plan.budgets for s in plan.seeds_of(b)}):
        saved.append((data_dir(plan, seed) / "complete.json",
                      functools.partial(plan.job, NON_PRIVATE, seed)))
    for seed in plan.seeds_of(NON_PRIVATE):
        saved += [(in_process_dir(plan, kind, NON_PRIVATE, seed) / "result.json",
                   functools.partial(plan.job, NON_PRIVATE, seed))
                  for kind in (POOLED, NEAREST_NOTE)]
    for path, job in saved:
        if not path.is_file():
            continue
        made = json.loads(path.read_text(encoding="utf-8")).get("config", {})
        expected = json.loads(json.dumps(to_dict(job())))
        differing = sorted(set(_dotted(made).items()) ^ set(_dotted(expected).items()))
        if differing:
            keys = ", ".join(dict.fromkeys(key for key, _ in differing))
            raise ConfigError(f"{path} was made by another job (it differs at {keys}); give the "
                              "study another --out, or delete that run to have it run again")


def simulation(plan: StudyPlan, budget: Budget, seed: int,
               progress: Callable[[str], None]) -> tuple[RunRecord, list[Measurement]]:
    """One federation (and its local-only baselines)."""
    return _simulation("simulate", budget.label, simulation_dir(plan, budget, seed), plan,
                       budget, seed, plan.job_overrides(budget, seed),
                       lambda report: federated_measurements(report, budget, seed), progress)


def secure_simulation(plan: StudyPlan, budget: Budget, seed: int, batch: SecureBatch,
                      progress: Callable[[str], None]) -> tuple[RunRecord, list[Measurement]]:
    """One secure DP-SGD run of the column's job at the seed's batch (no local-only
    baselines)."""
    return _simulation(SECURE, f"{SETTING_LABELS[SECURE]}, {budget.label}",
                       secure_dir(plan, budget, seed), plan, budget, seed,
                       plan.secure_overrides(budget, seed, batch),
                       lambda report: [global_model_measurement(report, SECURE, budget, seed)],
                       progress)


def _simulation(kind: str, label: str, directory: Path, plan: StudyPlan, budget: Budget,
                seed: int, overrides: tuple[str, ...],
                measure: Callable[[RunReport], list[Measurement]],
                progress: Callable[[str], None]) -> tuple[RunRecord, list[Measurement]]:
    """One ``privatune simulate`` in its own process, its output in run.log; reused when its
    report is there."""
    from privatune.server.report import RunReport

    run = directory / "run"
    record = RunRecord(kind, budget.key, seed, str(run), overrides)
    if not (run / "report.json").is_file():
        progress(f"{label}, seed {seed}: simulating")
        started = time.monotonic()
        failure = _simulate(plan.config, run, overrides, directory)
        record = replace(record, wall_s=round(time.monotonic() - started, 1), failure=failure)
        if failure:
            progress(f"{label}, seed {seed}: failed ({failure})")
            return record, []
    else:
        record = replace(record, reused=True)
    report = RunReport.read(run / "report.json")
    record = replace(record, wall_s=report.elapsed_s)  # the same measure, reused or not
    if not any(r.participants for r in report.rounds):
        return replace(record, failure="no site took part in any round (see report.md)"), []
    progress(f"{label}, seed {seed}: {'reused' if record.reused else 'done'} "
             f"({record.wall_s or 0:.0f} s)")
    return record, measure(report)


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


def in_process_run(kind: str, plan: StudyPlan, budget: Budget, seed: int,
                   overrides: tuple[str, ...], data: Callable[[], SeedData],
                   measure: Callable[[JobConfig, SeedData], Measurement],
                   progress: Callable[[str], None]) -> tuple[RunRecord, Measurement | None]:
    """A pooled training (with or without DP) or the copy for one seed, in this process, of
    the job ``overrides`` make; its result.json reused."""
    from privatune.common.config import to_dict

    directory = in_process_dir(plan, kind, budget, seed)
    result = directory / "result.json"
    record = RunRecord(kind, budget.key, seed, str(directory), overrides)
    label = SETTING_LABELS[kind] + ("" if budget == NON_PRIVATE else f", {budget.label}")
    if result.is_file():
        saved = json.loads(result.read_text(encoding="utf-8"))
        return (replace(record, wall_s=saved["wall_s"], reused=True),
                Measurement.from_json(saved["measurement"]))
    progress(f"{label}, seed {seed}: running")
    started = time.monotonic()
    job = load_job_config(plan.config, overrides)
    try:
        measurement = measure(job, data())
    except ConfigError:
        raise  # the job cannot run here (a device it names): no other run can either
    except Exception as err:  # noqa: BLE001 - recorded, and the study goes on
        progress(f"{label}, seed {seed}: failed ({type(err).__name__}: {err})")
        return replace(record, wall_s=round(time.monotonic() - started, 1),
                       failure=f"{type(err).__name__}: {err}"), None
    wall = round(time.monotonic() - started, 1)
    directory.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps({"wall_s": wall, "measurement": asdict(measurement),
                                  "config": to_dict(job)}, indent=2), encoding="utf-8")
    progress(f"{label}, seed {seed}: done ({wall:.0f} s)")
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
        budgets = [b for b in plan.budgets if seed in plan.seeds_of(b)]
        for budget in budgets:
            done(*simulation(plan, budget, seed, progress))
        # written once, on first use (reused from <out>/data where it is there)
        data = functools.cache(functools.partial(seed_data, plan.job(NON_PRIVATE, seed),
                                                 data_dir(plan, seed)))
        private = [b for b in budgets if b != NON_PRIVATE]
        if private:
            batch = seed_batch(plan, seed, data().train_records)
            for budget in private:
                done(*secure_simulation(plan, budget, seed, batch, progress))
            for budget in private:
                record, measurement = in_process_run(
                    CENTRAL_DP, plan, budget, seed, plan.secure_overrides(budget, seed, batch),
                    data, central_dp_measurement, progress)
                done(record, [measurement] if measurement is not None else [])
        if NON_PRIVATE not in budgets:
            continue
        for kind, measure in ((POOLED, pooled_measurement),
                              (NEAREST_NOTE, nearest_note_measurement)):
            record, measurement = in_process_run(kind, plan, NON_PRIVATE, seed,
                                                 plan.job_overrides(NON_PRIVATE, seed), data,
                                                 measure, progress)
            done(record, [measurement] if measurement is not None else [])
    return study
