"""Rényi-DP accounting of Poisson-subsampled DP-SGD with distributed Skellam noise.

Secure DP-SGD (issue 27) releases, per step, the modular sum of the sites' integer encodings
(``common/distributed_noise.py``): the rotated, scaled, stochastically rounded sum of the union's
clipped per-record gradients, plus Skellam noise whose variance is the sum of the sites' shares.
This module bounds what one record loses by that release, with no Flower and no encoding in it:

* the Skellam mechanism's RDP for an integer shift with L1 norm ``l1`` and L2 norm ``l2``
  (Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated
  Learning", NeurIPS 2021, arXiv:2110.04995, Section 3: the bound on the Rényi divergence of
  shifted Skellams and its multi-dimensional corollary), written for a per-coordinate
  variance ``V`` (Poisson(V/2) - Poisson(V/2)):
  ``eps(a) <= a l2^2 / (2V) + min(((2a - 1) l2^2 + 6 l1) / (4V^2), 3 l1 / (2V))``
  (the tests check it against the exact divergence, summed over the support);
* the rounding's effect on that shift (``rounded_skellam_rdp``): bounded with high probability
  by Hoeffding and always by the triangle inequality, the two joined soundly by the joint
  convexity of ``exp((a - 1) D_a)`` (van Erven and Harremoës 2014), so no extra delta;
* Poisson subsampling at rate q: the binomial expansion of the subsampled mixture's moment
  (``poisson_subsampled_rdp``). For the removal direction, D_a((1-q)Q + qP || Q), it is an
  identity at integer orders: ``E_Q[(1 - q + q P/Q)^a] = sum_l C(a,l) q^l (1-q)^(a-l)
  exp((l-1) D_l(P||Q))``, and each term needs only the base mechanism's RDP (averaged over the
  rounding, see below). The addition direction, D_a(Q || (1-q)Q + qP), is never larger when the
  pair is mirrored: a reflection of the output space swaps P and Q, as ``x -> w - x`` does for a
  Skellam (or Gaussian) shifted by w. Then the privacy loss Z = log(P/Q) under Q has
  ``f(-z) = e^z f(z)``, both moments become sums over z > 0, and the addition direction's
  term is below the removal direction's at every z and q, for every real order a >= 1.
  Proof: with u = e^z > 1, m = 1 - q + q u and n = q + (1 - q) u (so m + n = 1 + u), the
  removal term minus the addition term is ``m^a + u^(1-a) n^a - m^(1-a) - u^a n^(1-a)``
  ``= 2 [sqrt(m) sinh(b A) - sqrt(u n) sinh(b B)]`` with b = a - 1/2, A = log m and
  B = log(u / n). Since m n - u = q (1 - q) (u - 1)^2 >= 0, A >= B >= 0; for A >= B > 0 the
  ratio sinh(b A) / sinh(b B) grows with b (its log-derivative is A coth(bA) - B coth(bB),
  and s coth(s) increases); at b = 1/2 (a = 1) the difference is m - 1 - (u - n) = 0, so the
  ratio equals sqrt(u n / m) there and exceeds it for every b > 1/2. (B = 0 means q = 0,
  where the difference is 2 sqrt(m) sinh(b A) >= 0.) ``tests/test_distributed_noise.py``
  checks the identity and the margin on a dense grid of orders, rates and losses, and
  computes both directions exactly for small Skellam pairs.
  This is the bound Mironov, Talwar and Zhang (2019) prove tight for the Gaussian, so the
  Skellam's noise costs only its discreteness and rounding over the Gaussian's.
  Ledgers written before it (their secure entries carry no ``subsampling``) were bounded with
  Zhu and Wang's general bound ("Poisson Subsampled Rényi Differential Privacy", ICML 2019,
  Theorem 6, valid for any mechanism: its terms of order 3 and up count three times), which
  the audit still recomputes them with (``SUBSAMPLING_GENERAL``);
* RDP to (eps, delta) by the conversion of Balle et al. 2020 ("Hypothesis testing
  interpretations and Rényi DP", Theorem 21), the one Opacus and dp-accounting use.

Everything is in the encoder's integer units: ``scaled_clip`` is the clipping norm C times the
scale gamma (one record's L2 sensitivity before rounding), ``dimension`` the padded dimension
(every padded coordinate is rounded and noised), and a noise multiplier sigma means a Skellam
variance ``(sigma * scaled_clip)^2`` per coordinate, the Gaussian's convention.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.special import gammaln, logsumexp

# Integer orders (the binomial expansion needs them): every order to 64, then coarser to 256.
ORDERS: tuple[int, ...] = tuple(range(2, 65)) + tuple(range(72, 257, 8))
# Failure probabilities of the rounding's Hoeffding bound tried at each order (1e-1 .. 1e-300):
# the bound holds for every one of them, so each order may use the one that suits it best.
_ROUNDING_FAILURES = np.logspace(-1.0, -300.0, 1197)
MAX_NOISE_MULTIPLIER = 1e4

RdpCurve = Callable[[np.ndarray], np.ndarray]

# How a secure step's Poisson subsampling is bounded; a secure ledger entry names the one it used.
SUBSAMPLING_MIRRORED = "binomial-mirrored"  # the binomial expansion, for mirrored pairs
SUBSAMPLING_GENERAL = "zhu-wang-2019"  # any mechanism; what ledgers before it were bounded with
SUBSAMPLING_BOUNDS = (SUBSAMPLING_MIRRORED, SUBSAMPLING_GENERAL)


def _orders(orders: Sequence[int]) -> np.ndarray:
    values = np.asarray(orders)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("orders must be a non-empty sequence of integers")
    if not np.all(values == np.round(values)) or np.any(values < 2):
        raise ValueError(f"orders must be integers of at least 2, got {list(orders)!r}")
    return values.astype(np.int64)


def skellam_rdp(orders: Sequence[int] | np.ndarray, l2: float | np.ndarray,
                l1: float | np.ndarray, variance: float) -> np.ndarray:
    """RDP of the Skellam mechanism for an integer shift of norms ``l2``, ``l1``, per order.

    Agarwal, Kairouz, Liu (NeurIPS 2021), Corollary 3.6, with ``variance`` the per-coordinate
    variance of the noise. The first term is the Gaussian's at the same variance; the rest is
    the price of discreteness and vanishes as the variance grows.
    """
    if not (math.isfinite(variance) and variance > 0):
        raise ValueError(f"variance must be a positive finite number, got {variance!r}")
    a = np.asarray(orders, dtype=np.float64)
    l2 = np.asarray(l2, dtype=np.float64)
    l1 = np.asarray(l1, dtype=np.float64)
    extra = np.minimum(((2 * a - 1) * l2 ** 2 + 6 * l1) / (4 * variance ** 2),
                       3 * l1 / (2 * variance))
    return a * l2 ** 2 / (2 * variance) + extra


def rounded_l2_sensitivity(scaled_clip: float, dimension: int,
                           failure: float | np.ndarray) -> np.ndarray:
    """An L2 bound on how far one record moves the stochastically rounded sum, except with
    probability ``failure`` (``0`` gives the bound that always holds).

    Couple the two roundings by one uniform per coordinate (``floor(y + U)`` is the stochastic
    rounding of y): the difference of the rounded sums with and without a record of scaled
    norm at most ``S = scaled_clip`` is an integer vector ``w`` with ``w_i`` in
    ``{floor(v_i), ceil(v_i)}``, mean ``v_i``. So ``||w|| <= S + sqrt(d)`` always, and by
    Hoeffding on the independent ``w_i^2`` (each in a range of width ``2|v_i| + 1``)
    ``||w||^2 <= S^2 + d/4 + sqrt(2 ln(1/failure)) (S + sqrt(d)/2)`` except with probability
    ``failure`` (the same form as Kairouz, Liu, Steinke's conditional-rounding bound, ICML 2021).
    """
    worst = scaled_clip + math.sqrt(dimension)
    failure = np.asarray(failure, dtype=np.float64)
    with np.errstate(divide="ignore"):
        spread = np.sqrt(2 * np.log(1 / failure))
    likely = np.sqrt(scaled_clip ** 2 + dimension / 4
                     + spread * (scaled_clip + math.sqrt(dimension) / 2))
    return np.minimum(likely, worst)


def _l1_of_integer_shift(l2: np.ndarray, dimension: int) -> np.ndarray:
    """The largest L1 norm of an integer vector of L2 norm ``l2`` in ``dimension`` coordinates
    (|w_i| <= w_i^2 for integers, and Cauchy-Schwarz)."""
    return np.minimum(l2 ** 2, math.sqrt(dimension) * l2)


def rounded_skellam_rdp(orders: Sequence[int] | np.ndarray, scaled_clip: float, dimension: int,
                        variance: float) -> np.ndarray:
    """RDP of one record's effect on the rounded, Skellam-noised sum, per order.

    Given the coupling's uniforms, the two outputs are the same Skellam shifted by ``w``
    (``rounded_l2_sensitivity``). ``exp((a - 1) D_a)`` is jointly convex in the pair of
    distributions, so averaging over the uniforms gives, for every failure probability b,
    ``exp((a-1) eps(a)) <= (1 - b) exp((a-1) eps_b(a)) + b exp((a-1) eps_worst(a))``; each order
    takes the b that minimises it. No delta is spent on the rounding.
    """
    if not (math.isfinite(scaled_clip) and scaled_clip > 0):
        raise ValueError(f"scaled_clip must be a positive finite number, got {scaled_clip!r}")
    if dimension < 1:
        raise ValueError(f"dimension must be at least 1, got {dimension}")
    a = _orders(orders).astype(np.float64)[:, None]
    failures = _ROUNDING_FAILURES[None, :]
    l2_likely = rounded_l2_sensitivity(scaled_clip, dimension, failures)
    l2_worst = rounded_l2_sensitivity(scaled_clip, dimension, 0.0)
    likely = skellam_rdp(a, l2_likely, _l1_of_integer_shift(l2_likely, dimension), variance)
    worst = skellam_rdp(a, l2_worst, _l1_of_integer_shift(l2_worst, dimension), variance)
    log_mixture = np.logaddexp(np.log1p(-failures) + (a - 1) * likely,
                               np.log(failures) + (a - 1) * worst)
    return np.minimum(log_mixture.min(axis=1) / (a[:, 0] - 1), worst[:, 0])


def gaussian_rdp(orders: Sequence[int] | np.ndarray, noise_multiplier: float) -> np.ndarray:
    """RDP of the Gaussian mechanism at sensitivity 1: ``a / (2 sigma^2)``."""
    return np.asarray(orders, dtype=np.float64) / (2 * noise_multiplier ** 2)


def poisson_subsampled_rdp(orders: Sequence[int] | np.ndarray, sample_rate: float,
                           base: RdpCurve, bound: str = SUBSAMPLING_MIRRORED) -> np.ndarray:
    """RDP of the base mechanism run on a Poisson sample at ``sample_rate``, per integer order
    ``a``, never above the base mechanism's own (subsampling cannot hurt):
    ``(1/(a-1)) log[(1-q)^(a-1) (1 + (a-1) q) + sum_{l=2}^{a} k_l C(a,l) q^l (1-q)^(a-l)
    e^{(l-1) eps(l)}]``.

    ``SUBSAMPLING_MIRRORED``: every ``k_l`` is 1, the binomial expansion, valid for both
    directions when the base mechanism's two outputs are mirror images (module docstring);
    for the Gaussian it is the exact RDP dp-accounting computes. ``SUBSAMPLING_GENERAL``: Zhu
    and Wang's general bound, ``k_l`` 3 for ``l >= 3``, for ledgers written before.
    """
    if bound not in SUBSAMPLING_BOUNDS:
        raise ValueError(f"unknown subsampling bound {bound!r} "
                         f"(known: {', '.join(SUBSAMPLING_BOUNDS)})")
    a_all = _orders(orders)
    if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    top = int(a_all.max())
    ells = np.arange(2, top + 1)
    eps = np.asarray(base(ells), dtype=np.float64)  # eps[l - 2] is the base RDP at order l
    own = eps[a_all - 2]
    if sample_rate == 1:
        return own
    log_q, log_1q = math.log(sample_rate), math.log1p(-sample_rate)
    result = np.empty(len(a_all))
    for i, a in enumerate(a_all):
        ell = np.arange(2, a + 1)
        log_terms = (gammaln(a + 1) - gammaln(ell + 1) - gammaln(a - ell + 1)
                     + ell * log_q + (a - ell) * log_1q + (ell - 1) * eps[ell - 2])
        if bound == SUBSAMPLING_GENERAL:
            log_terms[1:] += math.log(3.0)
        head = (a - 1) * log_1q + math.log1p((a - 1) * sample_rate)
        result[i] = logsumexp(np.concatenate(([head], log_terms))) / (a - 1)
    return np.minimum(result, own)


def epsilon_from_rdp(orders: Sequence[int] | np.ndarray, rdp: np.ndarray,
                     delta: float) -> tuple[float, int]:
    """The smallest epsilon at ``delta`` over the orders, and the order that gives it.

    Balle et al. 2020, Theorem 21: ``eps = rdp(a) + log((a-1)/a) - (log delta + log a)/(a-1)``.
    """
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    a = _orders(orders).astype(np.float64)
    rdp = np.asarray(rdp, dtype=np.float64)
    eps = rdp + np.log1p(-1 / a) - (math.log(delta) + np.log(a)) / (a - 1)
    eps = np.where(np.isnan(eps), np.inf, eps)
    best = int(np.argmin(eps))
    return max(float(eps[best]), 0.0), int(a[best])


def _check_run(sample_rate: float, steps: int, delta: float) -> None:
    if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def skellam_step_rdp(noise_multiplier: float, scaled_clip: float, dimension: int,
                     sample_rate: float, orders: Sequence[int] = ORDERS,
                     bound: str = SUBSAMPLING_MIRRORED) -> np.ndarray:
    """RDP per order of one Poisson-subsampled step of the rounded Skellam sum, whose noise
    has standard deviation ``noise_multiplier * scaled_clip`` per coordinate. Steps compose by
    adding these curves, so a ledger of different rounds sums them."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a positive finite number, "
                         f"got {noise_multiplier!r}")
    variance = (noise_multiplier * scaled_clip) ** 2
    return poisson_subsampled_rdp(
        orders, sample_rate, lambda ells: rounded_skellam_rdp(ells, scaled_clip, dimension,
                                                              variance), bound)


