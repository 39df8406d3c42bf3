"""The hospital's own site policy: a file the site controls, separate from the job.

The node enforces it whatever the coordinator requests: the lifetime and per-run epsilon
caps, delta, the minimum noise multiplier, the number of rounds and runs, the limits on a
train or evaluate request (evaluations per run among them), which non-private metrics
may leave, and whether its cap may rest on secure aggregation (secure DP-SGD).
Relative paths in the file are resolved against the file's own directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from privatune.client.site_state import SiteState
from privatune.common.config import (ConfigError, MechanismSettings, bounded, build, choice,
                                     device_choice, read_yaml)
from privatune.common.privacy import delta_problem
from privatune.common.protocol import EvaluateRequest, TrainRequest


@dataclass(frozen=True)
class SiteSection:
    name: str
    data: str
    format: str = field(default="auto", metadata=choice("auto", "jsonl", "fhir"))
    model: str = ""
    state_dir: str = "state"
    heldout_fraction: float = field(default=0.2, metadata=bounded(0, 1, low_open=True))
    split_seed: int = 0
    # exact duplicates (same text and patient) would each count as a privacy unit and so
    # weaken the guarantee for that person: collapse them to one, or refuse the data
    duplicates: str = field(default="collapse", metadata=choice("collapse", "refuse"))
    # the site's hardware, never the coordinator's choice: auto takes a GPU when there is one
    device: str = field(default="auto", metadata=device_choice())
    dtype: str = field(default="auto", metadata=choice("auto", "float32", "bfloat16", "float16"))
    # the most examples one forward/backward pass may take on this hardware (0: no limit)
    max_physical_batch_size: int = field(default=0, metadata=bounded(0, 1_000_000))


@dataclass(frozen=True)
class PrivacySection(MechanismSettings):
    """The site's own ``privacy``: its lifetime cap and limits, enforced whatever is asked."""

    epsilon_cap: float = field(default=8.0, metadata=bounded(0, 1e4, low_open=True))
    max_rounds: int = field(default=100, metadata=bounded(1, 1_000_000))
    # the most one run (one coordinator's job) may spend; unset means the lifetime cap
    epsilon_per_run: float | None = field(default=None, metadata=bounded(0, 1e4, low_open=True))
    max_runs: int = field(default=20, metadata=bounded(1, 1_000_000))

    @property
    def run_budget(self) -> float:
        return self.epsilon_cap if self.epsilon_per_run is None else min(self.epsilon_per_run,
                                                                         self.epsilon_cap)


@dataclass(frozen=True)
class RequestLimits:
    """What a coordinator may ask of this site's training; a request outside is declined."""

    max_learning_rate: float = field(default=1.0, metadata=bounded(0, 1e12, low_open=True))
    max_local_steps: int = field(default=1000, metadata=bounded(1, 1_000_000))
    max_batch_size: int = field(default=1024, metadata=bounded(1, 1_000_000))
    max_length: int = field(default=2048, metadata=bounded(8, 1_000_000))
    max_grad_norm: float = field(default=100.0, metadata=bounded(0, 1e6, low_open=True))
    max_lora_r: int = field(default=64, metadata=bounded(1, 4096))
    max_lora_alpha: int = field(default=1024, metadata=bounded(1, 1_000_000))
    # the run length a coordinator may plan: the node calibrates its noise for all of it
    max_planned_rounds: int = field(default=10_000, metadata=bounded(1, 1_000_000))
    # module names a coordinator may put LoRA on; empty: any the model has ("all-linear" too)
    lora_target_modules: tuple[str, ...] = ()
    # each evaluation releases an exact held-out loss; unset: privacy.max_rounds + 1 (every
    # round of the longest run the policy allows, and the base model before it)
    max_evaluations_per_run: int | None = field(default=None, metadata=bounded(1, 1_000_000))
    # held-out notes an evaluation may generate completions for (each costs up to
    # max_new_tokens forward passes of the model at this site)
    max_generation_examples: int = field(default=256, metadata=bounded(0, 1_000_000))


MAX_RUN_ID_LENGTH = 128
MAX_MARKER_LENGTH = 64
MIN_GRAD_NORM = 1e-4


@dataclass(frozen=True)
class ReleaseSection:
    """Non-private metrics the site allows to leave (they are not covered by DP-SGD)."""

    example_count: bool = True
    train_loss: bool = True
    eval_loss: bool = True
    # ROUGE-L, BLEU and chrF of the global model's completions of this site's held-out notes
    generation_scores: bool = True
    # the fewest held-out records a released metric may cover: a loss or score over one note
    # says much about that note
    min_records: int = field(default=20, metadata=bounded(1, 1_000_000))


@dataclass(frozen=True)
class SecureAggregationSection:
    """Whether the site trusts secure aggregation in secure DP-SGD (issue 27), and how far.

    A secure round gives the site two guarantees: (a) from the aggregate noise of at least t
    contributions, which holds only while the coordinator learns nothing but their sum, and
    (b) from its own noise share alone, which holds whatever happens. By default the cap is
    enforced on (b); ``trust: true`` enforces it on (a). Either way the node refuses a round
    whose t is below ``min_contributions``: (a) needs that many shares.
    """

    trust: bool = False
    min_contributions: int = field(default=3, metadata=bounded(1, 1_000_000))

    @property
    def guarantee(self) -> str:
        """The guarantee the cap is enforced on: ``aggregate`` (a) or ``fallback`` (b)."""
        return "aggregate" if self.trust else "fallback"

    def round_violation(self, min_contributions: int) -> str:
        """Why a secure round whose threshold is ``min_contributions`` is refused, or ""."""
        if min_contributions >= self.min_contributions:
            return ""
        return (f"the secure round's threshold t = {min_contributions} is below this site's "
                f"secure_aggregation.min_contributions = {self.min_contributions}: its "
                "aggregate noise would come from fewer contributions than the site accepts")


