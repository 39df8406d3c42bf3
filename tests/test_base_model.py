"""The demo base model builder: a loadable, cached, atomically written Hugging Face model."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from privatune.common.base_model import (
    BUILD_INFO_FILE,
    BaseModelSpec,
    collect_public_corpus,
    ensure_base_model,
)

SPEC = BaseModelSpec(
    vocab_size=320,
    hidden_size=32,
    layers=1,
    heads=2,
    intermediate_size=64,
    max_positions=64,
    pretrain_steps=30,
    pretrain_batch_size=8,
    pretrain_seq_len=32,
    corpus_max_bytes=120_000,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    lines: list[str] = []
    model_dir = ensure_base_model(tmp_path_factory.mktemp("cache"), SPEC, lines.append)
    return model_dir, lines


def test_build_writes_a_normal_hugging_face_model_directory(built: tuple[Path, list[str]]) -> None:
    model_dir, lines = built
    assert model_dir.name.endswith(SPEC.cache_key)
    expected_files = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    for name in [*expected_files, BUILD_INFO_FILE]:
        assert (model_dir / name).is_file(), name
    assert lines and all(line.startswith("base model:") for line in lines)

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.hidden_size == SPEC.hidden_size and model.config.num_hidden_layers == SPEC.layers
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == model.config.vocab_size == SPEC.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        model.config.bos_token_id,
        model.config.eos_token_id,
        model.config.pad_token_id,
    )
    texts = ["Return the sum of the numbers.", "Raise an error."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == SPEC.vocab_size and torch.isfinite(logits).all()


def test_tokenizer_round_trips_text_and_adds_bos(built: tuple[Path, list[str]]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built[0])
    texts = ["Open the file and return its lines.", "  tabs\tand\nnewlines ", "ünïcödé 漢字 🙂", ""]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_pretraining_beats_the_random_model(built: tuple[Path, list[str]]) -> None:
    info = json.loads((built[0] / BUILD_INFO_FILE).read_text())
    assert info["spec"] == asdict(SPEC)
    assert info["held_out_perplexity"]["after"] < 0.8 * info["held_out_perplexity"]["before"]
    assert 0 < info["corpus"]["bytes"] <= SPEC.corpus_max_bytes


def test_second_call_reuses_the_cached_model(built: tuple[Path, list[str]]) -> None:
    model_dir = built[0]
    weights_written = (model_dir / "model.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    assert ensure_base_model(model_dir.parent, SPEC, lines.append) == model_dir
    assert lines == [f"base model: using cached {model_dir}"]
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == weights_written


def test_interrupted_build_leaves_no_model(tmp_path: Path) -> None:
    def interrupt(line: str) -> None:
        if "tokenizer trained" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_base_model(tmp_path, SPEC, interrupt)
    assert not any(path.is_dir() for path in tmp_path.iterdir())


def test_cache_key_follows_every_spec_field() -> None:
    assert replace(SPEC, seed=1).cache_key != SPEC.cache_key
    assert replace(SPEC, pretrain_steps=31).directory_name != SPEC.directory_name
    assert BaseModelSpec().cache_key == BaseModelSpec().cache_key


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hidden_size": 30, "heads": 4}, "hidden_size"),
        ({"vocab_size": 200}, "vocab_size"),
        ({"pretrain_seq_len": 512}, "pretrain_seq_len"),
        ({"layers": 0}, "layers"),
    ],
)
def test_invalid_spec_names_the_field(change: dict[str, int], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        replace(SPEC, **change)


def test_public_corpus_is_deterministic_and_bounded() -> None:
    first = collect_public_corpus(50_000)
    assert first == collect_public_corpus(50_000)
    assert sum(len(doc.encode("utf-8")) for doc in first) <= 50_000
    assert len(set(first)) == len(first)


def test_the_report_names_a_builtin_model_its_shape_and_its_training(
        built: tuple[Path, list[str]], tmp_path: Path) -> None:
    from privatune.common.model_source import describe_base_model

    text = describe_base_model(built[0])
    assert text.startswith("privatune builtin: llama,")
    assert f"{SPEC.layers} layers x {SPEC.hidden_size} hidden" in text
    assert f"pretrained {SPEC.pretrain_steps} steps" in text and built[0].name in text
    # a Hugging Face directory privatune did not build: its config and its path
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(built[0] / "config.json", plain / "config.json")
    assert describe_base_model(plain) == (f"llama, {SPEC.layers} layers x {SPEC.hidden_size} "
                                          f"hidden, vocabulary {SPEC.vocab_size}; from {plain}")
