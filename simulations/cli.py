"""The ``privatune`` command: one entry point with a subcommand per task.

It lives in ``simulations`` because that is the one package allowed to import the node
(client), the coordinator (server) and the shared code together.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from common.config import ConfigError


def _simulate(args: argparse.Namespace) -> int:
    from simulations.runner import simulate

    report = simulate(Path(args.config), Path(args.out), args.set, overwrite=args.overwrite)
    worst = max((s["epsilon"] / s["epsilon_budget"] for s in report["sites"].values()
                 if s.get("epsilon_budget")), default=0.0)
    print(f"report: {Path(args.out) / 'report.md'} (highest share of a site budget spent: "
          f"{100 * worst:.0f}%)")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as err:
        print(f"privatune: configuration error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
