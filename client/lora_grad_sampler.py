"""Per-sample gradients of PEFT LoRA layers for Opacus: one Opacus hook per LoRA layer.

Opacus stays the DP engine (PrivacyEngine, Poisson loader, accountant, DPOptimizer's clipping
and noise). What changes is how the per-sample gradients of the LoRA factors are computed.
Stock Opacus never sees PEFT's LoRA layer: the layer holds no parameter of its own, so
``GradSampleModule`` descends into it and hooks ``lora_A.<adapter>`` and ``lora_B.<adapter>``
as two separate ``nn.Linear`` modules (two forward hooks, two full backward hooks, two
rescaled copies of the output gradient per layer). Here a grad sampler is registered for
``peft.tuners.lora.layer.Linear`` (also the GPT-2 ``Conv1D`` case, fan_in_fan_out only concerns
the frozen base weight) and ``LoraGradSampleModule`` hooks that layer once and owns both factors.

For ``y = W x + s * B A d(x)`` (``d`` the LoRA dropout, the identity in privatune) over the
tokens ``t`` of example ``n``, with ``g_t = dL/dy_t`` and ``u_t = A d(x_t)``::

    grad_B[n] = s * sum_t g_t u_t^T        grad_A[n] = sum_t v_t d(x_t)^T,   v_t = s * B^T g_t

``d(x)`` and ``u`` are the input and output of ``lora_A``, kept by a forward hook on it (so
the dropped input is the one used and nothing is recomputed). The hook fires on dL/dy, before
autograd reaches the factors, so it computes ``v = dL/du = s * g B`` itself and hands it to
lora_B's backward, which would otherwise compute the same product. Padded positions have
``g_t = 0`` under the masked loss, so they add nothing. Opacus' ``loss_reduction="mean"``
factor is applied to the small per-sample results instead of to the full output gradient.

While the hooks are on, autograd computes only input gradients through ``lora_A`` and
``lora_B`` (``_InputGradOnly``), not their batch-summed weight gradients: Opacus overwrites
``p.grad`` with the clipped, noised sum of the per-sample gradients, so the summed gradient
was pure cost (as much as the per-sample products themselves). ``p.grad`` of a LoRA factor is
therefore None after ``backward()`` until the DP optimizer's step sets it: a DP step that
skipped clipping and noise cannot fall back on the raw gradient.

A frozen ``lora_A`` (``requires_grad`` off, FFA-LoRA) gets no per-sample gradient: the sampler
returns ``grad_B`` alone and never forms ``v``, so Opacus clips and noises B only.

Supported: one active adapter of plain LoRA (any rank, alpha, rsLoRA scaling, dropout) on
``lora.Linear`` layers, batch-first inputs, frozen base weights. Anything else (several active
adapters, DoRA or another LoRA variant, a LoRA bias, merged or disabled adapters, LoRA on other
layer types, any other trainable parameter) raises ``UnsupportedLoraError`` when the model is
wrapped, never a silent fallback to another way of computing per-sample gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import partial

import torch
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule, register_grad_sampler
from opacus.grad_sample.grad_sample_module import (
    _get_batch_size,
    create_or_accumulate_grad_sample,
    promote_current_grad_sample,
)
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
)
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers import optimizer as opacus_optimizer
from opacus.utils.module_utils import requires_grad
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


class UnsupportedLoraError(ValueError):
    """The model's trainable parameters are not all plain LoRA factors this engine supports."""


class _LoraCapture:
    """What one forward pass of a LoRA layer leaves for its backward pass."""

    __slots__ = ("adapter", "u", "v_for_b", "backprops_scale")

    def __init__(self, adapter: str, u: torch.Tensor):
        self.adapter = adapter
        self.u = u                                # lora_A's output (detached), [N, ..., r]
        self.v_for_b: torch.Tensor | None = None  # dL/du from the sampler, for lora_B's backward
        self.backprops_scale = 1.0                # Opacus' loss-reduction factor (at backward)


_CAPTURE_SLOT = "_privatune_lora_capture"


