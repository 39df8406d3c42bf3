"""Per-sample gradients of PEFT LoRA layers for Opacus, computed by autograd itself.

Opacus stays the DP engine (PrivacyEngine, Poisson loader, accountant, DPOptimizer's clipping
and noise). What changes is how the per-sample gradients of the LoRA factors are computed.
Stock Opacus hooks ``lora_A.<adapter>`` and ``lora_B.<adapter>`` as two separate
``nn.Linear`` modules: per factor a forward hook, a full backward hook and Python that forms
the per-sample product from the saved input and a rescaled copy of the output gradient.

Here each trainable factor ``W`` (``[out, in]``) multiplies, while the engine is attached, by a
per-example copy of itself: ``W_n = W.expand(N, out, in)``, a stride-0 view (no memory) made a
leaf of the graph, and ``y_n = x_n W_n^T`` is one batched matrix product. Autograd's own
backward of that product gives, for every example n, ``dL/dW_n = sum_t g_t x_t^T``: exactly
the per-sample gradient of W (for ``y = W x + s * B A d(x)``: ``grad_B[n] = s * sum_t g_t
u_t^T`` and ``grad_A[n] = s * sum_t (B^T g_t) d(x_t)^T``, ``u_t = A d(x_t)``). The scale s,
the LoRA dropout d, the float32 cast of a half-precision input and padding (``g_t = 0`` under
the masked loss) all come from the graph, with nothing recomputed. The batch-summed gradient
of W is never formed (W itself is not in the graph): Opacus overwrites ``p.grad`` with the
clipped, noised sum of the per-sample gradients anyway, so ``p.grad`` of a LoRA factor is
None until the DP optimizer's step sets it.

Why not a grad sampler in Opacus' registry (one Python hook per LoRA layer, as first built):
on a GPU a small-batch step is bound by the host, and that hook's Python and extra kernels
per layer made a DP step of a 1.1 B model (154 LoRA layers, 8x512, H200) 1.35-1.57x the
non-private step's time; this engine's step takes about as long as the non-private one
(README). No Python runs per layer in the backward pass: the gradient of each per-example
copy starts as the factor's zero view of one buffer [N, total] for all LoRA tensors, and
autograd adds the per-sample gradient into it in place. One hook on the model's output
queues ``_gather`` for the end of the backward pass, which applies Opacus'
``loss_reduction="mean"`` factor to the whole buffer in one kernel and sets every
``p.grad_sample`` to its view.

A frozen ``lora_A`` (``requires_grad`` off, FFA-LoRA) keeps its plain forward and gets no
per-sample gradient, so Opacus clips and noises B only.

Supported: one active adapter of plain LoRA (any rank, alpha, rsLoRA scaling, dropout) on
``lora.Linear`` layers (``nn.Linear`` and GPT-2 ``Conv1D`` bases: ``fan_in_fan_out`` only
concerns the frozen base weight), batch-first inputs, frozen base weights, one backward pass
per forward pass. Anything else (several active adapters, DoRA or another LoRA variant, a
LoRA bias, merged or disabled adapters, LoRA on other layer types, any other trainable
parameter) raises ``UnsupportedLoraError`` when the model is wrapped, never a silent fallback
to another way of computing per-sample gradients.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.module_utils import requires_grad
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from privatune.common import opacus_internals


class UnsupportedLoraError(ValueError):
    """The model's trainable parameters are not all plain LoRA factors this engine supports."""


_engine_enabled = True  # off inside stock_opacus()

# Autograd adds each per-example copy's gradient into the copy's view of the flat buffer, whose
# rows hold every LoRA tensor: a layout autograd would not pick for a gradient, but the one this
# engine means, so autograd's warning that the layouts differ is silenced here.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")


def lora_engine_enabled() -> bool:
    return _engine_enabled


@contextlib.contextmanager
def stock_opacus() -> Iterator[None]:
    """Within this block LoraPrivacyEngine is stock Opacus: it hooks lora_A / lora_B as plain
    nn.Linear modules (for references)."""
    global _engine_enabled
    previous, _engine_enabled = _engine_enabled, False
    try:
        yield
    finally:
        _engine_enabled = previous


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


