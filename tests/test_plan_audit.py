"""plan forecasts and the audit of ledgers, from files alone."""

import json

import pytest
from privatune.common.audit import (
    PLD_PER_RELEASE_LIMIT,
    IndependentRdp,
    audit_ledger,
    audit_path,
)
from privatune.common.audit_report import write_audit
from privatune.common.ledger import (
    GENESIS_HASH,
    SiteLedger,
    entry_hash,
)
from privatune.common.ledger_records import (
    ADAPTER_UPDATE,
    NON_PRIVATE,
    ROLLBACK_ACKNOWLEDGED,
)
from privatune.common.plan import plan_site, render_table
from privatune.common.privacy import MechanismStep, independent_rdp_epsilon, rdp_epsilon

from tests.test_ledger import forge


def write_site(run_dir, name, noise=0.9, rounds=3, budget=8.0, fake_epsilon=None):
    site = run_dir / "sites" / name
    site.mkdir(parents=True)
    (site / "policy.yaml").write_text(f"privacy:\n  epsilon_cap: {budget}\n")
    ledger = SiteLedger(site / "ledger.jsonl")
    history = []
    for r in range(1, rounds + 1):
        history.append(MechanismStep(noise, 0.05, 20))
        eps = fake_epsilon if fake_epsilon is not None else rdp_epsilon(history, 1e-5)
        ledger.append(ADAPTER_UPDATE, {"run_id": "r", "round": r, "privacy_unit": "record",
                                       "noise_multiplier": noise, "sample_rate": 0.05, "steps": 20,
                                       "max_grad_norm": 1.0, "accountant": "opacus-rdp",
                                       "epsilon": eps, "delta": 1e-5, "update_sha256": "x"})
        ledger.append(NON_PRIVATE, {"run_id": "r", "round": r, "release": "train_metrics",
                                    "values": {"num_examples": 320}})
    return site / "ledger.jsonl"


def test_audit_passes_on_honest_ledgers(tmp_path):
    write_site(tmp_path, "a")
    write_site(tmp_path, "b", noise=1.2)
    audits = audit_path(tmp_path)
    assert [a.name for a in audits] == ["a", "b"] and all(a.ok for a in audits)
    for a in audits:
        assert a.pld_epsilon <= a.recomputed_epsilon
        assert abs(a.recorded_epsilon - a.recomputed_epsilon) <= 0.01 * a.recomputed_epsilon
        assert len(a.non_private) == 3
    report = write_audit(audits, tmp_path / "audit")
    assert "Privacy audit: PASS" in report.read_text()
    assert (tmp_path / "audit" / "audit.png").stat().st_size > 0
    html = write_audit(audits, tmp_path / "audit", "html")
    assert html.read_text().startswith("<!doctype html>")


