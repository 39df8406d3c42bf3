"""Differential-privacy accounting for DP-SGD rounds (Opacus' PRV and RDP accountants).

The site keeps the full mechanism history (noise multiplier, sampling rate, steps) so that
any accountant can recompute its epsilon later; these helpers turn such a history into
epsilon and solve the noise multiplier for a budget. Every accountant here is a sound upper
bound for the same history; PRV (privacy random variables, Gopi et al. 2021) is the tightest
and the default, RDP is looser (about 10% at typical settings) and shown beside it.

A history may also hold secure DP-SGD steps (``SecureStep``: Skellam shares summed under
secure aggregation, issue 27). PRV has no Skellam mechanism, so such a history is composed by
RDP throughout, on the integer orders of ``distributed_noise_accounting`` (Opacus' RDP for the
Gaussian steps, the subsampled rounded-Skellam bound for the secure ones); a history of
Gaussian steps alone never takes that path, so its figures are what they always were.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp

from privatune.common.distributed_noise_accounting import (ORDERS, SUBSAMPLING_BOUNDS,
                                                           SUBSAMPLING_MIRRORED,
                                                           epsilon_from_rdp, skellam_step_rdp)
from privatune.common.opacus_internals import remember_rdp_of_one_step

RDP = "opacus-rdp"
PRV = "opacus-prv"
ACCOUNTANTS = (PRV, RDP)
# PRV's numerical error: its epsilon is an upper bound within PRV_EPS_ERROR of the estimate,
# at delta + delta / PRV_DELTA_ERROR_SHARE (Opacus' defaults)
PRV_EPS_ERROR = 0.01
PRV_DELTA_ERROR_SHARE = 1000
# the coarser grid calibration first looks for the PRV root on (``_prv_root_estimate``)
PRV_ESTIMATE_EPS_ERROR = 0.1
MAX_NOISE_MULTIPLIER = 1e4
BISECTION_STEPS = 60  # far more than the 1e-3 relative precision needs from [0, 1e4]
BRACKET_STEPS = 20  # points tried below the search's first guess before bracketing from 0
SEARCH_TOLERANCE = 1e-3  # calibration's answer is within this share above the exact root


# one step's RDP is most of accounting's time; cached for the whole process
remember_rdp_of_one_step()


@dataclass(frozen=True)
class MechanismStep:
    """``steps`` Poisson-subsampled Gaussian steps at one noise multiplier and sampling rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass(frozen=True)
class SecureStep:
    """``steps`` secure DP-SGD steps: each site's Skellam share summed under secure aggregation
    over the union's Poisson sample at ``sample_rate``.

    ``noise_multiplier`` is the aggregate sigma (in units of the clip) of at least ``shares``
    contributions; ``scaled_clip`` is the clip in the encoder's integer units
    (``DistributedNoiseParams.scaled_clip``) and ``dimension`` the padded dimension, both of
    which the rounding's share of the sensitivity depends on. ``subsampling`` names the bound
    on the Poisson sampling (``distributed_noise_accounting.SUBSAMPLING_BOUNDS``): ledgers keep
    the one each release was accounted with.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    scaled_clip: float
    dimension: int
    shares: int
    subsampling: str = SUBSAMPLING_MIRRORED

    def __post_init__(self) -> None:
        for name in ("steps", "dimension", "shares"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"SecureStep.{name} must be a positive integer, got {value!r}")
        for name in ("noise_multiplier", "scaled_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"SecureStep.{name} must be a positive finite number, "
                                 f"got {value!r}")
        if not (math.isfinite(self.sample_rate) and 0 < self.sample_rate <= 1):
            raise ValueError(f"SecureStep.sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if self.subsampling not in SUBSAMPLING_BOUNDS:
            raise ValueError(f"SecureStep.subsampling must be one of "
                             f"{', '.join(SUBSAMPLING_BOUNDS)}, got {self.subsampling!r}")

    def fallback(self) -> SecureStep:
        """What this site's own share alone guarantees, should secure aggregation break: the
        noise of one share, ``sigma / sqrt(shares)`` (written as ``site_guarantees`` writes it,
        so that both give the same figure to the bit)."""
        return dataclasses.replace(
            self, noise_multiplier=share_noise_multiplier(self.noise_multiplier, self.shares),
            shares=1)


def share_noise_multiplier(noise_multiplier: float, shares: int) -> float:
    """The noise multiplier of one site's share when ``shares`` shares make up
    ``noise_multiplier``: what the fallback guarantee rests on."""
    return noise_multiplier * math.sqrt(1 / shares)


Step = MechanismStep | SecureStep
StepT = TypeVar("StepT", MechanismStep, SecureStep, Step)


def _accountant(history: Iterable[MechanismStep]) -> RDPAccountant:
    """Opacus' RDP accountant over the merged history: one (noise, rate, steps) triple per
    distinct mechanism, so its work does not grow with the ledger's length."""
    accountant = RDPAccountant()
    accountant.history = [(h.noise_multiplier, h.sample_rate, h.steps)
                          for h in merged(_gaussian_only(history))]
    return accountant


