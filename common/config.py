"""Typed configuration: YAML files validated into frozen dataclasses.

Every error names the file, the dotted key and (where YAML knows it) the line, because a
hospital IT team editing a policy file by hand must be told exactly what to fix.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message says where."""


def bounded(low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False, doc: str = "") -> dict[str, Any]:
    """Field metadata for a numeric range check (``low < x`` when ``low_open``, ``x < high``
    when ``high_open``)."""
    return {"low": low, "high": high, "low_open": low_open, "high_open": high_open, "doc": doc}


def choice(*options: str) -> dict[str, Any]:
    """Field metadata restricting a string to a fixed set of values."""
    return {"choices": options}


def device_choice() -> dict[str, Any]:
    """Field metadata for a torch device a user may name: auto, cpu, cuda, cuda:N or mps."""
    return {"pattern": r"auto|cpu|cuda(:\d+)?|mps", "expected": "auto, cpu, cuda, cuda:N or mps"}


# How the coordinator combines the sites' LoRA updates (common/lora.py ``trained_factors``):
# fedavg trains and averages both factors; ffa (FFA-LoRA, Sun et al., ICLR 2024) keeps A frozen
# at the run's seeded initialisation and trains, sends and averages only B
AGGREGATIONS = ("fedavg", "ffa")


def accountant_name(choice: str) -> str:
    """The name a ledger records for a config's ``accountant`` choice (``prv`` or ``rdp``)."""
    return f"opacus-{choice}"


def patient_windows(unit: str, patient_sampling: str) -> bool:
    """Whether a drawn privacy unit is a fresh window of a patient's text (else the text,
    truncated): the job's and the site policy's privacy settings mean the same."""
    return unit == "patient" and patient_sampling == "window"


# --------------------------------------------------------------------------- job config


@dataclass(frozen=True)
class ModelConfig:
    # "builtin" = the demo's own small model; a packaged model's name (smollm2-135m), a local
    # .gguf file (both dequantised once and cached: common/model_source.py); a local HF directory
    base: str = "builtin"
    cache_dir: str = ".cache/privatune"
    max_length: int = field(default=128, metadata=bounded(8, 4096))
    builtin_pretrain_steps: int = field(default=600, metadata=bounded(0, 100_000))
    # the coordinator's own hardware for its copy of the model (central evaluation, export);
    # each hospital picks its own in its site policy
    device: str = field(default="auto", metadata=device_choice())
    dtype: str = field(default="auto", metadata=choice("auto", "float32", "bfloat16", "float16"))


@dataclass(frozen=True)
class LoraConfig:
    """Shape of the LoRA adapter: rank, scaling (alpha / r) and which linear layers get one;
    the job's ``lora`` section, and the one type every module passes (common/lora.py)."""

    r: int = field(default=8, metadata=bounded(1, 256))
    alpha: int = field(default=16, metadata=bounded(1, 1024))
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                       "gate_proj", "up_proj", "down_proj")

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"lora.r must be positive, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha}")
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module")


@dataclass(frozen=True)
class TrainingConfig:
    local_steps: int = field(default=30, metadata=bounded(1, 100_000))
    batch_size: int = field(default=16, metadata=bounded(1, 4096))
    learning_rate: float = field(default=0.01, metadata=bounded(0, 10, low_open=True))
    max_grad_norm: float = field(default=1.0, metadata=bounded(0, 1e6, low_open=True))
    eval_batch_size: int = field(default=32, metadata=bounded(1, 4096))
    # the most examples a node puts through one forward/backward pass (0: no limit); a larger
    # Poisson batch is split into micro-batches, the same DP step (a site's policy may lower it)
    max_physical_batch_size: int = field(default=0, metadata=bounded(0, 4096))
    # recompute activations in the backward pass instead of keeping them: less memory, more compute
    gradient_checkpointing: bool = False
    # what the loss is on: "completion", a note without a prompt is split at evaluation.marker as
    # the generation task splits it, and the loss is on what follows (what the model is judged
    # on), the end of the note before it the context; "judged", the same, and only the notes
    # the marker splits (or pairs with a prompt) train: the rest, never judged, are never
    # sampled (no privacy spent on them), and the held-out loss is over judged notes too;
    # "note", the whole note from its start
    loss_on: str = field(default="completion", metadata=choice("completion", "judged", "note"))


