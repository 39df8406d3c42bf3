"""Privacy-critical input defects: non-finite values, request bounds, duplicates, per-run budget,
evaluations per run."""

from __future__ import annotations

import json
import math
import re
import time

import pytest
import torch
import yaml

import privatune.client.node as node_module
from privatune.client.data import DataError
from privatune.client.node import SiteNode
from privatune.client.policy import load_site_policy
from privatune.common.config import (ConfigError, EvaluationConfig, FederationConfig, JobConfig,
                                     LoraConfig, ModelConfig, TrainingConfig, load_job_config)
from privatune.common.ledger import SiteLedger
from privatune.common.lora import initial_adapter, lora_state
from privatune.common.privacy import calibrate_noise_multiplier
from privatune.common.protocol import EvaluateRequest, TrainRequest
from privatune.server.coordinator import Coordinator
from privatune.server.coordinator_settings import CoordinatorSettings
from privatune.server.report import RunReport
from privatune.server.report_markdown import render_markdown
from privatune.server.transport import EvaluateResult, TrainResult

LORA = LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj"))


def request(round_number: int = 1, planned: int = 2, run: str = "run-1", **changes) -> TrainRequest:
    values = dict(run_id=run, round=round_number, planned_rounds=planned, local_steps=2,
                  batch_size=8, learning_rate=0.02, max_grad_norm=1.0, max_length=48,
                  lora_r=LORA.r, lora_alpha=LORA.alpha, lora_targets="q_proj,v_proj")
    return TrainRequest(**{**values, **changes})


@pytest.fixture
def start_state(tiny_model_dir):
    return lora_state(initial_adapter(tiny_model_dir, LORA, seed=0))


def edit_policy(path, section: str, **values):
    data = yaml.safe_load(path.read_text())
    data.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------ non-finite values (NaN, inf)


@pytest.mark.parametrize("key", ["epsilon_cap", "min_noise_multiplier", "delta"])
@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_site_policy_refuses_non_finite_privacy_values(make_site, key, value):
    path = make_site()
    path.write_text(re.sub(rf"^(  {key}:).*$", rf"\1 {value}", path.read_text(), flags=re.M))
    with pytest.raises(ConfigError) as err:
        load_site_policy(path)
    message = str(err.value)
    assert str(path) in message and f"privacy.{key}" in message and "line" in message
    assert "not a finite number" in message


@pytest.mark.parametrize("key", ["privacy.epsilon", "privacy.delta", "privacy.min_noise_multiplier",
                                 "training.learning_rate"])
def test_job_config_override_refuses_nan(tmp_path, key):
    path = tmp_path / "job.yaml"
    path.write_text("seed: 0\n")
    with pytest.raises(ConfigError, match=f"{key}: nan is not a finite number"):
        load_job_config(path, [f"{key}=.nan"])


def test_noise_calibration_refuses_nan_and_unreachable_targets_quickly():
    started = time.monotonic()
    with pytest.raises(ValueError, match="epsilon must be a positive finite number"):
        calibrate_noise_multiplier(math.nan, 1e-5, 0.1, 10)
    with pytest.raises(ValueError, match="delta must be in"):
        calibrate_noise_multiplier(8.0, math.nan, 0.1, 10)
    with pytest.raises(ValueError, match="no noise multiplier up to"):
        calibrate_noise_multiplier(1e-9, 1e-5, 1.0, 1000)
    assert time.monotonic() - started < 60  # bounded searches, not an endless loop


def test_request_with_non_finite_float_is_refused_by_the_codec():
    record = request().to_record() | {"learning_rate": math.nan}
    with pytest.raises(ValueError, match="learning_rate is nan, not a finite number"):
        TrainRequest.from_record(record)


# ------------------------------------------------------------------ request bounds, non-finite update


@pytest.mark.parametrize("change, field", [
    ({"learning_rate": 1e9}, "learning_rate"), ({"learning_rate": math.nan}, "learning_rate"),
    ({"local_steps": 10**6}, "local_steps"), ({"batch_size": 0}, "batch_size"),
    ({"max_length": 10**6}, "max_length"), ({"max_grad_norm": math.inf}, "max_grad_norm"),
    ({"lora_r": 1024}, "lora_r"), ({"max_physical_batch_size": -1}, "max_physical_batch_size"),
])
def test_request_outside_site_limits_is_declined_before_training(make_site, start_state, change, field):
    node = SiteNode(load_site_policy(make_site()))
    outcome = node.train(request(**change), start_state)
    assert not outcome.reply.accepted and not outcome.state
    assert f"request {field}" in outcome.reply.reason and "limits" in outcome.reply.reason
    assert node.epsilon() == 0.0
    assert [e.get("release") for e in node.ledger.entries] == ["decline"]


@pytest.mark.parametrize("run_id", ["", "r" * 129, "run\n1"])
def test_run_ids_are_bounded(make_site, start_state, run_id):
    outcome = SiteNode(load_site_policy(make_site())).train(request(run=run_id), start_state)
    assert not outcome.reply.accepted and "run_id must be 1 to 128 printable" in outcome.reply.reason


