"""The study's settings that run in this process, on one seed's notes: the pooled training
(every site's records in one place, without DP noise: the upper bound no hospital may run; or
with DP-SGD by a trusted curator, simulated only) and the nearest-note copy (no training)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privatune.simulations.study_measurements import Measurement, Scores
from privatune.simulations.study_plan import (CENTRAL_DP, NEAREST_NOTE, NON_PRIVATE, POOLED,
                                              Budget)

if TYPE_CHECKING:
    from privatune.common.config import JobConfig


# --------------------------------------------------------------------------- one seed's notes


@dataclass(frozen=True)
class SeedData:
    """One seed's notes as the pooled training and the copy need them, written once under
    ``<out>/data/seed-N`` (so later seeds' hospitals in the cache cannot change them)."""

    train: Path  # every site's training split, pooled (JSONL)
    central: Path  # the coordinator's held-out notes (JSONL)
    heldout: dict[str, Path]  # site -> its held-out split (JSONL)
    train_records: dict[str, int]  # site -> its training split's records (the secure row's q)


def seed_data(job: JobConfig, directory: Path) -> SeedData:
    """The seed's notes, split as the simulation's sites split them; reused when written (one
    written before the sites' counts were kept is written again: the same notes)."""
    from privatune.client.data import collapse_duplicates, load_records, split_records
    from privatune.common.config import to_dict
    from privatune.simulations.hospitals import generate_federation
    from privatune.simulations.runner import job_hospitals, write_central_eval

    done = directory / "complete.json"
    counts = saved_train_records(directory)
    if counts is not None:
        return SeedData(directory / "train.jsonl", directory / "central_eval.jsonl",
                        {name: directory / "heldout" / f"{name}.jsonl" for name in counts},
                        counts)
    sites, coordinator, cache = job_hospitals(job)  # as simulate() makes them
    exports = generate_federation([*sites, coordinator], cache)
    (directory / "heldout").mkdir(parents=True, exist_ok=True)
    central = write_central_eval(exports[coordinator.name], directory / "central_eval.jsonl")
    pooled, heldout, counts = [], {}, {}
    for spec in sites:
        records, _ = collapse_duplicates(load_records(exports[spec.name], "fhir"))
        # as the site's policy splits them (runner.write_site_policy, client.node.SiteNode)
        train, held = split_records(records, job.data.heldout_fraction, job.seed)
        pooled += train
        counts[spec.name] = len(train)
        heldout[spec.name] = _write_records(held, directory / "heldout" / f"{spec.name}.jsonl")
    data = SeedData(_write_records(pooled, directory / "train.jsonl"), central, heldout, counts)
    done.write_text(json.dumps({"sites": list(heldout), "train_records": counts,
                                "config": to_dict(job)}), encoding="utf-8")
    return data


def saved_train_records(directory: Path) -> dict[str, int] | None:
    """Each site's training records as a finished ``seed_data`` under ``directory`` kept them;
    None where there is none (or it predates the counts)."""
    done = directory / "complete.json"
    if not done.is_file():
        return None
    counts = json.loads(done.read_text(encoding="utf-8")).get("train_records")
    return None if counts is None else {str(name): int(n) for name, n in counts.items()}


def _write_records(records: Sequence[Any], path: Path) -> Path:
    """Records as JSONL a node reads back the same (text or prompt + completion, patient)."""
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            row = ({"prompt": record.prompt, "completion": record.completion} if record.prompt
                   else {"text": record.completion})
            if record.patient_id is not None:
                row["patient_id"] = record.patient_id
            handle.write(json.dumps(row) + "\n")
    return path


def _min_records() -> int:
    """The fewest held-out records a simulated site releases a score over (its policy's
    default release.min_records): pooled and copy are averaged over the same sites."""
    from privatune.client.policy import ReleaseSection

    return ReleaseSection().min_records


# --------------------------------------------------------------------------- pooled, copy


def pooled_measurement(job: JobConfig, data: SeedData) -> Measurement:
    """All sites' training records in one place, trained without DP noise for as many steps of
    the job's batch size as one site takes (``_pooled_training``)."""
    return _pooled_training(POOLED, NON_PRIVATE, job, data, lambda units: 0.0)


def central_dp_measurement(job: JobConfig, data: SeedData) -> Measurement:
    """All sites' training records with one trusted curator running DP-SGD (simulated only:
    no deployment may pool them), for the secure row's ``job``: its union batch and steps, the
    noise calibrated by the project's accountant for the job's ε, δ and the Poisson rate Opacus
    samples the pool at, never below the job's floor (``privacy.min_noise_multiplier``) as at
    a site."""
    from privatune.common.privacy import calibrate_noise_multiplier, poisson_sample_rate

    privacy, training = job.privacy, job.training

    def noise(units: int) -> float:
        rate = poisson_sample_rate(units, training.batch_size)
        sigma = calibrate_noise_multiplier(privacy.epsilon, privacy.delta, rate,
                                           job.federation.rounds * training.local_steps,
                                           accountant=privacy.accountant_name)
        return max(sigma, privacy.min_noise_multiplier)

    return _pooled_training(CENTRAL_DP, Budget(privacy.epsilon), job, data, noise)


def _pooled_training(setting: str, budget: Budget, job: JobConfig, data: SeedData,
                     noise: Callable[[int], float]) -> Measurement:
    """The pooled records trained for ``rounds`` times ``local_steps`` DP-SGD steps of the job's
    batch size at the noise multiplier ``noise`` gives for the pool's privacy units (per-sample
    clipping stays, as at every site), restarting Adam every ``local_steps`` as a site's rounds
    do; then scored like the global model, centrally and on every site's held-out split."""
    from privatune.client.data import load_records
    from privatune.client.node import privacy_units
    from privatune.client.trainer import DPTrainSettings, train_dp_round
    from privatune.common.examples import encode_pairs
    from privatune.common.hardware import resolve_hardware
    from privatune.common.lora import attach_seeded_lora, load_base_model, lora_state, train_factors
    from privatune.common.model_source import resolve_base_model
    from privatune.server.evaluation import CentralEvaluator

    model_dir = resolve_base_model(job.model, job.seed)
    hardware = resolve_hardware(job.model.device, job.model.dtype, where="model")
    base, tokenizer = load_base_model(model_dir, hardware.device, hardware.dtype)
    model = attach_seeded_lora(base, job.lora, job.seed)
    train_factors(model, job.federation.aggregation)
    units = privacy_units(load_records(data.train, "jsonl"), job.privacy.unit, job.loss_marker,
                          job.judged_only)
    dataset = encode_pairs(tokenizer, units, job.model.max_length)
    noise_multiplier = noise(len(dataset))
    training = job.training
    for _ in range(job.federation.rounds):
        train_dp_round(model, dataset, DPTrainSettings(
            noise_multiplier=noise_multiplier, max_grad_norm=training.max_grad_norm,
            expected_batch_size=training.batch_size, steps=training.local_steps,
            learning_rate=training.learning_rate, seed=secrets.randbits(63),
            max_physical_batch_size=training.max_physical_batch_size,
            gradient_checkpointing=training.gradient_checkpointing))
    state = lora_state(model)

    def scored(path: Path, minimum: int = 0) -> Scores | None:
        evaluator = CentralEvaluator(lambda: model, tokenizer, path, job.model.max_length,
                                     training.eval_batch_size, job.evaluation.marker,
                                     job.loss_marker, job.judged_only)
        tasks = evaluator.tasks.tasks[:job.evaluation.max_examples]
        if len(tasks) < minimum or evaluator.tasks.records < minimum:
            return None  # a site would release no score over so few notes
        generation = evaluator.generation(state, job.evaluation.max_new_tokens,
                                          job.evaluation.max_examples)
        return Scores.of(generation[0] if generation else None, evaluator.perplexity(state))

    return _measured_on_every_set(setting, budget, job, data, scored, noise_multiplier)


def nearest_note_measurement(job: JobConfig, data: SeedData) -> Measurement:
    """The nearest-note copy scored like a model: each copy cut to ``max_new_tokens`` tokens
    of the base model's tokenizer, the length a model's completion may have."""
    from transformers import AutoTokenizer

    from privatune.common.generation import generation_tasks, score_completions
    from privatune.common.model_source import resolve_base_model
    from privatune.server.evaluation import read_eval_pairs
    from privatune.simulations.nearest_note import nearest_references

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_base_model(job.model, job.seed)),
                                              local_files_only=True)
    marker, limit = job.evaluation.marker, job.evaluation.max_new_tokens
    train = [(t.prompt, t.reference)
             for t in generation_tasks(read_eval_pairs(data.train), marker).tasks]

    def cut(text: str) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:limit]
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    def scored(path: Path, minimum: int = 0) -> Scores | None:
        pairs = read_eval_pairs(path)
        tasks = generation_tasks(pairs, marker).tasks[:job.evaluation.max_examples]
        if not tasks or len(tasks) < minimum or len(pairs) < minimum:
            return None
        prompts = [t.prompt for t in tasks]
        copies = [cut(text) for text in nearest_references(train, prompts)]
        return Scores.of(score_completions(copies, [t.reference for t in tasks], prompts))

    return _measured_on_every_set(NEAREST_NOTE, NON_PRIVATE, job, data, scored,
                                  noise_multiplier=None)


def _measured_on_every_set(setting: str, budget: Budget, job: JobConfig, data: SeedData,
                           scored: Callable[[Path, int], Scores | None],
                           noise_multiplier: float | None) -> Measurement:
    """A setting scored on the coordinator's notes and on each site's held-out split, the
    sites averaged over those with enough notes for a site to release a score."""
    sites = {name: scored(path, _min_records()) for name, path in data.heldout.items()}
    kept = {name: s for name, s in sites.items() if s is not None}
    return Measurement(setting, budget.key, job.seed, scored(data.central, 0),
                       Scores.mean(list(kept.values())), tuple(kept), noise_multiplier)
