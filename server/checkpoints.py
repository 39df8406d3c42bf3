"""A checkpoint's state.json: the run, its last completed round, its rounds' records and what the
coordinator knows of each site (``SiteTally``); and whether this job may continue from the newest
checkpoint in its output directory (``checkpoint_to_resume``). The checkpoint's adapter is
written beside state.json, by ``Coordinator.checkpoint``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privatune.common.config import to_dict
from privatune.common.ledger import NO_HEAD, LedgerHead
from privatune.common.run_record import (RECORD_KEY, SCHEMA_KEY, SCHEMA_VERSION, RunIdentity,
                                         latest_checkpoint, resume_refusal, schema_problem)
from privatune.server.rounds import RoundRecord, site_records

if TYPE_CHECKING:
    from privatune.server.coordinator_settings import CoordinatorSettings


class ResumeRefused(ValueError):
    """The output directory holds checkpoints of a run this job may not continue."""


@dataclass
class SiteTally:
    """What the coordinator knows of one site so far: rounds, perplexity by round, privacy
    spend, and the node that answers for it with the ledger head of its last reply (sent back
    with the next train request, so the node can tell that its ledger lost entries)."""

    rounds: list[int] = field(default_factory=list)  # rounds whose update was accepted
    perplexity: dict[int, float | None] = field(default_factory=dict)  # round -> held-out ppl
    epsilon: float = 0.0  # cumulative, as the site last reported it
    delta: float | None = None
    epsilon_budget: float | None = None
    noise_multiplier: float | None = None
    node_id: int | None = None
    head: LedgerHead = NO_HEAD

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"rounds": list(self.rounds),
                                "perplexity": {str(k): v for k, v in self.perplexity.items()},
                                "epsilon": self.epsilon}
        for name in ("delta", "epsilon_budget", "noise_multiplier", "node_id"):  # until reported
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        if self.head.known:
            data["ledger_head"] = [self.head.seq, self.head.hash]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SiteTally:
        # JSON turned the integer round keys into text
        seq, digest = data.get("ledger_head", (NO_HEAD.seq, NO_HEAD.hash))
        return cls(rounds=[int(r) for r in data.get("rounds", [])],
                   perplexity={int(k): v for k, v in data.get("perplexity", {}).items()},
                   epsilon=float(data.get("epsilon", 0.0)), delta=data.get("delta"),
                   epsilon_budget=data.get("epsilon_budget"),
                   noise_multiplier=data.get("noise_multiplier"), node_id=data.get("node_id"),
                   head=LedgerHead(int(seq), str(digest)))

    def note_head(self, seq: int, digest: str) -> None:
        """Keep the head a reply carried (a reply that told none leaves the last one)."""
        if seq >= 0:
            self.head = LedgerHead(seq, digest)


@dataclass
class CheckpointState:
    """A checkpoint's state.json: the run, its last completed round, history and site tallies,
    and what a resume is checked against (``RunIdentity``): the job's config and sites."""

    run_id: str
    round: int
    rounds: list[RoundRecord]
    sites: dict[str, SiteTally]
    config: dict[str, Any] | None = None  # None: a checkpoint written before it was recorded
    job_sites: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = {SCHEMA_KEY: SCHEMA_VERSION, "run_id": self.run_id, "round": self.round,
                "rounds": [r.to_json() for r in self.rounds],
                "sites": {name: site.to_json() for name, site in self.sites.items()}}
        if self.config is not None:
            data["config"] = self.config
        if self.job_sites:
            data["job_sites"] = list(self.job_sites)
        record = site_records(self.rounds)  # derived from the rounds, for the audit; not read back
        if record:
            data[RECORD_KEY] = {site: r.to_json() for site, r in record.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckpointState:
        if problem := schema_problem(data):
            raise ValueError(f"state.json: {problem}")
        return cls(run_id=str(data["run_id"]), round=int(data["round"]),
                   rounds=[RoundRecord.from_json(r) for r in data["rounds"]],
                   sites={name: SiteTally.from_json(site) for name, site in data["sites"].items()},
                   config=data.get("config"), job_sites=tuple(data.get("job_sites", ())))

    @classmethod
    def read(cls, directory: Path) -> CheckpointState:
        return cls.from_json(json.loads((directory / "state.json").read_text(encoding="utf-8")))

    def write(self, directory: Path) -> None:
        """state.json, replaced atomically (it marks the checkpoint complete, so it goes last)."""
        tmp = directory / "state.json.tmp"
        tmp.write_text(json.dumps(self.to_json(), indent=2, default=str), encoding="utf-8")
        tmp.replace(directory / "state.json")


def checkpoint_to_resume(settings: CoordinatorSettings) -> Path | None:
    """The checkpoint the coordinator continues from (None: a fresh run); ``ResumeRefused``
    where out_dir holds a run this job may not continue, so that nothing of it is overwritten
    and no report mixes two runs."""
    latest = latest_checkpoint(settings.out_dir)
    if latest is None:
        return None
    run = RunIdentity.read(latest)
    if not settings.resume:
        raise ResumeRefused(f"{settings.out_dir} holds the checkpoints of run {run.run_id} (after "
                            f"round {run.round}); run {settings.run_id} is a new run and would "
                            "mix with them. They are kept as they are; give the new run another "
                            "output directory")
    refusal = resume_refusal(latest, run, to_dict(settings.job), settings.sites)
    if refusal:
        raise ResumeRefused(refusal)
    return latest
