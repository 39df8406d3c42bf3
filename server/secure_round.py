"""The coordinator's secure DP-SGD round (issue 27): ``federation.mode: secure_dpsgd``.

A round is ``training.local_steps`` DP-SGD steps of the union of the sites' records. At setup
each sampled node decides the round against its own policy (its t, limits, cap on the guarantee
it enforces); then every step runs SecAgg+'s four stages through the transport
(``Transport.secure``) among the sites still in the round: each masks its encoded clipped
gradient sum with its Skellam share, and the coordinator learns only their modular sum. It
decodes that (``decode_sum``: an aggregate that may have wrapped around is refused), divides it
by the expected union batch (``training.batch_size``) and takes an Adam step on the global
adapter (``server.secure_step``). A step with fewer than t contributions, or whose decoding is
refused, releases nothing: the round stops there and says why. The rest of the round
(evaluation, checkpoint with Adam's state, report) is the coordinator's, shared with
``local_dp``.

Each node's SecAgg+ id is its node id as the transport authenticated it; a SecAgg+ message
whose site id is another is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from privatune.common.config import JobConfig
from privatune.common.distributed_noise import (
    DEFAULT_SENSITIVITY_INFLATION,
    DistributedNoiseParams,
    decode_sum,
)
from privatune.common.lora import trained_part
from privatune.common.protocol import SecurePlan, TrainRequest
from privatune.common.secure_aggregation_messages import MaskedInput, SecAggConfig, harary_graph
from privatune.common.secure_aggregation_coordinator import SecAggCoordinator
from privatune.common.secure_protocol import (
    KEYS,
    MASK,
    SETUP,
    SHARES,
    UNMASK,
    SecureRequest,
    noise_params,
    secagg_round_id,
    step_rotation_seed,
    wire_bytes,
)
from privatune.server.rounds import RoundTraining
from privatune.server.secure_step import AdamSettings, AdamState, secure_dpsgd_step
from privatune.server.site_addressing import identified
from privatune.server.transport import SecureResult, Transport, adapter_bytes


def round_plan(job: JobConfig, noise_multiplier: float, sites: int) -> SecurePlan:
    """The setup's plan of a round among ``sites`` sampled nodes."""
    return SecurePlan(stage=SETUP, step=0, noise_multiplier=noise_multiplier,
                      sample_rate=job.secure.sample_rate,
                      min_contributions=job.secure.threshold(job.federation.min_nodes),
                      max_sites=sites, max_records_per_site=job.secure.max_records_per_site,
                      max_bits=job.secure.max_bits,
                      sensitivity_inflation=DEFAULT_SENSITIVITY_INFLATION, public_seed=job.seed)


class StepRefused(Exception):
    """A secure step released nothing; the message says why."""


@dataclass
class SecureRoundState:
    """What the coordinator carries between secure rounds: the global adapter and Adam's state."""

    global_state: dict[str, torch.Tensor]
    optimizer: AdamState | None = None


@dataclass
class _Exchange:
    """One round's traffic through the transport: the nodes still in, what each sent, failures."""

    transport: Transport
    requests: Mapping[int, TrainRequest]
    timeout_s: float
    sites: Mapping[int, str] | None
    outcome: RoundTraining
    on_reply: Callable[[SecureResult], None]
    names: dict[int, str] = field(default_factory=dict)

    def ask(self, plan: SecurePlan, messages: Mapping[int, Any],
            state: Mapping[str, torch.Tensor] | None = None) -> dict[int, Any]:
        """One stage at the nodes in ``messages``: the SecAgg+ answers of those that accepted,
        by node; a node that failed or declined is out of the round from here on."""
        requests = {node: SecureRequest(self.requests[node], plan, message)
                    for node, message in messages.items()}
        results, failures = self.transport.secure(requests, state, self.timeout_s)
        step = f"step {plan.step} {plan.stage}" if plan.stage != SETUP else "setup"
        self.outcome.failures.extend(f"{step}: {f}" for f in failures)
        sent = sum(wire_bytes(m) for m in messages.values() if m is not None)
        self.outcome.bytes_sent = (self.outcome.bytes_sent or 0) + sent + (
            adapter_bytes(state) * len(messages) if state is not None else 0)
        answers = {}
        for result in identified(results, self.sites, self.outcome.failures):
            self.on_reply(result)
            reply = result.reply
            self.outcome.replies[reply.site] = reply
            if not reply.accepted:
                self.outcome.declined[reply.site] = reply.reason
                continue
            if result.secagg is not None and result.secagg.site_id != result.node_id:
                self.outcome.failures.append(
                    f"{step}: node {result.node_id}: its SecAgg+ message names site "
                    f"{result.secagg.site_id}, not the node it came from; refused")
                continue
            if result.secagg is not None:
                self.outcome.bytes_received = (self.outcome.bytes_received or 0) \
                    + wire_bytes(result.secagg)
            if isinstance(result.secagg, MaskedInput):  # what the site's ledger must list
                self.outcome.masked_inputs_sha256.setdefault(reply.site, []).append(
                    hashlib.sha256(result.secagg.masked).hexdigest())
            self.names[result.node_id] = reply.site
            answers[result.node_id] = result.secagg
        return answers


