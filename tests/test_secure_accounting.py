"""Secure DP-SGD's accounting (issue 27): the mixed composition of Gaussian and Skellam steps,
the ledger's secure releases and both guarantees, the site policy's secure_aggregation section,
and the audit's recomputation of both guarantees."""

import dataclasses
import json
import math

import pytest

from privatune.common.distributed_noise import choose_parameters, site_guarantees
from privatune.common.distributed_noise_accounting import (SUBSAMPLING_GENERAL,
                                                           SUBSAMPLING_MIRRORED, skellam_epsilon)
from privatune.common.ledger import LedgerError, SiteLedger, read_entries
from privatune.common.ledger_records import (ADAPTER_UPDATE, NON_PRIVATE, SECURE_UPDATE,
                                             SecureRelease, record_of)
from privatune.common.privacy import (PRV, RDP, MechanismStep, SecureStep,
                                      calibrate_noise_multiplier, epsilon_of,
                                      independent_rdp_epsilon, merged, pld_epsilon, prv_epsilon,
                                      rdp_epsilon)

DELTA = 1e-5
PARAMS = choose_parameters(1000, min_contributions=3, max_sites=5, clip=1.0,
                           max_records_per_site=100, noise_multiplier=1.2)
Q, STEPS = 0.01, 200
# The audit's Skellam accounting (common.audit_skellam) is independent of the node's and optimises
# the rounding's failure probability continuously: its epsilon is at or below the node's, within
# this (measured at most 9.2e-5 below, tests/test_audit_skellam.py).
SKELLAM_AGREEMENT = 3e-4


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


@pytest.mark.parametrize("gaussian_only", [prv_epsilon, rdp_epsilon, pld_epsilon,
                                           independent_rdp_epsilon])
def test_the_gaussian_accountants_refuse_a_secure_step(gaussian_only):
    with pytest.raises(ValueError, match="composes Gaussian steps only"):
        gaussian_only([MechanismStep(1.0, 0.05, 10), secure()], DELTA)


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
                  fallback_epsilon=0.5, delta=DELTA, contribution_sha256="ab" * 32,
                  subsampling=SUBSAMPLING_MIRRORED)
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
    ("delta", 1.0), ("epsilon", float("nan")), ("run_id", None), ("round", "1"),
    ("privacy_unit", None), ("max_grad_norm", 0), ("accountant", 3),
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


# ------------------------------------------------------------------ the audit

def write_secure_site(run_dir, name, trusted, cap=8.0, misreport=None):
    """A Gaussian release (PRV), four secure steps in two rounds, a Gaussian release after
    them, each with the figures the node records (``SiteLedger.epsilon``)."""
    site = run_dir / "sites" / name
    site.mkdir(parents=True)
    (site / "policy.yaml").write_text(f"privacy:\n  epsilon_cap: {cap}\n")
    ledger = SiteLedger(site / "ledger.jsonl")

    def gaussian(round_):
        step = MechanismStep(1.1, 0.05, 20)
        ledger.append(ADAPTER_UPDATE, {
            "run_id": "r", "round": round_, "privacy_unit": "record", "noise_multiplier": 1.1,
            "sample_rate": 0.05, "steps": 20, "max_grad_norm": 1.0, "accountant": PRV,
            "epsilon": ledger.epsilon(DELTA, PRV, then=[step]), "delta": DELTA,
            "update_sha256": f"{round_:064x}"})

    gaussian(1)
    for round_ in (2, 3):
        for index in (0, 1):
            release = secure_release(index, trusted, round=round_, steps=50)
            figures = {g: ledger.epsilon(DELTA, PRV, then=[release.mechanism(g)], guarantee=g)
                       for g in ("enforced", "aggregate", "fallback")}
            if misreport and (round_, index) == (3, 1):
                figures[misreport] *= 1.05
            ledger.append_record(dataclasses.replace(
                release, epsilon=figures["enforced"], aggregate_epsilon=figures["aggregate"],
                fallback_epsilon=figures["fallback"],
                contribution_sha256=f"{round_ * 10 + index:064x}"))
    gaussian(4)
    return ledger


