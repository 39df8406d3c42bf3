"""The run report: report.json (machine-readable), report.md (people) and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from privatune.common.plots import report_figure


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _change(base: float | None, final: float | None) -> str:
    if not base or final is None:
        return "n/a"
    return f"{100.0 * (final - base) / base:+.1f}%"


def render_markdown(report: dict[str, Any]) -> str:
    """A human-readable summary: per-site perplexity and privacy, then round by round."""
    lines = [f"# privatune run {report['run_id']}", ""]
    central = report.get("central", {})
    if central.get("base_perplexity") is not None:
        lines += [f"Global model on the coordinator's held-out set: perplexity "
                  f"{_fmt(central['base_perplexity'])} (base) -> "
                  f"{_fmt(central['final_perplexity'])} (final), "
                  f"{_change(central['base_perplexity'], central['final_perplexity'])}.", ""]
    lines += ["## Sites", "",
              "Perplexity is on each site's own held-out split. *Local only* is the same site "
              "training alone with the same privacy budget.", "",
              "| site | base ppl | final global ppl | change | local-only ppl | epsilon | budget | "
              "delta | within budget |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, site in report["sites"].items():
        within = (site["epsilon"] <= site["epsilon_budget"]
                  if site.get("epsilon_budget") is not None else None)
        lines.append(
            f"| {name} | {_fmt(site.get('base_perplexity'))} | {_fmt(site.get('final_perplexity'))} | "
            f"{_change(site.get('base_perplexity'), site.get('final_perplexity'))} | "
            f"{_fmt(site.get('local_only_perplexity'))} | {_fmt(site.get('epsilon'), 3)} | "
            f"{_fmt(site.get('epsilon_budget'))} | {_fmt(site.get('delta'), 8)} | "
            f"{'yes' if within else 'NO' if within is False else 'n/a'} |")
    lines += ["", "## Rounds", "", "| round | global ppl | sites that took part | declined | failures |",
              "|---|---|---|---|---|"]
    for record in report["rounds"]:
        declined = "; ".join(f"{s}: {r}" for s, r in record.get("declined", {}).items()) or "-"
        lines.append(f"| {record['round']} | {_fmt(record.get('global_perplexity'))} | "
                     f"{', '.join(record.get('participants', [])) or '-'} | {declined} | "
                     f"{len(record.get('failures', []))} |")
    lines += ["", "What left each site: the clipped, noised LoRA adapter updates (covered by DP), "
              "and the non-private metrics its policy allows (example counts, losses), all listed "
              "in the site's ledger (`sites/<site>/ledger.jsonl` in a simulation).", "",
              "![perplexity and epsilon per round](report.png)", ""]
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Perplexity (global and per site) and epsilon per site, against the round."""
    rounds = report["rounds"]
    xs = [r["round"] for r in rounds]
    with report_figure(path, columns=2, size=(11, 4)) as (ax_ppl, ax_eps):
        if any(r.get("global_perplexity") is not None for r in rounds):
            ax_ppl.plot(xs, [r.get("global_perplexity") for r in rounds], "k-o",
                        label="global (central)")
        for name in report["sites"]:
            ax_ppl.plot(xs, [r.get("site_perplexity", {}).get(name) for r in rounds], "--.",
                        label=name)
            eps = [0.0] + [r.get("epsilon", {}).get(name) for r in rounds[1:]]
            ax_eps.plot(xs, eps, "-o", label=name)
        budgets = {s.get("epsilon_budget") for s in report["sites"].values()} - {None}
        for budget in budgets:
            ax_eps.axhline(budget, color="red", linestyle=":", label=f"budget {budget:g}")
        ax_ppl.set(title="held-out perplexity", xlabel="round", ylabel="perplexity", yscale="log")
        ax_eps.set(title="cumulative epsilon per site", xlabel="round", ylabel="epsilon")
        for axis in (ax_ppl, ax_eps):
            axis.set_xticks(xs)


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """Write report.json, report.md and report.png into ``out_dir`` (each replaced atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.json", json.dumps(report, indent=2, default=str)),
                       ("report.md", render_markdown(report))):
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out_dir / name)
    plot_report(report, out_dir / "report.png")
