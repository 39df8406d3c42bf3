"""Empirical privacy audit: exposure, AUC, canary planting, and a tiny end-to-end run."""

from __future__ import annotations

import argparse
import json
import math
import random

import pytest
import torch

from privatune.client.data import Record, load_records, split_records
from privatune.common.audit import audit_ledger
from privatune.common.config import load_job_config
from privatune.common.lora import initial_adapter, lora_state
from privatune.simulations.audit_federation import train_federation
from privatune.simulations.audit_sites import AuditSite, prepare_sites
from privatune.simulations.canaries import (
    MRN_SPACE_SIZE,
    Canary,
    canary_text,
    exposure_from_scores,
    fit_skew_normal,
    format_mrn,
    make_canaries,
    measure_exposures,
    mrn_check_digit,
    plant_canaries,
    sample_candidates,
)
from privatune.simulations.empirical_audit import run_empirical_audit
from privatune.simulations import empirical_audit_cli
from privatune.simulations.empirical_audit_cli import add_empirical_audit_command
from privatune.simulations.membership import (
    MembershipLosses,
    auc_standard_error,
    membership_attacks,
    min_k_loss,
    roc_auc,
)
from tests.conftest import write_notes

LOG2_SPACE = math.log2(MRN_SPACE_SIZE)


def fake_scorer(canary_scores: dict[str, float], seed: int = 0):
    """Candidates get log-perplexities around 60 bits; listed canaries get the given score."""
    rng = random.Random(seed)

    def score(texts):
        return [canary_scores.get(text, rng.gauss(60.0, 4.0)) for text in texts]

    return score


def test_mrn_format_has_a_valid_luhn_check_digit():
    assert format_mrn(0) == "0000000-0"
    assert format_mrn(4829301) == f"4829301-{mrn_check_digit(4829301)}"
    for number in (7992739, 1234567, 9999999):
        digits = [int(d) for d in f"{number:07d}{mrn_check_digit(number)}"]
        total = sum(d if i % 2 == 0 else (2 * d - 9 if 2 * d > 9 else 2 * d)
                    for i, d in enumerate(reversed(digits)))
        assert total % 10 == 0
    with pytest.raises(ValueError, match="outside"):
        format_mrn(MRN_SPACE_SIZE)


def test_exposure_is_maximal_for_the_first_ranked_canary_and_small_for_a_random_one():
    first, random_one, last = Canary(format_mrn(1), 16), Canary(format_mrn(2), 1), Canary(format_mrn(3), 4)
    candidates = sample_candidates(2000, [first.secret, random_one.secret, last.secret], seed=1)
    scorer = fake_scorer({first.text: 5.0, random_one.text: 60.0, last.text: 200.0})
    by_secret = {e.secret: e for e in measure_exposures(scorer, [first, random_one, last], candidates)}

    top = by_secret[first.secret]
    assert top.sampled_rank == 1
    assert top.exposure_sampled == pytest.approx(math.log2(2001))
    assert top.exposure == pytest.approx(LOG2_SPACE)  # far beyond every candidate: rank 1 of |R|
    middle = by_secret[random_one.secret]
    assert 0.3 < middle.exposure_sampled < 2.0  # about the median: about 1 bit
    assert 0.3 < middle.exposure < 2.0
    bottom = by_secret[last.secret]
    assert bottom.exposure_sampled == pytest.approx(0.0, abs=1e-3)
    assert bottom.exposure == pytest.approx(0.0, abs=1e-3)


def test_random_canaries_average_about_the_unseen_secret_expectation():
    rng = random.Random(5)
    candidate_scores = [rng.gauss(60.0, 4.0) for _ in range(3000)]
    fit = fit_skew_normal(candidate_scores)
    results = [exposure_from_scores(rng.gauss(60.0, 4.0), candidate_scores, MRN_SPACE_SIZE, fit)
               for _ in range(300)]
    for index in (0, 1):  # extrapolated and sampled exposure alike
        mean = sum(r[index] for r in results) / len(results)
        assert mean == pytest.approx(1 / math.log(2), abs=0.3)


