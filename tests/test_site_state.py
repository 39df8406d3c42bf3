"""The node keeps its promise against its own state: a restored or deleted ledger, two nodes on
one state directory, hostile requests and adapters, torn or unwritable release files.

Each case drives the node's public entry points (``SiteNode.train`` / ``evaluate``, the
``privatune node`` command) on real files; the concurrency case runs two real processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from privatune.client.deploy import check_site, release_statement
from privatune.client.node import SiteNode
from privatune.client.policy import load_site_policy
from privatune.common.audit import audit_ledger
from privatune.common.ledger import SiteLedger
from privatune.common.ledger_records import NonPrivateRelease, RollbackAcknowledgement
from privatune.common.config import LoraConfig
from privatune.common.lora import initial_adapter, lora_state, update_hash
from privatune.common.protocol import EvaluateRequest, TrainReply, TrainRequest

LORA = LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj"))


def request(round_number: int = 1, planned: int = 2, run: str = "run-1",
            after: TrainReply | None = None, **changes) -> TrainRequest:
    """A train request; ``after``: anchored at the head (and spend) that reply carried."""
    anchor = {} if after is None else dict(ledger_seq=after.ledger_seq,
                                           ledger_hash=after.ledger_hash,
                                           ledger_epsilon=after.epsilon, ledger_delta=after.delta)
    values = dict(run_id=run, round=round_number, planned_rounds=planned, local_steps=2,
                  batch_size=8, learning_rate=0.02, max_grad_norm=1.0, max_length=48,
                  lora_r=LORA.r, lora_alpha=LORA.alpha, lora_targets="q_proj,v_proj", **anchor)
    return TrainRequest(**{**values, **changes})


def evaluate_request(run: str = "run-1", **changes) -> EvaluateRequest:
    values = dict(run_id=run, round=1, max_length=48, batch_size=8, lora_r=LORA.r,
                  lora_alpha=LORA.alpha, lora_targets="q_proj,v_proj")
    return EvaluateRequest(**{**values, **changes})


@pytest.fixture
def start_state(tiny_model_dir):
    return lora_state(initial_adapter(tiny_model_dir, LORA, seed=0))


def edit_policy(path: Path, section: str, **values) -> Path:
    data = yaml.safe_load(path.read_text())
    data.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(data))
    return path


def acknowledge(policy_path: Path) -> int:
    from privatune.common.cli import main

    return main(["node", "--site", str(policy_path), "--acknowledge-ledger-rollback"])


def recomputed_epsilon(node: SiteNode) -> float:
    privacy = node.policy.privacy
    return SiteLedger(node.policy.ledger_path).epsilon(privacy.delta, privacy.accountant_name)


# ------------------------------------------------------------ a restored backup, then a resend


def test_restored_ledger_stops_the_node_instead_of_resending_an_unlisted_release(
        make_site, start_state, capsys):
    """The ledger (and the head beside it) put back from a copy taken before round 1, then the
    coordinator repeats round 1 with the head it held before: the kept round-1 release is not
    listed, so the node declines instead of resending it at no cost; after the acknowledgement
    the lost round's spend is counted, and the audit accepts the ledger."""
    policy_path = make_site(epsilon_cap=20.0)
    node = SiteNode(load_site_policy(policy_path))
    ledger = node.policy.ledger_path
    warm_up = node.train(request(1, run="run-0", planned=20), start_state)
    assert warm_up.reply.accepted
    backup = {p: p.read_bytes() for p in (ledger, ledger.with_name(ledger.name + ".head"))
              if p.exists()}

    first = node.train(request(1, planned=20, after=warm_up.reply), start_state)
    assert first.reply.accepted and first.reply.epsilon > warm_up.reply.epsilon
    for path, content in backup.items():  # restored from the copy
        path.write_bytes(content)

    repeat = node.train(request(1, planned=20, after=warm_up.reply), start_state)
    assert not repeat.reply.accepted and not repeat.state
    assert "not listed" in repeat.reply.reason and "--acknowledge-ledger-rollback" in repeat.reply.reason
    releases = [r.release for r in SiteLedger(ledger).records() if isinstance(r, NonPrivateRelease)]
    assert "resend" not in releases and releases[-1] == "ledger_rollback"
    # still stopped, whatever is asked, until a person acknowledges it
    assert not node.train(request(2, planned=20, after=repeat.reply), first.state).reply.accepted

    assert acknowledge(policy_path) == 0
    assert "rollback acknowledged" in capsys.readouterr().out
    *before, acknowledgement = SiteLedger(ledger).records()
    declines = [seq for seq, r in enumerate(before, start=1)
                if isinstance(r, NonPrivateRelease) and r.release == "ledger_rollback"]
    assert isinstance(acknowledgement, RollbackAcknowledgement)
    assert acknowledgement.detected_at == declines[-1]  # the latest decline it answers
    assert acknowledgement.recovered_releases == [update_hash(first.state)]  # listed again
    assert recomputed_epsilon(node) >= first.reply.epsilon  # the lost round stays counted
    resumed = node.train(request(2, planned=20, after=repeat.reply), first.state)
    assert resumed.reply.accepted and resumed.reply.epsilon > first.reply.epsilon
    audit = audit_ledger(ledger)
    assert audit.ok, audit.problems


