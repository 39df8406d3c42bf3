"""A site's side of one secure DP-SGD step (issue 27): its clipped gradient sum, then encoded.

In secure DP-SGD each round is ONE DP-SGD step of the union of the sites' records. Every site
Poisson-samples its records at the same rate q (so the union is a Poisson sample at rate q),
sums the clipped per-sample gradients of its trainable LoRA tensors and adds NO Gaussian noise
of its own: the noise is its Skellam share, added when the sum is encoded to integers
(``common.distributed_noise.encode_contribution``), and the coordinator only ever learns the
modular sum of the sites' encodings (SecAgg+). So the plain vector computed here must never
leave the site; only ``encode_site_contribution``'s output may.

The clipping is the DP engine's own: ``LoraPrivacyEngine`` wraps the model and the optimizer
exactly as the trainer does, and each physical micro-batch goes through
``LoraDPOptimizer.clip_and_accumulate`` (Opacus' pre-step clip into ``summed_grad``); the
optimizer never steps, so nothing adds noise and no parameter moves. A DP-applied check runs
on every micro-batch (``DPNotAppliedError``): every trainable tensor got per-sample gradients,
what was added to the sum is the sum of those gradients each clipped to at most C, and after
the step no parameter, trained or frozen, has moved.

The flat vector lists the trained tensors in a fixed order, their names (PEFT's saved-adapter
names, as ``common.lora.lora_state`` gives them) sorted, so that the coordinator unflattens
the decoded sum without being told any order (``server.secure_step`` uses the same rule).

What is released: the encoding alone. The sample size is not in the result (the union's
expected batch q*N is what the coordinator divides by); the mean loss is for the site's own log.
An empty Poisson sample still contributes (a zero vector plus its noise share): a site that
left the round when it drew no record would reveal that it drew none.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from privatune.client.lora_grad_sampler import LoraPrivacyEngine
from privatune.client.trainer import DPNotAppliedError, loss_scale
from privatune.common.distributed_noise import (
    DistributedNoiseParams,
    encode_contribution,
)
from privatune.common.examples import labelled_logits, per_example_loss
from privatune.common.lora import lora_state
from privatune.common.secure_random import CipherRandom, RandomSource
from torch.utils.data import DataLoader, Dataset, default_collate

_LORA_FACTORS = ("lora_A", "lora_B")
# the clipped sum a micro-batch added may differ from the check's own sum by float32 rounding
_SUM_TOLERANCE = 1e-4
_SAMPLE_PURPOSE, _NOISE_PURPOSE = 0, 1


@dataclass(frozen=True, eq=False)
class SiteContribution:
    """A site's sum of clipped per-sample gradients for one step, before any noise.

    ``vector`` (float64) holds the trained tensors named ``names`` (sorted), each flattened, in
    that order. It stays on the site: only its encoding is sent. ``local_loss`` is the mean
    loss over the sample (None for an empty sample), for the site's own log only; the sample
    size is deliberately absent.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    vector: np.ndarray
    clip: float
    local_loss: float | None

    @property
    def dimension(self) -> int:
        return int(self.vector.shape[0])


def _derived_seed(secret_seed: int, step: int, purpose: int) -> np.random.SeedSequence:
    if isinstance(secret_seed, bool) or int(secret_seed) != secret_seed or secret_seed < 0:
        raise ValueError(f"secret_seed must be a non-negative integer, got {secret_seed!r}")
    if isinstance(step, bool) or int(step) != step or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return np.random.SeedSequence([int(secret_seed), int(step), purpose])


def sample_generator(secret_seed: int, step: int) -> torch.Generator:
    """The site's torch generator for step ``step``'s Poisson sample, from its secret seed
    (distinct from the noise's, so the two draws are independent)."""
    state = _derived_seed(secret_seed, step, _SAMPLE_PURPOSE).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def noise_rng(secret_seed: int, step: int) -> CipherRandom:
    """The site's cryptographic generator for step ``step``'s rounding and Skellam share
    (ChaCha20 keyed from the secret, ``common/secure_random.py``). Secret and unpredictable:
    the coordinator could subtract a share it could predict. The node draws the secret as 256
    fresh bits from the OS's cryptographic source every step."""
    return CipherRandom.derived(secret_seed, step, _NOISE_PURPOSE)


