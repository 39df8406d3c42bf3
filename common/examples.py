"""Turning (prompt, completion) text pairs into fixed-length training tensors.

The loss is computed on the completion only; prompt and padding positions get label -100.
One pair is exactly one example (never split into chunks), so one record stays one DP unit.
A patient's whole text can instead be sampled as windows (``SampledWindows``): still one
example per patient each time the patient is drawn, but from anywhere in the text.

When a pair is longer than ``max_length`` the completion keeps its place: a long prompt is cut
from its start (the end, nearest the completion, is kept), and a completion that is itself too
long gets at least half of the room. Text is cut to a window of characters before it is
tokenized, so a huge record costs what ``max_length`` tokens cost, not what the record does.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, TensorDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from privatune.common.progress import progress_bar

IGNORE_INDEX = -100
# Characters tokenized per token wanted: a first window of WINDOW_CHARS_PER_TOKEN (tokens of
# natural text average 3 to 5 characters), doubled while it yields too few tokens, up to
# MAX_CHARS_PER_TOKEN (beyond which what is kept is cut at that bound instead).
WINDOW_CHARS_PER_TOKEN = 8
MAX_CHARS_PER_TOKEN = 256

log = logging.getLogger(__name__)


class EncodedPairs(TensorDataset):
    """(input_ids, labels, attention_mask) of encoded pairs, one row per pair, and what had to
    be cut to fit ``max_length``.

    ``skipped``: pairs whose completion could not keep a single learnable token; their row has
    no labels, so it adds nothing to the loss, but stays, so that the dataset keeps one row per
    privacy unit (the node's sampling rate is the batch size over the number of units).
    ``cut_prompts`` / ``cut_completions``: pairs whose prompt lost its start / whose completion
    lost its end.
    """

    def __init__(self, *tensors: torch.Tensor, skipped: int = 0, cut_prompts: int = 0,
                 cut_completions: int = 0):
        super().__init__(*tensors)
        self.skipped, self.cut_prompts, self.cut_completions = skipped, cut_prompts, cut_completions


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _window(text: str, chars: int, from_end: bool) -> str:
    """At most ``chars`` characters of the start (or end) of ``text``, cut at whitespace when
    there is some in the outer half, so that the word at the cut is not split."""
    if chars >= len(text):
        return text
    if from_end:
        part = text[len(text) - chars:]
        space = next((i for i, c in enumerate(part[: chars // 2]) if c.isspace()), None)
        return part if space is None else part[space:]
    part = text[:chars]
    space = next((i for i in range(len(part) - 1, chars // 2, -1) if part[i].isspace()), None)
    return part if space is None else part[:space]


def head_ids(tokenizer: PreTrainedTokenizerBase, text: str, count: int,
             from_end: bool = False) -> tuple[list[int], bool]:
    """The first (``from_end``: last) ``count`` token ids of ``text`` and whether any were left
    out, tokenizing only a window of characters around that end of the text."""
    chars = count * WINDOW_CHARS_PER_TOKEN
    while True:
        part = _window(text, chars, from_end)
        ids = _ids(tokenizer, part)
        whole = len(part) == len(text)
        # one token more than needed: the token at the cut may be a piece of a longer one
        if whole or len(ids) > count or chars >= count * MAX_CHARS_PER_TOKEN:
            break
        chars *= 2
    cut = not whole or len(ids) > count
    if len(ids) > count:
        ids = ids[len(ids) - count:] if from_end else ids[:count]
    return ids, cut


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]],
                 max_length: int) -> EncodedPairs:
    """Tokenize pairs into a dataset of (input_ids, labels, attention_mask); see EncodedPairs
    for what is cut or skipped to fit ``max_length`` tokens."""
    if not pairs:
        raise ValueError("no examples to encode")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    rows: list[tuple[list[int], list[int]]] = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    room = max_length - len(bos)  # for prompt and completion tokens
    skipped = cut_prompts = cut_completions = 0
    for prompt, completion in pairs:
        prompt_ids, prompt_cut = head_ids(tokenizer, prompt, room, from_end=True)
        completion_ids, completion_cut = head_ids(tokenizer, completion, room)
        completion_ids += eos
        if len(prompt_ids) + len(completion_ids) <= room:
            keep_completion = len(completion_ids)
        else:  # the completion keeps what the whole prompt leaves, and at least half the room
            keep_completion = min(len(completion_ids), max(room - len(prompt_ids), (room + 1) // 2))
        keep_prompt = min(len(prompt_ids), room - keep_completion)
        cut_prompts += prompt_cut or keep_prompt < len(prompt_ids)
        cut_completions += completion_cut or keep_completion < len(completion_ids)
        context = bos + prompt_ids[len(prompt_ids) - keep_prompt:]
        completion_ids = completion_ids[:keep_completion]
        # the loss predicts each token from the ones before it: a token at position 0 teaches nothing
        learnable = keep_completion - (0 if context else 1)
        if learnable < 1:
            skipped += 1
            labels = [IGNORE_INDEX] * (len(context) + len(completion_ids))
        else:
            labels = [IGNORE_INDEX] * len(context) + completion_ids
        rows.append((context + completion_ids, labels))
    if skipped:
        log.warning("%d of %d examples have no completion token to learn from within max_length=%d;"
                    " they add nothing to the loss", skipped, len(pairs), max_length)
    length = max(max(len(ids) for ids, _ in rows), 1)
    return EncodedPairs(*_padded(rows, length, _pad_id(tokenizer)), skipped=skipped,
                        cut_prompts=cut_prompts, cut_completions=cut_completions)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _padded(rows: Sequence[tuple[list[int], list[int]]], length: int,
            pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, attention_mask) of (ids, labels) rows, right-padded to ``length``."""
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, : len(labs)] = torch.tensor(labs, dtype=torch.long)
        mask[i, : len(ids)] = 1
    return input_ids, labels, mask


