"""Base model loading, LoRA through PEFT, and the adapter codec (tensors <-> Flower records).

Only LoRA tensors ever travel between node and coordinator; they are float32 because Flower's
ArrayRecord cannot hold bf16. Adapters are saved in PEFT format, atomically.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                       "gate_proj", "up_proj", "down_proj")


def load_base_model(model_dir: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a local directory, float32 on CPU."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a model directory (no config.json); give the local "
                         "directory of a Hugging Face causal language model")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: cannot load a causal language model and tokenizer: {err}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def attach_lora(model: PreTrainedModel, settings: LoraSettings) -> PeftModel:
    """Wrap with LoRA; dropout is always 0 (DP-SGD's per-sample analysis assumes none)."""
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=0.0, bias="none",
                        target_modules=list(settings.target_modules), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(f"lora.target_modules {list(settings.target_modules)}: {err}") from err


def initial_adapter(model_dir: str | Path, settings: LoraSettings, seed: int) -> PeftModel:
    """The run's starting adapter: the same for everyone who uses the same seed."""
    base, _ = load_base_model(model_dir)
    torch.manual_seed(seed)
    return attach_lora(base, settings)


def lora_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The LoRA tensors only (names without the adapter name), as float32 CPU copies."""
    state = get_peft_model_state_dict(model)
    return {name: tensor.detach().to("cpu", torch.float32).clone()
            for name, tensor in sorted(state.items()) if "lora_" in name}


def load_lora_state(model: PeftModel, state: Mapping[str, torch.Tensor]) -> None:
    """Load LoRA tensors strictly: unknown or missing names, or a wrong shape, is an error."""
    expected = lora_state(model)
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        raise ValueError(f"adapter tensors do not match the model: missing {missing[:3]}, "
                         f"unknown {unknown[:3]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"adapter tensor {name}: shape {tuple(tensor.shape)}, expected "
                             f"{tuple(expected[name].shape)}")
    result = set_peft_model_state_dict(model, {n: t.to(torch.float32) for n, t in state.items()})
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter tensors not used by the model: {unexpected[:3]}")


def save_adapter(model: PeftModel, out_dir: Path) -> None:
    """PEFT format (adapter_config.json + adapter_model.safetensors), replaced atomically."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    try:
        model.save_pretrained(staging)
        if out_dir.exists():
            retired = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            out_dir.rename(retired)
            staging.rename(out_dir)
            shutil.rmtree(retired)
        else:
            staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def load_adapter(base_model_dir: str | Path, adapter_dir: str | Path) -> PeftModel:
    """A saved adapter on its base model (as any PEFT user would load it)."""
    base, _ = load_base_model(base_model_dir)
    return PeftModel.from_pretrained(base, str(adapter_dir))


def state_to_arrayrecord(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Encode LoRA tensors for Flower as float32 NumPy arrays, in name order."""
    return ArrayRecord({name: Array(np.ascontiguousarray(
        state[name].detach().to("cpu", torch.float32).numpy())) for name in sorted(state)})


def arrayrecord_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Decode a Flower ArrayRecord of LoRA tensors."""
    return {name: torch.from_numpy(np.array(array.numpy(), dtype=np.float32, copy=True))
            for name, array in record.items()}
