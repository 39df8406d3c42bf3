"""Secure DP-SGD's accounting (issue 27): the mixed composition of Gaussian and Skellam steps,
the ledger's secure releases and both guarantees, the site policy's secure_aggregation section,
and the audit's recomputation of both guarantees."""

import dataclasses
import json
import math

import pytest

from privatune.common.distributed_noise import choose_parameters, site_guarantees
from privatune.common.ledger import (ADAPTER_UPDATE, NON_PRIVATE, SECURE_UPDATE, LedgerError,
                                     SecureRelease, SiteLedger, read_entries, record_of)
from privatune.common.privacy import (PRV, RDP, MechanismStep, SecureStep,
                                      calibrate_noise_multiplier, epsilon_of, merged,
                                      prv_epsilon, rdp_epsilon)

DELTA = 1e-5
PARAMS = choose_parameters(1000, min_contributions=3, max_sites=5, clip=1.0,
                           max_records_per_site=100, noise_multiplier=1.2)
Q, STEPS = 0.01, 200


def secure(steps: int = STEPS, sigma: float = PARAMS.noise_multiplier) -> SecureStep:
    return SecureStep(sigma, Q, steps, PARAMS.scaled_clip, PARAMS.padded_dimension,
                      PARAMS.min_contributions)


# ------------------------------------------------------------------ privacy: the composition

@pytest.mark.parametrize("history", [
    [MechanismStep(0.8, 0.05, 40)] * 3,
    [MechanismStep(0.6, 0.1, 10), MechanismStep(2.0, 0.01, 500), MechanismStep(0.9, 0.05, 30)],
])
def test_gaussian_histories_give_exactly_the_figures_they_always_did(history):
    assert epsilon_of(history, DELTA, PRV) == prv_epsilon(history, DELTA)
    assert epsilon_of(history, DELTA, RDP) == rdp_epsilon(history, DELTA)
    assert epsilon_of(iter(history), DELTA, RDP) == rdp_epsilon(history, DELTA)


def test_merging_keeps_each_kind_of_step_apart():
    gaussian = MechanismStep(PARAMS.noise_multiplier, Q, 5)
    assert merged([gaussian, secure(2), gaussian, secure(3), secure(1).fallback()]) == [
        MechanismStep(PARAMS.noise_multiplier, Q, 10), secure(5), secure(1).fallback()]


@pytest.mark.parametrize("accountant", [PRV, RDP])
def test_a_secure_history_gives_the_figures_of_site_guarantees(accountant):
    expected = site_guarantees(PARAMS, sample_rate=Q, steps=STEPS, delta=DELTA)
    assert epsilon_of([secure()], DELTA, accountant) == expected.aggregate_epsilon
    assert epsilon_of([secure().fallback()], DELTA, accountant) == expected.fallback_epsilon
    # one step at a time, merged, is the same history
    assert epsilon_of([secure(1)] * STEPS, DELTA, accountant) == expected.aggregate_epsilon


def test_the_fallback_is_one_share_of_the_noise():
    step = secure()
    fallback = step.fallback()
    assert fallback.shares == 1 and fallback.steps == step.steps
    assert fallback.noise_multiplier == pytest.approx(step.noise_multiplier / math.sqrt(3))
    assert fallback.fallback() == fallback
    assert epsilon_of([fallback], DELTA) > epsilon_of([step], DELTA)


def test_a_mixed_history_costs_at_least_each_of_its_parts():
    gaussian = [MechanismStep(1.0, 0.05, 100), MechanismStep(1.5, 0.02, 50)]
    mixed = epsilon_of([*gaussian, secure()], DELTA)
    assert mixed >= epsilon_of(gaussian, DELTA, RDP)
    assert mixed >= epsilon_of(gaussian, DELTA, PRV)
    assert mixed >= epsilon_of([secure()], DELTA)
    # order does not matter, the accountant's name neither
    assert epsilon_of([secure(), *gaussian], DELTA, RDP) == pytest.approx(mixed, rel=1e-12)


def test_epsilon_grows_with_the_steps_and_falls_with_the_noise():
    figures = [epsilon_of([MechanismStep(1.0, 0.05, 10), secure(n)], DELTA) for n in
               (1, 10, 100, 1000)]
    assert figures == sorted(figures) and figures[0] < figures[-1]
    assert epsilon_of([secure(sigma=2.4)], DELTA) < epsilon_of([secure()], DELTA)