def test_auc_is_one_half_and_zero_on_constructed_scores():
    assert roc_auc([3.0, 4.0, 5.0], [0.0, 1.0, 2.0]) == 1.0
    assert roc_auc([0.0, 1.0, 2.0], [3.0, 4.0, 5.0]) == 0.0
    assert roc_auc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5  # all ties
    assert roc_auc([0.0, 3.0], [1.0, 2.0]) == 0.5
    # member > non-member pairs count 1, ties half: (1 + 0) + (1 + 0.5) + (1 + 1) of 6 pairs
    assert roc_auc([1.0, 2.0, 3.0], [0.5, 2.0]) == pytest.approx(4.5 / 6)
    with pytest.raises(ValueError, match="at least one"):
        roc_auc([], [1.0])


def test_auc_standard_error_follows_hanley_mcneil_on_hand_computed_cases():
    # SE^2 = (A(1-A) + (m-1)(Q1-A^2) + (n-1)(Q2-A^2)) / (m n), Q1 = A/(2-A), Q2 = 2A^2/(1+A)
    # A = 1/2, m = n = 2: Q1 = Q2 = 1/3, so SE^2 = (1/4 + 1/12 + 1/12) / 4 = 5/48
    assert auc_standard_error(0.5, 2, 2) == pytest.approx(math.sqrt(5 / 48))
    # A = 3/4, m = 3, n = 2: Q1 = 3/5, Q2 = 9/14, so SE^2 = (3/16 + 2*3/80 + 9/112) / 6 = 2/35
    assert auc_standard_error(0.75, 3, 2) == pytest.approx(math.sqrt(2 / 35))
    # more records, smaller error at the same AUC; a perfect attack leaves no variance
    assert auc_standard_error(0.75, 30, 20) < auc_standard_error(0.75, 3, 2)
    assert auc_standard_error(1.0, 5, 7) == 0.0
    with pytest.raises(ValueError, match="at least one member"):
        auc_standard_error(0.5, 0, 3)


def test_min_k_loss_averages_the_hardest_tokens():
    losses = torch.tensor([0.1, 5.0, 0.2, 4.0, 3.0])
    assert min_k_loss(losses, 0.4) == pytest.approx(4.5)
    assert min_k_loss(losses, 0.01) == pytest.approx(5.0)  # at least one token
    assert min_k_loss(losses, 1.0) == pytest.approx(float(losses.mean()))
    with pytest.raises(ValueError, match="no labelled tokens"):
        min_k_loss(torch.tensor([]))


def test_attacks_separate_memorized_details_from_a_shared_template():
    """Members and non-members share an easy template (loss 0.1 per token); only the members'
    own details (the last token) were memorized. The base model found all details equally hard."""
    def record(detail: float) -> torch.Tensor:
        return torch.tensor([0.1] * 9 + [detail])

    base = MembershipLosses([record(6.0)] * 4, [record(6.0)] * 4)
    trained = MembershipLosses([record(d) for d in (1.0, 1.5, 2.0, 2.5)],
                               [record(d) for d in (3.0, 3.5, 4.0, 4.5)])
    attacks = membership_attacks(trained, base)
    assert {k: a["auc"] for k, a in attacks.items()} == {"loss": 1.0, "loss_vs_base": 1.0, "min_k": 1.0}
    assert all(a["standard_error"] == 0.0 for a in attacks.values())  # perfect separation
    alike = MembershipLosses(trained.members, list(reversed(trained.members)))
    # chance with 4 members and 4 non-members: Q1 = Q2 = 1/3, SE^2 = (1/4 + 3/12 + 3/12) / 16
    assert membership_attacks(alike, base)["min_k"] == {
        "auc": 0.5, "standard_error": pytest.approx(math.sqrt(3 / 64))}


