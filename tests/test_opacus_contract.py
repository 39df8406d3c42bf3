"""The private parts of Opacus this project relies on, checked first, so that an Opacus upgrade
that renames or reshapes one fails here, naming it, instead of silently changing what DP-SGD
does (client/lora_grad_sampler.py, client/trainer.py, common/privacy.py)."""

from __future__ import annotations

import inspect

import opacus
from opacus import PrivacyEngine
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers import optimizer as opacus_optimizer

import privatune.common.privacy  # noqa: F401  (patches _compute_rdp with its cache)
from privatune.client.lora_grad_sampler import LoraDPOptimizer


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_the_engine_overrides_match_the_privacy_engine_they_override():
    assert opacus.__version__.startswith("1.6"), opacus.__version__
    assert _parameters(PrivacyEngine._prepare_model) == [
        "self", "module", "batch_first", "max_grad_norm", "loss_reduction", "grad_sample_mode",
        "wrap_model"]
    assert {"optimizer", "noise_multiplier", "max_grad_norm", "expected_batch_size",
            "grad_sample_mode"} <= set(_parameters(PrivacyEngine._prepare_optimizer))


def test_the_optimizer_class_swap_adds_behaviour_and_no_state():
    """``_prepare_optimizer`` swaps the optimizer's class in place: the subclass may override
    methods only, never need an __init__ of its own."""
    assert issubclass(LoraDPOptimizer, DPOptimizer)
    assert "__init__" not in vars(LoraDPOptimizer)
    assert "__slots__" not in vars(LoraDPOptimizer)


def test_the_optimizer_helpers_the_lora_step_calls_keep_their_shape():
    assert _parameters(opacus_optimizer._check_processed_flag) == ["obj"]
    assert _parameters(opacus_optimizer._mark_as_processed) == ["obj"]
    assert _parameters(opacus_optimizer._generate_noise)[:4] == [
        "std", "reference", "generator", "secure_mode"]


def test_the_trainer_detaches_the_engine_with_close():
    assert _parameters(GradSampleModule._close) == ["self"]


def test_the_rdp_cache_sits_where_opacus_looks_it_up():
    """common.privacy caches ``_compute_rdp``; ``compute_rdp`` must still call it through the
    module, or the cache is bypassed (correct, only slower) and this says so."""
    cached = opacus_rdp._compute_rdp
    assert hasattr(cached, "cache_info")
    assert _parameters(cached.__wrapped__) == ["q", "sigma", "alpha"]
    before = cached.cache_info().hits
    for _ in range(2):
        opacus_rdp.compute_rdp(q=0.123, noise_multiplier=1.234, steps=3, orders=[2.5, 7.0])
    assert cached.cache_info().hits >= before + 2