@dataclass(frozen=True)
class MechanismSettings:
    """What a job's ``privacy`` section and a site policy's both state, in the same words:
    the privacy unit, delta, the noise floor and the accountant (one type, one validation)."""

    # a mechanism may fail with probability delta: at 1 it promises nothing (each site's node
    # further refuses a delta not below 1 / its number of privacy units)
    delta: float = field(default=1e-5, metadata=bounded(0, 1, low_open=True, high_open=True))
    unit: str = field(default="record", metadata=choice("record", "patient"))
    # with the patient unit, what a patient is each time they are drawn: a fresh window of their
    # whole text (all of it gets trained on), or their text cut once at max_length
    patient_sampling: str = field(default="truncate", metadata=choice("window", "truncate"))
    min_noise_multiplier: float = field(default=0.3, metadata=bounded(0, 1e3))
    # prv: Opacus' PRV accountant (tightest sound bound); rdp: the looser RDP bound
    accountant: str = field(default="prv", metadata=choice("prv", "rdp"))

    @property
    def accountant_name(self) -> str:
        """The accountant's name as ledgers record it (``opacus-prv`` or ``opacus-rdp``)."""
        return accountant_name(self.accountant)

    @property
    def patient_windows(self) -> bool:
        return patient_windows(self.unit, self.patient_sampling)


@dataclass(frozen=True)
class PrivacyConfig(MechanismSettings):
    """The job's ``privacy``: each site's budget over the run (a site's policy may cap lower)."""

    epsilon: float = field(default=8.0, metadata=bounded(0, 1e4, low_open=True))


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = field(default=3, metadata=bounded(1, 10_000))
    min_nodes: int = field(default=2, metadata=bounded(1, 100_000))
    min_replies: int = field(default=2, metadata=bounded(1, 100_000))
    fraction_train: float = field(default=1.0, metadata=bounded(0, 1, low_open=True))
    node_wait_s: float = field(default=120.0, metadata=bounded(0, 86_400, low_open=True))
    round_timeout_s: float = field(default=1800.0, metadata=bounded(0, 86_400, low_open=True))
    # Defences against a site that tries to take over the global model (server/aggregation.py)
    max_update_norm: float = field(default=0.0, metadata=bounded(0, 1e12))  # 0: derived per round
    update_norm_multiple: float = field(default=10.0, metadata=bounded(1, 1e6))
    max_site_examples: int = field(default=1_000_000, metadata=bounded(1, 10**12))
    weighting: str = field(default="examples", metadata=choice("examples", "equal"))
    robust: str = field(default="none", metadata=choice("none", "median", "trimmed_mean"))
    aggregation: str = field(default="fedavg", metadata=choice(*AGGREGATIONS))
    # local_dp: each site trains local_steps DP-SGD steps with its own Gaussian noise and sends
    # its update; secure_dpsgd: each round is local_steps DP-SGD steps of the union of the
    # sites' records, the noise shared among them and only the sum seen (the ``secure`` section)
    mode: str = field(default="local_dp", metadata=choice("local_dp", "secure_dpsgd"))


