"""One round's record, as the coordinator keeps it: what each site replied, what training and
evaluation gave, and the cumulative epsilon. The run report (``report.py``), the overfitting
watch, the tracker and the export gate all read these; ``to_json`` / ``from_json`` give the
JSON of report.json and the checkpoints' state.json (a key absent there, such as the training
keys of round 0, is left out here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from privatune.common.generation import GenerationSample, GenerationScores
from privatune.common.ledger import LedgerHead
from privatune.common.protocol import TrainReply
from privatune.common.run_record import ReceivedUpdate, ReportedHead, SiteRecord


@dataclass
class RoundTraining:
    """What happened to the train requests of one round."""

    participants: list[str] = field(default_factory=list)  # sites whose update was averaged
    declined: dict[str, str] = field(default_factory=dict)  # site -> its reason
    failures: list[str] = field(default_factory=list)  # no reply, error replies, rejected updates
    aggregated: bool = False  # False: too few usable updates, the global adapter was kept
    # example-weighted mean of the training losses the participants released (None: none did)
    train_loss: float | None = None
    # adapter bytes of the train exchange (float32 on the wire): the global adapter to every
    # node asked, and the updates back from the sites that sent one (in total and per site;
    # under ffa an update is B alone)
    bytes_sent: int | None = None
    bytes_received: int | None = None
    update_bytes: dict[str, int] = field(default_factory=dict)
    # site -> its train reply, as the node sent it (privacy figures, ledger head; the update
    # itself is not kept), and the SHA-256 of each update received, whatever became of it (a
    # secure round: of every step's masked input, in order)
    replies: dict[str, TrainReply] = field(default_factory=dict)
    update_sha256: dict[str, str] = field(default_factory=dict)
    masked_inputs_sha256: dict[str, list[str]] = field(default_factory=dict)

    def received_sha256(self, site: str) -> list[str]:
        """Every update or masked input received from ``site`` this round, by its SHA-256."""
        single = [self.update_sha256[site]] if site in self.update_sha256 else []
        return single + self.masked_inputs_sha256.get(site, [])

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"participants": list(self.participants),
                                "declined": dict(self.declined), "failures": list(self.failures),
                                "aggregated": self.aggregated}
        for name in ("train_loss", "bytes_sent", "bytes_received"):  # absent in old checkpoints
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        if self.update_bytes:
            data["update_bytes"] = dict(self.update_bytes)
        if self.replies:  # each reply beside its update's hash (the site is the key)
            data["replies"] = {site: {**{k: v for k, v in reply.to_json().items() if k != "site"},
                                      "update_sha256": self.update_sha256.get(site),
                                      **({"masked_inputs_sha256": masked}
                                         if (masked := self.masked_inputs_sha256.get(site))
                                         else {})}
                               for site, reply in self.replies.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundTraining:
        return cls(participants=list(data.get("participants", [])),
                   declined=dict(data.get("declined", {})), failures=list(data.get("failures", [])),
                   aggregated=bool(data.get("aggregated", False)),
                   train_loss=data.get("train_loss"), bytes_sent=data.get("bytes_sent"),
                   bytes_received=data.get("bytes_received"),
                   update_bytes={s: int(b) for s, b in data.get("update_bytes", {}).items()},
                   replies={site: TrainReply.from_json({**reply, "site": site})
                            for site, reply in data.get("replies", {}).items()},
                   update_sha256={site: str(reply["update_sha256"])
                                  for site, reply in data.get("replies", {}).items()
                                  if reply.get("update_sha256")},
                   masked_inputs_sha256={site: [str(h) for h in reply["masked_inputs_sha256"]]
                                         for site, reply in data.get("replies", {}).items()
                                         if reply.get("masked_inputs_sha256")})


@dataclass
class RoundEvaluation:
    """Perplexity of the global adapter after a round: central, pooled over sites, per site."""

    global_perplexity: float | None = None  # on the coordinator's own held-out set
    federated_perplexity: float | None = None  # example-weighted over the sites that told
    site_perplexity: dict[str, float | None] = field(default_factory=dict)
    evaluation_failures: list[str] = field(default_factory=list)
    # site -> why it declined the evaluation (no loss from it this round), e.g. its policy's
    # limits.max_evaluations_per_run
    evaluation_declined: dict[str, str] = field(default_factory=dict)
    # generation rounds only (round 0, every k-th, the last): scores on the coordinator's
    # held-out set, the scores each site released, and the first completions of the central set
    global_generation: GenerationScores | None = None
    site_generation: dict[str, GenerationScores] = field(default_factory=dict)
    samples: list[GenerationSample] = field(default_factory=list)
    ledger_heads: dict[str, LedgerHead] = field(default_factory=dict)  # from evaluate replies

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"global_perplexity": self.global_perplexity,
                                "federated_perplexity": self.federated_perplexity,
                                "site_perplexity": dict(self.site_perplexity),
                                "evaluation_failures": list(self.evaluation_failures)}
        if self.evaluation_declined:  # absent when every site answered
            data["evaluation_declined"] = dict(self.evaluation_declined)
        if self.global_generation is not None:  # absent in rounds without generation
            data["global_generation"] = self.global_generation.to_json()
        if self.site_generation:
            data["site_generation"] = {s: g.to_json() for s, g in self.site_generation.items()}
        if self.samples:
            data["samples"] = [sample.to_json() for sample in self.samples]
        if self.ledger_heads:
            data["ledger_heads"] = {s: [h.seq, h.hash] for s, h in self.ledger_heads.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundEvaluation:
        central = data.get("global_generation")
        return cls(global_perplexity=data.get("global_perplexity"),
                   federated_perplexity=data.get("federated_perplexity"),
                   site_perplexity=dict(data.get("site_perplexity", {})),
                   evaluation_failures=list(data.get("evaluation_failures", [])),
                   evaluation_declined=dict(data.get("evaluation_declined", {})),
                   global_generation=GenerationScores.from_json(central) if central else None,
                   site_generation={s: GenerationScores.from_json(g)
                                    for s, g in data.get("site_generation", {}).items()},
                   samples=[GenerationSample.from_json(x) for x in data.get("samples", [])],
                   ledger_heads={s: LedgerHead(int(seq), str(digest))
                                 for s, (seq, digest) in data.get("ledger_heads", {}).items()})


@dataclass
class RoundRecord:
    """One round of the run; round 0 is the base model, evaluated before any training."""

    round: int
    evaluation: RoundEvaluation = field(default_factory=RoundEvaluation)
    training: RoundTraining | None = None  # None for round 0
    epsilon: dict[str, float] | None = None  # cumulative epsilon per site after the round

    @property
    def participants(self) -> list[str]:
        return self.training.participants if self.training else []

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"round": self.round}
        data.update(self.training.to_json() if self.training else {"participants": []})
        data.update(self.evaluation.to_json())
        if self.epsilon is not None:
            data["epsilon"] = dict(self.epsilon)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundRecord:
        return cls(round=int(data["round"]), evaluation=RoundEvaluation.from_json(data),
                   training=RoundTraining.from_json(data) if "aggregated" in data else None,
                   epsilon=dict(data["epsilon"]) if data.get("epsilon") is not None else None)


def site_records(rounds: list[RoundRecord]) -> dict[str, SiteRecord]:
    """The record the audit compares each site's ledger with, derived from the rounds: every
    head a reply carried, every update received, the highest epsilon reported."""
    records: dict[str, SiteRecord] = {}
    for record in rounds:
        replies = record.training.replies if record.training else {}
        for site, reply in replies.items():
            entry = records.setdefault(site, SiteRecord(site))
            if reply.ledger_seq >= 0:
                entry.heads.append(ReportedHead(record.round, "train", reply.ledger_seq,
                                                reply.ledger_hash))
            entry.received += [ReceivedUpdate(record.round, sha256)
                               for sha256 in record.training.received_sha256(site)]
            entry.epsilon = max(entry.epsilon, reply.epsilon)
            entry.delta, entry.epsilon_budget = reply.delta, reply.epsilon_budget
            entry.accountant = reply.accountant
        for site, head in record.evaluation.ledger_heads.items():
            records.setdefault(site, SiteRecord(site)).heads.append(
                ReportedHead(record.round, "evaluate", head.seq, head.hash))
    return dict(sorted(records.items()))
