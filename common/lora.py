"""LoRA through PEFT, and the adapter codec between PEFT models and Flower records.

Only LoRA tensors ever travel between a hospital node and the coordinator, and they travel
under the same names PEFT uses in its saved adapters (`get_peft_model_state_dict`, without
the adapter name), so a received state, a checkpoint and a PEFT adapter directory all agree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from privatune.common.config import AGGREGATIONS, LoraConfig
from privatune.common.hardware import attention_implementation

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_LORA_FACTORS = ("lora_A", "lora_B")
ALL_LINEAR = "all-linear"


def load_base_model(model_dir: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer on ``device`` in ``dtype``, without touching the network.

    `model_dir` is a local model directory, or a hub id already in the local Hugging Face
    cache. The precision is always explicit because transformers 5 otherwise keeps the
    checkpoint's dtype; the LoRA factors attached later are float32 whatever the base's
    precision. The attention kernel follows the device and precision
    (common.hardware.attention_implementation). A missing pad token is set to the eos token so
    batches can be padded.
    """
    location = str(model_dir)
    try:
        config = AutoConfig.from_pretrained(location, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"base model {location!r}: not a model directory (no readable config.json) "
            f"and not in the local Hugging Face cache: {error}"
        ) from error
    try:
        attention = attention_implementation(torch.device(device), dtype)
        model = AutoModelForCausalLM.from_pretrained(
            location, config=config, dtype=dtype, local_files_only=True,
            **({"attn_implementation": attention} if attention else {})
        ).to(device)
    except ValueError as error:
        raise ValueError(
            f"base model {location!r} is not a causal language model ({type(config).__name__}): {error}"
        ) from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"base model {location!r}: cannot load its tokenizer: {error}") from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"base model {location!r}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def attach_lora(model: PreTrainedModel, settings: LoraConfig) -> PeftModel:
    """Wrap `model` with a fresh LoRA adapter; only the LoRA factors stay trainable.

    Dropout is always 0: the LoRA per-sample gradient engine (client/lora_grad_sampler.py) is
    written and tested without it, and training stays deterministic given the noise. (The DP
    guarantee would not need it: clipping bounds each example's gradient whatever the mask.)
    Note that PEFT injects the adapter layers into `model` itself.
    """
    targets = settings.target_modules
    config = PeftLoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        # PEFT resolves "all-linear" to every linear layer but the output head
        target_modules=ALL_LINEAR if targets == (ALL_LINEAR,) else list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )
    try:
        with _tied_head_handled():
            peft_model = get_peft_model(model, config)
    except ValueError as error:
        raise ValueError(
            f"LoRA target_modules {list(settings.target_modules)} do not fit the model: {error}"
        ) from error
    lora_parameters = _lora_parameters(peft_model)
    for parameter in lora_parameters.values():
        # DP-SGD's per-sample gradients, clipping and noise run in the factors' precision
        parameter.data = parameter.data.to(torch.float32)
    lora_parameter_ids = {id(parameter) for parameter in lora_parameters.values()}
    for name, parameter in peft_model.named_parameters():
        if parameter.requires_grad and id(parameter) not in lora_parameter_ids:
            raise RuntimeError(f"attach_lora: non-LoRA parameter {name!r} is trainable")
    return peft_model


def initial_adapter(model_dir: str | Path, settings: LoraConfig, seed: int) -> PeftModel:
    """The run's starting adapter: identical for everyone who uses the same seed.

    LoRA's A factors are initialised randomly (B is zero); seeding a private generator
    scope makes the start reproducible without disturbing the caller's random state.
    """
    base_model, _tokenizer = load_base_model(model_dir)
    return attach_seeded_lora(base_model, settings, seed)


def attach_seeded_lora(model: PreTrainedModel, settings: LoraConfig, seed: int) -> PeftModel:
    """``attach_lora`` with the run's seeded initialisation (see ``initial_adapter``): each
    lora_A drawn as PEFT draws it (Kaiming-uniform) from a float32 generator seeded with
    ``seed``, in model order, and B zero, so the start is the same whatever the base weights'
    precision and device (PEFT draws in the base's precision: a bfloat16 base rounded A)."""
    with torch.random.fork_rng(devices=[]):  # PEFT's own draws leave the caller's RNG alone
        peft_model = attach_lora(model, settings)
    seed_lora(peft_model, seed)
    return peft_model


