"""The hospital node: DP training really changes LoRA, budgets are enforced, checks fire."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from privatune.client.lora_grad_sampler import LoraDPOptimizer, LoraGradSampleModule
from privatune.client.node import SiteNode
from privatune.client.policy import load_site_policy
from privatune.client.trainer import DPNotAppliedError, DPTrainSettings, train_dp_round
from privatune.common.config import ConfigError
from privatune.common.examples import encode_pairs
from privatune.common.ledger import SiteLedger
from privatune.common.ledger_records import AdapterRelease, NonPrivateRelease
from privatune.common.config import LoraConfig
from privatune.common.lora import (attach_lora, frozen_part, initial_adapter, load_base_model,
                                   lora_state, update_hash, with_update)
from privatune.common.privacy import independent_rdp_epsilon, pld_epsilon, poisson_sample_rate

LORA = LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj"))


def request(round_number=1, planned=2, steps=3, run="run-1", aggregation="fedavg"):
    from privatune.common.protocol import TrainRequest

    return TrainRequest(run_id=run, round=round_number, planned_rounds=planned, local_steps=steps,
                        batch_size=8, learning_rate=0.02, max_grad_norm=1.0, max_length=48,
                        lora_r=LORA.r, lora_alpha=LORA.alpha, lora_targets="q_proj,v_proj",
                        aggregation=aggregation)


def start_state(model_dir):
    return lora_state(initial_adapter(model_dir, LORA, seed=0))


def test_dp_round_changes_lora_and_ledger_recomputes(make_site, tiny_model_dir):
    node = SiteNode(load_site_policy(make_site()))
    state = start_state(tiny_model_dir)
    outcome = node.train(request(), state)
    assert outcome.reply.accepted and outcome.reply.epsilon > 0
    assert set(outcome.state) == set(state)
    assert any(not torch.equal(outcome.state[n], state[n]) for n in state)
    assert all("lora_" in name for name in outcome.state)
    # the node's epsilon (Opacus' PRV), from its on-disk history, matches an independent tight
    # accountant (dp-accounting's PLD) within 1%, and the looser RDP bound is never below it
    ledger = SiteLedger(node.policy.ledger_path)
    assert ledger.entries[0]["accountant"] == "opacus-prv"
    assert ledger.entries[0]["privacy_unit"] == "record" and "patient_sampling" not in ledger.entries[0]
    history, delta = ledger.mechanism_history(), node.policy.privacy.delta
    theirs = pld_epsilon(history, delta)
    assert abs(outcome.reply.epsilon - theirs) <= 0.01 * theirs
    assert independent_rdp_epsilon(history, delta) >= outcome.reply.epsilon - 0.01
    train_metrics = ledger.records()[1]
    assert [type(r) for r in ledger.records()] == [AdapterRelease, NonPrivateRelease]
    assert train_metrics.release == "train_metrics" and train_metrics.run_id == "run-1"


def test_a_round_is_priced_by_one_accountant_call_and_records_what_ran(make_site, tiny_model_dir,
                                                                       monkeypatch):
    node = SiteNode(load_site_policy(make_site()))
    calls = []
    priced = SiteLedger.epsilon

    def counted(ledger, *args, **kwargs):
        calls.append(kwargs.get("then"))
        return priced(ledger, *args, **kwargs)

    monkeypatch.setattr(SiteLedger, "epsilon", counted)
    outcome = node.train(request(), start_state(tiny_model_dir))
    assert outcome.reply.accepted
    assert len([then for then in calls if then]) == 1  # the plan's, reused for the ledger
    ledger = SiteLedger(node.policy.ledger_path)
    (ran,) = ledger.mechanism_history()
    assert ran.steps == 3 and ledger.entries[0]["epsilon"] == outcome.reply.epsilon
    assert outcome.reply.epsilon == priced(ledger, node.policy.privacy.delta,
                                           node.policy.privacy.accountant_name)


def test_epsilon_accumulates_across_restarts_and_over_budget_round_is_declined(make_site, tiny_model_dir):
    policy_path = make_site(epsilon_cap=3.0)
    state = start_state(tiny_model_dir)
    first = SiteNode(load_site_policy(policy_path)).train(request(1, planned=1), state)
    assert first.reply.accepted and first.reply.epsilon <= 3.0
    restarted = SiteNode(load_site_policy(policy_path))  # a node restart: state comes from disk
    assert restarted.epsilon() == pytest.approx(first.reply.epsilon)
    second = restarted.train(request(2, planned=1), first.state)
    assert not second.reply.accepted
    assert "over its cap of 3" in second.reply.reason
    assert second.reply.epsilon == pytest.approx(first.reply.epsilon)  # nothing more was spent
    # a new run may only use what is left of the cumulative budget: far more noise
    new_run = restarted.train(request(1, planned=1, run="run-2"), state)
    assert new_run.reply.noise_multiplier > 3 * first.reply.noise_multiplier
    assert first.reply.epsilon < new_run.reply.epsilon <= 3.0


def test_policy_round_limit_and_delta_check(make_site, tiny_model_dir):
    node = SiteNode(load_site_policy(make_site(max_rounds=1)))
    state = start_state(tiny_model_dir)
    assert node.train(request(1), state).reply.accepted
    declined = node.train(request(2), state)
    assert not declined.reply.accepted and "at most 1 rounds" in declined.reply.reason
    with pytest.raises(ConfigError, match="not below 1/"):
        SiteNode(load_site_policy(make_site(name="tiny", records=20, delta=0.1)))


def test_patient_privacy_unit_groups_records(make_site):
    record_node = SiteNode(load_site_policy(make_site(name="by-record")))
    patient_node = SiteNode(load_site_policy(make_site(name="by-patient", unit="patient")))
    assert len(patient_node.train_units) < len(record_node.train_units)


def evaluate_request():
    from privatune.common.protocol import EvaluateRequest

    return EvaluateRequest(run_id="run-1", round=1, max_length=48, batch_size=8, lora_r=LORA.r,
                           lora_alpha=LORA.alpha, lora_targets="q_proj,v_proj")


def test_patient_windows_train_on_patients_and_evaluate_all_held_out_text(make_site, tiny_model_dir):
    """Window sampling: DP training (its runtime checks included) on one fresh window per
    drawn patient, accounted per patient; evaluation over every held-out token."""
    policy = load_site_policy(make_site(name="windows", unit="patient", patient_sampling="window"))
    assert policy.privacy.patient_sampling == "window"
    node = SiteNode(policy)
    outcome = node.train(request(), start_state(tiny_model_dir))
    assert outcome.reply.accepted
    entry = SiteLedger(policy.ledger_path).adapter_updates()[0]
    assert (entry["privacy_unit"], entry["patient_sampling"]) == ("patient", "window")
    assert entry["sample_rate"] == poisson_sample_rate(len(node.train_units), 8)  # per patient
    _, tokenizer = load_base_model(tiny_model_dir)
    heldout = node.dataset("heldout", tokenizer, 48)
    tokens = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # and eos
              for _, text in node.heldout_units]
    assert max(tokens) > 47 and len(heldout) > len(node.heldout_units)  # some patients span windows
    assert int((heldout.tensors[1] != -100).sum()) == sum(tokens)  # each token scored once
    assert node.evaluate(evaluate_request(), outcome.state).eval_loss > 0


def test_patient_truncate_keeps_one_cut_row_per_patient(make_site, tiny_model_dir):
    policy = load_site_policy(make_site(name="truncate", unit="patient", patient_sampling="truncate"))
    node = SiteNode(policy)
    _, tokenizer = load_base_model(tiny_model_dir)
    for split, units in (("train", node.train_units), ("heldout", node.heldout_units)):
        dataset = node.dataset(split, tokenizer, 48)
        expected = encode_pairs(tokenizer, units, 48)
        assert len(dataset) == len(units)  # one row per patient, whatever its text's length
        assert all(torch.equal(a, b) for a, b in zip(dataset.tensors, expected.tensors))
    assert node.train(request(), start_state(tiny_model_dir)).reply.accepted
    entry = SiteLedger(policy.ledger_path).adapter_updates()[0]
    assert (entry["privacy_unit"], entry["patient_sampling"]) == ("patient", "truncate")


def _tiny_batch(model_dir):
    model, tokenizer = load_base_model(model_dir)
    dataset = encode_pairs(tokenizer, [("", f"note {i} fever cough") for i in range(32)], 24)
    return attach_lora(model, LORA), dataset


SETTINGS = DPTrainSettings(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8, steps=2,
                           learning_rate=0.02, seed=0)


def test_missing_per_sample_gradients_stop_training(tiny_model_dir, monkeypatch):
    model, dataset = _tiny_batch(tiny_model_dir)
    monkeypatch.setattr(LoraGradSampleModule, "_gather",
                        lambda self: None)  # the per-sample gradients silently never arrive
    with pytest.raises(DPNotAppliedError, match="no per-sample gradients"):
        train_dp_round(model, dataset, SETTINGS)


def test_missing_noise_stops_training(tiny_model_dir, monkeypatch):
    model, dataset = _tiny_batch(tiny_model_dir)
    monkeypatch.setattr(LoraDPOptimizer, "add_noise", lambda self: [
        setattr(p, "grad", (p.summed_grad / self.expected_batch_size).view_as(p)) for p in self.params])
    with pytest.raises(DPNotAppliedError, match="no noise was added"):
        train_dp_round(model, dataset, SETTINGS)


def test_unchanged_parameters_stop_training(tiny_model_dir):
    model, dataset = _tiny_batch(tiny_model_dir)
    frozen = DPTrainSettings(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8,
                             steps=2, learning_rate=0.0, seed=0)
    with pytest.raises(DPNotAppliedError, match="did not change LoRA tensors"):
        train_dp_round(model, dataset, frozen)


def test_trainable_base_weights_are_refused(tiny_model_dir):
    model, dataset = _tiny_batch(tiny_model_dir)
    next(p for n, p in model.named_parameters() if "embed_tokens" in n).requires_grad_(True)
    with pytest.raises(DPNotAppliedError, match="non-LoRA parameters are trainable"):
        train_dp_round(model, dataset, SETTINGS)


def test_repeated_round_with_same_input_is_resent_without_new_spend(make_site, tiny_model_dir):
    """A coordinator that crashed and repeats a round gets the same update, at no extra epsilon."""
    node = SiteNode(load_site_policy(make_site()))
    state = start_state(tiny_model_dir)
    first = node.train(request(1), state)
    again = SiteNode(load_site_policy(node.policy.source)).train(request(1), state)
    assert again.reply.accepted and again.reply.epsilon == pytest.approx(first.reply.epsilon)
    assert all(torch.equal(again.state[n], first.state[n]) for n in first.state)
    ledger = SiteLedger(node.policy.ledger_path)
    assert len(ledger.adapter_updates()) == 1
    resend = ledger.records()[-1]
    assert resend.release == "resend" and resend.update_sha256 == update_hash(first.state)


def test_noise_seed_is_the_sites_own(make_site, tiny_model_dir):
    """The same request with different input twice must not reuse the noise: updates differ."""
    state = start_state(tiny_model_dir)
    a = SiteNode(load_site_policy(make_site(name="one", seed=5))).train(request(1), state)
    b = SiteNode(load_site_policy(make_site(name="two", seed=5))).train(request(1), state)
    assert any(not torch.equal(a.state[n], b.state[n]) for n in a.state)


# ------------------------------------------------------------------------------------ FFA-LoRA


def test_ffa_trains_sends_and_noises_b_alone(make_site, tiny_model_dir, monkeypatch):
    """Under ffa lora_A requires no gradient: Opacus gets no per-sample gradient of it and adds
    no noise to it, it does not move, and the node sends B alone."""
    sampled, noised = [], []
    gather, add_noise = LoraGradSampleModule._gather, LoraDPOptimizer.add_noise

    def gather_then_look(self):
        gather(self)
        sampled.extend(id(p) for p in self._module.parameters()
                       if getattr(p, "grad_sample", None) is not None)

    monkeypatch.setattr(LoraGradSampleModule, "_gather", gather_then_look)
    monkeypatch.setattr(LoraDPOptimizer, "add_noise",
                        lambda self: (noised.extend(id(p) for p in self.params), add_noise(self))[1])
    node = SiteNode(load_site_policy(make_site()))
    state = start_state(tiny_model_dir)
    outcome = node.train(request(aggregation="ffa"), state)
    assert outcome.reply.accepted

    model, _tokenizer = node.model_with_adapter(LORA)  # the node's one model, as it trained
    factors = {name: p for name, p in model.named_parameters() if "lora_" in name}
    a_ids = {id(p) for name, p in factors.items() if "lora_A" in name}
    b_ids = {id(p) for name, p in factors.items() if "lora_B" in name}
    assert sampled and set(sampled) == b_ids and set(noised) == b_ids
    trained = lora_state(model)
    b_names = {name for name in state if ".lora_B." in name}
    assert set(outcome.state) == b_names  # A never leaves the node
    assert all(torch.equal(trained[n], state[n]) for n in state if ".lora_A." in n)
    assert all(not torch.equal(outcome.state[n], state[n]) for n in b_names)
    assert a_ids and not any(p.requires_grad for n, p in factors.items() if "lora_A" in n)


def test_ffa_node_refuses_an_a_that_differs_from_the_runs_first(make_site, tiny_model_dir):
    node = SiteNode(load_site_policy(make_site()))
    state = start_state(tiny_model_dir)
    first = node.train(request(1, aggregation="ffa"), state)
    assert first.reply.accepted
    pinned = SiteLedger(node.policy.ledger_path).adapter_updates()[0]["frozen_a_sha256"]
    assert pinned == update_hash(frozen_part(state, "ffa"))
    spent = node.epsilon()

    after = with_update(state, first.state)  # the coordinator's next global adapter
    other_a = {name: t + 0.01 if ".lora_A." in name else t for name, t in after.items()}
    for asked, global_state, reason in (
            ("ffa", other_a, "frozen lora_A factors differ from those this site received"),
            ("fedavg", after, "a run's aggregation cannot change to fedavg"),
            ("median", after, "unknown aggregation 'median'")):
        declined = node.train(request(2, aggregation=asked), global_state)
        assert not declined.reply.accepted and reason in declined.reply.reason, asked
    assert node.epsilon() == spent  # nothing trained, nothing spent
    assert SiteLedger(node.policy.ledger_path).records()[-1].release == "decline"
    assert node.train(request(2, aggregation="ffa"), after).reply.accepted  # the run's own A


def anchored(base, reply):
    """``base`` carrying the coordinator's record of a site's last reply (head and spend)."""
    import dataclasses

    return dataclasses.replace(base, ledger_seq=reply.ledger_seq, ledger_hash=reply.ledger_hash,
                               ledger_epsilon=reply.epsilon, ledger_delta=reply.delta)


def test_node_refuses_a_rolled_back_ledger_until_acknowledged(make_site, tiny_model_dir, capsys):
    """A ledger restored from an old backup lacks the head the site reported: the node declines
    (saying how to acknowledge) until an operator does, and its epsilon never drops below the
    spend it had reported."""
    import shutil

    from privatune.common.audit import audit_ledger
    from privatune.common.cli import main

    policy_path = make_site(epsilon_cap=20.0)
    node = SiteNode(load_site_policy(policy_path))
    ledger_path = node.policy.ledger_path
    state = start_state(tiny_model_dir)
    first = node.train(request(1, planned=20), state)
    assert first.reply.ledger_seq == len(SiteLedger(ledger_path).entries)  # after its own entries
    backup = shutil.copy(ledger_path, ledger_path.with_suffix(".bak"))
    second = node.train(anchored(request(2, planned=20), first.reply), first.state)
    assert second.reply.accepted and second.reply.epsilon > first.reply.epsilon
    assert second.reply.accountant == "opacus-prv"

    shutil.copy(backup, ledger_path)  # the ledger is restored from the old backup
    refused = node.train(anchored(request(3, planned=20), second.reply), second.state)
    assert not refused.reply.accepted and "has lost releases" in refused.reply.reason
    assert f"--site {policy_path} --acknowledge-ledger-rollback" in refused.reply.reason
    # the coordinator now holds the declining reply's head, which the ledger has: still refused
    again = node.train(anchored(request(3, planned=20), refused.reply), second.state)
    assert not again.reply.accepted and again.reply.reason == refused.reply.reason
    assert len(SiteLedger(ledger_path).adapter_updates()) == 1

    assert main(["node", "--site", str(policy_path), "--acknowledge-ledger-rollback"]) == 0
    assert "rollback acknowledged" in capsys.readouterr().out
    privacy = node.policy.privacy
    acknowledged = SiteLedger(ledger_path)
    # the lost round stays counted: the reported spend is a floor under the site's epsilon
    assert acknowledged.epsilon(privacy.delta, privacy.accountant_name) >= second.reply.epsilon
    resumed = node.train(anchored(request(3, planned=20), again.reply), second.state)
    assert resumed.reply.accepted and resumed.reply.epsilon > second.reply.epsilon
    assert resumed.reply.delta == pytest.approx(2 * node.policy.privacy.delta)
    # nothing left to acknowledge; the audit understands the acknowledgement's floor
    assert main(["node", "--site", str(policy_path), "--acknowledge-ledger-rollback"]) == 2
    audit = audit_ledger(ledger_path)
    assert audit.ok, audit.problems
    assert audit.recorded_epsilon == pytest.approx(resumed.reply.epsilon)


def test_a_process_keeps_one_node_per_site_until_its_policy_or_data_changes(make_site):
    """Flower's Ray backend unpickles a fresh ClientApp for every message, so the node (its
    records, tokenized once) is kept per process; an edited policy or data file rebuilds it, so
    the site's new cap applies from the next message."""
    import os

    from privatune.client.app import process_node

    path = make_site()
    node = process_node(path)
    assert process_node(path) is node
    path.write_text(path.read_text().replace("epsilon_cap: 8.0", "epsilon_cap: 2.0"))
    tightened = process_node(path)
    assert tightened is not node and tightened.policy.privacy.epsilon_cap == 2.0
    assert process_node(path) is tightened
    data = tightened.policy.data_path
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 1_000_000))
    assert process_node(path) is not tightened


