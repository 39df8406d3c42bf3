"""The fault drill's summary (``<out>/faults.md``): one row per scenario, the checks behind
it, per-round perplexity and each scenario's details."""

from __future__ import annotations

import json
from typing import Any

from privatune.simulations.deployment_faults import NOTES_PER_SITE, SCENARIOS, SITES


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def _after_round(line: str | None) -> str:
    """'after round N' of a coordinator's 'resuming run ... after round N from ...' line."""
    return ("resumed after " + line.split(" from ", 1)[0].split(" after ", 1)[1]) if line else "no resume"


def outcome(name: str, r: dict[str, Any]) -> str:
    """What happened in a scenario, in one table cell."""
    if "error" in r:
        return "-"
    if name == "node-killed":
        return (f"{r['killed_site']} killed at {r['killed_at_s']:.0f} s; in rounds "
                f"{r.get('killed_site_rounds')}")
    if name == "coordinator-killed":
        return f"killed at {r['first_attempt_s']:.0f} s; restarted: {_after_round(r.get('resumed_line'))}"
    if name == "superlink-restarted":
        online = r.get("nodes_online_again_at_s")
        online = f"{online:.0f} s" if isinstance(online, (int, float)) else str(online)
        return (f"killed at {r['killed_at_s']:.0f} s, back at {r['superlink_back_at_s']:.0f} s; "
                f"nodes online again at {online}; run went on by itself: "
                f"{'yes' if r.get('run_finished_by_itself') else 'no'} (first coordinator: "
                f"exit {r.get('coordinator_1_exit')}); restarted coordinator: "
                f"{_after_round(r.get('resumed_line')) if 'resumed_attempt_s' in r else 'not needed'}")
    if name == "disk-full":
        reasons = {v for v in r.get("full_site_train_declines", {}).values() if v}
        return (f"{r['full_site']}: appends fail from round 2; train declined in rounds "
                f"{[int(k) for k, v in r.get('full_site_train_declines', {}).items() if v]}"
                f" ({'; '.join(sorted(reasons)) or 'no reason'}); its ledger holds updates of "
                f"rounds {r.get('full_site_updates_in_ledger')}, torn line: "
                f"{'none' if not r.get('ledger_torn_line') else 'YES'}, side files: "
                f"{len(r.get('side_files', []))}")
    return "uninterrupted"


def summary_markdown(results: dict[str, dict[str, Any]], command: str) -> str:
    """The table the issue asks for, plus the checks behind it."""
    lines = ["# Deployment fault tolerance", "",
             f"Measured with `{command}` (3 hospital SuperNodes, SuperLink with TLS, node "
             f"authentication and state database, loopback; tiny model, {NOTES_PER_SITE} notes "
             "per site).", "",
             "| scenario | rounds completed | wall time (s) | final global ppl | "
             + " | ".join(f"{s} eps report / ledger" for s in SITES) + " | audit | what happened |",
             "|---|---|---|---|" + "---|" * len(SITES) + "---|---|"]
    for name in SCENARIOS:
        r = results.get(name)
        if r is None:
            continue
        sites = r.get("sites", {})
        eps = [f"{_num(sites.get(s, {}).get('epsilon_report'))} / "
               f"{_num(sites.get(s, {}).get('epsilon_ledger'))}" for s in SITES]
        audits = ", ".join(f"{s} {sites[s]['audit']}" for s in SITES if s in sites) or "n/a"
        rounds = (f"{r.get('rounds_completed', 'n/a')}/{r.get('rounds_planned')}"
                  if "error" not in r else f"ERROR: {r['error']}")
        lines.append(f"| {name} | {rounds} | {_num(r.get('wall_s'), 1)} | "
                     f"{_num(r.get('final_global_perplexity'))} | " + " | ".join(eps)
                     + f" | {audits} | {outcome(name, r)} |")
    problems = sorted({f"{s}: {p}" for r in results.values()
                       for s, info in r.get("sites", {}).items() for p in info["audit_problems"]})
    if problems:
        lines += ["", "Audit problems (`common.audit`, independent dp-accounting RDP):", ""]
        lines += [f"- {p}" for p in problems]
    count = 1 + max((int(r.get("rounds_planned", 0)) for r in results.values()), default=0)
    lines += ["", "## Per-round global perplexity (coordinator's held-out set)", "",
              "| scenario | " + " | ".join(f"round {i}" for i in range(count)) + " |",
              "|---|" + "---|" * count]
    for name in SCENARIOS:
        r = results.get(name)
        if r and "global_perplexity" in r:
            ppl = r["global_perplexity"]
            lines.append(f"| {name} | " + " | ".join(_num(ppl.get(str(i))) for i in range(count))
                         + " |")
    lines += ["", "## Details", ""]
    for name in SCENARIOS:
        r = results.get(name)
        if not r:
            continue
        lines.append(f"### {name}")
        lines.append("")
        for key in ("participants", "aggregated", "declined", "killed_site", "killed_at_s",
                    "killed_site_rounds", "killed_run_id", "killed_run_final_status",
                    "first_attempt_s", "resumed_attempt_s", "checkpoints_at_kill",
                    "round2_released_before_kill", "killed_superlink_pids",
                    "serverapp_alive_after_kill", "coordinator_1_exit_after_kill",
                    "superlink_back_at_s", "nodes_online_again_at_s", "coordinator_1_exit",
                    "coordinator_1_last_lines", "run_finished_by_itself",
                    "serverapp_alive_before_resume", "file_size_limit", "limited_pids",
                    "ledger_entries_at_limit", "ledger_entries_after", "ledger_torn_line",
                    "side_files", "full_site_train_declines", "full_site_evaluation_declines",
                    "full_site_updates_in_ledger", "resumed_line", "round_end_s",
                    "round_end_s_resumed", "error"):
            if key in r:
                lines.append(f"- {key}: `{json.dumps(r[key])}`")
        for site, info in r.get("sites", {}).items():
            problems = "; ".join(info["audit_problems"])
            lines.append(f"- {site}: ledger releases (run, round, update hash) "
                         f"`{json.dumps(info['ledger_releases'])}`, rounds in report "
                         f"`{info['rounds_in_report']}`, releases not in the report "
                         f"{info.get('releases_not_in_report')}, audit {info['audit']}"
                         + (f" ({problems})" if problems else ""))
        lines.append("")
    b = results.get("baseline", {}).get("final_global_perplexity")
    for name in SCENARIOS[1:]:
        c = results.get(name, {}).get("final_global_perplexity")
        if b and c:
            lines.append(f"Final global perplexity, {name}: {c:.3f} vs baseline {b:.3f} "
                         f"({100 * (c - b) / b:+.1f}%).")
    return "\n".join(lines)
