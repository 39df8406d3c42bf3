"""The cryptographic stream a site's secure-aggregation share is drawn from: its uniforms, its
Poisson draws (inversion below a mean of 10, PTRS above) and the Skellam noise built on them,
checked against the exact distributions. Fixed keys: every figure here is deterministic."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from privatune.client.secure_contribution import noise_rng
from privatune.common.distributed_noise import skellam_noise
from privatune.common.secure_random import CipherRandom


def test_uniforms_are_in_the_unit_interval_with_the_uniforms_moments():
    draws = CipherRandom.derived(1).random((1000, 200))
    assert draws.shape == (1000, 200) and draws.min() >= 0.0 and draws.max() < 1.0
    assert draws.mean() == pytest.approx(0.5, abs=5 * math.sqrt(1 / 12 / draws.size))
    assert draws.var() == pytest.approx(1 / 12, rel=0.01)
    assert stats.kstest(draws.ravel()[:50_000], "uniform").pvalue > 1e-4


def test_a_key_gives_the_same_stream_and_each_label_another():
    first = CipherRandom.derived(2**255 + 7, 3, 1).random(64)
    assert np.array_equal(first, CipherRandom.derived(2**255 + 7, 3, 1).random(64))
    for other in (CipherRandom.derived(2**255 + 7, 4, 1), CipherRandom.derived(2**255 + 7, 3, 0),
                  CipherRandom.derived(2**255 + 8, 3, 1)):
        assert not np.array_equal(first, other.random(64))
    assert not np.array_equal(noise_rng(9, 0).random(64), noise_rng(9, 1).random(64))


@pytest.mark.parametrize("lam", [0.5, 3.0, 9.99, 10.0, 37.5, 1e4, 1e9])
def test_poisson_draws_have_the_poisson_mean_and_variance(lam):
    draws = CipherRandom.derived(11, int(lam * 100)).poisson(lam, 200_000)
    assert draws.dtype == np.int64 and draws.min() >= 0
    assert draws.mean() == pytest.approx(lam, abs=5 * math.sqrt(lam / draws.size))
    assert draws.var() / lam == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("lam", [3.0, 10.0, 37.5, 400.0])
def test_poisson_draws_pass_a_chi_square_test_against_the_exact_pmf(lam):
    """Both samplers (inversion below 10, PTRS from 10), over every value with at least 20
    expected draws: a sampler off by a few percent anywhere fails."""
    draws = CipherRandom.derived(12, int(lam)).poisson(lam, 400_000)
    values = np.arange(draws.max() + 1)
    observed = np.bincount(draws, minlength=values.size)
    expected = stats.poisson.pmf(values, lam) * draws.size
    kept = expected >= 20
    chi_square = float(((observed[kept] - expected[kept]) ** 2 / expected[kept]).sum())
    assert stats.chi2.sf(chi_square, int(kept.sum()) - 1) > 1e-4


def test_skellam_shares_from_the_stream_have_the_calibrated_variance():
    """The share a site adds: Poisson(V/2) - Poisson(V/2), variance V, mean 0."""
    for variance in (6.0, 2.5e7):
        noise = skellam_noise(variance, 400_000, noise_rng(2**200, 5))
        assert noise.mean() == pytest.approx(0.0, abs=5 * math.sqrt(variance / noise.size))
        assert noise.var() / variance == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("call, message", [
    (lambda: CipherRandom(b"short"), "32 bytes"),
    (lambda: CipherRandom.derived(-1), "non-negative"),
    (lambda: CipherRandom.derived(1, True), "non-negative integers"),
    (lambda: CipherRandom.derived(1).poisson(float("nan"), 3), "lam"),
    (lambda: CipherRandom.derived(1).poisson(2.0, -1), "size")])
def test_bad_arguments_are_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_nothing_asked_nothing_drawn():
    rng = CipherRandom.derived(3)
    assert rng.poisson(0.0, 5).tolist() == [0] * 5 and rng.poisson(4.0, 0).size == 0
