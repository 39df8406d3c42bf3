"""The coordinator's round loop through a fake transport: no Flower runtime, no training, seconds.

Each fake node answers a train request with a behaviour chosen by the test (an update of given
tensors and example count, a decline, silence, a malformed update); evaluation answers with a
fixed loss per site. The real parts are the Coordinator, FedAvg, validation, checkpoints and the
report records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from privatune.common.config import FederationConfig, JobConfig, LoraConfig, TrainingConfig
from privatune.common.lora import (frozen_part, load_adapter, load_base_model, lora_state,
                                   merged_model, trained_part)
from privatune.common.protocol import (ADAPTER_KEY, METRICS_KEY, STATUS_KEY, EvaluateReply,
                                       EvaluateRequest, TrainReply, TrainRequest, evaluate_request,
                                       requested_lora, train_request)
from privatune.common.run_record import latest_checkpoint
from privatune.server.app import FlowerTransport
from privatune.server.checkpoints import CheckpointState, SiteTally
from privatune.server.coordinator import Coordinator
from privatune.server.coordinator_settings import CoordinatorSettings
from privatune.server.report import RunReport
from privatune.server.report_files import write_report
from privatune.server.report_markdown import render_markdown
from privatune.server.rounds import RoundRecord
from privatune.server.transport import EvaluateResult, TrainResult
from tests.conftest import write_notes

SITES = {1: "alpha", 2: "beta", 3: "gamma"}
EVAL_LOSS = {"alpha": 2.0, "beta": 3.0, "gamma": 4.0}
State = dict[str, torch.Tensor]
# a node's answer to a train request: a reply with its update, or a failure text
Behaviour = Callable[[int, TrainRequest, Mapping[str, torch.Tensor]], "TrainResult | str"]


def job(rounds: int = 1, min_replies: int = 2, nodes: int = 3, **federation) -> JobConfig:
    # learning rate 1: the fake nodes' random updates stay within what Adam could move
    return JobConfig(seed=5, lora=LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj")),
                     training=TrainingConfig(learning_rate=1.0),
                     federation=FederationConfig(rounds=rounds, min_nodes=nodes, min_replies=min_replies,
                                                 node_wait_s=1.0, round_timeout_s=5.0, **federation))


def random_state(like: Mapping[str, torch.Tensor], seed: int) -> State:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(t.shape, generator=generator) for name, t in like.items()}


def update(state_seed: int, examples: int) -> Behaviour:
    """An update of random values for the tensors the request's aggregation trains (ffa: B)."""
    def answer(node: int, request: TrainRequest, state: Mapping[str, torch.Tensor]) -> TrainResult:
        reply = TrainReply(site=SITES[node], accepted=True, num_examples=examples,
                           epsilon=0.5 * request.round, delta=1e-5, epsilon_budget=8.0,
                           noise_multiplier=1.1, train_loss=2.5)
        return TrainResult(node, reply,
                           random_state(trained_part(state, request.aggregation), state_seed))
    return answer


def tampered(defect: str) -> Behaviour:
    """An accepted reply whose update does not fit: a wrong shape, or NaN."""
    def answer(node: int, request: TrainRequest, state: Mapping[str, torch.Tensor]) -> TrainResult:
        result = update(7, 50)(node, request, state)
        name = next(iter(result.state))
        tensor = result.state[name]
        result.state[name] = (torch.zeros(tensor.shape[0] + 1, *tensor.shape[1:]) if defect == "shape"
                              else tensor.clone().fill_(math.nan))
        return result
    return answer


def decline(reason: str) -> Behaviour:
    def answer(node: int, request: TrainRequest, state: Mapping[str, torch.Tensor]) -> TrainResult:
        return TrainResult(node, TrainReply(site=SITES[node], accepted=False, reason=reason,
                                            epsilon=7.9, delta=1e-5, epsilon_budget=8.0))
    return answer


def silent(node: int, request: TrainRequest, state: Mapping[str, torch.Tensor]) -> str:
    return f"node {node}: no reply within 5 s"


class LedgeredSite:
    """A fake node that keeps a real ledger as an honest node does: it checks the head the
    request carries, appends its release (mechanism and update hash) and its metrics, and
    replies with its spend, its accountant and its head after those entries."""

    def __init__(self, ledger: Path, answer: Behaviour, noise: float = 0.9):
        self.path, self.answer, self.noise = ledger, answer, noise

    def __call__(self, node: int, request: TrainRequest, state: Mapping[str, torch.Tensor]):
        import dataclasses

        from privatune.common.ledger import LedgerHead, SiteLedger, head_problem
        from privatune.common.ledger_records import ADAPTER_UPDATE, NON_PRIVATE
        from privatune.common.lora import update_hash
        from privatune.common.privacy import RDP, MechanismStep, epsilon_of

        ledger = SiteLedger(self.path)
        assert head_problem(ledger.entries, LedgerHead(request.ledger_seq, request.ledger_hash)) is None
        result = self.answer(node, request, state)
        step = MechanismStep(self.noise, 0.05, 20)
        epsilon = epsilon_of([*ledger.mechanism_history(), step], 1e-5, RDP)
        ledger.append(ADAPTER_UPDATE, {"run_id": request.run_id, "round": request.round,
                                       "privacy_unit": "record", "noise_multiplier": self.noise,
                                       "sample_rate": 0.05, "steps": 20, "max_grad_norm": 1.0,
                                       "accountant": RDP, "delta": 1e-5, "epsilon": epsilon,
                                       "update_sha256": update_hash(result.state)})
        ledger.append(NON_PRIVATE, {"run_id": request.run_id, "round": request.round,
                                    "release": "train_metrics", "values": {"num_examples": 1}})
        reply = dataclasses.replace(
            result.reply, epsilon=epsilon, delta=1e-5, epsilon_budget=8.0, accountant=RDP,
            ledger_seq=ledger.head.seq, ledger_hash=ledger.head.hash)
        return TrainResult(node, reply, result.state)


