"""Secure DP-SGD's step as plain functions: the sites' clipped sums (no local noise), their
encodings summed and decoded, the coordinator's Adam step, and the refusals. The round that
runs them through SecAgg+ and the transport is tests/test_secure_round.py's.

Tiny Llama (tests/conftest.py), a few dozen short notes per site, CPU."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from privatune.client.lora_grad_sampler import LoraPrivacyEngine
from privatune.client.secure_contribution import (
    SiteContribution,
    clipped_gradient_sum,
    encode_site_contribution,
    noise_rng,
    poisson_sample,
    sample_generator,
    site_contribution,
    trained_tensors,
)
from privatune.client.trainer import DPNotAppliedError
from privatune.common import opacus_internals
from privatune.common.config import LoraConfig
from privatune.common.distributed_noise import (
    choose_parameters,
    decode_sum,
    modular_sum,
)
from privatune.common.examples import encode_pairs, per_example_loss
from privatune.common.lora import (
    attach_seeded_lora,
    load_base_model,
    load_lora_state,
    lora_state,
    train_factors,
    trained_part,
)
from privatune.server.secure_step import (
    AdamSettings,
    AdamState,
    flat_order,
    secure_dpsgd_step,
    unflatten,
)
from torch.utils.data import ConcatDataset

from tests.conftest import clinical_note

CLIP = 0.5
SMALL = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"))  # 512 coordinates


def notes_dataset(tokenizer, count: int, seed: int):
    rng = random.Random(seed)
    return encode_pairs(tokenizer, [("", clinical_note(rng)) for _ in range(count)], 24)


def lora_model(model_dir, settings: LoraConfig):
    """The tiny model with a seeded adapter whose B is non-zero (so A gets gradients too)."""
    base, tokenizer = load_base_model(model_dir)
    model = attach_seeded_lora(base, settings, seed=0)
    generator = torch.Generator().manual_seed(1)
    state = {n: (t if "lora_A" in n else 0.05 * torch.randn(t.shape, generator=generator))
             for n, t in lora_state(model).items()}
    load_lora_state(model, state)
    return model, tokenizer, state


@pytest.fixture(scope="module")
def small(tiny_model_dir):
    model, tokenizer, state = lora_model(tiny_model_dir, SMALL)
    datasets = [notes_dataset(tokenizer, count, seed) for count, seed in ((24, 1), (30, 2), (18, 3))]
    return model, state, datasets


def union_indices(datasets, secret_seeds, rate: float, step: int) -> torch.Tensor:
    """The union's Poisson sample in the pooled dataset's numbering, redrawn as each site
    draws it (same secret seed, same step)."""
    parts, offset = [], 0
    for dataset, seed in zip(datasets, secret_seeds):
        parts.append(poisson_sample(len(dataset), rate, sample_generator(seed, step)) + offset)
        offset += len(dataset)
    return torch.cat(parts)


def test_secure_step_without_noise_is_the_central_clipped_sum_step_on_the_union(small):
    """(a) noise ~0, scale large: the 3 sites' encoded clipped sums, added modulo 2^bits (what
    SecAgg+ hands the coordinator: tests/test_secure_aggregation.py) and decoded, are the
    clipped sum of the union of the same samples, and the Adam step on it is that sum's."""
    model, state, datasets = small
    seeds, rate = (100, 101, 102), 0.3
    load_lora_state(model, state)
    train_factors(model, "fedavg")
    contributions = [site_contribution(model, d, rate, CLIP, sample_generator(seed, 0))
                     for d, seed in zip(datasets, seeds)]
    params = choose_parameters(contributions[0].dimension, min_contributions=2, max_sites=3,
                               clip=CLIP, max_records_per_site=max(len(d) for d in datasets),
                               noise_multiplier=1e-7, sensitivity_inflation=1e-10, max_bits=40)
    encoded = [encode_site_contribution(c, params, rotation_seed=5, rng=noise_rng(seed, 0))
               for c, seed in zip(contributions, seeds)]
    decoded = decode_sum(modular_sum(encoded, params), params, rotation_seed=5, contributions=3)

    union = union_indices(datasets, seeds, rate, step=0)
    assert len(union) > 5
    central = clipped_gradient_sum(model, ConcatDataset(datasets), union, CLIP)
    assert central.names == flat_order(list(state))
    scale = CLIP * len(union) / math.sqrt(central.dimension)
    np.testing.assert_allclose(decoded, central.vector, rtol=0, atol=5e-5 * scale)

    def step(noisy_sum: np.ndarray):
        return secure_dpsgd_step(state, noisy_sum, aggregation="fedavg",
                                 expected_batch_size=rate * sum(len(d) for d in datasets),
                                 optimizer=AdamState.initial(state), settings=AdamSettings(0.01))

    secure, expected = step(decoded), step(central.vector)
    assert all(not torch.equal(secure.state[n], state[n]) for n in state)  # every factor stepped
    for name in state:  # Adam's first step is about lr * sign(g): equal where |g| is not tiny
        big = expected.optimizer.exp_avg[name].abs() > 1e-4 * scale
        torch.testing.assert_close(secure.state[name][big], expected.state[name][big])


