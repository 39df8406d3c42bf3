"""The one module that touches Opacus' private names (written against Opacus 1.6).

The LoRA DP engine (client/lora_grad_sampler.py), the trainer (client/trainer.py) and the
accountants (common/privacy.py) call the public functions and the engine base class below
instead, so an Opacus upgrade that renames or reshapes one of these names fails in
tests/test_opacus_contract.py, naming it, and is mended here alone. ``PRIVATE_NAMES`` lists
them; that test also checks that no other module of privatune mentions one.

- ``PrivacyEngine._prepare_model``: make_private wraps the model through it; the LoRA engine
  puts its own grad sample module there (``ExtensiblePrivacyEngine.grad_sample_module``).
- ``PrivacyEngine._prepare_optimizer``: make_private builds the DP optimizer through it,
  choosing the class from the clipping and distribution; the LoRA engine swaps in its
  subclass afterwards (``ExtensiblePrivacyEngine.optimizer_class``, ``retype_optimizer``).
- ``AbstractGradSampleModule._module``: the model a grad sample module wraps, which a
  subclass's ``add_hooks`` needs while Opacus' constructor runs (``wrapped_module``).
- ``opacus.optimizers.optimizer._check_processed_flag`` / ``_mark_as_processed`` and the
  tensor attribute ``_processed`` they use: Opacus' guard that no per-sample gradient or
  clipped sum enters two steps; the LoRA optimizer's flat buffers keep it
  (``check_unprocessed``, ``mark_processed``, ``unmark_processed``).
- ``opacus.optimizers.optimizer._generate_noise``: Opacus' Gaussian noise, secure mode
  included; the LoRA optimizer draws one vector for all LoRA tensors (``gaussian_noise``).
- ``DPOptimizer._is_last_step_skipped``: whether a step only accumulated a micro-batch
  (BatchMemoryManager) and added no noise; the trainer checks noise on the other steps only
  (``last_step_skipped``).
- ``opacus.accountants.analysis.rdp._compute_rdp``: the RDP of one subsampled Gaussian step,
  which the RDP and PRV accountants look up through this module; privacy accounting caches it
  (``remember_rdp_of_one_step``).
"""

from __future__ import annotations

import functools

import torch
from opacus import PrivacyEngine
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers import optimizer as opacus_optimizer
from torch import nn

PRIVATE_NAMES = ("_prepare_model", "_prepare_optimizer", "_module", "_check_processed_flag",
                 "_mark_as_processed", "_processed", "_generate_noise", "_is_last_step_skipped",
                 "_compute_rdp")

RDP_CACHE_SIZE = 2**16


class ExtensiblePrivacyEngine(PrivacyEngine):
    """Opacus' PrivacyEngine whose grad sample module and DP optimizer class a subclass picks
    by overriding ``grad_sample_module`` and ``optimizer_class``; by default it is Opacus'."""

    def grad_sample_module(self, module: nn.Module, *, batch_first: bool, loss_reduction: str,
                           grad_sample_mode: str, wrap_model: bool) -> nn.Module | None:
        """The wrapped model make_private returns, or None for Opacus' own wrapping."""
        return None

    def optimizer_class(self, optimizer: DPOptimizer, *,
                        grad_sample_mode: str) -> type[DPOptimizer] | None:
        """A subclass to give the DP optimizer Opacus built, or None to keep its class."""
        return None

    def _prepare_model(self, module: nn.Module, *, batch_first: bool = True,
                       max_grad_norm=1.0, loss_reduction: str = "mean",
                       grad_sample_mode: str = "hooks", wrap_model: bool = True):
        wrapped = self.grad_sample_module(module, batch_first=batch_first,
                                          loss_reduction=loss_reduction,
                                          grad_sample_mode=grad_sample_mode, wrap_model=wrap_model)
        if wrapped is not None:
            return wrapped
        return super()._prepare_model(module, batch_first=batch_first, max_grad_norm=max_grad_norm,
                                      loss_reduction=loss_reduction,
                                      grad_sample_mode=grad_sample_mode, wrap_model=wrap_model)

    def _prepare_optimizer(self, **kwargs) -> DPOptimizer:
        optimizer = super()._prepare_optimizer(**kwargs)
        subclass = self.optimizer_class(optimizer,
                                        grad_sample_mode=kwargs.get("grad_sample_mode", "hooks"))
        if subclass is not None:
            retype_optimizer(optimizer, subclass)
        return optimizer


