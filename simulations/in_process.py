"""Nodes in this process as the coordinator's transport: the real round without an engine.

``InProcessTransport`` hands each request to a ``SiteNode`` in this process and its reply back,
through the same records Flower carries (requests and replies as records, adapters as
``ArrayRecord``s), so the coordinator's round (sample, request, checks, aggregation, evaluation)
and the node's (policy, budget, DP-SGD, ledger) run exactly as deployed. The empirical audit
trains its federations this way; Flower's simulation engine and the SuperLink are the other two
transports (``server.app.FlowerTransport``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch
from flwr.app import ConfigRecord

from privatune.client.node import SiteNode
from privatune.client.secure_node import SecureRound
from privatune.common.protocol import (EvaluateReply, EvaluateRequest, TrainReply, TrainRequest,
                                       arrayrecord_to_state, state_to_arrayrecord)
from privatune.common.secure_protocol import SecureReply, SecureRequest
from privatune.server.transport import EvaluateResult, SecureResult, TrainResult

Message = TypeVar("Message", TrainRequest, EvaluateRequest, TrainReply, EvaluateReply)


def _wire(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An adapter as the other side of the wire receives it."""
    return arrayrecord_to_state(state_to_arrayrecord(state))


def _received(message: Message) -> Message:
    """A request or reply as the other side of the wire decodes it (its own codec)."""
    record = message.to_record()
    return type(message).from_record(ConfigRecord(record) if isinstance(record, dict) else record)


class InProcessTransport:
    """Nodes 1..n are the given sites, always connected and unauthenticated (a simulation):
    each site is known by the name its replies report."""

    def __init__(self, nodes: Sequence[SiteNode]):
        self.nodes = {node_id: node for node_id, node in enumerate(nodes, start=1)}
        # what each node keeps between the stages of a secure round (its runtime's state in a
        # deployment): the node's own secrets, never read here
        self._sessions: dict[int, bytes] = {}

    def node_ids(self) -> list[int]:
        return list(self.nodes)

    def node_sites(self) -> Mapping[int, str] | None:
        return None

    def train(self, requests: Mapping[int, TrainRequest], state: Mapping[str, torch.Tensor],
              timeout_s: float) -> tuple[list[TrainResult], list[str]]:
        """Each node trains in turn (no timeout: nothing here can go silent)."""
        results = []
        for node_id, request in requests.items():
            outcome = self.nodes[node_id].train(_received(request), _wire(state))
            reply = _received(outcome.reply)
            results.append(TrainResult(node_id, reply, _wire(outcome.state) if reply.accepted else {}))
        return results, []

    def evaluate(self, requests: Mapping[int, EvaluateRequest], state: Mapping[str, torch.Tensor],
                 timeout_s: float) -> tuple[list[EvaluateResult], list[str]]:
        return [EvaluateResult(node_id, _received(self.nodes[node_id].evaluate(
                    _received(request), _wire(state))))
                for node_id, request in requests.items()], []

    def secure(self, requests: Mapping[int, SecureRequest], state: Mapping[str, torch.Tensor] | None,
               timeout_s: float) -> tuple[list[SecureResult], list[str]]:
        """Each node answers the stage in turn, through the records Flower carries."""
        results = []
        for node_id, request in requests.items():
            received = SecureRequest.from_content(request.to_content())
            reply, session = SecureRound(self.nodes[node_id]).answer(
                node_id, received, None if state is None else _wire(state),
                self._sessions.pop(node_id, None))
            if session is not None:
                self._sessions[node_id] = session
            answer = SecureReply.from_content(reply.stage, reply.to_content())
            results.append(SecureResult(node_id, answer.reply, answer.secagg))
        return results, []
