"""``privatune plan``: forecast each site's epsilon before any data is touched.

Uses exactly the node's rules: sampling rate 1/ceil(N / batch), the noise multiplier
calibrated for rounds x local steps (never below the minimum), and the same accountant (PRV
by default, with the looser RDP bound beside it), so a plan approved by an ethics board is
what a run then spends.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privatune.common.config import ConfigError, JobConfig, LoraConfig, ModelConfig
from privatune.common.distributed_noise import (DEFAULT_SENSITIVITY_INFLATION, padded_dimension,
                                                scaled_clip_for)
from privatune.common.plots import report_figure
from privatune.common.privacy import (PRV, MechanismStep, SecureStep, accountant_note,
                                      delta_problem, epsilon_of, pld_epsilon, poisson_sample_rate,
                                      rdp_epsilon, run_noise_multiplier)
from privatune.common.secure_protocol import secure_noise_multiplier


@dataclass(frozen=True)
class SitePlan:
    site: str
    records: int
    sample_rate: float
    noise_multiplier: float
    delta: float
    accountant: str
    epsilon_per_round: list[float]  # cumulative epsilon after each round, by ``accountant``
    rdp_epsilon_final: float  # the looser RDP bound of the whole plan, beside it
    pld_epsilon_final: float
    warnings: list[str]
    # the noise each step adds to the mean clipped gradient, as a multiple of the largest
    # signal that mean can have (sigma * sqrt(trained parameters) / batch); None: unknown shape
    noise_to_signal: float | None = None


# Llama-family projections: (input, output) widths from a Hugging Face config
def _projection_widths(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv = int(config.get("num_key_value_heads") or heads) * head_dim
    inner = int(config["intermediate_size"])
    return {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (heads * head_dim, hidden), "gate_proj": (hidden, inner),
            "up_proj": (hidden, inner), "down_proj": (inner, hidden)}


def trained_lora_parameters(model_config: Mapping[str, Any], lora: LoraConfig,
                            aggregation: str = "fedavg") -> int | None:
    """How many values a LoRA adapter trains on a Llama-family model (its Hugging Face config):
    r x (input + output) per targeted projection and layer, and once for ``lm_head`` (hidden
    to vocabulary); under ``ffa``, B alone: r x output. None for another architecture."""
    try:
        widths = _projection_widths(model_config)
        layers = int(model_config["num_hidden_layers"])
        if "lm_head" in lora.target_modules:
            widths["lm_head"] = (int(model_config["hidden_size"]),
                                 int(model_config["vocab_size"]))
    except (KeyError, TypeError, ValueError):
        return None
    if not set(lora.target_modules) <= set(widths):
        return None

    def values(name: str) -> int:
        inputs, outputs = widths[name]
        per_module = lora.r * outputs if aggregation == "ffa" else lora.r * (inputs + outputs)
        return per_module if name == "lm_head" else layers * per_module

    return sum(values(name) for name in lora.target_modules)


def noise_to_signal(noise_multiplier: float, trained_parameters: int, batch_size: float) -> float:
    """σ × √(trained values) ÷ expected batch: the norm of the noise a DP step adds to the mean
    clipped gradient, against the largest norm that mean can have (the project's rule for DP
    hyperparameters: above 1, DP-SGD mostly follows the noise)."""
    return noise_multiplier * math.sqrt(trained_parameters) / batch_size


def plan_site(site: str, records: int, batch_size: int, local_steps: int, rounds: int,
              delta: float, epsilon: float | None = None, noise_multiplier: float | None = None,
              min_noise_multiplier: float = 0.0, accountant: str = PRV,
              trained_parameters: int | None = None) -> SitePlan:
    """Forecast one site; give ``noise_multiplier``, or ``epsilon`` to solve for it.

    With ``trained_parameters``, also the noise a step adds to the mean clipped gradient
    against the largest signal it can carry: above 1, DP-SGD mostly follows the noise (at 1.75
    in the README's measurements the model learnt nothing to write; at 0.63 it kept 0.65 of
    the non-private ROUGE-L), so the plan warns."""
    if records < 1:
        raise ValueError(f"{site}: records must be at least 1")
    sample_rate = poisson_sample_rate(records, batch_size)
    if noise_multiplier is None:
        if epsilon is None:
            raise ValueError("give a noise multiplier or a target epsilon")
        noise_multiplier = run_noise_multiplier(epsilon, epsilon, delta, sample_rate,
                                                rounds * local_steps,
                                                min_noise_multiplier=min_noise_multiplier,
                                                accountant=accountant)
    noise_multiplier = max(noise_multiplier, min_noise_multiplier)
    step = MechanismStep(noise_multiplier, sample_rate, local_steps)
    per_round = [epsilon_of([step] * r, delta, accountant) for r in range(1, rounds + 1)]
    warnings = []
    if problem := delta_problem(delta, records):
        warnings.append(f"{site}: {problem}; the node will refuse this policy")
    if epsilon is not None and per_round[-1] > epsilon * (1 + 1e-9):
        warnings.append(f"{site}: forecast epsilon {per_round[-1]:.3f} exceeds the budget {epsilon:g}; "
                        "the node will decline the last rounds")
    ratio = None
    if trained_parameters:
        ratio = noise_to_signal(noise_multiplier, trained_parameters, batch_size)
        if ratio > 1:
            warnings.append(
                f"{site}: each step's noise on the mean gradient is {ratio:.2f} times "
                f"the largest clipped signal ({trained_parameters} trained values, expected "
                f"batch {batch_size}); DP-SGD will mostly follow the noise: raise "
                "training.batch_size (more records at the site allow it), or train fewer values "
                "(lora.r, lora.target_modules)")
    return SitePlan(site, records, sample_rate, noise_multiplier, delta, accountant, per_round,
                    rdp_epsilon([step] * rounds, delta), pld_epsilon([step] * rounds, delta),
                    warnings, ratio)


@dataclass(frozen=True)
class SecureSitePlan:
    """A site's forecast in a secure DP-SGD job: the run's aggregate noise and this site's
    share of it, and its cumulative epsilon after each round under both guarantees (by RDP):
    (a) from the aggregate noise of t shares, (b) from its own share alone."""

    site: str
    records: int
    sample_rate: float
    min_contributions: int
    noise_multiplier: float  # the aggregate sigma of t shares
    share_noise_multiplier: float  # this site's own share: sigma / sqrt(t)
    delta: float
    aggregate_epsilon_per_round: list[float]
    fallback_epsilon_per_round: list[float]
    warnings: list[str]
    # the noise of min_nodes shares on the mean union gradient against the largest signal
    # (share sigma * sqrt(min_nodes * trained parameters) / the union batch): plan_site's rule
    noise_to_signal: float


def plan_secure_site(site: str, records: int, job: JobConfig,
                     trained_parameters: int) -> SecureSitePlan:
    """Forecast one site of a secure job: the coordinator's noise (``secure_noise_multiplier``),
    the steps every site's ledger will record, both guarantees."""
    t = job.secure.threshold(job.federation.min_nodes)
    sigma = secure_noise_multiplier(job, trained_parameters)
    step = SecureStep(sigma, job.secure.sample_rate, job.training.local_steps,
                      scaled_clip_for(trained_parameters, DEFAULT_SENSITIVITY_INFLATION),
                      padded_dimension(trained_parameters), t)
    rounds = range(1, job.federation.rounds + 1)
    aggregate = [epsilon_of([step] * r, job.privacy.delta) for r in rounds]
    fallback = [epsilon_of([step.fallback()] * r, job.privacy.delta) for r in rounds]
    warnings = []
    if problem := delta_problem(job.privacy.delta, records):
        warnings.append(f"{site}: {problem}; the node will refuse this policy")
    if t < 3:
        warnings.append(f"{site}: t = {t} is below the default site policy's "
                        "secure_aggregation.min_contributions (3): such sites will decline")
    share = step.fallback().noise_multiplier
    sites = max(job.federation.min_nodes, t)
    # the noise of ``sites`` shares adds up to sigma = share * sqrt(sites) on the union's sum
    ratio = noise_to_signal(share * math.sqrt(sites), trained_parameters, job.training.batch_size)
    if ratio > 1:
        warnings.append(
            f"{site}: each union step's noise on the mean gradient ({sites} shares) is "
            f"{ratio:.2f} times the largest clipped signal ({trained_parameters} trained "
            f"values, expected union batch {job.training.batch_size}); DP-SGD will mostly follow "
            "the noise: raise secure.sample_rate with training.batch_size, or train fewer values "
            "(lora.r, lora.target_modules)")
    return SecureSitePlan(site, records, job.secure.sample_rate, t, sigma, share,
                          job.privacy.delta, aggregate, fallback, warnings, ratio)


