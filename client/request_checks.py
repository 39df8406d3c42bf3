"""Checks of what a coordinator sends, before the node spends anything on it: the global
adapter's values, a run's frozen LoRA factors under ffa, and which runs the site took part in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from privatune.common.ledger_records import (EVALUATE_METRICS, AdapterRelease, LedgerRecord,
                                             NonPrivateRelease, SecureRelease)
from privatune.common.lora import frozen_part, update_hash
from privatune.common.protocol import TrainRequest

MAX_ADAPTER_MAGNITUDE = 1e4  # LoRA factors beyond this overflow a forward pass in half precision


def adapter_problem(state: Mapping[str, torch.Tensor]) -> str:
    """Why a received global adapter cannot be trained or evaluated on, or "": a value that is
    not finite, or so large that the forward pass overflows (training it would spend epsilon
    on an update that could not be sent)."""
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            return (f"the global adapter from the coordinator is not finite (NaN or infinity in "
                    f"{name}); nothing was trained or evaluated")
        largest = float(tensor.abs().max()) if tensor.numel() else 0.0
        if largest > MAX_ADAPTER_MAGNITUDE:
            return (f"the global adapter from the coordinator holds {largest:.3g} in {name}, "
                    f"beyond {MAX_ADAPTER_MAGNITUDE:g} (a LoRA factor that large overflows the "
                    "forward pass); nothing was trained or evaluated")
    return ""


def runs_taken_part(records: Sequence[LedgerRecord]) -> set[str | None]:
    """Runs this site released anything in: an update, a secure contribution, or evaluation
    metrics (an evaluation-only run counts toward ``privacy.max_runs`` too)."""
    return {r.run_id for r in records
            if isinstance(r, (AdapterRelease, SecureRelease))
            or (isinstance(r, NonPrivateRelease) and r.release == EVALUATE_METRICS)}


@dataclass(frozen=True)
class FrozenFactors:
    """A train request's frozen LoRA factors, checked against the run's first round here."""

    reason: str  # why the node declines the request, or ""
    sha256: str | None  # hash of the frozen factors received; None when the run freezes none


def check_frozen_factors(request: TrainRequest, global_state: Mapping[str, torch.Tensor],
                         run_releases: Sequence[AdapterRelease | SecureRelease]) -> FrozenFactors:
    """Under ``ffa`` every site trains B against one shared A, or averaging B is meaningless.

    The node pins the hash of the A it received in its first release of a run
    (``frozen_a_sha256`` of that ledger entry: an adapter update, or a secure step's
    contribution; fedavg entries have none) and declines a later request of the run whose A
    differs, or whose aggregation differs from the run's first. The release would still be DP
    (clipping bounds it whatever A is), but the global model would not be what ffa promises.
    """
    try:
        frozen = frozen_part(global_state, request.aggregation)
    except ValueError as err:
        return FrozenFactors(f"aggregation: {err}", None)
    received = update_hash(frozen) if frozen else None
    pinned = run_releases[0].frozen_a_sha256 if run_releases else received
    if received == pinned:
        return FrozenFactors("", received)
    if pinned is None:
        reason = (f"this run trained both LoRA factors (aggregation fedavg) at this site in its "
                  f"first round; a run's aggregation cannot change to {request.aggregation}")
    elif received is None:
        reason = ("this run keeps lora_A frozen (aggregation ffa) at this site since its first "
                  f"round; a run's aggregation cannot change to {request.aggregation}")
    else:
        reason = (f"the frozen lora_A factors differ from those this site received in the run's "
                  f"first round (sha256 {received[:12]}, pinned {pinned[:12]}): under ffa every "
                  "site must train B against the same A")
    return FrozenFactors(reason, received)
