"""``privatune empirical-audit``: the command's options, kept apart from the audit itself.

The audit module imports torch and Opacus; registering its subcommand must not, or every
``privatune`` command (``plan``, ``audit``...) would pay that start-up time.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from privatune.common.config import ConfigError
from privatune.common.extras import require_extra

from privatune.simulations.canaries import (DEFAULT_CANARIES_PER_COUNT, DEFAULT_CANDIDATES,
                                            DEFAULT_REPETITIONS)


def parse_repetitions(text: str) -> tuple[int, ...]:
    """``1,4,16`` -> (1, 4, 16); argparse type for --repetitions."""
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not counts or any(c < 1 for c in counts) or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"expected distinct positive counts like 1,4,16, got {text!r}")
    return counts


def _handler(args: argparse.Namespace) -> int:
    started = time.monotonic()
    for extra in ("simulation", "report"):  # clinosim's hospitals; the report's figure
        require_extra(extra, "privatune empirical-audit")
    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    import torch
    from transformers.utils import logging as transformers_logging

    from privatune.simulations.audit_report import epsilon_text
    from privatune.simulations.empirical_audit import empirical_audit
    from privatune.simulations.membership import strongest_attack

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", FutureWarning)  # libraries' deprecation notices
    transformers_logging.disable_progress_bar()  # one "Loading weights" bar per model load

    def progress(line: str) -> None:
        print(f"[{time.monotonic() - started:6.0f}s] {line}", flush=True)

    report = empirical_audit(Path(args.config), Path(args.out), args.set, args.repetitions,
                             args.hospitals, args.canaries_per_count, args.candidates, progress)
    for key in ("dp", "non_dp"):
        run = report["runs"][key]
        print(f"{run['label']}: epsilon {epsilon_text(run['epsilon'])}, best MIA AUC {strongest_attack(run):.3f}, "
              "exposure " + ", ".join(f"{c}x {v['mean']:.1f}" for c, v in run["exposure"].items())
              + f" bits (max {report['secret_format']['max_exposure']:.1f})")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def add_empirical_audit_command(commands: argparse._SubParsersAction) -> None:
    """Register ``privatune empirical-audit`` on the CLI's subcommands."""
    parser = commands.add_parser(
        "empirical-audit", help="plant canaries at one simulated hospital, train with and without "
        "DP, and measure exposure and membership inference")
    parser.add_argument("--config", required=True, help="job config YAML, e.g. configs/audit.yaml")
    parser.add_argument("--out", required=True, help="directory for report.json, report.md, report.png")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set privacy.epsilon=4 (repeatable)")
    parser.add_argument("--repetitions", type=parse_repetitions, default=DEFAULT_REPETITIONS,
                        metavar="N,N,...", help="copies of each canary (default 1,4,16)")
    parser.add_argument("--hospitals", type=int, default=None,
                        help="use the first N simulated hospitals (default: data.hospitals)")
    parser.add_argument("--canaries-per-count", type=int, default=DEFAULT_CANARIES_PER_COUNT,
                        help=f"distinct secrets per repetition count (default {DEFAULT_CANARIES_PER_COUNT})")
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES,
                        help=f"random secrets each canary is ranked against (default {DEFAULT_CANDIDATES})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine more threads "
                             "contend and can make each step many times slower)")
    parser.set_defaults(handler=_handler)
