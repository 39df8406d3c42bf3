"""What travels between coordinator and node, independent of Flower's transport.

A train request names the run, the round and the plan; the node answers with an accepted
update (LoRA tensors plus its privacy spend) or a decline with a reason. Keeping these as
plain dataclasses lets the node and coordinator logic be tested without Flower.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, TypeVar

from privatune.common.config import JobConfig

TRAIN = "train"
EVALUATE = "evaluate"
ADAPTER_KEY = "adapter"
REQUEST_KEY = "request"
STATUS_KEY = "status"
METRICS_KEY = "metrics"


@dataclass(frozen=True)
class TrainRequest:
    run_id: str
    round: int
    planned_rounds: int
    local_steps: int
    batch_size: int
    learning_rate: float
    max_grad_norm: float
    max_length: int
    lora_r: int
    lora_alpha: int
    lora_targets: str  # comma-separated module names

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: Any) -> TrainRequest:
        return _from_record(cls, record)


@dataclass(frozen=True)
class EvaluateRequest:
    run_id: str
    round: int
    max_length: int
    batch_size: int
    lora_r: int
    lora_alpha: int
    lora_targets: str

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: Any) -> EvaluateRequest:
        return _from_record(cls, record)


T = TypeVar("T")


def _from_record(cls: type[T], record: Any) -> T:
    """Rebuild a request from a ConfigRecord-like mapping; a missing field is an error."""
    values: dict[str, Any] = {}
    for fld in dataclasses.fields(cls):  # type: ignore[arg-type]
        if fld.name not in record:
            raise ValueError(f"{cls.__name__} lacks field {fld.name!r}")
        kind = {"int": int, "float": float, "str": str}[str(fld.type)]
        value = kind(record[fld.name])
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{cls.__name__}.{fld.name} is {value!r}, not a finite number")
        values[fld.name] = value
    return cls(**values)


@dataclass(frozen=True)
class TrainReply:
    """What one site reports after a round: an update, or a decline with its reason."""

    site: str
    accepted: bool
    reason: str = ""
    num_examples: int = 0
    epsilon: float = 0.0
    delta: float = 0.0
    epsilon_budget: float = 0.0
    noise_multiplier: float = 0.0
    train_loss: float | None = None


@dataclass(frozen=True)
class EvaluateReply:
    site: str
    num_examples: int
    eval_loss: float | None


def round_seed(job: JobConfig, round_number: int) -> int:
    """A reproducible per-round seed for experiments run outside the nodes (never DP noise)."""
    return job.seed * 100_003 + round_number


def train_request(job: JobConfig, run_id: str, round_number: int) -> TrainRequest:
    """The request every sampled node gets in ``round_number`` of a job."""
    return TrainRequest(
        run_id=run_id, round=round_number, planned_rounds=job.federation.rounds,
        local_steps=job.training.local_steps, batch_size=job.training.batch_size,
        learning_rate=job.training.learning_rate, max_grad_norm=job.training.max_grad_norm,
        max_length=job.model.max_length, lora_r=job.lora.r, lora_alpha=job.lora.alpha,
        lora_targets=",".join(job.lora.target_modules))


def evaluate_request(job: JobConfig, run_id: str, round_number: int) -> EvaluateRequest:
    return EvaluateRequest(run_id=run_id, round=round_number, max_length=job.model.max_length,
                           batch_size=job.training.eval_batch_size, lora_r=job.lora.r,
                           lora_alpha=job.lora.alpha, lora_targets=",".join(job.lora.target_modules))
