"""Utility of secure DP-SGD beside central DP-SGD on the pooled records, at the same epsilon.

    .venv/bin/python benchmarks/secure_dpsgd.py [--epsilons 3,8] [--seeds 0,1] [--steps 60]
        [--sites 3] [--records 160] [--batch 48] [--threshold T] [--model DIR] [--json out.json]

Both runs take the same DP-SGD steps (same Poisson rate q = batch / pooled records, clip, Adam
learning rate, LoRA start) on the same simulated sites' training records for each seed:

* secure: the coordinator's own run in ``federation.mode: secure_dpsgd`` (one round of
  ``--steps`` steps), every site a ``SiteNode`` in this process with its own policy file and
  ledger (``simulations.in_process.InProcessTransport``, as ``simulations.audit_federation``
  runs its federations): each site sums its clipped per-sample gradients, adds its Skellam
  share and masks the encoding (SecAgg+); the coordinator decodes the sum and steps. The job's
  noise is calibrated for guarantee (a) at epsilon (``secure.calibrate: aggregate``, so the
  sites trust secure aggregation, as ``privatune simulate`` writes their policies): the noise
  of t shares, RDP of the subsampled rounded Skellam (the binomial expansion for mirrored pairs).
  With n sites each adding a 1/t share, the coordinator's noise has n/t times the calibrated
  variance (shown as ``noise x``). The sites draw their samples and noise from their own secret
  randomness, as deployed, so this run differs from one time to the next; the curator's is
  seeded.
* central: a trusted curator runs Opacus DP-SGD (the trainer the sites use in local DP) on the
  pooled records with Gaussian noise calibrated by Opacus' RDP accountant at the same epsilon
  (simulation only).
* central at the secure noise (unless ``--no-matched``): the curator again, with the noise
  multiplier the secure coordinator's sum really carries, sigma_secure * sqrt(n / t). Beside
  the secure run it shows what the encoding itself costs (rounding, Skellam for Gaussian);
  beside the central run, what the Skellam accounting and the n/t excess cost.

Printed per epsilon and seed: each noise multiplier and their ratio (what the accounting of
(a) costs in noise against central DP-SGD's), the highest of the sites' two guarantees (a) and
(b) as their ledgers hold them after the run, and the held-out loss and perplexity of the
start, the secure and the central adapter; then the mean over seeds. The sites' records are
short templated clinical notes, each site with its own mix of conditions (non-IID); the
held-out set mixes them all. The base model is the builtin one from
``.cache/privatune/models/`` when there is one, else a tiny one built here (a few seconds).
The default run (2 epsilons x 2 seeds x 3 runs of 60 steps, the tiny model) took 33 min on 2
CPU cores busy with other work; each row prints its secure and central seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from privatune.client.data import load_records
from privatune.client.node import SiteNode
from privatune.client.policy import load_site_policy
from privatune.client.trainer import DPTrainSettings, train_dp_round
from privatune.common.base_model import BaseModelSpec, ensure_base_model
from privatune.common.config import JobConfig, with_overrides
from privatune.common.examples import encode_pairs, evaluate_loss
from privatune.common.ledger import SiteLedger
from privatune.common.lora import (
    attach_seeded_lora,
    load_base_model,
    load_lora_state,
    lora_state,
    train_factors,
    trained_part,
)
from privatune.common.privacy import RDP, calibrate_noise_multiplier, poisson_sample_rate
from privatune.common.secure_protocol import noise_params, secure_noise_multiplier
from privatune.server.coordinator import Coordinator
from privatune.server.coordinator_settings import CoordinatorSettings
from privatune.server.secure_round import round_plan
from privatune.simulations.in_process import InProcessTransport
from privatune.simulations.runner import write_site_policy
from torch.utils.data import ConcatDataset, Dataset

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = ("pneumonia", "sepsis", "heart failure", "asthma", "diabetes", "stroke",
              "urinary tract infection", "copd exacerbation")
PLANS = {"pneumonia": "start antibiotics", "sepsis": "fluids and blood cultures",
         "heart failure": "increase diuretics", "asthma": "inhaled steroids",
         "diabetes": "continue insulin", "stroke": "aspirin and swallow assessment",
         "urinary tract infection": "oral antibiotics", "copd exacerbation": "nebulisers"}
TINY = BaseModelSpec(vocab_size=512, hidden_size=64, layers=2, heads=2, intermediate_size=128,
                     max_positions=128, pretrain_steps=40, pretrain_batch_size=8,
                     pretrain_seq_len=64, corpus_max_bytes=200_000)
SITE_HELDOUT = 8  # each site's own held-out notes (the coordinator's final evaluation asks them)


def note(rng: random.Random, conditions: tuple[str, ...]) -> str:
    """A short templated note whose plan follows from its condition (learnable structure)."""
    condition = rng.choice(conditions)
    return (f"Patient admitted with {condition}. Temperature {rng.randint(36, 39)} C, heart "
            f"rate {rng.randint(60, 120)}. Assessment: {condition}. Plan: {PLANS[condition]}.")


def site_notes(site: int, count: int, seed: int) -> list[str]:
    """A site's notes: mostly its own four conditions, some of the others."""
    rng = random.Random(f"{seed}-{site}")
    own = tuple(CONDITIONS[(2 * site + k) % len(CONDITIONS)] for k in range(4))
    return [note(rng, own if rng.random() < 0.8 else CONDITIONS) for _ in range(count)]


