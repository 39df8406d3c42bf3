"""The demo base model builder: a loadable, cached, atomically written Hugging Face model."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from privatune.common.base_model import (
    BUILD_INFO_FILE,
    BUILD_RECIPE_VERSION,
    CORPORA,
    BaseModelSpec,
    collect_corpus,
    collect_icd10cm_titles,
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
    assert (info["corpus"]["name"], info["corpus"]["description"]) == (SPEC.corpus, CORPORA[SPEC.corpus])
    assert info["corpus"]["tokenizer"] == CORPORA[SPEC.corpus]


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
    other = next(name for name in CORPORA if name != SPEC.corpus)
    assert replace(SPEC, corpus=other).cache_key != SPEC.cache_key
    assert replace(SPEC, tokenizer_corpus=other).cache_key != SPEC.cache_key


def test_models_cached_before_the_corpus_fields_keep_their_key() -> None:
    """The default corpus builds what the recipe built before `corpus` existed: same key."""
    before = {name: value for name, value in asdict(SPEC).items()
              if name not in ("corpus", "tokenizer_corpus")}
    payload = json.dumps({"recipe": BUILD_RECIPE_VERSION, **before}, sort_keys=True)
    assert SPEC.cache_key == hashlib.sha256(payload.encode()).hexdigest()[:16]
    assert collect_corpus("python", 50_000) == collect_public_corpus(50_000)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hidden_size": 30, "heads": 4}, "hidden_size"),
        ({"vocab_size": 200}, "vocab_size"),
        ({"pretrain_seq_len": 512}, "pretrain_seq_len"),
        ({"layers": 0}, "layers"),
        ({"corpus": "notes"}, "corpus"),
        ({"tokenizer_corpus": "notes"}, "tokenizer_corpus"),
    ],
)
def test_invalid_spec_names_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        replace(SPEC, **change)


def test_public_corpus_is_deterministic_and_bounded() -> None:
    first = collect_public_corpus(50_000)
    assert first == collect_public_corpus(50_000)
    assert sum(len(doc.encode("utf-8")) for doc in first) <= 50_000
    assert len(set(first)) == len(first)


# Headings and units every clinosim note carries (and the notes the tests write): a corpus
# document holding one would be note text, which the base must never see.
NOTE_MARKERS = ("Subjective:", "Objective:", "Assessment:", "Plan:", "mmHg", "Patient admitted")


def test_icd10cm_corpus_holds_the_medical_vocabulary_beside_python_and_no_note() -> None:
    pytest.importorskip("simple_icd_10_cm")
    documents = collect_corpus("python+icd10cm", 400_000)
    assert documents == collect_corpus("python+icd10cm", 400_000)
    assert sum(len(doc.encode("utf-8")) for doc in documents) <= 400_000
    python = set(collect_public_corpus(200_000))
    icd = [doc for doc in documents if doc not in python]
    assert python <= set(documents) and len(icd) > 50
    # about half the bytes each, interleaved, and the titles span the chapters (A.. to Z..)
    icd_bytes = sum(len(doc.encode("utf-8")) for doc in icd)
    assert 150_000 < icd_bytes < 250_000
    assert documents.index(icd[0]) < len(documents) // 10
    everything = collect_icd10cm_titles(10_000_000)  # the whole tabular list: about 7 MB
    text = "\n".join(everything)
    for title in ("Essential (primary) hypertension", "Type 2 diabetes mellitus without complications"):
        assert title in text, title
    assert set(icd) <= set(everything)
    last_tenth = set(range(len(everything) * 9 // 10, len(everything)))
    assert {everything.index(doc) for doc in icd} & last_tenth
    assert not any(marker in doc for doc in documents for marker in NOTE_MARKERS)


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


def test_a_tokenizer_corpus_of_its_own_gives_the_pieces_of_that_corpus(
        built: tuple[Path, list[str]], tmp_path: Path) -> None:
    """Pretrained on Python's text and the ICD-10-CM titles, tokenized with Python's pieces."""
    pytest.importorskip("simple_icd_10_cm")
    spec = replace(SPEC, corpus="python+icd10cm", tokenizer_corpus="python")
    model_dir = ensure_base_model(tmp_path, spec)
    info = json.loads((model_dir / BUILD_INFO_FILE).read_text())
    assert (info["corpus"]["name"], info["corpus"]["tokenizer"]) == ("python+icd10cm", CORPORA["python"])
    python_only = AutoTokenizer.from_pretrained(built[0]).get_vocab()
    assert AutoTokenizer.from_pretrained(model_dir).get_vocab() == python_only
    python_info = json.loads((built[0] / BUILD_INFO_FILE).read_text())
    assert info["corpus"]["sha256"] != python_info["corpus"]["sha256"]
