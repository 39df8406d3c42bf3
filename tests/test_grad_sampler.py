"""Per-sample LoRA gradients of the LoRA engine (client/lora_grad_sampler.py), checked against
examples run one at a time and against stock Opacus, for Llama and GPT-2 (Conv1D) layers, with
padded batches and bfloat16 base weights; unsupported adapters are refused before training."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import privatune.client.trainer as trainer
from privatune.client.lora_grad_sampler import (FlatLayout, LoraDPOptimizer, LoraGradSampleModule,
                                                LoraPrivacyEngine, UnsupportedLoraError,
                                                clip_factors, lora_engine_enabled, stock_opacus)
from privatune.common.examples import IGNORE_INDEX, per_example_loss
from privatune.common.config import LoraConfig
from privatune.common.lora import attach_lora

VOCAB, BATCH, LENGTH = 64, 4, 12
LENGTHS = [12, 7, 12, 4]  # real tokens per example; the rest is padding
RTOL = 1e-5               # float32: engine vs one-at-a-time and vs stock Opacus (max abs error)
# bfloat16 base weights through a whole model (Frobenius error per tensor): the backward sums the
# q/k/v gradients of a layer input in bf16, in an order that depends on the autograd graph, so
# one-at-a-time runs and stock Opacus differ from each other by about 1-2% already.
BF16_RTOL = 5e-2


def llama(dtype: torch.dtype = torch.float32, dropout: float = 0.0,
          device: torch.device | str = "cpu"):
    """A two-block Llama with LoRA, placed on ``device`` before the adapter is attached."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0)
    base = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    if dropout:
        model = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                target_modules=list(LoraConfig().target_modules)))
    else:
        model = attach_lora(base, LoraConfig(r=4, alpha=8))  # the project's own LoRA (dropout 0)
    return _nonzero_b(model)


def gpt2(device: torch.device | str = "cpu"):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # deterministic
    model = get_peft_model(GPT2LMHeadModel(config).to(device), PeftLoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, fan_in_fan_out=True,
        target_modules=["c_attn", "c_proj", "c_fc"]))
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert layers and all(type(m.base_layer).__name__ == "Conv1D" and m.fan_in_fan_out
                          for m in layers)  # the same LoRA layer class, on GPT-2's Conv1D
    return _nonzero_b(model)


def _nonzero_b(model):
    """LoRA B starts at zero, which would make every lora_A gradient zero: use a later state."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    model.train()
    return model


BUILDERS = {"llama": llama, "gpt2": gpt2}


def batch(device: torch.device | str = "cpu"):
    """The padded test batch (ids, mask, labels), on ``device``."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=generator)
    mask = torch.zeros_like(ids)
    labels = ids.clone()
    for i, length in enumerate(LENGTHS):
        mask[i, :length] = 1
        ids[i, length:] = 0
        labels[i, length:] = IGNORE_INDEX
    labels[0, :3] = IGNORE_INDEX  # a prompt: no loss on its tokens
    return ids.to(device), mask.to(device), labels.to(device)


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def engine_grad_samples(model, wrap) -> dict[str, torch.Tensor]:
    """Per-sample gradients of one forward/backward of the padded batch, mean loss as the trainer."""
    ids, mask, labels = batch(next(model.parameters()).device)
    wrapped = wrap(model)
    try:
        logits = wrapped(input_ids=ids, attention_mask=mask).logits.float()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook")
            per_example_loss(logits, labels).mean().backward()
        return {n: p.grad_sample.detach().clone() for n, p in lora_params(model).items()}
    finally:
        wrapped._close()


def one_at_a_time(model) -> dict[str, torch.Tensor]:
    """Each example alone, without its padding, through forward and backward (no Opacus)."""
    ids, mask, labels = batch(next(model.parameters()).device)
    params = lora_params(model)
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for i, length in enumerate(LENGTHS):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids[i:i + 1, :length], attention_mask=mask[i:i + 1, :length]).logits
        per_example_loss(logits.float(), labels[i:i + 1, :length]).sum().backward()
        for name, param in params.items():
            grads[name].append(param.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(g) for n, g in grads.items()}


def stock(model):
    with stock_opacus():
        return GradSampleModule(model)