def rdp_epsilon(history: Iterable[MechanismStep], delta: float) -> float:
    """Epsilon of the composed history at ``delta`` (0 for an empty history)."""
    accountant = _accountant(history)
    if not accountant.history:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha"
        return float(accountant.get_epsilon(delta=delta))


def merged(history: Iterable[StepT]) -> list[StepT]:
    """The same history with the steps of each distinct mechanism added up (a Gaussian step's
    is its (noise, sampling rate) pair; a secure step's every field but its steps).

    Composition does not depend on order, so this is the same mechanism; it keeps the
    accountants' work proportional to the distinct mechanisms, not to the ledger's length
    (each composes a triple's steps in one go: RDP multiplies, PRV self-composes by FFT).
    """
    totals: dict[tuple, tuple[StepT, int]] = {}
    for step in history:
        key = (type(step), *(getattr(step, f.name) for f in dataclasses.fields(step)
                             if f.name != "steps"))
        first, steps = totals.get(key, (step, 0))
        totals[key] = (first, steps + step.steps)
    return [dataclasses.replace(first, steps=steps) for first, steps in totals.values()]


def is_secure(history: Iterable[Step]) -> bool:
    """Whether a history holds a secure step (so that only RDP can compose it)."""
    return any(isinstance(step, SecureStep) for step in history)


def _gaussian_only(history: Iterable[MechanismStep]) -> list[MechanismStep]:
    """The history, refused if it holds a secure step: the Gaussian accountants would read its
    noise as a Gaussian's and under-count the rounding and the discreteness."""
    steps = list(history)
    if is_secure(steps):
        raise ValueError("this accountant composes Gaussian steps only; a history with a "
                         "SecureStep is composed by epsilon_of (RDP)")
    return steps


@functools.lru_cache(maxsize=1024)
def _secure_step_rdp(noise_multiplier: float, sample_rate: float, scaled_clip: float,
                     dimension: int, subsampling: str) -> np.ndarray:
    """One secure step's RDP curve on ``ORDERS``; cached, as a ledger repeats its mechanism."""
    curve = skellam_step_rdp(noise_multiplier, scaled_clip, dimension, sample_rate, ORDERS,
                             subsampling)
    curve.flags.writeable = False
    return curve


def _step_rdp(step: Step) -> np.ndarray:
    """RDP of ``step.steps`` steps on ``ORDERS``: Opacus' subsampled Gaussian RDP for a Gaussian
    step, the subsampled rounded-Skellam bound for a secure one."""
    if isinstance(step, SecureStep):
        return step.steps * _secure_step_rdp(step.noise_multiplier, step.sample_rate,
                                             step.scaled_clip, step.dimension, step.subsampling)
    return np.asarray(compute_rdp(q=step.sample_rate, noise_multiplier=step.noise_multiplier,
                                  steps=step.steps, orders=list(ORDERS)), dtype=np.float64)