def test_the_report_lists_each_kind_of_entry_as_it_always_did(tmp_path):
    """A withheld release, every kind of non-private release and an acknowledged rollback, in
    the report's words: these lines are the ones the audit wrote before its rows and entries
    were typed."""
    ledger = SiteLedger(tmp_path / "ledger.jsonl")
    history = []

    def update(r, **extra):
        history.append(MechanismStep(0.9, 0.05, 20))
        ledger.append(ADAPTER_UPDATE, {
            "run_id": "r", "round": r, "privacy_unit": "record", "noise_multiplier": 0.9,
            "sample_rate": 0.05, "steps": 20, "max_grad_norm": 1.0, "accountant": "opacus-rdp",
            "epsilon": rdp_epsilon(history, 1e-5), "delta": 1e-5, **extra})

    update(1, update_sha256="a" * 64)
    ledger.append(NON_PRIVATE, {"run_id": "r", "round": 1, "release": "train_metrics",
                                "values": {"num_examples": 320, "train_loss": 2.5}})
    ledger.append(NON_PRIVATE, {"run_id": "r", "round": 1, "release": "evaluate_metrics",
                                "values": {}})
    update(2, withheld="the update is not finite")
    ledger.append(NON_PRIVATE, {"run_id": "r", "round": 3, "release": "decline",
                                "request": "evaluate", "reason": "too few records"})
    ledger.append(NON_PRIVATE, {"run_id": "r", "round": 2, "release": "resend",
                                "update_sha256": "a" * 64})
    ledger.append(NON_PRIVATE, {"run_id": "r", "round": 3, "release": "ledger_rollback",
                                "reason": "lost releases", "reported_seq": 9,
                                "reported_hash": "c" * 64, "reported_epsilon": 3.5,
                                "reported_delta": 1e-5, "recovered_releases": []})
    ledger.append(ROLLBACK_ACKNOWLEDGED, {"run_id": "r", "detected_at": 7, "reported_seq": 9,
                                          "reported_hash": "c" * 64, "reported_epsilon": 3.5,
                                          "reported_delta": 1e-5, "recovered_releases": [],
                                          "note": "lost"})
    ledger.append(NON_PRIVATE, {"release": "note"})
    (audit,) = audit_path(ledger.path)
    lines = write_audit([audit], tmp_path / "out").read_text().splitlines()
    assert lines[lines.index("Non-private releases (not covered by DP-SGD):") + 2:] == [
        "- #2 round 1: train_metrics {'num_examples': 320, 'train_loss': 2.5}",
        "- #3 round 1: evaluate_metrics {}",
        "- #5 round 3: decline too few records",
        "- #6 round 2: resend ",
        "- #7 round 3: ledger_rollback lost releases",
        "- #9 round None: note "]
    assert ("- **acknowledged rollback** (#8): the ledger had lost entries up to the head 9 the "
            "site reported; its reported epsilon 3.5000 (delta 1e-05) is a floor under the "
            "figures after it (basic composition)") in lines
    rows = [line for line in lines if line.startswith(("| 1 |", "| 4 |"))]
    assert [row[:row.index(" | 1.0 |")] for row in rows] == [
        "| 1 | r | 1 | record | 0.9000 | 0.0500 | 20",
        "| 4 | r | 2 (withheld, counted) | record | 0.9000 | 0.0500 | 20"]
    assert audit.ok and [r.seq for r in audit.rounds] == [1, 4]
    assert [n.seq for n in audit.non_private] == [2, 3, 5, 6, 7, 9]
    assert audit.recorded_epsilon == pytest.approx(3.5 + rdp_epsilon(history, 1e-5))


def test_audit_without_the_report_extra_writes_the_text_alone(tmp_path, monkeypatch):
    """A hospital's installation has no plotting: the officer still gets the whole verdict."""
    from privatune.common import extras

    monkeypatch.setitem(extras.EXTRA_MODULES, "report", ("privatune_no_such_module",))
    write_site(tmp_path, "a")
    report = write_audit(audit_path(tmp_path), tmp_path / "audit").read_text()
    assert "Privacy audit: PASS" in report and "audit.png" not in report
    assert not (tmp_path / "audit" / "audit.png").exists()


def test_audit_flags_misreported_epsilon_and_over_budget(tmp_path):
    write_site(tmp_path, "liar", fake_epsilon=1.0)
    write_site(tmp_path, "spender", noise=0.5, budget=2.0)
    liar, spender = audit_path(tmp_path)
    assert not liar.ok and "differs from the recomputed" in liar.problems[0]
    assert not spender.ok and any("over the budget" in p for p in spender.problems)


def test_audit_names_first_broken_entry(tmp_path):
    path = write_site(tmp_path, "a")
    lines = path.read_text().splitlines(keepends=True)
    entry = json.loads(lines[4])
    entry["steps"] = 1
    lines[4] = json.dumps(entry, sort_keys=True) + "\n"
    path.write_text("".join(lines))
    (audit,) = audit_path(tmp_path)
    assert "line 5" in audit.chain_error and len(audit.rounds) == 2
    assert "BROKEN" in write_audit([audit], tmp_path / "out").read_text()


