"""Empirical privacy audit: does the trained model remember one hospital's private records?

Epsilon is an upper bound proven on paper; this audit measures what an attacker actually gets,
so a privacy officer can see the bound at work. One hospital's training split gets canaries
(`canaries`), the federation is trained twice from the same config through the real round
(`audit_federation`: the coordinator's, with the nodes in this process), once with DP-SGD at
the sites' epsilon and once without DP (no noise, no clipping: an audit-only counterfactual,
never a node mode), and the base model and both trained models are attacked:
canary exposure (`canaries`) and membership inference on every site's records (`membership`).
The report (`audit_report`) puts the three side by side.

The data, the splits, the canaries, the candidate secrets and the starting adapter follow the
config's seed; the DP noise does not: each site draws its own secret seed for every release,
as the node does, so two trained runs of the same config differ by their noise.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from privatune.common.config import ConfigError, JobConfig, load_job_config, to_dict
from privatune.common.examples import encode_pairs
from privatune.common.lora import initial_adapter, load_base_model, load_lora_state
from privatune.simulations.audit_federation import NO_CLIPPING, Progress, train_federation
from privatune.simulations.audit_report import epsilon_text, write_audit_report
from privatune.simulations.audit_sites import (
    AuditSite,
    SiteSplit,
    encode_sites,
    prepare_sites,
    site_with_most_heldout,
)
from privatune.simulations.canaries import (
    DEFAULT_CANARIES_PER_COUNT,
    DEFAULT_CANDIDATES,
    DEFAULT_REPETITIONS,
    CANARY_TEMPLATE,
    MRN_SPACE_SIZE,
    Canary,
    Scorer,
    make_canaries,
    measure_exposures,
    sample_candidates,
)
from privatune.simulations.membership import (
    ATTACKS,
    MembershipLosses,
    membership_attacks,
    membership_losses,
    record_token_losses,
)

RUN_LABELS = {"base": "base model (before training)", "dp": "DP-SGD",
              "non_dp": "no DP (audit only)"}


def model_scorer(model: torch.nn.Module, tokenizer: Any, max_length: int, batch_size: int) -> Scorer:
    """A Scorer backed by a language model: log-perplexity of each text, in bits."""

    def score(texts: Sequence[str]) -> list[float]:
        dataset = encode_pairs(tokenizer, [("", t) for t in texts], max_length)
        return [float(losses.sum()) / math.log(2.0)
                for losses in record_token_losses(model, dataset, batch_size)]

    return score


def evaluate_run(model: torch.nn.Module, tokenizer: Any, job: JobConfig, splits: Sequence[SiteSplit],
                 canaries: Sequence[Canary], candidates: Sequence[str],
                 reference: MembershipLosses | None = None) -> tuple[dict[str, Any], MembershipLosses]:
    """Exposure of every canary, and the membership attacks on every site's records.

    ``reference`` is the base model's `MembershipLosses` (None when evaluating the base model
    itself). Returns the report fields of one run and this model's losses.
    """
    batch = job.training.eval_batch_size
    exposures = measure_exposures(model_scorer(model, tokenizer, job.model.max_length, max(batch, 256)),
                                  canaries, candidates)
    by_count: dict[str, dict[str, Any]] = {}
    for count in sorted({c.repetitions for c in canaries}):
        chosen = [e for e in exposures if e.repetitions == count]
        by_count[str(count)] = {
            "mean": sum(e.exposure for e in chosen) / len(chosen),
            "mean_sampled": sum(e.exposure_sampled for e in chosen) / len(chosen),
            "canaries": [asdict(e) for e in chosen]}
    losses = membership_losses(model, splits, batch)

    def average(records: list[torch.Tensor]) -> float:
        return sum(float(r.mean()) for r in records) / len(records)

    mia = {"sites": [s.name for s in splits], "members": len(losses.members),
           "nonmembers": len(losses.heldout),
           "attacks": membership_attacks(losses, reference if reference is not None else losses),
           "member_loss": average(losses.members), "heldout_loss": average(losses.heldout)}
    return {"exposure": by_count, "mia": mia}, losses


def run_empirical_audit(job: JobConfig, model_dir: Path, sites: Sequence[AuditSite], out: Path,
                        repetitions: Sequence[int] = DEFAULT_REPETITIONS,
                        canary_site: str | None = None,
                        canaries_per_count: int = DEFAULT_CANARIES_PER_COUNT,
                        candidates: int = DEFAULT_CANDIDATES,
                        progress: Progress = print) -> dict[str, Any]:
    """Plant canaries, train the federation with and without DP, attack both, write the report.

    The canary site defaults to the one with the most held-out records (the membership attack
    needs non-members). Returns the report that is also written to ``out/report.json``.
    """
    started = time.monotonic()
    if not sites:
        raise ValueError("the audit needs at least one site")
    canaries = make_canaries(list(repetitions), canaries_per_count, job.seed)
    if canary_site is None:
        canary_site = site_with_most_heldout(job, sites)
    splits = prepare_sites(job, sites, canary_site, canaries)
    _, tokenizer = load_base_model(model_dir)
    longest = max(len(tokenizer.encode(c.text, add_special_tokens=False)) + 2 for c in canaries)
    if longest > job.model.max_length:
        raise ConfigError(f"model.max_length = {job.model.max_length} would cut the canary line "
                          f"({longest} tokens with bos/eos) and its secret; raise it to at least {longest}")
    encode_sites(splits, tokenizer, job.model.max_length)
    for split in splits:
        progress(f"{split.name}: {len(split.train_units)} training {job.privacy.unit}s"
                 + (f" ({len(split.train_units) - len(split.member_units)} canary copies)"
                    if split.name == canary_site else "")
                 + f", {len(split.heldout_units)} held out")
    candidate_secrets = sample_candidates(candidates, [c.secret for c in canaries], job.seed)
    with warnings.catch_warnings():  # PEFT asks transformers a deprecated question
        warnings.simplefilter("ignore", FutureWarning)
        template = initial_adapter(model_dir, job.lora, job.seed)

    runs: dict[str, dict[str, Any]] = {}
    run_started = time.monotonic()
    base, reference = evaluate_run(template, tokenizer, job, splits, canaries, candidate_secrets)
    runs["base"] = {"label": RUN_LABELS["base"], "epsilon": 0.0, "noise_multiplier": None, **base,
                    "wall_s": round(time.monotonic() - run_started, 1)}
    progress(f"[base] {_attack_summary(runs['base'])}, exposure by repetitions "
             + ", ".join(f"{k}: {v['mean']:.1f}" for k, v in runs["base"]["exposure"].items()))
    for key, private in (("dp", True), ("non_dp", False)):
        run_started = time.monotonic()
        outcome = train_federation(job, model_dir, sites, splits, private, out / key, progress, key)
        model = copy.deepcopy(template)
        load_lora_state(model, outcome.state)
        train_s = time.monotonic() - run_started
        evaluation, _ = evaluate_run(model, tokenizer, job, splits, canaries, candidate_secrets,
                                     reference)
        site = outcome.sites[canary_site]
        runs[key] = {"label": RUN_LABELS[key], "epsilon": site["epsilon"],
                     "delta": site.get("delta"), "accountant": site.get("accountant"),
                     "noise_multiplier": site["noise_multiplier"],
                     "max_grad_norm": job.training.max_grad_norm if private else NO_CLIPPING,
                     **evaluation, "sites": outcome.sites, "rounds": outcome.rounds,
                     "train_s": round(train_s, 1),
                     "wall_s": round(time.monotonic() - run_started, 1)}
        progress(f"[{key}] epsilon {epsilon_text(runs[key]['epsilon'])}, {_attack_summary(runs[key])}, "
                 "exposure by repetitions "
                 + ", ".join(f"{k}: {v['mean']:.1f}" for k, v in runs[key]["exposure"].items()))

    report = {
        "kind": "empirical-privacy-audit",
        "canary_site": canary_site,
        "sites": {s.name: {"train": len(s.train_units), "heldout": len(s.heldout_units)} for s in splits},
        "secret_format": {"template": CANARY_TEMPLATE, "secret": "7 digits + Luhn check digit",
                          "space_size": MRN_SPACE_SIZE, "max_exposure": math.log2(MRN_SPACE_SIZE)},
        "repetitions": sorted(set(repetitions)),
        "canaries_per_count": canaries_per_count,
        "candidates": len(candidate_secrets),
        "sampled_exposure_limit": math.log2(len(candidate_secrets) + 1),
        "canaries": [asdict(c) for c in canaries],
        "runs": runs,
        "config": to_dict(job),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    write_audit_report(report, out)
    return report


def _attack_summary(run: dict[str, Any]) -> str:
    return "MIA AUC " + ", ".join(f"{ATTACKS[k].label} {a['auc']:.3f}" for k, a in run["mia"]["attacks"].items())


def empirical_audit(config: Path, out: Path, overrides: Sequence[str] = (),
                    repetitions: Sequence[int] = DEFAULT_REPETITIONS, hospitals: int | None = None,
                    canaries_per_count: int = DEFAULT_CANARIES_PER_COUNT,
                    candidates: int = DEFAULT_CANDIDATES, progress: Progress = print) -> dict[str, Any]:
    """The audit on the simulated hospitals of a job config (the cached clinosim exports of
    ``privatune simulate``; ``hospitals`` takes the first N of the config's federation)."""
    from privatune.simulations.hospitals import default_hospitals, generate_federation
    from privatune.common.model_source import resolve_base_model

    job = load_job_config(config, overrides)
    count = job.data.hospitals if hospitals is None else hospitals
    if count < 1:
        raise ConfigError(f"--hospitals must be at least 1, got {count}")
    # The first N of the config's own federation, so `privatune simulate`'s cache is reused.
    specs = default_hospitals(max(count, job.data.hospitals) + 1, job.seed, job.data.patients)[:count]
    model_dir = resolve_base_model(job.model, job.seed, progress)
    exports = generate_federation(specs, Path(job.model.cache_dir) / "hospitals")
    sites = [AuditSite(spec.name, exports[spec.name], "fhir") for spec in specs]
    return run_empirical_audit(job, model_dir, sites, out, repetitions,
                               canaries_per_count=canaries_per_count, candidates=candidates,
                               progress=progress)