class _PerExampleFactor:
    """Stands in for a trainable LoRA factor's ``forward`` while the engine is attached.

    Recording (hooks on, training, autograd on), it multiplies by a per-example copy of the
    weight, a new leaf of the graph whose gradient is the per-sample gradient; otherwise
    (evaluation, ``no_grad``, the first pass of reentrant checkpointing) it is ``nn.Linear``'s
    forward. ``remove()`` gives the factor its own forward back.
    """

    def __init__(self, owner: LoraGradSampleModule, factor: nn.Linear):
        self.owner, self.factor, self.weight = owner, factor, factor.weight
        self.detached = factor.weight.detach()  # shares the weight's storage: always current
        factor.forward = self  # an instance attribute: nn.Module.__call__ finds it first

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        owner = self.owner
        if not (owner.hooks_enabled and self.factor.training and torch.is_grad_enabled()):
            return F.linear(x, self.weight)
        batch = x.shape[0]
        per_example = self.detached.expand(batch, *self.detached.shape).requires_grad_()
        owner._record(self.weight, per_example)
        if x.dim() == 3:  # [N, T, in], the usual case
            return torch.bmm(x, per_example.mT)
        rows = x.reshape(batch, -1, x.shape[-1])
        return torch.bmm(rows, per_example.mT).view(*x.shape[:-1], self.weight.shape[0])

    def remove(self) -> None:
        self.factor.__dict__.pop("forward", None)


