"""The secure DP-SGD round on the wire (issue 27): its stages, their typed messages, one codec.

A secure round is a setup, then for each of its steps the four SecAgg+ stages
(``common.secure_aggregation``). Every message the coordinator sends is a ``SecureRequest``:
the round's ``TrainRequest`` (so the node checks run, round, addressee and limits as for any
train request), the ``SecurePlan`` (stage, step and the run's noise and encoding, identical at
every site), and the stage's SecAgg+ message; the global adapter travels beside it at setup and
at the masking stage (``ADAPTER_KEY``). Every reply is a ``SecureReply``: the site's
``TrainReply`` (accepted or declined with its reason, its epsilon and ledger head) and its
SecAgg+ answer. One Flower message type carries them all (``SECURE``, a ``train`` action).

Flower's ConfigRecord holds signed 64-bit integers and SecAgg+ ids go up to 2^64 - 1: ids are
written as their two's complement and read back (every SecAgg+ integer is non-negative).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from privatune.common.config import JobConfig
from privatune.common.distributed_noise import (
    DistributedNoiseParams,
    aggregate_noise_multiplier,
    choose_parameters,
)
from privatune.common.protocol import REQUEST_KEY, SecurePlan, TrainReply, TrainRequest
from privatune.common.secure_aggregation_messages import (
    EncryptedShares,
    KeyDirectory,
    MaskedInput,
    PublicKeys,
    SecAggConfig,
    SecAggError,
    ShareDelivery,
    UnmaskRequest,
    UnmaskShares,
)

SECURE = "train.secure"
SECURE_KEY = "secure"
SECAGG_KEY = "secagg"
SETUP, KEYS, SHARES, MASK, UNMASK = "setup", "keys", "shares", "mask", "unmask"
STAGES = (SETUP, KEYS, SHARES, MASK, UNMASK)

SecAggRequest = SecAggConfig | KeyDirectory | ShareDelivery | UnmaskRequest
SecAggReply = PublicKeys | EncryptedShares | MaskedInput | UnmaskShares
REQUEST_TYPES: dict[str, type] = {KEYS: SecAggConfig, SHARES: KeyDirectory, MASK: ShareDelivery,
                                  UNMASK: UnmaskRequest}
REPLY_TYPES: dict[str, type] = {KEYS: PublicKeys, SHARES: EncryptedShares, MASK: MaskedInput,
                                UNMASK: UnmaskShares}
_INT64 = 1 << 63
_ROTATION_PURPOSE = 2


def step_rotation_seed(public_seed: int, round_id: int) -> int:
    """The public rotation seed of one secure step: fresh for each (round, step), chosen
    before and independently of any data, the same at every site and at the coordinator."""
    words = np.random.SeedSequence([int(public_seed) % (1 << 64), int(round_id),
                                    _ROTATION_PURPOSE]).generate_state(4, dtype=np.uint32)
    return sum(int(w) << (32 * i) for i, w in enumerate(words))


def secagg_round_id(round_number: int, step: int) -> int:
    """The SecAgg+ round id of a step: distinct for every step of a run (fresh keys each)."""
    return (int(round_number) << 24) | int(step)


def _signed(value: Any) -> Any:
    if isinstance(value, list):
        return [_signed(v) for v in value]
    return value - (1 << 64) if isinstance(value, int) and value >= _INT64 else value


def _unsigned(value: Any) -> Any:
    if isinstance(value, list):
        return [_unsigned(v) for v in value]
    return value + (1 << 64) if isinstance(value, int) and not isinstance(value, bool) \
        and value < 0 else value


def secagg_record(message: Any) -> ConfigRecord:
    """A SecAgg+ message as a ConfigRecord (ids written as signed 64-bit integers)."""
    return ConfigRecord({k: _signed(v) for k, v in message.to_dict().items()})


def secagg_message(kind: type, record: Mapping[str, Any]) -> Any:
    """The SecAgg+ message of ``kind`` a ConfigRecord holds; a ``ValueError`` naming what is
    wrong (``SecAggError`` is one)."""
    return kind.from_dict({k: _unsigned(list(v) if isinstance(v, (list, tuple)) else v)
                           for k, v in record.items()})


def wire_bytes(message: Any) -> int:
    """What a SecAgg+ message takes on the wire, roughly: its bytes, 8 per integer."""
    total = 0
    for value in message.to_dict().values():
        for item in value if isinstance(value, list) else [value]:
            total += len(item) if isinstance(item, bytes) else 8
    return total


@dataclass(frozen=True)
class SecureRequest:
    """One stage's request to one node (the adapter, where the stage needs it, beside it)."""

    request: TrainRequest
    plan: SecurePlan
    secagg: SecAggRequest | None = None

    def __post_init__(self) -> None:
        if self.plan.stage not in STAGES:
            raise ValueError(f"SecurePlan.stage {self.plan.stage!r} is not one of {STAGES}")
        wanted = REQUEST_TYPES.get(self.plan.stage)
        if (wanted is None) != (self.secagg is None) or (
                wanted is not None and not isinstance(self.secagg, wanted)):
            raise ValueError(f"stage {self.plan.stage!r} carries "
                             f"{wanted.__name__ if wanted else 'no SecAgg+ message'}, not "
                             f"{type(self.secagg).__name__}")

    def to_content(self) -> RecordDict:
        content = RecordDict({REQUEST_KEY: ConfigRecord(self.request.to_record()),
                              SECURE_KEY: ConfigRecord(self.plan.to_record())})
        if self.secagg is not None:
            content[SECAGG_KEY] = secagg_record(self.secagg)
        return content

    @classmethod
    def from_content(cls, content: RecordDict) -> SecureRequest:
        """Rebuild a request; a missing record or a malformed field is a ``ValueError``."""
        for key in (REQUEST_KEY, SECURE_KEY):
            if key not in content:
                raise ValueError(f"a secure request without its {key!r} record")
        plan = SecurePlan.from_record(content[SECURE_KEY])
        kind = REQUEST_TYPES.get(plan.stage)
        secagg = None
        if kind is not None:
            if SECAGG_KEY not in content:
                raise ValueError(f"a secure {plan.stage!r} request without its SecAgg+ message")
            secagg = secagg_message(kind, content[SECAGG_KEY])
        return cls(TrainRequest.from_record(content[REQUEST_KEY]), plan, secagg)


