"""The engine on a CUDA GPU: the same code as on the CPU, with another device.

Skipped where torch sees no CUDA GPU (CI has none). On a GPU machine:
``python -m pytest tests/test_cuda.py``. The per-sample gradients are checked against one
example at a time and against the CPU, DP rounds must pass the trainer's own checks (noise of
the claimed scale, per-sample gradients present, base weights untouched) in every base
precision, and a hospital node with ``site.device: cuda`` trains and evaluates on the GPU.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

from privatune.client.lora_grad_sampler import LoraGradSampleModule
from privatune.client.node import SiteNode
from privatune.client.policy import load_site_policy
from privatune.client.trainer import DPNotAppliedError, DPTrainSettings, train_dp_round
from privatune.common.hardware import resolve_hardware
from privatune.common.protocol import EvaluateRequest
from tests.test_grad_sampler import (BF16_RTOL, BUILDERS, RTOL, _two_layer_grad_samples,
                                     assert_close, batch, engine_grad_samples, llama,
                                     lora_params, one_at_a_time, stock)
from tests.test_node import LORA, start_state
from tests.test_node import request as train_request

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def on_cpu(samples: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.cpu() for name, tensor in samples.items()}


def test_auto_hardware_takes_the_gpu_and_bfloat16_where_it_is_native():
    hardware = resolve_hardware("auto", "auto")
    assert hardware.device.type == CUDA.type
    native = torch.cuda.get_device_capability(hardware.device) >= (8, 0)
    assert hardware.dtype == (torch.bfloat16 if native else torch.float32)


def on_gpu(arch: str, dtype: torch.dtype = torch.float32):
    """A test model whose base is on the GPU before LoRA is attached (Opacus issue 820)."""
    return BUILDERS[arch](device=CUDA) if arch == "gpt2" else llama(dtype, device=CUDA)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_sample_gradients_on_the_gpu_are_exact(arch):
    """float32: the GPU's per-sample gradients match one example at a time on the GPU, stock
    Opacus on the GPU, and the engine on the CPU with the same weights."""
    model = on_gpu(arch)
    assert {p.device.type for p in model.parameters()} == {CUDA.type}
    twin = BUILDERS[arch]()
    twin.load_state_dict(on_cpu(model.state_dict()))
    actual = engine_grad_samples(model, LoraGradSampleModule)
    assert all(t.device.type == CUDA.type for t in actual.values())
    assert_close(actual, one_at_a_time(on_gpu(arch)), RTOL)
    assert_close(actual, engine_grad_samples(on_gpu(arch), stock), RTOL)
    assert_close(on_cpu(actual), engine_grad_samples(twin, LoraGradSampleModule), RTOL)


def test_bfloat16_base_on_the_gpu():
    model = on_gpu("llama", torch.bfloat16)
    assert {p.dtype for p in lora_params(model).values()} == {torch.float32}
    actual = engine_grad_samples(model, LoraGradSampleModule)
    assert_close(actual, engine_grad_samples(on_gpu("llama", torch.bfloat16), stock), BF16_RTOL, "fro")
    assert_close(actual, one_at_a_time(on_gpu("llama", torch.bfloat16)), BF16_RTOL, "fro")


def test_float16_base_on_the_gpu_keeps_small_gradients_under_the_loss_scale():
    expected = _two_layer_grad_samples(torch.float32, 1.0, CUDA)
    assert_close(_two_layer_grad_samples(torch.float16, 1e6, CUDA), expected, 5e-3, "fro")
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(_two_layer_grad_samples(torch.float16, 1.0, CUDA), expected, 0.5, "fro")


def dataset(examples: int = 20) -> TensorDataset:
    ids, mask, labels = batch()
    repeats = examples // len(ids)
    return TensorDataset(ids.repeat(repeats, 1), labels.repeat(repeats, 1), mask.repeat(repeats, 1))


def settings(**overrides) -> DPTrainSettings:
    return DPTrainSettings(**{"noise_multiplier": 1.0, "max_grad_norm": 1.0,
                              "expected_batch_size": 4, "steps": 4, "learning_rate": 0.02,
                              "seed": 0, **overrides})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["plain", "micro-batches", "checkpointing"])
def test_dp_rounds_on_the_gpu_pass_every_check(dtype, variant):
    """The trainer's checks run on the GPU: noise of the claimed scale summed on the device,
    per-sample gradients present, LoRA changed and the base weights' fingerprint unchanged."""
    model = on_gpu("llama", dtype)
    extra = {"micro-batches": {"max_physical_batch_size": 2},
             "checkpointing": {"gradient_checkpointing": True}}.get(variant, {})
    before = {n: p.detach().clone() for n, p in lora_params(model).items()}
    result = train_dp_round(model, dataset(), settings(**extra))
    assert result.steps == 4 and torch.isfinite(torch.tensor(result.mean_loss))
    for name, param in lora_params(model).items():
        assert param.device.type == CUDA.type and param.dtype == torch.float32, name
        assert torch.isfinite(param).all(), name
    assert any(not torch.equal(p, before[n]) for n, p in lora_params(model).items())


def test_missing_per_sample_gradients_on_the_gpu_stop_training(monkeypatch):
    monkeypatch.setattr(LoraGradSampleModule, "_gather",
                        lambda self: None)  # the per-sample gradients silently never arrive
    with pytest.raises(DPNotAppliedError, match="no per-sample gradients"):
        train_dp_round(on_gpu("llama", torch.bfloat16), dataset(), settings())


@pytest.mark.parametrize("dtype", ["auto", "float16"])
def test_a_node_on_the_gpu_trains_and_evaluates(make_site, tiny_model_dir, dtype):
    """site.device: cuda in the site's policy: the node's base model, adapter and DP round run
    on the GPU; the update leaves as float32 CPU tensors and the ledger records the round."""
    policy_path = make_site()
    policy = yaml.safe_load(policy_path.read_text())
    policy["site"].update({"device": str(CUDA), "dtype": dtype})
    policy_path.write_text(yaml.safe_dump(policy))
    node = SiteNode(load_site_policy(policy_path))
    state = start_state(tiny_model_dir)
    outcome = node.train(train_request(), state)
    assert outcome.reply.accepted, outcome.reply
    assert outcome.reply.epsilon > 0
    assert set(outcome.state) == set(state)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in outcome.state.values())
    assert any(not torch.equal(outcome.state[n], state[n]) for n in state)
    model, _ = node.model_with_adapter(LORA)
    base = next(p for n, p in model.named_parameters() if "lora_" not in n)
    assert base.device.type == CUDA.type
    assert base.dtype == (torch.float16 if dtype == "float16" else resolve_hardware(str(CUDA), "auto").dtype)
    reply = node.evaluate(EvaluateRequest(run_id="run-1", round=1, max_length=48, batch_size=8,
                                          lora_r=LORA.r, lora_alpha=LORA.alpha,
                                          lora_targets=",".join(LORA.target_modules),
                                          generation=True, marker="Plan:", max_new_tokens=8,
                                          max_examples=4), outcome.state)
    assert reply.accepted and reply.eval_loss is not None and reply.eval_loss > 0
    assert reply.rouge_l is not None and 0.0 <= reply.rouge_l <= 1.0