def assert_close(actual: dict, expected: dict, rtol: float, norm: str = "max") -> None:
    """Per tensor: max |actual - expected| <= rtol * max |expected| (``norm="fro"``: the
    Frobenius norms instead)."""
    measure = (lambda t: t.abs().max()) if norm == "max" else (lambda t: t.norm())
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape and got.dtype == torch.float32, name
        scale = measure(want)
        assert scale > 0, f"{name}: zero reference gradient, the comparison would be vacuous"
        error = measure(got - want) / scale
        assert error <= rtol, f"{name}: relative error {error:.3g} > {rtol:g}"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_sample_gradients_match_one_example_at_a_time(arch):
    expected = one_at_a_time(BUILDERS[arch]())
    actual = engine_grad_samples(BUILDERS[arch](), LoraGradSampleModule)
    assert_close(actual, expected, RTOL)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_sample_gradients_match_stock_opacus(arch):
    expected = engine_grad_samples(BUILDERS[arch](), stock)
    actual = engine_grad_samples(BUILDERS[arch](), LoraGradSampleModule)
    assert_close(actual, expected, RTOL)


def freeze_a(model):
    """lora_A frozen as under ffa: only lora_B requires gradients."""
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_frozen_a_gets_no_per_sample_gradients_and_b_stays_exact(arch):
    """ffa: B's per-sample gradients are still exact (one example at a time); A gets none."""
    expected = one_at_a_time(freeze_a(BUILDERS[arch]()))
    assert expected and all("lora_B" in name for name in expected)
    model = freeze_a(BUILDERS[arch]())
    frozen = [p for name, p in model.named_parameters() if "lora_A" in name]
    wrapped = LoraGradSampleModule(model)
    try:
        ids, mask, labels = batch()
        logits = wrapped(input_ids=ids, attention_mask=mask).logits.float()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook")
            per_example_loss(logits, labels).mean().backward()
        assert frozen and all(getattr(p, "grad_sample", None) is None and p.grad is None
                              for p in frozen)
        actual = {n: p.grad_sample.detach().clone() for n, p in lora_params(model).items()}
    finally:
        wrapped._close()
    assert_close(actual, expected, RTOL)


def test_padding_contributes_nothing():
    """The padded tail gets no output gradient: changing its tokens changes no gradient."""
    first = engine_grad_samples(llama(), LoraGradSampleModule)
    ids, mask, labels = batch()
    ids[mask == 0] = 5  # other pad tokens
    model = llama()
    wrapped = LoraGradSampleModule(model)
    per_example_loss(wrapped(input_ids=ids, attention_mask=mask).logits, labels).mean().backward()
    second = {n: p.grad_sample.clone() for n, p in lora_params(model).items()}
    wrapped._close()
    assert_close(second, first, RTOL)


def test_bfloat16_base_weights():
    """bf16 base, float32 LoRA: per-sample gradients in float32, within bf16 rounding of stock
    Opacus' and of one-at-a-time runs."""
    model = llama(torch.bfloat16)
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert {p.dtype for p in base} == {torch.bfloat16}
    assert {p.dtype for p in lora_params(model).values()} == {torch.float32}
    actual = engine_grad_samples(model, LoraGradSampleModule)
    assert_close(actual, engine_grad_samples(llama(torch.bfloat16), stock), BF16_RTOL, "fro")
    assert_close(actual, one_at_a_time(llama(torch.bfloat16)), BF16_RTOL, "fro")


class TwoLayers(torch.nn.Module):
    """x -> first -> second, bf16: no other gradient path, so the gradients reaching each LoRA
    layer are bitwise the same whichever engine runs; the first layer's input needs no gradient
    (Opacus' hook fires before autograd reaches its factors), the second's does."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(24, 40), torch.nn.Linear(40, 16)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


@pytest.mark.parametrize("frozen_a", [False, True])
def test_bfloat16_lora_layers_match_stock_opacus_to_float32_precision(frozen_a):
    """Also with lora_A frozen (ffa), in both hook orders: B's per-sample gradients alone."""
    def build():
        torch.manual_seed(0)
        model = _nonzero_b(get_peft_model(TwoLayers().to(torch.bfloat16), PeftLoraConfig(
            r=4, lora_alpha=8, target_modules=["first", "second"])))
        return freeze_a(model) if frozen_a else model

    x = torch.randn(BATCH, LENGTH, 24).to(torch.bfloat16)
    target = torch.randn(BATCH, LENGTH, 16)

    def grad_samples(wrap):
        model = build()
        wrapped = wrap(model)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook")
            ((wrapped(x).float() - target) ** 2).mean().backward()
        samples = {n: p.grad_sample.clone() for n, p in lora_params(model).items()}
        wrapped._close()
        return samples

    actual = grad_samples(LoraGradSampleModule)
    assert len(actual) == (2 if frozen_a else 4)
    assert_close(actual, grad_samples(stock), RTOL)