def test_site_vector_is_the_plain_clipped_sum_with_no_local_noise(small, monkeypatch):
    """(b) a site's vector: norm <= C * its sample size, equal to the per-example gradients
    clipped and summed outside the engine, the same on a second call and micro-batched, and
    Opacus' Gaussian noise is never drawn."""
    model, state, datasets = small

    def no_noise(*args, **kwargs):
        raise AssertionError("a site drew Gaussian noise")

    monkeypatch.setattr(opacus_internals, "gaussian_noise", no_noise)
    load_lora_state(model, state)
    train_factors(model, "fedavg")
    dataset = datasets[1]
    first = site_contribution(model, dataset, 0.4, CLIP, sample_generator(7, 3))
    again = site_contribution(model, dataset, 0.4, CLIP, sample_generator(7, 3),
                              max_physical_batch_size=3)
    sample = poisson_sample(len(dataset), 0.4, sample_generator(7, 3))
    assert len(sample) >= 4
    assert isinstance(first, SiteContribution) and not hasattr(first, "sample_size")
    assert np.linalg.norm(first.vector) <= CLIP * len(sample) * (1 + 1e-6)
    np.testing.assert_array_equal(first.vector,
                                  site_contribution(model, dataset, 0.4, CLIP,
                                                    sample_generator(7, 3)).vector)
    np.testing.assert_allclose(again.vector, first.vector, rtol=1e-5, atol=1e-7)

    tensors = trained_tensors(model)  # the reference: one example at a time, plain autograd
    reference = np.zeros(first.dimension)
    for index in sample.tolist():
        ids, labels, mask = (t.unsqueeze(0) for t in dataset[index])
        loss = per_example_loss(model(input_ids=ids, attention_mask=mask).logits, labels)[0]
        grads = torch.autograd.grad(loss, list(tensors.values()))
        flat = torch.cat([g.reshape(-1) for g in grads]).double().numpy()
        reference += flat * min(1.0, CLIP / (np.linalg.norm(flat) + 1e-6))
    np.testing.assert_allclose(first.vector, reference, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(t, state[n]) for n, t in lora_state(model).items())  # nothing moved

    empty = site_contribution(model, dataset, 1e-9, CLIP, sample_generator(7, 3))
    assert empty.local_loss is None and not empty.vector.any()
    params = choose_parameters(empty.dimension, min_contributions=2, max_sites=3, clip=CLIP,
                               max_records_per_site=30, noise_multiplier=1.0)
    encoded = encode_site_contribution(empty, params, rotation_seed=5, rng=noise_rng(7, 3))
    assert encoded.shape == (params.padded_dimension,) and encoded.any()  # it still takes part