class _InputGradOnly(torch.autograd.Function):
    """Identity on a LoRA factor's already computed output ``out = inp @ weight.T`` whose
    backward gives only the input gradient ``grad_out @ weight``.

    The factor's weight stays an input of the graph (so the layer's output needs a gradient and
    Opacus' hook fires), but autograd computes no batch-summed weight gradient: under DP-SGD
    Opacus replaces ``p.grad`` with the clipped, noised sum of the per-sample gradients anyway,
    so that gradient would be computed only to be thrown away.
    """

    @staticmethod
    def forward(ctx, inp, weight, out, capture, is_a):  # inp: only to be in the graph
        ctx.save_for_backward(weight)
        ctx.capture, ctx.is_a = capture, is_a
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        capture: _LoraCapture = ctx.capture
        grad_in = None
        if ctx.is_a:  # grad_out = dL/du
            if ctx.needs_input_grad[0]:
                grad_in = grad_out @ weight
        elif ctx.needs_input_grad[0]:  # lora_B: dL/du = grad_out @ B, unless already computed
            known, capture.v_for_b = capture.v_for_b, None
            grad_in = known.view_as(capture.u) if known is not None else grad_out @ weight
        return grad_in, None, None, None, None


@register_grad_sampler(LoraLinear)
def compute_lora_linear_grad_sample(layer: LoraLinear, activations: list,
                                    backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of the active adapter's lora_A and lora_B weights of ``layer``
    (lora_B's alone when lora_A is frozen).

    ``activations`` is ``[capture, lora_A input]`` as stored by ``LoraGradSampleModule``;
    ``backprops`` is dL/dy for the layer's output, not rescaled (the capture holds the factor).
    """
    if len(activations) != 2 or not isinstance(activations[0], _LoraCapture):
        raise UnsupportedLoraError(
            "the LoRA grad sampler needs the activations LoraGradSampleModule records; "
            "wrap the model with LoraPrivacyEngine / LoraGradSampleModule")
    capture, a_in = activations
    weight_a = layer.lora_A[capture.adapter].weight  # [r, in]
    weight_b = layer.lora_B[capture.adapter].weight  # [out, r]
    dtype, rank = weight_a.dtype, weight_a.shape[0]
    n = backprops.shape[0]
    scaling = float(layer.scaling[capture.adapter])
    g = backprops.reshape(n, -1, backprops.shape[-1]).to(dtype)  # [N, T, out]
    u = capture.u.reshape(n, -1, rank).to(dtype)                  # [N, T, r]
    # computed as (u^T g)^T: with the rank as the short side of the product's output, MKL's
    # bmm was 3.5x faster than g^T u (one core, the demo model's layer shapes)
    grad_b = torch.bmm(u.transpose(1, 2), g).transpose(1, 2)     # [N, out, r]
    grad_b.mul_(scaling * capture.backprops_scale)
    if not weight_a.requires_grad:
        # lora_A frozen (ffa): only B is trained, so only B is clipped and noised. Nothing needs
        # v: when u needs a gradient (the layer's input does), lora_B's backward computes it.
        return {weight_b: grad_b}
    x = a_in.reshape(n, -1, a_in.shape[-1]).to(dtype)             # [N, T, in]
    # v = dL/du = s * g B, handed to lora_B's backward that follows (it needs the same product)
    v = torch.matmul(g, weight_b.detach()).mul_(scaling)
    capture.v_for_b = v
    grad_a = torch.bmm(v.transpose(1, 2), x)                      # [N, r, in]
    grad_a.mul_(capture.backprops_scale)
    return {weight_a: grad_a, weight_b: grad_b}


def lora_sampler_registered() -> bool:
    return GradSampleModule.GRAD_SAMPLERS.get(LoraLinear) is compute_lora_linear_grad_sample


@contextlib.contextmanager
def stock_opacus() -> Iterator[None]:
    """Within this block the LoRA grad sampler is unregistered: Opacus (and LoraPrivacyEngine)
    hook lora_A / lora_B as plain nn.Linear modules, as stock Opacus does (for references)."""
    registries = (GradSampleModule.GRAD_SAMPLERS, GradSampleHooksFastGradientClipping.GRAD_SAMPLERS)
    removed = [registry.pop(LoraLinear, None) for registry in registries]
    try:
        yield
    finally:
        for registry, sampler in zip(registries, removed):
            if sampler is not None:
                registry[LoraLinear] = sampler


def _adapter_of(name: str, layer: nn.Module) -> str:
    """The single active plain-LoRA adapter of a LoRA layer that has trainable parameters."""
    where = f"LoRA layer {name or type(layer).__name__}"
    if type(layer) is not LoraLinear:
        raise UnsupportedLoraError(
            f"{where} is a {type(layer).__module__}.{type(layer).__qualname__}; only "
            "peft.tuners.lora.layer.Linear (nn.Linear and GPT-2 Conv1D bases) is supported")
    adapters = list(layer.active_adapters)
    if len(adapters) != 1:
        raise UnsupportedLoraError(f"{where} has {len(adapters)} active adapters {adapters}; "
                                   "exactly one is supported")
    adapter = adapters[0]
    if layer.merged or layer.disable_adapters:
        raise UnsupportedLoraError(f"{where}: adapter {adapter!r} is merged or disabled, so its "
                                   "factors are not in the forward pass")
    if adapter not in layer.lora_A or adapter not in layer.lora_B:
        raise UnsupportedLoraError(f"{where} has no lora_A/lora_B for active adapter {adapter!r}")
    if adapter in layer.lora_variant or layer.use_dora.get(adapter, False):
        variant = type(layer.lora_variant.get(adapter)).__name__
        raise UnsupportedLoraError(f"{where}: adapter {adapter!r} is a LoRA variant ({variant}, "
                                   "e.g. DoRA); only plain LoRA is supported")
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_a.bias is not None:
        raise UnsupportedLoraError(f"{where}: lora_A/lora_B of {adapter!r} are not bias-free "
                                   "nn.Linear modules")
    if lora_b.bias is not None:
        raise UnsupportedLoraError(f"{where}: adapter {adapter!r} has a LoRA bias (lora_bias=True)")
    owned = {id(lora_a.weight), id(lora_b.weight)}
    stray = [n for n, p in layer.named_parameters() if p.requires_grad and id(p) not in owned]
    if stray:
        raise UnsupportedLoraError(f"{where}: parameters {stray[:3]} are trainable; only the active "
                                   f"adapter's lora_A/lora_B weights may be (base weight frozen)")
    return adapter


def check_lora_model(model: nn.Module) -> dict[str, str]:
    """Every trainable parameter of ``model`` is a factor of a supported LoRA layer.

    Returns {layer name: active adapter} for the LoRA layers that have trainable factors;
    raises UnsupportedLoraError naming the first thing that is not supported.
    """
    layers: dict[str, str] = {}
    owned: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and requires_grad(module, recurse=True):
            layers[name] = _adapter_of(name, module)
            owned.update(id(p) for p in module.parameters() if p.requires_grad)
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
    if stray:
        raise UnsupportedLoraError(f"trainable parameters {stray[:3]} are not LoRA factors of a "
                                   "supported LoRA layer; the LoRA DP engine trains LoRA only")
    if not layers:
        raise UnsupportedLoraError("the model has no trainable LoRA layer")
    return layers


class FlatLayout:
    """Where each trainable LoRA tensor lies in one flat row holding all of them, in the DP
    optimizer's parameter order: the per-sample gradients of a batch are one [N, total] buffer,
    the clipped sum and the noised gradient one [total] vector, each tensor a view of its part."""

    def __init__(self, params: Sequence[nn.Parameter]):
        self.params = list(params)
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.numels = [p.numel() for p in self.params]
        self.shapes = [tuple(p.shape) for p in self.params]
        self.total = sum(self.numels)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's part of ``flat`` [..., total], shaped [..., *parameter shape]."""
        lead = tuple(flat.shape[:-1])
        return [part.view(*lead, *shape)
                for part, shape in zip(flat.split(self.numels, dim=-1), self.shapes)]


class LoraGradSampleModule(GradSampleModule):
    """Opacus' hooks GradSampleModule, with PEFT LoRA layers hooked as one unit.

    Each LoRA layer gets Opacus' forward hook (``capture_activations_hook``), which also hooks
    the gradient of the layer's output; that one backward hook runs Opacus'
    ``capture_backprops_hook`` with the grad sampler registered above. Opacus would use a full
    backward hook, which wraps every hooked layer's inputs and outputs in extra autograd nodes
    and Python calls (about 2.4 ms of a 73 ms DP step of the demo model, in bfloat16); a hook on
    the output tensor receives the same dL/dy without them. Its ``lora_A`` and ``lora_B`` get no
    Opacus hook, only plain forward hooks that keep lora_A's input and output for the backward
    pass and route both factors' backward through ``_InputGradOnly``. Everything else
    (clipping, noise, accounting) is Opacus' own. Only LoRA layers are hooked: the constructor
    refuses a model with any other trainable parameter (``check_lora_model``).

    Once ``flat_layout`` is set (LoraPrivacyEngine.make_private does), each backward pass
    writes the per-sample gradients into one buffer [N, total] and ``p.grad_sample`` is the
    parameter's view of it, for LoraDPOptimizer to clip and noise in a few kernels; a
    parameter whose per-sample gradient does not fit that (accumulated over several forward
    passes, another batch size) takes Opacus' own path, and so does the optimizer then.
    """

    flat_layout: FlatLayout | None = None
    # what the loss was multiplied by before backward (float16 base weights, see the trainer);
    # divided back out of the per-sample gradients
    loss_scale: float = 1.0

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean",
                 strict: bool = True, force_functorch: bool = False):
        if not lora_sampler_registered():
            raise UnsupportedLoraError("the LoRA grad sampler is not registered with Opacus "
                                       "(inside stock_opacus()?)")
        if not batch_first or force_functorch:
            raise UnsupportedLoraError("LoraGradSampleModule needs batch_first=True and hooks "
                                       "(not functorch)")
        check_lora_model(m)  # before any hook is added
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction,
                         strict=strict, force_functorch=False)

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True,
                  force_functorch: bool = False) -> None:
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        hooks: list = []
        self._module.autograd_grad_sample_hooks = self.autograd_grad_sample_hooks = hooks
        # id(layer) -> its trainable factors, so the per-step hooks need no module traversal
        self._lora_factors: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
        for name, adapter in check_lora_model(self._module).items():
            layer = self._module.get_submodule(name)
            lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
            self._lora_factors[id(layer)] = (lora_a.weight, lora_b.weight)
            hooks += [layer.register_forward_hook(self.capture_activations_hook),
                      lora_a.register_forward_hook(partial(self._lora_a_forward, layer, adapter)),
                      lora_b.register_forward_hook(partial(self._lora_b_forward, layer))]
        self.enable_hooks()

    def _recording(self, layer: nn.Module) -> bool:
        return self.hooks_enabled and layer.training and torch.is_grad_enabled()

    def _lora_a_forward(self, layer: LoraLinear, adapter: str, lora_a: nn.Module,
                        inputs: tuple, output: torch.Tensor):
        """Keep lora_A's input (the dropped-out x) and output u for this layer's backward."""
        if not self._recording(layer):
            return None
        if _CAPTURE_SLOT in layer.__dict__:
            raise UnsupportedLoraError("lora_A ran more than once in one forward pass of its LoRA "
                                       "layer (mixed-adapter batches are not supported)")
        capture = _LoraCapture(adapter, output.detach())
        layer.__dict__[_CAPTURE_SLOT] = (capture, inputs[0].detach())
        return _InputGradOnly.apply(inputs[0], lora_a.weight, capture.u, capture, True)

    def _lora_b_forward(self, layer: LoraLinear, lora_b: nn.Module, inputs: tuple,
                        output: torch.Tensor):
        captured = layer.__dict__.get(_CAPTURE_SLOT)
        if captured is None or not self._recording(layer):
            return None
        return _InputGradOnly.apply(inputs[0], lora_b.weight, output.detach(), captured[0], False)

    def forward(self, *args, **kwargs):
        self._flat: torch.Tensor | None = None  # a new forward pass: its backward fills a new one
        self._written: list[torch.Tensor | None] = []
        return super().forward(*args, **kwargs)

    def per_sample_buffer(self) -> torch.Tensor | None:
        """The last backward pass's per-sample gradients [N, total] in ``flat_layout`` order,
        when every parameter's ``grad_sample`` is still its view of them; else None."""
        layout, flat = self.flat_layout, getattr(self, "_flat", None)
        if layout is None or flat is None:
            return None
        if any(p.grad_sample is not view for p, view in zip(layout.params, self._written)):
            return None
        return flat

    def _place(self, param: nn.Parameter, grad_sample: torch.Tensor) -> bool:
        """Write a parameter's per-sample gradient into this pass's buffer, when it is the
        parameter's only one (else Opacus accumulates it)."""
        layout = self.flat_layout
        index = layout.index.get(id(param)) if layout is not None else None
        if (index is None or param._forward_counter != 1 or param.grad_sample is not None
                or hasattr(param, "_current_grad_sample")):
            return False
        batch = grad_sample.shape[0]
        if getattr(self, "_flat", None) is None:
            self._flat = torch.empty((batch, layout.total), dtype=grad_sample.dtype,
                                     device=grad_sample.device)
            self._views = layout.views(self._flat)
            self._written = [None] * len(layout.params)
        elif self._flat.shape[0] != batch or self._flat.dtype != grad_sample.dtype:
            return False
        view = self._views[index]
        view.copy_(grad_sample)
        param.grad_sample = self._written[index] = view
        return True

    def _output_gradient(self, layer: LoraLinear, grad: torch.Tensor) -> None:
        """The backward hook: dL/dy of a LoRA layer's output y, once autograd has summed it."""
        self.capture_backprops_hook(layer, None, (grad,), self.loss_reduction, self.batch_first)

    def capture_backprops_hook(self, module: nn.Module, _forward_input, forward_output,
                               loss_reduction: str, batch_first: bool):
        """Opacus' hook, for a LoRA layer without the generic parts it does not need: the
        layer's trainable factors are known (no module traversal per call) and a per-sample
        gradient goes straight into the buffer instead of a zero-filled copy."""
        if not self.hooks_enabled:
            return
        activations, backprops = self.rearrange_grad_samples(
            module=module, backprops=forward_output[0].detach(), loss_reduction=loss_reduction,
            batch_first=batch_first)
        grad_samples = self.GRAD_SAMPLERS[type(module)](module, activations, backprops)
        for param, grad_sample in grad_samples.items():
            if not self._place(param, grad_sample):
                create_or_accumulate_grad_sample(param=param, grad_sample=grad_sample,
                                                 max_batch_len=module.max_batch_len)
            param._forward_counter -= 1
            if param._forward_counter == 0 and hasattr(param, "_current_grad_sample"):
                promote_current_grad_sample(param)
            if (not self.grad_accumulation_allowed and isinstance(param.grad_sample, list)
                    and len(param.grad_sample) > 1):
                raise ValueError("Poisson sampling is not compatible with grad accumulation. "
                                 "You need to call optimizer.step() after every forward/backward "
                                 "pass or consider using BatchMemoryManager")
        if not module.activations and hasattr(module, "max_batch_len"):
            del module.max_batch_len

    def capture_activations_hook(self, module: nn.Module, forward_input, forward_output):
        factors = self._lora_factors[id(module)]
        captured = module.__dict__.pop(_CAPTURE_SLOT, None)  # left by _lora_a_forward
        trainable = [p for p in factors if p.requires_grad]
        if not self._recording(module) or not trainable:
            return
        if captured is None:
            raise UnsupportedLoraError(
                f"{type(module).__name__}: the LoRA path did not run in this forward pass "
                "(adapter disabled, merged or switched after wrapping); no per-sample gradients")
        if not hasattr(module, "activations"):
            module.activations = []
        module.activations.append(list(captured))  # [_LoraCapture, lora_A input]
        for p in trainable:
            p._forward_counter += 1
        if forward_output.requires_grad:
            forward_output.register_hook(partial(self._output_gradient, module))

    def rearrange_grad_samples(self, *, module: nn.Module, backprops: torch.Tensor,
                               loss_reduction: str, batch_first: bool):
        if not hasattr(module, "activations"):
            raise ValueError(f"No activations detected for {type(module)}, run forward after add_hooks")
        if not hasattr(module, "max_batch_len"):
            module.max_batch_len = _get_batch_size(module=module, batch_dim=0)
        activations = module.activations.pop()
        if loss_reduction == "mean":
            activations[0].backprops_scale = float(module.max_batch_len) / self.loss_scale
        elif loss_reduction == "sum":
            activations[0].backprops_scale = 1.0 / self.loss_scale
        else:
            raise ValueError(f"loss_reduction = {loss_reduction}. Only 'sum' and 'mean' losses "
                             "are supported")
        return activations, backprops


class LoraDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer, clipping and noising all LoRA tensors at once.

    Opacus loops over the parameters: a norm, a clipping einsum, a noise draw and a division
    per tensor (112 tensors in the demo model, 448 in an 8 B model with LoRA on all linear
    layers), and stock ``scale_grad`` even evaluates ``accumulated_iterations`` (itself a loop
    over the parameters) once per parameter. When the grad sample module left the batch's
    per-sample gradients in one buffer (``per_sample_source``), the same arithmetic runs on
    it as a whole: per-sample norms over all tensors, the clip factors
    ``min(1, C / (norm + 1e-6))``, their weighted sum, one Gaussian draw of std ``sigma * C``
    for all coordinates and one division; ``p.summed_grad`` and ``p.grad`` are views of the
    flat results. Otherwise (an empty Poisson batch, say) it is Opacus' own loop.
    """

    per_sample_source: LoraGradSampleModule | None = None
    _summed_views: list[torch.Tensor] | None = None
    _grad_views: list[torch.Tensor] | None = None

    def _holds(self, attribute: str, views: list[torch.Tensor] | None) -> bool:
        return views is not None and all(getattr(p, attribute) is view
                                         for p, view in zip(self.params, views))

    def clip_and_accumulate(self):
        source = self.per_sample_source
        flat = source.per_sample_buffer() if source is not None else None
        if flat is None:
            return super().clip_and_accumulate()
        opacus_optimizer._check_processed_flag(flat)
        per_sample_norms = flat.norm(2, dim=1)
        clip_factor = (self.max_grad_norm / (per_sample_norms + 1e-6)).clamp(max=1.0)
        summed = clip_factor @ flat
        if self._holds("summed_grad", self._summed_views):  # a micro-batch after another
            summed += self._summed_flat
        elif any(p.summed_grad is not None for p in self.params):
            summed += torch.cat([p.summed_grad.reshape(-1) for p in self.params])
        self._summed_flat, self._summed_views = summed, source.flat_layout.views(summed)
        for p, view in zip(self.params, self._summed_views):
            p.summed_grad = view
        opacus_optimizer._mark_as_processed(flat)

    def add_noise(self):
        if not self._holds("summed_grad", self._summed_views):
            return super().add_noise()
        opacus_optimizer._check_processed_flag(self._summed_flat)
        noise = opacus_optimizer._generate_noise(
            std=self.noise_multiplier * self.max_grad_norm, reference=self._summed_flat,
            generator=self.generator, secure_mode=self.secure_mode)
        self._grad_flat = self._summed_flat + noise
        self._grad_views = self.per_sample_source.flat_layout.views(self._grad_flat)
        for p, view in zip(self.params, self._grad_views):
            p.grad = view
        opacus_optimizer._mark_as_processed(self._summed_flat)

    def scale_grad(self):
        if self.loss_reduction != "mean":
            return
        divisor = self.expected_batch_size * self.accumulated_iterations
        if self._holds("grad", self._grad_views):
            self._grad_flat /= divisor
            return
        for p in self.params:
            p.grad /= divisor


class LoraPrivacyEngine(PrivacyEngine):
    """Opacus' PrivacyEngine with LoRA per-sample gradients one layer at a time.

    ``make_private`` wraps the model in LoraGradSampleModule and the optimizer in
    LoraDPOptimizer, and gives both one flat layout of the LoRA tensors (in the optimizer's
    order). With the sampler unregistered (``stock_opacus()``), another grad_sample_mode or
    clipping, or a model already wrapped, it is stock Opacus.
    """

    def make_private(self, **kwargs):
        made = super().make_private(**kwargs)
        module, optimizer = made[0], made[1]
        if isinstance(module, LoraGradSampleModule) and isinstance(optimizer, LoraDPOptimizer):
            module.flat_layout = FlatLayout(optimizer.params)
            optimizer.per_sample_source = module
        return made

    def _prepare_model(self, module: nn.Module, *, batch_first: bool = True,
                       max_grad_norm=1.0, loss_reduction: str = "mean",
                       grad_sample_mode: str = "hooks", wrap_model: bool = True):
        if (grad_sample_mode != "hooks" or not wrap_model or not lora_sampler_registered()
                or isinstance(module, AbstractGradSampleModule)):
            return super()._prepare_model(module, batch_first=batch_first,
                                          max_grad_norm=max_grad_norm,
                                          loss_reduction=loss_reduction,
                                          grad_sample_mode=grad_sample_mode, wrap_model=wrap_model)
        self.validate(module=module, optimizer=None, data_loader=None)
        return LoraGradSampleModule(module, batch_first=batch_first, loss_reduction=loss_reduction)

    def _prepare_optimizer(self, **kwargs) -> DPOptimizer:
        optimizer = super()._prepare_optimizer(**kwargs)
        if (type(optimizer) is DPOptimizer and lora_sampler_registered()
                and kwargs.get("grad_sample_mode", "hooks") == "hooks"):
            # Same object and state as Opacus built it; only scale_grad differs.
            optimizer.__class__ = LoraDPOptimizer
        return optimizer