# --------------------------------------------------------------------------- patient windows


@dataclass(frozen=True)
class TokenizedTexts:
    """Each privacy unit's whole text as one token sequence (its tokens, then eos), and the
    tokenizer's bos and pad: what windows of ``max_length`` tokens are cut from.

    A window is encoded as ``encode_pairs`` encodes a pair with no prompt: bos, then the
    window's tokens, all of them labelled.
    """

    sequences: tuple[torch.Tensor, ...]
    bos: tuple[int, ...]
    pad: int

    def room(self, max_length: int) -> int:
        """Tokens of text in one window of ``max_length`` (what bos leaves)."""
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
        return max_length - len(self.bos)

    def row(self, index: int, start: int, room: int) -> tuple[list[int], list[int]]:
        """(ids, labels) of the window of unit ``index`` that starts at token ``start``."""
        window = self.sequences[index][start:start + room].tolist()
        return [*self.bos, *window], [IGNORE_INDEX] * len(self.bos) + window


def tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> TokenizedTexts:
    """Tokenize every text whole (a window may come from anywhere in it)."""
    if not texts:
        raise ValueError("no examples to encode")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos = (tokenizer.bos_token_id,) if tokenizer.bos_token_id is not None else ()
    return TokenizedTexts(tuple(torch.tensor(_ids(tokenizer, text) + eos, dtype=torch.long)
                                for text in texts), bos, _pad_id(tokenizer))


