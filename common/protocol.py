"""What travels between coordinator and node, independent of Flower's transport.

A train request names the run, the round and the plan; the node answers with an accepted
update (LoRA tensors plus its privacy spend) or a decline with a reason. Keeping these as
plain dataclasses lets the node and coordinator logic be tested without Flower.

Each message type has one symmetric codec here, ``to_record`` / ``from_record``: a request
is the flat ``REQUEST_KEY`` ConfigRecord; a reply is a RecordDict whose ``STATUS_KEY``
ConfigRecord holds the fields marked ``_status`` and whose ``METRICS_KEY`` MetricRecord holds
those marked ``_metric``. A new field is declared once, on its dataclass. The adapter
(``ADAPTER_KEY``) travels beside them, encoded at the end of this module (float32 tensors:
an ArrayRecord holds no bf16).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from privatune.common.config import JobConfig, LoraConfig

TRAIN = "train"
EVALUATE = "evaluate"
ADAPTER_KEY = "adapter"
REQUEST_KEY = "request"
STATUS_KEY = "status"
METRICS_KEY = "metrics"

T = TypeVar("T")
_KINDS: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool, "float | None": float,
                           "int | None": int}


def _status(default: Any = dataclasses.MISSING) -> Any:
    """A reply field that travels in the ``STATUS_KEY`` ConfigRecord (text and flags)."""
    return field(default=default, metadata={"record": STATUS_KEY})


def _metric(default: Any = dataclasses.MISSING) -> Any:
    """A reply field that travels in the ``METRICS_KEY`` MetricRecord (numbers; None is left out)."""
    return field(default=default, metadata={"record": METRICS_KEY})


def _decode(owner: str, fld: dataclasses.Field, raw: Any, finite: bool) -> Any:
    """One received value as its field's type; a wrong type (or NaN/infinity if ``finite``) fails."""
    kind = _KINDS[str(fld.type)]
    if kind is bool:
        if not isinstance(raw, bool):
            raise ValueError(f"{owner}.{fld.name} is {raw!r}, not true or false")
        return raw
    try:
        value = kind(raw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{owner}.{fld.name} is {raw!r}, not a {kind.__name__}") from err
    if finite and kind is float and not math.isfinite(value):
        raise ValueError(f"{owner}.{fld.name} is {value!r}, not a finite number")
    return value


# ------------------------------------------------------------------------------ requests


class _Request:
    """Codec of a request: every field is required and every float finite."""

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_record(cls: type[T], record: Any) -> T:
        """Rebuild a request from a ConfigRecord-like mapping; a missing field is an error."""
        values: dict[str, Any] = {}
        for fld in dataclasses.fields(cls):  # type: ignore[arg-type]
            if fld.name not in record:
                raise ValueError(f"{cls.__name__} lacks field {fld.name!r}")
            values[fld.name] = _decode(cls.__name__, fld, record[fld.name], finite=True)
        return cls(**values)


@dataclass(frozen=True)
class TrainRequest(_Request):
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
    lora_targets: str  # comma-separated module names (requested_lora reads them)
    # federation.aggregation: which LoRA factors the node trains and sends (lora.trained_factors)
    aggregation: str = "fedavg"
    # physical micro-batch limit (0: none); the node takes the smaller of this and its policy's
    max_physical_batch_size: int = 0
    gradient_checkpointing: bool = False
    # the coordinator's record of this site's ledger head (its last reply's) and of the spend
    # it reported then; seq -1: no reply yet. A node whose ledger lacks that head refuses.
    ledger_seq: int = -1
    ledger_hash: str = ""
    ledger_epsilon: float = 0.0
    ledger_delta: float = 0.0
    # the site the coordinator knows this node as (by its authentication key); "" unaddressed.
    # A node of another name declines before spending anything.
    site: str = ""
    # notes without a prompt are split at this marker for the loss ("": whole notes)
    loss_marker: str = ""
    # only the notes loss_marker splits (or pairs with a prompt) train; the rest are never sampled
    judged_only: bool = False


@dataclass(frozen=True)
class EvaluateRequest(_Request):
    run_id: str
    round: int
    max_length: int
    batch_size: int
    lora_r: int
    lora_alpha: int
    lora_targets: str
    # generation scores (common.generation) on the site's held-out notes, when ``generation``;
    # the defaults ask for none (a received request must still carry every field)
    generation: bool = False
    marker: str = ""
    max_new_tokens: int = 0
    max_examples: int = 0
    site: str = ""  # as in TrainRequest
    loss_marker: str = ""  # as in TrainRequest: for the held-out loss
    judged_only: bool = False  # as in TrainRequest: the held-out loss over judged notes only


@dataclass(frozen=True)
class SecurePlan(_Request):
    """What a secure DP-SGD stage asks beyond its train request (``common.secure_protocol``):
    the stage and step, and the run's noise and encoding, the same at every site. The node
    derives the encoding from these and the adapter (``choose_parameters``), as the
    coordinator does, and checks the SecAgg+ messages against it."""

    stage: str
    step: int
    noise_multiplier: float  # the aggregate sigma of min_contributions shares
    sample_rate: float
    min_contributions: int
    max_sites: int
    max_records_per_site: int
    max_bits: int
    sensitivity_inflation: float
    public_seed: int  # the rotations' public seed (step_rotation_seed)


# ------------------------------------------------------------------------------- replies


class _Reply:
    """Codec of a reply: status fields in a ConfigRecord, numbers in a MetricRecord.

    A field the sender left out (a metric its site policy withholds, None) decodes to the
    field's default; one without a default is an error, as is a value of the wrong type.
    """

    def to_record(self) -> RecordDict:
        parts: dict[str, dict[str, Any]] = {STATUS_KEY: {}, METRICS_KEY: {}}
        for fld in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, fld.name)
            if value is not None:
                parts[fld.metadata["record"]][fld.name] = value
        return RecordDict({STATUS_KEY: ConfigRecord(parts[STATUS_KEY]),
                           METRICS_KEY: MetricRecord(parts[METRICS_KEY])})

    def to_json(self) -> dict[str, Any]:
        """The reply as the run's files (report.json, state.json) hold it; a None is left out."""
        return {fld.name: getattr(self, fld.name) for fld in dataclasses.fields(self)  # type: ignore[arg-type]
                if getattr(self, fld.name) is not None}

    @classmethod
    def from_json(cls: type[T], data: Mapping[str, Any]) -> T:
        """A reply from ``to_json``'s form; a field it lacks (an older file's) takes its default."""
        values = {fld.name: _decode(cls.__name__, fld, data[fld.name], finite=False)
                  for fld in dataclasses.fields(cls)  # type: ignore[arg-type]
                  if data.get(fld.name) is not None}
        return cls(**values)

    @classmethod
    def from_record(cls: type[T], content: RecordDict) -> T:
        values: dict[str, Any] = {}
        for fld in dataclasses.fields(cls):  # type: ignore[arg-type]
            key = fld.metadata["record"]
            if key not in content:
                raise ValueError(f"{cls.__name__}: the reply has no {key!r} record")
            record = content[key]
            if fld.name in record:
                values[fld.name] = _decode(cls.__name__, fld, record[fld.name], finite=False)
            elif fld.default is dataclasses.MISSING:
                raise ValueError(f"{cls.__name__} lacks field {fld.name!r}")
        return cls(**values)