class FakeTransport:
    """Answers train requests with each node's behaviour; evaluation with a fixed loss per site."""

    def __init__(self, behaviours: Mapping[int, Behaviour]):
        self.behaviours = dict(behaviours)
        self.train_requests: list[TrainRequest] = []  # the first node's request of each round
        self.node_requests: list[dict[int, TrainRequest]] = []  # every node's, by round
        self.evaluate_requests: list[EvaluateRequest] = []

    def node_ids(self) -> list[int]:
        return list(self.behaviours)

    def node_sites(self) -> None:
        return None  # not authenticated: sites are known by the names they report

    def train(self, requests: Mapping[int, TrainRequest], state: Mapping[str, torch.Tensor],
              timeout_s: float) -> tuple[list[TrainResult], list[str]]:
        self.train_requests.append(next(iter(requests.values())))
        self.node_requests.append(dict(requests))
        results, failures = [], []
        for node, request in requests.items():
            answer = self.behaviours[node](node, request, state)
            (failures if isinstance(answer, str) else results).append(answer)
        return results, failures

    def evaluate(self, requests: Mapping[int, EvaluateRequest], state: Mapping[str, torch.Tensor],
                 timeout_s: float) -> tuple[list[EvaluateResult], list[str]]:
        self.evaluate_requests.append(next(iter(requests.values())))
        return [EvaluateResult(n, EvaluateReply(site=SITES[n], num_examples=10,
                                                eval_loss=EVAL_LOSS[SITES[n]]))
                for n in requests], []


def coordinator(tmp_path: Path, model_dir: Path, transport: FakeTransport, **job_args) -> Coordinator:
    settings = CoordinatorSettings(job=job(**job_args), model_dir=model_dir, out_dir=tmp_path / "run",
                                   run_id="test-run")
    return Coordinator(settings, transport, progress=lambda _line: None)


def assert_same_state(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)


# ------------------------------------------------------------------------------------ FedAvg


def test_global_adapter_is_the_example_weighted_average(tmp_path, tiny_model_dir):
    transport = FakeTransport({1: update(1, 100), 2: update(2, 300), 3: update(3, 600)})
    coord = coordinator(tmp_path, tiny_model_dir, transport)
    start = dict(coord.global_state)
    report = coord.run()

    states = [random_state(start, seed) for seed in (1, 2, 3)]
    expected = {n: (100 * states[0][n] + 300 * states[1][n] + 600 * states[2][n]) / 1000 for n in start}
    assert_same_state(coord.global_state, expected)
    # the final adapter on disk (PEFT format) and the checkpoint hold the same tensors
    assert_same_state(lora_state(load_adapter(tiny_model_dir, tmp_path / "run" / "adapter")), expected)
    assert latest_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "round_001"

    assert [r.round for r in report.rounds] == [0, 1]
    first = report.rounds[1]
    assert first.participants == ["alpha", "beta", "gamma"] and first.training.aggregated
    assert first.epsilon == {"alpha": 0.5, "beta": 0.5, "gamma": 0.5}
    assert report.rounds[0].training is None and report.rounds[0].epsilon is None
    # the request carried the job's plan and LoRA shape
    request = transport.train_requests[0]
    assert request.round == 1 and requested_lora(request) == coord.settings.job.lora
    # federated perplexity is example-weighted over the sites (10 examples each here)
    assert first.evaluation.federated_perplexity == pytest.approx(math.exp(3.0))
    alpha = report.sites["alpha"]
    assert alpha.rounds_participated == [1] and alpha.epsilon == 0.5 and alpha.epsilon_budget == 8.0
    assert alpha.base_perplexity == alpha.final_perplexity == pytest.approx(math.exp(2.0))


def test_a_run_evaluated_only_at_its_end_asks_the_sites_once(tmp_path, tiny_model_dir):
    """A local-only baseline's setting: rounds train as ever, only the final adapter is judged."""
    transport = FakeTransport({1: update(1, 100), 2: update(2, 300), 3: update(3, 600)})
    settings = CoordinatorSettings(job=job(rounds=3), model_dir=tiny_model_dir,
                                   out_dir=tmp_path / "run", run_id="test-run",
                                   evaluate_each_round=False)
    report = Coordinator(settings, transport, progress=lambda _line: None).run()
    assert [r.round for r in transport.evaluate_requests] == [3]
    assert [r.round for r in report.rounds] == [0, 1, 2, 3] and len(transport.train_requests) == 3
    alpha = report.sites["alpha"]
    assert alpha.base_perplexity is None and alpha.final_perplexity == pytest.approx(math.exp(2.0))


# ------------------------------------------------------------------------ FFA-LoRA against FedAvg

WEIGHTS = (100, 300, 600)


