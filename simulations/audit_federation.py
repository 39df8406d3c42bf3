"""The audit's federation, run in-process: every round, each site runs ``train_dp_round`` from
the global adapter, then FedAvg weighted by example counts. It is the training the Flower nodes
do, without the engine, so that the audit's run without DP never needs a node mode without DP.

What makes a node's guarantee hold holds here too: the noise multiplier is the node's rule
(`run_noise_multiplier` at the node's Poisson rate, never below the policy minimum), and
each site draws its own secret seed for every release, as the node does.
"""

from __future__ import annotations

import copy
import math
import secrets
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from privatune.client.trainer import DPTrainSettings, train_dp_round
from privatune.common.config import ConfigError, JobConfig
from privatune.common.lora import load_lora_state, lora_state
from privatune.common.privacy import (MechanismStep, delta_problem, epsilon_of, poisson_sample_rate,
                                      run_noise_multiplier)
from privatune.server.aggregation import fedavg
from privatune.simulations.audit_sites import SiteSplit

Progress = Callable[[str], None]

# Clipping bound of the non-DP run: large enough that no per-example gradient is ever clipped.
NO_CLIPPING = 1e6


@dataclass
class FederationOutcome:
    """The final global adapter, each site's privacy spend and the per-round training loss."""

    state: dict[str, torch.Tensor]
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)


def site_noise_multiplier(job: JobConfig, examples: int) -> float:
    """The noise the node would fix for this run: solved for the site's epsilon and delta over
    rounds x local steps at the Poisson rate of its loader, never below the policy minimum."""
    problem = delta_problem(job.privacy.delta, examples, job.privacy.unit)
    if problem:
        raise ConfigError(f"privacy.{problem}: the node would refuse it")
    privacy = job.privacy
    return run_noise_multiplier(privacy.epsilon, privacy.epsilon, privacy.delta,
                                poisson_sample_rate(examples, job.training.batch_size),
                                job.federation.rounds * job.training.local_steps,
                                min_noise_multiplier=privacy.min_noise_multiplier,
                                accountant=privacy.accountant_name)


def train_federation(job: JobConfig, template: torch.nn.Module, sites: Sequence[SiteSplit],
                     private: bool, progress: Progress = print, label: str = "") -> FederationOutcome:
    """Rounds of: every site runs ``train_dp_round`` from the global adapter, then FedAvg.

    ``private=False`` is the audit's counterfactual (noise 0, clipping off); it exists only to
    show what DP prevents and is never offered as a node mode.
    """
    outcome = FederationOutcome(state=lora_state(template))
    history: dict[str, list[MechanismStep]] = {s.name: [] for s in sites}
    noise = {s.name: site_noise_multiplier(job, len(s.train_units)) if private else 0.0 for s in sites}
    clip = job.training.max_grad_norm if private else NO_CLIPPING
    for round_number in range(1, job.federation.rounds + 1):
        started = time.monotonic()
        updates, weights, losses = [], [], {}
        for site in sites:
            if site.train is None:
                raise ValueError(f"{site.name}: training records are not encoded yet")
            model = copy.deepcopy(template)
            load_lora_state(model, outcome.state)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # library deprecation notices
                result = train_dp_round(model, site.train, DPTrainSettings(
                    noise_multiplier=noise[site.name], max_grad_norm=clip,
                    expected_batch_size=job.training.batch_size, steps=job.training.local_steps,
                    learning_rate=job.training.learning_rate,
                    # as at the node: the site's own secret seed for every release, since two
                    # releases sharing their noise would void the accounting
                    seed=secrets.randbits(63)))
            updates.append(lora_state(model))
            weights.append(float(result.examples))
            losses[site.name] = result.mean_loss
            history[site.name].append(MechanismStep(result.noise_multiplier, result.sample_rate,
                                                    result.steps))
        outcome.state = fedavg(updates, weights)
        outcome.rounds.append({"round": round_number, "train_loss": losses,
                               "seconds": round(time.monotonic() - started, 1)})
        progress(f"[{label}] round {round_number}/{job.federation.rounds}: train loss "
                 + ", ".join(f"{n} {v:.3f}" for n, v in losses.items())
                 + f" ({time.monotonic() - started:.0f} s)")
    for site in sites:
        outcome.sites[site.name] = {
            "examples": len(site.train_units), "noise_multiplier": noise[site.name],
            "sample_rate": poisson_sample_rate(len(site.train_units), job.training.batch_size),
            "steps": sum(h.steps for h in history[site.name]),
            "epsilon": (epsilon_of(history[site.name], job.privacy.delta, job.privacy.accountant_name)
                        if private else math.inf)}
    return outcome