@dataclass(frozen=True)
class SecureConfig:
    """Secure DP-SGD (``federation.mode: secure_dpsgd``): every site samples its records at
    ``sample_rate`` (the job states q: no site reveals its record count), sums its clipped
    per-record gradients, adds its share of Skellam noise and masks the result (SecAgg+); the
    coordinator decodes the sum of at least ``min_contributions`` sites and divides it by the
    expected union batch, ``training.batch_size``."""

    sample_rate: float = field(default=0.01, metadata=bounded(0, 1, low_open=True))
    # t: the fewest contributions a step's sum may hold (0: floor(min_nodes / 2) + 1)
    min_contributions: int = field(default=0, metadata=bounded(0, 100_000))
    # the guarantee the run's noise is calibrated for, to privacy.epsilon over every step:
    # fallback, a site's own share alone (what a site with the default policy enforces);
    # aggregate, the noise of min_contributions shares (for sites that trust secure aggregation)
    calibrate: str = field(default="fallback", metadata=choice("fallback", "aggregate"))
    # the encoding's range is sized for a site sample of at most this many records; a larger
    # sample's sum is scaled back into it (a projection: still at most the clip per record)
    max_records_per_site: int = field(default=1024, metadata=bounded(1, 10**9))
    max_bits: int = field(default=32, metadata=bounded(2, 62))

    def threshold(self, min_nodes: int) -> int:
        """t as the round uses it."""
        return self.min_contributions or min_nodes // 2 + 1


@dataclass(frozen=True)
class SimulatedDataConfig:
    hospitals: int = field(default=4, metadata=bounded(1, 1000))
    patients: int = field(default=60, metadata=bounded(2, 1_000_000))
    heldout_fraction: float = field(default=0.2, metadata=bounded(0, 1, low_open=True))
    central_eval_patients: int = field(default=30, metadata=bounded(1, 1_000_000))


@dataclass(frozen=True)
class SimulationConfig:
    cpus_per_node: float = field(default=2.0, metadata=bounded(0, 1024, low_open=True))
    # GPUs Ray reserves per virtual node (0.5: two nodes share one); with 0 Ray hides the GPUs
    # from the nodes, and a site whose device is auto trains on the CPU
    gpus_per_node: float = field(default=0.0, metadata=bounded(0, 1024))
    local_only_baseline: bool = True


@dataclass(frozen=True)
class EvaluationConfig:
    """The model as a generative model: held-out notes split at ``marker`` into a prompt (up to
    and including it) and a reference; greedy completions scored with ROUGE-L, BLEU and chrF."""

    marker: str = "Assessment:"  # the section heading a note without a prompt is split at
    max_new_tokens: int = field(default=32, metadata=bounded(1, 4096))
    # centrally and at the sites: round 0 (the base model), every k-th round and the final
    # round; 0 turns generation off
    every_k_rounds: int = field(default=1, metadata=bounded(0, 10_000))
    max_examples: int = field(default=32, metadata=bounded(1, 1_000_000))  # per held-out set


@dataclass(frozen=True)
class JobConfig:
    """One federated fine-tuning job (simulated or deployed)."""

    seed: int = 0
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    training: TrainingConfig = TrainingConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    federation: FederationConfig = FederationConfig()
    secure: SecureConfig = SecureConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    data: SimulatedDataConfig = SimulatedDataConfig()
    simulation: SimulationConfig = SimulationConfig()
    # where each round's figures go as the run goes (server/tracking.py): TensorBoard event files
    # under <run dir>/tensorboard, a local MLflow store (the optional extra 'mlflow'), or nowhere
    tracking: str = field(default="tensorboard", metadata=choice("tensorboard", "mlflow", "none"))

    @property
    def loss_marker(self) -> str:
        """The marker notes are split at for the loss ("": whole notes), training.loss_on."""
        return "" if self.training.loss_on == "note" else self.evaluation.marker

    @property
    def judged_only(self) -> bool:
        """Only the notes the marker splits train and are scored (``training.loss_on: judged``)."""
        return self.training.loss_on == "judged"


# --------------------------------------------------------------------------- loading