def test_plan_solves_noise_for_budget_and_warns_on_delta():
    plan = plan_site("a", records=320, batch_size=16, local_steps=20, rounds=3, delta=1e-5, epsilon=8.0)
    assert plan.epsilon_per_round[-1] <= 8.0 and plan.epsilon_per_round[-1] > 7.8
    assert plan.epsilon_per_round == sorted(plan.epsilon_per_round)
    assert plan.pld_epsilon_final <= plan.epsilon_per_round[-1]
    assert not plan.warnings
    risky = plan_site("b", records=50, batch_size=16, local_steps=20, rounds=3, delta=0.05,
                      noise_multiplier=1.0)
    assert any("not below 1/50" in w for w in risky.warnings)
    assert risky.noise_multiplier == pytest.approx(1.0)


def _fake_run(tmp_path, **site):
    """A run directory: an adapter, site a's ledger and the coordinator's record of the run
    (report.json), whose last train reply from a carried the ledger's head and its update."""
    from privatune.server.report import RunReport
    from privatune.common.protocol import TrainReply
    from privatune.server.rounds import RoundRecord, RoundTraining

    ledger = SiteLedger(write_site(tmp_path, "a", **site))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    last = ledger.releases()[-1]
    reply = TrainReply(site="a", accepted=True, epsilon=last.epsilon, delta=1e-5,
                       epsilon_budget=8.0, accountant="opacus-rdp", ledger_seq=ledger.head.seq,
                       ledger_hash=ledger.head.hash)
    report = RunReport(run_id="r", config={}, base_model="m", rounds=[
        RoundRecord(0), RoundRecord(1, training=RoundTraining(replies={"a": reply},
                                                              update_sha256={"a": "x"}))])
    (tmp_path / "report.json").write_text(json.dumps(report.to_json()))
    return tmp_path


def test_release_gate_exports_a_clean_run_and_records_it(tmp_path):
    from privatune.common.ledger import read_entries
    from privatune.server.export import RELEASES, ModelExport, export_adapter

    run = _fake_run(tmp_path)
    assert export_adapter(run, tmp_path / "release").findings == []
    assert (tmp_path / "release" / "adapter_config.json").is_file()
    entries, _ = read_entries(run / RELEASES)
    assert entries[-1]["kind"] == ModelExport.KIND
    assert not ModelExport.from_entry(entries[-1]).forced


def test_release_gate_refuses_over_budget_run_unless_forced_with_reason(tmp_path):
    from privatune.common.ledger import read_entries
    from privatune.server.export import (
        RELEASES,
        ModelExport,
        ReleaseRefused,
        export_adapter,
    )

    run = _fake_run(tmp_path, noise=0.5, budget=2.0)
    with pytest.raises(ReleaseRefused, match="over the budget"):
        export_adapter(run, tmp_path / "release")
    assert not (tmp_path / "release").exists()
    findings = export_adapter(run, tmp_path / "release",
                              force_reason="ethics board approved 2026-11").findings
    assert findings
    export = ModelExport.from_entry(read_entries(run / RELEASES)[0][-1])
    assert export.forced and export.reason == "ethics board approved 2026-11"