def test_resend_is_only_of_an_update_the_ledger_lists(make_site, start_state):
    """A kept release whose update differs from the one the ledger lists is never resent."""
    node = SiteNode(load_site_policy(make_site()))
    first = node.train(request(), start_state)
    released = node.policy.state.released_dir
    update = next(released.glob("*.safetensors"))
    from safetensors.torch import load_file, save_file

    forged = {n: t + 1.0 for n, t in load_file(str(update)).items()}
    save_file(forged, str(update))  # the record still names the listed hash: a mismatch
    again = node.train(request(), start_state)
    assert again.reply.accepted and again.reply.epsilon > first.reply.epsilon  # trained, paid
    assert all(not torch.equal(again.state[n], forged[n]) for n in forged)


# ------------------------------------------------------------ a deleted ledger


@pytest.mark.parametrize("deleted", ["ledger", "ledger and its head"])
def test_deleted_ledger_beside_earlier_releases_is_refused(make_site, start_state, deleted):
    policy_path = make_site()
    node = SiteNode(load_site_policy(policy_path))
    assert node.train(request(run="run-1"), start_state).reply.accepted
    ledger = node.policy.ledger_path
    ledger.unlink()
    if deleted == "ledger and its head":
        ledger.with_name(ledger.name + ".head").unlink(missing_ok=True)

    fresh = SiteNode(load_site_policy(policy_path)).train(request(run="run-2"), start_state)
    assert not fresh.reply.accepted and "has lost releases" in fresh.reply.reason
    assert "--acknowledge-ledger-rollback" in fresh.reply.reason
    assert SiteLedger(ledger).adapter_updates() == []


def test_deleted_ledger_of_evaluations_only_is_caught_by_its_recorded_head(make_site, start_state):
    node = SiteNode(load_site_policy(make_site()))
    assert node.evaluate(evaluate_request(), start_state).accepted
    node.policy.ledger_path.unlink()
    reply = node.evaluate(evaluate_request(run="run-2"), start_state)
    assert not reply.accepted and "this node recorded" in reply.reason


# ------------------------------------------------------------ two nodes on one state directory

_NODE_PROCESS = """
import json, sys, time
from pathlib import Path
from privatune.client.node import SiteNode
from privatune.client.policy import load_site_policy
from privatune.common.config import LoraConfig
from privatune.common.lora import initial_adapter, lora_state
from privatune.common.protocol import TrainRequest

policy, model, run, go = sys.argv[1:5]
lora = LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj"))
state = lora_state(initial_adapter(Path(model), lora, seed=0))
node = SiteNode(load_site_policy(policy))
node.model_with_adapter(lora)  # the base model loaded before the start signal: both reach the check at once
Path(go + "." + run).touch()
while not Path(go).exists():
    time.sleep(0.005)
reply = node.train(TrainRequest(run_id=run, round=1, planned_rounds=1, local_steps=2,
                                batch_size=8, learning_rate=0.02, max_grad_norm=1.0,
                                max_length=48, lora_r=2, lora_alpha=4,
                                lora_targets="q_proj,v_proj"), state).reply
print(json.dumps({"accepted": reply.accepted, "epsilon": reply.epsilon, "reason": reply.reason}))
"""