def test_the_audit_recomputes_both_guarantees_of_a_secure_site(tmp_path):
    from privatune.common.audit import audit_path

    ledger = write_secure_site(tmp_path, "s", trusted=False)
    (audit,) = audit_path(tmp_path)
    assert audit.ok, audit.problems
    assert [r.seq for r in audit.rounds] == [1, 6] and [r.seq for r in audit.secure_rounds] == [
        2, 3, 4, 5]
    # before the first secure release the row is audited as ever (PRV against PLD)
    assert audit.rounds[0].pld_epsilon is not None
    assert audit.rounds[1].pld_epsilon is None  # then all of it is RDP
    assert audit.pld_epsilon is None and audit.accountant == RDP
    # the headline is the enforced guarantee, here (b); (a) and (b) stand beside it
    assert audit.recorded_epsilon == ledger.epsilon(DELTA)
    assert audit.recomputed_epsilon == pytest.approx(ledger.epsilon(DELTA), rel=0.01)
    assert audit.fallback_epsilon == pytest.approx(ledger.epsilon(DELTA, guarantee="fallback"),
                                                   rel=0.01)
    assert audit.aggregate_epsilon == pytest.approx(ledger.epsilon(DELTA, guarantee="aggregate"),
                                                    rel=0.01)
    assert audit.aggregate_limit_epsilon <= audit.aggregate_epsilon < audit.fallback_epsilon
    assert audit.recomputed_epsilon == audit.fallback_epsilon
    for row in audit.secure_rounds:
        assert row.aggregate_limit_epsilon <= row.aggregate_epsilon <= row.fallback_epsilon


def test_secure_figures_alone_match_site_guarantees(tmp_path):
    """A ledger of secure steps only: the audit's (a) and (b) are site_guarantees' figures for
    the same parameters, to SKELLAM_AGREEMENT (its own Skellam curve, dp-accounting's
    conversion), never above them."""
    from privatune.common.audit import audit_ledger

    ledger = SiteLedger(tmp_path / "ledger.jsonl")
    expected = site_guarantees(PARAMS, sample_rate=Q, steps=STEPS, delta=DELTA)
    ledger.append_record(secure_release(steps=STEPS, epsilon=expected.fallback_epsilon,
                                        aggregate_epsilon=expected.aggregate_epsilon,
                                        fallback_epsilon=expected.fallback_epsilon))
    audit = audit_ledger(ledger.path, "s", 8.0)
    assert audit.ok, audit.problems
    for figure in ("aggregate_epsilon", "fallback_epsilon"):
        recomputed, node = getattr(audit, figure), getattr(expected, figure)
        assert recomputed == pytest.approx(node, rel=SKELLAM_AGREEMENT)
        assert recomputed <= node * (1 + 1e-9)
    from privatune.common.audit_report import render_markdown

    text = render_markdown([audit])
    assert "| # | run | round | unit |" not in text  # no empty table of adapter releases
    assert "| 1 | run | 1 | 0 | record | 1.2000 | 0.0100 | 200 | 1.0 | 3 | 5 | (b) fallback |" in (
        text)


def test_an_older_secure_release_is_audited_with_the_bound_it_was_written_with(tmp_path):
    """Secure entries written before the subsampling bound was recorded were accounted with
    Zhu and Wang's general bound: they read as that, the audit recomputes them with it (no
    false alarm), and a later release's figures compose on top; an unknown name is refused."""
    from privatune.common.audit import audit_ledger

    ledger = SiteLedger(tmp_path / "ledger.jsonl")
    older = {"bound": SUBSAMPLING_GENERAL}
    figures = {name: skellam_epsilon(sigma, PARAMS.scaled_clip, PARAMS.padded_dimension, Q,
                                     STEPS, DELTA, bound=SUBSAMPLING_GENERAL)
               for name, sigma in (("aggregate_epsilon", PARAMS.noise_multiplier),
                                   ("fallback_epsilon",
                                    PARAMS.noise_multiplier / math.sqrt(3)))}
    # written as before the field existed: a None field is left out of the entry
    ledger.append_record(secure_release(steps=STEPS, epsilon=figures["fallback_epsilon"],
                                        subsampling=None, **figures))
    (entry,) = read_entries(ledger.path)[0]
    assert "subsampling" not in entry
    (read,) = ledger.secure_releases()
    assert read.subsampling is None and read.secure_step.subsampling == older["bound"]
    audit = audit_ledger(ledger.path, "s", 8.0)
    assert audit.ok, audit.problems
    assert audit.fallback_epsilon == pytest.approx(figures["fallback_epsilon"],
                                                   rel=SKELLAM_AGREEMENT)
    # the same release under the binomial expansion costs less
    assert audit.fallback_epsilon > skellam_epsilon(
        PARAMS.noise_multiplier / math.sqrt(3), PARAMS.scaled_clip, PARAMS.padded_dimension, Q,
        STEPS, DELTA)
    assert SecureRelease.problem({**entry, "subsampling": "tightest"}) is not None


