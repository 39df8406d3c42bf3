"""The audit's report: ``report.json``, the side-by-side table a privacy officer reads
(``report.md``) and the exposure plot (``report.png``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from privatune.common.plots import report_figure
from privatune.simulations.membership import ATTACKS, MIN_K_FRACTION, strongest_attack


def epsilon_text(epsilon: Any) -> str:
    """ε as the report prints it: ∞ for the run without DP."""
    return "∞" if epsilon == "inf" else f"{float(epsilon):.3g}"


def render_audit_markdown(report: dict[str, Any]) -> str:
    """The side-by-side table a privacy officer reads: exposure per repetition count, MIA AUC."""
    runs = report["runs"]
    keys = [k for k in ("base", "dp", "non_dp") if k in runs]
    fmt = report["secret_format"]
    lines = [
        "# Empirical privacy audit", "",
        f"Canaries: {len(report['canaries'])} random secrets like `MRN {report['canaries'][0]['secret']}` "
        f"(format space |R| = {fmt['space_size']:,}, so exposure is at most "
        f"{fmt['max_exposure']:.1f} bits) planted in **{report['canary_site']}**'s training split "
        f"only, {report['canaries_per_count']} per repetition count, each copy its own record, in "
        f"the line \"{fmt['template']}\". Ranked against {report['candidates']:,} random secrets of "
        f"the same format.", "",
        "| | " + " | ".join(runs[k]["label"] for k in keys) + " |",
        "|---|" + "---|" * len(keys),
        "| epsilon | " + " | ".join(epsilon_text(runs[k]["epsilon"]) for k in keys) + " |",
        "| noise multiplier | " + " | ".join(_fmt_number(runs[k].get("noise_multiplier"))
                                             for k in keys) + " |",
    ]
    for count in report["repetitions"]:
        lines.append(f"| exposure, {count} cop{'y' if count == 1 else 'ies'} (bits) | " + " | ".join(
            f"{runs[k]['exposure'][str(count)]['mean']:.1f} "
            f"(sampled {runs[k]['exposure'][str(count)]['mean_sampled']:.1f})" for k in keys) + " |")
    for key, attack in ATTACKS.items():
        lines.append(f"| membership inference AUC, {attack.label} (± s.e.) | " + " | ".join(
            f"{runs[k]['mia']['attacks'][key]['auc']:.3f} ± "
            f"{runs[k]['mia']['attacks'][key]['standard_error']:.3f}" for k in keys) + " |")
    lines += [
        "| member / held-out loss | " + " | ".join(
            f"{runs[k]['mia']['member_loss']:.3f} / {runs[k]['mia']['heldout_loss']:.3f}"
            for k in keys) + " |",
        "| best attack's AUC above chance | " + " | ".join(
            f"{strongest_attack(runs[k]) - 0.5:+.3f}" for k in keys) + " |",
        "| wall time (s) | " + " | ".join(f"{runs[k]['wall_s']:.0f}" for k in keys) + " |",
        "",
        "How to read it:",
        "",
        f"- **Exposure** (Carlini et al. 2019) = log2|R| - log2(rank of the secret among all "
        f"secrets of its format, by the model's log-perplexity). A secret the model never saw "
        f"scores about 1.4 bits on average; {fmt['max_exposure']:.1f} bits means the model "
        f"would guess it first. The main figure extrapolates the rank beyond the sample with a "
        f"skew-normal fit to the candidates' log-perplexities, as in the paper; *sampled* is the "
        f"rank among the candidates themselves and cannot exceed "
        f"{report['sampled_exposure_limit']:.1f} bits.",
        f"- **Membership inference AUC**: three threshold attacks telling the training records "
        f"of {', '.join(runs[keys[0]]['mia']['sites'])} ({runs[keys[0]]['mia']['members']}, "
        f"canaries excluded) from their held-out records ({runs[keys[0]]['mia']['nonmembers']}); "
        "0.5 is chance, ± is the Hanley-McNeil standard error. Under the record privacy unit each "
        "site's split is keyed on the record, so members and non-members are exchangeable. "
        "*Loss* guesses \"member\" for a low mean loss; the base model's figure shows how far "
        "that is off 0.5 before any training (the two splits differ a little by chance). *Loss "
        "vs base model* guesses \"member\" for a large drop in loss from the base model, which "
        "discounts records that are simply easy; it is 0.5 by construction for the base model. "
        f"*Min-K%* (Shi et al. 2024) looks only at the {MIN_K_FRACTION:.0%} of a record's tokens "
        "the model finds hardest: its own details rather than the template every note shares. "
        "A privacy officer reads the highest of the three: an attacker would pick the best.",
        "- DP bounds each *record*; a secret repeated k times is a group of k records, whose "
        "guarantee is about k times weaker, so some exposure at high repetition counts is "
        "expected even under DP.",
        "- The no-DP run (no noise, no clipping) exists only for this comparison; no node can be "
        "run that way. Both runs are the federation's real round (the coordinator's, the "
        "nodes' data and aggregation); the DP run's folder (`dp/`) holds its sites' policies "
        "and ledgers, which `privatune audit` checks.",
        "", f"Total time {report['elapsed_s']:.0f} s.", "",
        "![exposure by repetitions](report.png)", "",
    ]
    return "\n".join(lines)


def _fmt_number(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3g}"


def plot_exposure(report: dict[str, Any], path: Path) -> None:
    """Exposure against repetition count, one line per run, with the format's maximum."""
    counts = report["repetitions"]
    styles = {"base": ("grey", ":"), "dp": ("tab:blue", "-"), "non_dp": ("tab:red", "-")}
    with report_figure(path, size=(6.4, 4.2), legend_location="center right") as (axis,):
        for key, run in report["runs"].items():
            color, line = styles.get(key, ("black", "-"))
            means = [run["exposure"][str(c)]["mean"] for c in counts]
            label = (f"{run['label']} (eps {epsilon_text(run['epsilon'])}, "
                     f"best MIA AUC {strongest_attack(run):.2f})")
            axis.plot(counts, means, marker="o", color=color, linestyle=line, label=label)
            for count in counts:
                points = [c["exposure"] for c in run["exposure"][str(count)]["canaries"]]
                axis.scatter([count] * len(points), points, color=color, alpha=0.35, s=14)
        maximum = report["secret_format"]["max_exposure"]
        axis.axhline(maximum, color="black", linestyle="--", linewidth=0.8,
                     label=f"max {maximum:.1f} bits")
        axis.axhline(1 / math.log(2), color="grey", linestyle="-.", linewidth=0.8,
                     label="expected for an unseen secret")
        axis.set_xscale("log", base=2)
        axis.set_xticks(counts, [str(c) for c in counts])
        axis.set(title=f"Canary exposure at {report['canary_site']}",
                 xlabel="copies in the training data", ylabel="exposure (bits)",
                 ylim=(0, maximum + 1.5))


def write_audit_report(report: dict[str, Any], out: Path) -> None:
    """report.json, report.md and report.png in ``out`` (the text files replaced atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.json", json.dumps(report, indent=2)),
                       ("report.md", render_audit_markdown(report))):
        partial = out / f"{name}.tmp"
        partial.write_text(text, encoding="utf-8")
        partial.replace(out / name)
    plot_exposure(report, out / "report.png")