@dataclass(frozen=True)
class SitePolicy:
    site: SiteSection
    privacy: PrivacySection = PrivacySection()
    limits: RequestLimits = RequestLimits()
    release: ReleaseSection = ReleaseSection()
    secure_aggregation: SecureAggregationSection = SecureAggregationSection()
    source: str = ""

    def resolve(self, relative: str) -> Path:
        """A path from the policy file, relative to the file's directory."""
        path = Path(relative)
        return path if path.is_absolute() else Path(self.source).parent / path

    @property
    def data_path(self) -> Path:
        return self.resolve(self.site.data)

    @property
    def model_dir(self) -> Path:
        return self.resolve(self.site.model)

    @property
    def state(self) -> SiteState:
        """The site's state directory: ledger, kept releases, the node's lock."""
        return SiteState(self.resolve(self.site.state_dir))

    @property
    def ledger_path(self) -> Path:
        return self.state.ledger_path

    @property
    def max_evaluations_per_run(self) -> int:
        limit = self.limits.max_evaluations_per_run
        return self.privacy.max_rounds + 1 if limit is None else limit


def load_site_policy(path: str | Path) -> SitePolicy:
    """Read and validate a site policy file; errors name the file, line and key."""
    data, lines = read_yaml(path)
    if "source" in data:
        raise ConfigError(f"{path}: source: unknown key")
    if "site" not in data:
        raise ConfigError(f"{path}: site: missing section (needs at least site.name and site.data)")
    for key in ("name", "data"):
        if not isinstance(data["site"], dict) or key not in data["site"]:
            raise ConfigError(f"{path}: site.{key}: missing")
    policy = build(SitePolicy, {**data, "source": str(path)}, str(path), lines)
    if not policy.site.model:
        raise ConfigError(f"{path}: site.model: missing (the local base-model directory)")
    return policy


def check_delta(policy: SitePolicy, privacy_units: int) -> None:
    """The node refuses a policy whose delta voids the guarantee at this site's size."""
    problem = delta_problem(policy.privacy.delta, privacy_units, policy.privacy.unit)
    if problem:
        raise ConfigError(f"{policy.source}: privacy.{problem}")


def physical_batch_size(site: SiteSection, request: TrainRequest) -> int:
    """The micro-batch limit a round trains with: the smaller of the site's (its memory) and the
    request's, where 0 means no limit."""
    limits = [n for n in (site.max_physical_batch_size, request.max_physical_batch_size) if n > 0]
    return min(limits, default=0)


def request_violation(limits: RequestLimits, request: TrainRequest | EvaluateRequest) -> str:
    """Why a train or evaluate request is outside this site's limits, or "" when it is within.

    Both kinds are held to the same bounds on what they share (run id, length, batch size,
    LoRA rank and targets); the training bounds apply to a train request only. Each bound is
    written as "not within" so that a non-finite value is refused too.
    """
    checks: list[tuple[str, float, float, float, bool]] = [
        ("batch_size", request.batch_size, 1, limits.max_batch_size, False),
        ("max_length", request.max_length, 8, limits.max_length, False),
        ("lora_r", request.lora_r, 1, limits.max_lora_r, False),
        ("lora_alpha", request.lora_alpha, 1, limits.max_lora_alpha, False),
    ]
    if isinstance(request, TrainRequest):
        checks += [
            ("round", request.round, 1, limits.max_planned_rounds, False),
            ("learning_rate", request.learning_rate, 0.0, limits.max_learning_rate, True),
            ("local_steps", request.local_steps, 1, limits.max_local_steps, False),
            # below this, clipped gradients and their noise vanish under float32 rounding
            ("max_grad_norm", request.max_grad_norm, MIN_GRAD_NORM, limits.max_grad_norm, False),
            ("planned_rounds", request.planned_rounds, 1, limits.max_planned_rounds, False),
            ("max_physical_batch_size", request.max_physical_batch_size, 0, 1_000_000, False),
        ]
    else:  # generated tokens count within the same max_length as the prompt's, leaving room
        checks += [("round", request.round, 0, limits.max_planned_rounds, False),
                   ("max_new_tokens", request.max_new_tokens, 0,
                    min(limits.max_length, request.max_length - 2), False),
                   ("max_examples", request.max_examples, 0, limits.max_generation_examples, False)]
    if not (len(request.loss_marker) <= MAX_MARKER_LENGTH and request.loss_marker.isprintable()):
        return (f"request loss_marker must be at most {MAX_MARKER_LENGTH} printable characters "
                f"(got {len(request.loss_marker)} characters)")
    if not (0 < len(request.run_id) <= MAX_RUN_ID_LENGTH and request.run_id.isprintable()):
        return (f"request run_id must be 1 to {MAX_RUN_ID_LENGTH} printable characters "
                f"(got {len(request.run_id)} characters)")
    if limits.lora_target_modules:
        outside = sorted(set(request.lora_targets.split(",")) - set(limits.lora_target_modules))
        if outside:
            return (f"request lora_targets {', '.join(outside)} are outside this site's limits "
                    f"(limits.lora_target_modules allows {', '.join(limits.lora_target_modules)})")
    for name, value, low, high, low_open in checks:
        above_low = value > low if low_open else value >= low
        if not (above_low and value <= high and math.isfinite(value)):
            bound = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"
            return (f"request {name} = {value!r} is outside this site's limits (must be {bound}; "
                    "the site policy's limits section sets them)")
    return ""
