"""The ledger's typed entries: what each kind of entry is, how it is checked and read.

An entry's kind picks its type (``record_of``): ``AdapterRelease`` (an update, private),
``SecureRelease`` (a secure DP-SGD step, private, carrying both of the site's guarantees),
``NonPrivateRelease`` (metrics, declines, resends, rollback declines) and
``RollbackAcknowledgement`` (the spend carried over a rollback, ``RollbackFloor``). Each type
converts to and from the entry's own fields (``TypedEntry.fields`` / ``from_entry``). An entry
that counts in the spend is checked on its JSON first (``entry_problem``): the hash chain proves
a line is the one written (``privatune.common.ledger``), not that its numbers are sane, and a NaN
compares false with every cap.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Self, TypeVar

from privatune.common.distributed_noise_accounting import (SUBSAMPLING_BOUNDS,
                                                           SUBSAMPLING_GENERAL)
from privatune.common.privacy import MechanismStep, SecureStep

ADAPTER_UPDATE = "adapter_update"
SECURE_UPDATE = "secure_update"
PRIVATE_KINDS = (ADAPTER_UPDATE, SECURE_UPDATE)  # the entries counted in the spend
# which of a secure release's guarantees a history holds: the one the site's policy enforces
# (the aggregate if it trusts secure aggregation, else the fallback), or either of the two
GUARANTEES = ("enforced", "aggregate", "fallback")
NON_PRIVATE = "non_private"
ROLLBACK_ACKNOWLEDGED = "rollback_acknowledged"


@dataclass(frozen=True)
class RollbackFloor:
    """The spend a rollback acknowledgement carries over: the (epsilon, delta) the site had
    reported at the head its ledger lost, composed by addition with what the ledger accounts."""

    epsilon: float = 0.0
    delta: float = 0.0


def _finite(value: Any) -> bool:
    """A finite JSON number (a bool is an int to Python, but not a number to the ledger)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Each rule is written so that NaN fails it: every comparison with NaN is false.
_MECHANISM_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "noise_multiplier": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "sample_rate": (lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1]"),
    "steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
              "a positive integer"),
    "delta": (lambda v: _finite(v) and 0 < v < 1, "a number in (0, 1)"),
    "epsilon": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
}


def _rules_problem(entry: Mapping[str, Any], rules: Mapping[str, tuple[Callable[[Any], bool], str]],
                   what: str) -> str | None:
    """The first of ``rules`` an entry breaks (a missing key included), or None."""
    for key, (valid, expected) in rules.items():
        if key not in entry:
            return f"{what} has no {key}"
        if not valid(entry[key]):
            return f"{key} is {entry[key]!r}, expected {expected}"
    return None


def _mechanism_problem(entry: Mapping[str, Any]) -> str | None:
    """Why an adapter update cannot be accounted, or None when it can.

    The hash chain proves a line is the one written, not that its numbers are sane.
    """
    return _rules_problem(entry, _MECHANISM_RULES, "adapter update")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# A secure release counts by its Skellam mechanism too: the integer clip and the padded
# dimension set the rounding's share of the sensitivity, the shares the fallback's noise, and
# ``trusted`` which guarantee the site's cap holds.
_SECURE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **_MECHANISM_RULES,
    "scaled_clip": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "dimension": (lambda v: _positive_int(v) and v & (v - 1) == 0,
                  "a positive power of two (the padded dimension)"),
    "min_contributions": (_positive_int, "a positive integer (the shares t)"),
    "max_sites": (_positive_int, "a positive integer"),
    "trusted": (lambda v: isinstance(v, bool), "true or false"),
    "aggregate_epsilon": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "fallback_epsilon": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "step": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
             "an integer >= 0"),
    # the rest are required by the type, so an entry without one could not even be read
    "run_id": (lambda v: isinstance(v, str), "a string"),
    "round": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "privacy_unit": (lambda v: isinstance(v, str), "a string"),
    "max_grad_norm": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "accountant": (lambda v: isinstance(v, str), "a string"),
}


def _secure_problem(entry: Mapping[str, Any]) -> str | None:
    """Why a secure update cannot be accounted, or None when it can."""
    problem = _rules_problem(entry, _SECURE_RULES, "secure update")
    if problem is None and entry["max_sites"] < entry["min_contributions"]:
        return (f"max_sites is {entry['max_sites']!r}, below min_contributions "
                f"{entry['min_contributions']!r}")
    # absent in the entries written before it, which were bounded with SUBSAMPLING_GENERAL
    if problem is None and entry.get("subsampling", SUBSAMPLING_GENERAL) not in SUBSAMPLING_BOUNDS:
        return (f"subsampling is {entry['subsampling']!r}, expected one of "
                f"{', '.join(SUBSAMPLING_BOUNDS)}")
    return problem