def render_secure_table(plans: list[SecureSitePlan]) -> str:
    """The secure plan: each site's sigma and both guarantees after each round."""
    rounds = len(plans[0].aggregate_epsilon_per_round) if plans else 0
    header = ("| site | records | q | t | sigma (aggregate) | sigma (own share) | "
              + " | ".join(f"(a) eps r{r}" for r in range(1, rounds + 1)) + " | "
              + " | ".join(f"(b) eps r{r}" for r in range(1, rounds + 1)) + " | noise ÷ signal |")
    lines = ["Secure DP-SGD: (a) against the coordinator and the other sites, from the noise of "
             "at least t sites' shares (holds while secure aggregation does); (b) from the "
             "site's own noise share alone (holds whatever happens; a site's cap is enforced on "
             "it unless its policy sets secure_aggregation.trust). Both by RDP. noise ÷ signal: "
             "the noise of the job's min_nodes shares on a union step's mean clipped gradient, "
             "against the largest signal that mean can carry (above 1, DP-SGD mostly follows the "
             "noise).", "",
             header, "|" + "---|" * (7 + 2 * rounds)]
    for p in plans:
        lines.append(f"| {p.site} | {p.records} | {p.sample_rate:.4f} | {p.min_contributions} | "
                     f"{p.noise_multiplier:.4f} | {p.share_noise_multiplier:.4f} | "
                     + " | ".join(f"{e:.3f}" for e in p.aggregate_epsilon_per_round) + " | "
                     + " | ".join(f"{e:.3f}" for e in p.fallback_epsilon_per_round)
                     + f" | {p.noise_to_signal:.2f} |")
    for p in plans:
        lines += [f"warning: {w}" for w in p.warnings]
    return "\n".join(lines)


