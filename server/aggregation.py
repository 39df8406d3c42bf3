"""Update validation and FedAvg over LoRA adapter tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


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
        delta = torch.sqrt(sum(((update[n] - reference[n]) ** 2).sum() for n in reference))
        if float(delta) > max_norm:
            raise InvalidUpdateError(f"update moves the adapter by {float(delta):.3g}, "
                                     f"more than the allowed {max_norm:g}")


def fedavg(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted average of adapter states (weights are example counts, or 1 when withheld)."""
    if not updates or len(updates) != len(weights):
        raise ValueError("fedavg needs one weight per update and at least one update")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("fedavg weights must sum to a positive number")
    return {name: sum(float(w) / total * u[name] for u, w in zip(updates, weights))
            for name in updates[0]}
