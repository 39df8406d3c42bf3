"""Peak memory of one process serving many simulated hospitals: one base model, not one per site.

    python benchmarks/site_memory.py --sites 4,20 --out site_memory.json

For each count N a fresh process (as a simulation worker is) builds N ``SiteNode`` objects, each
with its own notes, policy and ledger, and has every site train one DP round and evaluate the
result, as a worker serving those sites in a federation round does. Reported per count: the
process's peak RSS (VmHWM) and its RSS after the last site, the number of base models it holds
(``common.shared_model``), the size of one copy of the base weights (what a base model per site
would add per site), and for each count after the first how much the peak and the final RSS
grew per added site. CPU, float32, one thread; the workers use the benchmark's tight
allocator (TIGHT_MALLOC), so that RSS follows live memory rather than what glibc keeps for
reuse (with glibc's defaults the RSS of one worker swings by some 50 MiB from one site's round
to the next).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

NOTES_PER_SITE = 40
CONDITIONS = ("pneumonia", "sepsis", "heart failure", "asthma", "COPD", "stroke")
PLANS = ("start antibiotics", "continue insulin", "increase diuretics", "inhaled steroids",
         "physiotherapy", "follow up in clinic")


@dataclass(frozen=True)
class SiteMemory:
    """One process that served ``sites`` simulated hospitals for one round each."""

    sites: int
    peak_rss_mib: float
    end_rss_mib: float
    start_rss_mib: float  # after the imports, before the first site
    base_models: int
    base_weights_mib: float  # one copy of the base weights (parameter bytes)
    local_steps: int
    # growth per site over the previous count: of the peak, and of the RSS after the last site
    peak_per_added_site_mib: float | None = None
    end_per_added_site_mib: float | None = None


def _vm_mib(field_name: str) -> float:
    from dp_engine import vm_kib  # beside this file

    return vm_kib(field_name) / 1024


def write_sites(root: Path, count: int, model_dir: Path) -> list[Path]:
    """``count`` sites, each with its own templated notes and its own policy file."""
    paths = []
    for index in range(count):
        rng = random.Random(index)
        site_dir = root / f"site-{index + 1}"
        site_dir.mkdir(parents=True)
        with open(site_dir / "notes.jsonl", "w", encoding="utf-8") as notes:
            for i in range(NOTES_PER_SITE):
                condition = rng.choice(CONDITIONS)
                text = (f"Patient admitted with {condition}. Heart rate {rng.randint(60, 120)}. "
                        f"Assessment: {condition}. Plan: {rng.choice(PLANS)}.")
                notes.write(json.dumps({"text": text, "patient_id": f"p{index}-{i}"}) + "\n")
        policy = {"site": {"name": f"site-{index + 1}", "data": "notes.jsonl", "format": "jsonl",
                           "model": str(model_dir), "state_dir": ".", "device": "cpu",
                           "dtype": "float32"},
                  "privacy": {"epsilon_cap": 8.0, "delta": 1e-4}}
        (site_dir / "policy.yaml").write_text(yaml.safe_dump(policy), encoding="utf-8")
        paths.append(site_dir / "policy.yaml")
    return paths


def _serve(policies: list[Path], local_steps: int, conn) -> None:
    """Worker: every site trains one round and evaluates it, all in this one process."""
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    try:
        from privatune.common.shared_model import adapter_model, shared_base_models
        from privatune.client.node import SiteNode
        from privatune.client.policy import load_site_policy
        from privatune.common.config import FederationConfig, JobConfig, TrainingConfig
        from privatune.common.lora import lora_state
        from privatune.common.protocol import evaluate_request, requested_lora, train_request

        start = _vm_mib("VmRSS")
        job = JobConfig(training=TrainingConfig(local_steps=local_steps, batch_size=8),
                        federation=FederationConfig(rounds=1, min_nodes=1, min_replies=1))
        request, evaluate = train_request(job, "memory", 1), evaluate_request(job, "memory", 1)
        state = None
        for path in policies:
            node = SiteNode(load_site_policy(path))
            if state is None:  # the initial adapter, taken from the shared model itself
                model, _ = adapter_model(node.policy.model_dir, node.hardware,
                                         requested_lora(request))
                state = {n: t.clone() for n, t in lora_state(model).items()}
                weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                              if "lora_" not in n)
            outcome = node.train(request, state)
            if not outcome.reply.accepted:
                raise RuntimeError(f"{node.name} declined: {outcome.reply.reason}")
            node.evaluate(evaluate, outcome.state)
        conn.send(SiteMemory(sites=len(policies), peak_rss_mib=_vm_mib("VmHWM"),
                             end_rss_mib=_vm_mib("VmRSS"), start_rss_mib=start,
                             base_models=shared_base_models(), base_weights_mib=weights / 2**20,
                             local_steps=local_steps))
    except Exception as error:  # report to the parent instead of hanging it
        conn.send(f"{type(error).__name__}: {error}")
    finally:
        conn.close()


def measure(counts: list[int], model_dir: Path, local_steps: int) -> list[SiteMemory]:
    """One fresh process per count, one after another."""
    from dp_engine import TIGHT_MALLOC, environment_for_children  # beside this file

    context = multiprocessing.get_context("spawn")
    results: list[SiteMemory] = []
    with tempfile.TemporaryDirectory(prefix="privatune-site-memory-") as scratch:
        for count in counts:
            policies = write_sites(Path(scratch) / f"n{count}", count, model_dir)
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_serve, args=(policies, local_steps, send))
            with environment_for_children(TIGHT_MALLOC):
                process.start()
            send.close()
            reply = receive.recv()
            process.join()
            if not isinstance(reply, SiteMemory):
                raise RuntimeError(f"{count} sites: {reply}")
            if results:
                before, added = results[-1], count - results[-1].sites
                reply = replace(
                    reply, peak_per_added_site_mib=(reply.peak_rss_mib - before.peak_rss_mib) / added,
                    end_per_added_site_mib=(reply.end_rss_mib - before.end_rss_mib) / added)
            results.append(reply)
            print(f"  {count} sites measured", file=sys.stderr, flush=True)
    return results


def format_table(results: list[SiteMemory]) -> str:
    """MiB throughout; 'per added site': growth over the previous row divided by the sites added;
    'base weights': one copy's parameter bytes."""
    header = (f"{'sites':>5s} {'start RSS':>9s} {'peak RSS':>8s} {'end RSS':>8s} "
              f"{'base models':>11s} {'base weights':>12s} "
              f"{'peak per added site':>19s} {'end per added site':>18s}")
    lines = [header, "-" * len(header)]
    for r in results:
        def per_site(value: float | None) -> str:
            return f"{value:.2f}" if value is not None else "-"
        lines.append(f"{r.sites:5d} {r.start_rss_mib:9.1f} {r.peak_rss_mib:8.1f} "
                     f"{r.end_rss_mib:8.1f} {r.base_models:11d} {r.base_weights_mib:12.2f} "
                     f"{per_site(r.peak_per_added_site_mib):>19s} "
                     f"{per_site(r.end_per_added_site_mib):>18s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/site_memory.py",
        description="Peak RSS of one process serving N simulated hospitals (one DP round each).")
    parser.add_argument("--sites", default="4,20", help="comma-separated site counts (default 4,20)")
    parser.add_argument("--model", default="builtin",
                        help="builtin (the demo model, built once and cached like the demo's) or "
                             "a local Hugging Face causal LM directory")
    parser.add_argument("--local-steps", type=int, default=3, help="DP steps per site (default 3)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    try:
        counts = sorted({int(n) for n in args.sites.split(",")})
    except ValueError:
        parser.error(f"--sites: {args.sites!r} is not a comma-separated list of whole numbers")
    if counts[0] < 1 or args.local_steps < 1:
        parser.error("--sites counts and --local-steps must be at least 1")

    from privatune.common.model_source import resolve_base_model
    from privatune.common.config import ModelConfig

    model_dir = resolve_base_model(ModelConfig(base=args.model), seed=0)
    results = measure(counts, model_dir, args.local_steps)
    table = format_table(results)
    print(table)
    if args.out:
        document = {"model": str(model_dir), "notes_per_site": NOTES_PER_SITE,
                    "results": [asdict(r) for r in results], "table": table.splitlines()}
        Path(args.out).write_text(json.dumps(document, indent=1), encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
