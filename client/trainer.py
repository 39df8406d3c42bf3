"""DP-SGD training of the LoRA parameters with Opacus, with a check that DP really ran.

Opacus combined with PEFT can fail silently (loss and epsilon look normal while the LoRA
weights are not trained with per-sample clipping and noise; Opacus issue 820). The trainer
therefore checks, at runtime, that every trainable tensor is a LoRA tensor, is handled by the
DP optimizer, gets per-sample gradients and noise of the claimed scale on every step, and
actually changes; and that no frozen weight moves (the base model's, and under ffa the lora_A
factors: only what requires gradients is trained, clipped and noised). Any failure stops the
round with DPNotAppliedError.

The noise check compares each step's gradient with the clipped sum Opacus kept
(``summed_grad``) divided by the divisor Opacus itself used, which is its own expected batch
size ``int(len(dataset) * sample_rate)``, not the requested batch size. The residual must look
like Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm / divisor``.

A logical Poisson batch larger than ``max_physical_batch_size`` is split into physical
micro-batches (Opacus' BatchMemoryManager): each is clipped and added to ``summed_grad``, and
only the last one of the logical batch adds noise and steps, so the steps, the sampling rate,
the noise and the accountant's record are those of the logical batches. The checks on noise
and the reported loss are per logical step.

With ``gradient_checkpointing`` each decoder block's activations are recomputed in the
backward pass instead of kept (reentrant checkpointing only, see ``_checkpointing``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import wrap_data_loader
from torch.utils.data import DataLoader, Dataset

from privatune.client.lora_grad_sampler import LoraPrivacyEngine
from privatune.common.examples import labelled_logits, labelled_predictions, per_example_loss
from privatune.common.opacus_internals import last_step_skipped
from privatune.common.privacy import poisson_sample_rate
from privatune.common.progress import progress_bar


class DPNotAppliedError(RuntimeError):
    """DP-SGD was not really applied to the LoRA parameters; nothing may be released."""


@dataclass(frozen=True)
class DPTrainSettings:
    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: int
    steps: int
    learning_rate: float
    seed: int
    # the most examples one forward/backward pass takes (0: no limit); larger logical batches
    # are split into physical micro-batches with unchanged accounting
    max_physical_batch_size: int = 0
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class DPRoundResult:
    steps: int
    sample_rate: float
    noise_multiplier: float
    mean_loss: float
    examples: int


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise DPNotAppliedError("the model has no trainable parameters")
    stray = [n for n in params if "lora_" not in n]
    if stray:
        raise DPNotAppliedError(f"non-LoRA parameters are trainable: {stray[:3]}")
    return params


def loss_scale(float16_base: bool, labels: torch.Tensor) -> float:
    """What a batch's mean loss is multiplied by before backward: 1, or with float16 base
    weights the batch size times its most labelled tokens, so that each token's gradient is
    about 1 rather than 1 / (examples x tokens), which float16 flushes towards zero (its
    smallest normal number is 6e-5). The per-sample gradients are divided back before
    clipping (``LoraGradSampleModule.loss_scale``); bfloat16 has float32's range and needs none.
    """
    if not float16_base:
        return 1.0
    labelled = labelled_predictions(labels).sum(dim=1)
    return float(len(labels) * max(int(labelled.max()), 1))


def _frozen_fingerprint(model: torch.nn.Module) -> float:
    """Sum of the frozen weights: each tensor's in float32 (a reduction that reads half-precision
    weights as they are; a float64 copy of an 8B model's embedding would take 4 GB of device
    memory), added up in float64."""
    return sum(float(p.detach().sum(dtype=torch.float32)) for p in model.parameters()
               if not p.requires_grad)


def train_dp_round(model: torch.nn.Module, dataset: Dataset,
                   settings: DPTrainSettings) -> DPRoundResult:
    """Run ``settings.steps`` DP-SGD steps on ``model``'s LoRA parameters, in place."""
    trainable = _trainable(model)
    device = next(iter(trainable.values())).device
    half = any(p.dtype == torch.float16 for p in model.parameters() if not p.requires_grad)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    frozen_before = _frozen_fingerprint(model)
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)

    model.train()
    optimizer = torch.optim.Adam(list(trainable.values()), lr=settings.learning_rate)
    loader = DataLoader(dataset, batch_size=settings.expected_batch_size, generator=generator)
    with warnings.catch_warnings():
        # Opacus' secure-RNG advice: the noise comes from torch's RNG under the site's secret seed.
        warnings.simplefilter("ignore")
        engine = LoraPrivacyEngine(accountant="rdp")
        dp_model, dp_optimizer, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.max_grad_norm,
            poisson_sampling=True)
    optimized = {id(p) for group in dp_optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in trainable.items() if id(p) not in optimized]
    if missing:
        raise DPNotAppliedError(f"the DP optimizer does not handle LoRA tensors {missing[:3]}")

    losses: list[float] = []  # one per logical step: the mean over its examples
    loss_sum, loss_count = 0.0, 0
    steps = 0
    ticks = progress_bar(range(settings.steps), "local DP steps")
    _checkpointing(model, settings.gradient_checkpointing)
    physical_loader = dp_loader
    if settings.max_physical_batch_size:  # what BatchMemoryManager's context hands out
        physical_loader = wrap_data_loader(data_loader=dp_loader, optimizer=dp_optimizer,
                                           max_batch_size=settings.max_physical_batch_size)
    try:
        while steps < settings.steps:
            for input_ids, labels, mask in physical_loader:
                if steps >= settings.steps:
                    break
                # after a skipped (accumulating) physical step this keeps summed_grad
                dp_optimizer.zero_grad(set_to_none=True)
                if len(input_ids) > 0:
                    input_ids, labels, mask = (t.to(device) for t in (input_ids, labels, mask))
                    logits, labels = labelled_logits(dp_model, input_ids, mask, labels)
                    per_example = per_example_loss(logits, labels)
                    loss = per_example.mean()
                    dp_model.loss_scale = loss_scale(half, labels)
                    (loss * dp_model.loss_scale).backward()
                    loss_sum += per_example.detach().sum().item()
                    loss_count += len(input_ids)
                    _check_per_sample_gradients(trainable, len(input_ids))
                else:
                    for param in trainable.values():  # an empty Poisson batch: noise only
                        param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype,
                                                        device=param.device)
                dp_optimizer.step()
                if last_step_skipped(dp_optimizer):
                    continue  # a physical micro-batch clipped into summed_grad; no noise yet
                _check_noise_added(trainable, _noise_divisor(dp_optimizer), settings, steps)
                if loss_count:
                    losses.append(loss_sum / loss_count)
                loss_sum, loss_count = 0.0, 0
                steps += 1
                next(ticks, None)
    finally:
        dp_optimizer.zero_grad(set_to_none=True)
        dp_model.to_standard_module()  # detach the engine; the PEFT model keeps its tensors
        _checkpointing(model, False)  # the base model is shared with the process's other sites

    _check_parameters_changed(model, before, frozen_before)
    recorded = engine.accountant.history
    sample_rate = poisson_sample_rate(len(dataset), settings.expected_batch_size)
    if (abs(dp_loader.sample_rate - sample_rate) > 1e-12
            or any(abs(rate - _opacus_bookkept_rate(sample_rate)) > 1e-12 for _, rate, _ in recorded)
            or sum(count for _, _, count in recorded) != steps):
        raise DPNotAppliedError(f"Opacus sampled at rate {dp_loader.sample_rate} and recorded "
                                f"{recorded!r}, expected {steps} steps at sampling rate "
                                f"{sample_rate}")
    return DPRoundResult(steps=steps, sample_rate=sample_rate,
                         noise_multiplier=settings.noise_multiplier,
                         mean_loss=sum(losses) / max(len(losses), 1), examples=len(dataset))


