"""The private parts of Opacus privatune relies on, each checked by a test named after it, so
that an Opacus upgrade that renames or reshapes one fails here, naming it, instead of silently
changing what DP-SGD does. All of them sit behind one adapter, common/opacus_internals.py
(``PRIVATE_NAMES``); the last tests check that every listed name has its test here and that
no other module of privatune mentions one."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import opacus
import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers import optimizer as opacus_optimizer
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privatune.client.lora_grad_sampler import LoraDPOptimizer, LoraGradSampleModule
from privatune.common import opacus_internals
from privatune.common.opacus_internals import ExtensiblePrivacyEngine

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ("client", "common", "server", "simulations", "benchmarks")
ADAPTER = Path("common") / "opacus_internals.py"


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def _linear_make_private(engine: PrivacyEngine):
    """make_private of a one-layer model over 8 examples, as the trainer calls it."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    data = DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 2)), batch_size=4)
    return engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                               data_loader=data, noise_multiplier=1.0, max_grad_norm=1.0), model


def _dp_optimizer() -> tuple[DPOptimizer, nn.Parameter]:
    param = nn.Parameter(torch.zeros(3))
    optimizer = DPOptimizer(torch.optim.SGD([param], lr=0.1), noise_multiplier=0.0,
                            max_grad_norm=1.0, expected_batch_size=2)
    return optimizer, param


def test_opacus_is_the_version_the_adapter_was_written_for():
    assert opacus.__version__.startswith("1.6"), opacus.__version__


def test__prepare_model_is_where_make_private_wraps_the_model():
    assert _parameters(PrivacyEngine._prepare_model) == [
        "self", "module", "batch_first", "max_grad_norm", "loss_reduction", "grad_sample_mode",
        "wrap_model"]
    asked: list[dict] = []

    class Wrapping(ExtensiblePrivacyEngine):
        def grad_sample_module(self, module, **options):
            asked.append(options)
            return GradSampleModule(module, batch_first=options["batch_first"],
                                    loss_reduction=options["loss_reduction"])

    (wrapped, _, _), model = _linear_make_private(Wrapping())
    assert asked == [{"batch_first": True, "loss_reduction": "mean", "grad_sample_mode": "hooks",
                      "wrap_model": True}]
    assert opacus_internals.wrapped_module(wrapped) is model
    (stock, _, _), _ = _linear_make_private(ExtensiblePrivacyEngine())
    assert type(stock) is GradSampleModule  # no hook: Opacus' own wrapping


def test__prepare_optimizer_is_where_make_private_builds_the_optimizer():
    assert {"optimizer", "noise_multiplier", "max_grad_norm", "expected_batch_size",
            "grad_sample_mode"} <= set(_parameters(PrivacyEngine._prepare_optimizer))

    class Retyping(ExtensiblePrivacyEngine):
        def optimizer_class(self, optimizer, *, grad_sample_mode):
            assert type(optimizer) is DPOptimizer and grad_sample_mode == "hooks"
            return LoraDPOptimizer

    (_, optimizer, _), _ = _linear_make_private(Retyping())
    assert type(optimizer) is LoraDPOptimizer
    assert optimizer.step_hook is not None  # the accountant's hook, attached after the swap
    (_, stock, _), _ = _linear_make_private(ExtensiblePrivacyEngine())
    assert type(stock) is DPOptimizer