class SharedLayer(torch.nn.Module):
    """One linear layer applied twice in a forward pass (weight sharing), then a head."""

    def __init__(self):
        super().__init__()
        self.shared, self.head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


@pytest.mark.parametrize("flat", [False, True])
def test_a_lora_layer_used_twice_sums_both_uses_per_example(flat):
    """With and without the optimizer's flat buffer: a factor's per-sample gradient is the sum
    over its uses, as one example at a time gives it."""
    def build():
        torch.manual_seed(0)
        return _nonzero_b(get_peft_model(SharedLayer(), PeftLoraConfig(
            r=4, lora_alpha=8, target_modules=["shared", "head"])))

    x, target = torch.randn(BATCH, LENGTH, 16), torch.randn(BATCH, LENGTH, 8)
    reference = build()
    expected: dict[str, list[torch.Tensor]] = {n: [] for n in lora_params(reference)}
    for i in range(BATCH):
        reference.zero_grad(set_to_none=True)
        ((reference(x[i:i + 1]) - target[i:i + 1]) ** 2).sum().backward()
        for name, param in lora_params(reference).items():
            expected[name].append(param.grad.clone())
    model = build()
    wrapped = LoraGradSampleModule(model)
    if flat:
        wrapped.flat_layout = FlatLayout(list(lora_params(model).values()))
    try:
        ((wrapped(x) - target) ** 2).sum(dim=(1, 2)).mean().backward()
        actual = {n: p.grad_sample.clone() for n, p in lora_params(model).items()}
        assert (wrapped.per_sample_buffer() is not None) == flat
    finally:
        wrapped._close()
    assert_close(actual, {n: torch.stack(g) for n, g in expected.items()}, RTOL)


def _two_layer_grad_samples(dtype: torch.dtype, loss_scale: float,
                            device: torch.device | str = "cpu") -> dict:
    """Per-sample gradients of a loss far below float16's normal range (gradients ~1e-9),
    backward on ``loss * loss_scale`` with the engine told the scale."""
    torch.manual_seed(0)
    model = _nonzero_b(get_peft_model(TwoLayers().to(device=device, dtype=dtype), PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=["first", "second"])))
    torch.manual_seed(1)
    x, target = (torch.randn(BATCH, LENGTH, n).to(device) for n in (24, 16))
    wrapped = LoraGradSampleModule(model)
    wrapped.loss_scale = loss_scale
    loss = ((wrapped(x.to(dtype)).float() - target) ** 2).mean() * 1e-6
    (loss * loss_scale).backward()
    samples = {n: p.grad_sample.clone() for n, p in lora_params(model).items()}
    wrapped._close()
    return samples


def test_float16_base_weights_keep_small_gradients_under_the_loss_scale():
    """float16 flushes the small gradients of a mean loss towards zero; with the loss scaled
    before backward and divided back out of the per-sample gradients, they match float32's."""
    expected = _two_layer_grad_samples(torch.float32, 1.0)
    assert_close(_two_layer_grad_samples(torch.float32, 1e6), expected, RTOL)  # exact unscaling
    assert_close(_two_layer_grad_samples(torch.float16, 1e6), expected, 5e-3, "fro")
    with pytest.raises(AssertionError, match="relative error"):  # measured: all zero
        assert_close(_two_layer_grad_samples(torch.float16, 1.0), expected, 0.5, "fro")


def test_the_trainer_scales_the_loss_for_float16_bases_only():
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 5, IGNORE_INDEX]])
    assert trainer.loss_scale(False, labels) == 1.0
    assert trainer.loss_scale(True, labels) == 2 * 3  # examples x most labelled next tokens


