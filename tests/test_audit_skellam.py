"""The audit's own Skellam accounting (``common.audit_skellam``) against the node's
(``distributed_noise_accounting.skellam_step_rdp``), its Gaussian limit, and the audit using it.

The two implement the same bound and differ in one free parameter, the rounding's failure
probability b: the node takes the best of b = 10^-x on a grid of x in [1, 300] (a quarter decade
apart), the audit optimises it continuously over (0, 1). Every figure the audit gives is the
bound at some b, so it is valid, and at or below the node's. Measured over 252 mechanisms (D 1024
and 131072, both subsampling bounds, sigma 0.8 to 11, q 0.001 to 1): per order, the audit's curve
is 1e-11 to 3e-3 below the node's at orders under 72 (the grid's loss near the optimum, largest
where the optimum sits at a kink of the bound) and up to 12% below at high orders of small noise
(sigma 0.8, order >= 72: the optimum is b < 1e-300, off the node's grid). Those orders do not
set epsilon there, so epsilons agree far closer: at most 9.2e-5 apart over 1, 10, 90, 1000 and
10000 steps at delta 1e-5 and 1e-8 (D 1024, Zhu-Wang, sigma 0.8, q 0.001, 90 steps, delta 1e-8).
EPSILON_AGREEMENT is 3e-4, three times that and 30 times inside the audit's 1%.
"""

import dataclasses
import math

import numpy as np
import pytest
from dp_accounting.rdp import compute_epsilon

from privatune.common.audit_skellam import (integer_l1, mixture_rdp, secure_step_rdp,
                                            skellam_shift_rdp, worst_l2)
from privatune.common.distributed_noise import scaled_clip_for, site_guarantees
from privatune.common.distributed_noise_accounting import (ORDERS, SUBSAMPLING_GENERAL,
                                                           SUBSAMPLING_MIRRORED,
                                                           skellam_step_rdp)
from privatune.common.ledger import SiteLedger
from tests.test_secure_accounting import (DELTA, PARAMS, Q, SKELLAM_AGREEMENT, STEPS,
                                          secure_release)

EPSILON_AGREEMENT = SKELLAM_AGREEMENT
ROUNDING = 1e-9  # float rounding between two orders of the same sums
DEMO_VALUES = 78848  # the demo's LoRA values: padded to D = 131072

GRID = [(sigma, values, q, bound)
        for sigma in (0.8, 2.0, 11.0)
        for values in (1000, DEMO_VALUES)
        for q in (0.001, 0.06, 0.5, 1.0)
        for bound in (SUBSAMPLING_MIRRORED, SUBSAMPLING_GENERAL)]


def _padded(values: int) -> int:
    return 1 << (values - 1).bit_length()


@pytest.mark.parametrize("sigma, values, q, bound", GRID)
def test_the_audits_curve_is_the_nodes_never_above_it(sigma, values, q, bound):
    scaled_clip, dimension = scaled_clip_for(values), _padded(values)
    audit = secure_step_rdp(sigma, scaled_clip, dimension, q, ORDERS, bound)
    node = skellam_step_rdp(sigma, scaled_clip, dimension, q, ORDERS, bound)
    # above the node's anywhere would mean the node under-counts
    assert np.all(audit <= node * (1 + ROUNDING) + 1e-15), (audit / node - 1).max()
    assert np.all(audit > 0)
    for steps in (1, 90, 10_000):
        mine = compute_epsilon(ORDERS, steps * audit, DELTA)[0]
        theirs = compute_epsilon(ORDERS, steps * node, DELTA)[0]
        assert mine <= theirs * (1 + ROUNDING)
        assert mine == pytest.approx(theirs, rel=EPSILON_AGREEMENT)


@pytest.mark.parametrize("sigma, values", [(0.8, DEMO_VALUES), (3.0, 1000), (11.0, DEMO_VALUES)])
def test_on_the_nodes_grid_of_b_the_bound_is_the_nodes_to_float_rounding(sigma, values):
    """The formulas agree exactly, not just nearly: the bound at the node's b = 10^-x, x in
    [1, 300] (1197 values), is the node's figure at q = 1; the continuous b only goes lower."""
    scaled_clip, dimension = scaled_clip_for(values), _padded(values)
    variance = (sigma * scaled_clip) ** 2
    norm = worst_l2(scaled_clip, dimension)
    log_inv = np.linspace(1.0, 300.0, 1197) * math.log(10)
    on_grid = []
    for order in ORDERS:
        worst = float(skellam_shift_rdp(order, norm, integer_l1(norm, dimension), variance))
        on_grid.append(min(worst, *(mixture_rdp(order, t, variance, scaled_clip, dimension,
                                                worst) for t in log_inv)))
    node = skellam_step_rdp(sigma, scaled_clip, dimension, 1.0, ORDERS)
    np.testing.assert_allclose(on_grid, node, rtol=ROUNDING)
    assert np.all(secure_step_rdp(sigma, scaled_clip, dimension, 1.0, ORDERS,
                                  SUBSAMPLING_MIRRORED) <= node * (1 + ROUNDING))