def lora_products(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """B·A of every LoRA layer of an adapter state: what the adapter adds to that layer's weight."""
    return {name.removesuffix(".lora_A.weight"): state[name.replace("lora_A", "lora_B")].double()
            @ state[name].double() for name in state if name.endswith(".lora_A.weight")}


def mean_products(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The example-weighted mean of the sites' B·A."""
    products = [lora_products(s) for s in states]
    return {layer: sum(w * p[layer] for w, p in zip(WEIGHTS, products)) / sum(WEIGHTS)
            for layer in products[0]}


def federate(tmp_path: Path, model_dir: Path, aggregation: str, **settings):
    transport = FakeTransport({n: update(n, w) for n, w in zip(SITES, WEIGHTS)})
    coord = Coordinator(CoordinatorSettings(job=job(aggregation=aggregation), model_dir=model_dir,
                                            out_dir=tmp_path / aggregation, run_id="test-run",
                                            **settings), transport, progress=lambda _line: None)
    start = dict(coord.global_state)
    report = coord.run()
    # each site's adapter after its round: the global one with its update put in
    sites = [{**start, **random_state(trained_part(start, aggregation), seed)} for seed in SITES]
    return coord, start, sites, report


def test_ffa_aggregation_is_exact_and_fedavg_is_not(tmp_path, tiny_model_dir):
    """ffa: the sites share A, so the mean of their B·A is the averaged B times A, exactly;
    fedavg averages A and B separately, which is not the mean of the sites' B·A."""
    central = write_notes(tmp_path / "central.jsonl", 12, seed=9)
    coord, start, sites, report = federate(tmp_path, tiny_model_dir, "ffa", central_eval=central)
    frozen = frozen_part(start, "ffa")
    assert frozen and all(".lora_A." in name for name in frozen)
    assert_same_state(frozen_part(coord.global_state, "ffa"), frozen)  # A kept as initialised
    merged, wanted = lora_products(coord.global_state), mean_products(sites)
    for layer, product in merged.items():
        torch.testing.assert_close(product, wanted[layer], rtol=1e-5, atol=1e-6, msg=layer)

    fedavg_coord, _start, fedavg_sites, _report = federate(tmp_path, tiny_model_dir, "fedavg")
    merged, wanted = lora_products(fedavg_coord.global_state), mean_products(fedavg_sites)
    assert all(not torch.allclose(merged[layer], wanted[layer], rtol=0.1) for layer in merged)

    # the saved adapter (PEFT format) is the ffa global state, A included; merged into the base
    # weights (export --merged) it adds scaling * B A to each layer; central evaluation ran on it
    out = tmp_path / "ffa" / "adapter"
    assert_same_state(lora_state(load_adapter(tiny_model_dir, out)), coord.global_state)
    release, _tokenizer = merged_model(tiny_model_dir, out)
    base, _tokenizer = load_base_model(tiny_model_dir)
    scaling = coord.settings.job.lora.alpha / coord.settings.job.lora.r
    for layer, product in lora_products(coord.global_state).items():
        module = layer.removeprefix("base_model.model.")
        added = (release.get_submodule(module).weight.double()
                 - base.get_submodule(module).weight.double())
        torch.testing.assert_close(added, scaling * product, rtol=1e-4, atol=1e-6, msg=layer)
    assert math.isfinite(report.central.final_perplexity)


def test_ffa_sends_half_the_bytes_of_fedavg_at_the_same_rank(tmp_path, tiny_model_dir):
    """An update under ffa is B alone: for a layer of d_in -> d_out at rank r, B is d_out x r and
    A is r x d_in, so ffa sends d_out / (d_in + d_out) of fedavg's bytes; q_proj and v_proj of
    the tiny model are 32 -> 32 (as many key/value heads as heads), so exactly half."""
    _coord, start, _sites, ffa = federate(tmp_path, tiny_model_dir, "ffa")
    _coord, _start, _sites, fedavg = federate(tmp_path, tiny_model_dir, "fedavg")
    b_values = sum(t.numel() for n, t in start.items() if ".lora_B." in n)
    a_values = sum(t.numel() for n, t in start.items() if ".lora_A." in n)
    assert b_values == a_values  # square projections
    ffa_round, fedavg_round = ffa.rounds[1].training, fedavg.rounds[1].training
    assert ffa_round.update_bytes == {site: 4 * b_values for site in SITES.values()}
    assert fedavg_round.update_bytes == {site: 4 * (a_values + b_values) for site in SITES.values()}
    assert ffa_round.bytes_received * 2 == fedavg_round.bytes_received
    # the global adapter still goes out whole (A and B): each node checks the A it trains against
    assert ffa_round.bytes_sent == fedavg_round.bytes_sent == 3 * 4 * (a_values + b_values)
    shown = render_markdown(ffa)
    assert "## Traffic" in shown and "Aggregation `ffa`" in shown
    assert f"| 1 | {3 * 4 * (a_values + b_values)} | {3 * 4 * b_values} | alpha {4 * b_values}, " \
           in shown


# ------------------------------------------------------------------------ too few, declines, failures


def test_too_few_usable_updates_keep_the_adapter_unchanged(tmp_path, tiny_model_dir):
    transport = FakeTransport({1: update(1, 100), 2: silent, 3: decline("over budget")})
    coord = coordinator(tmp_path, tiny_model_dir, transport)
    start = dict(coord.global_state)
    report = coord.run()

    assert_same_state(coord.global_state, start)
    training = report.rounds[1].training
    assert not training.aggregated and training.participants == ["alpha"]
    assert training.failures == ["node 2: no reply within 5 s"]
    assert training.declined == {"gamma": "over budget"}


def test_decline_is_recorded_with_its_reason_and_the_sites_spend(tmp_path, tiny_model_dir):
    reason = "round 1 would raise this site's epsilon to 8.2, over its cap of 8"
    transport = FakeTransport({1: update(1, 100), 2: update(2, 100), 3: decline(reason)})
    report = coordinator(tmp_path, tiny_model_dir, transport).run()

    training = report.rounds[1].training
    assert training.aggregated and training.participants == ["alpha", "beta"]
    assert training.declined == {"gamma": reason} and training.failures == []
    gamma = report.sites["gamma"]
    assert gamma.rounds_participated == [] and gamma.epsilon == 7.9 and gamma.noise_multiplier is None
    assert f"gamma: {reason}" in render_markdown(report)


def test_silent_node_is_a_failure_and_the_round_goes_on(tmp_path, tiny_model_dir):
    transport = FakeTransport({1: update(1, 100), 2: update(2, 300), 3: silent})
    coord = coordinator(tmp_path, tiny_model_dir, transport)
    start = dict(coord.global_state)
    report = coord.run()

    training = report.rounds[1].training
    assert training.aggregated and training.participants == ["alpha", "beta"]
    assert training.failures == ["node 3: no reply within 5 s"]
    states = [random_state(start, seed) for seed in (1, 2)]
    assert_same_state(coord.global_state, {n: (states[0][n] + 3 * states[1][n]) / 4 for n in start})


# what Flower's simulation engine puts in the error reply of a ClientApp that raised (Ray's
# chained traceback, colour codes included; paths shortened)
RAY_FAILURE = (
    "node 1: <class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor"
    ".run()\x1b[39m (pid=10295, ip=192.0.2.2, actor_id=03697246ab8deb85, repr=<flwr.simulation."
    "ray_transport.ray_actor.ClientAppActor object at 0x7fd6a0e377d0>)\n"
    '  File "/venv/flwr/clientapp/client_app.py", line 161, in __call__\n'
    "    return self._registered_funcs[full_name](message, context)\n"
    "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/work/client/policy.py", line 170, in check_delta\n'
    "    raise PolicyError(problem)\n"
    "privatune.client.policy.PolicyError: sites/north/policy.yaml: delta = 1 is not below 1/48 "
    "(this site has 48 records); choose delta < 0.0208\n\n"
    "The above exception was the direct cause of the following exception:\n\n"
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=10295, ip=192.0.2.2)\n"
    '  File "/venv/flwr/simulation/ray_transport/ray_actor.py", line 65, in run\n'
    "    raise ClientAppException(str(ex)) from ex\n"
    "flwr.clientapp.client_app.ClientAppException: \n"
    "Exception ClientAppException occurred. Message: sites/north/policy.yaml: delta = 1 is not "
    "below 1/48 (this site has 48 records); choose delta < 0.0208'>")
RAY_REASON = ("node 1: PolicyError: sites/north/policy.yaml: delta = 1 is not below 1/48 (this "
              "site has 48 records); choose delta < 0.0208")


def test_a_failed_nodes_traceback_is_one_line_in_the_report_and_whole_in_its_log(
        tmp_path, tiny_model_dir):
    """report.json and report.md give each failure as one line, the exception the node raised;
    the whole text goes to failures.log (only what was shortened)."""
    from privatune.server.failure_reasons import FAILURE_LOG, failure_reason

    transport = FakeTransport({1: lambda *_: RAY_FAILURE, 2: update(2, 300), 3: silent})
    report = coordinator(tmp_path, tiny_model_dir, transport, min_replies=1).run()
    write_report(report, tmp_path / "out")

    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["rounds"][1]["failures"] == [RAY_REASON, "node 3: no reply within 5 s"]
    assert RunReport.read(tmp_path / "out" / "report.json").rounds[1].training.failures == [
        RAY_REASON, "node 3: no reply within 5 s"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert f"- round 1 (training): {RAY_REASON}\n" in markdown and FAILURE_LOG in markdown
    assert "Traceback" not in markdown and "ray_actor.py" not in markdown
    log = (tmp_path / "out" / FAILURE_LOG).read_text()
    assert log == f"round 1 (training): {RAY_FAILURE}\n"
    # a SuperNode's error reply; a reply without an exception's line keeps its last line; a
    # long one is cut
    assert failure_reason("node 6: <class 'ValueError'>:<'site.data: no such file'>") == \
        "node 6: ValueError: site.data: no such file"
    assert failure_reason("node 4: boom\n  at frame\nsomething odd happened") == \
        "node 4: something odd happened"
    assert len(failure_reason("node 5: " + "x" * 1000)) == 300


@pytest.mark.parametrize("defect, message", [("shape", "shape"), ("nan", "NaN")])
def test_update_that_does_not_fit_is_rejected_with_its_reason(tmp_path, tiny_model_dir, defect, message):
    transport = FakeTransport({1: update(1, 100), 2: tampered(defect), 3: update(3, 100)})
    coord = coordinator(tmp_path, tiny_model_dir, transport)
    start = dict(coord.global_state)
    report = coord.run()

    training = report.rounds[1].training
    assert training.participants == ["alpha", "gamma"] and training.aggregated
    assert len(training.failures) == 1
    assert training.failures[0].startswith("beta: update rejected:") and message in training.failures[0]
    assert report.sites["beta"].rounds_participated == []
    states = [random_state(start, seed) for seed in (1, 3)]
    assert_same_state(coord.global_state, {n: (states[0][n] + states[1][n]) / 2 for n in start})


# ------------------------------------------------------------------------------------ resume


class Crash(RuntimeError):
    pass


def crash_in_round(transport: FakeTransport, round_number: int) -> FakeTransport:
    """The coordinator dies (``Crash``) when it asks for ``round_number``'s training."""
    train = transport.train

    def train_then_crash(requests, state, timeout_s):
        if any(request.round == round_number for request in requests.values()):
            raise Crash(f"coordinator killed during round {round_number}")
        return train(requests, state, timeout_s)

    transport.train = train_then_crash  # type: ignore[method-assign]
    return transport


def test_new_coordinator_resumes_at_the_next_round_with_the_same_adapter_and_history(
        tmp_path, tiny_model_dir):
    behaviours = {1: update(1, 100), 2: update(2, 300), 3: decline("not today")}
    transport = crash_in_round(FakeTransport(behaviours), 2)
    first = coordinator(tmp_path, tiny_model_dir, transport, rounds=3)
    with pytest.raises(Crash):
        first.run()

    again = FakeTransport(behaviours)
    second = coordinator(tmp_path, tiny_model_dir, again, rounds=3)
    assert second.run_id == first.run_id
    assert_same_state(second.global_state, first.global_state)
    assert second.rounds == first.rounds and [r.round for r in second.rounds] == [0, 1]
    assert second.sites == first.sites
    assert set(second.sites["alpha"].perplexity) == {0, 1}  # integer round keys again

    report = second.run()
    assert [r.round for r in again.train_requests] == [2, 3]
    assert [r.round for r in report.rounds] == [0, 1, 2, 3]
    assert report.sites["alpha"].rounds_participated == [1, 2, 3]
    assert report.rounds[1] == first.rounds[1]


def files_under(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


def test_a_checkpoint_is_resumed_only_by_its_own_job_and_sites_and_is_kept(tmp_path,
                                                                           tiny_model_dir):
    """Another job's config, other sites, a new run or a finished run: refused before any
    model is loaded, naming what differs and how to start afresh, with every file kept; a
    longer timeout is no other job."""
    from privatune.server.checkpoints import ResumeRefused

    behaviours = {1: update(1, 100), 2: update(2, 300), 3: decline("not today")}
    first = coordinator(tmp_path, tiny_model_dir, crash_in_round(FakeTransport(behaviours), 2),
                        rounds=2)
    with pytest.raises(Crash):
        first.run()
    run = tmp_path / "run"
    kept = files_under(run)

    def settings(**changes) -> CoordinatorSettings:
        base = CoordinatorSettings(job=job(rounds=2), model_dir=tiny_model_dir, out_dir=run,
                                   run_id="test-run")
        return CoordinatorSettings(**{**base.__dict__, **changes})

    refusals = {
        "federation.min_replies: 2 in the checkpoint, 1 in this job":
            settings(job=job(rounds=2, min_replies=1)),
        "gamma took part in the run; this job has no such site":
            settings(sites=("alpha", "beta")),
        "holds the checkpoints of run test-run (after round 1); run sim-2 is a new run":
            settings(run_id="sim-2", resume=False),
    }
    for message, refused in refusals.items():
        with pytest.raises(ResumeRefused, match=re.escape(message)) as err:
            Coordinator(refused, FakeTransport(behaviours), progress=lambda _line: None)
        assert "another output directory" in str(err.value)
        assert files_under(run) == kept

    lines: list[str] = []
    longer = job(rounds=2)
    longer = dataclasses.replace(longer, federation=dataclasses.replace(longer.federation,
                                                                        round_timeout_s=60.0))
    patient = settings(job=longer)
    report = Coordinator(patient, FakeTransport(behaviours), progress=lines.append).run()
    assert "resuming run test-run after round 1" in lines[0]
    assert [r.round for r in report.rounds] == [0, 1, 2]
    write_report(report, run)
    finished = files_under(run)
    with pytest.raises(ResumeRefused, match=r"the run is finished \(its 2 rounds are done"):
        Coordinator(patient, FakeTransport(behaviours), progress=lambda _line: None)
    assert files_under(run) == finished


def test_a_deployed_run_is_refused_before_it_is_submitted(tmp_path):
    """``privatune coordinator`` checks the checkpoints in --out against the job file (and the
    sites of the registered keys) before it submits anything to the SuperLink."""
    from privatune.common.config import to_dict
    from privatune.server.deployment import DeploymentError
    from privatune.server.run_inputs import RunInputs
    from privatune.server.runs import check_resume

    out = tmp_path / "out"
    state = out / "checkpoints" / "round_001" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"run_id": "7", "round": 1, "rounds": [], "sites": {"north": {}},
                                 "config": to_dict(job(rounds=3))}))
    job_file = tmp_path / "job.yaml"
    job_file.write_text("seed: 5\nlora: {r: 2, alpha: 4, target_modules: [q_proj, v_proj]}\n"
                        "training: {learning_rate: 1.0}\nfederation: {rounds: 3, min_nodes: 3, "
                        "min_replies: 2, node_wait_s: 1.0, round_timeout_s: 5.0}\n")
    inputs = RunInputs(job_config=job_file, model_dir=tmp_path, out_dir=out)
    check_resume(inputs)  # the same job: resumed
    job_file.write_text(job_file.read_text() + "privacy: {delta: 1.0e-6}\n")
    with pytest.raises(DeploymentError, match=r"will not resume run 7 \(after round 1\) with this "
                                              r"job: privacy.delta: 1e-05 in the checkpoint, 1e-06"):
        check_resume(inputs)


