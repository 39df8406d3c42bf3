"""The run report's figures: report.png (perplexity and epsilon per round) and
``GENERATION_PLOT`` (generation scores per round)."""

from __future__ import annotations

from pathlib import Path

from privatune.common.plots import report_figure
from privatune.server.report import RunReport

GENERATION_PLOT = "report_generation.png"


def plot_report(report: RunReport, path: Path) -> None:
    """Perplexity (global and per site) and epsilon per site, against the round."""
    rounds = report.rounds
    xs = [r.round for r in rounds]
    with report_figure(path, columns=2, size=(11, 4)) as (ax_ppl, ax_eps):
        if any(r.evaluation.global_perplexity is not None for r in rounds):
            ax_ppl.plot(xs, [r.evaluation.global_perplexity for r in rounds], "k-o",
                        label="global (central)")
        for name in report.sites:
            ax_ppl.plot(xs, [r.evaluation.site_perplexity.get(name) for r in rounds], "--.",
                        label=name)
            eps = [0.0] + [(r.epsilon or {}).get(name) for r in rounds[1:]]
            ax_eps.plot(xs, eps, "-o", label=name)
        budgets = {s.epsilon_budget for s in report.sites.values()} - {None}
        for budget in budgets:
            ax_eps.axhline(budget, color="red", linestyle=":", label=f"budget {budget:g}")
        ax_ppl.set(title="held-out perplexity", xlabel="round", ylabel="perplexity", yscale="log")
        ax_eps.set(title="cumulative epsilon per site", xlabel="round", ylabel="epsilon")
        for axis in (ax_ppl, ax_eps):
            axis.set_xticks(xs)


def plot_generation(report: RunReport, path: Path) -> None:
    """The central ROUGE-L, BLEU and chrF per generation round (sites' ROUGE-L dashed)."""
    rounds = [r for r in report.rounds if r.evaluation.global_generation is not None
              or r.evaluation.site_generation]
    xs = [r.round for r in rounds]
    with report_figure(path, columns=2, size=(11, 4)) as (ax_rouge, ax_bleu):
        central = [r.evaluation.global_generation for r in rounds]
        if any(c is not None for c in central):
            ax_rouge.plot(xs, [c.rouge_l if c else None for c in central], "k-o",
                          label="global (central)")
            ax_bleu.plot(xs, [c.bleu if c else None for c in central], "-o", label="BLEU (central)")
            ax_bleu.plot(xs, [c.chrf if c else None for c in central], "-s", label="chrF (central)")
        for name in report.sites:
            values = [r.evaluation.site_generation.get(name) for r in rounds]
            if any(v is not None for v in values):
                ax_rouge.plot(xs, [v.rouge_l if v else None for v in values], "--.", label=name)
        ax_rouge.set(title="ROUGE-L F1 of greedy completions", xlabel="round", ylabel="ROUGE-L")
        ax_bleu.set(title="BLEU and chrF, coordinator's held-out set", xlabel="round",
                    ylabel="score (0-100)")
        for axis in (ax_rouge, ax_bleu):
            axis.set_xticks(xs)