def _key_lines(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    """Map dotted keys to 1-based YAML line numbers, for error messages."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key + "."))
    return lines


class _AliasRefused(yaml.YAMLError):
    def __init__(self, alias: str, mark: yaml.Mark):
        super().__init__(alias)
        self.alias, self.problem_mark = alias, mark


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that refuses YAML aliases (``*name``).

    An alias repeats a node by reference, so nine lines of nested aliases ("billion laughs")
    stand for a billion values, and anything that walks the tree (key lines, validation, an
    error message) expands them. A config file has no need for them; writing the value out is
    always possible.
    """

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(event.anchor, event.start_mark)
        return super().compose_node(parent, index)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # PyYAML lets Python's own errors through for some values (an integer of 5,000 digits,
        # a timestamp with month 13): make them YAML errors at the value's line
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as err:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read the value {str(node.value)[:40]!r} ({err})",
                node.start_mark) from err


def _load_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """The document in ``text`` and its node tree, parsed once; aliases are refused."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        return (loader.construct_document(node) if node is not None else None), node
    except (ValueError, OverflowError) as err:  # the scanner's own: "\U0011ffff" in quotes
        raise yaml.MarkedYAMLError(problem=str(err), problem_mark=loader.get_mark()) from err
    finally:
        loader.dispose()


def _yaml_problem(err: yaml.YAMLError) -> str:
    if isinstance(err, _AliasRefused):
        return (f"YAML alias *{err.alias} is not allowed in a config file (aliases can expand a "
                "small file into an enormous one); write the value out instead")
    return f"invalid YAML: {getattr(err, 'problem', None) or err}"


def _yaml_value_problem(err: yaml.YAMLError) -> str:
    return "not valid YAML: " + _yaml_problem(err).removeprefix("invalid YAML: ")


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a YAML mapping and the line of every key; errors name the file (and the line)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file ({os_reason(err)})") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: not valid UTF-8 text ({err.reason})") from err
    try:
        data, node = _load_yaml(text)
        lines = _key_lines(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: {_yaml_problem(err)}") from err
    except RecursionError as err:
        raise ConfigError(f"{path}: the YAML is nested too deeply to be a config file") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data, lines


def os_reason(err: OSError) -> str:
    """Why a path could not be read, in words; a symbolic link loop is said to be one."""
    if err.errno == errno.ELOOP:
        return ("a symbolic link loop: following its links leads back to a link already "
                "followed (ELOOP); point the path at the real file")
    return err.strerror or str(err)


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value`` and parse the value as YAML (so ``16`` is an int, ``[a, b]`` a list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set lora.r=16")
    try:
        value = _load_yaml(raw)[0] if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: value is {_yaml_value_problem(err)}") from err
    except RecursionError as err:
        raise ConfigError(f"--set {text!r}: value is nested too deeply") from err
    return key.strip(), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``--set`` overrides applied (nested keys created)."""
    merged = _deep_copy(data)
    for text in overrides:
        key, value = parse_override(text)
        node = merged
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return merged


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


class _Where:
    """Formats 'file, line N: key' prefixes for errors."""

    def __init__(self, source: str, lines: Mapping[str, int]):
        self.source, self.lines = source, lines

    def __call__(self, key: str) -> str:
        line = self.lines.get(key)
        return f"{self.source}, line {line}: {key}" if line else f"{self.source}: {key}"


def build(cls: type[T], data: Mapping[str, Any], source: str,
          lines: Mapping[str, int] | None = None, prefix: str = "") -> T:
    """Validate a mapping into dataclass ``cls``; unknown keys, wrong types and ranges fail."""
    where = _Where(source, lines or {})
    return _build(cls, data, where, prefix)


def _build(cls: type[T], data: Any, where: _Where, prefix: str) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where(prefix.rstrip('.') or '<top>')}: expected a mapping, "
                          f"got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{where(prefix + str(key))}: unknown key (known keys here: {known})")
    values: dict[str, Any] = {}
    for name, fld in fields.items():
        if name not in data:
            continue
        key = prefix + name
        values[name] = _convert(hints[name], data[name], fld.metadata, where, key)
    try:
        return cls(**values)
    except ValueError as err:  # a rule over several keys, checked by the type itself
        raise ConfigError(f"{where(prefix.rstrip('.') or '<top>')}: {err}") from None