def secure_rdp_epsilon(history: Iterable[Step], delta: float) -> float:
    """Epsilon at ``delta`` of a history that may hold secure steps, by RDP on the integer
    ``ORDERS`` and the conversion ``site_guarantees`` uses (0 for an empty history)."""
    steps = merged(history)
    if not steps:
        return 0.0
    rdp = np.zeros(len(ORDERS))
    for step in steps:
        rdp = rdp + _step_rdp(step)
    return epsilon_from_rdp(ORDERS, rdp, delta)[0]


def prv_epsilon(history: Iterable[MechanismStep], delta: float,
                eps_error: float = PRV_EPS_ERROR) -> float:
    """Opacus' PRV upper bound on epsilon of the composed history (0 for an empty history),
    within ``eps_error`` of its estimate."""
    steps = merged(_gaussian_only(history))
    return _prv_epsilon(tuple(steps), delta, eps_error) if steps else 0.0


@functools.lru_cache(maxsize=256)
def _prv_epsilon(steps: tuple[MechanismStep, ...], delta: float,
                 eps_error: float = PRV_EPS_ERROR) -> float:
    """PRV of a merged history; cached, as a node asks for the same history several times."""
    accountant = PRVAccountant()
    accountant.history = [(h.noise_multiplier, h.sample_rate, h.steps) for h in steps]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta, eps_error=eps_error,
                                            delta_error=delta / PRV_DELTA_ERROR_SHARE))


def epsilon_of(history: Iterable[Step], delta: float, accountant: str = PRV) -> float:
    """Epsilon of the history by the named accountant (``opacus-prv`` or ``opacus-rdp``); a
    history with a secure step is composed by ``secure_rdp_epsilon`` whichever is named, since
    PRV cannot compose the Skellam mechanism (the name must still be a known one)."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r} (known: {', '.join(ACCOUNTANTS)})")
    history = list(history)
    if is_secure(history):
        return secure_rdp_epsilon(history, delta)
    if accountant == PRV:
        return prv_epsilon(history, delta)
    return rdp_epsilon(history, delta)


def accountant_note(accountant: str) -> str:
    """What a reader needs to know of an accountant's figure (its method and error bound)."""
    if accountant == PRV:
        return (f"Opacus PRV accountant: an upper bound on epsilon within {PRV_EPS_ERROR} of the "
                f"exact value, at delta plus delta/{PRV_DELTA_ERROR_SHARE}")
    return "Opacus RDP accountant: an analytic upper bound (looser than PRV)"


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


def _interpolated_root(low: float, high: float, spent_low: float, spent_high: float,
                       epsilon: float) -> float | None:
    """Where the line through the bracket's ends in (log sigma, log epsilon) meets the target.

    Epsilon falls smoothly, close to a power of sigma, so this lands near the answer; None when
    the ends cannot be interpolated (sigma 0, an infinite epsilon).
    """
    if not (low > 0 and math.isfinite(spent_low) and spent_low > 0 and spent_high > 0):
        return None
    above, below = math.log(spent_low / epsilon), math.log(spent_high / epsilon)
    if not above > 0 >= below:
        return None
    x_low, x_high = math.log(low), math.log(high)
    return math.exp(x_low + (x_high - x_low) * above / (above - below))


Spending = Callable[[float], float]


def _spending(prior: Sequence[Step], sample_rate: float, steps: int,
              epsilon: Callable[[list[Step]], float]) -> Spending:
    """Epsilon of ``prior`` plus ``steps`` new steps, as a function of their noise multiplier."""
    def spent(sigma: float) -> float:
        value = epsilon([*prior, MechanismStep(sigma, sample_rate, steps)])
        return math.inf if math.isnan(value) else value  # NaN counts as over the budget

    return spent