def test_lora_dropout_uses_the_dropped_input():
    """With lora_dropout > 0, lora_A's gradient uses the dropped-out input (same masks as stock)."""
    torch.manual_seed(3)
    expected = engine_grad_samples(llama(dropout=0.3), stock)
    torch.manual_seed(3)
    actual = engine_grad_samples(llama(dropout=0.3), LoraGradSampleModule)
    assert_close(actual, expected, RTOL)


def test_no_opacus_hook_and_each_trainable_factor_multiplies_per_example():
    """No module gets an Opacus hook; every trainable LoRA factor runs the per-example product
    while the engine is attached, and its own nn.Linear forward again once it is closed."""
    model = llama()
    factors = [m for layer in model.modules() if isinstance(layer, LoraLinear)
               for m in (layer.lora_A.default, layer.lora_B.default)]
    wrapped = LoraGradSampleModule(model)
    try:
        assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
        assert factors and all(type(m.__dict__.get("forward")).__name__ == "_PerExampleFactor"
                               for m in factors)
        ids, mask, labels = batch()
        per_example_loss(wrapped(input_ids=ids, attention_mask=mask).logits, labels).mean().backward()
        for name, param in lora_params(model).items():
            # no batch-summed gradient is computed (DPOptimizer replaces p.grad anyway)
            assert param.grad is None and param.grad_sample.shape == (BATCH, *param.shape), name
        assert not any(p.grad is not None for p in model.parameters())  # base frozen
    finally:
        wrapped._close()
    assert not any("forward" in m.__dict__ for m in factors)
    with stock_opacus():
        stock_wrapped = GradSampleModule(model)  # for contrast: stock hooks lora_A / lora_B
        assert all(isinstance(m, torch.nn.Linear) for m in stock_wrapped.iterate_submodules(model))
        stock_wrapped._close()