def _tensors(output) -> list[torch.Tensor]:
    """The tensors a model returned: itself, a tuple's or a ModelOutput's (a Mapping) items."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if not isinstance(output, (tuple, list)):
        return []
    return [item for item in output if isinstance(item, torch.Tensor)]


class LoraGradSampleModule(GradSampleModule):
    """Opacus' GradSampleModule whose LoRA per-sample gradients come from autograd.

    Every trainable LoRA factor's forward becomes ``_PerExampleFactor``; Opacus adds no hook
    to any module. The first output gradient of a recording forward pass queues ``_gather`` for
    the end of that backward pass, which sets ``p.grad_sample`` of every factor it reached.
    Only LoRA layers are handled: the constructor refuses a model with any other trainable
    parameter (``check_lora_model``).

    Once ``flat_layout`` is set (LoraPrivacyEngine.make_private does), the per-sample
    gradients of a backward pass are one buffer [N, total] and ``p.grad_sample`` is the
    parameter's view of it, for LoraDPOptimizer to clip and noise in a few kernels. When that
    does not fit (gradients accumulated over several passes before a step, a factor that did
    not run, no layout), each parameter gets its own tensor and Opacus' own path runs.
    """

    flat_layout: FlatLayout | None = None
    # what the loss was multiplied by before backward (float16 base weights, see the trainer);
    # divided back out of the per-sample gradients
    loss_scale: float = 1.0

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean",
                 strict: bool = True, force_functorch: bool = False):
        if not lora_engine_enabled():
            raise UnsupportedLoraError("the LoRA engine is switched off (inside stock_opacus())")
        if not batch_first or force_functorch:
            raise UnsupportedLoraError("LoraGradSampleModule needs batch_first=True and hooks "
                                       "(not functorch)")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction = {loss_reduction}. Only 'sum' and 'mean' losses "
                             "are supported")
        check_lora_model(m)  # before any forward is replaced
        self._per_example: list[tuple[nn.Parameter, torch.Tensor]] | None = None
        self._gather_queued = False
        self._flat: torch.Tensor | None = None  # this pass's per-sample gradients [N, total]
        self._written: list[torch.Tensor] = []  # each parameter's view of them
        self._present: list[bool] = []  # whether the parameter ran in this pass
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction,
                         strict=strict, force_functorch=False)

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True,
                  force_functorch: bool = False) -> None:
        model = opacus_internals.wrapped_module(self)
        if hasattr(model, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        replaced: list[_PerExampleFactor] = []
        # Opacus' remove_hooks() calls remove() on each of these
        model.autograd_grad_sample_hooks = self.autograd_grad_sample_hooks = replaced
        for name, adapter in check_lora_model(model).items():
            layer = model.get_submodule(name)
            for factor in (layer.lora_A[adapter], layer.lora_B[adapter]):
                if factor.weight.requires_grad:
                    replaced.append(_PerExampleFactor(self, factor))
        self.enable_hooks()

    def forward(self, *args, **kwargs):
        # a new forward pass: its backward fills a new buffer (the last one, views included,
        # is let go now, before the forward pass's peak)
        self._per_example, self._gather_queued = [], False
        self._flat, self._written, self._present = None, [], []
        output = super().forward(*args, **kwargs)
        recording = opacus_internals.wrapped_module(self).training and torch.is_grad_enabled()
        if self.hooks_enabled and recording:
            for tensor in _tensors(output):
                if tensor.requires_grad:
                    tensor.register_hook(self._backward_started)
        return output

    def _record(self, weight: nn.Parameter, per_example: torch.Tensor) -> None:
        """Keep a factor's per-example copy for ``_gather`` (in the backward pass too, where
        reentrant checkpointing recomputes the blocks)."""
        if self._per_example is None:
            raise UnsupportedLoraError("a LoRA factor ran outside a forward pass of the wrapped "
                                       "model, or after its backward pass")
        self._per_example.append((weight, per_example))
        if self._gather_queued:
            self._into_buffer(weight, per_example)

    def _backward_started(self, _grad: torch.Tensor) -> None:
        if self._per_example is None:  # gathered already
            raise UnsupportedLoraError("a second backward pass through one forward pass: the "
                                       "LoRA engine takes one backward pass per forward pass")
        if self._gather_queued:  # another output of the same pass
            return
        self._gather_queued = True
        if self._per_example:
            # the copy recorded last is the first to get its gradient: start the buffer then,
            # past the peak of the backward pass's start (the logits' gradient)
            self._per_example[-1][1].register_hook(self._first_gradient)
        # runs once the whole backward pass is done (with reentrant checkpointing, after the
        # recomputed blocks' inner backward passes too)
        torch.autograd.Variable._execution_engine.queue_callback(self._gather)

    def _first_gradient(self, _grad: torch.Tensor) -> None:
        for weight, per_example in self._per_example:
            self._into_buffer(weight, per_example)

    def _into_buffer(self, weight: nn.Parameter, per_example: torch.Tensor) -> None:
        """Start the copy's gradient as the factor's zero view of this pass's buffer, so that
        autograd adds the per-sample gradient there in place (no second copy of them)."""
        layout = self.flat_layout
        index = layout.index.get(id(weight)) if layout is not None else None
        if index is None:
            return
        if self._flat is None:
            self._flat = torch.zeros((per_example.shape[0], layout.total),
                                     dtype=per_example.dtype, device=per_example.device)
            self._written = layout.views(self._flat)
            self._present = [False] * len(layout.params)
        view = self._written[index]
        if per_example.grad is None and not self._present[index] and view.shape == per_example.shape:
            per_example.grad = view
            self._present[index] = True

    def _gather(self) -> None:
        """The end of a backward pass: each per-example copy's gradient is its factor's
        per-sample gradient of the (scaled, reduced) loss; set ``p.grad_sample`` from them.

        A factor in the buffer whose output never reached the loss keeps its zero row: its
        per-sample gradient is zero. A factor that did not run in the pass gets none."""
        recorded, self._per_example = self._per_example or [], None
        flat, layout = self._flat, self.flat_layout
        others: dict[int, tuple[nn.Parameter, list[torch.Tensor]]] = {}
        for weight, per_example in recorded:
            grad = per_example.grad
            index = layout.index.get(id(weight)) if flat is not None else None
            if index is not None and grad is self._written[index]:
                continue
            if index is not None and per_example.shape == self._written[index].shape:
                # a factor used twice in the pass, or one that got its gradient first
                self._present[index] = True
                if grad is not None:
                    self._written[index].add_(grad)
                continue
            if grad is not None:
                others.setdefault(id(weight), (weight, []))[1].append(grad)
        batches = [grad.shape[0] for _, grads in others.values() for grad in grads]
        batch = max(batches + ([flat.shape[0]] if flat is not None else []), default=0)
        # Opacus' per-sample gradients are those of the summed loss
        scale = (batch if self.loss_reduction == "mean" else 1.0) / self.loss_scale
        if (flat is not None and not others and all(self._present)
                and all(p.grad_sample is None for p in layout.params)):
            flat.mul_(scale)
            for param, view in zip(layout.params, self._written):
                param.grad_sample = view
            return
        if flat is not None:  # a buffer, but not every parameter in it alone: Opacus' path
            for param, view, present in zip(layout.params, self._written, self._present):
                if present:
                    others.setdefault(id(param), (param, []))[1].append(view)
            self._flat = None
        for param, grads in others.values():
            per_sample = torch.zeros((batch, *param.shape), dtype=grads[0].dtype,
                                     device=grads[0].device)
            for grad in grads:  # a factor used more than once in the pass: its uses add up
                per_sample[:grad.shape[0]] += grad
            per_sample.mul_(scale)
            if param.grad_sample is None:
                param.grad_sample = per_sample
            elif not self.grad_accumulation_allowed:
                raise ValueError("Poisson sampling is not compatible with grad accumulation. "
                                 "You need to call optimizer.step() after every forward/backward "
                                 "pass or consider using BatchMemoryManager")
            elif isinstance(param.grad_sample, list):
                param.grad_sample.append(per_sample)
            else:
                param.grad_sample = [param.grad_sample, per_sample]

    def per_sample_buffer(self) -> torch.Tensor | None:
        """The last backward pass's per-sample gradients [N, total] in ``flat_layout`` order,
        when every parameter's ``grad_sample`` is still its view of them; else None."""
        layout, flat = self.flat_layout, self._flat
        if layout is None or flat is None:
            return None
        if any(p.grad_sample is not view for p, view in zip(layout.params, self._written)):
            return None
        return flat