def _bracket(spent: Spending, epsilon: float, guess: float, tolerance: float, steps: int,
             sample_rate: float) -> tuple[float, float, float, float]:
    """``low, high, spent(low), spent(high)`` with ``spent(high) <= epsilon < spent(low)``
    (``low`` 0 with an infinite spend when no point below ``high`` was found over the budget),
    searched outwards from ``guess``.

    Below the guess the first point is where epsilon, falling about as one over sigma, would
    meet the target, but at least ``tolerance / 2`` below the guess (and each later point half
    the one before), so a guess just above the root closes the search at the next point; above
    it the noise doubles. A guess near the root means every point has an epsilon near the target,
    never the huge epsilon of a noise far too low, whose PRV grid is as wide as that epsilon
    (hundreds of GiB for 3 million steps at sigma 1).
    """
    high, spent_high = guess, spent(guess)
    if spent_high <= epsilon:
        shrink = min(max(spent_high / epsilon, 0.5), 1 - tolerance / 2)
        for _ in range(BRACKET_STEPS):
            point = high * shrink
            value = spent(point)
            if not value <= epsilon:
                return point, high, value, spent_high
            high, spent_high, shrink = point, value, 0.5
        return 0.0, high, math.inf, spent_high
    low, spent_low = high, spent_high
    while True:
        high = low * 2
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} keeps "
                             f"epsilon within {epsilon:g} for {steps} steps at sampling "
                             f"rate {sample_rate:g}")
        spent_high = spent(high)
        if spent_high <= epsilon:
            return low, high, spent_low, spent_high
        low, spent_low = high, spent_high


def _search(spent: Spending, epsilon: float, guess: float, tolerance: float, steps: int,
            sample_rate: float) -> float:
    """The smallest noise found within ``epsilon``, less than ``tolerance`` (a share) above one
    found over it, by a bracket search from ``guess``.

    Each step evaluates the interpolated root (nudged so that a close estimate also closes
    the bracket): a few evaluations instead of bisection's dozen; a bracket that
    interpolation does not halve within four steps is bisected. Both searches are bounded: a
    target that cannot be reached is an error, never an endless loop.
    """
    low, high, spent_low, spent_high = _bracket(spent, epsilon, guess, tolerance, steps,
                                                sample_rate)
    anchor, since_anchor = high - low, 0
    high_moved: list[bool] = []  # per step, whether it lowered ``high`` (else raised ``low``)
    for _ in range(BISECTION_STEPS):
        width = high - low
        if width <= tolerance * high:
            break
        root = _interpolated_root(low, high, spent_low, spent_high, epsilon)
        if root is None or not low < root < high or since_anchor >= 4:
            point = (low + high) / 2
        else:
            # kept a little inside the bracket, and past the root when the same end moved
            # twice (the line keeps falling short on one side), so that an estimate close to
            # the root also closes the bracket
            margin = tolerance * high / 3
            past = 0.0
            if high_moved[-2:] == [True, True]:
                past = -margin
            elif high_moved[-2:] == [False, False]:
                past = margin
            point = min(max(root + past, low + margin), high - margin)
        value = spent(point)
        if value <= epsilon:
            high, spent_high = point, value
        else:
            low, spent_low = point, value
        high_moved.append(value <= epsilon)
        since_anchor += 1
        if high - low <= anchor / 2:  # else a bisection after four steps at most
            anchor, since_anchor = high - low, 0
    return high


def _prv_root_estimate(epsilon: float, delta: float, sample_rate: float, steps: int,
                       prior: Sequence[MechanismStep]) -> float:
    """Where Opacus' PRV bound of ``prior`` plus the new steps meets ``epsilon``, estimated
    without its fine grid: the RDP root (a looser bound, so a little above; its cost does not
    depend on the steps), refined on a PRV grid ``PRV_ESTIMATE_EPS_ERROR`` coarse.

    The coarse bound less its own error allowance plus the fine one is the same estimate of
    epsilon on a coarser grid; measured, it tracks the fine bound to about 1e-4 of epsilon
    with a grid ten times smaller. A step that finds no root keeps the guess it had.
    """
    rdp = _spending(prior, sample_rate, steps, lambda h: rdp_epsilon(h, delta))
    coarse = _spending(prior, sample_rate, steps, lambda h: prv_epsilon(
        h, delta, PRV_ESTIMATE_EPS_ERROR) - PRV_ESTIMATE_EPS_ERROR + PRV_EPS_ERROR)
    guess = 1.0
    for spent in (rdp, coarse):
        try:
            guess = _search(spent, epsilon, guess, SEARCH_TOLERANCE / 10, steps, sample_rate)
        except ValueError:
            pass
    return guess


