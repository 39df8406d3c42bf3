"""The audit's report: ``privatune audit``'s Markdown and HTML pages and its figure.

What ``common.audit`` found (``SiteAudit``: the recorded, recomputed and bounding epsilons, the
problems, the non-private releases, and a secure site's two guarantees) rendered for a privacy
officer: ``render_markdown`` (the headline table, each site's releases, the secure tables),
``render_html`` (the same page as self-contained HTML), ``plot_audit`` (epsilon per release) and
``write_audit``, which writes them into a directory.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from privatune.common.audit import PLD_PER_RELEASE_LIMIT, SiteAudit
from privatune.common.extras import has_extra
from privatune.common.plots import report_figure
from privatune.common.privacy import accountant_note



def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_markdown(audits: list[SiteAudit], plot_name: str | None = None) -> str:
    """The audit report a privacy officer reads."""
    verdict = "PASS" if all(a.ok for a in audits) else "FAIL"
    lines = [f"# Privacy audit: {verdict}", "",
             "The headline is the epsilon each node recorded by its own accountant. It is "
             "recomputed from the site's recorded mechanism history by an implementation "
             "independent of the node's Opacus (Google's `dp-accounting`), like with like: its RDP "
             "for an RDP entry, its PLD (privacy loss distributions, as tight as PRV) for a PRV "
             "entry, with disagreements over 1% flagged. The looser RDP bound of the same history "
             "stands beside it. PLD is given for every release of a ledger of at most "
             f"{PLD_PER_RELEASE_LIMIT} releases, else for the last one (the cumulative figure).", "",
             *[f"- {accountant_note(name)}." for name in sorted({a.accountant for a in audits})], "",
             "| site | chain | releases | delta | budget | recorded eps | accountant | "
             "recomputed eps | RDP eps | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for a in audits:
        releases = len(a.rounds) + len(a.secure_rounds)
        lines.append(f"| {a.name} | {'ok' if a.chain_error is None else 'BROKEN'} | "
                     f"{releases} | {_fmt(a.delta, 8) if a.delta else 'n/a'} | "
                     f"{_fmt(a.budget, 2) if a.budget else 'n/a'} | {_fmt(a.recorded_epsilon)} | "
                     f"{a.accountant} | {_fmt(a.recomputed_epsilon)} | {_fmt(a.rdp_epsilon)} | "
                     f"{'ok' if a.ok else 'PROBLEM'} |")
    lines += _secure_summary(audits)
    if plot_name:
        lines += ["", f"![epsilon per release]({plot_name})"]
    for a in audits:
        lines += ["", f"## {a.name}", "", f"Ledger: `{a.path}`", ""]
        if a.chain_error:
            lines += [f"**Hash chain broken**: {a.chain_error}", ""]
        for problem in a.problems:
            lines.append(f"- **problem**: {problem}")
        if a.rounds or not a.secure_rounds:  # a site of secure releases alone: their table only
            lines += ["", "| # | run | round | unit | noise | sampling rate | steps | clip | "
                      "recorded eps | accountant | recomputed eps | RDP eps | PLD eps |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in a.rounds:
            release = r.release
            withheld = " (withheld, counted)" if release.withheld else ""
            lines.append(f"| {r.seq} | {release.run_id} | {release.round}{withheld} | "
                         f"{release.privacy_unit} | {_fmt(release.noise_multiplier)} | "
                         f"{_fmt(release.sample_rate)} | {release.steps} | "
                         f"{release.max_grad_norm} | {_fmt(r.recorded_epsilon)} | {r.accountant} | "
                         f"{_fmt(r.recomputed_epsilon)} | {_fmt(r.rdp_epsilon)} | "
                         f"{_fmt(r.pld_epsilon)} |")
        for numbered in a.rollbacks:
            ack = numbered.record
            lines.append(f"- **acknowledged rollback** (#{numbered.seq}): the ledger had lost "
                         f"entries up to the head {ack.reported_seq} the site reported; its "
                         f"reported epsilon {ack.reported_epsilon:.4f} (delta "
                         f"{ack.reported_delta:g}) is a floor under the figures after it (basic "
                         "composition)")
        lines += _secure_rows(a)
        lines += ["", "Non-private releases (not covered by DP-SGD):", ""]
        if not a.non_private:
            lines.append("- none")
        for numbered in a.non_private:
            release = numbered.record
            what = (release.values if release.values is not None
                    else release.reason if release.reason is not None else "")
            lines.append(f"- #{numbered.seq} round {release.round}: {release.release} {what}")
    return "\n".join(lines) + "\n"


def _guarantee_name(trusted: bool) -> str:
    return "(a) aggregate" if trusted else "(b) fallback"


def _secure_summary(audits: list[SiteAudit]) -> list[str]:
    """Both guarantees of each site with secure releases (nothing when none has any)."""
    secure = [a for a in audits if a.secure_rounds]
    if not secure:
        return []
    lines = ["", "Secure DP-SGD: each secure release gives its site two guarantees, (a) from the "
             "aggregate noise of at least t contributions, which holds while secure aggregation "
             "does (the coordinator sees only their sum), and (b) from the site's own noise share "
             "alone, which holds whatever happens. The cap holds the one the site's policy "
             "enforces: the figures above. PRV cannot compose the Skellam mechanism, so from a "
             "site's first secure release on its figures are RDP whatever accountant its entries "
             "name: the Gaussian steps and the conversion recomputed by `dp-accounting`, the "
             "Skellam steps by privatune's own bound (not independent), checked never to fall "
             "below `dp-accounting`'s Gaussian at the same noise (the Gaussian limit, a lower "
             "bound).", "",
             "| site | secure releases | t | cap on | (a) eps | (a) Gaussian limit | (b) eps |",
             "|---|---|---|---|---|---|---|"]
    for a in secure:
        trusted = {r.release.trusted for r in a.secure_rounds}
        cap_on = _guarantee_name(trusted.pop()) if len(trusted) == 1 else "changed (see rows)"
        shares = sorted({r.release.min_contributions for r in a.secure_rounds})
        lines.append(f"| {a.name} | {len(a.secure_rounds)} | "
                     f"{', '.join(map(str, shares))} | {cap_on} | {_fmt(a.aggregate_epsilon)} | "
                     f"{_fmt(a.aggregate_limit_epsilon)} | {_fmt(a.fallback_epsilon)} |")
    return lines


def _secure_rows(audit: SiteAudit) -> list[str]:
    """A site's secure releases, each with both guarantees after it (none: nothing)."""
    if not audit.secure_rounds:
        return []
    lines = ["", "Secure releases (cumulative epsilon after each; noise is the aggregate of t "
             "shares):", "",
             "| # | run | round | step | unit | noise | sampling rate | steps | clip | t | sites | "
             "cap on | recorded eps | recomputed eps | (a) recorded | (a) recomputed | "
             "(a) Gaussian limit | (b) recorded | (b) recomputed |",
             "|" + "---|" * 19]
    for r in audit.secure_rounds:
        release = r.release
        withheld = " (withheld, counted)" if release.withheld else ""
        lines.append(f"| {r.seq} | {release.run_id} | {release.round}{withheld} | "
                     f"{release.step} | {release.privacy_unit} | "
                     f"{_fmt(release.noise_multiplier)} | {_fmt(release.sample_rate)} | "
                     f"{release.steps} | {release.max_grad_norm} | "
                     f"{release.min_contributions} | {release.max_sites} | "
                     f"{_guarantee_name(release.trusted)} | {_fmt(float(release.epsilon))} | "
                     f"{_fmt(r.enforced_epsilon)} | {_fmt(float(release.aggregate_epsilon))} | "
                     f"{_fmt(r.aggregate_epsilon)} | {_fmt(r.aggregate_limit_epsilon)} | "
                     f"{_fmt(float(release.fallback_epsilon))} | {_fmt(r.fallback_epsilon)} |")
    return lines