def clip_factors(flat: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Opacus' per-sample clip factors ``min(1, C / (norm + 1e-6))`` for the rows of ``flat``
    (one sample's gradients each), in ``flat``'s dtype.

    Each norm is summed in float64: a float32 sum of 460,800 squares (SmolLM2's LoRA) is off
    by up to about 4e-5 of itself, and a clipped sample's norm, the sensitivity the accountant
    assumes, by as much.
    """
    norms = torch.linalg.vector_norm(flat, ord=2, dim=1, dtype=torch.float64)
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0).to(flat.dtype)


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
    # the clipped sum and the noised gradient: one [total] buffer each, kept from step to step
    # with their per-parameter views, so that a step makes no new views
    _summed: _FlatBuffer | None = None
    _grads: _FlatBuffer | None = None

    def _holds(self, attribute: str, buffer: _FlatBuffer | None) -> bool:
        return buffer is not None and all(getattr(p, attribute) is view
                                          for p, view in zip(buffer.params, buffer.views))

    def clip_and_accumulate(self):
        source = self.per_sample_source
        flat = source.per_sample_buffer() if source is not None else None
        if flat is None:
            return super().clip_and_accumulate()
        opacus_internals.check_unprocessed(flat)
        clip_factor = clip_factors(flat, self.max_grad_norm)
        if self._holds("summed_grad", self._summed):  # a micro-batch after another
            self._summed.values.addmv_(flat.T, clip_factor)
        else:
            earlier = any(p.summed_grad is not None for p in self.params)
            self._summed = _FlatBuffer.reuse(self._summed, source.flat_layout, flat)
            torch.mv(flat.T, clip_factor, out=self._summed.values)
            if earlier:  # micro-batches that took Opacus' own path (an empty one, say)
                self._summed.values += torch.cat([p.summed_grad.reshape(-1) for p in self.params])
            self._summed.attach("summed_grad")
        opacus_internals.mark_processed(flat)

    def add_noise(self):
        if not self._holds("summed_grad", self._summed):
            return super().add_noise()
        summed = self._summed.values
        opacus_internals.check_unprocessed(summed)
        noise = opacus_internals.gaussian_noise(
            std=self.noise_multiplier * self.max_grad_norm, reference=summed,
            generator=self.generator, secure_mode=self.secure_mode)
        self._grads = _FlatBuffer.reuse(self._grads, self.per_sample_source.flat_layout, summed)
        torch.add(summed, noise, out=self._grads.values)
        self._grads.attach("grad")
        opacus_internals.mark_processed(summed)

    def scale_grad(self):
        if self.loss_reduction != "mean":
            return
        divisor = self.expected_batch_size * self.accumulated_iterations
        if self._holds("grad", self._grads):
            self._grads.values /= divisor
            return
        for p in self.params:
            p.grad /= divisor


class _FlatBuffer:
    """A [total] vector in a FlatLayout, with each parameter's view of it made once."""

    def __init__(self, layout: FlatLayout, like: torch.Tensor):
        self.params = layout.params
        self.values = torch.empty(layout.total, dtype=like.dtype, device=like.device)
        self.views = layout.views(self.values)

    @classmethod
    def reuse(cls, buffer: _FlatBuffer | None, layout: FlatLayout,
              like: torch.Tensor) -> _FlatBuffer:
        """``buffer`` to be overwritten (no longer marked processed by Opacus), or a new one."""
        if (buffer is None or buffer.params is not layout.params
                or buffer.values.dtype != like.dtype or buffer.values.device != like.device):
            return cls(layout, like)
        opacus_internals.unmark_processed(buffer.values)
        return buffer

    def attach(self, attribute: str) -> None:
        """Make each parameter's ``attribute`` (summed_grad, grad) its view of the buffer."""
        for param, view in zip(self.params, self.views):
            setattr(param, attribute, view)


class LoraPrivacyEngine(opacus_internals.ExtensiblePrivacyEngine):
    """Opacus' PrivacyEngine with the LoRA per-sample gradients of LoraGradSampleModule.

    ``make_private`` wraps the model in LoraGradSampleModule and the optimizer in
    LoraDPOptimizer, and gives both one flat layout of the LoRA tensors (in the optimizer's
    order). Inside ``stock_opacus()``, with another grad_sample_mode, or with a model already
    wrapped, it is stock Opacus. With another clipping (per-layer, adaptive) or a distributed
    optimizer, the optimizer is Opacus' own and the LoRA module feeds it the stock way: each
    factor's ``p.grad_sample``.
    """

    def make_private(self, **kwargs):
        made = super().make_private(**kwargs)
        module, optimizer = made[0], made[1]
        if isinstance(module, LoraGradSampleModule) and isinstance(optimizer, LoraDPOptimizer):
            module.flat_layout = FlatLayout(optimizer.params)
            optimizer.per_sample_source = module
        return made

    def grad_sample_module(self, module: nn.Module, *, batch_first: bool, loss_reduction: str,
                           grad_sample_mode: str, wrap_model: bool) -> nn.Module | None:
        if (grad_sample_mode != "hooks" or not wrap_model or not lora_engine_enabled()
                or isinstance(module, AbstractGradSampleModule)):
            return None
        self.validate(module=module, optimizer=None, data_loader=None)
        return LoraGradSampleModule(module, batch_first=batch_first, loss_reduction=loss_reduction)

    def optimizer_class(self, optimizer: DPOptimizer, *,
                        grad_sample_mode: str) -> type[DPOptimizer] | None:
        if type(optimizer) is DPOptimizer and lora_engine_enabled() and grad_sample_mode == "hooks":
            return LoraDPOptimizer  # Opacus' optimizer, state and all; only the step differs
        return None