@dataclass(frozen=True)
class SecureReply:
    """A node's answer to one stage: its train reply (a decline carries no SecAgg+ message)."""

    stage: str
    reply: TrainReply
    secagg: SecAggReply | None = None

    def __post_init__(self) -> None:
        wanted = REPLY_TYPES.get(self.stage)
        if self.reply.accepted and wanted is not None and not isinstance(self.secagg, wanted):
            raise ValueError(f"an accepted {self.stage!r} reply carries {wanted.__name__}, not "
                             f"{type(self.secagg).__name__}")
        if (not self.reply.accepted or wanted is None) and self.secagg is not None:
            raise ValueError(f"a {'declined' if not self.reply.accepted else self.stage!r} "
                             "reply carries no SecAgg+ message")

    def to_content(self) -> RecordDict:
        content = self.reply.to_record()
        if self.secagg is not None:
            content[SECAGG_KEY] = secagg_record(self.secagg)
        return content

    @classmethod
    def from_content(cls, stage: str, content: RecordDict) -> SecureReply:
        """The reply to a ``stage`` request; a ``ValueError`` when it is malformed."""
        reply = TrainReply.from_record(content)
        kind = REPLY_TYPES.get(stage)
        secagg = None
        if reply.accepted and kind is not None:
            if SECAGG_KEY not in content:
                raise ValueError(f"an accepted {stage!r} reply without its SecAgg+ message")
            try:
                secagg = secagg_message(kind, content[SECAGG_KEY])
            except SecAggError as err:
                raise ValueError(str(err)) from err
        return cls(stage, reply, secagg)


def noise_params(plan: SecurePlan, dimension: int, clip: float) -> DistributedNoiseParams:
    """The run's encoding for ``dimension`` trained coordinates clipped at ``clip``: derived
    alike by every site and the coordinator from the plan (``choose_parameters``); a
    ``ValueError`` naming the parameter when no bit width holds the aggregate."""
    return choose_parameters(dimension, min_contributions=plan.min_contributions,
                             max_sites=plan.max_sites, clip=clip,
                             max_records_per_site=plan.max_records_per_site,
                             noise_multiplier=plan.noise_multiplier,
                             sensitivity_inflation=plan.sensitivity_inflation,
                             max_bits=plan.max_bits)


def secure_noise_multiplier(job: JobConfig, dimension: int) -> float:
    """The run's aggregate noise multiplier (the coordinator's, and ``plan``'s): every site's
    guarantee named by ``secure.calibrate`` within ``privacy.epsilon`` over all the run's steps
    (rounds x local_steps at ``secure.sample_rate``) for ``dimension`` trained values."""
    return aggregate_noise_multiplier(
        job.privacy.epsilon, job.privacy.delta, job.secure.sample_rate,
        job.federation.rounds * job.training.local_steps, dimension=dimension,
        min_contributions=job.secure.threshold(job.federation.min_nodes),
        guarantee=job.secure.calibrate)
