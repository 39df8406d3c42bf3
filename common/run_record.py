"""What the coordinator recorded of a run, as the audit, the release gate and a resume read it.

Each reply a site sent carried its ledger head; each accepted train reply carried an update
whose SHA-256 the coordinator computed on receipt. The coordinator derives this record from its
round records and writes it (``RECORD_KEY``) into report.json and every checkpoint's
state.json, so ``audit`` and ``export`` can compare a site's ledger with it without the server's
code: a ledger that lacks a reported head was cut or rewritten, and a received update the
ledger does not list is a release it hides.

Each checkpoint also says which run it is (``RunIdentity``: the run id, the job's config and the
sites it was started for), so that a restarted coordinator continues only the run it belongs to
(``resume_refusal``), and ``privatune coordinator`` can check that before it submits a run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privatune.common.ledger import LedgerHead

RECORD_KEY = "ledger_record"
# The shape of report.json and of a checkpoint's state.json; raise it when a reader of the old
# shape would misread the new one. Files written before it was recorded are version 1.
SCHEMA_KEY = "schema_version"
SCHEMA_VERSION = 1


def schema_problem(data: Mapping[str, Any]) -> str | None:
    """Why this privatune cannot read a run's file of this schema (a newer one), or None."""
    version = data.get(SCHEMA_KEY, 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return f"{SCHEMA_KEY} is {version!r}, not a version number"
    if version > SCHEMA_VERSION:
        return (f"written with {SCHEMA_KEY} {version} by a newer privatune; this one reads up to "
                f"{SCHEMA_VERSION}: upgrade privatune to read it")
    return None


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
        problem = schema_problem(data) if isinstance(data, dict) else None
        if problem:
            raise ValueError(problem)
        if not isinstance(data, dict) or RECORD_KEY not in data:
            raise ValueError(f"no {RECORD_KEY!r} key (a run recorded before ledger heads were "
                             "kept, or not a privatune report or checkpoint)")
        return records_from_json(data[RECORD_KEY])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not a usable record of a run: {err}") from err


# What a resumed run may change: how long the coordinator waits, which of its devices evaluates
# and where the figures go. Everything else shapes what the sites train, release or spend, or
# what the report compares, so a checkpoint is resumed only by the job it was written by.
RESUMABLE_CHANGES = frozenset({"federation.node_wait_s", "federation.round_timeout_s",
                               "model.device", "tracking"})


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest completed round's checkpoint (its state.json is written last)."""
    done = sorted(p.parent for p in (Path(out_dir) / "checkpoints").glob("round_*/state.json"))
    return done[-1] if done else None


@dataclass(frozen=True)
class RunIdentity:
    """Which run a checkpoint belongs to: its id and last completed round, the job it was
    written by (the config as plain data; None in a checkpoint older than this record), the
    sites the run was started for (empty where they were not known in advance) and the sites
    that replied so far."""

    run_id: str
    round: int
    config: dict[str, Any] | None
    sites: tuple[str, ...] = ()
    replied: tuple[str, ...] = ()

    @classmethod
    def from_state(cls, data: Mapping[str, Any]) -> RunIdentity:
        """From a checkpoint's state.json."""
        return cls(run_id=str(data["run_id"]), round=int(data["round"]), config=data.get("config"),
                   sites=tuple(data.get("job_sites", ())), replied=tuple(sorted(data["sites"])))

    @classmethod
    def read(cls, checkpoint: Path) -> RunIdentity:
        """From a checkpoint directory; an unreadable one is a ValueError naming its file."""
        path = checkpoint / "state.json"
        try:
            return cls.from_state(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a readable checkpoint state ({err})") from err


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as one level of dotted keys (``privacy.delta``)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(recorded: Mapping[str, Any], job: Mapping[str, Any]) -> dict[str, str]:
    """Every dotted key whose value differs between two configs (as plain data), with both."""
    before, after = flat_config(recorded), flat_config(json.loads(json.dumps(job)))  # tuples as JSON lists
    return {key: f"{key}: {before.get(key, '(absent)')!r} in the checkpoint, "
                 f"{after.get(key, '(absent)')!r} in this job"
            for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)}


def resume_refusal(checkpoint: Path, run: RunIdentity, job: Mapping[str, Any],
                   sites: Sequence[str] = ()) -> str | None:
    """Why the run in ``checkpoint`` (``<out>/checkpoints/round_NNN``) may not be continued by
    ``job`` (its config as plain data), or None when it may.

    A resume continues one unfinished run: the job that wrote it (its config, but for
    ``RESUMABLE_CHANGES``), with the sites it was started for (where both are known; else
    every site that replied must be among ``sites``, where they are known). A run with all its
    rounds checkpointed and its report written is finished: a new submission is a new run.
    Anything else would write one run's rounds into another's report.
    """
    if run.config is None:
        problems = ["the checkpoint records no job config (written by an older privatune), so "
                    "this job cannot be checked against it"]
    else:
        problems = [change for key, change in config_changes(run.config, job).items()
                    if key not in RESUMABLE_CHANGES]
    if sites and run.sites and sorted(run.sites) != sorted(sites):
        problems.append(f"the run was started for sites {', '.join(sorted(run.sites))}; this job "
                        f"has {', '.join(sorted(sites))}")
    elif sites and (strangers := sorted(set(run.replied) - set(sites))):
        problems.append(f"sites {', '.join(strangers)} took part in the run; this job has no "
                        "such site")
    report = checkpoint.parent.parent / "report.json"
    if not problems and run.round >= job["federation"]["rounds"] and report.is_file():
        problems.append(f"the run is finished (its {run.round} rounds are done and {report} "
                        "is written)")
    if not problems:
        return None
    return (f"{checkpoint}: will not resume run {run.run_id} (after round {run.round}) with this "
            f"job: {'; '.join(problems)}. Its checkpoints, report and the sites' ledgers are "
            "kept as they are; to start afresh, give the new run another output directory")