def base_model_dir(requested: str | None) -> Path:
    if requested:
        return Path(requested)
    cached = sorted((ROOT / ".cache" / "privatune" / "models").glob("*/config.json"))
    if cached:
        return cached[0].parent
    return ensure_base_model(Path(tempfile.mkdtemp(prefix="privatune-bench-")), TINY)


def benchmark_job(args: argparse.Namespace, seed: int, epsilon: float, rate: float,
                  threshold: int) -> JobConfig:
    """The secure run's job, validated as a loaded one: one round of ``--steps`` steps, the
    noise sized for guarantee (a), the loss on whole notes (as the held-out loss is taken)."""
    return with_overrides(JobConfig(), (
        f"seed={seed}", f"model.max_length={args.max_length}", f"lora.r={args.rank}",
        f"lora.alpha={2 * args.rank}", f"lora.target_modules=[{args.targets}]",
        f"training.local_steps={args.steps}", f"training.batch_size={args.batch}",
        f"training.learning_rate={args.lr}", f"training.max_grad_norm={args.clip}",
        f"training.max_physical_batch_size={args.physical}", "training.loss_on=note",
        f"privacy.epsilon={epsilon}", f"privacy.delta={args.delta}",
        "federation.mode=secure_dpsgd", "federation.rounds=1",
        f"federation.min_nodes={args.sites}", f"federation.min_replies={args.sites}",
        f"secure.sample_rate={rate!r}", f"secure.min_contributions={threshold}",
        f"secure.max_records_per_site={args.records}", "secure.calibrate=aggregate",
        "evaluation.every_k_rounds=0", "tracking=none"),
        "the secure DP-SGD benchmark's job")


def site_nodes(root: Path, model_dir: Path, job: JobConfig, args: argparse.Namespace
               ) -> list[SiteNode]:
    """The sites, each with its notes on disk, its policy file (``write_site_policy``, as
    ``privatune simulate`` writes it) and a fresh ledger: ``--records`` notes to train on and
    ``SITE_HELDOUT`` held out, split as given (as the empirical audit hands its sites theirs);
    float32 on the CPU, as the curator runs."""
    nodes = []
    for site in range(args.sites):
        name = f"site-{site}"
        data = root / "data" / f"{name}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps({"text": text}) + "\n" for text in
                                site_notes(site, args.records + SITE_HELDOUT, job.seed)))
        records = load_records(data, "jsonl")
        policy = load_site_policy(write_site_policy(root / "sites" / name, name, data, model_dir,
                                                    job, "jsonl"))
        # the curator's hardware (site.device and dtype auto may pick half precision), so that
        # both runs compute alike
        policy = replace(policy, site=replace(policy.site, device="cpu", dtype="float32"))
        nodes.append(SiteNode(policy, split=(records[:args.records], records[args.records:])))
    return nodes


