"""The DP trainer's runtime checks: noise of the claimed scale on every step, in every round.

Opacus divides the noised gradient sum by its own expected batch size,
int(len(dataset) * sample_rate), which differs from the requested batch size whenever the
dataset size is not a multiple of it. The tests use such sizes on purpose.
"""

from __future__ import annotations

import copy
import dataclasses

import opacus.optimizers.optimizer as dp_opt
import pytest
import torch
import yaml
from opacus import PrivacyEngine

import privatune.client.node as node_module
from privatune.client.lora_grad_sampler import LoraDPOptimizer, LoraGradSampleModule
from privatune.client.node import SiteNode
from privatune.client.policy import load_site_policy
from privatune.client.trainer import (DPNotAppliedError, DPTrainSettings, _check_noise_added,
                                      train_dp_round)
from privatune.common.config import ConfigError, load_job_config
from privatune.common.examples import encode_pairs
from privatune.common.ledger import SiteLedger
from privatune.common.lora import attach_lora, load_base_model
from privatune.common.privacy import poisson_sample_rate
from tests.test_node import LORA, start_state
from tests.test_node import request as train_request


def opacus_batch_size(examples: int, batch_size: int) -> int:
    """The divisor Opacus' make_private derives (privacy_engine.py), for the test's premises."""
    return int(examples * poisson_sample_rate(examples, batch_size))


def settings(noise: float = 1.0, steps: int = 3, seed: int = 0) -> DPTrainSettings:
    return DPTrainSettings(noise_multiplier=noise, max_grad_norm=1.0, expected_batch_size=8,
                           steps=steps, learning_rate=0.02, seed=seed)


@pytest.fixture
def tiny(tiny_model_dir):
    """A LoRA model and 30 examples: at batch 8 Opacus divides by 7, not 8."""
    model, tokenizer = load_base_model(tiny_model_dir)
    dataset = encode_pairs(tokenizer, [("", f"note {i} fever cough") for i in range(30)], 24)
    assert opacus_batch_size(len(dataset), 8) == 7
    return attach_lora(model, LORA), dataset


def scaled_noise(monkeypatch, factor: float) -> None:
    """Opacus draws noise of ``factor`` times the standard deviation it was configured with."""
    original = dp_opt._generate_noise
    monkeypatch.setattr(dp_opt, "_generate_noise", lambda std, reference, **kwargs:
                        original(std=std * factor, reference=reference, **kwargs))


def test_round_two_without_noise_is_refused_and_not_recorded(make_site, tiny_model_dir,
                                                             monkeypatch):
    """A later round (LoRA B non-zero, so gradients non-zero) with Opacus' noise off is refused:
    the node declines it with the DP check's reason, and nothing of it is released."""
    node = SiteNode(load_site_policy(make_site(records=122)))  # 98 training records
    examples, batch = len(node.train_units), train_request().batch_size
    assert opacus_batch_size(examples, batch) != batch
    first = node.train(train_request(1), start_state(tiny_model_dir))
    assert first.reply.accepted
    assert any(t.abs().sum() > 0 for name, t in first.state.items() if "lora_B" in name)

    make_private = PrivacyEngine.make_private

    def without_noise(self, **kwargs):
        dp_model, dp_optimizer, dp_loader = make_private(self, **kwargs)
        dp_optimizer.noise_multiplier = 0.0  # DP is claimed, but Opacus adds no noise
        return dp_model, dp_optimizer, dp_loader

    monkeypatch.setattr(PrivacyEngine, "make_private", without_noise)
    refused = node.train(train_request(2), first.state)  # declined, nothing released
    assert not refused.reply.accepted and not refused.state
    assert "DP checks" in refused.reply.reason and "no noise was added" in refused.reply.reason
    ledger = SiteLedger(node.policy.ledger_path)
    assert [e["round"] for e in ledger.adapter_updates()] == [1]
    released = node.policy.ledger_path.parent / "released"
    assert not [p for p in released.iterdir() if "round0002" in p.name]


@pytest.mark.parametrize("factor", [0.1, 10.0])
def test_noise_of_the_wrong_scale_stops_training(tiny, monkeypatch, factor):
    model, dataset = tiny
    scaled_noise(monkeypatch, factor)
    with pytest.raises(DPNotAppliedError, match="no noise was added at the claimed scale"):
        train_dp_round(model, dataset, settings())


def test_noise_missing_after_the_first_step_stops_training(tiny, monkeypatch):
    model, dataset = tiny
    add_noise = LoraDPOptimizer.add_noise
    calls: list[int] = []

    def noise_once(self):
        calls.append(1)
        if len(calls) > 1:
            self.noise_multiplier = 0.0
        add_noise(self)

    monkeypatch.setattr(LoraDPOptimizer, "add_noise", noise_once)
    with pytest.raises(DPNotAppliedError, match="step 2"):
        train_dp_round(model, dataset, settings())


