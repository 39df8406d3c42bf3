"""``privatune fault-drill``: runs the deployment's fault scenarios (``deployment_faults``)
and writes their summary (``fault_report``) to ``<out>/faults.md`` and ``<out>/faults.json``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from privatune.common.base_model import ensure_base_model
from privatune.simulations.deployment_faults import (SCENARIOS, SITES, TINY_MODEL, log, read_report,
                                                     run_figures, run_scenario, site_figures)
from privatune.simulations.fault_report import summary_markdown
from privatune.simulations.loopback import LoopbackFederation


def rescan(results: dict[str, Any], out: Path, model_dir: Path) -> None:
    """Recompute the per-site figures from the scenario directories already on disk (ledgers,
    report.json), e.g. after the checks here changed, without running anything again."""
    for name, result in results.items():
        root = out / name
        if not (root / "sites").is_dir():
            continue
        fed = LoopbackFederation(root=root, model_dir=model_dir, port=0)
        fed.policies = {s: root / "sites" / s / "policy.yaml" for s in SITES}
        report = read_report(fed)
        result["sites"] = site_figures(fed, report)
        if report:
            result.update(run_figures(fed, report))


def run_drill(args: argparse.Namespace) -> int:
    """``privatune fault-drill``: the scenarios asked for, the table in ``<out>/faults.md``."""
    if args.rounds < 3:
        raise ValueError("--rounds must be at least 3 (the faults are injected in round 2)")
    if args.scenario not in ("all", *SCENARIOS):
        raise ValueError(f"--scenario {args.scenario}: not one of all, {', '.join(SCENARIOS)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = (f"privatune fault-drill --out {args.out} --rounds {args.rounds} "
               f"--round-timeout {args.round_timeout}"
               + (f" --scenario {args.scenario}" if args.scenario != "all" else ""))
    model_dir = ensure_base_model(out / "model", TINY_MODEL, log)
    results_path = out / "faults.json"
    results: dict[str, Any] = (json.loads(results_path.read_text(encoding="utf-8"))
                               if results_path.is_file() else {})
    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    if args.rescan:
        rescan(results, out, model_dir)
        results_path.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
        names = ()
    for name in names:
        results[name] = run_scenario(name, out, model_dir, args.round_timeout, args.rounds,
                                     args.budget)
        results[name]["command"] = command
        results_path.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    text = summary_markdown(results, results.get("baseline", {}).get("command", command))
    (out / "faults.md").write_text(text, encoding="utf-8")
    print(text, flush=True)
    failed = [n for n in names if "error" in results[n] or results[n].get("exit_code") != 0]
    return 1 if failed else 0
