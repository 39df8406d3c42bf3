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


def cpu_has_bfloat16() -> bool:
    """This CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX): there a bfloat16
    matrix product ran 4 to 7.5 times faster than a float32 one (one core, demo-model shapes);
    without those instructions bfloat16 is emulated and slower."""
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def _supports_bfloat16(device: torch.device) -> bool:
    if device.type == "cuda":
        # native bf16 from Ampere (compute capability 8.0) on; is_bf16_supported() also counts
        # emulation, and asks about the current device rather than this one
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and cpu_has_bfloat16()


def attention_implementation(device: torch.device, dtype: torch.dtype) -> str | None:
    """The attention kernel to load a model with (None: transformers' default, SDPA).

    On the CPU in half precision, eager attention: PyTorch's CPU flash-attention kernel is slow
    in bfloat16 (a DP-LoRA step of the demo model took 0.226 s with it against 0.177 s eager,
    and 1.08 s against 0.95 s at the benchmark's 40m shape, 8x128). In float32 the two were
    within 5% of each other, and accelerators keep SDPA.
    """
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return "eager"
    return None


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