def render_html(markdown_text: str) -> str:
    """A self-contained HTML page (tables kept as preformatted text, images inlined by name)."""
    body = []
    for line in markdown_text.splitlines():
        if line.startswith("!["):
            target = line.split("(", 1)[1].rstrip(")")
            body.append(f'<img src="{html.escape(target)}" alt="epsilon per release">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.strip():
            body.append(f"<pre>{html.escape(line)}</pre>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>privatune audit</title>"
            "<style>pre{margin:0;font-family:monospace}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


def plot_audit(audits: list[SiteAudit], path: Path) -> None:
    """Recorded, RDP and PLD epsilon per site against the adapter release; for a site with
    secure releases, its guarantees (a) and (b) too, each release at its place among the site's
    private releases."""
    with report_figure(path) as (axis,):
        for a in audits:
            seqs = sorted([r.seq for r in a.rounds] + [r.seq for r in a.secure_rounds])
            place = {seq: i for i, seq in enumerate(seqs, start=1)}
            xs = [place[r.seq] for r in a.rounds]
            axis.plot(xs, [r.recorded_epsilon for r in a.rounds], "-o",
                      label=f"{a.name} recorded ({a.accountant})")
            axis.plot(xs, [r.rdp_epsilon for r in a.rounds], "--", label=f"{a.name} RDP")
            pld = [(x, r.pld_epsilon) for x, r in zip(xs, a.rounds) if r.pld_epsilon is not None]
            if pld:
                axis.plot(*zip(*pld), ":" if len(pld) > 1 else "s", label=f"{a.name} PLD")
            if a.secure_rounds:
                secure_xs = [place[r.seq] for r in a.secure_rounds]
                axis.plot(secure_xs, [r.aggregate_epsilon for r in a.secure_rounds], "-^",
                          label=f"{a.name} (a) aggregate")
                axis.plot(secure_xs, [r.fallback_epsilon for r in a.secure_rounds], "-v",
                          label=f"{a.name} (b) fallback")
        for budget in {a.budget for a in audits if a.budget}:
            axis.axhline(budget, color="red", linestyle="--", label=f"budget {budget:g}")
        secure = any(a.secure_rounds for a in audits)
        axis.set(xlabel="private release" if secure else "adapter release",
                 ylabel="cumulative epsilon", title="epsilon per site")


def write_audit(audits: list[SiteAudit], out_dir: Path, fmt: str = "md") -> Path:
    """Write audit.md or audit.html plus audit.png into ``out_dir``; return the report path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = has_extra("report")  # a hospital's installation may have no plotting: text only
    if drawn:
        plot_audit(audits, out_dir / "audit.png")
    text = render_markdown(audits, "audit.png" if drawn else None)
    target = out_dir / ("audit.html" if fmt == "html" else "audit.md")
    target.write_text(render_html(text) if fmt == "html" else text, encoding="utf-8")
    return target