def skellam_epsilon(noise_multiplier: float, scaled_clip: float, dimension: int,
                    sample_rate: float, steps: int, delta: float,
                    orders: Sequence[int] = ORDERS, bound: str = SUBSAMPLING_MIRRORED) -> float:
    """Epsilon at ``delta`` of ``steps`` Poisson-subsampled steps of the rounded Skellam sum."""
    _check_run(sample_rate, steps, delta)
    rdp = steps * skellam_step_rdp(noise_multiplier, scaled_clip, dimension, sample_rate, orders,
                                   bound)
    return epsilon_from_rdp(orders, rdp, delta)[0]


def subsampled_gaussian_epsilon(noise_multiplier: float, sample_rate: float, steps: int,
                                delta: float, orders: Sequence[int] = ORDERS) -> float:
    """Epsilon of the Poisson-subsampled Gaussian by the same subsampling bound: the
    cross-check against dp-accounting's analysis of that mechanism."""
    _check_run(sample_rate, steps, delta)
    rdp = steps * poisson_subsampled_rdp(orders, sample_rate,
                                         lambda ells: gaussian_rdp(ells, noise_multiplier))
    return epsilon_from_rdp(orders, rdp, delta)[0]


def calibrate_skellam_noise(epsilon: float, delta: float, sample_rate: float, steps: int,
                            scaled_clip: float, dimension: int,
                            tolerance: float = 1e-3) -> float:
    """Smallest noise multiplier (found to ``tolerance``, a share) whose ``skellam_epsilon``
    is within ``epsilon``: a bisection on log sigma, as epsilon falls with the noise."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}")
    _check_run(sample_rate, steps, delta)

    def spent(sigma: float) -> float:
        return skellam_epsilon(sigma, scaled_clip, dimension, sample_rate, steps, delta)

    low, high = 0.1, 1.0
    while spent(high) > epsilon:
        low, high = high, high * 2
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} keeps epsilon "
                             f"within {epsilon:g} for {steps} steps at sample_rate "
                             f"{sample_rate:g}")
    while spent(low) <= epsilon:
        low, high = low / 2, low
        if low < 1e-6:
            return high
    while high - low > tolerance * high:
        middle = math.sqrt(low * high)
        if spent(middle) <= epsilon:
            high = middle
        else:
            low = middle
    return high
