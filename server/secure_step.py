"""The coordinator's side of one secure DP-SGD step (issue 27): the optimizer step on the
decoded sum.

Secure aggregation gives the coordinator the sum of the sites' clipped per-sample gradient
sums plus the aggregate noise (decoded by ``common.distributed_noise.decode_sum``): the output
of one DP-SGD step's mechanism on the union of the sites' Poisson samples. Everything here is
post-processing of that public output, so it costs no privacy: unflatten it (the trained
tensors' names sorted, the rule ``client.secure_contribution`` flattens by), divide by the
expected union batch q*N (the job's ``training.batch_size``: a fixed divisor, as Opacus divides
by its expected batch size; the real sample size is never known here), and take an Adam step
on the trained part of the global adapter (fedavg: every LoRA factor; ffa: lora_B only,
lora_A stays at its seeded start).

The coordinator keeps Adam's moments from round to round (``AdamState``), as one DP-SGD run
on pooled records would; they are tensors it can checkpoint (``AdamState.to_tensors``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from privatune.common.lora import trained_part, with_update

_STEPS_KEY = "adam.steps"
_FIRST, _SECOND = "adam.exp_avg.", "adam.exp_avg_sq."


@dataclass(frozen=True)
class AdamSettings:
    """Adam's hyper-parameters (torch.optim.Adam's defaults, no weight decay)."""

    learning_rate: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive finite number, "
                             f"got {self.learning_rate!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a positive finite number, got {self.eps!r}")


@dataclass(frozen=True)
class AdamState:
    """Adam's step count and moments per trained tensor (float32, CPU), kept across rounds."""

    steps: int
    exp_avg: Mapping[str, torch.Tensor]
    exp_avg_sq: Mapping[str, torch.Tensor]

    @classmethod
    def initial(cls, trained: Mapping[str, torch.Tensor]) -> AdamState:
        """No step taken: zero moments shaped like ``trained``."""
        zeros = {n: torch.zeros(t.shape, dtype=torch.float32) for n, t in trained.items()}
        return cls(0, zeros, {n: z.clone() for n, z in zeros.items()})

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The state as named tensors (e.g. a safetensors file beside the checkpoint)."""
        out = {_STEPS_KEY: torch.tensor([self.steps], dtype=torch.int64)}
        out.update({_FIRST + n: t for n, t in self.exp_avg.items()})
        out.update({_SECOND + n: t for n, t in self.exp_avg_sq.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> AdamState:
        """The inverse of ``to_tensors``; an error naming what is missing or extra."""
        if _STEPS_KEY not in tensors:
            raise ValueError(f"Adam state has no {_STEPS_KEY!r}")
        first = {k[len(_FIRST):]: v for k, v in tensors.items() if k.startswith(_FIRST)}
        second = {k[len(_SECOND):]: v for k, v in tensors.items() if k.startswith(_SECOND)}
        extra = sorted(set(tensors) - {_STEPS_KEY} - {_FIRST + n for n in first}
                       - {_SECOND + n for n in second})
        if extra or set(first) != set(second):
            raise ValueError(f"Adam state's tensors do not pair up: extra {extra[:3]}, "
                             f"unpaired {sorted(set(first) ^ set(second))[:3]}")
        steps = int(tensors[_STEPS_KEY].reshape(-1)[0])
        if steps < 0:
            raise ValueError(f"Adam state's step count is negative ({steps})")
        return cls(steps, first, second)


@dataclass(frozen=True)
class SecureStepResult:
    """The new global adapter (every LoRA tensor) and the optimizer state after the step."""

    state: dict[str, torch.Tensor]
    optimizer: AdamState


def flat_order(names: Sequence[str]) -> tuple[str, ...]:
    """The order of the trained tensors in a flat contribution: their names, sorted."""
    return tuple(sorted(names))


def unflatten(vector: np.ndarray | torch.Tensor,
              trained: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``vector`` cut into tensors shaped like ``trained``, in ``flat_order``; returned in
    ``trained``'s own order, float32 on the CPU."""
    values = torch.as_tensor(np.asarray(vector, dtype=np.float64)).reshape(-1)
    names = flat_order(list(trained))
    sizes = [trained[n].numel() for n in names]
    if values.numel() != sum(sizes):
        raise ValueError(f"the decoded sum has {values.numel()} coordinates, the trained part "
                         f"{sum(sizes)} ({len(names)} tensors)")
    parts = dict(zip(names, values.split(sizes), strict=True))
    return {n: parts[n].reshape(trained[n].shape).to(torch.float32) for n in trained}


def adam_update(params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor],
                state: AdamState, settings: AdamSettings) -> tuple[dict[str, torch.Tensor], AdamState]:
    """One Adam step (torch.optim.Adam's arithmetic) on copies of ``params``."""
    if set(state.exp_avg) != set(params) or set(grads) != set(params):
        raise ValueError(f"Adam state, gradients and parameters name different tensors: "
                         f"{sorted(set(state.exp_avg) ^ set(params))[:3]}"
                         f"{sorted(set(grads) ^ set(params))[:3]}")
    steps = state.steps + 1
    correction1 = 1 - settings.beta1 ** steps
    correction2 = 1 - settings.beta2 ** steps
    new_params, first, second = {}, {}, {}
    for name, param in params.items():
        grad = grads[name].to(torch.float32)
        if grad.shape != param.shape or state.exp_avg[name].shape != param.shape:
            raise ValueError(f"tensor {name}: gradient {tuple(grad.shape)}, moment "
                             f"{tuple(state.exp_avg[name].shape)}, parameter {tuple(param.shape)}")
        m = state.exp_avg[name].to(torch.float32).lerp(grad, 1 - settings.beta1)
        v = state.exp_avg_sq[name].to(torch.float32) * settings.beta2 \
            + (1 - settings.beta2) * grad * grad
        denominator = v.sqrt() / math.sqrt(correction2) + settings.eps
        new_params[name] = param.detach().to(torch.float32) \
            - settings.learning_rate / correction1 * m / denominator
        first[name], second[name] = m, v
    return new_params, AdamState(steps, first, second)


def secure_dpsgd_step(global_state: Mapping[str, torch.Tensor], noisy_sum: np.ndarray, *,
                      expected_batch_size: float, aggregation: str, optimizer: AdamState,
                      settings: AdamSettings) -> SecureStepResult:
    """Apply one decoded secure DP-SGD step to the global adapter.

    ``noisy_sum`` is ``decode_sum``'s output, flat in ``flat_order`` of the trained part of
    ``global_state`` under ``aggregation``; divided by ``expected_batch_size`` (q*N) it is the
    DP gradient. Only the trained part changes; an error for a non-finite sum (nothing is
    stepped then).
    """
    if not (math.isfinite(expected_batch_size) and expected_batch_size > 0):
        raise ValueError(f"expected_batch_size must be a positive finite number, "
                         f"got {expected_batch_size!r}")
    trained = trained_part(global_state, aggregation)
    sums = unflatten(noisy_sum, trained)
    if not all(torch.isfinite(t).all() for t in sums.values()):
        raise ValueError("the decoded sum is not finite; the global adapter is left as it was")
    grads = {n: t / expected_batch_size for n, t in sums.items()}
    updated, state = adam_update(trained, grads, optimizer, settings)
    return SecureStepResult(with_update(global_state, updated), state)