def test_per_sample_gradients_missing_after_the_first_step_stop_training(tiny, monkeypatch):
    model, dataset = tiny
    gather, step = LoraGradSampleModule._gather, dp_opt.DPOptimizer.step
    broken: list[int] = []

    def gather_until_broken(self):
        if not broken:
            gather(self)

    def step_then_break(self, closure=None):
        result = step(self, closure)
        broken.append(1)  # the per-sample gradients silently stop arriving from the second step on
        return result

    monkeypatch.setattr(LoraGradSampleModule, "_gather", gather_until_broken)
    monkeypatch.setattr(dp_opt.DPOptimizer, "step", step_then_break)
    with pytest.raises(DPNotAppliedError, match="no per-sample gradients"):
        train_dp_round(model, dataset, settings(steps=5))


@pytest.mark.parametrize("noise", [0.3, 1.0, 4.0])
def test_true_dp_rounds_pass_every_step_check(tiny, noise):
    """No false alarm over many steps, including a second round whose LoRA B is non-zero."""
    model, dataset = tiny
    for seed in (1, 2):
        result = train_dp_round(model, dataset, settings(noise=noise, steps=60, seed=seed))
        assert result.steps == 60
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_a_site_whose_loader_length_floating_point_shortens_still_trains(tiny_model_dir):
    """At 93 units and batch 1 the node samples at 1/93, and Opacus books 1/92 (its sampler's
    length is int(1 / (1/93)) = 92): a true DP round, recorded at the rate really sampled.
    A hospital of 1,960 notes at batch 16 (1/123) was refused every round before."""
    assert int(1 / (1 / 93)) == 92
    model, tokenizer = load_base_model(tiny_model_dir)
    dataset = encode_pairs(tokenizer, [("", f"note {i} fever") for i in range(93)], 16)
    one_at_a_time = DPTrainSettings(noise_multiplier=1.0, max_grad_norm=1.0,
                                    expected_batch_size=1, steps=2, learning_rate=0.02, seed=0)
    result = train_dp_round(attach_lora(model, LORA), dataset, one_at_a_time)
    assert result.steps == 2 and result.sample_rate == 1 / 93


def fake_step(shapes: list[tuple[int, ...]], noise_std: float, divisor: float,
              generator: torch.Generator) -> dict[str, torch.nn.Parameter]:
    """LoRA tensors as Opacus leaves them after a step: summed_grad and (summed + noise) / d."""
    trainable = {}
    for i, shape in enumerate(shapes):
        param = torch.nn.Parameter(torch.zeros(shape))
        param.summed_grad = torch.randn(shape, generator=generator)
        noise = torch.randn(shape, generator=generator) * noise_std
        param.grad = (param.summed_grad + noise) / divisor
        trainable[f"lora_{i}"] = param
    return trainable


SHAPES = [(2, 32), (32, 2), (2, 32), (16, 2)]  # 224 coordinates, as in a tiny model's LoRA


def test_noise_scale_check_has_no_false_alarm_over_many_steps():
    generator = torch.Generator().manual_seed(0)
    claimed = settings(noise=1.3)
    for step in range(3000):
        trainable = fake_step(SHAPES, 1.3 * claimed.max_grad_norm, 7.0, generator)
        _check_noise_added(trainable, 7.0, claimed, step)


@pytest.mark.parametrize("factor", [0.0, 0.1, 0.5, 2.0, 10.0])
def test_noise_scale_check_catches_wrong_scale(factor):
    generator = torch.Generator().manual_seed(0)
    claimed = settings(noise=1.3)
    trainable = fake_step(SHAPES, factor * 1.3 * claimed.max_grad_norm, 7.0, generator)
    with pytest.raises(DPNotAppliedError, match="no noise was added at the claimed scale"):
        _check_noise_added(trainable, 7.0, claimed, 0)



def test_diverged_training_is_left_to_the_node_not_called_missing_noise():
    """A non-finite clipped sum says nothing about the noise; the node withholds the update."""
    generator = torch.Generator().manual_seed(0)
    claimed = settings(noise=1.3)
    trainable = fake_step(SHAPES, 1.3, 7.0, generator)
    first = next(iter(trainable.values()))
    first.summed_grad[0, 0] = float("nan")
    first.grad[0, 0] = float("nan")
    _check_noise_added(trainable, 7.0, claimed, 0)
    first.summed_grad[0, 0] = 0.0  # a finite sum with a non-finite gradient is not DP noise
    with pytest.raises(DPNotAppliedError):
        _check_noise_added(trainable, 7.0, claimed, 0)


# ------------------------------------------------------------------ physical micro-batches


