"""Shared fixtures: a tiny base model (built once per test session) and small hospital sites."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from privatune.common.base_model import BaseModelSpec, ensure_base_model

TINY_SPEC = BaseModelSpec(vocab_size=384, hidden_size=32, layers=1, heads=2, intermediate_size=64,
                          max_positions=128, pretrain_steps=20, pretrain_batch_size=8,
                          pretrain_seq_len=64, corpus_max_bytes=150_000)

CONDITIONS = ["pneumonia", "sepsis", "heart failure", "asthma", "diabetes", "stroke"]
PLANS = ["start antibiotics", "continue insulin", "increase diuretics", "inhaled steroids",
         "physiotherapy", "follow up in clinic"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return ensure_base_model(tmp_path_factory.mktemp("models"), TINY_SPEC)


def clinical_note(rng: random.Random) -> str:
    """A short templated note: learnable structure, so held-out loss can fall in few steps."""
    condition, plan = rng.choice(CONDITIONS), rng.choice(PLANS)
    return (f"Patient admitted with {condition}. Temperature {rng.randint(36, 39)} C, heart rate "
            f"{rng.randint(60, 120)}. Assessment: {condition}. Plan: {plan}.")


def write_notes(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for i in range(count):
            handle.write(json.dumps({"text": clinical_note(rng), "patient_id": f"p{seed}-{i // 2}"})
                         + "\n")
    return path


def write_policy(site_dir: Path, name: str, data: Path, model_dir: Path, **privacy) -> Path:
    site_dir.mkdir(parents=True, exist_ok=True)
    policy = {"site": {"name": name, "data": str(data), "format": "jsonl", "model": str(model_dir),
                       "state_dir": ".", "heldout_fraction": 0.2},
              "privacy": {"epsilon_cap": 8.0, "delta": 1e-4, "min_noise_multiplier": 0.3,
                          **privacy}}
    path = site_dir / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


@pytest.fixture
def make_site(tmp_path, tiny_model_dir):
    """Factory: a site directory with notes, its own policy file and (later) its ledger."""

    def factory(name: str = "site-a", records: int = 120, seed: int = 1, **privacy) -> Path:
        data = write_notes(tmp_path / "data" / f"{name}.jsonl", records, seed)
        return write_policy(tmp_path / "sites" / name, name, data, tiny_model_dir, **privacy)

    return factory