def test_calibration_after_secure_releases_keeps_the_mixed_history_within_budget():
    prior = [secure()]
    sigma = calibrate_noise_multiplier(8.0, DELTA, 0.05, 100, prior, PRV)
    assert epsilon_of([*prior, MechanismStep(sigma, 0.05, 100)], DELTA) <= 8.0
    assert epsilon_of([*prior, MechanismStep(sigma * 0.98, 0.05, 100)], DELTA) > 8.0 * 0.98


@pytest.mark.parametrize("field, value", [
    ("shares", 0), ("steps", 0), ("dimension", 1.5), ("noise_multiplier", float("nan")),
    ("scaled_clip", 0.0), ("sample_rate", 1.5), ("shares", True),
])
def test_a_secure_step_that_cannot_be_accounted_is_refused(field, value):
    with pytest.raises(ValueError, match=f"SecureStep.{field}"):
        dataclasses.replace(secure(), **{field: value})


def test_an_unknown_accountant_is_refused_for_a_secure_history_too():
    with pytest.raises(ValueError, match="unknown accountant"):
        epsilon_of([secure()], DELTA, "made-up")


# ------------------------------------------------------------------ ledger: secure releases

def secure_release(step: int = 0, trusted: bool = False, **changes) -> SecureRelease:
    fields = dict(run_id="run", round=1, step=step, privacy_unit="record",
                  noise_multiplier=PARAMS.noise_multiplier, sample_rate=Q, steps=1,
                  max_grad_norm=1.0, scaled_clip=PARAMS.scaled_clip,
                  dimension=PARAMS.padded_dimension, min_contributions=3, max_sites=5,
                  trusted=trusted, accountant=PRV, epsilon=0.5, aggregate_epsilon=0.1,
                  fallback_epsilon=0.5, delta=DELTA, contribution_sha256="ab" * 32)
    return SecureRelease(**{**fields, **changes})


def gaussian_fields(round_: int) -> dict:
    return {"run_id": "old", "round": round_, "noise_multiplier": 0.9, "sample_rate": 0.05,
            "steps": 20, "epsilon": 0.0, "delta": DELTA}