class SampledWindows(Dataset):
    """One item per privacy unit; each time an item is drawn it is a fresh window of
    ``max_length`` tokens of that unit's text, so all of a long text is trained on while a unit
    stays one example (Poisson sampling, and so the accounting, see units, not windows).

    The window starts uniformly over the positions that keep it inside the text, so every
    token is in some window. The ``k``-th draw of unit ``i`` is fixed by ``(seed, i, k)``,
    whatever order items are drawn in: the node passes a secret it draws each round.
    """

    def __init__(self, texts: TokenizedTexts, max_length: int, seed: int):
        self.texts, self.seed = texts, seed
        self.room = texts.room(max_length)
        self.width = len(texts.bos) + max(min(self.room, len(s)) for s in texts.sequences)
        self.draws = [0] * len(texts.sequences)

    def __len__(self) -> int:
        return len(self.texts.sequences)

    def start(self, index: int, draw: int) -> int:
        """Where the ``draw``-th window of unit ``index`` starts (bias of the modulo: at most
        span / 2**64)."""
        span = len(self.texts.sequences[index]) - self.room
        if span <= 0:
            return 0
        digest = hashlib.sha256(f"{self.seed}\0{index}\0{draw}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % (span + 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        draw, self.draws[index] = self.draws[index], self.draws[index] + 1
        row = self.texts.row(index, self.start(index, draw), self.room)
        input_ids, labels, mask = _padded([row], self.width, self.texts.pad)
        return input_ids[0], labels[0], mask[0]


def consecutive_windows(texts: TokenizedTexts, max_length: int) -> EncodedPairs:
    """Every unit's text cut into consecutive windows of ``max_length`` tokens, one row each:
    for evaluation, where every token is labelled exactly once (and scored, after bos; without
    a bos token a window's first token has nothing to be predicted from)."""
    room = texts.room(max_length)
    rows = [texts.row(index, start, room) for index, sequence in enumerate(texts.sequences)
            for start in range(0, max(len(sequence), 1), room)]
    return EncodedPairs(*_padded(rows, max(max(len(ids) for ids, _ in rows), 1), texts.pad))


# Rows of logits the loss handles at once: a block that stays in a CPU core's cache (the
# softmax takes several passes over it), and large blocks on an accelerator, where each pass is
# one kernel launch.
_CACHE_BLOCK_ELEMENTS = 2**17
_DEVICE_BLOCK_ELEMENTS = 2**26


class _TokenCrossEntropy(torch.autograd.Function):
    """Cross-entropy of each row of ``logits`` [N, V] against ``targets`` [N] (0 where a target
    is IGNORE_INDEX), in float32 (float64 for float64 logits) whatever the logits' precision,
    block by block.

    Why not ``F.cross_entropy`` on sliced float32 logits: that materialises the float32 copy,
    the slice's copy, the log-softmax output, a zero-filled gradient and the slice's zero-filled
    gradient, each as large as the logits: profiled, about 85 ms of a 205 ms DP step of the
    demo model in bfloat16 (batch 16 x 128, vocabulary 4096). Here the only tensor of the
    logits' size besides them is their gradient, in their own precision.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows, vocab = logits.shape
        valid = targets != IGNORE_INDEX
        safe = torch.where(valid, targets, 0).unsqueeze(1)
        precision = torch.promote_types(logits.dtype, torch.float32)
        logsumexp = torch.empty(rows, dtype=precision, device=logits.device)
        picked = torch.empty(rows, dtype=precision, device=logits.device)
        for start, end in _blocks(rows, vocab, logits.device):
            block = logits[start:end].to(precision)
            torch.logsumexp(block, dim=1, out=logsumexp[start:end])
            picked[start:end] = block.gather(1, safe[start:end]).squeeze(1)
        ctx.save_for_backward(logits, safe, valid, logsumexp)
        return torch.where(valid, logsumexp - picked, 0.0)

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor) -> tuple[torch.Tensor, None]:
        # d loss_i / d logits_i = softmax(logits_i) - onehot(target_i), for valid rows only
        logits, safe, valid, logsumexp = ctx.saved_tensors
        rows, vocab = logits.shape
        scale = torch.where(valid, grad_losses.to(logsumexp.dtype), 0.0).unsqueeze(1)
        grad = torch.empty_like(logits)
        in_place = logits.dtype == logsumexp.dtype
        for start, end in _blocks(rows, vocab, logits.device):
            out = grad[start:end] if in_place else torch.empty(
                (end - start, vocab), dtype=logsumexp.dtype, device=logits.device)
            torch.sub(logits[start:end], logsumexp[start:end].unsqueeze(1), out=out)
            out.exp_().mul_(scale[start:end])
            out.scatter_add_(1, safe[start:end], -scale[start:end])
            if not in_place:
                grad[start:end] = out
        return grad, None


def _blocks(rows: int, vocab: int, device: torch.device) -> list[tuple[int, int]]:
    elements = _CACHE_BLOCK_ELEMENTS if device.type == "cpu" else _DEVICE_BLOCK_ELEMENTS
    step = max(1, elements // max(vocab, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def next_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of every next-token prediction (shape [batch, length - 1]); 0 where unlabelled.

    Position t predicts labels[t + 1]: the labels are shifted rather than the logits sliced,
    so the logits (in any float precision) are never copied.
    """
    batch, length, vocab = logits.shape
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    losses = _TokenCrossEntropy.apply(logits.reshape(batch * length, vocab), targets.reshape(-1))
    return losses.view(batch, length)[:, :-1]


def labelled_predictions(labels: torch.Tensor) -> torch.Tensor:
    """Which next-token predictions have a label (shape [batch, length - 1]): position t
    predicts labels[t + 1], as in ``next_token_losses``."""
    return labels[:, 1:] != IGNORE_INDEX


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each example over its labelled positions (shape [batch])."""
    counts = labelled_predictions(labels).sum(dim=1).clamp(min=1)
    return next_token_losses(logits, labels).sum(dim=1) / counts


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Whether ``model`` takes ``logits_to_keep``: the Hugging Face model inside it (past
    Opacus' and PEFT's wrappers, which pass keywords on) names it, and ``model`` passes it on."""
    def takes(module: torch.nn.Module, passes_keywords: bool) -> bool:
        return any(p.name == "logits_to_keep" or (passes_keywords and p.kind is p.VAR_KEYWORD)
                   for p in inspect.signature(module.forward).parameters.values())
    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    return inner is not None and takes(inner, False) and takes(model, True)


def labelled_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits from the batch's first labelled prediction on, and the labels cut to match:
    what ``per_example_loss`` and ``next_token_losses`` need, with the same values.

    Why: the loss is on the completion only, and an example's prompt comes first, so the output
    head (the widest layer: one logit per vocabulary entry) would otherwise be computed, and
    differentiated, at every prompt position for nothing (about half the demo's positions).
    A model whose forward has no ``logits_to_keep`` gets all its logits, cut here instead.
    """
    length = labels.shape[1]
    labelled = labelled_predictions(labels).any(dim=0).nonzero()
    start = int(labelled[0]) if len(labelled) else length - 1  # position t predicts label t + 1
    kept = length - start
    if _keeps_logits(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       logits_to_keep=kept).logits
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, start:]
    return logits, labels[:, start:]


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 32) -> tuple[float, int]:
    """Token-weighted mean next-token loss over the labelled positions, and the token count."""
    model.eval()
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    input_ids, labels, mask = dataset.tensors
    for start in progress_bar(range(0, len(input_ids), batch_size), "evaluating held-out loss"):
        ids = input_ids[start:start + batch_size].to(device)
        labs = labels[start:start + batch_size].to(device)
        batch_mask = mask[start:start + batch_size].to(device)
        logits, labs = labelled_logits(model, ids, batch_mask, labs)
        total += float(next_token_losses(logits, labs).sum())
        tokens += int(labelled_predictions(labs).sum())
    if tokens == 0:
        raise ValueError("evaluation set has no labelled tokens")
    return total / tokens, tokens