def test_canaries_are_planted_the_requested_times_and_only_in_training(tmp_path):
    records = load_records(write_notes(tmp_path / "notes.jsonl", 80, seed=3), "jsonl")
    canaries = make_canaries([1, 4, 16], per_count=2, seed=7)
    assert [c.repetitions for c in canaries] == [1, 1, 4, 4, 16, 16]
    assert len({c.secret for c in canaries}) == 6

    train, heldout = plant_canaries(records, canaries, 0.25, seed=0)
    clean_train, clean_heldout = split_records(records, 0.25, 0)
    assert heldout == clean_heldout
    for canary in canaries:
        assert sum(r.completion == canary.text for r in train) == canary.repetitions
        assert not any(canary.secret in r.prompt + r.completion for r in heldout)
    assert len(train) == len(clean_train) + 2 * (1 + 4 + 16)
    planted = [r for r in train if r.source.startswith("canary:")]
    assert len({r.patient_id for r in planted}) == len(planted)  # each copy is its own unit

    candidates = sample_candidates(500, [c.secret for c in canaries], seed=0)
    assert len(set(candidates)) == 500 and not set(candidates) & {c.secret for c in canaries}


def test_a_record_already_holding_a_canary_secret_is_refused():
    canary = make_canaries([1], 1, seed=2)[0]
    records = [Record("", f"note {i}", f"p{i}", f"x:{i}") for i in range(10)]
    records.append(Record("", canary_text(canary.secret), "p-x", "x:10"))
    with pytest.raises(ValueError, match="already contain canary"):
        plant_canaries(records, [canary], 0.3, seed=0)


JOB = """
seed: 1
model: {max_length: 64}
lora: {r: 2, alpha: 4, target_modules: [q_proj, v_proj]}
training: {local_steps: 3, batch_size: 16, learning_rate: 0.05, max_grad_norm: 1.0, eval_batch_size: 64}
privacy: {epsilon: 8.0, delta: 1.0e-3}
federation: {rounds: 2, min_nodes: 2, min_replies: 2}
data: {hospitals: 2, heldout_fraction: 0.3}
"""


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: extra threads only contend
    yield
    torch.set_num_threads(threads)


def test_the_audit_trains_through_the_nodes_so_ffa_and_patient_windows_run(tmp_path, tiny_model_dir,
                                                                          one_thread):
    """The audit's federation is the real round: the nodes' own DP, ledgers that the ledger
    audit verifies, and the job's aggregation and privacy unit (once refused here)."""
    (tmp_path / "job.yaml").write_text(JOB)
    job = load_job_config(tmp_path / "job.yaml", ["federation.aggregation=ffa", "federation.rounds=1",
                                                  "privacy.unit=patient",
                                                  "privacy.patient_sampling=window"])
    sites = [AuditSite(name, write_notes(tmp_path / f"{name}.jsonl", 60, seed), "jsonl")
             for name, seed in (("north", 31), ("south", 32))]
    canaries = make_canaries([1], 1, job.seed)
    splits = prepare_sites(job, sites, "south", canaries)
    template = initial_adapter(tiny_model_dir, job.lora, job.seed)
    outcome = train_federation(job, tiny_model_dir, sites, splits, private=True,
                               out=tmp_path / "dp", progress=lambda line: None, label="dp")
    start = lora_state(template)
    frozen_a = [k for k in start if "lora_A" in k]
    assert frozen_a and all(torch.equal(outcome.state[k], start[k]) for k in frozen_a)  # ffa
    assert any(not torch.equal(outcome.state[k], start[k]) for k in start if "lora_B" in k)
    plain = train_federation(job, tiny_model_dir, sites, splits, private=False,
                             out=tmp_path / "non_dp", progress=lambda line: None, label="non_dp")
    assert all(torch.equal(plain.state[k], start[k]) for k in frozen_a)  # ffa without DP too
    assert {s["epsilon"] for s in plain.sites.values()} == {"inf"}
    for split in splits:
        ledger = tmp_path / "dp" / "sites" / split.name / "ledger.jsonl"
        audit = audit_ledger(ledger)
        assert audit.ok, (audit.chain_error, audit.problems)
        site = outcome.sites[split.name]
        assert 0 < site["epsilon"] <= 8.0 + 1e-6 and len(audit.rounds) == 1
        assert site["epsilon"] == pytest.approx(audit.recorded_epsilon, rel=1e-9)
        assert site["epsilon"] == pytest.approx(audit.recomputed_epsilon, rel=0.01)
        # one unit per patient (two notes each), each canary copy its own pseudo patient
        assert site["examples"] == len({r.patient_id for r in split.train_records})