def test_lora_targets_within_the_sites_list(make_site, start_state):
    path = edit_policy(make_site(), "limits", lora_target_modules=["q_proj"])
    outcome = SiteNode(load_site_policy(path)).train(request(), start_state)
    assert not outcome.reply.accepted and "lora_targets v_proj are outside" in outcome.reply.reason


def test_site_limits_are_the_sites_to_set(make_site, start_state):
    path = edit_policy(make_site(), "limits", max_learning_rate=0.01)
    outcome = SiteNode(load_site_policy(path)).train(request(learning_rate=0.02), start_state)
    assert not outcome.reply.accepted and "must be > 0 and <= 0.01" in outcome.reply.reason


def test_non_finite_update_is_withheld_and_its_epsilon_stays_counted(make_site, start_state,
                                                                      monkeypatch):
    real_train = node_module.train_dp_round

    def diverging(model, dataset, settings):
        result = real_train(model, dataset, settings)
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(math.nan)
        return result

    monkeypatch.setattr(node_module, "train_dp_round", diverging)
    node = SiteNode(load_site_policy(make_site()))
    outcome = node.train(request(), start_state)
    assert not outcome.reply.accepted and not outcome.state
    assert "not finite" in outcome.reply.reason and "stays counted" in outcome.reply.reason
    updates = SiteLedger(node.policy.ledger_path).adapter_updates()
    assert len(updates) == 1 and "withheld" in updates[0] and "update_sha256" not in updates[0]
    assert outcome.reply.epsilon == pytest.approx(updates[0]["epsilon"]) and outcome.reply.epsilon > 0


# ------------------------------------------------------------------ duplicate records


def _double_every_line(policy_path) -> None:
    data_path = load_site_policy(policy_path).data_path
    lines = data_path.read_text().splitlines()
    data_path.write_text("".join(f"{line}\n{line}\n" for line in lines))


def test_exact_duplicates_count_as_one_privacy_unit(make_site):
    single = SiteNode(load_site_policy(make_site("once", records=80, seed=3)))
    path = make_site("twice", records=80, seed=3)
    _double_every_line(path)
    doubled = SiteNode(load_site_policy(path))
    assert len(doubled.duplicates) == 80
    assert len(doubled.train_units) == len(single.train_units)
    assert len(doubled.heldout_units) == len(single.heldout_units)


def test_duplicates_refused_by_policy_name_the_file_and_line(make_site):
    path = edit_policy(make_site(records=40), "site", duplicates="refuse")
    _double_every_line(path)
    with pytest.raises(DataError) as err:
        SiteNode(load_site_policy(path))
    assert "40 exact duplicate records" in str(err.value) and ".jsonl:2" in str(err.value)


def test_same_text_of_two_patients_is_not_a_duplicate(make_site):
    path = make_site(records=10)
    data_path = load_site_policy(path).data_path
    rows = [json.dumps({"text": "Assessment: same note. Plan: rest.", "patient_id": f"p{i}"})
            for i in range(30)]
    data_path.write_text("\n".join(rows) + "\n")
    node = SiteNode(load_site_policy(path))
    assert not node.duplicates and len(node.train_units) + len(node.heldout_units) == 30


# ------------------------------------------------------------------ per-run budget, number of runs


def test_one_request_cannot_spend_the_lifetime_budget_past_the_per_run_budget(make_site, start_state):
    path = make_site(epsilon_cap=8.0, epsilon_per_run=2.0)
    node = SiteNode(load_site_policy(path))
    outcome = node.train(request(planned=1), start_state)
    assert outcome.reply.accepted
    assert outcome.reply.epsilon <= 2.0 + 1e-9
    again = node.train(request(round_number=2, planned=1), outcome.state)
    assert not again.reply.accepted and "per-run budget of 2" in again.reply.reason
    # a new run may spend its own per-run budget, still within the lifetime cap
    other = node.train(request(run="run-2", planned=1), outcome.state)
    assert other.reply.accepted and 2.0 < other.reply.epsilon <= 8.0


def test_per_run_budget_defaults_to_the_lifetime_cap(make_site):
    privacy = load_site_policy(make_site(epsilon_cap=5.0)).privacy
    assert privacy.epsilon_per_run is None and privacy.run_budget == 5.0


def test_new_runs_cannot_escape_max_rounds(make_site, start_state):
    path = make_site(max_rounds=1, max_runs=2)
    node = SiteNode(load_site_policy(path))
    assert node.train(request(run="run-1"), start_state).reply.accepted
    assert "at most 1 rounds per run" in node.train(request(2, run="run-1"), start_state).reply.reason
    assert node.train(request(run="run-2"), start_state).reply.accepted
    third = node.train(request(run="run-3"), start_state)
    assert not third.reply.accepted and "at most 2 runs" in third.reply.reason



# ------------------------------------------------------------------ evaluation requests


def evaluation(round_number: int = 0, run: str = "run-1", **changes) -> EvaluateRequest:
    values = dict(run_id=run, round=round_number, max_length=48, batch_size=8, lora_r=LORA.r,
                  lora_alpha=LORA.alpha, lora_targets="q_proj,v_proj")
    return EvaluateRequest(**{**values, **changes})