def retype_optimizer(optimizer: DPOptimizer, subclass: type[DPOptimizer]) -> None:
    """Give ``optimizer`` the methods of ``subclass`` in place: the same object, with the state
    Opacus gave it (and the accountant's step hook make_private attaches next).

    Opacus picks and builds the optimizer class itself; a subclass that overrides methods only
    can take its place. One with an ``__init__`` or ``__slots__`` of its own cannot (they would
    never run), so it is refused.
    """
    base = type(optimizer)
    if not issubclass(subclass, base):
        raise TypeError(f"{subclass.__qualname__} is not a subclass of {base.__qualname__}")
    added = subclass.__mro__[:subclass.__mro__.index(base)]
    stateful = [c.__qualname__ for c in added if "__init__" in vars(c) or "__slots__" in vars(c)]
    if stateful:
        raise TypeError(f"{', '.join(stateful)} define __init__ or __slots__: an optimizer's class "
                        "is swapped in place, so its subclass may override methods only")
    optimizer.__class__ = subclass


def wrapped_module(module: AbstractGradSampleModule) -> nn.Module:
    """The model a grad sample module wraps, without detaching the engine (as
    ``to_standard_module`` does)."""
    return module._module


def check_unprocessed(tensor: torch.Tensor) -> None:
    """Raise Opacus' ValueError when ``tensor`` already went into an optimizer step (the
    gradients were not cleared with zero_grad)."""
    opacus_optimizer._check_processed_flag(tensor)


def mark_processed(tensor: torch.Tensor) -> None:
    """Mark ``tensor`` as used in an optimizer step, for ``check_unprocessed``."""
    opacus_optimizer._mark_as_processed(tensor)


def unmark_processed(tensor: torch.Tensor) -> None:
    """Clear the mark of ``tensor``, a buffer about to be overwritten with new values."""
    tensor.__dict__.pop("_processed", None)


def gaussian_noise(std: float, reference: torch.Tensor, generator: torch.Generator | None,
                   secure_mode: bool) -> torch.Tensor:
    """Opacus' Gaussian noise of standard deviation ``std``, shaped like ``reference`` (drawn
    as Opacus draws it for one parameter, secure mode included)."""
    return opacus_optimizer._generate_noise(std=std, reference=reference, generator=generator,
                                            secure_mode=secure_mode)


def last_step_skipped(optimizer: DPOptimizer) -> bool:
    """Whether the optimizer's last step only clipped a micro-batch into ``summed_grad``
    (no noise, no update): the logical batch goes on."""
    return optimizer._is_last_step_skipped


def remember_rdp_of_one_step() -> None:
    """Cache each RDP of one subsampled Gaussian step that Opacus computes, by (sampling rate,
    noise multiplier, order): a pure function of three numbers, and most of accounting's time.
    Installed once per process; a second call leaves the cache as it is.

    Opacus' PRV accountant bounds its domain with RDP, computing the same 151 orders twice
    per epsilon, and a node asks for the epsilon of its history at one noise multiplier every
    round; measured on the demo's model, privacy accounting was 1.6 s of a 16.5 s local-only
    baseline of 3 rounds, most of it these orders. RDP over many steps is this times the steps.
    """
    compute = opacus_rdp._compute_rdp
    if not hasattr(compute, "cache_info"):
        opacus_rdp._compute_rdp = functools.lru_cache(maxsize=RDP_CACHE_SIZE)(compute)
