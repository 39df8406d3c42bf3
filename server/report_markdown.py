"""report.md: the run report for people, section by section (sites, rounds, failures,
traffic, the overfitting watch, generation and clinical scores, sample completions)."""

from __future__ import annotations

import re
from typing import Any

from privatune.common.generation import GenerationScores
from privatune.server.failure_reasons import (FAILURE_LOG, failure_log, failure_reason,
                                              round_failures)
from privatune.server.overfitting import render_watch
from privatune.server.report import GENERATION_FIELDS, RunReport
from privatune.server.report_plots import GENERATION_PLOT
from privatune.server.rounds import RoundTraining, site_records


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


def render_markdown(report: RunReport) -> str:
    """A human-readable summary: per-site perplexity and privacy, then round by round."""
    lines = [f"# privatune run {report.run_id}", ""]
    if report.base_model_description:
        lines += [f"Base model: {report.base_model_description}.", ""]
    central = report.central
    if central.base_perplexity is not None:
        lines += [f"Global model on the coordinator's held-out set: perplexity "
                  f"{_fmt(central.base_perplexity)} (base) -> "
                  f"{_fmt(central.final_perplexity)} (final), "
                  f"{_change(central.base_perplexity, central.final_perplexity)}.", ""]
    lines += ["## Sites", "",
              "Perplexity is on each site's own held-out split. *Local only* is the same site "
              "training alone with the same privacy budget.", "",
              "| site | base ppl | final global ppl | change | local-only ppl | epsilon | budget | "
              "delta | within budget |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, site in report.sites.items():
        within = site.within_budget
        lines.append(
            f"| {name} | {_fmt(site.base_perplexity)} | {_fmt(site.final_perplexity)} | "
            f"{_change(site.base_perplexity, site.final_perplexity)} | "
            f"{_fmt(site.local_only_perplexity)} | {_fmt(site.epsilon, 3)} | "
            f"{_fmt(site.epsilon_budget)} | {_fmt(site.delta, 8)} | "
            f"{'yes' if within else 'NO' if within is False else 'n/a'} |")
    records = site_records(report.rounds)
    if records:
        lines += ["", "Ledger heads the sites reported (the last one; `privatune audit LEDGER --run "
                  "report.json` checks a site's ledger still holds every one, and lists every "
                  "update received):", "",
                  "| site | last head (entry, hash) | heads reported | updates received |",
                  "|---|---|---|---|"]
        for name, record in records.items():
            last = record.heads[-1] if record.heads else None
            shown = f"{last.seq}, {last.hash[:16]}..." if last else "none"
            lines.append(f"| {name} | {shown} | {len(record.heads)} | {len(record.received)} |")
    lines += ["", "## Rounds", "", "| round | global ppl | sites that took part | declined | failures |",
              "|---|---|---|---|---|"]
    for record in report.rounds:
        training = record.training or RoundTraining()
        declined = "; ".join([f"{s}: {r}" for s, r in training.declined.items()]
                             + [f"{s} (evaluation): {r}"
                                for s, r in record.evaluation.evaluation_declined.items()]) or "-"
        lines.append(f"| {record.round} | {_fmt(record.evaluation.global_perplexity)} | "
                     f"{', '.join(training.participants) or '-'} | {declined} | "
                     f"{len(training.failures)} |")
    lines += failure_lines(report)
    lines += [""] + traffic_lines(report)
    lines += render_watch(report.rounds)
    lines += ["What left each site: the clipped, noised LoRA adapter updates (covered by DP), "
              "and the non-private metrics its policy allows (example counts, losses, generation "
              "scores), all listed in the site's ledger (`sites/<site>/ledger.jsonl` in a "
              "simulation).", "",
              "![perplexity and epsilon per round](report.png)", ""]
    lines += generation_lines(report)
    return "\n".join(lines)


def failure_lines(report: RunReport) -> list[str]:
    """Each round's failures in report.md, one line each (``failure_reason``)."""
    lines = [f"- round {record.round} ({phase}): {failure_reason(failure)}"
             for record in report.rounds for phase, failure in round_failures(record)]
    if not lines:
        return []
    full = f"; the full error texts are in `{FAILURE_LOG}`" if failure_log(report.rounds) else ""
    return ["", f"Failures (no reply, an error reply, or a rejected update){full}:", "", *lines]


def traffic_lines(report: RunReport) -> list[str]:
    """The Traffic section of report.md: adapter bytes of each round's train exchange."""
    rounds = [r for r in report.rounds if r.training is not None and r.training.bytes_sent is not None]
    if not rounds:
        return []
    federation = report.config.get("federation", {})
    if federation.get("mode") == "secure_dpsgd":
        what = ("Secure DP-SGD: no site sends an update of its own. Bytes per round, every step "
                "of it: to the nodes, the global adapter (A and B, float32) with each step's "
                "request and the SecAgg+ messages passed on (keys, encrypted shares); from the "
                "sites, their SecAgg+ messages (public keys, encrypted shares, masked inputs, "
                "unmasking shares).")
    else:
        aggregation = federation.get("aggregation", "fedavg")
        sent = ("B only (lora_A stays frozen at the run's seeded initialisation)"
                if aggregation == "ffa" else "both LoRA factors")
        what = (f"Aggregation `{aggregation}`: each site's update carries {sent}. Bytes of LoRA "
                "tensors (float32 on the wire) per round: the global adapter (A and B) to every "
                "node asked, and the updates back.")
    lines = ["## Traffic", "", what, "",
             "| round | to nodes | from sites | per site update |", "|---|---|---|---|"]
    for record in rounds:
        training = record.training
        per_site = ", ".join(f"{s} {b}" for s, b in sorted(training.update_bytes.items())) or "-"
        lines.append(f"| {record.round} | {_fmt(training.bytes_sent)} | "
                     f"{_fmt(training.bytes_received)} | {per_site} |")
    return lines + [""]


SAMPLE_CHARS = 600  # of a prompt's end and a reference's start shown in report.md


def _scores(scores: GenerationScores | None) -> str:
    """ROUGE-L | BLEU | chrF cells of a table row."""
    if scores is None:
        return "n/a | n/a | n/a"
    return f"{scores.rouge_l:.3f} | {scores.bleu:.1f} | {scores.chrf:.1f}"


def _cut_off(scores: GenerationScores | None) -> str:
    """The completions max_new_tokens cut off, of all, e.g. "3 of 8"."""
    if scores is None or scores.cut_off is None:
        return "n/a"
    return f"{scores.cut_off} of {_fmt(scores.examples)}"


def _against(value: float | None, baseline: float | None, checked: int | None) -> str:
    """An accuracy against its trivial baseline, over ``checked`` checks where released."""
    if value is None:
        return "n/a"
    text = f"{value:.2f} vs {_fmt(baseline)}"
    return text if checked is None else f"{text} ({checked})"


def _clinical(scores: GenerationScores | None) -> str:
    """ROUGE-L | fidelity | status accuracy | derivable status accuracy | repeat-4gram cells."""
    rouge = "n/a" if scores is None else f"{scores.rouge_l:.3f}"
    clinical = None if scores is None else scores.clinical
    if clinical is None:
        return " | ".join([rouge] + ["n/a"] * 4)
    fidelity = _fmt(clinical.measurement_fidelity)
    if clinical.measurement_fidelity is not None and clinical.measurements_checked is not None:
        fidelity += f" ({clinical.measurements_checked})"
    return " | ".join([
        rouge, fidelity,
        _against(clinical.status_accuracy, clinical.status_majority_share,
                 clinical.statuses_checked),
        _against(clinical.derivable_status_accuracy, clinical.derivable_status_majority_share,
                 clinical.derivable_statuses_checked),
        _fmt(clinical.repeat_4gram)])


def clinical_lines(report: RunReport) -> list[str]:
    """The clinical accuracy table of report.md: what the completions assert, beside ROUGE-L,
    each accuracy against the share a constant answer gets (the baseline it has to beat)."""
    central = report.central
    rows: list[tuple[str, str, GenerationScores | None]] = []
    if central.base_generation is not None or central.final_generation is not None:
        rows += [("coordinator", "base", central.base_generation),
                 ("coordinator", "final global", central.final_generation)]
    for name, site in report.sites.items():
        rows += [(name, "base", site.base_generation), (name, "final global", site.final_generation)]
        if site.local_only_generation is not None:
            rows.append((name, "local only", site.local_only_generation))
    if not any(scores is not None and scores.clinical is not None for _, _, scores in rows):
        return []
    return ["", "Clinical accuracy of the same completions: *fidelity* is the share of the "
            "measurements a completion restates from its prompt that carry the prompt's value; "
            "*status* the share of the reference's control statuses (by problem) it states the "
            "same, *vs* the majority share (always answering the most common status); "
            "*derivable* only the statuses that follow from the prompt (hypertension from its "
            "BP); *repeat-4gram* the share of repeated 4-grams of words and punctuation marks "
            "(clinosim's own references score about 0.24; near 1 is a loop). In brackets: the "
            "checks pooled, where released.",
            "", "| set | model | ROUGE-L | fidelity | status vs majority | derivable vs majority "
            "| repeat-4gram |", "|---|---|---|---|---|---|---|",
            *[f"| {name} | {label} | {_clinical(scores)} |" for name, label, scores in rows]]


def _fenced(text: str) -> list[str]:
    """``text`` as a fenced block whatever backticks it holds (the fence is longer than any run)."""
    if not text.strip():
        return ["*(no text: the model stopped at once or wrote only whitespace)*"]
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", text, fence]


def generation_lines(report: RunReport) -> list[str]:
    """The generation section of report.md: per-site scores beside perplexity, the central
    scores per round, and sample completions from the coordinator's own held-out set."""
    central = report.central
    rounds = [r for r in report.rounds if r.evaluation.global_generation is not None
              or r.evaluation.site_generation]
    sites_scored = any(getattr(site, name) is not None for site in report.sites.values()
                       for name in GENERATION_FIELDS)
    if not rounds and not sites_scored:
        return []
    settings = report.config.get("evaluation", {})
    marker = settings.get("marker", "Assessment:")
    lines = ["## Generation", "",
             f"The model as a writer of notes: each held-out note is split at `{marker}` (the "
             "prompt is the history and findings up to and including it, the reference is what "
             "follows); a record with its own prompt and completion is used as it is. The model "
             f"completes the first {settings.get('max_examples', 'n/a')} prompts of each held-out "
             f"set by greedy decoding (at most {settings.get('max_new_tokens', 'n/a')} new tokens), "
             "and its text is scored against the reference: ROUGE-L F1 (0 to 1, `rouge-score`), "
             "BLEU and chrF (0 to 100, `sacrebleu`). Higher is better.", ""]
    if central.generation_tasks is not None:
        skipped = ", ".join(f"{n} {reason}" for reason, n in central.generation_skipped.items() if n)
        lines += [f"Coordinator's held-out set: {central.generation_tasks} notes make a task"
                  + (f" (skipped: {skipped})" if skipped else "") + "."]
    if central.lengths is not None:
        lines += ["", f"Lengths on the coordinator's set: {central.lengths.summary()}"]
    if central.base_generation is not None or central.final_generation is not None:
        lines += ["", "| coordinator's held-out set | ppl | ROUGE-L | BLEU | chrF | cut off |",
                  "|---|---|---|---|---|---|",
                  f"| base model | {_fmt(central.base_perplexity)} | {_scores(central.base_generation)} "
                  f"| {_cut_off(central.base_generation)} |",
                  f"| final global model | {_fmt(central.final_perplexity)} | "
                  f"{_scores(central.final_generation)} | {_cut_off(central.final_generation)} |",
                  "", "*Cut off*: completions that used all max_new_tokens without ending."]
    if report.sites:
        lines += ["", "Per site, on its own held-out notes (aggregates the site released; *n/a*: "
                  "withheld by its policy, `release.generation_scores: false`, or no held-out note "
                  "with the marker):", "",
                  "| site | model | ppl | ROUGE-L | BLEU | chrF |", "|---|---|---|---|---|---|"]
        for name, site in report.sites.items():
            for label, ppl, scores in (
                    ("base", site.base_perplexity, site.base_generation),
                    ("final global", site.final_perplexity, site.final_generation),
                    ("local only", site.local_only_perplexity, site.local_only_generation)):
                if label != "local only" or ppl is not None or scores is not None:
                    lines.append(f"| {name} | {label} | {_fmt(ppl)} | {_scores(scores)} |")
    lines += clinical_lines(report)
    if rounds:
        lines += ["", "Central scores per round:", "", "| round | ROUGE-L | BLEU | chrF |",
                  "|---|---|---|---|"]
        for record in rounds:
            lines.append(f"| {record.round} | {_scores(record.evaluation.global_generation)} |")
        lines += ["", f"![generation scores per round]({GENERATION_PLOT})"]
    if central.samples:
        lines += ["", "### Sample completions (the coordinator's own held-out set)", ""]
        for number, sample in enumerate(central.samples, start=1):
            prompt = sample.prompt if len(sample.prompt) <= SAMPLE_CHARS else \
                "..." + sample.prompt[-SAMPLE_CHARS:]
            reference = sample.reference if len(sample.reference) <= SAMPLE_CHARS else \
                sample.reference[:SAMPLE_CHARS] + "..."
            lines += [f"**Sample {number}.** Prompt:", "", *_fenced(prompt), "", "Reference:", "",
                      *_fenced(reference), "", "Base model:", "", *_fenced(sample.base), "",
                      "Final global model:", "", *_fenced(sample.final), ""]
    return lines + [""]
