"""How the coordinator reaches nodes: the ``Transport`` it is given (``server.app.FlowerTransport``
over Flower's Grid, or ``simulations.in_process.InProcessTransport`` with the nodes in this
process), the replies a transport hands back, the bounded wait for enough nodes, and the bytes
an adapter takes on the wire."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

from privatune.common.protocol import EvaluateReply, EvaluateRequest, TrainReply, TrainRequest
from privatune.common.secure_protocol import SecAggReply, SecureRequest


class NodesUnavailableError(RuntimeError):
    """Too few nodes connected within the bounded wait."""


@dataclass
class TrainResult:
    node_id: int
    reply: TrainReply
    state: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class EvaluateResult:
    node_id: int
    reply: EvaluateReply


@dataclass
class SecureResult:
    """A node's answer to one stage of a secure round: its train reply (a decline has no
    SecAgg+ message) and the SecAgg+ message, whose site id must be ``node_id``."""

    node_id: int
    reply: TrainReply
    secagg: SecAggReply | None = None


Result = TypeVar("Result", TrainResult, EvaluateResult, SecureResult)


class Transport(Protocol):
    """How the coordinator reaches nodes: Flower's Grid in a deployment or a Flower simulation,
    the nodes themselves where they run in this process."""

    def node_ids(self) -> list[int]: ...

    def node_sites(self) -> Mapping[int, str] | None:
        """The site each node is bound to by its authentication key; None where nodes are not
        authenticated (simulation): then a site is known by the name its replies report."""

    def train(self, requests: Mapping[int, TrainRequest], state: Mapping[str, torch.Tensor],
              timeout_s: float) -> tuple[list[TrainResult], list[str]]: ...

    def evaluate(self, requests: Mapping[int, EvaluateRequest], state: Mapping[str, torch.Tensor],
                 timeout_s: float) -> tuple[list[EvaluateResult], list[str]]: ...

    def secure(self, requests: Mapping[int, SecureRequest], state: Mapping[str, torch.Tensor] | None,
               timeout_s: float) -> tuple[list[SecureResult], list[str]]:
        """One stage of a secure round (``common.secure_protocol``) at each node, the adapter
        beside it where the stage needs one; answers by node, and failures (no reply in time,
        an error, a malformed reply) as for train and evaluate."""


def wait_for_nodes(transport: Transport, minimum: int, timeout_s: float,
                   poll_s: float = 1.0) -> list[int]:
    """Node ids once at least ``minimum`` are connected; an error after ``timeout_s``, never forever."""
    deadline = time.monotonic() + timeout_s
    while True:
        ids = sorted(transport.node_ids())
        if len(ids) >= minimum:
            return ids
        if time.monotonic() >= deadline:
            raise NodesUnavailableError(f"only {len(ids)} of the required {minimum} nodes connected "
                                        f"within {timeout_s:g} s")
        time.sleep(poll_s)


def adapter_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of LoRA tensors on the wire (ArrayRecord carries float32): an adapter or an update."""
    return sum(4 * tensor.numel() for tensor in state.values())
