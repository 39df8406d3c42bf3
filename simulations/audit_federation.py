"""The audit's federations, trained through the real round: the coordinator's
(`server.coordinator`) with every site's node in this process (`in_process`), so what is
audited is what a federation runs, aggregation (fedavg, ffa, robust) and patient windows
included.

Each site is a ``SiteNode`` with its own policy file and ledger under the run's folder
(``<out>/<run>/sites/<site>``): the noise is the node's own rule at its Poisson rate and
secret seed, and its ledger is a real one that ``privatune audit`` checks. The node is handed
the audit's membership split (canaries on the training side) rather than splitting its data
itself.

The counterfactual run trains without DP, no noise and no clipping, to show what DP prevents:
its sites are ``NoDPSite``s, the node's data and round with plain training in place of DP-SGD.
That site exists only here, in process: no node can be run that way. (The study's
"non-private" setting, epsilon 10,000, is no stand-in: measured on this audit's config its
noise multiplier is 0.11 to 0.13, noise about 6 times the clipped signal at LoRA rank 64,
and the model remembered a canary seen once 1.3 bits, against 15.9 without noise.)
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from privatune.client.node import SiteNode, TrainOutcome
from privatune.client.policy import load_site_policy, physical_batch_size
from privatune.client.trainer import DPRoundResult, DPTrainSettings, train_dp_round
from privatune.common.config import JobConfig, with_overrides
from privatune.common.lora import lora_state, train_factors, trained_part
from privatune.common.protocol import (EvaluateReply, EvaluateRequest, TrainReply, TrainRequest,
                                       requested_lora)
from privatune.server.coordinator import Coordinator
from privatune.server.coordinator_settings import CoordinatorSettings
from privatune.simulations.audit_sites import AuditSite, SiteSplit
from privatune.simulations.in_process import InProcessTransport
from privatune.simulations.runner import write_site_policy

# Clipping bound of the run without DP: large enough that no per-example gradient is clipped.
NO_CLIPPING = 1e6

Progress = Callable[[str], None]


@dataclass
class FederationOutcome:
    """The final global adapter, each site's privacy spend (from its ledger) and the rounds."""

    state: dict[str, torch.Tensor]
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)


class NoDPSite(SiteNode):
    """The audit's counterfactual site: the node's data, model and round, trained with neither
    noise nor clipping; it spends no budget it could account, so it writes no release to its
    ledger, reports epsilon infinite and no ledger head (the coordinator has nothing to anchor).
    Simulation only (see the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.trained: list[DPRoundResult] = []

    def train(self, request: TrainRequest, global_state: Mapping[str, torch.Tensor]) -> TrainOutcome:
        model, tokenizer = self.model_with_adapter(requested_lora(request))
        reason = self.load_problem(model, global_state, request.max_length)
        if reason:
            return self.decline(reason)
        train_factors(model, request.aggregation)
        dataset = self.dataset("train", tokenizer, request.max_length, secrets.randbits(63),
                                request.loss_marker)
        result = train_dp_round(model, dataset, DPTrainSettings(
            noise_multiplier=0.0, max_grad_norm=NO_CLIPPING, expected_batch_size=request.batch_size,
            steps=request.local_steps, learning_rate=request.learning_rate,
            max_physical_batch_size=physical_batch_size(self.policy.site, request),
            seed=secrets.randbits(63)))
        self.trained.append(result)
        return TrainOutcome(TrainReply(
            site=self.name, accepted=True, num_examples=len(self.train_units), epsilon=math.inf,
            noise_multiplier=0.0, train_loss=result.mean_loss), trained_part(lora_state(model),
                                                                            request.aggregation))

    def evaluate(self, request: EvaluateRequest,
                 global_state: Mapping[str, torch.Tensor]) -> EvaluateReply:
        return dataclasses.replace(super().evaluate(request, global_state), ledger_seq=-1,
                                   ledger_hash="")


def audit_job(job: JobConfig, sites: int) -> JobConfig:
    """The job as the audit runs it: over the audit's sites (its node and reply minimums at most
    their number), scoring no generation (the audit's attacks are its measure)."""
    federation = job.federation
    return with_overrides(job, [f"federation.min_nodes={min(federation.min_nodes, sites)}",
                                f"federation.min_replies={min(federation.min_replies, sites)}",
                                "evaluation.every_k_rounds=0"], "the audit's job")


def train_federation(job: JobConfig, model_dir: Path, sites: Sequence[AuditSite],
                     splits: Sequence[SiteSplit], private: bool, out: Path,
                     progress: Progress = print, label: str = "") -> FederationOutcome:
    """The job's rounds over nodes holding ``splits`` (one per site, in the order of ``sites``);
    run files (policies, ledgers, checkpoints) under ``out``.

    ``private=False`` is the audit's counterfactual (``NoDPSite``): it shows what DP prevents.
    """
    run_job = audit_job(job, len(sites))
    nodes = []
    for site, split in zip(sites, splits, strict=True):
        policy = write_site_policy(out / "sites" / site.name, site.name, site.data, model_dir,
                                   run_job, site.format)
        node = SiteNode if private else NoDPSite
        nodes.append(node(load_site_policy(policy), split=(split.train_records,
                                                           split.heldout_records)))
    settings = CoordinatorSettings(job=run_job, model_dir=model_dir, out_dir=out,
                                   run_id=f"audit-{label}-{job.seed}", resume=False,
                                   sites=tuple(s.name for s in sites))
    coordinator = Coordinator(settings, InProcessTransport(nodes),
                              lambda line: progress(f"[{label}] {line.strip()}"))
    coordinator.run()
    outcome = FederationOutcome(state=dict(coordinator.global_state))
    outcome.rounds = [{"round": r.round, "participants": r.participants,
                       "train_loss": r.training.train_loss}
                      for r in coordinator.rounds if r.training is not None]
    for node in nodes:
        outcome.sites[node.name] = (_private_spend(node) if private else {
            "examples": len(node.train_units), "noise_multiplier": 0.0,
            "sample_rate": node.trained[0].sample_rate if node.trained else None,
            "steps": sum(r.steps for r in node.trained), "epsilon": "inf"})
    return outcome


def _private_spend(node: SiteNode) -> dict[str, Any]:
    """A site's spend in the DP run, as its ledger records it."""
    releases = node.ledger.releases()
    return {"examples": len(node.train_units),
            "noise_multiplier": releases[0].noise_multiplier if releases else None,
            "sample_rate": releases[0].sample_rate if releases else None,
            "steps": sum(r.steps for r in releases),
            "epsilon": node.epsilon(), "delta": node.delta(),
            "accountant": node.policy.privacy.accountant_name}