def secure_run(job: JobConfig, model_dir: Path, nodes: list[SiteNode],
               out: Path) -> dict[str, torch.Tensor]:
    """The coordinator's run over the sites in this process: its final global adapter; an
    error when a step released nothing or a site declined (it says why)."""
    coordinator = Coordinator(CoordinatorSettings(
        job=job, model_dir=model_dir, out_dir=out, run_id=f"secure-benchmark-{job.seed}",
        resume=False, sites=tuple(n.name for n in nodes), evaluate_each_round=False),
        InProcessTransport(nodes), progress=lambda _line: None)
    training = coordinator.run().rounds[-1].training
    if not training.aggregated or training.failures or training.declined:
        raise SystemExit(f"the secure run did not release all {job.training.local_steps} "
                         f"steps: {training.failures or training.declined}")
    return coordinator.global_state


def central_run(model: torch.nn.Module, start: dict[str, torch.Tensor], pooled: Dataset,
                job: JobConfig, noise_multiplier: float, rate: float) -> dict[str, torch.Tensor]:
    """The trusted curator (simulation only): the same steps by the trainer the sites use,
    Gaussian noise, on the pooled records; its Poisson rate must be the secure run's q."""
    load_lora_state(model, start)
    train_factors(model, job.federation.aggregation)
    training = job.training
    result = train_dp_round(model, pooled, DPTrainSettings(
        noise_multiplier=noise_multiplier, max_grad_norm=training.max_grad_norm,
        expected_batch_size=training.batch_size, steps=training.local_steps,
        learning_rate=training.learning_rate, seed=job.seed,
        max_physical_batch_size=training.max_physical_batch_size))
    if not math.isclose(result.sample_rate, rate):
        raise SystemExit(f"the curator sampled at {result.sample_rate:g}, the sites at {rate:g}")
    return lora_state(model)


