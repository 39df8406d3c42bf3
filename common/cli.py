"""The ``privatune`` front door, the commands over shared code only, and what the node's and
coordinator's commands share.

Each side keeps its commands next to its code and declares them in the package metadata
(entry points of the group ``privatune.commands``, one per command, in pyproject.toml):

- a hospital (``client.cli``): ``node``, ``keys``;
- the coordinator (``server.cli``): ``coordinator``, ``certs``, ``export``;
- the privacy officer (here): ``plan``, ``audit``;
- one machine (``simulations.cli``): ``simulate``, ``study``, ``empirical-audit``, ``fault-drill``.

The front door imports only the side whose command runs (all of them for ``--help``), so a
hospital's ``privatune node`` never imports the simulator, and shared code never imports a side.
Heavy imports (torch, Flower, accounting, plotting) happen inside the handlers.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path

from privatune.common.config import ConfigError


def interrupt_on_sigterm() -> None:
    """Treat SIGTERM (systemd, docker stop, ``kill``) like Ctrl-C, so a long-running command
    stops the Flower processes it started."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def make_hospital_keys(out_dir: Path, name: str, overwrite: bool = False) -> str:
    """Make one hospital's authentication key pair in ``out_dir``; the line to print."""
    from privatune.common.certs import make_node_keys

    pair = make_node_keys(out_dir, name, overwrite=overwrite)
    return (f"hospital {name}: private key {pair.private_key} (stays at the site), public "
            f"key {pair.public_key} (register it with the coordinator)")


# --------------------------------------------------------------------------- handlers


def _plan(args: argparse.Namespace) -> int:
    from privatune.common.config import load_job_config
    from privatune.common.plan import (model_shape, plan_secure_site, plan_site, plot_plans,
                                       render_secure_table, render_table,
                                       trained_lora_parameters)

    job = load_job_config(args.config, args.set)
    shape = model_shape(job.model)
    trained = trained_lora_parameters(shape, job.lora) if shape else None
    sites = dict(item.split("=", 1) for item in args.site) if args.site else {"site": str(args.records)}
    for name, records in sites.items():
        if not str(records).isdigit():
            raise ConfigError(f"--site {name}={records}: the record count must be a whole number")
    if job.federation.mode == "secure_dpsgd":
        trained = (trained_lora_parameters(shape, job.lora, job.federation.aggregation)
                   if shape else None)
        if not trained:
            raise ConfigError(f"{args.config}: the secure plan needs the trained LoRA values, "
                              "unknown for this base model")
        secure = [plan_secure_site(name, int(records), job, trained)
                  for name, records in sites.items()]
        print(render_secure_table(secure))
        return 1 if any(p.warnings for p in secure) else 0
    plans = []
    for name, records in sites.items():
        plans.append(plan_site(name, int(records), job.training.batch_size, job.training.local_steps,
                               job.federation.rounds, job.privacy.delta,
                               epsilon=None if args.noise_multiplier else job.privacy.epsilon,
                               noise_multiplier=args.noise_multiplier,
                               min_noise_multiplier=job.privacy.min_noise_multiplier,
                               accountant=job.privacy.accountant_name,
                               trained_parameters=trained))
    print(render_table(plans))
    if args.out:
        plot_plans(plans, Path(args.out) / "plan.png", job.privacy.epsilon)
        print(f"plot: {Path(args.out) / 'plan.png'}")
    return 1 if any(p.warnings for p in plans) else 0