def test_cli_reports_config_errors_with_file_and_key(tmp_path, capsys):
    from privatune.common.cli import main

    bad = tmp_path / "job.yaml"
    bad.write_text("lora:\n  rank: 4\n")
    assert main(["plan", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "line 2: lora.rank: unknown key" in err


def test_audit_counts_a_complete_last_line_without_newline(tmp_path):
    path = write_site(tmp_path, "a")
    path.write_bytes(path.read_bytes()[:-1])
    (audit,) = audit_path(tmp_path)
    assert audit.ok and len(audit.rounds) == 3 and len(audit.non_private) == 3


def test_audit_flags_a_torn_tail_and_a_set_aside_line(tmp_path):
    path = write_site(tmp_path, "a")
    with open(path, "ab") as handle:
        handle.write(b'{"seq": 7, "kind": "adapter_upd')
    (audit,) = audit_path(tmp_path)
    assert not audit.ok and any("last line" in p for p in audit.problems)
    aside = SiteLedger(path).set_aside.side_file
    (audit,) = audit_path(tmp_path)
    assert not audit.ok and any(str(aside) in p for p in audit.problems)
    assert "PROBLEM" in write_audit([audit], tmp_path / "out").read_text()


def test_audit_flags_a_final_line_that_does_not_chain(tmp_path):
    path = write_site(tmp_path, "a")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines) + lines[-2].rstrip("\n"))  # a replayed entry, no newline
    (audit,) = audit_path(path)
    assert not audit.ok and any("last line" in p for p in audit.problems)
    assert len(audit.rounds) == 3


MISSING = object()


@pytest.mark.parametrize("field, value", [
    ("epsilon", float("nan")), ("epsilon", float("inf")), ("epsilon", -1.0), ("epsilon", "1.0"),
    ("noise_multiplier", float("nan")), ("noise_multiplier", float("inf")), ("noise_multiplier", 0),
    ("sample_rate", float("nan")), ("sample_rate", 0), ("sample_rate", 1.5),
    ("steps", 0), ("steps", -3), ("steps", 2.5), ("steps", True),
    ("delta", float("nan")), ("delta", 0), ("delta", 1),
    ("epsilon", MISSING), ("noise_multiplier", MISSING), ("sample_rate", MISSING),
    ("steps", MISSING), ("delta", MISSING),
])
def test_audit_fails_a_forged_mechanism_naming_its_line(tmp_path, field, value):
    path = write_site(tmp_path, "a")

    def change(entries):
        if value is MISSING:
            del entries[2][field]
        else:
            entries[2][field] = value

    forge(path, change)
    (audit,) = audit_path(tmp_path)
    assert audit.chain_error is None and not audit.ok
    assert any(p.startswith("line 3: ") and (f"{field} is " in p or f"has no {field}" in p)
               for p in audit.problems)
    assert "FAIL" in write_audit([audit], tmp_path / "out").read_text()


@pytest.mark.parametrize("cap", ["nan", ".nan", ".inf", "0", "-3", "abc"])
def test_audit_fails_a_cap_that_is_not_a_finite_positive_number(tmp_path, cap):
    path = write_site(tmp_path, "a", noise=0.4, budget=cap)  # epsilon about 30
    for audits in (audit_path(tmp_path), audit_path(path)):
        (audit,) = audits
        assert not audit.ok and any("epsilon_cap" in p for p in audit.problems)
    assert "FAIL" in write_audit(audits, tmp_path / "out").read_text()


# --- long ledgers: the audit is linear in the ledger's length ----------------------------------

MECHANISMS = [(0.8, 0.002), (1.0, 0.002), (1.3, 0.004)]  # (noise multiplier, sampling rate)