def make_private(model, engine_class=LoraPrivacyEngine):
    ids, mask, labels = batch()
    optimizer = torch.optim.SGD(list(lora_params(model).values()), lr=0.1)
    loader = DataLoader(TensorDataset(ids, labels, mask), batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return engine_class(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=True)


def test_privacy_engine_uses_the_lora_engine_and_stock_opacus_can_be_restored():
    dp_model, dp_optimizer, _ = make_private(llama())
    assert type(dp_model) is LoraGradSampleModule and type(dp_optimizer) is LoraDPOptimizer
    dp_model._close()
    with stock_opacus():
        assert not lora_engine_enabled()
        dp_model, dp_optimizer, _ = make_private(llama())
        assert type(dp_model) is GradSampleModule and type(dp_optimizer) is DPOptimizer
        dp_model._close()
    assert lora_engine_enabled()


def test_a_dp_step_matches_stock_opacus():
    """Same per-sample gradients, same clipping, same noise draw: the same noised update."""
    grads = {}
    for name, engine in (("stock", PrivacyEngine), ("new", LoraPrivacyEngine)):
        dp_model, dp_optimizer, _ = make_private(llama(), engine)
        ids, mask, labels = batch()
        per_example_loss(dp_model(input_ids=ids, attention_mask=mask).logits, labels).mean().backward()
        torch.manual_seed(7)
        dp_optimizer.step()
        grads[name] = {n: p.grad.clone() for n, p in lora_params(dp_model._module).items()}
        dp_model._close()
    assert_close(grads["new"], grads["stock"], RTOL)


def test_one_buffer_holds_per_sample_gradients_and_the_step_clips_them_as_a_whole():
    """The per-sample gradients of all LoRA tensors are views of one [N, total] buffer, and
    the clipped sum and the noised gradient views of one vector each; the clipping is the
    flat clipping of DP-SGD: one norm per example over all tensors."""
    dp_model, dp_optimizer, _ = make_private(llama())
    ids, mask, labels = batch()
    per_example_loss(dp_model(input_ids=ids, attention_mask=mask).logits, labels).mean().backward()
    buffer = dp_model.per_sample_buffer()
    params = dp_optimizer.params
    assert buffer is not None and buffer.shape == (BATCH, sum(p.numel() for p in params))
    assert all(p.grad_sample._base is buffer for p in params)
    samples = [p.grad_sample.clone() for p in params]
    norms = torch.stack([g.reshape(BATCH, -1).norm(dim=1) for g in samples], dim=1).norm(dim=1)
    factors = (1.0 / (norms + 1e-6)).clamp(max=1.0)  # max_grad_norm 1
    assert (factors < 1).any()  # some example is really clipped
    dp_optimizer.step()
    for param, sample in zip(params, samples):
        expected = torch.einsum("n,n...->...", factors, sample)
        torch.testing.assert_close(param.summed_grad, expected, rtol=1e-5, atol=1e-6)
    # each a view of one vector (a tensor that is no view has _base None)
    for attribute in ("summed_grad", "grad"):
        bases = {getattr(p, attribute)._base for p in params}
        assert len(bases) == 1 and None not in bases, attribute
    dp_model._close()


def test_scale_grad_is_stock_opacus_arithmetic():
    dp_model, dp_optimizer, _ = make_private(llama())
    params = dp_optimizer.params
    for p in params:
        p.grad_sample = torch.zeros((2, *p.shape))
        p.grad = torch.randn(p.shape)
    expected = [p.grad / (dp_optimizer.expected_batch_size * dp_optimizer.accumulated_iterations)
                for p in params]
    dp_optimizer.scale_grad()
    for p, want in zip(params, expected):
        assert torch.equal(p.grad, want)
    dp_model._close()


def unsupported_models():
    def dora():
        torch.manual_seed(0)
        return get_peft_model(LlamaForCausalLM(llama().base_model.model.config), PeftLoraConfig(
            r=4, target_modules=["q_proj"], use_dora=True))

    def two_active_adapters():
        model = llama()
        model.add_adapter("other", PeftLoraConfig(r=4, target_modules=list(LoraConfig().target_modules)))
        model.base_model.set_adapter(["default", "other"])
        return model

    def lora_bias():
        torch.manual_seed(0)
        return get_peft_model(LlamaForCausalLM(llama().base_model.model.config), PeftLoraConfig(
            r=4, target_modules=["q_proj"], lora_bias=True))

    def lora_on_embedding():
        torch.manual_seed(0)
        return get_peft_model(LlamaForCausalLM(llama().base_model.model.config), PeftLoraConfig(
            r=4, target_modules=["embed_tokens", "q_proj"]))

    def trainable_base_weight():
        model = llama()
        model.base_model.model.model.norm.weight.requires_grad_(True)
        return model

    def merged():
        model = llama()
        model.merge_adapter()
        return model

    return {"LoRA variant": dora, "2 active adapters": two_active_adapters,
            "LoRA bias": lora_bias, "only peft.tuners.lora.layer.Linear": lora_on_embedding,
            "not LoRA factors": trainable_base_weight, "merged or disabled": merged}


@pytest.mark.parametrize("expected", list(unsupported_models()))
def test_unsupported_adapters_are_refused_before_training(expected):
    model = unsupported_models()[expected]()
    with pytest.raises(UnsupportedLoraError, match=expected):
        make_private(model)
    assert not any(hasattr(m, "autograd_grad_sample_hooks") for m in model.modules())


def test_adapter_merged_after_wrapping_leaves_no_per_sample_gradients():
    """Merged after wrapping, the LoRA factors no longer run: nothing in the forward pass needs
    a gradient and no factor gets a per-sample gradient, never a stale or partial one."""
    model = llama()
    wrapped = LoraGradSampleModule(model)
    ids, mask, labels = batch()
    model.merge_adapter()
    try:
        logits = wrapped(input_ids=ids, attention_mask=mask).logits
        assert not logits.requires_grad  # no trainable tensor in the pass: backward() refuses
        assert all(getattr(p, "grad_sample", None) is None for p in lora_params(model).values())
    finally:
        wrapped._close()


def test_a_second_backward_pass_through_one_forward_pass_is_refused():
    model = llama()
    wrapped = LoraGradSampleModule(model)
    ids, mask, labels = batch()
    try:
        loss = per_example_loss(wrapped(input_ids=ids, attention_mask=mask).logits, labels).mean()
        loss.backward(retain_graph=True)
        with pytest.raises(UnsupportedLoraError, match="one backward pass per forward pass"):
            loss.backward()
    finally:
        wrapped._close()


def test_missing_per_sample_gradients_test_reaches_the_real_path(monkeypatch):
    """tests/test_trainer.py breaks LoraGradSampleModule._gather to simulate lost per-sample
    gradients: the trainer's per-sample gradients must come from that very method."""
    gathered: list[int] = []
    gather = LoraGradSampleModule._gather

    def spy(self):
        gather(self)
        gathered.append(sum(getattr(p, "grad_sample", None) is not None
                            for p in self._module.parameters()))

    monkeypatch.setattr(LoraGradSampleModule, "_gather", spy)
    ids, mask, labels = batch()
    dataset = TensorDataset(ids.repeat(5, 1), labels.repeat(5, 1), mask.repeat(5, 1))
    settings = trainer.DPTrainSettings(noise_multiplier=1.0, max_grad_norm=1.0,
                                       expected_batch_size=4, steps=1, learning_rate=0.02, seed=0)
    model = llama()
    trainer.train_dp_round(model, dataset, settings)
    assert gathered == [len(lora_params(model))]


def test_trainer_clips_one_flat_buffer_per_step(monkeypatch):
    """Each step of the trainer clips the engine's one per-sample buffer, not Opacus' loop."""
    buffers: list[torch.Tensor | None] = []
    clip = LoraDPOptimizer.clip_and_accumulate

    def spy(self):
        buffers.append(self.per_sample_source.per_sample_buffer())
        return clip(self)

    monkeypatch.setattr(LoraDPOptimizer, "clip_and_accumulate", spy)
    ids, mask, labels = batch()
    dataset = TensorDataset(ids.repeat(5, 1), labels.repeat(5, 1), mask.repeat(5, 1))
    settings = trainer.DPTrainSettings(noise_multiplier=1.0, max_grad_norm=1.0,
                                       expected_batch_size=4, steps=3, learning_rate=0.02, seed=0)
    model = llama()
    result = trainer.train_dp_round(model, dataset, settings)
    total = sum(p.numel() for p in lora_params(model).values())
    assert result.steps == 3 and len(buffers) >= 3
    assert all(b is None or b.shape[1] == total for b in buffers)
    assert sum(b is not None for b in buffers) >= 2  # an empty Poisson batch takes Opacus' path


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing_keeps_per_sample_gradients_exact(arch):
    """The trainer's (reentrant) checkpointing recomputes the blocks in the backward pass: each
    LoRA factor records its per-example copy once, in the recomputation, and the gradients are
    those without it."""
    expected = engine_grad_samples(BUILDERS[arch](), LoraGradSampleModule)
    model = BUILDERS[arch]()
    trainer._checkpointing(model, True)
    assert model.is_gradient_checkpointing
    actual = engine_grad_samples(model, LoraGradSampleModule)
    trainer._checkpointing(model, False)
    assert not model.is_gradient_checkpointing
    assert_close(actual, expected, rtol=1e-5)


def test_a_checkpointed_dp_round_passes_the_checks_and_leaves_the_shared_model_as_it_was():
    ids, mask, labels = batch()
    dataset = TensorDataset(ids.repeat(5, 1), labels.repeat(5, 1), mask.repeat(5, 1))
    model = llama()
    result = trainer.train_dp_round(model, dataset, trainer.DPTrainSettings(
        noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, steps=3,
        learning_rate=0.02, seed=0, gradient_checkpointing=True, max_physical_batch_size=2))
    assert result.steps == 3
    assert not model.is_gradient_checkpointing


def test_clip_factors_bring_each_sample_to_the_clip_to_float32_rounding():
    """The norm behind a clip factor is summed in float64: in float32, 460,800 squares (the
    LoRA of SmolLM2) come out about 5e-6 off here, and the clipped sample's norm with them (at
    SmolLM2's real gradients 4e-5, enough to fail the secure contribution's DP check)."""
    generator = torch.Generator().manual_seed(0)
    flat = (torch.randn(3, 460_800, generator=generator)
            * torch.exp(3 * torch.randn(3, 460_800, generator=generator)))
    norms = flat.double().norm(dim=1)
    clipped = (flat.double() * clip_factors(flat, 1.0).double()[:, None]).norm(dim=1)
    assert torch.allclose(clipped, norms / (norms + 1e-6), rtol=2e-7, atol=0)
    in_float32 = (flat.double() * (1.0 / (flat.norm(dim=1) + 1e-6)).double()[:, None]).norm(dim=1)
    assert not torch.allclose(in_float32, norms / (norms + 1e-6), rtol=2e-7, atol=0)
    small = torch.full((1, 4), 0.1)  # a norm of 0.2, below the clip: left as it is
    assert clip_factors(small, 1.0).tolist() == [1.0]