def test_a_secure_release_is_private_and_reads_back_as_written(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = SiteLedger(path)
    release = secure_release()
    numbered = ledger.append_record(release)
    assert numbered.seq == 1
    entry = read_entries(path)[0][0]
    assert entry["kind"] == SECURE_UPDATE and entry["private"] is True
    assert record_of(entry) == release
    assert SiteLedger(path).secure_releases() == [release]
    assert SiteLedger(path).secure_releases("other") == []
    assert SiteLedger(path).releases() == []  # adapter releases stay adapter releases
    assert release.secure_step == SecureStep(PARAMS.noise_multiplier, Q, 1, PARAMS.scaled_clip,
                                             PARAMS.padded_dimension, 3)
    without = dataclasses.replace(release, contribution_sha256=None)
    assert "contribution_sha256" not in without.fields()


def test_the_history_holds_the_guarantee_asked_for(tmp_path):
    ledger = SiteLedger(tmp_path / "ledger.jsonl")
    ledger.append(ADAPTER_UPDATE, gaussian_fields(1))
    ledger.append(NON_PRIVATE, {"run_id": "old", "round": 1, "release": "train_metrics"})
    ledger.append_record(secure_release(0, trusted=False))
    ledger.append_record(secure_release(1, trusted=True))
    gaussian = MechanismStep(0.9, 0.05, 20)
    step = secure(1)
    assert ledger.mechanism_history("aggregate") == [gaussian, step, step]
    assert ledger.mechanism_history("fallback") == [gaussian, step.fallback(), step.fallback()]
    assert ledger.mechanism_history() == [gaussian, step.fallback(), step]  # by each `trusted`
    for guarantee in ("aggregate", "fallback", "enforced"):
        assert ledger.epsilon(DELTA, guarantee=guarantee) == epsilon_of(
            ledger.mechanism_history(guarantee), DELTA)
    assert (ledger.epsilon(DELTA, guarantee="aggregate") < ledger.epsilon(DELTA)
            < ledger.epsilon(DELTA, guarantee="fallback"))
    assert ledger.epsilon(DELTA, then=[step], guarantee="aggregate") == epsilon_of(
        [gaussian, step, step, step], DELTA)
    with pytest.raises(ValueError, match="unknown guarantee"):
        ledger.mechanism_history("both")


def test_a_ledger_without_secure_releases_reads_and_counts_as_before(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = SiteLedger(path)
    for r in (1, 2):
        ledger.append(ADAPTER_UPDATE, gaussian_fields(r))
    assert [e["private"] for e in ledger.entries] == [True, True]
    history = [MechanismStep(0.9, 0.05, 20)] * 2
    for guarantee in ("enforced", "aggregate", "fallback"):
        assert ledger.epsilon(DELTA, guarantee=guarantee) == prv_epsilon(history, DELTA)
    assert ledger.epsilon(DELTA, RDP) == rdp_epsilon(history, DELTA)


@pytest.mark.parametrize("field, value", [
    ("noise_multiplier", float("nan")), ("noise_multiplier", 0), ("sample_rate", 0),
    ("steps", 0), ("scaled_clip", -1.0), ("dimension", 1000), ("dimension", 0),
    ("min_contributions", 0), ("max_sites", 2), ("trusted", "yes"), ("trusted", None),
    ("aggregate_epsilon", float("inf")), ("fallback_epsilon", -1.0), ("step", -1),
    ("delta", 1.0), ("epsilon", float("nan")),
])
def test_a_secure_release_that_cannot_be_accounted_is_refused_on_write_and_read(
        tmp_path, field, value):
    path = tmp_path / "ledger.jsonl"
    ledger = SiteLedger(path)
    ledger.append_record(secure_release())
    before = path.read_bytes()
    fields = {**secure_release().fields(), field: value}
    if value is None:
        del fields[field]
    with pytest.raises(ValueError, match=f"{path}.*{field}"):
        ledger.append(SECURE_UPDATE, fields)
    assert path.read_bytes() == before
    # the same value forged into the file, re-chained, is refused on read
    entry = json.loads(before)
    entry[field] = value
    if value is None:
        del entry[field]
    from privatune.common.ledger import entry_hash
    entry["hash"] = entry_hash(entry)
    forged = json.dumps(entry, sort_keys=True).encode() + b"\n"
    path.write_bytes(forged)
    with pytest.raises(LedgerError, match=f"line 1: .*{field}"):
        SiteLedger(path)


# ------------------------------------------------------------------ the site policy

def site_policy(tmp_path, extra: str = ""):
    path = tmp_path / "policy.yaml"
    path.write_text("site:\n  name: h1\n  data: notes.jsonl\n  model: model\n"
                    "privacy:\n  epsilon_cap: 8.0\n" + extra)
    return path


def test_a_policy_without_the_section_trusts_only_its_own_noise(tmp_path):
    from privatune.client.policy import SecureAggregationSection, load_site_policy

    policy = load_site_policy(site_policy(tmp_path))
    assert policy.secure_aggregation == SecureAggregationSection(trust=False,
                                                                 min_contributions=3)
    assert policy.secure_aggregation.guarantee == "fallback"


def test_a_policy_may_trust_secure_aggregation_from_the_threshold_it_names(tmp_path):
    from privatune.client.policy import load_site_policy

    policy = load_site_policy(site_policy(
        tmp_path, "secure_aggregation:\n  trust: true\n  min_contributions: 4\n"))
    section = policy.secure_aggregation
    assert section.trust and section.min_contributions == 4 and section.guarantee == "aggregate"
    assert section.round_violation(4) == section.round_violation(9) == ""
    assert "t = 3 is below this site's secure_aggregation.min_contributions = 4" in (
        section.round_violation(3))


@pytest.mark.parametrize("extra, message", [
    ("secure_aggregation:\n  trust: maybe\n", "secure_aggregation.trust"),
    ("secure_aggregation:\n  min_contributions: 0\n", "secure_aggregation.min_contributions"),
    ("secure_aggregation:\n  min_contributions: 2.5\n", "secure_aggregation.min_contributions"),
    ("secure_aggregation:\n  threshold: 3\n", "secure_aggregation.threshold"),
    ("secure_aggregation: yes\n", "secure_aggregation"),
])
def test_a_bad_secure_aggregation_section_names_the_file_and_the_key(tmp_path, extra, message):
    from privatune.client.policy import load_site_policy
    from privatune.common.config import ConfigError

    path = site_policy(tmp_path, extra)
    with pytest.raises(ConfigError, match=f"{path}.*{message}"):
        load_site_policy(path)
