"""The hospital node's side of a secure DP-SGD round (issue 27), beside ``client.node.SiteNode``.

A secure round is a setup and then, per step, the four SecAgg+ stages
(``common.secure_protocol``). At setup the node decides the whole round against its policy and
ledger, as it decides a train request: the coordinator's t against the policy's
``secure_aggregation.min_contributions``, the request limits, the noise floor, and the site's
epsilon after the round's steps under the guarantee its policy enforces (the fallback of its
own noise share unless the policy trusts secure aggregation) against its cap and per-run
budget; a decline is written to the ledger with its reason. At the masking stage of each step
it loads the global adapter (under ffa, only if its frozen A is the one the run's first
contribution here was computed against), Poisson-samples its records at q with its own secret
randomness, sums the clipped per-record gradients of the trained factors
(``client.secure_contribution``, whose DP-applied checks stay), encodes the sum with its
Skellam share and masks it; the ``SecureRelease`` (both guarantees, and under ffa the hash of
that A) is written to the ledger, fsync'd, BEFORE the masked input leaves.

What a site holds between stages (its SecAgg+ keys, seed and shares) is a ``SecureSession``:
bytes that the node's own runtime keeps (Flower's node state, or the in-process transport)
and that never leave the site. A site's SecAgg+ id is the node id its transport
authenticated, never a name in a message.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from privatune.client.node import SiteNode, TrainOutcome
from privatune.client.policy import physical_batch_size, request_violation
from privatune.client.request_checks import (
    adapter_problem,
    check_frozen_factors,
    runs_taken_part,
)
from privatune.client.secure_contribution import (
    SiteContribution,
    encode_site_contribution,
    noise_rng,
    sample_generator,
    site_contribution,
)
from privatune.client.site_state import SiteBusy
from privatune.client.trainer import DPNotAppliedError
from privatune.common.distributed_noise import DistributedNoiseParams
from privatune.common.ledger import LedgerWriteError
from privatune.common.ledger_records import SecureRelease
from privatune.common.lora import train_factors, trained_part
from privatune.common.privacy import (MechanismStep, SecureStep, epsilon_of,
                                      share_noise_multiplier)
from privatune.common.protocol import (
    SecurePlan,
    TrainReply,
    TrainRequest,
    requested_lora,
)
from privatune.common.secure_aggregation import SecAggSite
from privatune.common.secure_aggregation_messages import SecAggConfig, SecAggError
from privatune.common.secure_protocol import (
    KEYS,
    MASK,
    SETUP,
    SHARES,
    SecureReply,
    SecureRequest,
    noise_params,
    step_rotation_seed,
)

log = logging.getLogger(__name__)

_STEADY = ("noise_multiplier", "sample_rate", "min_contributions", "max_sites",
           "max_records_per_site", "max_bits", "sensitivity_inflation", "public_seed")


@dataclass(frozen=True)
class SecureSession:
    """What this site keeps between the stages of one secure round: the round it accepted at
    setup (its request and plan), and the current step's SecAgg+ config and secrets."""

    request: TrainRequest
    plan: SecurePlan
    step: int = -1
    config: Mapping[str, Any] | None = None
    secagg: Mapping[str, Any] | None = None

    def to_bytes(self) -> bytes:
        return json.dumps({"request": self.request.to_record(), "plan": self.plan.to_record(),
                           "step": self.step, "config": _jsonable(self.config),
                           "secagg": _jsonable(self.secagg)}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SecureSession:
        raw = json.loads(data)
        return cls(TrainRequest.from_record(raw["request"]), SecurePlan.from_record(raw["plan"]),
                   int(raw["step"]), _from_jsonable(raw["config"]), _from_jsonable(raw["secagg"]))


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, dict):
        return {k: _from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_jsonable(v) for v in value]
    return value


def enforced(node: SiteNode, step: SecureStep) -> SecureStep:
    """A secure step as this site's cap is enforced on it: the aggregate noise where its policy
    trusts secure aggregation, its own share alone (the fallback) otherwise."""
    return step if node.policy.secure_aggregation.trust else step.fallback()