def _checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Turn Hugging Face gradient checkpointing of the decoder blocks on or off.

    Reentrant checkpointing: its first forward pass runs without autograd, so the LoRA engine
    records nothing there and records each LoRA factor once, in the recomputation whose
    backward follows, and the per-sample gradients are exactly those without checkpointing
    (tests/test_grad_sampler.py; the non-reentrant kind is not tested). Reentrant
    checkpointing needs the blocks' input to require a gradient, hence the input hook.
    """
    # transformers 5 renamed the flag (the old name warns); older releases have only the old one
    on = getattr(model, "is_activation_checkpointing", None)
    if on is None:
        on = getattr(model, "is_gradient_checkpointing", False)
    if enabled == bool(on):
        return
    if not enabled:
        model.gradient_checkpointing_disable()
        model.disable_input_require_grads()
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"training.gradient_checkpointing: {type(model).__name__} does not "
                         "support gradient checkpointing; turn it off for this model")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()


def _check_per_sample_gradients(trainable: dict[str, torch.nn.Parameter], batch: int) -> None:
    """Every LoRA tensor has one per-sample gradient per example: Opacus can clip each one."""
    for name, param in trainable.items():
        grad_sample = getattr(param, "grad_sample", None)
        if grad_sample is None or grad_sample.shape != (batch, *param.shape):
            raise DPNotAppliedError(f"no per-sample gradients for LoRA tensor {name}: "
                                    "Opacus is not clipping this parameter")


def _opacus_bookkept_rate(sample_rate: float) -> float:
    """The sampling rate Opacus' own accountant records for a loader that samples at
    ``sample_rate`` = 1/n: make_private re-derives it as 1 / len(loader), and the Poisson
    sampler's length is ``int(1 / sample_rate)``, which floating point makes n - 1 for some n
    (93, 99, 105, 117, 123, ...: 312 of the n below 5,000). The sampler still draws at 1/n, the
    rate the ledger records; Opacus' record is then slightly above it (its own accounting errs
    on the safe side), and is accepted as that, not as a sign that DP was not applied."""
    return 1.0 / int(1.0 / sample_rate)


def _noise_divisor(optimizer: DPOptimizer) -> float:
    """What Opacus divided the noised gradient sum by in this step (its scale_grad).

    Read from the optimizer: make_private sets ``expected_batch_size`` to
    ``int(len(dataset) * sample_rate)``, which is not the requested batch size unless the
    dataset size is a multiple of it. The trainer's loss is a mean, so Opacus divides.
    """
    return float(optimizer.expected_batch_size * optimizer.accumulated_iterations)


# Tolerance on |log(measured noise std / claimed std)|: the log of the root mean square of n
# i.i.d. normals has standard deviation about 1/sqrt(2n); 6 of those plus a floor makes a
# false alarm on a true DP step rarer than 1e-9 for n >= 200, while zero noise or noise 2x
# off fails (for the LoRA sizes of even a tiny model).
_NOISE_SDS = 6.0
_NOISE_FLOOR = 0.05


def _check_noise_added(trainable: dict[str, torch.nn.Parameter], divisor: float,
                       settings: DPTrainSettings, step: int) -> None:
    """The step's gradient is (clipped sum + Gaussian noise of the claimed scale) / divisor.

    The residual ``grad - summed_grad / divisor`` over all LoRA coordinates must have a root
    mean square close to ``noise_multiplier * max_grad_norm / divisor``: this catches noise
    that is missing, too small or too large, whatever the gradient is.
    """
    if settings.noise_multiplier <= 0:
        return
    squares: list[torch.Tensor] = []  # on the parameters' device: one transfer per step
    count = 0
    for name, param in trainable.items():
        summed = getattr(param, "summed_grad", None)
        if param.grad is None or summed is None:
            raise DPNotAppliedError(f"LoRA tensor {name} got no DP gradient at step {step + 1}")
        residual = param.grad.detach().double() - summed.detach().double() / divisor
        squares.append(residual.square().sum())
        count += residual.numel()
    measured = math.sqrt(float(torch.stack(squares).sum()) / count)
    if not math.isfinite(measured) and not all(torch.isfinite(p.summed_grad).all()
                                               for p in trainable.values()):
        # Training diverged (the clipped sum itself is not finite), so the residual says
        # nothing about the noise; the node withholds the non-finite update it leads to.
        return
    claimed = settings.noise_multiplier * settings.max_grad_norm / divisor
    tolerance = _NOISE_SDS / math.sqrt(2 * count) + _NOISE_FLOOR
    if not (0 < measured < math.inf and abs(math.log(measured / claimed)) <= tolerance):
        raise DPNotAppliedError(
            f"no noise was added at the claimed scale: at step {step + 1} the LoRA gradient "
            f"noise has std {measured:.4g}, expected {claimed:.4g} (noise multiplier "
            f"{settings.noise_multiplier:g}, max_grad_norm {settings.max_grad_norm:g}, "
            f"Opacus batch divisor {divisor:g}, {count} coordinates, "
            f"tolerance x{math.exp(tolerance):.3f})")


def _check_parameters_changed(model: torch.nn.Module, before: dict[str, torch.Tensor],
                              frozen_before: float) -> None:
    current = dict(model.named_parameters())
    unchanged = [n for n, old in before.items() if torch.equal(current[n].detach(), old)]
    if unchanged:
        raise DPNotAppliedError(f"DP training did not change LoRA tensors {unchanged[:3]}")
    if _frozen_fingerprint(model) != frozen_before:
        raise DPNotAppliedError("frozen weights (base model, or LoRA factors kept frozen) changed "
                                "during DP training")
