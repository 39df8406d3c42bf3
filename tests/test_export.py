"""Releasing a run: the merged model, the best round, the model card and the audit gate; and
the report's best round and overfitting flags.

The run is real coordinator output (``Coordinator`` over the fake transport of
``test_coordinator``, a tiny model, a central held-out set) with honest site ledgers beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from privatune.common.ledger import SiteLedger, read_entries
from privatune.common.lora import load_adapter, read_adapter_state
from privatune.common.protocol import TrainReply, TrainRequest
from privatune.server.coordinator import Coordinator
from privatune.server.coordinator_settings import CoordinatorSettings
from privatune.server.export import (RELEASES, ModelExport, ReleaseRefused, export_adapter,
                                     export_merged, select_adapter)
from privatune.server.overfitting import best_round, overfitting_flags
from privatune.server.report import RunReport
from privatune.server.report_files import write_report
from privatune.server.report_markdown import render_markdown
from privatune.server.rounds import RoundEvaluation, RoundRecord, RoundTraining
from privatune.server.transport import TrainResult
from privatune.common.cli import main
from tests.conftest import write_notes
from tests.test_coordinator import SITES, FakeTransport, LedgeredSite, job
from tests.test_plan_audit import write_site

TEXT = "Patient admitted with sepsis. Temperature 38 C, heart rate 110. Plan: start antibiotics."


def last_export(run: Path) -> ModelExport:
    """The latest export recorded in the run's releases.jsonl (its chain verified)."""
    entries, _ = read_entries(run / RELEASES)
    return ModelExport.from_entry(entries[-1])


def small_update(seed: int, examples: int, scale: float = 0.05):
    """A node's honest-looking update: the global adapter plus a little noise, its training loss
    falling round by round."""
    def answer(node: int, request: TrainRequest, state: Mapping[str, torch.Tensor]) -> TrainResult:
        generator = torch.Generator().manual_seed(100 * seed + request.round)
        new = {name: t + scale * torch.randn(t.shape, generator=generator) for name, t in state.items()}
        reply = TrainReply(site=SITES[node], accepted=True, num_examples=examples,
                           epsilon=0.5 * request.round, delta=1e-5, epsilon_budget=8.0,
                           noise_multiplier=1.1, train_loss=3.0 - 0.2 * request.round + 0.01 * seed)
        return TrainResult(node, reply, new)
    return answer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("release")
    out = root / "run"
    settings = CoordinatorSettings(job=job(rounds=3), model_dir=tiny_model_dir, out_dir=out,
                                   run_id="release-run",
                                   central_eval=write_notes(root / "central.jsonl", 12, seed=9))
    # honest nodes whose ledgers sit under the run directory, as in a simulation: the audit passes
    transport = FakeTransport({node: LedgeredSite(out / "sites" / SITES[node] / "ledger.jsonl",
                                                  small_update(node, examples))
                               for node, examples in ((1, 100), (2, 300), (3, 200))})
    write_report(Coordinator(settings, transport, progress=lambda _line: None).run(), out)
    return out


@pytest.fixture(scope="module")
def deployed_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, dict[str, Path]]:
    """A run as ``privatune coordinator`` leaves it (no sites/ under it) and the ledgers the
    hospitals keep on their own machines."""
    root = tmp_path_factory.mktemp("deployed")
    out = root / "run"
    ledgers = {name: root / "hospitals" / name / "ledger.jsonl" for name in SITES.values()}
    settings = CoordinatorSettings(job=job(rounds=2), model_dir=tiny_model_dir, out_dir=out,
                                   run_id="deployed-run")
    transport = FakeTransport({node: LedgeredSite(ledgers[SITES[node]], small_update(node, 100))
                               for node in SITES})
    write_report(Coordinator(settings, transport, progress=lambda _line: None).run(), out)
    return out, ledgers


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def test_report_marks_the_best_round_and_records_training_loss_and_bytes(run_dir):
    report = RunReport.read(run_dir / "report.json")
    central = {r.round: r.evaluation.global_perplexity for r in report.rounds if r.round >= 1}
    saved = json.loads((run_dir / "report.json").read_text())
    assert saved["best_round"]["round"] == min(central, key=lambda r: (central[r], r))
    assert saved["best_round"]["metric"] == "global_perplexity"
    first = report.rounds[1].training
    # example-weighted mean of the released training losses
    assert first.train_loss == pytest.approx((100 * 2.81 + 300 * 2.82 + 200 * 2.83) / 600)
    wire = sum(4 * t.numel() for t in read_adapter_state(run_dir / "adapter").values())
    assert first.bytes_sent == 3 * wire and first.bytes_received == 3 * wire
    assert f"Best round: **{saved['best_round']['round']}**" in (run_dir / "report.md").read_text()


