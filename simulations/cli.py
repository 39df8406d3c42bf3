"""The ``privatune`` command: one entry point with a subcommand per task.

It lives in ``simulations`` because that is the one package allowed to import the node
(client), the coordinator (server) and the shared code together.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from privatune.common.config import ConfigError
from privatune.simulations.deploy_cli import add_deployment_commands
from privatune.simulations.empirical_audit_cli import add_empirical_audit_command


def _simulate(args: argparse.Namespace) -> int:
    from transformers.utils import logging as transformers_logging

    from privatune.simulations.runner import simulate

    started = time.monotonic()
    warnings.simplefilter("ignore", FutureWarning)  # libraries' deprecation notices
    transformers_logging.disable_progress_bar()  # one "Loading weights" bar per model load

    def progress(line: str) -> None:
        print(f"[{time.monotonic() - started:6.0f}s] {line}", flush=True)

    report = simulate(Path(args.config), Path(args.out), args.set, overwrite=args.overwrite,
                      progress=progress)
    worst = max((s["epsilon"] / s["epsilon_budget"] for s in report["sites"].values()
                 if s.get("epsilon_budget")), default=0.0)
    print(f"report: {Path(args.out) / 'report.md'} (highest share of a site budget spent: "
          f"{100 * worst:.0f}%)")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from privatune.common.config import load_job_config
    from privatune.common.plan import plan_site, plot_plans, render_table

    job = load_job_config(args.config, args.set)
    sites = dict(item.split("=", 1) for item in args.site) if args.site else {"site": str(args.records)}
    plans = []
    for name, records in sites.items():
        if not str(records).isdigit():
            raise ConfigError(f"--site {name}={records}: the record count must be a whole number")
        plans.append(plan_site(name, int(records), job.training.batch_size, job.training.local_steps,
                               job.federation.rounds, job.privacy.delta,
                               epsilon=None if args.noise_multiplier else job.privacy.epsilon,
                               noise_multiplier=args.noise_multiplier,
                               min_noise_multiplier=job.privacy.min_noise_multiplier))
    print(render_table(plans))
    if args.out:
        plot_plans(plans, Path(args.out) / "plan.png", job.privacy.epsilon)
        print(f"plot: {Path(args.out) / 'plan.png'}")
    return 1 if any(p.warnings for p in plans) else 0


def _audit(args: argparse.Namespace) -> int:
    from privatune.common.audit import audit_path, write_audit

    audits = audit_path(Path(args.path))
    out = Path(args.out) if args.out else (Path(args.path) if Path(args.path).is_dir()
                                           else Path(args.path).parent)
    report = write_audit(audits, out, args.format)
    for audit in audits:
        state = "ok" if audit.ok else "PROBLEM"
        print(f"{audit.name}: {state}; epsilon {audit.recomputed_epsilon:.4f} (RDP, recomputed), "
              f"{audit.pld_epsilon:.4f} (PLD), {len(audit.non_private)} non-private releases")
        if audit.chain_error:
            print(f"  hash chain: {audit.chain_error}")
        for problem in audit.problems:
            print(f"  {problem}")
    print(f"report: {report}")
    return 0 if all(a.ok for a in audits) else 1


def _export(args: argparse.Namespace) -> int:
    from privatune.server.export import ReleaseRefused, export_adapter

    if args.force and not args.reason:
        raise ConfigError("--force needs --reason '...' (it is recorded in releases.jsonl)")
    try:
        findings = export_adapter(Path(args.run), Path(args.out), args.reason if args.force else None)
    except ReleaseRefused as err:
        print(f"privatune: {err}", file=sys.stderr)
        return 3
    print(f"exported {Path(args.run) / 'adapter'} to {args.out}"
          + (f" (FORCED over {len(findings)} findings; reason recorded)" if findings else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="privatune", description=(
        "Privacy-preserving federated LoRA fine-tuning for hospitals (Flower + Opacus)."))
    commands = parser.add_subparsers(dest="command", required=True)

    simulate = commands.add_parser("simulate", help="run a whole federation of simulated "
                                   "hospitals on this machine")
    simulate.add_argument("--config", required=True, help="job config YAML, e.g. configs/demo.yaml")
    simulate.add_argument("--out", required=True, help="run directory (report, checkpoints, sites)")
    simulate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config value, e.g. --set lora.r=16 (repeatable)")
    simulate.add_argument("--overwrite", action="store_true",
                          help="delete an earlier simulation in --out, its site ledgers included")
    simulate.set_defaults(handler=_simulate)

    plan = commands.add_parser("plan", help="forecast epsilon per site before training")
    plan.add_argument("--config", required=True, help="job config YAML")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--records", type=int, default=1000,
                      help="privacy units (records or patients) at a site (default 1000)")
    plan.add_argument("--site", action="append", default=[], metavar="NAME=RECORDS",
                      help="one site and its number of privacy units (repeatable)")
    plan.add_argument("--noise-multiplier", type=float, default=None,
                      help="forecast for this noise multiplier instead of solving it for the "
                           "config's privacy.epsilon")
    plan.add_argument("--out", help="directory for plan.png")
    plan.set_defaults(handler=_plan)

    audit = commands.add_parser("audit", help="verify ledgers and recompute every site's epsilon")
    audit.add_argument("path", help="a ledger.jsonl or a run directory (with sites/<site>/)")
    audit.add_argument("--format", choices=("md", "html"), default="md")
    audit.add_argument("--out", help="where audit.md/html and audit.png go (default: next to PATH)")
    audit.set_defaults(handler=_audit)

    export = commands.add_parser("export", help="release a run's final adapter through the "
                                 "privacy audit gate")
    export.add_argument("run", help="run directory")
    export.add_argument("--out", required=True, help="new directory for the exported adapter")
    export.add_argument("--force", action="store_true", help="export despite audit findings")
    export.add_argument("--reason", help="why the export is forced (recorded)")
    export.set_defaults(handler=_export)

    add_deployment_commands(commands)
    add_empirical_audit_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as err:
        print(f"privatune: configuration error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"privatune: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