def test_each_node_is_sent_its_sites_last_head_and_a_resumed_coordinator_keeps_them(
        tmp_path, tiny_model_dir):
    """The coordinator keeps every site's ledger head, spend and received update hashes per
    round, sends each node its own site's last head, and restores all of it on resume."""
    from privatune.common.ledger import SiteLedger
    from privatune.common.lora import update_hash
    from privatune.common.run_record import read_run_record

    ledgers = {name: tmp_path / "ledgers" / name / "ledger.jsonl" for name in SITES.values()}
    behaviours = {node: LedgeredSite(ledgers[name], update(node, 100)) for node, name in SITES.items()}
    first = coordinator(tmp_path, tiny_model_dir, crash_in_round(FakeTransport(behaviours), 3),
                        rounds=3)
    with pytest.raises(Crash):
        first.run()
    again = FakeTransport(behaviours)  # LedgeredSite asserts that every head it is sent holds
    second = coordinator(tmp_path, tiny_model_dir, again, rounds=3)
    assert second.sites == first.sites
    report = second.run()

    assert [r.ledger_seq for r in again.node_requests[0].values()] == [4, 4, 4]  # after round 2
    for node, name in SITES.items():
        request = again.node_requests[0][node]
        tally = report.rounds[2].training.replies[name]
        assert (request.ledger_seq, request.ledger_hash) == (tally.ledger_seq, tally.ledger_hash)
        assert request.ledger_epsilon == tally.epsilon and request.ledger_delta == 1e-5
        ledger = SiteLedger(ledgers[name])
        reply = report.rounds[3].training.replies[name]
        assert (reply.ledger_seq, reply.ledger_hash) == (ledger.head.seq, ledger.head.hash)
        assert reply.accountant == "opacus-rdp" and reply.epsilon_budget == 8.0
        assert (report.rounds[3].training.update_sha256[name]
                == ledger.adapter_updates()[-1]["update_sha256"])
    write_report(report, tmp_path / "out")
    record = read_run_record(tmp_path / "out" / "report.json")
    alpha = record["alpha"]
    assert [(h.round, h.phase) for h in alpha.heads] == [(1, "train"), (2, "train"), (3, "train")]
    assert [u.round for u in alpha.received] == [1, 2, 3]
    assert alpha.received[-1].sha256 == SiteLedger(ledgers["alpha"]).adapter_updates()[-1]["update_sha256"]
    assert alpha.epsilon == report.sites["alpha"].epsilon and alpha.accountant == "opacus-rdp"
    assert read_run_record(latest_checkpoint(tmp_path / "run")) == record
    assert "| alpha | 6, " in (tmp_path / "out" / "report.md").read_text()
    # the hash the coordinator computes of a received update is the node's, through Flower's codec
    from privatune.common.protocol import arrayrecord_to_state, state_to_arrayrecord
    state = random_state(second.global_state, 4)
    assert update_hash(arrayrecord_to_state(state_to_arrayrecord(state))) == update_hash(state)