def test_merged_export_loads_without_peft_and_matches_base_plus_adapter(run_dir, tmp_path, tiny_model_dir):
    out = tmp_path / "merged"
    assert export_merged(run_dir, out).findings == []
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists()
    assert not list(tmp_path.glob(".merged.*"))  # no staging left behind

    # a fresh interpreter loads it with plain transformers; PEFT is never imported
    logits_file = tmp_path / "logits.pt"
    script = ("import sys, torch\n"
              "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
              f"d = {str(out)!r}\n"
              "model = AutoModelForCausalLM.from_pretrained(d).eval()\n"
              "ids = AutoTokenizer.from_pretrained(d)(" + repr(TEXT) + ", return_tensors='pt').input_ids\n"
              "with torch.no_grad():\n"
              "    torch.save({'ids': ids, 'logits': model(input_ids=ids).logits}, "
              f"{str(logits_file)!r})\n"
              "print('peft imported:', 'peft' in sys.modules)\n")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "peft imported: False" in done.stdout
    merged = torch.load(logits_file)

    reference = load_adapter(tiny_model_dir, run_dir / "adapter").eval()
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(TEXT, return_tensors="pt").input_ids
    assert torch.equal(ids, merged["ids"])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        base = reference.get_base_model()
        with reference.disable_adapter():
            plain = base(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-3  # the adapter does change the model
    torch.testing.assert_close(merged["logits"], expected, atol=1e-4, rtol=0)


def test_model_card_states_privacy_and_evaluation(run_dir, tmp_path, tiny_model_dir):
    out = tmp_path / "merged"
    export_merged(run_dir, out, which="best")
    card = (out / "README.md").read_text()
    report = RunReport.read(run_dir / "report.json")
    best = best_round(report.rounds)
    assert str(tiny_model_dir) in card
    assert "3 completed of 3 planned" in card and f"best round {best.round}" in card
    assert "Privacy unit: **record**" in card
    for name in SITES.values():
        accountant = SiteLedger(run_dir / "sites" / name / "ledger.jsonl").releases()[0].accountant
        row = next(line for line in card.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {accountant} |" in row and "| 1e-05 |" in row and row.endswith("| pass |")
    chosen = next(r for r in report.rounds if r.round == best.round)
    assert f"{chosen.evaluation.global_perplexity:.2f}" in card
    assert "Released despite" not in card


def test_round_best_exports_the_best_rounds_checkpoint(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    # make round 2 the clear best by the report's central perplexity
    data = json.loads((run / "report.json").read_text())
    for record, perplexity in zip(data["rounds"], (40.0, 30.0, 20.0, 35.0)):
        record["global_perplexity"] = perplexity
    (run / "report.json").write_text(json.dumps(data))
    source = select_adapter(run, "best")
    assert source.round == 2 and source.adapter == run / "checkpoints" / "round_002" / "adapter"

    assert export_adapter(run, tmp_path / "best", which="best").findings == []
    exported = read_adapter_state(tmp_path / "best")
    wanted = read_adapter_state(run / "checkpoints" / "round_002" / "adapter")
    final = read_adapter_state(run / "adapter")
    assert all(torch.equal(exported[n], wanted[n]) for n in wanted)
    assert not all(torch.equal(exported[n], final[n]) for n in final)
    export = last_export(run)
    assert export.round == 2 and export.which == "best" and not export.merged

    assert main(["export", str(run), "--round", "1", "--out", str(tmp_path / "one")]) == 0
    one = read_adapter_state(tmp_path / "one")
    first = read_adapter_state(run / "checkpoints" / "round_001" / "adapter")
    assert all(torch.equal(one[n], first[n]) for n in first)
    with pytest.raises(FileNotFoundError, match="rounds with a checkpoint: 1, 2, 3"):
        select_adapter(run, "7")


def test_export_refuses_to_overwrite_unless_asked(run_dir, tmp_path):
    out = tmp_path / "merged"
    export_merged(run_dir, out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_merged(run_dir, out, which="1")
    assert main(["export", str(run_dir), "--merged", "--round", "1", "--out", str(out),
                 "--overwrite"]) == 0
    assert (out / "README.md").read_text().count("round 1") >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # nothing set aside left


def test_gate_refuses_a_failing_audit_unless_forced_with_a_reason(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    write_site(run, "spender", noise=0.5, budget=2.0)  # over its budget
    out = tmp_path / "merged"
    with pytest.raises(ReleaseRefused, match="spender: .*over the budget"):
        export_merged(run, out)
    assert main(["export", str(run), "--merged", "--out", str(out)]) == 3
    assert "export refused" in capsys.readouterr().err
    assert main(["export", str(run), "--merged", "--out", str(out), "--force"]) == 2
    assert not out.exists()

    assert main(["export", str(run), "--merged", "--out", str(out), "--force", "--reason",
                 "ethics board approved 2026-11"]) == 0
    card = (out / "README.md").read_text()
    assert "Released despite" in card and "ethics board approved 2026-11" in card
    export = last_export(run)
    assert export.forced and export.merged and export.reason == "ethics board approved 2026-11"


def test_an_export_is_one_type_that_writes_the_same_bytes(tmp_path, monkeypatch):
    """An export's entry written through ModelExport is the one written as a dict before it
    existed, null fields included; an entry of the first releases.jsonl (four fields) reads."""
    fields = {"destination": "/out", "forced": True, "reason": "approved", "findings": ["f"],
              "audited": {"a": "/a/ledger.jsonl"}, "unverified": ["b"], "recorded": True,
              "round": None, "which": "final", "merged": False, "adapter": "/run/adapter",
              "adapter_sha256": None}
    monkeypatch.setattr(time, "strftime", lambda *_: "2026-01-01T00:00:00Z")
    SiteLedger(tmp_path / "dict" / RELEASES).append("model_export", fields)
    SiteLedger(tmp_path / "typed" / RELEASES).append_record(ModelExport(**fields))
    assert (tmp_path / "typed" / RELEASES).read_bytes() == (tmp_path / "dict" / RELEASES).read_bytes()
    assert last_export(tmp_path / "typed") == ModelExport(**fields)

    first = {"destination": "/out", "forced": False, "reason": "", "findings": []}
    SiteLedger(tmp_path / "old" / RELEASES).append("model_export", first)
    old = last_export(tmp_path / "old")
    assert old == ModelExport(**first) and old.round is None and old.recorded is None


# ------------------------------------------------------------------- overfitting, synthetic


def history(train_losses, heldout, central=None) -> list[RoundRecord]:
    """Round 0 plus one round per training loss; ``heldout`` is the federated perplexity of
    rounds 0..N, ``central`` the central one."""
    central = central or [None] * len(heldout)
    rounds = [RoundRecord(round=0, evaluation=RoundEvaluation(global_perplexity=central[0],
                                                              federated_perplexity=heldout[0]))]
    for number, loss in enumerate(train_losses, start=1):
        rounds.append(RoundRecord(
            round=number, training=RoundTraining(participants=["a"], aggregated=True, train_loss=loss),
            evaluation=RoundEvaluation(global_perplexity=central[number],
                                       federated_perplexity=heldout[number])))
    return rounds


def test_overfitting_flag_fires_when_training_loss_falls_while_heldout_rises():
    rounds = history([3.0, 2.5, 2.0, 1.5], [40.0, 30.0, 25.0, 27.0, 29.0], [41.0, 31, 26, 28, 30])
    flags = overfitting_flags(rounds)
    assert [f.round for f in flags] == [3, 4]
    assert flags[0].train_loss == (2.5, 2.0) and flags[0].heldout_perplexity == (25.0, 27.0)
    best = best_round(rounds)
    assert best.round == 2 and best.metric == "global_perplexity" and best.beats_base

    report = RunReport(run_id="r", config={}, base_model="m", rounds=rounds)
    markdown = render_markdown(report)
    assert "Possible overfitting" in markdown and "round 3: mean training loss fell" in markdown
    assert "| 2 | 2.500 | 25.00 | best |" in markdown and "| 4 | 1.500 | 29.00 | overfitting? |" in markdown
    saved = report.to_json()
    assert saved["best_round"]["round"] == 2 and [f["round"] for f in saved["overfitting"]] == [3, 4]
    assert RunReport.from_json(json.loads(json.dumps(saved))) == report


def test_overfitting_flag_stays_quiet_on_a_healthy_run():
    healthy = history([3.0, 2.5, 2.0, 1.5], [40.0, 30.0, 25.0, 22.0, 21.0])
    assert overfitting_flags(healthy) == []
    # both falling, and a held-out wobble below the noise threshold, are no flag either
    assert overfitting_flags(history([3.0, 2.9, 2.8], [40.0, 30.0, 30.001, 30.002])) == []
    # a rising held-out loss with a rising training loss is not overfitting
    assert overfitting_flags(history([2.0, 2.5, 3.0], [40.0, 30.0, 35.0, 40.0])) == []
    assert "No round where" in render_markdown(RunReport(run_id="r", config={}, base_model="m",
                                                         rounds=healthy))
    # without a central set the best round is by federated perplexity
    best = best_round(healthy)
    assert best.round == 4 and best.metric == "federated_perplexity"


def test_merged_export_names_a_base_model_it_cannot_read(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="point --base-model at a copy"):
        export_merged(run_dir, tmp_path / "merged", base_model=tmp_path / "nowhere")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ a deployed run through the gate


def test_deployed_run_exports_through_the_gate_with_collected_ledgers(deployed_run, tmp_path,
                                                                      capsys):
    run, ledgers = deployed_run
    assert not (run / "sites").exists()
    # without the sites' ledgers: the coordinator's record alone verifies nothing, so the
    # export is refused, naming each site and how to give its ledger
    assert main(["export", str(run), "--out", str(tmp_path / "bare")]) == 3
    err = capsys.readouterr().err
    assert err.count("not independently verified: its ledger was not collected") == 3
    assert "--ledger alpha=PATH" in err and not (tmp_path / "bare").exists()
    assert main(["export", str(run), "--out", str(tmp_path / "bare"), "--force", "--reason",
                 "ledgers arrive next week"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("not independently verified") == 3 and "FORCED over 3 findings" in printed
    export = last_export(run)
    assert export.unverified == ["alpha", "beta", "gamma"] and export.audited == {}
    assert export.forced and export.recorded

    collected = [f"--ledger={name}={path}" for name, path in ledgers.items()]
    assert main(["export", str(run), "--out", str(tmp_path / "checked"), *collected]) == 0
    printed = capsys.readouterr().out
    assert printed.count("audited: pass") == 3 and "not independently verified" not in printed

    # a ledger restored from an old copy (its last round gone) is caught against the record
    cut = tmp_path / "alpha-cut.jsonl"
    cut.write_text("".join(ledgers["alpha"].read_text().splitlines(keepends=True)[:-2]))
    with pytest.raises(ReleaseRefused, match="alpha: the ledger does not hold the head"):
        export_adapter(run, tmp_path / "refused", ledgers={**ledgers, "alpha": cut})
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ValueError, match="no site 'delta'"):
        export_adapter(run, tmp_path / "refused", ledgers={"delta": cut})

    # one ledger of three: refused; forced, the model card says which sites were verified and
    # which were not
    with pytest.raises(ReleaseRefused, match="beta: not independently verified"):
        export_adapter(run, tmp_path / "refused", ledgers={"alpha": ledgers["alpha"]})
    gate = export_merged(run, tmp_path / "merged", "approved by the ethics board",
                         ledgers={"alpha": ledgers["alpha"]})
    assert [a.name for a in gate.audits] == ["alpha"] and len(gate.findings) == 2
    card = (tmp_path / "merged" / "README.md").read_text()
    assert next(l for l in card.splitlines() if l.startswith("| alpha |")).endswith("| pass |")
    assert next(l for l in card.splitlines() if l.startswith("| beta |")).endswith(
        "| not independently verified: ledger not collected |")
    assert "**Not independently verified** (released with `--force`):" in card
    assert "- gamma: its ledger was not collected" in card and "Released despite" in card


def test_ledgers_without_the_runs_record_never_pass_as_its_audit(run_dir, deployed_run, tmp_path,
                                                                  capsys):
    """A run directory with no record of the run (no report.json, no checkpoint) cannot tie any
    ledger to itself: another run's honest ledgers are refused unless forced, and a forced
    export's card says they were not verified as this run's, never "pass". With a record, a
    ledger of a site it does not name is a finding too."""
    other, _ = deployed_run
    bare = tmp_path / "bare"
    shutil.copytree(run_dir / "adapter", bare / "adapter")
    shutil.copytree(run_dir / "sites", bare / "sites")  # another run's ledgers, sound on their own
    with pytest.raises(ReleaseRefused, match=r"no record of the run \(no report.json, no "
                                             r"checkpoint\), so the ledgers of alpha, beta, gamma "
                                             r"cannot be checked as this run's"):
        export_adapter(bare, tmp_path / "refused")
    assert main(["export", str(bare), "--out", str(tmp_path / "refused")]) == 3
    assert main(["export", str(bare), "--out", str(tmp_path / "forced"), "--force", "--reason",
                 "test"]) == 0
    printed = capsys.readouterr().out
    assert "audited: pass" not in printed
    assert printed.count("audited: sound, but not independently verified as this run's") == 3
    export = last_export(bare)
    assert export.forced and not export.recorded

    # a deployed run's record names alpha, beta and gamma: a sites/ ledger of another site is
    # not this run's
    run = copy_run(other, tmp_path / "deployed")
    shutil.copytree(run_dir / "sites" / "alpha", run / "sites" / "delta")
    with pytest.raises(ReleaseRefused, match="delta: the run's record has no site 'delta'"):
        export_adapter(run, tmp_path / "refused")
    from privatune.common.audit import audit_path
    from privatune.common.run_record import read_run_record

    audits = {a.name: a for a in audit_path(run, read_run_record(run))}  # privatune audit --run
    assert not audits["delta"].ok and "may be another run's" in audits["delta"].problems[-1]
