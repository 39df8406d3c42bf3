"""The audit's own Rényi-DP bound of one secure DP-SGD step (Poisson-subsampled, rounded Skellam).

``privatune audit`` recomputes every secure ledger entry. Had it used the node's accounting
(``distributed_noise_accounting.skellam_step_rdp``), a mistake there would be repeated, not
caught; so this module is a second implementation, written from the mathematics alone (the
paper's bound, Hoeffding's tail, joint convexity, the binomial expansion) without the node's
code. What it shares with the node is only the meaning of a ledger entry: the noise multiplier,
the scaled clip, the padded dimension, the sampling rate and the name of the subsampling bound.

Per step, in the encoder's integer units (``S`` the scaled clip, ``D`` the padded dimension,
``V = (sigma S)^2`` the Skellam variance per coordinate):

* Skellam RDP of an integer shift with norms ``l2``, ``l1`` (Agarwal, Kairouz and Liu, NeurIPS
  2021): ``a l2^2/(2V) + min(((2a-1) l2^2 + 6 l1)/(4V^2), 3 l1/(2V))``;
* stochastic rounding: ``l2 <= S + sqrt(D)`` always and, except with probability ``b``,
  ``l2 <= sqrt(S^2 + D/4 + sqrt(2 ln(1/b)) (S + sqrt(D)/2))``; an integer vector has
  ``l1 <= min(l2^2, sqrt(D) l2)``. The two cases are joined by the joint convexity of
  ``exp((a-1) D_a)``, for any ``b``: the audit minimises over ``b`` continuously (the node
  takes a grid), so its figure may sit a little below the node's, never above;
* Poisson subsampling at rate ``q``: the binomial expansion at integer orders, each term of
  order ``l >= 2`` weighted 1 ("binomial-mirrored") or, for Zhu and Wang's general bound
  ("zhu-wang-2019", ICML 2019, Theorem 6), 3 from order 3 on.

Everything that can overflow is in log space (``logaddexp``, ``logsumexp``, ``gammaln``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import gammaln, logsumexp

from privatune.common.distributed_noise_accounting import (SUBSAMPLING_GENERAL,
                                                           SUBSAMPLING_MIRRORED)

# The rounding's failure probability b is searched as ln(ln(1/b)), from b = 1 - 1e-8 (the
# bound is then the worst case's) to where the high-probability norm reaches the worst case
# (beyond it, b only adds weight to the worst case). A coarse grid over that range brackets the
# minimum, a bounded Brent search refines it; the grid's best is kept if Brent does worse.
_MIN_LOG_INV_FAILURE = 1e-8
_COARSE_POINTS = 129

Real = float | np.ndarray


def skellam_shift_rdp(order: Real, l2: Real, l1: Real, variance: float) -> Real:
    """RDP at ``order`` of a Skellam of per-coordinate ``variance`` against its shift by an
    integer vector of L2 norm ``l2`` and L1 norm ``l1`` (Agarwal, Kairouz, Liu 2021); arrays
    broadcast."""
    discrete = np.minimum(((2 * order - 1) * l2 * l2 + 6 * l1) / (4 * variance * variance),
                          3 * l1 / (2 * variance))
    return order * l2 * l2 / (2 * variance) + discrete


def integer_l1(l2: Real, dimension: int) -> Real:
    """The largest L1 norm of an integer vector of L2 norm ``l2`` in ``dimension`` coordinates:
    every nonzero coordinate is at least 1 in size (``l1 <= l2^2``), and Cauchy-Schwarz."""
    return np.minimum(l2 * l2, math.sqrt(dimension) * l2)


def worst_l2(scaled_clip: float, dimension: int) -> float:
    """The rounded shift's L2 norm in every case: each coordinate moves by less than 1."""
    return scaled_clip + math.sqrt(dimension)


def likely_l2(scaled_clip: float, dimension: int, log_inv_failure: float) -> float:
    """The rounded shift's L2 norm except with probability ``b = exp(-log_inv_failure)``
    (Hoeffding on the rounding's independent errors), never above the worst case."""
    root = math.sqrt(dimension)
    squared = (scaled_clip * scaled_clip + dimension / 4
               + math.sqrt(2 * log_inv_failure) * (scaled_clip + root / 2))
    return min(math.sqrt(squared), scaled_clip + root)


def _logaddexp(x: float, y: float) -> float:
    """``log(exp(x) + exp(y))`` without overflow, on floats (called thousands of times)."""
    high, low = max(x, y), min(x, y)
    return high + math.log1p(math.exp(low - high))


def _log_inv_failure_cap(scaled_clip: float, dimension: int) -> float:
    """``ln(1/b)`` at which ``likely_l2`` reaches ``worst_l2``: a smaller ``b`` gains nothing."""
    root = math.sqrt(dimension)
    excess = (2 * scaled_clip * root + 3 * dimension / 4) / (scaled_clip + root / 2)
    return excess * excess / 2


def mixture_rdp(order: int, log_inv_failure: float, variance: float, scaled_clip: float,
                 dimension: int, worst: float) -> float:
    """RDP at ``order`` from joint convexity: with probability ``1 - b`` the likely shift's
    RDP, with ``b`` the worst case's ``worst``, averaged in ``exp((order - 1) D)``."""
    l2 = likely_l2(scaled_clip, dimension, log_inv_failure)
    likely = float(skellam_shift_rdp(order, l2, integer_l1(l2, dimension), variance))
    log_kept = math.log(-math.expm1(-log_inv_failure))  # log(1 - b), exact for b near 1
    return _logaddexp(log_kept + (order - 1) * likely,
                      -log_inv_failure + (order - 1) * worst) / (order - 1)