def calibrate_noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int,
                               prior: Sequence[Step] = (), accountant: str = RDP) -> float:
    """Smallest noise multiplier keeping ``prior`` plus ``steps`` new steps within ``epsilon``.

    A bracket search on the composed epsilon by ``accountant`` (``_search``), so a site that
    already released updates (earlier runs) calibrates the new run against what is left of
    its cumulative budget. The answer is always a noise multiplier whose epsilon was computed
    and found within the budget, less than 0.1% above one found over it.

    Its cost does not grow with the length of a uniform history: the history is merged, so N
    identical rounds are one triple of N times the steps, which RDP composes by one product
    and PRV by one FFT self-composition. PRV's grid still grows with the steps composed (its
    mesh is finer the more there are), so the PRV search starts just above a cheap estimate of
    its root (``_prv_root_estimate``) and usually ends after two evaluations on the fine grid,
    both near the target: about a second for 10,000 rounds of 3 steps, where a search from
    sigma 1 took minutes and gigabytes. A prior holding secure steps is composed by RDP
    whatever ``accountant`` says (``epsilon_of``), and searched from sigma 1.
    """
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}")
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    prior = merged(prior)
    if epsilon_of(prior, delta, accountant) >= epsilon:
        raise ValueError(f"the budget epsilon={epsilon:g} is already spent by earlier releases")
    guess = 1.0
    if accountant == PRV and not is_secure(prior):  # a secure prior is composed by RDP
        guess = (_prv_root_estimate(epsilon, delta, sample_rate, steps, prior)
                 * (1 + SEARCH_TOLERANCE / 4))
    spent = _spending(prior, sample_rate, steps, lambda h: epsilon_of(h, delta, accountant))
    return _search(spent, epsilon, guess, SEARCH_TOLERANCE, steps, sample_rate)


def run_noise_multiplier(epsilon_cap: float, run_budget: float, delta: float, sample_rate: float,
                         planned_steps: int, prior: Sequence[Step] = (),
                         min_noise_multiplier: float = 0.0, accountant: str = RDP) -> float:
    """The noise a site fixes for a run: the planned steps keep the lifetime spend (``prior``
    included) within ``epsilon_cap`` and the run's own spend within ``run_budget``, never
    below the site's minimum. The node, ``plan`` and the empirical audit all use this rule."""
    lifetime = calibrate_noise_multiplier(epsilon_cap, delta, sample_rate, planned_steps, prior,
                                          accountant)
    per_run = (lifetime if not prior and run_budget >= epsilon_cap else
               calibrate_noise_multiplier(run_budget, delta, sample_rate, planned_steps,
                                          accountant=accountant))
    return max(lifetime, per_run, min_noise_multiplier)


def _dp_events(history: Iterable[MechanismStep]) -> list:
    import dp_accounting

    return [dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(h.sample_rate, dp_accounting.GaussianDpEvent(h.noise_multiplier)),
        h.steps) for h in _gaussian_only(history)]


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
    """A tighter bound for the same history (privacy loss distributions, ``dp-accounting``).

    The history is merged first (see ``merged``): one composition per distinct mechanism,
    however long the ledger.
    """
    from dp_accounting.pld import PLDAccountant

    events = _dp_events(merged(history))
    if not events:
        return 0.0
    accountant = PLDAccountant(value_discretization_interval=1e-3)
    for event in events:
        accountant.compose(event)
    return float(accountant.get_epsilon(delta))
