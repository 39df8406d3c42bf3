"""Utility of secure DP-SGD beside central DP-SGD on the pooled records, at the same epsilon.

    .venv/bin/python benchmarks/secure_dpsgd.py [--epsilons 3,8] [--seeds 0,1] [--steps 60]
        [--sites 3] [--records 160] [--batch 48] [--threshold T] [--model DIR] [--json out.json]

Both runs take the same DP-SGD steps (same Poisson rate q = batch / pooled records, clip, Adam
learning rate, LoRA start) on the same simulated sites' records for each seed:

* secure: every site sums its clipped per-sample gradients, adds its Skellam share, SecAgg+
  sums the encodings, the coordinator decodes and steps (simulations/secure_dpsgd.py). Its
  aggregate noise multiplier is calibrated for guarantee (a) at epsilon
  (``aggregate_noise_multiplier``: the noise of t shares, RDP of the subsampled rounded
  Skellam, Zhu-Wang's general subsampling bound). With n sites each adding a 1/t share, the
  coordinator's noise has n/t times the calibrated variance (shown as ``noise x``).
* central: a trusted curator runs Opacus DP-SGD on the pooled records with Gaussian noise
  calibrated by Opacus' RDP accountant at the same epsilon (simulation only).
* central at the secure noise (unless ``--no-matched``): the curator again, with the noise
  multiplier the secure coordinator's sum really carries, sigma_secure * sqrt(n / t). Beside
  the secure run it shows what the encoding itself costs (rounding, Skellam for Gaussian);
  beside the central run, what the looser Skellam accounting and the n/t excess cost.

Printed per epsilon and seed: each noise multiplier, each site's two guarantees (a) and (b)
after the run, and the held-out loss and perplexity of the start, the secure and the central
adapter; then the mean over seeds. The sites' records are short templated clinical notes, each
site with its own mix of conditions (non-IID); the held-out set mixes them all. The base model
is the builtin one from ``.cache/privatune/models/`` when there is one, else a tiny one built
here (a few seconds). The default run (2 epsilons x 2 seeds x 3 runs of 60 steps) took
3 min 50 s on one shared CPU core.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

from privatune.common.base_model import BaseModelSpec, ensure_base_model
from privatune.common.config import LoraConfig
from privatune.common.distributed_noise import (
    aggregate_noise_multiplier,
    site_guarantees,
)
from privatune.common.examples import encode_pairs, evaluate_loss
from privatune.common.lora import (
    attach_seeded_lora,
    load_base_model,
    load_lora_state,
    lora_state,
    trained_part,
)
from privatune.common.privacy import (
    RDP,
    calibrate_noise_multiplier,
    poisson_sample_rate,
)
from privatune.simulations.secure_dpsgd import (
    DpsgdSite,
    SecureDpsgdSettings,
    run_central_dpsgd,
    run_secure_dpsgd,
)

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


def run(args: argparse.Namespace) -> list[dict]:
    model_dir = base_model_dir(args.model)
    lora = LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=tuple(args.targets.split(",")))
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
        base, tokenizer = load_base_model(model_dir)
        model = attach_seeded_lora(base, lora, seed=seed)  # the seed's LoRA start
        start = lora_state(model)
        datasets = [encode_pairs(tokenizer, [("", text) for text in site_notes(i, args.records, seed)],
                                 args.max_length) for i in range(args.sites)]
        heldout_rng = random.Random(f"heldout-{seed}")
        heldout = encode_pairs(tokenizer, [("", note(heldout_rng, CONDITIONS))
                                           for _ in range(args.heldout)], args.max_length)
        dimension = sum(t.numel() for t in trained_part(start, "fedavg").values())
        for epsilon in args.epsilons:
            sigma_secure = aggregate_noise_multiplier(epsilon, args.delta, rate, args.steps,
                                                      dimension=dimension,
                                                      min_contributions=threshold)
            sigma_central = calibrate_noise_multiplier(epsilon, args.delta, rate, args.steps,
                                                       accountant=RDP)
            load_lora_state(model, start)
            start_loss, _ = evaluate_loss(model, heldout)

            began = time.perf_counter()
            sites = [DpsgdSite(i, model, d, secret_seed=1000 * seed + i)
                     for i, d in enumerate(datasets)]
            settings = SecureDpsgdSettings(sample_rate=rate, clip=args.clip,
                                           noise_multiplier=sigma_secure, learning_rate=args.lr,
                                           threshold=threshold, public_seed=seed,
                                           max_physical_batch_size=args.physical)
            secure = run_secure_dpsgd(sites, args.steps, settings, start)
            secure_seconds = time.perf_counter() - began
            load_lora_state(model, secure.state)
            secure_loss, _ = evaluate_loss(model, heldout)
            guarantees = site_guarantees(secure.params, sample_rate=rate, steps=args.steps,
                                         delta=args.delta)

            began = time.perf_counter()
            central = run_central_dpsgd(model, datasets, args.steps, initial_state=start,
                                        expected_batch_size=args.batch,
                                        noise_multiplier=sigma_central, clip=args.clip,
                                        learning_rate=args.lr, seed=seed,
                                        max_physical_batch_size=args.physical)
            central_seconds = time.perf_counter() - began
            load_lora_state(model, central.state)
            central_loss, _ = evaluate_loss(model, heldout)
            matched_loss = math.nan
            if args.matched:  # the curator with the noise the secure coordinator saw
                matched = run_central_dpsgd(
                    model, datasets, args.steps, initial_state=start,
                    expected_batch_size=args.batch, clip=args.clip, learning_rate=args.lr,
                    noise_multiplier=sigma_secure * math.sqrt(args.sites / threshold),
                    seed=seed, max_physical_batch_size=args.physical)
                load_lora_state(model, matched.state)
                matched_loss, _ = evaluate_loss(model, heldout)
            row = {"epsilon": epsilon, "seed": seed, "dimension": dimension,
                   "sigma_secure": sigma_secure, "sigma_central": sigma_central,
                   "bits": secure.params.bits, "epsilon_a": guarantees.aggregate_epsilon,
                   "epsilon_b": guarantees.fallback_epsilon, "start_loss": start_loss,
                   "secure_loss": secure_loss, "central_loss": central_loss,
                   "matched_loss": matched_loss,
                   "secure_seconds": secure_seconds, "central_seconds": central_seconds}
            rows.append(row)
            print(f"eps {epsilon:g} seed {seed}: sigma secure {sigma_secure:.3f} (bits "
                  f"{row['bits']}; site eps (a) {row['epsilon_a']:.3f}, (b) {row['epsilon_b']:.2f})"
                  f", central {sigma_central:.3f} | held-out loss (ppl): start {start_loss:.3f} "
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