def test_adam_step_changes_only_the_trained_part(small):
    """(d) ffa leaves every lora_A as it was; fedavg moves both; the step is torch's Adam;
    the state survives a checkpoint as tensors."""
    _, state, _ = small
    rng = np.random.default_rng(0)
    trained = trained_part(state, "ffa")
    assert trained and all("lora_B" in n for n in trained)
    optimizer, current = AdamState.initial(trained), dict(state)
    reference_params = {n: t.clone().requires_grad_() for n, t in trained.items()}
    torch_adam = torch.optim.Adam(list(reference_params.values()), lr=0.02)
    for _ in range(2):
        noisy_sum = rng.normal(size=sum(t.numel() for t in trained.values()))
        stepped = secure_dpsgd_step(current, noisy_sum, expected_batch_size=12.5,
                                    aggregation="ffa", optimizer=optimizer,
                                    settings=AdamSettings(0.02))
        for name, grad in unflatten(noisy_sum, trained).items():
            reference_params[name].grad = grad / 12.5
        torch_adam.step()
        current, optimizer = stepped.state, AdamState.from_tensors(stepped.optimizer.to_tensors())
    assert list(current) == list(state) and optimizer.steps == 2
    for name, tensor in state.items():
        if "lora_A" in name:
            assert torch.equal(current[name], tensor)
        else:
            assert not torch.equal(current[name], tensor)
            torch.testing.assert_close(current[name], reference_params[name].detach())

    everything = sum(t.numel() for t in state.values())
    both = secure_dpsgd_step(state, rng.normal(size=everything), expected_batch_size=3.0,
                             aggregation="fedavg", optimizer=AdamState.initial(state),
                             settings=AdamSettings(0.02))
    assert all(not torch.equal(both.state[n], state[n]) for n in state)
    with pytest.raises(ValueError, match="coordinates"):
        secure_dpsgd_step(state, np.zeros(everything), expected_batch_size=3.0, aggregation="ffa",
                          optimizer=optimizer, settings=AdamSettings(0.02))


def test_an_encoding_for_another_clip_or_size_is_refused(small):
    model, state, datasets = small
    load_lora_state(model, state)
    train_factors(model, "ffa")
    contribution = site_contribution(model, datasets[0], 0.3, CLIP, sample_generator(1, 0))
    assert all("lora_B" in n for n in contribution.names)
    other = choose_parameters(contribution.dimension, min_contributions=2, max_sites=3, clip=1.0,
                              max_records_per_site=30, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="clipped at 0.5"):
        encode_site_contribution(contribution, other, rotation_seed=1, rng=noise_rng(1, 0))
    right = choose_parameters(contribution.dimension, min_contributions=2, max_sites=2, clip=CLIP,
                              max_records_per_site=30, noise_multiplier=1.0)
    sums = modular_sum([encode_site_contribution(contribution, right, rotation_seed=1,
                                                 rng=noise_rng(s, 0)) for s in (1, 2)], right)
    assert decode_sum(sums, right, rotation_seed=1, contributions=2).shape == (right.dimension,)
    train_factors(model, "fedavg")


def test_a_sum_not_clipped_at_the_claimed_norm_is_refused(small, monkeypatch):
    """The DP-applied check: an engine clipping at 10 C while C is claimed stops the step, and
    the model comes back without the engine attached."""
    model, state, datasets = small
    load_lora_state(model, state)
    train_factors(model, "fedavg")
    make_private = LoraPrivacyEngine.make_private

    def looser(self, **kwargs):
        made = make_private(self, **kwargs)
        made[1].max_grad_norm *= 10
        return made

    monkeypatch.setattr(LoraPrivacyEngine, "make_private", looser)
    with pytest.raises(DPNotAppliedError, match="clipped sum differs"):
        site_contribution(model, datasets[0], 0.5, 0.01, sample_generator(1, 0))
    monkeypatch.undo()
    honest = site_contribution(model, datasets[0], 0.5, 0.01, sample_generator(1, 0))
    assert np.linalg.norm(honest.vector) <= 0.01 * len(datasets[0])