@dataclass(frozen=True)
class StepSpend:
    """This site's epsilon after one more secure step, on the guarantee its policy enforces (what
    its cap holds), on (a) and on (b): what the step's ``SecureRelease`` records and the reply
    to its masking stage reports."""

    enforced: float
    aggregate: float
    fallback: float


def spend_after(node: SiteNode, step: SecureStep) -> StepSpend:
    """The figures of ``StepSpend``, each composed once from the ledger. The enforced one is
    (a)'s or (b)'s own where every secure release in the ledger was made under the trust the
    policy has now (the usual case); a ledger that holds both (the policy's trust changed
    since) counts each release by its own ``trusted``, so that figure is composed apart."""
    privacy, trust = node.policy.privacy, node.policy.secure_aggregation.trust

    def after(guarantee: str, then: SecureStep) -> float:
        return node.ledger.epsilon(privacy.delta, privacy.accountant_name, then=[then],
                                   guarantee=guarantee)

    aggregate, fallback = after("aggregate", step), after("fallback", step.fallback())
    if all(r.trusted == trust for r in node.ledger.secure_releases()):
        return StepSpend(aggregate if trust else fallback, aggregate, fallback)
    return StepSpend(after("enforced", enforced(node, step)), aggregate, fallback)


def _run_history(node: SiteNode, run_id: str) -> list[MechanismStep | SecureStep]:
    """This run's releases at this site, each as the ledger enforces it."""
    return [*(r.step for r in node.ledger.releases(run_id)),
            *(r.mechanism("enforced") for r in node.ledger.secure_releases(run_id))]


def _secure_rounds(node: SiteNode, run_id: str) -> set[int]:
    return {r.round for r in node.ledger.secure_releases(run_id)} | \
        {r.round for r in node.ledger.releases(run_id)}


def _secure_step(plan: SecurePlan, params: DistributedNoiseParams, steps: int) -> SecureStep:
    return SecureStep(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                      steps=steps, scaled_clip=params.scaled_clip,
                      dimension=params.padded_dimension, shares=plan.min_contributions)


def _params(request: TrainRequest, plan: SecurePlan,
            adapter: Mapping[str, torch.Tensor]) -> DistributedNoiseParams:
    trained = trained_part(adapter, request.aggregation)
    return noise_params(plan, sum(t.numel() for t in trained.values()), request.max_grad_norm)


def plan_problem(node: SiteNode, request: TrainRequest, plan: SecurePlan,
                 params: DistributedNoiseParams) -> str:
    """Why this site declines a secure round before anything is spent, or ""."""
    policy, privacy = node.policy, node.policy.privacy
    refused = policy.secure_aggregation.round_violation(plan.min_contributions)
    if refused:
        return f"{refused} ({policy.source})"
    violation = request_violation(policy.limits, request) or node.judged_problem(request)
    if violation:
        return violation
    runs = runs_taken_part(node.ledger.records())
    if request.run_id not in runs and len(runs) >= privacy.max_runs:
        return (f"site policy allows at most {privacy.max_runs} runs; this site already took "
                f"part in {len(runs)}")
    rounds = _secure_rounds(node, request.run_id)
    if request.round not in rounds and len(rounds) >= privacy.max_rounds:
        return (f"site policy allows at most {privacy.max_rounds} rounds per run; this site "
                f"already took part in {len(rounds)}")
    step = _secure_step(plan, params, request.local_steps)
    mine = enforced(node, step)
    if mine.noise_multiplier < privacy.min_noise_multiplier:
        return (f"the noise this site's guarantee rests on (sigma {mine.noise_multiplier:.4g}"
                f"{'' if policy.secure_aggregation.trust else ', its own share alone'}) is below "
                f"its floor of {privacy.min_noise_multiplier:g} (privacy.min_noise_multiplier)")
    accountant = privacy.accountant_name
    after = node.ledger.epsilon(privacy.delta, accountant, then=[mine], guarantee="enforced")
    if after > privacy.epsilon_cap:
        return (f"round {request.round}'s {request.local_steps} secure steps would raise this "
                f"site's epsilon to {after:.3f} ({_guarantee(node)}), over its cap of "
                f"{privacy.epsilon_cap:g} (delta={privacy.delta:g}); spent so far "
                f"{node.epsilon():.3f}")
    run_after = node.ledger.floor().epsilon + epsilon_of(
        [*_run_history(node, request.run_id), mine], privacy.delta, accountant)
    if run_after > privacy.run_budget:
        return (f"round {request.round} would raise this run's epsilon to {run_after:.3f} "
                f"({_guarantee(node)}), over the site's per-run budget of "
                f"{privacy.run_budget:g}")
    return ""