def model_shape(model: ModelConfig) -> dict[str, Any] | None:
    """The Hugging Face config of the job's base model, without loading it: the builtin
    model's from its recipe, a local directory's from its config.json, a GGUF model's from its
    dequantised copy in the cache; None where unknown (a GGUF file not yet dequantised)."""
    from privatune.common.model_source import cached_gguf_dir, is_gguf_source

    if model.base == "builtin":
        from privatune.common.base_model import BaseModelSpec

        spec = BaseModelSpec()
        # the build's tokenizer is trained to vocab_size pieces (a LoRA on lm_head counts them)
        return {**spec.shape, "vocab_size": spec.vocab_size}
    try:
        directory = cached_gguf_dir(model) if is_gguf_source(model.base) else Path(model.base)
    except (ConfigError, OSError):  # a packaged model that is not installed, a missing file
        return None
    config = directory / "config.json"
    try:
        return dict(json.loads(config.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def render_table(plans: list[SitePlan]) -> str:
    rounds = len(plans[0].epsilon_per_round) if plans else 0
    header = "| site | records | sampling rate | noise | " + " | ".join(
        f"eps r{r}" for r in range(1, rounds + 1)) + " | RDP eps | PLD eps | noise ÷ signal |"
    lines = [*{f"Epsilon per round: {accountant_note(p.accountant)}." for p in plans},
             "noise ÷ signal: the noise a step adds to the mean clipped gradient, against the "
             "largest signal that mean can carry (above 1, DP-SGD mostly follows the noise).", "",
             header, "|" + "---|" * (rounds + 7)]
    for p in plans:
        ratio = "n/a" if p.noise_to_signal is None else f"{p.noise_to_signal:.2f}"
        lines.append(f"| {p.site} | {p.records} | {p.sample_rate:.4f} | {p.noise_multiplier:.4f} | "
                     + " | ".join(f"{e:.3f}" for e in p.epsilon_per_round)
                     + f" | {p.rdp_epsilon_final:.3f} | {p.pld_epsilon_final:.3f} | {ratio} |")
    for p in plans:
        lines += [f"warning: {w}" for w in p.warnings]
    return "\n".join(lines)


def plot_plans(plans: list[SitePlan], path: Path, budget: float | None = None) -> None:
    """Planned cumulative epsilon per site against the round."""
    with report_figure(path) as (axis,):
        for p in plans:
            xs = list(range(1, len(p.epsilon_per_round) + 1))
            axis.plot(xs, p.epsilon_per_round, "-o",
                      label=f"{p.site} (noise {p.noise_multiplier:.2f})")
        if budget is not None:
            axis.axhline(budget, color="red", linestyle="--", label=f"budget {budget:g}")
        axis.set(xlabel="round", ylabel="cumulative epsilon", title="planned epsilon per site")
