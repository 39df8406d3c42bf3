"""LoRA through PEFT and the adapter codec: only LoRA tensors, exact round trips, strict loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import Array, ArrayRecord
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, ViTConfig

from privatune.common.config import LoraConfig
from privatune.common.lora import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, attach_lora,
                                   attach_seeded_lora, initial_adapter, load_adapter,
                                   load_base_model, load_lora_state, lora_state, merged_model,
                                   save_adapter, train_factors, trained_part, with_update)
from privatune.common.protocol import arrayrecord_to_state, state_to_arrayrecord

SETTINGS = LoraConfig(r=4, alpha=8)
TEXTS = ["The patient list is empty.", "Return the value of the key.", "Open a new file for writing."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a tokenizer that has no pad token (load_base_model must add one)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TEXTS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def random_lora_state(model: PeftModel, seed: int) -> dict[str, torch.Tensor]:
    """Non-zero LoRA tensors (a fresh adapter's B is zero, which would hide mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(t.shape, generator=generator) * 0.1 for name, t in lora_state(model).items()}


def lora_model(model_dir: Path, seed: int | None = None) -> PeftModel:
    model = attach_lora(load_base_model(model_dir)[0], SETTINGS)
    if seed is not None:
        load_lora_state(model, random_lora_state(model, seed))
    return model


def logits(model: torch.nn.Module, model_dir: Path) -> torch.Tensor:
    tokenizer = load_base_model(model_dir)[1]
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_aggregation_decides_which_factors_train_and_travel(model_dir: Path) -> None:
    model = lora_model(model_dir, seed=1)
    state = lora_state(model)
    assert trained_part(state, "fedavg") == state
    sent = trained_part(state, "ffa")
    assert list(sent) == [name for name in state if ".lora_B." in name] and sent
    train_factors(model, "ffa")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n.replace(".lora_B.", ".lora_B.default.") for n in sent}
    train_factors(model, "fedavg")  # the node's one model serves either mode
    assert sum(p.requires_grad for p in model.parameters()) == len(state)
    update = {name: torch.zeros_like(t) for name, t in sent.items()}
    merged = with_update(state, update)
    assert list(merged) == list(state)
    assert all(torch.equal(merged[n], update.get(n, state[n])) for n in state)
    with pytest.raises(ValueError, match="unknown aggregation 'fedprox'"):
        trained_part(state, "fedprox")
    with pytest.raises(ValueError, match="update has tensors the adapter does not"):
        with_update(sent, state)


def test_load_base_model_is_float32_and_gets_a_pad_token(model_dir: Path) -> None:
    model, tokenizer = load_base_model(model_dir)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert model.config.pad_token_id == tokenizer.eos_token_id


def test_load_base_model_errors_name_the_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="no-such-model"):
        load_base_model(missing)
    not_causal = tmp_path / "vision-model"
    ViTConfig().save_pretrained(not_causal)
    with pytest.raises(ValueError, match="vision-model.*not a causal language model"):
        load_base_model(not_causal)


def test_only_lora_tensors_are_trainable_and_exported(model_dir: Path) -> None:
    model = lora_model(model_dir)
    assert model.peft_config["default"].lora_dropout == 0.0
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    state = lora_state(model)
    assert len(trainable) == len(state) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    assert all(".lora_A." in name or ".lora_B." in name for name in state)
    assert list(state) == list(get_peft_model_state_dict(model))
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in state.values())
    name = next(iter(state))
    state[name].add_(1.0)  # a copy: changing it leaves the model alone
    assert not torch.equal(state[name], lora_state(model)[name])


def test_codec_round_trip_is_exact_and_keeps_order(model_dir: Path) -> None:
    sender = lora_model(model_dir, seed=1)
    sent = lora_state(sender)
    record = state_to_arrayrecord(sent)
    assert isinstance(record, ArrayRecord) and list(record) == list(sent)
    received = arrayrecord_to_state(record)
    assert list(received) == list(sent)
    assert all(torch.equal(received[name], sent[name]) for name in sent)

    receiver = lora_model(model_dir)
    load_lora_state(receiver, received)
    assert all(torch.equal(t, sent[name]) for name, t in lora_state(receiver).items())
    assert torch.equal(logits(receiver, model_dir), logits(sender, model_dir))


def test_bf16_tensors_travel_as_float32() -> None:
    record = state_to_arrayrecord({"layer.lora_A.weight": torch.ones(2, 3, dtype=torch.bfloat16)})
    assert record["layer.lora_A.weight"].dtype == "float32"
    decoded = arrayrecord_to_state(record)["layer.lora_A.weight"]
    assert decoded.dtype == torch.float32 and torch.equal(decoded, torch.ones(2, 3))


def test_undecodable_array_is_named() -> None:
    record = ArrayRecord({"x.lora_B.weight": Array(dtype="float32", shape=(1,), stype="raw", data=b"\0" * 4)})
    with pytest.raises(ValueError, match="x.lora_B.weight"):
        arrayrecord_to_state(record)


@pytest.mark.parametrize("defect", ["unknown", "missing", "shape", "dtype"])
def test_strict_load_names_the_bad_tensor_and_changes_nothing(model_dir: Path, defect: str) -> None:
    model = lora_model(model_dir, seed=2)
    before = lora_state(model)
    state = random_lora_state(model, seed=3)
    name = list(state)[5]
    if defect == "unknown":
        name = "base_model.model.lm_head.weight"
        state[name] = torch.zeros(1)
    elif defect == "missing":
        del state[name]
    elif defect == "shape":
        state[name] = state[name].T.contiguous()
    else:
        state[name] = state[name].to(torch.int64)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_lora_state(model, state)
    assert all(torch.equal(t, before[n]) for n, t in lora_state(model).items())


