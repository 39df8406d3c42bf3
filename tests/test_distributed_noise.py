"""Distributed Skellam noise: the encoding round-trips, the noise is what was calibrated, a
wrapped aggregate is refused, and the accounting is sound against independent figures."""

import itertools
import logging
import math

import numpy as np
import pytest
from privatune.common import distributed_noise as dn
from privatune.common import distributed_noise_accounting as acc
from scipy.stats import skellam


def _params(dimension=1000, t=4, n=5, records=10, sigma=0.5, clip=1.0, **kwargs):
    return dn.choose_parameters(dimension, min_contributions=t, max_sites=n, clip=clip,
                                max_records_per_site=records, noise_multiplier=sigma, **kwargs)


def _site_sums(rng, sites, dimension, norm):
    vectors = [rng.normal(size=dimension) for _ in range(sites)]
    return [v / np.linalg.norm(v) * norm for v in vectors]


# --- encoding --------------------------------------------------------------------------------

def test_rotation_is_orthonormal_invertible_and_flattens():
    rng = np.random.default_rng(0)
    square = np.stack([dn.rotate(e, 11) for e in np.eye(256)])
    assert np.allclose(square @ square.T, np.eye(256), atol=1e-12)
    cropped = np.stack([dn.rotate(e, 11) for e in np.eye(200)])  # padded to 256
    assert np.allclose(cropped @ cropped.T, np.eye(200), atol=1e-12)
    x = rng.normal(size=1000)
    y = dn.rotate(x, 5)
    assert y.shape == (1024,)
    assert math.isclose(np.linalg.norm(y), np.linalg.norm(x), rel_tol=1e-12)
    assert np.allclose(dn.unrotate(y, 5, 1000), x, atol=1e-12)
    assert not np.allclose(dn.rotate(x, 6), y)  # the seed matters
    spike = np.zeros(1000)
    spike[3] = 1.0  # all weight on one coordinate is spread evenly over all of them
    assert np.allclose(np.abs(dn.rotate(spike, 5)), 1 / math.sqrt(1024))


def test_stochastic_rounding_is_unbiased_and_off_by_less_than_one():
    rng = np.random.default_rng(1)
    values = rng.uniform(-5, 5, size=2000)
    draws = np.stack([dn.stochastic_round(values, rng) for _ in range(500)])
    assert np.all((draws == np.floor(values)) | (draws == np.ceil(values)))
    bias = draws.mean(axis=0) - values
    # each coordinate's mean has standard deviation at most 0.5 / sqrt(500) = 0.022
    assert np.max(np.abs(bias)) < 0.15
    assert abs(bias.mean()) < 5 * 0.5 / math.sqrt(draws.size)


def test_encode_sum_decode_recovers_the_sum_within_the_noise():
    params = _params()
    rng = np.random.default_rng(2)
    sums = _site_sums(rng, 4, 1000, norm=8.0)
    encoded = [dn.encode_contribution(s, params, rotation_seed=3, rng=rng) for s in sums]
    assert all(e.dtype == np.uint32 and e.shape == (1024,) for e in encoded)
    decoded = dn.decode_sum(dn.modular_sum(encoded, params), params, rotation_seed=3,
                            contributions=4)
    error = decoded - np.sum(sums, axis=0)
    assert decoded.shape == (1000,)
    assert abs(error.mean()) < 0.05
    assert 0.9 < error.std() / (params.noise_multiplier * params.clip) < 1.1


