"""The hospital's own site policy: a file the site controls, separate from the job.

The node enforces it whatever the coordinator requests: the epsilon cap, delta, the minimum
noise multiplier, the maximum number of rounds, and which non-private metrics may leave.
Relative paths in the file are resolved against the file's own directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from privatune.common.config import ConfigError, bounded, build, choice, read_yaml


@dataclass(frozen=True)
class SiteSection:
    name: str
    data: str
    format: str = field(default="auto", metadata=choice("auto", "jsonl", "fhir"))
    model: str = ""
    state_dir: str = "state"
    heldout_fraction: float = field(default=0.2, metadata=bounded(0, 1, low_open=True))
    split_seed: int = 0


@dataclass(frozen=True)
class PrivacySection:
    unit: str = field(default="record", metadata=choice("record", "patient"))
    epsilon_cap: float = field(default=8.0, metadata=bounded(0, 1e4, low_open=True))
    delta: float = field(default=1e-5, metadata=bounded(0, 1, low_open=True))
    min_noise_multiplier: float = field(default=0.3, metadata=bounded(0, 1e3))
    max_rounds: int = field(default=100, metadata=bounded(1, 1_000_000))


@dataclass(frozen=True)
class ReleaseSection:
    """Non-private metrics the site allows to leave (they are not covered by DP-SGD)."""

    example_count: bool = True
    train_loss: bool = True
    eval_loss: bool = True


@dataclass(frozen=True)
class SitePolicy:
    site: SiteSection
    privacy: PrivacySection = PrivacySection()
    release: ReleaseSection = ReleaseSection()
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
    def ledger_path(self) -> Path:
        return self.resolve(self.site.state_dir) / "ledger.jsonl"


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
    """DP's delta must be below 1/(number of privacy units), else the guarantee is void."""
    if policy.privacy.delta >= 1.0 / privacy_units:
        raise ConfigError(
            f"{policy.source}: privacy.delta = {policy.privacy.delta:g} is not below "
            f"1/{privacy_units} (this site has {privacy_units} {policy.privacy.unit}s); "
            f"choose delta < {1.0 / privacy_units:.3g}")
