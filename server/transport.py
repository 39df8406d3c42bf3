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


Result = TypeVar("Result", TrainResult, EvaluateResult)


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