def test_aggregate_noise_variance_is_the_calibrated_one_and_each_share_a_t_th():
    """Issue 27's target: the noise the coordinator sees matches the calibrated variance
    within 5% over many rounds, and each site's share is 1/t of it."""
    params = _params(t=4, n=4, sigma=0.7)
    rng = np.random.default_rng(4)
    errors = []
    for round_ in range(40):
        sums = _site_sums(rng, 4, 1000, norm=5.0)
        encoded = [dn.encode_contribution(s, params, rotation_seed=round_, rng=rng)
                   for s in sums]
        decoded = dn.decode_sum(dn.modular_sum(encoded, params), params,
                                rotation_seed=round_, contributions=4)
        errors.append(decoded - np.sum(sums, axis=0))
    calibrated = params.aggregate_variance / params.scale ** 2  # = (sigma C)^2
    ratio = np.concatenate(errors).var() / calibrated
    assert abs(ratio - 1) < 0.05, ratio
    # a share, seen alone (a zero input rounds exactly, so what is left is the noise)
    shares = np.concatenate([
        dn.centred(dn.encode_contribution(np.zeros(1000), params, rotation_seed=0, rng=rng),
                   params.bits) for _ in range(40)])
    assert params.share_variance == params.aggregate_variance / 4
    assert abs(shares.var() / params.share_variance - 1) < 0.05


def test_decoding_needs_between_t_and_n_contributions():
    params = _params(t=3, n=4)
    rng = np.random.default_rng(5)
    encoded = [dn.encode_contribution(s, params, rotation_seed=1, rng=rng)
               for s in _site_sums(rng, 2, 1000, norm=1.0)]
    with pytest.raises(ValueError, match="min_contributions"):
        dn.decode_sum(dn.modular_sum(encoded, params), params, rotation_seed=1, contributions=2)
    with pytest.raises(ValueError, match="max_sites"):
        dn.decode_sum(dn.modular_sum(encoded, params), params, rotation_seed=1, contributions=5)


def test_a_contribution_over_its_norm_is_refused_at_the_site():
    params = _params(records=10)
    with pytest.raises(ValueError, match="max_records_per_site"):
        dn.encode_contribution(np.full(1000, 1.0), params, rotation_seed=0,
                               rng=np.random.default_rng(0))  # norm 31.6 > 10
    with pytest.raises(ValueError, match="shape"):
        dn.encode_contribution(np.zeros(999), params, rotation_seed=0,
                               rng=np.random.default_rng(0))