def _convert(hint: Any, value: Any, meta: Mapping[str, Any], where: _Where, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, key + ".")
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        return _convert(options[0], value, meta, where, key)
    if origin is tuple:
        (item_type, *_rest) = typing.get_args(hint)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where(key)}: expected a list, got {value!r}")
        return tuple(_convert(item_type, v, {}, where, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where(key)}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where(key)}: expected a whole number, got {value!r}")
        _check_range(value, meta, where, key)
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads 1e-5 as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where(key)}: expected a number, got {value!r}")
        _check_range(float(value), meta, where, key)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where(key)}: expected text, got {value!r}")
        options = meta.get("choices")
        if options and value not in options:
            raise ConfigError(f"{where(key)}: {value!r} is not one of {', '.join(options)}")
        if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
            raise ConfigError(f"{where(key)}: {value!r} is not one of {meta['expected']}")
        return value
    raise ConfigError(f"{where(key)}: unsupported config type {hint!r}")


def _check_range(value: float, meta: Mapping[str, Any], where: _Where, key: str) -> None:
    if not math.isfinite(value):
        # NaN compares false with every bound, so it would pass them all: refuse it by name
        raise ConfigError(f"{where(key)}: {value!r} is not a finite number")
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value <= low if meta.get("low_open") else value < low):
        op = ">" if meta.get("low_open") else ">="
        raise ConfigError(f"{where(key)}: {value!r} is out of range (must be {op} {low})")
    if high is not None and (value >= high if meta.get("high_open") else value > high):
        op = "<" if meta.get("high_open") else "<="
        raise ConfigError(f"{where(key)}: {value!r} is out of range (must be {op} {high})")


def load_job_config(path: str | Path, overrides: Sequence[str] = ()) -> JobConfig:
    """Load and validate a job config, applying ``--set key=value`` overrides."""
    data, lines = read_yaml(path)
    source = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{path} (with --set {' '.join(overrides)})"
    job = build(JobConfig, data, source, lines)
    _check_job(job, source)
    return job


def with_overrides(job: JobConfig, overrides: Sequence[str], why: str) -> JobConfig:
    """``job`` with ``--set`` style overrides, validated as a loaded job is; ``why`` names the
    derived job in errors (e.g. "the audit's job")."""
    source = f"{why} (--set {' '.join(overrides)})"
    derived = build(JobConfig, apply_overrides(to_dict(job), overrides), source)
    _check_job(derived, source)
    return derived


def _check_job(job: JobConfig, source: str) -> None:
    """Cross-field checks that a single range cannot express."""
    if not job.evaluation.marker.strip():
        raise ConfigError(f"{source}: evaluation.marker must not be empty")
    if job.evaluation.every_k_rounds and job.evaluation.max_new_tokens >= job.model.max_length - 1:
        raise ConfigError(f"{source}: evaluation.max_new_tokens ({job.evaluation.max_new_tokens}) "
                          f"leaves no room for a prompt within model.max_length "
                          f"({job.model.max_length}); make it smaller")
    if job.federation.min_replies > job.federation.min_nodes:
        raise ConfigError(f"{source}: federation.min_replies ({job.federation.min_replies}) "
                          f"cannot exceed federation.min_nodes ({job.federation.min_nodes})")
    if not job.lora.target_modules:
        raise ConfigError(f"{source}: lora.target_modules must name at least one module")
    if job.judged_only and job.privacy.unit != "record":
        raise ConfigError(f"{source}: training.loss_on: judged needs privacy.unit: record (a "
                          "patient's unit is all their text, not one judged note)")
    if job.federation.mode == "secure_dpsgd":
        t = job.secure.threshold(job.federation.min_nodes)
        if t < 2:
            raise ConfigError(f"{source}: secure.min_contributions ({t}) must be at least 2: a "
                              "sum of one site's contribution is that site's contribution")
        if t > job.federation.min_nodes:
            raise ConfigError(f"{source}: secure.min_contributions ({t}) cannot exceed "
                              f"federation.min_nodes ({job.federation.min_nodes})")


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config object (for reports and Flower ConfigRecords)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj
