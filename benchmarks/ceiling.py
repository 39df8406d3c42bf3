"""The non-private ceiling of a base model: LoRA trained on the simulated sites' training notes
pooled, without DP, judged on the coordinator's held-out notes like the federation's model.

A developer's probe, not part of the package: it answers "can this base learn to write the
notes at all, with these lengths and this many steps?" before any noise is added. It reads the
cached simulated hospitals (made by `privatune simulate`), never a site's held-out split.

    .venv/bin/python benchmarks/ceiling.py --base .cache/privatune/models/<model dir> \
        --steps 200 --batch 16 --max-length 768 --new-tokens 400 --eval-every 100

`--seconds S` trains until S seconds of training are spent (at most --steps steps), so bases of
different speed are compared on the same wall time; `--train extra:norm` also trains the base's
RMSNorm weights beside LoRA, `--train full` every parameter (non-private only: a reference for
what LoRA costs).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from privatune.client.data import load_records, split_records
from privatune.client.node import privacy_units
from privatune.client.trainer import DPTrainSettings, train_dp_round
from privatune.common.examples import encode_pairs, evaluate_loss, per_example_loss
from privatune.common.generation import evaluate_generation, generation_tasks
from privatune.common.privacy import PRV, calibrate_noise_multiplier, poisson_sample_rate
from privatune.common.config import LoraConfig
from privatune.common.lora import attach_seeded_lora, load_base_model

MARKER = "Assessment:"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="a local Hugging Face model directory")
    parser.add_argument("--hospitals", default=".cache/privatune/hospitals")
    parser.add_argument("--sites", default="hospital-1,hospital-2,hospital-3,hospital-4")
    parser.add_argument("--central", default="coordinator-validation")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--new-tokens", type=int, default=400)
    parser.add_argument("--eval-notes", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=0.0,
                        help="non-private: stop training once this many seconds of training are "
                        "spent (and at most --steps steps); 0: exactly --steps steps")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="what --seconds counts: wall-clock seconds, or this process's CPU "
                        "seconds (fairer on a machine shared with other work, with --threads 1)")
    parser.add_argument("--no-base-eval", action="store_true",
                        help="skip scoring the untrained model (saves its generation time)")
    parser.add_argument("--train", default="lora",
                        help="what trains: lora (default); lora+<substr>,... (LoRA plus the base "
                        "parameters whose name contains a substring, e.g. lora+norm); full "
                        "(every parameter, no LoRA)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                        help="LoRA target modules, comma-separated")
    parser.add_argument("--epsilon", type=float, default=0.0,
                        help="train with the node's DP-SGD engine at this epsilon over --steps "
                        "(Poisson rate batch / pooled notes, noise from the PRV accountant) "
                        "instead of plain SGD; 0: non-private")
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    hospitals = Path(args.hospitals)
    train = [record for site in args.sites.split(",")
             for record in split_records(load_records(hospitals / site), 0.2, 0)[0]]
    central = load_records(hospitals / args.central)
    tasks = generation_tasks([(r.prompt, r.completion) for r in central]).tasks[:args.eval_notes]
    base, tokenizer = load_base_model(args.base)
    if args.train == "full":
        model = base
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    else:
        mode, _, extra = args.train.partition("+")
        if mode != "lora":
            parser.error(f"--train: expected lora, lora+<substr>,... or full, got {args.train!r}")
        model = attach_seeded_lora(base, LoraConfig(args.r, args.alpha, tuple(args.targets.split(","))),
                                   args.seed)
        for name, parameter in model.named_parameters():
            if any(part and part in name for part in extra.split(",")):
                parameter.requires_grad_(True)
    if (args.epsilon > 0) and args.train != "lora":
        parser.error("--train other than lora is for the non-private ceiling only")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dataset = encode_pairs(tokenizer, privacy_units(train, "record", MARKER), args.max_length)
    held_out = encode_pairs(tokenizer, privacy_units(central, "record", MARKER), args.max_length)
    print(f"{len(dataset)} training notes ({dataset.cut_completions} completions cut), "
          f"{len(tasks)} central prompts, {trained} trained parameters", flush=True)

    # nats per character of the held-out completions: comparable across tokenizers, where the
    # perplexity per token is not
    labelled_chars = sum(len(tokenizer.decode(row[row != -100].tolist()))
                         for row in held_out.tensors[1])

    def evaluate(label: str, seconds: float, steps: int | None = None) -> None:
        loss, tokens = evaluate_loss(model, held_out, 16)
        scores, samples = evaluate_generation(model, tokenizer, tasks, args.max_length,
                                              args.new_tokens, 16)
        clinical = scores.clinical
        print(json.dumps({"at": label, "train_s": round(seconds),
                          **({"steps": steps, "s_per_step": round(seconds / steps, 2)} if steps else {}),
                          "ppl": round(math.exp(loss), 2),
                          "nats_per_char": round(loss * tokens / labelled_chars, 4),
                          "rouge_l": round(scores.rouge_l, 4), "cut_off": scores.cut_off,
                          "measurement_fidelity": clinical.measurement_fidelity,
                          "status_accuracy": clinical.status_accuracy,
                          "status_majority_share": clinical.status_majority_share,
                          "repeat_4gram": clinical.repeat_4gram}), flush=True)
        print(f"  e.g. {samples[0].completion[:160]!r}", flush=True)

    if not args.no_base_eval:
        evaluate("base", 0.0)
    if args.epsilon > 0:
        rate = poisson_sample_rate(len(dataset), args.batch)
        noise = calibrate_noise_multiplier(args.epsilon, args.delta, rate, args.steps, accountant=PRV)
        print(f"DP-SGD: epsilon {args.epsilon:g}, delta {args.delta:g}, rate {rate:.4f}, "
              f"{args.steps} steps, noise multiplier {noise:.3f}; noise norm on the mean "
              f"gradient {noise * math.sqrt(trained) / args.batch:.2f} against a clipped "
              "signal of at most 1", flush=True)
        started = time.monotonic()
        result = train_dp_round(model, dataset, DPTrainSettings(
            noise_multiplier=noise, max_grad_norm=1.0, expected_batch_size=args.batch,
            steps=args.steps, learning_rate=args.lr, seed=args.seed,
            max_physical_batch_size=args.micro_batch))
        print(f"mean train loss {result.mean_loss:.3f}", flush=True)
        evaluate(f"step {args.steps} (DP)", time.monotonic() - started)
        return
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    clock = time.process_time if args.clock == "cpu" else time.monotonic
    started, wall_started = clock(), time.monotonic()
    model.train()
    step = 0
    for step in range(1, args.steps + 1):
        optimizer.zero_grad()
        for rows in torch.randint(0, len(dataset), (args.batch,), generator=generator).split(
                args.micro_batch):
            ids, labels, mask = (tensor[rows] for tensor in dataset.tensors)
            width = int(mask.sum(dim=1).max())  # drop the columns that are padding in every row
            logits = model(input_ids=ids[:, :width], attention_mask=mask[:, :width]).logits
            (per_example_loss(logits, labels[:, :width]).sum() / args.batch).backward()
        optimizer.step()
        if args.seconds and clock() - started >= args.seconds:
            break
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            paused, wall_paused = clock(), time.monotonic()
            evaluate(f"step {step}", paused - started, step)
            model.train()
            started += clock() - paused  # scoring is not training time
            wall_started += time.monotonic() - wall_paused
    print(f"trained {step} steps: {clock() - started:.0f} s on the {args.clock} clock, "
          f"{time.monotonic() - wall_started:.0f} s wall", flush=True)
    evaluate(f"step {step}", clock() - started, step)


if __name__ == "__main__":
    main()
