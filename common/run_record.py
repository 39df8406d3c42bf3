"""What the coordinator recorded of each site, as the audit and the release gate read it.

Each reply a site sent carried its ledger head; each accepted train reply carried an update
whose SHA-256 the coordinator computed on receipt. The coordinator derives this record from its
round records and writes it (``RECORD_KEY``) into report.json and every checkpoint's
state.json, so ``audit`` and ``export`` can compare a site's ledger with it without the server's
code: a ledger that lacks a reported head was cut or rewritten, and a received update the
ledger does not list is a release it hides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privatune.common.ledger import LedgerHead

RECORD_KEY = "ledger_record"


@dataclass(frozen=True)
class ReportedHead:
    """A ledger head one reply carried: the round, and which exchange (train or evaluate)."""

    round: int
    phase: str
    seq: int
    hash: str

    @property
    def head(self) -> LedgerHead:
        return LedgerHead(self.seq, self.hash)

    def describe(self) -> str:
        return f"round {self.round} ({self.phase} reply)"


@dataclass(frozen=True)
class ReceivedUpdate:
    """An update the coordinator received from the site: the round and its SHA-256."""

    round: int
    sha256: str


@dataclass
class SiteRecord:
    """The coordinator's record of one site over a run: the heads it reported, the updates
    received from it, and the privacy figures it reported (epsilon: the highest cumulative
    figure of any of its replies; delta, cap and accountant: as last reported)."""

    site: str
    heads: list[ReportedHead] = field(default_factory=list)
    received: list[ReceivedUpdate] = field(default_factory=list)
    epsilon: float = 0.0
    delta: float | None = None
    epsilon_budget: float | None = None
    accountant: str = ""

    @property
    def within_budget(self) -> bool | None:
        return None if self.epsilon_budget is None else self.epsilon <= self.epsilon_budget

    def to_json(self) -> dict[str, Any]:
        return {"heads": [[h.round, h.phase, h.seq, h.hash] for h in self.heads],
                "received": [[u.round, u.sha256] for u in self.received],
                "epsilon": self.epsilon, "delta": self.delta,
                "epsilon_budget": self.epsilon_budget, "accountant": self.accountant}

    @classmethod
    def from_json(cls, site: str, data: dict[str, Any]) -> SiteRecord:
        return cls(site=site,
                   heads=[ReportedHead(int(r), str(p), int(s), str(h)) for r, p, s, h in data["heads"]],
                   received=[ReceivedUpdate(int(r), str(h)) for r, h in data["received"]],
                   epsilon=float(data["epsilon"]), delta=data.get("delta"),
                   epsilon_budget=data.get("epsilon_budget"),
                   accountant=str(data.get("accountant", "")))


def records_from_json(data: dict[str, Any]) -> dict[str, SiteRecord]:
    return {site: SiteRecord.from_json(site, value) for site, value in data.items()}


def read_run_record(path: Path) -> dict[str, SiteRecord]:
    """The record in a run's report.json, a checkpoint's state.json, a checkpoint directory, or
    a run directory (its report.json, else its newest checkpoint). A file without one, or a
    malformed one, is a ValueError naming the file."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "report.json", path / "state.json",
                      *sorted((path / "checkpoints").glob("round_*/state.json"), reverse=True)]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{path}: no report.json, state.json or checkpoint in it")
        path = found
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or RECORD_KEY not in data:
            raise ValueError(f"no {RECORD_KEY!r} key (a run recorded before ledger heads were "
                             "kept, or not a privatune report or checkpoint)")
        return records_from_json(data[RECORD_KEY])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not a usable record of a run: {err}") from err