def chained_ledger(path, releases, rounds_per_run=40, steps=5, delta=1e-5, lie_at=None):
    """A ledger of ``releases`` adapter updates (runs of ``rounds_per_run`` rounds cycling through
    MECHANISMS, a non-private release every 10th round), written as chained lines the way
    ``SiteLedger.append`` writes them, minus an fsync per line. Each epsilon is what the node's
    own accountant (Opacus' RDP analysis) records; the release at index ``lie_at`` records 2%
    less. Returns the seq of every adapter update."""
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    per_step = {m: np.array(compute_rdp(q=m[1], noise_multiplier=m[0], steps=1, orders=orders))
                for m in MECHANISMS}
    rdp = np.zeros(len(orders))
    previous, seqs, lines = GENESIS_HASH, [], []

    def write(kind, release, fields):
        nonlocal previous
        entry = {"seq": len(lines) + 1, "kind": kind, "private": kind == ADAPTER_UPDATE,
                 "time": "2026-01-01T00:00:00Z", "run_id": f"run-{release // rounds_per_run}",
                 "round": release % rounds_per_run + 1, **fields, "prev_hash": previous}
        entry["hash"] = previous = entry_hash(entry)
        lines.append(json.dumps(entry, sort_keys=True) + "\n")

    for release in range(releases):
        sigma, q = MECHANISMS[release // rounds_per_run % len(MECHANISMS)]
        rdp += steps * per_step[(sigma, q)]
        epsilon = float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])
        write(ADAPTER_UPDATE, release, {
            "noise_multiplier": sigma, "sample_rate": q, "steps": steps, "delta": delta,
            "epsilon": epsilon * (0.98 if release == lie_at else 1.0), "max_grad_norm": 1.0,
            "accountant": "opacus-rdp", "privacy_unit": "record", "update_sha256": "x"})
        seqs.append(len(lines))
        if release % 10 == 9:
            write(NON_PRIVATE, release, {"release": "train_metrics", "values": {"num_examples": 500}})
    path.write_text("".join(lines))
    return seqs