def run(args: argparse.Namespace) -> list[dict]:
    model_dir = base_model_dir(args.model)
    pooled = args.sites * args.records
    rate = poisson_sample_rate(pooled, args.batch)
    if not math.isclose(rate * pooled, args.batch):
        raise SystemExit(f"--batch {args.batch} must divide the pooled records ({pooled}) so "
                         "that both runs sample at the same rate")
    threshold = args.threshold or args.sites // 2 + 1
    print(f"base model {model_dir.name}; LoRA r={args.rank} on {args.targets}; {args.sites} sites "
          f"x {args.records} records, q={rate:.4g} (expected union batch {args.batch}), "
          f"{args.steps} steps, clip {args.clip}, Adam lr {args.lr}, delta {args.delta:g}, "
          f"t={threshold} (noise x{args.sites / threshold:.3g} the calibrated variance)")
    rows = []
    for seed in args.seeds:
        jobs = [benchmark_job(args, seed, epsilon, rate, threshold) for epsilon in args.epsilons]
        base, tokenizer = load_base_model(model_dir)
        model = attach_seeded_lora(base, jobs[0].lora, seed=seed)  # the coordinator's start
        start = lora_state(model)
        heldout_rng = random.Random(f"heldout-{seed}")
        heldout = encode_pairs(tokenizer, [("", note(heldout_rng, CONDITIONS))
                                           for _ in range(args.heldout)], args.max_length)
        trained = trained_part(start, jobs[0].federation.aggregation)
        dimension = sum(t.numel() for t in trained.values())
        start_loss, _ = evaluate_loss(model, heldout)
        for job in jobs:
            epsilon = job.privacy.epsilon
            sigma_secure = secure_noise_multiplier(job, dimension)  # as the coordinator sizes it
            sigma_central = calibrate_noise_multiplier(epsilon, args.delta, rate, args.steps,
                                                       accountant=RDP)
            bits = noise_params(round_plan(job, sigma_secure, args.sites), dimension,
                                args.clip).bits
            with tempfile.TemporaryDirectory(prefix="privatune-secure-benchmark-") as scratch:
                nodes = site_nodes(Path(scratch), model_dir, job, args)
                began = time.perf_counter()
                secure = secure_run(job, model_dir, nodes, Path(scratch) / "run")
                secure_seconds = time.perf_counter() - began
                last = [SiteLedger(n.policy.ledger_path).secure_releases()[-1] for n in nodes]
                # what the sites trained on, as their nodes encoded it
                union = ConcatDataset([n.dataset("train", tokenizer, args.max_length,
                                                 loss_marker=job.loss_marker) for n in nodes])
            load_lora_state(model, secure)
            secure_loss, _ = evaluate_loss(model, heldout)

            began = time.perf_counter()
            load_lora_state(model, central_run(model, start, union, job, sigma_central, rate))
            central_seconds = time.perf_counter() - began
            central_loss, _ = evaluate_loss(model, heldout)
            matched_loss = math.nan
            if args.matched:  # the curator with the noise the secure coordinator saw
                load_lora_state(model, central_run(
                    model, start, union, job, sigma_secure * math.sqrt(args.sites / threshold),
                    rate))
                matched_loss, _ = evaluate_loss(model, heldout)
            row = {"epsilon": epsilon, "seed": seed, "dimension": dimension,
                   "sigma_secure": sigma_secure, "sigma_central": sigma_central,
                   "sigma_ratio": sigma_secure / sigma_central, "bits": bits,
                   "epsilon_a": max(r.aggregate_epsilon for r in last),
                   "epsilon_b": max(r.fallback_epsilon for r in last), "start_loss": start_loss,
                   "secure_loss": secure_loss, "central_loss": central_loss,
                   "matched_loss": matched_loss,
                   "secure_seconds": secure_seconds, "central_seconds": central_seconds}
            rows.append(row)
            print(f"eps {epsilon:g} seed {seed}: sigma secure {sigma_secure:.3f} (bits "
                  f"{row['bits']}; site eps (a) {row['epsilon_a']:.3f}, (b) {row['epsilon_b']:.2f})"
                  f", central {sigma_central:.3f} (secure / central "
                  f"{row['sigma_ratio']:.3f}) | held-out loss (ppl): start {start_loss:.3f} "
                  f"({math.exp(start_loss):.2f}), secure {secure_loss:.3f} "
                  f"({math.exp(secure_loss):.2f}), central {central_loss:.3f} "
                  f"({math.exp(central_loss):.2f})"
                  + (f", central at the secure noise {matched_loss:.3f}" if args.matched else "")
                  + f" | {secure_seconds:.0f} s, {central_seconds:.0f} s",
                  flush=True)
    for epsilon in args.epsilons:
        mine = [r for r in rows if r["epsilon"] == epsilon]
        mean = {k: sum(r[k] for r in mine) / len(mine)
                for k in ("start_loss", "secure_loss", "central_loss", "matched_loss")}
        print(f"eps {epsilon:g}, mean of {len(mine)} seeds: held-out loss start "
              f"{mean['start_loss']:.3f}, secure {mean['secure_loss']:.3f} (ppl "
              f"{math.exp(mean['secure_loss']):.2f}), central {mean['central_loss']:.3f} (ppl "
              f"{math.exp(mean['central_loss']):.2f})"
              + (f", central at the secure noise {mean['matched_loss']:.3f}" if args.matched
                 else ""))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epsilons", type=lambda s: [float(x) for x in s.split(",")],
                        default=[3.0, 8.0])
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--records", type=int, default=160, help="training records per site")
    parser.add_argument("--heldout", type=int, default=120)
    parser.add_argument("--batch", type=int, default=48, help="expected union batch q*N")
    parser.add_argument("--physical", type=int, default=32, help="max physical batch")
    parser.add_argument("--threshold", type=int, default=0, help="t (default n // 2 + 1)")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--model", default=None, help="base model directory")
    parser.add_argument("--no-matched", dest="matched", action="store_false",
                        help="skip the curator run at the secure run's noise")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    rows = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