def test_checkpoint_state_reads_old_checkpoints_and_writes_the_same_json():
    """state.json as written before the records were typed: integer round keys as text,
    round 0 without training keys, a site that never trained without delta or budget."""
    old = {
        "run_id": "sim-3-1700000000", "round": 1,
        "rounds": [
            {"round": 0, "participants": [], "global_perplexity": 40.5, "federated_perplexity": 41.0,
             "site_perplexity": {"north": 39.0, "south": None}, "evaluation_failures": []},
            {"round": 1, "participants": ["north"], "declined": {"south": "over budget"},
             "failures": ["node 9: no reply within 5 s"], "aggregated": False,
             "global_perplexity": 40.5, "federated_perplexity": 41.0,
             "site_perplexity": {"north": 38.0, "south": None}, "evaluation_failures": [],
             "epsilon": {"north": 1.25, "south": 0.0}},
        ],
        "sites": {
            "north": {"rounds": [1], "perplexity": {"0": 39.0, "1": 38.0}, "epsilon": 1.25,
                      "delta": 1e-4, "epsilon_budget": 8.0, "noise_multiplier": 1.3},
            "south": {"rounds": [], "perplexity": {"0": None, "1": None}, "epsilon": 0.0},
        },
    }
    state = CheckpointState.from_json(json.loads(json.dumps(old)))
    assert state.sites["north"] == SiteTally(rounds=[1], perplexity={0: 39.0, 1: 38.0}, epsilon=1.25,
                                             delta=1e-4, epsilon_budget=8.0, noise_multiplier=1.3)
    assert state.sites["south"].delta is None and state.rounds[0].training is None
    assert state.rounds[1].training.declined == {"south": "over budget"}
    assert json.loads(json.dumps(state.to_json())) == {"schema_version": 1, **old}


def test_a_train_reply_is_one_type_from_the_node_to_the_runs_files():
    """The round record keeps the node's TrainReply itself; it round-trips through report.json's
    form, and a reply of an older file (the fields the coordinator used to keep) still reads."""
    from privatune.server.rounds import RoundTraining

    reply = TrainReply(site="north", accepted=True, num_examples=120, epsilon=1.5, delta=1e-5,
                       epsilon_budget=8.0, noise_multiplier=0.9, train_loss=2.5,
                       accountant="opacus-prv", ledger_seq=4, ledger_hash="h" * 64)
    training = RoundTraining(replies={"north": reply}, update_sha256={"north": "u" * 64})
    again = RoundTraining.from_json(json.loads(json.dumps(training.to_json())))
    assert again.replies == {"north": reply} and again.update_sha256 == {"north": "u" * 64}
    older = {"replies": {"south": {"accepted": False, "epsilon": 0.5, "delta": 1e-5,
                                   "epsilon_budget": 8.0, "accountant": "opacus-rdp",
                                   "ledger_seq": 2, "ledger_hash": "g" * 64,
                                   "update_sha256": None}}}
    south = RoundTraining.from_json(older)
    assert south.replies["south"] == TrainReply(site="south", accepted=False, epsilon=0.5,
                                                delta=1e-5, epsilon_budget=8.0,
                                                accountant="opacus-rdp", ledger_seq=2,
                                                ledger_hash="g" * 64)
    assert south.update_sha256 == {}


