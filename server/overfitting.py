"""Watching a run for overfitting: its best round, and rounds where training and held-out part.

Two readings of the round history, both derived (recomputed from the rounds whenever asked,
never stored beside them):

- the **best round**: the trained round (1 or later: a round whose adapter is checkpointed
  under ``checkpoints/round_NNN/adapter``) whose global model had the lowest perplexity on the
  coordinator's held-out set; the federated (sites' pooled) held-out perplexity stands in when
  the run had no central evaluation set. ``privatune export --round best`` exports it.
- **overfitting flags**: rounds where the sites' mean training loss fell since the previous
  training round while the held-out loss rose. Held-out is the sites' pooled (federated)
  held-out perplexity, the central one where the sites told none. A change smaller than
  ``MIN_CHANGE`` (relative) counts as no change, so rounding noise never flags a round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from privatune.server.rounds import RoundRecord

CENTRAL = "global_perplexity"
FEDERATED = "federated_perplexity"
METRIC_NAMES = {CENTRAL: "central held-out perplexity",
                FEDERATED: "federated held-out perplexity (pooled over the sites)"}
MIN_CHANGE = 1e-3


def _metric(record: RoundRecord, name: str) -> float | None:
    value = getattr(record.evaluation, name)
    return None if value is None else float(value)


def _train_loss(record: RoundRecord) -> float | None:
    loss = getattr(record.training, "train_loss", None) if record.training else None
    return None if loss is None else float(loss)


@dataclass(frozen=True)
class BestRound:
    """The trained round with the lowest held-out perplexity (``metric`` says which one)."""

    round: int
    metric: str
    perplexity: float
    base_perplexity: float | None  # round 0 (the base model) on the same metric

    @property
    def beats_base(self) -> bool | None:
        return None if self.base_perplexity is None else self.perplexity < self.base_perplexity

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "metric": self.metric, "perplexity": self.perplexity,
                "base_perplexity": self.base_perplexity}


def best_round(rounds: Sequence[RoundRecord]) -> BestRound | None:
    """The best trained round by central held-out perplexity (federated without a central set);
    the earliest on a tie; None when no trained round was evaluated."""
    for metric in (CENTRAL, FEDERATED):
        scored = [(value, record.round) for record in rounds if record.round >= 1
                  and (value := _metric(record, metric)) is not None]
        if scored:
            perplexity, number = min(scored)
            base = next((_metric(r, metric) for r in rounds if r.round == 0), None)
            return BestRound(round=number, metric=metric, perplexity=perplexity,
                             base_perplexity=base)
    return None


@dataclass(frozen=True)
class OverfittingFlag:
    """A round whose mean training loss fell while its held-out perplexity rose."""

    round: int
    previous_round: int
    train_loss: tuple[float, float]  # the previous training round's, this round's
    heldout_perplexity: tuple[float, float]
    metric: str

    def describe(self) -> str:
        (loss_before, loss_now), (ppl_before, ppl_now) = self.train_loss, self.heldout_perplexity
        return (f"round {self.round}: mean training loss fell {loss_before:.3f} -> {loss_now:.3f} "
                f"while the {METRIC_NAMES[self.metric]} rose {ppl_before:.2f} -> {ppl_now:.2f} "
                f"(since round {self.previous_round})")

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "previous_round": self.previous_round,
                "train_loss": list(self.train_loss),
                "heldout_perplexity": list(self.heldout_perplexity), "metric": self.metric}


def heldout_metric(rounds: Sequence[RoundRecord]) -> str:
    """The held-out figure the overfitting check compares: federated where the sites told one."""
    return FEDERATED if any(_metric(r, FEDERATED) is not None for r in rounds) else CENTRAL


def overfitting_flags(rounds: Sequence[RoundRecord]) -> list[OverfittingFlag]:
    """Every round whose mean training loss fell since the previous round that had one, while
    the held-out perplexity rose over the same span."""
    metric = heldout_metric(rounds)
    flags: list[OverfittingFlag] = []
    previous: tuple[int, float, float] | None = None  # round, train loss, held-out perplexity
    for record in sorted(rounds, key=lambda r: r.round):
        loss, heldout = _train_loss(record), _metric(record, metric)
        if loss is None or heldout is None:
            continue
        if previous is not None:
            number, loss_before, heldout_before = previous
            if (loss < loss_before * (1 - MIN_CHANGE)
                    and heldout > heldout_before * (1 + MIN_CHANGE)):
                flags.append(OverfittingFlag(round=record.round, previous_round=number,
                                             train_loss=(loss_before, loss),
                                             heldout_perplexity=(heldout_before, heldout),
                                             metric=metric))
        previous = (record.round, loss, heldout)
    return flags


def render_watch(rounds: Sequence[RoundRecord]) -> list[str]:
    """The report.md section: the best round, the overfitting flags, and the figures behind them."""
    best, flags = best_round(rounds), overfitting_flags(rounds)
    metric = heldout_metric(rounds)
    lines = ["## Watching for overfitting", ""]
    if best is None:
        lines.append("Best round: n/a (no trained round was evaluated on held-out data).")
    else:
        lines.append(f"Best round: **{best.round}** ({METRIC_NAMES[best.metric]} "
                     f"{best.perplexity:.2f}; `privatune export RUN --round best` exports it)"
                     + (f". No round beat the base model ({best.base_perplexity:.2f})."
                        if best.beats_base is False else "."))
    lines.append("")
    if flags:
        lines += ["**Possible overfitting**: the sites' training loss fell while the held-out "
                  "loss rose:", ""] + [f"- {flag.describe()}" for flag in flags]
    else:
        lines.append("No round where the sites' mean training loss fell while the held-out "
                     "loss rose.")
    flagged = {flag.round for flag in flags}
    lines += ["", f"| round | mean training loss | {METRIC_NAMES[metric]} | |", "|---|---|---|---|"]
    for record in rounds:
        loss, heldout = _train_loss(record), _metric(record, metric)
        marks = (["best"] if best is not None and record.round == best.round else []) \
            + (["overfitting?"] if record.round in flagged else [])
        lines.append(f"| {record.round} | {'n/a' if loss is None else f'{loss:.3f}'} | "
                     f"{'n/a' if heldout is None else f'{heldout:.2f}'} | {', '.join(marks)} |")
    return lines + [""]