def test_tiny_end_to_end_audit_reports_both_runs(tmp_path, tiny_model_dir, one_thread):
    (tmp_path / "job.yaml").write_text(JOB)
    job = load_job_config(tmp_path / "job.yaml")
    sites = [AuditSite(name, write_notes(tmp_path / f"{name}.jsonl", count, seed), "jsonl")
             for name, count, seed in (("north", 60, 21), ("south", 80, 22))]
    lines: list[str] = []
    report = run_empirical_audit(job, tiny_model_dir, sites, tmp_path / "out", repetitions=(1, 4),
                                 canaries_per_count=1, candidates=200, progress=lines.append)

    written = json.loads((tmp_path / "out" / "report.json").read_text())
    # south has more records, so more held-out ones: the default canary site
    assert written["canary_site"] == report["canary_site"] == "south"
    copies = 1 + 4  # one canary per count, planted once and four times
    assert set(written["runs"]) == {"base", "dp", "non_dp"}
    dp, non_dp = written["runs"]["dp"], written["runs"]["non_dp"]
    assert 0 < dp["epsilon"] <= 8.0 + 1e-6 and dp["noise_multiplier"] > 0
    assert non_dp["epsilon"] == "inf" and non_dp["noise_multiplier"] == 0.0
    assert non_dp["sites"]["south"]["steps"] == job.federation.rounds * job.training.local_steps
    for run in written["runs"].values():
        assert set(run["exposure"]) == {"1", "4"}
        assert all(0.0 <= c["exposure"] <= LOG2_SPACE for e in run["exposure"].values()
                   for c in e["canaries"])
        assert run["mia"]["sites"] == ["north", "south"]
        mia = run["mia"]  # every site's training records but the canaries, and its held-out ones
        assert mia["members"] == sum(s["train"] for s in written["sites"].values()) - copies
        assert mia["nonmembers"] == sum(s["heldout"] for s in written["sites"].values())
        assert set(mia["attacks"]) == {"loss", "loss_vs_base", "min_k"}
        for attack in mia["attacks"].values():
            assert attack["standard_error"] == pytest.approx(
                auc_standard_error(attack["auc"], mia["members"], mia["nonmembers"]))
    assert written["runs"]["base"]["epsilon"] == 0.0
    # Against itself the base model's loss drop is 0 for every record: chance by construction.
    assert written["runs"]["base"]["mia"]["attacks"]["loss_vs_base"]["auc"] == 0.5
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "membership inference AUC" in markdown and "∞" in markdown
    best = max(a["auc"] for a in non_dp["mia"]["attacks"].values())
    assert "| best attack's AUC above chance |" in markdown and f"{best - 0.5:+.3f}" in markdown
    assert (tmp_path / "out" / "report.png").stat().st_size > 0
    assert any("[dp] [round 2/2]" in line for line in lines)


def test_command_parses_its_options(tmp_path):
    parser = argparse.ArgumentParser(prog="privatune")
    add_empirical_audit_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["empirical-audit", "--config", "configs/audit.yaml", "--out", str(tmp_path),
                              "--repetitions", "2,8", "--hospitals", "3", "--set", "seed=4"])
    assert args.repetitions == (2, 8) and args.hospitals == 3 and args.set == ["seed=4"]
    assert args.handler is empirical_audit_cli._handler
    with pytest.raises(SystemExit):
        parser.parse_args(["empirical-audit", "--config", "x", "--out", "y", "--repetitions", "4,0"])


def test_audit_preset_loads():
    job = load_job_config("configs/audit.yaml")
    assert job.privacy.epsilon == 8.0
