"""The study's outputs: each setting and column summarised over its seeds, and study.json,
study.md (the tables) and study.png (the plot) written from them."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from privatune.simulations.study_measurements import Measurement, RunRecord, Scores, Spread
from privatune.simulations.study_plan import (BASE, CENTRAL_DP, FEDERATED, LOCAL_ONLY,
                                              NEAREST_NOTE, NON_PRIVATE, NON_PRIVATE_ONLY,
                                              NON_PRIVATE_OVERRIDES, POOLED, PRIVATE_ONLY, SECURE,
                                              SECURE_OVERRIDES, SETTING_LABELS, SETTINGS,
                                              StudyPlan)

# --------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class ScoreSpreads:
    """``Scores`` over seeds, figure by figure."""

    rouge_l: Spread | None = None
    status_accuracy: Spread | None = None
    status_majority_share: Spread | None = None
    derivable_status_accuracy: Spread | None = None
    measurement_fidelity: Spread | None = None
    repeat_4gram: Spread | None = None
    perplexity: Spread | None = None

    @classmethod
    def of(cls, scores: Sequence[Scores | None]) -> ScoreSpreads | None:
        known = [s for s in scores if s is not None]
        if not known:
            return None
        return cls(**{f.name: Spread.of([getattr(s, f.name) for s in known])
                      for f in fields(Scores)})


@dataclass(frozen=True)
class Cell:
    """One setting in one column, over its seeds; the failures of its runs, one line each."""

    setting: str
    budget: str
    seeds: tuple[int, ...]  # seeds measured
    central: ScoreSpreads | None
    sites: ScoreSpreads | None
    noise_multiplier: Spread | None
    failures: tuple[str, ...] = ()


def summarise(plan: StudyPlan, measurements: Sequence[Measurement],
              runs: Sequence[RunRecord]) -> list[Cell]:
    """One cell per setting and column it runs in, in table order."""
    cells = []
    for setting in SETTINGS:
        for budget in plan.budgets:
            if setting in NON_PRIVATE_ONLY and budget != NON_PRIVATE:
                continue
            if setting in PRIVATE_ONLY and budget == NON_PRIVATE:
                continue
            found = [m for m in measurements if m.setting == setting and m.budget == budget.key]
            kinds = {"simulate"} if setting in (BASE, FEDERATED, LOCAL_ONLY) else {setting}
            failures = tuple(f"seed {r.seed}: {r.failure}" for r in runs
                             if r.failure and r.budget == budget.key and r.kind in kinds)
            cells.append(Cell(setting, budget.key, tuple(m.seed for m in found),
                              ScoreSpreads.of([m.central for m in found]),
                              ScoreSpreads.of([m.sites for m in found]),
                              Spread.of([m.noise_multiplier for m in found]), failures))
    return cells


# --------------------------------------------------------------------------- tables and plot


def _cell(cell: Cell, pick: Callable[[Cell], Spread | None], digits: int) -> str:
    """A table cell: the figure over the seeds measured, and how many runs failed."""
    spread = pick(cell)
    if spread is None:
        return "failed" if cell.failures and not cell.seeds else "n/a"
    failed = f" ({len(cell.failures)} failed)" if cell.failures else ""
    return spread.text(digits) + failed


def _spread(scores: str, name: str) -> Callable[[Cell], Spread | None]:
    """Picks one figure (``name``) of a cell's ``central`` or ``sites`` spreads."""
    def pick(cell: Cell) -> Spread | None:
        spreads = getattr(cell, scores)
        return getattr(spreads, name) if spreads is not None else None
    return pick


def _grid(plan: StudyPlan, cells: Sequence[Cell], pick: Callable[[Cell], Spread | None],
          digits: int) -> list[str]:
    """Rows: settings; columns: the ε, then non-private."""
    by_key = {(c.setting, c.budget): c for c in cells}
    lines = ["| setting | " + " | ".join(b.label for b in plan.budgets) + " |",
             "|---|" + "---|" * len(plan.budgets)]
    for setting in SETTINGS:
        lines.append(f"| {SETTING_LABELS[setting]} | " + " | ".join(
            _cell(by_key[(setting, b.key)], pick, digits) if (setting, b.key) in by_key else "–"
            for b in plan.budgets) + " |")
    return lines


def majority_share(cells: Sequence[Cell]) -> Spread | None:
    """The accuracy of always answering the most common status, over every cell (the
    references, so the share, are the same whatever the setting)."""
    return Spread.of([c.sites.status_majority_share.mean for c in cells
                      if c.sites is not None and c.sites.status_majority_share is not None])


