"""Update screening and aggregation over LoRA adapter tensors.

A site's update is used only if it fits the global adapter (names, shapes, dtypes, finite
values), moves it by no more than the round's norm bound, and claims a sane averaging weight;
a rejected update is reported with its reason and left out, so one site cannot take over the
global model. A federation that distrusts its sites can also aggregate by coordinate-wise
median or trimmed mean (Flower's own implementations) instead of the weighted mean.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg

from privatune.common.config import FederationConfig

# Adam moves a coordinate by at most about lr * (1 - beta1) / sqrt(1 - beta2) per step (3.16 lr
# at the default betas); the bound below leaves room for that, whatever the gradients were.
ADAM_STEP_BOUND = 3.2
TRIMMED_FRACTION = 0.2


class InvalidUpdateError(ValueError):
    """A node's update does not fit the global adapter; the message names the tensor."""


def validate_update(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                    max_norm: float | None = None) -> None:
    """Reject updates with wrong names, shapes or dtypes, non-finite values or a huge norm."""
    missing = sorted(set(reference) - set(update))
    unknown = sorted(set(update) - set(reference))
    if missing or unknown:
        raise InvalidUpdateError(f"tensor names differ: missing {missing[:3]}, unknown {unknown[:3]}")
    for name, tensor in update.items():
        expected = reference[name]
        if tensor.shape != expected.shape:
            raise InvalidUpdateError(f"{name}: shape {tuple(tensor.shape)}, expected "
                                     f"{tuple(expected.shape)}")
        if tensor.dtype != expected.dtype:
            raise InvalidUpdateError(f"{name}: dtype {tensor.dtype}, expected {expected.dtype}")
        if not torch.isfinite(tensor).all():
            raise InvalidUpdateError(f"{name}: contains NaN or infinite values")
    if max_norm is not None:
        moved = update_norm(update, reference)
        if moved > max_norm:
            raise InvalidUpdateError(f"update moves the adapter by {moved:.3g}, more than the "
                                     f"round's bound of {max_norm:.3g}")


def update_norm(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """How far an update moves the adapter (L2 over all LoRA tensors)."""
    return float(torch.sqrt(sum(((update[n].double() - reference[n].double()) ** 2).sum()
                                for n in reference)))


def optimizer_move_bound(reference: Mapping[str, torch.Tensor], learning_rate: float,
                         steps: int) -> float:
    """The largest move the node's Adam optimizer can make in ``steps`` steps, any gradients."""
    values = sum(t.numel() for t in reference.values())
    return ADAM_STEP_BOUND * learning_rate * steps * math.sqrt(values)


def round_norm_bound(norms: Sequence[float], federation: FederationConfig,
                     optimizer_bound: float) -> float:
    """The round's bound on an update's norm: the configured one, else derived.

    Derived: never above what the optimizer can do, and with at least three updates not above
    ``update_norm_multiple`` times their median (a robust centre one site cannot drag).
    """
    if federation.max_update_norm > 0:
        return federation.max_update_norm
    bound = optimizer_bound
    if len(norms) >= 3:
        bound = min(bound, federation.update_norm_multiple * statistics.median(norms))
    return bound


def weight_problem(num_examples: int, federation: FederationConfig) -> str | None:
    """Why a claimed example count cannot weight the average, or None."""
    if not 0 < num_examples <= federation.max_site_examples:
        return (f"claims {num_examples} examples; an averaging weight must be between 1 and "
                f"federation.max_site_examples = {federation.max_site_examples}")
    return None


@dataclass(frozen=True)
class Contribution:
    site: str
    state: Mapping[str, torch.Tensor]
    num_examples: int


def aggregate(contributions: Sequence[Contribution],
              federation: FederationConfig) -> dict[str, torch.Tensor]:
    """The new global adapter from screened contributions, by the federation's rule."""
    states = [c.state for c in contributions]
    if federation.robust != "none":
        names = list(states[0])
        arrays = [([s[n].numpy() for n in names], 1) for s in states]
        merged = (aggregate_median(arrays) if federation.robust == "median"
                  else aggregate_trimmed_avg(arrays, TRIMMED_FRACTION))
        return {n: torch.from_numpy(np.asarray(a, dtype=np.float32)) for n, a in zip(names, merged)}
    weights = ([1.0] * len(states) if federation.weighting == "equal"
               else [float(c.num_examples) for c in contributions])
    return fedavg(states, weights)


def fedavg(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted average of adapter states (weights are example counts, or 1 when withheld)."""
    if not updates or len(updates) != len(weights):
        raise ValueError("fedavg needs one weight per update and at least one update")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("fedavg weights must sum to a positive number")
    return {name: sum(float(w) / total * u[name] for u, w in zip(updates, weights))
            for name in updates[0]}
