"""Commands over shared code only, and what the node's and coordinator's commands share.

``plan`` and ``audit`` are the privacy officer's tools: they read a job config or ledgers and
need neither the node nor the coordinator, so a hospital and a coordinator installation both
have them. Heavy imports (accounting, plotting) happen inside the handlers: registering the
commands stays cheap, so ``privatune --help`` never loads torch.
"""

from __future__ import annotations

import argparse
import signal
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
                               min_noise_multiplier=job.privacy.min_noise_multiplier,
                               accountant=job.privacy.accountant_name))
    print(render_table(plans))
    if args.out:
        plot_plans(plans, Path(args.out) / "plan.png", job.privacy.epsilon)
        print(f"plot: {Path(args.out) / 'plan.png'}")
    return 1 if any(p.warnings for p in plans) else 0


def _audit(args: argparse.Namespace) -> int:
    from privatune.common.audit import audit_path, write_audit
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