def render_markdown(plan: StudyPlan, cells: Sequence[Cell], runs: Sequence[RunRecord],
                    command: str, wall_s: float) -> str:
    """study.md: ROUGE-L and status accuracy by setting and ε, the other figures, the notes
    and every failed run."""
    seed_text = "; ".join(f"{b.label}: {', '.join(map(str, plan.seeds_of(b)))}"
                          for b in plan.budgets)
    reused = sum(r.reused for r in runs)
    run_time = sum(r.wall_s or 0.0 for r in runs)
    overrides = f", with `--set {' '.join(plan.extra)}`" if plan.extra else ""
    header = (f"Command: `{command}`: {wall_s:.0f} s wall clock ({len(runs)} runs, "
              f"{run_time:.0f} s between them; {reused} of them reused from an earlier "
              f"invocation). Config: `{plan.config}`{overrides}.")
    scope = (f"Seeds: {seed_text}. A cell is the mean over its seeds, ± the sample standard "
             "deviation where there are several. Scored on each site's own held-out notes (the "
             "first `evaluation.max_examples` of them), averaged over the sites: the one set "
             "every setting is scored on (a site scores its local-only model on its own split "
             "only).")
    lines = ["# Privacy–utility study", "", header, "", scope, "",
             "## ROUGE-L", "", *_grid(plan, cells, _spread("sites", "rouge_l"), 3), "",
             "## Status accuracy", "",
             *_grid(plan, cells, _spread("sites", "status_accuracy"), 2)]
    majority = majority_share(cells)
    if majority is not None:
        lines += ["", (f"Always answering the most common status scores {majority.mean:.2f}: "
                       "the bar an accuracy has to beat.")]
    columns = ("setting", "column", "seeds", "ROUGE-L central", "status accuracy central",
               "derivable status accuracy", "measurement fidelity", "repeat-4gram",
               "perplexity central", "perplexity sites", "noise multiplier")
    lines += ["", "## Other figures", "",
              ("Central: the coordinator's own held-out notes (the local-only models are not "
               "scored there); the rest on the sites' held-out notes as above."), "",
              "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    labels = {b.key: b.label for b in plan.budgets}
    for cell in cells:
        figures = [_cell(cell, _spread("central", "rouge_l"), 3),
                   _cell(cell, _spread("central", "status_accuracy"), 2),
                   _cell(cell, _spread("sites", "derivable_status_accuracy"), 2),
                   _cell(cell, _spread("sites", "measurement_fidelity"), 2),
                   _cell(cell, _spread("sites", "repeat_4gram"), 2),
                   _cell(cell, _spread("central", "perplexity"), 1),
                   _cell(cell, _spread("sites", "perplexity"), 1),
                   _cell(cell, lambda c: c.noise_multiplier, 3)]
        lines.append(f"| {SETTING_LABELS[cell.setting]} | {labels[cell.budget]} | "
                     f"{len(cell.seeds)} | " + " | ".join(figures) + " |")
    lines += ["", "## What the rows are", "", *notes(plan)]
    failed = [(c, f) for c in cells for f in c.failures]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {SETTING_LABELS[c.setting]}, {labels[c.budget]}, {f}" for c, f in failed]
    return "\n".join(lines) + "\n"


def notes(plan: StudyPlan) -> list[str]:
    """What each row and column means, for study.md and study.json."""
    non_private = " --set ".join(NON_PRIVATE_OVERRIDES)
    return [
        (f"- **{SETTING_LABELS[BASE]}**: the job's base model before any training, scored at "
         "round 0 of the non-private federated run (every run starts from it): what any "
         "training has to beat. It saw no note, so it stands in the non-private column."),
        (f"- **{SETTING_LABELS[FEDERATED]}**: `privatune simulate` with the config as it is, "
         f"every site training with DP-SGD under its ε over {plan.rounds} rounds; the final "
         "global model."),
        (f"- **{SETTING_LABELS[SECURE]}**: the same job as a `privatune simulate` run with "
         f"`--set {' --set '.join(SECURE_OVERRIDES)}` (sites that trust secure aggregation; "
         "the noise of `secure.min_contributions` shares, at its default, meets the column's ε "
         "over every step). Each site samples its records at q = `training.batch_size` / the "
         "median of the sites' training-record counts (the rate a typical site samples at in "
         "the federated row), and the union batch is round(q × all training records), with the "
         "same rounds and local steps: as many steps, each site about as many records a step. "
         "Scored from its report like the federated row. ε columns only."),
        (f"- **{SETTING_LABELS[LOCAL_ONLY]}**: each site's local-only baseline from the same "
         "simulation (the same rounds, steps and budget, never averaged), scored on its own "
         "held-out notes."),
        (f"- **{SETTING_LABELS[CENTRAL_DP]}**: every site's training split in one place with a "
         "trusted curator (simulated only: no deployment may pool them), trained with Opacus "
         "DP-SGD at the column's ε (the job's δ and accountant) for the secure row's steps, "
         "union batch and rate, the noise multiplier calibrated by the project's accountant "
         "(never below `privacy.min_noise_multiplier`); trained and scored as the pooled row. "
         "ε columns only."),
        (f"- **{SETTING_LABELS[POOLED]}**: every site's training split in one place (the upper "
         "bound no hospital may run), trained for as many steps of the same expected batch size "
         "as one site takes in the whole run (rounds × local steps, Adam restarted each round as "
         "at a site) with noise multiplier 0; per-sample clipping at `training.max_grad_norm` "
         "stays."),
        (f"- **{SETTING_LABELS[NEAREST_NOTE]}**: no training; each prompt answered with the "
         "assessment of the pooled training note whose prompt has the most words in common "
         "(Jaccard of lowercase word sets), cut to `evaluation.max_new_tokens` tokens as a "
         "model's completion is. It copies a note, so it stands in the non-private column."),
        (f"- **non-private**: the same job with `--set {non_private}`: a site's DP-SGD cannot "
         "be switched off, so its noise is calibrated to the highest ε a job accepts, without "
         "a floor (see the noise multiplier column)."),
        ("- Hyperparameters are the config's, the same in every cell; none is tuned, on a "
         "site's held-out split or elsewhere. A seed changes the base model, the hospitals, "
         "their splits and the initial adapter; the DP noise and sampling are each site's own "
         "randomness."),
    ]


def draw_plot(plan: StudyPlan, cells: Sequence[Cell], path: Path) -> None:
    """study.png: ROUGE-L and status accuracy (sites' held-out notes) against ε, one line per
    setting (± sd as error bars), non-private at the right, the copy and the base model as
    horizontal lines."""
    from privatune.common.plots import report_figure

    budgets = plan.budgets
    by_key = {(c.setting, c.budget): c for c in cells}
    panels = (("rouge_l", "ROUGE-L"), ("status_accuracy", "status accuracy"))
    with report_figure(path, columns=2, size=(11, 4.5)) as axes:
        for axis, (name, title) in zip(axes, panels):
            pick = _spread("sites", name)
            # each line a little to the side, so equal figures and their error bars stay visible
            for setting, marker, shift in ((FEDERATED, "o", -0.06), (SECURE, "^", -0.03),
                                           (LOCAL_ONLY, "s", 0.0), (CENTRAL_DP, "v", 0.03),
                                           (POOLED, "D", 0.06)):
                points = [(x + shift, pick(by_key[(setting, b.key)]))
                          for x, b in enumerate(budgets) if (setting, b.key) in by_key]
                points = [(x, s) for x, s in points if s is not None]
                if points:
                    axis.errorbar([x for x, _ in points], [s.mean for _, s in points],
                                  yerr=[s.sd for _, s in points], marker=marker, capsize=3,
                                  label=SETTING_LABELS[setting])
            for setting, style in ((NEAREST_NOTE, "--"), (BASE, "-.")):
                reference = by_key.get((setting, NON_PRIVATE.key))
                if reference is not None and pick(reference) is not None:
                    axis.axhline(pick(reference).mean, linestyle=style, color="grey",
                                 label=SETTING_LABELS[setting])
            majority = majority_share(cells)
            if name == "status_accuracy" and majority is not None:
                axis.axhline(majority.mean, linestyle=":", color="black",
                             label="always the most common status")
            top = axis.get_ylim()[1]
            if top > 0:  # the scores start at 0; a figure of 0 is drawn whole, not cut in half
                axis.set_ylim(-0.04 * top, top)
            axis.set_xticks(range(len(budgets)), [b.label for b in budgets])
            axis.set_xlabel("each site's privacy budget")
            axis.set_title(f"{title} (sites' held-out notes)", fontsize=9)


# --------------------------------------------------------------------------- study.json, .md, .png


@dataclass
class Study:
    """Everything study.json holds."""

    command: str
    config: str
    overrides: tuple[str, ...]
    epsilons: tuple[float, ...]
    seeds: dict[str, tuple[int, ...]]  # column -> its seeds
    runs: list[RunRecord] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def write_outputs(plan: StudyPlan, study: Study) -> None:
    """study.json, study.md and study.png under --out (rewritten after every run)."""
    study.cells = summarise(plan, study.measurements, study.runs)
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "study.json").write_text(json.dumps(asdict(study), indent=2, ensure_ascii=False),
                                         encoding="utf-8")
    (plan.out / "study.md").write_text(render_markdown(plan, study.cells, study.runs,
                                                       study.command, study.wall_s),
                                       encoding="utf-8")
    draw_plot(plan, study.cells, plan.out / "study.png")