def test_audit_of_a_long_ledger_checks_every_release(tmp_path):
    """10,000 adapter updates: every release recomputed and checked, the one misreported epsilon
    found by its line (about 1 s here; the quadratic audit took 39 s for 50 releases)."""
    path = tmp_path / "ledger.jsonl"
    releases, liar = 10_000, 6_543
    seqs = chained_ledger(path, releases, lie_at=liar)
    audit = audit_ledger(path, "long")
    assert audit.chain_error is None and len(audit.rounds) == releases
    assert len(audit.non_private) == releases // 10
    assert audit.problems == [f"line {seqs[liar]}: recorded epsilon "
                              f"{audit.rounds[liar].recorded_epsilon:.4f} differs from the "
                              f"recomputed {audit.rounds[liar].recomputed_epsilon:.4f} by more "
                              "than 1%"]
    # spot checks against the whole-history recomputation (order-free, so one merged step per
    # mechanism; a prefix of 10,000 unmerged steps would take ~10 s to compose)
    for index in (0, 39, 40, 4_321, releases - 1):
        totals = {}
        for release in range(index + 1):
            mechanism = MECHANISMS[release // 40 % len(MECHANISMS)]
            totals[mechanism] = totals.get(mechanism, 0) + 5
        history = [MechanismStep(sigma, q, steps) for (sigma, q), steps in totals.items()]
        assert audit.rounds[index].recomputed_epsilon == pytest.approx(
            independent_rdp_epsilon(history, 1e-5), rel=1e-9)
    assert audit.rounds[0].pld_epsilon is None  # over PLD_PER_RELEASE_LIMIT: final PLD only
    assert audit.rounds[-1].pld_epsilon == audit.pld_epsilon
    assert 0 < audit.pld_epsilon <= audit.recomputed_epsilon
    assert audit.recorded_epsilon == audit.rounds[-1].recorded_epsilon
    report = write_audit([audit], tmp_path / "out").read_text()
    assert "FAIL" in report and f"| {seqs[0]} | run-0 | 1 |" in report


def test_audit_composes_each_distinct_mechanism_once(tmp_path, monkeypatch):
    """The RDP curve of a mechanism is computed once, not once per release per prefix (the
    quadratic audit computed 30 * 31 / 2 = 465 curves for this ledger)."""
    from dp_accounting.rdp import rdp_privacy_accountant

    curves = []
    original = rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian

    def counted(*args, **kwargs):
        curves.append(kwargs.get("noise_multiplier"))
        return original(*args, **kwargs)

    monkeypatch.setattr(rdp_privacy_accountant, "_compute_rdp_poisson_subsampled_gaussian", counted)
    path = tmp_path / "ledger.jsonl"
    chained_ledger(path, 30, rounds_per_run=10)
    audit = audit_ledger(path, "short")
    assert audit.ok and len(audit.rounds) == 30 <= PLD_PER_RELEASE_LIMIT
    assert len(curves) == len(MECHANISMS)
    assert all(row.pld_epsilon <= row.recomputed_epsilon for row in audit.rounds)


def test_running_rdp_equals_composing_the_whole_history():
    history = [MechanismStep(0.9, 0.05, 20), MechanismStep(1.1, 0.01, 7),
               MechanismStep(0.9, 0.05, 3), MechanismStep(2.0, 1.0, 1)]
    running = IndependentRdp()
    assert running.epsilon(1e-5) == 0.0
    for length, step in enumerate(history, start=1):
        running.add(step)
        assert running.epsilon(1e-5) == independent_rdp_epsilon(history[:length], 1e-5)


def test_audit_reads_the_cap_without_expanding_yaml_aliases(tmp_path):
    path = write_site(tmp_path, "a")
    levels = ["l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 4)]
    (path.parent / "policy.yaml").write_text("\n".join(levels) + "\nprivacy:\n  epsilon_cap: *l3\n")
    (audit,) = audit_path(tmp_path)
    assert not audit.ok and any(p.startswith(f"{path.parent / 'policy.yaml'}, line 2: YAML alias *l0")
                                for p in audit.problems)
    (path.parent / "policy.yaml").write_text("privacy: [1, 2]\n")
    (audit,) = audit_path(tmp_path)
    assert not audit.ok and any("privacy is list" in p for p in audit.problems)


# ------------------------------------------------------------------------- PRV, the headline


def write_mixed_site(run_dir, name, prv_misreport=1.0):
    """Two RDP-era releases, then the site switched to PRV: two more, by PRV over the history."""
    from privatune.common.privacy import PRV, RDP, epsilon_of

    site = run_dir / "sites" / name
    site.mkdir(parents=True)
    (site / "policy.yaml").write_text("privacy:\n  epsilon_cap: 8.0\n")
    ledger = SiteLedger(site / "ledger.jsonl")
    history = []
    for r, accountant in enumerate([RDP, RDP, PRV, PRV], start=1):
        history.append(MechanismStep(1.1, 0.05, 20))
        eps = epsilon_of(history, 1e-5, accountant) * (prv_misreport if r == 4 else 1.0)
        ledger.append(ADAPTER_UPDATE, {"run_id": "r", "round": r, "privacy_unit": "record",
                                       "noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 20,
                                       "max_grad_norm": 1.0, "accountant": accountant,
                                       "epsilon": eps, "delta": 1e-5, "update_sha256": "x"})
    return ledger


def test_mixed_history_is_audited_entry_by_entry_with_its_own_accountant(tmp_path):
    ledger = write_mixed_site(tmp_path, "mixed")
    (audit,) = audit_path(tmp_path)
    assert audit.ok, audit.problems
    assert [r.accountant for r in audit.rounds] == ["opacus-rdp"] * 2 + ["opacus-prv"] * 2
    # the RDP-era entries keep their recorded meaning; the PRV ones are checked against PLD
    assert audit.rounds[1].recomputed_epsilon == audit.rounds[1].rdp_epsilon
    assert audit.rounds[3].recomputed_epsilon == audit.rounds[3].pld_epsilon
    assert audit.accountant == "opacus-prv" and audit.rdp_epsilon > audit.recorded_epsilon
    # PRV is tighter than RDP for the same history: the switch spent less of the budget
    assert audit.rounds[2].recorded_epsilon < audit.rounds[1].rdp_epsilon * 1.5
    assert ledger.epsilon(1e-5) == pytest.approx(audit.recorded_epsilon)


def test_audit_flags_a_prv_figure_that_disagrees_with_pld(tmp_path):
    write_mixed_site(tmp_path, "liar", prv_misreport=0.97)
    (audit,) = audit_path(tmp_path)
    assert not audit.ok
    assert any(p.startswith("line 4: recorded epsilon") and "PLD" in p for p in audit.problems)


def test_plan_forecasts_with_prv_and_shows_rdp_beside():
    plan = plan_site("a", records=320, batch_size=16, local_steps=20, rounds=3, delta=1e-5,
                     epsilon=8.0)
    rdp_plan = plan_site("a", records=320, batch_size=16, local_steps=20, rounds=3, delta=1e-5,
                         epsilon=8.0, accountant="opacus-rdp")
    assert plan.accountant == "opacus-prv" and 7.8 < plan.epsilon_per_round[-1] <= 8.0
    assert plan.noise_multiplier < rdp_plan.noise_multiplier  # less noise for the same epsilon
    assert plan.rdp_epsilon_final > plan.epsilon_per_round[-1]
    assert abs(plan.pld_epsilon_final - plan.epsilon_per_round[-1]) <= 0.01 * 8.0


# ------------------------------------------------------------- the ledger against the run's record


def anchored_site(run_dir, name="a", rounds=3):
    """An honest ledger (``write_site`` with a distinct update hash per round) and the record a
    coordinator keeps of it: the head after each round's entries, each update received."""
    from privatune.common.run_record import ReceivedUpdate, ReportedHead, SiteRecord

    path = write_site(run_dir, name, rounds=rounds)
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    for entry in entries:
        if entry["kind"] == ADAPTER_UPDATE:
            entry["update_sha256"] = f"{entry['round']:064x}"
    forge(path, lambda _entries: _entries.__init__(entries))
    ledger = SiteLedger(path)
    entries = ledger.entries
    record = SiteRecord(name, heads=[ReportedHead(r, "train", 2 * r, entries[2 * r - 1]["hash"])
                                     for r in range(1, rounds + 1)],
                        received=[ReceivedUpdate(r, f"{r:064x}") for r in range(1, rounds + 1)],
                        epsilon=ledger.releases()[-1].epsilon, delta=1e-5, epsilon_budget=8.0,
                        accountant="opacus-rdp")
    return path, record


def test_honest_ledger_passes_the_audit_against_the_runs_record(tmp_path):
    path, record = anchored_site(tmp_path)
    audit = audit_ledger(path, "a", 8.0, record)
    assert audit.ok, audit.problems


def test_truncated_tail_fails_the_audit_against_the_runs_record(tmp_path):
    path, record = anchored_site(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]))  # the last round's entries deleted
    assert audit_ledger(path, "a", 8.0).ok  # alone, a cut ledger looks whole
    audit = audit_ledger(path, "a", 8.0, record)
    assert not audit.ok
    assert any("head the site reported in round 3 (train reply)" in p and "removed from its tail" in p
               for p in audit.problems)
    assert any("received an update from this site in round 3" in p for p in audit.problems)