def seed_lora(peft_model: PeftModel, seed: int) -> None:
    """Set the adapter's factors, in place, to the run's seeded start (``attach_seeded_lora``)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in _lora_parameters(peft_model).items():
            if _factor(name) == "lora_A":
                draw = torch.empty(parameter.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(draw, a=math.sqrt(5), generator=generator)
                parameter.copy_(draw)
            else:
                parameter.zero_()


def trained_factors(aggregation: str) -> tuple[str, ...]:
    """The LoRA factors a run trains, sends and averages under its ``federation.aggregation``.

    ``fedavg``: both. ``ffa`` (FFA-LoRA, Sun et al., ICLR 2024): only ``lora_B``; ``lora_A``
    stays at the run's seeded initialisation, the same at every site, so the average of the
    sites' B·A is the averaged B times A, DP noise enters the product linearly, and an update
    is half the size for square projections.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r} (expected one of "
                         f"{', '.join(AGGREGATIONS)})")
    return _LORA_FACTORS if aggregation == "fedavg" else ("lora_B",)


def _factor(name: str) -> str:
    """``lora_A`` or ``lora_B``: the factor a LoRA tensor name (``<module>.<factor>.weight``) is of."""
    return name.rsplit(".", 2)[-2]


def trained_part(state: Mapping[str, torch.Tensor], aggregation: str) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` that ``aggregation`` trains (what a node sends back), in order."""
    factors = trained_factors(aggregation)
    return {name: tensor for name, tensor in state.items() if _factor(name) in factors}


def frozen_part(state: Mapping[str, torch.Tensor], aggregation: str) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` that ``aggregation`` keeps frozen (ffa: every lora_A), in order."""
    factors = trained_factors(aggregation)
    return {name: tensor for name, tensor in state.items() if _factor(name) not in factors}


def with_update(state: Mapping[str, torch.Tensor],
                update: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the tensors of ``update`` (a trained part) put in, same names and order."""
    unknown = sorted(set(update) - set(state))
    if unknown:
        raise ValueError(f"update has tensors the adapter does not: {unknown[:3]}")
    return {name: update.get(name, tensor) for name, tensor in state.items()}


def train_factors(model: PeftModel, aggregation: str) -> None:
    """Make exactly the factors ``aggregation`` trains require gradients (ffa freezes lora_A),
    so DP-SGD computes, clips and noises per-sample gradients of those alone."""
    factors = trained_factors(aggregation)
    for name, parameter in _lora_parameters(model).items():
        parameter.requires_grad_(_factor(name) in factors)


def lora_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """Detached float32 CPU copies of the active adapter's LoRA tensors, in model order."""
    return {
        name: parameter.detach().to(device="cpu", dtype=torch.float32, copy=True)
        for name, parameter in _lora_parameters(model).items()
    }