def test_every_masked_input_of_a_secure_round_is_on_the_record_the_audit_checks():
    """A secure round receives one masked input per step from each site: the record keeps
    every one (not the last alone), so the audit finds each in the site's ledger."""
    from privatune.server.rounds import RoundRecord, RoundTraining, site_records

    reply = TrainReply(site="north", accepted=True, epsilon=1.5, delta=1e-5, epsilon_budget=8.0,
                       accountant="skellam-rdp", ledger_seq=9, ledger_hash="h" * 64)
    masked = ["a" * 64, "b" * 64, "c" * 64]
    training = RoundTraining(replies={"north": reply}, masked_inputs_sha256={"north": masked})
    again = RoundTraining.from_json(json.loads(json.dumps(training.to_json())))
    assert again.masked_inputs_sha256 == {"north": masked} and again.update_sha256 == {}
    records = site_records([RoundRecord(0), RoundRecord(1, training=again)])
    assert [(u.round, u.sha256) for u in records["north"].received] == [(1, h) for h in masked]


def test_a_run_file_of_a_newer_schema_is_refused_by_name(tmp_path):
    """report.json and state.json say their schema; a newer one than this privatune reads is
    refused with what to do, never misread."""
    from privatune.common.run_record import read_run_record

    newer = {"schema_version": 2, "run_id": "r", "round": 1, "rounds": [], "sites": {},
             "ledger_record": {}}
    for read in (CheckpointState.from_json, RunReport.from_json):
        with pytest.raises(ValueError, match="schema_version 2 by a newer privatune.*upgrade"):
            read(newer)
    (tmp_path / "report.json").write_text(json.dumps(newer))
    with pytest.raises(ValueError, match="report.json: not a usable record.*newer privatune"):
        read_run_record(tmp_path)


def test_report_json_round_trips_and_keeps_its_shape(tmp_path, tiny_model_dir):
    transport = FakeTransport({1: update(1, 100), 2: update(2, 300), 3: decline("no")})
    report = coordinator(tmp_path, tiny_model_dir, transport).run()
    report.sites["alpha"].local_only_perplexity = 12.5
    write_report(report, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert RunReport.read(tmp_path / "out" / "report.json") == report
    assert set(saved) == {"schema_version", "run_id", "config", "base_model",
                          "base_model_description", "central", "rounds", "sites", "best_round",
                          "overfitting", "ledger_record"}  # the last three derived
    assert saved["schema_version"] == 1
    assert set(saved["rounds"][0]) == {"round", "participants", "global_perplexity",
                                       "federated_perplexity", "site_perplexity", "evaluation_failures"}
    assert set(saved["rounds"][1]) == set(saved["rounds"][0]) | {"declined", "failures", "aggregated",
                                                                 "epsilon", "train_loss", "bytes_sent",
                                                                 "bytes_received", "update_bytes",
                                                                 "replies"}
    assert set(saved["sites"]["beta"]) == {"base_perplexity", "final_perplexity", "epsilon", "delta",
                                           "epsilon_budget", "noise_multiplier", "rounds_participated"}
    assert saved["sites"]["alpha"]["local_only_perplexity"] == 12.5
    assert RoundRecord.from_json(saved["rounds"][1]).training.declined == {"gamma": "no"}
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "report.png").is_file()


# ------------------------------------------------------------------- replies over a Flower grid