def test_evaluations_per_run_are_bounded_and_counted_even_when_withheld(make_site, start_state):
    path = edit_policy(make_site(), "limits", max_evaluations_per_run=2)
    path = edit_policy(path, "release", eval_loss=False, example_count=False)
    node = SiteNode(load_site_policy(path))
    first, second = (node.evaluate(evaluation(r), start_state) for r in (0, 1))
    assert first.accepted and second.accepted and first.eval_loss is None  # withheld, answered
    third = node.evaluate(evaluation(2), start_state)
    assert not third.accepted and third.eval_loss is None
    assert "at most 2 evaluations per run" in third.reason and "already answered 2" in third.reason
    # the count is the ledger's, so a restarted node (a new process) keeps it
    assert not SiteNode(load_site_policy(path)).evaluate(evaluation(3), start_state).accepted
    assert node.evaluate(evaluation(0, run="run-2"), start_state).accepted  # a run of its own
    releases = [(e["run_id"], e["release"]) for e in SiteLedger(node.policy.ledger_path).entries]
    assert releases == [("run-1", "evaluate_metrics")] * 2 + [("run-1", "decline")] * 2 + [
        ("run-2", "evaluate_metrics")]


def test_evaluations_per_run_default_to_every_round_of_the_longest_run(make_site):
    policy = load_site_policy(make_site(max_rounds=7))
    assert policy.limits.max_evaluations_per_run is None and policy.max_evaluations_per_run == 8


@pytest.mark.parametrize("change, field", [
    ({"max_length": 10**6}, "max_length"), ({"batch_size": 0}, "batch_size"),
    ({"lora_r": 1024}, "lora_r"), ({"max_new_tokens": 10**6}, "max_new_tokens"),
    ({"max_examples": 257}, "max_examples"), ({"run_id": "r" * 129}, "run_id"),
])
def test_evaluate_request_outside_site_limits_is_declined(make_site, start_state, change, field):
    node = SiteNode(load_site_policy(make_site()))
    reply = node.evaluate(evaluation(**change), start_state)
    assert not reply.accepted and f"request {field}" in reply.reason and reply.eval_loss is None
    assert node.evaluations_answered("run-1") == 0


def test_evaluate_request_lora_targets_within_the_sites_list(make_site, start_state):
    path = edit_policy(make_site(), "limits", lora_target_modules=["q_proj"])
    reply = SiteNode(load_site_policy(path)).evaluate(evaluation(), start_state)
    assert not reply.accepted and "lora_targets v_proj are outside" in reply.reason


class NodesTransport:
    """Real site nodes in this process, reached directly (no Flower): node id -> SiteNode."""

    def __init__(self, nodes: dict[int, SiteNode]):
        self.nodes = nodes

    def node_ids(self) -> list[int]:
        return list(self.nodes)

    def node_sites(self) -> None:
        return None  # not authenticated: sites are known by the names they report

    def train(self, requests, state, timeout_s):
        outcomes = [(n, self.nodes[n].train(request, state)) for n, request in requests.items()]
        return [TrainResult(n, o.reply, o.state) for n, o in outcomes], []

    def evaluate(self, requests, state, timeout_s):
        return [EvaluateResult(n, self.nodes[n].evaluate(request, state))
                for n, request in requests.items()], []


def test_coordinator_run_with_a_site_declining_evaluation_completes(make_site, tiny_model_dir,
                                                                    tmp_path):
    strict = edit_policy(make_site("north", seed=1), "limits", max_evaluations_per_run=2)
    nodes = {1: SiteNode(load_site_policy(strict)),
             2: SiteNode(load_site_policy(make_site("south", seed=2)))}
    job = JobConfig(model=ModelConfig(max_length=48), lora=LoraConfig(r=2, alpha=4,
                    target_modules=("q_proj", "v_proj")),
                    training=TrainingConfig(local_steps=2, batch_size=8, learning_rate=0.02,
                                            eval_batch_size=8),
                    federation=FederationConfig(rounds=2, min_nodes=2, min_replies=2,
                                                node_wait_s=1.0),
                    evaluation=EvaluationConfig(every_k_rounds=0), tracking="none")
    settings = CoordinatorSettings(job=job, model_dir=tiny_model_dir, out_dir=tmp_path / "run",
                                   run_id="run-1")
    report = Coordinator(settings, NodesTransport(nodes), progress=lambda _line: None).run()
    last = report.rounds[-1]
    assert last.training.participants == ["north", "south"]  # training goes on
    assert "at most 2 evaluations per run" in last.evaluation.evaluation_declined["north"]
    assert set(last.evaluation.site_perplexity) == {"south"}
    assert report.sites["north"].final_perplexity is None
    assert report.sites["south"].final_perplexity is not None
    assert RunReport.from_json(report.to_json()).rounds[-1].evaluation.evaluation_declined == {
        "north": last.evaluation.evaluation_declined["north"]}
    assert "north (evaluation): site policy allows at most 2" in render_markdown(report)