@dataclass(frozen=True)
class TrainReply(_Reply):
    """What one site reports after a round: an update, or a decline with its reason."""

    site: str = _status()
    accepted: bool = _status()
    reason: str = _status("")
    num_examples: int = _metric(0)
    epsilon: float = _metric(0.0)
    delta: float = _metric(0.0)
    epsilon_budget: float = _metric(0.0)
    noise_multiplier: float = _metric(0.0)
    train_loss: float | None = _metric(None)
    accountant: str = _status("")  # the site's accountant, which its epsilon is by
    # the site's ledger head after its entry for this reply (seq -1: not told)
    ledger_seq: int = _metric(-1)
    ledger_hash: str = _status("")


@dataclass(frozen=True)
class EvaluateReply(_Reply):
    """A site's held-out loss of the global adapter (``eval_loss`` None when withheld), and its
    aggregate generation scores when asked for and released (None otherwise), the clinical ones
    (``common.clinical_metrics.ClinicalScores``, by the same names) among them; or a decline
    with its reason. ``accepted`` defaults to true so a reply without it still decodes."""

    site: str = _status()
    accepted: bool = _status(True)
    reason: str = _status("")
    num_examples: int = _metric(0)
    eval_loss: float | None = _metric(None)
    rouge_l: float | None = _metric(None)
    bleu: float | None = _metric(None)
    chrf: float | None = _metric(None)
    generation_examples: int | None = _metric(None)  # None: not generated, or the count withheld
    # clinical scores of the same completions: None where not generated, nothing was checkable
    # (the shares), or counts are withheld with generation_examples (the counts). repeat_4gram
    # is present whenever they were scored.
    measurement_fidelity: float | None = _metric(None)
    measurements_checked: int | None = _metric(None)
    status_accuracy: float | None = _metric(None)
    statuses_checked: int | None = _metric(None)
    status_majority_share: float | None = _metric(None)
    derivable_status_accuracy: float | None = _metric(None)
    derivable_statuses_checked: int | None = _metric(None)
    derivable_status_majority_share: float | None = _metric(None)
    repeat_4gram: float | None = _metric(None)
    ledger_seq: int = _metric(-1)  # the site's ledger head after its entry for this reply
    ledger_hash: str = _status("")


