"""Where and in what precision a model runs: a site's (or the coordinator's) own choice.

The hardware is the site's choice (its policy), never the coordinator's. ``auto`` takes a GPU
when there is one and bfloat16 where the device supports it. The base weights may be half
precision; the LoRA factors stay float32 (common.lora.attach_lora), so per-sample gradients,
their norms, clipping and noise are float32 whatever the base precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from privatune.common.config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Hardware:
    device: torch.device
    dtype: torch.dtype


def _auto_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _supports_bfloat16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_hardware(device: str, dtype: str, where: str = "site") -> Hardware:
    """The device and base-weight precision a policy names (``auto`` resolved on this machine).

    A device this machine does not have is an error naming the policy key, never a silent
    fallback to the CPU.
    """
    chosen = _auto_device() if device == "auto" else torch.device(device)
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{where}.device: {device!r}, but this machine has no CUDA GPU "
                              "(torch.cuda.is_available() is false)")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ConfigError(f"{where}.device: {device!r}, but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    if chosen.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise ConfigError(f"{where}.device: {device!r}, but MPS is not available here")
    if dtype == "auto":
        precision = torch.bfloat16 if _supports_bfloat16(chosen) else torch.float32
    else:
        precision = DTYPES[dtype]
    return Hardware(chosen, precision)