@pytest.mark.parametrize("sigma", [1.0, 5.0])
def test_large_clip_and_noise_approach_the_gaussian(sigma):
    """With S >> sqrt(D) the rounding and discreteness vanish: the Gaussian's a / (2 sigma^2)
    at q = 1, from above (what remains is O(sqrt(ln(1/b)) / S) of it)."""
    orders = np.array(ORDERS, dtype=float)
    gaussian = orders / (2 * sigma ** 2)
    curve = secure_step_rdp(sigma, 1e7, 1024, 1.0, ORDERS, SUBSAMPLING_MIRRORED)
    assert np.all(curve >= gaussian * (1 - ROUNDING))
    np.testing.assert_allclose(curve, gaussian, rtol=1e-4)
    # a small clip is far from it: the rounding's share of the sensitivity
    assert np.all(secure_step_rdp(sigma, 10.0, 1024, 1.0, ORDERS, SUBSAMPLING_MIRRORED)
                  > 2 * gaussian)


def test_the_general_bound_costs_more_and_sampling_less():
    args = (PARAMS.noise_multiplier, PARAMS.scaled_clip, PARAMS.padded_dimension)
    mirrored = secure_step_rdp(*args, Q, ORDERS, SUBSAMPLING_MIRRORED)
    general = secure_step_rdp(*args, Q, ORDERS, SUBSAMPLING_GENERAL)
    whole = secure_step_rdp(*args, 1.0, ORDERS, SUBSAMPLING_MIRRORED)
    assert np.all(mirrored <= general) and np.any(mirrored < general)
    assert np.all(general <= whole) and np.all(mirrored < whole)


@pytest.mark.parametrize("change, message", [
    (dict(noise_multiplier=0.0), "noise_multiplier"), (dict(scaled_clip=math.inf), "scaled_clip"),
    (dict(dimension=1000), "power of two"), (dict(sample_rate=0.0), "sample_rate"),
    (dict(orders=[1, 2]), "orders"), (dict(subsampling="tightest"), "unknown subsampling"),
])
def test_inputs_it_cannot_account_are_refused(change, message):
    args = dict(noise_multiplier=1.0, scaled_clip=100.0, dimension=1024, sample_rate=0.1,
                orders=ORDERS, subsampling=SUBSAMPLING_MIRRORED)
    with pytest.raises(ValueError, match=message):
        secure_step_rdp(**{**args, **change})


def test_the_audit_flags_secure_figures_recorded_below_the_truth(tmp_path, monkeypatch):
    """A ledger whose secure figures were written 3% below site_guarantees' is flagged on each,
    by the audit's own accounting: it runs with the node's Skellam accounting made to fail."""
    from privatune.common import distributed_noise_accounting, privacy
    from privatune.common.audit import audit_ledger

    truth = site_guarantees(PARAMS, sample_rate=Q, steps=STEPS, delta=DELTA)
    ledger = SiteLedger(tmp_path / "ledger.jsonl")
    release = secure_release(steps=STEPS, epsilon=truth.fallback_epsilon,
                             aggregate_epsilon=truth.aggregate_epsilon,
                             fallback_epsilon=truth.fallback_epsilon)
    ledger.append_record(release)
    under = dataclasses.replace(release, step=1, steps=1, contribution_sha256="cd" * 32)
    for name in ("epsilon", "aggregate_epsilon", "fallback_epsilon"):
        under = dataclasses.replace(under, **{name: 0.97 * getattr(release, name)})
    ledger.append_record(under)

    def not_called(*args, **kwargs):
        raise AssertionError("the audit called the node's Skellam accounting")

    for module in (distributed_noise_accounting, privacy):  # privacy holds its own reference
        monkeypatch.setattr(module, "skellam_step_rdp", not_called)
    audit = audit_ledger(ledger.path, "s", 8.0)
    assert not audit.ok
    assert [p.split(" differs")[0] for p in audit.problems] == [
        f"line 2: recorded {name} {0.97 * getattr(release, field):.4f}"
        for name, field in (("epsilon", "epsilon"), ("aggregate_epsilon (a)", "aggregate_epsilon"),
                            ("fallback_epsilon (b)", "fallback_epsilon"))]
    # the truthful first entry passes, within the agreement measured above
    first = audit.secure_rounds[0]
    assert first.aggregate_epsilon == pytest.approx(truth.aggregate_epsilon, rel=EPSILON_AGREEMENT)
    assert first.fallback_epsilon == pytest.approx(truth.fallback_epsilon, rel=EPSILON_AGREEMENT)
    assert first.fallback_epsilon <= truth.fallback_epsilon * (1 + ROUNDING)