def test_an_optimizer_is_retyped_only_to_a_subclass_without_state():
    """The optimizer's class is swapped in place: the subclass may override methods only."""
    optimizer, _ = _dp_optimizer()

    class Stateful(DPOptimizer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

    with pytest.raises(TypeError, match="Stateful"):
        opacus_internals.retype_optimizer(optimizer, Stateful)
    with pytest.raises(TypeError, match="not a subclass"):
        opacus_internals.retype_optimizer(optimizer, torch.optim.SGD)
    opacus_internals.retype_optimizer(optimizer, LoraDPOptimizer)
    assert type(optimizer) is LoraDPOptimizer


def test__module_is_the_model_a_grad_sample_module_wraps():
    model = nn.Linear(3, 2)
    wrapped = GradSampleModule(model)
    assert opacus_internals.wrapped_module(wrapped) is model
    assert wrapped.to_standard_module() is model


def test_to_standard_module_detaches_the_lora_engine():
    """The trainer detaches the engine with Opacus' public ``to_standard_module``: afterwards the
    LoRA factors have their own forward again and no hook list is left on the model."""
    model = get_peft_model(nn.Sequential(nn.Linear(4, 4)),
                           PeftLoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    wrapped = LoraGradSampleModule(model)
    factors = [m for m in model.modules() if "forward" in vars(m)]
    assert len(factors) == 2  # lora_A and lora_B multiply per example
    assert wrapped.to_standard_module() is model
    assert not [m for m in model.modules() if "forward" in vars(m)]
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test__check_processed_flag_refuses_a_tensor_used_in_a_step():
    assert _parameters(opacus_optimizer._check_processed_flag) == ["obj"]
    tensor = torch.zeros(3)
    opacus_internals.check_unprocessed(tensor)
    tensor._processed = True
    with pytest.raises(ValueError, match="zero_grad"):
        opacus_internals.check_unprocessed(tensor)


def test__mark_as_processed_marks_a_tensor_for_the_check():
    assert _parameters(opacus_optimizer._mark_as_processed) == ["obj"]
    tensor = torch.zeros(3)
    opacus_internals.mark_processed(tensor)
    with pytest.raises(ValueError, match="zero_grad"):
        opacus_optimizer._check_processed_flag(tensor)


def test__processed_is_the_mark_a_reused_buffer_clears():
    tensor = torch.zeros(3)
    opacus_internals.mark_processed(tensor)
    opacus_internals.unmark_processed(tensor)
    opacus_internals.check_unprocessed(tensor)


def test__generate_noise_draws_as_opacus_draws_for_one_parameter():
    """The LoRA optimizer's one draw for all tensors is Opacus' draw: a normal of the given
    standard deviation from the given generator (none at std 0)."""
    assert _parameters(opacus_optimizer._generate_noise)[:4] == [
        "std", "reference", "generator", "secure_mode"]
    reference = torch.empty(1000)
    noise = opacus_internals.gaussian_noise(std=2.0, reference=reference,
                                            generator=torch.Generator().manual_seed(5),
                                            secure_mode=False)
    expected = torch.normal(mean=0.0, std=2.0, size=(1000,),
                            generator=torch.Generator().manual_seed(5))
    assert torch.equal(noise, expected)
    assert not opacus_internals.gaussian_noise(std=0.0, reference=reference, generator=None,
                                               secure_mode=False).any()


def test__is_last_step_skipped_says_a_micro_batch_only_accumulated():
    optimizer, param = _dp_optimizer()
    optimizer.signal_skip_step(True)  # what BatchMemoryManager signals before a micro-batch
    for skipped in (True, False):
        param.grad_sample = torch.ones(2, 3)
        optimizer.step()
        assert opacus_internals.last_step_skipped(optimizer) is skipped
        optimizer.zero_grad()
    assert param.summed_grad is None


def test__compute_rdp_is_cached_where_opacus_looks_it_up():
    """common.privacy caches ``_compute_rdp``; ``compute_rdp`` must still call it through the
    module, or the cache is bypassed (correct, only slower) and this says so."""
    opacus_internals.remember_rdp_of_one_step()
    cached = opacus_rdp._compute_rdp
    assert hasattr(cached, "cache_info")
    assert _parameters(cached.__wrapped__) == ["q", "sigma", "alpha"]
    before = cached.cache_info().hits
    for _ in range(2):
        opacus_rdp.compute_rdp(q=0.123, noise_multiplier=1.234, steps=3, orders=[2.5, 7.0])
    assert cached.cache_info().hits >= before + 2
    opacus_internals.remember_rdp_of_one_step()
    assert opacus_rdp._compute_rdp is cached  # installed once


def test_every_private_name_has_its_test_and_its_reason():
    tests = [name for name, value in vars(sys.modules[__name__]).items()
             if name.startswith("test_") and callable(value)]
    for name in opacus_internals.PRIVATE_NAMES:
        assert any(test.startswith(f"test_{name}_") for test in tests), f"no test for {name}"
        assert f"{name}``" in opacus_internals.__doc__, f"{name}: not in the adapter's docstring"


def test_no_module_but_the_adapter_mentions_a_private_opacus_name():
    names = re.compile(r"(?<!\w)(" + "|".join(opacus_internals.PRIVATE_NAMES) + r")(?!\w)")
    found = [f"{path.relative_to(ROOT)}:{number}: {match.group(1)}"
             for folder in PACKAGE for path in sorted((ROOT / folder).rglob("*.py"))
             if path.relative_to(ROOT) != ADAPTER
             for number, line in enumerate(path.read_text().splitlines(), 1)
             for match in names.finditer(line)]
    assert not found, "private Opacus names outside common/opacus_internals.py:\n" + "\n".join(found)