def test_an_aggregate_that_wraps_around_is_refused_never_decoded():
    params = _params(dimension=16384, t=4, n=4, records=100, sigma=1.0)
    rng = np.random.default_rng(6)
    honest = [dn.encode_contribution(s, params, rotation_seed=9, rng=rng)
              for s in _site_sums(rng, 3, 16384, norm=50.0)]
    # (1) a vector within the norm limit, aimed so that the rotation does not flatten it:
    # all of its norm lands on one rotated coordinate, past the bound but inside the range
    spike = np.zeros(16384)
    spike[0] = params.clip * params.max_records_per_site
    adversarial = dn.unrotate(spike, 9, 16384)
    assert np.linalg.norm(adversarial) <= params.clip * params.max_records_per_site + 1e-9
    reach = params.clip * params.max_records_per_site * params.scale
    assert params.bound < reach < params.modulus - params.bound
    sneaky = dn.encode_contribution(adversarial, params, rotation_seed=9, rng=rng)
    with pytest.raises(dn.AggregateOverflowError, match="wrapped around"):
        dn.decode_sum(dn.modular_sum([*honest, sneaky], params), params, rotation_seed=9,
                      contributions=4)
    # (2) a site that bypasses the encoder and adds half the modulus to one coordinate: the
    # sum wraps around there, and lands beyond the bound on the other side
    honest_fourth = dn.encode_contribution(np.zeros(16384), params, rotation_seed=9, rng=rng)
    wrapped = honest_fourth.copy()
    wrapped[123] = (int(wrapped[123]) + params.modulus // 2) % params.modulus
    fine = dn.decode_sum(dn.modular_sum([*honest, honest_fourth], params), params,
                         rotation_seed=9, contributions=4)
    assert fine.shape == (16384,)
    with pytest.raises(dn.AggregateOverflowError):
        dn.decode_sum(dn.modular_sum([*honest, wrapped], params), params, rotation_seed=9,
                      contributions=4)
    with pytest.raises(ValueError, match="outside"):
        dn.modular_sum([np.full(16384, params.modulus, dtype=np.uint64)], params)


# --- parameters ------------------------------------------------------------------------------

def test_parameters_fit_32_bits_for_a_lora_sized_vector():
    params = _params(dimension=100_000, t=4, n=4, records=512, sigma=1.0)
    assert params.padded_dimension == 131072 and params.bits <= 32
    assert 2 * params.bound <= params.modulus // 2
    assert params.share_variance * 4 == pytest.approx(params.aggregate_variance)
    assert params.aggregate_variance == pytest.approx(
        (params.noise_multiplier * params.clip * params.scale) ** 2)
    many = _params(dimension=100_000, t=4, n=64, records=10_000, sigma=1.0)
    assert many.bits <= 32 and many.scale == params.scale
    assert "19-bit" in _params(dimension=100_000, t=4, n=4, records=256, sigma=1.0).describe()


@pytest.mark.parametrize("change, parameter", [
    ({"n": 3, "t": 4}, "max_sites"),
    ({"dimension": 0}, "dimension"),
    ({"clip": -1.0}, "clip"),
    ({"sigma": 0.0}, "noise_multiplier"),
    ({"records": 0}, "max_records_per_site"),
    ({"failure_probability": 1.5}, "failure_probability"),
    ({"records": 10**9, "n": 64}, "max_bits"),
    ({"max_bits": 12}, "max_bits"),
])
def test_impossible_parameters_are_refused_by_name(change, parameter):
    with pytest.raises(ValueError, match=parameter):
        _params(**change)


# --- accounting ------------------------------------------------------------------------------

def test_skellam_bound_is_above_the_exact_renyi_divergence():
    """The paper's bound against the Rényi divergence of two shifted one-dimensional Skellams,
    summed exactly over their support (scipy's pmf)."""
    k = np.arange(-200, 201)  # both pmfs are above 1e-80 here, and the rest is negligible
    for variance in (8.0, 30.0):
        base = skellam(variance / 2, variance / 2)
        for shift in (1, 2, 4):
            for order in (2, 3, 5, 8, 16):
                log_terms = order * base.logpmf(k - shift) + (1 - order) * base.logpmf(k)
                exact = np.logaddexp.reduce(log_terms) / (order - 1)
                bound = acc.skellam_rdp([order], shift, shift, variance)[0]
                assert exact <= bound, (variance, shift, order)
                if variance > 10 and shift == 1:  # and close to it where the noise is larger
                    assert bound <= 1.1 * exact, (variance, shift, order)


def test_skellam_bound_holds_for_a_vector_shift():
    """A shift of several coordinates: the exact divergence of the product is the sum over
    coordinates, against the bound with the vector's L2 and L1 norms."""
    k = np.arange(-200, 201)
    variance = 12.0
    base = skellam(variance / 2, variance / 2)
    shift = np.array([1, -2, 0, 3, 1])
    for order in (2, 4, 9):
        exact = sum(np.logaddexp.reduce(order * base.logpmf(k - w) + (1 - order) * base.logpmf(k))
                    for w in shift) / (order - 1)
        bound = acc.skellam_rdp([order], np.linalg.norm(shift), np.abs(shift).sum(), variance)
        assert exact <= bound[0]


def test_rounding_bound_holds_against_the_exact_rounded_mechanism():
    """One coordinate, small noise: the exact Rényi divergence between the stochastically
    rounded, Skellam-noised outputs for inputs x and x + v (both directions, every fractional
    part and shift on a grid) never exceeds ``rounded_skellam_rdp``."""
    k = np.arange(-100, 101)  # every log-pmf here is finite (above -300), the rest negligible
    variance, scaled_clip, orders = 8.0, 2.5, [2, 3, 5, 8]
    noise = skellam(variance / 2, variance / 2)

    def log_output(y):  # log-pmf of round(y) + noise over k
        low = math.floor(y)
        with np.errstate(divide="ignore"):
            return np.logaddexp(np.log(1 - (y - low)) + noise.logpmf(k - low),
                                np.log(y - low) + noise.logpmf(k - low - 1))

    worst = np.zeros(len(orders))
    for x in np.linspace(0, 0.8, 5):
        for v in np.linspace(-scaled_clip, scaled_clip, 21):
            p, q = log_output(x), log_output(x + v)
            for i, order in enumerate(orders):
                for a, b in ((p, q), (q, p)):
                    value = np.logaddexp.reduce(order * a + (1 - order) * b) / (order - 1)
                    assert np.isfinite(value)
                    worst[i] = max(worst[i], value)
    bound = acc.rounded_skellam_rdp(orders, scaled_clip, 1, variance)
    assert np.all(worst <= bound), (worst, bound)
    # rounding costs something: the bound is above the unrounded shift's
    assert np.all(bound > acc.skellam_rdp(orders, scaled_clip, scaled_clip, variance))


def test_rotation_signs_are_a_fixed_public_function_of_the_seed():
    """Every site and the coordinator must draw the same signs, whatever their NumPy."""
    assert dn._signs(0, 16).tolist() == [1, 1, -1, 1, -1, 1, -1, 1, -1, -1, 1, 1, -1, -1, 1, 1]
    assert dn._signs(2 ** 128 - 1, 8).tolist() == [1, 1, 1, 1, -1, 1, -1, 1]
    with pytest.raises(ValueError, match="rotation_seed"):
        dn.rotate(np.ones(4), -1)


def test_skellam_converges_to_the_gaussian_at_the_same_variance():
    orders = np.array(acc.ORDERS)
    gaussian = acc.gaussian_rdp(orders, 1.0)
    gaps = []
    for scaled_clip in (1e2, 1e3, 1e4, 1e5):
        plain = acc.skellam_rdp(orders, scaled_clip, scaled_clip * 32.0, scaled_clip ** 2)
        gaps.append(np.max(plain / gaussian - 1))
    assert all(a > b for a, b in itertools.pairwise(gaps)) and gaps[-1] < 1e-6
    rounded = [np.max(acc.rounded_skellam_rdp(orders, s, 1024, s ** 2) / gaussian - 1)
               for s in (1e3, 1e4, 1e5, 1e6)]
    assert all(a > b for a, b in itertools.pairwise(rounded)) and rounded[-1] < 0.01
    # at the scale the encoder uses, the whole accounting is within 1% of the same bound's
    # figure for the Gaussian
    dimension = 100_000
    scaled = dn.scaled_clip_for(dimension)
    skellam_eps = acc.skellam_epsilon(1.0, scaled, dn.padded_dimension(dimension), 0.01,
                                      1000, 1e-5)
    gaussian_eps = acc.subsampled_gaussian_epsilon(1.0, 0.01, 1000, 1e-5)
    assert gaussian_eps <= skellam_eps <= 1.01 * gaussian_eps


@pytest.mark.parametrize("sigma, q, steps", [(1.0, 0.01, 1000), (0.8, 0.05, 200),
                                            (1.1, 0.001, 10_000), (3.0, 0.08, 90)])
def test_subsampling_bound_against_dp_accounting(sigma, q, steps):
    """For the Gaussian, dp-accounting's RDP accountant is exact (Mironov et al. 2019): the
    binomial expansion reproduces it to rounding; Zhu and Wang's general bound, kept for older
    ledgers, is never below it."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    logging.getLogger("absl").setLevel(logging.ERROR)
    accountant = RdpAccountant(orders=[float(o) for o in acc.ORDERS])
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.GaussianDpEvent(sigma)), steps)
    ours = steps * acc.poisson_subsampled_rdp(acc.ORDERS, q,
                                              lambda o: acc.gaussian_rdp(o, sigma))
    assert np.allclose(ours, np.asarray(accountant._rdp), rtol=1e-9)
    theirs = accountant.get_epsilon(1e-5)
    assert acc.subsampled_gaussian_epsilon(sigma, q, steps, 1e-5) == pytest.approx(theirs,
                                                                                   rel=1e-6)
    general = steps * acc.poisson_subsampled_rdp(acc.ORDERS, q,
                                                 lambda o: acc.gaussian_rdp(o, sigma),
                                                 acc.SUBSAMPLING_GENERAL)
    assert np.all(general >= ours * (1 - 1e-12))
    with pytest.raises(ValueError, match="subsampling bound"):
        acc.poisson_subsampled_rdp(acc.ORDERS, q, lambda o: acc.gaussian_rdp(o, sigma), "tight")


def _mirrored_pair_margin(order: float, sample_rate: float, loss: np.ndarray) -> np.ndarray:
    """Log of (removal term / addition term) at privacy losses ``loss`` > 0, for a mirrored
    pair: where it is >= 0 for every loss, the subsampled addition direction's moment is at
    most the removal direction's, which the binomial expansion gives exactly.

    With ``u = e^z``, ``m = 1 - q + q u`` and ``n = q + (1 - q) u``, the two directions'
    moments are sums over z > 0 of ``f(z)`` times ``m^a + u^(1-a) n^a`` (removal) and
    ``m^(1-a) + u^a n^(1-a)`` (addition). The test below checks it on a dense grid.
    """
    z = np.asarray(loss, dtype=np.float64)
    log_m = np.logaddexp(math.log1p(-sample_rate), math.log(sample_rate) + z)
    log_n = np.logaddexp(math.log(sample_rate), math.log1p(-sample_rate) + z)
    removal = np.logaddexp(order * log_m, (1 - order) * z + order * log_n)
    addition = np.logaddexp((1 - order) * log_m, order * z + (1 - order) * log_n)
    return removal - addition


def test_mirrored_pairs_addition_direction_never_exceeds_removal():
    """The lemma the binomial expansion rests on for both directions: on a dense grid of
    orders, sampling rates (up to 0.99) and privacy losses (up to e^1000), the removal term is
    at least the addition term (to rounding). At order 2 it is exact: the two terms compare
    the variances q^2 (u-1)^2 / u and q^2 (u-1)^2 / (m n) of two mean-one distributions, and
    m n - u = q (1 - q) (u - 1)^2 >= 0."""
    losses = np.concatenate([np.linspace(1e-6, 1e-2, 50), np.logspace(-2, 3, 1500)])
    rates = np.concatenate([np.logspace(-6, -0.01, 80), [0.5, 0.9]])
    for order in [*range(2, 41), 64, 128, 256]:
        for rate in rates:
            margin = _mirrored_pair_margin(order, float(rate), losses)
            assert margin.min() > -1e-9, (order, rate, losses[int(np.argmin(margin))])


def test_the_mirrored_lemmas_proof_holds_step_by_step():
    """The proof in distributed_noise_accounting's docstring, at random points and at real
    orders: the two terms' difference has the closed form 2 [sqrt(m) sinh(bA) - sqrt(un)
    sinh(bB)], A >= B, it vanishes at order 1, and it is never negative above it."""
    rng = np.random.default_rng(7)
    u = np.exp(rng.uniform(1e-3, 6.0, 4000))
    q = rng.uniform(0.0, 1.0, 4000)
    order = rng.uniform(1.0, 12.0, 4000)
    m, n = 1 - q + q * u, q + (1 - q) * u
    removal = m ** order + u ** (1 - order) * n ** order
    addition = m ** (1 - order) + u ** order * n ** (1 - order)
    b, big_a, big_b = order - 0.5, np.log(m), np.log(u / n)
    closed = 2 * (np.sqrt(m) * np.sinh(b * big_a) - np.sqrt(u * n) * np.sinh(b * big_b))
    assert np.allclose(removal - addition, closed, rtol=1e-9, atol=1e-9 * removal)
    assert np.all(big_a >= big_b - 1e-12) and np.all(big_b >= 0)
    at_one = np.sqrt(m) * np.sinh(big_a / 2) - np.sqrt(u * n) * np.sinh(big_b / 2)
    assert np.allclose(at_one, 0.0, atol=1e-9 * m)
    assert np.all(removal - addition >= -1e-9 * removal)
    # the margin test above, at orders between the integers the accountant uses
    for real_order in (1.0, 1.5, 2.5, 7.25):
        assert _mirrored_pair_margin(real_order, 0.3, np.logspace(-3, 2, 200)).min() > -1e-9


def _skellam_log_pmf(variance: float, support: np.ndarray) -> np.ndarray:
    from scipy.stats import skellam
    return skellam.logpmf(support, variance / 2, variance / 2)


@pytest.mark.parametrize("variance, shift, q", [(4.0, 1, 0.1), (2.0, 2, 0.3), (9.0, 3, 0.05),
                                                (1.0, 1, 0.5)])
def test_subsampled_skellam_both_directions_within_the_binomial_bound(variance, shift, q):
    """Exactly, by summing over the support: both directions of the Poisson-subsampled
    Skellam pair are within the binomial expansion of the base pair's own divergences, and the
    removal direction meets it (it is an identity there)."""
    from scipy.special import logsumexp

    support = np.arange(-60, 61)  # the mass beyond is below 1e-20 at these variances
    base_q = _skellam_log_pmf(variance, support)
    base_p = _skellam_log_pmf(variance, support - shift)
    mixture = np.logaddexp(math.log1p(-q) + base_q, math.log(q) + base_p)
    orders = np.arange(2, 13)

    def divergence(first: np.ndarray, second: np.ndarray, order: int) -> float:
        return float(logsumexp(order * first + (1 - order) * second) / (order - 1))

    base = {int(a): divergence(base_p, base_q, int(a)) for a in orders}
    bound = acc.poisson_subsampled_rdp(orders, q, lambda ells: np.array(
        [base[int(a)] if a in base else np.inf for a in ells]))
    for a, limit in zip(orders, bound):
        removal = divergence(mixture, base_q, int(a))
        addition = divergence(base_q, mixture, int(a))
        assert removal == pytest.approx(limit, rel=1e-6, abs=1e-12)
        assert addition <= limit * (1 + 1e-9) + 1e-15


def test_guarantees_grow_with_steps_and_rate_and_the_fallback_is_weaker():
    params = _params(dimension=100_000, t=4, n=8, records=256, sigma=1.0)
    base = dn.site_guarantees(params, sample_rate=0.01, steps=500, delta=1e-5)
    longer = dn.site_guarantees(params, sample_rate=0.01, steps=1000, delta=1e-5)
    denser = dn.site_guarantees(params, sample_rate=0.02, steps=500, delta=1e-5)
    for guarantee in ("aggregate_epsilon", "fallback_epsilon"):
        assert getattr(base, guarantee) < getattr(longer, guarantee)
        assert getattr(base, guarantee) < getattr(denser, guarantee)
    assert base.fallback_epsilon > 2 * base.aggregate_epsilon
    colluding = dn.site_guarantees(params, sample_rate=0.01, steps=500, delta=1e-5,
                                   honest_contributions=2)
    assert base.aggregate_epsilon < colluding.aggregate_epsilon < base.fallback_epsilon
    assert "(a) epsilon" in base.describe()


def test_aggregate_noise_multiplier_meets_the_target_tightly():
    q, steps, delta, dimension, t = 0.01, 500, 1e-5, 100_000, 4
    sigma = dn.aggregate_noise_multiplier(3.0, delta, q, steps, dimension=dimension,
                                          min_contributions=t)
    padded, scaled = dn.padded_dimension(dimension), dn.scaled_clip_for(dimension)
    assert acc.skellam_epsilon(sigma, scaled, padded, q, steps, delta) <= 3.0
    assert acc.skellam_epsilon(sigma * 0.99, scaled, padded, q, steps, delta) > 3.0
    params = _params(dimension=dimension, t=t, n=t, records=256, sigma=sigma)
    assert dn.site_guarantees(params, sample_rate=q, steps=steps,
                              delta=delta).aggregate_epsilon <= 3.0
    fallback = dn.aggregate_noise_multiplier(3.0, delta, q, steps, dimension=dimension,
                                             min_contributions=t, guarantee="fallback")
    assert fallback == pytest.approx(2 * sigma)
    with pytest.raises(ValueError, match="guarantee"):
        dn.aggregate_noise_multiplier(3.0, delta, q, steps, dimension=dimension,
                                      min_contributions=t, guarantee="both")
