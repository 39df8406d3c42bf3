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


def test_uniform_history_is_one_triple_to_both_accountants():
    """N identical rounds compose as one (noise, rate, N x steps) triple, which each accountant
    composes in one go: PRV gives the same figure to the last bit (its discretisation depends
    only on the order of distinct mechanisms, and a uniform history has one), RDP the same
    within the rounding of N products summed against one."""
    from privatune.common import privacy
    from privatune.common.privacy import PRV, RDP, epsilon_of

    round_step, whole = MechanismStep(3.0, 1 / 12, 3), MechanismStep(3.0, 1 / 12, 600)
    assert privacy._accountant([round_step] * 200).history == [(3.0, 1 / 12, 600)]
    assert epsilon_of([round_step] * 200, 1e-5, PRV) == epsilon_of([whole], 1e-5, PRV)
    assert epsilon_of([round_step] * 200, 1e-5, RDP) == pytest.approx(
        epsilon_of([whole], 1e-5, RDP), rel=1e-12)
    assert (calibrate_noise_multiplier(8.0, 1e-5, 1 / 12, 30, [round_step] * 200)
            == calibrate_noise_multiplier(8.0, 1e-5, 1 / 12, 30, [whole]))


def test_prv_calibration_of_ten_thousand_rounds_costs_two_fine_grids(monkeypatch):
    """10,000 rounds of 3 steps: the PRV search evaluates its fine grid only near the target
    (where a search from sigma 1 composed epsilon 234 on a 5.5 GB grid for a minute) and
    still returns the smallest noise within the budget, within 0.1%."""
    import time

    from privatune.common import privacy

    fine: list[float] = []
    evaluate = privacy._prv_epsilon

    def counted(steps, delta, eps_error=privacy.PRV_EPS_ERROR):
        value = evaluate(steps, delta, eps_error)
        if eps_error == privacy.PRV_EPS_ERROR:
            fine.append(value)
        return value

    monkeypatch.setattr(privacy, "_prv_epsilon", counted)
    q, delta = 1 / 12, 1e-5
    started = time.monotonic()
    sigma = privacy.run_noise_multiplier(8.0, 8.0, delta, q, 10_000 * 3, accountant=privacy.PRV)
    seconds = time.monotonic() - started
    assert len(fine) <= 3 and max(fine) < 8.1, fine
    # about 1.5 s on 2 idle cores (53 s before), the bound leaves room for a loaded machine
    assert seconds < 20, seconds
    assert privacy.prv_epsilon([MechanismStep(sigma, q, 30_000)], delta) <= 8.0
    assert privacy.prv_epsilon([MechanismStep(sigma / 1.001, q, 30_000)], delta) > 8.0