def test_two_node_processes_on_one_state_never_spend_past_the_cap(make_site, tiny_model_dir,
                                                                   tmp_path):
    """Two real processes answer for one site (cap 4) at the same moment, each for its own run
    whose noise is calibrated to the whole cap: at most one spends, and the ledger stays
    within the cap."""
    policy_path = make_site(epsilon_cap=4.0)
    go = tmp_path / "go"
    processes = [subprocess.Popen([sys.executable, "-c", _NODE_PROCESS, str(policy_path),
                                   str(tiny_model_dir), run, str(go)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for run in ("run-a", "run-b")]
    deadline = time.monotonic() + 120
    while not all(Path(f"{go}.{run}").exists() for run in ("run-a", "run-b")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes), \
            [p.communicate() for p in processes]
        time.sleep(0.01)
    go.touch()
    replies = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        replies.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["accepted"] for r in replies) == 1, replies
    declined = next(r for r in replies if not r["accepted"])
    assert "another privatune node process" in declined["reason"] or "cap" in declined["reason"]
    node = SiteNode(load_site_policy(policy_path))
    assert recomputed_epsilon(node) <= 4.0
    assert audit_ledger(node.policy.ledger_path).ok


def test_a_request_finding_the_site_busy_is_declined_at_no_cost(make_site, start_state):
    node = SiteNode(load_site_policy(make_site()))
    with node.policy.state.exclusive():
        outcome = node.train(request(), start_state)
        evaluation = node.evaluate(evaluate_request(), start_state)
        assert acknowledge(node.policy.source) == 2
    assert not outcome.reply.accepted and "another privatune node process" in outcome.reply.reason
    assert not evaluation.accepted and "another privatune node process" in evaluation.reason
    assert node.epsilon() == 0.0 and node.ledger.adapter_updates() == []


# ------------------------------------------------------------ evaluations across runs


def test_evaluation_only_runs_count_toward_max_runs(make_site, start_state):
    node = SiteNode(load_site_policy(edit_policy(make_site(), "privacy", max_runs=3)))
    replies = [node.evaluate(evaluate_request(run=f"probe-{i}"), start_state) for i in range(5)]
    assert [r.accepted for r in replies] == [True, True, True, False, False]
    assert "privacy.max_runs" in replies[3].reason
    # a training run is a run too: the site is full
    outcome = node.train(request(run="train-run"), start_state)
    assert not outcome.reply.accepted and "at most 3 runs" in outcome.reply.reason


def test_a_released_metric_covers_at_least_min_records(make_site, start_state):
    node = SiteNode(load_site_policy(make_site()))  # 24 held-out records
    one_note = node.evaluate(evaluate_request(generation=True, marker="Assessment:",
                                              max_new_tokens=4, max_examples=1), start_state)
    assert one_note.accepted and one_note.eval_loss is not None
    assert one_note.rouge_l is None and one_note.generation_examples is None
    small = SiteNode(load_site_policy(edit_policy(make_site("site-b", records=40), "release",
                                                  min_records=20)))  # 8 held-out records
    reply = small.evaluate(evaluate_request(), start_state)
    assert not reply.accepted and "release.min_records" in reply.reason
    (decline,) = small.ledger.records()
    assert isinstance(decline, NonPrivateRelease) and decline.release == "decline"
    assert decline.request == "evaluate" and "release.min_records" in decline.reason


# ------------------------------------------------------------ hostile requests and adapters


@pytest.mark.parametrize("change, field", [
    ({"round": -1}, "round"), ({"lora_alpha": 10**9}, "lora_alpha"),
    ({"max_grad_norm": 1e-30}, "max_grad_norm"), ({"planned_rounds": 1_000_000}, "planned_rounds"),
])
def test_hostile_request_values_are_declined_by_the_limits(make_site, start_state, change, field):
    node = SiteNode(load_site_policy(make_site()))
    outcome = node.train(request(**change), start_state)
    assert not outcome.reply.accepted and f"request {field}" in outcome.reply.reason
    assert node.epsilon() == 0.0


@pytest.mark.parametrize("damage, expected", [
    (lambda s: {n: t * 1e30 for n, t in s.items()}, "beyond"),
    (lambda s: {n: torch.full_like(t, math.nan) for n, t in s.items()}, "not finite"),
    (lambda s: {**s, "base_model.model.lm_head.weight": torch.zeros(4, 4)}, "not a LoRA"),
])
def test_a_hostile_global_adapter_is_declined_before_any_spend(make_site, start_state, damage,
                                                               expected):
    node = SiteNode(load_site_policy(make_site()))
    adapter = damage(start_state)
    outcome = node.train(request(), adapter)
    assert not outcome.reply.accepted and expected in outcome.reply.reason
    assert node.epsilon() == 0.0 and node.ledger.adapter_updates() == []
    evaluation = node.evaluate(evaluate_request(), adapter)
    assert not evaluation.accepted and expected in evaluation.reason


def test_generation_longer_than_max_length_is_declined(make_site, start_state):
    node = SiteNode(load_site_policy(make_site()))
    reply = node.evaluate(evaluate_request(max_length=100, generation=True, marker="Assessment:",
                                           max_new_tokens=2000, max_examples=20), start_state)
    assert not reply.accepted and "request max_new_tokens = 2000" in reply.reason


def test_lengths_beyond_the_models_positions_are_declined(make_site, start_state):
    node = SiteNode(load_site_policy(make_site()))  # the tiny model has 128 positions
    outcome = node.train(request(max_length=2000), start_state)
    assert not outcome.reply.accepted and "128 positions" in outcome.reply.reason
    reply = node.evaluate(evaluate_request(max_length=2000, generation=True, marker="Assessment:",
                                           max_new_tokens=1990, max_examples=20), start_state)
    assert not reply.accepted and "128 positions" in reply.reason


# ------------------------------------------------------------ kept release files


def test_a_torn_kept_release_is_answered_as_missing(make_site, start_state):
    node = SiteNode(load_site_policy(make_site(epsilon_cap=20.0)))
    first = node.train(request(), start_state)
    record = next(node.policy.state.released_dir.glob("*.json"))
    record.write_text(record.read_text()[:20])  # torn
    again = node.train(request(), start_state)  # no raw error: trained again, and paid for
    assert again.reply.accepted and again.reply.epsilon > first.reply.epsilon
    kept = json.loads(record.read_text())  # and kept again, whole
    assert kept["update_sha256"] and kept["run_id"] == "run-1"
    assert not list(record.parent.glob(".*tmp*"))  # no temporary file left


def test_a_kept_release_reads_as_the_reply_it_sent_also_in_the_older_form(make_site,
                                                                           start_state):
    node = SiteNode(load_site_policy(make_site(epsilon_cap=20.0)))
    sent = node.train(request(), start_state).reply
    kept = node.policy.state.kept("run-1", 1)
    assert kept.reply == sent and kept.epsilon == sent.epsilon
    record = next(node.policy.state.released_dir.glob("*.json"))
    older = json.loads(record.read_text())
    older["reply"] = {**dataclasses.asdict(sent), "train_loss": None}  # every field, nulls too
    record.write_text(json.dumps(older))
    kept = node.policy.state.kept("run-1", 1)
    assert kept.reply == dataclasses.replace(sent, train_loss=None)


def test_an_update_that_cannot_be_kept_is_still_sent(make_site, start_state):
    node = SiteNode(load_site_policy(make_site()))
    node.policy.state.released_dir.parent.mkdir(parents=True, exist_ok=True)
    node.policy.state.released_dir.write_text("not a directory")
    outcome = node.train(request(), start_state)
    assert outcome.reply.accepted and outcome.state
    assert len(node.ledger.adapter_updates()) == 1


def test_too_little_free_space_declines_before_spending(make_site, start_state, monkeypatch):
    node = SiteNode(load_site_policy(make_site()))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1000))
    outcome = node.train(request(), start_state)
    assert not outcome.reply.accepted and "bytes free" in outcome.reply.reason
    assert node.epsilon() == 0.0


# ------------------------------------------------------------ the node's own statement


def test_node_check_names_the_policys_accountant(make_site):
    statement = release_statement(check_site(make_site()))
    assert "(opacus-prv accounting)" in statement and "RDP accounting" not in statement
    assert "at least 20 held-out records" in statement


def test_a_request_addressed_to_another_site_is_declined_at_no_cost(make_site, start_state):
    node = SiteNode(load_site_policy(make_site("hospital-1")))
    outcome = node.train(dataclasses.replace(request(), site="hospital-2"), start_state)
    assert not outcome.reply.accepted and "addressed this request to site 'hospital-2'" in \
        outcome.reply.reason
    assert node.epsilon() == 0.0
    evaluation = node.evaluate(evaluate_request(site="hospital-2"), start_state)
    assert not evaluation.accepted
    assert node.train(dataclasses.replace(request(), site="hospital-1"), start_state).reply.accepted
