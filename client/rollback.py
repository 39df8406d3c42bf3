"""A ledger that lost releases, and an operator's acknowledgement of it.

A ledger restored from an old backup, cut or rewritten no longer lists everything the site
released. The node sees it three ways (the head the coordinator last got from it, the head it
recorded beside the ledger, the releases it kept) and declines every round until an operator
acknowledges the rollback, which records the highest spend reported with the lost releases as
a floor under the site's epsilon (``common.ledger_records.RollbackFloor``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from privatune.client.policy import SitePolicy
from privatune.client.site_state import KeptRelease
from privatune.common.ledger import LedgerHead, SiteLedger, head_problem
from privatune.common.ledger_records import (LedgerRecord, NonPrivateRelease, Numbered,
                                             RollbackAcknowledgement)

ROLLBACK = "ledger_rollback"  # a decline's release name when the ledger lacks a reported head
ACKNOWLEDGE_FLAG = "--acknowledge-ledger-rollback"


def pending_rollback(records: Sequence[LedgerRecord]) -> Numbered[NonPrivateRelease] | None:
    """The latest rollback decline no acknowledgement follows, with its entry's number, or
    None (``records`` are a whole ledger's, in order)."""
    for seq in range(len(records), 0, -1):
        record = records[seq - 1]
        if isinstance(record, RollbackAcknowledgement):
            return None
        if isinstance(record, NonPrivateRelease) and record.release == ROLLBACK:
            return Numbered(seq, record)
    return None


def acknowledge_rollback(policy: SitePolicy) -> Numbered[RollbackAcknowledgement]:
    """An operator's acknowledgement of the pending rollback of this site's ledger, appended
    to it; the node trains again after it, counting at least the spend it had reported.

    Raises ValueError if no rollback is pending, SiteBusy while a node answers a request.
    """
    with policy.state.exclusive():
        ledger = SiteLedger(policy.ledger_path)
        pending = pending_rollback(ledger.records())
        if pending is None:
            raise ValueError(f"{policy.ledger_path}: no ledger rollback to acknowledge (the node "
                             "has not declined a round for one since the last acknowledgement)")
        decline = pending.record
        return ledger.append_record(RollbackAcknowledgement(
            run_id=decline.run_id, detected_at=pending.seq,
            reported_seq=decline.reported_seq, reported_hash=decline.reported_hash,
            reported_epsilon=decline.reported_epsilon, reported_delta=decline.reported_delta,
            recovered_releases=decline.recovered_releases or [],
            note="the releases after the last entry this ledger shares with the reported head, "
                 "and the kept releases it did not list, are lost from it; the highest spend "
                 "reported with them is counted as a floor (basic composition)"))


def rollback_decline(policy: SitePolicy, ledger: SiteLedger, reported: LedgerHead,
                     reported_epsilon: float, reported_delta: float) -> NonPrivateRelease | None:
    """The decline to record, without its run and round (the request's), when the ledger has
    lost releases, or a rollback found earlier is not acknowledged yet; None when the ledger
    is sound.

    Lost releases show three ways: the ledger lacks the head the coordinator holds
    (``reported``), or the head recorded beside it, or it does not list a release kept on
    disk. The floor an acknowledgement will count is the highest spend any of them reported.
    """
    records = ledger.records()
    pending = pending_rollback(records)
    if pending is not None:
        return dataclasses.replace(pending.record, run_id=None, round=None)
    entries = ledger.entries
    unlisted = policy.state.unlisted_releases(records)
    problems = [p for p in (
        head_problem(entries, reported),
        head_problem(entries, ledger.witnessed_head(),
                     f"this node recorded (in {ledger.witness_path.name})"),
        _unlisted_problem(unlisted)) if p]
    if not problems:
        return None
    epsilon = max([reported_epsilon, *(r.epsilon for r in unlisted)])
    delta = max([reported_delta, *(r.delta for r in unlisted)])
    reason = (f"this site's ledger has lost releases: {'; '.join(problems)}. It may have "
              f"been restored from an old backup, deleted or edited (the highest spend "
              f"reported with the lost releases is epsilon {epsilon:.4g}). No round is "
              f"trained until an operator acknowledges it: privatune node --site "
              f"{policy.source} {ACKNOWLEDGE_FLAG}")
    return NonPrivateRelease(release=ROLLBACK, reason=reason, reported_seq=reported.seq,
                             reported_hash=reported.hash, reported_epsilon=epsilon,
                             reported_delta=delta,
                             recovered_releases=[r.update_sha256 for r in unlisted])


def _unlisted_problem(unlisted: Sequence[KeptRelease]) -> str | None:
    """The rollback problem kept releases the ledger does not list make, or None."""
    if not unlisted:
        return None
    first = unlisted[0]
    return (f"{len(unlisted)} release(s) kept in {first.path.parent} are not listed in it "
            f"(the first: {first.path.name}, round {first.round}, sent at epsilon "
            f"{first.epsilon:.4g})")
