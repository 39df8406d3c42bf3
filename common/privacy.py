"""Differential-privacy accounting for DP-SGD rounds (Opacus' RDP accountant).

The site keeps the full mechanism history (noise multiplier, sampling rate, steps) so that
any accountant can recompute its epsilon later; these helpers turn such a history into
epsilon and solve the noise multiplier for a budget.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from opacus.accountants import RDPAccountant

ACCOUNTANT_NAME = "opacus-rdp"
MAX_NOISE_MULTIPLIER = 1e4
BISECTION_STEPS = 60  # far more than the 1e-3 relative precision needs from [0, 1e4]


@dataclass(frozen=True)
class MechanismStep:
    """``steps`` Poisson-subsampled Gaussian steps at one noise multiplier and sampling rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def _accountant(history: Iterable[MechanismStep]) -> RDPAccountant:
    accountant = RDPAccountant()
    accountant.history = [(h.noise_multiplier, h.sample_rate, h.steps) for h in history]
    return accountant


def rdp_epsilon(history: Iterable[MechanismStep], delta: float) -> float:
    """Epsilon of the composed history at ``delta`` (0 for an empty history)."""
    accountant = _accountant(history)
    if not accountant.history:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha"
        return float(accountant.get_epsilon(delta=delta))


def poisson_sample_rate(num_units: int, expected_batch_size: int) -> float:
    """The sampling rate Opacus uses for a Poisson loader over ``num_units`` at this batch size."""
    return 1.0 / math.ceil(num_units / expected_batch_size)


def delta_problem(delta: float, num_units: int, unit: str = "record") -> str | None:
    """Why ``delta`` voids the guarantee for ``num_units`` privacy units, or None when it is fine.

    A mechanism may fail with probability delta: at delta >= 1/N it may as well reveal one of
    the N units outright, so delta must stay below 1/N.
    """
    if delta < 1.0 / num_units:
        return None
    return (f"delta = {delta:g} is not below 1/{num_units} (this site has {num_units} {unit}s); "
            f"choose delta < {1.0 / num_units:.3g}")


def run_noise_multiplier(epsilon_cap: float, run_budget: float, delta: float, sample_rate: float,
                         planned_steps: int, prior: Sequence[MechanismStep] = (),
                         min_noise_multiplier: float = 0.0) -> float:
    """The noise a site fixes for a run: the planned steps keep the lifetime spend (``prior``
    included) within ``epsilon_cap`` and the run's own spend within ``run_budget``, never
    below the site's minimum. The node, ``plan`` and the empirical audit all use this rule."""
    lifetime = calibrate_noise_multiplier(epsilon_cap, delta, sample_rate, planned_steps, prior)
    per_run = (lifetime if not prior and run_budget >= epsilon_cap else
               calibrate_noise_multiplier(run_budget, delta, sample_rate, planned_steps))
    return max(lifetime, per_run, min_noise_multiplier)


def calibrate_noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int,
                               prior: Sequence[MechanismStep] = ()) -> float:
    """Smallest noise multiplier keeping ``prior`` plus ``steps`` new steps within ``epsilon``.

    Bisection on the composed RDP epsilon, so a site that already released updates (earlier
    runs) calibrates the new run against what is left of its cumulative budget. Both searches
    are bounded: a target that cannot be reached is an error, never an endless loop.
    """
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}")
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if rdp_epsilon(prior, delta) >= epsilon:
        raise ValueError(f"the budget epsilon={epsilon:g} is already spent by earlier releases")

    def spent(sigma: float) -> float:
        return rdp_epsilon([*prior, MechanismStep(sigma, sample_rate, steps)], delta)

    low, high = 0.0, 1.0
    while not spent(high) <= epsilon:  # "not <=" so that a NaN epsilon keeps doubling, then stops
        low, high = high, high * 2
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} keeps epsilon "
                             f"within {epsilon:g} for {steps} steps at sampling rate {sample_rate:g}")
    for _ in range(BISECTION_STEPS):
        if high - low <= 1e-3 * high:
            break
        middle = (low + high) / 2
        low, high = (middle, high) if not spent(middle) <= epsilon else (low, middle)
    return high


def _dp_events(history: Iterable[MechanismStep]) -> list:
    import dp_accounting

    return [dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(h.sample_rate, dp_accounting.GaussianDpEvent(h.noise_multiplier)),
        h.steps) for h in history]


def independent_rdp_epsilon(history: Iterable[MechanismStep], delta: float) -> float:
    """The same RDP analysis by an independent implementation (Google's ``dp-accounting``).

    Uses Opacus' orders so that like is compared with like; used to audit recorded histories.
    """
    import logging

    from dp_accounting.rdp import RdpAccountant

    events = _dp_events(history)
    if not events:
        return 0.0
    accountant = RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orders whose series does not converge are skipped
    try:
        for event in events:
            accountant.compose(event)
        return float(accountant.get_epsilon(delta))
    finally:
        absl_logger.setLevel(level)


def pld_epsilon(history: Iterable[MechanismStep], delta: float) -> float:
    """A tighter bound for the same history (privacy loss distributions, ``dp-accounting``)."""
    from dp_accounting.pld import PLDAccountant

    events = _dp_events(history)
    if not events:
        return 0.0
    accountant = PLDAccountant(value_discretization_interval=1e-3)
    for event in events:
        accountant.compose(event)
    return float(accountant.get_epsilon(delta))