def rounded_skellam_curve(max_order: int, variance: float, scaled_clip: float,
                          dimension: int) -> np.ndarray:
    """The base mechanism's RDP at every order 2..``max_order``: the rounded shift's, with the
    failure probability ``b`` chosen per order (any ``b`` is a valid bound, so their minimum
    is). The coarse grid is one array over (order, b); each order's best point is refined."""
    orders = np.arange(2, max_order + 1, dtype=np.float64)
    worst_norm = worst_l2(scaled_clip, dimension)
    worst = skellam_shift_rdp(orders, worst_norm, integer_l1(worst_norm, dimension), variance)
    cap = _log_inv_failure_cap(scaled_clip, dimension)
    if cap <= _MIN_LOG_INV_FAILURE:
        return worst
    grid = np.linspace(math.log(_MIN_LOG_INV_FAILURE), math.log(cap), _COARSE_POINTS)
    log_inv = np.exp(grid)
    l2 = np.array([likely_l2(scaled_clip, dimension, t) for t in log_inv])
    a = orders[:, None]
    likely = skellam_shift_rdp(a, l2, integer_l1(l2, dimension), variance)
    coarse = np.logaddexp(np.log(-np.expm1(-log_inv)) + (a - 1) * likely,
                          -log_inv + (a - 1) * worst[:, None]) / (a - 1)
    curve = np.minimum(worst, coarse.min(axis=1))
    for index, best in enumerate(np.argmin(coarse, axis=1)):
        order, worst_rdp = int(orders[index]), float(worst[index])

        def objective(log_log_inv_failure: float) -> float:
            return mixture_rdp(order, math.exp(log_log_inv_failure), variance, scaled_clip,
                                dimension, worst_rdp)

        lower, upper = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
        refined = minimize_scalar(objective, bounds=(lower, upper), method="bounded",
                                  options={"xatol": 1e-9 * max(1.0, abs(grid[best]))})
        if refined.success and math.isfinite(refined.fun):
            curve[index] = min(curve[index], float(refined.fun))
    return curve


def _term_weights(subsampling: str, max_order: int) -> np.ndarray:
    """The weight of each order l = 2..max_order's term in the subsampling bound."""
    if subsampling == SUBSAMPLING_MIRRORED:
        return np.ones(max_order - 1)
    if subsampling == SUBSAMPLING_GENERAL:
        return np.array([1.0] + [3.0] * (max_order - 2))
    raise ValueError(f"unknown subsampling bound {subsampling!r}; expected "
                     f"{SUBSAMPLING_MIRRORED!r} or {SUBSAMPLING_GENERAL!r}")


def subsampled_rdp(order: int, sample_rate: float, base: np.ndarray, subsampling: str) -> float:
    """RDP at ``order`` of the base mechanism over Poisson sampling at ``sample_rate``, from
    its RDP ``base[l - 2]`` at every order l = 2..order, by the binomial expansion of the
    mixture's moment (weights per ``subsampling``), never above the base's own."""
    if sample_rate == 1.0:
        return float(base[order - 2])
    levels = np.arange(2, order + 1)
    log_q, log_keep = math.log(sample_rate), math.log1p(-sample_rate)
    log_binomial = gammaln(order + 1) - gammaln(levels + 1) - gammaln(order - levels + 1)
    terms = (np.log(_term_weights(subsampling, order)) + log_binomial + levels * log_q
             + (order - levels) * log_keep + (levels - 1) * base[:order - 1])
    low = (order - 1) * log_keep + math.log1p((order - 1) * sample_rate)  # orders 0 and 1
    bound = float(logsumexp(np.append(terms, low))) / (order - 1)
    return min(bound, float(base[order - 2]))


def secure_step_rdp(noise_multiplier: float, scaled_clip: float, dimension: int,
                    sample_rate: float, orders: Sequence[int], subsampling: str) -> np.ndarray:
    """One secure DP-SGD step's RDP at each of ``orders`` (integers >= 2): the audit's own
    recomputation of what ``distributed_noise_accounting.skellam_step_rdp`` bounds."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be positive and finite, got {noise_multiplier!r}")
    if not (math.isfinite(scaled_clip) and scaled_clip > 0):
        raise ValueError(f"scaled_clip must be positive and finite, got {scaled_clip!r}")
    if int(dimension) != dimension or dimension < 1 or int(dimension) & (int(dimension) - 1):
        raise ValueError(f"dimension must be a power of two, got {dimension!r}")
    if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if any(int(a) != a or a < 2 for a in orders):
        raise ValueError("orders must be integers >= 2")
    _term_weights(subsampling, 2)  # refuses an unknown bound before any work
    dimension = int(dimension)
    variance = (noise_multiplier * scaled_clip) ** 2
    max_order = int(max(orders))
    base = rounded_skellam_curve(max_order, variance, scaled_clip, dimension)
    return np.array([subsampled_rdp(int(a), sample_rate, base, subsampling) for a in orders])