def secure_round(job: JobConfig, transport: Transport, chosen: list[int],
                 requests: Mapping[int, TrainRequest], sites: Mapping[int, str] | None,
                 state: SecureRoundState, noise_multiplier: float, round_number: int,
                 on_reply: Callable[[SecureResult], None],
                 progress: Callable[[str], None]) -> RoundTraining:
    """One secure round among the ``chosen`` nodes (``requests``: each node's train request,
    addressed and anchored); ``state`` is updated by every step that released its sum."""
    fed, t = job.federation, job.secure.threshold(job.federation.min_nodes)
    outcome = RoundTraining(bytes_sent=0, bytes_received=0)
    exchange = _Exchange(transport, requests, fed.round_timeout_s, sites, outcome, on_reply)
    plan = round_plan(job, noise_multiplier, len(chosen))
    trained = trained_part(state.global_state, fed.aggregation)
    try:
        params = noise_params(plan, sum(x.numel() for x in trained.values()),
                              job.training.max_grad_norm)
    except ValueError as err:
        outcome.failures.append(f"the round's encoding: {err}; nothing was asked of the sites")
        progress(f"  no secure round: {err}")
        return outcome
    active = sorted(exchange.ask(plan, {node: None for node in chosen}, state.global_state))
    if state.optimizer is None:
        state.optimizer = AdamState.initial(trained)
    adam = AdamSettings(job.training.learning_rate)
    contributed: set[str] = set()
    steps = 0
    for step in range(job.training.local_steps):
        try:
            if len(active) < t:
                raise StepRefused(f"{len(active)} sites in the round, below t = {t}")
            noisy_sum, contributors = _step(exchange, dataclasses.replace(plan, step=step),
                                            params, active, t, round_number, state)
        except StepRefused as err:
            outcome.failures.append(f"step {step} released nothing: {err}; the round stops there")
            break
        stepped = secure_dpsgd_step(state.global_state, noisy_sum,
                                    expected_batch_size=float(job.training.batch_size),
                                    aggregation=fed.aggregation, optimizer=state.optimizer,
                                    settings=adam)
        state.global_state, state.optimizer = stepped.state, stepped.optimizer
        contributed |= {exchange.names[node] for node in contributors}
        active = sorted(contributors)
        steps += 1
    outcome.participants = sorted(contributed)
    outcome.aggregated = steps > 0
    progress(f"  {steps} of {job.training.local_steps} secure steps released, from "
             f"{', '.join(outcome.participants) or 'no site'}")
    return outcome


def _step(exchange: _Exchange, plan: SecurePlan, params: DistributedNoiseParams,
          active: list[int], t: int, round_number: int,
          state: SecureRoundState) -> tuple[Any, tuple[int, ...]]:
    """SecAgg+'s four stages for one step, then the decoded sum and who contributed to it."""
    round_id = secagg_round_id(round_number, plan.step)
    try:
        config = SecAggConfig.create(round_id=round_id, site_ids=active, threshold=t,
                                     modulus_bits=params.bits,
                                     vector_length=params.padded_dimension,
                                     graph=harary_graph(active, 2 * t - 2, seed=round_id))
        coordinator = SecAggCoordinator(config)
        keys = exchange.ask(dataclasses.replace(plan, stage=KEYS), {n: config for n in active})
        directory = coordinator.receive_public_keys(list(keys.values()))
        shares = exchange.ask(dataclasses.replace(plan, stage=SHARES),
                              {n: directory for n in directory.site_ids})
        deliveries = coordinator.receive_encrypted_shares(list(shares.values()))
        masked = exchange.ask(dataclasses.replace(plan, stage=MASK), deliveries,
                              state.global_state)
        unmask = coordinator.receive_masked_inputs(list(masked.values()))
        revealed = exchange.ask(dataclasses.replace(plan, stage=UNMASK),
                                {n: unmask for n in unmask.survivors})
        result = coordinator.receive_unmask_shares(list(revealed.values()))
        noisy_sum = decode_sum(result.total, params,
                               rotation_seed=step_rotation_seed(plan.public_seed, round_id),
                               contributions=len(result.contributors))
    except ValueError as err:  # SecAggError, AggregateOverflowError, a count outside the range
        raise StepRefused(str(err)) from err
    return noisy_sum, result.contributors
