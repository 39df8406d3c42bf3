"""One copy of the base weights per process, on the site's hardware (common.hardware).

Every site served by one process (a hospital's node, or a simulation worker that plays many
hospitals) shares one base model per (directory, device, dtype), with the LoRA adapter attached
once; so does a coordinator that runs in the same process (a local-only baseline: a coordinator
and its one node in one worker). Each user loads the adapter state it means before every use,
and asks for the model again each time (another LoRA setting replaces the adapter, and with it
the PeftModel object), so sharing is safe for the sequential requests one process serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from privatune.common.hardware import Hardware
from privatune.common.config import LoraConfig
from privatune.common.lora import attach_lora, load_base_model
from privatune.common.process_heap import keep_for_process_lifetime

@dataclass
class _Loaded:
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    lora: LoraConfig


_SHARED: dict[tuple[str, str, torch.dtype], _Loaded] = {}


def adapter_model(model_dir: Path, hardware: Hardware,
                  lora: LoraConfig) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The process's one base model at ``model_dir`` on this hardware, with a LoRA adapter of
    these settings attached (its values are whatever the last request loaded into it).

    The base is placed on its device before the adapter is attached (Opacus issue 820: moving
    a model after ``get_peft_model`` corrupted LoRA training). A request with other LoRA
    settings unloads the old adapter and attaches a new one to the same base weights.
    """
    key = (str(Path(model_dir).resolve()), str(hardware.device), hardware.dtype)
    loaded = _SHARED.get(key)
    if loaded is None:
        base, tokenizer = load_base_model(model_dir, device=hardware.device, dtype=hardware.dtype)
        loaded = _SHARED[key] = _Loaded(attach_lora(base, lora), tokenizer, lora)
        keep_for_process_lifetime()
    elif loaded.lora != lora:
        loaded.model = attach_lora(loaded.model.unload(), lora)
        loaded.lora = lora
    return loaded.model, loaded.tokenizer


def shared_base_models() -> int:
    """How many base models this process holds (one per directory, device and dtype)."""
    return len(_SHARED)
