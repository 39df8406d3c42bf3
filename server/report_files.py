"""Writing the run report's files: report.json, report.md, report.png, the generation plot and
``FAILURE_LOG``."""

from __future__ import annotations

import json
from pathlib import Path

from privatune.server.failure_reasons import FAILURE_LOG, failure_log
from privatune.server.report import RunReport
from privatune.server.report_markdown import render_markdown
from privatune.server.report_plots import GENERATION_PLOT, plot_generation, plot_report


def write_report(report: RunReport, out_dir: Path) -> None:
    """Write report.json, report.md, report.png and, when a failure was shortened,
    ``FAILURE_LOG`` into ``out_dir`` (each replaced atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [("report.json", json.dumps(report.to_json(), indent=2, default=str)),
             ("report.md", render_markdown(report))]
    if log := failure_log(report.rounds):
        files.append((FAILURE_LOG, log))
    for name, text in files:
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out_dir / name)
    plot_report(report, out_dir / "report.png")
    if any(r.evaluation.global_generation or r.evaluation.site_generation for r in report.rounds):
        plot_generation(report, out_dir / GENERATION_PLOT)