def test_the_cap_holds_the_enforced_guarantee(tmp_path):
    from privatune.common.audit import audit_path

    trusting = write_secure_site(tmp_path / "t", "s", trusted=True)
    cautious = write_secure_site(tmp_path / "c", "s", trusted=False)
    cap = (trusting.epsilon(DELTA) + cautious.epsilon(DELTA)) / 2  # between (a) and (b)
    for run, ok in ((tmp_path / "t", True), (tmp_path / "c", False)):
        (run / "sites" / "s" / "policy.yaml").write_text(f"privacy:\n  epsilon_cap: {cap}\n")
        (audit,) = audit_path(run)
        assert audit.ok is ok, audit.problems
    assert any("over the budget" in p for p in audit.problems)


@pytest.mark.parametrize("figure", ["enforced", "aggregate", "fallback"])
def test_the_audit_flags_a_misreported_guarantee(tmp_path, figure):
    from privatune.common.audit import audit_path

    write_secure_site(tmp_path, "s", trusted=True, misreport=figure)
    (audit,) = audit_path(tmp_path)
    name = {"enforced": "epsilon", "aggregate": "aggregate_epsilon (a)",
            "fallback": "fallback_epsilon (b)"}[figure]
    assert [p for p in audit.problems if p.startswith("line 5: recorded ")] == [
        next(p for p in audit.problems if p.startswith(f"line 5: recorded {name} "))]


def test_a_skellam_curve_below_its_gaussian_limit_is_a_problem(tmp_path, monkeypatch):
    from privatune.common import audit as audit_module

    write_secure_site(tmp_path, "s", trusted=True)
    from privatune.common.audit_skellam import secure_step_rdp

    monkeypatch.setattr(audit_module, "secure_step_rdp",
                        lambda *args: 0.5 * secure_step_rdp(*args))
    (audit,) = audit_module.audit_path(tmp_path)
    assert any("below dp-accounting's RDP of the Gaussian" in p for p in audit.problems)


def test_a_received_contribution_the_ledger_lists_is_no_hidden_release(tmp_path):
    from privatune.common.audit import record_problems

    ledger = write_secure_site(tmp_path, "s", trusted=False)

    class Received:
        def __init__(self, round_, sha256):
            self.round, self.sha256 = round_, sha256

    class Record:
        heads = ()
        epsilon = 0.0
        received = [Received(2, f"{20:064x}"), Received(3, "f" * 64)]

    problems = record_problems(ledger.entries, Record(), ledger.epsilon(DELTA))
    assert len(problems) == 1 and "round 3 (sha256 ffffffffffffffff...)" in problems[0]


def test_the_report_of_sites_without_secure_releases_is_what_it_was(tmp_path):
    """Byte for byte the report the audit wrote before secure releases existed (recorded from
    it), and a site without secure releases reads the same beside one with them."""
    from privatune.common.audit import audit_path
    from privatune.common.audit_report import render_markdown
    from tests.test_plan_audit import write_mixed_site, write_site

    write_site(tmp_path, "a")
    write_site(tmp_path, "b", noise=1.2, budget=2.0)
    write_mixed_site(tmp_path, "c")
    audits = audit_path(tmp_path)
    text = render_markdown(audits, "audit.png").replace(str(tmp_path), "<run>")
    assert text == REPORT_BEFORE_SECURE
    write_secure_site(tmp_path, "d", trusted=True)
    together = render_markdown(audit_path(tmp_path), "audit.png").replace(str(tmp_path), "<run>")
    section_c = REPORT_BEFORE_SECURE[REPORT_BEFORE_SECURE.index("## c"):]
    assert section_c in together
    assert "| a | ok | 3 | 0.00001000 | 8.00 | 4.2640 | opacus-rdp | 4.2642 | 4.2642 | ok |" in (
        together)
    assert "| d | 4 | 3 | (a) aggregate |" in together and "| d | ok | 6 | " in together
    assert "Secure releases (cumulative epsilon after each" in together