def test_saved_adapter_loads_with_plain_peft(model_dir: Path, tmp_path: Path) -> None:
    model = lora_model(model_dir, seed=4)
    out_dir = tmp_path / "checkpoint" / "adapter"
    save_adapter(model, out_dir)
    assert (out_dir / ADAPTER_CONFIG_FILE).is_file() and (out_dir / ADAPTER_WEIGHTS_FILE).is_file()
    assert set(load_file(out_dir / ADAPTER_WEIGHTS_FILE)) == set(lora_state(model))

    reloaded = PeftModel.from_pretrained(load_base_model(model_dir)[0], out_dir)
    assert torch.equal(logits(reloaded, model_dir), logits(model, model_dir))
    assert torch.equal(logits(load_adapter(model_dir, out_dir), model_dir), logits(model, model_dir))


def test_save_replaces_a_checkpoint_whole_or_not_at_all(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir = tmp_path / "adapter"
    first, second = lora_model(model_dir, seed=5), lora_model(model_dir, seed=6)
    save_adapter(first, out_dir)
    save_adapter(second, out_dir)
    saved = load_file(out_dir / ADAPTER_WEIGHTS_FILE)
    assert all(torch.equal(saved[name], t) for name, t in lora_state(second).items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]

    def crash(*_args: object, **_kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(first, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(first, out_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert all(torch.equal(load_file(out_dir / ADAPTER_WEIGHTS_FILE)[n], t) for n, t in saved.items())


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")  # PEFT only warns; we raise
def test_load_adapter_rejects_an_adapter_that_does_not_fit(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=ADAPTER_CONFIG_FILE):
        load_adapter(model_dir, tmp_path / "nothing-here")
    out_dir = tmp_path / "adapter"
    save_adapter(lora_model(model_dir, seed=7), out_dir)
    weights = load_file(out_dir / ADAPTER_WEIGHTS_FILE)
    dropped = sorted(weights)[0]
    del weights[dropped]
    save_file(weights, out_dir / ADAPTER_WEIGHTS_FILE)
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter(model_dir, out_dir)


def test_initial_adapter_is_reproducible_and_leaves_global_rng_alone(model_dir: Path) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = lora_state(initial_adapter(model_dir, SETTINGS, seed=9))
    assert torch.equal(torch.rand(1), expected_next)
    second = lora_state(initial_adapter(model_dir, SETTINGS, seed=9))
    other = lora_state(initial_adapter(model_dir, SETTINGS, seed=10))
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_initial_adapter_is_the_same_whatever_the_base_precision(model_dir: Path) -> None:
    """A coordinator on bfloat16 base weights starts from the same adapter as one on float32
    (PEFT alone would draw A in the base's precision and round it)."""
    expected = lora_state(initial_adapter(model_dir, SETTINGS, seed=9))
    base, _ = load_base_model(model_dir, dtype=torch.bfloat16)
    actual = lora_state(attach_seeded_lora(base, SETTINGS, seed=9))
    assert any(name.endswith("lora_A.weight") and tensor.abs().max() > 0
               for name, tensor in expected.items())
    assert all(torch.equal(actual[name], expected[name]) for name in expected)


def test_settings_are_validated(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="r must be positive"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="target_modules"):
        LoraConfig(target_modules=())
    with pytest.raises(ValueError, match="c_attn"):
        attach_lora(load_base_model(model_dir)[0], LoraConfig(target_modules=("c_attn",)))


def test_one_settings_type_from_the_job_and_back_from_requests() -> None:
    from privatune.common.config import JobConfig, LoraConfig
    from privatune.common.protocol import (EvaluateRequest, TrainRequest, evaluate_request,
                                           requested_lora, train_request)

    settings = LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj"))
    job = JobConfig(lora=settings)
    train = TrainRequest.from_record(train_request(job, "run", 1).to_record())
    evaluate = EvaluateRequest.from_record(evaluate_request(job, "run", 1).to_record())
    assert requested_lora(train) == requested_lora(evaluate) == settings


def test_a_merged_lora_on_a_tied_head_leaves_the_embedding_alone(tiny_model_dir, tmp_path):
    """The builtin model ties its output head to its input embedding. Merging a LoRA on
    lm_head must change the head only: the merged model computes what base + adapter did, and
    its embedding is still the base's."""
    base, _tokenizer = load_base_model(tiny_model_dir)
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    model = attach_seeded_lora(base, LoraConfig(r=4, alpha=8, target_modules=("q_proj",
                                                                              "lm_head")), 0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    save_adapter(model, tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        wanted = model(input_ids=ids).logits
    merged, _tokenizer = merged_model(tiny_model_dir, tmp_path / "adapter")
    fresh, _tokenizer = load_base_model(tiny_model_dir)
    torch.testing.assert_close(merged.get_input_embeddings().weight,
                               fresh.get_input_embeddings().weight)
    assert not torch.allclose(merged.get_output_embeddings().weight,
                              fresh.get_output_embeddings().weight)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, wanted, rtol=1e-4, atol=1e-5)
    merged.save_pretrained(tmp_path / "release")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "release")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, wanted, rtol=1e-4, atol=1e-5)
