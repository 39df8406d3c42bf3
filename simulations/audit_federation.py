"""The audit's federations, trained through the real round: the coordinator's
(`server.coordinator`) with every site's node in this process (`in_process`), so what is
audited is what a federation runs, aggregation (fedavg, ffa, robust) and patient windows
included.

Each site is a ``SiteNode`` with its own policy file and ledger under the run's folder
(``<out>/<run>/sites/<site>``): the noise is the node's own rule at its Poisson rate and
secret seed, and its ledger is a real one that ``privatune audit`` checks. The node is handed
the audit's membership split (canaries on the training side) rather than splitting its data
itself. The counterfactual is the study's non-private setting (`non_private`): the same nodes
at epsilon 10,000, never a node mode without DP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from privatune.client.node import SiteNode
from privatune.client.policy import load_site_policy
from privatune.common.config import JobConfig, with_overrides
from privatune.server.coordinator import Coordinator, CoordinatorSettings
from privatune.simulations.audit_sites import AuditSite, SiteSplit
from privatune.simulations.in_process import InProcessTransport
from privatune.simulations.non_private import NON_PRIVATE_OVERRIDES
from privatune.simulations.runner import write_site_policy

Progress = Callable[[str], None]


@dataclass
class FederationOutcome:
    """The final global adapter, each site's privacy spend (from its ledger) and the rounds."""

    state: dict[str, torch.Tensor]
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)


def audit_job(job: JobConfig, sites: int, private: bool) -> JobConfig:
    """The job as the audit runs it: over the audit's sites (its node and reply minimums at most
    their number), scoring no generation (the audit's attacks are its measure), and, for the
    counterfactual, at the study's non-private setting."""
    federation = job.federation
    overrides = [f"federation.min_nodes={min(federation.min_nodes, sites)}",
                 f"federation.min_replies={min(federation.min_replies, sites)}",
                 "evaluation.every_k_rounds=0", *(() if private else NON_PRIVATE_OVERRIDES)]
    return with_overrides(job, overrides, "the audit's job")


def train_federation(job: JobConfig, model_dir: Path, sites: Sequence[AuditSite],
                     splits: Sequence[SiteSplit], private: bool, out: Path,
                     progress: Progress = print, label: str = "") -> FederationOutcome:
    """The job's rounds over nodes holding ``splits`` (one per site, in the order of ``sites``);
    run files (policies, ledgers, checkpoints) under ``out``.

    ``private=False`` is the audit's counterfactual (`non_private`): it shows what DP prevents.
    """
    run_job = audit_job(job, len(sites), private)
    nodes = []
    for site, split in zip(sites, splits, strict=True):
        policy = write_site_policy(out / "sites" / site.name, site.name, site.data, model_dir,
                                   run_job, site.format)
        nodes.append(SiteNode(load_site_policy(policy),
                              split=(split.train_records, split.heldout_records)))
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
        releases = node.ledger.adapter_updates()
        outcome.sites[node.name] = {
            "examples": len(node.train_units),
            "noise_multiplier": releases[0]["noise_multiplier"] if releases else None,
            "sample_rate": releases[0]["sample_rate"] if releases else None,
            "steps": sum(int(e["steps"]) for e in releases),
            "epsilon": node.epsilon(), "delta": node.delta(),
            "accountant": node.policy.privacy.accountant_name}
    return outcome