def test_rewritten_and_rechained_history_fails_the_audit_against_the_runs_record(tmp_path):
    path, record = anchored_site(tmp_path)

    def more_noise(entries):
        history = []
        for entry in entries:
            if entry["kind"] == ADAPTER_UPDATE:
                entry["noise_multiplier"] = 3.0
                history.append(MechanismStep(3.0, 0.05, 20))
                entry["epsilon"] = rdp_epsilon(history, 1e-5)

    forge(path, more_noise)
    alone = audit_ledger(path, "a", 8.0)
    assert alone.ok and alone.recorded_epsilon < record.epsilon / 2  # the forgery audits "ok"
    audit = audit_ledger(path, "a", 8.0, record)
    assert not audit.ok
    assert any("round 1 (train reply)" in p and "history was rewritten" in p and "2 later" in p
               for p in audit.problems)
    assert any("reported epsilon" in p and "accounts only" in p for p in audit.problems)


def test_hidden_release_fails_the_audit_against_the_runs_record(tmp_path):
    path, record = anchored_site(tmp_path)
    forge(path, lambda entries: entries.pop(2))  # round 2's adapter update, re-chained
    audit = audit_ledger(path, "a", 8.0, record)
    assert not audit.ok
    hidden = [p for p in audit.problems if "that the ledger does not list" in p]
    assert len(hidden) == 1 and "in round 2 (sha256 " in hidden[0]