def spied_round(model, dataset, physical: int, monkeypatch) -> tuple[list, list[int], object]:
    """Train a round; return each noised step's clipped sums and every forward's batch size."""
    summed: list[list[torch.Tensor]] = []
    add_noise = LoraDPOptimizer.add_noise

    def record_then_noise(self):
        summed.append([p.summed_grad.detach().clone() for p in self.params])
        add_noise(self)

    sizes: list[int] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: sizes.append(len(kw["input_ids"])),
                                           with_kwargs=True)
    with monkeypatch.context() as patch:
        patch.setattr(LoraDPOptimizer, "add_noise", record_then_noise)
        try:
            result = train_dp_round(model, dataset, DPTrainSettings(
                noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8, steps=6,
                learning_rate=0.02, seed=3, max_physical_batch_size=physical))
        finally:
            hook.remove()
    return summed, sizes, result


def test_micro_batches_give_the_logical_batch_step(tiny, monkeypatch):
    """Micro-batches of at most 3 clip and sum to the logical batch's sum (float32), noise is
    added once per logical step with the same draws, and the accounting is unchanged."""
    model, dataset = tiny
    twin = copy.deepcopy(model)
    whole, whole_sizes, whole_result = spied_round(model, dataset, 0, monkeypatch)
    split, split_sizes, split_result = spied_round(twin, dataset, 3, monkeypatch)
    assert len(whole) == len(split) == 6  # noise drawn once per logical step, spied
    assert max(whole_sizes) > 3 and max(split_sizes) <= 3
    assert len(split_sizes) > len(whole_sizes)  # some logical batch was split
    assert sum(split_sizes) == sum(whole_sizes)  # the same examples, in the same steps
    for step_whole, step_split in zip(whole, split):
        for a, b in zip(step_whole, step_split):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # steps and sampling rate: train_dp_round checks them against Opacus' accountant itself
    assert split_result.mean_loss == pytest.approx(whole_result.mean_loss, rel=1e-5)
    trained = dict(twin.named_parameters())
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(trained[name], param, rtol=1e-4, atol=1e-6)


def test_micro_batches_still_catch_missing_noise(tiny, monkeypatch):
    model, dataset = tiny
    scaled_noise(monkeypatch, 0.0)
    with pytest.raises(DPNotAppliedError, match="no noise was added at the claimed scale"):
        train_dp_round(model, dataset, DPTrainSettings(
            noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8, steps=3,
            learning_rate=0.02, seed=0, max_physical_batch_size=2))


def test_micro_batch_limit_of_site_and_request_keeps_the_ledger(make_site, tiny_model_dir,
                                                                monkeypatch):
    """The node takes the smaller of the site's and the request's limit; the ledger records the
    same steps, sampling rate and noise as without micro-batches."""
    sizes: list[int] = []
    real_train = node_module.train_dp_round

    def spy(model, dataset, settings):
        sizes.append(settings.max_physical_batch_size)
        return real_train(model, dataset, settings)

    noised: list[int] = []  # noise draws: one per logical step, micro-batches or not
    add_noise = LoraDPOptimizer.add_noise
    monkeypatch.setattr(node_module, "train_dp_round", spy)
    monkeypatch.setattr(LoraDPOptimizer, "add_noise",
                        lambda self: (noised.append(1), add_noise(self))[1])
    entries, draws = [], []
    for name, site_cap, requested in (("plain", 0, 0), ("capped", 2, 5), ("asked", 0, 3)):
        path = make_site(name)
        policy = yaml.safe_load(path.read_text())
        policy["site"]["max_physical_batch_size"] = site_cap
        path.write_text(yaml.safe_dump(policy))
        node = SiteNode(load_site_policy(path))
        ask = dataclasses.replace(train_request(), max_physical_batch_size=requested)
        assert node.train(ask, start_state(tiny_model_dir)).reply.accepted
        entries.append(SiteLedger(node.policy.ledger_path).adapter_updates()[0])
        draws.append(len(noised))
        noised.clear()
    assert sizes == [0, 2, 3]
    assert draws == [train_request().local_steps] * 3
    for entry in entries[1:]:
        for key in ("steps", "sample_rate", "noise_multiplier", "epsilon"):
            assert entry[key] == entries[0][key]
    assert entries[0]["steps"] == train_request().local_steps


def test_bad_physical_batch_size_names_the_key(tmp_path, make_site):
    job = tmp_path / "job.yaml"
    job.write_text("training:\n  max_physical_batch_size: -1\n")
    with pytest.raises(ConfigError, match=r"line 2: training.max_physical_batch_size: -1 is out of "
                                          r"range"):
        load_job_config(job)
    path = make_site()
    path.write_text(path.read_text().replace("site:\n", "site:\n  max_physical_batch_size: many\n"))
    with pytest.raises(ConfigError, match=r"site.max_physical_batch_size: expected a whole number"):
        load_site_policy(path)
