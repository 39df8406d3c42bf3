"""The researcher's commands, run on one machine: ``simulate``, ``study``,
``empirical-audit`` and ``fault-drill`` (registered with the ``privatune`` front door,
``common.cli``). Registering them imports only their options; the simulator's packages
(Flower's simulation engine, clinosim) load when a command runs.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from privatune.common.extras import require_extra
from privatune.simulations.empirical_audit_cli import add_empirical_audit_command
from privatune.simulations.study_plan import DEFAULT_EPSILONS, parse_epsilons

if TYPE_CHECKING:
    from privatune.server.report import RunReport


def require_simulator(command: str) -> None:
    """The researcher's commands run Flower's simulation engine on clinosim's hospitals and
    draw their reports: stop before any work when an extra is missing."""
    for extra in ("simulation", "report"):
        require_extra(extra, f"privatune {command}")


def _simulate(args: argparse.Namespace) -> int:
    require_simulator("simulate")
    from privatune.common.process_heap import importing_libraries

    with importing_libraries():
        from transformers.utils import logging as transformers_logging

        from privatune.simulations.runner import simulate

    started = time.monotonic()
    warnings.simplefilter("ignore", FutureWarning)  # libraries' deprecation notices
    transformers_logging.disable_progress_bar()  # one "Loading weights" bar per model load

    def progress(line: str) -> None:
        print(f"[{time.monotonic() - started:6.0f}s] {line}", flush=True)

    report = simulate(Path(args.config), Path(args.out), args.set, overwrite=args.overwrite,
                      progress=progress)
    worst = max((s.epsilon / s.epsilon_budget for s in report.sites.values() if s.epsilon_budget),
                default=0.0)
    print(f"report: {Path(args.out) / 'report.md'} (highest share of a site budget spent: "
          f"{100 * worst:.0f}%)")
    return _failed_federation(report)


def _failed_federation(report: RunReport) -> int:
    """1, with each distinct reason, when no site took part in any round because every train
    request failed (a broken federation, not a finished run); else 0."""
    from privatune.server.failure_reasons import failure_reason

    if any(record.participants for record in report.rounds):
        return 0
    reasons = sorted({failure_reason(failure) for record in report.rounds if record.training
                      for failure in record.training.failures})
    if not reasons:
        return 0
    print("privatune: no site took part in any round; the train requests failed:",
          *[f"  {reason}" for reason in reasons], sep="\n", file=sys.stderr)
    return 1


def _study(args: argparse.Namespace) -> int:
    require_simulator("study")
    from privatune.common.process_heap import importing_libraries

    with importing_libraries():
        from transformers.utils import logging as transformers_logging

        from privatune.simulations.study import run_study
        from privatune.simulations.study_plan import plan_study

    started = time.monotonic()
    warnings.simplefilter("ignore", FutureWarning)  # libraries' deprecation notices
    transformers_logging.disable_progress_bar()  # the pooled training's model loads
    transformers_logging.set_verbosity_error()  # the copy tokenizes whole notes on purpose

    def progress(line: str) -> None:
        print(f"[{time.monotonic() - started:6.0f}s] {line}", flush=True)

    plan = plan_study(Path(args.config), Path(args.out), args.epsilons, args.seeds,
                      args.seeds_other, args.set)
    run_study(plan, " ".join(["privatune", *sys.argv[1:]]), progress)
    print(f"report: {Path(args.out) / 'study.md'} (table), {Path(args.out) / 'study.png'} (plot)")
    return 0


def _fault_drill(args: argparse.Namespace) -> int:
    require_simulator("fault-drill")
    from privatune.simulations.fault_drill import run_drill

    return run_drill(args)


def add_fault_drill_command(commands: argparse._SubParsersAction) -> None:
    """``privatune fault-drill``: every fault scenario on a real loopback deployment."""
    drill = commands.add_parser(
        "fault-drill", help="kill and restart the parts of a real federation on this machine "
        "(loopback, tiny model) and tabulate what happened to the run and the ledgers")
    drill.add_argument("--out", default="runs/faults", help="output directory (faults.md, "
                       "faults.json, one directory per scenario with its logs)")
    drill.add_argument("--scenario", default="all",
                       help="all (the default), or the name of one scenario to run again")
    drill.add_argument("--rounds", type=int, default=3, help="rounds of the job (at least 3)")
    drill.add_argument("--round-timeout", type=int, default=90,
                       help="round_timeout_s of the job (a killed node costs this much)")
    drill.add_argument("--budget", type=float, default=1500,
                       help="give up on a coordinator run after this many seconds")
    drill.add_argument("--rescan", action="store_true", help="run nothing: recompute the "
                       "figures from --out and rewrite the table")
    drill.set_defaults(handler=_fault_drill)


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``simulate``, ``study``, ``empirical-audit`` and ``fault-drill`` to the ``privatune``
    subcommands."""
    simulate = commands.add_parser("simulate", help="run a whole federation of simulated "
                                   "hospitals on this machine")
    simulate.add_argument("--config", required=True, help="job config YAML, e.g. configs/demo.yaml")
    simulate.add_argument("--out", required=True, help="run directory (report, checkpoints, sites)")
    simulate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config value, e.g. --set lora.r=16 (repeatable)")
    simulate.add_argument("--overwrite", action="store_true",
                          help="delete an earlier simulation in --out, its site ledgers included")
    simulate.set_defaults(handler=_simulate)

    study = commands.add_parser(
        "study", help="the privacy-utility study: federated, each site alone, all sites pooled "
        "without DP and the nearest-note copy, at each epsilon and non-private")
    study.add_argument("--config", required=True,
                       help="a DP FedAvg job config YAML, e.g. configs/dpfedavg.yaml")
    study.add_argument("--out", required=True, help="directory for the runs and study.md, "
                       "study.json, study.png (finished runs there are reused)")
    study.add_argument("--epsilons", type=parse_epsilons, default=DEFAULT_EPSILONS,
                       metavar="E,E,...", help="each site's budget in the private columns "
                       "(default 1,3,8); a non-private column is always added")
    study.add_argument("--seeds", type=int, default=3, help="seeds of the non-private column "
                       "and the highest epsilon (default 3: mean and sd)")
    study.add_argument("--seeds-other", type=int, default=1,
                       help="seeds of every other epsilon (default 1)")
    study.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value for every run (repeatable)")
    study.set_defaults(handler=_study)

    add_empirical_audit_command(commands)
    add_fault_drill_command(commands)