def requested_lora(request: TrainRequest | EvaluateRequest) -> LoraConfig:
    """The adapter a node is asked to train or evaluate (the request's ``lora_*`` fields)."""
    return LoraConfig(r=request.lora_r, alpha=request.lora_alpha,
                      target_modules=tuple(request.lora_targets.split(",")))


def _lora_fields(job: JobConfig) -> dict[str, Any]:
    return {"lora_r": job.lora.r, "lora_alpha": job.lora.alpha,
            "lora_targets": ",".join(job.lora.target_modules)}


def train_request(job: JobConfig, run_id: str, round_number: int) -> TrainRequest:
    """The request every sampled node gets in ``round_number`` of a job."""
    return TrainRequest(
        run_id=run_id, round=round_number, planned_rounds=job.federation.rounds,
        local_steps=job.training.local_steps, batch_size=job.training.batch_size,
        learning_rate=job.training.learning_rate, max_grad_norm=job.training.max_grad_norm,
        max_length=job.model.max_length,
        max_physical_batch_size=job.training.max_physical_batch_size,
        gradient_checkpointing=job.training.gradient_checkpointing, **_lora_fields(job),
        aggregation=job.federation.aggregation, loss_marker=job.loss_marker,
        judged_only=job.judged_only)


def evaluate_request(job: JobConfig, run_id: str, round_number: int,
                     generation: bool = False) -> EvaluateRequest:
    """The evaluate request of a round; ``generation`` asks for generation scores too."""
    evaluation = job.evaluation
    return EvaluateRequest(run_id=run_id, round=round_number, max_length=job.model.max_length,
                           batch_size=job.training.eval_batch_size, **_lora_fields(job),
                           generation=generation, marker=evaluation.marker,
                           max_new_tokens=evaluation.max_new_tokens,
                           max_examples=evaluation.max_examples, loss_marker=job.loss_marker,
                           judged_only=job.judged_only)


# ----------------------------------------------------------------------- the adapter codec


def state_to_arrayrecord(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Encode LoRA tensors for a Flower message, as float32 (ArrayRecord has no bf16), same order."""
    return ArrayRecord(torch_state_dict={
        name: tensor.detach().to(device="cpu", dtype=torch.float32) for name, tensor in state.items()
    })


def arrayrecord_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Decode a Flower ArrayRecord into tensors, same names, order and dtype as sent."""
    try:
        return dict(record.to_torch_state_dict())
    except (TypeError, ValueError) as error:
        raise ValueError(f"adapter array {_undecodable(record)!r} cannot be decoded: {error}") from error


def _undecodable(record: ArrayRecord) -> str:
    """The name of the first array in ``record`` that does not decode (for error messages)."""
    for name, array in record.items():
        try:
            array.numpy()
        except (TypeError, ValueError):
            return name
    return "?"