def _audit(args: argparse.Namespace) -> int:
    from privatune.common.audit import audit_path
    from privatune.common.audit_report import write_audit
    from privatune.common.run_record import read_run_record

    records = read_run_record(Path(args.run)) if args.run else None
    if records is not None and args.site and args.site not in records:
        raise ConfigError(f"--site {args.site}: the run record {args.run} has no such site "
                          f"(it has {', '.join(records) or 'none'})")
    audits = audit_path(Path(args.path), records, args.site or None)
    out = Path(args.out) if args.out else (Path(args.path) if Path(args.path).is_dir()
                                           else Path(args.path).parent)
    report = write_audit(audits, out, args.format)
    for audit in audits:
        state = "ok" if audit.ok else "PROBLEM"
        print(f"{audit.name}: {state}; epsilon {audit.recorded_epsilon:.4f} ({audit.accountant}), "
              f"recomputed {audit.recomputed_epsilon:.4f}, RDP {audit.rdp_epsilon:.4f}, "
              f"{len(audit.non_private)} non-private releases")
        if audit.chain_error:
            print(f"  hash chain: {audit.chain_error}")
        for problem in audit.problems:
            print(f"  {problem}")
    print(f"report: {report}")
    return 0 if all(a.ok for a in audits) else 1


# --------------------------------------------------------------------------- parser


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add the privacy officer's ``plan`` and ``audit`` to the ``privatune`` subcommands."""
    plan = commands.add_parser("plan", help="forecast epsilon per site before training")
    plan.add_argument("--config", required=True, help="job config YAML")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--records", type=int, default=1000,
                      help="privacy units (records or patients) a site trains on (default "
                           "1000; with training.loss_on: judged, its notes the marker splits)")
    plan.add_argument("--site", action="append", default=[], metavar="NAME=RECORDS",
                      help="one site and its number of privacy units (repeatable)")
    plan.add_argument("--noise-multiplier", type=float, default=None,
                      help="forecast for this noise multiplier instead of solving it for the "
                           "config's privacy.epsilon")
    plan.add_argument("--out", help="directory for plan.png")
    plan.set_defaults(handler=_plan)

    audit = commands.add_parser("audit", help="verify ledgers and recompute every site's epsilon")
    audit.add_argument("path", help="a ledger.jsonl or a run directory (with sites/<site>/)")
    audit.add_argument("--run", default="", metavar="REPORT",
                       help="the coordinator's record of the run (its report.json, a checkpoint's "
                       "state.json, or the run directory): check each ledger holds every head its "
                       "site reported and lists every update the coordinator received")
    audit.add_argument("--site", default="", metavar="NAME",
                       help="with a ledger file: the site it belongs to in --run (default: the "
                       "name of the folder it is in)")
    audit.add_argument("--format", choices=("md", "html"), default="md")
    audit.add_argument("--out", help="where audit.md/html and audit.png go (default: next to PATH)")
    audit.set_defaults(handler=_audit)


# ----------------------------------------------------------------------- the front door

COMMAND_GROUP = "privatune.commands"
CommandProvider = Callable[[argparse._SubParsersAction], None]


def _providers(argv: Sequence[str]) -> list[CommandProvider]:
    """The ``add_commands`` functions to load: the one that owns ``argv``'s command, or every
    one (in the metadata's order, once each) when no known command is named."""
    points = list(entry_points(group=COMMAND_GROUP))
    if not points:
        raise SystemExit(f"privatune: no commands are registered (entry points {COMMAND_GROUP!r});"
                         " reinstall the package: pip install -e .")
    named = [point for point in points if argv and point.name == argv[0]]
    providers: list[CommandProvider] = []
    seen: set[str] = set()
    for point in named or points:
        if point.value not in seen:
            seen.add(point.value)
            providers.append(point.load())
    return providers


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``privatune`` parser with the commands ``argv`` needs (every one by default)."""
    parser = argparse.ArgumentParser(
        prog="privatune", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Privacy-preserving federated LoRA fine-tuning for hospitals (Flower + Opacus).",
        epilog="who runs what:\n"
               "  a hospital:          node, keys\n"
               "  the coordinator:     coordinator, certs, export\n"
               "  a privacy officer:   plan, audit\n"
               "  a researcher:        simulate, study, empirical-audit, fault-drill (one machine)\n"
               "'privatune COMMAND --help' shows a command's options.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_commands_of_a_side in _providers(argv):
        add_commands_of_a_side(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``privatune COMMAND ...``: a configuration or input error is one line on stderr, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
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