def load_lora_state(model: PeftModel, state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state` into the active adapter's LoRA tensors, in place.

    Strict: every LoRA tensor must be present, nothing else may be, and shapes must match;
    everything is checked before anything is written, so a bad state never half-loads.
    Parameters are updated in place, so optimizers holding them stay valid.
    """
    parameters = _lora_parameters(model)
    for name in state:
        if name not in parameters:
            raise ValueError(f"LoRA state has unknown tensor {name!r} (not a LoRA tensor of this model)")
    for name, parameter in parameters.items():
        if name not in state:
            raise ValueError(f"LoRA state is missing tensor {name!r}")
        value = state[name]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"LoRA tensor {name!r} is a {type(value).__name__}, expected a torch.Tensor")
        if not value.is_floating_point():
            raise ValueError(f"LoRA tensor {name!r} has dtype {value.dtype}, expected a floating point dtype")
        if value.shape != parameter.shape:
            raise ValueError(
                f"LoRA tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(parameter.shape)}"
            )
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(state[name])


def save_adapter(model: PeftModel, out_dir: Path) -> None:
    """Save the active adapter in PEFT format, replacing `out_dir` only once fully written.

    The adapter is written to a sibling temporary directory and renamed into place; an
    existing checkpoint is moved aside first and deleted last, so at every moment one
    complete adapter exists (at `out_dir`, or at the `.previous-` sibling while swapping).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"save_adapter: {out_dir} exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    adapter_name = model.active_adapter
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    previous: Path | None = None
    try:
        # only the LoRA factors: with lm_head targeted PEFT would also save the (frozen, base)
        # head weight, which is the base model's, not the adapter's
        model.save_pretrained(staging, selected_adapters=[adapter_name],
                              save_embedding_layers=False)
        # PEFT puts every adapter but "default" in a subdirectory named after it.
        written = staging if adapter_name == "default" else staging / adapter_name
        if out_dir.exists():
            previous = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.previous-"))
            previous.rmdir()
            out_dir.rename(previous)
        written.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    if previous is not None:
        shutil.rmtree(previous)


def read_adapter_state(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA tensors of an adapter saved in PEFT format (checked to be a LoRA adapter)."""
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / ADAPTER_CONFIG_FILE
    weights_file = adapter_dir / ADAPTER_WEIGHTS_FILE
    for required in (config_file, weights_file):
        if not required.is_file():
            raise FileNotFoundError(f"no PEFT adapter at {adapter_dir}: {required.name} is missing")
    adapter_type = json.loads(config_file.read_text()).get("peft_type")
    if adapter_type != "LORA":
        raise ValueError(f"adapter at {adapter_dir} is of type {adapter_type!r}, expected 'LORA'")
    return load_file(weights_file)


def load_adapter(base_model_dir: str | Path, adapter_dir: str | Path) -> PeftModel:
    """Load the base model with a saved adapter on top, checking the adapter fits exactly.

    PEFT itself only warns about adapter tensors that do not fit the model; here the saved
    tensors are re-applied strictly, so a mismatched checkpoint is an error naming the tensor.
    """
    state = read_adapter_state(adapter_dir)
    base_model, _tokenizer = load_base_model(base_model_dir)
    with _tied_head_handled():
        peft_model = PeftModel.from_pretrained(base_model, adapter_dir)
    try:
        load_lora_state(peft_model, state)
    except ValueError as error:
        raise ValueError(
            f"adapter at {adapter_dir} does not fit base model {str(base_model_dir)!r}: {error}"
        ) from error
    return peft_model


def merged_model(base_model_dir: str | Path, adapter_dir: str | Path
                 ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model with a saved adapter merged into its weights, and the base's tokenizer.

    The adapter is checked to fit exactly (as in ``load_adapter``), merged in float32 with
    PEFT's ``merge_and_unload`` and the result cast back to the precision the base checkpoint
    is stored in. What comes back is a plain transformers model: saved with
    ``save_pretrained`` it loads with ``AutoModelForCausalLM.from_pretrained``, no PEFT needed.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir), local_files_only=True)
    adapted = load_adapter(base_model_dir, adapter_dir)
    _untie_adapted_head(adapted)
    merged = adapted.merge_and_unload()
    stored = _stored_dtype(base_model_dir)
    if stored is not None and stored != torch.float32:
        merged = merged.to(stored)
    return merged, tokenizer


@contextlib.contextmanager
def _tied_head_handled() -> Iterator[None]:
    """PEFT warns, at every wrap, that a LoRA on a head tied to the embedding could change the
    embedding when merged: ``merged_model`` unties the head first (``_untie_adapted_head``), and
    training never merges, so the warning (once per node, baseline and evaluation) is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*tie_word_embeddings=True.*tied layer is part "
                                r"of the adapter", category=UserWarning)
        yield


def _untie_adapted_head(model: PeftModel) -> None:
    """A LoRA on an output head that shares its weight with the input embedding (the builtin
    model's) would, once merged, change the embedding too: the head gets its own copy of the
    weight first, and the config stops tying them, so the merged model computes what the
    adapter did."""
    base = model.get_base_model()
    head, embedding = base.get_output_embeddings(), base.get_input_embeddings()
    layer = getattr(head, "base_layer", None)
    if layer is not None and embedding is not None and layer.weight is embedding.weight:
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone(),
                                          requires_grad=layer.weight.requires_grad)
        base.config.tie_word_embeddings = False


def _stored_dtype(model_dir: str | Path) -> torch.dtype | None:
    """The precision a model checkpoint declares in its config (None if it declares none)."""
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def update_hash(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of an update exactly as sent (names and float32 bytes, in name order): the node
    records it in its ledger, the coordinator of what it received, and the audit compares."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().to(device="cpu", dtype=torch.float32).contiguous()
                      .numpy().tobytes())
    return digest.hexdigest()


def _lora_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """The active adapter's LoRA parameters under PEFT's saved-adapter names, in model order."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"expected a PeftModel, got {type(model).__name__}")
    adapter_name = model.active_adapter
    parameters: dict[str, torch.nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for factor in _LORA_FACTORS:
            factor_modules = getattr(module, factor)
            if adapter_name in factor_modules:
                for parameter_name, parameter in factor_modules[adapter_name].named_parameters():
                    parameters[f"{module_name}.{factor}.{parameter_name}"] = parameter
    if not parameters:
        raise ValueError(f"model has no LoRA tensors for adapter {adapter_name!r}")
    return parameters