# the audit report of sites a, b, c above, as audit.py wrote it before secure releases existed
REPORT_BEFORE_SECURE = """\
# Privacy audit: FAIL

The headline is the epsilon each node recorded by its own accountant. It is recomputed from the site's recorded mechanism history by an implementation independent of the node's Opacus (Google's `dp-accounting`), like with like: its RDP for an RDP entry, its PLD (privacy loss distributions, as tight as PRV) for a PRV entry, with disagreements over 1% flagged. The looser RDP bound of the same history stands beside it. PLD is given for every release of a ledger of at most 64 releases, else for the last one (the cumulative figure).

- Opacus PRV accountant: an upper bound on epsilon within 0.01 of the exact value, at delta plus delta/1000.
- Opacus RDP accountant: an analytic upper bound (looser than PRV).

| site | chain | releases | delta | budget | recorded eps | accountant | recomputed eps | RDP eps | verdict |
|---|---|---|---|---|---|---|---|---|---|
| a | ok | 3 | 0.00001000 | 8.00 | 4.2640 | opacus-rdp | 4.2642 | 4.2642 | ok |
| b | ok | 3 | 0.00001000 | 2.00 | 2.2916 | opacus-rdp | 2.2916 | 2.2916 | PROBLEM |
| c | ok | 4 | 0.00001000 | 8.00 | 2.6357 | opacus-prv | 2.6255 | 3.0410 | ok |

![epsilon per release](audit.png)

## a

Ledger: `<run>/sites/a/ledger.jsonl`


| # | run | round | unit | noise | sampling rate | steps | clip | recorded eps | accountant | recomputed eps | RDP eps | PLD eps |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
| 1 | r | 1 | record | 0.9000 | 0.0500 | 20 | 1.0 | 3.1606 | opacus-rdp | 3.1608 | 3.1608 | 2.5498 |
| 3 | r | 2 | record | 0.9000 | 0.0500 | 20 | 1.0 | 3.7717 | opacus-rdp | 3.7720 | 3.7720 | 3.1384 |
| 5 | r | 3 | record | 0.9000 | 0.0500 | 20 | 1.0 | 4.2640 | opacus-rdp | 4.2642 | 4.2642 | 3.6107 |

Non-private releases (not covered by DP-SGD):

- #2 round 1: train_metrics {'num_examples': 320}
- #4 round 2: train_metrics {'num_examples': 320}
- #6 round 3: train_metrics {'num_examples': 320}

## b

Ledger: `<run>/sites/b/ledger.jsonl`

- **problem**: epsilon 2.2916 (recomputed 2.2916) is over the budget 2

| # | run | round | unit | noise | sampling rate | steps | clip | recorded eps | accountant | recomputed eps | RDP eps | PLD eps |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
| 1 | r | 1 | record | 1.2000 | 0.0500 | 20 | 1.0 | 1.6460 | opacus-rdp | 1.6460 | 1.6460 | 1.3088 |
| 3 | r | 2 | record | 1.2000 | 0.0500 | 20 | 1.0 | 1.9977 | opacus-rdp | 1.9977 | 1.9977 | 1.6721 |
| 5 | r | 3 | record | 1.2000 | 0.0500 | 20 | 1.0 | 2.2916 | opacus-rdp | 2.2916 | 2.2916 | 1.9640 |

Non-private releases (not covered by DP-SGD):

- #2 round 1: train_metrics {'num_examples': 320}
- #4 round 2: train_metrics {'num_examples': 320}
- #6 round 3: train_metrics {'num_examples': 320}

## c

Ledger: `<run>/sites/c/ledger.jsonl`


| # | run | round | unit | noise | sampling rate | steps | clip | recorded eps | accountant | recomputed eps | RDP eps | PLD eps |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
| 1 | r | 1 | record | 1.1000 | 0.0500 | 20 | 1.0 | 1.9982 | opacus-rdp | 1.9982 | 1.9982 | 1.5901 |
| 2 | r | 2 | record | 1.1000 | 0.0500 | 20 | 1.0 | 2.4059 | opacus-rdp | 2.4059 | 2.4059 | 2.0034 |
| 3 | r | 3 | record | 1.1000 | 0.0500 | 20 | 1.0 | 2.3461 | opacus-prv | 2.3359 | 2.7426 | 2.3359 |
| 4 | r | 4 | record | 1.1000 | 0.0500 | 20 | 1.0 | 2.6357 | opacus-prv | 2.6255 | 3.0410 | 2.6255 |

Non-private releases (not covered by DP-SGD):

- none
"""


def test_the_audit_draws_both_guarantees_of_a_secure_site(tmp_path):
    from privatune.common.audit import audit_path
    from privatune.common.audit_report import write_audit
    from tests.test_plan_audit import write_site

    write_site(tmp_path, "a")
    write_secure_site(tmp_path, "s", trusted=False)
    report = write_audit(audit_path(tmp_path), tmp_path / "audit")
    assert "Privacy audit: PASS" in report.read_text()
    assert (tmp_path / "audit" / "audit.png").stat().st_size > 0