def test_audit_command_checks_a_ledger_against_a_report(tmp_path, capsys):
    from privatune.common.cli import main
    from privatune.common.run_record import RECORD_KEY

    path, record = anchored_site(tmp_path)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({RECORD_KEY: {"a": record.to_json()}}))
    assert main(["audit", str(path), "--run", str(report)]) == 0
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-2]))
    assert main(["audit", str(path), "--run", str(report), "--site", "a"]) == 1
    assert "removed from its tail" in capsys.readouterr().out
    assert main(["audit", str(path), "--run", str(path.parent / "policy.yaml")]) == 2
    assert "not a usable record of a run" in capsys.readouterr().err


def test_the_plan_weighs_each_steps_noise_against_the_signal_from_counts_alone():
    """The DP hyperparameter rule reads the job and a site's record count, never a record."""
    from privatune.common.config import LoraConfig, ModelConfig
    from privatune.common.plan import model_shape, trained_lora_parameters

    shape = model_shape(ModelConfig())  # the builtin model, from its recipe: nothing is built
    assert trained_lora_parameters(shape, LoraConfig()) == 78_848  # r 8 on all 7 projections
    assert trained_lora_parameters(shape, LoraConfig(r=4, target_modules=("q_proj", "v_proj"))) == 8_192
    assert trained_lora_parameters({"n_embd": 64}, LoraConfig()) is None  # not a Llama config
    # a LoRA on the output head counts once, hidden -> vocabulary (8 x (128 + 4096)); under
    # ffa B alone (8 x 4096)
    head = LoraConfig(target_modules=(*LoraConfig().target_modules, "lm_head"))
    assert trained_lora_parameters(shape, head) == 78_848 + 33_792
    assert trained_lora_parameters(shape, LoraConfig(target_modules=("lm_head",)),
                                   "ffa") == 32_768
    small = plan_site("small", 250, 16, 30, 3, 1e-5, epsilon=8.0, trained_parameters=78_848)
    assert small.noise_to_signal == pytest.approx(small.noise_multiplier * 78_848 ** 0.5 / 16)
    assert small.noise_to_signal > 10 and any("noise on the mean gradient" in w for w in small.warnings)
    large = plan_site("large", 5_600, 256, 30, 1, 1e-5, epsilon=8.0, trained_parameters=78_848)
    assert large.noise_to_signal < 1 and not large.warnings
    assert "| 0." in render_table([large]).splitlines()[-1]
    assert "noise ÷ signal" in render_table([small, large])


def test_the_plan_reads_a_local_model_directorys_shape_and_says_when_it_cannot(tiny_model_dir,
                                                                               tmp_path):
    from privatune.common.config import LoraConfig, ModelConfig
    from privatune.common.plan import model_shape, trained_lora_parameters

    shape = model_shape(ModelConfig(base=str(tiny_model_dir)))
    lora = LoraConfig(r=2, target_modules=("q_proj", "v_proj"))
    hidden, layers = shape["hidden_size"], shape["num_hidden_layers"]
    kv = shape.get("num_key_value_heads", shape["num_attention_heads"]) * (
        hidden // shape["num_attention_heads"])
    assert trained_lora_parameters(shape, lora) == layers * 2 * (2 * hidden + hidden + kv)
    assert model_shape(ModelConfig(base=str(tmp_path / "absent.gguf"))) is None
    assert model_shape(ModelConfig(base=str(tmp_path))) is None  # a directory without a model