def _guarantee(node: SiteNode) -> str:
    return ("aggregate guarantee: this site trusts secure aggregation"
            if node.policy.secure_aggregation.trust else "fallback guarantee: its own noise share")


class SecureRound:
    """One site's answers to the stages of secure rounds: ``answer`` is the whole interface."""

    def __init__(self, node: SiteNode):
        self.node = node

    def answer(self, node_id: int, message: SecureRequest,
               adapter: Mapping[str, torch.Tensor] | None,
               session: bytes | None) -> tuple[SecureReply, bytes | None]:
        """This site's reply to one stage, and the session to keep for the next (None: the
        round is over for this site). ``node_id`` is the id the transport authenticated."""
        stage = message.plan.stage
        try:
            if stage == SETUP:
                return self._setup(message, adapter)
            kept = SecureSession.from_bytes(session) if session else None
            problem = self._session_problem(message, kept)
            if problem:
                return self._refuse(message, problem), None
            assert kept is not None
            if stage == KEYS:
                return self._keys(node_id, message, kept)
            if stage == MASK:
                return self._mask(node_id, message, kept, adapter)
            site = SecAggSite.from_state(SecAggConfig.from_dict(kept.config or {}),
                                         kept.secagg or {})
            answer = (site.share_keys(message.secagg) if stage == SHARES
                      else site.unmask(message.secagg))
            return (SecureReply(stage, self._accepted(kept.plan), answer),
                    dataclasses.replace(kept, secagg=site.to_state()).to_bytes())
        except SecAggError as err:
            return self._refuse(message, f"secure aggregation: {err}"), None
        except SiteBusy as err:
            return SecureReply(stage, self.node.decline(str(err)).reply), None
        except LedgerWriteError as err:
            return SecureReply(stage, self.node.decline(
                f"this site's ledger could not be written ({err}), so nothing was sent").reply), None

    # -- stages -------------------------------------------------------------------------------
    def _setup(self, message: SecureRequest,
               adapter: Mapping[str, torch.Tensor] | None) -> tuple[SecureReply, bytes | None]:
        node, request, plan = self.node, message.request, message.plan
        with node.answering():
            lost = node.recorded_rollback(request)
            if lost:
                return SecureReply(SETUP, node.decline(lost).reply), None
            reason = (node.address_problem(request.site)
                      or ("no global adapter came with the setup" if adapter is None else "")
                      or adapter_problem(adapter or {}))
            params = None
            if not reason:
                try:
                    params = _params(request, plan, adapter or {})
                except ValueError as err:
                    reason = f"the round's encoding: {err}"
            if not reason and params is not None:
                frozen = check_frozen_factors(request, adapter or {},
                                              node.ledger.secure_releases(request.run_id))
                reason = (plan_problem(node, request, plan, params) or frozen.reason
                          or node.space_problem(adapter or {}))
            if reason:
                return SecureReply(SETUP, self._record(request, reason).reply), None
            return (SecureReply(SETUP, self._accepted(plan)),
                    SecureSession(request, plan).to_bytes())

    def _keys(self, node_id: int, message: SecureRequest,
              kept: SecureSession) -> tuple[SecureReply, bytes | None]:
        config = message.secagg
        assert isinstance(config, SecAggConfig)
        plan = kept.plan
        if config.threshold != plan.min_contributions or len(config.site_ids) > plan.max_sites:
            raise SecAggError(f"the step's SecAgg+ config (t = {config.threshold}, "
                              f"{len(config.site_ids)} sites) is not the round's (t = "
                              f"{plan.min_contributions}, at most {plan.max_sites} sites)")
        site = SecAggSite(node_id, config)
        session = dataclasses.replace(kept, step=message.plan.step, config=config.to_dict(),
                                      secagg=site.to_state())
        return SecureReply(KEYS, self._accepted(plan), site.public_keys()), session.to_bytes()

    def _mask(self, node_id: int, message: SecureRequest, kept: SecureSession,
              adapter: Mapping[str, torch.Tensor] | None) -> tuple[SecureReply, bytes | None]:
        node, request, plan = self.node, kept.request, kept.plan
        config = SecAggConfig.from_dict(kept.config or {})
        site = SecAggSite.from_state(config, kept.secagg or {})
        reason = ("no global adapter came with the masking stage" if adapter is None
                  else adapter_problem(adapter))
        if reason:
            return self._refuse(message, reason), None
        assert adapter is not None
        params = _params(request, plan, adapter)
        if config.modulus_bits != params.bits or config.vector_length != params.padded_dimension:
            raise SecAggError(f"the step's SecAgg+ config ({config.modulus_bits} bits, length "
                              f"{config.vector_length}) does not fit the round's encoding "
                              f"({params.bits} bits, length {params.padded_dimension})")
        with node.answering():
            # under ffa, the A this step's gradients are for must be the run's first one here
            frozen = check_frozen_factors(request, adapter,
                                          node.ledger.secure_releases(request.run_id))
            if frozen.reason:
                return SecureReply(MASK, self._record(request, frozen.reason).reply), None
            privacy = node.policy.privacy
            step = _secure_step(plan, params, 1)
            spend = spend_after(node, step)
            if spend.enforced > privacy.epsilon_cap:  # the setup's check, against the ledger now
                return SecureReply(MASK, self._record(request, (
                    f"step {message.plan.step} would raise this site's epsilon to "
                    f"{spend.enforced:.3f}, over its cap of {privacy.epsilon_cap:g}")).reply), None
            try:
                contribution = self._contribution(request, plan, message.plan.step, adapter)
            except DPNotAppliedError as err:
                log.error("%s: DP check failed: %s", node.name, err)
                return SecureReply(MASK, self._record(request, (
                    f"the clipped gradient sum failed the node's DP checks ({err}); nothing was "
                    "released")).reply), None
            secret = secrets.randbits(256)  # the noise's seed: fresh OS randomness each step
            encoded = encode_site_contribution(
                _within_range(contribution, params), params,
                rotation_seed=step_rotation_seed(plan.public_seed, config.round_id),
                rng=noise_rng(secret, message.plan.step))
            masked = site.masked_input(message.secagg, encoded)
            release = SecureRelease(
                run_id=request.run_id, round=request.round, step=message.plan.step,
                privacy_unit=privacy.unit, noise_multiplier=plan.noise_multiplier,
                sample_rate=plan.sample_rate, steps=1, max_grad_norm=request.max_grad_norm,
                scaled_clip=params.scaled_clip, dimension=params.padded_dimension,
                min_contributions=plan.min_contributions, max_sites=plan.max_sites,
                trusted=node.policy.secure_aggregation.trust,
                accountant=privacy.accountant_name, subsampling=step.subsampling,
                epsilon=spend.enforced,
                aggregate_epsilon=spend.aggregate, fallback_epsilon=spend.fallback,
                delta=privacy.delta,
                contribution_sha256=hashlib.sha256(masked.masked).hexdigest(),
                frozen_a_sha256=frozen.sha256)
            node.ledger.append_record(release)  # fsync'd before the masked input leaves
            session = dataclasses.replace(kept, secagg=site.to_state())
            return (SecureReply(MASK, self._accepted(plan, spend.enforced), masked),
                    session.to_bytes())

    def _contribution(self, request: TrainRequest, plan: SecurePlan, step: int,
                      adapter: Mapping[str, torch.Tensor]) -> SiteContribution:
        """This step's clipped gradient sum over a Poisson sample drawn with the site's own
        secret randomness (never a coordinator-chosen seed)."""
        node = self.node
        model, tokenizer = node.model_with_adapter(requested_lora(request))
        reason = node.load_problem(model, adapter, request.max_length)
        if reason:
            raise SecAggError(reason)
        train_factors(model, request.aggregation)
        dataset = node.dataset("train", tokenizer, request.max_length, secrets.randbits(63),
                               request.loss_marker, request.judged_only)
        return site_contribution(model, dataset, plan.sample_rate, request.max_grad_norm,
                                 sample_generator(secrets.randbits(63), step),
                                 max_physical_batch_size=physical_batch_size(node.policy.site,
                                                                            request))

    # -- replies ------------------------------------------------------------------------------
    def _session_problem(self, message: SecureRequest, kept: SecureSession | None) -> str:
        """Why a stage does not continue the round this site accepted, or ""."""
        if kept is None:
            return "no secure round was set up at this site (or it ended)"
        request, plan = message.request, message.plan
        if (request.run_id, request.round) != (kept.request.run_id, kept.request.round):
            return (f"a stage of run {request.run_id!r} round {request.round}, but this site "
                    f"set up run {kept.request.run_id!r} round {kept.request.round}")
        changed = [k for k in _STEADY if getattr(plan, k) != getattr(kept.plan, k)]
        if changed:
            return f"the round's plan changed after setup ({', '.join(changed)})"
        if not 0 <= plan.step < kept.request.local_steps:
            return f"step {plan.step} is outside the round's {kept.request.local_steps} steps"
        if plan.stage == KEYS and plan.step <= kept.step:
            return f"step {plan.step} was already begun at this site"
        if plan.stage != KEYS and plan.step != kept.step:
            return f"a {plan.stage!r} stage of step {plan.step}, but this site is at step {kept.step}"
        return ""

    def _accepted(self, plan: SecurePlan, epsilon: float | None = None) -> TrainReply:
        """An accepted stage: the site's spend on the guarantee it enforces (``epsilon``, where
        the stage has just composed it; else the ledger's), and the noise multiplier that
        guarantee rests on (its own share's unless it trusts aggregation)."""
        node, privacy = self.node, self.node.policy.privacy
        sigma = (plan.noise_multiplier if node.policy.secure_aggregation.trust
                 else share_noise_multiplier(plan.noise_multiplier,
                                             max(plan.min_contributions, 1)))
        return TrainReply(site=node.name, accepted=True,
                          epsilon=node.epsilon() if epsilon is None else epsilon,
                          delta=node.delta(), epsilon_budget=privacy.epsilon_cap,
                          noise_multiplier=sigma, accountant=privacy.accountant_name,
                          **node.head_fields())

    def _record(self, request: TrainRequest, reason: str) -> TrainOutcome:
        """A decline, its reason in the ledger (a non-private release), as for a train request."""
        return self.node.record_decline(request.run_id, request.round, reason)

    def _refuse(self, message: SecureRequest, reason: str) -> SecureReply:
        with self.node.answering():
            return SecureReply(message.plan.stage, self._record(message.request, reason).reply)


def _within_range(contribution: SiteContribution, params: DistributedNoiseParams
                  ) -> SiteContribution:
    """The sum projected into the ball the encoding's range was sized for (clip times
    ``max_records_per_site``): a sample larger than that is scaled back. A projection onto a
    ball moves no two sums further apart, so one record still changes it by at most the clip."""
    limit = params.clip * params.max_records_per_site
    norm = float(np.linalg.norm(contribution.vector))
    if norm <= limit or not math.isfinite(norm):
        return contribution
    return dataclasses.replace(contribution, vector=contribution.vector * (limit / norm))