def test_judged_only_trains_and_scores_the_notes_the_marker_splits(make_site, tiny_model_dir):
    """training.loss_on: judged: a round samples only the notes the marker splits, at the rate
    of their count (the ledger prices that rate), and the held-out loss is over them too; a
    site whose unit is the patient declines before spending anything."""
    path = make_site(name="mixed")
    data = load_site_policy(path).data_path
    lines = data.read_text().splitlines()
    # every third note loses its marker: a note the evaluation never judges
    data.write_text("".join((line.replace("Assessment:", "Impression:") if i % 3 == 0 else line)
                            + "\n" for i, line in enumerate(lines)))
    node = SiteNode(load_site_policy(path))
    judged = dataclasses.replace(request(), loss_marker="Assessment:", judged_only=True)
    trained = node.trained_units("Assessment:", True)
    assert 0 < trained < len(node.train_units) == node.trained_units("Assessment:", False)
    _, tokenizer = load_base_model(tiny_model_dir)
    rows = node.dataset("train", tokenizer, 48, loss_marker="Assessment:", judged_only=True)
    assert len(rows) == trained
    assert all(labels[1] == -100 for labels in rows.tensors[1])  # each has a prompt before its loss

    outcome = node.train(judged, start_state(tiny_model_dir))
    assert outcome.reply.accepted and outcome.reply.num_examples == trained
    assert SiteLedger(node.policy.ledger_path).adapter_updates()[0]["sample_rate"] == \
        poisson_sample_rate(trained, 8)
    scored = dataclasses.replace(evaluate_request(), loss_marker="Assessment:", judged_only=True)
    heldout = node.dataset("heldout", tokenizer, 48, loss_marker="Assessment:", judged_only=True)
    assert 0 < len(heldout) < len(node.heldout_units)
    assert node.evaluate(scored, outcome.state).eval_loss > 0

    patient = SiteNode(load_site_policy(make_site(name="by-patient", unit="patient")))
    declined = patient.train(judged, start_state(tiny_model_dir))
    assert not declined.reply.accepted and "record unit" in declined.reply.reason
    assert SiteLedger(patient.policy.ledger_path).adapter_updates() == []