@pytest.fixture
def flower_task(monkeypatch):
    """The identity Flower gives a ServerApp process (Message() reads it); set as a test stand-in."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", FakeGrid.SUPERLINK), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class FakeGrid:
    """Flower's Grid contract without a SuperLink: ids are assigned on send, replies come back
    by ``reply_to_message_id``; the SuperLink itself answers for an unavailable node."""

    SUPERLINK = 0

    def __init__(self, answers: Mapping[int, Callable[[Message], Message | None]]):
        self.answers = answers
        self.timeouts: list[float | None] = []

    def get_node_ids(self) -> list[int]:
        return list(self.answers)

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Grid.push_messages does
            reply = self.answers[message.metadata.dst_node_id](message)
            if reply is not None:
                replies.append(reply)
        return list(reversed(replies))  # in no particular order


def train_reply(site: str, accepted: bool = True) -> Callable[[Message], Message]:
    def answer(message: Message) -> Message:
        content = TrainReply(site=site, accepted=accepted, num_examples=20, epsilon=1.0,
                             delta=1e-5, epsilon_budget=8.0, noise_multiplier=1.2).to_record()
        if accepted:
            content[ADAPTER_KEY] = message.content[ADAPTER_KEY]
        return Message(content, reply_to=message)
    return answer


def unavailable(message: Message) -> Message:
    reply = Message(Error(code=0, reason="node is unavailable"), reply_to=message)
    reply.metadata.__dict__["_src_node_id"] = FakeGrid.SUPERLINK  # sent by the SuperLink
    return reply


def malformed(message: Message) -> Message:
    return Message(RecordDict({STATUS_KEY: ConfigRecord({"site": "delta", "accepted": True}),
                               METRICS_KEY: MetricRecord({"num_examples": 3})}), reply_to=message)


def test_flower_transport_attributes_every_reply_to_the_node_it_asked(flower_task):
    state = {"layer.lora_A.weight": torch.randn(2, 4), "layer.lora_B.weight": torch.zeros(4, 2)}
    grid = FakeGrid({11: train_reply("alpha"), 12: unavailable, 13: lambda _m: None,
                     14: malformed, 15: train_reply("epsilon", accepted=False)})
    request = train_request(job(), "run", 1)
    results, failures = FlowerTransport(grid).train({n: request for n in (11, 12, 13, 14, 15)},
                                                    state, 2.5)

    assert grid.timeouts == [2.5]
    assert sorted((r.node_id, r.reply.site, r.reply.accepted) for r in results) == [
        (11, "alpha", True), (15, "epsilon", False)]
    alpha = next(r for r in results if r.node_id == 11)
    assert alpha.reply.noise_multiplier == 1.2 and alpha.reply.train_loss is None
    assert_same_state(alpha.state, state)
    assert sorted(failures) == ["node 12: node is unavailable", "node 13: no reply within 2.5 s",
                                "node 14: malformed reply: an accepted update without its adapter "
                                "(no ArrayRecord 'adapter')"]


def test_evaluate_replies_decode_with_the_shared_codec(flower_task):
    def answer(message: Message) -> Message:
        return Message(EvaluateReply(site="alpha", num_examples=9, eval_loss=None).to_record(),
                       reply_to=message)

    grid = FakeGrid({21: answer})
    results, failures = FlowerTransport(grid).evaluate(
        {21: evaluate_request(job(), "run", 0)}, {"x.lora_A.weight": torch.ones(1, 1)}, 1.0)
    assert results == [EvaluateResult(21, EvaluateReply(site="alpha", num_examples=9,
                                                        eval_loss=None))] and failures == []


def test_reply_codec_round_trips_and_names_what_is_missing():
    reply = TrainReply(site="north", accepted=True, num_examples=7, epsilon=0.4, delta=1e-5,
                       epsilon_budget=8.0, noise_multiplier=0.9, train_loss=1.5)
    content = reply.to_record()
    assert dict(content[STATUS_KEY]) == {"site": "north", "accepted": True, "reason": "",
                                         "accountant": "", "ledger_hash": ""}
    assert TrainReply.from_record(content) == reply
    withheld = TrainReply(site="north", accepted=False, reason="no").to_record()
    assert "train_loss" not in withheld[METRICS_KEY]  # None is left out, decodes to None
    assert TrainReply.from_record(withheld).train_loss is None
    with pytest.raises(ValueError, match="lacks field 'site'"):
        TrainReply.from_record(RecordDict({STATUS_KEY: ConfigRecord({"accepted": True}),
                                           METRICS_KEY: MetricRecord({})}))
    with pytest.raises(ValueError, match="no 'metrics' record"):
        EvaluateReply.from_record(RecordDict({STATUS_KEY: ConfigRecord({"site": "x"})}))
    with pytest.raises(ValueError, match="accepted is 'yes', not true or false"):
        TrainReply.from_record(RecordDict({STATUS_KEY: ConfigRecord({"site": "x", "accepted": "yes"}),
                                           METRICS_KEY: MetricRecord({})}))


# ------------------------------------------------------------------------------ poisoned sites


def scaled(factor: float, examples: int = 50) -> Behaviour:
    """An honest-looking update whose move from the global adapter is ``factor`` times larger."""
    def answer(node: int, request: TrainRequest, state: Mapping[str, torch.Tensor]) -> TrainResult:
        result = update(node, examples)(node, request, state)
        moved = {n: state[n] + factor * 0.01 * (t - state[n]) for n, t in result.state.items()}
        return TrainResult(node, result.reply, moved)
    return answer


@pytest.mark.parametrize("poison", [scaled(1e6), scaled(1.0, examples=10**9),
                                    scaled(1.0, examples=-150)])
def test_one_poisoned_site_does_not_move_the_global_adapter(tmp_path, tiny_model_dir, poison):
    honest = {1: scaled(1.0), 2: scaled(1.0)}
    clean = coordinator(tmp_path / "clean", tiny_model_dir, FakeTransport(honest), nodes=2)
    clean.train_round(1)
    attacked = coordinator(tmp_path / "attacked", tiny_model_dir,
                           FakeTransport({**honest, 3: poison}), nodes=3)
    outcome = attacked.train_round(1)
    assert outcome.participants == ["alpha", "beta"]
    assert any(f.startswith("gamma: update rejected") for f in outcome.failures)
    assert_same_state(attacked.global_state, clean.global_state)


def test_two_nodes_claiming_one_site_are_both_left_out(tmp_path, tiny_model_dir):
    def impostor(node, request, state):
        result = scaled(1.0)(node, request, state)
        return TrainResult(node, TrainReply(**{**result.reply.__dict__, "site": "alpha"}), result.state)

    chosen = coordinator(tmp_path, tiny_model_dir,
                         FakeTransport({1: scaled(1.0), 2: scaled(1.0), 3: impostor}), min_replies=1)
    outcome = chosen.train_round(1)
    assert outcome.participants == ["beta"]
    assert sum("claims site 'alpha'" in f for f in outcome.failures) == 2


def test_robust_median_and_equal_weights(tmp_path, tiny_model_dir):
    behaviours = {1: update(1, 10), 2: update(2, 30), 3: update(3, 1000)}
    by_median = coordinator(tmp_path / "median", tiny_model_dir, FakeTransport(behaviours),
                            robust="median")
    by_median.train_round(1)
    states = [random_state(by_median.global_state, seed) for seed in (1, 2, 3)]
    assert_same_state(by_median.global_state,
                      {n: torch.stack([s[n] for s in states]).median(dim=0).values for n in states[0]})
    equal = coordinator(tmp_path / "equal", tiny_model_dir, FakeTransport(behaviours),
                        weighting="equal")
    equal.train_round(1)
    assert_same_state(equal.global_state, {n: sum(s[n] for s in states) / 3 for n in states[0]})


# -------------------------------------------------------------------------------- generation


class ScoringTransport(FakeTransport):
    """Sites answer a generation request with scores that grow by round, and clinical scores
    (beta withholding its counts); gamma withholds its scores."""

    def evaluate(self, requests, state, timeout_s):
        import dataclasses

        results, failures = super().evaluate(requests, state, timeout_s)
        request = next(iter(requests.values()))
        if request.generation:
            counts = {"generation_examples": 4, "measurements_checked": 6, "statuses_checked": 8,
                      "derivable_statuses_checked": 4}
            results = [r if r.reply.site == "gamma" else EvaluateResult(r.node_id, dataclasses.replace(
                r.reply, rouge_l=0.05 + 0.1 * request.round, bleu=2.0 + request.round,
                chrf=20.0 + request.round, measurement_fidelity=0.5, status_accuracy=0.25,
                status_majority_share=0.625, derivable_status_accuracy=0.5,
                derivable_status_majority_share=0.75, repeat_4gram=0.1 * request.round,
                **(counts if r.reply.site == "alpha" else {}))) for r in results]
        return results, failures


def test_generation_scores_and_samples_from_the_central_set_reach_the_report(tmp_path,
                                                                              tiny_model_dir):
    import dataclasses

    from privatune.common.config import EvaluationConfig, ModelConfig
    from privatune.common.generation import NO_MARKER, NOTHING_BEFORE
    from tests.conftest import write_notes

    central = write_notes(tmp_path / "central.jsonl", 12, 5)
    with central.open("a") as handle:  # two notes that make no task, counted
        handle.write(json.dumps({"text": "Discharged home, no heading here."}) + "\n")
        handle.write(json.dumps({"text": "Assessment: stable."}) + "\n")
    config = dataclasses.replace(job(rounds=3), model=ModelConfig(max_length=48),
                                 evaluation=EvaluationConfig(max_new_tokens=4, every_k_rounds=2,
                                                             max_examples=5))
    transport = ScoringTransport({1: update(1, 100), 2: update(2, 300), 3: update(3, 600)})
    settings = CoordinatorSettings(job=config, model_dir=tiny_model_dir, out_dir=tmp_path / "run",
                                   run_id="test-run", central_eval=central)
    report = Coordinator(settings, transport, progress=lambda _line: None).run()

    # round 0 (the base model), every 2nd round and the final round; the sites were asked then
    assert [(r.round, r.generation) for r in transport.evaluate_requests] == [
        (0, True), (1, False), (2, True), (3, True)]
    assert transport.evaluate_requests[0].max_new_tokens == 4
    scored = [r.round for r in report.rounds if r.evaluation.global_generation is not None]
    assert scored == [0, 2, 3]
    assert report.rounds[2].evaluation.global_generation.examples == 5  # max_examples
    central_summary = report.central
    assert central_summary.base_generation == report.rounds[0].evaluation.global_generation
    assert central_summary.final_generation == report.rounds[3].evaluation.global_generation
    assert central_summary.generation_tasks == 12
    assert central_summary.generation_skipped == {NO_MARKER: 1, NOTHING_BEFORE: 1}
    # the clinical scores and the cut-off count of the central completions, in range
    for scores in (central_summary.base_generation, central_summary.final_generation):
        clinical = scores.clinical
        assert clinical.completions == 5 and 0 <= scores.cut_off <= 5
        assert 0.0 <= clinical.repeat_4gram <= 1.0
        for share in (clinical.measurement_fidelity, clinical.status_accuracy,
                      clinical.status_majority_share, clinical.derivable_status_accuracy,
                      clinical.derivable_status_majority_share):
            assert share is None or 0.0 <= share <= 1.0
    # three samples of the coordinator's own notes: prompt up to the marker, the note's rest
    assert len(central_summary.samples) == 3
    for sample in central_summary.samples:
        assert sample.prompt.startswith("Patient admitted with") and sample.prompt.endswith("Assessment:")
        assert "Plan:" in sample.reference
        assert isinstance(sample.base, str) and isinstance(sample.final, str)
    # per site: base (round 0) and final scores as released; gamma withheld its
    alpha = report.sites["alpha"]
    assert alpha.base_generation.rouge_l == pytest.approx(0.05)
    assert alpha.final_generation.rouge_l == pytest.approx(0.35) and alpha.final_generation.examples == 4
    assert alpha.final_generation.clinical.repeat_4gram == pytest.approx(0.3)
    assert alpha.final_generation.clinical.statuses_checked == 8
    assert alpha.final_generation.clinical.completions == 4
    beta = report.sites["beta"].final_generation.clinical  # its counts withheld
    assert beta.status_accuracy == 0.25 and beta.statuses_checked is None and beta.completions is None
    assert report.sites["gamma"].base_generation is None and report.sites["gamma"].final_generation is None
    # report.json keys them next to rouge_l, base and final, centrally and per site
    saved = report.to_json()
    for scores in (saved["central"]["base_generation"], saved["central"]["final_generation"],
                   saved["sites"]["alpha"]["final_generation"]):
        assert {"measurement_fidelity", "status_accuracy", "status_majority_share",
                "derivable_status_accuracy", "derivable_status_majority_share",
                "repeat_4gram"} <= set(scores)
    assert "cut_off" in saved["central"]["final_generation"]
    # how max_length 48 and max_new_tokens 4 fit the 14 notes and 12 references, reported
    lengths = central_summary.lengths
    assert (lengths.examples, lengths.references, lengths.max_length, lengths.max_new_tokens) == (
        14, 12, 48, 4)
    assert lengths.cut_references == 12 and lengths.max_new_tokens_covering > 4
    assert 0 <= lengths.cut_examples <= 14 and lengths.max_length_covering > 0
    assert 0 < lengths.rouge_l_ceiling < 1  # 4 tokens of every longer reference: recall lost
    assert RunReport.from_json(saved).central.lengths == lengths

    markdown = render_markdown(report)
    assert "## Generation" in markdown
    assert f"cuts {lengths.cut_examples} of 14 notes" in markdown
    assert "| alpha | base | 7.39 | 0.050 | 2.0 | 20.0 |" in markdown
    assert "| alpha | final global | 7.39 | 0.350 | 5.0 | 23.0 |" in markdown
    assert "| gamma | final global | 54.60 | n/a | n/a | n/a |" in markdown
    assert "| alpha | final global | 0.350 | 0.50 (6) | 0.25 vs 0.62 (8) | 0.50 vs 0.75 (4) | 0.30 |" \
        in markdown
    assert "| beta | base | 0.050 | 0.50 | 0.25 vs 0.62 | 0.50 vs 0.75 | 0.00 |" in markdown
    assert "| gamma | final global | n/a | n/a | n/a | n/a | n/a |" in markdown
    assert f"| {central_summary.final_generation.cut_off} of 5 |" in markdown  # cut off
    assert "12 notes make a task (skipped: 1 without the marker, 1 with nothing before the marker)" \
        in markdown
    assert "**Sample 3.** Prompt:" in markdown and "Final global model:" in markdown
    assert central_summary.samples[0].prompt in markdown

    write_report(report, tmp_path / "out")
    assert (tmp_path / "out" / "report_generation.png").stat().st_size > 0
    assert RunReport.read(tmp_path / "out" / "report.json") == report
    # a resumed coordinator reads the scores and samples back from the checkpoint
    state = CheckpointState.read(latest_checkpoint(tmp_path / "run"))
    assert state.rounds == report.rounds


def test_no_generation_when_every_k_rounds_is_0(tmp_path, tiny_model_dir):
    import dataclasses

    from privatune.common.config import EvaluationConfig
    from tests.conftest import write_notes

    config = dataclasses.replace(job(rounds=1), evaluation=EvaluationConfig(every_k_rounds=0))
    transport = ScoringTransport({1: update(1, 100), 2: update(2, 300), 3: update(3, 600)})
    settings = CoordinatorSettings(job=config, model_dir=tiny_model_dir, out_dir=tmp_path / "run",
                                   run_id="test-run",
                                   central_eval=write_notes(tmp_path / "central.jsonl", 6, 5))
    report = Coordinator(settings, transport, progress=lambda _line: None).run()
    assert not any(r.generation for r in transport.evaluate_requests)
    assert all(r.evaluation.global_generation is None for r in report.rounds)
    assert report.central.generation_tasks is None and "## Generation" not in render_markdown(report)
