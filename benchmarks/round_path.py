"""What one federated round passes through: privatune's modules and functions, counted.

    python benchmarks/round_path.py [--sites 2] [--json round_path.json]

Builds a tiny base model and two small sites (their own notes, policies and ledgers), then runs
one round of the coordinator (train and evaluate) through ``simulations.in_process`` with a
profiler that records every call of a named privatune function (comprehensions and lambdas
are not counted): the coordinator's and the nodes' code
as deployed, without Flower's engine (whose transport is ``server.app.FlowerTransport``).
Reported: the modules the round enters, the distinct functions called in each, and the calls in
all (calls repeated per site, per batch or per tensor count every time).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

CONDITIONS = ("pneumonia", "sepsis", "heart failure", "asthma", "COPD", "stroke")


def write_site(root: Path, name: str, model_dir: Path, seed: int) -> Path:
    """A site directory: 40 templated notes of 20 patients and the site's policy file."""
    rng = random.Random(seed)
    data = root / name / "notes.jsonl"
    data.parent.mkdir(parents=True)
    with data.open("w") as handle:
        for i in range(40):
            condition = rng.choice(CONDITIONS)
            handle.write(json.dumps({"text": f"Patient admitted with {condition}. Heart rate "
                                             f"{rng.randint(60, 120)}. Assessment: {condition}.",
                                     "patient_id": f"{name}-{i // 2}"}) + "\n")
    policy = {"site": {"name": name, "data": str(data), "format": "jsonl", "model": str(model_dir),
                       "state_dir": ".", "heldout_fraction": 0.25},
              "privacy": {"epsilon_cap": 8.0, "delta": 1e-4, "accountant": "rdp"},
              "release": {"min_records": 1}}
    path = root / name / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args()
    warnings.simplefilter("ignore", FutureWarning)

    from privatune.client.node import SiteNode
    from privatune.client.policy import load_site_policy
    from privatune.common.base_model import BaseModelSpec, ensure_base_model
    from privatune.common.config import (EvaluationConfig, FederationConfig, JobConfig, LoraConfig,
                                         ModelConfig, TrainingConfig)
    from privatune.server.coordinator import Coordinator
    from privatune.server.coordinator_settings import CoordinatorSettings
    from privatune.simulations.in_process import InProcessTransport

    root = Path(tempfile.mkdtemp(prefix="round-path-"))
    model_dir = ensure_base_model(root / "model", BaseModelSpec(
        vocab_size=384, hidden_size=32, layers=1, heads=2, intermediate_size=64, max_positions=128,
        pretrain_steps=5, pretrain_batch_size=4, pretrain_seq_len=64, corpus_max_bytes=50_000),
        progress=lambda _line: None)
    nodes = [SiteNode(load_site_policy(write_site(root / "sites", f"site-{i}", model_dir, i)))
             for i in range(args.sites)]
    job = JobConfig(model=ModelConfig(max_length=64),
                    lora=LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj")),
                    training=TrainingConfig(local_steps=2, batch_size=8),
                    federation=FederationConfig(rounds=1, min_nodes=args.sites,
                                                min_replies=args.sites),
                    evaluation=EvaluationConfig(every_k_rounds=0), tracking="none")
    coordinator = Coordinator(CoordinatorSettings(job=job, model_dir=model_dir,
                                                  out_dir=root / "run", run_id="round-path",
                                                  resume=False),
                              InProcessTransport(nodes), progress=lambda _line: None)
    coordinator.evaluate(0)  # warm: first-use caches (tokenised splits, models) stay out

    calls: Counter[tuple[str, str]] = Counter()

    def profile(frame: FrameType, event: str, _arg: Any) -> None:
        if event == "call":
            module = frame.f_globals.get("__name__", "")
            name = frame.f_code.co_qualname
            # comprehensions, generator expressions and lambdas are code objects, not functions
            if module.startswith("privatune.") and not name.split(".")[-1].startswith("<"):
                calls[(module, name)] += 1

    sys.setprofile(profile)
    try:
        coordinator.train_round(1)
        coordinator.evaluate(1)
    finally:
        sys.setprofile(None)

    functions = Counter(module for module, _ in calls)
    per_module = {module: {"functions": functions[module],
                           "calls": sum(n for (m, _), n in calls.items() if m == module)}
                  for module in sorted(functions)}
    figures = {"sites": args.sites, "modules": len(per_module),
               "functions": len(calls), "calls": sum(calls.values()), "by_module": per_module}
    print(f"one round (train + evaluate) at {args.sites} sites: {figures['modules']} privatune "
          f"modules, {figures['functions']} distinct functions, {figures['calls']} calls")
    for module, row in per_module.items():
        print(f"  {module:45s} {row['functions']:3d} functions {row['calls']:6d} calls")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
