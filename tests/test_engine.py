"""The site's hardware choice and one copy of the base weights per process."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from privatune.common.shared_model import adapter_model, shared_base_models
from privatune.client.node import SiteNode
from privatune.client.policy import load_site_policy
from privatune.common import hardware as hardware_module
from privatune.common.config import ConfigError
from privatune.common.hardware import attention_implementation, resolve_hardware
from privatune.common.config import LoraConfig
from privatune.common.lora import initial_adapter, load_base_model, lora_state
from privatune.common.protocol import TrainRequest

from tests.conftest import write_notes

LORA = LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj"))


@pytest.mark.parametrize("native_bfloat16", [True, False])
def test_auto_precision_on_the_cpu_is_bfloat16_only_where_it_is_native(monkeypatch, native_bfloat16):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setattr(hardware_module, "cpu_has_bfloat16", lambda: native_bfloat16)
    hardware = resolve_hardware("auto", "auto")
    assert hardware.device.type == "cpu"
    assert hardware.dtype == (torch.bfloat16 if native_bfloat16 else torch.float32)
    assert resolve_hardware("cpu", "bfloat16").dtype == torch.bfloat16
    assert resolve_hardware("cpu", "float32").dtype == torch.float32


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float32), ((8, 0), torch.bfloat16)])
def test_auto_precision_on_a_gpu_is_bfloat16_only_where_it_is_native(monkeypatch, capability,
                                                                     expected):
    """A T4 (7.5) emulates bfloat16 (torch.cuda.is_bf16_supported() says yes): float32 there;
    an A100 or H100 (8.0, 9.0) has it natively. Asked of the chosen device, not the current one."""
    asked: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: asked.append(device) or capability)
    assert resolve_hardware("cuda:1", "auto").dtype == expected
    assert asked == [torch.device("cuda:1")]


def test_half_precision_on_the_cpu_loads_eager_attention(tiny_model_dir):
    cpu = torch.device("cpu")
    assert attention_implementation(cpu, torch.bfloat16) == "eager"
    assert attention_implementation(cpu, torch.float32) is None
    assert attention_implementation(torch.device("cuda"), torch.bfloat16) is None
    half, _ = load_base_model(tiny_model_dir, cpu, torch.bfloat16)
    full, _ = load_base_model(tiny_model_dir, cpu, torch.float32)
    assert half.config._attn_implementation == "eager"
    assert full.config._attn_implementation != "eager"


def test_a_device_the_machine_lacks_is_an_error_naming_the_key():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=r"site.device: 'cuda:1', but this machine has no CUDA"):
        resolve_hardware("cuda:1", "auto")


def test_policy_refuses_an_unknown_device(make_site):
    path = make_site()
    data = yaml.safe_load(path.read_text())
    data["site"]["device"] = "gpu0"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"site.device: 'gpu0' is not one of auto, cpu, cuda"):
        load_site_policy(path)


def test_one_base_model_per_process_whatever_the_lora_settings(tiny_model_dir):
    hardware = resolve_hardware("cpu", "float32")
    first, _ = adapter_model(tiny_model_dir, hardware, LORA)
    weights = first.get_base_model().model.embed_tokens.weight
    again, _ = adapter_model(tiny_model_dir, hardware, LORA)
    assert again is first
    other, _ = adapter_model(tiny_model_dir, hardware, LoraConfig(r=4, alpha=8,
                                                                     target_modules=("q_proj",)))
    assert other.get_base_model().model.embed_tokens.weight is weights  # same base weights
    assert {t.shape for n, t in lora_state(other).items() if "lora_A" in n} == {(4, 32)}


def test_half_precision_base_keeps_lora_in_float32(tiny_model_dir):
    model, _ = adapter_model(tiny_model_dir, resolve_hardware("cpu", "bfloat16"), LORA)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}


def test_sites_served_by_one_process_share_one_base_model(make_site, tiny_model_dir):
    before = shared_base_models()
    state = lora_state(initial_adapter(tiny_model_dir, LORA, seed=0))
    request = TrainRequest(run_id="r", round=1, planned_rounds=2, local_steps=2, batch_size=8,
                           learning_rate=0.02, max_grad_norm=1.0, max_length=48, lora_r=2,
                           lora_alpha=4, lora_targets="q_proj,v_proj")
    replies = [SiteNode(load_site_policy(make_site(f"site-{i}", seed=i))).train(request, state)
               for i in range(4)]
    assert all(r.reply.accepted for r in replies)
    assert shared_base_models() - before <= 1  # at most the CPU float32 model, once
    # each request starts from the global state it brings, not from what the last one left
    from privatune.common.protocol import EvaluateRequest

    evaluate = EvaluateRequest(run_id="r", round=1, max_length=48, batch_size=8, lora_r=2,
                               lora_alpha=4, lora_targets="q_proj,v_proj")
    node = SiteNode(load_site_policy(make_site("site-0", seed=0)))
    before_training = node.evaluate(evaluate, state).eval_loss
    node.train(TrainRequest(**{**request.to_record(), "round": 2}), state)
    assert node.evaluate(evaluate, state).eval_loss == pytest.approx(before_training, rel=1e-6)


def test_the_process_heap_is_frozen_once_it_holds_its_base_model(tiny_model_dir, tmp_path):
    """Full garbage collections then walk only what was created after the model was loaded
    (common.process_heap.keep_for_process_lifetime)."""
    import gc
    import shutil

    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")  # a base this process lacks
    gc.unfreeze()
    model, _ = adapter_model(model_dir, resolve_hardware("cpu", "float32"), LORA)
    frozen = gc.get_freeze_count()
    assert frozen > 0
    assert all(obj is not model for obj in gc.get_objects())  # not in any collected generation
    adapter_model(model_dir, resolve_hardware("cpu", "float32"), LORA)  # held: no new freeze
    # a new freeze would add the thousands of objects the second adapter made; a frozen object
    # freed by reference counting meanwhile leaves the count (a full suite run saw it fall by 2)
    assert gc.get_freeze_count() <= frozen


def test_libraries_are_imported_without_collections_and_then_frozen():
    import gc

    from privatune.common.process_heap import importing_libraries

    gc.unfreeze()
    assert gc.isenabled()
    with importing_libraries():
        assert not gc.isenabled()
        with importing_libraries():  # a module importing another that does the same
            created = [[i] for i in range(100)]
        assert not gc.isenabled()  # the outer block decides
    assert gc.isenabled()
    assert gc.get_freeze_count() >= len(created)


LOCAL_ONLY_JOB = """
seed: 5
model: {max_length: 48}
lora: {r: 2, alpha: 4, target_modules: [q_proj, v_proj]}
training: {local_steps: 2, batch_size: 8, learning_rate: 0.05, max_grad_norm: 1.0}
privacy: {epsilon: 8.0, delta: 1.0e-4}
federation: {rounds: 2, min_nodes: 1, min_replies: 1}
evaluation: {every_k_rounds: 1, max_new_tokens: 4, max_examples: 4}
tracking: none
"""


def test_a_coordinator_and_its_node_in_one_process_share_one_base_model(make_site, tiny_model_dir,
                                                                         tmp_path):
    """A local-only baseline runs a coordinator and its node in one worker: one copy of the base
    weights between them (a SmolLM2 baseline worker held two), and the coordinator still scores
    the global state it means although a request with other LoRA settings replaced the adapter."""
    from privatune.common.config import load_job_config
    from privatune.server.coordinator import Coordinator
    from privatune.server.coordinator_settings import CoordinatorSettings
    from privatune.simulations.in_process import InProcessTransport

    (tmp_path / "job.yaml").write_text(LOCAL_ONLY_JOB)
    job = load_job_config(tmp_path / "job.yaml")
    eval_notes = write_notes(tmp_path / "central.jsonl", 12, seed=9)
    node = SiteNode(load_site_policy(make_site("alone", records=60, seed=4)))
    settings = CoordinatorSettings(job=job, model_dir=tiny_model_dir, out_dir=tmp_path / "run",
                                   run_id="alone", resume=False, sites=(node.name,),
                                   central_eval=eval_notes)
    before = shared_base_models()
    coordinator = Coordinator(settings, InProcessTransport([node]), progress=lambda _: None)
    report = coordinator.run()
    assert shared_base_models() - before <= 1
    assert report.rounds[-1].training.participants == ["alone"]
    served, _ = adapter_model(node.policy.model_dir, node.hardware, job.lora)

    def embedding(model):
        return model.get_base_model().model.embed_tokens.weight

    assert embedding(coordinator.evaluator.model()) is embedding(served)  # one copy
    # the run's start is the seeded adapter, whoever attached the shared one
    fresh = Coordinator(dataclasses.replace(settings, out_dir=tmp_path / "again"),
                        InProcessTransport([node]), progress=lambda _: None)
    assert {n: t.tolist() for n, t in fresh.global_state.items()} == {
        n: t.tolist() for n, t in lora_state(initial_adapter(tiny_model_dir, job.lora, 5)).items()}
    final = coordinator.global_state
    expected = coordinator.evaluator.perplexity(final)
    adapter_model(tiny_model_dir, resolve_hardware("cpu", "float32"),
                  LoraConfig(r=4, alpha=8, target_modules=("q_proj",)))  # replaces the adapter
    assert coordinator.evaluator.perplexity(final) == pytest.approx(expected, rel=1e-6)