def poisson_sample(count: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson sample of ``count`` records: each kept independently with
    probability ``sample_rate`` (as Opacus' Poisson loader draws it)."""
    if isinstance(count, bool) or int(count) != count or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    keep = torch.rand(int(count), generator=generator) < sample_rate
    return torch.nonzero(keep).flatten()


def _saved_name(name: str, adapter: str) -> str | None:
    """PEFT's saved-adapter name of a parameter (``<module>.lora_A.<adapter>.weight`` ->
    ``<module>.lora_A.weight``), or None when it is not a factor of ``adapter``."""
    parts = name.split(".")
    if len(parts) < 4 or parts[-3] not in _LORA_FACTORS or parts[-2] != adapter:
        return None
    return ".".join(parts[:-2] + parts[-1:])


def trained_tensors(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The model's trainable LoRA tensors by saved-adapter name, in the flat vector's order
    (sorted names); an error for any trainable parameter that is not one."""
    adapter = getattr(model, "active_adapter", None)
    if not isinstance(adapter, str):
        raise TypeError(f"expected a PEFT model with one active adapter, got {type(model).__name__}")
    known = set(lora_state(model))
    found: dict[str, torch.nn.Parameter] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        saved = _saved_name(name, adapter)
        if saved is None or saved not in known:
            raise DPNotAppliedError(f"trainable parameter {name!r} is not a LoRA factor of "
                                    f"adapter {adapter!r}; secure DP-SGD trains LoRA only")
        found[saved] = param
    if not found:
        raise DPNotAppliedError("the model has no trainable LoRA tensor")
    return {name: found[name] for name in sorted(found)}


def _frozen_fingerprint(model: torch.nn.Module) -> float:
    return sum(float(p.detach().sum(dtype=torch.float32)) for p in model.parameters()
               if not p.requires_grad)


def _check_per_sample(trainable: Mapping[str, torch.nn.Parameter], batch: int) -> None:
    for name, param in trainable.items():
        grad_sample = getattr(param, "grad_sample", None)
        if not isinstance(grad_sample, torch.Tensor) or grad_sample.shape != (batch, *param.shape):
            raise DPNotAppliedError(f"no per-sample gradients for LoRA tensor {name}: the engine "
                                    "would not clip it")


def _clipped_reference(trainable: Mapping[str, torch.nn.Parameter], batch: int,
                       clip: float) -> torch.Tensor:
    """This micro-batch's sum of per-sample gradients each clipped to ``clip``, computed apart
    from the optimizer (flat, in ``trainable``'s order), for the check."""
    flat = torch.cat([p.grad_sample.detach().reshape(batch, -1).double()
                      for p in trainable.values()], dim=1)
    factors = (clip / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)  # Opacus' clip factors
    return flat.T @ factors


def _summed(trainable: Mapping[str, torch.nn.Parameter]) -> torch.Tensor | None:
    parts = [getattr(p, "summed_grad", None) for p in trainable.values()]
    if all(part is None for part in parts):
        return None
    if any(part is None for part in parts):
        missing = [n for n, part in zip(trainable, parts) if part is None]
        raise DPNotAppliedError(f"the engine clipped no gradient of LoRA tensors {missing[:3]}")
    return torch.cat([part.detach().reshape(-1).double() for part in parts])


def clipped_gradient_sum(model: torch.nn.Module, dataset: Dataset, indices: Sequence[int] | torch.Tensor,
                         clip: float, *, max_physical_batch_size: int = 0) -> SiteContribution:
    """The sum over ``dataset[indices]`` of the trainable LoRA tensors' per-sample gradients,
    each clipped to L2 norm ``clip`` by the DP engine; no noise, no parameter update.

    ``model`` is the PEFT model with the global adapter loaded, on its device, with exactly
    the tensors its aggregation trains requiring gradients (``common.lora.train_factors``).
    Samples larger than ``max_physical_batch_size`` (0: no limit) are split into micro-batches
    that add into one sum. Raises ``DPNotAppliedError`` when the engine did not clip every
    trained tensor per sample, or when any parameter moved.
    """
    if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a positive finite number, got {clip!r}")
    if isinstance(max_physical_batch_size, bool) or int(max_physical_batch_size) != \
            max_physical_batch_size or max_physical_batch_size < 0:
        raise ValueError(f"max_physical_batch_size must be a non-negative integer, got "
                         f"{max_physical_batch_size!r}")
    trainable = trained_tensors(model)
    names = tuple(trainable)
    shapes = tuple(tuple(p.shape) for p in trainable.values())
    total = sum(p.numel() for p in trainable.values())
    chosen = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if len(chosen) == 0:  # an empty sample: a zero vector (its noise comes with the encoding)
        return SiteContribution(names, shapes, np.zeros(total), float(clip), None)
    if int(chosen.min()) < 0 or int(chosen.max()) >= len(dataset):
        raise ValueError(f"indices must be in [0, {len(dataset)}), got "
                         f"[{int(chosen.min())}, {int(chosen.max())}]")
    device = next(iter(trainable.values())).device
    half = any(p.dtype == torch.float16 for p in model.parameters() if not p.requires_grad)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    frozen_before = _frozen_fingerprint(model)
    was_training = model.training
    model.train()
    in_model_order = [p for p in model.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' secure-RNG advice: no noise is drawn here
        engine = LoraPrivacyEngine(accountant="rdp")
        dp_model, dp_optimizer, _ = engine.make_private(
            module=model, optimizer=torch.optim.SGD(in_model_order, lr=0.0),
            data_loader=DataLoader(dataset, batch_size=1), noise_multiplier=0.0,
            max_grad_norm=float(clip), poisson_sampling=False)
    loss_sum = 0.0
    try:
        size = int(max_physical_batch_size) or len(chosen)
        reference = torch.zeros(total, dtype=torch.float64, device=device)
        for chunk in chosen.split(size):
            for param in trainable.values():  # the last micro-batch's per-sample gradients
                param.grad_sample = None
            input_ids, labels, mask = (t.to(device) for t in
                                       default_collate([dataset[int(i)] for i in chunk]))
            logits, labels = labelled_logits(dp_model, input_ids, mask, labels)
            per_example = per_example_loss(logits, labels)
            dp_model.loss_scale = loss_scale(half, labels)
            (per_example.mean() * dp_model.loss_scale).backward()
            loss_sum += float(per_example.detach().sum())
            _check_per_sample(trainable, len(chunk))
            reference += _clipped_reference(trainable, len(chunk), float(clip))
            dp_optimizer.clip_and_accumulate()
            summed = _summed(trainable)
            if summed is None or not torch.allclose(
                    summed, reference, rtol=_SUM_TOLERANCE,
                    atol=_SUM_TOLERANCE * float(clip) * len(chosen) / math.sqrt(total)):
                raise DPNotAppliedError("the engine's clipped sum differs from the per-sample "
                                        "gradients each clipped to the clip norm")
        vector = summed.cpu().numpy()
    finally:
        dp_optimizer.zero_grad(set_to_none=True)  # grad_sample and summed_grad, both views
        dp_model.to_standard_module()
        model.train(was_training)
    moved = [n for n, p in trainable.items() if not torch.equal(p.detach(), before[n])]
    if moved or _frozen_fingerprint(model) != frozen_before:
        raise DPNotAppliedError(f"parameters moved while only gradients were to be summed: "
                                f"{moved[:3] or 'frozen weights'}")
    if not np.all(np.isfinite(vector)):
        raise DPNotAppliedError("the clipped gradient sum is not finite")
    return SiteContribution(names, shapes, vector, float(clip), loss_sum / len(chosen))


def site_contribution(model: torch.nn.Module, dataset: Dataset, sample_rate: float, clip: float,
                      generator: torch.Generator, *,
                      max_physical_batch_size: int = 0) -> SiteContribution:
    """One step's plain contribution: a Poisson sample of ``dataset`` at ``sample_rate`` drawn
    with ``generator`` (the site's secret randomness), then ``clipped_gradient_sum`` of it."""
    indices = poisson_sample(len(dataset), sample_rate, generator)
    return clipped_gradient_sum(model, dataset, indices, clip,
                                max_physical_batch_size=max_physical_batch_size)


def encode_site_contribution(contribution: SiteContribution, params: DistributedNoiseParams, *,
                             rotation_seed: int, rng: RandomSource) -> np.ndarray:
    """What the site masks and sends: its contribution rotated, scaled, rounded, plus its
    Skellam share (``encode_contribution``), as ``params.dtype`` residues modulo 2^bits.

    ``rotation_seed`` is the round's public seed; ``rng`` the site's secret one
    (``noise_rng``). The run's parameters must be for this clip and dimension."""
    if contribution.dimension != params.dimension:
        raise ValueError(f"the contribution has {contribution.dimension} coordinates, the run's "
                         f"noise parameters {params.dimension}")
    if not math.isclose(contribution.clip, params.clip, rel_tol=1e-12):
        raise ValueError(f"the contribution was clipped at {contribution.clip:g}, the run's noise "
                         f"parameters are for clip {params.clip:g}")
    return encode_contribution(contribution.vector, params, rotation_seed=rotation_seed, rng=rng)
