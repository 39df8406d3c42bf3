"""Secure cross-silo DP-SGD in one process (issue 27), and the trusted-curator reference.

``run_secure_dpsgd``: each step is ONE DP-SGD step of the union of the sites' records. Every
site loads the global adapter, Poisson-samples its records at the common rate q, sums its
clipped per-sample LoRA gradients (``client.secure_contribution``), encodes the sum with its
Skellam share, and masks it (SecAgg+, ``common.secure_aggregation``); the coordinator learns
only the modular sum, decodes it (``common.distributed_noise.decode_sum``), divides by q*N and
steps Adam on the global adapter (``server.secure_step``). A round with fewer than t masked
contributions releases nothing: SecAgg+ refuses (``SecAggRefused``) and the run stops with the
adapter of the last completed step never changed by it.

``run_central_dpsgd``: the same steps on the pooled records by one trusted curator with
Opacus' Gaussian noise (the existing trainer), for comparison only: it is the utility secure
DP-SGD aims for, and no deployment may run it.

Plain functions, no Flower: the coordinator's round mode calls ``secure_dpsgd_round`` (one
step) and ``server.secure_step.secure_dpsgd_step`` through its transport later.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from privatune.client.secure_contribution import (
    encode_site_contribution,
    noise_rng,
    sample_generator,
    site_contribution,
)
from privatune.client.trainer import DPRoundResult, DPTrainSettings, train_dp_round
from privatune.common.distributed_noise import (
    DEFAULT_MAX_BITS,
    DEFAULT_SENSITIVITY_INFLATION,
    DistributedNoiseParams,
    choose_parameters,
    decode_sum,
)
from privatune.common.lora import (
    load_lora_state,
    lora_state,
    train_factors,
    trained_part,
)
from privatune.common.secure_aggregation import SecAggSite
from privatune.common.secure_aggregation_messages import SecAggConfig
from privatune.common.secure_aggregation_coordinator import (
    AggregateResult,
    SecAggCoordinator,
)
from privatune.common.secure_protocol import step_rotation_seed
from privatune.server.secure_step import (
    AdamSettings,
    AdamState,
    expected_union_batch,
    flat_order,
    secure_dpsgd_step,
)
from torch.utils.data import ConcatDataset, Dataset


@dataclass(frozen=True, eq=False)
class DpsgdSite:
    """One simulated site: its SecAgg+ id, its model (may be shared: the global adapter is
    loaded before each use), its training records and its secret seed."""

    site_id: int
    model: torch.nn.Module
    dataset: Dataset
    secret_seed: int


@dataclass(frozen=True)
class SecureDpsgdSettings:
    """A secure DP-SGD run: q, C, the aggregate noise multiplier sigma (the noise of
    ``threshold`` shares; calibrate it with ``aggregate_noise_multiplier``), Adam's rate, which
    factors train, the threshold t (default the least SecAgg+ allows on the complete graph,
    n // 2 + 1), the public seed of the rotations, and the encoding's knobs."""

    sample_rate: float
    clip: float
    noise_multiplier: float
    learning_rate: float
    aggregation: str = "fedavg"
    threshold: int | None = None
    max_physical_batch_size: int = 0
    public_seed: int = 0
    sensitivity_inflation: float = DEFAULT_SENSITIVITY_INFLATION
    max_bits: int = DEFAULT_MAX_BITS

    def threshold_for(self, sites: int) -> int:
        return sites // 2 + 1 if self.threshold is None else self.threshold


@dataclass(frozen=True, eq=False)
class SecureRound:
    """What one secure step released: the decoded noisy sum (flat, ``flat_order``) and who
    contributed; ``site_losses`` are the sites' local losses (simulation log only)."""

    step: int
    noisy_sum: np.ndarray
    contributors: tuple[int, ...]
    dropped: tuple[int, ...]
    site_losses: Mapping[int, float | None] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class SecureDpsgdRun:
    state: dict[str, torch.Tensor]
    optimizer: AdamState
    params: DistributedNoiseParams
    rounds: tuple[SecureRound, ...]


def _check_sites(sites: Sequence[DpsgdSite], threshold: int) -> None:
    ids = [s.site_id for s in sites]
    if len(set(ids)) != len(ids):
        raise ValueError(f"site ids must be distinct, got {ids}")
    if len(sites) < threshold:
        raise ValueError(f"{len(sites)} sites, below the threshold t = {threshold}: a step "
                         "needs at least t contributions, so none is run")


def noise_parameters(sites: Sequence[DpsgdSite], settings: SecureDpsgdSettings,
                     dimension: int) -> DistributedNoiseParams:
    """The run's encoding: sized for every site summing all its records at the clip."""
    return choose_parameters(
        dimension, min_contributions=settings.threshold_for(len(sites)), max_sites=len(sites),
        clip=settings.clip, max_records_per_site=max(1, max(len(s.dataset) for s in sites)),
        noise_multiplier=settings.noise_multiplier,
        sensitivity_inflation=settings.sensitivity_inflation, max_bits=settings.max_bits)


def secure_sum(encoded: Mapping[int, np.ndarray], params: DistributedNoiseParams, *,
               round_id: int, threshold: int, dropped: Collection[int] = ()) -> AggregateResult:
    """SecAgg+'s four stages in process: the sum modulo 2^bits of the encodings of the sites
    not in ``dropped`` (who drop after sharing their keys, before masking). Raises
    ``SecAggRefused`` (releasing nothing) below ``threshold`` contributions."""
    unknown = sorted(set(dropped) - set(encoded))
    if unknown:
        raise ValueError(f"sites {unknown} cannot drop: they are not in the round")
    config = SecAggConfig.create(round_id=round_id, site_ids=encoded, threshold=threshold,
                                 modulus_bits=params.bits, vector_length=params.padded_dimension)
    sites = {i: SecAggSite(i, config) for i in config.site_ids}
    coordinator = SecAggCoordinator(config)
    directory = coordinator.receive_public_keys([site.public_keys() for site in sites.values()])
    deliveries = coordinator.receive_encrypted_shares(
        [sites[i].share_keys(directory) for i in directory.site_ids])
    request = coordinator.receive_masked_inputs(
        [sites[i].masked_input(d, encoded[i]) for i, d in deliveries.items() if i not in dropped])
    return coordinator.receive_unmask_shares([sites[i].unmask(request) for i in request.survivors])


def secure_dpsgd_round(sites: Sequence[DpsgdSite], global_state: Mapping[str, torch.Tensor],
                       step: int, settings: SecureDpsgdSettings, params: DistributedNoiseParams,
                       *, dropped: Collection[int] = ()) -> SecureRound:
    """One step's release: every site's encoded contribution, securely summed, decoded."""
    threshold = settings.threshold_for(len(sites))
    _check_sites(sites, threshold)
    names = flat_order(list(trained_part(global_state, settings.aggregation)))
    seed = step_rotation_seed(settings.public_seed, step)  # the step is its SecAgg+ round
    encoded: dict[int, np.ndarray] = {}
    losses: dict[int, float | None] = {}
    for site in sites:
        load_lora_state(site.model, global_state)
        train_factors(site.model, settings.aggregation)
        contribution = site_contribution(
            site.model, site.dataset, settings.sample_rate, settings.clip,
            sample_generator(site.secret_seed, step),
            max_physical_batch_size=settings.max_physical_batch_size)
        if contribution.names != names:
            raise ValueError(f"site {site.site_id} trains other tensors than the global "
                             f"adapter's trained part under {settings.aggregation!r}")
        encoded[site.site_id] = encode_site_contribution(
            contribution, params, rotation_seed=seed, rng=noise_rng(site.secret_seed, step))
        losses[site.site_id] = contribution.local_loss
    result = secure_sum(encoded, params, round_id=step, threshold=threshold, dropped=dropped)
    noisy_sum = decode_sum(result.total, params, rotation_seed=seed,
                           contributions=len(result.contributors))
    return SecureRound(step, noisy_sum, result.contributors, result.dropped, losses)


def run_secure_dpsgd(sites: Sequence[DpsgdSite], steps: int, settings: SecureDpsgdSettings,
                     initial_state: Mapping[str, torch.Tensor], *,
                     dropouts: Mapping[int, Collection[int]] | None = None,
                     optimizer: AdamState | None = None,
                     params: DistributedNoiseParams | None = None) -> SecureDpsgdRun:
    """``steps`` secure DP-SGD steps from ``initial_state``; ``dropouts`` maps a step to the
    sites that drop mid-round in it. ``params`` defaults to ``noise_parameters``."""
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    _check_sites(sites, settings.threshold_for(len(sites)))
    state = {n: t.detach().clone() for n, t in initial_state.items()}
    trained = trained_part(state, settings.aggregation)
    params = params or noise_parameters(sites, settings, sum(t.numel() for t in trained.values()))
    optimizer = optimizer or AdamState.initial(trained)
    adam = AdamSettings(settings.learning_rate)
    divisor = expected_union_batch(settings.sample_rate, [len(s.dataset) for s in sites])
    rounds = []
    for step in range(int(steps)):
        released = secure_dpsgd_round(sites, state, step, settings, params,
                                      dropped=(dropouts or {}).get(step, ()))
        stepped = secure_dpsgd_step(state, released.noisy_sum, expected_batch_size=divisor,
                                    aggregation=settings.aggregation, optimizer=optimizer,
                                    settings=adam)
        state, optimizer = stepped.state, stepped.optimizer
        rounds.append(released)
    return SecureDpsgdRun(state, optimizer, params, tuple(rounds))


@dataclass(frozen=True, eq=False)
class CentralDpsgdRun:
    state: dict[str, torch.Tensor]
    result: DPRoundResult


def run_central_dpsgd(model: torch.nn.Module, datasets: Sequence[Dataset], steps: int, *,
                      initial_state: Mapping[str, torch.Tensor], expected_batch_size: int,
                      noise_multiplier: float, clip: float, learning_rate: float,
                      aggregation: str = "fedavg", seed: int = 0,
                      max_physical_batch_size: int = 0) -> CentralDpsgdRun:
    """The trusted curator's reference (simulation only): ``steps`` Opacus DP-SGD steps with
    Gaussian noise on the pooled records, by the trainer the sites use. Its sampling rate is
    Opacus' for the batch size (``DPRoundResult.sample_rate``); pick a batch size that divides
    the pooled count to compare with secure DP-SGD at the same q."""
    load_lora_state(model, initial_state)
    train_factors(model, aggregation)
    result = train_dp_round(model, ConcatDataset(list(datasets)), DPTrainSettings(
        noise_multiplier=noise_multiplier, max_grad_norm=clip,
        expected_batch_size=expected_batch_size, steps=steps, learning_rate=learning_rate,
        seed=seed, max_physical_batch_size=max_physical_batch_size))
    return CentralDpsgdRun(lora_state(model), result)
