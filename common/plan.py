"""``privatune plan``: forecast each site's epsilon before any data is touched.

Uses exactly the node's rules: sampling rate 1/ceil(N / batch), the noise multiplier
calibrated for rounds x local steps (never below the minimum), and the same accountant (PRV
by default, with the looser RDP bound beside it), so a plan approved by an ethics board is
what a run then spends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from privatune.common.plots import report_figure
from privatune.common.privacy import (PRV, MechanismStep, accountant_note, delta_problem,
                                      epsilon_of, pld_epsilon, poisson_sample_rate, rdp_epsilon,
                                      run_noise_multiplier)


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


def plan_site(site: str, records: int, batch_size: int, local_steps: int, rounds: int,
              delta: float, epsilon: float | None = None, noise_multiplier: float | None = None,
              min_noise_multiplier: float = 0.0, accountant: str = PRV) -> SitePlan:
    """Forecast one site; give ``noise_multiplier``, or ``epsilon`` to solve for it."""
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
    return SitePlan(site, records, sample_rate, noise_multiplier, delta, accountant, per_round,
                    rdp_epsilon([step] * rounds, delta), pld_epsilon([step] * rounds, delta),
                    warnings)


def render_table(plans: list[SitePlan]) -> str:
    rounds = len(plans[0].epsilon_per_round) if plans else 0
    header = "| site | records | sampling rate | noise | " + " | ".join(
        f"eps r{r}" for r in range(1, rounds + 1)) + " | RDP eps | PLD eps |"
    lines = [*{f"Epsilon per round: {accountant_note(p.accountant)}." for p in plans}, "",
             header, "|" + "---|" * (rounds + 6)]
    for p in plans:
        lines.append(f"| {p.site} | {p.records} | {p.sample_rate:.4f} | {p.noise_multiplier:.4f} | "
                     + " | ".join(f"{e:.3f}" for e in p.epsilon_per_round)
                     + f" | {p.rdp_epsilon_final:.3f} | {p.pld_epsilon_final:.3f} |")
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