_FLOOR_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "reported_epsilon": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "reported_delta": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
}


def _floor_problem(entry: Mapping[str, Any]) -> str | None:
    """Why a rollback acknowledgement's floor cannot be accounted, or None when it can."""
    for key, (valid, expected) in _FLOOR_RULES.items():
        if not valid(entry.get(key)):
            return f"rollback acknowledgement's {key} is {entry.get(key)!r}, expected {expected}"
    return None


class TypedEntry:
    """What a typed ledger entry shares (a mixin of frozen dataclasses): its ``KIND``, and the
    one conversion each way between the type and the entry's own fields (``SiteLedger.append``
    adds seq, kind, private, time and the hashes).

    A field an entry lacks reads as None (older entries, and options a release did not use),
    and the written entry holds exactly the fields that are not None: its bytes are what they
    were before the type existed, since the ledger hashes sorted JSON.
    """

    KIND: ClassVar[str]

    @staticmethod
    def problem(entry: Mapping[str, Any]) -> str | None:
        """Why an entry of this kind cannot be accounted (checked on the JSON before it is
        read as the type, which trusts its values), or None; most kinds count nothing."""
        return None

    def fields(self) -> dict[str, Any]:
        """The entry's own fields, as ``SiteLedger.append`` takes them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> Self:
        """The entry read as this type; an entry that counts must have passed ``problem``."""
        return cls(**{f.name: entry[f.name] for f in dataclasses.fields(cls)
                      if f.name in entry})


@dataclass(frozen=True)
class AdapterRelease(TypedEntry):
    """An adapter update's ledger entry (``ADAPTER_UPDATE``) as one type: the DP mechanism that
    produced it, enough for anyone to recompute its epsilon, and the update sent (its hash) or
    why it was withheld. The node writes it; the node, the audit and the simulations read it.

    Optional fields: patient sampling under the patient unit, the frozen factors' hash under
    ffa, and whatever an older entry lacks.
    """

    KIND: ClassVar[str] = ADAPTER_UPDATE

    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float  # the site's cumulative epsilon after this release, by ``accountant``
    delta: float
    run_id: str | None = None
    round: int | None = None
    privacy_unit: str | None = None
    patient_sampling: str | None = None
    max_grad_norm: float | None = None
    accountant: str | None = None
    frozen_a_sha256: str | None = None
    update_sha256: str | None = None
    withheld: str | None = None

    @staticmethod
    def problem(entry: Mapping[str, Any]) -> str | None:
        return _mechanism_problem(entry)

    @property
    def step(self) -> MechanismStep:
        return MechanismStep(float(self.noise_multiplier), float(self.sample_rate), int(self.steps))


@dataclass(frozen=True)
class SecureRelease(TypedEntry):
    """One secure DP-SGD step's ledger entry (``SECURE_UPDATE``): this site's Skellam share of
    the union's step, masked under secure aggregation (issue 27). Private, counted like an
    adapter update, with both of the site's guarantees after it: (a) ``aggregate_epsilon``, from
    the noise of at least ``min_contributions`` shares, and (b) ``fallback_epsilon``, from its
    own share alone; ``epsilon`` is the one its policy enforces (``trusted``: (a), else (b)).
    Each is cumulative, by RDP (``privacy.epsilon_of``).
    """

    KIND: ClassVar[str] = SECURE_UPDATE

    run_id: str
    round: int
    step: int  # the secure step within the round, from 0
    privacy_unit: str
    noise_multiplier: float  # the aggregate sigma of min_contributions shares, in clips
    sample_rate: float
    steps: int
    max_grad_norm: float
    scaled_clip: float  # the clip in the encoder's integer units
    dimension: int  # the padded dimension
    min_contributions: int
    max_sites: int
    trusted: bool
    accountant: str
    epsilon: float
    aggregate_epsilon: float
    fallback_epsilon: float
    delta: float
    contribution_sha256: str | None = None  # of the masked input bytes sent
    frozen_a_sha256: str | None = None  # under ffa, of the lora_A the step's gradients are for
    withheld: str | None = None
    subsampling: str | None = None  # the subsampling bound; None: SUBSAMPLING_GENERAL (older)

    @staticmethod
    def problem(entry: Mapping[str, Any]) -> str | None:
        return _secure_problem(entry)

    @property
    def secure_step(self) -> SecureStep:
        """The aggregate mechanism, guarantee (a); ``.fallback()`` of it is (b)."""
        return SecureStep(float(self.noise_multiplier), float(self.sample_rate), int(self.steps),
                          float(self.scaled_clip), int(self.dimension),
                          int(self.min_contributions),
                          self.subsampling or SUBSAMPLING_GENERAL)

    def mechanism(self, guarantee: str = "enforced") -> SecureStep:
        """The step of the named guarantee (``GUARANTEES``): ``enforced`` is the aggregate
        where the site trusts secure aggregation, else the fallback."""
        if guarantee not in GUARANTEES:
            raise ValueError(f"unknown guarantee {guarantee!r} (known: {', '.join(GUARANTEES)})")
        aggregate = guarantee == "aggregate" or (guarantee == "enforced" and self.trusted)
        return self.secure_step if aggregate else self.secure_step.fallback()


EVALUATE_METRICS = "evaluate_metrics"  # a non-private release: the metrics an evaluation sent
DECLINE = "decline"  # a non-private release: a request declined, and why
RESEND = "resend"  # a non-private release: an update kept on disk, sent again


@dataclass(frozen=True)
class NonPrivateRelease(TypedEntry):
    """A ``NON_PRIVATE`` entry: something that left the site uncovered by DP-SGD, named by
    ``release``: a reply's metrics (``train_metrics``, ``evaluate_metrics``: the ``values`` the
    policy let out), a ``decline`` and its ``reason`` (``request`` is "evaluate" for an
    evaluation's), a ``resend`` of a kept update, or a rollback decline (``client.rollback``)
    with the head and spend the coordinator held (``reported_*``) and the kept releases the
    ledger did not list.
    """

    KIND: ClassVar[str] = NON_PRIVATE

    release: str | None = None
    run_id: str | None = None
    round: int | None = None
    reason: str | None = None
    request: str | None = None
    values: dict[str, Any] | None = None
    update_sha256: str | None = None
    reported_seq: int | None = None
    reported_hash: str | None = None
    reported_epsilon: float | None = None
    reported_delta: float | None = None
    recovered_releases: list[str] | None = None  # update hashes of kept, unlisted releases


@dataclass(frozen=True)
class RollbackAcknowledgement(TypedEntry):
    """An operator's acknowledgement (``ROLLBACK_ACKNOWLEDGED``) that the ledger lost releases:
    the rollback decline that found it (``detected_at``, its entry's number), the head and spend
    the coordinator held, the kept releases the ledger lists again, and the floor they carry."""

    KIND: ClassVar[str] = ROLLBACK_ACKNOWLEDGED

    reported_epsilon: float
    reported_delta: float
    run_id: str | None = None
    detected_at: int | None = None
    reported_seq: int | None = None
    reported_hash: str | None = None
    recovered_releases: list[str] | None = None
    note: str | None = None

    @staticmethod
    def problem(entry: Mapping[str, Any]) -> str | None:
        return _floor_problem(entry)

    @property
    def floor(self) -> RollbackFloor:
        return RollbackFloor(float(self.reported_epsilon), float(self.reported_delta))


LedgerRecord = AdapterRelease | SecureRelease | NonPrivateRelease | RollbackAcknowledgement
RecordT = TypeVar("RecordT", bound=TypedEntry)


def _record_type(entry: Mapping[str, Any]) -> type[LedgerRecord]:
    """The type an entry reads as, by its kind. Any kind but an adapter or secure update and a
    rollback acknowledgement is a non-private release: the ledger marks only those two updates
    private."""
    kind = entry.get("kind")
    if kind == ADAPTER_UPDATE:
        return AdapterRelease
    if kind == SECURE_UPDATE:
        return SecureRelease
    if kind == ROLLBACK_ACKNOWLEDGED:
        return RollbackAcknowledgement
    return NonPrivateRelease


def entry_problem(entry: Mapping[str, Any]) -> str | None:
    """Why an entry that counts in the spend (an adapter or secure update's mechanism, a
    rollback acknowledgement's floor) cannot be accounted, or None."""
    return _record_type(entry).problem(entry)


def record_of(entry: Mapping[str, Any]) -> LedgerRecord:
    """A verified entry read as its type (one that counts must have passed ``entry_problem``)."""
    return _record_type(entry).from_entry(entry)


def is_adapter_update(entry: Mapping[str, Any]) -> bool:
    """Whether an entry is an adapter update, before its fields are checked."""
    return _record_type(entry) is AdapterRelease


def is_secure_update(entry: Mapping[str, Any]) -> bool:
    """Whether an entry is a secure update, before its fields are checked."""
    return _record_type(entry) is SecureRelease


@dataclass(frozen=True)
class Numbered(Generic[RecordT]):
    """A record with the number of its entry in the ledger (``seq``, from 1): what an audit
    line or a rollback acknowledgement names it by."""

    seq: int
    record: RecordT
