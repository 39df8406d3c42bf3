"""Accounting: calibration meets the budget; an independent implementation agrees."""

import pytest

from privatune.common.privacy import (MechanismStep, calibrate_noise_multiplier, independent_rdp_epsilon,
                            pld_epsilon, rdp_epsilon)

HISTORIES = [
    [MechanismStep(0.8, 0.05, 40)] * 3,
    [MechanismStep(1.1, 0.02, 100), MechanismStep(1.1, 0.02, 100)],
    [MechanismStep(0.6, 0.1, 10), MechanismStep(2.0, 0.01, 500), MechanismStep(0.9, 0.05, 30)],
]


@pytest.mark.parametrize("history", HISTORIES)
def test_independent_rdp_agrees_within_one_percent_and_pld_is_never_above(history):
    ours = rdp_epsilon(history, 1e-5)
    theirs = independent_rdp_epsilon(history, 1e-5)
    assert abs(ours - theirs) <= 0.01 * theirs
    assert pld_epsilon(history, 1e-5) <= ours


def test_calibration_meets_budget_tightly():
    sigma = calibrate_noise_multiplier(8.0, 1e-5, 0.05, 90)
    spent = rdp_epsilon([MechanismStep(sigma, 0.05, 90)], 1e-5)
    assert spent <= 8.0
    assert rdp_epsilon([MechanismStep(sigma * 0.98, 0.05, 90)], 1e-5) > 8.0 * 0.98


def test_calibration_accounts_for_prior_releases():
    prior = [MechanismStep(1.0, 0.05, 60)]
    fresh = calibrate_noise_multiplier(8.0, 1e-5, 0.05, 60)
    after_prior = calibrate_noise_multiplier(8.0, 1e-5, 0.05, 60, prior)
    assert after_prior > fresh
    assert rdp_epsilon([*prior, MechanismStep(after_prior, 0.05, 60)], 1e-5) <= 8.0
    with pytest.raises(ValueError, match="already spent"):
        calibrate_noise_multiplier(0.5, 1e-5, 0.05, 60, prior)


def test_one_noise_rule_for_node_plan_and_audit():
    """The run's noise: the lifetime cap against prior spend, the per-run budget, the floor."""
    from privatune.common.privacy import (calibrate_noise_multiplier, delta_problem,
                                          run_noise_multiplier)

    q, steps, delta = 0.1, 40, 1e-5
    fresh = run_noise_multiplier(8.0, 8.0, delta, q, steps)
    assert fresh == calibrate_noise_multiplier(8.0, delta, q, steps)
    prior = [MechanismStep(fresh, q, steps)]
    assert run_noise_multiplier(8.0, 8.0, delta, q, steps, prior) > fresh  # less budget left
    assert run_noise_multiplier(8.0, 2.0, delta, q, steps) > fresh  # a tighter run budget binds
    assert run_noise_multiplier(8.0, 8.0, delta, q, steps, min_noise_multiplier=50.0) == 50.0
    assert delta_problem(1e-3, 999) is None and "not below 1/1000" in delta_problem(1e-3, 1000)


def test_prv_calibration_against_prior_spend():
    """PRV needs less noise than RDP for the same budget, and calibrates against prior spend."""
    from privatune.common.privacy import PRV, RDP, epsilon_of, pld_epsilon

    q, steps, delta = 1 / 12, 90, 1e-5
    rdp_sigma = calibrate_noise_multiplier(8.0, delta, q, steps, accountant=RDP)
    prv_sigma = calibrate_noise_multiplier(8.0, delta, q, steps, accountant=PRV)
    assert prv_sigma < 0.97 * rdp_sigma
    spent = epsilon_of([MechanismStep(prv_sigma, q, steps)], delta, PRV)
    assert 7.9 < spent <= 8.0
    assert abs(pld_epsilon([MechanismStep(prv_sigma, q, steps)], delta) - spent) <= 0.01 * spent
    prior = [MechanismStep(prv_sigma, q, 30)]
    again = calibrate_noise_multiplier(8.0, delta, q, steps, prior, accountant=PRV)
    assert again > prv_sigma
    assert epsilon_of([*prior, MechanismStep(again, q, steps)], delta, PRV) <= 8.0


def test_remembered_rdp_orders_give_exactly_the_same_epsilon_and_noise(monkeypatch):
    """The cache of one step's RDP (common/privacy.py) changes no figure: PRV, RDP and a
    calibration agree to the last bit with Opacus' own uncached computation, and the cache is
    what the accountants call."""
    from opacus.accountants.analysis import rdp as opacus_rdp

    from privatune.common import privacy

    history = [MechanismStep(1.1, 0.05, 30), MechanismStep(0.8, 0.02, 60)]

    def figures():
        return (privacy._prv_epsilon.__wrapped__(tuple(privacy.merged(history)), 1e-5),
                privacy.rdp_epsilon(history, 1e-5),
                calibrate_noise_multiplier(3.0, 1e-5, 0.03, 90, accountant=privacy.RDP))

    cached = opacus_rdp._compute_rdp
    assert hasattr(cached, "cache_info")
    cached.cache_clear()
    remembered = figures()
    assert cached.cache_info().hits > 0
    monkeypatch.setattr(opacus_rdp, "_compute_rdp", cached.__wrapped__)
    assert figures() == remembered
